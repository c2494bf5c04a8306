//! Reading certificates, CRLs and CSRs back: identities, serials, human descriptions.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use super::{PkiError, rfc3339, serial_hex_of_bytes};
use crate::identity::Identity;

/// The identity a (verified) certificate names: its one `spiffe://` URI SAN, parsed. A
/// certificate with no URI SAN, or more than one, names no identity and is refused.
pub fn identity_of_cert_der(der: &[u8]) -> Result<Identity, PkiError> {
    let cert = parse_cert(der, "the certificate")?;
    let names = SanNames::of_cert(&cert, "the certificate")?;
    identity_of_uris(&names.uris, &cert)
}

fn identity_of_uris(uris: &[String], cert: &X509Certificate<'_>) -> Result<Identity, PkiError> {
    match uris {
        [] => Err(PkiError::NoIdentity {
            subject: subject_of(cert),
        }),
        [uri] => uri.parse().map_err(|cause| PkiError::BadIdentity {
            subject: subject_of(cert),
            cause,
        }),
        many => Err(PkiError::ManyIdentities {
            subject: subject_of(cert),
            count: many.len(),
            uris: many.join(", "),
        }),
    }
}

/// A certificate's serial number: lowercase hex, no colons, no leading zero bytes.
pub fn serial_of_cert_der(der: &[u8]) -> Result<String, PkiError> {
    let cert = parse_cert(der, "the certificate")?;
    Ok(serial_hex_of_bytes(cert.raw_serial()))
}

/// What `tutela pki show` prints about one PEM block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Description {
    Certificate(CertificateDescription),
    Crl(CrlDescription),
    Csr(CsrDescription),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateDescription {
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex, no colons, no leading zero bytes.
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The identity, when the certificate carries exactly one URI SAN and it parses.
    pub identity: Option<Identity>,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    /// RFC 5280 names: digitalSignature, contentCommitment, keyCertSign, cRLSign, ...
    pub key_usages: Vec<&'static str>,
    /// serverAuth, clientAuth, ..., or dotted OIDs for others.
    pub extended_key_usages: Vec<String>,
    pub key_algorithm: String,
    pub signature_algorithm: String,
    /// SHA-256 of the DER, lowercase hex pairs separated by ':'.
    pub sha256_fingerprint: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlDescription {
    pub issuer: String,
    pub this_update: OffsetDateTime,
    pub next_update: Option<OffsetDateTime>,
    /// The CRL number, hex.
    pub crl_number: Option<String>,
    pub revoked: Vec<RevokedEntry>,
    pub signature_algorithm: String,
    pub sha256_fingerprint: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial_hex: String,
    pub revoked_at: OffsetDateTime,
    /// The reason, by the names of [`super::REVOCATION_REASONS`].
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsrDescription {
    pub subject: String,
    pub identity: Option<Identity>,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub key_algorithm: String,
    pub signature_algorithm: String,
    /// Whether the CSR is signed by the key it carries.
    pub signature_valid: bool,
    pub sha256_fingerprint: String,
}

/// Describes the first PEM block of `pem`: a certificate, a CRL or a CSR (from its label).
pub fn describe(pem: &str) -> Result<Description, PkiError> {
    let blocks = pem_blocks(pem, "the input", EXPECTED_ANY)?;
    let first = blocks.first().ok_or(PkiError::NoPem {
        what: "the input".to_string(),
        expected: EXPECTED_ANY,
    })?;
    describe_block(first, 1)
}

/// Describes every PEM block of `pem` (a chain, a bundle of CRLs, ...), in order.
pub fn describe_all(pem: &str) -> Result<Vec<Description>, PkiError> {
    let blocks = pem_blocks(pem, "the input", EXPECTED_ANY)?;
    if blocks.is_empty() {
        return Err(PkiError::NoPem {
            what: "the input".to_string(),
            expected: EXPECTED_ANY,
        });
    }
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| describe_block(b, i + 1))
        .collect()
}

const EXPECTED_ANY: &str = "a CERTIFICATE, X509 CRL or CERTIFICATE REQUEST";

fn describe_block(block: &Pem, index: usize) -> Result<Description, PkiError> {
    let what = format!("PEM block {index} ({})", block.label);
    match block.label.as_str() {
        "CERTIFICATE" => describe_cert(&block.contents, &what).map(Description::Certificate),
        "X509 CRL" => describe_crl(&block.contents, &what).map(Description::Crl),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => {
            describe_csr(&block.contents, &what).map(Description::Csr)
        }
        other => Err(PkiError::WrongPemLabel {
            what: "the input".to_string(),
            index,
            found: other.to_string(),
            expected: EXPECTED_ANY,
        }),
    }
}

fn describe_cert(der: &[u8], what: &str) -> Result<CertificateDescription, PkiError> {
    let cert = parse_cert(der, what)?;
    let names = SanNames::of_cert(&cert, what)?;
    let (is_ca, path_len) = match cert.basic_constraints() {
        Ok(Some(bc)) => (bc.value.ca, bc.value.path_len_constraint),
        _ => (false, None),
    };
    let key_usages = match cert.key_usage() {
        Ok(Some(ku)) => {
            let k = ku.value;
            [
                (k.digital_signature(), "digitalSignature"),
                (k.non_repudiation(), "contentCommitment"),
                (k.key_encipherment(), "keyEncipherment"),
                (k.data_encipherment(), "dataEncipherment"),
                (k.key_agreement(), "keyAgreement"),
                (k.key_cert_sign(), "keyCertSign"),
                (k.crl_sign(), "cRLSign"),
                (k.encipher_only(), "encipherOnly"),
                (k.decipher_only(), "decipherOnly"),
            ]
            .into_iter()
            .filter_map(|(set, name)| set.then_some(name))
            .collect()
        }
        _ => Vec::new(),
    };
    let extended_key_usages = match cert.extended_key_usage() {
        Ok(Some(eku)) => {
            let e = eku.value;
            let mut out: Vec<String> = [
                (e.any, "any"),
                (e.server_auth, "serverAuth"),
                (e.client_auth, "clientAuth"),
                (e.code_signing, "codeSigning"),
                (e.email_protection, "emailProtection"),
                (e.time_stamping, "timeStamping"),
                (e.ocsp_signing, "OCSPSigning"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_string())
            .collect();
            out.extend(e.other.iter().map(|oid| oid.to_id_string()));
            out
        }
        _ => Vec::new(),
    };
    Ok(CertificateDescription {
        subject: subject_of(&cert),
        issuer: name_or_empty(cert.issuer().to_string()),
        serial_hex: serial_hex_of_bytes(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        identity: identity_of_uris(&names.uris, &cert).ok(),
        uris: names.uris,
        dns_names: names.dns_names,
        ip_addresses: names.ip_addresses,
        is_ca,
        path_len,
        key_usages,
        extended_key_usages,
        key_algorithm: key_algorithm_name(cert.public_key()),
        signature_algorithm: signature_algorithm_name(&cert.signature_algorithm),
        sha256_fingerprint: fingerprint(der),
    })
}

fn describe_crl(der: &[u8], what: &str) -> Result<CrlDescription, PkiError> {
    let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| PkiError::Parse {
        what: what.to_string(),
        why: e.to_string(),
    })?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| RevokedEntry {
            serial_hex: serial_hex_of_bytes(r.raw_serial()),
            revoked_at: r.revocation_date.to_datetime(),
            reason: r.reason_code().map(|(_, code)| reason_name(code.0)),
        })
        .collect();
    Ok(CrlDescription {
        issuer: name_or_empty(crl.issuer().to_string()),
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        crl_number: crl.crl_number().map(|n| n.to_str_radix(16)),
        revoked,
        signature_algorithm: signature_algorithm_name(&crl.signature_algorithm),
        sha256_fingerprint: fingerprint(der),
    })
}

fn describe_csr(der: &[u8], what: &str) -> Result<CsrDescription, PkiError> {
    let (_, csr) = X509CertificationRequest::from_der(der).map_err(|e| PkiError::Parse {
        what: what.to_string(),
        why: e.to_string(),
    })?;
    let mut names = SanNames::default();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                names.add(&san.general_names);
            }
        }
    }
    let identity = match names.uris.as_slice() {
        [uri] => uri.parse().ok(),
        _ => None,
    };
    let info = &csr.certification_request_info;
    Ok(CsrDescription {
        subject: name_or_empty(info.subject.to_string()),
        identity,
        uris: names.uris,
        dns_names: names.dns_names,
        ip_addresses: names.ip_addresses,
        key_algorithm: key_algorithm_name(&info.subject_pki),
        signature_algorithm: signature_algorithm_name(&csr.signature_algorithm),
        signature_valid: csr.verify_signature().is_ok(),
        sha256_fingerprint: fingerprint(der),
    })
}

#[derive(Default)]
struct SanNames {
    uris: Vec<String>,
    dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
}

impl SanNames {
    fn of_cert(cert: &X509Certificate<'_>, what: &str) -> Result<Self, PkiError> {
        let mut names = SanNames::default();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| PkiError::Parse {
                what: format!("the subject alternative names of {what}"),
                why: e.to_string(),
            })?;
        if let Some(san) = san {
            names.add(&san.value.general_names);
        }
        Ok(names)
    }

    fn add(&mut self, general_names: &[GeneralName<'_>]) {
        for name in general_names {
            match name {
                GeneralName::URI(uri) => self.uris.push(uri.to_string()),
                GeneralName::DNSName(dns) => self.dns_names.push(dns.to_string()),
                GeneralName::IPAddress(octets) => {
                    if let Some(ip) = ip_of_octets(octets) {
                        self.ip_addresses.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
}

pub(super) fn ip_of_octets(octets: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        Some(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(octets) {
        Some(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        None
    }
}

fn reason_name(code: u8) -> String {
    match code {
        0 => "unspecified",
        1 => "key-compromise",
        2 => "ca-compromise",
        3 => "affiliation-changed",
        4 => "superseded",
        5 => "cessation-of-operation",
        6 => "certificate-hold",
        8 => "remove-from-crl",
        9 => "privilege-withdrawn",
        10 => "aa-compromise",
        other => return format!("reason code {other}"),
    }
    .to_string()
}

fn key_algorithm_name(spki: &SubjectPublicKeyInfo<'_>) -> String {
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.3.101.112" => "Ed25519".to_string(),
        "1.3.101.113" => "Ed448".to_string(),
        "1.2.840.10045.2.1" => match spki.parsed().map(|k| k.key_size()) {
            Ok(256) => "ECDSA P-256".to_string(),
            Ok(384) => "ECDSA P-384".to_string(),
            Ok(521) => "ECDSA P-521".to_string(),
            Ok(bits) => format!("EC ({bits} bits)"),
            Err(_) => "EC (unparsable key)".to_string(),
        },
        "1.2.840.113549.1.1.1" => match spki.parsed().map(|k| k.key_size()) {
            Ok(bits) => format!("RSA ({bits} bits)"),
            Err(_) => "RSA (unparsable key)".to_string(),
        },
        other => other.to_string(),
    }
}

fn signature_algorithm_name(alg: &AlgorithmIdentifier<'_>) -> String {
    match alg.algorithm.to_id_string().as_str() {
        "1.2.840.10045.4.3.2" => "ECDSA with SHA-256".to_string(),
        "1.2.840.10045.4.3.3" => "ECDSA with SHA-384".to_string(),
        "1.2.840.10045.4.3.4" => "ECDSA with SHA-512".to_string(),
        "1.3.101.112" => "Ed25519".to_string(),
        "1.2.840.113549.1.1.11" => "RSA PKCS#1 v1.5 with SHA-256".to_string(),
        "1.2.840.113549.1.1.12" => "RSA PKCS#1 v1.5 with SHA-384".to_string(),
        "1.2.840.113549.1.1.13" => "RSA PKCS#1 v1.5 with SHA-512".to_string(),
        "1.2.840.113549.1.1.10" => "RSA-PSS".to_string(),
        other => other.to_string(),
    }
}

fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn name_or_empty(name: String) -> String {
    if name.is_empty() {
        "(empty)".to_string()
    } else {
        name
    }
}

pub(super) fn subject_of(cert: &X509Certificate<'_>) -> String {
    name_or_empty(cert.subject().to_string())
}

pub(super) fn parse_cert<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse {
        what: what.to_string(),
        why: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(PkiError::Parse {
            what: what.to_string(),
            why: format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            ),
        });
    }
    Ok(cert)
}

/// Every PEM block of `text`, in order.
pub(super) fn pem_blocks(
    text: &str,
    what: &str,
    expected: &'static str,
) -> Result<Vec<Pem>, PkiError> {
    Pem::iter_from_buffer(text.as_bytes())
        .enumerate()
        .map(|(i, block)| {
            block.map_err(|e| PkiError::Parse {
                what: format!("PEM block {} of {what}", i + 1),
                why: format!("{e} (expected {expected})"),
            })
        })
        .collect()
}

/// The one PEM block of `text`, which must carry one of `labels`.
pub(super) fn single_pem_block(
    text: &str,
    what: &str,
    labels: &'static [&'static str],
) -> Result<Pem, PkiError> {
    let expected = labels.first().copied().unwrap_or("PEM");
    let mut blocks = pem_blocks(text, what, expected)?;
    match blocks.len() {
        0 => Err(PkiError::NoPem {
            what: what.to_string(),
            expected,
        }),
        1 => {
            let block = blocks.remove(0);
            if labels.contains(&block.label.as_str()) {
                Ok(block)
            } else {
                Err(PkiError::WrongPemLabel {
                    what: what.to_string(),
                    index: 1,
                    found: block.label,
                    expected,
                })
            }
        }
        count => Err(PkiError::TooManyPemBlocks {
            what: what.to_string(),
            count,
            expected,
        }),
    }
}

struct Table<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
}

impl Table<'_, '_> {
    fn row(&mut self, key: &str, value: impl fmt::Display) -> fmt::Result {
        writeln!(self.f, "  {:<20} {value}", format!("{key}:"))
    }

    fn list<T: fmt::Display>(&mut self, key: &str, values: &[T]) -> fmt::Result {
        if values.is_empty() {
            return Ok(());
        }
        let joined = values
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        self.row(key, joined)
    }
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Description::Certificate(c) => c.fmt(f),
            Description::Crl(c) => c.fmt(f),
            Description::Csr(c) => c.fmt(f),
        }
    }
}

impl fmt::Display for CertificateDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_ca {
            "CA certificate"
        } else {
            "certificate"
        };
        writeln!(f, "{kind}")?;
        let mut t = Table { f };
        match &self.identity {
            Some(id) => t.row("identity", id)?,
            None if self.is_ca => {}
            None => t.row("identity", "none (not exactly one valid spiffe:// URI SAN)")?,
        }
        t.row("subject", &self.subject)?;
        t.row("issuer", &self.issuer)?;
        t.row("serial", &self.serial_hex)?;
        t.row("not before", rfc3339(self.not_before))?;
        t.row("not after", rfc3339(self.not_after))?;
        t.list("URI SANs", &self.uris)?;
        t.list("DNS SANs", &self.dns_names)?;
        t.list("IP SANs", &self.ip_addresses)?;
        let ca = match (self.is_ca, self.path_len) {
            (true, Some(n)) => format!("yes, path length {n}"),
            (true, None) => "yes".to_string(),
            (false, _) => "no".to_string(),
        };
        t.row("CA", ca)?;
        t.list("key usage", &self.key_usages)?;
        t.list("extended key usage", &self.extended_key_usages)?;
        t.row("key", &self.key_algorithm)?;
        t.row("signature", &self.signature_algorithm)?;
        t.row("SHA-256 fingerprint", &self.sha256_fingerprint)
    }
}

impl fmt::Display for CrlDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "certificate revocation list")?;
        let mut t = Table { f };
        t.row("issuer", &self.issuer)?;
        t.row("CRL number", self.crl_number.as_deref().unwrap_or("none"))?;
        t.row("this update", rfc3339(self.this_update))?;
        t.row(
            "next update",
            self.next_update.map_or("none".to_string(), rfc3339),
        )?;
        t.row("signature", &self.signature_algorithm)?;
        t.row("SHA-256 fingerprint", &self.sha256_fingerprint)?;
        t.row("revoked", self.revoked.len())?;
        for r in &self.revoked {
            writeln!(
                t.f,
                "    {}  revoked {}{}",
                r.serial_hex,
                rfc3339(r.revoked_at),
                r.reason
                    .as_deref()
                    .map(|reason| format!("  ({reason})"))
                    .unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for CsrDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "certificate signing request")?;
        let mut t = Table { f };
        match &self.identity {
            Some(id) => t.row("identity", id)?,
            None => t.row("identity", "none (not exactly one valid spiffe:// URI SAN)")?,
        }
        t.row("subject", &self.subject)?;
        t.list("URI SANs", &self.uris)?;
        t.list("DNS SANs", &self.dns_names)?;
        t.list("IP SANs", &self.ip_addresses)?;
        t.row("key", &self.key_algorithm)?;
        t.row("signature", &self.signature_algorithm)?;
        t.row(
            "self-signature",
            if self.signature_valid {
                "valid"
            } else {
                "INVALID"
            },
        )?;
        t.row("SHA-256 fingerprint", &self.sha256_fingerprint)
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";

/// Why a signature did not verify with a certificate's public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertSignatureError {
    #[error("the certificate cannot be parsed: {0}")]
    Certificate(String),
    #[error("the certificate's key algorithm {0} is neither ECDSA P-256 nor Ed25519")]
    UnsupportedKey(String),
    #[error("the signature does not verify with the certificate's key")]
    BadSignature,
}

/// Verifies `signature` over `message` with the public key of the DER certificate `der`: ECDSA
/// P-256 with SHA-256 (ASN.1 DER signature) or Ed25519, the two key types `tutela pki` issues.
/// Checks only the signature, not the certificate's trust (the caller verifies the chain).
pub fn verify_signed_by_certificate(
    der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), CertSignatureError> {
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ED25519, UnparsedPublicKey, VerificationAlgorithm,
    };
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CertSignatureError::Certificate(e.to_string()))?;
    let spki = cert.public_key();
    let oid = spki.algorithm.algorithm.to_id_string();
    let alg: &dyn VerificationAlgorithm = match oid.as_str() {
        OID_EC_PUBLIC_KEY => &ECDSA_P256_SHA256_ASN1,
        OID_ED25519 => &ED25519,
        _ => return Err(CertSignatureError::UnsupportedKey(oid)),
    };
    UnparsedPublicKey::new(alg, &spki.subject_public_key.data)
        .verify(message, signature)
        .map_err(|_| CertSignatureError::BadSignature)
}
