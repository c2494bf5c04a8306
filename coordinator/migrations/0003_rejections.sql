-- Signed rejections of jobs (tutela_policy::approval::Rejection): a participating site's compliance
-- officer's signature over the rejection message (job id, spec digest, time of signing, reason).
-- Same portable types as 0001: TEXT, BIGINT; binary values as lowercase hex in TEXT.

-- A rejection ends its job, so a job has at most one. The row is written in the same transaction
-- that moves the job from proposed to cancelled: a job is rejected with its signature or not at all.
CREATE TABLE job_rejections (
    job_id          TEXT   NOT NULL PRIMARY KEY REFERENCES jobs (id),
    -- The signer's identity, the URI SAN of the leaf certificate.
    signer          TEXT   NOT NULL,
    -- The spec digest the rejection signs (the job's digest when it was rejected).
    spec_digest     TEXT   NOT NULL CHECK (length(spec_digest) = 64),
    -- The officer's reason, as signed.
    reason          TEXT   NOT NULL,
    -- JSON array of the signer's certificate chain, DER in hex, leaf first.
    signer_chain    TEXT   NOT NULL,
    signature_hex   TEXT   NOT NULL,
    signed_at_ms    BIGINT NOT NULL,
    recorded_at_ms  BIGINT NOT NULL
);
