//! Embedding: the mark added to each tensor, streamed from one safetensors file to a sink.

use std::path::Path;

use super::{MarkKey, Strength, WatermarkError, marks_shape, mean_std};
use crate::checkpoint::{from_f32, to_f32};
use crate::stream::{SafetensorsFileSource, StreamDigest, TensorSink, TensorSource};
use crate::tensor::Manifest;

/// What an embedding did.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbedReport {
    /// The amplitude used, relative to each tensor's standard deviation.
    pub amplitude: f64,
    /// Tensors marked.
    pub tensors: usize,
    /// Values of the marked tensors.
    pub values: u64,
    /// The z-score a clean copy is expected to show, `amplitude · √values`.
    pub expected_z: f64,
}

/// The amplitude that reaches `strength.target_z` over `marked_values` values, capped.
pub fn plan_amplitude(strength: Strength, marked_values: u64) -> f64 {
    if marked_values == 0 {
        return 0.0;
    }
    (strength.target_z / (marked_values as f64).sqrt()).min(strength.max_amplitude)
}

/// Adds `amplitude · σ · p_i` to `values` (a tensor of shape `shape`, row-major). Returns
/// whether it did: a tensor with no spread (all values equal) or a non-finite one is left as it
/// is, since it has no scale to set the mark's size by.
pub fn embed_tensor(mark: &MarkKey, shape: &[usize], values: &mut [f32], amplitude: f64) -> bool {
    if !marks_shape(shape) || amplitude <= 0.0 {
        return false;
    }
    let (_, std) = mean_std(values);
    if !(std.is_finite() && std > 0.0) {
        return false;
    }
    let step = (amplitude * std) as f32;
    let mut pattern = mark.pattern(shape);
    for v in values.iter_mut() {
        *v += step * pattern.next_sign();
    }
    true
}

/// Removes the mark [`embed_tensor`] added with this `mark` and `amplitude`, giving back the
/// unmarked tensor up to the float rounding of the stored values. Returns whether it did.
///
/// Why it is needed: the registry's *published* model is marked, and a model aligned to a
/// marked reference picks up the mark's pattern (the alignment chooses, among many
/// permutations, the one that best matches the reference, pattern included), which breaks the
/// null hypothesis; aligning to the unmarked weights does not ([`super::align`]). The
/// embedding added `a·σ·p` with `σ` the *unmarked* spread, so `σ` is solved from the marked
/// tensor: with `c = a·σ`, `Var(w′) = σ² + 2c·Cov(w, p) + c²·Var(p)` and
/// `Cov(w′, p) = Cov(w, p) + c·Var(p)`, hence `(1 − a²·Var(p))·σ² + 2a·Cov(w′, p)·σ − Var(w′) = 0`.
pub fn unmark_tensor(mark: &MarkKey, shape: &[usize], values: &mut [f32], amplitude: f64) -> bool {
    if !marks_shape(shape) || amplitude <= 0.0 || values.is_empty() {
        return false;
    }
    let (mean, marked_std) = mean_std(values);
    if !(marked_std.is_finite() && marked_std > 0.0) {
        return false;
    }
    let mut pattern = mark.pattern(shape);
    let signs: Vec<f32> = (0..values.len()).map(|_| pattern.next_sign()).collect();
    let n = values.len() as f64;
    let sign_mean = signs.iter().map(|&s| f64::from(s)).sum::<f64>() / n;
    let sign_var = 1.0 - sign_mean * sign_mean;
    let cov = values
        .iter()
        .zip(&signs)
        .map(|(&v, &s)| (f64::from(v) - mean) * (f64::from(s) - sign_mean))
        .sum::<f64>()
        / n;
    let qa = 1.0 - amplitude * amplitude * sign_var;
    let qb = 2.0 * amplitude * cov;
    let disc = qb * qb + 4.0 * qa * marked_std * marked_std;
    if !(qa > 0.0 && disc.is_finite()) {
        return false;
    }
    let std = (-qb + disc.sqrt()) / (2.0 * qa);
    if !(std.is_finite() && std > 0.0) {
        return false;
    }
    let step = (amplitude * std) as f32;
    for (v, s) in values.iter_mut().zip(signs) {
        *v -= step * s;
    }
    true
}

/// Whether the stream carries tensor `i` of `manifest` as a float the mark goes into.
fn marked(manifest: &Manifest, i: usize) -> bool {
    let spec = &manifest.tensors()[i];
    let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
    to_f32(spec.dtype.to_safetensors(), &[]).is_some() && marks_shape(&shape)
}

/// Copies the safetensors model at `input` into `sink` with the mark embedded, one tensor in
/// memory at a time, and commits the sink under the output's stream digest (the model id the
/// coordinator names models by). Same tensors, order, dtypes and metadata as the input.
pub fn embed_stream<S: TensorSink>(
    input: &Path,
    mut sink: S,
    mark: &MarkKey,
    strength: Strength,
) -> Result<(S::Output, [u8; 32], EmbedReport), WatermarkError> {
    let mut source = SafetensorsFileSource::open(input)?;
    let manifest = source.manifest().clone();
    let marked_values: u64 = (0..manifest.len())
        .filter(|&i| marked(&manifest, i))
        .filter_map(|i| manifest.tensors()[i].numel())
        .sum();
    let amplitude = plan_amplitude(strength, marked_values);
    sink.begin(&manifest)?;
    let mut digest = StreamDigest::new(&manifest);
    let mut report = EmbedReport {
        amplitude,
        tensors: 0,
        values: 0,
        expected_z: 0.0,
    };
    for i in 0..manifest.len() {
        let spec = &manifest.tensors()[i];
        let len = manifest.byte_len(i) as usize;
        let bytes = source
            .read_chunk(len)
            .map_err(crate::stream::StreamError::Source)?;
        if bytes.len() != len {
            return Err(WatermarkError::Tensor {
                name: spec.name.clone(),
                reason: format!("the file ends after {} of its {len} bytes", bytes.len()),
            });
        }
        let out = if marked(&manifest, i) {
            let dtype = spec.dtype.to_safetensors();
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
            let mut values = to_f32(dtype, &bytes).unwrap_or_default();
            if embed_tensor(mark, &shape, &mut values, amplitude) {
                report.tensors += 1;
                report.values += values.len() as u64;
            }
            from_f32(dtype, &values).unwrap_or_else(|| bytes.to_vec())
        } else {
            bytes.to_vec()
        };
        digest.update(&out);
        sink.write(i, 0, &out)?;
    }
    report.expected_z = amplitude * (report.values as f64).sqrt();
    let digest = digest.finish();
    let output = sink.commit(&digest)?;
    Ok((output, digest, report))
}
