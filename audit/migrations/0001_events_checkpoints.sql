-- The audit log: one schema for SQLite and PostgreSQL (portable types only: BIGINT and TEXT).
--
-- Hashes are 64 lowercase hex digits, timestamps unix milliseconds (the hashed text is rebuilt from
-- them exactly: tutela_audit::Timestamp has millisecond precision), payloads the RFC 8785 canonical
-- JSON text that was hashed. Nothing here is trusted by `verify`: every row is re-hashed, and the
-- constraints only keep honest writers honest.
--
-- Applied once by audit/src/store.rs, recorded in audit_schema_migrations. Never edit after a
-- release: add a new numbered file.

-- One row per event; `seq` is dense from 0 and is the event's leaf index in the Merkle tree.
CREATE TABLE audit_events (
    seq          BIGINT NOT NULL PRIMARY KEY CHECK (seq >= 0),
    timestamp_ms BIGINT NOT NULL,
    actor        TEXT   NOT NULL,
    action       TEXT   NOT NULL,
    subject      TEXT   NOT NULL,
    payload      TEXT   NOT NULL,
    prev_hash    TEXT   NOT NULL,
    hash         TEXT   NOT NULL
);
-- `tutela audit log --job J` and lineage look events up by subject (a job id, a model digest).
CREATE INDEX audit_events_by_subject ON audit_events (subject, seq);

-- The log's signed checkpoints: "the first tree_size events have Merkle root `root`".
CREATE TABLE audit_checkpoints (
    tree_size    BIGINT NOT NULL PRIMARY KEY CHECK (tree_size >= 0),
    root         TEXT   NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    log_id       TEXT   NOT NULL,
    signature    TEXT   NOT NULL
);
