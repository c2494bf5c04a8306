//! `policy.decision`: a decision of the consortium policy (the coordinator's or the audit
//! service's enforcement layer, or the audit service refusing what a caller may not assert);
//! `policy.loaded`: the policy's text, for readers that re-check decisions under it.

use serde::{Deserialize, Serialize};

use super::ActionPayload;
use crate::event::Action;

/// `policy.decision` (subject: `<object>/<action>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDecision {
    /// The caller's identity.
    pub who: String,
    /// The gRPC method.
    pub method: String,
    pub domain: String,
    pub object: String,
    pub action: String,
    pub allowed: bool,
    /// The rule that decided (a policy line, or the audit trail's authority rule).
    pub rule: String,
    /// SHA-256 of the policy in force, hex.
    pub policy_digest: String,
}

impl ActionPayload for PolicyDecision {
    const ACTION: Action = Action::PolicyDecision;
}

impl PolicyDecision {
    /// The record of `decision` about `caller` calling `method`: one shape for the coordinator's
    /// and the audit service's decisions, so one query finds every decision of the consortium.
    pub fn of(
        decision: &tutela_policy::Decision,
        caller: &tutela_protocol::identity::Identity,
        method: &str,
    ) -> PolicyDecision {
        PolicyDecision {
            who: caller.uri(),
            method: method.to_string(),
            domain: decision.domain.clone(),
            object: decision.object.clone(),
            action: decision.action.clone(),
            allowed: decision.allowed,
            rule: decision.rule.clone(),
            policy_digest: decision.policy_digest.to_hex(),
        }
    }
}

/// `policy.loaded` (subject: the digest): the consortium policy the coordinator decides stage
/// moves under, as the files' text; `digest` is `tutela_policy::PolicyDigest::of(model,
/// policy)`, which every reader recomputes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyLoaded {
    /// SHA-256 over both files, hex (what `policy_digest` fields name).
    pub digest: String,
    /// The casbin model file's text.
    pub model: String,
    /// The policy file's text.
    pub policy: String,
}

impl ActionPayload for PolicyLoaded {
    const ACTION: Action = Action::PolicyLoaded;
}

impl PolicyLoaded {
    /// The record of a loaded policy.
    pub fn of(text: &tutela_policy::authz::PolicyText) -> PolicyLoaded {
        PolicyLoaded {
            digest: text.digest.to_hex(),
            model: text.model.clone(),
            policy: text.policy.clone(),
        }
    }

    /// The digest recomputed from the text, hex.
    pub fn recomputed_digest(&self) -> String {
        tutela_policy::PolicyDigest::of(self.model.as_bytes(), self.policy.as_bytes()).to_hex()
    }
}
