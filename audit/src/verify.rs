//! Whole-log verification: what `tutela audit verify` runs.
//!
//! [`verify_log`] walks the events once, in the order given (the order the store returns them by
//! seq), and for each event checks, in this order:
//! 1. its seq is the next one (seqs are dense from 0): a missing seq is a **gap** (a deleted row),
//!    a seq that turns up later or earlier than its place is **out of order** (moved rows);
//! 2. its stored hash equals SHA-256 of its canonical contents (an **edited** row);
//! 3. its `prev_hash` equals the previous event's hash, or 32 zero bytes for seq 0 (a **broken link**:
//!    a row replaced by one that hashes correctly but does not belong here);
//! 4. its timestamp is not earlier than the previous event's ([`crate::Chain`] appends in time order).
//!
//! It also feeds every event hash into an RFC 6962 Merkle tree and, when the tree reaches a
//! checkpoint's size, checks that checkpoint's signature and that its root equals the tree's. A
//! checkpoint larger than the log means rows were cut off the end (**truncation**). A log rewritten
//! wholesale with a recomputed chain passes 1–4 but not the signed roots.
//!
//! The first failure is returned and names the seq (or checkpoint size) and what is wrong. Events
//! after the newest checkpoint are only protected by the chain (a rewrite of them is not detectable
//! until a checkpoint covers them); [`VerifyReport::unanchored`] says how many there are.

use crate::Hash;
use crate::checkpoint::{CheckpointError, SignedCheckpoint};
use crate::event::{Event, GENESIS_PREV_HASH, Timestamp};
use crate::merkle::{Frontier, leaf_hash};

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of events (seqs `0..events`).
    pub events: u64,
    /// The newest event's hash ([`GENESIS_PREV_HASH`] for an empty log).
    pub head: Hash,
    /// Merkle root over all events.
    pub root: Hash,
    /// How many checkpoints were checked (signature and root).
    pub checkpoints: usize,
    /// The size of the largest checkpoint, if any.
    pub latest_checkpoint: Option<u64>,
    /// Events not covered by any checkpoint.
    pub unanchored: u64,
}

/// The first thing found wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("gap: seq {expected} is missing (after {}, the next row is seq {found})",
        .expected.checked_sub(1).map_or("the start of the log".to_string(), |s| format!("seq {s}")))]
    Gap { expected: u64, found: u64 },
    #[error(
        "out of order at seq {expected}: row {position} holds seq {found}, and seq {expected} is elsewhere or repeated"
    )]
    OutOfOrder {
        position: u64,
        expected: u64,
        found: u64,
    },
    #[error("hash mismatch at seq {seq}: its contents hash to {}, but the stored hash is {}",
        hex::encode(.computed), hex::encode(.stored))]
    HashMismatch {
        seq: u64,
        stored: Hash,
        computed: Hash,
    },
    #[error("link broken at seq {seq}: prev_hash is {}, but the previous event's hash is {}",
        hex::encode(.found), hex::encode(.expected))]
    LinkBroken {
        seq: u64,
        expected: Hash,
        found: Hash,
    },
    #[error("timestamp goes back at seq {seq}: {timestamp} is earlier than seq {}'s {previous}", .seq - 1)]
    TimestampWentBack {
        seq: u64,
        timestamp: Timestamp,
        previous: Timestamp,
    },
    #[error("truncated: a signed checkpoint covers seqs 0..={} but the log ends {}",
        .checkpoint_size - 1,
        .log_len.checked_sub(1).map_or("before seq 0 (it is empty)".to_string(), |s| format!("at seq {s}")))]
    Truncated { checkpoint_size: u64, log_len: u64 },
    #[error("checkpoint of size {tree_size} (covering seqs 0..{tree_size}): {why}")]
    CheckpointInvalid {
        tree_size: u64,
        why: CheckpointError,
    },
    #[error("root mismatch at checkpoint size {tree_size}: the events do not hash to the signed root; \
        the first rewritten seq is in {first_possible}..={last_possible} (the history was rewritten)",
        first_possible = .last_good_size.unwrap_or(0), last_possible = .tree_size - 1)]
    CheckpointRootMismatch {
        tree_size: u64,
        last_good_size: Option<u64>,
    },
    #[error(
        "checkpoint of size {tree_size} is for log {got:?}, but the others are for {expected:?}"
    )]
    MixedLogs {
        tree_size: u64,
        expected: String,
        got: String,
    },
}

/// Checks `events` (in seq order, starting at seq 0) against the `checkpoints` signed with the
/// log's Ed25519 `public_key`; see the module documentation for what is checked and in what order.
pub fn verify_log(
    events: &[Event],
    checkpoints: &[SignedCheckpoint],
    public_key: &[u8],
) -> Result<VerifyReport, VerifyError> {
    let mut cps: Vec<&SignedCheckpoint> = checkpoints.iter().collect();
    cps.sort_by_key(|c| c.checkpoint.tree_size);
    let mut cps = cps.into_iter().peekable();
    let log_id = checkpoints.first().map(|c| c.checkpoint.log_id.clone());

    let mut frontier = Frontier::new();
    let mut last_good_size: Option<u64> = None;
    let mut checked = 0usize;

    // Checks every checkpoint of exactly the frontier's current size.
    let mut check_at = |frontier: &Frontier,
                        cps: &mut std::iter::Peekable<std::vec::IntoIter<&SignedCheckpoint>>|
     -> Result<(), VerifyError> {
        while let Some(cp) = cps.next_if(|c| c.checkpoint.tree_size == frontier.size()) {
            check_checkpoint(cp, log_id.as_deref(), public_key)?;
            if cp.checkpoint.root != frontier.root() {
                return Err(VerifyError::CheckpointRootMismatch {
                    tree_size: frontier.size(),
                    last_good_size,
                });
            }
            last_good_size = Some(frontier.size());
            checked += 1;
        }
        Ok(())
    };
    check_at(&frontier, &mut cps)?;

    let mut buf = String::with_capacity(512);
    let mut prev_hash = GENESIS_PREV_HASH;
    let mut prev_ts: Option<Timestamp> = None;
    for (i, event) in events.iter().enumerate() {
        let expected = i as u64;
        if event.seq != expected {
            // A later seq here is a gap unless the expected seq turns up further on (then rows
            // were moved). Only scanned on failure, so the happy path stays one pass.
            let moved = event.seq < expected || events[i + 1..].iter().any(|e| e.seq == expected);
            return Err(if moved {
                VerifyError::OutOfOrder {
                    position: expected,
                    expected,
                    found: event.seq,
                }
            } else {
                VerifyError::Gap {
                    expected,
                    found: event.seq,
                }
            });
        }
        let computed = event.compute_hash_with(&mut buf);
        if computed != event.hash {
            return Err(VerifyError::HashMismatch {
                seq: expected,
                stored: event.hash,
                computed,
            });
        }
        if event.prev_hash != prev_hash {
            return Err(VerifyError::LinkBroken {
                seq: expected,
                expected: prev_hash,
                found: event.prev_hash,
            });
        }
        if let Some(previous) = prev_ts
            && event.timestamp < previous
        {
            return Err(VerifyError::TimestampWentBack {
                seq: expected,
                timestamp: event.timestamp,
                previous,
            });
        }
        prev_hash = event.hash;
        prev_ts = Some(event.timestamp);
        frontier.push(leaf_hash(&event.hash));
        if cps
            .peek()
            .is_some_and(|c| c.checkpoint.tree_size == frontier.size())
        {
            check_at(&frontier, &mut cps)?;
        }
    }
    // Checkpoints beyond the end: a genuine one means rows were cut off.
    if let Some(cp) = cps.next() {
        check_checkpoint(cp, log_id.as_deref(), public_key)?;
        return Err(VerifyError::Truncated {
            checkpoint_size: cp.checkpoint.tree_size,
            log_len: events.len() as u64,
        });
    }
    let n = events.len() as u64;
    Ok(VerifyReport {
        events: n,
        head: prev_hash,
        root: frontier.root(),
        checkpoints: checked,
        latest_checkpoint: last_good_size.filter(|_| checked > 0),
        unanchored: n - last_good_size.unwrap_or(0),
    })
}

fn check_checkpoint(
    cp: &SignedCheckpoint,
    log_id: Option<&str>,
    public_key: &[u8],
) -> Result<(), VerifyError> {
    let tree_size = cp.checkpoint.tree_size;
    cp.verify(public_key)
        .map_err(|why| VerifyError::CheckpointInvalid { tree_size, why })?;
    if let Some(expected) = log_id
        && cp.checkpoint.log_id != expected
    {
        return Err(VerifyError::MixedLogs {
            tree_size,
            expected: expected.to_string(),
            got: cp.checkpoint.log_id.clone(),
        });
    }
    Ok(())
}
