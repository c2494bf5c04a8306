//! What the log answers an append and a proof request with: shared by the service and its
//! client, without the server.

use crate::Hash;
use crate::checkpoint::SignedCheckpoint;
use crate::event::{Event, Timestamp};

/// What an append returns once the event is committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    pub hash: Hash,
    pub timestamp: Timestamp,
}

/// An inclusion proof of one event against a signed checkpoint.
#[derive(Clone, Debug)]
pub struct InclusionProof {
    pub event: Event,
    pub checkpoint: SignedCheckpoint,
    pub path: Vec<Hash>,
}
