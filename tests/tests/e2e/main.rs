//! End-to-end tests with real processes over loopback mutual TLS: federation, central DP, approvals, the audit service and trail (and what happens when it or the coordinator dies), the demo, a Python client.
//!
//! One test binary for the crate, with a module per area: every integration-test binary links the
//! whole dependency tree, so one instead of several keeps the clean build's link time and disk
//! use down (CI runs on 2 cores with a bounded disk).

mod approvals;
mod audit;
mod audit_trail;
mod central_dp;
mod data_stays_home;
mod demo;
mod distributed_dp;
mod failover;
mod federation;
mod job_check;
mod language_model;
mod loadgen;
mod metrics;
mod off_the_record;
mod pki_audit;
mod python_client;
mod registry;
mod robust;
mod secagg;
mod secagg_recovery;
mod site_audit;
mod statistics;
mod watermark;
