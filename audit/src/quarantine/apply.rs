//! The quarantine's database side: drawing up an order's terms from the stored tail, applying a
//! signed order (as the tables' owner, with the service stopped), and what the service and the
//! readers read back (orders not yet on the record, the quarantined rows for forensics).

use sqlx::Row;
use tutela_policy::authz::{Authorizer, CONSORTIUM_DOMAIN};
use tutela_policy::quorum;

use super::{POLICY_ACTION, POLICY_OBJECT, verify_signatures};
use crate::authority::OfficerTrust;
use crate::event::{Action, Event, Timestamp};
use crate::payload::{ActionPayload, AuditQuarantined, QuarantineTerms, QuarantinedRow};
use crate::store::{AuditStore, StoreError};

/// Why a quarantine was not drawn up or not applied; nothing was moved.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("audit store: {op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "seq {seq} is covered by the signed checkpoint of size {checkpointed}: a signed row is never quarantined (an edited signed row is restored from the checkpoint's evidence; see docs/runbooks/audit-forged-row.md)"
    )]
    Anchored { seq: u64, checkpointed: u64 },
    #[error("no row at or after seq {0}: nothing to quarantine")]
    Nothing(u64),
    #[error(
        "the order's rows are not the stored rows from seq {from_seq} on (stored: {stored}); draw up and sign a new order"
    )]
    RowsChanged { from_seq: u64, stored: String },
    #[error("the order is for log {order:?}, this store's checkpoints are {store:?}'s")]
    OtherLog { order: String, store: String },
    #[error("the order's reason is empty: say why the rows are quarantined")]
    NoReason,
    #[error("the order names no site whose officers' quorum it needs")]
    NoSites,
    #[error("the order's signatures do not hold: {0}")]
    Signature(String),
    #[error("{operator} may not order a quarantine: {rule}")]
    OperatorNotAllowed { operator: String, rule: String },
    #[error("the policy's quorum for sites {sites:?} is not met: {missing}")]
    QuorumNotMet { sites: Vec<String>, missing: String },
    #[error("a stored order is not readable: {0}")]
    BadOrder(String),
    #[error(
        "this log signs a checkpoint only every {checkpoint_every} events (audit.toml \
         checkpoint_every), so an unanchored row may be a genuine event the service acknowledged \
         and had not signed yet when it stopped: a quarantine moves only rows the service never \
         wrote, which only a log that signs every commit (checkpoint_every = 1) tells apart. Start \
         the service to sign its tail, then inspect it (`tutela audit verify`)"
    )]
    MaySignLater { checkpoint_every: u64 },
}

fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> QuarantineError {
    move |source| QuarantineError::Db { op, source }
}

/// A quarantined row as stored, payload included (for forensics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantinedRecord {
    pub seq: u64,
    pub timestamp_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
    pub quarantined_at_ms: i64,
}

/// The stored rows from `from_seq` on, read as text (a forged row need not even parse as an
/// event).
async fn rows_from(
    store: &AuditStore,
    from_seq: u64,
) -> Result<Vec<QuarantinedRow>, QuarantineError> {
    let rows = sqlx::query(
        "SELECT seq, hash, actor, action, subject FROM audit_events WHERE seq >= $1 ORDER BY seq",
    )
    .bind(i64::try_from(from_seq).unwrap_or(i64::MAX))
    .fetch_all(store.pool())
    .await
    .map_err(db("read the rows to quarantine"))?;
    rows.iter()
        .map(|r| {
            let seq: i64 = r.try_get(0)?;
            Ok(QuarantinedRow {
                seq: seq.max(0) as u64,
                hash: r.try_get(1)?,
                actor: r.try_get(2)?,
                action: r.try_get(3)?,
                subject: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db("read the rows to quarantine"))
}

/// The size the newest signed checkpoint covers, and its log id.
async fn anchored(store: &AuditStore) -> Result<(u64, Option<String>), QuarantineError> {
    Ok(match store.latest_checkpoint().await? {
        Some(cp) => (cp.checkpoint.tree_size, Some(cp.checkpoint.log_id)),
        None => (0, None),
    })
}

/// Draws up the terms of an order quarantining every row from `from_seq` (default: the first
/// row no signed checkpoint covers) for `reason`, to be countersigned by the officers of `sites`.
pub async fn plan(
    store: &AuditStore,
    log_id: Option<&str>,
    from_seq: Option<u64>,
    reason: &str,
    sites: &[String],
) -> Result<QuarantineTerms, QuarantineError> {
    let (checkpointed, store_log) = anchored(store).await?;
    let from_seq = from_seq.unwrap_or(checkpointed);
    if from_seq < checkpointed {
        return Err(QuarantineError::Anchored {
            seq: from_seq,
            checkpointed,
        });
    }
    if reason.trim().is_empty() {
        return Err(QuarantineError::NoReason);
    }
    if sites.is_empty() {
        return Err(QuarantineError::NoSites);
    }
    let rows = rows_from(store, from_seq).await?;
    if rows.is_empty() {
        return Err(QuarantineError::Nothing(from_seq));
    }
    let log_id = match (log_id, store_log) {
        (Some(given), Some(stored)) if given != stored => {
            return Err(QuarantineError::OtherLog {
                order: given.to_string(),
                store: stored,
            });
        }
        (Some(given), _) => given.to_string(),
        (None, Some(stored)) => stored,
        (None, None) => {
            return Err(QuarantineError::BadOrder(
                "no checkpoint names this log's id: pass it (--log-id spiffe://<consortium>/audit)"
                    .to_string(),
            ));
        }
    };
    Ok(QuarantineTerms {
        log_id,
        from_seq,
        rows,
        reason: reason.to_string(),
        sites: sites.to_vec(),
        created_at_ms: Timestamp::now().unix_millis(),
    })
}

/// Applies a signed `order`: re-checks that the rows are forged (unanchored in a log that signs
/// every commit: `checkpoint_every` is the service's, from its audit.toml), its rows against the
/// store, its signatures (each certificate against `trust` now), that the operator may order it
/// and that the officers meet the policy's quorum over its sites; then, in one transaction,
/// copies the rows into `audit_quarantine` and removes them from `audit_events`. Returns the
/// order as it will be recorded (with the quorum met and the policy's digest).
pub async fn apply(
    store: &AuditStore,
    order: &AuditQuarantined,
    authorizer: &Authorizer,
    trust: &OfficerTrust,
    checkpoint_every: u64,
) -> Result<AuditQuarantined, QuarantineError> {
    // What makes an unanchored row forged: the service signs a checkpoint in the transaction of
    // every commit, so it never acknowledged a row no checkpoint covers. A log that signs less
    // often has genuine unanchored rows after a crash, which a quorum must not be able to hide.
    if checkpoint_every != 1 {
        return Err(QuarantineError::MaySignLater { checkpoint_every });
    }
    let terms = &order.terms;
    if terms.reason.trim().is_empty() {
        return Err(QuarantineError::NoReason);
    }
    if terms.sites.is_empty() {
        return Err(QuarantineError::NoSites);
    }
    let (checkpointed, store_log) = anchored(store).await?;
    if terms.from_seq < checkpointed {
        return Err(QuarantineError::Anchored {
            seq: terms.from_seq,
            checkpointed,
        });
    }
    if let Some(stored) = store_log
        && stored != terms.log_id
    {
        return Err(QuarantineError::OtherLog {
            order: terms.log_id.clone(),
            store: stored,
        });
    }
    let stored = rows_from(store, terms.from_seq).await?;
    if stored != terms.rows {
        let seqs: Vec<String> = stored.iter().map(|r| r.seq.to_string()).collect();
        return Err(QuarantineError::RowsChanged {
            from_seq: terms.from_seq,
            stored: format!("seqs [{}]", seqs.join(", ")),
        });
    }
    let check = trust.chain_check(Timestamp::now());
    let signers = verify_signatures(order, check.as_ref()).map_err(QuarantineError::Signature)?;
    let decision = authorizer.decide(
        &signers.operator.uri(),
        CONSORTIUM_DOMAIN,
        POLICY_OBJECT,
        POLICY_ACTION,
    );
    if !decision.allowed {
        return Err(QuarantineError::OperatorNotAllowed {
            operator: signers.operator.uri(),
            rule: decision.rule,
        });
    }
    let rules = authorizer.quorum_rules();
    let officers: Vec<String> = signers.officers.iter().map(|o| o.uri()).collect();
    let status = quorum::evaluate(&rules, &terms.sites, &officers, |s, r, d| {
        authorizer.has_role(s, r, d)
    });
    if status.requirements.is_empty() || !status.is_met() {
        let mut missing = status.missing();
        if status.requirements.is_empty() {
            missing.push("the policy has no quorum rule (p2) for these sites".to_string());
        }
        return Err(QuarantineError::QuorumNotMet {
            sites: terms.sites.clone(),
            missing: missing.join("; "),
        });
    }
    let mut recorded = order.clone();
    recorded.quorum = status.gathered();
    recorded.policy_digest = decision.policy_digest.to_hex();
    let order_json = crate::canonical_json(&recorded.to_value());
    let mut tx = store
        .pool()
        .begin()
        .await
        .map_err(db("quarantine: begin"))?;
    sqlx::query(
        "INSERT INTO audit_quarantine (seq, timestamp_ms, actor, action, subject, payload,
             prev_hash, hash, quarantined_at_ms, order_json)
         SELECT seq, timestamp_ms, actor, action, subject, payload, prev_hash, hash, $1, $2
         FROM audit_events WHERE seq >= $3",
    )
    .bind(Timestamp::now().unix_millis())
    .bind(order_json)
    .bind(i64::try_from(terms.from_seq).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await
    .map_err(db("quarantine: copy the rows into audit_quarantine"))?;
    let removed = sqlx::query("DELETE FROM audit_events WHERE seq >= $1")
        .bind(i64::try_from(terms.from_seq).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(db("quarantine: remove the rows from audit_events"))?;
    if removed.rows_affected() != terms.rows.len() as u64 {
        // A row appended in between: roll back, nothing moved.
        return Err(QuarantineError::RowsChanged {
            from_seq: terms.from_seq,
            stored: format!("{} rows at the time of the move", removed.rows_affected()),
        });
    }
    tx.commit().await.map_err(db("quarantine: commit"))?;
    tracing::warn!(
        from_seq = terms.from_seq,
        rows = terms.rows.len(),
        operator = %signers.operator,
        "audit rows quarantined"
    );
    Ok(recorded)
}

/// Every order applied to this store, in the order of their first quarantined seq.
pub async fn orders(store: &AuditStore) -> Result<Vec<AuditQuarantined>, QuarantineError> {
    let rows = sqlx::query(
        "SELECT order_json, MIN(seq) AS first FROM audit_quarantine GROUP BY order_json ORDER BY first",
    )
    .fetch_all(store.pool())
    .await
    .map_err(db("read the quarantine orders"))?;
    rows.iter()
        .map(|r| {
            let text: String = r.try_get(0).map_err(db("read the quarantine orders"))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| QuarantineError::BadOrder(e.to_string()))?;
            AuditQuarantined::from_value(0, &value)
                .map_err(|e| QuarantineError::BadOrder(e.to_string()))
        })
        .collect()
}

/// The orders applied to the store that `events` (the log) does not yet record as
/// `audit.quarantined`: what the service appends when it opens the log.
pub async fn pending(
    store: &AuditStore,
    events: &[Event],
) -> Result<Vec<AuditQuarantined>, QuarantineError> {
    let recorded: Vec<AuditQuarantined> = events
        .iter()
        .filter(|e| e.action == Action::AuditQuarantined)
        .filter_map(|e| AuditQuarantined::from_event(e).ok())
        .collect();
    Ok(orders(store)
        .await?
        .into_iter()
        .filter(|o| !recorded.iter().any(|r| r.terms == o.terms))
        .collect())
}

/// Every quarantined row, as it was stored, by seq.
pub async fn quarantined_rows(
    store: &AuditStore,
) -> Result<Vec<QuarantinedRecord>, QuarantineError> {
    let rows = sqlx::query(
        "SELECT seq, timestamp_ms, actor, action, subject, payload, prev_hash, hash, quarantined_at_ms
         FROM audit_quarantine ORDER BY quarantined_at_ms, seq",
    )
    .fetch_all(store.pool())
    .await
    .map_err(db("read the quarantined rows"))?;
    rows.iter()
        .map(|r| {
            let seq: i64 = r.try_get(0)?;
            Ok(QuarantinedRecord {
                seq: seq.max(0) as u64,
                timestamp_ms: r.try_get(1)?,
                actor: r.try_get(2)?,
                action: r.try_get(3)?,
                subject: r.try_get(4)?,
                payload: r.try_get(5)?,
                prev_hash: r.try_get(6)?,
                hash: r.try_get(7)?,
                quarantined_at_ms: r.try_get(8)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db("read the quarantined rows"))
}
