//! Integration tests of the privacy library: accountants, anonymization, encryption at rest, noise,
//! and the fuzz corpus replayed through the fuzz harness.
//!
//! One test binary for the crate, with a module per area: every integration-test binary links the
//! whole dependency tree, so one instead of several keeps the clean build's link time and disk
//! use down (CI runs on 2 cores with a bounded disk).

mod accountant;
mod anonymize;
mod at_rest;
mod distributed;
mod fuzz_corpus;
mod noise;
mod noise_keyed;
mod pld_reference;
mod text;
