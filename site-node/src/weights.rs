//! A model's parameters as named tensors of little-endian bytes, and back.
//!
//! This is the form weights take on the wire (`tutela_protocol::tensor`: a [`TensorSpec`] per
//! tensor, then its raw bytes) and in safetensors files. Exports are sorted by name, so two
//! sites with the same model list the same tensors in the same order. Loading checks every name,
//! dtype, shape and byte count before it writes anything: weights are loaded completely or not
//! at all.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn};
use tutela_protocol::tensor::{DType, Manifest, ManifestError, TensorSpec};

// Tensor bytes are copied straight out of libtorch's memory, which is in native order; the wire
// and safetensors are little-endian.
#[cfg(not(target_endian = "little"))]
compile_error!("tutela-site-node assumes a little-endian target for tensor bytes");

/// Named tensors in wire form: each tensor's description and its little-endian bytes.
pub type NamedTensors = Vec<(TensorSpec, Vec<u8>)>;

/// Why weights could not be exported, loaded, saved or read.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("tensor {name:?} has element type {kind:?}, which has no wire dtype")]
    UnsupportedKind { name: String, kind: Kind },
    #[error(
        "the weights do not match the model's tensors: missing from the weights [{}], not in \
         the model [{}]",
        .missing.join(", "),
        .unexpected.join(", ")
    )]
    NameMismatch {
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("tensor {name:?} appears more than once in the weights")]
    DuplicateName { name: String },
    #[error("tensor {name:?}: the model's shape is {expected:?}, the weights' is {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {name:?}: the model's dtype is {expected}, the weights' is {found}")]
    DTypeMismatch {
        name: String,
        expected: DType,
        found: DType,
    },
    #[error("tensor {name:?}: shape {shape:?} of {dtype} needs {expected} bytes, found {found}")]
    ByteLength {
        name: String,
        shape: Vec<u64>,
        dtype: DType,
        expected: u64,
        found: usize,
    },
    #[error("tensor {name:?}: {reason}")]
    Delta { name: String, reason: String },
    #[error("tensor {name:?} is {dtype}; only F32 tensors are supported here")]
    NotF32 { name: String, dtype: DType },
    #[error("invalid tensor manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("{}: {source}", .path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: tensor {name:?} has dtype {dtype:?}, which the wire format does not carry", .path.display())]
    UnsupportedSafetensorsDType {
        path: PathBuf,
        name: String,
        dtype: safetensors::Dtype,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor {name:?}: {context}: {source}")]
    Torch {
        name: String,
        context: &'static str,
        #[source]
        source: tch::TchError,
    },
}

fn torch(name: &str, context: &'static str) -> impl FnOnce(tch::TchError) -> WeightsError {
    let name = name.to_owned();
    move |source| WeightsError::Torch {
        name,
        context,
        source,
    }
}

/// The wire dtype of a libtorch element type.
pub fn dtype_of_kind(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Int16 => DType::I16,
        Kind::Int8 => DType::I8,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        _ => return None,
    })
}

/// The libtorch element type of a wire dtype.
pub fn kind_of_dtype(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// The tensor's name, dtype and shape.
fn spec_of(name: &str, tensor: &Tensor) -> Result<TensorSpec, WeightsError> {
    let kind = tensor.f_kind().map_err(torch(name, "reading the kind"))?;
    let dtype = dtype_of_kind(kind).ok_or_else(|| WeightsError::UnsupportedKind {
        name: name.to_owned(),
        kind,
    })?;
    let shape = tensor.size().iter().map(|&d| d.max(0) as u64).collect();
    Ok(TensorSpec::new(name, dtype, shape))
}

/// Every variable in `vs` (trainable or not), sorted by name, as wire tensors.
pub fn export_weights(vs: &nn::VarStore) -> Result<NamedTensors, WeightsError> {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    variables
        .into_iter()
        .map(|(name, tensor)| {
            let spec = spec_of(&name, &tensor)?;
            let byte_len = spec.byte_len().ok_or(ManifestError::Overflow {
                name: name.clone(),
                shape: spec.shape.clone(),
            })?;
            let host = tensor
                .f_to_device(Device::Cpu)
                .and_then(|t| t.f_contiguous())
                .map_err(torch(&name, "copying to the host"))?;
            let mut bytes = vec![0u8; byte_len as usize];
            host.f_copy_data_u8(&mut bytes, host.numel())
                .map_err(torch(&name, "reading the data"))?;
            Ok((spec, bytes))
        })
        .collect()
}

/// Overwrites the variables of `vs` with `weights`, which must name exactly the variables of
/// `vs` (in any order) with the same dtypes and shapes. Nothing is written unless all match.
pub fn load_weights(
    vs: &mut nn::VarStore,
    weights: &[(TensorSpec, Vec<u8>)],
) -> Result<(), WeightsError> {
    let variables = vs.variables();
    let mut by_name: HashMap<&str, &(TensorSpec, Vec<u8>)> = HashMap::with_capacity(weights.len());
    for entry in weights {
        if by_name.insert(entry.0.name.as_str(), entry).is_some() {
            return Err(WeightsError::DuplicateName {
                name: entry.0.name.clone(),
            });
        }
    }
    let mut missing: Vec<String> = variables
        .keys()
        .filter(|name| !by_name.contains_key(name.as_str()))
        .cloned()
        .collect();
    let mut unexpected: Vec<String> = by_name
        .keys()
        .filter(|&&name| !variables.contains_key(name))
        .map(|&name| name.to_owned())
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        missing.sort();
        unexpected.sort();
        return Err(WeightsError::NameMismatch {
            missing,
            unexpected,
        });
    }

    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    // Check everything first, so that a bad tensor late in the list leaves the model untouched.
    for &name in &names {
        let (given, bytes) = by_name[name.as_str()];
        let expected = spec_of(name, &variables[name])?;
        if given.dtype != expected.dtype {
            return Err(WeightsError::DTypeMismatch {
                name: name.clone(),
                expected: expected.dtype,
                found: given.dtype,
            });
        }
        if given.shape != expected.shape {
            return Err(WeightsError::ShapeMismatch {
                name: name.clone(),
                expected: expected.shape,
                found: given.shape.clone(),
            });
        }
        check_byte_len(given, bytes)?;
    }
    for name in names {
        let (given, bytes) = by_name[name.as_str()];
        let mut target = variables[name].shallow_clone();
        let shape: Vec<i64> = target.size();
        let source = Tensor::f_from_data_size(bytes, &shape, kind_of_dtype(given.dtype))
            .and_then(|t| t.f_to_device(target.device()))
            .map_err(torch(name, "building the tensor"))?;
        tch::no_grad(|| target.f_copy_(&source)).map_err(torch(name, "copying into the model"))?;
    }
    Ok(())
}

fn check_byte_len(spec: &TensorSpec, bytes: &[u8]) -> Result<(), WeightsError> {
    let expected = spec.byte_len().ok_or_else(|| ManifestError::Overflow {
        name: spec.name.clone(),
        shape: spec.shape.clone(),
    })?;
    if expected != bytes.len() as u64 {
        return Err(WeightsError::ByteLength {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            dtype: spec.dtype,
            expected,
            found: bytes.len(),
        });
    }
    Ok(())
}

/// The validated manifest of `weights` (names unique and non-empty, byte counts matching).
pub fn manifest(
    weights: &[(TensorSpec, Vec<u8>)],
    metadata: BTreeMap<String, String>,
) -> Result<Manifest, WeightsError> {
    for (spec, bytes) in weights {
        check_byte_len(spec, bytes)?;
    }
    Ok(Manifest::new(
        weights.iter().map(|(spec, _)| spec.clone()).collect(),
        metadata,
    )?)
}

/// `weights` as a safetensors file's bytes, tensors in the given order, with `metadata` in the
/// header's `__metadata__`.
pub fn to_safetensors_bytes(
    weights: &[(TensorSpec, Vec<u8>)],
    metadata: BTreeMap<String, String>,
    origin: &Path,
) -> Result<Vec<u8>, WeightsError> {
    let manifest = manifest(weights, metadata)?;
    let mut out = manifest
        .safetensors_header()
        .map_err(|source| WeightsError::Safetensors {
            path: origin.to_path_buf(),
            source,
        })?;
    out.reserve(manifest.total_bytes() as usize);
    for (_, bytes) in weights {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// Writes a safetensors file (readable by Python's `safetensors`), replacing `path` atomically:
/// the bytes go to a temporary file beside it, which is then renamed.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    weights: &[(TensorSpec, Vec<u8>)],
    metadata: BTreeMap<String, String>,
) -> Result<(), WeightsError> {
    let path = path.as_ref();
    let bytes = to_safetensors_bytes(weights, metadata, path)?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&partial, &bytes).map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

/// Reads a safetensors file: its tensors sorted by name, and its `__metadata__`.
pub fn load_safetensors(
    path: impl AsRef<Path>,
) -> Result<(NamedTensors, BTreeMap<String, String>), WeightsError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    from_safetensors_bytes(&bytes, path)
}

/// Parses safetensors bytes; `origin` names them in errors.
pub fn from_safetensors_bytes(
    bytes: &[u8],
    origin: &Path,
) -> Result<(NamedTensors, BTreeMap<String, String>), WeightsError> {
    let format_error = |source| WeightsError::Safetensors {
        path: origin.to_path_buf(),
        source,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(format_error)?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(format_error)?;
    let mut tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
                WeightsError::UnsupportedSafetensorsDType {
                    path: origin.to_path_buf(),
                    name: name.clone(),
                    dtype: view.dtype(),
                }
            })?;
            let shape = view.shape().iter().map(|&d| d as u64).collect();
            Ok((TensorSpec::new(name, dtype, shape), view.data().to_vec()))
        })
        .collect::<Result<NamedTensors, WeightsError>>()?;
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok((tensors, metadata))
}

/// `local − global`, tensor by tensor, for f32 tensors with the same names and shapes in the
/// same order (as [`export_weights`] gives them). The update a site sends in a round.
pub fn delta(
    local: &[(TensorSpec, Vec<u8>)],
    global: &[(TensorSpec, Vec<u8>)],
) -> Result<NamedTensors, WeightsError> {
    if local.len() != global.len() {
        let names = |w: &[(TensorSpec, Vec<u8>)]| {
            w.iter()
                .map(|(s, _)| s.name.clone())
                .collect::<std::collections::BTreeSet<_>>()
        };
        let (local_names, global_names) = (names(local), names(global));
        return Err(WeightsError::NameMismatch {
            missing: global_names.difference(&local_names).cloned().collect(),
            unexpected: local_names.difference(&global_names).cloned().collect(),
        });
    }
    local
        .iter()
        .zip(global)
        .map(|((l_spec, l_bytes), (g_spec, g_bytes))| {
            let mismatch = |reason: String| WeightsError::Delta {
                name: l_spec.name.clone(),
                reason,
            };
            if l_spec.name != g_spec.name {
                return Err(mismatch(format!(
                    "the global weights have {:?} in its place",
                    g_spec.name
                )));
            }
            for spec in [l_spec, g_spec] {
                if spec.dtype != DType::F32 {
                    return Err(WeightsError::NotF32 {
                        name: spec.name.clone(),
                        dtype: spec.dtype,
                    });
                }
            }
            if l_spec.shape != g_spec.shape {
                return Err(WeightsError::ShapeMismatch {
                    name: l_spec.name.clone(),
                    expected: g_spec.shape.clone(),
                    found: l_spec.shape.clone(),
                });
            }
            check_byte_len(l_spec, l_bytes)?;
            check_byte_len(g_spec, g_bytes)?;
            let bytes = l_bytes
                .chunks_exact(4)
                .zip(g_bytes.chunks_exact(4))
                .flat_map(|(l, g)| (f32_le(l) - f32_le(g)).to_le_bytes())
                .collect();
            Ok((l_spec.clone(), bytes))
        })
        .collect()
}

/// Decodes four little-endian bytes; callers pass `chunks_exact(4)` slices.
fn f32_le(bytes: &[u8]) -> f32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    f32::from_le_bytes(word)
}

/// Decodes an F32 tensor's bytes to values (for tests, metrics and norms).
pub fn f32_values(spec: &TensorSpec, bytes: &[u8]) -> Result<Vec<f32>, WeightsError> {
    if spec.dtype != DType::F32 {
        return Err(WeightsError::NotF32 {
            name: spec.name.clone(),
            dtype: spec.dtype,
        });
    }
    check_byte_len(spec, bytes)?;
    Ok(bytes.chunks_exact(4).map(f32_le).collect())
}
