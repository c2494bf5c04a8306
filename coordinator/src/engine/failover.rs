//! What the engine does when its coordinator gains or loses the leader lease (`crate::leadership`,
//! `[ha]` of coordinator.toml), and the copies of its files that a new leader on another machine
//! needs.
//!
//! A new leader takes over every running job at its last completed round: the round the old
//! leader was in is recorded as a failed attempt (it was interrupted) and re-issued as the next
//! attempt, so its tasks, refusals and audit events are told apart from the old leader's; the
//! global model and strategy state it goes on from are copied from the database when its own
//! `data_dir` lacks them (the old leader wrote them there before committing the round that
//! names them).

use std::path::Path;
use std::sync::atomic::Ordering;

use super::{Engine, EngineError};
use crate::job::{JobId, JobState};

/// Why the attempt in progress at a takeover is recorded as failed.
pub const INTERRUPTED: &str = "interrupted: the leader lease changed hands while this round was \
     open (the coordinator that held it stopped, or was cut off from the database); the new \
     leader re-issues the round as the next attempt";

impl Engine {
    /// Whether global models and strategy states are copied into the database (`[ha]`).
    pub fn replicates_files(&self) -> bool {
        self.replicate_files.load(Ordering::Relaxed)
    }

    /// Copies models and strategy states into the database from now on (`[ha]`).
    pub fn set_replicate_files(&self) {
        self.replicate_files.store(true, Ordering::Relaxed);
    }

    /// This coordinator became the leader: takes over every running job (see the module
    /// documentation) and starts its runner. Returns how many jobs it took over.
    pub async fn take_over(self: &std::sync::Arc<Self>) -> Result<usize, EngineError> {
        for job in self.store.list_jobs(Some(JobState::Running)).await? {
            self.interrupt_open_attempt(&job).await?;
        }
        self.resume().await
    }

    /// Records the attempt the old leader may have been running at the job's next round as
    /// failed (only once the job has its initial model: before that the old leader was asking
    /// for it, which is asked again).
    async fn interrupt_open_attempt(
        &self,
        job: &crate::store::JobRecord,
    ) -> Result<(), EngineError> {
        let next = job.current_round + 1;
        if next > job.total_rounds || self.store.global_model(&job.id, 0).await?.is_none() {
            return Ok(());
        }
        let attempt = self.store.failed_attempts(&job.id, next).await? + 1;
        self.store
            .record_failed_attempt(&job.id, next, attempt, INTERRUPTED)
            .await?;
        tracing::warn!(job = %job.id, round = next, attempt, "took over the job: the interrupted attempt is recorded as failed; the round is re-issued");
        Ok(())
    }

    /// This coordinator lost the leader lease: every job runner stops at once (their writes would
    /// be refused by the fence anyway) and every node is told to go to the leader.
    pub fn stand_down(&self, why: &str) {
        let cancels: Vec<_> = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, t)| t)
            .collect();
        for t in cancels {
            t.cancel();
        }
        self.nodes
            .disconnect_all(tonic::Status::unavailable(format!("not leader: {why}")));
    }

    /// Copies the file of `model_id` into the database (with `[ha]`), before a record names it.
    pub(super) async fn replicate_model(&self, model_id: &str) -> Result<(), EngineError> {
        if !self.replicates_files() {
            return Ok(());
        }
        let path = self.model_path(model_id);
        let bytes = std::fs::read(&path).map_err(|e| {
            EngineError::Failed(format!("reading model {model_id} to replicate it: {e}"))
        })?;
        self.store
            .replicate_file(&format!("model:{model_id}"), &bytes)
            .await?;
        Ok(())
    }

    /// Copies the strategy state of `job`'s `round`, if it has one (with `[ha]`).
    pub(super) async fn replicate_strategy_state(
        &self,
        job: &JobId,
        round: u32,
    ) -> Result<(), EngineError> {
        if !self.replicates_files() {
            return Ok(());
        }
        let path = self.state_path(job, round);
        if !path.exists() {
            return Ok(());
        }
        let bytes = std::fs::read(&path).map_err(|e| {
            EngineError::Failed(format!(
                "reading {}'s strategy state to replicate it: {e}",
                job
            ))
        })?;
        self.store
            .replicate_file(&format!("state:{job}:{round}"), &bytes)
            .await?;
        Ok(())
    }

    /// Makes sure this machine has the model and strategy state a job goes on from at `round`,
    /// copying them from the database when missing (a leader that took over from another
    /// machine). A model missing from both is an error naming it.
    pub(super) async fn ensure_local(
        &self,
        job: &JobId,
        round: u32,
        model_id: &str,
    ) -> Result<(), EngineError> {
        let model = self.model_path(model_id);
        if !model.exists() {
            let key = format!("model:{model_id}");
            let Some(bytes) = self.store.replicated_file(&key).await? else {
                return Err(EngineError::Failed(format!(
                    "job {job}: round {round}'s global model {model_id} is neither in this coordinator's data_dir nor replicated in the database"
                )));
            };
            write_atomically(&model, &bytes)?;
            tracing::info!(%job, round, model = model_id, "global model copied from the database");
        }
        let state = self.state_path(job, round);
        if round > 0
            && !state.exists()
            && let Some(bytes) = self
                .store
                .replicated_file(&format!("state:{job}:{round}"))
                .await?
        {
            write_atomically(&state, &bytes)?;
        }
        Ok(())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let failed =
        |e: std::io::Error| EngineError::Failed(format!("writing {}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
    std::fs::write(tmp.path(), bytes).map_err(failed)?;
    tmp.persist(path).map_err(|e| failed(e.error))?;
    Ok(())
}
