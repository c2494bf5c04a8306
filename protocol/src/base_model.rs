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

/// Receives a base whole, refusing one larger than `max_bytes` (config + weights) before
/// reading its weights, a chunk over [`CHUNK_BYTES`], and a stream that ends short or runs long.
pub async fn receive<S>(
    mut stream: S,
    max_bytes: u64,
) -> Result<ReceivedBaseModel, BaseTransferError>
where
    S: Stream<Item = Result<pb::BaseModelChunk, tonic::Status>> + Unpin,
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
    let expected = first.weights_len as usize;
    let mut weights = Vec::with_capacity(expected);
    weights.extend_from_slice(&first.weights);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if chunk.weights.len() > CHUNK_BYTES {
            return Err(BaseTransferError::Malformed(format!(
                "a chunk of {} bytes (at most {CHUNK_BYTES})",
                chunk.weights.len()
            )));
        }
        if weights.len() + chunk.weights.len() > expected {
            return Err(BaseTransferError::Malformed(format!(
                "more weight bytes than the {expected} announced"
            )));
        }
        weights.extend_from_slice(&chunk.weights);
    }
    if weights.len() != expected {
        return Err(BaseTransferError::Malformed(format!(
            "{} weight bytes received, {expected} announced",
            weights.len()
        )));
    }
    Ok(ReceivedBaseModel {
        claimed_sha256: first.sha256,
        config_json: first.config_json,
        weights,
    })
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
