//! White-box detection: the correlation of a model's weights with a mark key's pattern and its
//! p-value (module documentation of [`super`]).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use super::{MarkKey, WatermarkError, marks_shape, mean_std};
use crate::checkpoint::{SafetensorsReader, dequantize_int8_tensor, int8_scale_name, to_f32};

/// The outcome of testing one model against one mark key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// `S / √V`.
    pub z: f64,
    /// Tensors and values that entered the statistic.
    pub tensors: usize,
    pub values: u64,
}

impl Detection {
    /// `log10` of the Hoeffding bound `exp(−z²/2)` (0 for `z ≤ 0`): the p-value's logarithm,
    /// which stays meaningful where the p-value itself underflows.
    pub fn log10_p(&self) -> f64 {
        if self.z > 0.0 && self.z.is_finite() {
            -self.z * self.z / (2.0 * std::f64::consts::LN_10)
        } else {
            0.0
        }
    }

    /// The p-value bound, `exp(−z²/2)`.
    pub fn p_value(&self) -> f64 {
        10f64.powf(self.log10_p())
    }

    /// The p-value when this was one of `tests` keys tried (Bonferroni: `min(1, tests · p)`),
    /// as its `log10`.
    pub fn log10_p_among(&self, tests: usize) -> f64 {
        (self.log10_p() + (tests.max(1) as f64).log10()).min(0.0)
    }
}

/// The decision over several candidate marks tested on one model (a registry's entries under
/// one key): the candidate with the smallest p-value, that p-value multiplied by the number of
/// candidates (Bonferroni, so the false-match rate over the whole registry stays at most the
/// threshold), and whether it is at or below the candidate's own threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// Which candidate.
    pub index: usize,
    pub detection: Detection,
    /// `log10` of the corrected p-value.
    pub log10_p: f64,
    pub detected: bool,
}

/// [`Verdict`] of `detections[i]`, each with its registered threshold `thresholds[i]`; `None`
/// without candidates.
pub fn verdict(detections: &[Detection], thresholds: &[f64]) -> Option<Verdict> {
    let (index, detection) = detections
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.log10_p().total_cmp(&b.1.log10_p()))?;
    let log10_p = detection.log10_p_among(detections.len());
    let threshold = thresholds.get(index).copied().unwrap_or(0.0);
    Some(Verdict {
        index,
        detection: *detection,
        log10_p,
        detected: threshold > 0.0 && log10_p <= threshold.log10(),
    })
}

/// Running sums over shape groups.
#[derive(Default)]
struct Correlation {
    s: f64,
    v: f64,
    tensors: usize,
    values: u64,
}

impl Correlation {
    /// Adds one shape's summed standardized values `c` (over `tensors` tensors).
    fn add_group(&mut self, mark: &MarkKey, shape: &[usize], c: &[f64], tensors: usize) {
        let mut pattern = mark.pattern(shape);
        for &x in c {
            self.s += f64::from(pattern.next_sign()) * x;
            self.v += x * x;
        }
        self.tensors += tensors;
        self.values += (c.len() * tensors) as u64;
    }

    fn finish(self) -> Detection {
        Detection {
            z: if self.v > 0.0 {
                self.s / self.v.sqrt()
            } else {
                0.0
            },
            tensors: self.tensors,
            values: self.values,
        }
    }
}

/// Adds tensor `values`, standardized by its own mean and spread, into `c`; false when it has no
/// spread or is not finite (then it adds nothing).
fn accumulate(c: &mut [f64], values: &[f32]) -> bool {
    let (mean, std) = mean_std(values);
    if !(std.is_finite() && std > 0.0) || c.len() != values.len() {
        return false;
    }
    for (acc, &v) in c.iter_mut().zip(values) {
        *acc += (f64::from(v) - mean) / std;
    }
    true
}

/// Detection over tensors held in memory (shape, values), for tests and small models.
pub fn detect_tensors<'a>(
    mark: &MarkKey,
    tensors: impl IntoIterator<Item = (&'a [usize], &'a [f32])>,
) -> Detection {
    let mut all = detect_tensors_marks(std::slice::from_ref(mark), tensors);
    all.pop().unwrap_or(NOTHING)
}

/// [`detect_tensors`] for several mark keys at once: one [`Detection`] per key, in order.
pub fn detect_tensors_marks<'a>(
    marks: &[MarkKey],
    tensors: impl IntoIterator<Item = (&'a [usize], &'a [f32])>,
) -> Vec<Detection> {
    let mut groups: BTreeMap<Vec<usize>, (Vec<f64>, usize)> = BTreeMap::new();
    for (shape, values) in tensors {
        if !marks_shape(shape) {
            continue;
        }
        let (c, n) = groups
            .entry(shape.to_vec())
            .or_insert_with(|| (vec![0.0; values.len()], 0));
        if accumulate(c, values) {
            *n += 1;
        }
    }
    let mut corr: Vec<Correlation> = marks.iter().map(|_| Correlation::default()).collect();
    for (shape, (c, n)) in groups {
        if n > 0 {
            for (mark, corr) in marks.iter().zip(corr.iter_mut()) {
                corr.add_group(mark, &shape, &c, n);
            }
        }
    }
    corr.into_iter().map(Correlation::finish).collect()
}

/// No evidence: what a model with no markable tensor gives.
const NOTHING: Detection = Detection {
    z: 0.0,
    tensors: 0,
    values: 0,
};

/// Tensor `name` of `reader` as f32: a float tensor converted, an INT8 export's quantized
/// tensor (`tutela-int8-v1`) dequantized (`q · scale`).
pub(super) fn read_weights(
    reader: &mut SafetensorsReader,
    name: &str,
) -> Result<Vec<f32>, WatermarkError> {
    Ok(match reader.info(name).map(|i| i.dtype) {
        Some(Dtype::I8) => dequantize_int8_tensor(reader, name)?.1,
        _ => reader.read_f32(name)?.1,
    })
}

/// The file's weight tensors, in file order: every floating tensor, and an INT8 export's
/// (`tutela-int8-v1`) quantized tensors, but not their scales.
pub(super) fn weight_names(reader: &SafetensorsReader) -> Vec<String> {
    reader
        .names()
        .into_iter()
        .filter(|name| {
            let Some(info) = reader.info(name) else {
                return false;
            };
            let quantized =
                info.dtype == Dtype::I8 && reader.info(&int8_scale_name(name)).is_some();
            let is_scale = name
                .strip_suffix("_scale")
                .and_then(|base| reader.info(base))
                .is_some_and(|base| base.dtype == Dtype::I8);
            let float = to_f32(info.dtype, &[]).is_some();
            float && !is_scale || quantized
        })
        .collect()
}

/// Detection over a safetensors file, one shape at a time: memory is one tensor plus one
/// accumulator of its size, whatever the model's size. Every floating tensor counts; an INT8
/// export's (`tutela-int8-v1`) quantized tensors are dequantized (`q · scale`) and their scales
/// left out. Names and file order play no part.
pub fn detect_file(path: &Path, mark: &MarkKey) -> Result<Detection, WatermarkError> {
    let mut all = detect_file_marks(path, std::slice::from_ref(mark))?;
    Ok(all.pop().unwrap_or(NOTHING))
}

/// [`detect_file`] for several mark keys at once (a registry's entries), reading the file once:
/// one [`Detection`] per key, in order.
pub fn detect_file_marks(path: &Path, marks: &[MarkKey]) -> Result<Vec<Detection>, WatermarkError> {
    detect_file_marks_against(path, None, marks)
}

/// The unmarked model a suspect is compared with (*informed* detection, module documentation
/// of [`super`]): the job's unmarked aggregate, which the coordinator keeps (`source_digest` of
/// the registry entry). Its tensors are found by name and shape.
///
/// The registry's *published* model serves as well ([`Reference::open_published`]): its mark is
/// taken out again with the entry's mark key and amplitude ([`super::unmark_tensor`]), which
/// gives back the unmarked aggregate up to float rounding.
pub struct Reference {
    reader: SafetensorsReader,
    /// The mark to take out of each tensor read: set for the published (marked) model.
    unmark: Option<(MarkKey, f64)>,
}

impl Reference {
    /// The unmarked model (the registry entry's source).
    pub fn open(path: &Path) -> Result<Self, WatermarkError> {
        Ok(Reference {
            reader: SafetensorsReader::open(path)?,
            unmark: None,
        })
    }

    /// The published model, marked with `mark` at `amplitude` (the registry entry's): each
    /// tensor is read with the mark taken out.
    pub fn open_published(
        path: &Path,
        mark: MarkKey,
        amplitude: f64,
    ) -> Result<Self, WatermarkError> {
        Ok(Reference {
            reader: SafetensorsReader::open(path)?,
            unmark: Some((mark, amplitude)),
        })
    }

    /// Tensor `name` (of the file's [`weight_names`]) as the unmarked model holds it.
    fn read(&mut self, name: &str) -> Result<Vec<f32>, WatermarkError> {
        let mut values = read_weights(&mut self.reader, name)?;
        if let (Some((mark, amplitude)), Some(info)) = (&self.unmark, self.reader.info(name)) {
            // The coordinator marks floating tensors only, as `embed_stream` does.
            if to_f32(info.dtype, &[]).is_some() {
                super::unmark_tensor(mark, &info.shape, &mut values, *amplitude);
            }
        }
        Ok(values)
    }

    /// Every weight tensor, unmarked, in file order (for [`super::detect_aligned_marks`]).
    pub fn read_all(&mut self) -> Result<Vec<super::NamedTensor>, WatermarkError> {
        let mut out = Vec::new();
        for name in weight_names(&self.reader) {
            let shape = self
                .reader
                .info(&name)
                .map(|i| i.shape.clone())
                .unwrap_or_default();
            let values = self.read(&name)?;
            out.push(super::NamedTensor {
                name,
                shape,
                values,
            });
        }
        Ok(out)
    }

    /// Subtracts the reference's tensor `name` from `values` when it has one of that shape;
    /// returns whether it did (a tensor it lacks is tested blind, which keeps the test valid).
    pub(super) fn subtract(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &mut [f32],
    ) -> Result<bool, WatermarkError> {
        let same = self.reader.info(name).is_some_and(|i| {
            i.shape == shape && (to_f32(i.dtype, &[]).is_some() || i.dtype == Dtype::I8)
        });
        if !same {
            return Ok(false);
        }
        let reference = self.read(name)?;
        for (v, r) in values.iter_mut().zip(reference) {
            *v -= r;
        }
        Ok(true)
    }
}

/// [`detect_file_marks`], informed by `reference` when given: each tensor of the file minus the
/// reference's tensor of the same name and shape.
pub fn detect_file_marks_against(
    path: &Path,
    mut reference: Option<&mut Reference>,
    marks: &[MarkKey],
) -> Result<Vec<Detection>, WatermarkError> {
    let mut reader = SafetensorsReader::open(path)?;
    let mut groups: BTreeMap<Vec<usize>, Vec<String>> = BTreeMap::new();
    for name in weight_names(&reader) {
        let Some(info) = reader.info(&name) else {
            continue;
        };
        if marks_shape(&info.shape) {
            groups.entry(info.shape.clone()).or_default().push(name);
        }
    }
    let mut corr: Vec<Correlation> = marks.iter().map(|_| Correlation::default()).collect();
    for (shape, names) in groups {
        let mut c = vec![0.0f64; shape.iter().product()];
        let mut counted = 0;
        for name in names {
            let mut values = read_weights(&mut reader, &name)?;
            if let Some(reference) = reference.as_deref_mut() {
                reference.subtract(&name, &shape, &mut values)?;
            }
            if accumulate(&mut c, &values) {
                counted += 1;
            }
        }
        if counted > 0 {
            for (mark, corr) in marks.iter().zip(corr.iter_mut()) {
                corr.add_group(mark, &shape, &c, counted);
            }
        }
    }
    Ok(corr.into_iter().map(Correlation::finish).collect())
}
