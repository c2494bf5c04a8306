//! `tutela-node bench dp-step --models lora`: one DP-SGD step on the adapters of a
//! [`LoraStack`] against one plain LoRA step, same model, same batch, CPU, measured as the other
//! models of `crate::dp_bench` are (a child process per measurement, peak resident growth).

use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

use super::dp::{
    AdapterGradientStep, AdapterModel, DpAdapterStep, PlainAdapterGradient, SequenceBatch,
};
use super::stack::{LoraStack, LoraStackConfig};
use crate::dp::DpSgdStep;
use crate::dp_bench::{StepBench, bench_plan, time_steps};
use crate::train::TrainError;

/// The benchmark's model: 4 residual blocks of width 256, a 512-token vocabulary, rank-8 adapters
/// on every Linear (FFA-LoRA: B trained), float32.
pub const BENCH_CONFIG: LoraStackConfig = LoraStackConfig {
    vocab: 512,
    dim: 256,
    layers: 4,
    rank: 8,
    alpha: 16.0,
    train_a: false,
    kind: Kind::Float,
    device: Device::Cpu,
    seed: 1,
};

/// Tokens per sequence in the benchmark.
pub const BENCH_SEQUENCE_LENGTH: i64 = 128;

fn torch(context: &'static str) -> impl FnOnce(tch::TchError) -> TrainError {
    move |source| TrainError::Torch {
        context: context.to_owned(),
        source,
    }
}

/// The decoder benchmark's model (`llama-lora`): a Llama of hidden 256, 4 layers, 8 query heads
/// sharing 4 key/value heads, SwiGLU 688, a 512-token vocabulary, tied head; rank-8 FFA-LoRA
/// adapters on all seven projections of every layer, float32.
pub fn bench_decoder() -> Result<crate::lm::llama::LanguageModel, TrainError> {
    let config = crate::lm::config::DecoderConfig {
        tie_word_embeddings: true,
        ..crate::lm::config::DecoderConfig::llama(512, 256, 688, 4, 8, 4)
    };
    let invalid = |e: crate::lm::error::LmError| TrainError::InvalidConfig {
        field: "model",
        reason: e.to_string(),
    };
    let mut model =
        crate::lm::llama::LanguageModel::new(&config, Device::Cpu, 1).map_err(invalid)?;
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
    model.attach_lora(&spec, 1).map_err(invalid)?;
    Ok(model)
}

/// Times `iters` steps (`dp` or plain) on `sequences` full-length sequences, one per unit, of
/// the [`LoraStack`] benchmark model.
pub fn measure(
    dp: bool,
    sequences: usize,
    warmup: usize,
    iters: usize,
) -> Result<StepBench, TrainError> {
    let model = LoraStack::new(&BENCH_CONFIG).map_err(|e| TrainError::InvalidConfig {
        field: "model",
        reason: e.to_string(),
    })?;
    measure_model(&model, BENCH_CONFIG.vocab, dp, sequences, warmup, iters)
}

/// [`measure`] on the `llama` decoder with adapters ([`bench_decoder`]).
pub fn measure_decoder(
    dp: bool,
    sequences: usize,
    warmup: usize,
    iters: usize,
) -> Result<StepBench, TrainError> {
    let model = bench_decoder()?;
    measure_model(&model.decoder, 512, dp, sequences, warmup, iters)
}

fn measure_model(
    model: &dyn AdapterModel,
    vocab: i64,
    dp: bool,
    sequences: usize,
    warmup: usize,
    iters: usize,
) -> Result<StepBench, TrainError> {
    let s = sequences.max(1) as i64;
    let t = BENCH_SEQUENCE_LENGTH;
    // Synthetic tokens from torch's generator (no DP noise comes from torch).
    tch::manual_seed(0);
    let ids = Tensor::f_randint(vocab, [s, t + 1], (Kind::Int64, Device::Cpu))
        .map_err(torch("synthetic tokens"))?;
    let batch = SequenceBatch {
        input_ids: ids.narrow(1, 0, t),
        targets: ids.narrow(1, 1, t),
        mask: Tensor::f_ones([s, t], (Kind::Float, Device::Cpu)).map_err(torch("mask"))?,
        units: (0..s).collect(),
        n_units: s as usize,
    };
    let parameters = model.adapter_parameters();
    let dimension = parameters.iter().map(Tensor::numel).sum();
    let plan = bench_plan(10_000, sequences.max(1), dimension)?;
    let mut dp_step = DpAdapterStep::new(plan.clip, DpSgdStep::new(&plan)?);
    let mut plain = PlainAdapterGradient;
    let mut sgd = tch::nn::Sgd::default()
        .build_copt(0.01)
        .map_err(torch("optimizer"))?;
    for p in &parameters {
        sgd.add_parameters(p, 0).map_err(torch("optimizer"))?;
    }
    time_steps(warmup, iters, || {
        let step: &mut dyn AdapterGradientStep = if dp { &mut dp_step } else { &mut plain };
        if !step.overwrites_gradients() {
            sgd.zero_grad().map_err(torch("zero_grad"))?;
        }
        step.compute_gradients(model, &batch, sequences.max(1))?;
        sgd.step().map_err(torch("optimizer step"))
    })
}
