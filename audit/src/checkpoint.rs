//! Signed checkpoints: the log's Ed25519-signed statement "my first `tree_size` events have Merkle
//! root `root`", and the [`CheckpointVerifier`] a site node keeps.
//!
//! A checkpoint pins history: once a site holds a verified checkpoint of size N, any later
//! checkpoint must come with a consistency proof (RFC 9162 §2.1.4) showing that its tree extends
//! the old one, so the first N events can no longer be edited, removed or reordered without the
//! site noticing — even by someone who can recompute the whole hash chain.
//!
//! The signed bytes ([`Checkpoint::signed_bytes`]) are a small text note, one field per line, in a
//! fixed order, with a versioned first line that separates them from anything else the key signs:
//!
//! ```text
//! tutela-audit-checkpoint/v1
//! log_id <log id>
//! tree_size <decimal>
//! root <64 lowercase hex>
//! timestamp <YYYY-MM-DDTHH:MM:SS.mmmZ>
//! ```
//!
//! Each line ends with `\n`. The log id is printable ASCII without spaces or newlines, so the
//! encoding is unambiguous (no two checkpoints have the same bytes).

use crate::event::Timestamp;
use crate::merkle::{self, ProofError};
use crate::{Hash, hexser};
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// First line of the signed note; bump the version if the encoding ever changes.
pub const CHECKPOINT_HEADER: &str = "tutela-audit-checkpoint/v1";

/// The longest accepted log id, in bytes.
pub const MAX_LOG_ID_LEN: usize = 256;

/// The statement a log signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// How many events (seqs `0..tree_size`) the root covers.
    pub tree_size: u64,
    /// RFC 6962 MTH of those events' hashes.
    #[serde(with = "hexser")]
    pub root: Hash,
    /// When the log signed it.
    pub timestamp: Timestamp,
    /// Which log (e.g. `spiffe://<consortium>/audit`): printable ASCII, no spaces, 1..=256 bytes.
    pub log_id: String,
}

/// A checkpoint and the log's Ed25519 signature over [`Checkpoint::signed_bytes`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    #[serde(with = "hexser")]
    pub signature: [u8; 64],
}

/// What is wrong with a checkpoint, or why a verifier refused it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("log id {0:?} is not 1..=256 bytes of printable ASCII without spaces")]
    BadLogId(String),
    #[error(
        "the signature on the checkpoint of size {tree_size} does not verify with the log's public key"
    )]
    BadSignature { tree_size: u64 },
    #[error("checkpoint is for log {got:?}, expected {expected:?}")]
    WrongLog { expected: String, got: String },
    #[error("checkpoint of size {offered} is older than the verified one of size {latest}")]
    Rollback { latest: u64, offered: u64 },
    #[error(
        "split view: a checkpoint of size {tree_size} with a different root than the verified one of the same size"
    )]
    Fork { tree_size: u64 },
    #[error(
        "checkpoint of size {new} is not consistent with the verified one of size {old}: {why}"
    )]
    Inconsistent { old: u64, new: u64, why: ProofError },
    #[error(
        "checkpoint of size {new_size} is dated {new}, before the verified one of size {old_size} ({old})"
    )]
    TimestampWentBack {
        old_size: u64,
        old: Timestamp,
        new_size: u64,
        new: Timestamp,
    },
}

fn check_log_id(log_id: &str) -> Result<(), CheckpointError> {
    let ok = !log_id.is_empty()
        && log_id.len() <= MAX_LOG_ID_LEN
        && log_id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(CheckpointError::BadLogId(log_id.to_string()))
    }
}

impl Checkpoint {
    /// The bytes that are signed (see the module documentation).
    pub fn signed_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        check_log_id(&self.log_id)?;
        Ok(format!(
            "{CHECKPOINT_HEADER}\nlog_id {}\ntree_size {}\nroot {}\ntimestamp {}\n",
            self.log_id,
            self.tree_size,
            hex::encode(self.root),
            self.timestamp
        )
        .into_bytes())
    }

    /// Signs with the log's key.
    pub fn sign(&self, key: &Ed25519KeyPair) -> Result<SignedCheckpoint, CheckpointError> {
        let sig = key.sign(&self.signed_bytes()?);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(sig.as_ref());
        Ok(SignedCheckpoint {
            checkpoint: self.clone(),
            signature,
        })
    }
}

impl SignedCheckpoint {
    /// Checks the signature with the log's 32-byte Ed25519 public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), CheckpointError> {
        let msg = self.checkpoint.signed_bytes()?;
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&msg, &self.signature)
            .map_err(|_| CheckpointError::BadSignature {
                tree_size: self.checkpoint.tree_size,
            })
    }
}

/// What [`CheckpointVerifier::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The verifier held nothing; the checkpoint was accepted on its signature alone (trust on
    /// first use — a site should pin its first checkpoint out of band where it can).
    First { tree_size: u64 },
    /// The log grew consistently from `from` to `to` events.
    Advanced { from: u64, to: u64 },
    /// The same size and root as the one held (nothing changed).
    Unchanged { tree_size: u64 },
}

/// What a site node keeps: the log's public key and the newest checkpoint it has verified.
/// It moves forward only along consistency proofs, so history it has seen cannot be rewritten.
#[derive(Clone, Debug)]
pub struct CheckpointVerifier {
    public_key: Vec<u8>,
    log_id: String,
    latest: Option<SignedCheckpoint>,
}

impl CheckpointVerifier {
    /// A verifier for `log_id` that has seen nothing yet.
    pub fn new(public_key: &[u8], log_id: impl Into<String>) -> CheckpointVerifier {
        CheckpointVerifier {
            public_key: public_key.to_vec(),
            log_id: log_id.into(),
            latest: None,
        }
    }

    /// A verifier restored from the checkpoint it saved, which is checked again.
    pub fn restore(
        public_key: &[u8],
        latest: SignedCheckpoint,
    ) -> Result<CheckpointVerifier, CheckpointError> {
        latest.verify(public_key)?;
        Ok(CheckpointVerifier {
            public_key: public_key.to_vec(),
            log_id: latest.checkpoint.log_id.clone(),
            latest: Some(latest),
        })
    }

    /// The newest verified checkpoint (save it; restore with [`CheckpointVerifier::restore`]).
    pub fn latest(&self) -> Option<&SignedCheckpoint> {
        self.latest.as_ref()
    }

    /// Accepts `new` only if its signature verifies, it is for this log, and `proof` (a
    /// consistency proof from the held checkpoint's size to `new`'s) shows that it extends the held
    /// one. On any error the held checkpoint is unchanged.
    pub fn update(
        &mut self,
        new: &SignedCheckpoint,
        proof: &[Hash],
    ) -> Result<Update, CheckpointError> {
        new.verify(&self.public_key)?;
        let c = &new.checkpoint;
        if c.log_id != self.log_id {
            return Err(CheckpointError::WrongLog {
                expected: self.log_id.clone(),
                got: c.log_id.clone(),
            });
        }
        let Some(old) = self.latest.as_ref().map(|s| &s.checkpoint) else {
            self.latest = Some(new.clone());
            return Ok(Update::First {
                tree_size: c.tree_size,
            });
        };
        if c.tree_size < old.tree_size {
            return Err(CheckpointError::Rollback {
                latest: old.tree_size,
                offered: c.tree_size,
            });
        }
        if c.tree_size == old.tree_size {
            if c.root != old.root {
                return Err(CheckpointError::Fork {
                    tree_size: c.tree_size,
                });
            }
            // A re-signed checkpoint of the same tree: keep the newer timestamp, nothing else changes.
            if c.timestamp > old.timestamp {
                self.latest = Some(new.clone());
            }
            return Ok(Update::Unchanged {
                tree_size: c.tree_size,
            });
        }
        if c.timestamp < old.timestamp {
            return Err(CheckpointError::TimestampWentBack {
                old_size: old.tree_size,
                old: old.timestamp,
                new_size: c.tree_size,
                new: c.timestamp,
            });
        }
        // An empty tree is extended by every tree; RFC 9162 defines proofs only for old size > 0.
        if old.tree_size > 0 {
            merkle::verify_consistency(old.tree_size, c.tree_size, &old.root, &c.root, proof)
                .map_err(|why| CheckpointError::Inconsistent {
                    old: old.tree_size,
                    new: c.tree_size,
                    why,
                })?;
        }
        let from = old.tree_size;
        self.latest = Some(new.clone());
        Ok(Update::Advanced {
            from,
            to: c.tree_size,
        })
    }
}
