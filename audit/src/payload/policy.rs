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
