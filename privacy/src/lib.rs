//! Tutela's privacy library: differential-privacy mechanisms and accountants, clipping,
//! anonymization transforms, secure-aggregation crypto and encryption at rest.
//!
//! Implemented so far, each tested on its own (the site node uses only `at_rest` yet):
//! - [`accountant`]: the privacy accountants of DP-SGD (the Poisson-subsampled Gaussian mechanism
//!   under add/remove-one neighbours): RDP with the classic and the Balle et al. conversions, a
//!   pessimistic privacy-loss-distribution accountant, and noise calibration;
//! - [`sampling`]: Poisson sampling of batches, as the accountant assumes;
//! - [`noise`]: Gaussian noise from ChaCha20 seeded by the OS, as an exact discrete Gaussian on a
//!   power-of-two grid (no information in the low bits);
//! - [`anonymize`]: column roles, pseudonymization, generalization, date shifting, k-anonymity
//!   with l-diversity, free-text PII redaction, de-identification reports;
//! - [`at_rest`]: chunked AES-256-GCM files under wrapped per-file keys, with rotation;
//! - [`ledger`]: a site's per-dataset privacy ledger, composed tightly across jobs, with caps;
//! - [`stats`]: consortium statistics (the schema's data dictionary) under DP, summed across
//!   sites with or without secure aggregation, with error bounds.

pub mod accountant;
pub mod anonymize;
pub mod at_rest;
pub mod commitment;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ledger;
pub mod metrics;
pub mod noise;
pub mod planning;
pub mod sampling;
pub mod stats;
