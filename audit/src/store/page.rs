//! One page of events, newest first, by keyset: what the console's event search reads.
//!
//! `seq < cursor ORDER BY seq DESC LIMIT n`, never `OFFSET`: the cost of a page does not grow with
//! how deep the reader has paged, and the filters are one index range each (migration 0004). A
//! time bound is turned into a seq bound first, with one probe of the `(timestamp_ms, seq)` index:
//! timestamps never go back along seq on a log that verifies.
//!
//! Every query here is sent unprepared (`persistent(false)`): PostgreSQL then plans it with the
//! actual values. A cached prepared statement soon gets a generic plan, which does not know that
//! an action or actor is rare and scans the whole primary key backwards looking for it (measured:
//! 2.5 s at 1,000,000 events for an action with no event, against 0.1 ms with the value known).

use sqlx::any::AnyArguments;
use sqlx::{Any, AssertSqlSafe, Row};

use super::{
    CHECKPOINT_COLUMNS, EVENT_COLUMNS, Result, StoreError, checkpoint_of_row, clamp_i64, db,
    event_of_row,
};
use crate::checkpoint::SignedCheckpoint;
use crate::event::{Action, Event, Timestamp};

/// The most events one page may hold.
pub const MAX_PAGE: u32 = 500;

/// What a page asks for; every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageQuery {
    pub actor: Option<String>,
    pub action: Option<Action>,
    pub subject: Option<String>,
    /// Events at or after this instant.
    pub since: Option<Timestamp>,
    /// Events before this instant.
    pub until: Option<Timestamp>,
    /// Events with seq below this (the previous page's last seq): the keyset cursor.
    pub before_seq: Option<u64>,
    /// Page size, 1..=[`MAX_PAGE`].
    pub limit: u32,
}

/// A page of events, newest first, and the cursor of the next (older) page when there is one.
#[derive(Clone, Debug)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub next_before_seq: Option<u64>,
}

impl super::AuditStore {
    /// The smallest seq whose timestamp is at or after `t`, or `None` when every event is older.
    pub async fn first_seq_at_or_after(&self, t: Timestamp) -> Result<Option<u64>> {
        let row = sqlx::query(
            "SELECT seq FROM audit_events WHERE timestamp_ms >= $1 ORDER BY timestamp_ms, seq LIMIT 1",
        )
        .bind(t.unix_millis())
        .persistent(false)
        .fetch_optional(self.pool())
        .await
        .map_err(db("find the first event at a time"))?;
        row.map(|r| r.try_get::<i64, _>(0).map(|s| s.max(0) as u64))
            .transpose()
            .map_err(db("find the first event at a time"))
    }

    /// One page of events matching `q`, newest first.
    pub async fn page(&self, q: &PageQuery) -> Result<EventPage> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        // Time bounds as seq bounds: [from_seq, to_seq).
        let from_seq = match q.since {
            Some(t) => match self.first_seq_at_or_after(t).await? {
                Some(s) => Some(s),
                None => {
                    return Ok(EventPage {
                        events: Vec::new(),
                        next_before_seq: None,
                    });
                }
            },
            None => None,
        };
        let until_seq = match q.until {
            Some(t) => self.first_seq_at_or_after(t).await?,
            None => None,
        };
        let to_seq = match (until_seq, q.before_seq) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };

        let mut sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE 1=1");
        let mut args = AnyArguments::default();
        let mut n = 0usize;
        let mut bind = |sql: &mut String, clause: &str, v: Bound| {
            use sqlx::Arguments as _;
            n += 1;
            sql.push_str(&clause.replace('?', &format!("${n}")));
            match v {
                Bound::I(i) => args.add(i),
                Bound::S(s) => args.add(s),
            }
            .map_err(|e| StoreError::Db {
                op: "bind a page query".into(),
                source: sqlx::Error::Encode(e),
            })
        };
        if let Some(a) = &q.actor {
            bind(&mut sql, " AND actor = ?", Bound::S(a.clone()))?;
        }
        if let Some(a) = q.action {
            bind(&mut sql, " AND action = ?", Bound::S(a.as_str().into()))?;
        }
        if let Some(s) = &q.subject {
            bind(&mut sql, " AND subject = ?", Bound::S(s.clone()))?;
        }
        if let Some(s) = from_seq {
            bind(&mut sql, " AND seq >= ?", Bound::I(clamp_i64(s)))?;
        }
        if let Some(s) = to_seq {
            bind(&mut sql, " AND seq < ?", Bound::I(clamp_i64(s)))?;
        }
        // One more than the page, to know whether an older page exists.
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", limit + 1));
        let rows = sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
            .persistent(false)
            .fetch_all(self.pool())
            .await
            .map_err(db("read a page of events"))?;
        let mut events = rows.iter().map(event_of_row).collect::<Result<Vec<_>>>()?;
        let more = events.len() > limit as usize;
        events.truncate(limit as usize);
        let next_before_seq = if more {
            events.last().map(|e| e.seq)
        } else {
            None
        };
        Ok(EventPage {
            events,
            next_before_seq,
        })
    }

    /// The newest `limit` signed checkpoints, newest first, and how many are stored: the
    /// overview's list, without reading every checkpoint (a log that signs with every commit has
    /// one per commit).
    pub async fn newest_checkpoints(&self, limit: u32) -> Result<(Vec<SignedCheckpoint>, u64)> {
        let sql = format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY tree_size DESC LIMIT {limit}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .persistent(false)
            .fetch_all(self.pool())
            .await
            .map_err(db("read the newest checkpoints"))?;
        let newest = rows
            .iter()
            .map(checkpoint_of_row)
            .collect::<Result<Vec<_>>>()?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_checkpoints")
            .fetch_one(self.pool())
            .await
            .map_err(db("count checkpoints"))?;
        Ok((newest, total.max(0) as u64))
    }

    /// The events of `action` with `from <= seq < to`, oldest first, at most `limit` of the
    /// newest ones: what the console's sites cache is extended with.
    pub async fn events_of_between(
        &self,
        action: Action,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<Event>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE action = $1 AND seq >= $2 AND seq < $3 ORDER BY seq DESC LIMIT {limit}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(action.as_str())
            .bind(clamp_i64(from))
            .bind(clamp_i64(to))
            .persistent(false)
            .fetch_all(self.pool())
            .await
            .map_err(db(format!("read {action} events {from}..{to}")))?;
        let mut events = rows.iter().map(event_of_row).collect::<Result<Vec<_>>>()?;
        events.reverse();
        Ok(events)
    }

    /// The events of `action`, oldest first, at most `limit` of the newest ones: what the
    /// console's jobs, sites and models pages are built from.
    pub async fn events_of(&self, action: Action, limit: u32) -> Result<Vec<Event>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE action = $1 ORDER BY seq DESC LIMIT {limit}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(action.as_str())
            .persistent(false)
            .fetch_all(self.pool())
            .await
            .map_err(db(format!("read {action} events")))?;
        let mut events = rows.iter().map(event_of_row).collect::<Result<Vec<_>>>()?;
        events.reverse();
        Ok(events)
    }
}

enum Bound {
    I(i64),
    S(String),
}
