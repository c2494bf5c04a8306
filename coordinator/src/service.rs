//! The coordinator's gRPC services: `Federation` for site nodes and `Jobs` for operators. Thin
//! handlers: who is calling comes from the certificate ([`caller`]); the work is the engine's.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tutela_protocol::identity::{Principal, Role};
use tutela_protocol::pb;
use tutela_protocol::server::caller;
use tutela_protocol::stream::{self, SafetensorsFileSource, StreamError};

use crate::audit_trail::AuditTrailError;
use crate::base_models::{BaseModelStore, BaseModelStoreError};
use crate::engine::{Engine, EngineError};
use crate::job::{JobId, JobState};
use crate::tasks::{Outcome, RoutingSink};

mod models;
mod registry;
mod secagg;
mod statistics;
mod status;

pub use status::job_status;

pub use models::ModelStoreService;

pub use registry::RegistryService;

/// Refuses, at submission, a job whose model no site's registry has: otherwise it would be
/// proposed, signed by officers and started, only for every site to decline it. A spec that
/// does not parse is left to the engine, which says why.
fn refuse_unknown_model(spec_toml: &str) -> Result<(), Status> {
    if let Ok(spec) = tutela_protocol::job::JobSpec::from_toml_str(spec_toml)
        && !tutela_protocol::model_registry::is_known_model(&spec.model.name)
    {
        return Err(Status::invalid_argument(
            tutela_protocol::model_registry::unknown_model_message(&spec.model.name),
        ));
    }
    Ok(())
}

fn node_site<T>(request: &Request<T>) -> Result<String, Status> {
    match &caller(request)?.identity.principal {
        Principal::Node { site } => Ok(site.clone()),
        _ => Err(Status::permission_denied(format!(
            "{} is not a site node: only node certificates may take part in training",
            caller(request)?.identity
        ))),
    }
}

/// Until the policy issue brings casbin, the rule is by role: operators run jobs.
fn require_operator<T>(request: &Request<T>) -> Result<(), Status> {
    let c = caller(request)?;
    if c.identity.role() == Role::Operator {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{} may not manage jobs: only consortium operators may",
            c.identity
        )))
    }
}

/// Operators and site users may read job status; nodes learn of jobs through tasks.
fn require_reader<T>(request: &Request<T>) -> Result<(), Status> {
    let c = caller(request)?;
    match c.identity.role() {
        Role::Operator | Role::User => Ok(()),
        _ => Err(Status::permission_denied(format!(
            "{} may not read job status",
            c.identity
        ))),
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Spec(e) => Status::invalid_argument(e.to_string()),
            EngineError::Strategy(e) => Status::invalid_argument(e),
            EngineError::NotFound(_) => Status::not_found(e.to_string()),
            EngineError::Store(e) => Status::failed_precondition(e.to_string()),
            EngineError::Audit(_) => Status::unavailable(e.to_string()),
            EngineError::NotConfigured(e) => Status::failed_precondition(e),
            other => Status::internal(other.to_string()),
        }
    }
}

pub struct FederationService {
    pub engine: Arc<Engine>,
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;
type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::TensorFrame, Status>> + Send>>;

/// A node's task stream; unregisters the node when the node goes away.
struct NodeTasks {
    rx: tokio::sync::mpsc::Receiver<Result<pb::Task, Status>>,
    site: String,
    conn_id: u64,
    engine: Arc<Engine>,
}

impl Stream for NodeTasks {
    type Item = Result<pb::Task, Status>;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for NodeTasks {
    fn drop(&mut self) {
        self.engine.nodes.disconnect(&self.site, self.conn_id);
    }
}

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    type ConnectStream = TaskStream;

    async fn connect(
        &self,
        request: Request<pb::ConnectRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        let site = node_site(&request)?;
        let identity = caller(&request)?.identity.clone();
        let serial = caller(&request)?.serial.clone();
        let req = request.into_inner();
        let (conn_id, rx) = self.engine.nodes.connect(
            &site,
            identity.clone(),
            req.datasets.clone(),
            req.device.clone(),
        );
        if let Err(e) = self
            .engine
            .store
            .register_node(&site, &identity.uri(), time::OffsetDateTime::now_utc())
            .await
        {
            tracing::warn!(%site, error = %e, "could not record the node");
        }
        tracing::info!(%site, datasets = ?req.datasets, device = %req.device, version = %req.node_version, "node connected");
        self.engine
            .trail()
            .note_payload(
                &identity.uri(),
                &tutela_audit::payload::NodeRegistered {
                    site: site.clone(),
                    certificate_serial: Some(serial.to_string()),
                    node_version: req.node_version.clone(),
                    datasets: req.datasets.clone(),
                },
            )
            .await;
        Ok(Response::new(Box::pin(NodeTasks {
            rx,
            site,
            conn_id,
            engine: self.engine.clone(),
        })))
    }

    type FetchModelStream = FrameStream;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<FrameStream>, Status> {
        let site = node_site(&request)?;
        let task_id = &request.get_ref().task_id;
        match self.engine.tasks.site_of(task_id) {
            Some(s) if s == site => {}
            Some(_) => {
                return Err(Status::permission_denied(format!(
                    "task {task_id} belongs to another site"
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "task {task_id} is not open (its round closed)"
                )));
            }
        }
        let model = self.engine.tasks.model_of(task_id).ok_or_else(|| {
            Status::failed_precondition(format!("task {task_id} has no global model"))
        })?;
        let source =
            SafetensorsFileSource::open(&self.engine.model_path(&model)).map_err(Status::from)?;
        let digest = tutela_protocol::services::model_id_digest(&model)?;
        let metrics = self.engine.metrics.clone();
        let frames = futures::StreamExt::map(stream::send_known_digest(source, digest), move |r| {
            if let Ok(frame) = &r {
                metrics.sent(prost::Message::encoded_len(frame));
            }
            r.map_err(Status::from)
        });
        Ok(Response::new(Box::pin(frames)))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::TensorFrame>>,
    ) -> Result<Response<pb::UpdateReceipt>, Status> {
        let site = node_site(&request)?;
        let routed_to = Arc::new(Mutex::new(None::<String>));
        let sink = RoutingSink::new(self.engine.tasks.clone(), site.clone(), routed_to.clone());
        let metrics = self.engine.metrics.clone();
        let frames = futures::StreamExt::inspect(request.into_inner(), move |r| {
            if let Ok(frame) = r {
                metrics.received(prost::Message::encoded_len(frame));
            }
        });
        let result = stream::receive(frames, sink).await;
        let task_id = routed_to.lock().ok().and_then(|t| t.clone());
        match result {
            Ok(received) => {
                let digest = received.digest_hex();
                let routed = received.output;
                self.engine.tasks.finish(
                    &routed.task_id,
                    Outcome::Accepted {
                        digest: digest.clone(),
                        metrics: routed.metrics,
                        model_id: routed.model_id,
                    },
                );
                self.engine.metrics.update_accepted();
                tracing::info!(%site, task = %routed.task_id, update = %digest, "update accepted");
                Ok(Response::new(pb::UpdateReceipt {
                    task_id: routed.task_id,
                    update_digest: digest,
                }))
            }
            Err(e) => {
                // A broken connection may be retried before the deadline; anything the node sent
                // wrong is final for this task, and both the node and the operator see why.
                if let (Some(task), false) = (&task_id, matches!(e, StreamError::Transport(_))) {
                    let recorded = self.engine.tasks.finish(
                        task,
                        Outcome::Refused {
                            reason: e.to_string(),
                        },
                    );
                    if let (true, Some(reason)) =
                        (recorded, crate::metrics::UpdateRefusal::of_stream_error(&e))
                    {
                        self.engine.metrics.update_refused(reason);
                    }
                }
                tracing::warn!(%site, task = ?task_id, error = %e, "update refused");
                Err(Status::from(e))
            }
        }
    }

    async fn decline_task(
        &self,
        request: Request<pb::DeclineTaskRequest>,
    ) -> Result<Response<pb::DeclineTaskReply>, Status> {
        let site = node_site(&request)?;
        let req = request.into_inner();
        // A reason is stored and recorded in the trail: a node sends a code and a column (see
        // site-node::failure, tutela_protocol::refusal), and nothing else is kept.
        if req.reason.len() > MAX_DECLINE_REASON_BYTES {
            return Err(Status::invalid_argument(format!(
                "a decline reason is at most {MAX_DECLINE_REASON_BYTES} bytes (a code, a column, \
                 a short note); this one is {}",
                req.reason.len()
            )));
        }
        // Only the typed refusal (its code and column) is kept: free text from a site is
        // neither stored nor relayed into the trail, whatever the node sends.
        let typed = tutela_protocol::refusal::TypedRefusal::parse(&req.reason).map_err(|e| {
            Status::invalid_argument(format!(
                "a decline reason is a refusal code, optionally with ` column=NAME` \
                 (tutela_protocol::refusal): {e}"
            ))
        })?;
        // A node that could not answer a check (it failed inside) declines it: its answer is
        // the decline's code.
        if self.engine.checks.is_pending(&req.task_id) {
            let refusal = pb::CheckRefusal {
                code: typed.code.to_string(),
                reason: typed
                    .column
                    .as_ref()
                    .map(|c| format!("column={c}"))
                    .unwrap_or_default(),
            };
            return match self
                .engine
                .checks
                .answer(&req.task_id, &site, vec![refusal])
            {
                Ok(()) => Ok(Response::new(pb::DeclineTaskReply {})),
                Err(e) => Err(Status::failed_precondition(e.to_string())),
            };
        }
        match self.engine.tasks.site_of(&req.task_id) {
            Some(s) if s == site => {
                let reason = typed.to_string();
                tracing::warn!(%site, task = %req.task_id, %reason, "task declined");
                if self
                    .engine
                    .tasks
                    .finish(&req.task_id, Outcome::Declined { reason })
                {
                    self.engine
                        .metrics
                        .update_refused(crate::metrics::UpdateRefusal::Declined);
                }
                Ok(Response::new(pb::DeclineTaskReply {}))
            }
            Some(_) => Err(Status::permission_denied(format!(
                "task {} belongs to another site",
                req.task_id
            ))),
            None => Err(Status::failed_precondition(format!(
                "task {} is not open",
                req.task_id
            ))),
        }
    }
    type FetchBaseModelStream =
        Pin<Box<dyn Stream<Item = Result<pb::BaseModelChunk, Status>> + Send + 'static>>;

    async fn fetch_base_model(
        &self,
        request: Request<pb::FetchBaseModelRequest>,
    ) -> Result<Response<Self::FetchBaseModelStream>, Status> {
        let site = node_site(&request)?;
        let req = request.into_inner();
        let id = parse_job_id(&req.job_id)?;
        let job = self.engine.get_job(&id).await?;
        let spec = job
            .spec()
            .map_err(|e| Status::internal(format!("job {id}: stored spec: {e}")))?;
        // As for the global model: a site with an open task of the running job, and only its
        // base.
        crate::base_models::may_serve(
            id.as_str(),
            job.state == JobState::Running,
            &spec,
            &site,
            &req.sha256,
            self.engine
                .tasks
                .site_holds_open_task_of(&site, id.as_str()),
        )
        .map_err(|refusal| match refusal {
            crate::base_models::BaseFetchRefusal::NotRunning { .. } => {
                Status::failed_precondition(refusal.to_string())
            }
            _ => Status::permission_denied(refusal.to_string()),
        })?;
        let store = BaseModelStore::in_state_dir(&self.engine.state_dir);
        let stored = store.open(&req.sha256).map_err(|e| match e {
            BaseModelStoreError::NotFound { .. } => Status::not_found(e.to_string()),
            other => {
                tracing::error!(error = %other, "reading a stored base model");
                Status::internal(format!("base model {} cannot be read", req.sha256))
            }
        })?;
        let served = BaseModelStore::count_served();
        tracing::info!(%site, job = %id, sha256 = %req.sha256, bytes = stored.weights_len, served, "base model served");
        // From disk a chunk at a time as the site takes them: never the whole base in memory.
        let sha256 = req.sha256.clone();
        let chunks = tutela_protocol::base_model::file_chunk_stream(
            &req.sha256,
            stored.config_json,
            stored.weights,
            stored.weights_len,
        )
        .map(move |chunk| {
            chunk.map_err(|e| {
                tracing::error!(error = %e, %sha256, "reading a stored base model while serving it");
                Status::internal(format!("base model {sha256} cannot be read"))
            })
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn sec_agg(
        &self,
        request: Request<pb::SecAggRequest>,
    ) -> Result<Response<pb::SecAggReply>, Status> {
        let site = node_site(&request)?;
        secagg::exchange(&self.engine, &site, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn submit_statistics(
        &self,
        request: Request<pb::StatisticsRelease>,
    ) -> Result<Response<pb::StatisticsReceipt>, Status> {
        let site = node_site(&request)?;
        statistics::receive_release(&self.engine, &site, request.into_inner()).map(Response::new)
    }

    async fn answer_check(
        &self,
        request: Request<pb::CheckAnswer>,
    ) -> Result<Response<pb::CheckAnswerReply>, Status> {
        let site = node_site(&request)?;
        let req = request.into_inner();
        match self.engine.checks.answer(&req.task_id, &site, req.refusals) {
            Ok(()) => Ok(Response::new(pb::CheckAnswerReply {})),
            Err(e @ crate::engine::CheckAnswerError::OtherSite(_)) => {
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e @ crate::engine::CheckAnswerError::TooLong(_)) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }
}

/// The longest decline reason the coordinator accepts.
pub const MAX_DECLINE_REASON_BYTES: usize = 4096;

pub struct JobsService {
    pub engine: Arc<Engine>,
}

fn parse_job_id(s: &str) -> Result<JobId, Status> {
    s.parse()
        .map_err(|e: crate::job::BadJobId| Status::invalid_argument(e.to_string()))
}

impl JobsService {
    async fn status(&self, id: &JobId) -> Result<pb::JobStatus, Status> {
        job_status(&self.engine, id).await.map_err(Status::from)
    }

    /// Without a `[policy]` the coordinator keeps its built-in role checks; with one, the
    /// enforcement layer has decided before the handler runs.
    fn legacy_checks(&self) -> bool {
        self.engine.approvals.get().is_none()
    }

    fn gate(&self) -> Result<&crate::approvals::ApprovalGate, Status> {
        self.engine
            .approvals
            .get()
            .map(|g| g.as_ref())
            .ok_or_else(|| {
                Status::failed_precondition(
                    "this coordinator runs without a [policy]: jobs need no approval",
                )
            })
    }

    /// The job, required to be proposed (approvals are given and taken back before it starts).
    async fn proposed(&self, id: &JobId) -> Result<crate::store::JobRecord, Status> {
        let job = self.engine.get_job(id).await?;
        if job.state != JobState::Proposed {
            return Err(Status::failed_precondition(format!(
                "job {id} is {}: approvals are given, withdrawn or refused only before a job starts",
                job.state
            )));
        }
        Ok(job)
    }
}

/// A fail-closed audit append's error, as the RPC's: the action is refused.
fn audit_refused(e: AuditTrailError) -> Status {
    Status::unavailable(format!(
        "refused: the audit service did not record this action ({e}); nothing was changed"
    ))
}

fn now_unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsService {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        if self.legacy_checks() {
            require_operator(&request)?;
        }
        let who = caller(&request)?.identity.clone();
        refuse_unknown_model(&request.get_ref().spec_toml)?;
        let id = self
            .engine
            .submit_by(&request.get_ref().spec_toml, Some(&who.uri()))
            .await?;
        tracing::info!(job = %id, operator = %who, "job submitted");
        Ok(Response::new(self.status(&id).await?))
    }

    async fn check_job(
        &self,
        request: Request<pb::CheckJobRequest>,
    ) -> Result<Response<pb::CheckJobReply>, Status> {
        if self.legacy_checks() {
            require_operator(&request)?;
        }
        let who = caller(&request)?.identity.clone();
        refuse_unknown_model(&request.get_ref().spec_toml)?;
        let sites = self
            .engine
            .check_job(
                &request.get_ref().spec_toml,
                Some(&who.uri()),
                crate::engine::CHECK_WAIT,
            )
            .await?;
        Ok(Response::new(pb::CheckJobReply { sites }))
    }

    async fn get_statistics(
        &self,
        request: Request<pb::GetStatisticsRequest>,
    ) -> Result<Response<pb::StatisticsFile>, Status> {
        if self.legacy_checks() {
            require_reader(&request)?;
        }
        let req = request.into_inner();
        let id = parse_job_id(&req.job_id)?;
        statistics::result_file(&self.engine, &id, &req.sha256)
            .await
            .map(Response::new)
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        if self.legacy_checks() {
            require_reader(&request)?;
        }
        let id = parse_job_id(&request.get_ref().job_id)?;
        Ok(Response::new(self.status(&id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        if self.legacy_checks() {
            require_reader(&request)?;
        }
        let jobs = self
            .engine
            .store
            .list_jobs(None)
            .await
            .map_err(EngineError::from)?;
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            out.push(self.status(&j.id).await?);
        }
        Ok(Response::new(pb::ListJobsReply { jobs: out }))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        if self.legacy_checks() {
            require_reader(&request)?;
        }
        let id = parse_job_id(&request.get_ref().job_id)?;
        let engine = self.engine.clone();
        let mut changes = engine.subscribe(id.as_str());
        let first = job_status(&engine, &id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut status = first;
            loop {
                let done = status
                    .state
                    .parse::<JobState>()
                    .is_ok_and(|s| s.is_terminal());
                if tx.send(Ok(status)).await.is_err() || done {
                    return;
                }
                // Changes, plus a slow tick so connected-site lists stay fresh.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), changes.changed())
                    .await;
                status = match job_status(&engine, &id).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        if self.legacy_checks() {
            require_operator(&request)?;
        }
        let id = parse_job_id(&request.get_ref().job_id)?;
        let reason = format!(
            "cancelled by {}: {}",
            caller(&request)?.identity,
            request.get_ref().reason
        );
        self.engine.cancel(&id, &reason).await?;
        Ok(Response::new(self.status(&id).await?))
    }

    async fn approve_job(
        &self,
        request: Request<pb::ApproveJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let gate = self.gate()?;
        let who = caller(&request)?.identity.clone();
        let wire = request
            .get_ref()
            .approval
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("ApproveJob carries no approval"))?;
        let approval = crate::approvals::from_pb(wire).map_err(Status::invalid_argument)?;
        let id = parse_job_id(&approval.job_id)?;
        let job = self.proposed(&id).await?;
        match gate.check_new(&approval, &job, &who, now_unix_ms()) {
            Ok(v) => {
                // Fail closed: an approval the audit trail did not take is not counted. The audit
                // service verifies the signature over the policy crate's message itself.
                let site = match &v.signer.principal {
                    Principal::User { site, .. } => Some(site.clone()),
                    _ => None,
                };
                let certificate = approval
                    .signer_chain_der
                    .first()
                    .map(|der| tutela_protocol::pki::pem_encode("CERTIFICATE", der))
                    .unwrap_or_default();
                self.engine
                    .trail()
                    .record_payload(
                        id.as_str(),
                        &tutela_audit::payload::JobApproved {
                            spec_digest: approval.spec_digest.to_hex(),
                            signature: hex::encode(&approval.signature),
                            certificate,
                            site: site.clone(),
                            officer: Some(v.signer.uri()),
                            signed_at_ms: Some(approval.signed_at_ms),
                            expires_at_ms: Some(approval.expires_at_ms),
                        },
                    )
                    .await
                    .map_err(audit_refused)?;
                self.engine
                    .store
                    .record_approval(&id, &v.signer.uri(), &approval)
                    .await
                    .map_err(EngineError::from)?;
                tracing::info!(target: "tutela::audit", event = "job.approved", job = %id, signer = %v.signer, spec_digest = %approval.spec_digest, signature = %hex::encode(&approval.signature), expires_at_ms = approval.expires_at_ms, "approval recorded");
                self.engine.try_start(&id).await?;
                Ok(Response::new(self.status(&id).await?))
            }
            Err(why) => {
                tracing::warn!(target: "tutela::audit", event = "job.approval_refused", job = %id, caller = %who, reason = %why, "approval refused");
                Err(Status::permission_denied(format!(
                    "approval refused: {why}"
                )))
            }
        }
    }

    /// An officer's signed rejection: checked like an approval (signature over the rejection's
    /// own message, chain to the consortium CA and CRLs, the job's current digest, the signer
    /// being the caller), from a compliance officer of a participating site. Recorded in the
    /// audit trail as `job.rejected` with the signature and certificate first (fail closed: no
    /// record, no rejection), then stored with the job's move to cancelled in one transaction.
    /// If a concurrent approval completes the quorum and starts the job between the two, the
    /// store's compare-and-set refuses the rejection (FAILED_PRECONDITION) and the trail holds
    /// the officer's signed rejection followed by the job's start: what each party did, in order.
    async fn reject_job(
        &self,
        request: Request<pb::RejectJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let gate = self.gate()?;
        let who = caller(&request)?.identity.clone();
        let req = request.get_ref();
        let wire = req.rejection.as_ref().ok_or_else(|| {
            Status::invalid_argument(
                "RejectJob carries no signed rejection: an officer signs it with `tutela job \
                 reject JOB --reason TEXT --key KEY --cert CERT`",
            )
        })?;
        let rejection = tutela_policy::Rejection::from_pb(wire)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.job_id != rejection.job_id {
            return Err(Status::invalid_argument(format!(
                "RejectJob names job {:?}, but its signed rejection is of job {:?}",
                req.job_id, rejection.job_id
            )));
        }
        if req.reason != rejection.reason {
            return Err(Status::invalid_argument(
                "RejectJob's reason differs from the reason its signed rejection carries",
            ));
        }
        if let Some(problem) = tutela_protocol::job::rejection_reason_problem(&rejection.reason) {
            return Err(Status::invalid_argument(format!(
                "the rejection's reason {problem}"
            )));
        }
        let id = parse_job_id(&rejection.job_id)?;
        let job = self.proposed(&id).await?;
        let verified = match gate.check_rejection(&rejection, &job, &who, now_unix_ms()) {
            Ok(v) => v,
            Err(why) => {
                tracing::warn!(target: "tutela::audit", event = "job.rejection_refused", job = %id, caller = %who, reason = %why, "rejection refused");
                return Err(Status::permission_denied(format!(
                    "rejection refused: {why}"
                )));
            }
        };
        let signer = verified.signer;
        let site = match &signer.principal {
            Principal::User { site, .. } => Some(site.clone()),
            _ => None,
        };
        let certificate = rejection
            .signer_chain_der
            .first()
            .map(|der| tutela_protocol::pki::pem_encode("CERTIFICATE", der))
            .unwrap_or_default();
        // Fail closed: a rejection the audit trail did not take does not happen. The audit
        // service verifies the signature over the rejection message itself.
        self.engine
            .trail()
            .record_payload(
                id.as_str(),
                &tutela_audit::payload::JobRejected {
                    spec_digest: rejection.spec_digest.to_hex(),
                    signature: hex::encode(&rejection.signature),
                    certificate,
                    site: site.clone(),
                    officer: Some(signer.uri()),
                    reason: rejection.reason.clone(),
                    signed_at_ms: rejection.signed_at_ms,
                },
            )
            .await
            .map_err(audit_refused)?;
        let signed_at = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(rejection.signed_at_ms) * 1_000_000,
        )
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{} (unix ms)", rejection.signed_at_ms));
        let state_reason = format!(
            "rejected by {signer} (signed at {signed_at}): {}",
            rejection.reason
        );
        self.engine
            .store
            .record_rejection(&id, &signer.uri(), &rejection, &state_reason)
            .await
            .map_err(EngineError::from)?;
        tracing::info!(target: "tutela::audit", event = "job.rejected", job = %id, signer = %signer, spec_digest = %rejection.spec_digest, signature = %hex::encode(&rejection.signature), reason = %rejection.reason, "signed rejection recorded: job cancelled");
        Ok(Response::new(self.status(&id).await?))
    }

    async fn withdraw_approval(
        &self,
        request: Request<pb::WithdrawApprovalRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.gate()?;
        let who = caller(&request)?.identity.clone();
        let id = parse_job_id(&request.get_ref().job_id)?;
        self.proposed(&id).await?;
        let n = self
            .engine
            .store
            .withdraw_approval(&id, &who.uri())
            .await
            .map_err(EngineError::from)?;
        if n == 0 {
            return Err(Status::not_found(format!(
                "{who} has no standing approval of job {id} to withdraw"
            )));
        }
        tracing::info!(target: "tutela::audit", event = "job.approval_withdrawn", job = %id, signer = %who, "approval withdrawn");
        Ok(Response::new(self.status(&id).await?))
    }

    async fn amend_job(
        &self,
        request: Request<pb::AmendJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        if self.legacy_checks() {
            require_operator(&request)?;
        }
        let who = caller(&request)?.identity.clone();
        let id = parse_job_id(&request.get_ref().job_id)?;
        self.proposed(&id).await?;
        refuse_unknown_model(&request.get_ref().spec_toml)?;
        self.engine.amend(&id, &request.get_ref().spec_toml).await?;
        let status = self.status(&id).await?;
        tracing::info!(target: "tutela::audit", event = "job.amended", job = %id, operator = %who, spec_digest = %status.spec_digest, "job spec amended: earlier approvals no longer count");
        Ok(Response::new(status))
    }

    async fn upload_base_model(
        &self,
        request: Request<Streaming<pb::BaseModelChunk>>,
    ) -> Result<Response<pb::BaseModelReceipt>, Status> {
        if self.legacy_checks() {
            require_operator(&request)?;
        }
        let who = caller(&request)?.identity.clone();
        let store = BaseModelStore::in_state_dir(&self.engine.state_dir);
        // Spooled to disk as it arrives: memory stays at one chunk whatever the base's size.
        let (sha256, bytes) = store
            .store_stream(request.into_inner(), MAX_BASE_MODEL_BYTES)
            .await
            .map_err(|e| {
                if e.is_internal() {
                    tracing::error!(error = %e, "storing an uploaded base model");
                    Status::internal("the base model could not be stored")
                } else {
                    Status::invalid_argument(e.to_string())
                }
            })?;
        tracing::info!(operator = %who, %sha256, bytes, "base model stored");
        Ok(Response::new(pb::BaseModelReceipt { sha256, bytes }))
    }
}

/// The largest base checkpoint an operator may upload (config.json + weights): a bound on the
/// coordinator's disk, since an upload is spooled to a file as it arrives (`base_models`).
pub const MAX_BASE_MODEL_BYTES: u64 = 16 << 30;
