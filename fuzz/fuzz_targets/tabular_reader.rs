//! The harness, and what it checks: `tutela_privacy::fuzzing`. A plain function, so that
//! `cargo test` replays this target's corpus (`fuzz/corpus/tabular_reader/`) through the same code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutela_privacy::fuzzing::tabular(data));
