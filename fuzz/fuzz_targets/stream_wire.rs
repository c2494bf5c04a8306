//! The harness, and what it checks: `tutela_protocol::fuzzing::stream`. A plain function, so that
//! `cargo test` replays this target's corpus (`fuzz/corpus/stream_wire/`) through the same code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutela_protocol::fuzzing::stream::wire_bytes(data));
