//! The coordinator's side of the update filters (the trait and [`FiniteValues`] are
//! `tutela_protocol::update_filter`'s, shared with the site node): the round's [`NormBound`],
//! last in every aggregation's chain, and the checks every aggregation runs at an update's
//! manifest (tensors, weight).

use super::tiled::{decode_le, sum_of_squares, sum_of_squares_le};
use tutela_protocol::tensor::{Manifest, TensorSpec};
pub use tutela_protocol::update_filter::{
    FilterPass, FiniteValues, Refusal, UpdateFilter, UpdateInfo, ValuesAt, not_finite,
};

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
pub fn update_weight(
    from: WeightFrom,
    manifest: &Manifest,
    max_weight: f64,
) -> Result<f64, String> {
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
