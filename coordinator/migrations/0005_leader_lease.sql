-- Coordinators sharing one PostgreSQL database ([ha] in coordinator.toml): the leader lease and
-- the files a new leader on another machine needs to go on with a job.
--
-- Created on SQLite too (one schema), where nothing uses it: [ha] is refused there.

-- One row per lease (only 'coordinator' today). `epoch` grows by one at every change of holder:
-- it is the fencing token that every state-changing write of the coordinator checks in its own
-- transaction, so a leader that lost the lease cannot write once another holds it.
-- `expires_at_ms` is on the database's clock, so the coordinators' clocks do not matter.
CREATE TABLE coordinator_lease (
    name          TEXT   NOT NULL PRIMARY KEY,
    holder        TEXT   NOT NULL,
    -- The holder's address for nodes (its [ha] advertise_address), told to them by followers.
    address       TEXT,
    epoch         BIGINT NOT NULL CHECK (epoch >= 0),
    expires_at_ms BIGINT NOT NULL,
    renewed_at_ms BIGINT NOT NULL
);

-- Copies of the global models and strategy states a running job goes on from (the leader's
-- data_dir is on its own machine): written by the leader before the round that names them is
-- committed, read by a new leader that lacks the file. Keyed `model:<sha256>` or
-- `state:<job>:<round>`; `sha256` is of `bytes`, checked when read back.
CREATE TABLE replicated_files (
    key            TEXT   NOT NULL PRIMARY KEY,
    sha256         TEXT   NOT NULL CHECK (length(sha256) = 64),
    bytes          BYTEA  NOT NULL,
    recorded_at_ms BIGINT NOT NULL
);
