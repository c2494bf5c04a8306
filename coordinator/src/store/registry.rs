//! The model registry's tables (migration 0004): registered versions and their stages, the
//! stage moves applied, and signed moves waiting for more signatures.
//!
//! Crash-safety: a version is registered once per job (the job id is unique), so a job resumed
//! after its publication finds its version instead of taking the next one; a stage move is
//! applied in one transaction (every version's compare-and-set on its stage and digest, the
//! move's row, the clearing of the name's pending signatures), so it is applied whole or not at
//! all, and a move signed against stages that have changed since is refused.

use sqlx::Row;
use sqlx::any::AnyRow;
use tutela_policy::stage::SignedMove;
use tutela_protocol::release::{MoveKind, Stage, VersionMove, VersionState};

use super::{Result, Store, StoreError, chain_from_json, chain_to_json, db, now_ms};
use crate::job::JobId;

/// A version of a registered name, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredVersion {
    pub name: String,
    pub version: u64,
    pub model_digest: String,
    pub job_id: String,
    pub stage: Stage,
    pub left_production: Option<u64>,
    pub published_at_ms: i64,
}

impl RegisteredVersion {
    /// What planning a move needs of it.
    pub fn state(&self) -> VersionState {
        VersionState {
            version: self.version,
            model_digest: self.model_digest.clone(),
            stage: self.stage,
            left_production: self.left_production,
        }
    }
}

/// A stage move applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageMoveRecord {
    pub name: String,
    pub move_no: u64,
    pub kind: MoveKind,
    pub moves: Vec<VersionMove>,
    pub reason: String,
    pub signers: Vec<String>,
    pub moved_at_ms: i64,
}

/// A signed move waiting for its quorum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSignature {
    pub move_key: String,
    pub signer: String,
    pub signed: SignedMove,
    pub recorded_at_ms: i64,
}

fn corrupt(what: &str, problem: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what: what.to_string(),
        problem: problem.to_string(),
    }
}

fn get<T>(row: &AnyRow, i: usize, what: &str) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(i).map_err(|e| corrupt(what, e))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(what, format!("{v} is negative")))
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::InvalidInput {
        what: what.to_string(),
        problem: format!("{v} is too large"),
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidInput {
        what: "stage move".into(),
        problem: e.to_string(),
    })
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

/// A `model_versions` row selected as `name, version, model_digest, job_id, stage,
/// left_production, published_at_ms`.
fn version_from_row(row: &AnyRow) -> Result<RegisteredVersion> {
    let what = "model_versions row";
    let stage: String = get(row, 4, what)?;
    let left: Option<i64> = get(row, 5, what)?;
    Ok(RegisteredVersion {
        name: get(row, 0, what)?,
        version: to_u64(get(row, 1, what)?, what)?,
        model_digest: get(row, 2, what)?,
        job_id: get(row, 3, what)?,
        stage: stage.parse().map_err(|e| corrupt(what, e))?,
        left_production: left.map(|v| to_u64(v, what)).transpose()?,
        published_at_ms: get(row, 6, what)?,
    })
}

impl Store {
    /// Registers `job`'s published model as the next version of `name` (a candidate), or
    /// returns the version it already is (a job resumed after its publication).
    pub async fn register_version(
        &self,
        name: &str,
        model_digest: &str,
        job: &JobId,
    ) -> Result<RegisteredVersion> {
        if let Some(problem) = tutela_protocol::release::name_problem(name) {
            return Err(StoreError::InvalidInput {
                what: "registry name".into(),
                problem,
            });
        }
        super::check_digest("model digest", model_digest)?;
        let op = format!("register_version {name} for job {job}");
        let mut tx = self.begin_write(&op).await?;
        let existing = sqlx::query(
            "SELECT name, version, model_digest, job_id, stage, left_production, published_at_ms
             FROM model_versions WHERE job_id = $1",
        )
        .bind(job.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(op.clone()))?;
        if let Some(row) = existing {
            let v = version_from_row(&row)?;
            if v.model_digest != model_digest || v.name != name {
                return Err(StoreError::InvalidInput {
                    what: format!("job {job}'s registered model"),
                    problem: format!(
                        "it is already {} v{} (model {}), not model {model_digest} under {name}",
                        v.name, v.version, v.model_digest
                    ),
                });
            }
            return Ok(v);
        }
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM model_versions WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await
                .map_err(db(op.clone()))?;
        let version = last.unwrap_or(0) + 1;
        let published_at_ms = now_ms();
        sqlx::query(
            "INSERT INTO model_versions (name, version, model_digest, job_id, stage,
                                         left_production, published_at_ms)
             VALUES ($1, $2, $3, $4, 'candidate', NULL, $5)",
        )
        .bind(name)
        .bind(version)
        .bind(model_digest)
        .bind(job.as_str())
        .bind(published_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(db(op.clone()))?;
        tx.commit().await.map_err(db(op))?;
        Ok(RegisteredVersion {
            name: name.to_string(),
            version: to_u64(version, "version")?,
            model_digest: model_digest.to_string(),
            job_id: job.to_string(),
            stage: Stage::Candidate,
            left_production: None,
            published_at_ms,
        })
    }

    /// Every registered name, sorted.
    pub async fn model_names(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT DISTINCT name FROM model_versions ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db("model_names"))
    }

    /// `name`'s versions, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<RegisteredVersion>> {
        let rows = sqlx::query(
            "SELECT name, version, model_digest, job_id, stage, left_production, published_at_ms
             FROM model_versions WHERE name = $1 ORDER BY version",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(db(format!("versions {name}")))?;
        rows.iter().map(version_from_row).collect()
    }

    /// `name`'s stage moves, in order.
    pub async fn stage_moves(&self, name: &str) -> Result<Vec<StageMoveRecord>> {
        let rows = sqlx::query(
            "SELECT move_no, kind, moves, reason, signers, moved_at_ms
             FROM model_stage_moves WHERE name = $1 ORDER BY move_no",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(db(format!("stage_moves {name}")))?;
        let what = format!("stage move of {name}");
        rows.iter()
            .map(|r| {
                let kind: String = get(r, 1, &what)?;
                let moves: String = get(r, 2, &what)?;
                let signers: String = get(r, 4, &what)?;
                Ok(StageMoveRecord {
                    name: name.to_string(),
                    move_no: to_u64(get(r, 0, &what)?, &what)?,
                    kind: kind.parse().map_err(|e| corrupt(&what, e))?,
                    moves: from_json(&moves, &what)?,
                    reason: get(r, 3, &what)?,
                    signers: from_json(&signers, &what)?,
                    moved_at_ms: get(r, 5, &what)?,
                })
            })
            .collect()
    }

    /// The number the next move of `name` gets.
    pub async fn next_move_no(&self, name: &str) -> Result<u64> {
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(move_no) FROM model_stage_moves WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await
                .map_err(db(format!("next_move_no {name}")))?;
        to_u64(last.unwrap_or(0) + 1, "move_no")
    }

    /// Keeps `signer`'s verified signature of a move (under `move_key`) until its quorum is met;
    /// a new signature of the same move by the same signer replaces the old one.
    pub async fn record_pending_signature(
        &self,
        move_key: &str,
        signer: &str,
        signed: &SignedMove,
    ) -> Result<()> {
        let op = format!("record_pending_signature {} by {signer}", signed.name);
        sqlx::query(
            "INSERT INTO model_stage_signatures (name, move_key, kind, moves, reason, signer,
                                                 signer_chain, signature_hex, signed_at_ms,
                                                 recorded_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (name, move_key, signer) DO UPDATE SET
                signer_chain = excluded.signer_chain, signature_hex = excluded.signature_hex,
                signed_at_ms = excluded.signed_at_ms, recorded_at_ms = excluded.recorded_at_ms",
        )
        .bind(&signed.name)
        .bind(move_key)
        .bind(signed.kind.as_str())
        .bind(to_json(&signed.moves)?)
        .bind(&signed.reason)
        .bind(signer)
        .bind(chain_to_json(
            &signed.signer_chain_der,
            "stage move signer chain",
        )?)
        .bind(hex::encode(&signed.signature))
        .bind(signed.signed_at_ms)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db(op))?;
        Ok(())
    }

    /// The signatures of `name`'s moves waiting for their quorum, oldest first.
    pub async fn pending_signatures(&self, name: &str) -> Result<Vec<PendingSignature>> {
        let rows = sqlx::query(
            "SELECT move_key, kind, moves, reason, signer, signer_chain, signature_hex,
                    signed_at_ms, recorded_at_ms
             FROM model_stage_signatures WHERE name = $1 ORDER BY recorded_at_ms, signer",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(db(format!("pending_signatures {name}")))?;
        let what = format!("pending stage signature of {name}");
        rows.iter()
            .map(|r| {
                let kind: String = get(r, 1, &what)?;
                let moves: String = get(r, 2, &what)?;
                let chain: String = get(r, 5, &what)?;
                let signature: String = get(r, 6, &what)?;
                Ok(PendingSignature {
                    move_key: get(r, 0, &what)?,
                    signer: get(r, 4, &what)?,
                    signed: SignedMove {
                        name: name.to_string(),
                        kind: kind.parse().map_err(|e| corrupt(&what, e))?,
                        moves: from_json(&moves, &what)?,
                        reason: get(r, 3, &what)?,
                        signer_chain_der: chain_from_json(&chain).map_err(|e| corrupt(&what, e))?,
                        signature: hex::decode(&signature).map_err(|e| corrupt(&what, e))?,
                        signed_at_ms: get(r, 7, &what)?,
                    },
                    recorded_at_ms: get(r, 8, &what)?,
                })
            })
            .collect()
    }

    /// Applies a move whose quorum was met and which the audit trail recorded, in one
    /// transaction: each version's stage (a compare-and-set on its stage and digest: a version
    /// no longer where the move says refuses the whole move), the move's row, and the clearing
    /// of `name`'s pending signatures.
    pub async fn apply_stage_move(&self, record: &StageMoveRecord) -> Result<()> {
        let name = &record.name;
        let op = format!("apply_stage_move {name} #{}", record.move_no);
        let move_no = to_i64(record.move_no, "move_no")?;
        let mut tx = self.begin_write(&op).await?;
        // Out of production first: a name never has two production versions, even mid-move.
        let mut ordered: Vec<&VersionMove> = record.moves.iter().collect();
        ordered.sort_by_key(|m| m.to == Stage::Production);
        for m in ordered {
            let left_production = if m.from == Stage::Production {
                Some(move_no)
            } else {
                None
            };
            let done = sqlx::query(
                "UPDATE model_versions SET stage = $1,
                        left_production = COALESCE($2, left_production)
                 WHERE name = $3 AND version = $4 AND stage = $5 AND model_digest = $6",
            )
            .bind(m.to.as_str())
            .bind(left_production)
            .bind(name)
            .bind(to_i64(m.version, "version")?)
            .bind(m.from.as_str())
            .bind(&m.model_digest)
            .execute(&mut *tx)
            .await
            .map_err(db(op.clone()))?;
            if done.rows_affected() != 1 {
                return Err(StoreError::StageConflict {
                    name: name.clone(),
                    problem: format!(
                        "v{} is no longer {} with model {}: the move {m} was not applied",
                        m.version, m.from, m.model_digest
                    ),
                });
            }
        }
        sqlx::query(
            "INSERT INTO model_stage_moves (name, move_no, kind, moves, reason, signers, moved_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(name)
        .bind(move_no)
        .bind(record.kind.as_str())
        .bind(to_json(&record.moves)?)
        .bind(&record.reason)
        .bind(to_json(&record.signers)?)
        .bind(record.moved_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(db(op.clone()))?;
        sqlx::query("DELETE FROM model_stage_signatures WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db(op.clone()))?;
        tx.commit().await.map_err(db(op))?;
        Ok(())
    }
}
