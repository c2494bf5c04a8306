//! Checking a compliance officer's approval or rejection before it is recorded.
//!
//! A `job.approved` / `job.rejected` event's payload must carry:
//! - `spec_digest`: the job spec's SHA-256 digest, 64 lowercase hex digits
//!   (`tutela_protocol::job::JobSpec::digest`);
//! - `signature`: the officer's signature, lowercase hex: ECDSA P-256 SHA-256 (ASN.1 DER) or
//!   Ed25519, whichever key `tutela pki` issued the officer;
//! - `certificate`: the officer's certificate, PEM;
//! - `site` (optional): the site the officer decides for; when present the certificate must be a
//!   user of that site.
//!
//! What the signature is over depends on the action ([`verify_officer_payload`]):
//! - `job.approved`: the policy crate's domain-separated approval message
//!   (`tutela_protocol::job::approval_message`, context `tutela/job-approval/v1`: job id = the
//!   event's subject, digest, window), so the payload must carry `signed_at_ms` and
//!   `expires_at_ms`. The legacy form, a signature over the 32 digest bytes alone, is refused: it
//!   is not bound to the job id, so an identical spec resubmitted as a new job could reuse it
//!   (the coordinator and the nodes have never accepted it; the trail no longer does either);
//! - `job.rejected`: always the rejection message (`tutela_protocol::job::rejection_message`,
//!   context `tutela/job-rejection/v1`: job id = the event's subject, digest, `signed_at_ms`,
//!   `reason`), so the payload must also carry `reason` and `signed_at_ms`. There is no
//!   bare-digest form: a signature over the digest alone does not say whether it approves or
//!   rejects, and the rejection message's own context means no approval signature verifies as a
//!   rejection, nor a rejection signature as an approval.
//!
//! The certificate must name a site user (`spiffe://<consortium>/site/<site>/user/<name>`), chain
//! to the consortium CA and not be revoked (the service passes a [`ChainCheck`] over its TLS
//! material), and the signature must verify with its public key. Otherwise the event is refused
//! and nothing is stored.
//!
//! The message and the signature check are the protocol crate's (`tutela_protocol::job::
//! approval_message`, `tutela_protocol::pki::verify_signed_by_certificate`), shared with the
//! policy crate, so that the audit service does not link the policy engine (casbin).

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tutela_protocol::identity::{Identity, Principal};

use crate::event::Action;

/// Checks that a certificate chain (leaf first) chains to the consortium CA and is not revoked.
pub type ChainCheck = Arc<dyn Fn(&[CertificateDer<'static>]) -> Result<(), String> + Send + Sync>;

/// Why an approval was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("approval payload: `{0}` is missing or not a string")]
    Missing(&'static str),
    #[error("approval payload: `{field}` {problem}")]
    Malformed {
        field: &'static str,
        problem: String,
    },
    #[error("approval certificate names {0}, which is not a site user (compliance officer)")]
    NotAnOfficer(String),
    #[error("approval certificate names {identity}, not a user of site {site:?}")]
    WrongSite { identity: String, site: String },
    #[error("approval certificate does not chain to the consortium CA or is revoked: {0}")]
    Untrusted(String),
    #[error("approval certificate's key type {0} is not ECDSA P-256 or Ed25519")]
    UnsupportedKey(String),
    #[error(
        "the officer's signature over spec digest {spec_digest} does not verify with the certificate of {identity}"
    )]
    BadSignature {
        spec_digest: String,
        identity: String,
    },
    #[error("{0} is not an officer's signed decision (only job.approved and job.rejected are)")]
    NotADecision(Action),
}

/// What a verified approval or rejection established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedApproval {
    pub officer: Identity,
    pub spec_digest: [u8; 32],
    /// The message the signature is over (what makes two decisions the same one).
    pub message: Vec<u8>,
}

fn field<'a>(payload: &'a serde_json::Value, name: &'static str) -> Result<&'a str, ApprovalError> {
    payload
        .get(name)
        .and_then(|v| v.as_str())
        .ok_or(ApprovalError::Missing(name))
}

/// The message `tutela_policy::approval::signed_message` signs: both use the one definition in
/// the protocol crate, so the audit service checks approvals without linking the policy engine.
pub use tutela_protocol::job::approval_message as policy_signed_message;

/// The message `tutela_policy::approval::rejection_signed_message` signs, from the same one
/// definition.
pub use tutela_protocol::job::rejection_message as policy_rejection_message;

/// Checks the payload of a `job.approved` or `job.rejected` event for job `subject` against what
/// `action` says it is (see the module documentation); `chain` checks the certificate's trust.
/// Refuses unless everything holds, and refuses every other action.
pub fn verify_officer_payload(
    action: Action,
    subject: &str,
    payload: &serde_json::Value,
    chain: Option<&ChainCheck>,
) -> Result<VerifiedApproval, ApprovalError> {
    match action {
        Action::JobApproved => verify_approval_payload(subject, payload, chain),
        Action::JobRejected => verify_rejection_payload(subject, payload, chain),
        other => Err(ApprovalError::NotADecision(other)),
    }
}

/// Checks a `job.rejected` payload for job `subject`: the officer's certificate and its trust as
/// for an approval, and the signature over the rejection message of `subject`, `spec_digest`,
/// `signed_at_ms` and `reason`.
pub fn verify_rejection_payload(
    subject: &str,
    payload: &serde_json::Value,
    chain: Option<&ChainCheck>,
) -> Result<VerifiedApproval, ApprovalError> {
    let reason = field(payload, "reason")?;
    if let Some(problem) = tutela_protocol::job::rejection_reason_problem(reason) {
        return Err(ApprovalError::Malformed {
            field: "reason",
            problem,
        });
    }
    let signed_at_ms =
        payload
            .get("signed_at_ms")
            .and_then(|v| v.as_i64())
            .ok_or(ApprovalError::Malformed {
                field: "signed_at_ms",
                problem: "is missing or not an integer (unix milliseconds)".to_string(),
            })?;
    verify_signed_payload(payload, chain, |digest_hex, _| {
        policy_rejection_message(subject, digest_hex, reason, signed_at_ms)
    })
}

/// Checks a `job.approved` payload for job `subject` (see the module documentation); `chain`
/// checks the certificate's trust. Refuses unless everything holds. A `job.rejected` payload is
/// checked by [`verify_rejection_payload`]; [`verify_officer_payload`] picks by action.
pub fn verify_approval_payload(
    subject: &str,
    payload: &serde_json::Value,
    chain: Option<&ChainCheck>,
) -> Result<VerifiedApproval, ApprovalError> {
    let window_end = |name: &'static str| {
        payload
            .get(name)
            .and_then(|v| v.as_i64())
            .ok_or(ApprovalError::Malformed {
                field: name,
                problem: "is missing or not an integer (unix milliseconds): an approval is \
                          signed over its job id, digest and validity window, never over the \
                          bare digest"
                    .to_string(),
            })
    };
    let (from, until) = (window_end("signed_at_ms")?, window_end("expires_at_ms")?);
    verify_signed_payload(payload, chain, |digest_hex, _| {
        policy_signed_message(subject, digest_hex, from, until)
    })
}

/// The checks approvals and rejections share: the digest, the certificate naming a site user
/// (of `site`, when the payload names one) that the consortium CA vouches for, and the signature
/// over `message(digest_hex, digest)`.
fn verify_signed_payload(
    payload: &serde_json::Value,
    chain: Option<&ChainCheck>,
    message: impl FnOnce(&str, &[u8; 32]) -> Vec<u8>,
) -> Result<VerifiedApproval, ApprovalError> {
    let digest_hex = field(payload, "spec_digest")?;
    let spec_digest = crate::hexser::decode_fixed::<32>(digest_hex).map_err(|problem| {
        ApprovalError::Malformed {
            field: "spec_digest",
            problem,
        }
    })?;
    let signature =
        hex::decode(field(payload, "signature")?).map_err(|e| ApprovalError::Malformed {
            field: "signature",
            problem: format!("is not hex: {e}"),
        })?;
    let pem = field(payload, "certificate")?;
    let der = pem_to_der(pem)?;
    let officer =
        tutela_protocol::pki::identity_of_cert_der(&der).map_err(|e| ApprovalError::Malformed {
            field: "certificate",
            problem: e.to_string(),
        })?;
    let Principal::User { site, .. } = &officer.principal else {
        return Err(ApprovalError::NotAnOfficer(officer.uri()));
    };
    if let Some(claimed) = payload.get("site").and_then(|s| s.as_str())
        && claimed != site
    {
        return Err(ApprovalError::WrongSite {
            identity: officer.uri(),
            site: claimed.to_string(),
        });
    }
    if let Some(check) = chain {
        check(&[CertificateDer::from(der.clone())]).map_err(ApprovalError::Untrusted)?;
    }
    let message = message(digest_hex, &spec_digest);
    verify_signature(&der, &message, &signature).map_err(|e| match e {
        ApprovalError::BadSignature { .. } => ApprovalError::BadSignature {
            spec_digest: digest_hex.to_string(),
            identity: officer.uri(),
        },
        other => other,
    })?;
    Ok(VerifiedApproval {
        officer,
        spec_digest,
        message,
    })
}

pub(crate) fn pem_to_der(pem: &str) -> Result<Vec<u8>, ApprovalError> {
    let bad = |problem: String| ApprovalError::Malformed {
        field: "certificate",
        problem,
    };
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| bad(format!("is not a PEM certificate: {e}")))?;
    if p.label != "CERTIFICATE" {
        return Err(bad(format!("is a PEM {:?}, not a CERTIFICATE", p.label)));
    }
    Ok(p.contents)
}

/// Verifies `signature` over `message` with the public key of the DER certificate `der`.
pub fn verify_signature(der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), ApprovalError> {
    use tutela_protocol::pki::{CertSignatureError, verify_signed_by_certificate};
    verify_signed_by_certificate(der, message, signature).map_err(|e| match e {
        CertSignatureError::Certificate(e) => ApprovalError::Malformed {
            field: "certificate",
            problem: format!("is not an X.509 certificate: {e}"),
        },
        CertSignatureError::UnsupportedKey(oid) => ApprovalError::UnsupportedKey(oid),
        CertSignatureError::BadSignature => ApprovalError::BadSignature {
            spec_digest: hex::encode(message),
            identity: String::new(),
        },
    })
}
