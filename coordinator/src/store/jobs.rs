//! Jobs as stored: their creation from a submitted spec of either kind, their state changes and
//! reads, and a proposed job's amendment.

use super::*;
use crate::job::SubmittedSpec;

impl Store {
    /// Records a new job in state `Proposed`. `spec_toml` is kept verbatim; it must parse to
    /// `spec`, and `digest` must be their digest (the one the approvals sign), else nothing is
    /// stored.
    ///
    /// A spec of either kind (`SubmittedSpec`): a training job's `total_rounds` is its
    /// `rounds`, a statistics job's 1 (its release).
    pub async fn create_job(
        &self,
        spec_toml: &str,
        spec: impl Into<SubmittedSpec>,
        digest: &SpecDigest,
    ) -> Result<JobId> {
        let spec: SubmittedSpec = spec.into();
        let parsed = SubmittedSpec::from_toml_str(spec_toml)?;
        let from_text = parsed.digest();
        if from_text != *digest {
            return Err(StoreError::SpecMismatch(format!(
                "the digest given, {digest}, is not the spec text's digest, {from_text}"
            )));
        }
        if spec.digest() != from_text {
            return Err(StoreError::SpecMismatch(format!(
                "the parsed spec given (digest {}) is not the spec text (digest {from_text})",
                spec.digest()
            )));
        }
        let id = JobId::generate().map_err(|_| StoreError::Random)?;
        let now = now_ms();
        let op = format!("create_job {id} ({})", parsed.name());
        let mut tx = self.begin_write(&op).await?;
        sqlx::query(
            "INSERT INTO jobs (id, name, spec_toml, spec_digest, state, state_reason,
                               total_rounds, current_round, created_at_ms, updated_at_ms)
             VALUES ($1, $2, $3, $4, $5, NULL, $6, 0, $7, $7)",
        )
        .bind(id.as_str())
        .bind(parsed.name())
        .bind(spec_toml)
        .bind(digest.to_hex())
        .bind(JobState::Proposed.as_str())
        .bind(i64::from(parsed.rounds()))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db(&op))?;
        tx.commit().await.map_err(db(format!("{op}: commit")))?;
        Ok(id)
    }

    /// Moves `job` from `from` to `to`, if the state machine allows it and the job is still in
    /// `from` (one `UPDATE … WHERE state = from`: a compare-and-set). `Completed` also requires every
    /// round to be recorded. `reason` is stored with the new state (say why for failed and
    /// cancelled).
    pub async fn set_job_state(
        &self,
        job: &JobId,
        from: JobState,
        to: JobState,
        reason: Option<&str>,
    ) -> Result<()> {
        from.transition(to)
            .map_err(|source| StoreError::IllegalTransition {
                job: job.clone(),
                source,
            })?;
        let sql = if to == JobState::Completed {
            "UPDATE jobs SET state = $1, state_reason = $2, updated_at_ms = $3
             WHERE id = $4 AND state = $5 AND current_round = total_rounds"
        } else {
            "UPDATE jobs SET state = $1, state_reason = $2, updated_at_ms = $3
             WHERE id = $4 AND state = $5"
        };
        let op = format!("set_job_state {job} {from} -> {to}");
        let mut tx = self.begin_write(&op).await?;
        let done = sqlx::query(sql)
            .bind(to.as_str())
            .bind(reason)
            .bind(now_ms())
            .bind(job.as_str())
            .bind(from.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db(&op))?;
        if done.rows_affected() == 1 {
            tx.commit().await.map_err(db(format!("{op}: commit")))?;
            return Ok(());
        }
        drop(tx);
        // Nothing changed: say why. (Read after the fact, so only the message can race.)
        match self.get_job(job).await? {
            None => Err(StoreError::JobNotFound(job.clone())),
            Some(j) if j.state != from => Err(StoreError::StaleState {
                job: job.clone(),
                expected: from,
                actual: j.state,
            }),
            Some(j) => Err(StoreError::JobIncomplete {
                job: job.clone(),
                current: j.current_round,
                total: j.total_rounds,
            }),
        }
    }

    pub async fn get_job(&self, job: &JobId) -> Result<Option<JobRecord>> {
        let row = sqlx::query(
            "SELECT id, name, spec_toml, spec_digest, state, state_reason, total_rounds,
                    current_round, created_at_ms, updated_at_ms
             FROM jobs WHERE id = $1",
        )
        .bind(job.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db(format!("get_job {job}")))?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Every job, or those in `state`, oldest first.
    pub async fn list_jobs(&self, state: Option<JobState>) -> Result<Vec<JobRecord>> {
        let rows =
            match state {
                Some(s) => sqlx::query(
                    "SELECT id, name, spec_toml, spec_digest, state, state_reason, total_rounds,
                        current_round, created_at_ms, updated_at_ms
                 FROM jobs WHERE state = $1 ORDER BY created_at_ms, id",
                )
                .bind(s.as_str())
                .fetch_all(&self.pool)
                .await,
                None => sqlx::query(
                    "SELECT id, name, spec_toml, spec_digest, state, state_reason, total_rounds,
                        current_round, created_at_ms, updated_at_ms
                 FROM jobs ORDER BY created_at_ms, id",
                )
                .fetch_all(&self.pool)
                .await,
            }
            .map_err(db("list_jobs"))?;
        rows.iter().map(job_from_row).collect()
    }

    /// Replaces the spec of a job still proposed. Its digest changes with any field, so the
    /// approvals recorded so far (over the old digest) no longer count.
    pub async fn amend_job(
        &self,
        job: &JobId,
        spec_toml: &str,
        spec: impl Into<SubmittedSpec>,
        digest: &SpecDigest,
    ) -> Result<()> {
        let spec: SubmittedSpec = spec.into();
        let parsed = SubmittedSpec::from_toml_str(spec_toml)?;
        if parsed.digest() != *digest || spec.digest() != *digest {
            return Err(StoreError::SpecMismatch(format!(
                "the digest given, {digest}, is not the spec's, {}",
                parsed.digest()
            )));
        }
        let done = sqlx::query(
            "UPDATE jobs SET spec_toml = $1, spec_digest = $2, name = $3, total_rounds = $4,
                             updated_at_ms = $5
             WHERE id = $6 AND state = $7",
        )
        .bind(spec_toml)
        .bind(digest.to_hex())
        .bind(parsed.name())
        .bind(i64::from(parsed.rounds()))
        .bind(now_ms())
        .bind(job.as_str())
        .bind(JobState::Proposed.as_str())
        .execute(&self.pool)
        .await
        .map_err(db(format!("amend_job {job}")))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        match self.get_job(job).await? {
            None => Err(StoreError::JobNotFound(job.clone())),
            Some(j) => Err(StoreError::StaleState {
                job: job.clone(),
                expected: JobState::Proposed,
                actual: j.state,
            }),
        }
    }
}
