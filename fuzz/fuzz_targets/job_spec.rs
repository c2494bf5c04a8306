//! The harness, and what it checks: `tutela_protocol::fuzzing::job`. A plain function, so that
//! `cargo test` replays this target's corpus (`fuzz/corpus/job_spec/`) through the same code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutela_protocol::fuzzing::job::spec(data));
