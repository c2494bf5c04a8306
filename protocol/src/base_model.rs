//! A job's base checkpoint on the wire (`Jobs.UploadBaseModel`, `Federation.FetchBaseModel`):
//! `config.json` and one `model.safetensors`, byte for byte, in [`pb::BaseModelChunk`]s of at
//! most [`CHUNK_BYTES`] of weights. The first chunk carries the digest and both lengths; the
//! receiver bounds what it accepts before it allocates, and checks the digest itself
//! ([`crate::checkpoint_digest`]) before it keeps anything.

use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};

use crate::checkpoint_digest::{CONFIG_FILE, DigestError, WEIGHTS_FILE, checkpoint_digest_of_dir};
use crate::pb;

/// Most weight bytes in one chunk.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Most bytes of `config.json` accepted.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// A base checkpoint received whole into memory; its digest is what the sender claimed, not yet
/// checked.
#[derive(Debug, Clone)]
pub struct ReceivedBaseModel {
    pub claimed_sha256: String,
    pub config_json: Vec<u8>,
    pub weights: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum BaseTransferError {
    #[error("the base-model stream is empty")]
    Empty,
    #[error("the base-model stream is malformed: {0}")]
    Malformed(String),
    #[error("the base model is {len} bytes, more than the {max} accepted")]
    TooLarge { len: u64, max: u64 },
    #[error("the base-model stream broke: {0}")]
    Transport(String),
    /// Where the weights were being written failed (a full disk): the receiver's side.
    #[error("keeping the received weights: {0}")]
    Sink(#[source] std::io::Error),
}

/// The chunks that carry a base: the first with the digest, `config.json` and the total
/// weights length, then the weights.
pub fn chunks(sha256: &str, config_json: Vec<u8>, weights: &[u8]) -> Vec<pb::BaseModelChunk> {
    let mut out = vec![pb::BaseModelChunk {
        sha256: sha256.to_string(),
        config_json,
        weights_len: weights.len() as u64,
        weights: Vec::new(),
    }];
    out.extend(weights.chunks(CHUNK_BYTES).map(|c| pb::BaseModelChunk {
        weights: c.to_vec(),
        ..Default::default()
    }));
    out
}

/// [`chunks`] as a stream, for a client-streaming call.
pub fn chunk_stream(
    sha256: &str,
    config_json: Vec<u8>,
    weights: &[u8],
) -> impl Stream<Item = pb::BaseModelChunk> + Send + 'static {
    futures::stream::iter(chunks(sha256, config_json, weights))
}

/// Why a directory cannot be uploaded as a job's base.
#[derive(Debug, thiserror::Error)]
pub enum BaseUploadError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(
        "{dir}: the checkpoint's digest is {found}, but the job's model.base_sha256 is {expected}"
    )]
    Mismatch {
        dir: String,
        expected: String,
        found: String,
    },
    #[error(
        "the job names no model.base_sha256: a base model is uploaded only for a job that names it"
    )]
    NotNamed,
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The base in `dir` checked against the job's `model.base_sha256` (`expected`), read for
/// upload: its digest, `config.json`'s text and the weights file's bytes.
pub fn read_for_upload(
    dir: &Path,
    expected: Option<&str>,
) -> Result<(String, Vec<u8>, Vec<u8>), BaseUploadError> {
    let expected = expected.ok_or(BaseUploadError::NotNamed)?;
    let found = checkpoint_digest_of_dir(dir)?;
    if found != expected {
        return Err(BaseUploadError::Mismatch {
            dir: dir.display().to_string(),
            expected: expected.to_string(),
            found,
        });
    }
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| BaseUploadError::Io { path, source })
    };
    Ok((found, read(CONFIG_FILE)?, read(WEIGHTS_FILE)?))
}

/// Where [`receive_into`] puts a base's weights as they arrive: memory ([`Vec<u8>`], what
/// [`receive`] uses), or a spool file that hashes as it writes (the coordinator's).
pub trait WeightsSink {
    /// The announced length of the weights (already checked against the caller's bound),
    /// before any of them arrive.
    fn announced(&mut self, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    /// The next piece of the weights, in order, at most [`CHUNK_BYTES`].
    fn write_chunk(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

impl WeightsSink for Vec<u8> {
    fn announced(&mut self, len: u64) -> std::io::Result<()> {
        self.reserve_exact(len as usize);
        Ok(())
    }
    fn write_chunk(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// What the first chunk of a base announced: the claimed digest (not yet checked),
/// `config.json`'s text and the weights' length.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub claimed_sha256: String,
    pub config_json: Vec<u8>,
    pub weights_len: u64,
}

/// Receives a base whole into memory; see [`receive_into`] for the bounds.
pub async fn receive<S>(stream: S, max_bytes: u64) -> Result<ReceivedBaseModel, BaseTransferError>
where
    S: Stream<Item = Result<pb::BaseModelChunk, tonic::Status>> + Unpin,
{
    let mut weights = Vec::new();
    let announced = receive_into(stream, max_bytes, &mut weights).await?;
    Ok(ReceivedBaseModel {
        claimed_sha256: announced.claimed_sha256,
        config_json: announced.config_json,
        weights,
    })
}

/// Receives a base, handing its weights to `sink` chunk by chunk as they arrive (nothing is
/// buffered here beyond the chunk in hand), refusing one larger than `max_bytes` (config +
/// weights) before any weights reach the sink, a chunk over [`CHUNK_BYTES`], and a stream that
/// ends short or runs long. An error of the sink is [`BaseTransferError::Sink`].
pub async fn receive_into<S, W>(
    mut stream: S,
    max_bytes: u64,
    sink: &mut W,
) -> Result<Announcement, BaseTransferError>
where
    S: Stream<Item = Result<pb::BaseModelChunk, tonic::Status>> + Unpin,
    W: WeightsSink + ?Sized,
{
    let transport =
        |s: tonic::Status| BaseTransferError::Transport(format!("{:?}: {}", s.code(), s.message()));
    let first = stream
        .next()
        .await
        .ok_or(BaseTransferError::Empty)?
        .map_err(transport)?;
    if first.config_json.len() > MAX_CONFIG_BYTES {
        return Err(BaseTransferError::Malformed(format!(
            "config.json of {} bytes (at most {MAX_CONFIG_BYTES})",
            first.config_json.len()
        )));
    }
    let len = first
        .weights_len
        .saturating_add(first.config_json.len() as u64);
    if len > max_bytes {
        return Err(BaseTransferError::TooLarge {
            len,
            max: max_bytes,
        });
    }
    let expected = first.weights_len;
    sink.announced(expected).map_err(BaseTransferError::Sink)?;
    let mut received = 0u64;
    let mut take = |bytes: &[u8], sink: &mut W| -> Result<(), BaseTransferError> {
        if bytes.len() > CHUNK_BYTES {
            return Err(BaseTransferError::Malformed(format!(
                "a chunk of {} bytes (at most {CHUNK_BYTES})",
                bytes.len()
            )));
        }
        if received + bytes.len() as u64 > expected {
            return Err(BaseTransferError::Malformed(format!(
                "more weight bytes than the {expected} announced"
            )));
        }
        received += bytes.len() as u64;
        if bytes.is_empty() {
            return Ok(());
        }
        sink.write_chunk(bytes).map_err(BaseTransferError::Sink)
    };
    take(&first.weights, sink)?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        take(&chunk.weights, sink)?;
    }
    if received != expected {
        return Err(BaseTransferError::Malformed(format!(
            "{received} weight bytes received, {expected} announced"
        )));
    }
    Ok(Announcement {
        claimed_sha256: first.sha256,
        config_json: first.config_json,
        weights_len: expected,
    })
}

/// A stored base served from disk: the first chunk (digest, `config.json`, the weights' length)
/// then the weights file read [`CHUNK_BYTES`] at a time as the receiver takes them, so at most
/// one chunk of it is in memory whatever its size. A file that changes length while it is
/// served ends the stream with an error (the receiver also checks the announced length).
pub fn file_chunk_stream(
    sha256: &str,
    config_json: Vec<u8>,
    weights: std::fs::File,
    weights_len: u64,
) -> impl Stream<Item = Result<pb::BaseModelChunk, std::io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    let first = pb::BaseModelChunk {
        sha256: sha256.to_string(),
        config_json,
        weights_len,
        weights: Vec::new(),
    };
    let rest = futures::stream::try_unfold(
        (tokio::fs::File::from_std(weights), weights_len),
        |(mut file, left)| async move {
            if left == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            let n = CHUNK_BYTES.min(left as usize);
            let mut bytes = vec![0u8; n];
            file.read_exact(&mut bytes).await?;
            let chunk = pb::BaseModelChunk {
                weights: bytes,
                ..Default::default()
            };
            Ok(Some((chunk, (file, left - n as u64))))
        },
    );
    futures::stream::once(async move { Ok(first) }).chain(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_whose_digest_is_not_the_jobs_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 2.0f32.to_le_bytes().repeat(3);
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &bytes).unwrap();
        let weights = safetensors::serialize([("w".to_string(), view)], None).unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), b"{\"a\": 1}").unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), &weights).unwrap();
        let found = checkpoint_digest_of_dir(dir.path()).unwrap();
        let (sha, config, read) = read_for_upload(dir.path(), Some(&found)).unwrap();
        assert_eq!(
            (sha.as_str(), read.as_slice()),
            (found.as_str(), weights.as_slice())
        );
        assert_eq!(config, b"{\"a\": 1}");
        let other = "0".repeat(64);
        let e = read_for_upload(dir.path(), Some(&other))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&found) && e.contains(&other), "{e}");
        assert!(matches!(
            read_for_upload(dir.path(), None),
            Err(BaseUploadError::NotNamed)
        ));
    }

    fn stream_of(
        chunks: Vec<pb::BaseModelChunk>,
    ) -> impl Stream<Item = Result<pb::BaseModelChunk, tonic::Status>> + Unpin {
        futures::stream::iter(chunks.into_iter().map(Ok))
    }

    #[tokio::test]
    async fn a_base_round_trips_and_bounds_are_enforced() {
        let weights: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| i as u8).collect();
        let sent = chunks("ab", b"{}".to_vec(), &weights);
        assert_eq!(sent.len(), 4);
        let got = receive(stream_of(sent.clone()), u64::MAX).await.unwrap();
        assert_eq!(got.weights, weights);
        assert_eq!(got.config_json, b"{}");
        assert_eq!(got.claimed_sha256, "ab");

        let e = receive(stream_of(sent.clone()), 1000).await.unwrap_err();
        assert!(matches!(e, BaseTransferError::TooLarge { .. }), "{e}");
        let mut short = sent.clone();
        short.pop();
        let e = receive(stream_of(short), u64::MAX).await.unwrap_err();
        assert!(e.to_string().contains("announced"), "{e}");
        let mut long = sent;
        long.push(pb::BaseModelChunk {
            weights: vec![1],
            ..Default::default()
        });
        assert!(receive(stream_of(long), u64::MAX).await.is_err());
        assert!(matches!(
            receive(stream_of(vec![]), u64::MAX).await,
            Err(BaseTransferError::Empty)
        ));
    }
}
