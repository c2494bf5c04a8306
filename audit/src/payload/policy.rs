//! `policy.decision`: a decision of the consortium policy (the coordinator's or the audit
//! service's enforcement layer, or the audit service refusing what a caller may not assert).

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
