//! The adapters' local training loop over privacy units: Poisson-sampled batches and
//! [`DpAdapterStep`] under DP-SGD, shuffled fixed-size batches and [`PlainAdapterGradient`]
//! otherwise. Shared by the federated round and the central fine-tune.

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tch::{Device, Kind};
use tutela_privacy::accountant::plan::DpSgdPlan;

use super::data::{UnitWindows, count_targets};
use crate::dp::{DpSgdStep, DpSpend, PoissonBatchSampler};
use crate::lm::lora::dp::{
    AdapterGradientStep, AdapterModel, DpAdapterStep, PlainAdapterGradient, SequenceBatch,
};
use crate::train::{TrainConfig, TrainError, build_optimizer};

/// The most token windows in one forward pass while training: the DP release and the plain
/// gradient are the same whatever the chunking, and the peak memory is that of one chunk's
/// activations and output gradients.
const WINDOWS_PER_CHUNK: usize = 64;

/// What a local training run did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdapterTrainReport {
    /// Optimizer steps taken (under DP-SGD, each released a noised sum, empty batches too).
    pub steps: u64,
    /// Sequences (token windows) trained on, over all steps.
    pub sequences: u64,
    /// Next-token targets trained on, over all steps.
    pub tokens: u64,
    /// Mean training loss per target token over the steps.
    pub mean_loss: f64,
    pub seconds: f64,
}

/// Progress callback: called after each step with (steps done, steps planned, the step's mean
/// token loss).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, f64);

/// Trains `model`'s adapters on `data`. Without `plan`: `config.epochs` passes over the units in
/// a seeded shuffled order, `config.batch_size` units a step (or `steps` steps when given). With
/// `plan`: `plan.steps_per_round` steps (or `steps`) of Poisson batches over the units at
/// `q = batch_size / units`, each clipped per unit and released with the project's noise.
/// Returns the spend with the result, even when training fails part-way, so that the ledger
/// records what really ran.
#[allow(clippy::too_many_arguments)]
pub fn train_adapters(
    model: &dyn AdapterModel,
    data: &UnitWindows,
    config: &TrainConfig,
    plan: Option<&DpSgdPlan>,
    steps: Option<u64>,
    pad_id: i64,
    device: Device,
    progress: Progress<'_>,
) -> (Result<AdapterTrainReport, TrainError>, Option<DpSpend>) {
    let mut spend = plan.map(|p| DpSpend {
        steps: 0,
        sample_rate: p.sample_rate,
        effective_noise_multiplier: p.effective_noise_multiplier,
        kind: tutela_privacy::ledger::MechanismKind::DpSgd,
    });
    let mut report = AdapterTrainReport::default();
    let start = Instant::now();
    let result = run(
        model,
        data,
        config,
        plan,
        steps,
        (pad_id, device),
        &mut report,
        &mut spend,
        progress,
    );
    report.seconds = start.elapsed().as_secs_f64();
    (result.map(|()| report), spend)
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &dyn AdapterModel,
    data: &UnitWindows,
    config: &TrainConfig,
    plan: Option<&DpSgdPlan>,
    steps: Option<u64>,
    (pad_id, device): (i64, Device),
    report: &mut AdapterTrainReport,
    spend: &mut Option<DpSpend>,
    progress: Progress<'_>,
) -> Result<(), TrainError> {
    let parameters = model.adapter_parameters();
    if parameters.is_empty() {
        return Err(TrainError::InvalidConfig {
            field: "lora",
            reason: "the model has no trainable adapter tensors".into(),
        });
    }
    let kind = parameters[0].kind();
    let mask_kind = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let n_units = data.units.len();
    let optimizer = &mut build_optimizer(config, &parameters)?;
    let mut loss_sum = 0.0;
    // One optimizer step over `batches` (the sampled units, cut into chunks of a bounded
    // number of windows for plain training; one batch under DP-SGD, which clips in chunks
    // itself): gradients accumulate over the chunks, then one step.
    let mut one_step = |batches: &[SequenceBatch],
                        step: &mut dyn AdapterGradientStep,
                        expected_units: usize,
                        report: &mut AdapterTrainReport|
     -> Result<f64, TrainError> {
        if !step.overwrites_gradients() {
            optimizer.zero_grad().map_err(|source| TrainError::Torch {
                context: "zeroing gradients".into(),
                source,
            })?;
        }
        let (mut step_loss, mut tokens) = (0.0, 0usize);
        for batch in batches {
            let mean = step.compute_gradients(model, batch, expected_units)?;
            let sequences = batch.sequences().max(0) as u64;
            if sequences > 0 {
                tokens += count_targets(&batch.targets)?;
            }
            step_loss += mean * sequences as f64;
            report.sequences += sequences;
        }
        optimizer.step().map_err(|source| TrainError::Torch {
            context: "optimizer step".into(),
            source,
        })?;
        loss_sum += step_loss;
        report.steps += 1;
        report.tokens += tokens as u64;
        report.mean_loss = if report.tokens > 0 {
            loss_sum / report.tokens as f64
        } else {
            0.0
        };
        Ok(if tokens > 0 {
            step_loss / tokens as f64
        } else {
            0.0
        })
    };
    // Units clipped (DP) or back-propagated (plain) at a time: as many as keep a chunk within
    // WINDOWS_PER_CHUNK windows, at least one (a patient may hold hundreds of windows).
    let most_windows = data.units.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let units_per_chunk = (WINDOWS_PER_CHUNK / most_windows).max(1);
    match plan {
        Some(plan) => {
            let mut sampler = PoissonBatchSampler::new(n_units, config.batch_size)?;
            if sampler.q().to_bits() != plan.sample_rate.to_bits() {
                return Err(TrainError::InvalidConfig {
                    field: "privacy",
                    reason: format!(
                        "the plan's sampling rate {} is not the data's {} ({n_units} units, \
                         batch size {})",
                        plan.sample_rate,
                        sampler.q(),
                        config.batch_size
                    ),
                });
            }
            let mut step = DpAdapterStep::new(plan.clip, DpSgdStep::new(plan)?)
                .with_units_per_chunk(units_per_chunk);
            let total = steps.unwrap_or(plan.steps_per_round);
            for done in 0..total {
                let sampled = sampler.next_batch();
                let batch =
                    SequenceBatch::from_units(&data.units, &sampled, pad_id, mask_kind, device)?;
                let result = one_step(
                    std::slice::from_ref(&batch),
                    &mut step,
                    config.batch_size,
                    report,
                );
                if let Some(s) = spend.as_mut() {
                    s.steps = step.steps_taken();
                }
                progress(done + 1, total, result?);
            }
        }
        None => {
            let mut rng = StdRng::seed_from_u64(config.seed);
            let per_epoch = n_units.div_ceil(config.batch_size.max(1)) as u64;
            let total = steps.unwrap_or(per_epoch * config.epochs as u64);
            let mut order: Vec<usize> = Vec::new();
            let mut step = PlainAdapterGradient;
            for done in 0..total {
                if order.is_empty() {
                    order = (0..n_units).collect();
                    order.shuffle(&mut rng);
                    order.reverse();
                }
                let take = config.batch_size.max(1).min(order.len());
                let sampled: Vec<usize> = order.split_off(order.len() - take);
                let batches = sampled
                    .chunks(units_per_chunk)
                    .map(|units| {
                        SequenceBatch::from_units(&data.units, units, pad_id, mask_kind, device)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let loss = one_step(&batches, &mut step, sampled.len(), report)?;
                progress(done + 1, total, loss);
            }
        }
    }
    Ok(())
}
