//! Tensor descriptions: dtypes, shapes, and the manifest that opens every tensor stream.
//!
//! A [`Manifest`] is validated once, when it is built from the wire or from a safetensors header;
//! afterwards every tensor's byte length is known to match its shape and dtype, names are unique
//! and non-empty, and the total size does not overflow.

use std::collections::BTreeMap;

use crate::pb;

/// Element types that travel on the wire. Bytes are always little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn to_pb(self) -> pb::DType {
        match self {
            DType::F32 => pb::DType::DtypeF32,
            DType::F64 => pb::DType::DtypeF64,
            DType::F16 => pb::DType::DtypeF16,
            DType::BF16 => pb::DType::DtypeBf16,
            DType::I64 => pb::DType::DtypeI64,
            DType::I32 => pb::DType::DtypeI32,
            DType::I16 => pb::DType::DtypeI16,
            DType::I8 => pb::DType::DtypeI8,
            DType::U8 => pb::DType::DtypeU8,
            DType::Bool => pb::DType::DtypeBool,
        }
    }

    /// Reads the wire value; `None` for `DTYPE_UNSPECIFIED` and for numbers this build does not
    /// know (a newer peer's dtype): both are refused by the caller with the tensor's name.
    pub fn from_pb(value: i32) -> Option<DType> {
        Some(match pb::DType::try_from(value).ok()? {
            pb::DType::DtypeUnspecified => return None,
            pb::DType::DtypeF32 => DType::F32,
            pb::DType::DtypeF64 => DType::F64,
            pb::DType::DtypeF16 => DType::F16,
            pb::DType::DtypeBf16 => DType::BF16,
            pb::DType::DtypeI64 => DType::I64,
            pb::DType::DtypeI32 => DType::I32,
            pb::DType::DtypeI16 => DType::I16,
            pb::DType::DtypeI8 => DType::I8,
            pb::DType::DtypeU8 => DType::U8,
            pb::DType::DtypeBool => DType::Bool,
        })
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::F64 => safetensors::Dtype::F64,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::I64 => safetensors::Dtype::I64,
            DType::I32 => safetensors::Dtype::I32,
            DType::I16 => safetensors::Dtype::I16,
            DType::I8 => safetensors::Dtype::I8,
            DType::U8 => safetensors::Dtype::U8,
            DType::Bool => safetensors::Dtype::BOOL,
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        Some(match d {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::I32 => DType::I32,
            safetensors::Dtype::I16 => DType::I16,
            safetensors::Dtype::I8 => DType::I8,
            safetensors::Dtype::U8 => DType::U8,
            safetensors::Dtype::BOOL => DType::Bool,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_safetensors())
    }
}

/// One tensor's name, dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<u64>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Bytes of raw data; `None` if the shape overflows 64 bits.
    pub fn byte_len(&self) -> Option<u64> {
        self.numel()?.checked_mul(self.dtype.size())
    }
}

/// The ordered list of tensors a stream carries, plus string metadata.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Manifest {
    tensors: Vec<TensorSpec>,
    byte_lens: Vec<u64>,
    total_bytes: u64,
    pub metadata: BTreeMap<String, String>,
}

/// Why a manifest is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("tensor #{index} has an empty name")]
    EmptyName { index: usize },
    #[error("tensor {name:?} appears twice")]
    DuplicateName { name: String },
    #[error(
        "tensor {name:?} has unknown dtype {value} (this build knows F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL)"
    )]
    UnknownDType { name: String, value: String },
    #[error(
        "tensor {name:?}: shape {shape:?} of {dtype} is {expected} bytes, but {declared} bytes were declared"
    )]
    ShapeMismatch {
        name: String,
        shape: Vec<u64>,
        dtype: DType,
        expected: u64,
        declared: u64,
    },
    #[error("tensor {name:?}: shape {shape:?} overflows 64 bits")]
    Overflow { name: String, shape: Vec<u64> },
    #[error("the model has more than {max} tensors")]
    TooManyTensors { max: usize },
    /// A name outside [`is_safe_tensor_name`]'s set: it would become a safetensors header key
    /// (where `__metadata__` is reserved) or a file name, so it is refused before anything is
    /// stored.
    #[error(
        "tensor #{index} has the name {name:?}, which is not allowed: a tensor name is 1-{max} \
         characters of A-Z a-z 0-9 _ . -, not starting with '.' or '-', and not `__metadata__`",
        max = MAX_TENSOR_NAME_LEN
    )]
    UnsafeName { index: usize, name: String },
}

/// The longest tensor name accepted (Hugging Face names are well under 200 characters).
pub const MAX_TENSOR_NAME_LEN: usize = 256;

/// Whether `name` may name a tensor on the wire: 1 to [`MAX_TENSOR_NAME_LEN`] characters of
/// `[A-Za-z0-9_.-]`, not starting with `.` or `-` (no hidden files, no option-looking names), and
/// not `__metadata__`, the key safetensors reserves for its header metadata. No path separator
/// can appear, so a name never escapes the directory a sink writes under.
pub fn is_safe_tensor_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TENSOR_NAME_LEN
        && name != SAFETENSORS_METADATA_KEY
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The header key safetensors reserves for a file's string metadata: a tensor of that name would
/// be written into a file that no reader (ours, the `safetensors` crate, Python's) can read back.
pub const SAFETENSORS_METADATA_KEY: &str = "__metadata__";

impl Manifest {
    /// Bounds the size of the manifest frame a peer can make us hold; real models have at most
    /// tens of thousands of tensors.
    pub const MAX_TENSORS: usize = 1 << 20;

    pub fn new(
        tensors: Vec<TensorSpec>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self, ManifestError> {
        if tensors.len() > Self::MAX_TENSORS {
            return Err(ManifestError::TooManyTensors {
                max: Self::MAX_TENSORS,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(tensors.len());
        let mut byte_lens = Vec::with_capacity(tensors.len());
        let mut total: u64 = 0;
        for (index, t) in tensors.iter().enumerate() {
            if t.name.is_empty() {
                return Err(ManifestError::EmptyName { index });
            }
            if !is_safe_tensor_name(&t.name) {
                // Shortened: the name is echoed in the error and may be huge.
                let name: String = t.name.chars().take(64).collect();
                return Err(ManifestError::UnsafeName { index, name });
            }
            if !seen.insert(t.name.as_str()) {
                return Err(ManifestError::DuplicateName {
                    name: t.name.clone(),
                });
            }
            let overflow = || ManifestError::Overflow {
                name: t.name.clone(),
                shape: t.shape.clone(),
            };
            let len = t.byte_len().ok_or_else(overflow)?;
            total = total.checked_add(len).ok_or_else(overflow)?;
            byte_lens.push(len);
        }
        Ok(Manifest {
            tensors,
            byte_lens,
            total_bytes: total,
            metadata,
        })
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    pub fn byte_len(&self, index: usize) -> u64 {
        self.byte_lens[index]
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Validates a manifest received from a peer.
    pub fn from_pb(m: pb::ModelManifest) -> Result<Self, ManifestError> {
        if m.tensors.len() > Self::MAX_TENSORS {
            return Err(ManifestError::TooManyTensors {
                max: Self::MAX_TENSORS,
            });
        }
        let mut tensors = Vec::with_capacity(m.tensors.len());
        for (index, t) in m.tensors.into_iter().enumerate() {
            // The name first: every other error quotes it.
            if !t.name.is_empty() && !is_safe_tensor_name(&t.name) {
                let name: String = t.name.chars().take(64).collect();
                return Err(ManifestError::UnsafeName { index, name });
            }
            let dtype = DType::from_pb(t.dtype).ok_or_else(|| ManifestError::UnknownDType {
                name: t.name.clone(),
                value: pb::DType::try_from(t.dtype)
                    .map(|d| d.as_str_name().to_string())
                    .unwrap_or_else(|_| t.dtype.to_string()),
            })?;
            let spec = TensorSpec {
                name: t.name,
                dtype,
                shape: t.shape,
            };
            let expected = spec.byte_len().ok_or_else(|| ManifestError::Overflow {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
            })?;
            if expected != t.byte_length {
                return Err(ManifestError::ShapeMismatch {
                    name: spec.name,
                    shape: spec.shape,
                    dtype,
                    expected,
                    declared: t.byte_length,
                });
            }
            tensors.push(spec);
        }
        Manifest::new(tensors, m.metadata.into_iter().collect())
    }

    pub fn to_pb(&self) -> pb::ModelManifest {
        pb::ModelManifest {
            tensors: self
                .tensors
                .iter()
                .zip(&self.byte_lens)
                .map(|(t, &len)| pb::TensorInfo {
                    name: t.name.clone(),
                    dtype: t.dtype.to_pb() as i32,
                    shape: t.shape.clone(),
                    byte_length: len,
                })
                .collect(),
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// The canonical encoding the stream digest starts with: every field in a fixed order with
    /// explicit lengths, metadata sorted by key. Two manifests encode equal iff they are equal.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.tensors.len() * 64);
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        for (t, &len) in self.tensors.iter().zip(&self.byte_lens) {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dtype.to_pb() as i32 as u32).to_le_bytes());
            out.extend_from_slice(&(t.shape.len() as u64).to_le_bytes());
            for d in &t.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        out
    }

    /// The safetensors header for these tensors laid out back to back in manifest order, padded
    /// with spaces to a multiple of 8 bytes as the format recommends. Returns the 8-byte length
    /// prefix followed by the JSON.
    pub fn safetensors_header(&self) -> Result<Vec<u8>, safetensors::SafeTensorError> {
        let mut offset = 0usize;
        let mut infos = Vec::with_capacity(self.tensors.len());
        for (t, &len) in self.tensors.iter().zip(&self.byte_lens) {
            let len = usize::try_from(len)
                .map_err(|_| safetensors::SafeTensorError::ValidationOverflow)?;
            let shape = t
                .shape
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| safetensors::SafeTensorError::ValidationOverflow)?;
            infos.push((
                t.name.clone(),
                safetensors::tensor::TensorInfo {
                    dtype: t.dtype.to_safetensors(),
                    shape,
                    data_offsets: (offset, offset + len),
                },
            ));
            offset += len;
        }
        let metadata = (!self.metadata.is_empty()).then(|| {
            self.metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        let meta = safetensors::tensor::Metadata::new(metadata, infos)?;
        let mut json = serde_json::to_vec(&meta)
            .map_err(safetensors::SafeTensorError::InvalidHeaderDeserialization)?;
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + json.len());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[u64]) -> TensorSpec {
        TensorSpec::new(name, dtype, shape.to_vec())
    }

    #[test]
    fn pb_round_trip_and_byte_lengths() {
        let m = Manifest::new(
            vec![
                spec("w", DType::F32, &[3, 4]),
                spec("b", DType::BF16, &[4]),
                spec("scalar", DType::I64, &[]),
                spec("empty", DType::U8, &[0, 5]),
            ],
            [("k".to_string(), "v".to_string())].into(),
        )
        .unwrap();
        assert_eq!(m.total_bytes(), 48 + 8 + 8);
        let back = Manifest::from_pb(m.to_pb()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn unsafe_tensor_names_are_refused_at_the_manifest() {
        let long = "a".repeat(MAX_TENSOR_NAME_LEN + 1);
        for name in [
            "__metadata__",
            "../escape",
            "a/b",
            "a\\b",
            ".hidden",
            "-rf",
            "nul\0byte",
            "space name",
            "é",
            long.as_str(),
        ] {
            let err =
                Manifest::new(vec![spec(name, DType::F32, &[1])], BTreeMap::new()).unwrap_err();
            assert!(
                matches!(err, ManifestError::UnsafeName { index: 0, .. }),
                "{name:?}: {err}"
            );
            // A peer's manifest is checked the same way.
            let mut pbm = Manifest::new(vec![spec("w", DType::F32, &[1])], BTreeMap::new())
                .unwrap()
                .to_pb();
            pbm.tensors[0].name = name.to_string();
            assert!(matches!(
                Manifest::from_pb(pbm).unwrap_err(),
                ManifestError::UnsafeName { .. }
            ));
        }
        let hf = "model.layers.0.self_attn.q_proj.lora_A.weight";
        let ok = ["fc0.weight", "out.bias", "conv1.weight", "a-b_c.9", hf];
        let fine = ok.iter().map(|n| spec(n, DType::F32, &[1])).collect();
        Manifest::new(fine, BTreeMap::new()).unwrap();
        assert!(is_safe_tensor_name(&"a".repeat(MAX_TENSOR_NAME_LEN)));
    }

    #[test]
    fn wrong_byte_count_unknown_dtype_and_duplicates_are_refused() {
        let mut pbm = Manifest::new(vec![spec("w", DType::F32, &[3])], BTreeMap::new())
            .unwrap()
            .to_pb();
        pbm.tensors[0].byte_length = 11;
        let err = Manifest::from_pb(pbm.clone()).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::ShapeMismatch {
                expected: 12,
                declared: 11,
                ..
            }
        ));
        assert!(err.to_string().contains("\"w\""));

        pbm.tensors[0].byte_length = 12;
        pbm.tensors[0].dtype = 99;
        assert!(matches!(
            Manifest::from_pb(pbm.clone()).unwrap_err(),
            ManifestError::UnknownDType { .. }
        ));
        pbm.tensors[0].dtype = 0;
        assert!(matches!(
            Manifest::from_pb(pbm).unwrap_err(),
            ManifestError::UnknownDType { .. }
        ));

        let dup = Manifest::new(
            vec![spec("a", DType::U8, &[1]), spec("a", DType::U8, &[1])],
            BTreeMap::new(),
        );
        assert!(matches!(
            dup.unwrap_err(),
            ManifestError::DuplicateName { .. }
        ));
        let overflow = Manifest::new(
            vec![spec("big", DType::F64, &[u64::MAX, 2])],
            BTreeMap::new(),
        );
        assert!(matches!(
            overflow.unwrap_err(),
            ManifestError::Overflow { .. }
        ));
    }

    /// Found by the `stream_frames` fuzz target: a stream with a tensor named `__metadata__` was
    /// accepted and stored as a file that could not be read back.
    #[test]
    fn a_tensor_named_like_the_safetensors_metadata_is_refused() {
        let err = Manifest::new(
            vec![
                spec("w", DType::F32, &[1]),
                spec(SAFETENSORS_METADATA_KEY, DType::U8, &[1]),
            ],
            BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            ManifestError::UnsafeName {
                index: 1,
                name: "__metadata__".into()
            }
        );
        // A metadata key of that name is only metadata.
        Manifest::new(
            vec![spec("w", DType::F32, &[1])],
            [("__metadata__".to_string(), "x".to_string())].into(),
        )
        .unwrap();
    }

    #[test]
    fn canonical_bytes_distinguish_manifests() {
        let a = Manifest::new(vec![spec("ab", DType::U8, &[1])], BTreeMap::new()).unwrap();
        let b = Manifest::new(
            vec![spec("a", DType::U8, &[1])],
            [("b".into(), "".into())].into(),
        )
        .unwrap();
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }

    #[test]
    fn safetensors_header_parses_with_the_safetensors_crate() {
        let m = Manifest::new(
            vec![spec("w", DType::F32, &[2, 2]), spec("b", DType::F16, &[3])],
            [("format".to_string(), "pt".to_string())].into(),
        )
        .unwrap();
        let mut file = m.safetensors_header().unwrap();
        assert_eq!((file.len() - 8) % 8, 0);
        file.extend(std::iter::repeat_n(7u8, m.total_bytes() as usize));
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("w").unwrap().shape(), &[2, 2]);
        assert_eq!(st.tensor("b").unwrap().data().len(), 6);
    }
}
