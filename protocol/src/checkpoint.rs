//! Hugging Face checkpoints on disk, tensor by tensor, without libtorch: merging a LoRA adapter
//! into its base model (`tutela model merge`) and the INT8 weight-only export with its
//! dequantizing loader.
//!
//! # Streaming
//!
//! A safetensors file is an 8-byte header length, a JSON header (each tensor's dtype, shape and
//! byte range) and the data. [`SafetensorsReader`] reads the header only and then each tensor on
//! demand (one seek and one read), and [`SafetensorsWriter`] writes a header computed up front
//! from the output tensors' shapes and dtypes, then the tensors one by one in header order. A
//! merge or an export therefore holds one tensor of the base model in memory at a time (plus
//! the adapter, which is small), never the whole checkpoint. The header is parsed and validated
//! by the `safetensors` crate's [`Metadata`].
//!
//! # Merge
//!
//! For each adapted module `W' = W + (alpha / r) · B·A`, computed in f32 (f64 accumulation)
//! and written back in the base tensor's dtype (f32, f16 or bf16, rounded to nearest even).
//! Every other tensor is copied byte for byte, and `config.json` (and the tokenizer files when
//! present) are copied, so the output directory is a full Hugging Face checkpoint.
//!
//! # INT8 weight-only export (format `tutela-int8-v1`)
//!
//! Every 2-D `*.weight` tensor of a Linear module (every 2-D `.weight` whose name does not
//! contain `embed`: embeddings and 1-D norm weights stay as they are) is quantized per output
//! channel, symmetrically: `scale_o = max_i |W_oi| / 127` (0 for an all-zero row), `q_oi =
//! round(W_oi / scale_o)` in `[-127, 127]`. The file holds, for such a tensor `X.weight`:
//! - `X.weight`: dtype `I8`, the same shape;
//! - `X.weight_scale`: dtype `F32`, shape `[out_features]`;
//!
//! and every other tensor unchanged. The file's `__metadata__` carries `"quantization":
//! "tutela-int8-v1"`. [`load_int8_dequantized`] reads it back to f32 (`W ≈ q · scale`), each
//! element within `scale_o / 2` of the original (plus the f32 rounding of the product).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::lora::{LoraFactor, PeftAdapterConfig, parse_adapter_name};

/// Why a checkpoint could not be read, merged or written. Paths here are the operator's own
/// files on the machine running the command, never a site's data.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor {name:?}: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The most header bytes accepted (the safetensors crate's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors file read tensor by tensor (module documentation).
pub struct SafetensorsReader {
    path: PathBuf,
    file: File,
    metadata: Metadata,
    /// Where the data section starts in the file.
    data_start: u64,
}

impl SafetensorsReader {
    /// Opens `path` and reads and validates its header.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let mut file = File::open(path).map_err(io(path))?;
        let format = |reason: String| CheckpointError::Format {
            path: path.to_owned(),
            reason,
        };
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| format(format!("cannot read the header length: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER_BYTES {
            return Err(format(format!("a header of {n} bytes is too large")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| format(format!("the header is cut short: {e}")))?;
        let metadata: Metadata =
            serde_json::from_slice(&header).map_err(|e| format(format!("bad header: {e}")))?;
        let data_start = 8 + n;
        let file_len = file.metadata().map_err(io(path))?.len();
        if data_start + metadata.data_len() as u64 != file_len {
            return Err(format(format!(
                "the header describes {} data bytes but the file holds {}",
                metadata.data_len(),
                file_len.saturating_sub(data_start)
            )));
        }
        Ok(SafetensorsReader {
            path: path.to_owned(),
            file,
            metadata,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// The file's `__metadata__`.
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// The raw little-endian bytes of tensor `name`.
    pub fn read_bytes(&mut self, name: &str) -> Result<Vec<u8>, CheckpointError> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| self.tensor_error(name, "is not in the file"))?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .map_err(io(&self.path))?;
        self.file.read_exact(&mut bytes).map_err(io(&self.path))?;
        Ok(bytes)
    }

    /// The raw bytes of tensor `name`, handed to `each` in pieces of at most `chunk` bytes, in
    /// order: a tensor of any size read in bounded memory (one reused buffer).
    pub fn read_chunks(
        &mut self,
        name: &str,
        chunk: usize,
        each: &mut dyn FnMut(&[u8]),
    ) -> Result<(), CheckpointError> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| self.tensor_error(name, "is not in the file"))?;
        let (start, end) = info.data_offsets;
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .map_err(io(&self.path))?;
        let mut left = end - start;
        let mut buffer = vec![0u8; chunk.max(1).min(left)];
        while left > 0 {
            let n = buffer.len().min(left);
            self.file
                .read_exact(&mut buffer[..n])
                .map_err(io(&self.path))?;
            each(&buffer[..n]);
            left -= n;
        }
        Ok(())
    }

    /// Tensor `name` as f32 (from f32, f64, f16 or bf16), with its shape.
    pub fn read_f32(&mut self, name: &str) -> Result<F32Tensor, CheckpointError> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| self.tensor_error(name, "is not in the file"))?
            .clone();
        let bytes = self.read_bytes(name)?;
        let values = to_f32(info.dtype, &bytes).ok_or_else(|| {
            self.tensor_error(name, &format!("dtype {:?} is not a float", info.dtype))
        })?;
        Ok((info.shape, values))
    }

    fn tensor_error(&self, name: &str, reason: &str) -> CheckpointError {
        CheckpointError::Tensor {
            path: self.path.clone(),
            name: name.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// Little-endian bytes of a float dtype as f32; `None` for a dtype that is not a float.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// f32 values as little-endian bytes of `dtype` (rounded to nearest even for f16 and bf16).
pub fn from_f32(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
    Some(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F64 => values
            .iter()
            .flat_map(|&v| f64::from(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => return None,
    })
}

/// Writes a safetensors file whose tensors are declared up front and then written one by one,
/// in the declared order (module documentation).
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// `(name, bytes)` still to write, in order.
    pending: std::collections::VecDeque<(String, usize)>,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `tensors` (name, dtype, shape) in that order.
    pub fn create(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Self, CheckpointError> {
        let mut infos = Vec::with_capacity(tensors.len());
        let mut pending = std::collections::VecDeque::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (name, dtype, shape) in tensors {
            let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            infos.push((
                name.clone(),
                TensorInfo {
                    dtype: *dtype,
                    shape: shape.clone(),
                    data_offsets: (offset, offset + bytes),
                },
            ));
            pending.push_back((name.clone(), bytes));
            offset += bytes;
        }
        let metadata = Metadata::new(metadata, infos).map_err(|e| CheckpointError::Format {
            path: path.to_owned(),
            reason: format!("cannot describe the output: {e}"),
        })?;
        let mut header = serde_json::to_vec(&metadata).map_err(|e| CheckpointError::Format {
            path: path.to_owned(),
            reason: format!("cannot encode the header: {e}"),
        })?;
        // The data section starts 8-byte aligned, padded with spaces as the reference writer does.
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = BufWriter::new(File::create(path).map_err(io(path))?);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(io(path))?;
        Ok(SafetensorsWriter {
            path: path.to_owned(),
            out,
            pending,
        })
    }

    /// Writes the next declared tensor's bytes.
    pub fn write_next(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        match self.pending.pop_front() {
            Some((expected, len)) if expected == name && len == bytes.len() => {
                self.out.write_all(bytes).map_err(io(&self.path))
            }
            Some((expected, len)) => Err(CheckpointError::Tensor {
                path: self.path.clone(),
                name: name.to_owned(),
                reason: format!(
                    "written out of order or with {} bytes; expected {expected:?} of {len} bytes",
                    bytes.len()
                ),
            }),
            None => Err(CheckpointError::Tensor {
                path: self.path.clone(),
                name: name.to_owned(),
                reason: "was not declared in the header".into(),
            }),
        }
    }

    /// Flushes the file; every declared tensor must have been written.
    pub fn finish(mut self) -> Result<(), CheckpointError> {
        if let Some((name, _)) = self.pending.front() {
            return Err(CheckpointError::Tensor {
                path: self.path.clone(),
                name: name.clone(),
                reason: "was declared but never written".into(),
            });
        }
        self.out.flush().map_err(io(&self.path))?;
        self.out.get_ref().sync_all().map_err(io(&self.path))
    }
}

/// The files a Hugging Face model directory may hold beside its weights, copied by a merge or an
/// export when present (`config.json` is required).
const COMPANION_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The weights file of a model directory: a single `model.safetensors` (sharded checkpoints are
/// refused by name).
fn model_file(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let file = dir.join("model.safetensors");
    if file.is_file() {
        return Ok(file);
    }
    let reason = if dir.join("model.safetensors.index.json").is_file() {
        "holds a sharded checkpoint (model.safetensors.index.json); only a single \
         model.safetensors is supported"
    } else {
        "holds no model.safetensors"
    };
    Err(CheckpointError::Adapter {
        path: dir.to_owned(),
        reason: reason.into(),
    })
}

fn copy_companions(base: &Path, output: &Path) -> Result<(), CheckpointError> {
    let config = base.join("config.json");
    std::fs::copy(&config, output.join("config.json")).map_err(io(&config))?;
    for name in COMPANION_FILES {
        let from = base.join(name);
        if from.is_file() {
            std::fs::copy(&from, output.join(name)).map_err(io(&from))?;
        }
    }
    Ok(())
}

/// A tensor read as f32: its shape and row-major values.
pub type F32Tensor = (Vec<usize>, Vec<f32>);

/// Refuses an output directory that is one of the inputs: writing `model.safetensors` over the
/// file being read (or copying `config.json` onto itself, which truncates it) would destroy the
/// base model.
fn distinct_output(output: &Path, inputs: &[&Path]) -> Result<(), CheckpointError> {
    let Ok(out) = output.canonicalize() else {
        return Ok(()); // does not exist yet: cannot be an input
    };
    for input in inputs {
        if input.canonicalize().is_ok_and(|i| i == out) {
            return Err(CheckpointError::Adapter {
                path: output.to_owned(),
                reason: "is also an input directory; write the result somewhere else".into(),
            });
        }
    }
    Ok(())
}

/// A loaded adapter: per module path, `B` `[out, r]` and `A` `[r, in]` in f32, and the scaling.
pub struct Adapter {
    pub scaling: f64,
    pub rank: usize,
    /// module path → (B, A), each `(shape, values)`.
    pub modules: BTreeMap<String, (F32Tensor, F32Tensor)>,
}

impl Adapter {
    /// Reads a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`);
    /// every module must have both factors of the configured rank.
    pub fn load(dir: &Path) -> Result<Self, CheckpointError> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config =
            PeftAdapterConfig::from_json(&text).map_err(|reason| CheckpointError::Adapter {
                path: config_path.clone(),
                reason,
            })?;
        let weights = dir.join("adapter_model.safetensors");
        let mut reader = SafetensorsReader::open(&weights)?;
        let rank = config.rank as usize;
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        for name in reader.names() {
            let bad = |reason: String| CheckpointError::Tensor {
                path: weights.clone(),
                name: name.clone(),
                reason,
            };
            let Some((module, factor)) = parse_adapter_name(&name) else {
                return Err(bad(
                    "is not a LoRA factor (base_model.model.<module>.lora_A/lora_B.weight); \
                     adapters with other trained tensors are not supported"
                        .into(),
                ));
            };
            let module = module.to_owned();
            let (shape, values) = reader.read_f32(&name)?;
            match (factor, shape.as_slice()) {
                (LoraFactor::A, [r, _]) if *r == rank => {
                    a.insert(module, (shape, values));
                }
                (LoraFactor::B, [_, r]) if *r == rank => {
                    b.insert(module, (shape, values));
                }
                _ => {
                    return Err(bad(format!(
                        "has shape {shape:?}, which is not a rank-{rank} factor"
                    )));
                }
            }
        }
        let mut modules = BTreeMap::new();
        for (module, b_factor) in b {
            let a_factor = a.remove(&module).ok_or_else(|| CheckpointError::Adapter {
                path: weights.clone(),
                reason: format!("module {module:?} has lora_B but no lora_A"),
            })?;
            modules.insert(module, (b_factor, a_factor));
        }
        if let Some(module) = a.keys().next() {
            return Err(CheckpointError::Adapter {
                path: weights,
                reason: format!("module {module:?} has lora_A but no lora_B"),
            });
        }
        Ok(Adapter {
            scaling: config.scaling(),
            rank,
            modules,
        })
    }
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    pub tensors: usize,
    pub merged_modules: usize,
}

/// `W + scaling · B·A` in f32 (each entry's sum over the rank accumulated in f64).
fn merged_weight(
    w: &[f32],
    b: &[f32],
    a: &[f32],
    out: usize,
    rank: usize,
    input: usize,
    scaling: f64,
) -> Vec<f32> {
    let mut merged = Vec::with_capacity(w.len());
    for o in 0..out {
        let b_row = &b[o * rank..(o + 1) * rank];
        for i in 0..input {
            let mut delta = 0f64;
            for (k, &bk) in b_row.iter().enumerate() {
                delta += f64::from(bk) * f64::from(a[k * input + i]);
            }
            merged.push((f64::from(w[o * input + i]) + scaling * delta) as f32);
        }
    }
    merged
}

/// `tutela model merge`: writes `output/` = `base/` with `adapter/` merged in (module
/// documentation). Every adapted module must exist in the base with matching shapes.
pub fn merge_lora(
    base: &Path,
    adapter: &Path,
    output: &Path,
) -> Result<MergeReport, CheckpointError> {
    distinct_output(output, &[base, adapter])?;
    let adapter = Adapter::load(adapter)?;
    let mut reader = SafetensorsReader::open(&model_file(base)?)?;
    let names = reader.names();
    for (module, ((b_shape, _), (a_shape, _))) in &adapter.modules {
        let weight = format!("{module}.weight");
        let info = reader
            .info(&weight)
            .ok_or_else(|| CheckpointError::Adapter {
                path: base.to_owned(),
                reason: format!("the adapter adapts {module:?}, but the base has no {weight:?}"),
            })?;
        if info.shape != [b_shape[0], a_shape[1]] {
            return Err(CheckpointError::Tensor {
                path: reader.path().to_owned(),
                name: weight,
                reason: format!(
                    "has shape {:?}, the adapter's B·A is {:?}",
                    info.shape,
                    [b_shape[0], a_shape[1]]
                ),
            });
        }
        if to_f32(info.dtype, &[]).is_none() {
            return Err(CheckpointError::Tensor {
                path: reader.path().to_owned(),
                name: weight,
                reason: format!("dtype {:?} cannot be merged into", info.dtype),
            });
        }
    }
    std::fs::create_dir_all(output).map_err(io(output))?;
    copy_companions(base, output)?;
    let declared: Vec<(String, Dtype, Vec<usize>)> = names
        .iter()
        .filter_map(|n| {
            reader
                .info(n)
                .map(|i| (n.clone(), i.dtype, i.shape.clone()))
        })
        .collect();
    let mut writer = SafetensorsWriter::create(
        &output.join("model.safetensors"),
        &declared,
        reader.user_metadata().cloned(),
    )?;
    let mut merged_modules = 0;
    for (name, dtype, shape) in &declared {
        let module = name.strip_suffix(".weight");
        let bytes = match module.and_then(|m| adapter.modules.get(m)) {
            Some(((_, b), (_, a))) => {
                let (_, w) = reader.read_f32(name)?;
                let merged =
                    merged_weight(&w, b, a, shape[0], adapter.rank, shape[1], adapter.scaling);
                merged_modules += 1;
                from_f32(*dtype, &merged).unwrap_or_default()
            }
            None => reader.read_bytes(name)?,
        };
        writer.write_next(name, &bytes)?;
    }
    writer.finish()?;
    Ok(MergeReport {
        tensors: declared.len(),
        merged_modules,
    })
}

/// The format tag of the INT8 export, in the file's `__metadata__` under `quantization`.
pub const INT8_FORMAT: &str = "tutela-int8-v1";

/// The name of the scales of quantized tensor `name` (`X.weight` → `X.weight_scale`).
pub fn int8_scale_name(name: &str) -> String {
    format!("{name}_scale")
}

/// Whether the INT8 export quantizes tensor `name` of shape `shape` (module documentation).
pub fn int8_quantizes(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && !name.contains("embed")
}

/// Per-output-channel symmetric quantization of a row-major `[out, in]` matrix: the int8 values
/// and one f32 scale per row.
pub fn quantize_rows_int8(values: &[f32], out: usize, input: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(out);
    for row in values.chunks_exact(input.max(1)).take(out) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        scales.push(scale);
        for &v in row {
            let level = if scale > 0.0 {
                (v / scale).round().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            q.push(level as i8);
        }
    }
    (q, scales)
}

/// What an INT8 export did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int8Report {
    pub quantized: usize,
    pub copied: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Writes `output/` = the model in `model_dir/` with its Linear weights in INT8 (module
/// documentation); `config.json` and the companion files are copied.
pub fn export_int8(model_dir: &Path, output: &Path) -> Result<Int8Report, CheckpointError> {
    distinct_output(output, &[model_dir])?;
    let input_file = model_file(model_dir)?;
    let mut reader = SafetensorsReader::open(&input_file)?;
    std::fs::create_dir_all(output).map_err(io(output))?;
    copy_companions(model_dir, output)?;
    let mut declared = Vec::new();
    let mut quantized = 0;
    for name in reader.names() {
        let Some(info) = reader.info(&name) else {
            continue;
        };
        if int8_quantizes(&name, &info.shape) && to_f32(info.dtype, &[]).is_some() {
            declared.push((name.clone(), Dtype::I8, info.shape.clone()));
            declared.push((int8_scale_name(&name), Dtype::F32, vec![info.shape[0]]));
            quantized += 1;
        } else {
            declared.push((name.clone(), info.dtype, info.shape.clone()));
        }
    }
    let mut metadata = reader.user_metadata().cloned().unwrap_or_default();
    metadata.insert("quantization".into(), INT8_FORMAT.into());
    let output_file = output.join("model.safetensors");
    let mut writer = SafetensorsWriter::create(&output_file, &declared, Some(metadata))?;
    let mut i = 0;
    while i < declared.len() {
        let (name, dtype, shape) = &declared[i];
        if *dtype == Dtype::I8
            && reader
                .info(name)
                .is_some_and(|info| info.dtype != Dtype::I8)
        {
            let (_, values) = reader.read_f32(name)?;
            let (q, scales) = quantize_rows_int8(&values, shape[0], shape[1]);
            let bytes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
            writer.write_next(name, &bytes)?;
            let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            writer.write_next(&declared[i + 1].0, &scale_bytes)?;
            i += 2;
        } else {
            writer.write_next(name, &reader.read_bytes(name)?)?;
            i += 1;
        }
    }
    writer.finish()?;
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(io(p));
    Ok(Int8Report {
        quantized,
        copied: declared.len() - 2 * quantized,
        bytes_in: len(&input_file)?,
        bytes_out: len(&output_file)?,
    })
}

/// Reads an INT8 export back as f32 tensors: `q · scale` for the quantized ones, every other
/// float tensor converted; name → (shape, values). A file without the `tutela-int8-v1` tag is
/// refused.
pub fn load_int8_dequantized(file: &Path) -> Result<BTreeMap<String, F32Tensor>, CheckpointError> {
    let mut reader = SafetensorsReader::open(file)?;
    let tag = reader
        .user_metadata()
        .and_then(|m| m.get("quantization"))
        .cloned();
    if tag.as_deref() != Some(INT8_FORMAT) {
        return Err(CheckpointError::Format {
            path: file.to_owned(),
            reason: format!("its quantization tag is {tag:?}, not {INT8_FORMAT:?}"),
        });
    }
    let mut out = BTreeMap::new();
    for name in reader.names() {
        let Some(info) = reader.info(&name).cloned() else {
            continue;
        };
        if info.dtype == Dtype::I8 {
            let (shape, values) = dequantize_int8_tensor(&mut reader, &name)?;
            out.insert(name, (shape, values));
        } else if name.ends_with("_scale")
            && reader
                .info(name.trim_end_matches("_scale"))
                .is_some_and(|i| i.dtype == Dtype::I8)
        {
            continue;
        } else if let Some(values) = to_f32(info.dtype, &reader.read_bytes(&name)?) {
            out.insert(name, (info.shape, values));
        }
    }
    Ok(out)
}

/// One quantized tensor of an INT8 export read back as f32 (`q · scale`, per row): its shape and
/// values. One tensor in memory at a time, for readers that stream.
pub fn dequantize_int8_tensor(
    reader: &mut SafetensorsReader,
    name: &str,
) -> Result<F32Tensor, CheckpointError> {
    let path = reader.path().to_owned();
    let info = reader
        .info(name)
        .cloned()
        .ok_or_else(|| CheckpointError::Tensor {
            path: path.clone(),
            name: name.to_owned(),
            reason: "is not in the file".into(),
        })?;
    let (scale_shape, scales) = reader.read_f32(&int8_scale_name(name))?;
    let bytes = reader.read_bytes(name)?;
    let (rows, cols) = match info.shape.as_slice() {
        [r, c] if info.dtype == Dtype::I8 && scale_shape == [*r] => (*r, *c),
        _ => {
            return Err(CheckpointError::Tensor {
                path,
                name: name.to_owned(),
                reason: format!(
                    "an int8 tensor of shape {:?} needs a scale of shape [rows], found {scale_shape:?}",
                    info.shape
                ),
            });
        }
    };
    let values = (0..rows)
        .flat_map(|r| {
            let (bytes, scale) = (&bytes, scales[r]);
            (0..cols).map(move |c| f32::from(bytes[r * cols + c] as i8) * scale)
        })
        .collect();
    Ok((info.shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
        let declared: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, _)| (n.to_string(), *d, s.clone()))
            .collect();
        let mut w = SafetensorsWriter::create(path, &declared, None).unwrap();
        for (n, d, _, v) in tensors {
            w.write_next(n, &from_f32(*d, v).unwrap()).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn our_writer_is_read_by_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write(
            &path,
            &[
                ("b", Dtype::F32, vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
                ("a", Dtype::BF16, vec![3], vec![0.5, -1.0, 2.0]),
            ],
        );
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[2, 3]);
        let mut r = SafetensorsReader::open(&path).unwrap();
        assert_eq!(r.names(), vec!["b", "a"]);
        assert_eq!(r.read_f32("a").unwrap().1, vec![0.5, -1.0, 2.0]);
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write(&path, &[("w", Dtype::F32, vec![4], vec![1., 2., 3., 4.])]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = SafetensorsReader::open(&path).err().unwrap().to_string();
        assert!(err.contains("data bytes"), "{err}");
    }

    #[test]
    fn writing_out_of_order_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let declared = vec![
            ("x".to_string(), Dtype::F32, vec![1]),
            ("y".to_string(), Dtype::F32, vec![1]),
        ];
        let mut w =
            SafetensorsWriter::create(&dir.path().join("t.safetensors"), &declared, None).unwrap();
        assert!(w.write_next("y", &[0; 4]).is_err());
    }

    #[test]
    fn int8_rows_are_within_half_a_step() {
        let values: Vec<f32> = (0..6 * 17)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let (q, scales) = quantize_rows_int8(&values, 6, 17);
        for (r, row) in values.chunks(17).enumerate() {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scales[r], max / 127.0);
            for (c, v) in row.iter().enumerate() {
                let back = f32::from(q[r * 17 + c]) * scales[r];
                assert!(
                    (back - v).abs() <= scales[r] * 0.5 * (1.0 + 1e-6),
                    "{back} {v}"
                );
            }
        }
        let (q0, s0) = quantize_rows_int8(&[0.0; 4], 1, 4);
        assert_eq!((q0, s0), (vec![0; 4], vec![0.0]));
    }
}
