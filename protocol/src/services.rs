//! Services every Tutela server can mount: `Identity` (who does the server see?) and
//! `ModelExchange` over a content-addressed directory of safetensors files.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::pb;
use crate::server::caller;
use crate::stream::{self, SafetensorsFileSink, SafetensorsFileSource};

/// `tutela.v1.Identity`: reports the caller's verified identity back to it.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityService;

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let c = caller(&request)?;
        let site = &request.get_ref().act_for_site;
        if !site.is_empty() {
            c.identity
                .require_site(site)
                .map_err(|e| Status::permission_denied(e.to_string()))?;
        }
        let p = &c.identity.principal;
        Ok(Response::new(pb::WhoAmIResponse {
            identity: c.identity.uri(),
            consortium: c.identity.consortium.clone(),
            role: p.role().to_string(),
            site: p.site().unwrap_or_default().to_string(),
            name: p.name().unwrap_or_default().to_string(),
            serial: c.serial.clone(),
        }))
    }
}

/// Builds the `Identity` service with Tutela's message limits.
pub fn identity_service() -> pb::identity_server::IdentityServer<IdentityService> {
    pb::identity_server::IdentityServer::new(IdentityService)
}

/// A content-addressed model store on disk: every upload is verified and kept as
/// `<dir>/<stream digest hex>.safetensors`, and downloads stream such a file back.
#[derive(Clone, Debug)]
pub struct DirModelStore {
    dir: PathBuf,
}

impl DirModelStore {
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        Ok(DirModelStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of a model id, if the id is well-formed (64 lowercase hex digits).
    pub fn path_of(&self, model_id: &str) -> Result<PathBuf, Status> {
        let ok = model_id.len() == 64
            && model_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(Status::invalid_argument(format!(
                "model id {model_id:?} is not a 64-digit lowercase hex SHA-256 digest"
            )));
        }
        Ok(self.dir.join(format!("{model_id}.safetensors")))
    }

    /// Builds the `ModelExchange` service with Tutela's message limits.
    pub fn into_service(self) -> pb::model_exchange_server::ModelExchangeServer<Self> {
        pb::model_exchange_server::ModelExchangeServer::new(self)
            .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES)
    }
}

/// The digest a (validated) model id names.
pub fn model_id_digest(model_id: &str) -> Result<[u8; 32], Status> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(model_id, &mut out)
        .map_err(|_| Status::invalid_argument(format!("model id {model_id:?} is not hex")))?;
    Ok(out)
}

type FrameResultStream = Pin<Box<dyn Stream<Item = Result<pb::TensorFrame, Status>> + Send>>;

#[tonic::async_trait]
impl pb::model_exchange_server::ModelExchange for DirModelStore {
    async fn upload(
        &self,
        request: Request<Streaming<pb::TensorFrame>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let who = caller(&request)?.identity.clone();
        let received = stream::receive(
            request.into_inner(),
            SafetensorsFileSink::content_addressed(&self.dir),
        )
        .await
        .inspect_err(|e| tracing::warn!(caller = %who, error = %e, "model upload refused"))?;
        tracing::info!(caller = %who, model = %received.digest_hex(), bytes = received.manifest.total_bytes(), "model stored");
        Ok(Response::new(pb::UploadReceipt {
            model_id: received.digest_hex(),
            total_bytes: received.manifest.total_bytes(),
            tensor_count: received.manifest.len() as u32,
        }))
    }

    type DownloadStream = FrameResultStream;

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        caller(&request)?;
        let path = self.path_of(&request.get_ref().model_id)?;
        if !path.exists() {
            return Err(Status::not_found(format!(
                "no model {} in this store",
                request.get_ref().model_id
            )));
        }
        let source = SafetensorsFileSource::open(&path).map_err(Status::from)?;
        let digest = model_id_digest(&request.get_ref().model_id)?;
        let frames = stream::send_known_digest(source, digest).map(|r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(frames)))
    }
}
