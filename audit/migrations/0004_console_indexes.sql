-- The compliance officers' console (audit/src/console) searches events by actor, action and time,
-- newest first, one page at a time by keyset (`seq < cursor ORDER BY seq DESC LIMIT n`), over
-- millions of events. Without these a filtered page scans the table backwards from its head
-- until it has found n matches: fine when they are recent, seconds when they are rare.
--
-- (actor, seq) and (action, seq): a filtered page is a descending range scan of one index.
-- (timestamp_ms, seq): a time bound becomes a seq bound with one index probe (timestamps never
-- go back along seq on a log that verifies: verify_log refuses one that does).
CREATE INDEX audit_events_by_actor ON audit_events (actor, seq);
CREATE INDEX audit_events_by_action ON audit_events (action, seq);
CREATE INDEX audit_events_by_time ON audit_events (timestamp_ms, seq);
