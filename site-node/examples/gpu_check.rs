//! The checks that need a CUDA GPU, in one run (`scripts/gpu-check.sh` runs it on the device
//! machine; CI has no GPU). Prints one JSON object per line and exits non-zero if a check fails.
//!
//! ```text
//! gpu_check [ELEMENTS] [--lm]
//! ```
//! 1. `bit_identity`: the GPU kernel against [`KeyedGaussian::fill`] on the CPU, the same keys,
//!    ELEMENTS values in all (default 12 000 000) over the sampler's parameter range, compared
//!    as bits.
//! 2. `throughput`: exact draws/s on the GPU (10^8 values per release) beside the CPU's (keyed
//!    and sequential samplers on every core), at the production noise scale σ_g = 2^16.
//! 3. `dp_step_cuda`: DP-SGD steps of an MLP on CUDA: the noise drawn on the GPU, the released
//!    gradient on the grid with the planned variance, and the step time.
//! 4. with `--lm`: `lm_tokens_per_s` for a ~100M-parameter `llama` (full training, AdamW, and a
//!    DP-LoRA step with GPU noise), and `lm_lora_0_5b` for a ~0.5B one trained with LoRA under DP.

use std::error::Error;
use std::num::NonZeroUsize;
use std::time::Instant;

use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::accountant::plan::{DpSgdInputs, DpSgdPlan};
use tutela_privacy::noise::{KeyedGaussian, NoiseKey, SecureGaussian};
use tutela_site_node::dp::{DpSgdStep, NoiseDevice};
use tutela_site_node::gpu_noise::GpuNoise;
use tutela_site_node::lm::config::DecoderConfig;
use tutela_site_node::lm::llama::LanguageModel;
use tutela_site_node::lm::lora::dp::{AdapterGradientStep, DpAdapterStep, SequenceBatch};
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::train::{Batch, GradientStep};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn threads() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

fn key(byte: u8) -> NoiseKey {
    NoiseKey::insecure_from_bytes(std::array::from_fn(|i| byte.wrapping_mul(73) ^ (i as u8)))
}

fn bit_identity(gpu: &GpuNoise, elements: usize) -> Result<bool> {
    // (σ, grid, share of the elements): σ_g = 1, non-integer scales, a 2^-20 grid and the
    // largest scale σ_g = 2^16 (128-bit coins), plus one OS-keyed release.
    let cases = [
        (1.0, 1.0, 0.15),
        (1.5, 1.0, 0.1),
        (1e-3, 2f64.powi(-20), 0.15),
        (1.0, 2f64.powi(-16), 0.3),
        (65535.9, 1.0, 0.1),
        (0.37, 2f64.powi(-12), 0.2),
    ];
    let mut ok = true;
    let mut compared = 0usize;
    for (i, (sigma, g, share)) in cases.into_iter().enumerate() {
        let n = ((elements as f64 * share) as usize).max(1) + 37; // ends inside a chunk
        let sampler = KeyedGaussian::new(sigma, g)?;
        let k = if i == 3 {
            NoiseKey::from_os()?
        } else {
            key(i as u8)
        };
        let on_gpu = gpu.draw(&sampler, &k, n)?;
        let from_gpu = Vec::<f32>::try_from(on_gpu.to_device(Device::Cpu))?;
        let mut on_cpu = vec![0f32; n];
        sampler.fill_parallel(&k, &mut on_cpu, threads());
        let mismatches = on_cpu
            .iter()
            .zip(&from_gpu)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let first = (0..n).find(|&j| on_cpu[j].to_bits() != from_gpu[j].to_bits());
        let sum2: f64 = on_cpu.iter().map(|&x| f64::from(x).powi(2)).sum();
        println!(
            "{{\"check\":\"bit_identity\",\"sigma\":{sigma},\"granularity\":{g:e},\"elements\":{n},\
             \"mismatches\":{mismatches},\"first_mismatch\":{},\"variance_ratio\":{:.5}}}",
            first.map_or("null".into(), |j| j.to_string()),
            sum2 / n as f64 / (sigma * sigma)
        );
        ok &= mismatches == 0;
        compared += n;
    }
    println!("{{\"check\":\"bit_identity_total\",\"elements\":{compared},\"identical\":{ok}}}");
    Ok(ok && compared >= elements)
}

fn throughput(gpu: &GpuNoise) -> Result<()> {
    let (sigma, g) = (1.0, 2f64.powi(-16));
    let keyed = KeyedGaussian::new(sigma, g)?;
    let n_gpu = 100_000_000usize;
    let mut buffer = Tensor::f_empty([n_gpu as i64], (Kind::Float, Device::Cuda(gpu.ordinal())))?;
    gpu.fill(&keyed, &NoiseKey::from_os()?, &mut buffer)?; // warm-up
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        gpu.fill(&keyed, &NoiseKey::from_os()?, &mut buffer)?;
    }
    let gpu_rate = (reps * n_gpu) as f64 / start.elapsed().as_secs_f64();
    let n_cpu = 20_000_000usize;
    let mut host = vec![0f32; n_cpu];
    let start = Instant::now();
    keyed.fill_parallel(&NoiseKey::from_os()?, &mut host, threads());
    let keyed_rate = n_cpu as f64 / start.elapsed().as_secs_f64();
    let mut sequential = SecureGaussian::new(sigma, g)?;
    let start = Instant::now();
    sequential.fill_parallel(&mut host, threads());
    let sequential_rate = n_cpu as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    sequential.fill(&mut host[..n_cpu / 4]);
    let one_core_rate = (n_cpu / 4) as f64 / start.elapsed().as_secs_f64();
    println!(
        "{{\"check\":\"throughput\",\"sigma_grid_steps\":65536,\"gpu_draws_per_s\":{gpu_rate:.4e},\
         \"cpu_keyed_draws_per_s\":{keyed_rate:.4e},\"cpu_sequential_draws_per_s\":{sequential_rate:.4e},\
         \"cpu_one_core_draws_per_s\":{one_core_rate:.4e},\"cpu_threads\":{},\"gpu_over_cpu\":{:.1}}}",
        threads(),
        gpu_rate / sequential_rate.max(keyed_rate)
    );
    Ok(())
}

fn plan(sigma: f64, dimension: usize, batch: usize) -> Result<DpSgdPlan> {
    Ok(DpSgdPlan::new(&DpSgdInputs {
        rows: 100_000,
        batch_size: batch,
        epochs_per_round: 1,
        rounds: 1,
        clip: 1.0,
        dimension,
        target_epsilon: None,
        noise_multiplier: Some(sigma),
        delta: 1e-5,
        accountant: Accountant::Rdp,
        metrics: None,
    })?)
}

fn dp_step_cuda() -> Result<bool> {
    let device = Device::Cuda(0);
    let spec = ModelSpec::new(vec![512], 10).with_hidden(vec![2048, 2048]);
    let model = Model::new("mlp", spec, device, 1)?;
    let parameters = model.var_store().trainable_variables();
    let dimension: usize = parameters.iter().map(Tensor::numel).sum();
    let batch = 64usize;
    let plan = plan(1.0, dimension, batch)?;
    let mut step = DpSgdStep::new(&plan)?;
    tch::manual_seed(3);
    let x = Tensor::f_randn([batch as i64, 512], (Kind::Float, device))?;
    let y = Tensor::f_randint(10, [batch as i64], (Kind::Int64, device))?;
    let run = |step: &mut DpSgdStep, rows: i64| -> Result<f64> {
        let loss = step.compute_gradients(&Batch {
            net: model.layers(),
            parameters: &parameters,
            inputs: &x.narrow(0, 0, rows),
            labels: &y.narrow(0, 0, rows),
            expected_batch_size: batch,
        })?;
        Ok(loss)
    };
    run(&mut step, batch as i64)?;
    tch::Cuda::synchronize(0);
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        run(&mut step, batch as i64)?;
    }
    tch::Cuda::synchronize(0);
    let step_ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let drawn_on = step.noise_device();
    // An empty batch: the released gradient is noise / B alone, on the grid g / B (B = 64, a
    // power of two, so the division is exact) with variance (σ·C / B)².
    run(&mut step, 0)?;
    let grads: Vec<Tensor> = parameters.iter().map(|p| p.grad().view([-1])).collect();
    let released = Tensor::cat(&grads, 0).to_kind(Kind::Double) * batch as f64;
    let n = released.numel() as f64;
    let variance = released.square().mean(Kind::Double).double_value(&[]);
    let want = (plan.noise_multiplier * plan.clip).powi(2);
    let off_grid = (&released / plan.granularity)
        .frac()
        .abs()
        .max()
        .double_value(&[]);
    let variance_ok = (variance / want - 1.0).abs() < 5.0 * (2.0 / n).sqrt();
    let ok = drawn_on == Some(NoiseDevice::Gpu(0)) && off_grid == 0.0 && variance_ok;
    println!(
        "{{\"check\":\"dp_step_cuda\",\"parameters\":{dimension},\"batch\":{batch},\
         \"noise_drawn_on\":\"{drawn_on:?}\",\"step_ms\":{step_ms:.2},\"variance_ratio\":{:.5},\
         \"off_grid\":{off_grid},\"ok\":{ok}}}",
        variance / want
    );
    Ok(ok)
}

fn free_and_total_gpu_memory() -> (usize, usize) {
    cudarc::driver::result::mem_get_info().unwrap_or((0, 0))
}

/// Tokens/s of `config` on CUDA: full training with AdamW, then (on a fresh model with rank-8
/// LoRA adapters) DP-SGD on the adapters with the noise drawn on the GPU.
fn lm(name: &str, config: &DecoderConfig, batch: i64, seq: i64, full: bool) -> Result<()> {
    let device = Device::Cuda(0);
    let vocab = config.vocab_size as i64;
    tch::manual_seed(5);
    let ids = Tensor::f_randint(vocab, [batch, seq + 1], (Kind::Int64, device))?;
    let tokens = (batch * seq) as f64;
    let mut full_rate = None;
    let mut parameters = 0;
    if full {
        let model = LanguageModel::new(config, device, 1)?;
        parameters = model.parameter_count();
        let mut opt = tch::nn::AdamW::default().build(&model.vs, 1e-4)?;
        let input = ids.narrow(1, 0, seq);
        for _ in 0..2 {
            let loss = model.decoder.loss(&input, None)?;
            opt.backward_step(&loss);
        }
        tch::Cuda::synchronize(0);
        let steps = 5;
        let start = Instant::now();
        for _ in 0..steps {
            let loss = model.decoder.loss(&input, None)?;
            opt.backward_step(&loss);
        }
        tch::Cuda::synchronize(0);
        full_rate = Some(tokens * steps as f64 / start.elapsed().as_secs_f64());
    }
    let mut model = LanguageModel::new(config, device, 1)?;
    parameters = parameters.max(model.parameter_count());
    let spec = tutela_protocol::lora::LoraSpec {
        rank: 8,
        alpha: 16.0,
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        dropout: 0.0,
        aggregation: tutela_protocol::lora::LoraAggregation::Ffa,
    };
    model.attach_lora(&spec, 1)?;
    let adapters = tutela_site_node::lm::lora::dp::AdapterModel::adapter_parameters(&model.decoder);
    let adapter_values: usize = adapters.iter().map(Tensor::numel).sum();
    let plan = plan(1.0, adapter_values, batch as usize)?;
    let mut step = DpAdapterStep::new(plan.clip, DpSgdStep::new(&plan)?);
    let mut sgd = tch::nn::Sgd::default().build_copt(1e-3)?;
    for p in &adapters {
        sgd.add_parameters(p, 0)?;
    }
    let sequences = SequenceBatch {
        input_ids: ids.narrow(1, 0, seq),
        targets: ids.narrow(1, 1, seq),
        mask: Tensor::f_ones([batch, seq], (Kind::Float, device))?,
        units: (0..batch).collect(),
        n_units: batch as usize,
    };
    let mut dp_step = || -> Result<()> {
        step.compute_gradients(&model.decoder, &sequences, batch as usize)?;
        sgd.step()?;
        Ok(())
    };
    dp_step()?;
    tch::Cuda::synchronize(0);
    let steps = 5;
    let start = Instant::now();
    for _ in 0..steps {
        dp_step()?;
    }
    tch::Cuda::synchronize(0);
    let dp_rate = tokens * steps as f64 / start.elapsed().as_secs_f64();
    let (free, total) = free_and_total_gpu_memory();
    println!(
        "{{\"check\":\"{name}\",\"parameters\":{parameters},\"adapter_values\":{adapter_values},\
         \"batch\":{batch},\"seq\":{seq},\"full_adamw_tokens_per_s\":{},\
         \"dp_lora_tokens_per_s\":{dp_rate:.1},\"noise_drawn_on\":\"{:?}\",\
         \"gpu_memory_used_gib\":{:.2},\"gpu_memory_total_gib\":{:.2}}}",
        full_rate.map_or("null".into(), |r| format!("{r:.1}")),
        step.noise_device(),
        (total - free) as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64,
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let elements = args
        .iter()
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(12_000_000);
    let with_lm = args.iter().any(|a| a == "--lm");
    if !tch::Cuda::is_available() {
        return Err("libtorch sees no CUDA GPU".into());
    }
    let gpu = GpuNoise::new(0)?;
    let mut ok = bit_identity(&gpu, elements)?;
    throughput(&gpu)?;
    ok &= dp_step_cuda()?;
    if with_lm {
        // ~100M parameters: hidden 768, 12 layers, 12 query heads sharing 4 key/value heads,
        // SwiGLU 2048, a 32 000-token vocabulary, untied head.
        let small = DecoderConfig::llama(32_000, 768, 2048, 12, 12, 4);
        if let Err(e) = lm("lm_100m", &small, 8, 512, true) {
            println!("{{\"check\":\"lm_100m\",\"error\":{:?}}}", e.to_string());
            ok = false;
        }
        // ~0.5B: hidden 1280, 24 layers, 20 heads sharing 4, SwiGLU 3456, vocabulary 32 000.
        let large = DecoderConfig::llama(32_000, 1280, 3456, 24, 20, 4);
        if let Err(e) = lm("lm_lora_0_5b", &large, 8, 512, false) {
            println!(
                "{{\"check\":\"lm_lora_0_5b\",\"error\":{:?}}}",
                e.to_string()
            );
            ok = false;
        }
    }
    if ok {
        Ok(())
    } else {
        Err("a GPU check failed (see the lines above)".into())
    }
}
