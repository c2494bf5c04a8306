//! DP-SGD at the site: Poisson-sampled batches, per-example clipping without a per-example loop,
//! and Gaussian noise from a cryptographically secure sampler.
//!
//! # One step ([`DpSgdStep`])
//!
//! 1. **Forward, traced.** [`LayerNet::forward_traced`] records each Linear/Conv2d layer's input
//!    `a` (detached) and output `z` (in the graph).
//! 2. **Per-example output gradients.** The loss is the *sum* of the per-example cross-entropies,
//!    so `∂L/∂z` restricted to row `i` is example `i`'s own gradient with respect to its outputs,
//!    `g_i`. One `run_backward` with respect to the outputs gives all of them; autograd skips the
//!    weight gradients (nobody asked for them), so this costs less than a plain backward pass.
//! 3. **Per-example norms** (book-keeping, Bu et al. 2023):
//!    - Linear (`a: [B, in]`, `g: [B, out]`): the per-example weight gradient is `g_i a_iᵀ`, of
//!      squared norm `‖g_i‖²·‖a_i‖²` (ghost norm, Li et al. 2022), never materialised; the bias's
//!      is `‖g_i‖²`.
//!    - Conv2d: the input is unfolded (`im2col`, `U_i: [C·k·k, L]`) and the per-example weight
//!      gradients `G_i = g_i U_iᵀ: [C_out, C·k·k]` are computed directly with one batched
//!      matmul. For our layers that is cheaper than the ghost norm, which needs the `L × L` Gram
//!      matrices of `U_i` and `g_i` (L = 784 and 196 pixels for MNIST against `C·k·k·C_out` =
//!      144 and 4608 values per example).
//! 4. **Clip factors** `c_i = min(1, C / ‖∇ℓ_i‖)` over all layers together.
//! 5. **Clipped sum**, one matmul per layer: `(c ⊙ g)ᵀ a` for a Linear weight, `Σ_i c_i G_i`
//!    (a matrix-vector product) for a Conv2d weight, `(c ⊙ g)` summed for biases.
//! 6. **Noise** (see below), then divide by the expected batch size, and hand the result to the
//!    optimizer as the parameters' `.grad` (through the gradient of `Σ ⟨w, ĝ⟩`, exact: tch cannot
//!    assign `.grad` directly).
//!
//! [`clipped_gradient_sum_reference`] computes step 5's result with a loop over examples (one
//! forward and backward each): the tests compare the two in float64.
//!
//! # Noise: where it is drawn and why that is safe on a GPU too
//!
//! The noise is drawn on the CPU by [`SecureGaussian`]: an exact discrete Gaussian on a grid
//! `g·ℤ` (g a power of two) from ChaCha20 keyed by the operating system — never torch's
//! generator, whose state a user can seed and an observer can recover. The clipped sum is first
//! rounded to the same grid in float64 (exact: `g` is a power of two), then the noise is added in
//! float64 (exact: both are multiples of `g` far below 2^53·g). The released sum is therefore
//! exactly "grid query + discrete Gaussian", whose low-order bits carry nothing (the
//! floating-point attacks of Mironov 2012 and Jin et al. 2022 read information out of the low bits
//! of a float sampler's output). This holds on a GPU as well: the device only receives the
//! already-sampled integers (scaled by `g`) and performs the exact float64 rounding and addition;
//! nothing random is computed there. Dividing by the batch size and casting to float32 come after
//! the release (post-processing). Rounding costs sensitivity `g·√d`; the plan accounts for it
//! ([`tutela_privacy::accountant::plan`]).
//!
//! # Sampling
//!
//! [`PoissonBatchSampler`] includes each row independently with probability `q`
//! ([`tutela_privacy::sampling::PoissonSampler`], ChaCha20 from the OS), which is the sampling the
//! accountant's bound is for. An empty batch is still a step (a noise-only update), because the
//! accountant counts it. [`train_dp`] builds the sampler and the step together from one
//! [`DpSgdPlan`], so a DP step is never paired with shuffled fixed-size batches.

use std::num::NonZeroUsize;
use std::time::Instant;

use rand::rngs::StdRng;
use tch::{Kind, Reduction, Tensor};
use tutela_privacy::accountant::plan::DpSgdPlan;
use tutela_privacy::noise::{SecureGaussian, SecureRng};
use tutela_privacy::sampling::PoissonSampler;

use crate::data::Table;
use crate::models::{LayerNet, LayerTrace, Model, TracedKind};
use crate::train::{
    Batch, BatchSampler, GradientStep, TrainConfig, TrainError, TrainReport, train_local_with,
};

fn torch(context: &'static str) -> impl FnOnce(tch::TchError) -> TrainError {
    move |source| TrainError::Torch {
        context: context.to_owned(),
        source,
    }
}

fn dp_error(reason: String) -> TrainError {
    TrainError::InvalidConfig {
        field: "privacy",
        reason,
    }
}

/// Poisson-sampled batches: each row is in a step's batch with probability `q`, independently.
#[derive(Debug)]
pub struct PoissonBatchSampler {
    sampler: PoissonSampler,
    steps_per_epoch: usize,
    expected_batch_size: usize,
}

impl PoissonBatchSampler {
    /// Batches over `n_rows` rows with `q = expected_batch_size / n_rows` (capped at 1), and
    /// `⌈n_rows / expected_batch_size⌉` steps per epoch, drawn from ChaCha20 keyed by the OS.
    pub fn new(n_rows: usize, expected_batch_size: usize) -> Result<Self, TrainError> {
        let rng = SecureRng::from_os().map_err(|e| dp_error(e.to_string()))?;
        Self::with_rng(n_rows, expected_batch_size, rng)
    }

    /// As [`PoissonBatchSampler::new`] with a given generator (tests).
    pub fn with_rng(
        n_rows: usize,
        expected_batch_size: usize,
        rng: SecureRng,
    ) -> Result<Self, TrainError> {
        if n_rows == 0 || expected_batch_size == 0 {
            return Err(dp_error(format!(
                "Poisson sampling needs rows and a batch size, got {n_rows} rows and batch size \
                 {expected_batch_size}"
            )));
        }
        let q = (expected_batch_size as f64 / n_rows as f64).min(1.0);
        let sampler =
            PoissonSampler::with_rng(n_rows, q, rng).map_err(|e| dp_error(e.to_string()))?;
        Ok(PoissonBatchSampler {
            sampler,
            steps_per_epoch: n_rows.div_ceil(expected_batch_size),
            expected_batch_size,
        })
    }

    /// The inclusion probability the accountant must be told.
    pub fn q(&self) -> f64 {
        self.sampler.q()
    }

    /// One step's batch.
    pub fn next_batch(&mut self) -> Vec<usize> {
        self.sampler.next_batch()
    }
}

impl BatchSampler for PoissonBatchSampler {
    fn epoch_batches(&mut self, n_rows: usize, _rng: &mut StdRng) -> Vec<Vec<usize>> {
        // The sampler was built for the table's rows; a different table gets no batches (and
        // train_dp never passes one).
        if n_rows != self.sampler.len() {
            return Vec::new();
        }
        (0..self.steps_per_epoch)
            .map(|_| self.sampler.next_batch())
            .collect()
    }

    fn expected_batch_size(&self) -> usize {
        self.expected_batch_size
    }

    fn steps_on_empty_batches(&self) -> bool {
        true
    }
}

/// The clipped per-example gradient sum of a batch, parameter by parameter.
#[derive(Debug)]
pub struct ClippedSum {
    /// `(parameter, Σ_i c_i ∇ℓ_i for it)`, in layer order (weight, then bias).
    pub gradients: Vec<(Tensor, Tensor)>,
    /// `‖∇ℓ_i‖` before clipping, `[batch]`.
    pub norms: Tensor,
    /// Σ_i ℓ_i.
    pub loss_sum: f64,
}

/// A traced layer's parameters with the per-example quantities the norms and sums need.
enum LayerGrads {
    Linear {
        a: Tensor,
        g: Tensor,
    },
    Conv {
        /// Per-example weight gradients `[B, C_out, C·k·k]`.
        per_example: Tensor,
        /// Per-example bias gradients `[B, C_out]`.
        bias: Tensor,
    },
}

/// Step 1–5 of the module documentation: the sum of per-example gradients, each clipped to `clip`.
pub fn clipped_gradient_sum(
    net: &LayerNet,
    inputs: &Tensor,
    labels: &Tensor,
    clip: f64,
    train: bool,
) -> Result<ClippedSum, TrainError> {
    let (logits, traces) = net.forward_traced(inputs, train);
    let losses = logits
        .f_cross_entropy_loss::<Tensor>(labels, None, Reduction::None, -100, 0.0)
        .map_err(torch("per-example cross-entropy"))?;
    let loss_sum = losses
        .f_sum(losses.kind())
        .map_err(torch("summing losses"))?;
    let outputs: Vec<&Tensor> = traces.iter().map(|t| &t.output).collect();
    let output_grads = Tensor::f_run_backward(&[&loss_sum], &outputs, false, false)
        .map_err(torch("per-example output gradients"))?;
    let loss_value = loss_sum
        .f_double_value(&[])
        .map_err(torch("reading the loss"))?;
    tch::no_grad(|| -> Result<ClippedSum, TrainError> {
        let batch = inputs.size().first().copied().unwrap_or(0);
        let kind = logits.kind();
        let device = logits.device();
        let mut norms2 = Tensor::f_zeros([batch], (kind, device)).map_err(torch("norms"))?;
        let mut layers = Vec::with_capacity(traces.len());
        for (trace, g) in traces.iter().zip(output_grads) {
            let lg = per_layer(trace, g)?;
            let add = match &lg {
                LayerGrads::Linear { a, g } => {
                    let g2 = g.f_square()?.f_sum_dim_intlist(1, false, kind)?;
                    let a2 = a.f_square()?.f_sum_dim_intlist(1, false, kind)?;
                    let w = g2.f_mul(&a2)?;
                    if trace.bias.is_some() {
                        w.f_add(&g2)?
                    } else {
                        w
                    }
                }
                LayerGrads::Conv { per_example, bias } => {
                    let w = per_example.f_square()?.f_sum_dim_intlist(
                        [1, 2].as_slice(),
                        false,
                        kind,
                    )?;
                    if trace.bias.is_some() {
                        w.f_add(&bias.f_square()?.f_sum_dim_intlist(1, false, kind)?)?
                    } else {
                        w
                    }
                }
            };
            norms2 = norms2.f_add(&add)?;
            layers.push(lg);
        }
        let norms = norms2.f_sqrt()?;
        // c_i = min(1, C / ‖∇ℓ_i‖); a zero gradient gives C/0 = ∞, clamped to 1.
        let factors = norms.f_reciprocal()?.f_mul_scalar(clip)?.f_clamp_max(1.0)?;
        let mut gradients = Vec::with_capacity(2 * traces.len());
        for (trace, lg) in traces.iter().zip(&layers) {
            match lg {
                LayerGrads::Linear { a, g } => {
                    let cg = g.f_mul(&factors.f_unsqueeze(1)?)?;
                    gradients.push((trace.weight.shallow_clone(), cg.f_tr()?.f_mm(a)?));
                    if let Some(b) = &trace.bias {
                        gradients.push((b.shallow_clone(), cg.f_sum_dim_intlist(0, false, kind)?));
                    }
                }
                LayerGrads::Conv { per_example, bias } => {
                    let w = per_example
                        .f_view([batch, -1])?
                        .f_tr()?
                        .f_mv(&factors)?
                        .f_view(trace.weight.size().as_slice())?;
                    gradients.push((trace.weight.shallow_clone(), w));
                    if let Some(b) = &trace.bias {
                        gradients.push((b.shallow_clone(), bias.f_tr()?.f_mv(&factors)?));
                    }
                }
            }
        }
        Ok(ClippedSum {
            gradients,
            norms,
            loss_sum: loss_value,
        })
    })
}

impl From<tch::TchError> for TrainError {
    fn from(source: tch::TchError) -> Self {
        TrainError::Torch {
            context: "DP-SGD".into(),
            source,
        }
    }
}

fn per_layer(trace: &LayerTrace, g: Tensor) -> Result<LayerGrads, TrainError> {
    match trace.kind {
        TracedKind::Linear => {
            if trace.input.dim() != 2 {
                return Err(dp_error(format!(
                    "per-example clipping supports Linear layers on [batch, features] inputs, \
                     found an input of shape {:?}",
                    trace.input.size()
                )));
            }
            Ok(LayerGrads::Linear {
                a: trace.input.shallow_clone(),
                g,
            })
        }
        TracedKind::Conv2d { kernel, padding } => {
            let batch = trace.input.size()[0];
            let cout = g.size()[1];
            let unfolded =
                trace
                    .input
                    .f_im2col([kernel, kernel], [1, 1], [padding, padding], [1, 1])?; // [B, C·k·k, L]
            let g = g.f_reshape([batch, cout, -1])?; // [B, C_out, L]
            let per_example = g.f_bmm(&unfolded.f_transpose(1, 2)?)?; // [B, C_out, C·k·k]
            let bias = g.f_sum_dim_intlist(2, false, g.kind())?;
            Ok(LayerGrads::Conv { per_example, bias })
        }
    }
}

/// The per-example-loop reference for [`clipped_gradient_sum`]: one forward and one backward per
/// example, each example's full gradient clipped and added. Slow; for tests only.
pub fn clipped_gradient_sum_reference(
    net: &LayerNet,
    inputs: &Tensor,
    labels: &Tensor,
    clip: f64,
) -> Result<ClippedSum, TrainError> {
    let batch = inputs.size()[0];
    let (_, traces) = net.forward_traced(&inputs.f_narrow(0, 0, 1)?, false);
    let params: Vec<Tensor> = traces
        .iter()
        .flat_map(|t| {
            std::iter::once(t.weight.shallow_clone())
                .chain(t.bias.iter().map(Tensor::shallow_clone))
        })
        .collect();
    let mut sums: Vec<Tensor> = params
        .iter()
        .map(|p| p.f_zeros_like())
        .collect::<Result<_, _>>()?;
    let mut norms = Vec::new();
    let mut loss_sum = 0.0;
    for i in 0..batch {
        let x = inputs.f_narrow(0, i, 1)?;
        let y = labels.f_narrow(0, i, 1)?;
        let logits = tch::nn::ModuleT::forward_t(net, &x, false);
        let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)?;
        loss_sum += loss.f_double_value(&[])?;
        let grads = Tensor::f_run_backward(&[&loss], &params, false, false)?;
        let norm2: f64 = grads
            .iter()
            .map(|g| g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[]))
            .sum::<Result<f64, _>>()?;
        let norm = norm2.sqrt();
        norms.push(norm);
        let c = if norm > clip { clip / norm } else { 1.0 };
        for (s, g) in sums.iter_mut().zip(&grads) {
            *s = s.f_add(&g.f_mul_scalar(c)?)?;
        }
    }
    Ok(ClippedSum {
        gradients: params.into_iter().zip(sums).collect(),
        norms: Tensor::f_from_slice(&norms)?,
        loss_sum,
    })
}

/// DP-SGD's gradient step: clipped per-example gradients plus secure Gaussian noise.
#[derive(Debug)]
pub struct DpSgdStep {
    clip: f64,
    noise: SecureGaussian,
    granularity: f64,
    steps: u64,
    noise_threads: NonZeroUsize,
}

impl DpSgdStep {
    /// A step for `plan`: noise `N_ℤ(0, (σ·C)²)` on the grid `plan.granularity`, keyed from the OS.
    pub fn new(plan: &DpSgdPlan) -> Result<Self, TrainError> {
        let noise = SecureGaussian::new(plan.noise_multiplier * plan.clip, plan.granularity)
            .map_err(|e| dp_error(e.to_string()))?;
        Ok(Self::from_noise(plan.clip, noise))
    }

    /// As [`DpSgdStep::new`] with a given generator (tests).
    pub fn with_rng(plan: &DpSgdPlan, rng: SecureRng) -> Result<Self, TrainError> {
        let noise =
            SecureGaussian::with_rng(plan.noise_multiplier * plan.clip, plan.granularity, rng)
                .map_err(|e| dp_error(e.to_string()))?;
        Ok(Self::from_noise(plan.clip, noise))
    }

    fn from_noise(clip: f64, noise: SecureGaussian) -> Self {
        let granularity = noise.granularity();
        DpSgdStep {
            clip,
            noise,
            granularity,
            steps: 0,
            noise_threads: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        }
    }

    /// Steps taken (each one released a noised sum): what the ledger must record.
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Rounds `sum` to the noise grid and adds noise, in float64 on its device; returns the
    /// released (noised) sum in float64. See the module documentation for why this is exact.
    pub fn privatize(&mut self, sum: &Tensor) -> Result<Tensor, TrainError> {
        let numel = sum.numel();
        let mut noise = vec![0f32; numel];
        self.noise.fill_parallel(&mut noise, self.noise_threads);
        let noise = Tensor::f_from_slice(&noise)?
            .f_to_kind(Kind::Double)?
            .f_view(sum.size().as_slice())?
            .f_to_device(sum.device())?;
        let g = self.granularity;
        Ok(sum
            .f_to_kind(Kind::Double)?
            .f_div_scalar(g)?
            .f_round()?
            .f_mul_scalar(g)?
            .f_add(&noise)?)
    }
}

impl GradientStep for DpSgdStep {
    fn compute_gradients(&mut self, batch: &Batch<'_>) -> Result<f64, TrainError> {
        let rows = batch.inputs.size().first().copied().unwrap_or(0);
        let (gradients, loss_sum) = if rows > 0 {
            let sum = clipped_gradient_sum(batch.net, batch.inputs, batch.labels, self.clip, true)?;
            (sum.gradients, sum.loss_sum)
        } else {
            // An empty Poisson batch: the release is noise alone.
            let zeros = batch
                .parameters
                .iter()
                .map(|p| Ok((p.shallow_clone(), p.f_zeros_like()?)))
                .collect::<Result<Vec<_>, tch::TchError>>()?;
            (zeros, 0.0)
        };
        if gradients.len() != batch.parameters.len() {
            // A parameter outside a traced layer would be trained without clipping or noise.
            return Err(dp_error(format!(
                "the model has {} trainable tensors, but per-example clipping covers {}",
                batch.parameters.len(),
                gradients.len()
            )));
        }
        let scale = 1.0 / batch.expected_batch_size.max(1) as f64;
        let mut surrogate: Option<Tensor> = None;
        for (parameter, sum) in &gradients {
            let released = self.privatize(sum)?;
            let grad = tch::no_grad(|| released.f_mul_scalar(scale)?.f_to_kind(parameter.kind()))?;
            // ∂/∂w Σ⟨w, ĝ⟩ = ĝ exactly: how the optimizer is handed ĝ as `.grad`.
            let term = parameter.f_mul(&grad)?.f_sum(parameter.kind())?;
            surrogate = Some(match surrogate {
                None => term,
                Some(s) => s.f_add(&term)?,
            });
        }
        if let Some(s) = surrogate {
            s.f_backward()?;
        }
        self.steps += 1;
        Ok(if rows > 0 {
            loss_sum / rows as f64
        } else {
            0.0
        })
    }
}

/// What a DP round spent: the steps that ran (each released a noised sum) at the plan's q and σ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSpend {
    pub steps: u64,
    pub sample_rate: f64,
    pub effective_noise_multiplier: f64,
}

/// Trains `model` on `data` with DP-SGD as `plan` says: Poisson batches and [`DpSgdStep`].
/// Returns the spend even when training fails part-way, so that the ledger records what really
/// ran.
pub fn train_dp(
    model: &Model,
    data: &Table,
    config: &TrainConfig,
    plan: &DpSgdPlan,
) -> (Result<TrainReport, TrainError>, DpSpend) {
    let mut spend = DpSpend {
        steps: 0,
        sample_rate: plan.sample_rate,
        effective_noise_multiplier: plan.effective_noise_multiplier,
    };
    let sampler = PoissonBatchSampler::new(data.n_rows, config.batch_size);
    let step = DpSgdStep::new(plan);
    let (mut sampler, mut step) = match (sampler, step) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => return (Err(e), spend),
    };
    if sampler.q().to_bits() != plan.sample_rate.to_bits() {
        return (
            Err(dp_error(format!(
                "the plan's sampling rate {} is not the data's {} (rows {}, batch size {})",
                plan.sample_rate,
                sampler.q(),
                data.n_rows,
                config.batch_size
            ))),
            spend,
        );
    }
    let start = Instant::now();
    let result = train_local_with(model, data, config, &mut sampler, &mut step);
    spend.steps = step.steps_taken();
    tracing::info!(
        steps = spend.steps,
        q = spend.sample_rate,
        sigma = plan.noise_multiplier,
        clip = plan.clip,
        seconds = start.elapsed().as_secs_f64(),
        "DP-SGD round done"
    );
    (result, spend)
}
