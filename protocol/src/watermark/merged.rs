//! Detection on a merged checkpoint: a LoRA job's mark, found after its published adapter was
//! merged into the base (`tutela model merge`, or PEFT's `merge_and_unload`) and the full
//! checkpoint passed on.
//!
//! # Why detect in the adapter's subspace, against the job's base
//!
//! Under FFA-LoRA a job publishes its adapters' `B` (`[out, r]` per module), and the coordinator
//! marks those ([`super::embed_stream`]: `B' = B + a·σ_B·P`). Merging writes, for each adapted
//! module, `W' = W + s·B'·A`, where `W` is the base's weight, `s = alpha / r`, and `A`
//! (`[r, in]`) is the frozen factor every site derives from the job's seed
//! ([`init_lora_a`]). Both `W` and `A` are known to the consortium: the job names its base by
//! digest (`model.base_sha256`, checked here), and `A` is a function of the job's seed and the
//! module's path. So the mark is recovered exactly:
//!
//! `B' = (W' − W)·A⁺ / s`, with `A⁺ = Aᵀ(A·Aᵀ)⁻¹` (`A` has full row rank `r ≤ in`; `A·Aᵀ` is
//! `r × r`, solved by Cholesky in f64),
//!
//! and the same statistic as on the published file runs on the recovered `B'` tensors (same
//! names, shapes and pattern). This keeps one mark and one test for the adapter and every
//! checkpoint made from it, instead of a second mark in the merged weights that the coordinator
//! could not embed (it never holds the merged model).
//!
//! **The null hypothesis still holds**: `W` and `A` depend on the job's base and seed, never on
//! the watermark key, so for a model made without the mark key (another adapter merged into the
//! same base, an unrelated model with the same layout) the recovered tensors are independent of
//! the key and Hoeffding's bound applies unchanged.
//!
//! **What an attacker's change costs the mark**: a change `E` to the merged weights reaches the
//! statistic only through `E·A⁺ / s`, its component in `A`'s `r`-dimensional row space (of the
//! `in` directions of each row, an `r / in` share of the energy of a change spread over all of
//! them: 1/8 for the demo's rank 8 on 64 inputs, 1/512 for rank 8 on a 4096-wide layer).
//! Noise, quantization error, pruning and fine-tuning of the whole model are mostly
//! orthogonal to it.
//!
//! Memory: one base tensor, one merged tensor and its `A` at a time (the recovered `B'` are the
//! adapter's size).

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::align::transpose;
use super::detect::{Reference, detect_tensors_marks, read_weights};
use super::{Detection, MarkKey, WatermarkError};
use crate::checkpoint::{SafetensorsReader, to_f32};
use crate::checkpoint_digest::checkpoint_digest_of_dir;
use crate::lora::{LoraSpec, init_lora_a, lora_b_name};

/// One module's `B` recovered from a merged checkpoint, under the adapter's PEFT name.
#[derive(Clone, Debug, PartialEq)]
pub struct RecoveredAdapter {
    pub name: String,
    /// `[out, r]`.
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The adapters recovered from a merged checkpoint, and the adapted modules of the base the
/// suspect file lacks (dropped, or renamed and changed past recognition), which therefore add
/// nothing to the test.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergedRecovery {
    pub adapters: Vec<RecoveredAdapter>,
    pub missing: Vec<String>,
    /// Modules found by content under another name: (the base's name, the suspect's).
    pub by_content: Vec<(String, String)>,
}

fn base_error(dir: &Path, reason: String) -> WatermarkError {
    WatermarkError::Base {
        dir: dir.display().to_string(),
        reason,
    }
}

/// The weights file of the base checkpoint in `dir` (`config.json`, `model.safetensors`) after
/// checking its digest against the job's `model.base_sha256`: a merged model is tested only
/// against the base the job named.
pub fn job_base_weights(dir: &Path, base_sha256: Option<&str>) -> Result<PathBuf, WatermarkError> {
    let expected = base_sha256.ok_or_else(|| {
        base_error(
            dir,
            "the job names no model.base_sha256, so it made no adapter of a base".into(),
        )
    })?;
    let found = checkpoint_digest_of_dir(dir).map_err(|e| base_error(dir, e.to_string()))?;
    if found != expected {
        return Err(base_error(
            dir,
            format!("its digest is {found}, but the job's model.base_sha256 is {expected}"),
        ));
    }
    Ok(dir.join(crate::checkpoint_digest::WEIGHTS_FILE))
}

/// In-place Cholesky factorization of the symmetric positive definite `r × r` matrix `g`
/// (row-major; the lower triangle is overwritten with `L`, `g = L·Lᵀ`). `None` when it is not
/// positive definite.
fn cholesky(g: &mut [f64], r: usize) -> Option<()> {
    for j in 0..r {
        let mut d = g[j * r + j];
        for k in 0..j {
            d -= g[j * r + k] * g[j * r + k];
        }
        if !(d.is_finite() && d > 0.0) {
            return None;
        }
        let d = d.sqrt();
        g[j * r + j] = d;
        for i in j + 1..r {
            let mut v = g[i * r + j];
            for k in 0..j {
                v -= g[i * r + k] * g[j * r + k];
            }
            g[i * r + j] = v / d;
        }
    }
    Some(())
}

/// Solves `L·Lᵀ·x = b` in place (`l` from [`cholesky`]).
fn cholesky_solve(l: &[f64], r: usize, b: &mut [f64]) {
    for i in 0..r {
        let mut v = b[i];
        for k in 0..i {
            v -= l[i * r + k] * b[k];
        }
        b[i] = v / l[i * r + i];
    }
    for i in (0..r).rev() {
        let mut v = b[i];
        for k in i + 1..r {
            v -= l[k * r + i] * b[k];
        }
        b[i] = v / l[i * r + i];
    }
}

/// `(merged − base)·A⁺ / scaling` for one `[out, in]` module with `a` its `[rank, in]` factor.
/// `None` when `A·Aᵀ` is singular (rank above `in`).
pub fn recover_b(
    merged: &[f32],
    base: &[f32],
    a: &[f32],
    out: usize,
    rank: usize,
    input: usize,
    scaling: f64,
) -> Option<Vec<f32>> {
    let mut gram = vec![0f64; rank * rank];
    for i in 0..rank {
        for j in 0..=i {
            let ai = &a[i * input..(i + 1) * input];
            let aj = &a[j * input..(j + 1) * input];
            let v: f64 = ai
                .iter()
                .zip(aj)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            gram[i * rank + j] = v;
            gram[j * rank + i] = v;
        }
    }
    cholesky(&mut gram, rank)?;
    let mut b = Vec::with_capacity(out * rank);
    let mut row = vec![0f64; rank];
    let mut delta = vec![0f64; input];
    for o in 0..out {
        for ((d, &m), &w) in delta
            .iter_mut()
            .zip(&merged[o * input..(o + 1) * input])
            .zip(&base[o * input..(o + 1) * input])
        {
            *d = f64::from(m) - f64::from(w);
        }
        for (k, slot) in row.iter_mut().enumerate() {
            *slot = delta
                .iter()
                .zip(&a[k * input..(k + 1) * input])
                .map(|(&d, &x)| d * f64::from(x))
                .sum();
        }
        cholesky_solve(&gram, rank, &mut row);
        b.extend(row.iter().map(|&v| (v / scaling) as f32));
    }
    Some(b)
}

/// A merged tensor is taken for a base module by content only when it is this close to the
/// base's weight (`‖W′ − W‖ / ‖W‖`): a merge moves a module by its small low-rank update,
/// while any other module of the same shape is about `√2` away (independent weights of one
/// scale).
pub const MAX_CONTENT_DISTANCE: f64 = 0.5;

/// One adapted module of the base: its weight's name, module path and `[out, in]`.
struct Module {
    name: String,
    path: String,
    out: usize,
    input: usize,
}

/// Where a module's merged weight is in the suspect file: the tensor's name, and whether it is
/// stored transposed (`[in, out]`).
struct Found {
    name: String,
    transposed: bool,
}

fn usable(info: &safetensors::tensor::TensorInfo) -> bool {
    info.shape.len() == 2 && (to_f32(info.dtype, &[]).is_some() || info.dtype == Dtype::I8)
}

/// The suspect tensor, not yet taken, whose content is nearest the base weight `w` (`[out,
/// in]`), as it is or transposed, if within [`MAX_CONTENT_DISTANCE`]. Reads one candidate at a
/// time.
fn find_by_content(
    suspect: &mut SafetensorsReader,
    taken: &std::collections::HashSet<String>,
    w: &[f32],
    out: usize,
    input: usize,
) -> Result<Option<Found>, WatermarkError> {
    let norm = w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return Ok(None);
    }
    let mut best: Option<(f64, Found)> = None;
    for name in super::detect::weight_names(suspect) {
        if taken.contains(&name) {
            continue;
        }
        let Some(info) = suspect.info(&name) else {
            continue;
        };
        if !usable(info) {
            continue;
        }
        let shape = info.shape.clone();
        let as_is = shape == [out, input];
        let flipped = shape == [input, out];
        if !as_is && !flipped {
            continue;
        }
        let values = read_weights(suspect, &name)?;
        let distance = |v: &[f32]| {
            v.iter()
                .zip(w)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum::<f64>()
                .sqrt()
                / norm
        };
        let mut consider = |d: f64, transposed: bool| {
            if d.is_finite() && best.as_ref().is_none_or(|(b, _)| d < *b) {
                best = Some((
                    d,
                    Found {
                        name: name.clone(),
                        transposed,
                    },
                ));
            }
        };
        if as_is {
            consider(distance(&values), false);
        }
        if flipped {
            consider(distance(&transpose(&values, input, out)), true);
        }
    }
    Ok(best
        .filter(|(d, _)| *d <= MAX_CONTENT_DISTANCE)
        .map(|(_, found)| found))
}

/// Recovers every adapted module's `B` from the merged checkpoint `merged` (a safetensors file,
/// or an INT8 export of one) against the base weights `base` (a file checked with
/// [`job_base_weights`]), for the job's `[lora]` and `seed`. The adapted modules are the base's
/// 2-D floating `X.weight` tensors whose module path `X` the job targets, as the site's decoder
/// adapts them. The suspect's tensors are found by the same name; a module whose name the
/// suspect lacks (renamed: another naming scheme, a prefix stripped) is found by content, the
/// suspect tensor of its shape (or transposed) nearest the base's weight, within
/// [`MAX_CONTENT_DISTANCE`] ([`MergedRecovery::by_content`]). That choice depends on the
/// suspect and the base only, never on the key, so the null is unchanged.
pub fn recover_adapters(
    merged: &Path,
    base: &Path,
    lora: &LoraSpec,
    seed: u64,
) -> Result<MergedRecovery, WatermarkError> {
    let mut base_reader = SafetensorsReader::open(base)?;
    let mut suspect = SafetensorsReader::open(merged)?;
    let rank = lora.rank as usize;
    let mut recovery = MergedRecovery::default();
    let mut modules = Vec::new();
    for name in base_reader.names() {
        let Some(info) = base_reader.info(&name).cloned() else {
            continue;
        };
        let Some(path) = name.strip_suffix(".weight") else {
            continue;
        };
        if info.shape.len() != 2 || to_f32(info.dtype, &[]).is_none() || !lora.targets(path) {
            continue;
        }
        modules.push(Module {
            path: path.to_string(),
            name: name.clone(),
            out: info.shape[0],
            input: info.shape[1],
        });
    }
    // By name first, so that a content match never takes a tensor its own module names.
    let mut taken = std::collections::HashSet::new();
    let mut located: Vec<Option<Found>> = modules
        .iter()
        .map(|m| {
            let fits = suspect
                .info(&m.name)
                .is_some_and(|s| usable(s) && s.shape == [m.out, m.input]);
            fits.then(|| {
                taken.insert(m.name.clone());
                Found {
                    name: m.name.clone(),
                    transposed: false,
                }
            })
        })
        .collect();
    for (m, place) in modules.iter().zip(located.iter_mut()) {
        if place.is_some() {
            continue;
        }
        let w = base_reader.read_f32(&m.name)?.1;
        *place = find_by_content(&mut suspect, &taken, &w, m.out, m.input)?;
        if let Some(found) = place {
            taken.insert(found.name.clone());
            recovery
                .by_content
                .push((m.name.clone(), found.name.clone()));
        }
    }
    for (m, place) in modules.into_iter().zip(located) {
        let Some(found) = place else {
            recovery.missing.push(m.name);
            continue;
        };
        let (out, input) = (m.out, m.input);
        let w = base_reader.read_f32(&m.name)?.1;
        let mut w_merged = read_weights(&mut suspect, &found.name)?;
        if found.transposed {
            w_merged = transpose(&w_merged, input, out);
        }
        let a = init_lora_a(seed, &m.path, rank, input);
        let values =
            recover_b(&w_merged, &w, &a, out, rank, input, lora.scaling()).ok_or_else(|| {
                WatermarkError::Tensor {
                    name: m.name.clone(),
                    reason: format!(
                        "the adapter's rank {rank} exceeds the module's {input} inputs: its A·Aᵀ \
                     is singular and B cannot be recovered"
                    ),
                }
            })?;
        recovery.adapters.push(RecoveredAdapter {
            name: lora_b_name(&m.path),
            shape: vec![out, rank],
            values,
        });
    }
    Ok(recovery)
}

/// Tests the merged checkpoint `merged` against each mark key in `marks`, on the adapters
/// recovered with [`recover_adapters`], informed by `reference` (the job's unmarked adapter)
/// when given: one [`Detection`] per key, in order, and the recovery.
pub fn detect_merged_marks(
    merged: &Path,
    base: &Path,
    lora: &LoraSpec,
    seed: u64,
    reference: Option<&mut Reference>,
    marks: &[MarkKey],
) -> Result<(Vec<Detection>, MergedRecovery), WatermarkError> {
    let mut recovery = recover_adapters(merged, base, lora, seed)?;
    if let Some(reference) = reference {
        for r in &mut recovery.adapters {
            reference.subtract(&r.name, &r.shape, &mut r.values)?;
        }
    }
    let detections = detect_tensors_marks(
        marks,
        recovery
            .adapters
            .iter()
            .map(|r| (r.shape.as_slice(), r.values.as_slice())),
    );
    Ok((detections, recovery))
}
