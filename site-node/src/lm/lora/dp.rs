//! DP-SGD on LoRA adapters over sequence batches: per-unit clipping without a per-example loop.
//!
//! # The privacy unit
//!
//! A batch holds sequences (token windows of documents); each sequence belongs to a privacy unit
//! (a document, or a patient when the data declares one). [`crate::dp::PoissonBatchSampler`]
//! draws *units* (its rows are units), all sequences of a drawn unit go into the batch, and a
//! unit's sequences are clipped together, as one example: the sensitivity the accountant assumes
//! is one unit's whole contribution.
//!
//! # One step ([`clipped_adapter_gradient_sum`])
//!
//! 1. **Forward, recorded.** Every [`LoraLinear`] of the model records on the model's
//!    [`LoraTape`] its input `x` and `h = x Aᵀ` (detached) and its output `y` (in the graph).
//!    The loss is the *sum* of the sequences' token losses, so `∂L/∂y` restricted to sequence
//!    `s` is that sequence's own gradient `g_s` (sequences do not attend to one another).
//! 2. **Output gradients.** One backward pass to the recorded outputs (not to any weight).
//! 3. **Per-sequence adapter gradients**, materialised with one batched matmul per factor; for a
//!    linear map applied at every position `t`:
//!    - `∇B_s = s · Σ_t g_t h_tᵀ = s · G_sᵀ H_s` : `[out, r]`,
//!    - `∇A_s = s · Σ_t (Bᵀ g_t) x_tᵀ = s · (G_s B)ᵀ X_s` : `[r, in]` (only when `A` trains).
//!
//!    Padded positions are masked out of `G_s` (so ragged lengths in one padded batch give
//!    exactly the unpadded gradients). Materialising is the cheaper route here: a factor's
//!    gradient has `out·r` (or `r·in`) values per example, with `r` small, where ghost norms
//!    would need two `T × T` Gram matrices per example and layer.
//! 4. **Per unit**: the sequences' gradients are added into their unit's (`index_add`), the
//!    squared norms summed over every adapter tensor, `c_u = min(1, C / ‖∇ℓ_u‖)`.
//! 5. **Clipped sum**: one matrix-vector product per tensor, `Σ_u c_u ∇_u`, into one flat buffer.
//!
//! The release (rounding to the noise grid, the exact discrete Gaussian from the project's
//! sampler, division by the expected batch size) is [`DpSgdStep::release_into_gradients`]: the
//! same code as every other DP-SGD route. [`clipped_adapter_gradient_sum_reference`] computes
//! step 5's result with a loop over units, each sequence unpadded, for the tests.

use tch::{Kind, Reduction, Tensor};

use super::{LoraLinear, LoraRecord, LoraTape};
use crate::dp::DpSgdStep;
use crate::train::TrainError;

fn torch(context: &'static str) -> impl FnOnce(tch::TchError) -> TrainError {
    move |source| TrainError::Torch {
        context: context.to_owned(),
        source,
    }
}

fn invalid(reason: String) -> TrainError {
    TrainError::InvalidConfig {
        field: "lora",
        reason,
    }
}

/// A batch of token sequences, padded to one length.
#[derive(Debug)]
pub struct SequenceBatch {
    /// `[S, T]` token ids (i64); padded positions hold any valid id.
    pub input_ids: Tensor,
    /// `[S, T]` next-token targets (i64); [`IGNORE_INDEX`] where no loss is taken (padding).
    pub targets: Tensor,
    /// `[S, T]` 1 at real positions, 0 at padding, in the model's float kind.
    pub mask: Tensor,
    /// `[S]` the privacy unit of each sequence, in `0..n_units`.
    pub units: Vec<i64>,
    pub n_units: usize,
}

/// The target value of a position that takes no loss.
pub const IGNORE_INDEX: i64 = -100;

impl SequenceBatch {
    pub fn sequences(&self) -> i64 {
        self.input_ids.size().first().copied().unwrap_or(0)
    }

    /// Checks the shapes and the unit indices.
    pub fn check(&self) -> Result<(), TrainError> {
        let shape = self.input_ids.size();
        if shape.len() != 2 || self.targets.size() != shape || self.mask.size() != shape {
            return Err(invalid(format!(
                "a sequence batch needs input ids, targets and mask of one [S, T] shape, got \
                 {:?}, {:?}, {:?}",
                shape,
                self.targets.size(),
                self.mask.size()
            )));
        }
        if self.units.len() as i64 != shape[0] {
            return Err(invalid(format!(
                "{} sequences but {} unit indices",
                shape[0],
                self.units.len()
            )));
        }
        if let Some(u) = self
            .units
            .iter()
            .find(|&&u| u < 0 || u as usize >= self.n_units)
        {
            return Err(invalid(format!(
                "unit index {u} is outside 0..{}",
                self.n_units
            )));
        }
        Ok(())
    }

    /// The batch of the privacy units `sampled` (indices into `units`, e.g. a
    /// [`crate::dp::PoissonBatchSampler`] batch over `units.len()` rows): every token window of
    /// every sampled unit, as next-token pairs (inputs `w[..n-1]`, targets `w[1..]`), right-padded
    /// with `pad_id` to the longest, targets [`IGNORE_INDEX`] and mask 0 on padding. Unit `k` of
    /// the batch is `sampled[k]`; a window shorter than 2 tokens has no pair and is skipped.
    pub fn from_units(
        units: &[Vec<Vec<i64>>],
        sampled: &[usize],
        pad_id: i64,
        mask_kind: Kind,
        device: tch::Device,
    ) -> Result<SequenceBatch, TrainError> {
        let mut windows: Vec<(&[i64], i64)> = Vec::new();
        for (k, &u) in sampled.iter().enumerate() {
            let unit = units.get(u).ok_or_else(|| {
                invalid(format!("sampled unit {u} is outside 0..{}", units.len()))
            })?;
            windows.extend(
                unit.iter()
                    .filter(|w| w.len() >= 2)
                    .map(|w| (w.as_slice(), k as i64)),
            );
        }
        let s = windows.len();
        let t = windows.iter().map(|(w, _)| w.len() - 1).max().unwrap_or(0);
        let mut ids = vec![pad_id; s * t];
        let mut targets = vec![IGNORE_INDEX; s * t];
        let mut mask = vec![0f64; s * t];
        for (row, (w, _)) in windows.iter().enumerate() {
            let n = w.len() - 1;
            ids[row * t..row * t + n].copy_from_slice(&w[..n]);
            targets[row * t..row * t + n].copy_from_slice(&w[1..]);
            mask[row * t..row * t + n].fill(1.0);
        }
        let shape = [s as i64, t as i64];
        let tensor = |values: &[i64]| {
            Tensor::f_from_slice(values)
                .and_then(|x| x.f_view(shape))
                .and_then(|x| x.f_to_device(device))
        };
        Ok(SequenceBatch {
            input_ids: tensor(&ids).map_err(torch("batch ids"))?,
            targets: tensor(&targets).map_err(torch("batch targets"))?,
            mask: Tensor::f_from_slice(&mask)
                .and_then(|x| x.f_view(shape))
                .and_then(|x| x.f_to_kind(mask_kind))
                .and_then(|x| x.f_to_device(device))
                .map_err(torch("batch mask"))?,
            units: windows.iter().map(|&(_, k)| k).collect(),
            n_units: sampled.len(),
        })
    }

    /// The sequences of units `start..end` as a batch of their own (unit `start` becomes 0), or
    /// `None` when those units have no sequence here.
    pub fn units_slice(&self, start: i64, end: i64) -> Result<Option<SequenceBatch>, TrainError> {
        let rows: Vec<i64> = (0..self.units.len() as i64)
            .filter(|&s| (start..end).contains(&self.units[s as usize]))
            .collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let index = Tensor::f_from_slice(&rows)
            .and_then(|i| i.f_to_device(self.input_ids.device()))
            .map_err(torch("unit slice index"))?;
        let pick = |t: &Tensor| t.f_index_select(0, &index);
        Ok(Some(SequenceBatch {
            input_ids: pick(&self.input_ids).map_err(torch("unit slice"))?,
            targets: pick(&self.targets).map_err(torch("unit slice"))?,
            mask: pick(&self.mask).map_err(torch("unit slice"))?,
            units: rows
                .iter()
                .map(|&s| self.units[s as usize] - start)
                .collect(),
            n_units: (end - start) as usize,
        }))
    }

    /// Sequence `s` alone, cut to its real length (the reference's unpadded input).
    fn unpadded(&self, s: i64) -> Result<SequenceBatch, tch::TchError> {
        let len = self
            .mask
            .f_get(s)?
            .f_sum(Kind::Float)?
            .f_double_value(&[])? as i64;
        let cut = |t: &Tensor| t.f_narrow(0, s, 1)?.f_narrow(1, 0, len);
        Ok(SequenceBatch {
            input_ids: cut(&self.input_ids)?,
            targets: cut(&self.targets)?,
            mask: cut(&self.mask)?,
            units: vec![0],
            n_units: 1,
        })
    }
}

/// A sequence model with LoRA layers, as DP-SGD on adapters needs it.
pub trait AdapterModel {
    /// The adapted layers, in a fixed order (the order of the clipped sum's tensors).
    fn lora_layers(&self) -> Vec<&LoraLinear>;

    /// The tape every layer of [`AdapterModel::lora_layers`] records on.
    fn tape(&self) -> &LoraTape;

    /// `[S]`: each sequence's summed token loss over its real positions. Sequences must not
    /// influence one another (attention within a sequence, padding masked).
    fn sequence_losses(&self, batch: &SequenceBatch, train: bool) -> Result<Tensor, TrainError>;

    /// The trainable adapter tensors, in the clipped sum's order: each layer's `B`, then its
    /// `A` when it trains.
    fn adapter_parameters(&self) -> Vec<Tensor> {
        self.lora_layers()
            .iter()
            .flat_map(|l| l.trainable())
            .collect()
    }
}

/// `[S]` summed next-token cross-entropy per sequence from `logits` `[S, T, V]`, positions whose
/// target is [`IGNORE_INDEX`] left out.
pub fn sequence_token_losses(logits: &Tensor, targets: &Tensor) -> Result<Tensor, tch::TchError> {
    let size = logits.size();
    let vocab = size.last().copied().unwrap_or(1);
    logits
        .f_reshape([-1, vocab])?
        .f_cross_entropy_loss::<Tensor>(
            &targets.f_reshape([-1])?,
            None,
            Reduction::None,
            IGNORE_INDEX,
            0.0,
        )?
        .f_view([size[0], -1])?
        .f_sum_dim_intlist(1, false, logits.kind())
}

/// The clipped per-unit gradient sum of a batch, over the model's adapter tensors.
#[derive(Debug)]
pub struct AdapterClippedSum {
    /// The adapter tensors, in [`AdapterModel::adapter_parameters`] order.
    pub parameters: Vec<Tensor>,
    /// `Σ_u c_u ∇ℓ_u`, flattened and concatenated in `parameters`' order.
    pub flat: Tensor,
    /// `‖∇ℓ_u‖` before clipping, `[n_units]`.
    pub norms: Tensor,
    /// Σ of the sequences' losses.
    pub loss_sum: f64,
}

/// Per-sequence gradients of one record's factors: `[S, out, r]` for B, `[S, r, in]` for A.
fn per_sequence_gradients(
    layer: &LoraLinear,
    record: &LoraRecord,
    g: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Option<Tensor>), tch::TchError> {
    let s = g.size()[0];
    let out = *g.size().last().unwrap_or(&1);
    let g = g.f_reshape([s, -1, out])?;
    let positions = g.size()[1];
    // Padded positions give nothing (their loss is not taken, and a model that leaks them
    // into real positions is wrong anyway); masking makes that exact.
    let g = if mask.size() == [s, positions] {
        g.f_mul(&mask.f_unsqueeze(-1)?)?
    } else {
        g
    };
    let rank = *record.projected.size().last().unwrap_or(&1);
    let h = record.projected.f_reshape([s, -1, rank])?;
    let grad_b = g
        .f_transpose(1, 2)?
        .f_bmm(&h)?
        .f_mul_scalar(layer.scaling())?;
    let grad_a = if layer.trains_a() {
        let input = *record.input.size().last().unwrap_or(&1);
        let x = record.input.f_reshape([s, -1, input])?;
        Some(
            g.f_matmul(layer.b())?
                .f_transpose(1, 2)?
                .f_bmm(&x)?
                .f_mul_scalar(layer.scaling())?,
        )
    } else {
        None
    };
    Ok((grad_b, grad_a))
}

/// Adds per-sequence gradients `[S, ...]` into per-unit ones `[U, numel]`.
fn into_units(
    per_sequence: &Tensor,
    units: &Tensor,
    n_units: i64,
    identity: bool,
) -> Result<Tensor, tch::TchError> {
    let s = per_sequence.size()[0];
    let flat = per_sequence.f_reshape([s, -1])?;
    if identity {
        return Ok(flat);
    }
    let numel = flat.size()[1];
    Tensor::f_zeros([n_units, numel], (flat.kind(), flat.device()))?.f_index_add(0, units, &flat)
}

/// Steps 1–5 of the module documentation.
pub fn clipped_adapter_gradient_sum(
    model: &dyn AdapterModel,
    batch: &SequenceBatch,
    clip: f64,
) -> Result<AdapterClippedSum, TrainError> {
    batch.check()?;
    let layers = model.lora_layers();
    let parameters = model.adapter_parameters();
    let tape = model.tape();
    tape.start();
    let losses = model.sequence_losses(batch, true);
    let records = tape.take();
    let losses = losses?;
    let loss_sum = losses
        .f_sum(losses.kind())
        .map_err(torch("summing the sequence losses"))?;
    if records.is_empty() {
        return Err(invalid(
            "the model's forward pass recorded no LoRA layer (is the tape shared?)".into(),
        ));
    }
    let outputs: Vec<&Tensor> = records.iter().map(|r| &r.output).collect();
    let output_grads = Tensor::f_run_backward(&[&loss_sum], &outputs, false, false)
        .map_err(torch("per-sequence output gradients"))?;
    let loss_value = loss_sum
        .f_double_value(&[])
        .map_err(torch("reading the loss"))?;

    tch::no_grad(|| -> Result<AdapterClippedSum, TrainError> {
        let n_units = batch.n_units as i64;
        let device = batch.input_ids.device();
        let units = Tensor::f_from_slice(&batch.units)
            .and_then(|t| t.f_to_device(device))
            .map_err(torch("unit indices"))?;
        let identity = batch.units.len() == batch.n_units
            && batch.units.iter().enumerate().all(|(i, &u)| u == i as i64);
        // Per adapter tensor (parameters' order): its per-unit gradients [U, numel].
        let mut per_unit: Vec<Option<Tensor>> = (0..parameters.len()).map(|_| None).collect();
        // Each layer's index and the slot of its B among the adapter tensors (A follows).
        let mut slots = Vec::with_capacity(layers.len());
        let mut next = 0;
        for layer in &layers {
            slots.push(next);
            next += if layer.trains_a() { 2 } else { 1 };
        }
        for (record, g) in records.iter().zip(&output_grads) {
            let index = layers
                .iter()
                .position(|l| l.path() == record.path)
                .ok_or_else(|| {
                    invalid(format!(
                        "layer {:?} recorded a forward but is not among the model's LoRA layers",
                        record.path
                    ))
                })?;
            let (layer, slot) = (layers[index], slots[index]);
            let (grad_b, grad_a) = per_sequence_gradients(layer, record, g, &batch.mask)
                .map_err(torch("per-sequence adapter gradients"))?;
            for (offset, grad) in std::iter::once(grad_b).chain(grad_a).enumerate() {
                let unit_grads = into_units(&grad, &units, n_units, identity)
                    .map_err(torch("per-unit adapter gradients"))?;
                let entry = &mut per_unit[slot + offset];
                *entry = Some(match entry.take() {
                    // A layer called more than once per forward: its uses add up.
                    Some(previous) => previous
                        .f_add(&unit_grads)
                        .map_err(torch("adding a layer's uses"))?,
                    None => unit_grads,
                });
            }
        }
        let kind = losses.kind();
        let mut norms2 = Tensor::f_zeros([n_units], (kind, device)).map_err(torch("norms"))?;
        let mut per_unit_tensors = Vec::with_capacity(per_unit.len());
        for (tensor, p) in per_unit.into_iter().zip(&parameters) {
            // A layer the forward did not use contributes zero.
            let t = match tensor {
                Some(t) => t,
                None => Tensor::f_zeros([n_units, p.numel() as i64], (kind, device))
                    .map_err(torch("zeros"))?,
            };
            norms2 = norms2
                .f_add(
                    &t.f_square()
                        .and_then(|sq| sq.f_sum_dim_intlist(1, false, kind))
                        .map_err(torch("squared norms"))?,
                )
                .map_err(torch("squared norms"))?;
            per_unit_tensors.push(t);
        }
        let norms = norms2.f_sqrt().map_err(torch("norms"))?;
        // c_u = min(1, C / ‖∇ℓ_u‖) = C / max(C, ‖∇ℓ_u‖).
        let factors = norms
            .f_clamp_min(clip)
            .and_then(|n| n.f_reciprocal())
            .and_then(|r| r.f_mul_scalar(clip))
            .map_err(torch("clip factors"))?;
        let pieces = per_unit_tensors
            .iter()
            .map(|t| t.f_tr().and_then(|tt| tt.f_mv(&factors)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(torch("clipped sum"))?;
        let flat = Tensor::f_cat(&pieces, 0).map_err(torch("clipped sum"))?;
        Ok(AdapterClippedSum {
            parameters: parameters.iter().map(Tensor::shallow_clone).collect(),
            flat,
            norms,
            loss_sum: loss_value,
        })
    })
}

/// [`clipped_adapter_gradient_sum`] over slices of at most `units_per_chunk` units: per-unit
/// clipping needs nothing across units, so the result is the same (up to the order of the
/// floating-point sums) and the peak memory is that of one slice's output gradients.
pub fn clipped_adapter_gradient_sum_chunked(
    model: &dyn AdapterModel,
    batch: &SequenceBatch,
    clip: f64,
    units_per_chunk: usize,
) -> Result<AdapterClippedSum, TrainError> {
    batch.check()?;
    let n_units = batch.n_units as i64;
    let chunk = units_per_chunk.clamp(1, batch.n_units.max(1)) as i64;
    if chunk >= n_units {
        return clipped_adapter_gradient_sum(model, batch, clip);
    }
    let mut flat: Option<Tensor> = None;
    let mut norms = Vec::new();
    let mut loss_sum = 0.0;
    let mut start = 0;
    while start < n_units {
        let end = (start + chunk).min(n_units);
        match batch.units_slice(start, end)? {
            Some(slice) => {
                let part = clipped_adapter_gradient_sum(model, &slice, clip)?;
                loss_sum += part.loss_sum;
                norms.push(part.norms);
                flat = Some(match flat {
                    None => part.flat,
                    Some(f) => f.f_add(&part.flat).map_err(torch("adding slices"))?,
                });
            }
            None => {
                let kind = batch.mask.kind();
                norms.push(
                    Tensor::f_zeros([end - start], (kind, batch.mask.device()))
                        .map_err(torch("norms"))?,
                );
            }
        }
        start = end;
    }
    let parameters = model.adapter_parameters();
    let flat = match flat {
        Some(f) => f,
        None => {
            let numel: i64 = parameters.iter().map(|p| p.numel() as i64).sum();
            Tensor::f_zeros([numel], (batch.mask.kind(), batch.mask.device()))
                .map_err(torch("zeros"))?
        }
    };
    Ok(AdapterClippedSum {
        parameters,
        flat,
        norms: Tensor::f_cat(&norms, 0).map_err(torch("norms"))?,
        loss_sum,
    })
}

/// [`clipped_adapter_gradient_sum`] by a loop over units: each unit's sequences run one at a
/// time, unpadded, through an ordinary forward and backward; the unit's gradient is clipped and
/// added. Slow; for the tests.
pub fn clipped_adapter_gradient_sum_reference(
    model: &dyn AdapterModel,
    batch: &SequenceBatch,
    clip: f64,
) -> Result<AdapterClippedSum, TrainError> {
    batch.check()?;
    let parameters = model.adapter_parameters();
    let refs: Vec<&Tensor> = parameters.iter().collect();
    let mut flat: Option<Tensor> = None;
    let mut norms = Vec::with_capacity(batch.n_units);
    let mut loss_sum = 0.0;
    for unit in 0..batch.n_units as i64 {
        let mut unit_grads: Option<Vec<Tensor>> = None;
        for (s, _) in batch.units.iter().enumerate().filter(|(_, u)| **u == unit) {
            let one = batch.unpadded(s as i64).map_err(torch("unpadding"))?;
            let loss = model
                .sequence_losses(&one, true)?
                .f_sum(Kind::Double)
                .map_err(torch("reference loss"))?;
            loss_sum += loss.f_double_value(&[]).map_err(torch("reference loss"))?;
            let grads = Tensor::f_run_backward(&[&loss], &refs, false, false)
                .map_err(torch("reference backward"))?;
            unit_grads = Some(match unit_grads {
                None => grads,
                Some(previous) => previous
                    .iter()
                    .zip(&grads)
                    .map(|(a, b)| a.f_add(b))
                    .collect::<Result<_, _>>()
                    .map_err(torch("reference sum"))?,
            });
        }
        let Some(grads) = unit_grads else {
            norms.push(0.0);
            continue;
        };
        let unit_flat = Tensor::f_cat(
            &grads
                .iter()
                .map(|g| g.f_reshape([-1]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(torch("reference flatten"))?,
            0,
        )
        .map_err(torch("reference flatten"))?;
        let norm = unit_flat
            .f_norm()
            .and_then(|n| n.f_double_value(&[]))
            .map_err(torch("reference norm"))?;
        norms.push(norm);
        let factor = (clip / norm).min(1.0);
        let clipped = unit_flat
            .f_mul_scalar(factor)
            .map_err(torch("reference clip"))?;
        flat = Some(match flat {
            None => clipped,
            Some(f) => f.f_add(&clipped).map_err(torch("reference sum"))?,
        });
    }
    let flat = flat.ok_or_else(|| invalid("an empty batch".into()))?;
    Ok(AdapterClippedSum {
        parameters,
        flat,
        norms: Tensor::f_from_slice(&norms).map_err(torch("reference norms"))?,
        loss_sum,
    })
}

/// Turns a sequence batch into adapter gradients: the seam of [`crate::train::GradientStep`]
/// for sequence batches (whose inputs are token windows grouped by privacy unit, not a table's
/// rows), with the same contract on `.grad`.
pub trait AdapterGradientStep {
    /// Leaves in each adapter tensor's `.grad` the gradient to step along; returns the mean loss
    /// per sequence, for reporting. `expected_units` normalises the step (the Poisson sampler's
    /// expected batch size, in units).
    fn compute_gradients(
        &mut self,
        model: &dyn AdapterModel,
        batch: &SequenceBatch,
        expected_units: usize,
    ) -> Result<f64, TrainError>;

    /// As [`crate::train::GradientStep::overwrites_gradients`].
    fn overwrites_gradients(&self) -> bool {
        false
    }
}

/// Back-propagates the batch's summed loss over the expected units: non-private training.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainAdapterGradient;

impl AdapterGradientStep for PlainAdapterGradient {
    fn compute_gradients(
        &mut self,
        model: &dyn AdapterModel,
        batch: &SequenceBatch,
        expected_units: usize,
    ) -> Result<f64, TrainError> {
        batch.check()?;
        let losses = model.sequence_losses(batch, true)?;
        let loss = losses
            .f_sum(losses.kind())
            .and_then(|l| l.f_div_scalar(expected_units.max(1) as f64))
            .map_err(torch("loss"))?;
        loss.f_backward().map_err(torch("backward pass"))?;
        let sum = losses
            .f_sum(Kind::Double)
            .and_then(|l| l.f_double_value(&[]))
            .map_err(torch("reading the loss"))?;
        Ok(sum / batch.sequences().max(1) as f64)
    }
}

/// DP-SGD on the adapters: per-unit clipping (module documentation), then the release of
/// [`DpSgdStep`] (grid rounding, exact discrete Gaussian noise, division by the expected batch).
#[derive(Debug)]
pub struct DpAdapterStep {
    clip: f64,
    release: DpSgdStep,
    units_per_chunk: usize,
}

impl DpAdapterStep {
    /// `release` carries the plan's noise and granularity; `clip` is the plan's C. The whole
    /// batch is clipped at once; see [`DpAdapterStep::with_units_per_chunk`].
    pub fn new(clip: f64, release: DpSgdStep) -> Self {
        DpAdapterStep {
            clip,
            release,
            units_per_chunk: usize::MAX,
        }
    }

    /// Clips at most `units` units at a time ([`clipped_adapter_gradient_sum_chunked`]): the
    /// same release, a lower peak memory.
    pub fn with_units_per_chunk(mut self, units: usize) -> Self {
        self.units_per_chunk = units.max(1);
        self
    }

    /// Steps released (each a noised sum): what the ledger must record.
    pub fn steps_taken(&self) -> u64 {
        self.release.steps_taken()
    }

    /// Where the last release's noise was drawn (the GPU for adapters on CUDA): the choice of
    /// [`DpSgdStep`]'s one seam, `crate::dp::NoiseDevice`.
    pub fn noise_device(&self) -> Option<crate::dp::NoiseDevice> {
        self.release.noise_device()
    }
}

impl AdapterGradientStep for DpAdapterStep {
    fn overwrites_gradients(&self) -> bool {
        true
    }

    fn compute_gradients(
        &mut self,
        model: &dyn AdapterModel,
        batch: &SequenceBatch,
        expected_units: usize,
    ) -> Result<f64, TrainError> {
        let sequences = batch.sequences();
        let (parameters, flat, loss_sum) = if sequences > 0 {
            let sum = clipped_adapter_gradient_sum_chunked(
                model,
                batch,
                self.clip,
                self.units_per_chunk,
            )?;
            if tracing::enabled!(tracing::Level::DEBUG) {
                // The per-unit gradient norms against C: how much clipping shapes the step
                // (choosing C, the notes demo's schedule).
                let norms =
                    Vec::<f64>::try_from(sum.norms.to_kind(tch::Kind::Double)).unwrap_or_default();
                if !norms.is_empty() {
                    let mut sorted = norms.clone();
                    sorted.sort_by(f64::total_cmp);
                    let clipped = norms.iter().filter(|n| **n > self.clip).count();
                    tracing::debug!(
                        units = norms.len(),
                        median_norm = sorted[sorted.len() / 2],
                        max_norm = sorted[sorted.len() - 1],
                        clip = self.clip,
                        clipped,
                        "per-unit adapter gradient norms"
                    );
                }
            }
            (sum.parameters, sum.flat, sum.loss_sum)
        } else {
            // An empty Poisson batch: the release is noise alone.
            let parameters = model.adapter_parameters();
            let numel: i64 = parameters.iter().map(|p| p.numel() as i64).sum();
            let first = parameters
                .first()
                .ok_or_else(|| invalid("the model has no adapter tensors".into()))?;
            let flat =
                Tensor::f_zeros([numel], (first.kind(), first.device())).map_err(torch("zeros"))?;
            (parameters, flat, 0.0)
        };
        self.release
            .release_into_gradients(&parameters, flat, expected_units)?;
        Ok(loss_sum / sequences.max(1) as f64)
    }
}
