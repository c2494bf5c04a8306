//! Where the audit log lives: SQLite (a file, the embedded default) or PostgreSQL (a URL), through
//! sqlx's `Any` driver with one schema (`audit/migrations/`).
//!
//! # Append-only
//! The events and checkpoints tables refuse UPDATE, DELETE (and on PostgreSQL TRUNCATE) by
//! trigger, whoever asks. On PostgreSQL the service should also connect as a role that may only
//! INSERT and SELECT: [`AuditStore::grant_append_only`] (what `tutela-audit init-db --app-role`
//! runs as the tables' owner) sets that up. None of this is what makes tampering *detectable*:
//! that is the hash chain and the signed checkpoints, checked by [`crate::verify_log`].
//!
//! # Durability
//! [`AuditStore::insert_events`] writes a batch as one multi-row INSERT, a single statement in its
//! own transaction: it returns only after COMMIT, which on PostgreSQL with `synchronous_commit=on`
//! (the default) means the WAL is flushed, and on SQLite (`journal_mode=WAL`,
//! `synchronous=FULL`) means the WAL is synced. Either all of a batch is stored or none of it.
//!
//! # Why no sqlx macros
//! As in the coordinator's store: runtime queries with hand-written row mapping, migrations applied
//! here from embedded SQL files, so that no database or `.sqlx` cache is needed at build time.

use std::path::Path;
use std::str::FromStr;

use sqlx::any::{AnyArguments, AnyRow};
// AssertSqlSafe: every dynamic statement here is built from constant text and `$n`
// placeholders; the one identifier (a role name in grant_append_only) is quoted.
use sqlx::{Any, AnyPool, AssertSqlSafe, Row};

use tutela_protocol::database;
/// The URL with its password (and query) hidden, for messages.
pub use tutela_protocol::database::redact_url;

use crate::checkpoint::{Checkpoint, SignedCheckpoint};
use crate::event::{Action, Event, Timestamp};
use crate::{Hash, hexser};

/// Which database a store is on.
pub use tutela_protocol::database::Backend;

mod derived;
pub mod page;
pub mod site_checkpoints;
pub use derived::expected_event_job_rows;
pub use page::{EventPage, PageQuery};
pub use site_checkpoints::SiteCheckpoint;

/// One embedded migration; `postgres` and `sqlite` differ only where the SQL dialects do.
struct Migration {
    version: i64,
    name: &'static str,
    postgres: &'static str,
    sqlite: &'static str,
    /// Rows the store derives from the stored events after the SQL, in the same transaction.
    backfill: Option<derived::Backfill>,
}

const SCHEMA: &str = include_str!("../migrations/0001_events_checkpoints.sql");

/// Every schema migration, in order. Append; never edit a released one (the checksum is checked).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events_checkpoints",
        postgres: SCHEMA,
        sqlite: SCHEMA,
        backfill: None,
    },
    Migration {
        version: 2,
        name: "append_only",
        postgres: include_str!("../migrations/0002_append_only.postgres.sql"),
        sqlite: include_str!("../migrations/0002_append_only.sqlite.sql"),
        backfill: None,
    },
    Migration {
        version: 3,
        name: "quarantine",
        postgres: include_str!("../migrations/0003_quarantine.postgres.sql"),
        sqlite: include_str!("../migrations/0003_quarantine.sqlite.sql"),
        backfill: None,
    },
    Migration {
        version: 4,
        name: "console_indexes",
        postgres: CONSOLE_INDEXES,
        sqlite: CONSOLE_INDEXES,
        backfill: None,
    },
    Migration {
        version: 5,
        name: "event_jobs",
        postgres: include_str!("../migrations/0005_event_jobs.postgres.sql"),
        sqlite: include_str!("../migrations/0005_event_jobs.sqlite.sql"),
        backfill: Some(derived::Backfill::EventJobs),
    },
    Migration {
        version: 6,
        name: "site_checkpoints",
        postgres: SITE_CHECKPOINTS,
        sqlite: SITE_CHECKPOINTS,
        backfill: None,
    },
];

const SITE_CHECKPOINTS: &str = include_str!("../migrations/0006_site_checkpoints.sql");

const CONSOLE_INDEXES: &str = include_str!("../migrations/0004_console_indexes.sql");

/// Prefixed so that the audit service can share a PostgreSQL database with the coordinator, which
/// keeps its own `coordinator_schema_migrations`.
const MIGRATIONS_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS audit_schema_migrations (
    version       BIGINT NOT NULL PRIMARY KEY,
    name          TEXT   NOT NULL,
    checksum      TEXT   NOT NULL,
    applied_at_ms BIGINT NOT NULL
)";

/// Serialises concurrent migrations of one PostgreSQL database ("tutelaau" in ASCII).
const PG_MIGRATION_LOCK: &str =
    "SELECT 1 FROM (SELECT pg_advisory_xact_lock(8387236685218047349)) AS migration_lock";

/// The columns of `audit_events`, in the order every query selects them.
const EVENT_COLUMNS: &str = "seq, timestamp_ms, actor, action, subject, payload, prev_hash, hash";
const CHECKPOINT_COLUMNS: &str = "tree_size, root, timestamp_ms, log_id, signature";

/// The most events one INSERT carries: 8 binds each, well under PostgreSQL's 65,535 and SQLite's
/// 32,766 bind limits.
pub const MAX_BATCH: usize = 1000;

/// Something the store could not do, saying what and where.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "audit store URL {0:?} is not supported: expected sqlite://PATH?mode=rwc or postgres://USER@HOST/DATABASE"
    )]
    UnsupportedUrl(String),
    #[error("cannot open the audit store at {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("audit store at {location}: migration {version} ({name}) failed: {source}")]
    Migration {
        location: String,
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "audit store at {location}: migration {version} ({name}) was applied with checksum {applied}, but this build's copy has {expected}: a released migration was edited"
    )]
    MigrationChanged {
        location: String,
        version: i64,
        name: String,
        applied: String,
        expected: String,
    },
    #[error(
        "audit store at {location}: the schema is at version {found}, newer than this build's {known}"
    )]
    SchemaTooNew {
        location: String,
        found: i64,
        known: i64,
    },
    #[error(
        "audit store at {location}: the schema is not installed (or is out of date) and this role cannot install it: {source}; run `tutela-audit init-db` as the database owner"
    )]
    NotInitialised {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("audit store: {op}: {source}")]
    Db {
        op: String,
        #[source]
        source: sqlx::Error,
    },
    /// A stored row that cannot even be read as an event (a tampered column, say).
    #[error("audit store: row seq {seq}: {problem}")]
    BadRow { seq: i64, problem: String },
    #[error("audit store: {what} {problem}")]
    InvalidInput { what: String, problem: String },
    #[error("{op} is only available on PostgreSQL (this store is SQLite)")]
    PostgresOnly { op: &'static str },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn db(op: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let op = op.into();
    move |source| StoreError::Db { op, source }
}

pub use crate::filter::EventFilter;

/// The audit log's database.
#[derive(Clone, Debug)]
pub struct AuditStore {
    pool: AnyPool,
    backend: Backend,
    location: String,
}

impl AuditStore {
    /// `sqlite://PATH?mode=rwc` for a file path, with `%`, `?` and `#` percent-encoded.
    pub fn sqlite_url(path: &Path) -> Result<String> {
        database::sqlite_url(path).ok_or_else(|| StoreError::InvalidInput {
            what: format!("audit store path {}", path.display()),
            problem: "is not valid UTF-8".to_string(),
        })
    }

    /// Opens the store and brings its schema up to date. A role that may not create tables (the
    /// append-only application role) can open a store whose schema is already current.
    pub async fn open(url: &str) -> Result<AuditStore> {
        let location = redact_url(url);
        let Some(backend) = Backend::of_url(url) else {
            return Err(StoreError::UnsupportedUrl(location));
        };
        let pool = database::open_pool(
            url,
            backend,
            16,
            "audit store",
            &["PRAGMA busy_timeout = 30000"],
        )
        .await
        .map_err(|source| StoreError::Open {
            location: location.clone(),
            source,
        })?;
        let store = AuditStore {
            pool,
            backend,
            location,
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL with any password replaced, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The underlying pool (tests use it to play the attacker).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    fn migration_sql(&self, m: &Migration) -> &'static str {
        match self.backend {
            Backend::Postgres => m.postgres,
            Backend::Sqlite => m.sqlite,
        }
    }

    /// The applied migrations, or `None` when the migrations table does not exist yet.
    async fn applied_migrations(&self) -> Option<Vec<(i64, String, String)>> {
        let rows = sqlx::query(
            "SELECT version, name, checksum FROM audit_schema_migrations ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .ok()?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .ok()
    }

    /// Checks applied migrations against this build's; `Ok(true)` when all are applied.
    fn check_applied(&self, applied: &[(i64, String, String)]) -> Result<bool> {
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if let Some((found, _, _)) = applied.iter().find(|(v, _, _)| *v > known) {
            return Err(StoreError::SchemaTooNew {
                location: self.location.clone(),
                found: *found,
                known,
            });
        }
        let mut all = true;
        for m in MIGRATIONS {
            let expected = sha256_hex(self.migration_sql(m).as_bytes());
            match applied.iter().find(|(v, _, _)| *v == m.version) {
                Some((_, name, sum)) if *sum != expected => {
                    return Err(StoreError::MigrationChanged {
                        location: self.location.clone(),
                        version: m.version,
                        name: name.clone(),
                        applied: sum.clone(),
                        expected,
                    });
                }
                Some(_) => {}
                None => all = false,
            }
        }
        Ok(all)
    }

    async fn migrate(&self) -> Result<()> {
        // Read-only first, so that the append-only role (no CREATE) can open a current schema.
        if let Some(applied) = self.applied_migrations().await
            && self.check_applied(&applied)?
        {
            return Ok(());
        }
        let not_initialised = |source| StoreError::NotInitialised {
            location: self.location.clone(),
            source,
        };
        let mut tx = self.pool.begin().await.map_err(db("migrate: begin"))?;
        if self.backend == Backend::Postgres {
            sqlx::query(PG_MIGRATION_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(db("migrate: take the migration lock"))?;
        }
        sqlx::query(MIGRATIONS_TABLE_DDL)
            .execute(&mut *tx)
            .await
            .map_err(not_initialised)?;
        let applied: Vec<(i64, String, String)> = sqlx::query(
            "SELECT version, name, checksum FROM audit_schema_migrations ORDER BY version",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db("migrate: read audit_schema_migrations"))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db("migrate: read audit_schema_migrations"))?;
        self.check_applied(&applied)?;
        for m in MIGRATIONS {
            if applied.iter().any(|(v, _, _)| *v == m.version) {
                continue;
            }
            let sql = self.migration_sql(m);
            let failed = |source| StoreError::Migration {
                location: self.location.clone(),
                version: m.version,
                name: m.name,
                source,
            };
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(failed)?;
            if let Some(backfill) = m.backfill {
                backfill.run(&mut tx).await.map_err(failed)?;
            }
            sqlx::query(
                "INSERT INTO audit_schema_migrations (version, name, checksum, applied_at_ms)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(m.version)
            .bind(m.name)
            .bind(sha256_hex(sql.as_bytes()))
            .bind(Timestamp::now().unix_millis())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
            tracing::info!(version = m.version, name = m.name, location = %self.location, "audit store migrated");
        }
        tx.commit().await.map_err(db("migrate: commit"))?;
        Ok(())
    }

    /// PostgreSQL: makes `role` (an existing login role) able to INSERT and SELECT the audit
    /// tables and nothing else (no UPDATE, DELETE, TRUNCATE, no DDL on them). Run as the tables'
    /// owner, after [`AuditStore::open`] has installed the schema. Idempotent.
    pub async fn grant_append_only(&self, role: &str) -> Result<()> {
        if self.backend != Backend::Postgres {
            return Err(StoreError::PostgresOnly {
                op: "grant_append_only",
            });
        }
        // A role name goes into DDL, which cannot take bind parameters: quote it as an identifier.
        let quoted = format!("\"{}\"", role.replace('"', "\"\""));
        let statements = [
            format!(
                "REVOKE ALL ON audit_events, audit_checkpoints, audit_schema_migrations, audit_quarantine, audit_event_jobs, audit_site_checkpoints FROM {quoted}"
            ),
            format!(
                "GRANT SELECT, INSERT ON audit_events, audit_checkpoints, audit_event_jobs TO {quoted}"
            ),
            // The newest checkpoint each site holds is replaced by its next report.
            format!("GRANT SELECT, INSERT, UPDATE ON audit_site_checkpoints TO {quoted}"),
            format!("GRANT SELECT ON audit_schema_migrations, audit_quarantine TO {quoted}"),
        ];
        let mut tx = self.pool.begin().await.map_err(db("grant: begin"))?;
        for s in &statements {
            sqlx::query(AssertSqlSafe(s.as_str()))
                .execute(&mut *tx)
                .await
                .map_err(db(format!("grant append-only to {role}: {s}")))?;
        }
        tx.commit().await.map_err(db("grant: commit"))?;
        Ok(())
    }

    /// Stores `events` (consecutive, in seq order) in one multi-row INSERT; returns after COMMIT.
    /// Either every event is stored or none (a taken seq fails the whole batch).
    /// Each event's events-by-job row (migration 5) is written in the same statement.
    pub async fn insert_events(&self, events: &[Event]) -> Result<()> {
        for chunk in events.chunks(MAX_BATCH) {
            self.write_batch(chunk, None).await?;
        }
        Ok(())
    }

    /// The same rows into `bench_plain_events`, an unchained table the benchmark compares with.
    pub async fn insert_plain(&self, events: &[Event]) -> Result<()> {
        self.insert_rows("bench_plain_events", events).await
    }

    /// Installs a missing schema again (the benchmark drops its tables between runs).
    pub async fn migrate_again(&self) -> Result<()> {
        self.migrate().await
    }

    async fn insert_rows(&self, table: &'static str, events: &[Event]) -> Result<()> {
        for chunk in events.chunks(MAX_BATCH) {
            let (sql, args) = rows_insert(table, chunk)?;
            let first = chunk.first().map_or(0, |e| e.seq);
            sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
                .execute(&self.pool)
                .await
                .map_err(db(format!(
                    "insert events {first}..={}",
                    first + chunk.len() as u64 - 1
                )))?;
        }
        Ok(())
    }

    /// Stores `events` (consecutive, at most [`MAX_BATCH`]) and the checkpoint that covers them
    /// atomically: both or neither, so that no committed event waits under the hash chain alone
    /// for a later checkpoint. PostgreSQL: one statement (the events' INSERT as a data-modifying
    /// CTE of the checkpoint's), one round trip; SQLite: one local transaction.
    pub async fn insert_events_with_checkpoint(
        &self,
        events: &[Event],
        checkpoint: &SignedCheckpoint,
    ) -> Result<()> {
        if events.len() > MAX_BATCH {
            return Err(StoreError::InvalidInput {
                what: format!("a batch of {} events", events.len()),
                problem: format!("more than {MAX_BATCH} with a checkpoint"),
            });
        }
        self.write_batch(events, Some(checkpoint)).await
    }

    /// Stores a signed checkpoint.
    pub async fn insert_checkpoint(&self, cp: &SignedCheckpoint) -> Result<()> {
        let c = &cp.checkpoint;
        sqlx::query(
            "INSERT INTO audit_checkpoints (tree_size, root, timestamp_ms, log_id, signature)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(c.tree_size as i64)
        .bind(hex::encode(c.root))
        .bind(c.timestamp.unix_millis())
        .bind(c.log_id.clone())
        .bind(hex::encode(cp.signature))
        .execute(&self.pool)
        .await
        .map_err(db(format!("insert checkpoint of size {}", c.tree_size)))?;
        Ok(())
    }

    /// The number of stored events (the highest seq + 1 on an intact log).
    pub async fn count(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
            .fetch_one(&self.pool)
            .await
            .map_err(db("count events"))?;
        Ok(n.max(0) as u64)
    }

    /// The event with the highest seq.
    pub async fn last_event(&self) -> Result<Option<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events ORDER BY seq DESC LIMIT 1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read the last event"))?;
        row.as_ref().map(event_of_row).transpose()
    }

    /// One event by seq.
    pub async fn event(&self, seq: u64) -> Result<Option<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(seq as i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(db(format!("read event {seq}")))?;
        row.as_ref().map(event_of_row).transpose()
    }

    /// The events matching `filter`, in seq order.
    pub async fn events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        let mut sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE 1=1");
        let mut args = AnyArguments::default();
        let mut n = 0usize;
        let mut bind = |sql: &mut String, clause: &str, v: Bound| {
            use sqlx::Arguments as _;
            n += 1;
            sql.push_str(&clause.replace("?", &format!("${n}")));
            let r = match v {
                Bound::I(i) => args.add(i),
                Bound::S(s) => args.add(s),
            };
            r.map_err(|e| StoreError::Db {
                op: "bind a query filter".into(),
                source: sqlx::Error::Encode(e),
            })
        };
        if let Some(job) = &filter.job {
            // Two index lookups: the subject index and the events-by-job index (migration 5),
            // never a scan of payloads. Decided exactly by EventFilter::matches below: the index
            // only proposes candidates.
            bind(
                &mut sql,
                " AND seq IN (SELECT seq FROM audit_events WHERE subject = ?",
                Bound::S(job.clone()),
            )?;
            bind(
                &mut sql,
                " UNION SELECT seq FROM audit_event_jobs WHERE job = ?)",
                Bound::S(job.clone()),
            )?;
        }
        if let Some(s) = &filter.subject {
            bind(&mut sql, " AND subject = ?", Bound::S(s.clone()))?;
        }
        if let Some(a) = &filter.actor {
            bind(&mut sql, " AND actor = ?", Bound::S(a.clone()))?;
        }
        if let Some(a) = filter.action {
            bind(&mut sql, " AND action = ?", Bound::S(a.as_str().into()))?;
        }
        if let Some(t) = filter.since {
            bind(
                &mut sql,
                " AND timestamp_ms >= ?",
                Bound::I(t.unix_millis()),
            )?;
        }
        if let Some(s) = filter.from_seq {
            bind(&mut sql, " AND seq >= ?", Bound::I(clamp_i64(s)))?;
        }
        if let Some(s) = filter.to_seq {
            bind(&mut sql, " AND seq < ?", Bound::I(clamp_i64(s)))?;
        }
        sql.push_str(" ORDER BY seq");
        let rows = sqlx::query_with::<Any, _>(AssertSqlSafe(sql), args)
            .fetch_all(&self.pool)
            .await
            .map_err(db("query events"))?;
        let mut out = Vec::new();
        for row in &rows {
            let e = event_of_row(row)?;
            if filter.matches(&e) {
                out.push(e);
                if filter.limit.is_some_and(|l| out.len() as u64 >= l) {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Every event, in seq order (what `verify` reads).
    pub async fn all_events(&self) -> Result<Vec<Event>> {
        self.events(&EventFilter::default()).await
    }

    /// The hashes of events with seq >= `from`, in seq order, with their seqs (to rebuild the
    /// Merkle tree at start-up without parsing payloads).
    pub async fn hashes_from(&self, from: u64) -> Result<Vec<(u64, Hash)>> {
        let rows = sqlx::query("SELECT seq, hash FROM audit_events WHERE seq >= $1 ORDER BY seq")
            .bind(clamp_i64(from))
            .fetch_all(&self.pool)
            .await
            .map_err(db("read event hashes"))?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get(0).map_err(db("read event hashes"))?;
                let hash: String = r.try_get(1).map_err(db("read event hashes"))?;
                let hash =
                    hexser::decode_fixed::<32>(&hash).map_err(|problem| StoreError::BadRow {
                        seq,
                        problem: format!("hash: {problem}"),
                    })?;
                Ok((seq.max(0) as u64, hash))
            })
            .collect()
    }

    /// Every stored checkpoint, by tree size.
    pub async fn checkpoints(&self) -> Result<Vec<SignedCheckpoint>> {
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY tree_size");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db("read checkpoints"))?;
        rows.iter().map(checkpoint_of_row).collect()
    }

    /// The checkpoint of the largest tree size.
    pub async fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>> {
        let sql = format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read the latest checkpoint"))?;
        row.as_ref().map(checkpoint_of_row).transpose()
    }

    /// The checkpoint of exactly `tree_size` events, if one was signed.
    pub async fn checkpoint_at(&self, tree_size: u64) -> Result<Option<SignedCheckpoint>> {
        let sql =
            format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE tree_size = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(clamp_i64(tree_size))
            .fetch_optional(&self.pool)
            .await
            .map_err(db(format!("read the checkpoint of size {tree_size}")))?;
        row.as_ref().map(checkpoint_of_row).transpose()
    }
}

enum Bound {
    I(i64),
    S(String),
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Maps a row of `audit_events`, naming the seq and column of anything unreadable.
fn event_of_row(row: &AnyRow) -> Result<Event> {
    let seq: i64 = row.try_get(0).map_err(db("read an event's seq"))?;
    let bad = |problem: String| StoreError::BadRow { seq, problem };
    let col = |i: usize, name: &str| -> Result<String> {
        row.try_get::<String, _>(i)
            .map_err(|e| bad(format!("{name}: {e}")))
    };
    let timestamp_ms: i64 = row
        .try_get(1)
        .map_err(|e| bad(format!("timestamp_ms: {e}")))?;
    let timestamp =
        Timestamp::from_unix_millis(timestamp_ms).map_err(|e| bad(format!("timestamp: {e}")))?;
    let action = Action::from_str(&col(3, "action")?).map_err(|e| bad(format!("action: {e}")))?;
    let payload_text = col(5, "payload")?;
    let payload: serde_json::Value = serde_json::from_str(&payload_text)
        .map_err(|e| bad(format!("payload is not JSON: {e}")))?;
    let prev_hash = hexser::decode_fixed::<32>(&col(6, "prev_hash")?)
        .map_err(|e| bad(format!("prev_hash: {e}")))?;
    let hash =
        hexser::decode_fixed::<32>(&col(7, "hash")?).map_err(|e| bad(format!("hash: {e}")))?;
    Ok(Event {
        seq: u64::try_from(seq).map_err(|_| bad("seq is negative".into()))?,
        timestamp,
        actor: col(2, "actor")?,
        action,
        subject: col(4, "subject")?,
        payload,
        prev_hash,
        hash,
    })
}

fn checkpoint_of_row(row: &AnyRow) -> Result<SignedCheckpoint> {
    let tree_size: i64 = row.try_get(0).map_err(db("read a checkpoint"))?;
    let bad = |problem: String| StoreError::BadRow {
        seq: tree_size,
        problem: format!("checkpoint of size {tree_size}: {problem}"),
    };
    let text = |i: usize, name: &str| -> Result<String> {
        row.try_get::<String, _>(i)
            .map_err(|e| bad(format!("{name}: {e}")))
    };
    let ts: i64 = row
        .try_get(2)
        .map_err(|e| bad(format!("timestamp_ms: {e}")))?;
    Ok(SignedCheckpoint {
        checkpoint: Checkpoint {
            tree_size: u64::try_from(tree_size).map_err(|_| bad("negative size".into()))?,
            root: hexser::decode_fixed::<32>(&text(1, "root")?)
                .map_err(|e| bad(format!("root: {e}")))?,
            timestamp: Timestamp::from_unix_millis(ts).map_err(|e| bad(e.to_string()))?,
            log_id: text(3, "log_id")?,
        },
        signature: hexser::decode_fixed::<64>(&text(4, "signature")?)
            .map_err(|e| bad(format!("signature: {e}")))?,
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(crate::sha256(data))
}

/// The multi-row INSERT of `chunk` into `table` (at most [`MAX_BATCH`] rows) and its arguments.
fn rows_insert(table: &str, chunk: &[Event]) -> Result<(String, AnyArguments)> {
    let mut sql = String::with_capacity(64 + chunk.len() * 48);
    sql.push_str("INSERT INTO ");
    sql.push_str(table);
    sql.push_str(" (");
    sql.push_str(EVENT_COLUMNS);
    sql.push_str(") VALUES ");
    let mut args = AnyArguments::default();
    for (i, e) in chunk.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        let b = i * 8;
        sql.push_str(&format!(
            "(${},${},${},${},${},${},${},${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6,
            b + 7,
            b + 8
        ));
        let seq = i64::try_from(e.seq).map_err(|_| StoreError::InvalidInput {
            what: format!("event seq {}", e.seq),
            problem: "does not fit a BIGINT".into(),
        })?;
        use sqlx::Arguments as _;
        let add = |r: Result<(), sqlx::error::BoxDynError>| {
            r.map_err(|e| StoreError::Db {
                op: "bind an event".into(),
                source: sqlx::Error::Encode(e),
            })
        };
        add(args.add(seq))?;
        add(args.add(e.timestamp.unix_millis()))?;
        add(args.add(e.actor.clone()))?;
        add(args.add(e.action.as_str().to_string()))?;
        add(args.add(e.subject.clone()))?;
        add(args.add(crate::canonical_json(&e.payload)))?;
        add(args.add(hex::encode(e.prev_hash)))?;
        add(args.add(hex::encode(e.hash)))?;
    }
    Ok((sql, args))
}
