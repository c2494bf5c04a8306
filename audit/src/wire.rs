//! Conversions between the library's types and the `tutela.v1.Audit` protobuf messages. Every
//! conversion from the wire is checked (hash lengths, the action vocabulary, timestamp spelling)
//! and says which field is wrong.

use std::str::FromStr;

use tutela_protocol::pb;

use crate::checkpoint::{Checkpoint, SignedCheckpoint};
use crate::event::{Action, Event, Timestamp};
use crate::filter::EventFilter;
use crate::{Hash, canonical_json};

/// A message from the other side that does not convert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}: {field} {problem}")]
pub struct WireError {
    pub message: &'static str,
    pub field: &'static str,
    pub problem: String,
}

fn bad(message: &'static str, field: &'static str, problem: impl ToString) -> WireError {
    WireError {
        message,
        field,
        problem: problem.to_string(),
    }
}

pub fn hash_of(message: &'static str, field: &'static str, b: &[u8]) -> Result<Hash, WireError> {
    b.try_into()
        .map_err(|_| bad(message, field, format!("is {} bytes, not 32", b.len())))
}

pub fn event_to_pb(e: &Event) -> pb::AuditEvent {
    pb::AuditEvent {
        seq: e.seq,
        timestamp: e.timestamp.to_string(),
        actor: e.actor.clone(),
        action: e.action.as_str().to_string(),
        subject: e.subject.clone(),
        payload_json: canonical_json(&e.payload),
        prev_hash: e.prev_hash.to_vec(),
        hash: e.hash.to_vec(),
    }
}

pub fn event_from_pb(e: &pb::AuditEvent) -> Result<Event, WireError> {
    const M: &str = "AuditEvent";
    Ok(Event {
        seq: e.seq,
        timestamp: Timestamp::from_str(&e.timestamp).map_err(|x| bad(M, "timestamp", x))?,
        actor: e.actor.clone(),
        action: Action::from_str(&e.action).map_err(|x| bad(M, "action", x))?,
        subject: e.subject.clone(),
        payload: serde_json::from_str(&e.payload_json).map_err(|x| bad(M, "payload_json", x))?,
        prev_hash: hash_of(M, "prev_hash", &e.prev_hash)?,
        hash: hash_of(M, "hash", &e.hash)?,
    })
}

pub fn checkpoint_to_pb(c: &SignedCheckpoint) -> pb::AuditCheckpoint {
    pb::AuditCheckpoint {
        tree_size: c.checkpoint.tree_size,
        root: c.checkpoint.root.to_vec(),
        timestamp: c.checkpoint.timestamp.to_string(),
        log_id: c.checkpoint.log_id.clone(),
        signature: c.signature.to_vec(),
    }
}

pub fn checkpoint_from_pb(c: &pb::AuditCheckpoint) -> Result<SignedCheckpoint, WireError> {
    const M: &str = "AuditCheckpoint";
    Ok(SignedCheckpoint {
        checkpoint: Checkpoint {
            tree_size: c.tree_size,
            root: hash_of(M, "root", &c.root)?,
            timestamp: Timestamp::from_str(&c.timestamp).map_err(|x| bad(M, "timestamp", x))?,
            log_id: c.log_id.clone(),
        },
        signature: c.signature.as_slice().try_into().map_err(|_| {
            bad(
                M,
                "signature",
                format!("is {} bytes, not 64", c.signature.len()),
            )
        })?,
    })
}

pub fn filter_to_pb(f: &EventFilter) -> pb::AuditQuery {
    pb::AuditQuery {
        job: f.job.clone(),
        actor: f.actor.clone(),
        action: f.action.map(|a| a.as_str().to_string()),
        since: f.since.map(|t| t.to_string()),
        from_seq: f.from_seq,
        to_seq: f.to_seq,
        limit: f.limit,
        subject: f.subject.clone(),
    }
}

pub fn filter_from_pb(q: &pb::AuditQuery) -> Result<EventFilter, WireError> {
    const M: &str = "AuditQuery";
    Ok(EventFilter {
        job: q.job.clone(),
        subject: q.subject.clone(),
        actor: q.actor.clone(),
        action: q
            .action
            .as_deref()
            .map(Action::from_str)
            .transpose()
            .map_err(|x| bad(M, "action", x))?,
        since: q
            .since
            .as_deref()
            .map(parse_since)
            .transpose()
            .map_err(|x| bad(M, "since", x))?,
        from_seq: q.from_seq,
        to_seq: q.to_seq,
        limit: q.limit,
    })
}

/// Any RFC 3339 instant (not only the canonical spelling), truncated to milliseconds.
pub fn parse_since(s: &str) -> Result<Timestamp, String> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time (e.g. 2026-11-24T09:00:00Z): {e}"))?;
    Timestamp::from_datetime(dt).map_err(|e| e.to_string())
}
