//! `ModelExchange` as the coordinator serves it: the content-addressed model store
//! (`tutela_protocol::services::DirModelStore`), less the models it must never hand out.
//!
//! A watermarked job's final aggregate is the *unmarked* source of its published model; its
//! digest is in the trail (`round.completed`'s `model_id`, `watermark.registered`'s
//! `source_digest`), and `Download` serves any stored model by digest to every caller the
//! policy allows `models, read` (every site's node in the shipped policy). Served, it would be a
//! clean copy of a model the consortium publishes only marked. Publication withholds it
//! ([`Engine::withhold_model`], before the embedding starts, kept across restarts), and this
//! service refuses to download a withheld model to anyone; nodes fetch their task's global model
//! through `Federation.FetchModel`, which never names a job's final aggregate.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};
use tutela_protocol::pb;
use tutela_protocol::pb::model_exchange_server::ModelExchange;
use tutela_protocol::services::DirModelStore;

use crate::engine::Engine;

pub struct ModelStoreService {
    pub store: DirModelStore,
    pub engine: Arc<Engine>,
}

impl ModelStoreService {
    pub fn into_service(self) -> pb::model_exchange_server::ModelExchangeServer<Self> {
        pb::model_exchange_server::ModelExchangeServer::new(self)
            .max_decoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl ModelExchange for ModelStoreService {
    async fn upload(
        &self,
        request: Request<Streaming<pb::TensorFrame>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        self.store.upload(request).await
    }

    type DownloadStream = <DirModelStore as ModelExchange>::DownloadStream;

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let id = &request.get_ref().model_id;
        if self.engine.is_withheld(id) {
            tracing::warn!(model = %id, "download of a watermarked job's unmarked source refused");
            return Err(Status::permission_denied(format!(
                "model {id} is the unmarked source of a watermarked publication and is never \
                 served; download the published model"
            )));
        }
        self.store.download(request).await
    }
}
