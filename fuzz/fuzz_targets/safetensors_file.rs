//! The harness, and what it checks: `tutela_protocol::fuzzing::safetensors_file`. A plain
//! function, so that `cargo test` replays this target's corpus (`fuzz/corpus/safetensors_file/`)
//! through the same code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutela_protocol::fuzzing::safetensors_file::read(data));
