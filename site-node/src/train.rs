//! Local training and evaluation.
//!
//! [`train_local`] runs a round's local epochs on a site's table: SGD (with momentum) or Adam,
//! L2 weight decay, and FedProx's proximal term `mu/2 · ||w − w_global||²`, where `w_global` are
//! the weights the model holds when training starts (the round's global model).
//!
//! Two seams are left for DP-SGD, which replaces pieces rather than editing the loop:
//! - [`BatchSampler`] chooses each step's rows: [`ShuffledBatches`] here, Poisson sampling in
//!   [`crate::dp::PoissonBatchSampler`].
//! - [`GradientStep`] turns a batch into parameter gradients: [`PlainGradient`] here, per-example
//!   clipping plus Gaussian noise in [`crate::dp::DpSgdStep`] ([`crate::dp::train_dp`] pairs them).
//!
//! The proximal term's gradient `mu · (w − w_global)` is added by the loop after the
//! [`GradientStep`], not inside it: it does not depend on any example, so DP-SGD must neither
//! clip nor noise it.

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use crate::data::Table;
use crate::models::{LayerNet, Model};

/// Why training or evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("{what} is empty")]
    EmptyData { what: &'static str },
    #[error("the data does not fit model {model:?}: {reason}")]
    DataModelMismatch { model: String, reason: String },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(
        "the loss became {loss} at epoch {epoch}, batch {batch}; lower the learning rate \
         (now {learning_rate})"
    )]
    NonFiniteLoss {
        epoch: usize,
        batch: usize,
        loss: f64,
        learning_rate: f64,
    },
    #[error("{context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
}

fn torch(context: impl Into<String>) -> impl FnOnce(tch::TchError) -> TrainError {
    let context = context.into();
    move |source| TrainError::Torch { context, source }
}

/// The optimizer a round uses; its state starts fresh every round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerKind {
    Sgd {
        #[serde(default)]
        momentum: f64,
    },
    /// Adam with β = (0.9, 0.999), ε = 1e-8; `weight_decay` is added to the gradient (L2), as in
    /// `torch.optim.Adam`.
    Adam,
}

/// A round's local training settings, as a job spec gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub learning_rate: f64,
    pub epochs: usize,
    pub batch_size: usize,
    #[serde(default)]
    pub weight_decay: f64,
    /// FedProx's μ: adds μ/2 · ||w − w_global||² to the loss. 0 is plain FedAvg.
    #[serde(default)]
    pub proximal_mu: f64,
    /// Seeds the batch order and libtorch's generator (dropout).
    #[serde(default)]
    pub seed: u64,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let invalid = |field, reason: String| Err(TrainError::InvalidConfig { field, reason });
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return invalid(
                "learning_rate",
                format!("must be positive, found {}", self.learning_rate),
            );
        }
        if self.epochs == 0 {
            return invalid("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return invalid("batch_size", "must be at least 1".into());
        }
        if !non_negative(self.weight_decay) {
            return invalid(
                "weight_decay",
                format!("must be ≥ 0, found {}", self.weight_decay),
            );
        }
        if !non_negative(self.proximal_mu) {
            return invalid(
                "proximal_mu",
                format!("must be ≥ 0, found {}", self.proximal_mu),
            );
        }
        if let OptimizerKind::Sgd { momentum } = self.optimizer
            && !(momentum.is_finite() && (0.0..1.0).contains(&momentum))
        {
            return invalid(
                "optimizer.momentum",
                format!("must lie in [0, 1), found {momentum}"),
            );
        }
        Ok(())
    }
}

/// What a round of local training did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Examples processed, counting each epoch (epochs × rows for [`ShuffledBatches`]).
    pub samples_seen: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Mean cross-entropy over all examples seen (the proximal term excluded).
    pub mean_loss: f64,
    /// Wall-clock time, including moving the table to the device.
    pub seconds: f64,
    pub samples_per_second: f64,
}

/// Loss and accuracy on a table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of rows whose highest-scoring class is the label.
    pub accuracy: f64,
    pub n: usize,
}

/// Chooses the rows of each step.
pub trait BatchSampler {
    /// One epoch's batches, as row indices into a table of `n_rows` rows. Batches may differ in
    /// size (Poisson sampling) and may be empty (then no step is taken).
    fn epoch_batches(&mut self, n_rows: usize, rng: &mut StdRng) -> Vec<Vec<usize>>;

    /// The batch size the loss is normalised with when the sampler's sizes vary.
    fn expected_batch_size(&self) -> usize;

    /// Whether an empty batch is still a step. Poisson sampling says yes: the accountant counts
    /// every step, and DP-SGD releases a noise-only update for an empty batch.
    fn steps_on_empty_batches(&self) -> bool {
        false
    }
}

/// Shuffle each epoch, then cut into consecutive batches; the last one may be smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShuffledBatches {
    pub batch_size: usize,
}

impl BatchSampler for ShuffledBatches {
    fn epoch_batches(&mut self, n_rows: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..n_rows).collect();
        order.shuffle(rng);
        order
            .chunks(self.batch_size.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    }

    fn expected_batch_size(&self) -> usize {
        self.batch_size
    }
}

/// One step's inputs to a [`GradientStep`].
pub struct Batch<'a> {
    /// The network, as layers (DP-SGD traces its Linear/Conv2d layers).
    pub net: &'a LayerNet,
    /// The trainable parameters, in the optimizer's order.
    pub parameters: &'a [Tensor],
    /// `[batch, input features]` on the model's device.
    pub inputs: &'a Tensor,
    /// `[batch]` class indices (i64) on the model's device.
    pub labels: &'a Tensor,
    /// From [`BatchSampler::expected_batch_size`].
    pub expected_batch_size: usize,
}

/// Turns a batch into gradients: the per-step seam DP-SGD replaces.
pub trait GradientStep {
    /// Leaves in each parameter's `.grad()` the gradient to step along and returns the batch's
    /// mean loss, for reporting. On entry the gradients are unset (the optimizer's `zero_grad`),
    /// unless [`GradientStep::overwrites_gradients`] says they need not be.
    fn compute_gradients(&mut self, batch: &Batch<'_>) -> Result<f64, TrainError>;

    /// Whether [`GradientStep::compute_gradients`] writes every parameter's whole `.grad`
    /// whatever it held, so that the training loop can skip `zero_grad` and the `.grad` tensors
    /// are reused instead of made anew each step. A step that back-propagates (and so adds to
    /// `.grad`) must say no.
    fn overwrites_gradients(&self) -> bool {
        false
    }
}

/// Back-propagates the batch's mean cross-entropy: ordinary, non-private training.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainGradient;

impl GradientStep for PlainGradient {
    fn compute_gradients(&mut self, batch: &Batch<'_>) -> Result<f64, TrainError> {
        let logits = nn::ModuleT::forward_t(batch.net, batch.inputs, true);
        let loss = logits
            .f_cross_entropy_loss::<Tensor>(batch.labels, None, Reduction::Mean, -100, 0.0)
            .map_err(torch("cross-entropy"))?;
        loss.f_backward().map_err(torch("backward pass"))?;
        loss.f_double_value(&[]).map_err(torch("reading the loss"))
    }
}

/// Trains `model` on `data` with plain (non-private) gradients and shuffled batches.
///
/// Runs on the model's device. The weights the model holds on entry are the global weights
/// FedProx pulls towards.
pub fn train_local(
    model: &Model,
    data: &Table,
    config: &TrainConfig,
) -> Result<TrainReport, TrainError> {
    let mut sampler = ShuffledBatches {
        batch_size: config.batch_size,
    };
    train_local_with(model, data, config, &mut sampler, &mut PlainGradient)
}

/// [`train_local`] with a chosen batch sampler and gradient step (DP-SGD's entry point).
pub fn train_local_with(
    model: &Model,
    data: &Table,
    config: &TrainConfig,
    sampler: &mut dyn BatchSampler,
    gradient_step: &mut dyn GradientStep,
) -> Result<TrainReport, TrainError> {
    config.validate()?;
    check_fits(model, data, "the training table")?;
    let start = Instant::now();
    let device = model.device();
    let (inputs, labels) = table_tensors(data, device)?;

    let parameters = model.var_store().trainable_variables();
    // The round's starting point, detached so that optimizer steps do not move it.
    let global = if config.proximal_mu > 0.0 {
        tch::no_grad(|| {
            parameters
                .iter()
                .map(Tensor::f_detach_copy)
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(torch("copying the global weights for FedProx"))?
    } else {
        Vec::new()
    };
    let optimizer = build_optimizer(config, &parameters)?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    // Process-wide, so dropout masks are reproducible only while one training runs at a time in
    // the process (a node trains one job at a time).
    tch::manual_seed(config.seed as i64);

    let mut samples_seen = 0usize;
    let mut steps = 0usize;
    let mut loss_sum = 0f64;
    for epoch in 0..config.epochs {
        let (epoch_loss_start, epoch_samples_start) = (loss_sum, samples_seen);
        for (batch_index, rows) in sampler
            .epoch_batches(data.n_rows, &mut rng)
            .into_iter()
            .enumerate()
        {
            if rows.is_empty() && !sampler.steps_on_empty_batches() {
                continue;
            }
            let (batch_inputs, batch_labels) = select_rows(&inputs, &labels, &rows, device)?;
            if !gradient_step.overwrites_gradients() {
                optimizer.zero_grad().map_err(torch("zeroing gradients"))?;
            }
            let loss = gradient_step.compute_gradients(&Batch {
                net: model.layers(),
                parameters: &parameters,
                inputs: &batch_inputs,
                labels: &batch_labels,
                expected_batch_size: sampler.expected_batch_size(),
            })?;
            if !loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    epoch,
                    batch: batch_index,
                    loss,
                    learning_rate: config.learning_rate,
                });
            }
            if config.proximal_mu > 0.0 {
                add_proximal_gradient(&parameters, &global, config.proximal_mu)?;
            }
            optimizer.step().map_err(torch("optimizer step"))?;
            samples_seen += rows.len();
            steps += 1;
            loss_sum += loss * rows.len() as f64;
        }
        let epoch_samples = samples_seen - epoch_samples_start;
        tracing::debug!(
            epoch,
            samples = epoch_samples,
            mean_loss = (loss_sum - epoch_loss_start) / epoch_samples.max(1) as f64,
            "local training epoch done"
        );
    }
    if let Device::Cuda(index) = device {
        // CUDA kernels are queued asynchronously; the clock should count them.
        tch::Cuda::synchronize(index as i64);
    }
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!(
        model = model.name(),
        rows = data.n_rows,
        epochs = config.epochs,
        steps,
        seconds,
        proximal_mu = config.proximal_mu,
        "local training done"
    );
    Ok(TrainReport {
        samples_seen,
        steps,
        mean_loss: if samples_seen > 0 {
            loss_sum / samples_seen as f64
        } else {
            0.0
        },
        seconds,
        samples_per_second: if seconds > 0.0 {
            samples_seen as f64 / seconds
        } else {
            0.0
        },
    })
}

/// Mean cross-entropy and accuracy of `model` on `data`, in evaluation mode (dropout off).
pub fn evaluate(model: &Model, data: &Table) -> Result<Eval, TrainError> {
    /// Rows per forward pass: bounds memory on large tables.
    const CHUNK: i64 = 1024;
    check_fits(model, data, "the evaluation table")?;
    let (inputs, labels) = table_tensors(data, model.device())?;
    let n = data.n_rows as i64;
    let (loss_sum, correct) = tch::no_grad(|| -> Result<(f64, i64), TrainError> {
        let mut loss_sum = 0f64;
        let mut correct = 0i64;
        let mut start = 0i64;
        while start < n {
            let len = CHUNK.min(n - start);
            let xs = inputs.f_narrow(0, start, len).map_err(torch("slicing"))?;
            let ys = labels.f_narrow(0, start, len).map_err(torch("slicing"))?;
            let logits = model.net().forward_t(&xs, false);
            loss_sum += logits
                .f_cross_entropy_loss::<Tensor>(&ys, None, Reduction::Sum, -100, 0.0)
                .and_then(|l| l.f_double_value(&[]))
                .map_err(torch("evaluation loss"))?;
            correct += logits
                .f_argmax(1, false)
                .and_then(|p| p.f_eq_tensor(&ys))
                .and_then(|hits| hits.f_sum(Kind::Int64))
                .and_then(|c| c.f_int64_value(&[]))
                .map_err(torch("evaluation accuracy"))?;
            start += len;
        }
        Ok((loss_sum, correct))
    })?;
    Ok(Eval {
        loss: loss_sum / data.n_rows as f64,
        accuracy: correct as f64 / data.n_rows as f64,
        n: data.n_rows,
    })
}

/// Each row's cross-entropy and whether its highest-scoring class is the label: the per-unit
/// values a DP job releases its metrics from (`tutela_privacy::metrics`; a row is the unit of a
/// tabular job). They never leave the site as they are.
pub fn evaluate_units(
    model: &Model,
    data: &Table,
) -> Result<Vec<tutela_privacy::metrics::UnitMetric>, TrainError> {
    const CHUNK: i64 = 1024;
    check_fits(model, data, "the evaluation table")?;
    let (inputs, labels) = table_tensors(data, model.device())?;
    let n = data.n_rows as i64;
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(data.n_rows);
        let mut start = 0i64;
        while start < n {
            let len = CHUNK.min(n - start);
            let xs = inputs.f_narrow(0, start, len).map_err(torch("slicing"))?;
            let ys = labels.f_narrow(0, start, len).map_err(torch("slicing"))?;
            let logits = model.net().forward_t(&xs, false);
            let losses = logits
                .f_cross_entropy_loss::<Tensor>(&ys, None, Reduction::None, -100, 0.0)
                .and_then(|l| l.f_to_kind(Kind::Double))
                .and_then(|l| Vec::<f64>::try_from(&l))
                .map_err(torch("evaluation loss per row"))?;
            let hits = logits
                .f_argmax(1, false)
                .and_then(|p| p.f_eq_tensor(&ys))
                .and_then(|h| h.f_to_kind(Kind::Double))
                .and_then(|h| Vec::<f64>::try_from(&h))
                .map_err(torch("evaluation accuracy per row"))?;
            out.extend(
                losses
                    .into_iter()
                    .zip(hits)
                    .map(|(loss, correct)| tutela_privacy::metrics::UnitMetric { loss, correct }),
            );
            start += len;
        }
        Ok(out)
    })
}

/// Refuses data the network would choke on (libtorch panics on shape mismatches inside
/// `forward_t`), naming what differs.
fn check_fits(model: &Model, data: &Table, what: &'static str) -> Result<(), TrainError> {
    data.check()?;
    if data.is_empty() {
        return Err(TrainError::EmptyData { what });
    }
    let mismatch = |reason: String| {
        Err(TrainError::DataModelMismatch {
            model: model.name().to_owned(),
            reason,
        })
    };
    let spec = model.spec();
    if spec.input_features() != Some(data.n_features) {
        return mismatch(format!(
            "{what} has {} features per row, the model's input shape {:?} needs {}",
            data.n_features,
            spec.input_shape,
            spec.input_features()
                .map_or("too many".into(), |f| f.to_string())
        ));
    }
    if data.n_classes() != spec.num_classes {
        return mismatch(format!(
            "{what} has {} classes ({}), the model has {} outputs",
            data.n_classes(),
            data.class_names.join(", "),
            spec.num_classes
        ));
    }
    Ok(())
}

/// The table as `[rows, features]` f32 and `[rows]` i64 tensors on `device`.
fn table_tensors(data: &Table, device: Device) -> Result<(Tensor, Tensor), TrainError> {
    let inputs = Tensor::f_from_slice(&data.features)
        .and_then(|t| t.f_view([data.n_rows as i64, data.n_features as i64]))
        .and_then(|t| t.f_to_device(device))
        .map_err(torch("moving features to the device"))?;
    let labels = Tensor::f_from_slice(&data.labels)
        .and_then(|t| t.f_to_device(device))
        .map_err(torch("moving labels to the device"))?;
    Ok((inputs, labels))
}

fn select_rows(
    inputs: &Tensor,
    labels: &Tensor,
    rows: &[usize],
    device: Device,
) -> Result<(Tensor, Tensor), TrainError> {
    let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let index = Tensor::f_from_slice(&index)
        .and_then(|t| t.f_to_device(device))
        .map_err(torch("batch index"))?;
    let xs = inputs
        .f_index_select(0, &index)
        .map_err(torch("selecting batch rows"))?;
    let ys = labels
        .f_index_select(0, &index)
        .map_err(torch("selecting batch labels"))?;
    Ok((xs, ys))
}

/// The optimizer `config` names over `parameters` (also the language-model round's).
pub(crate) fn build_optimizer(
    config: &TrainConfig,
    parameters: &[Tensor],
) -> Result<tch::COptimizer, TrainError> {
    let mut optimizer = match config.optimizer {
        OptimizerKind::Sgd { momentum } => nn::Sgd {
            momentum,
            dampening: 0.0,
            wd: config.weight_decay,
            nesterov: false,
        }
        .build_copt(config.learning_rate),
        OptimizerKind::Adam => nn::Adam {
            wd: config.weight_decay,
            ..Default::default()
        }
        .build_copt(config.learning_rate),
    }
    .map_err(torch("creating the optimizer"))?;
    for parameter in parameters {
        optimizer
            .add_parameters(parameter, 0)
            .map_err(torch("registering parameters with the optimizer"))?;
    }
    Ok(optimizer)
}

/// Adds FedProx's `mu · (w − w_global)` to each parameter's gradient.
fn add_proximal_gradient(
    parameters: &[Tensor],
    global: &[Tensor],
    mu: f64,
) -> Result<(), TrainError> {
    tch::no_grad(|| {
        for (parameter, start) in parameters.iter().zip(global) {
            let mut grad = parameter.grad();
            // A parameter the forward pass did not use has no gradient; the registry's models
            // use all of theirs.
            if grad.defined() {
                let pull = parameter.f_sub(start)?.f_mul_scalar(mu)?;
                let _updated_in_place = grad.f_add_(&pull)?;
            }
        }
        Ok(())
    })
    .map_err(torch("adding the FedProx proximal gradient"))
}
