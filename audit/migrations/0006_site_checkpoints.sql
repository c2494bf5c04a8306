-- The checkpoint each site's node says it holds (`ReportHeldCheckpoint`, audit/src/service.rs),
-- the newest per site, for the console's overview: which signed tree head each site has pinned,
-- how far behind the log's head it is, and since when.
--
-- Not trail events: a node reports after every checkpoint it verifies (each watch period), and an
-- event per report would itself move the head the report is measured against, every few seconds
-- per site, for a fact that changes nothing the trail records. What matters to a regulator is
-- already in it (the events the checkpoints sign). A row is replaced by the site's next report;
-- the service accepts a report only from the site's own node certificate, and only of a
-- checkpoint this log signed (same size, same root).
CREATE TABLE audit_site_checkpoints (
    site           TEXT   NOT NULL PRIMARY KEY,
    node           TEXT   NOT NULL,
    tree_size      BIGINT NOT NULL CHECK (tree_size >= 0),
    root           TEXT   NOT NULL,
    reported_at_ms BIGINT NOT NULL
);
