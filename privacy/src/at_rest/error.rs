//! Errors of encryption at rest. Every variant that concerns a file names it, so that an operator
//! reading a log line knows which file to restore or investigate without re-running anything.

use std::io;
use std::path::PathBuf;

/// An error from a [`KeyEncryptionKey`](super::KeyEncryptionKey) implementation.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The wrapped key did not authenticate under this KEK (wrong key, or the wrapped bytes or
    /// their context were modified).
    #[error("the wrapped data key does not authenticate under this KEK")]
    Unwrap,
    /// The KEK could not do its work (KMS unreachable, HSM refused, RNG failure, ...).
    #[error("KEK backend failure: {0}")]
    Backend(String),
}

/// Everything that can go wrong when writing, reading or rotating encrypted files.
#[derive(Debug, thiserror::Error)]
pub enum AtRestError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A key file that others than its owner can read or write: refused, because a KEK readable by
    /// the group or the world protects nothing.
    #[error(
        "key file {path} has mode {mode:04o}: it must not be accessible to group or others \
         (run `chmod 600 {path}`)"
    )]
    KeyFilePermissions { path: PathBuf, mode: u32 },

    /// A key file whose content is not a 256-bit key.
    #[error("key file {path}: {reason}")]
    KeyFileFormat { path: PathBuf, reason: String },

    /// A key file placed inside the directory it is meant to protect.
    #[error(
        "key file {key} lies inside the data directory {data_dir}: the key-encryption key must \
         live outside the data it protects"
    )]
    KeyInsideDataDir { key: PathBuf, data_dir: PathBuf },

    /// An environment variable that should hold a KEK is missing or malformed.
    #[error("environment variable {var}: {reason}")]
    KeyEnv { var: String, reason: String },

    /// A chunk size outside the supported range.
    #[error("chunk size {size} is out of range: it must be between 1 byte and {max} bytes")]
    InvalidChunkSize { size: u64, max: u32 },

    /// The file does not start with the at-rest magic bytes.
    #[error("{path}: not a Tutela encrypted file (bad magic bytes); refusing to read it")]
    NotEncrypted { path: PathBuf },

    /// The header names a format version this code does not know.
    #[error("{path}: unsupported at-rest format version {version} (this build reads version 1)")]
    UnsupportedVersion { path: PathBuf, version: u16 },

    /// The header names an algorithm this code does not know.
    #[error(
        "{path}: unsupported at-rest algorithm id {algorithm} (this build knows 1 = AES-256-GCM)"
    )]
    UnsupportedAlgorithm { path: PathBuf, algorithm: u16 },

    /// The header is structurally invalid (lengths out of range, KEK id not UTF-8, ...).
    #[error("{path}: corrupt header: {reason}")]
    HeaderCorrupt { path: PathBuf, reason: String },

    /// The file is shorter than its structure requires.
    #[error("{path}: truncated: {reason}")]
    Truncated { path: PathBuf, reason: String },

    /// The file's data key is wrapped under a different KEK than the one offered.
    #[error(
        "{path}: the data key does not unwrap under KEK {offered}: the file's data key is wrapped \
         under KEK {file_kek}"
    )]
    WrongKek {
        path: PathBuf,
        file_kek: String,
        offered: String,
    },

    /// The header names the offered KEK, but the wrapped key does not authenticate under it.
    #[error(
        "{path}: the data key does not unwrap under KEK {kek}: the file header was modified, or \
         the key material of KEK {kek} is not the one this file was written with"
    )]
    HeaderAuthentication { path: PathBuf, kek: String },

    /// A KEK backend failed while working on `path`.
    #[error("{path}: KEK {kek}: {source}")]
    Kek {
        path: PathBuf,
        kek: String,
        #[source]
        source: KekError,
    },

    /// A chunk did not authenticate: its bytes were changed, or chunks were reordered, dropped,
    /// duplicated or appended, or the header came from another file.
    #[error(
        "{path}: chunk {index} at byte offset {offset}{last} failed authentication: the file was \
         modified, truncated, reordered or extended; refusing to return its data",
        last = if *last { " (the last chunk in the file)" } else { "" }
    )]
    ChunkAuthentication {
        path: PathBuf,
        index: u64,
        offset: u64,
        last: bool,
    },

    /// The secure random generator failed.
    #[error("the system random generator failed while {what}")]
    Random { what: &'static str },

    /// The writer was used after an earlier error left it in an unknown state.
    #[error("{path}: the encrypted writer failed earlier and cannot be used any more")]
    WriterPoisoned { path: PathBuf },
}

impl AtRestError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// Converts into an `io::Error` for the `Read`/`Write` impls, keeping this error as the inner
    /// error so that callers can `downcast` it back.
    pub(crate) fn into_io(self) -> io::Error {
        let kind = match &self {
            Self::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}
