//! The consortium PKI: one CA per consortium issues every certificate.
//!
//! - [`CertificateAuthority`]: an in-memory CA (certificate and key). It issues leaf certificates
//!   for [`Principal`]s, signs CSRs made elsewhere (for the identity the CA operator names, never the
//!   one the CSR claims), and signs CRLs.
//! - [`CaDir`]: a CA kept in a directory (`ca.crt`, `ca.key`, `index.json`, `crl.pem`) that
//!   records every certificate it issues, so that it can revoke them and publish a current CRL.
//! - [`make_csr`]: a key and a certificate signing request made where the key is to stay.
//! - [`describe`], [`identity_of_cert_der`], [`serial_of_cert_der`]: reading certificates, CRLs
//!   and CSRs back.
//! - [`files`]: writing keys and certificates without clobbering anything by accident.
//! - `pkcs12` (feature `pkcs12`): a certificate, its key and the CA as a PKCS#12 file, which is
//!   how an officer's identity gets into a browser (the audit console).
//!
//! Every leaf certificate carries exactly one URI SAN, its principal's identity
//! (`spiffe://<consortium>/...`, see [`crate::identity`]), is signed with ECDSA P-256/SHA-256 or
//! Ed25519, and uses standard extensions only, so that rustls/webpki, OpenSSL and BoringSSL
//! (grpcio) accept it (see [`KeyAlgorithm::Ed25519`] for the one caveat).

mod authority;
pub mod files;
mod inspect;
#[cfg(feature = "pkcs12")]
pub mod pkcs12;
mod store;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, IdentityError};

pub use authority::pem_encode;
pub use authority::{CertificateAuthority, make_csr};
pub use inspect::{CertSignatureError, verify_signed_by_certificate};
pub use inspect::{
    CertificateDescription, CrlDescription, CsrDescription, Description, RevokedEntry, describe,
    describe_all, identity_of_cert_der, serial_of_cert_der,
};
pub use store::{CaDir, CaIndex, IndexEntry, IndexRevocation};

/// How long a CA made by [`CaDir::init`] is valid by default, in days (about ten years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// How long a leaf certificate is valid by default, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// How long a CRL written by [`CaDir`] is current by default, in days.
pub const DEFAULT_CRL_NEXT_UPDATE_DAYS: u32 = 7;

/// The key type of a new CA or leaf key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256: accepted everywhere (rustls, BoringSSL, OpenSSL).
    #[default]
    EcdsaP256,
    /// Ed25519: smaller and faster. Fine for a CA and for rustls peers, but BoringSSL (Python
    /// grpcio) offers no Ed25519 signature scheme in TLS and cannot load ring's PKCS#8 v2 Ed25519
    /// keys: give anything a grpcio peer talks to, or that talks to one, an ECDSA P-256 key.
    /// (An Ed25519 CA issuing ECDSA P-256 leaves works with grpcio.)
    Ed25519,
}

impl KeyAlgorithm {
    pub const ALL: [KeyAlgorithm; 2] = [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519];

    /// The name used on the command line and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }

    fn signature_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    fn generate(self) -> Result<rcgen::KeyPair, PkiError> {
        rcgen::KeyPair::generate_for(self.signature_algorithm()).map_err(|cause| PkiError::Rcgen {
            what: format!("generating a new {} key", self.as_str()),
            cause,
        })
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| PkiError::UnknownAlgorithm(s.to_string()))
    }
}

/// The validity period of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// How far `not_before` is back-dated, so that peers whose clocks run a little behind accept
    /// a fresh certificate.
    pub const CLOCK_SKEW: Duration = Duration::minutes(5);

    /// Valid from five minutes ago (clock skew) until `days` days from now, to the second.
    /// Dates past the end of year 9999 (the end of X.509 time) are clamped to it.
    pub fn days_from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        let now = now - Duration::nanoseconds(i64::from(now.nanosecond()));
        let not_after = now
            .checked_add(Duration::days(i64::from(days)))
            .map_or(LAST_X509_TIME, |t| t.min(LAST_X509_TIME));
        Validity {
            not_before: now - Self::CLOCK_SKEW,
            not_after,
        }
    }

    fn check(&self, what: &str) -> Result<(), PkiError> {
        if self.not_after <= self.not_before {
            return Err(PkiError::EmptyValidity {
                what: what.to_string(),
                not_before: rfc3339(self.not_before),
                not_after: rfc3339(self.not_after),
            });
        }
        Ok(())
    }
}

/// 9999-12-31T23:59:59Z, the last instant a GeneralizedTime in a certificate can name.
const LAST_X509_TIME: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59 UTC);

/// What a new leaf certificate holds besides its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafOptions {
    pub validity: Validity,
    /// DNS names the holder serves under (coordinator, audit service); checked for syntax.
    pub dns_names: Vec<String>,
    /// IP addresses the holder serves under.
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// The key type of the new key.
    pub algorithm: KeyAlgorithm,
}

impl LeafOptions {
    /// No SANs beyond the identity, an ECDSA P-256 key.
    pub fn new(validity: Validity) -> Self {
        LeafOptions {
            validity,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            algorithm: KeyAlgorithm::default(),
        }
    }
}

/// A freshly issued leaf certificate with its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    /// PKCS#8 PEM ("PRIVATE KEY").
    pub key_pem: String,
    /// Lowercase hex, no colons, no leading zero bytes.
    pub serial_hex: String,
    pub identity: Identity,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("identity", &self.identity.uri())
            .field("serial_hex", &self.serial_hex)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// One entry of a CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The revoked certificate's serial, in hex (colons and a `0x` prefix are accepted).
    pub serial_hex: String,
    pub revoked_at: OffsetDateTime,
    /// One of [`REVOCATION_REASONS`] (e.g. `key-compromise`), or `None` for unspecified.
    pub reason: Option<String>,
}

/// The revocation reasons a CRL entry may carry, by the names used in the CLI and the CA index.
pub const REVOCATION_REASONS: [&str; 8] = [
    "unspecified",
    "key-compromise",
    "ca-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "certificate-hold",
    "privilege-withdrawn",
];

/// Checks a revocation reason and returns its canonical name (`Key_Compromise` and
/// `keyCompromise` are not accepted: use the names in [`REVOCATION_REASONS`]).
pub fn canonical_reason(reason: &str) -> Result<&'static str, PkiError> {
    REVOCATION_REASONS
        .into_iter()
        .find(|r| *r == reason)
        .ok_or_else(|| PkiError::UnknownReason(reason.to_string()))
}

fn rcgen_reason(reason: &str) -> Result<rcgen::RevocationReason, PkiError> {
    use rcgen::RevocationReason as R;
    Ok(match canonical_reason(reason)? {
        "key-compromise" => R::KeyCompromise,
        "ca-compromise" => R::CaCompromise,
        "affiliation-changed" => R::AffiliationChanged,
        "superseded" => R::Superseded,
        "cessation-of-operation" => R::CessationOfOperation,
        "certificate-hold" => R::CertificateHold,
        "privilege-withdrawn" => R::PrivilegeWithdrawn,
        _ => R::Unspecified,
    })
}

/// The file name stem for a principal's key and certificate in a directory of its own:
/// `coordinator`, `audit`, `node`, `user-<name>`, `operator-<name>`.
pub fn file_stem(principal: &crate::identity::Principal) -> String {
    use crate::identity::Principal;
    match principal {
        Principal::Coordinator => "coordinator".to_string(),
        Principal::Audit => "audit".to_string(),
        Principal::Node { .. } => "node".to_string(),
        Principal::User { name, .. } => format!("user-{name}"),
        Principal::Operator { name } => format!("operator-{name}"),
    }
}

/// Normalises a serial number typed by a person or read from a tool: accepts upper or lower
/// case, `:` separators and a `0x` prefix; returns lowercase hex of the number's bytes without
/// leading zero bytes (the form [`serial_of_cert_der`] prints).
pub fn normalize_serial(input: &str) -> Result<String, PkiError> {
    let bad = || PkiError::BadSerial(input.to_string());
    let trimmed = input.trim();
    let body = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed);
    let digits: String = body.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let digits = digits.to_ascii_lowercase();
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Err(bad());
    }
    if significant.len() > 40 {
        // RFC 5280: at most 20 octets.
        return Err(bad());
    }
    Ok(if significant.len() % 2 == 1 {
        format!("0{significant}")
    } else {
        significant.to_string()
    })
}

/// Lowercase hex of a big-endian integer's bytes, without leading zero bytes.
fn serial_hex_of_bytes(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let hex = hex::encode(&bytes[start..]);
    if hex.is_empty() {
        "00".to_string()
    } else {
        hex
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Everything that can go wrong in the PKI. Messages say what is wrong and, where there is one,
/// which file or identity is concerned.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{what}: {cause}")]
    Rcgen { what: String, cause: rcgen::Error },
    #[error("unknown key algorithm {0:?}: expected ecdsa-p256 or ed25519")]
    UnknownAlgorithm(String),
    #[error(
        "unknown revocation reason {0:?}: expected one of unspecified, key-compromise, ca-compromise, affiliation-changed, superseded, cessation-of-operation, certificate-hold, privilege-withdrawn"
    )]
    UnknownReason(String),
    #[error(
        "invalid serial number {0:?}: expected 1 to 20 bytes of hex, optionally with ':' separators or a 0x prefix"
    )]
    BadSerial(String),
    #[error("{what} would be valid from {not_before} until {not_after}, which is no time at all")]
    EmptyValidity {
        what: String,
        not_before: String,
        not_after: String,
    },
    #[error(
        "the certificate for {identity} would be valid until {not_after}, after the CA itself expires ({ca_not_after}); ask for fewer days"
    )]
    OutlivesCa {
        identity: String,
        not_after: String,
        ca_not_after: String,
    },
    #[error("invalid DNS name {name:?} for {identity}: {why}")]
    BadDnsName {
        identity: String,
        name: String,
        why: String,
    },
    #[error("{what} holds no PEM block (expected {expected})")]
    NoPem {
        what: String,
        expected: &'static str,
    },
    #[error("{what}: PEM block {index} is a {found}, expected {expected}")]
    WrongPemLabel {
        what: String,
        index: usize,
        found: String,
        expected: &'static str,
    },
    #[error("{what} holds {count} PEM blocks, expected exactly one {expected}")]
    TooManyPemBlocks {
        what: String,
        count: usize,
        expected: &'static str,
    },
    #[error("could not parse {what}: {why}")]
    Parse { what: String, why: String },
    #[error("{what} is not a usable consortium CA certificate: {why}")]
    NotACa { what: String, why: String },
    #[error("the CA private key does not belong to the CA certificate (subject {subject})")]
    KeyMismatch { subject: String },
    #[error("the CSR's signature does not verify: it was not made with the key it carries ({why})")]
    CsrSignature { why: String },
    #[error(
        "the CSR carries no URI SAN, but the CA was asked to sign for {expected}; make the CSR with `tutela pki csr`"
    )]
    CsrNoIdentity { expected: String },
    #[error(
        "the CSR carries {count} URI SANs ({uris}), but a consortium certificate names exactly one identity"
    )]
    CsrManyIdentities { count: usize, uris: String },
    #[error("CSR carries identity {found} but the CA was asked to sign for {expected}")]
    CsrIdentityMismatch { found: String, expected: String },
    #[error(
        "the CSR for {identity} asks for {kind} SAN {value}, which the CA operator did not grant (pass {flag} {value} to grant it)"
    )]
    CsrUngrantedSan {
        identity: String,
        kind: &'static str,
        value: String,
        flag: &'static str,
    },
    #[error(
        "the CSR for {identity} asks for an unsupported SAN ({what}); only the identity URI, DNS names and IP addresses are signed"
    )]
    CsrUnsupportedSan { identity: String, what: String },
    #[error("the CSR for {identity} carries a key the CA cannot sign for: {why}")]
    CsrKey { identity: String, why: String },
    #[error("certificate {subject} carries no URI SAN, so it names no consortium identity")]
    NoIdentity { subject: String },
    #[error(
        "certificate {subject} carries {count} URI SANs ({uris}); a consortium certificate names exactly one identity"
    )]
    ManyIdentities {
        subject: String,
        count: usize,
        uris: String,
    },
    #[error("certificate {subject} names a malformed identity: {cause}")]
    BadIdentity {
        subject: String,
        cause: IdentityError,
    },
    #[error("CRL: next update {next_update} is not after this update {this_update}")]
    CrlPeriod {
        this_update: String,
        next_update: String,
    },
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{paths}: {cause}")]
    InFiles { paths: String, cause: Box<PkiError> },
    #[error("{} already exists; pass --force to overwrite", path.display())]
    Exists { path: PathBuf },
    #[error("{} is not a CA directory: {} is missing (create one with `tutela pki init`)", dir.display(), missing.display())]
    NotACaDir { dir: PathBuf, missing: PathBuf },
    #[error("the CA index {} is damaged: {why}", path.display())]
    BadIndex { path: PathBuf, why: String },
    #[error("serial {serial} is not in the CA index {}", index.display())]
    UnknownSerial { serial: String, index: PathBuf },
    #[error("serial {serial} ({identity}) was already revoked at {revoked_at}")]
    AlreadyRevoked {
        serial: String,
        identity: String,
        revoked_at: String,
    },
}

impl PkiError {
    fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        PkiError::Io {
            path: path.into(),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_normalise() {
        assert_eq!(normalize_serial("3F:A1").unwrap(), "3fa1");
        assert_eq!(normalize_serial("0x00ab").unwrap(), "ab");
        assert_eq!(normalize_serial("abc").unwrap(), "0abc");
        assert_eq!(normalize_serial(" 0a ").unwrap(), "0a");
        for bad in ["", "0x", "00", "xyz", "12 34", &"f".repeat(41)] {
            assert!(normalize_serial(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(serial_hex_of_bytes(&[0, 0, 0x81, 2]), "8102");
    }

    #[test]
    fn validity_is_backdated_and_clamped() {
        let v = Validity::days_from_now(1);
        assert_eq!(
            v.not_after - v.not_before,
            Duration::days(1) + Validity::CLOCK_SKEW
        );
        assert_eq!(v.not_before.nanosecond(), 0);
        let far = Validity::days_from_now(u32::MAX);
        assert_eq!(far.not_after, LAST_X509_TIME);
    }

    #[test]
    fn the_ca_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CertificateAuthority>();
        send_sync::<CaDir>();
        send_sync::<PkiError>();
    }

    #[test]
    fn reasons_and_algorithms_parse() {
        assert_eq!(canonical_reason("superseded").unwrap(), "superseded");
        assert!(canonical_reason("stolen").is_err());
        assert_eq!(
            "ed25519".parse::<KeyAlgorithm>().unwrap(),
            KeyAlgorithm::Ed25519
        );
        assert!("rsa".parse::<KeyAlgorithm>().is_err());
    }
}
