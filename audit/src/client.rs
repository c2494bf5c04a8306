//! A client of the audit service over mutual TLS: appending (the coordinator, nodes), reading and
//! proving (the CLI), and advancing a site's [`CheckpointVerifier`].

use tonic::transport::Channel;
use tutela_protocol::client::{self, ClientError, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::audit_client::AuditClient as PbClient;
use tutela_protocol::tls::TlsMaterial;

use crate::checkpoint::{CheckpointError, CheckpointVerifier, SignedCheckpoint, Update};
use crate::event::{Action, Event};
use crate::filter::EventFilter;
use crate::receipt::{InclusionProof, Receipt};
use crate::wire::{self, WireError};
use crate::{Hash, Timestamp, canonical_json};

/// Where a process reaches the audit service: the `[audit]` table of coordinator.toml and
/// node.toml.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEndpoint {
    /// `host:port` of `tutela-audit`.
    pub endpoint: String,
    /// The SPIFFE identity the audit service's certificate must carry; default
    /// `spiffe://<consortium>/audit`, the consortium being the caller's own.
    #[serde(default)]
    pub server_identity: Option<String>,
}

impl AuditEndpoint {
    /// A client that connects on first use, as the holder of `tls` (its certificate identity is
    /// the actor of every event it appends), and that accepts only the expected audit identity.
    pub fn connect_lazy(&self, tls: &TlsMaterial) -> Result<AuditClient> {
        let expect = match &self.server_identity {
            Some(s) => s.parse::<Identity>().map_err(|e| {
                AuditClientError::Config(format!(
                    "server_identity {s:?} is not a SPIFFE identity: {e}"
                ))
            })?,
            None => Identity::new(&tls.identity.consortium, Principal::Audit)
                .map_err(|e| AuditClientError::Config(e.to_string()))?,
        };
        let tls = ClientTls::from_material(tls, Some(expect))
            .map_err(|e| AuditClientError::Config(e.to_string()))?;
        AuditClient::connect_lazy(&self.endpoint, tls)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditClientError {
    #[error("[audit]: {0}")]
    Config(String),
    #[error("{0}")]
    Connect(#[from] ClientError),
    #[error("audit service: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("audit service sent a bad message: {0}")]
    Wire(#[from] WireError),
    #[error("audit service: {0}")]
    Checkpoint(#[from] CheckpointError),
}

pub type Result<T, E = AuditClientError> = std::result::Result<T, E>;

/// The log's identity: its id, checkpoint key and current size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogInfo {
    pub log_id: String,
    pub public_key: Vec<u8>,
    pub size: u64,
}

#[derive(Clone)]
pub struct AuditClient {
    inner: PbClient<Channel>,
}

impl AuditClient {
    /// Connects now (fails if the service cannot be reached).
    pub async fn connect(addr: &str, tls: ClientTls) -> Result<AuditClient> {
        Ok(AuditClient {
            inner: PbClient::new(client::connect(addr, tls).await?),
        })
    }

    /// Connects on first use and reconnects after failures (for long-lived processes).
    pub fn connect_lazy(addr: &str, tls: ClientTls) -> Result<AuditClient> {
        Ok(AuditClient {
            inner: PbClient::new(client::connect_lazy(addr, tls)?),
        })
    }

    /// Appends an event as this client's certificate identity; returns once it is committed.
    pub async fn append(
        &mut self,
        action: Action,
        subject: &str,
        payload: &serde_json::Value,
    ) -> Result<Receipt> {
        let r = self
            .inner
            .append(pb::AuditAppendRequest {
                action: action.as_str().to_string(),
                subject: subject.to_string(),
                payload_json: canonical_json(payload),
            })
            .await?
            .into_inner();
        Ok(Receipt {
            seq: r.seq,
            hash: wire::hash_of("AuditReceipt", "hash", &r.hash)?,
            timestamp: r.timestamp.parse::<Timestamp>().map_err(|e| WireError {
                message: "AuditReceipt",
                field: "timestamp",
                problem: e.to_string(),
            })?,
        })
    }

    /// Appends a typed payload under its own action (see [`crate::payload`]).
    pub async fn append_payload<P: crate::payload::ActionPayload>(
        &mut self,
        subject: &str,
        payload: &P,
    ) -> Result<Receipt> {
        self.append(P::ACTION, subject, &payload.to_value()).await
    }

    /// The events matching `filter`, in seq order.
    pub async fn query(&mut self, filter: &EventFilter) -> Result<Vec<Event>> {
        let mut stream = self
            .inner
            .query(wire::filter_to_pb(filter))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(e) = stream.message().await? {
            out.push(wire::event_from_pb(&e)?);
        }
        Ok(out)
    }

    pub async fn checkpoints(&mut self) -> Result<Vec<SignedCheckpoint>> {
        let mut stream = self
            .inner
            .list_checkpoints(pb::ListCheckpointsRequest {})
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(c) = stream.message().await? {
            out.push(wire::checkpoint_from_pb(&c)?);
        }
        Ok(out)
    }

    /// The latest checkpoint, or the one of `tree_size`.
    pub async fn checkpoint(&mut self, tree_size: Option<u64>) -> Result<SignedCheckpoint> {
        let c = self
            .inner
            .get_checkpoint(pb::GetCheckpointRequest { tree_size })
            .await?
            .into_inner();
        Ok(wire::checkpoint_from_pb(&c)?)
    }

    pub async fn inclusion_proof(
        &mut self,
        seq: u64,
        tree_size: Option<u64>,
    ) -> Result<InclusionProof> {
        let r = self
            .inner
            .inclusion_proof(pb::InclusionProofRequest { seq, tree_size })
            .await?
            .into_inner();
        let missing = |field| WireError {
            message: "InclusionProofResponse",
            field,
            problem: "is missing".into(),
        };
        Ok(InclusionProof {
            event: wire::event_from_pb(r.event.as_ref().ok_or_else(|| missing("event"))?)?,
            checkpoint: wire::checkpoint_from_pb(
                r.checkpoint.as_ref().ok_or_else(|| missing("checkpoint"))?,
            )?,
            path: r
                .path
                .iter()
                .map(|h| wire::hash_of("InclusionProofResponse", "path", h))
                .collect::<Result<_, _>>()?,
        })
    }

    pub async fn consistency_proof(&mut self, old_size: u64, new_size: u64) -> Result<Vec<Hash>> {
        let r = self
            .inner
            .consistency_proof(pb::ConsistencyProofRequest { old_size, new_size })
            .await?
            .into_inner();
        Ok(r.proof
            .iter()
            .map(|h| wire::hash_of("ConsistencyProofResponse", "proof", h))
            .collect::<Result<_, _>>()?)
    }

    pub async fn log_info(&mut self) -> Result<LogInfo> {
        let r = self
            .inner
            .log_info(pb::LogInfoRequest {})
            .await?
            .into_inner();
        Ok(LogInfo {
            log_id: r.log_id,
            public_key: r.public_key,
            size: r.size,
        })
    }

    /// Tells the service that this node's site now holds `held` (after verifying it): what the
    /// console's overview shows for the site. The service takes the site from this client's
    /// certificate and accepts only a checkpoint it signed.
    pub async fn report_held_checkpoint(&mut self, held: &SignedCheckpoint) -> Result<()> {
        self.inner
            .report_held_checkpoint(wire::checkpoint_to_pb(held))
            .await?;
        Ok(())
    }

    /// Fetches the latest checkpoint and, with a consistency proof from the one `verifier`
    /// holds, advances it. Fails (and leaves the verifier as it was) if the log's history
    /// diverged from what the verifier saw.
    pub async fn advance(&mut self, verifier: &mut CheckpointVerifier) -> Result<Update> {
        let latest = self.checkpoint(None).await?;
        let held = verifier
            .latest()
            .map(|c| c.checkpoint.tree_size)
            .unwrap_or(0);
        let new = latest.checkpoint.tree_size;
        let proof = if held > 0 && new > held {
            self.consistency_proof(held, new).await?
        } else {
            Vec::new()
        };
        Ok(verifier.update(&latest, &proof)?)
    }
}
