-- Signed approvals of jobs (tutela_policy::approval) and who submitted each job.
-- Same portable types as 0001: TEXT, BIGINT; binary values as lowercase hex in TEXT.

-- Who submitted a job (the operator's certificate identity). One row per job submitted while the
-- coordinator ran with a [policy]; the site nodes' `allowed_operators` clause is checked against it.
CREATE TABLE job_submissions (
    job_id          TEXT   NOT NULL PRIMARY KEY REFERENCES jobs (id),
    submitted_by    TEXT   NOT NULL,
    submitted_at_ms BIGINT NOT NULL
);

-- One row per (job, signer, spec digest): an officer's approval of one version of a job's spec. An
-- amended spec has a new digest, so approvals of the old one stay on record but no longer count.
-- A second approval by the same officer of the same digest replaces the first (a renewal).
CREATE TABLE job_approvals (
    job_id           TEXT   NOT NULL REFERENCES jobs (id),
    -- The signer's identity, the URI SAN of the leaf certificate.
    signer           TEXT   NOT NULL,
    spec_digest      TEXT   NOT NULL CHECK (length(spec_digest) = 64),
    -- JSON array of the signer's certificate chain, DER in hex, leaf first.
    signer_chain     TEXT   NOT NULL,
    signature_hex    TEXT   NOT NULL,
    signed_at_ms     BIGINT NOT NULL,
    expires_at_ms    BIGINT NOT NULL,
    recorded_at_ms   BIGINT NOT NULL,
    -- Set when the officer withdrew the approval (before the job started).
    withdrawn_at_ms  BIGINT,
    PRIMARY KEY (job_id, signer, spec_digest)
);
