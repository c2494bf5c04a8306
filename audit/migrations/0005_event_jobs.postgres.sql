-- The console's job page and `tutela audit log --job J` ask for the events about a job: those
-- whose subject is the job id (index audit_events_by_subject) and those whose payload names the
-- job (`"job": "<id>"` at the payload's top level: privacy spends, refusals, de-identification
-- reports). The second used to be a `payload LIKE` scan of every payload (2 s at 1M events).
--
-- audit_event_jobs is that lookup written down: one row per event whose payload has a string
-- `job`, inserted by the service in the same statement as the event (AuditStore::insert_events*),
-- and filled for the events stored before this migration by the store right after it, in batches,
-- in the migration's transaction (audit/src/store/derived.rs). It is an index, not evidence:
-- every reader still decides on the event itself (EventFilter::matches), and the console's
-- periodic verification re-derives the whole table from the verified events and reports a row
-- missing (a row too many only proposes a candidate that readers reject). Append-only like the log.
CREATE TABLE audit_event_jobs (
    job TEXT   NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (job, seq)
);
CREATE TRIGGER audit_event_jobs_append_only
    BEFORE UPDATE OR DELETE ON audit_event_jobs
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_event_jobs_no_truncate
    BEFORE TRUNCATE ON audit_event_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
