-- Quarantine: see 0003_quarantine.postgres.sql. A row leaves audit_events only once its exact
-- copy is in audit_quarantine and no signed checkpoint covers it; audit_quarantine is append-only.
CREATE TABLE audit_quarantine (
    seq               BIGINT NOT NULL,
    timestamp_ms      BIGINT NOT NULL,
    actor             TEXT   NOT NULL,
    action            TEXT   NOT NULL,
    subject           TEXT   NOT NULL,
    payload           TEXT   NOT NULL,
    prev_hash         TEXT   NOT NULL,
    hash              TEXT   NOT NULL,
    quarantined_at_ms BIGINT NOT NULL,
    order_json        TEXT   NOT NULL,
    PRIMARY KEY (seq, hash)
);
DROP TRIGGER audit_events_no_delete;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN NOT EXISTS (SELECT 1 FROM audit_quarantine q WHERE q.seq = OLD.seq AND q.hash = OLD.hash)
  OR OLD.seq < (SELECT COALESCE(MAX(tree_size), 0) FROM audit_checkpoints)
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: DELETE on audit_events is refused (only an unanchored row already copied to audit_quarantine may leave)');
END;
CREATE TRIGGER audit_quarantine_no_update BEFORE UPDATE ON audit_quarantine
BEGIN
    SELECT RAISE(ABORT, 'the audit quarantine is append-only: UPDATE is refused');
END;
CREATE TRIGGER audit_quarantine_no_delete BEFORE DELETE ON audit_quarantine
BEGIN
    SELECT RAISE(ABORT, 'the audit quarantine is append-only: DELETE is refused');
END;
