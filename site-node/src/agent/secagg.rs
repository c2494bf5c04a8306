//! Secure aggregation at the site: the driver that wraps a round's upload when the job has
//! `[secure_aggregation]` (the training is the [`super::LocalRound`]'s, unchanged).
//!
//! The round's configuration is rebuilt here from the signed job spec (its digest computed here,
//! never the coordinator's copy), the round, the attempt and the participant list the task
//! carries ([`tutela_protocol::secagg::wire::round_config`]). The key phases run before the
//! training ([`open`]); after it, the update is clipped to the job's norm bound, rounded onto the
//! job's grid and masked ([`SecAggSession::masked_upload`]), then streamed as one `I64` tensor
//! like any update, and the node answers the unmasking. Nothing of the update leaves unmasked.

use std::collections::BTreeMap;

use tutela_protocol::job::JobSpec;
use tutela_protocol::pb;
use tutela_protocol::pb::sec_agg_request::Message as PbMessage;
use tutela_protocol::secagg::wire::{self, MASKED_TENSOR, ServerRelay};
use tutela_protocol::secagg::{
    ClientAdvertising, ClientAwaitingShares, ClientMessage, RoundConfig, SecureAggregationSpec,
    SharesRelay,
};
use tutela_protocol::tensor::{DType, TensorSpec};

use super::transfer::upload;
use super::worker::{Failure, Shared, describe_status};
use crate::failure::{FailureCode, SiteFailure};
use crate::weights::NamedTensors;

fn refuse(note: impl std::fmt::Display) -> Failure {
    Failure::Decline(SiteFailure::with_public_note(
        FailureCode::TaskInvalid,
        format!("secure aggregation: {note}"),
    ))
}

/// What decides whether a task's round is a secure one.
#[derive(serde::Deserialize)]
struct SecureView {
    #[serde(default)]
    secure_aggregation: Option<toml::Value>,
}

/// A round's secure aggregation after the key phases, waiting for the trained update.
pub(super) struct SecAggSession {
    task_id: String,
    config: RoundConfig,
    spec: SecureAggregationSpec,
    norm_bound: f64,
    state: ClientAwaitingShares,
    shares: SharesRelay,
}

/// The key phases of the task's round, when its job has `[secure_aggregation]`; `None` for a
/// job without. `vector_len` is the number of parameters the update will have.
pub(super) async fn open(
    shared: &Shared,
    task: &pb::Task,
    vector_len: u64,
) -> Result<Option<SecAggSession>, Failure> {
    // Read leniently first, as the node reads specs (unknown keys ignored): only a secure job
    // is parsed strictly, for its digest (the coordinator accepted it strictly).
    let view: SecureView = toml::from_str(&task.job_spec_toml)
        .map_err(|e| refuse(format!("the job spec: {}", e.message())))?;
    let participants = &task.secagg_participants;
    if view.secure_aggregation.is_none() && participants.is_empty() {
        return Ok(None);
    }
    let spec = JobSpec::from_toml_str(&task.job_spec_toml)
        .map_err(|e| refuse(format!("the job spec: {e}")))?;
    let secure = match (&spec.secure_aggregation, participants.is_empty()) {
        (None, true) => return Ok(None),
        (None, false) => {
            return Err(refuse(
                "the task lists secure aggregation participants but the signed job has no \
                 [secure_aggregation]",
            ));
        }
        (Some(_), true) => {
            return Err(refuse(
                "the signed job has [secure_aggregation] but the task lists no participants",
            ));
        }
        (Some(s), false) => s.clone(),
    };
    if !participants.windows(2).all(|w| w[0] < w[1]) {
        return Err(refuse("the participant list is not sorted and unique"));
    }
    let me = participants
        .iter()
        .position(|p| *p == shared.site)
        .ok_or_else(|| refuse(format!("{} is not in the participant list", shared.site)))?;
    let config = wire::round_config(
        &secure,
        spec.digest().0,
        (task.round, task.attempt),
        participants.len(),
        spec.min_sites,
        vector_len,
    );
    let protocol = |e: tutela_protocol::secagg::SecAggError| refuse(e);
    let (state, advert) = ClientAdvertising::new(config.clone(), me as u32)
        .map_err(protocol)?
        .advertise_keys()
        .map_err(protocol)?;
    let ServerRelay::Keys(keys) = exchange(shared, task, ClientMessage::from(advert)).await? else {
        return Err(Failure::Coordinator(
            "SecAgg: the coordinator answered the keys with something else".into(),
        ));
    };
    let (state, share) = state.share_keys(keys).map_err(protocol)?;
    let ServerRelay::Shares(shares) = exchange(shared, task, ClientMessage::from(share)).await?
    else {
        return Err(Failure::Coordinator(
            "SecAgg: the coordinator answered the shares with something else".into(),
        ));
    };
    Ok(Some(SecAggSession {
        task_id: task.task_id.clone(),
        config,
        spec: secure,
        norm_bound: spec.update_norm_bound,
        state,
        shares,
    }))
}

/// Sends one message of the round and waits for what the coordinator relays back.
async fn exchange(
    shared: &Shared,
    task: &pb::Task,
    msg: ClientMessage,
) -> Result<ServerRelay, Failure> {
    let message = wire::request_message(&msg);
    send(shared, &task.task_id, message).await
}

async fn send(
    shared: &Shared,
    task_id: &str,
    message: Option<PbMessage>,
) -> Result<ServerRelay, Failure> {
    let mut client = shared
        .client()
        .ok_or_else(|| Failure::Coordinator("not connected".into()))?;
    let reply = client
        .sec_agg(pb::SecAggRequest {
            task_id: task_id.to_string(),
            message,
        })
        .await
        .map_err(|s| Failure::Coordinator(describe_status("SecAgg", &s)))?;
    wire::decode_reply(reply.get_ref()).map_err(|e| Failure::Coordinator(e.to_string()))
}

impl SecAggSession {
    /// Encodes and masks `update` (F32 tensors, in the model's order), uploads the masked input
    /// with `metadata`, and answers the unmasking.
    pub(super) async fn masked_upload(
        self,
        shared: &Shared,
        update: NamedTensors,
        metadata: BTreeMap<String, String>,
    ) -> Result<pb::UpdateReceipt, Failure> {
        let mut flat = Vec::with_capacity(self.config.vector_len as usize);
        for (spec, bytes) in &update {
            if spec.dtype != DType::F32 {
                return Err(refuse(format!(
                    "update tensor {:?} is {}, not F32",
                    spec.name, spec.dtype
                )));
            }
            flat.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        drop(update);
        if flat.len() as u64 != self.config.vector_len {
            return Err(refuse(format!(
                "the update has {} parameters, the round {}",
                flat.len(),
                self.config.vector_len
            )));
        }
        let params = self.spec.encode_params(self.norm_bound, None);
        let (state, masked) = self
            .state
            .masked_update(self.shares, &flat, &params)
            .map_err(refuse)?;
        drop(flat);
        let bytes: Vec<u8> = masked.masked.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = TensorSpec::new(MASKED_TENSOR, DType::I64, vec![self.config.vector_len]);
        let receipt = upload(shared, vec![(tensor, bytes)], metadata).await?;
        let request = pb::sec_agg_request::Message::AwaitUnmask(pb::SecAggAwaitUnmask {
            header: Some(pb::SecAggHeader {
                round_tag: self.config.tag().0.to_vec(),
                site: masked.site,
            }),
        });
        let ServerRelay::Unmask(request) = send(shared, &self.task_id, Some(request)).await? else {
            return Err(Failure::Coordinator(
                "SecAgg: the coordinator answered the masked input with something else".into(),
            ));
        };
        let response = state.unmask(request).map_err(refuse)?;
        match send(
            shared,
            &self.task_id,
            wire::request_message(&ClientMessage::from(response)),
        )
        .await?
        {
            ServerRelay::Done => Ok(receipt),
            _ => Err(Failure::Coordinator(
                "SecAgg: the coordinator answered the unmasking with something else".into(),
            )),
        }
    }
}
