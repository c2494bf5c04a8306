//! The payloads of a job's life: proposal, officers' decisions, start, rounds, refusals, the end,
//! publication. Written by the coordinator (and, for a node's own refusal, by the node).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ActionPayload;
use crate::event::Action;

/// `job.proposed` (subject: the job id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobProposed {
    /// The spec's SHA-256 digest, 64 lowercase hex digits: what officers sign.
    pub spec_digest: String,
    pub code_version: String,
    pub base_model: String,
    pub name: String,
    /// The submitting operator's identity, when the coordinator knows it.
    #[serde(default)]
    pub operator: Option<String>,
    /// The sites the job lists: only their officers' decisions count.
    pub participants: Vec<String>,
    /// Per listed site, the identities the consortium policy lets decide for it (holders, in
    /// `site:<site>`, of a role the job's quorum rules ask to approve), as the coordinator's
    /// policy said at the proposal. Only their signed decisions count; a proposal without it (no
    /// policy, or written before it existed) admits no officer's decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<std::collections::BTreeMap<String, Vec<String>>>,
    pub rounds: u32,
    /// The job's DP parameters, as the spec states them.
    #[serde(default)]
    pub privacy: serde_json::Value,
    /// A language model's tokenizer, as the signed spec names it (`model.tokenizer_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
    /// A language model's base checkpoint, as the signed spec names it (`model.base_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// The spec's `[lora]` section (rank, alpha, target modules, aggregation rule): the job
    /// trains and publishes adapters only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<serde_json::Value>,
}

impl ActionPayload for JobProposed {
    const ACTION: Action = Action::JobProposed;
}

/// `job.approved` (subject: the job id): an officer's signature, relayed by the coordinator or
/// appended by the officer. See [`crate::approval`] for what the signature is over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobApproved {
    pub spec_digest: String,
    /// Hex.
    pub signature: String,
    /// The officer's certificate, PEM.
    pub certificate: String,
    #[serde(default)]
    pub site: Option<String>,
    /// The officer's identity as the writer read it; readers take the certificate's.
    #[serde(default)]
    pub officer: Option<String>,
    #[serde(default)]
    pub signed_at_ms: Option<i64>,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

impl ActionPayload for JobApproved {
    const ACTION: Action = Action::JobApproved;
}

/// `job.rejected` (subject: the job id): an officer's signed rejection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRejected {
    pub spec_digest: String,
    pub signature: String,
    pub certificate: String,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub officer: Option<String>,
    pub reason: String,
    pub signed_at_ms: i64,
}

impl ActionPayload for JobRejected {
    const ACTION: Action = Action::JobRejected;
}

/// `job.started` (subject: the job id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStarted {
    pub spec_digest: String,
    /// How many approvals counted.
    pub approvals: u64,
    pub participants: Vec<String>,
}

impl ActionPayload for JobStarted {
    const ACTION: Action = Action::JobStarted;
}

/// `model.initialized` (subject: the job id): the job's first global model, and who supplied it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInitialized {
    /// The model's SHA-256 digest (its id in the coordinator's model store), hex.
    pub model_digest: String,
    /// The site whose node sent it.
    pub site: String,
    /// The attempt (of the job's initialization) it answered.
    pub attempt: u32,
}

impl ActionPayload for ModelInitialized {
    const ACTION: Action = Action::ModelInitialized;
}

/// One site's figures in a `round.completed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRoundMetrics {
    /// ε spent by the job at this site so far (the site accountant's value).
    #[serde(default)]
    pub epsilon: Option<f64>,
    #[serde(default)]
    pub round_epsilon: Option<f64>,
    #[serde(default)]
    pub delta: Option<f64>,
    #[serde(default)]
    pub dataset_commitment: Option<String>,
    #[serde(default)]
    pub train_samples: Option<u64>,
    #[serde(default)]
    pub eval_accuracy: Option<f64>,
}

/// `round.completed` (subject: the job id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundCompleted {
    pub round: u32,
    #[serde(default)]
    pub attempt: u32,
    pub participants: Vec<String>,
    /// Site -> update digest.
    #[serde(default)]
    pub update_digests: BTreeMap<String, String>,
    /// Site -> its figures.
    #[serde(default)]
    pub metrics: BTreeMap<String, SiteRoundMetrics>,
    /// The global model after the round.
    #[serde(default)]
    pub model_id: Option<String>,
    /// A robust aggregation rule's report (which sites it excluded or trimmed most); absent for
    /// FedAvg's weighted sum, and in rounds recorded before robust rules existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<RobustAggregation>,
}

/// What a robust aggregation rule did in a round (`round.completed`'s `aggregation`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobustAggregation {
    /// The rule with its parameters: `median`, `trimmed_mean(beta=0.2)`, `multi_krum(f=1, m=3)`.
    pub rule: String,
    /// Sites whose update was left out entirely (Multi-Krum's unselected).
    #[serde(default)]
    pub excluded: Vec<String>,
    /// Site -> the fraction of the model's coordinates at which its value was discarded
    /// (trimmed, an extreme the median ignored, or 1 for an excluded update).
    #[serde(default)]
    pub trimmed: BTreeMap<String, f64>,
}

impl ActionPayload for RoundCompleted {
    const ACTION: Action = Action::RoundCompleted;
}

/// `update.refused` (subject: the job id): a task that brought nothing (a node's decline, an
/// update the coordinator refused, a missed deadline; round 0 is the initial-model task).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRefused {
    pub round: u32,
    #[serde(default)]
    pub attempt: u32,
    /// The site whose task it was; a node may only name its own.
    pub site: String,
    pub reason: String,
}

impl ActionPayload for UpdateRefused {
    const ACTION: Action = Action::UpdateRefused;
}

/// `job.completed` (subject: the job id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCompleted {
    pub model_digest: String,
    pub rounds: u32,
    /// Site -> total ε spent by the job.
    #[serde(default)]
    pub epsilon: BTreeMap<String, f64>,
}

impl ActionPayload for JobCompleted {
    const ACTION: Action = Action::JobCompleted;
}

/// `job.failed` (subject: the job id): failed, or cancelled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFailed {
    /// `failed` or `cancelled`.
    pub state: String,
    pub reason: String,
}

impl ActionPayload for JobFailed {
    const ACTION: Action = Action::JobFailed;
}

/// `model.published` (subject: the model digest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPublished {
    pub job: String,
    pub model_digest: String,
    pub spec_digest: String,
    pub rounds: u32,
    pub code_version: String,
    #[serde(default)]
    pub base_model: Option<String>,
}

impl ActionPayload for ModelPublished {
    const ACTION: Action = Action::ModelPublished;
}

/// `watermark.registered` (subject: the published model's digest): the job's final model was
/// watermarked before publication (`tutela_protocol::watermark`). The key itself is never here:
/// a verifier holding it checks `key_commitment` and derives the model's mark key from
/// `mark_id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkRegistered {
    pub job: String,
    /// The published (watermarked) model's digest, as the subject.
    pub model_digest: String,
    /// The unmarked aggregate it was made from (the last round's global model).
    pub source_digest: String,
    /// `spread_spectrum_v1`.
    pub scheme: String,
    /// SHA-256 commitment to the consortium's watermark key, hex.
    pub key_commitment: String,
    /// What the model's mark key is derived from with the consortium key (the job id).
    pub mark_id: String,
    /// The amplitude embedded, relative to each tensor's standard deviation.
    pub amplitude: f64,
    /// The detection z-score the unaltered published model shows.
    pub expected_z: f64,
    /// The p-value at or below which a verifier reports the mark detected.
    pub threshold: f64,
}

impl ActionPayload for WatermarkRegistered {
    const ACTION: Action = Action::WatermarkRegistered;
}
