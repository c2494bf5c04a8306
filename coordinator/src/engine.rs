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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::seq::IndexedRandom;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tutela_audit::payload;
use tutela_protocol::initial_model::InitialModel;
use tutela_protocol::pb;
use tutela_protocol::stream;

use crate::aggregate::{AggregateError, AggregatorOptions, RoundAggregator};
use crate::job::{JobId, JobSpec, JobState};
use crate::nodes::NodeRegistry;
use crate::store::{AcceptedUpdate, RefusedUpdate, RoundRecord, Store};
use crate::strategy::{Strategy, StrategyConfig};
use crate::tasks::{Destination, Outcome, SiteMetrics, TaskGroup, TaskTable};

/// How long a round waits between checks while it has too few sites.
const SITE_WAIT_POLL: Duration = Duration::from_millis(250);

pub struct Engine {
    pub store: Store,
    pub nodes: Arc<NodeRegistry>,
    pub tasks: Arc<TaskTable>,
    pub model_dir: PathBuf,
    /// Strategy state (server optimizer moments) per job and round.
    pub state_dir: PathBuf,
    /// Spool files of the uploads' exact undo, kept between rounds (in `state_dir`).
    spool_pool: Arc<crate::aggregate::SpoolPool>,
    /// Bumped whenever a job changes, for `WatchJob`.
    changes: Mutex<HashMap<String, watch::Sender<u64>>>,
    cancels: Mutex<HashMap<String, CancellationToken>>,
    /// Set when the coordinator runs with a `[policy]`: jobs then wait in `proposed` until their
    /// approval quorum is met. Unset: jobs start when submitted.
    pub approvals: std::sync::OnceLock<Arc<crate::approvals::ApprovalGate>>,
    /// The audit trail (set once by `serve`; unset: a disabled trail that only logs).
    pub audit: std::sync::OnceLock<Arc<crate::audit_trail::AuditTrail>>,
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
}

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
        Ok(Arc::new(Engine {
            store,
            nodes: Arc::new(NodeRegistry::default()),
            tasks: Arc::new(TaskTable::default()),
            model_dir,
            spool_pool: crate::aggregate::SpoolPool::new(Some(state_dir.clone())),
            state_dir,
            changes: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            approvals: std::sync::OnceLock::new(),
            audit: std::sync::OnceLock::new(),
        }))
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
        let sites = job.spec().map(|s| s.sites).unwrap_or_default();
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
        let spec = JobSpec::from_toml_str(spec_toml)?;
        StrategyConfig::from_spec(spec.strategy.as_ref())
            .map_err(|e| EngineError::Strategy(e.to_string()))?;
        let digest = spec.digest();
        let id = self.store.create_job(spec_toml, &spec, &digest).await?;
        if let Some(who) = submitter {
            self.store.record_submitter(&id, who).await?;
        }
        // Fail closed: a job the audit trail does not know of is withdrawn before it can start.
        let proposed = self
            .trail()
            .record_payload(id.as_str(), &proposal(&spec, &digest, submitter))
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
            self.store
                .set_job_state(id, JobState::Proposed, JobState::Running, None)
                .await?;
            tracing::info!(job = %id, "approval quorum met: job starts");
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
        let spec = JobSpec::from_toml_str(spec_toml)?;
        StrategyConfig::from_spec(spec.strategy.as_ref())
            .map_err(|e| EngineError::Strategy(e.to_string()))?;
        let submitter = self.store.submitter(id).await?;
        self.trail()
            .record_payload(
                id.as_str(),
                &proposal(&spec, &spec.digest(), submitter.as_deref()),
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
                Ok(()) => tracing::info!(job = %job, "job completed"),
                Err(EngineError::Cancelled) => tracing::info!(job = %job, "job cancelled"),
                Err(e) => {
                    tracing::error!(job = %job, error = %e, "job failed");
                    let reason = e.to_string();
                    if let Err(e2) = this
                        .store
                        .set_job_state(&job, JobState::Running, JobState::Failed, Some(&reason))
                        .await
                    {
                        tracing::error!(job = %job, error = %e2, "could not record the failure");
                    }
                    this.trail()
                        .note_payload_durably(
                            job.as_str(),
                            &payload::JobFailed {
                                state: "failed".into(),
                                reason,
                            },
                        )
                        .await;
                }
            }
            this.changed(&job);
        });
    }

    async fn run_job(self: &Arc<Self>, job_id: &JobId) -> Result<(), EngineError> {
        let job = self.get_job(job_id).await?;
        let spec = JobSpec::from_toml_str(&job.spec_toml)?;
        let digest_hex = job.spec_digest.to_hex();
        // The approvals that count go with every task, for the nodes to verify themselves.
        let approvals = match self.standing(&job).await? {
            Some(s) => s.counting,
            None => Vec::new(),
        };
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
                Some(m) => (job.current_round, m),
                None => {
                    let m = self.initial_model(&ctx).await?;
                    self.store.set_initial_model(job_id, &m).await?;
                    self.changed(job_id);
                    (0, m)
                }
            };
        if round > 0 {
            self.load_strategy_state(job_id, round, strategy.as_mut())?;
            self.record_committed_rounds(job_id).await?;
        }
        // Central DP (DP-FedAvg): its accountant spans the job's rounds; built on the first
        // round, when the model's size is known.
        let mut central: Option<crate::central_dp::CentralDp> = None;

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
                        &mut central,
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
        // Recorded before the job is marked completed, and looked for first: a coordinator that
        // stopped in between resumes the job here and records each once.
        let trail = self.trail();
        trail
            .record_payload_once(
                job_id.as_str(),
                &payload::JobCompleted {
                    model_digest: model_id.clone(),
                    rounds: spec.rounds,
                    epsilon,
                },
                true,
                |_| true,
            )
            .await;
        trail
            .record_payload_once(
                &model_id,
                &payload::ModelPublished {
                    job: job_id.as_str().to_string(),
                    model_digest: model_id.clone(),
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
        self.store
            .set_job_state(job_id, JobState::Running, JobState::Completed, None)
            .await?;
        tracing::info!(job = %job_id, model = %model_id, path = %self.model_path(&model_id).display(), "final model published");
        Ok(())
    }

    /// Waits for sites: until every site the job lists is connected, or — once at least `need` are
    /// — until a grace period (a quarter of the round's window) has passed, or until `deadline`.
    /// The grace period keeps a round from starting with the first `need` sites when the others
    /// are seconds away (nodes reconnecting after a coordinator restart, say).
    async fn wait_for_sites(&self, spec: &JobSpec, need: usize, deadline: Instant) -> Vec<String> {
        let mut changes = self.nodes.subscribe();
        let window = Duration::from_secs(spec.round_deadline_secs);
        let grace_until = Instant::now() + window / 4;
        let want_all = if spec.sites.is_empty() {
            need
        } else {
            spec.sites.len()
        };
        loop {
            let sites = self.nodes.eligible(&spec.data.schema, &spec.sites);
            let now = Instant::now();
            if sites.len() >= want_all
                || (sites.len() >= need && now >= grace_until)
                || now >= deadline
            {
                return sites;
            }
            let _ = tokio::time::timeout(SITE_WAIT_POLL, changes.changed()).await;
        }
    }

    fn task(
        &self,
        job: &JobCtx<'_>,
        kind: pb::TaskKind,
        (round, attempt): (u32, u32),
        model_id: &str,
        strategy_json: &str,
        deadline_ms: i64,
    ) -> pb::Task {
        pb::Task {
            task_id: new_task_id(),
            kind: kind as i32,
            job_id: job.id.to_string(),
            round,
            attempt,
            job_spec_toml: job.spec_toml.to_string(),
            job_digest: job.digest_hex.to_string(),
            global_model_id: model_id.to_string(),
            strategy_config_json: strategy_json.to_string(),
            deadline_unix_ms: deadline_ms,
            approvals: job.approvals.to_vec(),
            submitted_by: job.submitted_by.to_string(),
        }
    }

    /// Asks one site for the job's initial weights, retrying with another site on failure.
    async fn initial_model(&self, job: &JobCtx<'_>) -> Result<String, EngineError> {
        let (job_id, spec) = (job.id, job.spec);
        let window = Duration::from_secs(spec.round_deadline_secs);
        // What the answer must be: the job's model as the registry describes it. A spec whose
        // model the registry cannot describe never gets an initial model.
        let expected =
            Arc::new(InitialModel::for_job(spec).map_err(|e| {
                EngineError::Failed(format!("no initial model: the job's model: {e}"))
            })?);
        let mut last_reason = String::new();
        for attempt in 1..=spec.max_round_retries + 1 {
            let deadline = Instant::now() + window;
            let sites = self.wait_for_sites(spec, 1, deadline).await;
            let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed ^ u64::from(attempt));
            let Some(site) = sites.choose(&mut rng).cloned() else {
                last_reason = format!(
                    "no site with data of schema {:?} connected within {}s",
                    spec.data.schema, spec.round_deadline_secs
                );
                continue;
            };
            let deadline_ms = now_ms() + window.as_millis() as i64;
            let task = self.task(
                job,
                pb::TaskKind::Initialize,
                (0, attempt),
                "",
                "{}",
                deadline_ms,
            );
            let group = Arc::new(TaskGroup::default());
            self.tasks.register(
                &task.task_id,
                &site,
                "",
                deadline,
                Destination::InitialModel {
                    model_dir: self.model_dir.clone(),
                    expected: expected.clone(),
                },
                group.clone(),
            );
            let ids = vec![task.task_id.clone()];
            self.nodes.send(&site, task);
            self.wait_for_outcomes(&ids, &group, deadline).await;
            for (_, site, outcome) in self.tasks.close(&ids) {
                let reason = match outcome {
                    Some(Outcome::Accepted {
                        model_id: Some(m), ..
                    }) => {
                        tracing::info!(job = %job_id, %site, model = %m, "initial model received");
                        return Ok(m);
                    }
                    Some(Outcome::Refused { reason }) => reason,
                    Some(Outcome::Declined { reason }) => format!("declined: {reason}"),
                    _ => "sent no initial model by the deadline".to_string(),
                };
                last_reason = format!("site {site}: {reason}");
                self.note_refusals(job_id, (0, attempt), &[(site, reason)])
                    .await;
            }
        }
        Err(EngineError::Failed(format!(
            "no initial model: {last_reason}"
        )))
    }

    async fn wait_for_outcomes(&self, ids: &[String], group: &TaskGroup, deadline: Instant) {
        loop {
            let notified = group.notify.notified();
            if self.tasks.all_finished(ids) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    /// One attempt at a round. `Ok(Ok(model))`: completed and recorded. `Ok(Err(reason))`: the
    /// attempt failed (too few sites); the caller records it and retries.
    async fn run_round(
        &self,
        job: &JobCtx<'_>,
        (round, attempt): (u32, u32),
        model_id: &str,
        strategy: &mut dyn Strategy,
        central: &mut Option<crate::central_dp::CentralDp>,
    ) -> Result<Result<String, String>, EngineError> {
        let (job_id, spec) = (job.id, job.spec);
        let started = now_ms();
        let window = Duration::from_secs(spec.round_deadline_secs);
        let deadline = Instant::now() + window;
        let min = spec.min_sites as usize;
        let eligible = self.wait_for_sites(spec, min, deadline).await;
        if eligible.len() < min {
            return Ok(Err(format!(
                "only {} of the {} sites needed were connected with data of schema {:?}",
                eligible.len(),
                min,
                spec.data.schema
            )));
        }
        // Sample ceil(fraction × eligible) sites, at least min_sites, reproducibly.
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            spec.seed ^ (u64::from(round) << 32) ^ u64::from(attempt),
        );
        let k =
            ((spec.fraction * eligible.len() as f64).ceil() as usize).clamp(min, eligible.len());
        let mut participants: Vec<String> =
            eligible.choose_multiple(&mut rng, k).cloned().collect();
        participants.sort();

        let (manifest, global) = stream::load_model(&self.model_path(model_id))?;
        let mut options = AggregatorOptions::new(spec.update_norm_bound);
        // Uploads spool what they fold (for an exact undo) next to the models, on the
        // coordinator's disk rather than a possibly small tmpfs, in files kept between rounds.
        options.spool_pool = Some(self.spool_pool.clone());
        if central.is_none() {
            let dimension = manifest
                .tensors()
                .iter()
                .map(|t| t.numel().unwrap_or(0) as usize)
                .sum();
            *central = crate::central_dp::for_job(spec, dimension)
                .map_err(|e| EngineError::Failed(e.to_string()))?;
            if let Some(dp) = central.as_mut() {
                // A resumed job: the rounds already released count against its budget.
                dp.charge_completed_rounds(u64::from(round - 1));
            }
        }
        options.clip_updates_to = central.as_ref().map(|dp| dp.clip());
        if options.clip_updates_to.is_some() {
            // Every update weighs 1 under central DP: the finest fixed-point scale.
            options.max_weight = 1.0;
        }
        let aggregator = RoundAggregator::with_options(&manifest, options)
            .map_err(|e| EngineError::Failed(format!("round {round}: {e}")))?;
        let strategy_json = strategy.configure_round(round);
        let deadline_ms = started + window.as_millis() as i64;
        let group = Arc::new(TaskGroup::default());
        let mut ids = Vec::new();
        for site in &participants {
            let task = self.task(
                job,
                pb::TaskKind::Train,
                (round, attempt),
                model_id,
                &strategy_json,
                deadline_ms,
            );
            self.tasks.register(
                &task.task_id,
                site,
                model_id,
                deadline,
                Destination::Round {
                    aggregator: aggregator.clone(),
                },
                group.clone(),
            );
            ids.push(task.task_id.clone());
            if !self.nodes.send(site, task) {
                tracing::warn!(%site, round, "could not hand the task to the site's node; it may reconnect before the deadline");
            }
        }
        tracing::info!(job = %job_id, round, attempt, sites = ?participants, "round started");
        self.wait_for_outcomes(&ids, &group, deadline).await;
        // Streams still in progress at the deadline are cut off by closing their tasks; wait for
        // their sinks to be dropped so nothing touches the aggregate after this point.
        let outcomes = self.tasks.close(&ids);
        // Uploads cut off by the close notice it at their next chunk and drop their sinks, which
        // undoes what they folded in; the aggregate is final once no sink holds it.
        let mut waited = 0;
        while Arc::strong_count(&aggregator) > 1 && waited < 500 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 1;
        }

        let mut metrics = Vec::new();
        let mut refused = Vec::new();
        for (_, site, outcome) in outcomes {
            match outcome {
                Some(Outcome::Accepted { metrics: m, .. }) => metrics.push(m),
                Some(Outcome::Refused { reason }) => refused.push((site, reason)),
                Some(Outcome::Declined { reason }) => {
                    refused.push((site, format!("declined: {reason}")))
                }
                None => refused.push((site, "no update by the round's deadline".to_string())),
            }
        }
        // Recorded now, whatever becomes of the attempt: a refusal that makes the round fail
        // matters to a regulator as much as one the round survives.
        self.note_refusals(job_id, (round, attempt), &refused).await;
        let result = match aggregator.finish() {
            Ok(r) if r.accepted.len() >= min => r,
            Ok(r) => {
                return Ok(Err(format!(
                    "{} of the {} updates needed were accepted by the deadline ({})",
                    r.accepted.len(),
                    min,
                    describe_refusals(&refused)
                )));
            }
            Err(AggregateError::NothingAccepted) => {
                return Ok(Err(format!(
                    "no update was accepted by the deadline ({})",
                    describe_refusals(&refused)
                )));
            }
            // An upload that could not be taken back out, or one still holding the aggregate
            // after the wait: this attempt's aggregate cannot be trusted, so it is retried.
            Err(e) => return Ok(Err(format!("the round's aggregate is unusable: {e}"))),
        };

        // Central DP: noise on the sum of the clipped updates before the strategy sees it.
        let mut result = result;
        let central_round = match central.as_mut() {
            Some(dp) => Some(
                dp.release_round(&mut result)
                    .map_err(|e| EngineError::Failed(format!("round {round}: {e}")))?,
            ),
            None => None,
        };
        // The strategy turns the mean update into the next global model.
        let mut weights = decode_f32(&manifest, &global)?;
        strategy
            .apply(&mut weights, &result)
            .map_err(|e| EngineError::Strategy(e.to_string()))?;
        let bytes: Vec<Vec<u8>> = weights
            .iter()
            .map(|t| t.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let slices: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
        let (digest, _) = stream::store_model(&self.model_dir, &manifest, &slices)?;
        let new_model = hex::encode(digest);
        self.save_strategy_state(job_id, round, strategy)?;

        let accepted_sites: Vec<&str> = result.accepted.iter().map(|a| a.site.as_str()).collect();
        let record = RoundRecord {
            participants: participants.clone(),
            accepted: result
                .accepted
                .iter()
                .map(|a| AcceptedUpdate {
                    site: a.site.clone(),
                    digest: a.digest.clone(),
                    weight: a.weight,
                    norm: a.l2_norm,
                })
                .collect(),
            refused: refused
                .iter()
                .filter(|(s, _)| !accepted_sites.contains(&s.as_str()))
                .map(|(s, r)| RefusedUpdate {
                    site: s.clone(),
                    digest: None,
                    norm: None,
                    reason: r.clone(),
                })
                .collect(),
            site_metrics: metrics
                .iter()
                .map(|m| (m.site.clone(), serde_json::to_value(m).unwrap_or_default()))
                .collect(),
            global_model_digest: new_model.clone(),
            started_at: ms_to_time(started),
            completed_at: ms_to_time(now_ms()),
        };
        let mut record = record;
        if let Some(c) = &central_round {
            tracing::info!(job = %job_id, round, epsilon = c.job_epsilon, round_epsilon = c.round_epsilon, clip = c.clip, "central DP round released");
            record.site_metrics.insert(
                crate::central_dp::ROUND_RECORD_KEY.to_string(),
                serde_json::to_value(c).unwrap_or_default(),
            );
        }
        self.store
            .complete_round(job_id, round, attempt, &record)
            .await?;
        tracing::info!(job = %job_id, round, accepted = result.accepted.len(), model = %new_model, "round completed");
        self.trail()
            .note_payload_durably(
                job_id.as_str(),
                &round_completed_payload(round, attempt, &record),
            )
            .await;
        Ok(Ok(new_model))
    }

    /// Appends `round.completed` for every round the store has committed that the trail lacks (a
    /// coordinator stopped between a round's commit and its append), in order, each once; waits
    /// while the trail is down. Runs at resume, before the next round starts.
    async fn record_committed_rounds(&self, job_id: &JobId) -> Result<(), EngineError> {
        let trail = self.trail();
        let recorded = loop {
            match trail.recorded_rounds(job_id.as_str()).await {
                Ok(r) => break r,
                Err(crate::audit_trail::AuditTrailError::Client(e))
                    if !crate::audit_trail::is_outage(&e) =>
                {
                    tracing::error!(job = %job_id, error = %e, "the coordinator may not read its own events back (the policy must allow it `audit, read_own`): a round committed before the stop may be missing from the audit trail");
                    return Ok(());
                }
                Err(e) => {
                    tracing::error!(job = %job_id, error = %e, "the audit trail cannot be read: the job waits before resuming");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let Some(recorded) = recorded else {
            return Ok(());
        };
        for c in self.store.rounds(job_id).await? {
            if recorded.contains(&c.round) {
                continue;
            }
            tracing::warn!(job = %job_id, round = c.round, "round committed but not in the audit trail: recording it before the job goes on");
            let round = c.round;
            trail
                .record_payload_once(
                    job_id.as_str(),
                    &round_completed_payload(c.round, c.attempt, &c.record),
                    true,
                    move |e| crate::audit_trail::round_of(e) == Some(round),
                )
                .await;
        }
        Ok(())
    }

    /// Records each task that brought nothing to the job as `update.refused` (subject: the job):
    /// a node's refusal to train (`declined: ` and the node's reason: an approval missing, a site
    /// policy clause, the privacy budget), an update the coordinator refused, or no answer by the
    /// deadline. `round` 0 is the initial-model task. Noted, not recorded: the trail's outage
    /// must not stop a round (a failed append is logged at ERROR with the event).
    async fn note_refusals(
        &self,
        job_id: &JobId,
        (round, attempt): (u32, u32),
        refused: &[(String, String)],
    ) {
        if refused.is_empty() {
            return;
        }
        let trail = self.trail();
        for (site, reason) in refused {
            tracing::warn!(job = %job_id, round, attempt, %site, %reason, "task refused");
            trail
                .note_payload_durably(
                    job_id.as_str(),
                    &payload::UpdateRefused {
                        round,
                        attempt,
                        site: site.clone(),
                        reason: reason.clone(),
                    },
                )
                .await;
        }
    }

    fn state_path(&self, job: &JobId, round: u32) -> PathBuf {
        self.state_dir
            .join(format!("{job}-round-{round}.safetensors"))
    }

    fn save_strategy_state(
        &self,
        job: &JobId,
        round: u32,
        strategy: &dyn Strategy,
    ) -> Result<(), EngineError> {
        let state = strategy.state();
        if state.is_empty() {
            return Ok(());
        }
        let (specs, data): (Vec<_>, Vec<Vec<u8>>) = state.into_iter().unzip();
        let manifest = tutela_protocol::tensor::Manifest::new(specs, Default::default())
            .map_err(|e| EngineError::Strategy(e.to_string()))?;
        let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let (_, path) = stream::store_model(&self.state_dir, &manifest, &slices)?;
        std::fs::rename(&path, self.state_path(job, round))
            .map_err(|e| EngineError::Failed(format!("saving the strategy state: {e}")))?;
        Ok(())
    }

    fn load_strategy_state(
        &self,
        job: &JobId,
        round: u32,
        strategy: &mut dyn Strategy,
    ) -> Result<(), EngineError> {
        let path = self.state_path(job, round);
        if !path.exists() {
            return Ok(());
        }
        let (manifest, data) = stream::load_model(&path)?;
        let tensors = manifest.tensors().iter().cloned().zip(data).collect();
        strategy
            .load_state(tensors)
            .map_err(|e| EngineError::Strategy(e.to_string()))
    }
}

/// What every task of a job carries.
struct JobCtx<'a> {
    id: &'a JobId,
    spec: &'a JobSpec,
    spec_toml: &'a str,
    digest_hex: &'a str,
    approvals: &'a [pb::SignedApproval],
    submitted_by: &'a str,
}

fn describe_refusals(refused: &[(String, String)]) -> String {
    if refused.is_empty() {
        return "no site reported".to_string();
    }
    refused
        .iter()
        .map(|(s, r)| format!("{s}: {r}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The global model's tensors as f32 values (Tutela's models are float32).
fn decode_f32(
    manifest: &tutela_protocol::tensor::Manifest,
    data: &[Vec<u8>],
) -> Result<Vec<Vec<f32>>, EngineError> {
    manifest
        .tensors()
        .iter()
        .zip(data)
        .map(|(t, d)| {
            if t.dtype != tutela_protocol::tensor::DType::F32 {
                return Err(EngineError::Failed(format!(
                    "global model tensor {:?} is {}, only F32 models are aggregated",
                    t.name, t.dtype
                )));
            }
            Ok(d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        })
        .collect()
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

/// The `round.completed` payload of a committed round, from its stored record alone, so that a
/// round committed before a crash is recorded at resume exactly as it would have been.
fn round_completed_payload(
    round: u32,
    attempt: u32,
    record: &RoundRecord,
) -> payload::RoundCompleted {
    let update_digests = record
        .accepted
        .iter()
        .map(|a| (a.site.clone(), a.digest.to_string()))
        .collect();
    let participants = record.accepted.iter().map(|a| a.site.clone()).collect();
    let metrics = record
        .site_metrics
        .iter()
        .filter(|(site, _)| site.as_str() != crate::central_dp::ROUND_RECORD_KEY)
        .filter_map(|(site, m)| {
            let m: SiteMetrics = serde_json::from_value(m.clone()).ok()?;
            let v = payload::SiteRoundMetrics {
                epsilon: Some(m.dp_job_epsilon),
                round_epsilon: Some(m.dp_round_epsilon),
                delta: Some(m.dp_delta),
                dataset_commitment: Some(m.dataset_commitment),
                train_samples: Some(m.train_samples),
                eval_accuracy: Some(m.eval_accuracy),
            };
            Some((site.clone(), v))
        })
        .collect();
    payload::RoundCompleted {
        round,
        attempt,
        participants,
        update_digests,
        metrics,
        model_id: Some(record.global_model_digest.clone()),
    }
}

/// The `job.proposed` payload of `spec` (at submission and at every amendment).
fn proposal(
    spec: &JobSpec,
    digest: &tutela_protocol::job::SpecDigest,
    submitter: Option<&str>,
) -> payload::JobProposed {
    payload::JobProposed {
        spec_digest: digest.to_hex(),
        code_version: crate::audit_trail::code_version(),
        base_model: spec.model.name.clone(),
        name: spec.name.clone(),
        operator: submitter.map(str::to_string),
        participants: spec.sites.clone(),
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
