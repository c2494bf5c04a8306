//! The CA administrator's payloads (`tutela pki issue|sign|revoke --audit`).

use serde::{Deserialize, Serialize};

use super::ActionPayload;
use crate::event::Action;

/// `certificate.issued` (subject: the certificate's SPIFFE identity).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateIssued {
    /// Hex.
    pub serial: String,
    /// SHA-256 of the DER, 64 hex digits.
    pub sha256_fingerprint: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
}

impl ActionPayload for CertificateIssued {
    const ACTION: Action = Action::CertificateIssued;
}

/// `certificate.revoked` (subject: the certificate's SPIFFE identity).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRevoked {
    pub serial: String,
    pub reason: String,
    /// The number of the CRL that lists it.
    pub crl_number: u64,
}

impl ActionPayload for CertificateRevoked {
    const ACTION: Action = Action::CertificateRevoked;
}
