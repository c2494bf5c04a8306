//! Integration tests of the protocol crate: the PKI, tensor streaming, mutual TLS over loopback,
//! secure aggregation rounds in process (and consortium statistics through them), and the fuzz
//! corpus replayed through the fuzz harnesses.
//!
//! One test binary for the crate, with a module per area: every integration-test binary links the
//! whole dependency tree, so one instead of several keeps the clean build's link time and disk
//! use down (CI runs on 2 cores with a bounded disk).

mod common;
mod fed_stats;
mod fuzz_corpus;
mod health;
mod pki;
mod secagg;
mod secagg_attack;
mod streaming;
mod transport;
