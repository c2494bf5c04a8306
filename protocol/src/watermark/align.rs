//! Alignment of a suspect model to the registry's model before detection, so that rewrites
//! which move weights without changing what the network computes do not strip the mark.
//!
//! # What it undoes
//!
//! The pattern is tied to each element's position in a tensor of its shape (module
//! documentation of [`super`]), so two rewrites that keep a network's function move every
//! element away from its pattern sign: **permuting hidden units** (rows of one layer's weight
//! with the columns of the next; for a convolution, output channels with the next layer's input
//! channels, or blocks of columns of a fully connected layer after a flatten) and **writing a
//! matrix transposed** (`[in, out]`, as Keras or JAX lay them out). Measured without alignment:
//! z 16.1 → 0.76 and 1.37 (BENCHMARKS.md, "Watermarks").
//!
//! With the registry's model at hand, the suspect is laid back onto it, tensor by tensor:
//!
//! 1. **Pairing**: each reference tensor takes the suspect tensor of its name when its shape is
//!    the same or transposed; the rest are paired by content, each to the unused suspect tensor
//!    of a compatible shape that aligns best (renamed copies).
//! 2. **Orientation**: a suspect matrix of the transposed shape is transposed back; a square
//!    one is tried both ways and the better fit kept.
//! 3. **Units**: each tensor is seen as `[rows, columns, rest]` (rest: a convolution's kernel
//!    positions). Its row permutation is found by matching rows by cosine similarity given a
//!    column order. The columns start from the identity (a first layer, whose inputs are not
//!    permuted) or from a permutation found for another tensor's rows — the previous layer's
//!    units, or, expanded to blocks, a convolution's channels feeding a flatten; each start is
//!    scored after its row match, and the best one, unless it already fits (cosine ≥ 0.99), is
//!    refined by matching columns given the rows and rows given the columns, alternately (at
//!    most [`ROUNDS`] times). Two passes over the tensors let every layer use the permutations
//!    of its neighbours. A vector (a bias, a norm) takes the found row permutation of its
//!    length that fits it best, or none.
//!
//! The match is greedy (the pair of highest similarity first, then the highest among the
//! rest): when every true pair is the best match of both its row and its column in the
//! similarity matrix, the greedy match is exactly the true permutation (the highest entry
//! overall is then a true pair; remove its row and column and the property still holds), which
//! is the case for a copy: a unit's weight vector is far closer to itself, marked or not, than
//! to any other unit (cosine ≈ 0.97 against ≈ 0 for the demo's mark).
//!
//! # Why the reference must be the unmarked model, and why the null still holds
//!
//! After alignment the test runs on suspect − reference (*informed*, [`super::Reference`]).
//! Everything alignment chooses (pairs, orientations, permutations) is a function of the
//! suspect and the reference. With the **unmarked** aggregate as reference, both are
//! independent of the mark key under the null, so the aligned difference is too and Hoeffding's
//! bound holds as before. Aligning to the **marked** model would not be: among the many
//! permutations of an unrelated model's units, the one that best fits the marked reference
//! also fits its pattern, which biases z upward by roughly `a·√(2·ln n)·√n` for `n` units
//! (≈ 8 for `a = 0.25`, `n = 128`). So a published reference is first unmarked with the
//! registry entry's mark key and amplitude ([`super::unmark_tensor`]); what is left of the mark
//! is float rounding, orders of magnitude below what could move z.
//!
//! Memory: both models in memory as f32 (alignment needs all of a layer's units at once), and
//! time `O(rows² · row length)` per tensor and start; dimensions above [`MAX_UNITS`] are not
//! permuted (a language model's vocabulary rows are not hidden units). For a model larger than
//! memory, use the streamed test without `--align`.

use std::collections::BTreeMap;
use std::path::Path;

use super::detect::{Reference, detect_tensors_marks, read_weights, weight_names};
use super::{Detection, MarkKey, WatermarkError};
use crate::checkpoint::SafetensorsReader;

/// Alternations of row and column matching per start.
pub const ROUNDS: usize = 3;

/// Dimensions with more units than this keep their order (the similarity matrix is
/// `units²`).
pub const MAX_UNITS: usize = 4096;

/// Found permutations kept per length, as starts for other tensors.
const STARTS_PER_LENGTH: usize = 4;

/// A start whose fit reaches this cosine similarity ends the search for the tensor: the copy's
/// layout is found, and no other start can fit much better.
const GOOD_FIT: f64 = 0.99;

/// A tensor in memory, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every weight tensor of a safetensors file (floating, or an INT8 export's dequantized), in
/// file order.
pub fn read_tensors(path: &Path) -> Result<Vec<NamedTensor>, WatermarkError> {
    let mut reader = SafetensorsReader::open(path)?;
    let mut out = Vec::new();
    for name in weight_names(&reader) {
        let shape = reader
            .info(&name)
            .map(|i| i.shape.clone())
            .unwrap_or_default();
        let values = read_weights(&mut reader, &name)?;
        out.push(NamedTensor {
            name,
            shape,
            values,
        });
    }
    Ok(out)
}

/// What alignment did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlignmentReport {
    /// Reference tensors paired by name, and by content.
    pub by_name: usize,
    pub by_content: usize,
    /// Paired tensors that were transposed back.
    pub transposed: usize,
    /// Paired tensors whose rows or columns were moved.
    pub permuted: usize,
    /// The reference's tensors no suspect tensor fits (left out of the test), and the
    /// suspect's tensors left over.
    pub unpaired_reference: Vec<String>,
    pub unpaired_suspect: Vec<String>,
}

/// A tensor seen as `[rows, cols, rest]`: a vector is `[n, 1, 1]`.
#[derive(Clone, Copy, Debug)]
struct View {
    rows: usize,
    cols: usize,
    rest: usize,
}

impl View {
    fn of(shape: &[usize]) -> Option<View> {
        match shape {
            [] => None,
            [n] => Some(View {
                rows: *n,
                cols: 1,
                rest: 1,
            }),
            [r, c, rest @ ..] => Some(View {
                rows: *r,
                cols: *c,
                rest: rest.iter().product(),
            }),
        }
    }
}

fn identity(n: usize) -> Vec<usize> {
    (0..n).collect()
}

fn is_identity(p: &[usize]) -> bool {
    p.iter().enumerate().all(|(i, &j)| i == j)
}

/// `values` of a `rows × cols` matrix, transposed.
pub(super) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    t
}

/// `s` with row `i` taken from row `p[i]` and column unit `c` (`block` columns) from unit
/// `q[c]`.
fn apply(s: &[f32], v: View, p: &[usize], q: &[usize], block: usize) -> Vec<f32> {
    let row_len = v.cols * v.rest;
    let unit_len = block * v.rest;
    let mut out = vec![0.0; s.len()];
    for (i, &pi) in p.iter().enumerate() {
        let src = &s[pi * row_len..(pi + 1) * row_len];
        let dst = &mut out[i * row_len..(i + 1) * row_len];
        for (c, &qc) in q.iter().enumerate() {
            dst[c * unit_len..(c + 1) * unit_len]
                .copy_from_slice(&src[qc * unit_len..(qc + 1) * unit_len]);
        }
    }
    out
}

fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.iter_mut()
            .for_each(|x| *x = (f64::from(*x) / norm) as f32);
    } else {
        v.iter_mut().for_each(|x| *x = 0.0);
    }
    v
}

/// Cosine similarity of two flattened tensors.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa > 0.0 && bb > 0.0 {
        ab / (aa * bb).sqrt()
    } else {
        0.0
    }
}

/// Unit vectors of `x`'s rows.
fn row_vectors(x: &[f32], v: View) -> Vec<Vec<f32>> {
    let len = v.cols * v.rest;
    (0..v.rows)
        .map(|i| normalized(x[i * len..(i + 1) * len].to_vec()))
        .collect()
}

/// Unit vectors of `x`'s column units (`block` columns each), across all rows.
fn column_vectors(x: &[f32], v: View, block: usize) -> Vec<Vec<f32>> {
    let row_len = v.cols * v.rest;
    let unit_len = block * v.rest;
    (0..v.cols / block)
        .map(|c| {
            normalized(
                (0..v.rows)
                    .flat_map(|i| {
                        let start = i * row_len + c * unit_len;
                        x[start..start + unit_len].iter().copied()
                    })
                    .collect(),
            )
        })
        .collect()
}

/// `Σ a_i·b_i`, in eight lanes (the similarity matrices are the alignment's whole cost).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The greedy match of `reference` units to `suspect` units by cosine similarity (module
/// documentation): `out[i]` is the suspect unit laid onto reference unit `i`.
fn greedy_match(reference: &[Vec<f32>], suspect: &[Vec<f32>]) -> Vec<usize> {
    let n = reference.len();
    let mut pairs: Vec<(f32, u32, u32)> = Vec::with_capacity(n * n);
    for (i, r) in reference.iter().enumerate() {
        for (j, s) in suspect.iter().enumerate() {
            let dot = dot(r, s);
            pairs.push((dot, i as u32, j as u32));
        }
    }
    pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut out = vec![usize::MAX; n];
    let mut taken = vec![false; n];
    for (_, i, j) in pairs {
        let (i, j) = (i as usize, j as usize);
        if out[i] == usize::MAX && !taken[j] {
            out[i] = j;
            taken[j] = true;
        }
    }
    out
}

/// A suspect tensor laid onto a reference tensor.
#[derive(Clone, Debug)]
struct Fit {
    values: Vec<f32>,
    score: f64,
    rows: Vec<usize>,
    /// The column permutation, over units of one or more columns.
    cols: Vec<usize>,
}

/// Permutations found so far, by length: the starts for other tensors' columns and vectors.
#[derive(Default)]
struct FoundPermutations(BTreeMap<usize, Vec<Vec<usize>>>);

impl FoundPermutations {
    fn add(&mut self, p: &[usize]) {
        if p.len() < 2 || is_identity(p) {
            return;
        }
        let list = self.0.entry(p.len()).or_default();
        if !list.iter().any(|q| q == p) {
            list.push(p.to_vec());
            if list.len() > STARTS_PER_LENGTH {
                list.remove(0);
            }
        }
    }

    /// Starts for `cols` columns: the identity, then each found permutation of a length that
    /// divides it (as units of `cols / length` columns).
    fn column_starts(&self, cols: usize) -> Vec<(Vec<usize>, usize)> {
        let mut starts = vec![(identity(cols), 1)];
        for (&len, perms) in &self.0 {
            if len <= cols && cols.is_multiple_of(len) {
                starts.extend(perms.iter().map(|p| (p.clone(), cols / len)));
            }
        }
        starts
    }
}

/// Aligns `s` (already in the reference's orientation) to `r`, of view `v`.
fn fit(s: &[f32], r: &[f32], v: View, found: &FoundPermutations) -> Fit {
    if v.cols * v.rest == 1 {
        // A vector: a found row permutation of its length, or none.
        let mut starts = vec![identity(v.rows)];
        starts.extend(found.0.get(&v.rows).into_iter().flatten().cloned());
        return starts
            .into_iter()
            .map(|p| {
                let values = apply(s, v, &p, &[0], 1);
                Fit {
                    score: cosine(&values, r),
                    values,
                    rows: p,
                    cols: vec![0],
                }
            })
            .max_by(|a, b| a.score.total_cmp(&b.score))
            .unwrap_or_else(|| as_is(s, v));
    }
    let reference_rows = (v.rows <= MAX_UNITS).then(|| row_vectors(r, v));
    let match_rows = |q: &[usize], block: usize| match &reference_rows {
        Some(rr) => {
            let moved = apply(s, v, &identity(v.rows), q, block);
            greedy_match(rr, &row_vectors(&moved, v))
        }
        None => identity(v.rows),
    };
    // Each start is scored after one row match; only the best is refined by alternating, so
    // that a model whose starts all fit badly (an unrelated one) costs one match per start.
    let mut best: Option<(Fit, usize)> = None;
    for (q, block) in found.column_starts(v.cols) {
        let p = match_rows(&q, block);
        let values = apply(s, v, &p, &q, block);
        let score = cosine(&values, r);
        if best.as_ref().is_none_or(|(b, _)| score > b.score) {
            best = Some((
                Fit {
                    values,
                    score,
                    rows: p,
                    cols: q,
                },
                block,
            ));
        }
        if score >= GOOD_FIT {
            break;
        }
    }
    let Some((mut best, block)) = best else {
        return as_is(s, v);
    };
    let units = v.cols / block;
    if best.score < GOOD_FIT && units > 1 && units <= MAX_UNITS {
        let reference_cols = column_vectors(r, v, block);
        let (mut p, mut q) = (best.rows.clone(), best.cols.clone());
        for _ in 0..ROUNDS {
            let moved = apply(s, v, &p, &identity(units), block);
            let next = greedy_match(&reference_cols, &column_vectors(&moved, v, block));
            if next == q {
                break;
            }
            q = next;
            p = match_rows(&q, block);
            let values = apply(s, v, &p, &q, block);
            let score = cosine(&values, r);
            if score > best.score {
                best = Fit {
                    values,
                    score,
                    rows: p.clone(),
                    cols: q.clone(),
                };
            }
        }
    }
    best
}

/// The suspect as it is (never reached: there is always the identity start).
fn as_is(s: &[f32], v: View) -> Fit {
    Fit {
        values: s.to_vec(),
        score: f64::NEG_INFINITY,
        rows: identity(v.rows),
        cols: identity(v.cols),
    }
}

/// The suspect tensor's values in each orientation that gives the reference's shape (as it
/// is, transposed), with whether it was transposed.
fn orientations(s: &NamedTensor, shape: &[usize]) -> Vec<(Vec<f32>, bool)> {
    let mut out = Vec::new();
    if s.shape == shape {
        out.push((s.values.clone(), false));
    }
    if let ([a, b], [c, d]) = (s.shape.as_slice(), shape) {
        if a == d && b == c {
            out.push((transpose(&s.values, *a, *b), true));
        }
    }
    out
}

fn compatible(s: &[usize], r: &[usize]) -> bool {
    s == r || matches!((s, r), ([a, b], [c, d]) if a == d && b == c)
}

/// Lays the suspect's tensors onto the reference's (module documentation): for each reference
/// tensor, the paired suspect tensor's values in the reference's layout, or `None`.
pub fn align_to_reference(
    suspect: &[NamedTensor],
    reference: &[NamedTensor],
) -> (Vec<Option<Vec<f32>>>, AlignmentReport) {
    let mut report = AlignmentReport::default();
    let mut paired: Vec<Option<usize>> = vec![None; reference.len()];
    let mut used = vec![false; suspect.len()];
    for (ri, r) in reference.iter().enumerate() {
        if let Some(si) = suspect
            .iter()
            .position(|s| s.name == r.name && compatible(&s.shape, &r.shape))
        {
            paired[ri] = Some(si);
            used[si] = true;
            report.by_name += 1;
        }
    }
    let mut found = FoundPermutations::default();
    let mut chosen: Vec<Option<(Fit, bool)>> = vec![None; reference.len()];
    for pass in 0..2 {
        for (ri, r) in reference.iter().enumerate() {
            let Some(view) = View::of(&r.shape) else {
                continue;
            };
            let candidates: Vec<usize> = match paired[ri] {
                Some(si) => vec![si],
                None if pass == 0 => (0..suspect.len())
                    .filter(|&si| !used[si] && compatible(&suspect[si].shape, &r.shape))
                    .collect(),
                None => Vec::new(),
            };
            if pass == 1
                && chosen[ri]
                    .as_ref()
                    .is_some_and(|(f, _)| f.score >= GOOD_FIT)
            {
                continue;
            }
            let mut best = chosen[ri].take();
            let mut best_suspect = paired[ri];
            for si in candidates {
                for (values, transposed) in orientations(&suspect[si], &r.shape) {
                    let f = fit(&values, &r.values, view, &found);
                    if best.as_ref().is_none_or(|(b, _)| f.score > b.score) {
                        best = Some((f, transposed));
                        best_suspect = Some(si);
                    }
                }
            }
            if let (None, Some(si)) = (paired[ri], best_suspect) {
                paired[ri] = Some(si);
                used[si] = true;
                report.by_content += 1;
            }
            if let Some((f, _)) = &best {
                found.add(&f.rows);
                found.add(&f.cols);
            }
            chosen[ri] = best;
        }
    }
    let mut aligned = Vec::with_capacity(reference.len());
    for (r, c) in reference.iter().zip(chosen) {
        match c {
            Some((f, transposed)) => {
                report.transposed += usize::from(transposed);
                report.permuted += usize::from(!is_identity(&f.rows) || !is_identity(&f.cols));
                aligned.push(Some(f.values));
            }
            None => {
                report.unpaired_reference.push(r.name.clone());
                aligned.push(None);
            }
        }
    }
    report.unpaired_suspect = suspect
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(s, _)| s.name.clone())
        .collect();
    (aligned, report)
}

/// Informed detection after alignment, in memory: each reference tensor's aligned suspect
/// tensor minus the reference tensor, tested against each mark key (one [`Detection`] per key).
/// `reference` must be the unmarked model (module documentation).
pub fn detect_aligned_tensors(
    suspect: &[NamedTensor],
    reference: &[NamedTensor],
    marks: &[MarkKey],
) -> (Vec<Detection>, AlignmentReport) {
    let (aligned, report) = align_to_reference(suspect, reference);
    let differences: Vec<(&[usize], Vec<f32>)> = reference
        .iter()
        .zip(aligned)
        .filter_map(|(r, a)| {
            let mut a = a?;
            for (x, y) in a.iter_mut().zip(&r.values) {
                *x -= y;
            }
            Some((r.shape.as_slice(), a))
        })
        .collect();
    let detections =
        detect_tensors_marks(marks, differences.iter().map(|(s, v)| (*s, v.as_slice())));
    (detections, report)
}

/// [`detect_aligned_tensors`] of the safetensors file `suspect` against `reference` (the
/// registry's model, unmarked as it is read when it is the published one).
pub fn detect_aligned_marks(
    suspect: &Path,
    reference: &mut Reference,
    marks: &[MarkKey],
) -> Result<(Vec<Detection>, AlignmentReport), WatermarkError> {
    let suspect = read_tensors(suspect)?;
    let reference = reference.read_all()?;
    Ok(detect_aligned_tensors(&suspect, &reference, marks))
}
