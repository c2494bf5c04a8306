//! Integration tests of the site node: agent, data, DP-SGD, keys, language models, models, data protection, training, weights.
//!
//! One test binary for the crate, with a module per area: every integration-test binary links the
//! whole dependency tree, so one instead of several keeps the clean build's link time and disk
//! use down (CI runs on 2 cores with a bounded disk).

mod agent;
mod common;
mod data;
mod dp;
mod keys;
mod lm;
mod models;
mod protection;
mod training;
mod weights;
