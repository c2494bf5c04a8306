-- Quarantine (audit/src/quarantine.rs, docs/runbooks/audit-forged-row.md): rows written into the
-- log past the service are moved here, never deleted. A row leaves audit_events only once its
-- exact copy (same seq and hash) is here, and only if no signed checkpoint covers it (seq at or
-- past the largest checkpointed tree size): a signed row can never be quarantined. Only a role
-- with DELETE on audit_events (the tables' owner; the application role has INSERT and SELECT)
-- can move rows at all. This table is append-only like the log.
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
    -- The signed order (tutela_audit::payload::AuditQuarantined, canonical JSON) that moved it.
    order_json        TEXT   NOT NULL,
    PRIMARY KEY (seq, hash)
);

CREATE FUNCTION audit_release_quarantined() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM audit_quarantine q WHERE q.seq = OLD.seq AND q.hash = OLD.hash)
       AND OLD.seq >= (SELECT COALESCE(MAX(tree_size), 0) FROM audit_checkpoints) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only: DELETE of seq % is refused (only an unanchored row already copied to audit_quarantine may leave)', OLD.seq
        USING ERRCODE = 'insufficient_privilege';
END
$$;

DROP TRIGGER audit_events_append_only ON audit_events;
CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_events_release_quarantined
    BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_release_quarantined();
CREATE TRIGGER audit_quarantine_append_only
    BEFORE UPDATE OR DELETE ON audit_quarantine
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_quarantine_no_truncate
    BEFORE TRUNCATE ON audit_quarantine
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
