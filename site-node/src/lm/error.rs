//! Why a language model could not be configured, built, loaded, saved or run.

use std::path::PathBuf;

/// Errors of [`crate::lm`]. Paths are the site's own (these errors are printed locally, never
/// sent to the coordinator).
#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("{}: {reason}", .path.display())]
    Config { path: PathBuf, reason: String },
    #[error("model configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "{}: the checkpoint's tensors do not match the model's: missing from the checkpoint [{}], \
         not in the model [{}]",
        .path.display(),
        .missing.join(", "),
        .unexpected.join(", ")
    )]
    TensorMismatch {
        path: PathBuf,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("{}: tensor {name:?} has shape {found:?}, the model expects {expected:?}", .path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<usize>,
    },
    #[error("{}: tensor {name:?} has dtype {dtype:?}; only F32, F16 and BF16 weights are read", .path.display())]
    UnsupportedDType {
        path: PathBuf,
        name: String,
        dtype: safetensors::Dtype,
    },
    #[error("{}: tensor {name:?} appears in more than one file", .path.display())]
    DuplicateTensor { path: PathBuf, name: String },
    #[error("{}: the checkpoint's digest is {found}, the job names {expected}", .path.display())]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{}: {source}", .path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error(transparent)]
    Lora(#[from] crate::lm::lora::LoraError),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
}

impl LmError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LmError {
        let path = path.into();
        move |source| LmError::Io { path, source }
    }

    pub(crate) fn torch(context: impl Into<String>) -> impl FnOnce(tch::TchError) -> LmError {
        let context = context.into();
        move |source| LmError::Torch { context, source }
    }
}
