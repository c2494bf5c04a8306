-- Events by job: see 0005_event_jobs.postgres.sql. Append-only like the log.
CREATE TABLE audit_event_jobs (
    job TEXT   NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (job, seq)
);
CREATE TRIGGER audit_event_jobs_no_update BEFORE UPDATE ON audit_event_jobs
BEGIN
    SELECT RAISE(ABORT, 'audit_event_jobs is append-only: UPDATE is refused');
END;
CREATE TRIGGER audit_event_jobs_no_delete BEFORE DELETE ON audit_event_jobs
BEGIN
    SELECT RAISE(ABORT, 'audit_event_jobs is append-only: DELETE is refused');
END;
