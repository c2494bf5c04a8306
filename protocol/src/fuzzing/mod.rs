//! Fuzz harnesses (feature `fuzzing`): what the `cargo fuzz` targets in `fuzz/` run on every input.
//!
//! They are plain functions so that the same checks run twice: under libFuzzer (`fuzz/`, a
//! campaign of millions of inputs) and under `cargo test`, where
//! `tests/integration/fuzz_corpus.rs` replays every file of `fuzz/corpus/<target>/` through them.
//! Each harness takes any bytes. A refusal with an error is a correct outcome; a panic is a
//! finding: either the code under test panicked, or the harness found one of the properties it
//! checks broken (each is stated where it is asserted).
//!
//! - [`stream::frames`]: the tensor-stream decoder fed frame sequences built from a structured
//!   script (a model, its chunking, and edits to the frames), into both the memory sink and the
//!   safetensors file sink, with the file read back.
//! - [`stream::wire_bytes`]: the decoder fed raw protobuf bytes, length-delimited as gRPC frames.
//! - [`safetensors_file::read`]: a safetensors file as the coordinator reads it back (and the
//!   `safetensors` crate's parser that the site node's reader delegates to).
//! - [`job::spec`]: TOML → job spec → digest, and the digest's stability under re-serialization.

pub mod job;
pub mod safetensors_file;
pub mod stream;
