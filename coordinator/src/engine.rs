//! The round engine: runs each running job round by round, crash-safely.
//!
//! For every job it (1) obtains the initial global model — like Flower, by asking one sampled
//! site to build the model from the job's seed — (2) for each round samples the eligible
//! connected sites, sends each a task, folds their updates into a [`RoundAggregator`] as they
//! stream in, and (3) at the deadline, or as soon as every task has ended, closes the round: with
//! at least `min_sites` accepted updates the strategy makes the new global model, which is stored
//! and recorded together with the round in one transaction; otherwise the attempt is recorded as
//! failed and retried, up to `max_round_retries`, and then the job fails with the reason.
//!
//! State lives in the [`Store`] and the content-addressed model directory, never only in memory:
//! a coordinator killed at any point resumes each running job at its last completed round.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tutela_audit::payload;
use tutela_protocol::pb;

use crate::aggregate::plan::{JobAggregation, Spools};
use crate::job::{JobId, JobSpec, JobState, SubmittedSpec};
use crate::nodes::NodeRegistry;
use crate::store::Store;
use crate::strategy::StrategyConfig;
use crate::tasks::{SiteMetrics, TaskTable};

mod check;
mod failover;
mod publish;
mod round;
mod statistics;

pub use check::{CHECK_WAIT, CheckAnswerError, PendingChecks};
pub use failover::INTERRUPTED;
pub use publish::DETECTION_THRESHOLD;

pub struct Engine {
    pub store: Store,
    pub nodes: Arc<NodeRegistry>,
    pub tasks: Arc<TaskTable>,
    /// `tutela job check`'s CHECK tasks waiting for their nodes' answers.
    pub checks: PendingChecks,
    pub model_dir: PathBuf,
    /// Strategy state (server optimizer moments) per job and round.
    pub state_dir: PathBuf,
    /// Spool files of the uploads' exact undo, kept between rounds (in `state_dir`).
    spool_pool: Arc<crate::aggregate::SpoolPool>,
    /// The key the buffered aggregation's update spools are encrypted under: random, held in
    /// memory only, since a spool never outlives the process (an interrupted round is rerun).
    spool_kek: Arc<tutela_privacy::at_rest::LocalKek>,
    /// Bumped whenever a job changes, for `WatchJob`.
    changes: Mutex<HashMap<String, watch::Sender<u64>>>,
    cancels: Mutex<HashMap<String, CancellationToken>>,
    /// Set when the coordinator runs with a `[policy]`: jobs then wait in `proposed` until their
    /// approval quorum is met. Unset: jobs start when submitted.
    pub approvals: std::sync::OnceLock<Arc<crate::approvals::ApprovalGate>>,
    /// The audit trail (set once by `serve`; unset: a disabled trail that only logs).
    pub audit: std::sync::OnceLock<Arc<crate::audit_trail::AuditTrail>>,
    /// Secure aggregation rounds in progress, by task: where a node's `SecAgg` messages go.
    pub secagg: crate::aggregate::masked::SecAggRoutes,
    /// The consortium's watermark key (`[watermark] key_file`), set once by `serve`; unset: jobs
    /// with a `[watermark]` section are refused at submission.
    pub watermark_key: std::sync::OnceLock<Arc<tutela_protocol::watermark::WatermarkKey>>,
    /// Held while a stage move of the model registry is checked, recorded and applied
    /// (`crate::registry::move_stage`): moves are applied one at a time.
    pub registry_lock: tokio::sync::Mutex<()>,
    /// With `[ha]`: models and strategy states are copied into the database for a new leader on
    /// another machine (`failover`).
    replicate_files: std::sync::atomic::AtomicBool,
    /// The coordinator's Prometheus metrics (`crate::metrics`), counted whether or not
    /// `[metrics]` serves them.
    pub metrics: Arc<crate::metrics::CoordinatorMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Spec(#[from] crate::job::SpecError),
    #[error("model store: {0}")]
    Model(#[from] tutela_protocol::stream::StreamError),
    #[error("strategy: {0}")]
    Strategy(String),
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
    /// A fail-closed audit append failed: the action was refused.
    #[error("refused: the audit service did not record this action: {0}")]
    Audit(String),
    #[error("no job {0}")]
    NotFound(String),
    /// The job asks for something this coordinator is not set up for (a watermark without a
    /// key): refused at submission.
    #[error("{0}")]
    NotConfigured(String),
}

impl EngineError {
    /// Whether a write was refused because this coordinator no longer holds the leader lease.
    pub fn is_fenced(&self) -> bool {
        matches!(self, EngineError::Store(e) if e.is_fenced())
    }
}

/// The buffered aggregation's spools, under `state_dir`.
const UPDATE_SPOOL_DIR: &str = "update-spools";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn ms_to_time(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Why a statistics spec with `[secure_aggregation]` is refused at submission.
pub const MASKED_STATISTICS_REFUSAL: &str = "[secure_aggregation]: this coordinator does not run \
     a consortium-statistics job's masked sum yet (the masked round carries no statistics vector, \
     and a site's ledger cannot state the masked sum's ε); submit it without \
     [secure_aggregation], so that each site releases its own noised vector (the spec is valid; \
     nothing was proposed or recorded)";

fn new_task_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    // The OS RNG failing is not something to recover from; fall back to time for uniqueness.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b[..8].copy_from_slice(&now_ms().to_le_bytes());
    }
    hex::encode(b)
}

impl Engine {
    pub fn new(store: Store, model_dir: PathBuf, state_dir: PathBuf) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&model_dir)?;
        std::fs::create_dir_all(&state_dir)?;
        // Spools a previous process left (encrypted under a key that died with it) are useless.
        let update_spools = state_dir.join(UPDATE_SPOOL_DIR);
        if update_spools.exists() {
            std::fs::remove_dir_all(&update_spools)?;
        }
        let spool_kek = {
            // A data key's generator: 32 bytes from the OS, zeroed when dropped.
            let key = tutela_privacy::at_rest::DataKey::generate()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Arc::new(tutela_privacy::at_rest::LocalKek::from_bytes(
                key.as_bytes(),
            ))
        };
        let nodes = Arc::new(NodeRegistry::default());
        let tasks = Arc::new(TaskTable::default());
        let metrics = crate::metrics::CoordinatorMetrics::new(nodes.clone(), tasks.clone())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Arc::new(Engine {
            store,
            nodes,
            tasks,
            metrics: Arc::new(metrics),
            checks: PendingChecks::default(),
            model_dir,
            spool_pool: crate::aggregate::SpoolPool::new(Some(state_dir.clone())),
            spool_kek,
            state_dir,
            changes: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            approvals: std::sync::OnceLock::new(),
            audit: std::sync::OnceLock::new(),
            secagg: Default::default(),
            watermark_key: std::sync::OnceLock::new(),
            registry_lock: tokio::sync::Mutex::new(()),
            replicate_files: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Where a round's aggregation spools updates.
    fn spools(&self) -> Spools {
        Spools {
            pool: self.spool_pool.clone(),
            dir: self.state_dir.join(UPDATE_SPOOL_DIR),
            kek: self.spool_kek.clone(),
        }
    }

    /// The audit trail: the one `serve` set, or a disabled one.
    pub fn trail(&self) -> Arc<crate::audit_trail::AuditTrail> {
        static DISABLED: std::sync::LazyLock<Arc<crate::audit_trail::AuditTrail>> =
            std::sync::LazyLock::new(|| Arc::new(crate::audit_trail::AuditTrail::disabled()));
        self.audit.get().unwrap_or(&DISABLED).clone()
    }

    // Engine events are recorded with `note_durably`: the job's runner waits until the audit
    // service has committed each one (retrying while it is down, and appending each once), so no
    // round starts, completes or publishes off the record. A round committed to the store but not
    // yet in the trail when the coordinator stopped is recorded at resume, before the job goes on
    // (`record_committed_rounds`): the store's round is the outbox, written in the round's
    // transaction.

    /// `job.started`, with the approvals counted and the job's sites.
    /// Records `job.started` for `id` (each job once: a retry, or a resume with `look_first`,
    /// finds one already there). The job's runner starts only after it.
    async fn audit_started(&self, id: &JobId) {
        self.audit_started_once(id, false).await
    }

    async fn audit_started_once(&self, id: &JobId, look_first: bool) {
        let Ok(job) = self.get_job(id).await else {
            return;
        };
        let approvals = match self.standing(&job).await {
            Ok(Some(s)) => s.counting.len(),
            _ => 0,
        };
        // The sites of a spec of either kind (a statistics job's are its participants too).
        let sites = job.sites().unwrap_or_default();
        self.trail()
            .record_payload_once(
                id.as_str(),
                &payload::JobStarted {
                    spec_digest: job.spec_digest.to_hex(),
                    approvals: approvals as u64,
                    participants: sites,
                },
                look_first,
                |_| true,
            )
            .await;
    }

    /// Who may decide for each of `sites` (a spec's, of either kind), by the policy in force
    /// (`None` without a policy: the trail then admits no officer's decision of the job).
    fn approvers(
        &self,
        sites: &[String],
    ) -> Option<std::collections::BTreeMap<String, Vec<String>>> {
        self.approvals.get().map(|gate| gate.approvers(sites))
    }

    /// The spec in `spec_toml`, of either kind, if this coordinator can run it: a training
    /// job's strategy and watermark key; a statistics job without `[secure_aggregation]`
    /// ([`MASKED_STATISTICS_REFUSAL`]). Used by `SubmitJob` and `AmendJob`, before anything is
    /// stored or proposed; `CheckJob` creates no job and asks the sites about either kind.
    pub fn accepted_spec(&self, spec_toml: &str) -> Result<SubmittedSpec, EngineError> {
        let spec = SubmittedSpec::from_toml_str(spec_toml)?;
        match &spec {
            SubmittedSpec::Training(training) => {
                StrategyConfig::from_spec(training.strategy.as_ref())
                    .map_err(|e| EngineError::Strategy(e.to_string()))?;
                self.check_watermark_key(training)?;
            }
            SubmittedSpec::Statistics(statistics) => {
                if statistics.secure_aggregation.is_some() {
                    return Err(EngineError::NotConfigured(MASKED_STATISTICS_REFUSAL.into()));
                }
            }
        }
        Ok(spec)
    }

    pub async fn get_job(&self, id: &JobId) -> Result<crate::store::JobRecord, EngineError> {
        self.store
            .get_job(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(id.to_string()))
    }

    /// A receiver that changes whenever `job` does.
    pub fn subscribe(&self, job: &str) -> watch::Receiver<u64> {
        let mut map = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(job.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn changed(&self, job: &JobId) {
        let map = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(job.as_str()) {
            tx.send_modify(|v| *v += 1);
        }
    }

    pub fn model_path(&self, model_id: &str) -> PathBuf {
        self.model_dir.join(format!("{model_id}.safetensors"))
    }

    /// Starts the runner of every job the store says is running: after a restart, they resume at
    /// their last completed round.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, EngineError> {
        let running = self.store.list_jobs(Some(JobState::Running)).await?;
        let n = running.len();
        for job in running {
            if let Ok(SubmittedSpec::Statistics(_)) = job.submitted() {
                tracing::info!(job = %job.id, "resuming statistics job");
                let this = self.clone();
                tokio::spawn(async move { this.resume_statistics(job.id).await });
                continue;
            }
            tracing::info!(job = %job.id, round = job.current_round, "resuming job");
            // A coordinator that stopped between marking the job running and recording
            // `job.started` (the trail down at the time) records it now, before any round.
            let this = self.clone();
            tokio::spawn(async move {
                this.audit_started_once(&job.id, true).await;
                this.spawn(job.id);
            });
        }
        Ok(n)
    }

    /// Creates a job from its spec and starts it (see [`Engine::submit_by`]).
    pub async fn submit(self: &Arc<Self>, spec_toml: &str) -> Result<JobId, EngineError> {
        self.submit_by(spec_toml, None).await
    }

    /// Creates a job submitted by `submitter`. With approvals required it stays `proposed` until
    /// its quorum is met ([`Engine::try_start`]); otherwise it starts at once.
    pub async fn submit_by(
        self: &Arc<Self>,
        spec_toml: &str,
        submitter: Option<&str>,
    ) -> Result<JobId, EngineError> {
        let spec = self.accepted_spec(spec_toml)?;
        let digest = spec.digest();
        let id = self.store.create_job(spec_toml, &spec, &digest).await?;
        if let Some(who) = submitter {
            self.store.record_submitter(&id, who).await?;
        }
        // Fail closed: a job the audit trail does not know of is withdrawn before it can start.
        let proposed = self
            .trail()
            .record_payload(
                id.as_str(),
                &proposal(&spec, &digest, submitter, self.approvers(spec.sites())),
            )
            .await;
        if let Err(e) = proposed {
            let why = format!("the audit service did not record the proposal: {e}");
            if let Err(e2) = self
                .store
                .set_job_state(&id, JobState::Proposed, JobState::Cancelled, Some(&why))
                .await
            {
                tracing::error!(job = %id, error = %e2, "could not withdraw the unaudited job");
            }
            return Err(EngineError::Audit(e.to_string()));
        }
        if self.approvals.get().is_some() {
            drop(self.subscribe(id.as_str()));
            return Ok(id);
        }
        // Only `insecure_no_policy = true` leaves the engine without an approval gate.
        tracing::warn!(job = %id, "insecure_no_policy = true: this job starts WITHOUT any approval");
        self.store
            .set_job_state(&id, JobState::Proposed, JobState::Running, None)
            .await?;
        self.audit_started(&id).await;
        self.spawn(id.clone());
        Ok(id)
    }

    /// Where a job's approvals stand, when approvals are required.
    pub async fn standing(
        &self,
        job: &crate::store::JobRecord,
    ) -> Result<Option<crate::approvals::Standing>, EngineError> {
        let Some(gate) = self.approvals.get() else {
            return Ok(None);
        };
        let records = self.store.approvals(&job.id).await?;
        Ok(Some(gate.standing(job, &records, now_ms())))
    }

    /// Starts a proposed job if its approval quorum is met; returns whether it started.
    pub async fn try_start(self: &Arc<Self>, id: &JobId) -> Result<bool, EngineError> {
        let job = self.get_job(id).await?;
        if job.state != JobState::Proposed {
            return Ok(false);
        }
        let met = match self.standing(&job).await? {
            Some(s) => s.quorum.is_met(),
            None => true,
        };
        if met {
            match self
                .store
                .set_job_state(id, JobState::Proposed, JobState::Running, None)
                .await
            {
                Ok(()) => {}
                // Two last approvals arriving together both see the quorum met; the first to
                // start the job wins, and the other's approval, recorded and counted all the
                // same, must not be answered as an error (found with 300 sites approving at
                // once: the loser was told its approval failed).
                Err(crate::store::StoreError::StaleState {
                    actual: JobState::Running,
                    ..
                }) => {
                    self.changed(id);
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
            tracing::info!(job = %id, "approval quorum met: job starts");
            if self.approvals.get().is_some() {
                let waited = time::OffsetDateTime::now_utc() - job.created_at;
                self.metrics
                    .approval_quorum_met(waited.try_into().unwrap_or_default());
            }
            self.audit_started(id).await;
            self.spawn(id.clone());
        }
        self.changed(id);
        Ok(met)
    }

    /// Replaces a proposed job's spec; the new digest voids the approvals so far. The new spec is
    /// proposed in the audit trail first (fail closed): officers' approvals of its digest are
    /// accepted there only for a digest the trail shows proposed.
    pub async fn amend(&self, id: &JobId, spec_toml: &str) -> Result<(), EngineError> {
        let spec = self.accepted_spec(spec_toml)?;
        let submitter = self.store.submitter(id).await?;
        self.trail()
            .record_payload(
                id.as_str(),
                &proposal(
                    &spec,
                    &spec.digest(),
                    submitter.as_deref(),
                    self.approvers(spec.sites()),
                ),
            )
            .await
            .map_err(|e| {
                EngineError::Failed(format!(
                    "the audit service did not record the amended proposal, so the job keeps its spec: {e}"
                ))
            })?;
        self.store
            .amend_job(id, spec_toml, &spec, &spec.digest())
            .await?;
        self.changed(id);
        Ok(())
    }

    pub async fn cancel(&self, job: &JobId, reason: &str) -> Result<(), EngineError> {
        self.cancel_as(job, reason, true).await
    }

    /// [`Engine::cancel`]; `audit`: whether to note `job.failed` (state cancelled) here, false
    /// when the caller has already recorded the end (a rejection).
    pub async fn cancel_as(
        &self,
        job: &JobId,
        reason: &str,
        audit: bool,
    ) -> Result<(), EngineError> {
        // A proposed job (waiting for approvals) is cancelled without ever running.
        let from = match self.get_job(job).await?.state {
            JobState::Proposed => JobState::Proposed,
            _ => JobState::Running,
        };
        self.store
            .set_job_state(job, from, JobState::Cancelled, Some(reason))
            .await?;
        if audit {
            self.trail()
                .note_payload_durably(
                    job.as_str(),
                    &payload::JobFailed {
                        state: "cancelled".into(),
                        reason: reason.to_string(),
                    },
                )
                .await;
        }
        if let Some(t) = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job.as_str())
        {
            t.cancel();
        }
        self.changed(job);
        Ok(())
    }

    fn spawn(self: &Arc<Self>, job: JobId) {
        let token = CancellationToken::new();
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.as_str().to_string(), token.clone());
        // Make sure watchers exist before the first change.
        drop(self.subscribe(job.as_str()));
        let this = self.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = this.run_job(&job) => r,
                _ = token.cancelled() => Err(EngineError::Cancelled),
            };
            match result {
                Ok(()) => {
                    this.metrics
                        .job_ended(crate::metrics::JobOutcome::Completed);
                    tracing::info!(job = %job, "job completed")
                }
                Err(EngineError::Cancelled) => {
                    this.metrics
                        .job_ended(crate::metrics::JobOutcome::Cancelled);
                    tracing::info!(job = %job, "job cancelled")
                }
                // Another coordinator holds the lease and goes on with the job: nothing of it
                // is this one's to record any more.
                Err(e) if e.is_fenced() => {
                    tracing::warn!(job = %job, error = %e, "lost the leader lease: this coordinator stops running the job");
                }
                Err(e) => {
                    this.metrics.job_ended(crate::metrics::JobOutcome::Failed);
                    tracing::error!(job = %job, error = %e, "job failed");
                    this.fail_running(&job, &e.to_string()).await;
                }
            }
            this.changed(&job);
        });
    }

    /// Marks a running job failed with `reason`, and records `job.failed`.
    async fn fail_running(&self, job: &JobId, reason: &str) {
        if let Err(e2) = self
            .store
            .set_job_state(job, JobState::Running, JobState::Failed, Some(reason))
            .await
        {
            tracing::error!(job = %job, error = %e2, "could not record the failure");
        }
        self.trail()
            .note_payload_durably(
                job.as_str(),
                &payload::JobFailed {
                    state: "failed".into(),
                    reason: reason.to_string(),
                },
            )
            .await;
    }

    async fn run_job(self: &Arc<Self>, job_id: &JobId) -> Result<(), EngineError> {
        let job = self.get_job(job_id).await?;
        let spec = match job.submitted()? {
            SubmittedSpec::Training(spec) => *spec,
            SubmittedSpec::Statistics(spec) => return self.run_statistics(&job, &spec).await,
        };
        let digest_hex = job.spec_digest.to_hex();
        // The approvals that count go with the tasks, each site's to its own node, for the nodes
        // to verify themselves.
        let approvals = crate::approvals::SiteApprovals::new(&match self.standing(&job).await? {
            Some(s) => s.counting,
            None => Vec::new(),
        });
        let submitted_by = self.store.submitter(job_id).await?.unwrap_or_default();
        let ctx = JobCtx {
            id: job_id,
            spec: &spec,
            spec_toml: &job.spec_toml,
            digest_hex: &digest_hex,
            approvals: &approvals,
            submitted_by: &submitted_by,
        };
        let mut strategy = StrategyConfig::from_spec(spec.strategy.as_ref())
            .map_err(|e| EngineError::Strategy(e.to_string()))?
            .build();

        // Where the job stands: the last completed round and its global model.
        let (mut round, mut model_id) =
            match self.store.global_model(job_id, job.current_round).await? {
                Some(m) => {
                    self.ensure_local(job_id, job.current_round, &m).await?;
                    (job.current_round, m)
                }
                None => {
                    let m = self.initial_model(&ctx).await?;
                    self.replicate_model(&m).await?;
                    self.store.set_initial_model(job_id, &m).await?;
                    self.changed(job_id);
                    (0, m)
                }
            };
        if round > 0 {
            self.load_strategy_state(job_id, round, strategy.as_mut())?;
            self.record_committed_rounds(job_id).await?;
        }
        // The job's aggregation (and central DP's accountant, which spans the job's rounds);
        // set up on the first round, when the model's size is known.
        let mut aggregation: Option<JobAggregation> = None;

        while round < spec.rounds {
            let next = round + 1;
            let mut attempt = self.store.failed_attempts(job_id, next).await? + 1;
            loop {
                match self
                    .run_round(
                        &ctx,
                        (next, attempt),
                        &model_id,
                        strategy.as_mut(),
                        &mut aggregation,
                    )
                    .await?
                {
                    Ok(new_model) => {
                        model_id = new_model;
                        break;
                    }
                    Err(reason) => {
                        self.store
                            .record_failed_attempt(job_id, next, attempt, &reason)
                            .await?;
                        self.changed(job_id);
                        self.metrics.round_attempt_failed(job_id.as_str());
                        tracing::warn!(job = %job_id, round = next, attempt, %reason, "round attempt failed");
                        if attempt > spec.max_round_retries {
                            return Err(EngineError::Failed(format!(
                                "round {next} failed {attempt} time(s), the last because {reason}; max_round_retries is {}",
                                spec.max_round_retries
                            )));
                        }
                        attempt += 1;
                    }
                }
            }
            round = next;
            self.changed(job_id);
        }
        // The total ε per site is the last round's accountant value (`dp_job_epsilon`).
        let mut epsilon = std::collections::BTreeMap::new();
        for c in self.store.rounds(job_id).await.unwrap_or_default() {
            for (site, m) in &c.record.site_metrics {
                if let Some(e) = m.get("dp_job_epsilon").and_then(|e| e.as_f64()) {
                    epsilon.insert(site.clone(), e);
                }
            }
        }
        // The published model: the final global model, watermarked first when the job asks.
        let publication = self.publication(job_id, &spec, &model_id).await?;
        let published = publication.model_id.clone();
        self.replicate_model(&published).await?;
        // Recorded before the job is marked completed, and looked for first: a coordinator that
        // stopped in between resumes the job here and records each once.
        let trail = self.trail();
        trail
            .record_payload_once(
                job_id.as_str(),
                &payload::JobCompleted {
                    model_digest: published.clone(),
                    rounds: spec.rounds,
                    epsilon,
                },
                true,
                |_| true,
            )
            .await;
        // The watermark is registered before the model is published under it.
        if let Some(registered) = &publication.watermark {
            trail
                .record_payload_once(&published, registered, true, |_| true)
                .await;
        }
        trail
            .record_payload_once(
                &published,
                &payload::ModelPublished {
                    job: job_id.as_str().to_string(),
                    model_digest: published.clone(),
                    spec_digest: digest_hex,
                    rounds: spec.rounds,
                    code_version: crate::audit_trail::code_version(),
                    // A language model's adapters sit on the base the signed spec names.
                    base_model: spec.model.base_sha256.clone(),
                },
                true,
                |_| true,
            )
            .await;
        // The published (watermarked) model becomes the next version of its registry name, a candidate.
        crate::registry::register_published(self, job_id, &spec, &published).await;
        self.store
            .set_job_state(job_id, JobState::Running, JobState::Completed, None)
            .await?;
        tracing::info!(job = %job_id, model = %published, path = %self.model_path(&published).display(), "final model published");
        Ok(())
    }
}

/// A training job's context: its spec, and what every task of it carries.
struct JobCtx<'a> {
    id: &'a JobId,
    spec: &'a JobSpec,
    spec_toml: &'a str,
    digest_hex: &'a str,
    approvals: &'a crate::approvals::SiteApprovals,
    submitted_by: &'a str,
}

impl<'a> JobCtx<'a> {
    fn header(&self) -> TaskHeader<'a> {
        TaskHeader {
            id: self.id,
            spec_toml: self.spec_toml,
            digest_hex: self.digest_hex,
            approvals: self.approvals,
            submitted_by: self.submitted_by,
        }
    }
}

/// What every task of a job (of either kind) carries.
struct TaskHeader<'a> {
    id: &'a JobId,
    spec_toml: &'a str,
    digest_hex: &'a str,
    /// The approvals that count; each site's node gets its own site's (`SiteApprovals::for_site`).
    approvals: &'a crate::approvals::SiteApprovals,
    submitted_by: &'a str,
}

impl TaskHeader<'_> {
    /// A new task of `kind` for the job and `site`'s node, with a fresh id.
    fn task(
        &self,
        site: &str,
        kind: pb::TaskKind,
        (round, attempt): (u32, u32),
        model_id: &str,
        strategy_json: &str,
        deadline_ms: i64,
    ) -> pb::Task {
        pb::Task {
            task_id: new_task_id(),
            kind: kind as i32,
            job_id: self.id.to_string(),
            round,
            attempt,
            job_spec_toml: self.spec_toml.to_string(),
            job_digest: self.digest_hex.to_string(),
            global_model_id: model_id.to_string(),
            strategy_config_json: strategy_json.to_string(),
            deadline_unix_ms: deadline_ms,
            approvals: self.approvals.for_site(site),
            submitted_by: self.submitted_by.to_string(),
            secagg_participants: Vec::new(),
        }
    }
}

/// Metrics of a completed round, for the operator.
pub fn mean_eval_accuracy(metrics: &[SiteMetrics]) -> f64 {
    let n: u64 = metrics.iter().map(|m| m.eval_samples).sum();
    if n == 0 {
        return f64::NAN;
    }
    metrics
        .iter()
        .map(|m| m.eval_accuracy * m.eval_samples as f64)
        .sum::<f64>()
        / n as f64
}

/// The `job.proposed` payload of `spec` (at submission and at every amendment). A statistics
/// job has no model and no rounds (`base_model` empty, `rounds` 0); its `privacy` is its own
/// `[privacy]` (ε per site's release, δ, accountant).
fn proposal(
    spec: &SubmittedSpec,
    digest: &tutela_protocol::job::SpecDigest,
    submitter: Option<&str>,
    approvers: Option<std::collections::BTreeMap<String, Vec<String>>>,
) -> payload::JobProposed {
    let spec = match spec {
        SubmittedSpec::Training(spec) => spec,
        SubmittedSpec::Statistics(spec) => {
            return payload::JobProposed {
                spec_digest: digest.to_hex(),
                code_version: crate::audit_trail::code_version(),
                base_model: String::new(),
                name: spec.name.clone(),
                operator: submitter.map(str::to_string),
                participants: spec.sites.clone(),
                approvers,
                rounds: 0,
                privacy: serde_json::to_value(&spec.privacy).unwrap_or_default(),
                tokenizer_sha256: None,
                base_sha256: None,
                lora: None,
            };
        }
    };
    payload::JobProposed {
        spec_digest: digest.to_hex(),
        code_version: crate::audit_trail::code_version(),
        base_model: spec.model.name.clone(),
        name: spec.name.clone(),
        operator: submitter.map(str::to_string),
        participants: spec.sites.clone(),
        approvers,
        rounds: spec.rounds,
        privacy: serde_json::to_value(&spec.privacy).unwrap_or_default(),
        tokenizer_sha256: spec.model.tokenizer_sha256.clone(),
        base_sha256: spec.model.base_sha256.clone(),
        lora: spec
            .lora
            .as_ref()
            .and_then(|l| serde_json::to_value(l).ok()),
    }
}
