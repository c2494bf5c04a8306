//! `tutela-node bench dp-step`: one DP-SGD step against one plain step, same model, same batch,
//! on the CPU, with each process's peak memory.
//!
//! Each (model, mode) pair runs in a fresh child process (the same binary, `--mode`), because
//! peak resident memory is a per-process figure and allocators keep freed memory: measuring plain
//! then DP in one process would charge the second with the first's leftovers. Within the child,
//! the peak is read from `/proc/self/status` (`VmHWM`) after resetting it (`5` written to
//! `/proc/self/clear_refs`) once the model and data are built, before the warm-up steps, and
//! reported as the growth over the resident size at that moment: the memory the steps themselves
//! need, what the allocator keeps from the first step included.

use std::time::Instant;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::accountant::plan::{DpSgdInputs, DpSgdPlan};

use crate::dp::DpSgdStep;
use crate::models::{Model, ModelSpec};
use crate::train::{Batch, GradientStep, PlainGradient, TrainError};

/// One child's measurement.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct StepBench {
    /// Median seconds per step (forward, backward and, for DP, clipping and noise).
    pub seconds: f64,
    /// Peak resident memory growth during the steps, bytes.
    pub peak_bytes: u64,
}

fn status_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The model of the benchmark: the demo's MLP on breast-cancer-shaped rows, or its CNN on MNIST.
pub fn bench_model(name: &str) -> Result<(Model, usize), TrainError> {
    let spec = match name {
        "mlp" => ModelSpec::new(vec![30], 2).with_hidden(vec![32, 16]),
        "cnn" => ModelSpec::new(vec![1, 28, 28], 10)
            .with_hidden(vec![64])
            .with_conv_channels([16, 32]),
        other => {
            return Err(TrainError::InvalidConfig {
                field: "model",
                reason: format!("bench dp-step knows mlp and cnn, not {other:?}"),
            });
        }
    };
    let features = spec.input_features().unwrap_or(1);
    let model = Model::new(name, spec, Device::Cpu, 1).map_err(|e| TrainError::InvalidConfig {
        field: "model",
        reason: e.to_string(),
    })?;
    Ok((model, features))
}

/// Times `iters` steps of `mode` (`plain` or `dp`) at `batch` rows after `warmup` steps.
pub fn measure(
    model_name: &str,
    dp: bool,
    batch: usize,
    warmup: usize,
    iters: usize,
) -> Result<StepBench, TrainError> {
    if model_name == "lora" {
        return crate::lm::lora::bench::measure(dp, batch, warmup, iters);
    }
    if model_name == "llama-lora" {
        return crate::lm::lora::bench::measure_decoder(dp, batch, warmup, iters);
    }
    let (model, features) = bench_model(model_name)?;
    let classes = model.spec().num_classes as i64;
    tch::manual_seed(0); // synthetic inputs only; no noise comes from torch
    let inputs = Tensor::randn([batch as i64, features as i64], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(classes, [batch as i64], (Kind::Int64, Device::Cpu));
    let parameters = model.var_store().trainable_variables();
    let plan = bench_plan(60_000, batch, model.parameter_count())?;
    let mut dp_step = DpSgdStep::new(&plan)?;
    let mut plain = PlainGradient;
    let mut sgd = nn::Sgd::default()
        .build(model.var_store(), 0.01)
        .map_err(|source| TrainError::Torch {
            context: "optimizer".into(),
            source,
        })?;
    let mut step = |sgd: &mut nn::Optimizer| -> Result<(), TrainError> {
        // As the training loop does: a step that overwrites every `.grad` keeps the tensors.
        let keeps_gradients = if dp {
            dp_step.overwrites_gradients()
        } else {
            plain.overwrites_gradients()
        };
        if !keeps_gradients {
            sgd.zero_grad();
        }
        let b = Batch {
            net: model.layers(),
            parameters: &parameters,
            inputs: &inputs,
            labels: &labels,
            expected_batch_size: batch,
        };
        if dp {
            dp_step.compute_gradients(&b)?;
        } else {
            plain.compute_gradients(&b)?;
        }
        sgd.step();
        Ok(())
    };
    time_steps(warmup, iters, || step(&mut sgd))
}

/// Runs `warmup` then `iters` steps and returns the median step time and the peak resident
/// memory growth over both (module documentation): one measurement for every benchmarked step.
/// The DP plan the step benchmarks run under: one epoch of `rows` at `batch_size`, C = 1 and
/// σ = 1 (fixed, not calibrated), for a model of `dimension` parameters.
pub fn bench_plan(
    rows: usize,
    batch_size: usize,
    dimension: usize,
) -> Result<DpSgdPlan, TrainError> {
    DpSgdPlan::new(&DpSgdInputs {
        rows,
        batch_size,
        epochs_per_round: 1,
        rounds: 1,
        clip: 1.0,
        dimension,
        target_epsilon: None,
        noise_multiplier: Some(1.0),
        delta: 1e-5,
        accountant: Accountant::Rdp,
        metrics: None,
    })
    .map_err(|e| TrainError::InvalidConfig {
        field: "privacy",
        reason: e.to_string(),
    })
}

pub fn time_steps(
    warmup: usize,
    iters: usize,
    mut step: impl FnMut() -> Result<(), TrainError>,
) -> Result<StepBench, TrainError> {
    // Reset the peak to the current resident size (Linux ≥ 4.0), then measure growth over the
    // warm-up steps too: the memory a step needs includes what the allocator keeps from the first
    // one (counting only after warm-up gave growths of 0 or a few MiB by chance).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let base = status_kib("VmRSS:").unwrap_or(0);
    for _ in 0..warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let peak = status_kib("VmHWM:").unwrap_or(0);
    times.sort_by(f64::total_cmp);
    Ok(StepBench {
        seconds: times[times.len() / 2],
        peak_bytes: peak.saturating_sub(base) * 1024,
    })
}
