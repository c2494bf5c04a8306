//! Secure aggregation at the site: the driver that wraps a round's upload when the job has
//! `[secure_aggregation]` (the training is the [`super::LocalRound`]'s, unchanged).
//!
//! The round's configuration is rebuilt here from the signed job spec (its digest computed here,
//! never the coordinator's copy), the round, the attempt and the participant list the task
//! carries ([`tutela_protocol::secagg::wire::round_config`]). The key phases run before the
//! training ([`open`]); after it, the update is clipped to the job's norm bound, rounded onto the
//! job's grid and masked ([`SecAggSession::masked_upload`]), then streamed as one `I64` tensor
//! like any update, and the node answers the unmasking. Nothing of the update leaves unmasked.
//!
//! The node signs: each key it advertises is signed with its node certificate's key, and the
//! advertisement carries that certificate, which the coordinator relays with the keys. A
//! neighbour's key is taken only with a certificate that chains to this node's CA (CRLs
//! included), names the node of the site the participant list puts at that index, and verifies
//! the key's signature ([`SecAggIdentity`]). Before unmasking, the node signs the survivor list
//! it was sent and reveals shares only when at least the threshold of its neighbours signed the
//! same list (the consistency check, `secagg::signing`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use tutela_policy::ApprovalVerifier;
use tutela_privacy::accountant::distributed::RecordLevelPlan;
use tutela_protocol::identity::Principal;
use tutela_protocol::job::JobSpec;
use tutela_protocol::pb;
use tutela_protocol::pb::sec_agg_request::Message as PbMessage;
use tutela_protocol::secagg::signing::{IdentityKey, KeySigner, KeyVerifier};
use tutela_protocol::secagg::wire::{self, MASKED_TENSOR, ServerRelay};
use tutela_protocol::secagg::{
    ClientAdvertising, ClientAwaitingShares, ClientMessage, RoundConfig, SecureAggregationSpec,
    SharesRelay, SiteIndex, UnmaskRequest,
};
use tutela_protocol::tensor::{DType, TensorSpec};
use tutela_protocol::tls::TlsMaterial;

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

/// What the node signs and checks with in secure aggregation: its certificate's key, its
/// certificate (sent with its keys) and the chain verifier of its own CA and CRLs.
pub struct SecAggIdentity {
    key: Arc<IdentityKey>,
    certificate: Vec<u8>,
    chains: ApprovalVerifier,
}

impl std::fmt::Debug for SecAggIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecAggIdentity(key hidden)")
    }
}

impl SecAggIdentity {
    /// From the node's TLS material (its key must be PKCS#8, ECDSA P-256 or Ed25519, as
    /// `tutela pki` writes it).
    pub fn from_tls(material: &TlsMaterial) -> Result<Self, String> {
        let rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8) = material.key.as_ref() else {
            return Err("the node's key is not PKCS#8 (`tutela pki` writes PKCS#8)".into());
        };
        let pem = tutela_protocol::pki::pem_encode("PRIVATE KEY", pkcs8.secret_pkcs8_der());
        let key = IdentityKey::from_pkcs8_pem(&pem).map_err(|e| e.to_string())?;
        let certificate = material
            .chain
            .first()
            .ok_or("the node's certificate chain is empty")?
            .as_ref()
            .to_vec();
        let chains = ApprovalVerifier::from_tls(material).map_err(|e| e.to_string())?;
        Ok(SecAggIdentity {
            key: Arc::new(key),
            certificate,
            chains,
        })
    }

    /// Site `peer`'s node certificate, as relayed: it must chain to this node's CA, not be
    /// revoked, and name the node of `site` (the participant list's entry at `peer`).
    fn check_certificate(&self, peer: SiteIndex, site: &str, der: &[u8]) -> Result<(), String> {
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let named = self
            .chains
            .verify_certificate(&[der.to_vec()], now_ms)
            .map_err(|e| format!("site {peer}'s certificate ({site}): {e}"))?;
        if named.principal
            != (Principal::Node {
                site: site.to_string(),
            })
        {
            return Err(format!(
                "the certificate relayed for site {peer} names {named}, not the node of {site}"
            ));
        }
        Ok(())
    }
}

/// The neighbours' certificates, filled in when the keys relay arrives (after this node has
/// advertised its own keys), each checked by [`SecAggIdentity::check_certificate`] first.
#[derive(Default)]
struct RelayedCertificates {
    der: RwLock<BTreeMap<SiteIndex, Vec<u8>>>,
}

impl KeyVerifier for RelayedCertificates {
    fn verify(&self, site: SiteIndex, message: &[u8], signature: &[u8]) -> Result<(), String> {
        let der = self.der.read().unwrap_or_else(|p| p.into_inner());
        let der = der
            .get(&site)
            .ok_or_else(|| format!("no certificate was relayed for site {site}"))?;
        tutela_protocol::pki::verify_signed_by_certificate(der, message, signature)
            .map_err(|e| format!("its signature: {e}"))
    }
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
    /// The neighbours' certificates, checked at the keys relay; the consistency check verifies
    /// their survivor-list signatures with them.
    certificates: Arc<RelayedCertificates>,
    /// `[privacy] mode = "distributed"`: this site's noise share and its own release check.
    distributed: Option<RecordLevelPlan>,
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
    // Planned from the signed spec and the model's size, as the coordinator plans it.
    let distributed = tutela_protocol::job::distributed::plan(&spec, vector_len as usize)
        .map_err(|e| refuse(format!("the job spec: {e}")))?;
    let identity = shared
        .secagg_identity
        .clone()
        .ok_or_else(|| refuse("this node has no signing key (see its start-up log)"))?;
    let certificates = Arc::new(RelayedCertificates::default());
    let signer: Arc<dyn KeySigner> = identity.key.clone();
    let (state, advert) = ClientAdvertising::new(config.clone(), me as u32)
        .map_err(protocol)?
        .with_signed_keys(signer, certificates.clone())
        .advertise_keys()
        .map_err(protocol)?;
    let request = wire::advertise_request(&advert, &identity.certificate);
    let ServerRelay::SignedKeys {
        keys,
        certificates: relayed,
    } = send(shared, &task.task_id, Some(request)).await?
    else {
        return Err(refuse(
            "the coordinator relayed the neighbours' keys without their certificates",
        ));
    };
    {
        let mut held = certificates.der.write().unwrap_or_else(|p| p.into_inner());
        for key in &keys.keys {
            let site = participants.get(key.peer as usize).ok_or_else(|| {
                refuse(format!(
                    "a key from site index {}, outside the list",
                    key.peer
                ))
            })?;
            let der = relayed.get(&key.peer).ok_or_else(|| {
                refuse(format!(
                    "no certificate came with site {}'s key ({site})",
                    key.peer
                ))
            })?;
            identity
                .check_certificate(key.peer, site, der)
                .map_err(refuse)?;
            held.insert(key.peer, der.clone());
        }
    }
    let (state, share) = state.share_keys(keys).map_err(protocol)?;
    tracing::info!(
        task = %task.task_id,
        round = task.round,
        attempt = task.attempt,
        "secure aggregation: neighbours' keys and certificates checked; sharing seeds"
    );
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
        certificates,
        distributed,
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
        if shared.testing.record_unmasked_updates {
            record_unmasked(shared, &self.task_id, &flat);
        }
        if flat.len() as u64 != self.config.vector_len {
            return Err(refuse(format!(
                "the update has {} parameters, the round {}",
                flat.len(),
                self.config.vector_len
            )));
        }
        // Distributed DP: this site's share of the sum's noise, in grid steps (checked in range
        // when the plan was made), on plain randomized rounding (β = 0: the sensitivity is one
        // row's, s·C + √d grid steps, which conditioning on the whole update's norm would not
        // keep). The update is still clipped to update_norm_bound (a projection: it keeps the
        // ring from wrapping and does not raise a row's sensitivity).
        let noise = self.distributed.as_ref().map(|p| p.site_noise_grid);
        let mut params = self.spec.encode_params(self.norm_bound, noise);
        if self.distributed.is_some() {
            params.rounding_beta = 0.0;
        }
        let (state, masked) = self
            .state
            .masked_update(self.shares, &flat, &params)
            .map_err(refuse)?;
        drop(flat);
        let bytes: Vec<u8> = masked.masked.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = TensorSpec::new(MASKED_TENSOR, DType::I64, vec![self.config.vector_len]);
        let receipt = upload(shared, vec![(tensor, bytes)], metadata).await?;
        tracing::info!(
            task = %self.task_id,
            "secure aggregation: masked update uploaded; waiting for the survivor list"
        );
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
        let survivors = survivors_of(&request);
        // The consistency check: sign the list, then unmask only if enough neighbours signed it.
        let (state, confirmation) = state.confirm(request).map_err(refuse)?;
        let ServerRelay::Confirmed(confirmed) = send(
            shared,
            &self.task_id,
            wire::request_message(&ClientMessage::from(confirmation)),
        )
        .await?
        else {
            return Err(Failure::Coordinator(
                "SecAgg: the coordinator answered the survivor-list confirmation with something \
                 else"
                    .into(),
            ));
        };
        // `unmask` refuses a list other than the one signed, so `survivors` is the verified one.
        let response = state.unmask(confirmed).map_err(refuse)?;
        // Distributed DP: this site's own release check on the confirmed survivor list (never
        // the coordinator's word): with too few survivors, or more than the plan allows, it
        // reveals nothing and its update stays masked.
        // Its ledger charged this round at the plan's minimum of survivors before the masked
        // input left; more survivors only add noise.
        if let Some(plan) = &self.distributed {
            let noise_multiplier = plan
                .check_release(survivors)
                .map_err(|e| refuse(format!("distributed DP: this site refuses to unmask: {e}")))?;
            tracing::info!(
                task = %self.task_id,
                survivors,
                noise_multiplier_at_this_survivor_count = noise_multiplier,
                charged_noise_multiplier = plan.dp_sgd.effective_noise_multiplier,
                planned_epsilon = plan.dp_sgd.planned_epsilon,
                "distributed DP: the release is within the plan"
            );
        }
        drop(self.certificates);
        tracing::info!(
            task = %self.task_id,
            survivors,
            "secure aggregation: the survivor list is confirmed by the neighbours; unmasking"
        );
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

/// How many survivors a survivor list names.
fn survivors_of(request: &UnmaskRequest) -> usize {
    request.survivors.len()
}

/// `[testing] record_unmasked_updates`: the plain update, beside the node's models.
fn record_unmasked(shared: &Shared, task_id: &str, flat: &[f32]) {
    let dir = shared
        .models_dir
        .parent()
        .unwrap_or(&shared.models_dir)
        .join("testing-unmasked");
    let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(format!("{task_id}.f32")), bytes));
    if let Err(e) = written {
        tracing::warn!(error = %e, "testing.record_unmasked_updates: not written");
    }
}
