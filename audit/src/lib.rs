//! The audit service's tamper-evidence core: an append-only, hash-chained event log, an RFC 6962
//! Merkle tree over it, signed checkpoints, and a verifier that names the first bad row.
//!
//! Layers, bottom up:
//! - [`canonical`]: RFC 8785 canonical JSON, the byte string every event hash is computed over;
//! - [`event`]: [`Event`], its [`Action`] vocabulary, [`Timestamp`], and [`Chain`], which appends;
//! - [`merkle`]: RFC 6962 / RFC 9162 tree hashes, inclusion and consistency proofs;
//! - [`checkpoint`]: Ed25519-signed (tree size, root) statements and the [`CheckpointVerifier`] a
//!   site node keeps, so that history it has seen cannot be rewritten quietly;
//! - [`verify`]: [`verify_log`], which checks a whole log against its checkpoints.
//!
//! Sequence numbers start at **0**, so an event's `seq` is also its leaf index in the Merkle tree and
//! a checkpoint of `tree_size` N covers seqs `0..N`.
//!
//! On top of the core:
//! - [`store`]: the log's database (SQLite or PostgreSQL, one schema, append-only triggers);
//! - [`log`]: the live log: one appender task, group commit, checkpoints every N events or T
//!   seconds, inclusion and consistency proofs;
//! - [`approval`]: checking an officer's signed approval before it is recorded;
//! - [`authority`]: who may assert each action, enforced at append and re-checked by readers;
//! - [`lineage`]: a model's provenance (W3C PROV-JSON) and a job's compliance report,
//!   computed from the events;
//! - [`service`], [`client`], [`wire`] and [`server`]: the `tutela-audit` gRPC service over mutual
//!   TLS behind the consortium's casbin policy (`tutela_policy::EnforceLayer`, with its decisions
//!   recorded in this log), its client, and its configuration file;
//! - [`console`]: the compliance officers' web console, HTTPS on its own port, read-only, behind
//!   the same certificates and policy; [`proof_file`] is the inclusion proof it hands out;
//! - [`report`]: reports a regulator reads (HTML, PDF) with the checkpoint they were made from,
//!   and what `verify-report` checks of them.

/// RFC 8785 canonical JSON, shared with the coordinator's job digest.
pub use tutela_protocol::canonical;
pub mod approval;
pub mod authority;
pub mod checkpoint;
pub mod client;
pub mod event;
pub mod filter;
pub mod lineage;
pub mod merkle;
pub mod payload;
pub mod proof_file;
pub mod quarantine;
pub mod receipt;
pub mod retention;
pub mod stage;
pub mod verify;
pub mod wire;

// The service: its database, the live log, the gRPC service and server, the benchmarks. A site
// node needs none of it (client, events, payloads, checkpoint verification): it depends on this
// crate with `default-features = false` and does not compile sqlx or a database driver.
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod console;
#[cfg(feature = "server")]
pub mod held_checkpoint;
#[cfg(feature = "server")]
pub mod log;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod report;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod store;

mod hexser;

pub use canonical::canonical_json;
pub use checkpoint::{Checkpoint, CheckpointError, CheckpointVerifier, SignedCheckpoint, Update};
pub use event::{Action, Chain, ChainError, Event, Timestamp, TimestampError};
pub use merkle::{MerkleTree, ProofError};
pub use payload::{ActionPayload, PayloadError};
pub use verify::{VerifyError, VerifyReport, verify_log};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// SHA-256 of `data`, as a fixed array.
pub(crate) fn sha256(data: &[u8]) -> Hash {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
