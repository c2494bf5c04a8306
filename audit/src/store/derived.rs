//! What the store writes beside each event, in the event's own statement or transaction, so that
//! a reader can find it without scanning payloads: the events-by-job index (migration 5).
//!
//! # Why in the same statement
//! A batch, its index rows and the checkpoint due with it are stored together or not at all, so
//! that the index never lacks a committed event (a crash between two writes would leave one out
//! until somebody noticed). PostgreSQL: one statement, the inserts as data-modifying CTEs of the
//! last, one round trip as before; SQLite: one local transaction.
//!
//! The index is never evidence: readers decide on the events themselves
//! ([`crate::filter::EventFilter::matches`]); a row missing would hide an event from a job
//! query, so the console's periodic verification re-derives the index from the verified events
//! and reports the first row missing ([`AuditStore::missing_event_job_row`]).

use sqlx::any::AnyArguments;
use sqlx::{Any, AssertSqlSafe, Row};

use super::{AuditStore, Backend, Result, StoreError, db, rows_insert};
use crate::checkpoint::SignedCheckpoint;
use crate::event::Event;
use crate::filter::payload_job;

/// Events read per batch when the index is filled for events stored before it existed.
const BACKFILL_BATCH: i64 = 10_000;
/// Index rows per INSERT (two binds each).
const JOB_ROWS_PER_INSERT: usize = 1_000;

/// Rows a migration derives from the events already stored, after its SQL, in its transaction.
#[derive(Clone, Copy, Debug)]
pub(super) enum Backfill {
    /// `audit_event_jobs` for every stored event whose payload names a job.
    EventJobs,
}

impl Backfill {
    pub(super) async fn run(
        self,
        tx: &mut sqlx::Transaction<'static, Any>,
    ) -> std::result::Result<(), sqlx::Error> {
        match self {
            Backfill::EventJobs => {
                let mut from: i64 = 0;
                let mut indexed = 0u64;
                loop {
                    let rows = sqlx::query(
                        "SELECT seq, payload FROM audit_events WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    )
                    .bind(from)
                    .bind(BACKFILL_BATCH)
                    .fetch_all(&mut **tx)
                    .await?;
                    let Some(last) = rows.last() else { break };
                    from = last.try_get::<i64, _>(0)? + 1;
                    let mut pairs = Vec::new();
                    for r in &rows {
                        let seq: i64 = r.try_get(0)?;
                        let payload: String = r.try_get(1)?;
                        // A payload that is not JSON is a tampered row: `verify` names it; it
                        // names no job here.
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&payload)
                            && let Some(job) = payload_job(&v)
                        {
                            pairs.push((job.to_string(), seq));
                        }
                    }
                    for chunk in pairs.chunks(JOB_ROWS_PER_INSERT) {
                        let mut args = AnyArguments::default();
                        let sql = job_rows_insert(chunk, 0, &mut args)
                            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                        sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
                            .execute(&mut **tx)
                            .await?;
                    }
                    indexed += pairs.len() as u64;
                    if (rows.len() as i64) < BACKFILL_BATCH {
                        break;
                    }
                }
                tracing::info!(rows = indexed, "audit store: events-by-job index filled");
                Ok(())
            }
        }
    }
}

/// `INSERT INTO audit_event_jobs` of `pairs`, its bind parameters numbered from `$offset+1`, their values added to `args`.
fn job_rows_insert(
    pairs: &[(String, i64)],
    offset: usize,
    args: &mut AnyArguments,
) -> Result<String> {
    use sqlx::Arguments as _;
    let mut sql = String::with_capacity(48 + pairs.len() * 12);
    sql.push_str("INSERT INTO audit_event_jobs (job, seq) VALUES ");
    for (i, (job, seq)) in pairs.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        let b = offset + i * 2;
        sql.push_str(&format!("(${},${})", b + 1, b + 2));
        for r in [args.add(job.clone()), args.add(*seq)] {
            r.map_err(|e| StoreError::Db {
                op: "bind an events-by-job row".into(),
                source: sqlx::Error::Encode(e),
            })?;
        }
    }
    Ok(sql)
}

/// The events-by-job rows of `events`.
fn job_pairs(events: &[Event]) -> Vec<(String, i64)> {
    events
        .iter()
        .filter_map(|e| {
            Some((
                payload_job(&e.payload)?.to_string(),
                i64::try_from(e.seq).ok()?,
            ))
        })
        .collect()
}

/// `INSERT INTO audit_checkpoints` of `cp`, its bind parameters numbered from `$offset+1`.
fn checkpoint_insert(
    cp: &SignedCheckpoint,
    offset: usize,
    args: &mut AnyArguments,
) -> Result<String> {
    use sqlx::Arguments as _;
    let c = &cp.checkpoint;
    let add = |r: std::result::Result<(), sqlx::error::BoxDynError>| {
        r.map_err(|e| StoreError::Db {
            op: "bind a checkpoint".into(),
            source: sqlx::Error::Encode(e),
        })
    };
    add(args.add(c.tree_size as i64))?;
    add(args.add(hex::encode(c.root)))?;
    add(args.add(c.timestamp.unix_millis()))?;
    add(args.add(c.log_id.clone()))?;
    add(args.add(hex::encode(cp.signature)))?;
    Ok(format!(
        "INSERT INTO audit_checkpoints (tree_size, root, timestamp_ms, log_id, signature) VALUES (${},${},${},${},${})",
        offset + 1,
        offset + 2,
        offset + 3,
        offset + 4,
        offset + 5
    ))
}

impl AuditStore {
    /// Stores `events` (at most [`super::MAX_BATCH`], consecutive), their events-by-job rows and,
    /// when given, the checkpoint that covers them: all or nothing.
    pub(super) async fn write_batch(
        &self,
        events: &[Event],
        checkpoint: Option<&SignedCheckpoint>,
    ) -> Result<()> {
        let what = match (events.first(), events.last(), checkpoint) {
            (Some(a), Some(b), None) => format!("insert events {}..={}", a.seq, b.seq),
            (Some(a), Some(b), Some(_)) => {
                format!("insert events {}..={} and their checkpoint", a.seq, b.seq)
            }
            (_, _, Some(c)) => format!("insert the checkpoint of size {}", c.checkpoint.tree_size),
            _ => return Ok(()),
        };
        let jobs = job_pairs(events);
        match self.backend {
            Backend::Postgres => {
                // Each insert but the last is a data-modifying CTE of the last: one statement.
                let mut parts = Vec::new();
                let mut args = AnyArguments::default();
                let mut binds = 0usize;
                if !events.is_empty() {
                    let (sql, a) = rows_insert("audit_events", events)?;
                    parts.push(sql);
                    args = a;
                    binds = events.len() * 8;
                }
                for chunk in jobs.chunks(JOB_ROWS_PER_INSERT) {
                    parts.push(job_rows_insert(chunk, binds, &mut args)?);
                    binds += chunk.len() * 2;
                }
                if let Some(cp) = checkpoint {
                    parts.push(checkpoint_insert(cp, binds, &mut args)?);
                }
                let last = parts.pop().unwrap_or_default();
                let sql = if parts.is_empty() {
                    last
                } else {
                    let ctes: Vec<String> = parts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| format!("w{i} AS ({p})"))
                        .collect();
                    format!("WITH {} {last}", ctes.join(", "))
                };
                sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
                    .execute(&self.pool)
                    .await
                    .map_err(db(what))?;
            }
            Backend::Sqlite => {
                let mut tx = self.pool.begin().await.map_err(db(what.clone()))?;
                if !events.is_empty() {
                    let (sql, args) = rows_insert("audit_events", events)?;
                    sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
                        .execute(&mut *tx)
                        .await
                        .map_err(db(what.clone()))?;
                }
                for chunk in jobs.chunks(JOB_ROWS_PER_INSERT) {
                    let mut args = AnyArguments::default();
                    let sql = job_rows_insert(chunk, 0, &mut args)?;
                    sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
                        .execute(&mut *tx)
                        .await
                        .map_err(db(what.clone()))?;
                }
                if let Some(cp) = checkpoint {
                    let mut args = AnyArguments::default();
                    let sql = checkpoint_insert(cp, 0, &mut args)?;
                    sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
                        .execute(&mut *tx)
                        .await
                        .map_err(db(what.clone()))?;
                }
                tx.commit().await.map_err(db(what))?;
            }
        }
        Ok(())
    }

    /// The first (by seq) row that `events` call for and the events-by-job index lacks, as
    /// (job, seq): what the console's verification checks after verifying the events.
    pub async fn missing_event_job_row(&self, events: &[Event]) -> Result<Option<(String, u64)>> {
        let stored: std::collections::BTreeSet<(String, u64)> =
            self.event_job_rows().await?.into_iter().collect();
        let mut missing: Vec<(String, u64)> = expected_event_job_rows(events)
            .into_iter()
            .filter(|row| !stored.contains(row))
            .collect();
        missing.sort_by_key(|(_, seq)| *seq);
        Ok(missing.into_iter().next())
    }

    /// Every row of the events-by-job index, as (job, seq), sorted.
    pub async fn event_job_rows(&self) -> Result<Vec<(String, u64)>> {
        let rows = sqlx::query("SELECT job, seq FROM audit_event_jobs ORDER BY job, seq")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read the events-by-job index"))?;
        rows.iter()
            .map(|r| {
                let job: String = r.try_get(0).map_err(db("read the events-by-job index"))?;
                let seq: i64 = r.try_get(1).map_err(db("read the events-by-job index"))?;
                Ok((job, seq.max(0) as u64))
            })
            .collect()
    }
}

/// The events-by-job rows `events` call for, as (job, seq), sorted.
pub fn expected_event_job_rows(events: &[Event]) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = events
        .iter()
        .filter_map(|e| Some((payload_job(&e.payload)?.to_string(), e.seq)))
        .collect();
    rows.sort();
    rows
}
