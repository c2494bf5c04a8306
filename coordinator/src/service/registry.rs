//! `Registry`: the model registry's gRPC service. Thin handlers over `crate::registry`; the
//! enforcement layer has already decided `registry, read|stage|fetch` from the policy.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tutela_policy::stage::{SignedMove, move_to_pb};
use tutela_protocol::pb;
use tutela_protocol::release::Stage;
use tutela_protocol::server::caller;
use tutela_protocol::stream::{self, SafetensorsFileSource};

use super::FrameStream;
use crate::engine::Engine;
use crate::registry::{self, RegistryError};

pub struct RegistryService {
    pub engine: Arc<Engine>,
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::UnknownName(_) | RegistryError::NoVersionAt { .. } => {
                Status::not_found(e.to_string())
            }
            // A principal the policy does not allow: the enforcement layer records this answer
            // in the audit trail as a denial.
            RegistryError::NotAllowed(_) => Status::permission_denied(e.to_string()),
            RegistryError::Invalid(_) | RegistryError::NoPolicy => {
                Status::failed_precondition(e.to_string())
            }
            RegistryError::Store(crate::store::StoreError::StageConflict { .. }) => {
                Status::aborted(e.to_string())
            }
            RegistryError::Audit(_) => Status::unavailable(e.to_string()),
            RegistryError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

async fn model_pb(
    engine: &Engine,
    name: &str,
    detail: bool,
) -> Result<pb::RegisteredModel, Status> {
    let versions = engine
        .store
        .versions(name)
        .await
        .map_err(RegistryError::from)?;
    if versions.is_empty() {
        return Err(RegistryError::UnknownName(name.to_string()).into());
    }
    let mut out = pb::RegisteredModel {
        name: name.to_string(),
        versions: versions
            .iter()
            .map(|v| pb::ModelVersion {
                version: v.version,
                model_digest: v.model_digest.clone(),
                stage: v.stage.to_string(),
                job_id: v.job_id.clone(),
                published_at_unix_ms: v.published_at_ms,
                left_production: v.left_production.unwrap_or(0),
            })
            .collect(),
        history: Vec::new(),
        pending: Vec::new(),
    };
    if detail {
        out.history = engine
            .store
            .stage_moves(name)
            .await
            .map_err(RegistryError::from)?
            .into_iter()
            .map(|m| pb::StageChange {
                move_no: m.move_no,
                kind: m.kind.to_string(),
                moves: m.moves.iter().map(move_to_pb).collect(),
                reason: m.reason,
                signers: m.signers,
                at_unix_ms: m.moved_at_ms,
            })
            .collect();
        out.pending = registry::pending_moves(engine, name)
            .await?
            .into_iter()
            .map(|p| pb::PendingMove {
                kind: p.kind.to_string(),
                moves: p.moves.iter().map(move_to_pb).collect(),
                reason: p.reason,
                signers: p.signers,
                missing: p.missing,
            })
            .collect();
    }
    Ok(out)
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsReply>, Status> {
        let names = self
            .engine
            .store
            .model_names()
            .await
            .map_err(RegistryError::from)?;
        let mut models = Vec::with_capacity(names.len());
        for name in names {
            models.push(model_pb(&self.engine, &name, false).await?);
        }
        Ok(Response::new(pb::ListModelsReply { models }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::RegisteredModel>, Status> {
        Ok(Response::new(
            model_pb(&self.engine, &request.get_ref().name, true).await?,
        ))
    }

    async fn move_stage(
        &self,
        request: Request<pb::MoveStageRequest>,
    ) -> Result<Response<pb::MoveStageReply>, Status> {
        let who = caller(&request)?.identity.clone();
        let wire = request
            .get_ref()
            .r#move
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("MoveStage carries no signed move"))?;
        let signed =
            SignedMove::from_pb(wire).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = signed.name.clone();
        let outcome = registry::move_stage(&self.engine, &who, signed)
            .await
            .inspect_err(|e| {
                tracing::warn!(target: "tutela::audit", event = "model.stage_refused", name = %name, caller = %who, reason = %e, "stage move refused");
            })?;
        Ok(Response::new(pb::MoveStageReply {
            applied: outcome.applied,
            gathered: outcome.gathered,
            missing: outcome.missing,
            model: Some(model_pb(&self.engine, &name, true).await?),
        }))
    }

    type FetchModelStream = FrameStream;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchRegisteredModelRequest>,
    ) -> Result<Response<FrameStream>, Status> {
        let who = caller(&request)?.identity.clone();
        let req = request.get_ref();
        let stage = if req.stage.is_empty() {
            Stage::Production
        } else {
            req.stage
                .parse()
                .map_err(|e: tutela_protocol::release::UnknownStage| {
                    Status::invalid_argument(e.to_string())
                })?
        };
        let version = registry::version_at(&self.engine, &req.name, stage).await?;
        let source = SafetensorsFileSource::open(&self.engine.model_path(&version.model_digest))
            .map_err(Status::from)?;
        let digest = tutela_protocol::services::model_id_digest(&version.model_digest)?;
        tracing::info!(name = %version.name, version = version.version, %stage, model = %version.model_digest, consumer = %who, "registered model served");
        let frames = futures::StreamExt::map(stream::send_known_digest(source, digest), |r| {
            r.map_err(Status::from)
        });
        let mut response = Response::new(Box::pin(frames) as FrameStream);
        let meta = response.metadata_mut();
        for (key, value) in [
            ("tutela-model-version", version.version.to_string()),
            ("tutela-model-digest", version.model_digest.clone()),
        ] {
            let value = value
                .parse()
                .map_err(|_| Status::internal("a registry value is not valid metadata"))?;
            meta.insert(key, value);
        }
        Ok(response)
    }
}
