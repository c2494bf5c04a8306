//! The global model in, the update out: the node's streams to the coordinator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use tutela_protocol::pb;
use tutela_protocol::stream::{self, MemorySource, SafetensorsFileSink};

use super::KEEP_MODELS;
use super::worker::{Failure, Shared, describe_status};
use crate::at_rest::EncryptedSafetensorsSink;
use crate::failure::{FailureCode, SiteFailure};
use crate::weights::NamedTensors;

/// Downloads the task's global model into `work_dir/models/<id>.safetensors` and checks that its
/// stream digest is the model id the task names.
pub(super) async fn fetch_model(shared: &Shared, task: &pb::Task) -> Result<PathBuf, Failure> {
    let mut client = shared
        .client()
        .ok_or_else(|| Failure::Coordinator("not connected".into()))?;
    tracing::info!(model = %task.global_model_id, "fetching the global model");
    let frames = client
        .fetch_model(pb::FetchModelRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .map_err(|s| Failure::Coordinator(describe_status("FetchModel", &s)))?
        .into_inner();
    let receive_err =
        |e: stream::StreamError| Failure::Coordinator(format!("receiving the global model: {e}"));
    let received = match &shared.kek {
        // The model goes to disk encrypted, under the name of the model the task expects; a
        // stream with another digest is caught below.
        Some(kek) => {
            let path = shared
                .models_dir
                .join(format!("{}.safetensors.enc", task.global_model_id));
            stream::receive(frames, EncryptedSafetensorsSink::new(path, kek.clone()))
                .await
                .map_err(receive_err)?
        }
        None => stream::receive(
            frames,
            SafetensorsFileSink::content_addressed(&shared.models_dir),
        )
        .await
        .map_err(receive_err)?,
    };
    let digest = received.digest_hex();
    if digest != task.global_model_id {
        // The bytes verified against the sender's own digest, but they are not the model the
        // task is about: train on nothing rather than on the wrong model.
        let _ = std::fs::remove_file(&received.output);
        // Both digests are the coordinator's own: nothing of the site in them.
        return Err(Failure::Decline(SiteFailure::with_public_note(
            FailureCode::GlobalModelMismatch,
            format!(
                "the model received has digest {digest}, but the task names model {}",
                task.global_model_id
            ),
        )));
    }
    prune_models(&shared.models_dir, KEEP_MODELS);
    Ok(received.output)
}

/// Keeps the `keep` most recent models in `dir`; best effort (a failure is only logged).
fn prune_models(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut models: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "safetensors" || x == "enc")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    models.sort();
    let excess = models.len().saturating_sub(keep);
    for (_, path) in models.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an old model");
        }
    }
}

/// Streams `tensors` to the coordinator with `metadata` in the manifest.
pub(super) async fn upload(
    shared: &Shared,
    tensors: NamedTensors,
    metadata: BTreeMap<String, String>,
) -> Result<pb::UpdateReceipt, Failure> {
    let local = |e: &dyn std::fmt::Display| {
        Failure::Decline(SiteFailure::new(
            FailureCode::UpdateFailed,
            format!("preparing the upload: {e}"),
        ))
    };
    let manifest = crate::weights::manifest(&tensors, metadata).map_err(|e| local(&e))?;
    let data = tensors.into_iter().map(|(_, b)| Bytes::from(b)).collect();
    let source = MemorySource::from_parts(manifest, data).map_err(|e| local(&e))?;
    let mut client = shared
        .client()
        .ok_or_else(|| Failure::Coordinator("not connected".into()))?;
    tracing::info!("uploading the update");
    let (frames, source_error) = stream::send_for_upload(source);
    let metrics = shared.metrics.clone();
    let frames = futures::StreamExt::inspect(frames, move |frame| {
        metrics.uploaded_frame(prost::Message::encoded_len(frame));
    });
    match client.submit_update(frames).await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => {
            let source_error = source_error.lock().ok().and_then(|mut s| s.take());
            Err(match source_error {
                Some(e) => Failure::Decline(SiteFailure::new(
                    FailureCode::UpdateFailed,
                    format!("reading the update to send: {e}"),
                )),
                None => Failure::Coordinator(describe_status("SubmitUpdate", &status)),
            })
        }
    }
}
