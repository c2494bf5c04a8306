//! The tensor-stream decoder ([`StreamDecoder`]) under fuzzing.
//!
//! Properties checked on every input, beyond "no panic, no hang, memory bounded by the input":
//! - a well-formed stream (a script with no edits) is accepted and delivers exactly its tensors;
//! - the memory sink and the safetensors file sink accept and refuse the same streams (the file
//!   sink may also refuse, with [`StreamError::Rejected`], a manifest safetensors cannot carry);
//! - what the file sink commits is `<dir>/<stream digest>.safetensors`, and reading it back (as
//!   the coordinator does) gives the same manifest, the same bytes and the same stream digest;
//! - a refused stream leaves no file behind.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use prost::Message;

use crate::pb::{self, tensor_frame::Frame};
use crate::stream::{
    MAX_CHUNK_BYTES, MemorySink, Received, SafetensorsFileSink, StreamDecoder, StreamDigest,
    StreamError, TensorSink,
};
use crate::tensor::{DType, Manifest, TensorSpec};

/// Tensor bytes a script produces at most: a model declaring more is sent cut short (and must be
/// refused as truncated), so that one input costs microseconds, not the model's size.
const MAX_SCRIPT_DATA: u64 = 256 << 10;

/// Frames a script produces at most (the chunk size grows to fit).
const MAX_SCRIPT_FRAMES: u64 = 2048;

/// Text a script may pick by number besides arbitrary strings: ordinary tensor and metadata names,
/// and the ones a safetensors header, JSON or a file system treat specially.
const KNOWN_TEXT: &[&str] = &[
    "weight",
    "bias",
    "fc1.weight",
    "",
    "__metadata__",
    "format",
    "pt",
    "a",
    "a\"b\\c",
    "\u{0}",
    "../x",
    "\u{e9}\u{1f600}",
];

/// A structured fuzz input: a model (whose manifest may be invalid), how it is chunked, and edits
/// made to the frames afterwards (each index is taken modulo the number of frames).
#[derive(Debug, Arbitrary)]
pub struct Script {
    tensors: Vec<ScriptTensor>,
    metadata: Vec<(Text, Text)>,
    chunk_bytes: u16,
    edits: Vec<Edit>,
}

#[derive(Debug, Arbitrary)]
enum Text {
    Known(u8),
    Any(String),
}

impl Text {
    fn get(&self) -> String {
        match self {
            Text::Known(i) => KNOWN_TEXT[*i as usize % KNOWN_TEXT.len()].to_string(),
            Text::Any(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct ScriptTensor {
    name: Text,
    /// The wire dtype is `dtype % 12 - 1`: -1 and 0 (unspecified) are not dtypes, 1..=10 are.
    dtype: u8,
    shape: Vec<Dim>,
    /// A declared byte length instead of the one the shape implies.
    byte_length: Option<u64>,
    fill: u8,
}

#[derive(Debug, Arbitrary)]
enum Dim {
    Small(u8),
    Any(u64),
}

#[derive(Debug, Arbitrary)]
enum Edit {
    Remove(u16),
    Duplicate(u16),
    Swap(u16, u16),
    Truncate(u16),
    /// Replaces a frame by one with no content.
    Clear(u16),
    FlipBit {
        frame: u16,
        byte: u32,
        bit: u8,
    },
    SetTensorIndex {
        frame: u16,
        tensor_index: u32,
    },
    SetOffset {
        frame: u16,
        offset: u64,
    },
    /// Cuts or pads a chunk's data to `len` bytes (at most one byte over the chunk limit).
    Resize {
        frame: u16,
        len: u32,
    },
    InsertChunk {
        at: u16,
        tensor_index: u32,
        offset: u64,
        data: Vec<u8>,
    },
    TrailerDigest(Vec<u8>),
    TrailerTotal(u64),
}

/// A model as the memory sink delivers it: each tensor's description and bytes.
pub type Model = Vec<(TensorSpec, Vec<u8>)>;

/// Runs the decoder on frames built from `data` read as a [`Script`].
pub fn frames(data: &[u8]) {
    let Ok(script) = Script::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let (frames, expected) = script.build();
    check_frames(&frames, expected.as_deref());
}

/// Runs the decoder on `data` read as length-delimited protobuf `TensorFrame`s, as they arrive in
/// gRPC messages; bytes that do not decode end the stream, as a broken transport would.
pub fn wire_bytes(data: &[u8]) {
    let mut rest = data;
    let mut frames = Vec::new();
    while !rest.is_empty() {
        match pb::TensorFrame::decode_length_delimited(&mut rest) {
            Ok(frame) => frames.push(frame),
            Err(_) => break,
        }
    }
    check_frames(&frames, None);
}

/// The bytes [`wire_bytes`] reads as `frames`: for making seeds from real streams.
pub fn encode_wire(frames: &[pb::TensorFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        // Writing into a Vec cannot run out of space.
        let _ = frame.encode_length_delimited(&mut out);
    }
    out
}

/// The frames of `tensors` sent whole, in chunks of `chunk` bytes, as the encoder sends them: for
/// making seeds and tests.
pub fn well_formed_frames(
    manifest: &Manifest,
    data: &[&[u8]],
    chunk: usize,
) -> Vec<pb::TensorFrame> {
    let chunk = chunk.clamp(1, MAX_CHUNK_BYTES);
    let mut frames = vec![pb::TensorFrame {
        frame: Some(Frame::Manifest(manifest.to_pb())),
    }];
    let mut digest = StreamDigest::new(manifest);
    for (index, bytes) in data.iter().enumerate() {
        for (k, piece) in bytes.chunks(chunk).enumerate() {
            digest.update(piece);
            frames.push(pb::TensorFrame {
                frame: Some(Frame::Chunk(pb::TensorChunk {
                    tensor_index: index as u32,
                    offset: (k * chunk) as u64,
                    data: Bytes::copy_from_slice(piece),
                })),
            });
        }
    }
    frames.push(pb::TensorFrame {
        frame: Some(Frame::Trailer(pb::StreamTrailer {
            sha256: digest.finish().to_vec(),
            total_bytes: manifest.total_bytes(),
        })),
    });
    frames
}

impl Script {
    /// The frames, and the model when they are a well-formed stream that must be accepted.
    pub fn build(&self) -> (Vec<pb::TensorFrame>, Option<Model>) {
        let wire = pb::ModelManifest {
            tensors: self
                .tensors
                .iter()
                .map(|t| {
                    let dtype = i32::from(t.dtype % 12) - 1;
                    let shape: Vec<u64> = t
                        .shape
                        .iter()
                        .map(|d| match d {
                            Dim::Small(n) => u64::from(*n % 8),
                            Dim::Any(n) => *n,
                        })
                        .collect();
                    let implied = DType::from_pb(dtype)
                        .and_then(|d| TensorSpec::new("", d, shape.clone()).byte_len());
                    pb::TensorInfo {
                        name: t.name.get(),
                        dtype,
                        shape,
                        byte_length: t.byte_length.or(implied).unwrap_or(0),
                    }
                })
                .collect(),
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.get(), v.get()))
                .collect(),
        };
        let Ok(manifest) = Manifest::from_pb(wire.clone()) else {
            // Not a manifest the decoder may accept: send it anyway, with a trailer.
            let frames = vec![
                pb::TensorFrame {
                    frame: Some(Frame::Manifest(wire)),
                },
                pb::TensorFrame {
                    frame: Some(Frame::Trailer(pb::StreamTrailer {
                        sha256: vec![0; 32],
                        total_bytes: 0,
                    })),
                },
            ];
            return (self.edited(frames), None);
        };
        let complete = manifest.total_bytes() <= MAX_SCRIPT_DATA;
        let mut budget = MAX_SCRIPT_DATA;
        let data: Vec<Vec<u8>> = (0..manifest.len())
            .map(|i| {
                let len = manifest.byte_len(i).min(budget);
                budget -= len;
                let fill = self.tensors[i].fill;
                (0..len)
                    .map(|k| fill.wrapping_add((k as u8).wrapping_mul(31)))
                    .collect()
            })
            .collect();
        let sent: u64 = data.iter().map(|d| d.len() as u64).sum();
        let chunk = u64::from(self.chunk_bytes)
            .max(sent.div_ceil(MAX_SCRIPT_FRAMES))
            .max(1);
        let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let mut frames = well_formed_frames(&manifest, &slices, chunk as usize);
        if !complete {
            // Cut short: the declared model is larger than what a script sends.
            frames.pop();
        }
        let expected = (complete && self.edits.is_empty()).then(|| {
            manifest
                .tensors()
                .iter()
                .cloned()
                .zip(data.iter().cloned())
                .collect()
        });
        (self.edited(frames), expected)
    }

    fn edited(&self, mut frames: Vec<pb::TensorFrame>) -> Vec<pb::TensorFrame> {
        for edit in &self.edits {
            if frames.is_empty() {
                break;
            }
            let n = frames.len();
            let at = |i: u16| i as usize % n;
            match edit {
                Edit::Remove(i) => {
                    let i = at(*i);
                    frames.remove(i);
                }
                Edit::Duplicate(i) => {
                    let i = at(*i);
                    frames.insert(i, frames[i].clone());
                }
                Edit::Swap(i, j) => {
                    let (i, j) = (at(*i), at(*j));
                    frames.swap(i, j);
                }
                Edit::Truncate(n) => frames.truncate(*n as usize),
                Edit::Clear(i) => frames[at(*i)].frame = None,
                Edit::FlipBit { frame, byte, bit } => {
                    if let Some(Frame::Chunk(c)) = &mut frames[at(*frame)].frame
                        && !c.data.is_empty()
                    {
                        let mut d = c.data.to_vec();
                        let k = *byte as usize % d.len();
                        d[k] ^= 1 << (bit % 8);
                        c.data = d.into();
                    }
                }
                Edit::SetTensorIndex {
                    frame,
                    tensor_index,
                } => {
                    if let Some(Frame::Chunk(c)) = &mut frames[at(*frame)].frame {
                        c.tensor_index = *tensor_index;
                    }
                }
                Edit::SetOffset { frame, offset } => {
                    if let Some(Frame::Chunk(c)) = &mut frames[at(*frame)].frame {
                        c.offset = *offset;
                    }
                }
                Edit::Resize { frame, len } => {
                    if let Some(Frame::Chunk(c)) = &mut frames[at(*frame)].frame {
                        let len = (*len as usize).min(MAX_CHUNK_BYTES + 1);
                        let mut d = c.data.to_vec();
                        d.resize(len, 0xa5);
                        c.data = d.into();
                    }
                }
                Edit::InsertChunk {
                    at: i,
                    tensor_index,
                    offset,
                    data,
                } => {
                    let i = at(*i);
                    frames.insert(
                        i,
                        pb::TensorFrame {
                            frame: Some(Frame::Chunk(pb::TensorChunk {
                                tensor_index: *tensor_index,
                                offset: *offset,
                                data: Bytes::copy_from_slice(data),
                            })),
                        },
                    );
                }
                Edit::TrailerDigest(d) => {
                    if let Some(pb::TensorFrame {
                        frame: Some(Frame::Trailer(t)),
                    }) = frames.last_mut()
                    {
                        t.sha256 = d.clone();
                    }
                }
                Edit::TrailerTotal(n) => {
                    if let Some(pb::TensorFrame {
                        frame: Some(Frame::Trailer(t)),
                    }) = frames.last_mut()
                    {
                        t.total_bytes = *n;
                    }
                }
            }
        }
        frames
    }
}

fn decode<S: TensorSink>(
    frames: &[pb::TensorFrame],
    sink: S,
) -> Result<Received<S::Output>, StreamError> {
    let mut decoder = StreamDecoder::new(sink);
    for frame in frames {
        decoder.push(frame.clone())?;
    }
    decoder.finish()
}

/// Decodes `frames` into a memory sink and a file sink and checks the properties in the module
/// documentation; `expected` is the model a well-formed stream carries.
pub fn check_frames(frames: &[pb::TensorFrame], expected: Option<&[(TensorSpec, Vec<u8>)]>) {
    let in_memory = decode(frames, MemorySink::default());
    if let Some(model) = expected {
        match &in_memory {
            Ok(received) => assert!(
                received.output == model,
                "a well-formed stream was accepted with other tensors than it carried"
            ),
            Err(e) => panic!("a well-formed stream was refused: {e}"),
        }
    }
    let dir = scratch_dir();
    let on_disk = decode(frames, SafetensorsFileSink::content_addressed(dir.path()));
    match (&in_memory, &on_disk) {
        (Ok(memory), Ok(file)) => {
            assert_eq!(
                memory.digest, file.digest,
                "the two sinks saw other digests"
            );
            assert_eq!(
                file.output,
                dir.path()
                    .join(format!("{}.safetensors", file.digest_hex())),
                "the stored model is not named by its stream digest"
            );
            let tensors: Vec<&[u8]> = memory.output.iter().map(|(_, d)| d.as_slice()).collect();
            super::safetensors_file::check_stored_model(
                &file.output,
                &file.manifest,
                &tensors,
                &file.digest,
            );
        }
        // The file sink may refuse a manifest that a safetensors file cannot carry.
        (Ok(_), Err(StreamError::Rejected(_))) => {}
        (Ok(_), Err(e)) => panic!("the memory sink accepted a stream the file sink refused: {e}"),
        (Err(e), Ok(_)) => {
            panic!("the file sink accepted a stream the memory sink refused ({e})")
        }
        (Err(_), Err(_)) => {}
    }
    if on_disk.is_err() {
        let left = super::safetensors_file::files_in(dir.path());
        assert!(
            left.is_empty(),
            "a refused stream left files behind: {left:?}"
        );
    }
}

/// A fresh directory for one input's files, removed when dropped.
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    // The harness's own infrastructure: without a temporary directory nothing can be checked.
    tempfile::tempdir().unwrap_or_else(|e| panic!("cannot make a scratch directory: {e}"))
}
