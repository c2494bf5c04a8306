//! The coordinator's persistent state: jobs, rounds, global model digests and known site nodes, in
//! SQLite (a file, the default) or PostgreSQL (a URL), through sqlx's `Any` driver with one schema.
//!
//! # Crash-safety contract
//!
//! - A round is recorded completely or not at all. [`Store::complete_round`] writes, in **one
//!   transaction**, the round's row (participants, accepted and refused updates, per-site metrics,
//!   timings), the new global model's digest, the completed attempt, and the job's `current_round`.
//!   A coordinator killed at any instant leaves either all of these or none of them.
//! - A round is never recorded twice. The job's `current_round` is advanced by a compare-and-set
//!   (`UPDATE … WHERE current_round = round - 1`), and `(job, round)` is the primary key of the
//!   rounds table: a second completion of the same round — a retry after a lost reply, a second
//!   coordinator on the same database — is an error and writes nothing.
//! - Job state changes are compare-and-set too ([`Store::set_job_state`] names the state it expects
//!   to leave), so two coordinators, or a resumed one racing a stale task, cannot both move a job.
//! - On restart the coordinator resumes each `Running` job at `last_completed_round + 1`, from that
//!   round's global model ([`Store::resume_point`]; round 0 is the initial model), at the attempt
//!   after the failed ones already recorded. So no round is lost, and none is counted twice.
//! - Durability: SQLite runs with `journal_mode=WAL` and `synchronous=FULL`, so a committed round
//!   survives power loss, not only a process crash (WAL with `NORMAL` may lose the last commits).
//!   PostgreSQL commits are durable under its defaults (`fsync=on`, `synchronous_commit=on`).
//!
//! # URLs
//! - `sqlite://PATH?mode=rwc` — a file, created if missing (see [`Store::sqlite_url`]);
//! - `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgresql://`).
//!
//! # Why no sqlx macros
//! Queries are runtime `sqlx::query` with hand-written row mapping, and migrations are applied by
//! this module rather than `sqlx::migrate!`: the macros need sqlx's `macros` feature, which builds
//! sqlx (and the bundled SQLite) a second time for the proc-macro, and the `query!` family needs a
//! live database or a `.sqlx` cache at build time. The migrations are still plain SQL files under
//! `coordinator/migrations/`, embedded with `include_str!`.

use std::collections::BTreeMap;
use std::path::Path;

use sqlx::any::{Any, AnyRow};
use sqlx::{AnyPool, Row, Transaction};
use time::OffsetDateTime;

use tutela_protocol::database::{self, redact_url};

mod jobs;
mod lease;
mod registry;
mod statistics;
pub use lease::{Fence, LEASE_NAME, LeaseHolder, LeaseOutcome};
pub use registry::{PendingSignature, RegisteredVersion, StageMoveRecord};

use crate::job::{
    IllegalTransition, JobId, JobSpec, JobState, RoundState, SpecDigest, SpecError, is_hex_digest,
};

/// One embedded migration.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every schema migration, in order. Append; never edit or reorder a released one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "jobs_rounds_nodes",
        sql: include_str!("../migrations/0001_jobs_rounds_nodes.sql"),
    },
    Migration {
        version: 2,
        name: "approvals",
        sql: include_str!("../migrations/0002_approvals.sql"),
    },
    Migration {
        version: 3,
        name: "rejections",
        sql: include_str!("../migrations/0003_rejections.sql"),
    },
    Migration {
        version: 4,
        name: "model_registry",
        sql: include_str!("../migrations/0004_model_registry.sql"),
    },
    Migration {
        version: 5,
        name: "leader_lease",
        sql: include_str!("../migrations/0005_leader_lease.sql"),
    },
    Migration {
        version: 6,
        name: "statistics_results",
        sql: include_str!("../migrations/0006_statistics_results.sql"),
    },
];

/// The table that records applied migrations. Prefixed with the component's name because the
/// coordinator may share a PostgreSQL database with another Tutela service that keeps its own
/// migration table; a common `schema_migrations` would make their version numbers collide.
const MIGRATIONS_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS coordinator_schema_migrations (
    version       BIGINT NOT NULL PRIMARY KEY,
    name          TEXT   NOT NULL,
    checksum      TEXT   NOT NULL,
    applied_at_ms BIGINT NOT NULL
)";

/// Serialises concurrent migrations of one PostgreSQL database (two coordinators starting at
/// once): a transaction-scoped advisory lock, released at commit. The number is arbitrary but
/// fixed ("tutelaco" in ASCII).
const PG_MIGRATION_LOCK: &str =
    "SELECT 1 FROM (SELECT pg_advisory_xact_lock(8387236685218046831)) AS migration_lock";

/// Which database a store is on.
pub use tutela_protocol::database::Backend;

/// Something the store could not do, saying what and on which job, round or site.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "job store URL {0:?} is not supported: expected sqlite://PATH?mode=rwc or postgres://USER@HOST/DATABASE"
    )]
    UnsupportedUrl(String),
    #[error("cannot open the job store at {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("job store at {location}: migration {version} ({name}) failed: {source}")]
    Migration {
        location: String,
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "job store at {location}: migration {version} ({name}) was applied with checksum {applied}, but this coordinator's copy has {expected}: a released migration was edited; restore it and add a new one"
    )]
    MigrationChanged {
        location: String,
        version: i64,
        name: String,
        applied: String,
        expected: String,
    },
    #[error(
        "job store at {location}: the schema is at version {found}, newer than this coordinator's {known}; run a newer coordinator"
    )]
    SchemaTooNew {
        location: String,
        found: i64,
        known: i64,
    },
    #[error("job store: {op}: {source}")]
    Db {
        op: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("job {0} does not exist")]
    JobNotFound(JobId),
    #[error(
        "job {job} is {actual}, not {expected}: another coordinator or an earlier step already changed it"
    )]
    StaleState {
        job: JobId,
        expected: JobState,
        actual: JobState,
    },
    #[error(
        "job {job}'s spec now digests to {current}, but the rejection signs {signed}: the spec was amended after it was signed; review the current spec"
    )]
    SpecChanged {
        job: JobId,
        signed: String,
        current: String,
    },
    #[error("job {job}: {source}")]
    IllegalTransition {
        job: JobId,
        #[source]
        source: IllegalTransition,
    },
    #[error("job {job} cannot be completed: {current} of its {total} rounds are recorded")]
    JobIncomplete {
        job: JobId,
        current: u32,
        total: u32,
    },
    #[error("job {job} is {state}, not running: cannot {action}")]
    JobNotRunning {
        job: JobId,
        state: JobState,
        action: &'static str,
    },
    #[error("job {job}: round {round} is already completed; a round is recorded once")]
    RoundAlreadyCompleted { job: JobId, round: u32 },
    #[error("job {job}: round {round} is out of order: the next round is {expected}")]
    RoundOutOfOrder {
        job: JobId,
        round: u32,
        expected: u32,
    },
    #[error("job {job}: round {round} is past the job's {total} rounds")]
    RoundBeyondJob { job: JobId, round: u32, total: u32 },
    #[error(
        "job {job}: round {round} attempt {attempt} is out of order: the next attempt is {expected}"
    )]
    AttemptOutOfOrder {
        job: JobId,
        round: u32,
        attempt: u32,
        expected: u32,
    },
    #[error(
        "job {job}: the initial global model (round 0) is not recorded; record it with set_global_model(job, 0, digest) before completing round 1"
    )]
    InitialModelMissing { job: JobId },
    #[error(
        "job {job}: round {round}'s global model is already recorded as {stored}, cannot record {given}"
    )]
    GlobalModelConflict {
        job: JobId,
        round: u32,
        stored: String,
        given: String,
    },
    #[error(
        "job {job}: cannot record a global model for round {round}, which is not completed (last completed: {current}); complete_round records it"
    )]
    GlobalModelForOpenRound {
        job: JobId,
        round: u32,
        current: u32,
    },
    #[error("job {job}, round {round}: invalid round record: {problem}")]
    InvalidRecord {
        job: JobId,
        round: u32,
        problem: String,
    },
    #[error("{what}: {problem}")]
    InvalidInput { what: String, problem: String },
    /// A stage move whose versions are no longer where the move says (another move came first).
    #[error("model {name}: {problem}")]
    StageConflict { name: String, problem: String },
    #[error("create_job: {0}")]
    Spec(#[from] SpecError),
    #[error("create_job: {0}")]
    SpecMismatch(String),
    #[error("node {site}: identity {given} differs from the {stored} it registered with")]
    NodeIdentityConflict {
        site: String,
        stored: String,
        given: String,
    },
    #[error("job store holds an unreadable value: {what}: {problem}")]
    Corrupt { what: String, problem: String },
    #[error("cannot draw a random job id from the operating system")]
    Random,
    /// A write of a coordinator that does not hold the leader lease at the epoch it was given
    /// (another coordinator took it over): nothing was written.
    #[error(
        "{op}: refused: this coordinator's leader lease (epoch {epoch}) was taken over (the lease is at epoch {current}, held by {holder}); nothing was written"
    )]
    Fenced {
        op: String,
        epoch: i64,
        current: i64,
        holder: String,
    },
    /// A write of a coordinator that is a follower (holds no leader lease).
    #[error("{op}: refused: this coordinator is not the leader (it holds no leader lease)")]
    NotLeader { op: String },
    /// `[ha]` on a database other than PostgreSQL.
    #[error(
        "the leader lease needs PostgreSQL, but the job store is {backend:?} at {location}: run a single coordinator on SQLite, or give every coordinator the same postgres:// database_url"
    )]
    LeaseNeedsPostgres { backend: Backend, location: String },
}

impl StoreError {
    /// Whether the write was refused because this coordinator is no longer (or not) the leader.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            StoreError::Fenced { .. } | StoreError::NotLeader { .. }
        )
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Wraps a database error with what was being done.
fn db(op: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let op = op.into();
    move |source| StoreError::Db { op, source }
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub name: String,
    /// The spec exactly as submitted.
    pub spec_toml: String,
    pub spec_digest: SpecDigest,
    pub state: JobState,
    /// Why the job is in its state (given with the last transition).
    pub state_reason: Option<String>,
    pub total_rounds: u32,
    /// The last completed round; 0 before the first.
    pub current_round: u32,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl JobRecord {
    /// The stored spec, parsed and validated again.
    pub fn spec(&self) -> Result<JobSpec, SpecError> {
        JobSpec::from_toml_str(&self.spec_toml)
    }

    /// The stored spec of either kind ([`JobRecord::spec`] is a training job's only).
    pub fn submitted(&self) -> Result<crate::job::SubmittedSpec, SpecError> {
        crate::job::SubmittedSpec::from_toml_str(&self.spec_toml)
    }

    /// The sites the stored spec lists, whatever its kind: what the approvals' quorum, the
    /// approvers and `job.started` are judged over. An error when the stored spec does not
    /// parse, which callers must not read as "no sites".
    pub fn sites(&self) -> Result<Vec<String>, SpecError> {
        self.submitted().map(|s| s.sites().to_vec())
    }
}

/// A site's update that passed validation and was folded into the aggregate.
#[derive(Clone, Debug, PartialEq)]
pub struct AcceptedUpdate {
    pub site: String,
    /// SHA-256 of the update as received, 64 lowercase hex digits.
    pub digest: String,
    /// Its weight in the aggregate (e.g. the site's sample count for FedAvg).
    pub weight: f64,
    /// Its L2 norm.
    pub norm: f64,
}

/// A site's update that was refused, with the reason the site and the operator were given.
#[derive(Clone, Debug, PartialEq)]
pub struct RefusedUpdate {
    pub site: String,
    /// Its digest, when it arrived whole.
    pub digest: Option<String>,
    /// Its L2 norm, when it was computed.
    pub norm: Option<f64>,
    pub reason: String,
}

/// What a completed round is recorded with.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundRecord {
    /// The sites sampled for the round.
    pub participants: Vec<String>,
    /// Accepted updates, in the order they were folded in (kept in that order).
    pub accepted: Vec<AcceptedUpdate>,
    /// Refused updates, in the order they were refused.
    pub refused: Vec<RefusedUpdate>,
    /// Per-site metrics (site name → a JSON object such as `{"loss": 0.21, "accuracy": 0.94}`),
    /// stored as JSON text. Floats come back through serde_json's parser, exact to the last bit
    /// except in rare cases (1 ulp; serde_json without `float_roundtrip`).
    pub site_metrics: BTreeMap<String, serde_json::Value>,
    /// The global model after this round: SHA-256, 64 lowercase hex digits.
    pub global_model_digest: String,
    /// Stored with millisecond precision.
    pub started_at: OffsetDateTime,
    /// Stored with millisecond precision.
    pub completed_at: OffsetDateTime,
}

/// A completed round as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletedRound {
    pub round: u32,
    /// The attempt that completed it.
    pub attempt: u32,
    pub record: RoundRecord,
}

/// One ended attempt at a round.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRecord {
    pub round: u32,
    pub attempt: u32,
    /// `Completed` or `Failed` (open attempts live only in memory).
    pub state: RoundState,
    /// Why a failed attempt failed.
    pub reason: Option<String>,
    pub recorded_at: OffsetDateTime,
}

/// Where a job resumes after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// The last completed round, 0 if none.
    pub last_completed_round: u32,
    /// The global model to continue from: that round's, or the initial model (round 0) if no
    /// round is completed; `None` if not even the initial model is recorded.
    pub global_model_digest: Option<String>,
    /// The round to run next; `None` when every round is completed.
    pub next_round: Option<u32>,
    /// The attempt number to use for `next_round` (1 + failed attempts already recorded).
    pub next_attempt: u32,
}

/// A site node the coordinator has seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub site: String,
    /// The certificate identity it connected with, `spiffe://<consortium>/site/<site>/node`.
    pub identity: String,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
}

/// What a store is and how it is set, for the coordinator's start-up log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreInfo {
    pub backend: Backend,
    /// The URL with any password removed.
    pub location: String,
    pub schema_version: i64,
    /// SQLite only: `PRAGMA journal_mode` (expected `wal`).
    pub sqlite_journal_mode: Option<String>,
    /// SQLite only: `PRAGMA synchronous` (expected 2, FULL).
    pub sqlite_synchronous: Option<i64>,
}

/// The coordinator's database. Cheap to clone (a connection pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    location: String,
    /// With `[ha]`: the lease epoch every write transaction checks ([`Store::fenced`]).
    fence: Option<Fence>,
}

impl Store {
    /// `sqlite://PATH?mode=rwc` for a file path, with the characters SQLite's URL parser would
    /// misread (`%`, `?`, `#`) percent-encoded.
    pub fn sqlite_url(path: &Path) -> Result<String> {
        database::sqlite_url(path).ok_or_else(|| StoreError::InvalidInput {
            what: format!("job store path {}", path.display()),
            problem: "is not valid UTF-8".to_string(),
        })
    }

    /// Opens (and for SQLite with `mode=rwc`, creates) the store, and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Store> {
        let location = redact_url(url);
        let Some(backend) = Backend::of_url(url) else {
            return Err(StoreError::UnsupportedUrl(location));
        };
        // sqlx turns foreign keys on by default; the store says so too, as its schema relies on
        // them. A writer waits up to 30 s for SQLite's lock (as long as for a pooled connection;
        // sqlx's default is 5 s): a thousand nodes connecting and officers approving at once
        // queued writes past 5 s on a loaded machine, and an approval already in the audit trail
        // failed to be stored with "database is locked".
        let pool = database::open_pool(
            url,
            backend,
            8,
            "job store",
            &["PRAGMA foreign_keys = ON", "PRAGMA busy_timeout = 30000"],
        )
        .await
        .map_err(|source| StoreError::Open {
            location: location.clone(),
            source,
        })?;
        let store = Store {
            pool,
            backend,
            location,
            fence: None,
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool, waiting for connections to finish (SQLite then checkpoints its WAL).
    pub async fn close(self) {
        self.pool.close().await;
    }

    /// A write transaction. On SQLite `BEGIN IMMEDIATE` takes the write lock up front (waiting up
    /// to the busy timeout): a deferred transaction that reads and then writes can fail with
    /// SQLITE_BUSY instead of waiting when another connection wrote in between.
    ///
    /// A fenced store ([`Store::fenced`]) checks, first thing in the transaction, that its lease
    /// epoch is still the lease's (a shared row lock until commit, which a takeover waits for):
    /// a coordinator that lost the lease writes nothing.
    async fn begin_write(&self, op: &str) -> Result<Transaction<'static, Any>> {
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(db(format!("{op}: begin transaction")))?;
        if let Some(fence) = &self.fence {
            lease::check_fence(&mut tx, fence, op).await?;
        }
        Ok(tx)
    }

    async fn migrate(&self) -> Result<()> {
        let failed = |m: &Migration| {
            let location = self.location.clone();
            let (version, name) = (m.version, m.name);
            move |source| StoreError::Migration {
                location,
                version,
                name,
                source,
            }
        };
        let mut tx = self.begin_write("migrate").await?;
        if self.backend == Backend::Postgres {
            sqlx::query(PG_MIGRATION_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(db("migrate: take the migration lock"))?;
        }
        sqlx::query(MIGRATIONS_TABLE_DDL)
            .execute(&mut *tx)
            .await
            .map_err(db("migrate: create coordinator_schema_migrations"))?;
        let applied: Vec<(i64, String, String)> = sqlx::query(
            "SELECT version, name, checksum FROM coordinator_schema_migrations ORDER BY version",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db("migrate: read coordinator_schema_migrations"))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db("migrate: read coordinator_schema_migrations"))?;

        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if let Some((found, _, _)) = applied.iter().find(|(v, _, _)| *v > known) {
            return Err(StoreError::SchemaTooNew {
                location: self.location.clone(),
                found: *found,
                known,
            });
        }
        for m in MIGRATIONS {
            let checksum = sha256_hex(m.sql.as_bytes());
            if let Some((_, name, applied_sum)) = applied.iter().find(|(v, _, _)| *v == m.version) {
                if *applied_sum != checksum {
                    return Err(StoreError::MigrationChanged {
                        location: self.location.clone(),
                        version: m.version,
                        name: name.clone(),
                        applied: applied_sum.clone(),
                        expected: checksum,
                    });
                }
                continue;
            }
            sqlx::raw_sql(m.sql)
                .execute(&mut *tx)
                .await
                .map_err(failed(m))?;
            sqlx::query(
                "INSERT INTO coordinator_schema_migrations (version, name, checksum, applied_at_ms)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(m.version)
            .bind(m.name)
            .bind(&checksum)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(failed(m))?;
            tracing::info!(version = m.version, name = m.name, location = %self.location, "job store migrated");
        }
        tx.commit().await.map_err(db("migrate: commit"))?;
        Ok(())
    }

    /// The backend, schema version and (SQLite) the durability pragmas in force.
    pub async fn describe(&self) -> Result<StoreInfo> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(db("describe: acquire a connection"))?;
        let schema_version: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM coordinator_schema_migrations")
                .fetch_one(&mut *conn)
                .await
                .map_err(db("describe: read the schema version"))?;
        let (mut journal, mut sync) = (None, None);
        if self.backend == Backend::Sqlite {
            journal = Some(
                sqlx::query_scalar::<_, String>("PRAGMA journal_mode")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(db("describe: PRAGMA journal_mode"))?,
            );
            sync = Some(
                sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(db("describe: PRAGMA synchronous"))?,
            );
        }
        Ok(StoreInfo {
            backend: self.backend,
            location: self.location.clone(),
            schema_version: schema_version.unwrap_or(0),
            sqlite_journal_mode: journal,
            sqlite_synchronous: sync,
        })
    }

    // ---------------------------------------------------------------------------------------
    // Global models and rounds

    /// Records the global model of `round`: round 0 is the initial model, recorded before round 1
    /// runs; a completed round's model is recorded by [`Store::complete_round`], and recording the
    /// same digest again is accepted (idempotent). A different digest for a recorded round, or a
    /// model for a round not yet completed, is refused.
    pub async fn set_global_model(
        &self,
        job: &JobId,
        round: u32,
        model_digest: &str,
    ) -> Result<()> {
        check_digest(
            &format!("job {job}, round {round}: global model digest"),
            model_digest,
        )?;
        let op = format!("set_global_model {job} round {round}");
        let mut tx = self.begin_write(&op).await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT current_round FROM jobs WHERE id = $1")
                .bind(job.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db(&op))?;
        let current = to_u32(
            current.ok_or_else(|| StoreError::JobNotFound(job.clone()))?,
            "jobs.current_round",
        )?;
        if round > current {
            return Err(StoreError::GlobalModelForOpenRound {
                job: job.clone(),
                round,
                current,
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO global_models (job_id, round, model_digest, recorded_at_ms)
             VALUES ($1, $2, $3, $4) ON CONFLICT (job_id, round) DO NOTHING",
        )
        .bind(job.as_str())
        .bind(i64::from(round))
        .bind(model_digest)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db(&op))?;
        if inserted.rows_affected() == 0 {
            let stored: String = sqlx::query_scalar(
                "SELECT model_digest FROM global_models WHERE job_id = $1 AND round = $2",
            )
            .bind(job.as_str())
            .bind(i64::from(round))
            .fetch_one(&mut *tx)
            .await
            .map_err(db(&op))?;
            if stored != model_digest {
                return Err(StoreError::GlobalModelConflict {
                    job: job.clone(),
                    round,
                    stored,
                    given: model_digest.to_string(),
                });
            }
        }
        tx.commit().await.map_err(db(format!("{op}: commit")))?;
        Ok(())
    }

    /// Records the initial global model (round 0): `set_global_model(job, 0, digest)`.
    pub async fn set_initial_model(&self, job: &JobId, model_digest: &str) -> Result<()> {
        self.set_global_model(job, 0, model_digest).await
    }

    /// The recorded global model digest of `round`, if any.
    pub async fn global_model(&self, job: &JobId, round: u32) -> Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT model_digest FROM global_models WHERE job_id = $1 AND round = $2",
        )
        .bind(job.as_str())
        .bind(i64::from(round))
        .fetch_optional(&self.pool)
        .await
        .map_err(db(format!("global_model {job} round {round}")))
    }

    /// Records `round` of a running job as completed by `attempt`, **in one transaction**: the
    /// round's row and its updates, its global model, the completed attempt, and the job's
    /// `current_round`. The round must be the job's next (`current_round + 1`), the attempt the
    /// next for that round (1 + its failed attempts), and the initial model recorded. A second
    /// completion of a round fails with [`StoreError::RoundAlreadyCompleted`] and writes nothing.
    pub async fn complete_round(
        &self,
        job: &JobId,
        round: u32,
        attempt: u32,
        record: &RoundRecord,
    ) -> Result<()> {
        validate_record(job, round, attempt, record)?;
        let op = format!("complete_round {job} round {round} attempt {attempt}");
        let participants =
            serde_json::to_string(&record.participants).map_err(|e| StoreError::InvalidRecord {
                job: job.clone(),
                round,
                problem: format!("participants: {e}"),
            })?;
        let metrics =
            serde_json::to_string(&record.site_metrics).map_err(|e| StoreError::InvalidRecord {
                job: job.clone(),
                round,
                problem: format!("site_metrics: {e}"),
            })?;
        let now = now_ms();
        let (round_i, attempt_i) = (i64::from(round), i64::from(attempt));

        let mut tx = self.begin_write(&op).await?;
        // The compare-and-set that makes a round count once: only the job's next round of a
        // running job moves current_round, and the row stays locked until commit.
        let advanced = sqlx::query(
            "UPDATE jobs SET current_round = $1, updated_at_ms = $2
             WHERE id = $3 AND state = 'running' AND current_round = $4 AND total_rounds >= $1",
        )
        .bind(round_i)
        .bind(now)
        .bind(job.as_str())
        .bind(round_i - 1)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: advance the job's current round")))?;
        if advanced.rows_affected() != 1 {
            return Err(diagnose_round(&mut tx, job, round, "complete a round").await);
        }
        let initial: Option<String> = sqlx::query_scalar(
            "SELECT model_digest FROM global_models WHERE job_id = $1 AND round = 0",
        )
        .bind(job.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(format!("{op}: read the initial model")))?;
        if initial.is_none() {
            return Err(StoreError::InitialModelMissing { job: job.clone() });
        }
        check_next_attempt(&mut tx, job, round, attempt, &op).await?;

        sqlx::query(
            "INSERT INTO global_models (job_id, round, model_digest, recorded_at_ms)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(job.as_str())
        .bind(round_i)
        .bind(&record.global_model_digest)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|source| {
            already_completed_or(source, job, round, &op, "insert the global model")
        })?;
        sqlx::query(
            "INSERT INTO rounds (job_id, round, attempt, participants, site_metrics,
                                 started_at_ms, completed_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(job.as_str())
        .bind(round_i)
        .bind(attempt_i)
        .bind(&participants)
        .bind(&metrics)
        .bind(unix_ms(record.started_at))
        .bind(unix_ms(record.completed_at))
        .execute(&mut *tx)
        .await
        .map_err(|source| already_completed_or(source, job, round, &op, "insert the round"))?;
        const INSERT_UPDATE: &str = "INSERT INTO round_updates
            (job_id, round, site, outcome, position, update_digest, weight, norm, reason)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
        for (i, u) in record.accepted.iter().enumerate() {
            sqlx::query(INSERT_UPDATE)
                .bind(job.as_str())
                .bind(round_i)
                .bind(&u.site)
                .bind("accepted")
                .bind(i as i64)
                .bind(Some(u.digest.as_str()))
                .bind(Some(u.weight))
                .bind(Some(u.norm))
                .bind(None::<&str>)
                .execute(&mut *tx)
                .await
                .map_err(db(format!("{op}: insert {}'s accepted update", u.site)))?;
        }
        for (i, u) in record.refused.iter().enumerate() {
            sqlx::query(INSERT_UPDATE)
                .bind(job.as_str())
                .bind(round_i)
                .bind(&u.site)
                .bind("refused")
                .bind(i as i64)
                .bind(u.digest.as_deref())
                .bind(None::<f64>)
                .bind(u.norm)
                .bind(Some(u.reason.as_str()))
                .execute(&mut *tx)
                .await
                .map_err(db(format!("{op}: insert {}'s refused update", u.site)))?;
        }
        sqlx::query(
            "INSERT INTO round_attempts (job_id, round, attempt, outcome, reason, recorded_at_ms)
             VALUES ($1, $2, $3, 'completed', NULL, $4)",
        )
        .bind(job.as_str())
        .bind(round_i)
        .bind(attempt_i)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: insert the completed attempt")))?;
        tx.commit().await.map_err(db(format!("{op}: commit")))?;
        Ok(())
    }

    /// Records that `attempt` at `round` of a running job ended without enough updates. The
    /// coordinator then retries the round as `attempt + 1`, or, past `max_round_retries`, fails
    /// the job with [`Store::set_job_state`] (this does not change the job's state).
    pub async fn record_failed_attempt(
        &self,
        job: &JobId,
        round: u32,
        attempt: u32,
        reason: &str,
    ) -> Result<()> {
        let op = format!("record_failed_attempt {job} round {round} attempt {attempt}");
        if round == 0 || attempt == 0 {
            return Err(StoreError::InvalidInput {
                what: op,
                problem: "rounds and attempts are numbered from 1".to_string(),
            });
        }
        if reason.trim().is_empty() {
            return Err(StoreError::InvalidInput {
                what: op,
                problem: "a failed attempt needs a reason".to_string(),
            });
        }
        let now = now_ms();
        let mut tx = self.begin_write(&op).await?;
        // Touching the job row checks that the round is the job's next one and, on PostgreSQL,
        // locks the row so that two attempts cannot be numbered alike.
        let touched = sqlx::query(
            "UPDATE jobs SET updated_at_ms = $1
             WHERE id = $2 AND state = 'running' AND current_round = $3 AND total_rounds >= $4",
        )
        .bind(now)
        .bind(job.as_str())
        .bind(i64::from(round) - 1)
        .bind(i64::from(round))
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: check the job")))?;
        if touched.rows_affected() != 1 {
            return Err(diagnose_round(&mut tx, job, round, "record a failed attempt").await);
        }
        check_next_attempt(&mut tx, job, round, attempt, &op).await?;
        sqlx::query(
            "INSERT INTO round_attempts (job_id, round, attempt, outcome, reason, recorded_at_ms)
             VALUES ($1, $2, $3, 'failed', $4, $5)",
        )
        .bind(job.as_str())
        .bind(i64::from(round))
        .bind(i64::from(attempt))
        .bind(reason)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: insert")))?;
        tx.commit().await.map_err(db(format!("{op}: commit")))?;
        Ok(())
    }

    /// How many attempts at `round` failed so far (the next attempt is this + 1).
    pub async fn failed_attempts(&self, job: &JobId, round: u32) -> Result<u32> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM round_attempts WHERE job_id = $1 AND round = $2 AND outcome = 'failed'",
        )
        .bind(job.as_str())
        .bind(i64::from(round))
        .fetch_one(&self.pool)
        .await
        .map_err(db(format!("failed_attempts {job} round {round}")))?;
        to_u32(n, "failed attempt count")
    }

    /// The last completed round and its global model digest; `None` if no round is completed.
    pub async fn last_completed_round(&self, job: &JobId) -> Result<Option<(u32, String)>> {
        let rp = self.resume_point(job).await?;
        if rp.last_completed_round == 0 {
            return Ok(None);
        }
        match rp.global_model_digest {
            Some(d) => Ok(Some((rp.last_completed_round, d))),
            None => Err(StoreError::Corrupt {
                what: format!("job {job}, round {}", rp.last_completed_round),
                problem: "completed round without a global model".to_string(),
            }),
        }
    }

    /// Where a job resumes after a restart: see [`ResumePoint`].
    pub async fn resume_point(&self, job: &JobId) -> Result<ResumePoint> {
        let op = format!("resume_point {job}");
        // One read transaction, so that the job row, its model and its attempts are one snapshot.
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db(format!("{op}: begin")))?;
        let row = sqlx::query(
            "SELECT j.current_round, j.total_rounds, g.model_digest
             FROM jobs j LEFT JOIN global_models g ON g.job_id = j.id AND g.round = j.current_round
             WHERE j.id = $1",
        )
        .bind(job.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(&op))?
        .ok_or_else(|| StoreError::JobNotFound(job.clone()))?;
        let current = to_u32(get(&row, "current_round")?, "jobs.current_round")?;
        let total = to_u32(get(&row, "total_rounds")?, "jobs.total_rounds")?;
        let digest: Option<String> = get(&row, "model_digest")?;
        let next_round = (current < total).then_some(current + 1);
        let failed: i64 = match next_round {
            Some(r) => sqlx::query_scalar(
                "SELECT COUNT(*) FROM round_attempts WHERE job_id = $1 AND round = $2 AND outcome = 'failed'",
            )
            .bind(job.as_str())
            .bind(i64::from(r))
            .fetch_one(&mut *tx)
            .await
            .map_err(db(format!("{op}: count failed attempts")))?,
            None => 0,
        };
        tx.commit().await.map_err(db(format!("{op}: end")))?;
        Ok(ResumePoint {
            last_completed_round: current,
            global_model_digest: digest,
            next_round,
            next_attempt: to_u32(failed + 1, "failed attempt count")?,
        })
    }

    /// The job's completed rounds, in round order (1, 2, …: no gap, no duplicate by construction).
    pub async fn rounds(&self, job: &JobId) -> Result<Vec<CompletedRound>> {
        let op = format!("rounds {job}");
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db(format!("{op}: begin")))?;
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM jobs WHERE id = $1")
            .bind(job.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(&op))?;
        if exists.is_none() {
            return Err(StoreError::JobNotFound(job.clone()));
        }
        let round_rows = sqlx::query(
            "SELECT r.round, r.attempt, r.participants, r.site_metrics, r.started_at_ms,
                    r.completed_at_ms, g.model_digest
             FROM rounds r JOIN global_models g ON g.job_id = r.job_id AND g.round = r.round
             WHERE r.job_id = $1 ORDER BY r.round",
        )
        .bind(job.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db(format!("{op}: read rounds")))?;
        let update_rows = sqlx::query(
            "SELECT round, site, outcome, update_digest, weight, norm, reason
             FROM round_updates WHERE job_id = $1 ORDER BY round, outcome, position",
        )
        .bind(job.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db(format!("{op}: read updates")))?;
        tx.commit().await.map_err(db(format!("{op}: end")))?;

        let mut out = Vec::with_capacity(round_rows.len());
        let mut index = BTreeMap::new();
        for row in &round_rows {
            let round = to_u32(get(row, "round")?, "rounds.round")?;
            let what = |col: &str| format!("job {job}, round {round}: rounds.{col}");
            let participants: String = get(row, "participants")?;
            let metrics: String = get(row, "site_metrics")?;
            let record = RoundRecord {
                participants: serde_json::from_str(&participants).map_err(|e| {
                    StoreError::Corrupt {
                        what: what("participants"),
                        problem: e.to_string(),
                    }
                })?,
                accepted: Vec::new(),
                refused: Vec::new(),
                site_metrics: serde_json::from_str(&metrics).map_err(|e| StoreError::Corrupt {
                    what: what("site_metrics"),
                    problem: e.to_string(),
                })?,
                global_model_digest: get(row, "model_digest")?,
                started_at: from_ms(get(row, "started_at_ms")?, &what("started_at_ms"))?,
                completed_at: from_ms(get(row, "completed_at_ms")?, &what("completed_at_ms"))?,
            };
            index.insert(round, out.len());
            out.push(CompletedRound {
                round,
                attempt: to_u32(get(row, "attempt")?, "rounds.attempt")?,
                record,
            });
        }
        for row in &update_rows {
            let round = to_u32(get(row, "round")?, "round_updates.round")?;
            let Some(&i) = index.get(&round) else {
                return Err(StoreError::Corrupt {
                    what: format!("job {job}, round_updates of round {round}"),
                    problem: "no such completed round".to_string(),
                });
            };
            let site: String = get(row, "site")?;
            let outcome: String = get(row, "outcome")?;
            let digest: Option<String> = get(row, "update_digest")?;
            let norm: Option<f64> = get(row, "norm")?;
            let rec = &mut out[i].record;
            match outcome.as_str() {
                "accepted" => {
                    let weight: Option<f64> = get(row, "weight")?;
                    match (digest, weight, norm) {
                        (Some(digest), Some(weight), Some(norm)) => {
                            rec.accepted.push(AcceptedUpdate {
                                site,
                                digest,
                                weight,
                                norm,
                            })
                        }
                        _ => {
                            return Err(StoreError::Corrupt {
                                what: format!("job {job}, round {round}, site {site}"),
                                problem: "accepted update without digest, weight or norm"
                                    .to_string(),
                            });
                        }
                    }
                }
                "refused" => {
                    let reason: Option<String> = get(row, "reason")?;
                    rec.refused.push(RefusedUpdate {
                        site,
                        digest,
                        norm,
                        reason: reason.unwrap_or_default(),
                    });
                }
                other => {
                    return Err(StoreError::Corrupt {
                        what: format!("job {job}, round {round}, site {site}"),
                        problem: format!("unknown update outcome {other:?}"),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Every ended attempt of the job's rounds, by round then attempt.
    pub async fn attempts(&self, job: &JobId) -> Result<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT round, attempt, outcome, reason, recorded_at_ms FROM round_attempts
             WHERE job_id = $1 ORDER BY round, attempt",
        )
        .bind(job.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db(format!("attempts {job}")))?;
        rows.iter()
            .map(|row| {
                let outcome: String = get(row, "outcome")?;
                Ok(AttemptRecord {
                    round: to_u32(get(row, "round")?, "round_attempts.round")?,
                    attempt: to_u32(get(row, "attempt")?, "round_attempts.attempt")?,
                    state: outcome.parse().map_err(|problem| StoreError::Corrupt {
                        what: format!("job {job}: round_attempts.outcome"),
                        problem,
                    })?,
                    reason: get(row, "reason")?,
                    recorded_at: from_ms(
                        get(row, "recorded_at_ms")?,
                        "round_attempts.recorded_at_ms",
                    )?,
                })
            })
            .collect()
    }

    // ---------------------------------------------------------------------------------------
    // Nodes

    /// Records that `site`'s node was seen at `last_seen` with certificate identity `identity`
    /// (`spiffe://<consortium>/site/<site>/node`). A site keeps the identity it first registered
    /// with: another identity for the same site is refused. `last_seen` never moves backwards.
    pub async fn register_node(
        &self,
        site: &str,
        identity: &str,
        last_seen: OffsetDateTime,
    ) -> Result<()> {
        let what = || format!("register_node {site:?}");
        tutela_protocol::identity::validate_segment("site", site).map_err(|e| {
            StoreError::InvalidInput {
                what: what(),
                problem: e.to_string(),
            }
        })?;
        let parsed: tutela_protocol::Identity =
            identity
                .parse()
                .map_err(|e: tutela_protocol::identity::IdentityError| {
                    StoreError::InvalidInput {
                        what: what(),
                        problem: e.to_string(),
                    }
                })?;
        if parsed.principal.role() != tutela_protocol::Role::Node
            || parsed.principal.site() != Some(site)
        {
            return Err(StoreError::InvalidInput {
                what: what(),
                problem: format!("{identity} is not the node identity of site {site}"),
            });
        }
        let at = unix_ms(last_seen);
        let done = sqlx::query(
            "INSERT INTO nodes (site, identity, first_seen_ms, last_seen_ms) VALUES ($1, $2, $3, $3)
             ON CONFLICT (site) DO UPDATE SET last_seen_ms =
                 CASE WHEN excluded.last_seen_ms > nodes.last_seen_ms
                      THEN excluded.last_seen_ms ELSE nodes.last_seen_ms END
             WHERE nodes.identity = excluded.identity",
        )
        .bind(site)
        .bind(identity)
        .bind(at)
        .execute(&self.pool)
        .await
        .map_err(db(what()))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let stored: Option<String> =
            sqlx::query_scalar("SELECT identity FROM nodes WHERE site = $1")
                .bind(site)
                .fetch_optional(&self.pool)
                .await
                .map_err(db(what()))?;
        Err(StoreError::NodeIdentityConflict {
            site: site.to_string(),
            stored: stored.unwrap_or_default(),
            given: identity.to_string(),
        })
    }

    /// Every node seen, by site name.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query(
            "SELECT site, identity, first_seen_ms, last_seen_ms FROM nodes ORDER BY site",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("nodes"))?;
        rows.iter()
            .map(|row| {
                Ok(NodeRecord {
                    site: get(row, "site")?,
                    identity: get(row, "identity")?,
                    first_seen: from_ms(get(row, "first_seen_ms")?, "nodes.first_seen_ms")?,
                    last_seen: from_ms(get(row, "last_seen_ms")?, "nodes.last_seen_ms")?,
                })
            })
            .collect()
    }
}

/// Why a round's compare-and-set matched no row, read inside the same transaction.
async fn diagnose_round(
    tx: &mut Transaction<'static, Any>,
    job: &JobId,
    round: u32,
    action: &'static str,
) -> StoreError {
    let row = sqlx::query("SELECT state, current_round, total_rounds FROM jobs WHERE id = $1")
        .bind(job.as_str())
        .fetch_optional(&mut **tx)
        .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return StoreError::JobNotFound(job.clone()),
        Err(e) => return db(format!("job {job}: diagnose round {round}"))(e),
    };
    let read = || -> Result<(JobState, u32, u32)> {
        let state: String = get(&row, "state")?;
        Ok((
            parse_state(&state)?,
            to_u32(get(&row, "current_round")?, "jobs.current_round")?,
            to_u32(get(&row, "total_rounds")?, "jobs.total_rounds")?,
        ))
    };
    let (state, current, total) = match read() {
        Ok(v) => v,
        Err(e) => return e,
    };
    if state != JobState::Running {
        StoreError::JobNotRunning {
            job: job.clone(),
            state,
            action,
        }
    } else if round > total {
        StoreError::RoundBeyondJob {
            job: job.clone(),
            round,
            total,
        }
    } else if round <= current {
        StoreError::RoundAlreadyCompleted {
            job: job.clone(),
            round,
        }
    } else {
        StoreError::RoundOutOfOrder {
            job: job.clone(),
            round,
            expected: current + 1,
        }
    }
}

/// A unique violation while inserting a round's rows means the round is already recorded (the
/// primary keys are the backstop behind the compare-and-set on `jobs.current_round`).
fn already_completed_or(
    source: sqlx::Error,
    job: &JobId,
    round: u32,
    op: &str,
    step: &str,
) -> StoreError {
    match &source {
        sqlx::Error::Database(e) if e.is_unique_violation() => StoreError::RoundAlreadyCompleted {
            job: job.clone(),
            round,
        },
        _ => StoreError::Db {
            op: format!("{op}: {step}"),
            source,
        },
    }
}

/// Attempts are numbered 1, 2, … per round with no gap: the next is one past the failed ones.
async fn check_next_attempt(
    tx: &mut Transaction<'static, Any>,
    job: &JobId,
    round: u32,
    attempt: u32,
    op: &str,
) -> Result<()> {
    let failed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM round_attempts WHERE job_id = $1 AND round = $2 AND outcome = 'failed'",
    )
    .bind(job.as_str())
    .bind(i64::from(round))
    .fetch_one(&mut **tx)
    .await
    .map_err(db(format!("{op}: count failed attempts")))?;
    let expected = to_u32(failed + 1, "failed attempt count")?;
    if attempt != expected {
        return Err(StoreError::AttemptOutOfOrder {
            job: job.clone(),
            round,
            attempt,
            expected,
        });
    }
    Ok(())
}

/// Checks a round record before any write, so that a bad record is refused with a reason rather
/// than by a constraint halfway through the transaction.
fn validate_record(job: &JobId, round: u32, attempt: u32, r: &RoundRecord) -> Result<()> {
    let bad = |problem: String| StoreError::InvalidRecord {
        job: job.clone(),
        round,
        problem,
    };
    if round == 0 {
        return Err(bad(
            "rounds are numbered from 1 (round 0 is the initial model)".to_string(),
        ));
    }
    if attempt == 0 {
        return Err(bad("attempts are numbered from 1".to_string()));
    }
    if !is_hex_digest(&r.global_model_digest) {
        return Err(bad(format!(
            "global_model_digest {:?} is not 64 lowercase hex digits",
            r.global_model_digest
        )));
    }
    if r.accepted.is_empty() {
        return Err(bad(
            "no accepted update: a round without one produces no model; record a failed attempt"
                .to_string(),
        ));
    }
    if r.completed_at < r.started_at {
        return Err(bad("completed_at is before started_at".to_string()));
    }
    for (i, p) in r.participants.iter().enumerate() {
        if r.participants[..i].contains(p) {
            return Err(bad(format!("participant {p:?} is listed twice")));
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    let sites = r
        .accepted
        .iter()
        .map(|u| (u.site.as_str(), "accepted"))
        .chain(r.refused.iter().map(|u| (u.site.as_str(), "refused")));
    for (site, kind) in sites {
        if !r.participants.iter().any(|p| p == site) {
            return Err(bad(format!(
                "{kind} update from {site:?}, which is not a participant"
            )));
        }
        if seen.contains(&site) {
            return Err(bad(format!("more than one update from {site:?}")));
        }
        seen.push(site);
    }
    for u in &r.accepted {
        if !is_hex_digest(&u.digest) {
            return Err(bad(format!(
                "{}'s update digest {:?} is not 64 lowercase hex digits",
                u.site, u.digest
            )));
        }
        if !(u.weight.is_finite() && u.weight >= 0.0) {
            return Err(bad(format!(
                "{}'s weight {} is not finite and >= 0",
                u.site, u.weight
            )));
        }
        if !(u.norm.is_finite() && u.norm >= 0.0) {
            return Err(bad(format!(
                "{}'s norm {} is not finite and >= 0",
                u.site, u.norm
            )));
        }
    }
    for u in &r.refused {
        if let Some(d) = &u.digest
            && !is_hex_digest(d)
        {
            return Err(bad(format!(
                "{}'s refused update digest {d:?} is not 64 lowercase hex digits",
                u.site
            )));
        }
        if u.reason.trim().is_empty() {
            return Err(bad(format!("{}'s refused update has no reason", u.site)));
        }
        // A refused update's norm may be non-finite (that can be why it was refused), but a
        // database column cannot hold every non-finite value portably.
        if let Some(n) = u.norm
            && !n.is_finite()
        {
            return Err(bad(format!(
                "{}'s refused update norm {n} is not finite; leave it None and say so in the reason",
                u.site
            )));
        }
    }
    Ok(())
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord> {
    let id: String = get(row, "id")?;
    let what = |col: &str| format!("job {id}: jobs.{col}");
    let digest: String = get(row, "spec_digest")?;
    let state: String = get(row, "state")?;
    Ok(JobRecord {
        id: id
            .parse()
            .map_err(|e: crate::job::BadJobId| StoreError::Corrupt {
                what: "jobs.id".to_string(),
                problem: e.to_string(),
            })?,
        name: get(row, "name")?,
        spec_toml: get(row, "spec_toml")?,
        spec_digest: digest
            .parse()
            .map_err(|e: crate::job::BadDigest| StoreError::Corrupt {
                what: what("spec_digest"),
                problem: e.to_string(),
            })?,
        state: parse_state(&state)?,
        state_reason: get(row, "state_reason")?,
        total_rounds: to_u32(get(row, "total_rounds")?, &what("total_rounds"))?,
        current_round: to_u32(get(row, "current_round")?, &what("current_round"))?,
        created_at: from_ms(get(row, "created_at_ms")?, &what("created_at_ms"))?,
        updated_at: from_ms(get(row, "updated_at_ms")?, &what("updated_at_ms"))?,
    })
}

/// One column of a row, as `T`, with the column named in the error.
fn get<T>(row: &AnyRow, column: &str) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt {
        what: format!("column {column}"),
        problem: e.to_string(),
    })
}

fn parse_state(s: &str) -> Result<JobState> {
    s.parse()
        .map_err(|e: crate::job::UnknownJobState| StoreError::Corrupt {
            what: "jobs.state".to_string(),
            problem: e.to_string(),
        })
}

fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        what: what.to_string(),
        problem: format!("{v} is not a round or attempt number"),
    })
}

fn check_digest(what: &str, digest: &str) -> Result<()> {
    if is_hex_digest(digest) {
        Ok(())
    } else {
        Err(StoreError::InvalidInput {
            what: what.to_string(),
            problem: format!("{digest:?} is not 64 lowercase hex digits"),
        })
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Unix milliseconds, the store's timestamp unit (sorts and compares as a number on both databases).
fn unix_ms(t: OffsetDateTime) -> i64 {
    // i128 nanoseconds / 1e6 fits i64 for any year OffsetDateTime can hold (±9999).
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn now_ms() -> i64 {
    unix_ms(OffsetDateTime::now_utc())
}

fn from_ms(ms: i64, what: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(|e| {
        StoreError::Corrupt {
            what: what.to_string(),
            problem: format!("{ms} ms: {e}"),
        }
    })
}

// -------------------------------------------------------------------------------------------
// Approvals (the policy issue): who submitted a job, officers' signed approvals, amendments.

/// An approval as stored, with whether it was withdrawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRecord {
    pub approval: tutela_policy::Approval,
    /// The signer's identity as recorded (checked when the approval was accepted).
    pub signer: String,
    pub recorded_at_ms: i64,
    pub withdrawn_at_ms: Option<i64>,
}

impl Store {
    /// Records who submitted `job`.
    pub async fn record_submitter(&self, job: &JobId, submitted_by: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO job_submissions (job_id, submitted_by, submitted_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(job.as_str())
        .bind(submitted_by)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db(format!("record_submitter {job}")))?;
        Ok(())
    }

    /// Who submitted `job`, if recorded.
    pub async fn submitter(&self, job: &JobId) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT submitted_by FROM job_submissions WHERE job_id = $1")
            .bind(job.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db(format!("submitter {job}")))
    }

    /// Records (or renews) `signer`'s approval; clears an earlier withdrawal of the same digest.
    pub async fn record_approval(
        &self,
        job: &JobId,
        signer: &str,
        approval: &tutela_policy::Approval,
    ) -> Result<()> {
        let chain = chain_to_json(&approval.signer_chain_der, "approval certificate chain")?;
        sqlx::query(
            "INSERT INTO job_approvals (job_id, signer, spec_digest, signer_chain, signature_hex,
                                        signed_at_ms, expires_at_ms, recorded_at_ms, withdrawn_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL)
             ON CONFLICT (job_id, signer, spec_digest) DO UPDATE SET
                signer_chain = excluded.signer_chain, signature_hex = excluded.signature_hex,
                signed_at_ms = excluded.signed_at_ms, expires_at_ms = excluded.expires_at_ms,
                recorded_at_ms = excluded.recorded_at_ms, withdrawn_at_ms = NULL",
        )
        .bind(job.as_str())
        .bind(signer)
        .bind(approval.spec_digest.to_hex())
        .bind(chain)
        .bind(hex::encode(&approval.signature))
        .bind(approval.signed_at_ms)
        .bind(approval.expires_at_ms)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db(format!("record_approval {job} by {signer}")))?;
        Ok(())
    }

    /// Marks `signer`'s live approvals of `job` withdrawn; returns how many were.
    pub async fn withdraw_approval(&self, job: &JobId, signer: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE job_approvals SET withdrawn_at_ms = $1
             WHERE job_id = $2 AND signer = $3 AND withdrawn_at_ms IS NULL",
        )
        .bind(now_ms())
        .bind(job.as_str())
        .bind(signer)
        .execute(&self.pool)
        .await
        .map_err(db(format!("withdraw_approval {job} by {signer}")))?;
        Ok(done.rows_affected())
    }

    /// Every approval recorded for `job`, oldest first.
    pub async fn approvals(&self, job: &JobId) -> Result<Vec<ApprovalRecord>> {
        let rows = sqlx::query(
            "SELECT signer, spec_digest, signer_chain, signature_hex, signed_at_ms, expires_at_ms,
                    recorded_at_ms, withdrawn_at_ms
             FROM job_approvals WHERE job_id = $1 ORDER BY recorded_at_ms, signer",
        )
        .bind(job.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db(format!("approvals {job}")))?;
        let damaged = |what: &str| StoreError::Corrupt {
            what: format!("stored approval of job {job}"),
            problem: what.to_string(),
        };
        rows.iter()
            .map(|r| {
                let get = |e: sqlx::Error| damaged(&e.to_string());
                let signer: String = r.try_get(0).map_err(get)?;
                let digest: String = r.try_get(1).map_err(get)?;
                let chain: String = r.try_get(2).map_err(get)?;
                let signature: String = r.try_get(3).map_err(get)?;
                let chain = chain_from_json(&chain).map_err(|e| damaged(&e))?;
                Ok(ApprovalRecord {
                    approval: tutela_policy::Approval {
                        job_id: job.to_string(),
                        spec_digest: digest
                            .parse()
                            .map_err(|e: crate::job::BadDigest| damaged(&e.to_string()))?,
                        signer_chain_der: chain,
                        signature: hex::decode(&signature).map_err(|e| damaged(&e.to_string()))?,
                        signed_at_ms: r.try_get(4).map_err(get)?,
                        expires_at_ms: r.try_get(5).map_err(get)?,
                    },
                    signer,
                    recorded_at_ms: r.try_get(6).map_err(get)?,
                    withdrawn_at_ms: r.try_get(7).map_err(get)?,
                })
            })
            .collect()
    }
}

/// A certificate chain (DER, leaf first) as the JSON array of hex strings the approval and
/// rejection tables store.
fn chain_to_json(chain: &[Vec<u8>], what: &str) -> Result<String> {
    let chain: Vec<String> = chain.iter().map(hex::encode).collect();
    serde_json::to_string(&chain).map_err(|e| StoreError::InvalidInput {
        what: what.into(),
        problem: e.to_string(),
    })
}

/// [`chain_to_json`] read back; the error says what is wrong with the stored text.
fn chain_from_json(text: &str) -> std::result::Result<Vec<Vec<u8>>, String> {
    let chain: Vec<String> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    chain
        .iter()
        .map(hex::decode)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

// -------------------------------------------------------------------------------------------
// Rejections: a compliance officer's signed rejection ends a proposed job.

/// A rejection as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectionRecord {
    pub rejection: tutela_policy::Rejection,
    /// The signer's identity as recorded (checked when the rejection was accepted).
    pub signer: String,
    pub recorded_at_ms: i64,
}

impl Store {
    /// Records `signer`'s verified rejection of `job` and moves the job from proposed to
    /// cancelled with `state_reason`, in one transaction: both happen or neither. Refused, with
    /// nothing written, unless the job is still proposed and its spec still digests to the one
    /// the rejection signs (the state change is a compare-and-set on both).
    pub async fn record_rejection(
        &self,
        job: &JobId,
        signer: &str,
        rejection: &tutela_policy::Rejection,
        state_reason: &str,
    ) -> Result<()> {
        let op = format!("record_rejection {job} by {signer}");
        JobState::Proposed
            .transition(JobState::Cancelled)
            .map_err(|source| StoreError::IllegalTransition {
                job: job.clone(),
                source,
            })?;
        if rejection.job_id != job.as_str() {
            return Err(StoreError::InvalidInput {
                what: op,
                problem: format!("the rejection is of job {}", rejection.job_id),
            });
        }
        let chain = chain_to_json(&rejection.signer_chain_der, "rejection certificate chain")?;
        let digest = rejection.spec_digest.to_hex();
        let now = now_ms();
        let mut tx = self.begin_write(&op).await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, state_reason = $2, updated_at_ms = $3
             WHERE id = $4 AND state = $5 AND spec_digest = $6",
        )
        .bind(JobState::Cancelled.as_str())
        .bind(state_reason)
        .bind(now)
        .bind(job.as_str())
        .bind(JobState::Proposed.as_str())
        .bind(&digest)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: cancel the job")))?;
        if done.rows_affected() != 1 {
            // Nothing changed: say why, from the same transaction.
            let row = sqlx::query("SELECT state, spec_digest FROM jobs WHERE id = $1")
                .bind(job.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db(format!("{op}: read the job")))?;
            let Some(row) = row else {
                return Err(StoreError::JobNotFound(job.clone()));
            };
            let state = parse_state(&get::<String>(&row, "state")?)?;
            if state != JobState::Proposed {
                return Err(StoreError::StaleState {
                    job: job.clone(),
                    expected: JobState::Proposed,
                    actual: state,
                });
            }
            return Err(StoreError::SpecChanged {
                job: job.clone(),
                signed: digest,
                current: get(&row, "spec_digest")?,
            });
        }
        sqlx::query(
            "INSERT INTO job_rejections (job_id, signer, spec_digest, reason, signer_chain,
                                         signature_hex, signed_at_ms, recorded_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(job.as_str())
        .bind(signer)
        .bind(&digest)
        .bind(&rejection.reason)
        .bind(chain)
        .bind(hex::encode(&rejection.signature))
        .bind(rejection.signed_at_ms)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("{op}: store the rejection")))?;
        tx.commit().await.map_err(db(format!("{op}: commit")))?;
        Ok(())
    }

    /// The rejection of `job`, if it was rejected.
    pub async fn rejection(&self, job: &JobId) -> Result<Option<RejectionRecord>> {
        let row = sqlx::query(
            "SELECT signer, spec_digest, reason, signer_chain, signature_hex, signed_at_ms,
                    recorded_at_ms
             FROM job_rejections WHERE job_id = $1",
        )
        .bind(job.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db(format!("rejection {job}")))?;
        let Some(r) = row else {
            return Ok(None);
        };
        let damaged = |problem: String| StoreError::Corrupt {
            what: format!("stored rejection of job {job}"),
            problem,
        };
        let digest: String = get(&r, "spec_digest")?;
        let chain: String = get(&r, "signer_chain")?;
        let signature: String = get(&r, "signature_hex")?;
        Ok(Some(RejectionRecord {
            rejection: tutela_policy::Rejection {
                job_id: job.to_string(),
                spec_digest: digest
                    .parse()
                    .map_err(|e: crate::job::BadDigest| damaged(e.to_string()))?,
                reason: get(&r, "reason")?,
                signer_chain_der: chain_from_json(&chain).map_err(damaged)?,
                signature: hex::decode(&signature).map_err(|e| damaged(e.to_string()))?,
                signed_at_ms: get(&r, "signed_at_ms")?,
            },
            signer: get(&r, "signer")?,
            recorded_at_ms: get(&r, "recorded_at_ms")?,
        }))
    }
}
