//! Tutela's privacy library: differential-privacy mechanisms and accountants, clipping,
//! anonymization transforms, secure-aggregation crypto and encryption at rest.
//!
//! Nothing is implemented here yet: the issues "Differential privacy with a guarantee you can
//! state" and "Data protection at the site" fill this crate. It exists so that the workspace has
//! the shape of `DESIGN.md` from the start.
