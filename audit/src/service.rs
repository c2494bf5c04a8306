//! The `tutela.v1.Audit` gRPC service: thin handlers over [`AuditLog`]. The actor of every
//! appended event is the caller's verified certificate identity: a request has no field for it,
//! so nobody appends in another's name.
//!
//! Authorization happens before a handler runs (`tutela_policy::EnforceLayer`, see
//! [`crate::server`]); [`LogDecisionSink`] records the service's own decisions in its log.

use std::pin::Pin;
use std::str::FromStr;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tutela_policy::Decision;
use tutela_policy::enforce::{DecisionSink, TracingSink};
use tutela_protocol::identity::Identity;
use tutela_protocol::pb;

use crate::event::Action;
use crate::log::{AppendError, AuditLog, LogError};
use crate::payload::ActionPayload;
use crate::wire;

pub struct AuditService {
    pub log: AuditLog,
}

/// The audit service's [`DecisionSink`]: appends a `policy.decision` event to the service's own
/// log, as the service's identity, for every denial and every allowed action that is not a read
/// (an append, or a method the policy does not know as a read). Allowed reads (`read`,
/// `verify`) go to the tracing log only: a compliance officer's query is not a state change.
///
/// The payload is the coordinator's (`who`, `method`, `domain`, `object`, `action`, `allowed`,
/// `rule`, `policy_digest`), so one query finds every decision of the consortium.
///
/// `record` never waits: decisions go on a bounded queue to one recorder task that appends them
/// straight to the [`AuditLog`] in the order they were made, never through the gRPC service, so
/// recording a decision is not itself a request to decide. A decision that finds the queue full
/// (a flood of refused requests), or whose append fails, is logged at ERROR with its payload.
pub struct LogDecisionSink {
    queue: mpsc::Sender<PendingDecision>,
}

struct PendingDecision {
    subject: String,
    payload: serde_json::Value,
}

impl LogDecisionSink {
    /// How many decisions may wait for the recorder.
    pub const QUEUE: usize = 4096;
    /// The most decisions handed to the log at once (they share its group commit).
    const BATCH: usize = 256;

    /// Starts the recorder task; it ends when the sink is dropped and its queue is drained.
    pub fn start(log: AuditLog) -> LogDecisionSink {
        let (queue, mut pending) = mpsc::channel::<PendingDecision>(Self::QUEUE);
        tokio::spawn(async move {
            let actor = log.log_id().to_string();
            let mut batch = Vec::with_capacity(Self::BATCH);
            while pending.recv_many(&mut batch, Self::BATCH).await > 0 {
                // Appends are polled in order and each enqueues at its first poll, so the log
                // keeps the decisions' order while one commit covers the batch.
                let appends = batch.drain(..).map(|d| {
                    let (log, actor) = (&log, &actor);
                    async move {
                        let result = log
                            .append(
                                actor.as_str(),
                                Action::PolicyDecision,
                                d.subject.as_str(),
                                d.payload.clone(),
                            )
                            .await;
                        (result, d)
                    }
                });
                for (result, d) in futures::future::join_all(appends).await {
                    if let Err(e) = result {
                        tracing::error!(error = %e, subject = %d.subject, payload = %d.payload, "policy decision NOT recorded in the audit log");
                    }
                }
            }
        });
        LogDecisionSink { queue }
    }
}

impl DecisionSink for LogDecisionSink {
    fn record(&self, d: &Decision, caller: &Identity, method: &str) {
        TracingSink.record(d, caller, method);
        if d.allowed && matches!(d.action.as_str(), "read" | "read_own" | "verify") {
            return;
        }
        let pending = PendingDecision {
            subject: format!("{}/{}", d.object, d.action),
            payload: crate::payload::PolicyDecision::of(d, caller, method).to_value(),
        };
        if let Err(e) = self.queue.try_send(pending) {
            let (why, d) = match e {
                mpsc::error::TrySendError::Full(d) => ("the queue of decisions is full", d),
                mpsc::error::TrySendError::Closed(d) => ("the recorder has stopped", d),
            };
            tracing::error!(subject = %d.subject, payload = %d.payload, "policy decision NOT recorded in the audit log: {why}");
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;
type CheckpointStream = Pin<Box<dyn Stream<Item = Result<pb::AuditCheckpoint, Status>> + Send>>;

fn log_status(e: LogError) -> Status {
    match e {
        LogError::NoCheckpoint(_) | LogError::NoCheckpointYet => Status::not_found(e.to_string()),
        LogError::NotCovered { .. } | LogError::Proof(_) => Status::out_of_range(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn append(
        &self,
        request: Request<pb::AuditAppendRequest>,
    ) -> Result<Response<pb::AuditReceipt>, Status> {
        let actor = tutela_protocol::server::caller(&request)?.identity.uri();
        let r = request.into_inner();
        let action =
            Action::from_str(&r.action).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let payload: serde_json::Value = serde_json::from_str(&r.payload_json)
            .map_err(|e| Status::invalid_argument(format!("payload_json is not JSON: {e}")))?;
        if !payload.is_object() {
            return Err(Status::invalid_argument(
                "payload_json must be a JSON object",
            ));
        }
        let receipt = self
            .log
            .append(actor, action, r.subject, payload)
            .await
            .map_err(|e| match e {
                // A forged action or approval: refused as a permission the caller lacks, which
                // the enforcement layer records in this log as a denial (`policy.decision`,
                // rule `refused by the service: <this message>`).
                AppendError::Unauthorized(_) | AppendError::Approval(_) => {
                    Status::permission_denied(e.to_string())
                }
                AppendError::Chain(_) | AppendError::Payload(_) => {
                    Status::invalid_argument(e.to_string())
                }
                AppendError::Store(_) | AppendError::Closed | AppendError::Halted(_) => {
                    Status::unavailable(e.to_string())
                }
            })?;
        Ok(Response::new(pb::AuditReceipt {
            seq: receipt.seq,
            hash: receipt.hash.to_vec(),
            timestamp: receipt.timestamp.to_string(),
        }))
    }

    type QueryStream = EventStream;

    async fn query(
        &self,
        request: Request<pb::AuditQuery>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = tutela_protocol::server::caller(&request)?.identity.uri();
        let mut filter = wire::filter_from_pb(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if request
            .extensions()
            .get::<tutela_policy::enforce::OwnEventsOnly>()
            .is_some()
        {
            // Allowed only `audit, read_own`: the caller's own events, whatever it asked for.
            match &filter.actor {
                Some(actor) if *actor != caller => {
                    return Err(Status::permission_denied(format!(
                        "{caller} may read only its own events (audit, read_own), not {actor}'s"
                    )));
                }
                _ => filter.actor = Some(caller),
            }
        }
        let events = self
            .log
            .store()
            .events(&filter)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let items: Vec<Result<pb::AuditEvent, Status>> =
            events.iter().map(|e| Ok(wire::event_to_pb(e))).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    type ListCheckpointsStream = CheckpointStream;

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<CheckpointStream>, Status> {
        tutela_protocol::server::caller(&request)?;
        let cps = self
            .log
            .store()
            .checkpoints()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let items: Vec<Result<pb::AuditCheckpoint, Status>> =
            cps.iter().map(|c| Ok(wire::checkpoint_to_pb(c))).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::AuditCheckpoint>, Status> {
        tutela_protocol::server::caller(&request)?;
        let cp = self
            .log
            .checkpoint(request.get_ref().tree_size)
            .await
            .map_err(log_status)?;
        Ok(Response::new(wire::checkpoint_to_pb(&cp)))
    }

    async fn inclusion_proof(
        &self,
        request: Request<pb::InclusionProofRequest>,
    ) -> Result<Response<pb::InclusionProofResponse>, Status> {
        tutela_protocol::server::caller(&request)?;
        let r = request.get_ref();
        let p = self
            .log
            .inclusion_proof(r.seq, r.tree_size)
            .await
            .map_err(log_status)?;
        Ok(Response::new(pb::InclusionProofResponse {
            event: Some(wire::event_to_pb(&p.event)),
            checkpoint: Some(wire::checkpoint_to_pb(&p.checkpoint)),
            path: p.path.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn consistency_proof(
        &self,
        request: Request<pb::ConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProofResponse>, Status> {
        tutela_protocol::server::caller(&request)?;
        let r = request.get_ref();
        let proof = self
            .log
            .consistency_proof(r.old_size, r.new_size)
            .map_err(log_status)?;
        Ok(Response::new(pb::ConsistencyProofResponse {
            proof: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn log_info(
        &self,
        request: Request<pb::LogInfoRequest>,
    ) -> Result<Response<pb::LogInfoResponse>, Status> {
        tutela_protocol::server::caller(&request)?;
        Ok(Response::new(pb::LogInfoResponse {
            log_id: self.log.log_id().to_string(),
            public_key: self.log.public_key().to_vec(),
            size: self.log.size(),
        }))
    }

    async fn report_held_checkpoint(
        &self,
        request: Request<pb::AuditCheckpoint>,
    ) -> Result<Response<pb::ReportHeldCheckpointResponse>, Status> {
        let caller = &tutela_protocol::server::caller(&request)?.identity;
        let held = wire::checkpoint_from_pb(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = crate::held_checkpoint::check_report(&self.log, caller, &held)
            .await
            .map_err(|e| e.status())?;
        self.log
            .store()
            .record_site_checkpoint(&record)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::debug!(site = %record.site, tree_size = record.tree_size, "a site reported the checkpoint it holds");
        Ok(Response::new(pb::ReportHeldCheckpointResponse {}))
    }
}
