//! Quarantining forged rows: the one way rows leave the audit log, and never by deletion.
//!
//! A row written into the database past the service (with the application role's INSERT, or by a
//! superuser) is never covered by a signed checkpoint: the service signs one in every commit
//! (`checkpoint_every = 1`), so such a row is the log's unanchored tail, and the service refuses
//! to open the log over it ([`crate::log::LogError::Unanchored`]), or, if it was running, halts
//! at its next append instead of chaining onto it. Genuine rows therefore never follow a forged
//! one. The remedy (`docs/runbooks/audit-forged-row.md`):
//!
//! 1. `tutela audit quarantine plan` reads the tail from the first unanchored seq and writes the
//!    order's terms ([`QuarantineTerms`]: each row's seq, hash, actor, action, subject; the reason;
//!    the sites whose officers must countersign);
//! 2. a consortium operator and the policy's quorum of officers sign the terms (`tutela audit
//!    quarantine sign`), each with the key of their certificate, over [`terms_message`];
//! 3. `tutela audit quarantine apply`, run as the tables' owner with the service stopped,
//!    re-checks everything ([`apply::apply`]: the rows are still exactly those, none covered by a
//!    checkpoint; every signature chains to the consortium CA; the operator may `quarantine` the
//!    `audit` object in the consortium; the officers meet the policy's `p2` quorum over the
//!    order's sites) and moves the rows into `audit_quarantine` in one transaction (the database
//!    refuses to delete a row from `audit_events` that has no copy there, or that a checkpoint
//!    covers);
//! 4. the service, at its next start, finds the order not yet on the record and appends it as
//!    `audit.quarantined`, as itself, at the seq of the first quarantined row, before anything
//!    else. Every reader re-checks its signatures ([`verify_signatures`], through the trail's
//!    authority rules).
//!
//! A forged row *inside* the signed part of the log (an edited or deleted anchored row) is not
//! quarantined: the checkpoint proves what the genuine row was; the runbook restores it.

#[cfg(feature = "server")]
pub mod apply;

use rustls_pki_types::CertificateDer;
use tutela_protocol::identity::{Identity, Principal};

use crate::approval::{ChainCheck, pem_to_der, verify_signature};
use crate::payload::{AuditQuarantined, QuarantineSignature, QuarantineTerms};

/// The domain-separation context of a quarantine order's signatures.
pub const CONTEXT: &str = "tutela/audit-quarantine/v1";

/// The policy object and action an operator must be allowed (in the `consortium` domain) to
/// order a quarantine: `p, operator, consortium, audit, quarantine, allow`.
pub const POLICY_OBJECT: &str = "audit";
pub const POLICY_ACTION: &str = "quarantine";

/// The bytes every signer signs: the context, then the terms as RFC 8785 canonical JSON.
pub fn terms_message(terms: &QuarantineTerms) -> Vec<u8> {
    let value = serde_json::to_value(terms).unwrap_or(serde_json::Value::Null);
    let mut m = format!("{CONTEXT}\n").into_bytes();
    m.extend_from_slice(crate::canonical_json(&value).as_bytes());
    m
}

/// Who signed an order, once every signature verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderSigners {
    pub operator: Identity,
    pub officers: Vec<Identity>,
}

/// Checks every signature of `order` over its terms (each certificate chaining to the consortium
/// CA when `chain` is given): the operator's must be a consortium operator's, the approvals
/// distinct site users', at least one. Says which signature fails and why.
pub fn verify_signatures(
    order: &AuditQuarantined,
    chain: Option<&ChainCheck>,
) -> Result<OrderSigners, String> {
    let message = terms_message(&order.terms);
    let operator = order
        .operator
        .as_ref()
        .ok_or_else(|| "no operator signed the order".to_string())?;
    let operator = verify_one(operator, &message, chain).map_err(|e| format!("operator: {e}"))?;
    if !matches!(operator.principal, Principal::Operator { .. }) {
        return Err(format!(
            "the ordering signature is {operator}'s, not a consortium operator's"
        ));
    }
    if order.approvals.is_empty() {
        return Err("no officer countersigned the order".to_string());
    }
    let mut officers: Vec<Identity> = Vec::new();
    for (i, s) in order.approvals.iter().enumerate() {
        let officer =
            verify_one(s, &message, chain).map_err(|e| format!("approval {}: {e}", i + 1))?;
        if !matches!(officer.principal, Principal::User { .. }) {
            return Err(format!(
                "approval {}: {officer} is not a site user (an officer)",
                i + 1
            ));
        }
        if officers.contains(&officer) {
            return Err(format!("{officer} countersigned twice"));
        }
        officers.push(officer);
    }
    Ok(OrderSigners { operator, officers })
}

fn verify_one(
    s: &QuarantineSignature,
    message: &[u8],
    chain: Option<&ChainCheck>,
) -> Result<Identity, String> {
    let der = pem_to_der(&s.certificate).map_err(|e| e.to_string())?;
    let signer = tutela_protocol::pki::identity_of_cert_der(&der).map_err(|e| e.to_string())?;
    if let Some(check) = chain {
        check(&[CertificateDer::from(der.clone())]).map_err(|e| {
            format!("{signer}'s certificate does not chain to the consortium CA: {e}")
        })?;
    }
    let signature = hex::decode(&s.signature).map_err(|e| format!("signature is not hex: {e}"))?;
    verify_signature(&der, message, &signature)
        .map_err(|_| format!("the signature of {signer} does not verify over these terms"))?;
    Ok(signer)
}
