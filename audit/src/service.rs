//! The `tutela.v1.Audit` gRPC service: thin handlers over [`AuditLog`]. The actor of every
//! appended event is the caller's verified certificate identity.

use std::pin::Pin;
use std::str::FromStr;

use futures::Stream;
use tonic::{Request, Response, Status};
use tutela_protocol::pb;

use crate::event::Action;
use crate::log::{AppendError, AuditLog, LogError};
use crate::wire;

pub struct AuditService {
    pub log: AuditLog,
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
                AppendError::Approval(_) | AppendError::Chain(_) => {
                    Status::invalid_argument(e.to_string())
                }
                AppendError::Store(_) | AppendError::Closed => Status::unavailable(e.to_string()),
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
        tutela_protocol::server::caller(&request)?;
        let filter = wire::filter_from_pb(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
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
}
