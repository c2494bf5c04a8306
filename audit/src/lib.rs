//! The audit service: an append-only, hash-chained, signed event log.
//!
//! Nothing is implemented here yet: the issue "The audit service" fills this crate and adds the
//! `tutela-audit` binary. It exists so that the workspace has the shape of `DESIGN.md`.
