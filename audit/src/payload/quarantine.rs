//! The quarantine of forged rows (`tutela audit quarantine`; see `docs/runbooks/audit-forged-row.md`).

use serde::{Deserialize, Serialize};

use super::ActionPayload;
use crate::event::Action;

/// One row moved out of the log, as it was stored (its payload stays in `audit_quarantine`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantinedRow {
    pub seq: u64,
    /// The row's `hash` column, as stored (64 hex digits on a well-formed row).
    pub hash: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
}

/// What the operator and the officers sign: exactly these rows of this log, for this reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineTerms {
    /// The log's id (`spiffe://<consortium>/audit`).
    pub log_id: String,
    /// The first quarantined seq: every row from it on (the log's unanchored tail).
    pub from_seq: u64,
    pub rows: Vec<QuarantinedRow>,
    pub reason: String,
    /// The sites whose officers' quorum (the policy's `p2` rules) the order needs.
    pub sites: Vec<String>,
    /// When the order was drawn up (unix milliseconds).
    pub created_at_ms: i64,
}

/// One principal's signature over [`crate::quarantine::terms_message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineSignature {
    /// The signer's certificate, PEM; readers take the identity from it.
    pub certificate: String,
    /// Hex.
    pub signature: String,
}

/// `audit.quarantined` (subject: `seq/<from_seq>`), and the order file `tutela audit
/// quarantine` passes between the operator and the officers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuarantined {
    pub terms: QuarantineTerms,
    /// The consortium operator who ordered it.
    #[serde(default)]
    pub operator: Option<QuarantineSignature>,
    /// The officers who countersigned it.
    #[serde(default)]
    pub approvals: Vec<QuarantineSignature>,
    /// What the policy asked, as `signer (role of domain)`, filled when it was applied.
    #[serde(default)]
    pub quorum: Vec<String>,
    /// SHA-256 of the policy in force when it was applied, hex.
    #[serde(default)]
    pub policy_digest: String,
}

impl ActionPayload for AuditQuarantined {
    const ACTION: Action = Action::AuditQuarantined;
}
