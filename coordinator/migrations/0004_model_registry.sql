-- The model registry (tutela_protocol::release): each published model's registry name and
-- version and its stage; the stage moves made; signed moves waiting for more signatures.
-- Same portable types as 0001: TEXT, BIGINT; binary values as lowercase hex in TEXT.

CREATE TABLE model_versions (
    name            TEXT   NOT NULL,
    version         BIGINT NOT NULL CHECK (version >= 1),
    model_digest    TEXT   NOT NULL CHECK (length(model_digest) = 64),
    -- A job publishes one model: registering it again (a resumed job) finds this row.
    job_id          TEXT   NOT NULL UNIQUE REFERENCES jobs (id),
    stage           TEXT   NOT NULL
        CHECK (stage IN ('candidate', 'canary', 'production', 'retired')),
    -- The name's move number at which the version last left production (a rollback restores the
    -- retired version that left last); NULL if it never was in production.
    left_production BIGINT,
    published_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

-- A name has at most one production version, whatever a buggy caller does.
CREATE UNIQUE INDEX model_versions_one_production ON model_versions (name)
    WHERE stage = 'production';

-- Every stage move applied, in order per name (the audit trail's model.stage_changed has the
-- signatures; this is the coordinator's own history for `tutela model show`).
CREATE TABLE model_stage_moves (
    name        TEXT   NOT NULL,
    move_no     BIGINT NOT NULL CHECK (move_no >= 1),
    kind        TEXT   NOT NULL CHECK (kind IN ('promote', 'rollback')),
    -- JSON array of tutela_protocol::release::VersionMove.
    moves       TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    -- JSON array of the signers' identities.
    signers     TEXT   NOT NULL,
    moved_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name, move_no)
);

-- Signed moves whose quorum is not met yet. A move's key is the SHA-256 of its kind, moves and
-- reason (what every signer signs besides the time); applying any move of a name clears them
-- all, since each starts from the stages it was signed against.
CREATE TABLE model_stage_signatures (
    name           TEXT   NOT NULL,
    move_key       TEXT   NOT NULL CHECK (length(move_key) = 64),
    kind           TEXT   NOT NULL,
    moves          TEXT   NOT NULL,
    reason         TEXT   NOT NULL,
    signer         TEXT   NOT NULL,
    -- JSON array of the signer's certificate chain, DER in hex, leaf first.
    signer_chain   TEXT   NOT NULL,
    signature_hex  TEXT   NOT NULL,
    signed_at_ms   BIGINT NOT NULL,
    recorded_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name, move_key, signer)
);
