//! Update filters: the one meaning of "a stage an update passes before it is combined", shared
//! by the site node (before an update leaves the site: DP clipping and noise, masking) and the
//! coordinator (before an update reaches a round's aggregation: validation, central DP's clip,
//! the round's norm bound).
//!
//! A filter sees an update's values in order, a run of at most one block of one tensor at a
//! time, and may rewrite them in place; it never needs the whole update in memory, so the
//! coordinator runs it on a stream as it arrives. An update already in memory (the site's) goes
//! through the same chain with [`filter_in_memory`]. Once every value was seen, a pass may also
//! ask for the whole update to be scaled ([`FilterPass::fold_factor`]: a clip, which needs the
//! norm first).

use std::sync::Arc;

use crate::tensor::{DType, Manifest, TensorSpec};

/// Values per run handed to a filter by [`filter_in_memory`] (the coordinator's aggregations
/// use the same size: 256 KiB of f32, which stays in the L2 cache).
pub const FILTER_BLOCK: usize = 1 << 16;

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
    /// Sees, in stream order and in runs of at most [`FILTER_BLOCK`] values of one tensor, every value
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
pub fn not_finite(at: &ValuesAt<'_>, values: &[f32]) -> Refusal {
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

/// Runs `filters` over an update held in memory (`tensors`: names, shapes and little-endian
/// bytes), every F32 tensor in runs of at most [`FILTER_BLOCK`] values, as an aggregation does
/// over a stream; then, if the passes ask for it, scales every F32 value by their combined
/// [`FilterPass::fold_factor`] at the update's L2 norm after the filters. Tensors of another
/// dtype are left alone (updates are F32 deltas; the coordinator refuses any other).
pub fn filter_in_memory(
    filters: &[Arc<dyn UpdateFilter>],
    info: &UpdateInfo<'_>,
    tensors: &mut [(TensorSpec, Vec<u8>)],
) -> Result<(), Refusal> {
    if filters.is_empty() {
        return Ok(());
    }
    let mut passes = filters
        .iter()
        .map(|f| f.start(info))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sum_sq = 0.0f64;
    let mut values = Vec::with_capacity(FILTER_BLOCK);
    for (index, (spec, bytes)) in tensors.iter_mut().enumerate() {
        if spec.dtype != DType::F32 {
            continue;
        }
        for (run, chunk) in bytes.chunks_mut(FILTER_BLOCK * 4).enumerate() {
            values.clear();
            values.extend(
                chunk
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            let at = ValuesAt {
                tensor_index: index,
                tensor: spec,
                first_element: (run * FILTER_BLOCK) as u64,
            };
            for pass in &mut passes {
                pass.values(&at, &mut values)?;
            }
            sum_sq += values
                .iter()
                .map(|v| f64::from(*v) * f64::from(*v))
                .sum::<f64>();
            for (c, v) in chunk.chunks_exact_mut(4).zip(&values) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    for pass in &mut passes {
        pass.end()?;
    }
    let norm = sum_sq.sqrt();
    let factor = passes
        .iter_mut()
        .map(|p| p.fold_factor(norm))
        .fold(1.0, |f, g| f * g);
    if factor != 1.0 {
        let factor = factor as f32;
        for (spec, bytes) in tensors.iter_mut() {
            if spec.dtype != DType::F32 {
                continue;
            }
            for c in bytes.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * factor;
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// The manifest an in-memory update would be streamed with (no metadata), for [`UpdateInfo`].
pub fn manifest_of(
    tensors: &[(TensorSpec, Vec<u8>)],
) -> Result<Manifest, crate::tensor::ManifestError> {
    Manifest::new(
        tensors.iter().map(|(s, _)| s.clone()).collect(),
        Default::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Negates every value, and at the end halves the update if its norm is over 1.
    struct NegateAndClip;

    impl UpdateFilter for NegateAndClip {
        fn name(&self) -> &str {
            "negate-and-clip"
        }
        fn start(&self, _: &UpdateInfo<'_>) -> Result<Box<dyn FilterPass>, Refusal> {
            Ok(Box::new(NegateAndClip))
        }
    }

    impl FilterPass for NegateAndClip {
        fn values(&mut self, _: &ValuesAt<'_>, values: &mut [f32]) -> Result<(), Refusal> {
            for v in values {
                *v = -*v;
            }
            Ok(())
        }
        fn fold_factor(&mut self, l2_norm: f64) -> f64 {
            if l2_norm > 1.0 { 0.5 } else { 1.0 }
        }
    }

    fn update(values: &[f32]) -> Vec<(TensorSpec, Vec<u8>)> {
        vec![(
            TensorSpec::new("w", DType::F32, vec![values.len() as u64]),
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )]
    }

    fn values(t: &[(TensorSpec, Vec<u8>)]) -> Vec<f32> {
        t[0].1
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn an_in_memory_update_goes_through_the_same_chain_in_blocks() {
        let n = FILTER_BLOCK + 3;
        let mut t = update(&vec![0.25; n]);
        let m = manifest_of(&t).unwrap();
        let info = UpdateInfo {
            site: "a",
            weight: 1.0,
            manifest: &m,
        };
        let filters: Vec<Arc<dyn UpdateFilter>> =
            vec![Arc::new(FiniteValues), Arc::new(NegateAndClip)];
        filter_in_memory(&filters, &info, &mut t).unwrap();
        // Negated, then halved: the norm (0.25 · √n) is over 1.
        assert!(values(&t).iter().all(|v| *v == -0.125));

        let mut bad = update(&vec![0.0; n]);
        let mut raw = values(&bad);
        raw[FILTER_BLOCK + 1] = f32::NAN;
        bad = update(&raw);
        let why = filter_in_memory(&filters, &info, &mut bad).unwrap_err();
        assert!(
            why.0
                .contains(&format!("\"w\" element {}", FILTER_BLOCK + 1)),
            "{why}"
        );
    }
}
