//! The model registry's payloads: a published model's name and version, and the signed moves of
//! its stages (`tutela_protocol::release`). Written by the coordinator; read by lineage and
//! re-checked by every reader of the trail ([`crate::stage`]).

use serde::{Deserialize, Serialize};
use tutela_protocol::release::{MoveKind, VersionMove};

use super::ActionPayload;
use crate::event::Action;

/// `model.registered` (subject: `<name>/v<version>`): a published model became a version of a
/// registry name, as a candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRegistered {
    pub name: String,
    pub version: u64,
    pub model_digest: String,
    pub job: String,
    pub spec_digest: String,
}

impl ActionPayload for ModelRegistered {
    const ACTION: Action = Action::ModelRegistered;
}

impl ModelRegistered {
    /// The event's subject.
    pub fn subject(&self) -> String {
        format!("{}/v{}", self.name, self.version)
    }
}

/// One principal's signature of a stage move (`tutela_protocol::release::stage_move_message`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSignature {
    /// The signer's identity as the coordinator read it; readers take the certificate's.
    pub signer: String,
    /// The signer's certificate, PEM.
    pub certificate: String,
    /// Hex.
    pub signature: String,
    pub signed_at_ms: i64,
}

/// `model.stage_changed` (subject: the name): versions moved between stages by a promotion or a
/// rollback, once the policy's quorum of signatures was met.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStageChanged {
    pub name: String,
    pub kind: MoveKind,
    pub moves: Vec<VersionMove>,
    pub reason: String,
    /// The name's move number (from 1).
    pub move_no: u64,
    /// Every signature that counted, each over the same move and reason.
    pub signatures: Vec<StageSignature>,
    /// What the policy asked, as `signer (role of domain)` per signature that met a requirement.
    #[serde(default)]
    pub quorum: Vec<String>,
    /// SHA-256 of the policy in force when the quorum was met, hex.
    pub policy_digest: String,
}

impl ActionPayload for ModelStageChanged {
    const ACTION: Action = Action::ModelStageChanged;
}
