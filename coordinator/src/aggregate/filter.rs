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

/// Where an update's next chunk must start, and the bytes of an f32 element split across two
/// chunks: the one chunk walk every aggregation that reads values shares (the streaming sum and
/// the buffered spools lay values out in the manifest's order, so they check it, as the decoder
/// does).
#[derive(Clone, Copy, Debug, Default)]
pub struct ElementCursor {
    tensor: usize,
    byte: u64,
    carry: [u8; 4],
    carry_len: usize,
}

impl ElementCursor {
    /// Whether a partial element is still waiting for its last bytes (an update that ends so
    /// is short).
    pub fn has_partial_element(&self) -> bool {
        self.carry_len != 0
    }

    /// Takes chunk `data` of tensor `tensor_index` at byte `offset`, which must be the next
    /// bytes of the update in the manifest's order (`tensors` and their element counts `lens`,
    /// f32 each), and hands `whole(tensor, first_element, bytes)` the whole little-endian
    /// elements it completes, in order; a split element's bytes wait for the next chunk.
    pub fn feed(
        &mut self,
        (tensors, lens): (&[TensorSpec], &[usize]),
        (tensor_index, offset, data): (usize, u64, &[u8]),
        mut whole: impl FnMut(usize, usize, &[u8]) -> Result<(), tutela_protocol::stream::SinkError>,
    ) -> Result<(), tutela_protocol::stream::SinkError> {
        let other = |msg: String| -> tutela_protocol::stream::SinkError {
            std::io::Error::other(msg).into()
        };
        while self.tensor < lens.len() && self.byte == lens[self.tensor] as u64 * 4 {
            self.tensor += 1;
            self.byte = 0;
        }
        if tensor_index != self.tensor || offset != self.byte {
            return Err(other(format!(
                "chunk for tensor #{tensor_index} at byte {offset} arrived where tensor #{} at byte {} was expected",
                self.tensor, self.byte
            )));
        }
        let tensor_bytes = lens[tensor_index] as u64 * 4;
        let end = offset + data.len() as u64;
        if end > tensor_bytes {
            return Err(other(format!(
                "chunk ends at byte {end}, past the {tensor_bytes} bytes of tensor {:?}",
                tensors[tensor_index].name
            )));
        }
        // Index of the element the carried bytes (or, without any, the chunk) start.
        let mut next = ((offset - self.carry_len as u64) / 4) as usize;
        let mut data = data;
        if self.carry_len > 0 {
            let take = (4 - self.carry_len).min(data.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&data[..take]);
            self.carry_len += take;
            data = &data[take..];
            if self.carry_len == 4 {
                self.carry_len = 0;
                let element = self.carry;
                whole(tensor_index, next, &element)?;
                next += 1;
            }
        }
        let whole_len = data.len() / 4 * 4;
        whole(tensor_index, next, &data[..whole_len])?;
        let tail = &data[whole_len..];
        self.carry[self.carry_len..self.carry_len + tail.len()].copy_from_slice(tail);
        self.carry_len += tail.len();
        self.byte = end;
        Ok(())
    }
}
