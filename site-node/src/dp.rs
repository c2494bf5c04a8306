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
//!    - Conv2d: the input is unfolded (`im2col`, `U_i: [C·k·k, L]`). Either the per-example
//!      weight gradients `G_i = g_i U_iᵀ: [C_out, C·k·k]` are formed with one batched matmul
//!      (direct), or only their norms `‖G_i‖² = ⟨U_iᵀU_i, g_iᵀg_i⟩` from two `L × L` Gram
//!      matrices (ghost), whichever costs fewer multiply-adds (`C_out·C·k·k` against
//!      `L·(C·k·k + C_out)` per position). Both MNIST convolutions take the direct path.
//! 4. **Clip factors** `c_i = min(1, C / ‖∇ℓ_i‖)` over all layers together.
//! 5. **Clipped sum**, accumulated into ONE flat buffer holding every parameter: `addmm` of
//!    `(c ⊙ g)ᵀ a` for a Linear weight, `addmv` of `Σ_i c_i G_i` (direct) or one matmul of the
//!    scaled output gradients with the unfolded inputs (ghost) for a Conv2d weight, `addmv` of
//!    `gᵀc` for biases. The batch goes through steps 1–5 in micro-batches whose per-example
//!    tensors hold at most `MICROBATCH_VALUES` values: per-example clipping needs nothing
//!    across examples, so this changes no result and bounds the memory.
//! 6. **Noise** on the flat buffer (see below), then divide by the expected batch size, and
//!    copy the result into the parameters' `.grad` tensors (tch cannot assign `.grad`, only
//!    write into one: they are made once, by a backward pass of `⟨cat(θ), 0⟩`, and kept).
//!
//! [`clipped_gradient_sum_reference`] computes step 5's result with a loop over examples (one
//! forward and backward each): the tests compare the two in float64.
//!
//! # Networks of Linear layers on the CPU
//!
//! For the tabular MLPs a step is a fraction of a millisecond, and what it costs is the number of
//! libtorch calls (each some microseconds of dispatch and allocation), not arithmetic: steps 3–6
//! above add some eighty of them to a plain step's thirty. When every parametrised layer is
//! Linear on `[batch, features]` rows ([`LayerNet::is_linear_on_rows`]) and the tensors live in
//! CPU memory, [`DpSgdStep`] takes a shorter route ([`clip_linear_into_gradients`]), the same
//! mathematics with the small loops done in Rust on the tensors' memory:
//!
//! 1. forward and per-example output gradients as in steps 1–2;
//! 2. the per-example norms `Σ_layers ‖g_i‖²·(‖a_i‖² + 1)` and the clip factors `c_i`, read and
//!    computed in Rust (no tensor op);
//! 3. each `g` scaled by `c` in place, then one `mm` per layer writes `(c ⊙ g)ᵀ a` straight into
//!    the weight's `.grad`, and the bias's `Σ_i c_i g_i` is summed in Rust into its `.grad`;
//! 4. rounding to the noise grid, the noise and the division by the batch size applied to each
//!    `.grad` in place, again in Rust.
//!
//! As on the general route, the `.grad` tensors are made once and overwritten from then on:
//! [`DpSgdStep`] tells the training loop not to unset them
//! ([`GradientStep::overwrites_gradients`]). That is a dozen libtorch calls beyond a plain step. Convolutions and other devices (whose
//! memory Rust cannot read in place) take the general route; the tests check that both release
//! the same gradients, and the per-example-loop reference.
//!
//! # Noise: where it is drawn and why that is safe on a GPU too
//!
//! The noise is an exact discrete Gaussian on a grid `g·ℤ` (g a power of two) from ChaCha20
//! keyed by the operating system — never torch's generator, whose state a user can seed and an
//! observer can recover. Where it is drawn is chosen in one place, from the release's device
//! (`dp/noise.rs`, [`NoiseDevice`]): for CPU tensors by [`SecureGaussian`] on a worker thread,
//! for CUDA tensors by the same sampler's keyed form on the GPU ([`crate::gpu_noise`]: a fresh
//! OS key per release, the values bit-identical to [`tutela_privacy::noise::KeyedGaussian`]'s on
//! the CPU), or on the CPU and copied where the GPU path is unavailable. The clipped sum is first
//! rounded to the same grid in the model's kind (exact: `g` is a power of two), then the noise is
//! added (exact while the result is below 2^24 grid steps in float32; beyond, the addition is
//! correctly rounded, a deterministic function of the exact sum — post-processing). The released
//! sum is therefore exactly "grid query + discrete Gaussian", whose low-order bits carry nothing
//! (the floating-point attacks of Mironov 2012 and Jin et al. 2022 read information out of the
//! low bits of a float sampler's output). On a GPU too, no floating-point operation touches the
//! sampling: the kernel is integer arithmetic from the keystream to the grid integer, which it
//! scales by `g` exactly. Dividing by the batch size comes after the release
//! (post-processing). Rounding costs sensitivity `g·√d`; the plan accounts for it
//! ([`tutela_privacy::accountant::plan`]).
//!
//! # Sampling
//!
//! [`PoissonBatchSampler`] includes each row independently with probability `q`
//! ([`tutela_privacy::sampling::PoissonSampler`], ChaCha20 from the OS), which is the sampling the
//! accountant's bound is for. An empty batch is still a step (a noise-only update), because the
//! accountant counts it. [`train_dp`] builds the sampler and the step together from one
//! [`DpSgdPlan`], so a DP step is never paired with shuffled fixed-size batches.

mod noise;

mod distributed;
pub use distributed::{ClippedSumStep, train_distributed_step};

use std::time::Instant;

use rand::rngs::StdRng;
use tch::{Kind, Reduction, Tensor};
use tutela_privacy::accountant::plan::DpSgdPlan;
use tutela_privacy::noise::{SecureGaussian, SecureRng};
use tutela_privacy::sampling::PoissonSampler;

pub use noise::NoiseDevice;
use noise::StepNoise;

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
    /// `(parameter, Σ_i c_i ∇ℓ_i for it)`, in layer order (weight, then bias); each sum is a view
    /// of [`ClippedSum::flat`].
    pub gradients: Vec<(Tensor, Tensor)>,
    /// Every parameter's sum, flattened and concatenated in the order of `gradients`: the one
    /// buffer the noise is added to.
    pub flat: Tensor,
    /// `‖∇ℓ_i‖` before clipping, `[batch]`.
    pub norms: Tensor,
    /// Σ_i ℓ_i.
    pub loss_sum: f64,
}

/// Where each traced parameter lives in the flat buffer.
struct FlatLayout {
    /// `(parameter, offset, shape)` in trace order.
    slots: Vec<(Tensor, i64, Vec<i64>)>,
    numel: i64,
}

impl FlatLayout {
    fn of_parameters<'a>(parameters: impl Iterator<Item = &'a Tensor>) -> Self {
        let mut slots = Vec::new();
        let mut numel = 0;
        for p in parameters {
            let shape = p.size();
            let n = shape.iter().product::<i64>();
            slots.push((p.shallow_clone(), numel, shape));
            numel += n;
        }
        FlatLayout { slots, numel }
    }

    fn of_traces(traces: &[LayerTrace]) -> Self {
        Self::of_parameters(
            traces
                .iter()
                .flat_map(|t| std::iter::once(&t.weight).chain(t.bias.as_ref())),
        )
    }

    /// Slot `i` of `flat` as a tensor of the parameter's shape (a view: writes go to `flat`).
    fn view(&self, flat: &Tensor, i: usize) -> Result<Tensor, tch::TchError> {
        let (_, offset, shape) = &self.slots[i];
        flat.f_narrow(0, *offset, shape.iter().product())?
            .f_view(shape.as_slice())
    }

    /// Slot `i` of `flat` flattened to `[rows, numel / rows]`.
    fn matrix(&self, flat: &Tensor, i: usize, rows: i64) -> Result<Tensor, tch::TchError> {
        let (_, offset, shape) = &self.slots[i];
        flat.f_narrow(0, *offset, shape.iter().product())?
            .f_view([rows, -1])
    }
}

/// Rows per micro-batch: the batch is clipped and summed in slices whose per-example tensors
/// (layer inputs and outputs, output gradients, unfolded convolution inputs, per-example
/// convolution gradients) hold at most this many values together. Per-example clipping needs
/// nothing across examples, so slicing changes no result, only the peak memory: without it a
/// CNN's unfolded inputs and held output gradients need several times a plain step's memory.
const MICROBATCH_VALUES: i64 = 1 << 21;

/// Rows of the first slice, before the per-example size is known.
const PROBE_ROWS: i64 = 8;

/// Step 1–5 of the module documentation: the sum of per-example gradients, each clipped to `clip`.
pub fn clipped_gradient_sum(
    net: &LayerNet,
    inputs: &Tensor,
    labels: &Tensor,
    clip: f64,
    train: bool,
) -> Result<ClippedSum, TrainError> {
    clipped_gradient_sum_sliced(net, inputs, labels, clip, train, &mut None)
}

/// A Poisson batch's per-row clipped gradient sum: the parameters it covers, the sum flattened,
/// and the rows' summed loss. An empty batch (Poisson sampling may draw none) gives zeros over
/// every trainable parameter, so the step still releases (its noise alone, or a zero share).
pub(crate) fn clipped_sum_of_batch(
    batch: &Batch<'_>,
    rows: i64,
    clip: f64,
    rows_per_slice: &mut Option<i64>,
) -> Result<(Vec<Tensor>, Tensor, f64), TrainError> {
    if rows > 0 {
        let sum = clipped_gradient_sum_sliced(
            batch.net,
            batch.inputs,
            batch.labels,
            clip,
            true,
            rows_per_slice,
        )?;
        let parameters: Vec<Tensor> = sum.gradients.into_iter().map(|(p, _)| p).collect();
        return Ok((parameters, sum.flat, sum.loss_sum));
    }
    let layout = FlatLayout::of_parameters(batch.parameters.iter());
    let first = batch
        .parameters
        .first()
        .ok_or_else(|| dp_error("the model has no trainable parameters".into()))?;
    let flat = Tensor::f_zeros([layout.numel], (first.kind(), first.device()))?;
    Ok((
        batch.parameters.iter().map(Tensor::shallow_clone).collect(),
        flat,
        0.0,
    ))
}

/// [`clipped_gradient_sum`] in micro-batches of `*rows_per_slice` rows; `None` measures the
/// per-example size on a first small slice and stores the slice size to use from then on.
fn clipped_gradient_sum_sliced(
    net: &LayerNet,
    inputs: &Tensor,
    labels: &Tensor,
    clip: f64,
    train: bool,
    rows_per_slice: &mut Option<i64>,
) -> Result<ClippedSum, TrainError> {
    let batch = inputs.size().first().copied().unwrap_or(0);
    let mut layout: Option<FlatLayout> = None;
    let mut flat: Option<Tensor> = None;
    let mut norms = Vec::new();
    let mut loss_sum = 0.0;
    let mut start = 0;
    while start < batch {
        let rows = match *rows_per_slice {
            Some(r) => r.clamp(1, batch - start),
            None => PROBE_ROWS.min(batch - start),
        };
        let x = inputs.f_narrow(0, start, rows)?;
        let y = labels.f_narrow(0, start, rows)?;
        let slice = clip_slice(net, &x, &y, clip, train, &mut layout, &mut flat)?;
        if rows_per_slice.is_none() {
            *rows_per_slice = Some((MICROBATCH_VALUES / slice.values_per_example.max(1)).max(1));
        }
        norms.push(slice.norms);
        loss_sum += slice.loss_sum;
        start += rows;
    }
    let (Some(layout), Some(flat)) = (layout, flat) else {
        return Err(dp_error("clipping an empty batch".into()));
    };
    let gradients = (0..layout.slots.len())
        .map(|i| Ok((layout.slots[i].0.shallow_clone(), layout.view(&flat, i)?)))
        .collect::<Result<Vec<_>, tch::TchError>>()?;
    Ok(ClippedSum {
        gradients,
        flat,
        norms: Tensor::f_cat(&norms, 0)?,
        loss_sum,
    })
}

struct Slice {
    norms: Tensor,
    loss_sum: f64,
    values_per_example: i64,
}

/// A traced layer's per-example quantities for the norms and the clipped sum.
enum LayerGrads {
    /// `a: [b, in]`, `g: [b, out]`.
    Linear { a: Tensor, g: Tensor },
    /// Per-example weight gradients `[b, C_out·C·k·k]` and bias gradients `[b, C_out]`.
    ConvDirect { per_example: Tensor, bias: Tensor },
    /// Unfolded input `[b, C·k·k, L]`, output gradients `[b, C_out, L]`, bias gradients
    /// `[b, C_out]`: the weight gradients are never formed.
    ConvGhost {
        unfolded: Tensor,
        g: Tensor,
        bias: Tensor,
    },
}

/// Steps 1–2 of the module documentation: the traced forward pass, then one backward pass of
/// the summed per-example losses to the layer outputs, which gives each example's own output
/// gradients `g_i`. Returns the traces, the output gradients (one per traced layer) and Σ_i ℓ_i.
fn traced_output_gradients(
    net: &LayerNet,
    inputs: &Tensor,
    labels: &Tensor,
    train: bool,
) -> Result<(Vec<LayerTrace>, Vec<Tensor>, f64), TrainError> {
    let (logits, traces) = net.forward_traced(inputs, train);
    let losses = logits
        .f_cross_entropy_loss::<Tensor>(labels, None, Reduction::None, -100, 0.0)
        .map_err(torch("per-example cross-entropy"))?;
    let loss_sum = losses
        .f_sum(losses.kind())
        .map_err(torch("summing losses"))?;
    let output_grads = {
        let outputs: Vec<&Tensor> = traces.iter().map(|t| &t.output).collect();
        Tensor::f_run_backward(&[&loss_sum], &outputs, false, false)
            .map_err(torch("per-example output gradients"))?
    };
    let loss_value = loss_sum
        .f_double_value(&[])
        .map_err(torch("reading the loss"))?;
    Ok((traces, output_grads, loss_value))
}

/// One micro-batch: forward, per-example output gradients, norms, and the clipped sum added into
/// `flat` (created on the first slice).
fn clip_slice(
    net: &LayerNet,
    inputs: &Tensor,
    labels: &Tensor,
    clip: f64,
    train: bool,
    layout: &mut Option<FlatLayout>,
    flat: &mut Option<Tensor>,
) -> Result<Slice, TrainError> {
    let (mut traces, output_grads, loss_value) =
        traced_output_gradients(net, inputs, labels, train)?;
    let rows = inputs.size().first().copied().unwrap_or(0);
    tch::no_grad(|| -> Result<Slice, TrainError> {
        let kind = output_grads.first().map_or(Kind::Float, Tensor::kind);
        let device = inputs.device();
        let layout = layout.get_or_insert_with(|| FlatLayout::of_traces(&traces));
        let flat = match flat {
            Some(f) => f,
            None => flat.insert(Tensor::f_zeros([layout.numel], (kind, device))?),
        };
        let mut norms2 = Tensor::f_zeros([rows], (kind, device))?;
        let mut values = 0i64;
        let mut layers = Vec::with_capacity(traces.len());
        for (trace, g) in traces.iter_mut().zip(output_grads) {
            // The output is no longer needed: its gradient is in hand.
            trace.output = Tensor::new();
            values += trace.input.numel() as i64 + 2 * g.numel() as i64;
            let (lg, extra) = per_layer(trace, g, &mut norms2)?;
            values += extra;
            layers.push(lg);
        }
        let norms = norms2.f_sqrt_()?;
        // c_i = min(1, C / ‖∇ℓ_i‖) = C / max(C, ‖∇ℓ_i‖); a zero gradient gets 1.
        let factors = norms
            .f_clamp_min(clip)?
            .f_reciprocal_()?
            .f_mul_scalar_(clip)?;
        let mut slot = 0;
        for (trace, lg) in traces.iter().zip(&layers) {
            let has_bias = trace.bias.is_some();
            match lg {
                LayerGrads::Linear { a, g } => {
                    let cg = g.f_mul(&factors.f_unsqueeze(1)?)?;
                    let _ = layout.view(flat, slot)?.f_addmm_(&cg.f_tr()?, a)?;
                    if has_bias {
                        let _ = layout
                            .view(flat, slot + 1)?
                            .f_addmv_(&g.f_tr()?, &factors)?;
                    }
                }
                LayerGrads::ConvDirect { per_example, bias } => {
                    let _ = layout
                        .matrix(flat, slot, 1)?
                        .f_view([-1])?
                        .f_addmv_(&per_example.f_tr()?, &factors)?;
                    if has_bias {
                        let _ = layout
                            .view(flat, slot + 1)?
                            .f_addmv_(&bias.f_tr()?, &factors)?;
                    }
                }
                LayerGrads::ConvGhost { unfolded, g, bias } => {
                    let (cout, ckk) = (g.size()[1], unfolded.size()[1]);
                    // Σ_i c_i g_i U_iᵀ as one matmul over all (example, position) pairs.
                    let cg = g
                        .f_mul(&factors.f_view([-1, 1, 1])?)?
                        .f_permute([1, 0, 2])?
                        .f_reshape([cout, -1])?;
                    let u = unfolded.f_permute([0, 2, 1])?.f_reshape([-1, ckk])?;
                    let _ = layout.matrix(flat, slot, cout)?.f_addmm_(&cg, &u)?;
                    if has_bias {
                        let _ = layout
                            .view(flat, slot + 1)?
                            .f_addmv_(&bias.f_tr()?, &factors)?;
                    }
                }
            }
            slot += 1 + usize::from(has_bias);
        }
        Ok(Slice {
            norms,
            loss_sum: loss_value,
            values_per_example: values / rows.max(1),
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

/// Row-wise squared norms of `t` over every dimension but the first.
fn row_norms2(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let rows = t.size()[0];
    let m = t.f_reshape([rows, -1])?;
    m.f_mul(&m)?.f_sum_dim_intlist(1, false, m.kind())
}

/// A layer's per-example quantities, its squared per-example gradient norms added to `norms2`,
/// and how many values per example it allocated beyond its input and output gradient.
fn per_layer(
    trace: &LayerTrace,
    g: Tensor,
    norms2: &mut Tensor,
) -> Result<(LayerGrads, i64), TrainError> {
    let rows = trace.input.size().first().copied().unwrap_or(0).max(1);
    match trace.kind {
        TracedKind::Linear => {
            if trace.input.dim() != 2 {
                return Err(dp_error(format!(
                    "per-example clipping supports Linear layers on [batch, features] inputs, \
                     found an input of shape {:?}",
                    trace.input.size()
                )));
            }
            // Ghost norm: ‖g_i a_iᵀ‖² + ‖g_i‖² = ‖g_i‖²·(‖a_i‖² + 1).
            let g2 = row_norms2(&g)?;
            let mut a2 = row_norms2(&trace.input)?;
            if trace.bias.is_some() {
                a2 = a2.f_add_scalar_(1.0)?;
            }
            let _ = norms2.f_addcmul_(&g2, &a2)?;
            Ok((
                LayerGrads::Linear {
                    a: trace.input.shallow_clone(),
                    g,
                },
                0,
            ))
        }
        TracedKind::Conv2d { kernel, padding } => {
            let cout = g.size()[1];
            let unfolded =
                trace
                    .input
                    .f_im2col([kernel, kernel], [1, 1], [padding, padding], [1, 1])?; // [b, C·k·k, L]
            let (ckk, l) = (unfolded.size()[1], unfolded.size()[2]);
            let g = g.f_reshape([rows, cout, l])?;
            let bias = g.f_sum_dim_intlist(2, false, g.kind())?;
            if trace.bias.is_some() {
                let _ = norms2.f_add_(&row_norms2(&bias)?)?;
            }
            // Direct: C_out·C·k·k values per example and as many multiply-adds per position;
            // ghost: two L×L Gram matrices, L²·(C·k·k + C_out) multiply-adds. Take the cheaper.
            if cout * ckk <= l * (ckk + cout) {
                let per_example = g
                    .f_bmm(&unfolded.f_transpose(1, 2)?)? // [b, C_out, C·k·k]
                    .f_view([rows, -1])?;
                let _ = norms2.f_add_(&row_norms2(&per_example)?)?;
                Ok((
                    LayerGrads::ConvDirect { per_example, bias },
                    ckk * l + cout * ckk,
                ))
            } else {
                // ‖G_i‖² = ⟨U_iᵀU_i, g_iᵀg_i⟩ (L×L Gram matrices of positions).
                let mut uu = unfolded.f_transpose(1, 2)?.f_bmm(&unfolded)?;
                let gg = g.f_transpose(1, 2)?.f_bmm(&g)?;
                let _ = norms2.f_add_(&uu.f_mul_(&gg)?.f_sum_dim_intlist(
                    [1, 2].as_slice(),
                    false,
                    g.kind(),
                )?)?;
                Ok((
                    LayerGrads::ConvGhost { unfolded, g, bias },
                    ckk * l + 2 * l * l,
                ))
            }
        }
    }
}

/// What [`clip_linear_into_gradients`] put in the parameters' `.grad`.
#[derive(Debug)]
pub struct LinearClipped {
    /// `‖∇ℓ_i‖` before clipping, one per example.
    pub norms: Vec<f64>,
    /// Σ_i ℓ_i.
    pub loss_sum: f64,
    /// The traced layers' parameters (weight, then bias, layer by layer): the tensors whose
    /// `.grad` holds the clipped sum, in the order the noise is laid over them.
    pub parameters: Vec<Tensor>,
}

/// A CPU tensor's values, borrowed in place (no copy, no libtorch call).
enum HostValues<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// A CPU tensor's values, writable in place.
enum HostValuesMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

/// Where `t`'s values start and how many there are, when it is a contiguous float32 or float64
/// tensor in CPU memory.
fn host_layout(t: &Tensor) -> Option<(*mut std::ffi::c_void, usize, Kind)> {
    if t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let kind = t.kind();
    if !matches!(kind, Kind::Float | Kind::Double) {
        return None;
    }
    let (ptr, n) = (t.data_ptr(), t.numel());
    (n > 0 && !ptr.is_null()).then_some((ptr, n, kind))
}

/// `t`'s values, read in place.
fn host_values(t: &Tensor) -> Option<HostValues<'_>> {
    let (ptr, n, kind) = host_layout(t)?;
    // SAFETY: `host_layout` checked that `t` is contiguous, on the CPU and of this kind, so `n`
    // values of the type start at `data_ptr` (which includes the storage offset); the slice
    // borrows `t`, which keeps the storage alive. The callers read only tensors that no libtorch
    // call writes while the borrow lasts.
    Some(unsafe {
        match kind {
            Kind::Float => HostValues::F32(std::slice::from_raw_parts(ptr.cast(), n)),
            _ => HostValues::F64(std::slice::from_raw_parts(ptr.cast(), n)),
        }
    })
}

/// `t`'s values, writable in place. The caller must hold the only handle in use to the storage
/// (a layer's output gradient it got from autograd, a parameter's `.grad` between the backward
/// pass and the optimizer step).
fn host_values_mut(t: &mut Tensor) -> Option<HostValuesMut<'_>> {
    let (ptr, n, kind) = host_layout(t)?;
    // SAFETY: as in `host_values`; the slice borrows `t` mutably, and by the contract above
    // nothing else reads or writes the storage while it lives.
    Some(unsafe {
        match kind {
            Kind::Float => HostValuesMut::F32(std::slice::from_raw_parts_mut(ptr.cast(), n)),
            _ => HostValuesMut::F64(std::slice::from_raw_parts_mut(ptr.cast(), n)),
        }
    })
}

/// Σ x² of a short row, in eight independent lanes so that it vectorises.
fn row_sum_of_squares<T: Copy + Into<f64>>(row: &[T]) -> f64 {
    let (chunks, rest) = row.as_chunks::<8>();
    let mut lanes = [0f64; 8];
    for c in chunks {
        for j in 0..8 {
            let x: f64 = c[j].into();
            lanes[j] += x * x;
        }
    }
    let tail: f64 = rest
        .iter()
        .map(|&x| {
            let x: f64 = x.into();
            x * x
        })
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// The squared L2 norm of each row of the `[rows, width]` tensor `t`: read from its memory when
/// it can be, else computed by libtorch.
fn row_sq_norms(t: &Tensor, rows: usize) -> Result<Vec<f64>, TrainError> {
    fn of<T: Copy + Into<f64>>(v: &[T], rows: usize) -> Vec<f64> {
        let width = v.len() / rows.max(1);
        v.chunks_exact(width.max(1))
            .take(rows)
            .map(row_sum_of_squares)
            .collect()
    }
    match host_values(t) {
        Some(HostValues::F32(v)) => Ok(of(v, rows)),
        Some(HostValues::F64(v)) => Ok(of(v, rows)),
        None => {
            let norms = row_norms2(t)?.f_to_kind(Kind::Double)?.f_contiguous()?;
            Ok(Vec::<f64>::try_from(&norms)?)
        }
    }
}

/// Multiplies row `i` of the `[rows, width]` tensor `g` by `factors[i]`, in place.
fn scale_rows(g: &mut Tensor, factors: &[f64]) -> Result<(), TrainError> {
    let rows = factors.len().max(1);
    match host_values_mut(g) {
        Some(HostValuesMut::F32(v)) => {
            let width = v.len() / rows;
            for (row, &c) in v.chunks_exact_mut(width.max(1)).zip(factors) {
                let c = c as f32;
                row.iter_mut().for_each(|x| *x *= c);
            }
        }
        Some(HostValuesMut::F64(v)) => {
            let width = v.len() / rows;
            for (row, &c) in v.chunks_exact_mut(width.max(1)).zip(factors) {
                row.iter_mut().for_each(|x| *x *= c);
            }
        }
        None => {
            let c = Tensor::f_from_slice(factors)?
                .f_to_kind(g.kind())?
                .f_to_device(g.device())?
                .f_unsqueeze(1)?;
            let _ = g.f_mul_(&c)?;
        }
    }
    Ok(())
}

/// `out = Σ_i g[i]` (`accumulate`: `out += …`) over the rows of the `[rows, width]` tensor `g`:
/// a bias's clipped gradient sum.
fn column_sums_into(out: &mut Tensor, g: &Tensor, accumulate: bool) -> Result<(), TrainError> {
    fn sums<T: Copy + std::ops::AddAssign + Default>(out: &mut [T], g: &[T], accumulate: bool) {
        if !accumulate {
            out.iter_mut().for_each(|o| *o = T::default());
        }
        for row in g.chunks_exact(out.len().max(1)) {
            for (o, &x) in out.iter_mut().zip(row) {
                *o += x;
            }
        }
    }
    let host = match (host_values(g), host_values_mut(out)) {
        (Some(HostValues::F32(g)), Some(HostValuesMut::F32(o))) => {
            sums(o, g, accumulate);
            true
        }
        (Some(HostValues::F64(g)), Some(HostValuesMut::F64(o))) => {
            sums(o, g, accumulate);
            true
        }
        _ => false,
    };
    if !host {
        let s = g.f_sum_dim_intlist(0, false, g.kind())?;
        if accumulate {
            let _ = out.f_add_(&s)?;
        } else {
            out.f_copy_(&s)?;
        }
    }
    Ok(())
}

/// The tensors flattened and concatenated, in order.
fn flattened(tensors: &[Tensor]) -> Result<Tensor, tch::TchError> {
    let views = tensors
        .iter()
        .map(|t| t.f_view([-1]))
        .collect::<Result<Vec<_>, _>>()?;
    Tensor::f_cat(&views, 0)
}

/// Every parameter's `.grad` tensor, made if missing: a backward pass of `⟨cat(θ), 0⟩` gives
/// each one a zero `.grad` (once per training run: the step never unsets them, and the training
/// loop leaves them set for a step that overwrites them). Both DP routes write into them.
fn ensure_gradients(parameters: &[Tensor]) -> Result<Vec<Tensor>, TrainError> {
    let grads = parameters
        .iter()
        .map(Tensor::f_grad)
        .collect::<Result<Vec<_>, _>>()?;
    if grads.iter().all(Tensor::defined) {
        return Ok(grads);
    }
    for mut g in grads.into_iter().filter(Tensor::defined) {
        let _ = g.f_zero_()?;
    }
    let flat = flattened(parameters)?;
    flat.f_dot(&flat.f_detach()?.f_zeros_like()?)?
        .f_backward()?;
    Ok(parameters
        .iter()
        .map(Tensor::f_grad)
        .collect::<Result<Vec<_>, _>>()?)
}

/// Per-example clipping for a network of Linear layers on the CPU (see "Networks of Linear
/// layers" in the module documentation): puts `Σ_i c_i ∇ℓ_i` over the rows of `inputs` into every
/// traced parameter's `.grad` — overwriting what is there, or adding to it when `accumulate` (a
/// later micro-batch) — and returns the per-example norms and the loss.
pub fn clip_linear_into_gradients(
    net: &LayerNet,
    inputs: &Tensor,
    labels: &Tensor,
    clip: f64,
    train: bool,
    accumulate: bool,
) -> Result<LinearClipped, TrainError> {
    if !net.is_linear_on_rows() {
        return Err(dp_error(
            "this clipping route is for networks of Linear layers on [batch, features] rows".into(),
        ));
    }
    let rows = usize::try_from(inputs.size().first().copied().unwrap_or(0)).unwrap_or(0);
    let (traces, mut output_grads, loss_value) =
        traced_output_gradients(net, inputs, labels, train)?;
    let mut norms2 = vec![0f64; rows];
    for (trace, g) in traces.iter().zip(&output_grads) {
        if trace.input.dim() != 2 || g.dim() != 2 {
            return Err(dp_error(format!(
                "per-example clipping of a Linear layer needs [batch, features] inputs, found {:?}",
                trace.input.size()
            )));
        }
        // ‖g_i a_iᵀ‖² + ‖g_i‖² = ‖g_i‖²·(‖a_i‖² + 1).
        let a2 = row_sq_norms(&trace.input, rows)?;
        let g2 = row_sq_norms(g, rows)?;
        let bias = if trace.bias.is_some() { 1.0 } else { 0.0 };
        for ((n, a), g) in norms2.iter_mut().zip(&a2).zip(&g2) {
            *n += g * (a + bias);
        }
    }
    let norms: Vec<f64> = norms2.iter().map(|n| n.sqrt()).collect();
    // c_i = min(1, C / ‖∇ℓ_i‖); a zero gradient gets 1.
    let factors: Vec<f64> = norms.iter().map(|&n| clip / n.max(clip)).collect();
    let parameters: Vec<Tensor> = traces
        .iter()
        .flat_map(|t| {
            std::iter::once(t.weight.shallow_clone())
                .chain(t.bias.iter().map(Tensor::shallow_clone))
        })
        .collect();
    let mut grads = ensure_gradients(&parameters)?.into_iter();
    tch::no_grad(|| -> Result<(), TrainError> {
        for (trace, g) in traces.iter().zip(&mut output_grads) {
            scale_rows(g, &factors)?;
            // Σ_i c_i g_i a_iᵀ = (c ⊙ g)ᵀ a, straight into the weight's `.grad`.
            let weight_grad = grads
                .next()
                .ok_or_else(|| dp_error("a layer without its weight gradient".into()))?;
            let cg_t = g.f_tr()?;
            if accumulate {
                let _ = weight_grad.shallow_clone().f_addmm_(&cg_t, &trace.input)?;
            } else {
                let _ = cg_t.f_mm_out(&weight_grad, &trace.input)?;
            }
            if trace.bias.is_some() {
                let mut bias_grad = grads
                    .next()
                    .ok_or_else(|| dp_error("a layer without its bias gradient".into()))?;
                column_sums_into(&mut bias_grad, g, accumulate)?;
            }
        }
        Ok(())
    })?;
    Ok(LinearClipped {
        norms,
        loss_sum: loss_value,
        parameters,
    })
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
    let flat = flattened(&sums)?;
    Ok(ClippedSum {
        gradients: params.into_iter().zip(sums).collect(),
        flat,
        norms: Tensor::f_from_slice(&norms)?,
        loss_sum,
    })
}

/// Refuses a step whose clipping covers fewer tensors than the model trains: a parameter outside
/// a traced layer would be trained without clipping or noise.
fn covers_every_parameter(covered: usize, trainable: usize) -> Result<(), TrainError> {
    if covered == trainable {
        return Ok(());
    }
    Err(dp_error(format!(
        "the model has {trainable} trainable tensors, but per-example clipping covers {covered}"
    )))
}

/// DP-SGD's gradient step: clipped per-example gradients plus secure Gaussian noise.
#[derive(Debug)]
pub struct DpSgdStep {
    clip: f64,
    noise: StepNoise,
    granularity: f64,
    steps: u64,
    /// The plan's steps per round: how far ahead noise is worth drawing.
    planned_steps: u64,
    /// Rows per micro-batch, learned on the first step ([`MICROBATCH_VALUES`]).
    rows_per_slice: Option<i64>,
    /// The same for the Linear route, whose per-example tensors are other ones.
    linear_rows_per_slice: Option<i64>,
    /// Whether networks of Linear layers on the CPU take their own route (the default).
    linear_route: bool,
}

/// Rounds each value to the grid `g` (ties to even), adds its noise value and multiplies by
/// `scale`, in the value's own precision: the same operations, in the same order, as
/// [`DpSgdStep::privatize`]'s tensor ops (so float32 gives the same bits either way).
fn release_in_place(values: HostValuesMut<'_>, noise: &[f32], g: f64, scale: f64) {
    match values {
        HostValuesMut::F32(v) => {
            let (inv, g, scale) = ((1.0 / g) as f32, g as f32, scale as f32);
            for (x, n) in v.iter_mut().zip(noise) {
                *x = (*x * inv).round_ties_even() * g + n;
                if scale != 1.0 {
                    *x *= scale;
                }
            }
        }
        HostValuesMut::F64(v) => {
            for (x, n) in v.iter_mut().zip(noise) {
                *x = (*x * (1.0 / g)).round_ties_even() * g + f64::from(*n);
                if scale != 1.0 {
                    *x *= scale;
                }
            }
        }
    }
}

impl DpSgdStep {
    /// A step for `plan`: noise `N_ℤ(0, (σ·C)²)` on the grid `plan.granularity`, keyed from the OS.
    pub fn new(plan: &DpSgdPlan) -> Result<Self, TrainError> {
        let noise = SecureGaussian::new(plan.noise_multiplier * plan.clip, plan.granularity)
            .map_err(|e| dp_error(e.to_string()))?;
        Self::from_noise(plan.clip, noise, plan.steps_per_round)
    }

    /// As [`DpSgdStep::new`] with a given generator (tests).
    pub fn with_rng(plan: &DpSgdPlan, rng: SecureRng) -> Result<Self, TrainError> {
        let noise =
            SecureGaussian::with_rng(plan.noise_multiplier * plan.clip, plan.granularity, rng)
                .map_err(|e| dp_error(e.to_string()))?;
        Self::from_noise(plan.clip, noise, plan.steps_per_round)
    }

    fn from_noise(
        clip: f64,
        noise: SecureGaussian,
        planned_steps: u64,
    ) -> Result<Self, TrainError> {
        let granularity = noise.granularity();
        Ok(DpSgdStep {
            clip,
            noise: StepNoise::new(noise)?,
            granularity,
            steps: 0,
            planned_steps,
            rows_per_slice: None,
            linear_rows_per_slice: None,
            linear_route: true,
        })
    }

    /// Whether networks of Linear layers on the CPU take their own route (on by default; off,
    /// every network takes the general one). Both release the same gradients; the tests compare
    /// them.
    pub fn use_linear_route(&mut self, enabled: bool) {
        self.linear_route = enabled;
    }

    /// The route for networks of Linear layers on the CPU (module documentation): the clipped
    /// sum is written into the traced parameters' `.grad`, then released there in place.
    /// Returns the loss sum.
    fn linear_step(&mut self, batch: &Batch<'_>, rows: i64) -> Result<f64, TrainError> {
        let mut loss_sum = 0.0;
        let mut parameters = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = match self.linear_rows_per_slice {
                Some(r) => r.clamp(1, rows - start),
                None => PROBE_ROWS.min(rows - start),
            };
            let x = batch.inputs.f_narrow(0, start, n)?;
            let y = batch.labels.f_narrow(0, start, n)?;
            let slice = clip_linear_into_gradients(batch.net, &x, &y, self.clip, true, start > 0)?;
            if self.linear_rows_per_slice.is_none() {
                // Per example: each layer's input, output and output gradient (a weight of
                // shape [out, in] stands for in + 2·out values).
                let per_example: i64 = slice
                    .parameters
                    .iter()
                    .filter_map(|p| match p.size().as_slice() {
                        [out, input] => Some(input + 2 * out),
                        _ => None,
                    })
                    .sum();
                self.linear_rows_per_slice = Some((MICROBATCH_VALUES / per_example.max(1)).max(1));
            }
            loss_sum += slice.loss_sum;
            parameters = slice.parameters;
            start += n;
        }
        covers_every_parameter(parameters.len(), batch.parameters.len())?;
        let scale = 1.0 / batch.expected_batch_size.max(1) as f64;
        self.release_gradients(&parameters, scale)?;
        Ok(loss_sum)
    }

    /// Rounds each parameter's `.grad` to the noise grid, adds noise and multiplies by `scale`,
    /// in place: [`DpSgdStep::privatize`] for gradients that already sit in `.grad`. The noise is
    /// laid over the parameters in the order given (the flat buffer's order on the other route).
    fn release_gradients(&mut self, parameters: &[Tensor], scale: f64) -> Result<(), TrainError> {
        let mut grads = Vec::with_capacity(parameters.len());
        for p in parameters {
            let g = p.f_grad()?;
            if !g.defined() {
                return Err(dp_error(format!(
                    "a parameter of shape {:?} received no gradient from the clipped backward pass",
                    p.size()
                )));
            }
            grads.push(g);
        }
        let total = grads.iter().map(Tensor::numel).sum();
        let g = self.granularity;
        let values = self.next_noise(total)?;
        let mut offset = 0;
        for grad in &mut grads {
            let n = grad.numel();
            let noise = &values[offset..offset + n];
            offset += n;
            if let Some(host) = host_values_mut(grad) {
                release_in_place(host, noise, g, scale);
                continue;
            }
            let noise = Tensor::f_from_slice(noise)?.f_view(grad.size().as_slice())?;
            release_with_tensor_ops(grad, &noise, g, scale)?;
        }
        Ok(())
    }

    /// `len` fresh noise values for this step in host memory, drawn ahead no further than the
    /// plan's steps.
    fn next_noise(&mut self, len: usize) -> Result<&[f32], TrainError> {
        let steps_left = self.planned_steps.saturating_sub(self.steps);
        self.noise.host(len, steps_left)
    }

    /// Where the last release's noise was drawn: the CPU sampler or the GPU kernel
    /// ([`noise::NoiseDevice`]); `None` before the first release.
    pub fn noise_device(&self) -> Option<NoiseDevice> {
        self.noise.last_device()
    }

    /// Releases a clipped sum: `flat` holds `Σ_i c_i ∇ℓ_i` of `parameters`, flattened and
    /// concatenated in their order. It is rounded to the noise grid, noised, divided by
    /// `expected_batch_size` and written into the parameters' `.grad` (made when unset); the step
    /// is counted. The route for clipped sums computed outside this module (the LoRA adapters'
    /// sequence route, `crate::lm::lora::dp`): one release for every route.
    pub fn release_into_gradients(
        &mut self,
        parameters: &[Tensor],
        flat: Tensor,
        expected_batch_size: usize,
    ) -> Result<(), TrainError> {
        let numel: i64 = parameters.iter().map(|p| p.numel() as i64).sum();
        if flat.size() != [numel] {
            return Err(dp_error(format!(
                "the clipped sum has shape {:?}, the parameters hold {numel} values",
                flat.size()
            )));
        }
        let scale = 1.0 / expected_batch_size.max(1) as f64;
        let released = self.privatize_flat(flat, scale)?;
        // Hand ĝ to the optimizer as `.grad` (tch cannot assign `.grad`, only write into one).
        let grads = ensure_gradients(parameters)?;
        let mut offset = 0;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for (p, g) in parameters.iter().zip(&grads) {
                let n = p.numel() as i64;
                g.f_view([-1])?.f_copy_(&released.f_narrow(0, offset, n)?)?;
                offset += n;
            }
            Ok(())
        })?;
        self.steps += 1;
        Ok(())
    }

    /// Steps taken (each one released a noised sum): what the ledger must record.
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Rounds `sum` to the noise grid and adds noise, on its device and in its kind; returns the
    /// released (noised) sum. See the module documentation for why this is exact.
    pub fn privatize(&mut self, sum: &Tensor) -> Result<Tensor, TrainError> {
        let released = sum.f_detach_copy()?.f_reshape([-1])?;
        let released = self.privatize_flat(released, 1.0)?;
        Ok(released.f_view(sum.size().as_slice())?)
    }

    /// [`DpSgdStep::privatize`] in place on a flat buffer, then multiplied by `scale`
    /// (post-processing).
    fn privatize_flat(&mut self, mut flat: Tensor, scale: f64) -> Result<Tensor, TrainError> {
        let g = self.granularity;
        // Drawn where `flat` lives (the GPU for a CUDA tensor): `noise::StepNoise::tensor_for`.
        let steps_left = self.planned_steps.saturating_sub(self.steps);
        let noise = self
            .noise
            .tensor_for(flat.numel(), flat.device(), steps_left)?;
        release_with_tensor_ops(&mut flat, &noise, g, scale)?;
        Ok(flat)
    }
}

/// Rounds `values` to the grid `g`, adds `noise` (CPU float32, moved to `values`' device and
/// kind) and multiplies by `scale`, in place with tensor ops: the release on any device.
///
/// ×(1/g), round, ×g are exact (g is a power of two): the sum on the grid. The noise is on the
/// grid too, so the addition is exact or, past 2^24 grid steps in float32, correctly rounded: a
/// function of the exact release, i.e. post-processing.
fn release_with_tensor_ops(
    values: &mut Tensor,
    noise: &Tensor,
    g: f64,
    scale: f64,
) -> Result<(), TrainError> {
    let noise = noise
        .f_to_device(values.device())?
        .f_to_kind(values.kind())?;
    tch::no_grad(|| -> Result<(), tch::TchError> {
        let _ = values.f_mul_scalar_(1.0 / g)?;
        let _ = values.f_round_()?;
        let _ = values.f_mul_scalar_(g)?;
        let _ = values.f_add_(&noise)?;
        if scale != 1.0 {
            let _ = values.f_mul_scalar_(scale)?;
        }
        Ok(())
    })?;
    Ok(())
}

impl GradientStep for DpSgdStep {
    /// Every route writes each parameter's whole `.grad` (copying or releasing in place), so the
    /// tensors can stay from one step to the next instead of being unset and made anew.
    fn overwrites_gradients(&self) -> bool {
        true
    }

    fn compute_gradients(&mut self, batch: &Batch<'_>) -> Result<f64, TrainError> {
        let rows = batch.inputs.size().first().copied().unwrap_or(0);
        if self.linear_route
            && rows > 0
            && batch.inputs.device() == tch::Device::Cpu
            && batch.net.is_linear_on_rows()
        {
            let loss_sum = self.linear_step(batch, rows)?;
            self.steps += 1;
            return Ok(loss_sum / rows as f64);
        }
        // An empty Poisson batch: the release is noise alone.
        let (parameters, flat, loss_sum) =
            clipped_sum_of_batch(batch, rows, self.clip, &mut self.rows_per_slice)?;
        covers_every_parameter(parameters.len(), batch.parameters.len())?;
        self.release_into_gradients(&parameters, flat, batch.expected_batch_size)?;
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
    /// Local DP-SGD, or record-level distributed DP-SGD (the ledger keeps them apart).
    pub kind: tutela_privacy::ledger::MechanismKind,
}

/// DP-SGD's noise multiplier σ (as trained with, on the noise grid) and its expected batch
/// B = sample rate × training rows (or privacy units): σ / B is the noise-to-signal ratio of one
/// step. What every DP-SGD round reports (job status, the round's trail event), made in one
/// place from the round's plan ([`DpNoise::of_plan`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpNoise {
    pub noise_multiplier: f64,
    pub expected_batch: f64,
}

impl DpNoise {
    /// The noise of a round planned as `plan` over `rows` training rows (privacy units).
    pub fn of_plan(plan: &DpSgdPlan, rows: usize) -> DpNoise {
        DpNoise {
            noise_multiplier: plan.effective_noise_multiplier,
            expected_batch: plan.sample_rate * rows as f64,
        }
    }
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
        kind: tutela_privacy::ledger::MechanismKind::DpSgd,
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
