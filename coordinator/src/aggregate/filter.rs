//! Update filters: the stages every update passes, value by value, before it is aggregated.
//!
//! The same chain runs in every aggregation (`super::RoundAggregation`): validate
//! ([`FiniteValues`]), then the job's filters (central DP's clip, ...), last the round's
//! [`NormBound`]. A filter sees the update in stream order, a block at a time, and never holds a
//! whole update.

use super::tiled::{decode_le, sum_of_squares, sum_of_squares_le};
use tutela_protocol::tensor::{Manifest, TensorSpec};

/// An update's refusal by a filter: the reason is sent to the site.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Refusal {
    pub fn new(reason: impl Into<String>) -> Self {
        Refusal(reason.into())
    }
}

/// What a filter knows about the update it starts on.
#[derive(Clone, Copy, Debug)]
pub struct UpdateInfo<'a> {
    pub site: &'a str,
    pub weight: f64,
    /// The update's manifest; its tensors already match the global model's.
    pub manifest: &'a Manifest,
}

/// Where a run of values handed to a filter sits in the update.
#[derive(Clone, Copy, Debug)]
pub struct ValuesAt<'a> {
    pub tensor_index: usize,
    pub tensor: &'a TensorSpec,
    /// Flat (row-major) index within the tensor of the first value.
    pub first_element: u64,
}

/// One stage every update passes through before it is folded: validate, clip, noise, mask.
///
/// A filter is shared by the round; [`UpdateFilter::start`] makes the per-update state (a running
/// norm, a noise generator, a mask stream) that sees the update's values.
pub trait UpdateFilter: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &str;
    /// Starts on one update, or refuses it from its manifest and weight alone.
    fn start(&self, update: &UpdateInfo<'_>) -> Result<Box<dyn FilterPass>, Refusal>;
    /// Whether its passes look at (or rewrite) the values. A filter that only acts at the end
    /// (a clip, from the update's norm) says no, and an aggregation may then skip decoding the
    /// values for it.
    fn reads_values(&self) -> bool {
        true
    }
}

/// A filter's pass over one update.
pub trait FilterPass: Send {
    /// Sees, in stream order and in runs of at most [`BLOCK`] values of one tensor, every value
    /// of the update before it is folded, and may rewrite it in place: what is folded (and
    /// spooled for undo) is the slice after the last filter.
    fn values(&mut self, at: &ValuesAt<'_>, values: &mut [f32]) -> Result<(), Refusal>;
    /// Every value was seen and the stream's digest verified: the filter's last word.
    fn end(&mut self) -> Result<(), Refusal> {
        Ok(())
    }
    /// The factor the whole update is aggregated with, known once every value was seen and the
    /// update's L2 norm after all filters (`l2_norm`, the norm bound's) is: central DP's clip
    /// `min(1, C / l2_norm)`. 1 leaves the update as it is.
    fn fold_factor(&mut self, _l2_norm: f64) -> f64 {
        1.0
    }
}

/// Refuses an update holding a NaN or an infinity, naming the tensor and element.
#[derive(Clone, Copy, Debug, Default)]
pub struct FiniteValues;

impl UpdateFilter for FiniteValues {
    fn name(&self) -> &str {
        "finite-values"
    }

    fn start(&self, _: &UpdateInfo<'_>) -> Result<Box<dyn FilterPass>, Refusal> {
        Ok(Box::new(FiniteValues))
    }
}

impl FilterPass for FiniteValues {
    fn values(&mut self, at: &ValuesAt<'_>, values: &mut [f32]) -> Result<(), Refusal> {
        // A branch-free scan of the exponent bits (all ones: ±inf or NaN) that the compiler
        // vectorises; the position is looked up only on refusal.
        let mut bad = 0u32;
        for v in values.iter() {
            bad |= u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
        if bad == 0 {
            return Ok(());
        }
        Err(not_finite(at, values))
    }
}

/// The refusal for a run holding a NaN or an infinity: names the first one.
fn not_finite(at: &ValuesAt<'_>, values: &[f32]) -> Refusal {
    let (i, v) = values
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .map_or((0, f32::NAN), |(i, v)| (i, *v));
    Refusal(format!(
        "tensor {:?} element {} is {v}: an update must hold finite numbers only",
        at.tensor.name,
        at.first_element + i as u64
    ))
}

/// Refuses an update as soon as its running L2 norm exceeds the bound.
#[derive(Clone, Copy, Debug)]
pub struct NormBound {
    pub bound: f64,
}

/// [`NormBound`]'s pass: the running sum of squares of the values seen.
#[derive(Clone, Copy, Debug)]
pub struct NormPass {
    bound: f64,
    sum_sq: f64,
}

impl NormPass {
    pub fn new(bound: f64) -> Self {
        NormPass { bound, sum_sq: 0.0 }
    }

    /// The L2 norm of the values seen so far.
    pub fn norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }
}

impl UpdateFilter for NormBound {
    fn name(&self) -> &str {
        "norm-bound"
    }

    fn start(&self, _: &UpdateInfo<'_>) -> Result<Box<dyn FilterPass>, Refusal> {
        Ok(Box::new(NormPass::new(self.bound)))
    }
}

impl NormPass {
    /// [`FilterPass::values`] on little-endian bytes, without decoding them first (the fast path
    /// of an upload that no other filter rewrites).
    pub fn values_le(&mut self, at: &ValuesAt<'_>, bytes: &[[u8; 4]]) -> Result<(), Refusal> {
        let before = self.sum_sq;
        self.sum_sq += sum_of_squares_le(bytes);
        if self.sum_sq <= self.bound * self.bound {
            return Ok(());
        }
        Err(self.refusal(before, at, &decode_le(bytes)))
    }

    /// Why the run of `values` that took the sum of squares from `before` to over the bound (or
    /// to a non-finite value) is refused.
    fn refusal(&self, before: f64, at: &ValuesAt<'_>, values: &[f32]) -> Refusal {
        // The square of any finite f32 is finite in f64, and so is any sum of them that fits in
        // memory: a sum that is not finite means a NaN or an infinity among the values. This
        // check alone refuses them when no other filter needs protecting from them.
        if !self.sum_sq.is_finite() {
            return not_finite(at, values);
        }
        // Find the element where the norm crossed the bound, for the site's benefit.
        let mut running = before;
        let mut at_element = values.len().saturating_sub(1);
        for (i, v) in values.iter().enumerate() {
            running += f64::from(*v) * f64::from(*v);
            if running > self.bound * self.bound {
                at_element = i;
                break;
            }
        }
        let position = format!(
            "tensor {:?} element {}",
            at.tensor.name,
            at.first_element + at_element as u64
        );
        Refusal(format!(
            "the update's L2 norm exceeds the round's bound of {}: it is already {} at {position}",
            self.bound,
            self.sum_sq.sqrt()
        ))
    }
}

impl FilterPass for NormPass {
    fn values(&mut self, at: &ValuesAt<'_>, values: &mut [f32]) -> Result<(), Refusal> {
        let before = self.sum_sq;
        self.sum_sq += sum_of_squares(values);
        if self.sum_sq <= self.bound * self.bound {
            return Ok(());
        }
        Err(self.refusal(before, at, values))
    }
}

/// Checks an update's tensors against the global model's (names, order, dtypes, shapes); the
/// reason names the first difference. Every aggregation runs it at the manifest, before a byte.
pub fn check_update_manifest(global: &[TensorSpec], m: &Manifest) -> Result<(), String> {
    let update = m.tensors();
    for (i, (g, u)) in global.iter().zip(update).enumerate() {
        if u.name != g.name {
            return Err(format!(
                "tensor #{i} is {:?} but the global model's tensor #{i} is {:?}: an update must have the global model's tensors, in its order",
                u.name, g.name
            ));
        }
        if u.dtype != g.dtype {
            return Err(format!(
                "tensor {:?} is {} but the global model's is {}: updates are F32 deltas",
                u.name, u.dtype, g.dtype
            ));
        }
        if u.shape != g.shape {
            return Err(format!(
                "tensor {:?} has shape {:?} but the global model's has shape {:?}",
                u.name, u.shape, g.shape
            ));
        }
    }
    if update.len() < global.len() {
        return Err(format!(
            "the update has {} tensors but the global model has {}: {:?} is missing",
            update.len(),
            global.len(),
            global[update.len()].name
        ));
    }
    if update.len() > global.len() {
        return Err(format!(
            "the update has {} tensors but the global model has {}: {:?} is not in the global model",
            update.len(),
            global.len(),
            update[global.len()].name
        ));
    }
    Ok(())
}

/// Where an update's weight comes from.
#[derive(Clone, Copy, Debug)]
pub enum WeightFrom {
    /// Given by the caller (the task router passes the sample count it read and checked).
    Fixed(f64),
    /// The sample count the manifest declares under [`super::SAMPLES_KEY`].
    Samples,
    /// One site, one unit of weight (central DP; the robust rules, which weigh sites equally).
    Unit,
}

/// The update's weight, refused unless positive, finite and at most `max_weight`.
pub fn update_weight(from: WeightFrom, manifest: &Manifest, max_weight: f64) -> Result<f64, String> {
    let w = match from {
        WeightFrom::Unit => return Ok(1.0),
        WeightFrom::Fixed(w) => w,
        WeightFrom::Samples => {
            let key = super::SAMPLES_KEY;
            let raw = manifest.metadata.get(key).ok_or_else(|| {
                format!(
                    "the update's manifest has no {key:?} metadata (the site's training sample count, its weight)"
                )
            })?;
            let n: u64 = raw
                .trim()
                .parse()
                .map_err(|_| format!("{key} is {raw:?}, not a whole number of samples"))?;
            n as f64
        }
    };
    if !(w.is_finite() && w > 0.0) {
        return Err(format!("the update's weight {w} is not a positive number"));
    }
    if w > max_weight {
        return Err(format!(
            "the update's weight {w} is over this round's max_weight of {max_weight} (the operator can raise it)"
        ));
    }
    Ok(w)
}
