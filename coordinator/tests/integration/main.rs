//! Integration tests of the coordinator: aggregation and strategies, central DP, signed
//! rejections, the job store.
//!
//! One test binary for the crate, with a module per area: every integration-test binary links the
//! whole dependency tree, so one instead of several keeps the clean build's link time and disk
//! use down (CI runs on 2 cores with a bounded disk).

mod aggregate;
mod central_dp;
mod distributed_dp;
mod initial_model;
mod lease;
mod registry;
mod rejections;
mod robust;
mod secagg;
mod secagg_signed;
mod statistics;
mod statistics_jobs;
mod store;
