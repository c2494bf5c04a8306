-- SQLite: the same append-only rule as PostgreSQL's triggers (SQLite has no TRUNCATE; its
-- "truncate optimisation" is disabled when a DELETE trigger exists, so the trigger covers it).
-- SQLite has no roles: whoever can write the file can drop these, which `verify` then catches.
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: UPDATE on audit_events is refused');
END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: DELETE on audit_events is refused');
END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: UPDATE on audit_checkpoints is refused');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: DELETE on audit_checkpoints is refused');
END;
