//! The sessions with the coordinator and the worker that runs tasks one at a time.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tch::Device;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::Instrument;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::Identity;
use tutela_protocol::pb;
use tutela_protocol::pb::federation_client::FederationClient;
use tutela_protocol::server::MAX_MESSAGE_BYTES;

use tutela_privacy::at_rest::KeyEncryptionKey;

use super::Backoff;
use super::filter::UpdateFilter;
use super::gate::{Admitted, Refusal, TaskGate, Work};
use super::round::{RoundInput, RoundResult};
use super::transfer::{fetch_model, upload};
use super::{ANSWERED_MEMORY, NODE_VERSION, now_ms};
use crate::config::{NodeConfig, TestingConfig};
use crate::failure::{FailureCode, SiteFailure};
use crate::resend::ReleasedUpdate;
use crate::site_audit::SiteAudit;

/// Manifest metadata keys of a task's result (shared with the coordinator).
use super::meta;

/// What the worker and the sessions share.
pub(super) struct Shared {
    pub(super) site: String,
    pub(super) device: Device,
    pub(super) models_dir: PathBuf,
    pub(super) kek: Option<Arc<dyn KeyEncryptionKey>>,
    pub(super) gate: TaskGate,
    pub(super) audit: Option<Arc<SiteAudit>>,
    pub(super) filters: Vec<Arc<dyn UpdateFilter>>,
    pub(super) testing: TestingConfig,
    /// The node's key and certificate for secure aggregation's signatures; `None` when its key
    /// cannot sign (a secure task is then declined, naming why).
    pub(super) secagg_identity: Option<Arc<super::secagg::SecAggIdentity>>,
    /// The client of the latest session; the worker uses it for FetchModel, SubmitUpdate and
    /// DeclineTask. tonic's channel reconnects by itself, and a new session replaces it.
    pub(super) client: Mutex<Option<FederationClient<Channel>>>,
    /// Task ids already answered, oldest first.
    pub(super) answered: Mutex<VecDeque<String>>,
    pub(super) metrics: Arc<crate::node_metrics::NodeMetrics>,
}

impl Shared {
    pub(super) fn client(&self) -> Option<FederationClient<Channel>> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn was_answered(&self, task_id: &str) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|t| t == task_id)
    }

    fn mark_answered(&self, task_id: &str) {
        let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        if answered.len() >= ANSWERED_MEMORY {
            answered.pop_front();
        }
        answered.push_back(task_id.to_string());
    }
}

/// One connection's worth of the agent loop.
pub(super) struct Session<'a> {
    pub(super) config: &'a NodeConfig,
    pub(super) coordinator: &'a Identity,
    pub(super) device_name: &'static str,
    pub(super) shared: &'a Arc<Shared>,
    pub(super) tasks: &'a mpsc::Sender<pb::Task>,
}

impl Session<'_> {
    /// Connects to the coordinator at `address`, announces the node and forwards tasks until
    /// the stream ends or breaks; returns why it ended.
    pub(super) async fn run(&self, address: &str, backoff: &mut Backoff) -> String {
        // Re-read on every session: a renewed certificate or a new CRL applies at the next
        // reconnect without a restart.
        let tls = match ClientTls::load(&self.config.tls, Some(self.coordinator.clone())) {
            Ok(t) => t,
            Err(e) => return format!("loading the TLS files: {e}"),
        };
        let channel = match client::connect_lazy(address, tls) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        let mut client = FederationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        *self.shared.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        tracing::info!(coordinator = %address, "connecting");
        let mut readiness = self.shared.gate.tables().subscribe();
        readiness.borrow_and_update();
        let mut announced = self.shared.gate.dataset_names();
        let mut stream = match client.connect(self.connect_request(&announced)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return describe_status("Connect", &status),
        };
        backoff.reset();
        tracing::info!(coordinator = %address, "connected; waiting for tasks");
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                Ok(()) = readiness.changed() => {
                    let datasets = self.shared.gate.dataset_names();
                    if datasets == announced {
                        continue;
                    }
                    // The announcement is `Connect` itself: a new stream with the new names
                    // replaces the old one at the coordinator, which then ends the old stream
                    // after the tasks it holds; those are still forwarded (make before break).
                    match client.connect(self.connect_request(&datasets)).await {
                        Ok(r) => {
                            let old = std::mem::replace(&mut stream, r.into_inner());
                            tokio::spawn(forward_rest(old, self.tasks.clone()));
                            let withdrawn: Vec<&String> =
                                announced.iter().filter(|d| !datasets.contains(d)).collect();
                            tracing::info!(
                                ?datasets,
                                ?withdrawn,
                                "announced the datasets ready now to the coordinator"
                            );
                            announced = datasets;
                        }
                        Err(status) => {
                            return describe_status("Connect (announcing datasets)", &status);
                        }
                    }
                    continue;
                }
            };
            match message {
                Ok(Some(task)) => {
                    if !self.forward(task).await {
                        return "the task worker stopped".into();
                    }
                }
                Ok(None) => return "the coordinator ended the task stream".into(),
                Err(status) => return describe_status("the task stream", &status),
            }
        }
    }

    fn connect_request(&self, datasets: &[String]) -> pb::ConnectRequest {
        pb::ConnectRequest {
            datasets: datasets.to_vec(),
            node_version: NODE_VERSION.to_string(),
            device: self.device_name.to_string(),
        }
    }

    /// Hands a task to the worker; false if the worker is gone.
    async fn forward(&self, task: pb::Task) -> bool {
        log_received(&task);
        self.tasks.send(task).await.is_ok()
    }
}

fn log_received(task: &pb::Task) {
    tracing::info!(
        task = %task.task_id,
        job = %task.job_id,
        round = task.round,
        attempt = task.attempt,
        kind = ?pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified),
        "task received"
    );
}

/// The tasks a replaced task stream still delivers before the coordinator ends it.
async fn forward_rest(mut stream: tonic::Streaming<pb::Task>, tasks: mpsc::Sender<pb::Task>) {
    while let Ok(Some(task)) = stream.message().await {
        log_received(&task);
        if tasks.send(task).await.is_err() {
            return;
        }
    }
}

pub(super) fn describe_status(what: &str, status: &tonic::Status) -> String {
    format!("{what}: {:?}: {}", status.code(), status.message())
}

/// How a task ended, for the log.
pub(super) enum Done {
    Uploaded(pb::UpdateReceipt),
    Declined(SiteFailure),
    Skipped(String),
    Stalled,
    /// A job check answered, with this many refusals.
    Checked(usize),
    /// A statistics job's release accepted by the coordinator.
    StatisticsReleased,
}

/// Why a task failed.
pub(super) enum Failure {
    /// The node cannot do it: the coordinator is told the failure's wire reason (a code, a
    /// column), the site's log gets the detail.
    Decline(SiteFailure),
    /// An exchange with the coordinator failed or was refused; the coordinator knows, or will
    /// re-send. Only logged.
    Coordinator(String),
}

/// Takes tasks one at a time. Each runs in its own tokio task, so that even a panic ends only
/// that task (and is declined), never the worker.
pub(super) async fn worker(shared: Arc<Shared>, mut rx: mpsc::Receiver<pb::Task>) {
    while let Some(task) = rx.recv().await {
        if shared.was_answered(&task.task_id) {
            tracing::info!(task = %task.task_id, "task already answered; ignoring the repeat");
            continue;
        }
        let span = tracing::info_span!(
            "task",
            id = %task.task_id,
            job = %task.job_id,
            round = task.round,
            attempt = task.attempt
        );
        let mut handle = AbortOnDrop(tokio::spawn(
            handle_task(shared.clone(), task.clone()).instrument(span.clone()),
        ));
        let result = match (&mut handle.0).await {
            Ok(r) => r,
            Err(e) => Err(Failure::Decline(SiteFailure::new(
                FailureCode::Internal,
                format!("internal error in the node: {e}"),
            ))),
        };
        async {
            match result {
                Ok(Done::Uploaded(receipt)) => {
                    shared.mark_answered(&task.task_id);
                    shared.metrics.update_accepted();
                    tracing::info!(update = %receipt.update_digest, "update accepted by the coordinator");
                }
                Ok(Done::Declined(failure)) => {
                    shared.mark_answered(&task.task_id);
                    shared.metrics.task_declined(failure.code());
                    tracing::warn!(reason = %failure, "task declined");
                }
                Ok(Done::Skipped(reason)) => tracing::warn!(%reason, "task skipped"),
                Ok(Done::StatisticsReleased) => {
                    shared.mark_answered(&task.task_id);
                    tracing::info!("statistics accepted by the coordinator");
                }
                Ok(Done::Checked(refusals)) => {
                    shared.mark_answered(&task.task_id);
                    tracing::info!(refusals, "job check answered");
                }
                Ok(Done::Stalled) => tracing::warn!("testing.stall_after_fetch: stalling; the task is left unanswered"),
                Err(Failure::Coordinator(why)) => tracing::warn!(error = %why, "task failed at the coordinator"),
                Err(Failure::Decline(failure)) => {
                    match decline(&shared, &task.task_id, &failure).await {
                        Ok(()) => {
                            shared.mark_answered(&task.task_id);
                            shared.metrics.task_declined(failure.code());
                            tracing::warn!(reason = %failure, "task declined");
                        }
                        Err(e) => tracing::warn!(reason = %failure, error = %e, "task failed, and declining it failed too"),
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }
}

/// A failure inside the node itself (a panicked or cancelled blocking task): code only.
pub(super) fn internal(detail: String) -> Failure {
    Failure::Decline(SiteFailure::new(FailureCode::Internal, detail))
}

/// Aborts a task's handling when the worker is aborted (at shutdown): its RPCs stop with it.
/// (A training step already on a blocking thread runs to its end, and its result is dropped.)
struct AbortOnDrop(tokio::task::JoinHandle<Result<Done, Failure>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells the coordinator that the node will not do `task_id`: only the failure's wire reason
/// leaves the site (see [`crate::failure`]).
async fn decline(shared: &Shared, task_id: &str, failure: &SiteFailure) -> Result<(), String> {
    let mut client = shared.client().ok_or("not connected")?;
    client
        .decline_task(pb::DeclineTaskRequest {
            task_id: task_id.to_string(),
            reason: failure.wire_reason(),
        })
        .await
        .map(|_| ())
        .map_err(|s| describe_status("DeclineTask", &s))
}

async fn handle_task(shared: Arc<Shared>, task: pb::Task) -> Result<Done, Failure> {
    if task.kind == pb::TaskKind::Check as i32 {
        return answer_check(&shared, &task).await;
    }
    if task.kind == pb::TaskKind::Statistics as i32 {
        return super::statistics::release(&shared, &task).await;
    }
    // Approved first: a job this site's officers did not sign never makes it fetch a base.
    let approved = match shared.gate.approve(&task) {
        Ok(a) => a,
        Err(refusal) => return refused(&shared, &task, refusal).await,
    };
    super::base_fetch::fetch_missing_base(&shared, &task, approved.job()).await?;
    let admitted = match shared.gate.admit(&task, approved) {
        Ok(a) => a,
        Err(refusal) => return refused(&shared, &task, refusal).await,
    };
    match admitted.work {
        Work::Initialize => initialize(&shared, &task, admitted).await,
        Work::Train => train(&shared, &task, admitted).await,
        Work::Resend => resend(&shared, &task, admitted).await,
    }
}

/// A task the gate refused: declined with the refusal's wire reason, or skipped when the
/// coordinator has closed it already.
pub(super) async fn refused(
    shared: &Shared,
    task: &pb::Task,
    refusal: Refusal,
) -> Result<Done, Failure> {
    if !refusal.is_reported() {
        return Ok(Done::Skipped(refusal.to_string()));
    }
    let failure = SiteFailure::from(&refusal);
    // A source gone since the start: withdrawn until a re-check passes, as for a failed read.
    if let Refusal::SourceUnreadable { dataset } = &refusal {
        shared.gate.tables().mark_unreadable(dataset);
    }
    match decline(shared, &task.task_id, &failure).await {
        Ok(()) => Ok(Done::Declined(failure)),
        Err(e) => Err(Failure::Coordinator(format!("declining ({failure}): {e}"))),
    }
}

/// A CHECK task: the gate's findings, all of them, without reading data or spending anything.
async fn answer_check(shared: &Shared, task: &pb::Task) -> Result<Done, Failure> {
    let refusals = shared.gate.check_job(task);
    for r in &refusals {
        tracing::info!(code = %r.code, reason = %r.reason, "job check: this site would refuse");
    }
    let count = refusals.len();
    let mut client = shared
        .client()
        .ok_or_else(|| Failure::Coordinator("answering a job check: not connected".into()))?;
    client
        .answer_check(pb::CheckAnswer {
            task_id: task.task_id.clone(),
            refusals,
        })
        .await
        .map_err(|s| Failure::Coordinator(describe_status("AnswerCheck", &s)))?;
    Ok(Done::Checked(count))
}

async fn initialize(shared: &Shared, task: &pb::Task, admitted: Admitted) -> Result<Done, Failure> {
    let device = shared.device;
    tracing::info!(
        model = admitted.job.model_name().unwrap_or_default(),
        seed = admitted.job.seed,
        "building the job's initial model"
    );
    let weights =
        tokio::task::spawn_blocking(move || admitted.round.initial_weights(&admitted.job, device))
            .await
            .map_err(|e| internal(format!("internal error building the model: {e}")))?
            .map_err(|e| Failure::Decline(SiteFailure::from(&e)))?;
    let metadata = BTreeMap::from([(meta::TASK.to_string(), task.task_id.clone())]);
    let receipt = upload(shared, weights, metadata).await?;
    Ok(Done::Uploaded(receipt))
}

async fn train(shared: &Shared, task: &pb::Task, admitted: Admitted) -> Result<Done, Failure> {
    if let Some(audit) = &shared.audit {
        record_in_audit_trail(shared, audit, task, &admitted).await?;
    }
    let model_path = fetch_model(shared, task).await?;
    if shared.testing.stall_after_fetch {
        return Ok(Done::Stalled);
    }
    // Secure aggregation's key phases run before the training (the coordinator closes them
    // within a quarter of the round's window); the session masks the update afterwards.
    let trained = admitted
        .round
        .trained_parameters(&admitted.job)
        .map_err(|e| Failure::Decline(SiteFailure::from(&e)))?;
    let secure = super::secagg::open(shared, task, trained as u64).await?;
    let site = shared.site.clone();
    let device = shared.device;
    let (round, attempt) = (task.round, task.attempt);
    let kek = shared.kek.clone();
    let dataset_name = admitted.round.dataset_name().to_string();
    let privacy_spec = admitted.job.privacy.clone();
    let ledgers = admitted.ledgers.clone();
    let result = tokio::task::spawn_blocking(move || {
        let input = RoundInput {
            global_path: &model_path,
            kek: kek.as_deref(),
            device,
            round,
            attempt,
            site: &site,
        };
        admitted.round.run(&admitted, input)
    })
    .await
    .map_err(|e| internal(format!("internal error in local training: {e}")))?
    .map_err(|e| {
        let failure = SiteFailure::from(&e);
        // Its source failed (a database gone down before the table was first read): withdrawn
        // until a re-check passes, so the coordinator stops sampling this site for it.
        if failure.code() == FailureCode::DataUnreadable {
            shared.gate.tables().mark_unreadable(&dataset_name);
        }
        Failure::Decline(failure)
    })?;
    tracing::info!(
        eval_loss = result.eval.loss,
        eval_accuracy = result.eval.accuracy,
        eval_samples = result.eval.n,
        train_loss = result.train_loss,
        train_seconds = result.train_seconds,
        train_samples = result.train_samples,
        "local round done"
    );
    shared.metrics.round_trained(result.train_seconds);
    // Kept at once: if the spend cannot be recorded now, or the coordinator dies before it
    // answers, the round it asks for again is answered with this same update (see
    // [`crate::resend`]), once its spend is in the trail.
    let mut released_metadata = round_metadata(task, &result);
    if let Some(spec) = privacy_spec
        .as_ref()
        .filter(|p| super::metrics::withholds_exact_metrics(p.mode))
    {
        super::metrics::release_under_dp(&mut released_metadata, &result, spec)
            .map_err(|e| internal(format!("internal error releasing the round's metrics: {e}")))?;
    }
    shared.gate.resends().keep(ReleasedUpdate {
        job_id: task.job_id.clone(),
        round,
        global_model_id: task.global_model_id.clone(),
        update: result.delta.clone(),
        metadata: released_metadata.clone(),
        charge: result
            .privacy
            .as_ref()
            .and_then(|p| p.charge.as_ref())
            .map(|c| (c.round, c.attempt)),
    });
    // The spend is in the trail before anything of the round leaves the site.
    if let (Some(audit), Some(ledgers), Some(spend)) = (&shared.audit, &ledgers, &result.privacy)
        && let Some(charge) = &spend.charge
    {
        let accountant = crate::ledger::accountant(
            privacy_spec
                .as_ref()
                .map(|p| p.accountant)
                .unwrap_or_default(),
        );
        crate::spend_anchor::anchor_charge(
            audit,
            ledgers,
            (&shared.site, &dataset_name, &task.job_id),
            charge,
            (spend.delta, accountant),
        )
        .await
        .map_err(|why| Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, why)))?;
    }
    if let Some(ledgers) = &ledgers {
        shared.metrics.refresh_budget(ledgers, &dataset_name);
    }
    let mut update = result.delta;
    super::filter::filter_update(shared, &mut update)?;
    if task.deadline_unix_ms > 0 && now_ms() > task.deadline_unix_ms {
        return Ok(Done::Skipped(
            "training ended after the task's deadline; the update would be refused as late".into(),
        ));
    }
    let metadata = released_metadata;
    let receipt = match secure {
        Some(session) => session.masked_upload(shared, update, metadata).await?,
        None => upload(shared, update, metadata).await?,
    };
    Ok(Done::Uploaded(receipt))
}

/// The manifest metadata of a round's update: the task, samples, metrics, dataset commitment
/// and the round's ε.
fn round_metadata(task: &pb::Task, result: &RoundResult) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::from([
        (meta::TASK.to_string(), task.task_id.clone()),
        (meta::SAMPLES.to_string(), result.train_samples.to_string()),
        (meta::TRAIN_LOSS.to_string(), result.train_loss.to_string()),
        (
            meta::TRAIN_SECONDS.to_string(),
            result.train_seconds.to_string(),
        ),
        (meta::EVAL_LOSS.to_string(), result.eval.loss.to_string()),
        (
            meta::EVAL_ACCURACY.to_string(),
            result.eval.accuracy.to_string(),
        ),
        (meta::EVAL_SAMPLES.to_string(), result.eval.n.to_string()),
    ]);
    if let Some(p) = result.eval_perplexity {
        metadata.insert(meta::EVAL_PERPLEXITY.to_string(), p.to_string());
    }
    if let Some(c) = &result.dataset_commitment {
        metadata.insert(meta::DATASET_COMMITMENT.to_string(), c.clone());
    }
    if let Some(d) = &result.deid_config_sha256 {
        metadata.insert(meta::DEID_CONFIG.to_string(), d.clone());
    }
    if let Some(p) = &result.privacy {
        metadata.insert(
            meta::DP_ROUND_EPSILON.to_string(),
            p.round_epsilon.to_string(),
        );
        metadata.insert(meta::DP_JOB_EPSILON.to_string(), p.job_epsilon.to_string());
        metadata.insert(meta::DP_DELTA.to_string(), p.delta.to_string());
    }
    if let Some(n) = &result.dp_noise {
        metadata.insert(
            meta::DP_NOISE_MULTIPLIER.to_string(),
            n.noise_multiplier.to_string(),
        );
        metadata.insert(
            meta::DP_EXPECTED_BATCH.to_string(),
            n.expected_batch.to_string(),
        );
    }
    if let Some(class) = result.single_class_predicted {
        metadata.insert(meta::SINGLE_CLASS_PREDICTED.to_string(), class.to_string());
    }
    metadata
}

/// Sends again the update this node released for the task's round (see [`crate::resend`]): no
/// data is read, nothing is trained, no ε is charged.
async fn resend(shared: &Shared, task: &pb::Task, admitted: Admitted) -> Result<Done, Failure> {
    // Its spend is in the trail first (recorded now if that failed when it was trained).
    if let (Some(audit), Some(ledgers)) = (&shared.audit, &admitted.ledgers) {
        audit
            .watch()
            .await
            .map_err(|e| Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, e)))?;
        crate::spend_anchor::reconcile(audit, ledgers, &shared.site, admitted.round.dataset_name())
            .await
            .map_err(|why| {
                Failure::Decline(SiteFailure::new(FailureCode::PrivacyLedgerUnusable, why))
            })?;
    }
    let Some(released) = shared
        .gate
        .resends()
        .get(&task.job_id, task.round, &task.global_model_id)
    else {
        return Err(Failure::Decline(SiteFailure::new(
            FailureCode::TaskInvalid,
            "the update of this round is no longer kept; the task can be sent again",
        )));
    };
    // Sent again only while its spend is durable (in the ledger, and in the trail when the node
    // keeps one): a ledger deleted while the trail was down must not let it out unrecorded.
    if let Some(ledgers) = &admitted.ledgers {
        let ledger = ledgers.open(admitted.round.dataset_name()).map_err(|e| {
            Failure::Decline(SiteFailure::new(FailureCode::PrivacyLedgerUnusable, e))
        })?;
        if let Err(why) =
            crate::resend::check_spend_durable(&released, &ledger, shared.audit.is_some())
        {
            shared
                .gate
                .resends()
                .forget(&task.job_id, task.round, &task.global_model_id);
            return Err(Failure::Decline(SiteFailure::new(
                FailureCode::PrivacyLedgerUnusable,
                why,
            )));
        }
    }
    tracing::info!(
        round = task.round,
        attempt = task.attempt,
        "this round's update was released already: sending it again, without training or \
         charging ε again"
    );
    let mut update = released.update;
    super::filter::filter_update(shared, &mut update)?;
    let mut metadata = released.metadata;
    metadata.insert(meta::TASK.to_string(), task.task_id.clone());
    // A secure round is re-run from its first phase: this attempt's configuration, fresh keys
    // and fresh masks (never the earlier attempt's masks on another survivor set).
    let distributed = admitted
        .job
        .privacy
        .as_ref()
        .is_some_and(|p| p.mode == tutela_protocol::job::PrivacyMode::Distributed);
    if distributed {
        // Its noise is drawn at encoding: a second encoding of the same update is a second
        // release, which the job's plan did not count.
        return Err(Failure::Decline(SiteFailure::with_public_note(
            FailureCode::TaskInvalid,
            "distributed DP: this round's update was released already; sending it again with \
             fresh noise would spend privacy the plan did not count",
        )));
    }
    let parameters: u64 = update
        .iter()
        .map(|(spec, _)| spec.numel().unwrap_or(0))
        .sum();
    let receipt = match super::secagg::open(shared, task, parameters).await? {
        Some(session) => session.masked_upload(shared, update, metadata).await?,
        None => upload(shared, update, metadata).await?,
    };
    Ok(Done::Uploaded(receipt))
}

/// Before training: the trail's history is still the one this site saw, and the dataset's
/// de-identification report is in it (the dataset is read here, the first time, so that the report
/// exists; see [`crate::site_audit`]).
async fn record_in_audit_trail(
    shared: &Shared,
    audit: &Arc<SiteAudit>,
    task: &pb::Task,
    admitted: &Admitted,
) -> Result<(), Failure> {
    // The trail's errors may name the node's files (its pinned checkpoint): code only.
    let audit_failure = |e: &dyn std::fmt::Display| {
        Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, e))
    };
    audit.watch().await.map_err(|e| audit_failure(&e))?;
    let round = admitted.round.clone();
    let (site, job_id) = (shared.site.clone(), task.job_id.clone());
    let deidentification =
        tokio::task::spawn_blocking(move || round.deidentification(&site, &job_id))
            .await
            .map_err(|e| internal(format!("internal error reading the dataset: {e}")))?
            .map_err(|e| Failure::Decline(SiteFailure::from(&e)))?;
    let recorded = match &deidentification {
        Some(d) => audit
            .record_deidentification(&shared.site, d)
            .await
            .map_err(|e| audit_failure(&e))?,
        None => false,
    };
    if let Some(ledgers) = &admitted.ledgers {
        crate::spend_anchor::reconcile(audit, ledgers, &shared.site, admitted.round.dataset_name())
            .await
            .map_err(|why| {
                Failure::Decline(SiteFailure::new(FailureCode::PrivacyLedgerUnusable, why))
            })?;
    }
    if recorded {
        // The checkpoint that covers the new event, when the log has signed one already.
        audit.watch().await.map_err(|e| audit_failure(&e))?;
    }
    Ok(())
}
