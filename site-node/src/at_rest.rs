//! The node's files on disk, encrypted: a tensor-stream sink that writes a received model as a
//! safetensors file through `tutela_privacy::at_rest`'s chunked AES-256-GCM format, so no
//! plaintext byte of it reaches the disk (not in a temporary file either).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use tutela_privacy::at_rest::{EncryptedWriter, KeyEncryptionKey};
use tutela_protocol::stream::{SinkError, TensorSink};
use tutela_protocol::tensor::Manifest;

/// Writes a received model, encrypted, at `path`. The writer encrypts into a temporary file in
/// the same directory and renames it into place only on commit (after the stream's digest
/// verified); dropped earlier, it deletes the temporary file.
pub struct EncryptedSafetensorsSink {
    path: PathBuf,
    kek: Arc<dyn KeyEncryptionKey>,
    writer: Option<EncryptedWriter>,
}

impl EncryptedSafetensorsSink {
    pub fn new(path: PathBuf, kek: Arc<dyn KeyEncryptionKey>) -> Self {
        EncryptedSafetensorsSink {
            path,
            kek,
            writer: None,
        }
    }

    fn writer(&mut self) -> Result<&mut EncryptedWriter, SinkError> {
        self.writer
            .as_mut()
            .ok_or_else(|| SinkError::Io(std::io::Error::other("write before begin")))
    }
}

fn storage(e: tutela_privacy::at_rest::AtRestError) -> SinkError {
    SinkError::Io(std::io::Error::other(e))
}

impl TensorSink for EncryptedSafetensorsSink {
    type Output = PathBuf;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        let header = manifest.safetensors_header().map_err(|e| {
            SinkError::Rejected(format!(
                "the manifest cannot be written as safetensors: {e}"
            ))
        })?;
        let mut writer = EncryptedWriter::create(&self.path, &*self.kek).map_err(storage)?;
        writer.write_all(&header)?;
        self.writer = Some(writer);
        Ok(())
    }

    fn write(&mut self, _index: usize, _offset: u64, data: &[u8]) -> Result<(), SinkError> {
        // The decoder guarantees order and contiguity; the header lays tensors back to back.
        self.writer()?.write_all(data)?;
        Ok(())
    }

    fn commit(mut self, _digest: &[u8; 32]) -> Result<PathBuf, SinkError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| SinkError::Io(std::io::Error::other("commit before begin")))?;
        writer.finish().map_err(storage)
    }
}
