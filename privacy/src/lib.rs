//! Tutela's privacy library: differential-privacy mechanisms and accountants, clipping,
//! anonymization transforms, secure-aggregation crypto and encryption at rest.
//!
//! Implemented so far: [`accountant`], the privacy accountants of DP-SGD (the Poisson-subsampled
//! Gaussian mechanism under add/remove-one neighbours): RDP with the classic and the Balle et al.
//! conversions, a pessimistic privacy-loss-distribution accountant, and noise calibration.

pub mod accountant;
pub mod at_rest;
