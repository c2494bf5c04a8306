//! A statistics job's result as stored: its `statistics.published` record, written once (with
//! the job's one round, its release, marked done) before the record goes to the trail and the
//! job is marked completed.

use tutela_audit::payload::StatisticsPublished;

use super::*;

impl Store {
    /// Keeps `record` as `job`'s result. The same record again is accepted (a runner that
    /// stopped after storing it); another result for the job is refused.
    pub async fn record_statistics_result(
        &self,
        job: &JobId,
        record: &StatisticsPublished,
    ) -> Result<()> {
        check_digest("statistics result_sha256", &record.result_sha256)?;
        let json = serde_json::to_string(record).map_err(|e| StoreError::InvalidInput {
            what: format!("job {job}'s statistics record"),
            problem: e.to_string(),
        })?;
        if let Some(stored) = self.statistics_result(job).await? {
            if stored == *record {
                return Ok(());
            }
            return Err(StoreError::InvalidInput {
                what: format!("job {job}'s statistics result"),
                problem: format!(
                    "the job has a result already (file {}); a second one ({}) is refused",
                    stored.result_sha256, record.result_sha256
                ),
            });
        }
        // The result and the job's one "round" (its release, `total_rounds` = 1) in one
        // transaction: a running job at round 0 has no result, one at round 1 has it.
        let op = format!("record_statistics_result {job}");
        let mut tx = self.begin_write(&op).await?;
        let advanced = sqlx::query(
            "UPDATE jobs SET current_round = 1, updated_at_ms = $1
             WHERE id = $2 AND state = 'running' AND current_round = 0 AND total_rounds = 1",
        )
        .bind(now_ms())
        .bind(job.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db(&op))?;
        if advanced.rows_affected() != 1 {
            return Err(StoreError::InvalidInput {
                what: format!("job {job}'s statistics result"),
                problem: "the job is not a running statistics job waiting for its result".into(),
            });
        }
        sqlx::query(
            "INSERT INTO statistics_results (job_id, result_sha256, record_json, recorded_at_ms)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(job.as_str())
        .bind(&record.result_sha256)
        .bind(json)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db(&op))?;
        tx.commit().await.map_err(db(&op))?;
        Ok(())
    }

    /// `job`'s stored statistics result, if it has one.
    pub async fn statistics_result(&self, job: &JobId) -> Result<Option<StatisticsPublished>> {
        let json: Option<String> =
            sqlx::query_scalar("SELECT record_json FROM statistics_results WHERE job_id = $1")
                .bind(job.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db(format!("statistics_result {job}")))?;
        json.map(|text| {
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                what: format!("statistics_results.record_json of job {job}"),
                problem: e.to_string(),
            })
        })
        .transpose()
    }
}
