//! Integration tests of the audit crate: the chain and proofs, the stores on SQLite and PostgreSQL, the approval message, who may assert what.
//!
//! One test binary for the crate, with a module per area: every integration-test binary links the
//! whole dependency tree, so one instead of several keeps the clean build's link time and disk
//! use down (CI runs on 2 cores with a bounded disk).

mod approval_message;
mod authority;
mod chain;
mod console;
mod console_attack;
mod event_jobs;
mod merkle_tree;
mod quarantine;
mod report;
mod store;
