//! Chunked tensor streaming with an end-to-end SHA-256 digest.
//!
//! A model (or a model update) travels as a stream of [`pb::TensorFrame`]s:
//!
//! 1. one `manifest` frame: every tensor's name, dtype, shape and byte length, plus metadata;
//! 2. the raw little-endian bytes of the tensors in manifest order, as `chunk` frames of at most
//!    [`MAX_CHUNK_BYTES`], each naming its tensor and offset, with no gap and no overlap;
//! 3. one `trailer` frame with the SHA-256 digest of the whole (see [`StreamDigest`]).
//!
//! The receiving side is [`StreamDecoder`], a state machine that checks every frame against the
//! manifest and hands bytes to a [`TensorSink`] as they arrive, so nothing is buffered beyond a
//! chunk. A sink only produces its output in [`TensorSink::commit`], which the decoder calls after
//! the digest has verified and the stream has ended; until then everything it wrote is provisional,
//! and a sink dropped without a commit leaves nothing behind ([`SafetensorsFileSink`] deletes its
//! temporary file). The model size is bounded by disk, not by memory or gRPC's message limit.
//!
//! [`receive`] and [`send`] run the decoder and encoder on a blocking thread next to the async
//! transport, so that hashing and disk I/O use the second core while TLS and HTTP/2 use the first.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::pb::{self, tensor_frame::Frame};
use crate::tensor::{Manifest, ManifestError, TensorSpec};

mod file;
pub use file::{
    SafetensorsFileSink, SafetensorsFileSource, load_model, model_digest_of_file, store_model,
};

/// The largest chunk a sender may send and a receiver accepts: 4 MiB of tensor bytes.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;

/// The gRPC message limit the transport must allow for one frame: a full chunk plus framing.
pub const MAX_FRAME_BYTES: usize = MAX_CHUNK_BYTES + 64 * 1024;

/// Frames queued between the network and the blocking worker, each at most one chunk: this bounds
/// the receiver's buffering to a few chunks whatever the model size.
const QUEUE_FRAMES: usize = 2;

/// The digest of a tensor stream: SHA-256 over a domain-separation tag, the manifest's
/// [canonical encoding](Manifest::canonical_bytes), then every tensor byte in manifest order.
/// Covering the manifest means a renamed, reshaped or re-typed tensor changes the digest even when
/// its bytes do not.
pub struct StreamDigest(ring::digest::Context);

impl StreamDigest {
    pub const DOMAIN: &'static [u8] = b"tutela/tensor-stream/v1\0";

    pub fn new(manifest: &Manifest) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(Self::DOMAIN);
        ctx.update(&manifest.canonical_bytes());
        StreamDigest(ctx)
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> [u8; 32] {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// Why a sink refused or failed to store a stream.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The content is not acceptable (for example a NaN in a model update): the sender is told why.
    #[error("{0}")]
    Rejected(String),
    /// The receiver could not store what it received: not the sender's fault.
    #[error("storage failed: {0}")]
    Io(#[from] io::Error),
}

/// Everything that can go wrong with a tensor stream, on either side.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the stream did not start with a manifest frame")]
    MissingManifest,
    #[error("a second manifest arrived in the middle of the stream")]
    DuplicateManifest,
    #[error("empty frame (no manifest, chunk or trailer)")]
    EmptyFrame,
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("chunk of {size} bytes for tensor {tensor:?} is over the {max}-byte chunk limit")]
    ChunkTooLarge {
        tensor: String,
        size: usize,
        max: usize,
    },
    #[error("empty chunk for tensor #{tensor_index}")]
    EmptyChunk { tensor_index: u32 },
    #[error(
        "chunk for tensor #{got_index} at offset {got_offset} arrived where tensor #{want_index} at offset {want_offset} was expected (chunks were reordered, lost or duplicated)"
    )]
    OutOfOrder {
        got_index: u32,
        got_offset: u64,
        want_index: usize,
        want_offset: u64,
    },
    #[error("chunk for tensor {tensor:?} ends at byte {end}, past the tensor's {len} bytes")]
    PastEnd { tensor: String, end: u64, len: u64 },
    #[error("chunk arrived after all {total} bytes the manifest declared")]
    ExtraData { total: u64 },
    #[error(
        "the trailer arrived after {received} of the {expected} bytes the manifest declared (truncated stream)"
    )]
    EarlyTrailer { received: u64, expected: u64 },
    #[error("the trailer says {declared} bytes were sent but {received} arrived")]
    TotalMismatch { declared: u64, received: u64 },
    #[error("the trailer's digest is {0} bytes long; a SHA-256 digest is 32")]
    BadDigestLength(usize),
    #[error(
        "digest mismatch: the sender's trailer says {claimed} but the bytes received hash to {computed}; nothing was stored"
    )]
    DigestMismatch { claimed: String, computed: String },
    #[error("a frame arrived after the trailer")]
    AfterTrailer,
    #[error(
        "the stream ended after {received} of {expected} bytes without its trailer (truncated); nothing was stored"
    )]
    Truncated { received: u64, expected: u64 },
    #[error("the stream ended before its manifest; nothing was stored")]
    EndedBeforeManifest,
    #[error("the stream broke: {0}")]
    Transport(tonic::Status),
    #[error("refused by the receiver: {0}")]
    Rejected(String),
    #[error("the receiver could not store the stream: {0}")]
    Storage(io::Error),
    #[error("could not read the model to send: {0}")]
    Source(io::Error),
}

impl From<SinkError> for StreamError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Rejected(why) => StreamError::Rejected(why),
            SinkError::Io(e) => StreamError::Storage(e),
        }
    }
}

impl From<StreamError> for tonic::Status {
    fn from(e: StreamError) -> Self {
        use tonic::Status;
        match e {
            StreamError::Transport(s) => s,
            StreamError::DigestMismatch { .. } | StreamError::Truncated { .. } => {
                Status::data_loss(e.to_string())
            }
            StreamError::Storage(_) | StreamError::Source(_) => Status::internal(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

/// Where a received stream goes: a file, memory, or (in the coordinator) a running aggregate.
///
/// Calls come in this order: `begin` once, `write` for every chunk in stream order, then `commit`
/// once the digest verified. A sink dropped before `commit` must leave no visible trace.
pub trait TensorSink: Send + 'static {
    type Output: Send + 'static;
    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError>;
    fn write(&mut self, tensor_index: usize, offset: u64, data: &[u8]) -> Result<(), SinkError>;
    fn commit(self, digest: &[u8; 32]) -> Result<Self::Output, SinkError>;
}

/// A stream that was received whole, verified, and committed.
#[derive(Debug)]
pub struct Received<T> {
    pub output: T,
    pub digest: [u8; 32],
    pub manifest: Manifest,
}

impl<T> Received<T> {
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest)
    }
}

enum DecodeState {
    AwaitingManifest,
    Data {
        manifest: Manifest,
        // Boxed: the hash state is large, and the enum moves on every transition.
        digest: Box<StreamDigest>,
        index: usize,
        offset: u64,
        received: u64,
    },
    Verified {
        manifest: Manifest,
        digest: [u8; 32],
    },
    Failed,
}

/// Checks a tensor stream frame by frame and feeds its bytes to a sink.
pub struct StreamDecoder<S: TensorSink> {
    state: DecodeState,
    sink: S,
}

impl<S: TensorSink> StreamDecoder<S> {
    pub fn new(sink: S) -> Self {
        StreamDecoder {
            state: DecodeState::AwaitingManifest,
            sink,
        }
    }

    /// Takes the next frame. After an error the decoder refuses everything; drop it (and with it
    /// the sink, which discards what it held).
    pub fn push(&mut self, frame: pb::TensorFrame) -> Result<(), StreamError> {
        let result = self.push_inner(frame);
        if result.is_err() {
            self.state = DecodeState::Failed;
        }
        result
    }

    fn push_inner(&mut self, frame: pb::TensorFrame) -> Result<(), StreamError> {
        let frame = frame.frame.ok_or(StreamError::EmptyFrame)?;
        match (&mut self.state, frame) {
            (DecodeState::AwaitingManifest, Frame::Manifest(m)) => {
                let manifest = Manifest::from_pb(m)?;
                self.sink.begin(&manifest)?;
                let digest = Box::new(StreamDigest::new(&manifest));
                self.state = DecodeState::Data {
                    manifest,
                    digest,
                    index: 0,
                    offset: 0,
                    received: 0,
                };
                Ok(())
            }
            (DecodeState::AwaitingManifest, _) => Err(StreamError::MissingManifest),
            (DecodeState::Data { .. }, Frame::Manifest(_)) => Err(StreamError::DuplicateManifest),
            (
                DecodeState::Data {
                    manifest,
                    digest,
                    index,
                    offset,
                    received,
                },
                Frame::Chunk(chunk),
            ) => {
                skip_finished_tensors(manifest, index, offset);
                if *index >= manifest.len() {
                    return Err(StreamError::ExtraData {
                        total: manifest.total_bytes(),
                    });
                }
                if chunk.tensor_index as usize != *index || chunk.offset != *offset {
                    return Err(StreamError::OutOfOrder {
                        got_index: chunk.tensor_index,
                        got_offset: chunk.offset,
                        want_index: *index,
                        want_offset: *offset,
                    });
                }
                let tensor = &manifest.tensors()[*index];
                if chunk.data.is_empty() {
                    return Err(StreamError::EmptyChunk {
                        tensor_index: chunk.tensor_index,
                    });
                }
                if chunk.data.len() > MAX_CHUNK_BYTES {
                    return Err(StreamError::ChunkTooLarge {
                        tensor: tensor.name.clone(),
                        size: chunk.data.len(),
                        max: MAX_CHUNK_BYTES,
                    });
                }
                let len = manifest.byte_len(*index);
                let end = *offset + chunk.data.len() as u64;
                if end > len {
                    return Err(StreamError::PastEnd {
                        tensor: tensor.name.clone(),
                        end,
                        len,
                    });
                }
                digest.update(&chunk.data);
                self.sink.write(*index, *offset, &chunk.data)?;
                *offset = end;
                *received += chunk.data.len() as u64;
                Ok(())
            }
            (
                DecodeState::Data {
                    manifest,
                    index,
                    offset,
                    received,
                    ..
                },
                Frame::Trailer(trailer),
            ) => {
                skip_finished_tensors(manifest, index, offset);
                if *index < manifest.len() {
                    return Err(StreamError::EarlyTrailer {
                        received: *received,
                        expected: manifest.total_bytes(),
                    });
                }
                if trailer.total_bytes != *received {
                    return Err(StreamError::TotalMismatch {
                        declared: trailer.total_bytes,
                        received: *received,
                    });
                }
                let claimed: [u8; 32] = trailer
                    .sha256
                    .as_slice()
                    .try_into()
                    .map_err(|_| StreamError::BadDigestLength(trailer.sha256.len()))?;
                let DecodeState::Data {
                    manifest, digest, ..
                } = std::mem::replace(&mut self.state, DecodeState::Failed)
                else {
                    unreachable!("matched Data above");
                };
                let computed = digest.finish();
                if computed != claimed {
                    return Err(StreamError::DigestMismatch {
                        claimed: hex::encode(claimed),
                        computed: hex::encode(computed),
                    });
                }
                self.state = DecodeState::Verified {
                    manifest,
                    digest: computed,
                };
                Ok(())
            }
            (DecodeState::Verified { .. }, _) => Err(StreamError::AfterTrailer),
            (DecodeState::Failed, _) => Err(StreamError::Rejected(
                "the stream already failed".to_string(),
            )),
        }
    }

    /// The stream has ended: commit if, and only if, the trailer arrived and verified.
    pub fn finish(self) -> Result<Received<S::Output>, StreamError> {
        match self.state {
            DecodeState::Verified { manifest, digest } => {
                let output = self.sink.commit(&digest)?;
                Ok(Received {
                    output,
                    digest,
                    manifest,
                })
            }
            DecodeState::AwaitingManifest => Err(StreamError::EndedBeforeManifest),
            DecodeState::Data {
                manifest, received, ..
            } => Err(StreamError::Truncated {
                received,
                expected: manifest.total_bytes(),
            }),
            DecodeState::Failed => Err(StreamError::Rejected(
                "the stream already failed".to_string(),
            )),
        }
    }
}

/// Zero-length tensors get no chunks: step over them (and over a finished tensor) so the expected
/// position always names the next byte to arrive.
fn skip_finished_tensors(manifest: &Manifest, index: &mut usize, offset: &mut u64) {
    while *index < manifest.len() && *offset == manifest.byte_len(*index) {
        *index += 1;
        *offset = 0;
    }
}

/// Receives a whole stream into `sink`: frames from the network are checked and written on a
/// blocking thread, through a queue of a few chunks. Returns once the sink committed.
pub async fn receive<S, St>(frames: St, sink: S) -> Result<Received<S::Output>, StreamError>
where
    S: TensorSink,
    St: Stream<Item = Result<pb::TensorFrame, tonic::Status>> + Send,
{
    let (tx, mut rx) = mpsc::channel::<pb::TensorFrame>(QUEUE_FRAMES);
    let worker = tokio::task::spawn_blocking(move || {
        let mut decoder = StreamDecoder::new(sink);
        while let Some(frame) = rx.blocking_recv() {
            decoder.push(frame)?;
        }
        decoder.finish()
    });
    let mut frames = std::pin::pin!(frames);
    let mut transport_error = None;
    while let Some(item) = frames.next().await {
        match item {
            Ok(frame) => {
                if tx.send(frame).await.is_err() {
                    // The worker stopped on an error: it is reported below.
                    break;
                }
            }
            Err(status) => {
                transport_error = Some(status);
                break;
            }
        }
    }
    drop(tx);
    let outcome = worker
        .await
        .map_err(|e| StreamError::Storage(io::Error::other(e)))?;
    match (outcome, transport_error) {
        // A worker error explains more than the transport error it likely caused.
        (Err(e), _) => Err(e),
        (Ok(_), Some(status)) => Err(StreamError::Transport(status)),
        (Ok(received), None) => Ok(received),
    }
}

/// A model to send: its manifest, and its tensor bytes as one sequential reader in manifest order.
pub trait TensorSource: Send + 'static {
    fn manifest(&self) -> &Manifest;
    /// Returns the next `len` bytes of tensor data (the concatenation of all tensors in manifest
    /// order). Returning `Bytes` lets an in-memory source hand out slices without copying.
    fn read_chunk(&mut self, len: usize) -> io::Result<Bytes>;
}

/// Frames of a model being sent, produced on a blocking thread (reading and hashing) a few chunks
/// ahead of the network.
pub struct FrameStream {
    rx: mpsc::Receiver<Result<pb::TensorFrame, StreamError>>,
}

impl Stream for FrameStream {
    type Item = Result<pb::TensorFrame, StreamError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Encodes `source` as a tensor stream. A read error ends the stream with that error as its last
/// item (and no trailer), so the receiver discards what it got.
pub fn send<S: TensorSource>(source: S) -> FrameStream {
    send_inner(source, None)
}

/// Like [`send`], for a source whose stream digest is already known (a file of the
/// content-addressed store is named by it): the sender skips hashing, and the receiver still
/// checks every byte against it, which also catches a file damaged at rest.
pub fn send_known_digest<S: TensorSource>(source: S, digest: [u8; 32]) -> FrameStream {
    send_inner(source, Some(digest))
}

fn send_inner<S: TensorSource>(mut source: S, known: Option<[u8; 32]>) -> FrameStream {
    let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
    tokio::task::spawn_blocking(move || {
        let manifest = source.manifest().clone();
        let first = pb::TensorFrame {
            frame: Some(Frame::Manifest(manifest.to_pb())),
        };
        if tx.blocking_send(Ok(first)).is_err() {
            return;
        }
        let mut digest = known.is_none().then(|| StreamDigest::new(&manifest));
        for index in 0..manifest.len() {
            let len = manifest.byte_len(index);
            let mut offset = 0u64;
            while offset < len {
                let n = (len - offset).min(MAX_CHUNK_BYTES as u64) as usize;
                let data = match source.read_chunk(n) {
                    Ok(d) if d.len() == n => d,
                    Ok(d) => {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the source gave {} bytes where {n} were due", d.len()),
                        );
                        let _ = tx.blocking_send(Err(StreamError::Source(e)));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(StreamError::Source(e)));
                        return;
                    }
                };
                if let Some(d) = digest.as_mut() {
                    d.update(&data);
                }
                let frame = pb::TensorFrame {
                    frame: Some(Frame::Chunk(pb::TensorChunk {
                        tensor_index: index as u32,
                        offset,
                        data,
                    })),
                };
                if tx.blocking_send(Ok(frame)).is_err() {
                    return; // the receiver went away
                }
                offset += n as u64;
            }
        }
        let trailer = pb::TensorFrame {
            frame: Some(Frame::Trailer(pb::StreamTrailer {
                sha256: match (known, digest) {
                    (Some(k), _) => k.to_vec(),
                    (None, Some(d)) => d.finish().to_vec(),
                    (None, None) => Vec::new(),
                },
                total_bytes: manifest.total_bytes(),
            })),
        };
        let _ = tx.blocking_send(Ok(trailer));
    });
    FrameStream { rx }
}

/// Adapts a [`FrameStream`] for a client-streaming RPC, whose request stream cannot carry errors:
/// on a source error the stream simply ends without a trailer (the server refuses it as truncated)
/// and the error is kept for the caller in the returned slot.
pub fn send_for_upload(
    source: impl TensorSource,
) -> (
    impl Stream<Item = pb::TensorFrame> + Send + 'static,
    std::sync::Arc<std::sync::Mutex<Option<StreamError>>>,
) {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let keep = slot.clone();
    let stream = send(source)
        .map(move |item| match item {
            Ok(frame) => Some(frame),
            Err(e) => {
                if let Ok(mut s) = keep.lock() {
                    *s = Some(e);
                }
                None
            }
        })
        .take_while(|f| std::future::ready(f.is_some()))
        .filter_map(std::future::ready);
    (stream, slot)
}

/// Keeps a received model in memory: for tests and small models only.
#[derive(Default)]
pub struct MemorySink {
    tensors: Vec<(TensorSpec, Vec<u8>)>,
}

impl TensorSink for MemorySink {
    type Output = Vec<(TensorSpec, Vec<u8>)>;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        self.tensors = manifest
            .tensors()
            .iter()
            .map(|t| (t.clone(), Vec::new()))
            .collect();
        Ok(())
    }

    fn write(&mut self, index: usize, _offset: u64, data: &[u8]) -> Result<(), SinkError> {
        self.tensors[index].1.extend_from_slice(data);
        Ok(())
    }

    fn commit(self, _digest: &[u8; 32]) -> Result<Self::Output, SinkError> {
        Ok(self.tensors)
    }
}

/// A model held in memory, to send.
pub struct MemorySource {
    manifest: Manifest,
    data: Vec<Bytes>,
    index: usize,
    offset: usize,
}

impl MemorySource {
    pub fn new(tensors: Vec<(TensorSpec, Vec<u8>)>) -> Result<Self, StreamError> {
        let (specs, data): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
        let manifest = Manifest::new(specs, Default::default())?;
        Self::from_parts(manifest, data.into_iter().map(Bytes::from).collect())
    }

    pub fn from_parts(manifest: Manifest, data: Vec<Bytes>) -> Result<Self, StreamError> {
        for (i, d) in data.iter().enumerate() {
            if d.len() as u64 != manifest.byte_len(i) {
                return Err(StreamError::Source(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "tensor {:?} has {} bytes of data but its shape needs {}",
                        manifest.tensors()[i].name,
                        d.len(),
                        manifest.byte_len(i)
                    ),
                )));
            }
        }
        if data.len() != manifest.len() {
            return Err(StreamError::Source(io::Error::new(
                io::ErrorKind::InvalidInput,
                "one data buffer per tensor is needed",
            )));
        }
        Ok(MemorySource {
            manifest,
            data,
            index: 0,
            offset: 0,
        })
    }
}

impl TensorSource for MemorySource {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn read_chunk(&mut self, len: usize) -> io::Result<Bytes> {
        // Skip finished (and empty) tensors.
        while self
            .data
            .get(self.index)
            .is_some_and(|d| self.offset == d.len())
        {
            self.index += 1;
            self.offset = 0;
        }
        let cur = self.data.get(self.index).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "read past the last tensor")
        })?;
        // The encoder never asks across a tensor boundary, so this is a slice, not a copy.
        let end = self.offset + len;
        if end > cur.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a chunk may not span two tensors",
            ));
        }
        let chunk = cur.slice(self.offset..end);
        self.offset = end;
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;
    use std::collections::BTreeMap;

    fn model() -> Vec<(TensorSpec, Vec<u8>)> {
        vec![
            (
                TensorSpec::new("a", DType::F32, vec![2, 3]),
                (0..24).collect(),
            ),
            (TensorSpec::new("empty", DType::F64, vec![0]), vec![]),
            (TensorSpec::new("b", DType::U8, vec![5]), vec![9; 5]),
        ]
    }

    fn frames_of(tensors: Vec<(TensorSpec, Vec<u8>)>, chunk: usize) -> Vec<pb::TensorFrame> {
        let (specs, data): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
        let manifest = Manifest::new(specs, BTreeMap::new()).unwrap();
        let mut out = vec![pb::TensorFrame {
            frame: Some(Frame::Manifest(manifest.to_pb())),
        }];
        let mut digest = StreamDigest::new(&manifest);
        for (i, d) in data.iter().enumerate() {
            for (k, c) in d.chunks(chunk).enumerate() {
                digest.update(c);
                out.push(pb::TensorFrame {
                    frame: Some(Frame::Chunk(pb::TensorChunk {
                        tensor_index: i as u32,
                        offset: (k * chunk) as u64,
                        data: Bytes::copy_from_slice(c),
                    })),
                });
            }
        }
        out.push(pb::TensorFrame {
            frame: Some(Frame::Trailer(pb::StreamTrailer {
                sha256: digest.finish().to_vec(),
                total_bytes: manifest.total_bytes(),
            })),
        });
        out
    }

    fn decode(frames: Vec<pb::TensorFrame>) -> Result<Vec<(TensorSpec, Vec<u8>)>, StreamError> {
        let mut d = StreamDecoder::new(MemorySink::default());
        for f in frames {
            d.push(f)?;
        }
        Ok(d.finish()?.output)
    }

    #[test]
    fn well_formed_stream_decodes() {
        assert_eq!(decode(frames_of(model(), 7)).unwrap(), model());
    }

    #[test]
    fn reordered_chunks_are_refused() {
        let mut f = frames_of(model(), 7);
        f.swap(1, 2);
        assert!(matches!(decode(f), Err(StreamError::OutOfOrder { .. })));
    }

    #[test]
    fn dropped_chunk_is_refused() {
        let mut f = frames_of(model(), 7);
        f.remove(2);
        assert!(matches!(decode(f), Err(StreamError::OutOfOrder { .. })));
    }

    #[test]
    fn missing_trailer_is_truncation() {
        let mut f = frames_of(model(), 7);
        f.pop();
        assert!(matches!(
            decode(f),
            Err(StreamError::Truncated {
                received: 29,
                expected: 29
            })
        ));
    }

    #[test]
    fn flipped_bit_is_a_digest_mismatch() {
        let mut f = frames_of(model(), 7);
        if let Some(Frame::Chunk(c)) = &mut f[1].frame {
            let mut d = c.data.to_vec();
            d[0] ^= 1;
            c.data = d.into();
        }
        let err = decode(f).unwrap_err();
        assert!(matches!(err, StreamError::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn frames_after_trailer_and_duplicate_manifests_are_refused() {
        let mut f = frames_of(model(), 7);
        f.push(f[1].clone());
        assert!(matches!(decode(f), Err(StreamError::AfterTrailer)));
        let mut f = frames_of(model(), 7);
        f.insert(2, f[0].clone());
        assert!(matches!(decode(f), Err(StreamError::DuplicateManifest)));
        let f = frames_of(model(), 7);
        assert!(matches!(
            decode(f[1..].to_vec()),
            Err(StreamError::MissingManifest)
        ));
    }
}
