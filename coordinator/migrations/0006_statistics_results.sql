-- A consortium-statistics job's result (kind = "statistics"): the `statistics.published` record
-- the runner made, kept before it is appended to the trail and before the job is marked
-- completed (the outbox: a coordinator that stops in between records it at resume, once). The
-- file itself is content-addressed under the model directory (`statistics/<sha256>.toml`).
-- Same portable types as 0001: TEXT, BIGINT.
CREATE TABLE statistics_results (
    job_id          TEXT   NOT NULL PRIMARY KEY REFERENCES jobs (id),
    result_sha256   TEXT   NOT NULL CHECK (length(result_sha256) = 64),
    -- The `statistics.published` payload, JSON (tutela_audit::payload::StatisticsPublished).
    record_json     TEXT   NOT NULL,
    recorded_at_ms  BIGINT NOT NULL
);
