//! The digest that names a Hugging Face checkpoint (a job's `model.base_sha256`): SHA-256 over
//! a domain tag, the canonical form of `config.json` (keys sorted recursively, no whitespace),
//! the tensor count, then for each tensor in name order its name, dtype, shape, byte length and
//! bytes, each length-prefixed (little-endian u64). It does not depend on JSON whitespace or key
//! order, on the safetensors header's order, or on sharding.
//!
//! One implementation, without libtorch: the site node hashes its checkpoint directories (and a
//! base received into memory) with [`CheckpointHasher`], the `tutela` CLI checks the directory
//! it uploads with [`checkpoint_digest_of_dir`], and the coordinator re-checks what it receives
//! with [`checkpoint_digest_of_bytes`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use crate::checkpoint::{CheckpointError, SafetensorsReader};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Why a checkpoint could not be digested. `label` names the checkpoint (a directory the caller
/// named, or "the base received from the coordinator"); nothing of its contents is quoted.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("{label}: {CONFIG_FILE} is not valid JSON: {reason}")]
    Config { label: String, reason: String },
    #[error("{label}: {WEIGHTS_FILE} is not a safetensors file: {reason}")]
    Weights { label: String, reason: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A JSON value with every object's keys sorted, recursively.
fn canonical_json(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, canonical_json(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical_json).collect()),
        other => other.clone(),
    }
}

/// The digest's framing (module documentation). Callers feed it the configuration, the tensor
/// count, then each tensor's header and bytes in name order.
pub struct CheckpointHasher(ring::digest::Context);

impl CheckpointHasher {
    /// Starts the digest with the canonical form of `config.json`'s text.
    pub fn new(config_text: &[u8]) -> Result<CheckpointHasher, serde_json::Error> {
        let config: Value = serde_json::from_slice(config_text)?;
        let canonical = serde_json::to_vec(&canonical_json(&config))?;
        let mut hasher = CheckpointHasher(ring::digest::Context::new(&ring::digest::SHA256));
        hasher.field(b"tutela/hf-checkpoint/v1");
        hasher.field(&canonical);
        Ok(hasher)
    }

    fn field(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub fn tensor_count(&mut self, count: usize) {
        self.0.update(&(count as u64).to_le_bytes());
    }

    /// A tensor's name, dtype, shape and byte length; its bytes follow through [`Self::bytes`].
    pub fn tensor_header(&mut self, name: &str, dtype: Dtype, shape: &[usize], len: usize) {
        self.field(name.as_bytes());
        self.field(format!("{dtype:?}").as_bytes());
        self.0.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            self.0.update(&(d as u64).to_le_bytes());
        }
        self.0.update(&(len as u64).to_le_bytes());
    }

    pub fn bytes(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest, lower-case hex.
    pub fn finish(self) -> String {
        hex::encode(self.0.finish().as_ref())
    }
}

/// The digest of a checkpoint held in memory: `config.json`'s text and one safetensors file's
/// bytes (`label` names it in errors).
pub fn checkpoint_digest_of_bytes(
    config_json: &[u8],
    weights: &[u8],
    label: &str,
) -> Result<String, DigestError> {
    let mut hasher = CheckpointHasher::new(config_json).map_err(|e| DigestError::Config {
        label: label.to_string(),
        reason: e.to_string(),
    })?;
    let file =
        safetensors::SafeTensors::deserialize(weights).map_err(|e| DigestError::Weights {
            label: label.to_string(),
            reason: e.to_string(),
        })?;
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    hasher.tensor_count(tensors.len());
    for (name, view) in &tensors {
        hasher.tensor_header(name, view.dtype(), view.shape(), view.data().len());
        hasher.bytes(view.data());
    }
    Ok(hasher.finish())
}

/// The digest of the checkpoint in `dir` (`config.json` and one `model.safetensors`): how
/// `tutela job submit --base-model` names the base it uploads.
pub fn checkpoint_digest_of_dir(dir: &Path) -> Result<String, DigestError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read(&config_path).map_err(|source| DigestError::Io {
        path: config_path.clone(),
        source,
    })?;
    checkpoint_digest_of_files(&text, &dir.join(WEIGHTS_FILE), &dir.display().to_string())
}

/// Most bytes of a tensor read at a time while digesting a weights file.
pub const DIGEST_READ_BYTES: usize = 1 << 20;

/// The digest of `config.json`'s text and the safetensors file at `weights`, which is read one
/// tensor at a time in pieces of [`DIGEST_READ_BYTES`]: memory stays bounded whatever the size
/// of the checkpoint or of its largest tensor (`label` names it in errors).
pub fn checkpoint_digest_of_files(
    config_json: &[u8],
    weights: &Path,
    label: &str,
) -> Result<String, DigestError> {
    let mut hasher = CheckpointHasher::new(config_json).map_err(|e| DigestError::Config {
        label: label.to_string(),
        reason: e.to_string(),
    })?;
    let mut reader = SafetensorsReader::open(weights)?;
    let mut names = reader.names();
    names.sort();
    hasher.tensor_count(names.len());
    for name in &names {
        let Some(info) = reader.info(name) else {
            continue;
        };
        let (start, end) = info.data_offsets;
        hasher.tensor_header(name, info.dtype, &info.shape.clone(), end - start);
        reader.read_chunks(name, DIGEST_READ_BYTES, &mut |bytes| hasher.bytes(bytes))?;
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(order: &[(&str, f32)]) -> Vec<u8> {
        let data: Vec<(String, Vec<u8>)> = order
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_le_bytes().repeat(2)))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(Dtype::F32, vec![2], b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn key_order_whitespace_and_tensor_order_do_not_change_the_digest() {
        let a = checkpoint_digest_of_bytes(
            br#"{"a": 1, "b": {"d": 2, "c": 3}}"#,
            &weights(&[("x", 1.0), ("y", 2.0)]),
            "a",
        )
        .unwrap();
        let b = checkpoint_digest_of_bytes(
            br#"{"b":{"c":3,"d":2},"a":1}"#,
            &weights(&[("y", 2.0), ("x", 1.0)]),
            "b",
        )
        .unwrap();
        assert_eq!(a, b);
        let changed = checkpoint_digest_of_bytes(
            br#"{"b":{"c":3,"d":2},"a":1}"#,
            &weights(&[("y", 2.5), ("x", 1.0)]),
            "c",
        )
        .unwrap();
        assert_ne!(a, changed);
    }

    #[test]
    fn the_directory_digest_is_the_in_memory_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = br#"{"hidden_size": 4, "model_type": "llama"}"#;
        let bytes = weights(&[("b", 3.0), ("a", -1.0)]);
        std::fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), &bytes).unwrap();
        assert_eq!(
            checkpoint_digest_of_dir(dir.path()).unwrap(),
            checkpoint_digest_of_bytes(config, &bytes, "m").unwrap()
        );
    }

    #[test]
    fn bad_input_is_named() {
        let e = checkpoint_digest_of_bytes(b"{", &weights(&[("a", 1.0)]), "the base").unwrap_err();
        assert!(e.to_string().contains("the base: config.json"), "{e}");
        let e = checkpoint_digest_of_bytes(b"{}", b"not safetensors", "the base").unwrap_err();
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }
}
