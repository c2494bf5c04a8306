//! Checkpoints in the Hugging Face layout: a directory with `config.json` and
//! `model.safetensors` (or shards listed by `model.safetensors.index.json`), tensors named as
//! transformers names them. What we save, `from_pretrained` loads; what transformers saves, we
//! load.
//!
//! Safetensors files are read one tensor at a time (the header, then a seek and a read per
//! tensor), never whole: a multi-gigabyte checkpoint costs the model's memory, not twice that.
//! The file's tensor names are compared with the model's before anything is read: a missing
//! or an extra tensor is refused, naming each (tch's `VarStore::load` ignores extra tensors).
//! Each tensor is converted to the model's dtype on load (an F16/BF16 file loads into an F32
//! model unless the caller asked for another kind), so the file never changes the model's
//! precision behind the caller's back.
//!
//! A checkpoint is named by [`checkpoint_digest`]: SHA-256 over the canonical configuration and
//! every tensor's name, dtype, shape and bytes in name order, so it does not depend on JSON
//! whitespace or key order, on the safetensors header's order, or on sharding.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError};
use serde_json::Value;
use tch::{Device, Kind, Tensor, nn};
use tutela_protocol::checkpoint_digest::CheckpointHasher;

use super::config::DecoderConfig;
use super::error::LmError;
use super::llama::{Decoder, LanguageModel};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One safetensors file's header, and the file to read tensors from.
struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// Offset of the first data byte (after the length and the JSON header).
    data_start: u64,
    tensors: Vec<(String, TensorInfo)>,
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<SafetensorsFile, LmError> {
        let mut file = File::open(path).map_err(LmError::io(path))?;
        let format = |source| LmError::Safetensors {
            path: path.to_path_buf(),
            source,
        };
        let file_len = file.metadata().map_err(LmError::io(path))?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| format(SafeTensorError::HeaderTooSmall))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
            return Err(format(SafeTensorError::InvalidHeaderLength));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(LmError::io(path))?;
        // Metadata's Deserialize validates the offsets (contiguous, sizes matching shapes).
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| format(SafeTensorError::InvalidHeaderDeserialization(e)))?;
        let mut tensors: Vec<(String, TensorInfo)> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let data_len = tensors
            .iter()
            .map(|(_, info)| info.data_offsets.1 as u64)
            .max()
            .unwrap_or(0);
        if 8 + header_len + data_len != file_len {
            return Err(format(SafeTensorError::MetadataIncompleteBuffer));
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            data_start: 8 + header_len,
            tensors,
        })
    }

    fn read(&mut self, info: &TensorInfo) -> Result<Vec<u8>, LmError> {
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(LmError::io(&self.path))?;
        Ok(bytes)
    }
}

/// The weight files of a checkpoint directory: `model.safetensors`, or the shards its index
/// names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LmError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(WEIGHTS_INDEX_FILE);
    if !index_path.exists() {
        return Err(LmError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE} in the checkpoint"),
            ),
        });
    }
    let text = std::fs::read_to_string(&index_path).map_err(LmError::io(&index_path))?;
    let bad_index = |reason: String| LmError::Config {
        path: index_path.clone(),
        reason,
    };
    let index: Value =
        serde_json::from_str(&text).map_err(|e| bad_index(format!("not valid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad_index("no \"weight_map\" object".into()))?;
    let mut files = BTreeSet::new();
    for file in map.values() {
        let name = file
            .as_str()
            .ok_or_else(|| bad_index("a weight_map value is not a file name".into()))?;
        // Shards live beside the index: a name with a directory part is refused.
        if Path::new(name).file_name() != Some(std::ffi::OsStr::new(name)) {
            return Err(bad_index(format!(
                "shard name {name:?} is not a plain file name"
            )));
        }
        files.insert(dir.join(name));
    }
    Ok(files.into_iter().collect())
}

/// The checkpoint's tensors by name: which file holds each, and where.
fn open_tensors(
    dir: &Path,
) -> Result<(Vec<SafetensorsFile>, BTreeMap<String, (usize, TensorInfo)>), LmError> {
    let mut files = Vec::new();
    let mut tensors = BTreeMap::new();
    for path in weight_files(dir)? {
        let file = SafetensorsFile::open(&path)?;
        for (name, info) in &file.tensors {
            if tensors
                .insert(name.clone(), (files.len(), info.clone()))
                .is_some()
            {
                return Err(LmError::DuplicateTensor {
                    path: path.clone(),
                    name: name.clone(),
                });
            }
        }
        files.push(file);
    }
    Ok((files, tensors))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Loads the checkpoint in `dir`: its configuration, then its weights into a model built from
/// it on `device`, in `kind` (`Kind::Float` to compute in f32 whatever the file holds).
pub fn load_checkpoint(
    dir: impl AsRef<Path>,
    device: Device,
    kind: Kind,
) -> Result<LanguageModel, LmError> {
    let dir = dir.as_ref();
    let config = DecoderConfig::load(dir.join(CONFIG_FILE))?;
    let mut vs = nn::VarStore::new(device);
    let decoder = Decoder::new(&vs.root(), &config)?;
    vs.set_kind(kind);
    load_weights(&vs, dir)?;
    Ok(LanguageModel { vs, decoder })
}

/// Overwrites every variable of `vs` with the tensor of the same name in the checkpoint
/// directory `dir`. The names must match exactly and every shape must agree; nothing is
/// written unless they do.
pub fn load_weights(vs: &nn::VarStore, dir: &Path) -> Result<(), LmError> {
    let (mut files, tensors) = open_tensors(dir)?;
    let variables = vs.variables();
    let expected: BTreeSet<&String> = variables.keys().collect();
    let found: BTreeSet<&String> = tensors.keys().collect();
    if expected != found {
        return Err(LmError::TensorMismatch {
            path: dir.to_path_buf(),
            missing: expected.difference(&found).map(|s| s.to_string()).collect(),
            unexpected: found.difference(&expected).map(|s| s.to_string()).collect(),
        });
    }
    for (name, (file, info)) in &tensors {
        let path = &files[*file].path;
        let target = &variables[name];
        let expected_shape = target.size();
        let shape_matches = info.shape.len() == expected_shape.len()
            && info
                .shape
                .iter()
                .zip(&expected_shape)
                .all(|(&a, &b)| i64::try_from(a).ok() == Some(b));
        if !shape_matches {
            return Err(LmError::ShapeMismatch {
                path: path.clone(),
                name: name.clone(),
                expected: expected_shape,
                found: info.shape.clone(),
            });
        }
        if kind_of(info.dtype).is_none() {
            return Err(LmError::UnsupportedDType {
                path: path.clone(),
                name: name.clone(),
                dtype: info.dtype,
            });
        }
    }
    for (name, (file, info)) in &tensors {
        let file = &mut files[*file];
        let bytes = file.read(info)?;
        let target = &variables[name];
        let kind = kind_of(info.dtype).unwrap_or(Kind::Float);
        let torch = LmError::torch(format!("loading {name}"));
        let loaded = Tensor::f_from_data_size(&bytes, &target.size(), kind)
            .and_then(|t| t.f_to_kind(target.kind()))
            .and_then(|t| t.f_to_device(target.device()))
            .map_err(torch)?;
        let mut target = target.shallow_clone();
        tch::no_grad(|| target.f_copy_(&loaded))
            .map_err(LmError::torch(format!("loading {name}")))?;
    }
    Ok(())
}

/// Loads the checkpoint in `dir` only if its [`checkpoint_digest`] is `expected` (lower-case
/// hex): how a site starts from the base model a job names by digest. The digest is computed
/// from the files before loading; a checkpoint that differs is refused with both digests.
pub fn load_checkpoint_with_digest(
    dir: impl AsRef<Path>,
    expected: &str,
    device: Device,
    kind: Kind,
) -> Result<LanguageModel, LmError> {
    let dir = dir.as_ref();
    let found = checkpoint_digest(dir)?;
    if !found.eq_ignore_ascii_case(expected) {
        return Err(LmError::DigestMismatch {
            path: dir.to_path_buf(),
            expected: expected.to_string(),
            found,
        });
    }
    load_checkpoint(dir, device, kind)
}

/// transformers' name for a libtorch element type, as `config.json`'s `dtype`.
fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// Writes `model` to `dir` (created if needed) as `config.json` and `model.safetensors`,
/// each replaced atomically.
pub fn save_checkpoint(model: &LanguageModel, dir: impl AsRef<Path>) -> Result<(), LmError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(LmError::io(dir))?;
    let weights = crate::weights::export_weights(&model.vs)?;
    let kind = model
        .vs
        .variables()
        .values()
        .next()
        .map_or(Kind::Float, Tensor::kind);
    let config = model.config().to_json(dtype_name(kind));
    let config_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).map_err(|e| LmError::Config {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    let partial = dir.join(format!("{CONFIG_FILE}.partial"));
    std::fs::write(&partial, text + "\n").map_err(LmError::io(&partial))?;
    std::fs::rename(&partial, &config_path).map_err(LmError::io(&config_path))?;
    let metadata = [("format".to_string(), "pt".to_string())].into();
    let weights_path = dir.join(WEIGHTS_FILE);
    crate::weights::save_safetensors(&weights_path, &weights, metadata)?;
    Ok(())
}

/// The digest's framing, [`tutela_protocol::checkpoint_digest`]'s (one implementation for the
/// CLI, the coordinator and the site), started with `config.json`'s text (`path` names it in
/// errors).
fn checkpoint_hasher(config_text: &[u8], path: &Path) -> Result<CheckpointHasher, LmError> {
    CheckpointHasher::new(config_text).map_err(|e| LmError::Config {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// The SHA-256 digest (lower-case hex) that names the checkpoint in `dir`: the canonical form of
/// `config.json` (keys sorted, no whitespace), then for each tensor in name order its name,
/// dtype, shape and bytes, each length-prefixed. Tensors are streamed, 1 MiB at a time.
pub fn checkpoint_digest(dir: impl AsRef<Path>) -> Result<String, LmError> {
    let dir = dir.as_ref();
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read(&config_path).map_err(LmError::io(&config_path))?;
    let mut hasher = checkpoint_hasher(&text, &config_path)?;
    let (mut files, tensors) = open_tensors(dir)?;
    hasher.tensor_count(tensors.len());
    let mut buffer = vec![0u8; 1 << 20];
    for (name, (file, info)) in &tensors {
        let file = &mut files[*file];
        let (start, end) = info.data_offsets;
        hasher.tensor_header(name, info.dtype, &info.shape, end - start);
        file.file
            .seek(SeekFrom::Start(file.data_start + start as u64))
            .map_err(LmError::io(&file.path))?;
        let mut left = end - start;
        while left > 0 {
            let chunk = left.min(buffer.len());
            file.file
                .read_exact(&mut buffer[..chunk])
                .map_err(LmError::io(&file.path))?;
            hasher.bytes(&buffer[..chunk]);
            left -= chunk;
        }
    }
    Ok(hasher.finish())
}

/// The [`checkpoint_digest`] of a checkpoint held in memory: `config.json`'s text and one
/// safetensors file's bytes (`label` names the checkpoint in errors: e.g. "the base received
/// from the coordinator"). How a site checks a base it received before anything of it is kept.
pub fn checkpoint_digest_of_bytes(
    config_json: &[u8],
    weights: &[u8],
    label: &str,
) -> Result<String, LmError> {
    tutela_protocol::checkpoint_digest::checkpoint_digest_of_bytes(config_json, weights, label)
        .map_err(|e| LmError::Config {
            path: PathBuf::from(label),
            reason: e.to_string(),
        })
}

/// Loads an INT8 weight-only export (`tutela model export-int8`, format
/// [`tutela_protocol::checkpoint::INT8_FORMAT`]) dequantized to f32 (`W ≈ q · scale` per output
/// channel): how its perplexity cost is measured. The tensor names must be the model's, as for
/// [`load_checkpoint`].
pub fn load_int8_checkpoint(
    dir: impl AsRef<Path>,
    device: Device,
) -> Result<LanguageModel, LmError> {
    let dir = dir.as_ref();
    let config = DecoderConfig::load(dir.join(CONFIG_FILE))?;
    let vs = nn::VarStore::new(device);
    let decoder = Decoder::new(&vs.root(), &config)?;
    let path = dir.join(WEIGHTS_FILE);
    let tensors =
        tutela_protocol::checkpoint::load_int8_dequantized(&path).map_err(|e| LmError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let variables = vs.variables();
    let expected: BTreeSet<&String> = variables.keys().collect();
    let found: BTreeSet<&String> = tensors.keys().collect();
    if expected != found {
        return Err(LmError::TensorMismatch {
            path,
            missing: expected.difference(&found).map(|s| s.to_string()).collect(),
            unexpected: found.difference(&expected).map(|s| s.to_string()).collect(),
        });
    }
    for (name, (shape, values)) in &tensors {
        let target = &variables[name];
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if dims != target.size() {
            return Err(LmError::ShapeMismatch {
                path,
                name: name.clone(),
                expected: target.size(),
                found: shape.clone(),
            });
        }
        let loaded = Tensor::f_from_slice(values)
            .and_then(|t| t.f_view(dims.as_slice()))
            .and_then(|t| t.f_to_device(device))
            .map_err(LmError::torch(format!("loading {name}")))?;
        tch::no_grad(|| target.shallow_clone().f_copy_(&loaded))
            .map_err(LmError::torch(format!("loading {name}")))?;
    }
    Ok(LanguageModel { vs, decoder })
}

/// Whether `dir` holds an INT8 export (its `model.safetensors` carries the
/// `tutela-int8-v1` quantization tag).
pub fn is_int8_export(dir: impl AsRef<Path>) -> bool {
    let path = dir.as_ref().join(WEIGHTS_FILE);
    let Ok(mut file) = File::open(&path) else {
        return false;
    };
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return false;
    }
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return false;
    }
    let mut header = vec![0u8; len as usize];
    if file.read_exact(&mut header).is_err() {
        return false;
    }
    serde_json::from_slice::<Value>(&header)
        .ok()
        .and_then(|h| {
            h.get("__metadata__")?
                .get("quantization")?
                .as_str()
                .map(|s| s == tutela_protocol::checkpoint::INT8_FORMAT)
        })
        .unwrap_or(false)
}
