//! An event's inclusion proof as a file a person can carry away and check offline: what the
//! console's "proof" link downloads and `tutela audit verify-proof FILE --public-key KEY` checks,
//! with nothing but the file and the log's checkpoint key (which the checker must get from
//! elsewhere: the copy in the file is a label, never trusted).

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointError, SignedCheckpoint};
use crate::event::Event;
use crate::merkle::{ProofError, leaf_hash, verify_inclusion};
use crate::receipt::InclusionProof;

/// The file format's name and version, the file's first key.
pub const PROOF_FORMAT: &str = "tutela-inclusion-proof/v1";

/// An inclusion proof of one event against a signed checkpoint, as a file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofFile {
    /// [`PROOF_FORMAT`].
    pub format: String,
    /// The event, as stored.
    pub event: Event,
    /// The signed tree head the proof leads to.
    pub checkpoint: SignedCheckpoint,
    /// The RFC 6962 audit path from the event's leaf to the checkpoint's root, hex.
    pub path: Vec<String>,
    /// The key the server says signed the checkpoint (hex): informative only; the checker
    /// uses the key it was given.
    pub public_key: String,
}

/// Why a proof file does not prove its event.
#[derive(Debug, thiserror::Error)]
pub enum ProofFileError {
    #[error("not a {PROOF_FORMAT} file: format is {0:?}")]
    Format(String),
    #[error("path element {index} is not 64 hex digits")]
    PathElement { index: usize },
    #[error("the checkpoint does not verify with the given key: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("event {seq}'s contents do not hash to its recorded hash (the event was edited)")]
    EventHash { seq: u64 },
    #[error("event {seq} is not in the signed tree of size {tree_size}: {why}")]
    NotIncluded {
        seq: u64,
        tree_size: u64,
        why: ProofError,
    },
}

impl ProofFile {
    /// The file of `proof`, made by a log whose checkpoint key is `public_key`.
    pub fn new(proof: InclusionProof, public_key: &[u8]) -> ProofFile {
        ProofFile {
            format: PROOF_FORMAT.to_string(),
            path: proof.path.iter().map(hex::encode).collect(),
            event: proof.event,
            checkpoint: proof.checkpoint,
            public_key: hex::encode(public_key),
        }
    }

    /// Checks, offline, that the checkpoint is signed by `public_key`, that the event hashes to
    /// its recorded hash, and that the path leads from it to the checkpoint's root.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), ProofFileError> {
        if self.format != PROOF_FORMAT {
            return Err(ProofFileError::Format(self.format.clone()));
        }
        let path = self
            .path
            .iter()
            .enumerate()
            .map(|(index, h)| {
                let bytes = hex::decode(h).map_err(|_| ProofFileError::PathElement { index })?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| ProofFileError::PathElement { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.checkpoint.verify(public_key)?;
        let seq = self.event.seq;
        if self.event.compute_hash() != self.event.hash {
            return Err(ProofFileError::EventHash { seq });
        }
        let tree_size = self.checkpoint.checkpoint.tree_size;
        verify_inclusion(
            seq,
            tree_size,
            &leaf_hash(&self.event.hash),
            &path,
            &self.checkpoint.checkpoint.root,
        )
        .map_err(|why| ProofFileError::NotIncluded {
            seq,
            tree_size,
            why,
        })
    }
}
