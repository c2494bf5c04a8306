-- The coordinator's jobs, rounds and nodes: one schema for SQLite and PostgreSQL.
--
-- Portable on purpose: only BIGINT, TEXT and DOUBLE PRECISION columns (the types sqlx's Any driver
-- maps on both databases), digests as 64 lowercase hex digits in TEXT, timestamps as unix
-- milliseconds in BIGINT, JSON documents as TEXT. Ids are made by the coordinator, not by a
-- database sequence (SQLite and PostgreSQL spell those differently).
--
-- Applied once, in one transaction, by coordinator/src/store.rs, which records it in
-- coordinator_schema_migrations. Never edit this file after a release: add 0002_*.sql instead
-- (the store refuses a database whose applied migration's checksum differs from the file's).

-- One row per job. `current_round` is the last completed round (0 before the first); it moves only
-- together with the round's row in `rounds` and its model in `global_models` (one transaction).
CREATE TABLE jobs (
    id              TEXT   NOT NULL PRIMARY KEY,
    name            TEXT   NOT NULL,
    -- The spec exactly as submitted, and the SHA-256 of its canonical JSON (what approvals sign).
    spec_toml       TEXT   NOT NULL,
    spec_digest     TEXT   NOT NULL CHECK (length(spec_digest) = 64),
    state           TEXT   NOT NULL
        CHECK (state IN ('proposed', 'running', 'completed', 'failed', 'cancelled')),
    -- Why the job is in its state (set with failed and cancelled; NULL otherwise).
    state_reason    TEXT,
    total_rounds    BIGINT NOT NULL CHECK (total_rounds >= 1),
    current_round   BIGINT NOT NULL CHECK (current_round >= 0 AND current_round <= total_rounds),
    created_at_ms   BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, created_at_ms);

-- The global model after each completed round; round 0 is the initial model.
CREATE TABLE global_models (
    job_id          TEXT   NOT NULL REFERENCES jobs (id),
    round           BIGINT NOT NULL CHECK (round >= 0),
    model_digest    TEXT   NOT NULL CHECK (length(model_digest) = 64),
    recorded_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (job_id, round)
);

-- One row per completed round, never two: the primary key makes a second completion of the same
-- round an error. A round always has its global model (the foreign key).
CREATE TABLE rounds (
    job_id          TEXT   NOT NULL REFERENCES jobs (id),
    round           BIGINT NOT NULL CHECK (round >= 1),
    -- Which attempt completed it (1 unless earlier attempts missed min_sites).
    attempt         BIGINT NOT NULL CHECK (attempt >= 1),
    -- JSON array of the site names sampled for the round.
    participants    TEXT   NOT NULL,
    -- JSON object: site name -> that site's metrics (loss, accuracy, examples, ...).
    site_metrics    TEXT   NOT NULL,
    started_at_ms   BIGINT NOT NULL,
    completed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, round),
    FOREIGN KEY (job_id, round) REFERENCES global_models (job_id, round)
);

-- Each site's update in a completed round: accepted (folded into the aggregate) or refused (with
-- the reason the site and the operator were told). `position` keeps the order the record listed
-- them in (the order they were folded in, which a bit-exact replay of the aggregate needs).
CREATE TABLE round_updates (
    job_id          TEXT   NOT NULL,
    round           BIGINT NOT NULL,
    site            TEXT   NOT NULL,
    outcome         TEXT   NOT NULL CHECK (outcome IN ('accepted', 'refused')),
    position        BIGINT NOT NULL CHECK (position >= 0),
    update_digest   TEXT   CHECK (update_digest IS NULL OR length(update_digest) = 64),
    weight          DOUBLE PRECISION,
    norm            DOUBLE PRECISION,
    reason          TEXT,
    PRIMARY KEY (job_id, round, site),
    FOREIGN KEY (job_id, round) REFERENCES rounds (job_id, round),
    CHECK (
        (outcome = 'accepted' AND update_digest IS NOT NULL AND weight IS NOT NULL
            AND norm IS NOT NULL AND reason IS NULL)
        OR (outcome = 'refused' AND weight IS NULL AND reason IS NOT NULL)
    )
);

-- Every attempt at a round that ended: failed ones (fewer than min_sites by the deadline) with
-- their reason, and the one that completed. Attempts are numbered 1, 2, ... without gaps.
CREATE TABLE round_attempts (
    job_id          TEXT   NOT NULL REFERENCES jobs (id),
    round           BIGINT NOT NULL CHECK (round >= 1),
    attempt         BIGINT NOT NULL CHECK (attempt >= 1),
    outcome         TEXT   NOT NULL CHECK (outcome IN ('completed', 'failed')),
    reason          TEXT,
    recorded_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (job_id, round, attempt),
    CHECK (outcome = 'completed' OR reason IS NOT NULL)
);
-- At most one completed attempt per round (a partial index: SQLite >= 3.8 and PostgreSQL both have them).
CREATE UNIQUE INDEX round_attempts_one_completed ON round_attempts (job_id, round)
    WHERE outcome = 'completed';

-- The site nodes the coordinator has seen: the site's name, the certificate identity it connected
-- with (spiffe://<consortium>/site/<site>/node), and when.
CREATE TABLE nodes (
    site            TEXT   NOT NULL PRIMARY KEY,
    identity        TEXT   NOT NULL,
    first_seen_ms   BIGINT NOT NULL,
    last_seen_ms    BIGINT NOT NULL
);
