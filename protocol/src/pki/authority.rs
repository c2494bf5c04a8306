//! The in-memory consortium CA: issuing leaves, signing CSRs, signing CRLs.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::inspect::{parse_cert, single_pem_block, subject_of};
use super::{
    IssuedCertificate, KeyAlgorithm, LeafOptions, PkiError, Revocation, Validity, normalize_serial,
    rcgen_reason, rfc3339, serial_hex_of_bytes, serial_of_cert_der,
};
use crate::identity::{Identity, Principal, Role, validate_segment};

const CERT_LABELS: &[&str] = &["CERTIFICATE"];
const CSR_LABELS: &[&str] = &["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"];

/// A consortium CA held in memory: its certificate and its signing key.
pub struct CertificateAuthority {
    consortium: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    not_after: OffsetDateTime,
    /// The CA's subject key identifier, written as the authority key identifier of every
    /// certificate and CRL it signs.
    key_id: KeyIdMethod,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("consortium", &self.consortium)
            .field("not_after", &self.not_after)
            .field("key", &"[elided]")
            .finish()
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed consortium CA: CN "Tutela <consortium> consortium CA",
    /// O = consortium, URI SAN `spiffe://<consortium>`, CA with path length 0, key usages
    /// keyCertSign and cRLSign, a random serial.
    pub fn create(
        consortium: &str,
        algorithm: KeyAlgorithm,
        validity: Validity,
    ) -> Result<Self, PkiError> {
        validate_segment("consortium", consortium)?;
        validity.check("the CA certificate")?;
        let key = algorithm.generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Tutela {consortium} consortium CA"),
        );
        dn.push(DnType::OrganizationName, consortium);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{consortium}"))?];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key).map_err(|cause| PkiError::Rcgen {
            what: format!("self-signing the {consortium} CA certificate"),
            cause,
        })?;
        Self::from_parts(cert.der().clone(), key, "the new CA certificate")
    }

    /// Reloads a CA from the contents of its certificate and key files. Checks that the
    /// certificate is a CA that may sign certificates and CRLs, names its consortium, and that
    /// the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let block = single_pem_block(cert_pem, "the CA certificate", CERT_LABELS)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Parse {
            what: "the CA private key".to_string(),
            why: e.to_string(),
        })?;
        Self::from_parts(
            CertificateDer::from(block.contents),
            key,
            "the CA certificate",
        )
    }

    fn from_parts(
        cert_der: CertificateDer<'static>,
        key: KeyPair,
        what: &str,
    ) -> Result<Self, PkiError> {
        let cert = parse_cert(&cert_der, what)?;
        let not_a_ca = |why: &str| PkiError::NotACa {
            what: what.to_string(),
            why: why.to_string(),
        };
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(not_a_ca("its basic constraints do not make it a CA")),
        }
        match cert.key_usage() {
            Ok(None) => {}
            Ok(Some(ku)) if ku.value.key_cert_sign() && ku.value.crl_sign() => {}
            Ok(Some(_)) => {
                return Err(not_a_ca(
                    "its key usage does not allow signing certificates and CRLs",
                ));
            }
            Err(e) => return Err(not_a_ca(&format!("its key usage is unreadable: {e}"))),
        }
        let consortium = consortium_of_ca(&cert).map_err(|why| not_a_ca(&why))?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch {
                subject: subject_of(&cert),
            });
        }
        let key_id = cert
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
                }
                _ => None,
            })
            .unwrap_or(KeyIdMethod::Sha256);
        let not_after = cert.validity().not_after.to_datetime();
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|cause| PkiError::Rcgen {
            what: format!("loading {what} as an issuer"),
            cause,
        })?;
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        Ok(CertificateAuthority {
            consortium,
            cert_der,
            cert_pem,
            key_pem,
            not_after,
            key_id,
            issuer,
        })
    }

    /// The consortium this CA serves.
    pub fn consortium(&self) -> &str {
        &self.consortium
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// When the CA certificate expires; no certificate it signs may outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The identity of `principal` in this CA's consortium.
    pub fn identity_for(&self, principal: &Principal) -> Result<Identity, PkiError> {
        Ok(Identity::new(&self.consortium, principal.clone())?)
    }

    /// Issues a certificate and a new key for `principal`.
    pub fn issue(
        &self,
        principal: &Principal,
        opts: &LeafOptions,
    ) -> Result<IssuedCertificate, PkiError> {
        let identity = self.identity_for(principal)?;
        let params = self.leaf_params(
            &identity,
            &opts.validity,
            &opts.dns_names,
            &opts.ip_addresses,
        )?;
        let key = opts.algorithm.generate()?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|cause| PkiError::Rcgen {
                what: format!("signing the certificate for {identity}"),
                cause,
            })?;
        Ok(IssuedCertificate {
            serial_hex: serial_of_cert_der(cert.der())?,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            identity,
        })
    }

    /// Signs a CSR made elsewhere; the CSR must carry exactly the expected identity (URI SAN) —
    /// the CA operator states who it is for, the CSR is never trusted for that. DNS names and
    /// IP addresses come from the operator too: a CSR asking for one the operator did not grant
    /// is refused. Key usages, extended key usages and validity are the CA's choice, as for
    /// [`issue`](Self::issue). Returns (cert_pem, serial_hex).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: &Principal,
        validity: Validity,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
    ) -> Result<(String, String), PkiError> {
        let identity = self.identity_for(expected)?;
        let block = single_pem_block(csr_pem, "the CSR", CSR_LABELS)?;
        let (_, csr) =
            X509CertificationRequest::from_der(&block.contents).map_err(|e| PkiError::Parse {
                what: "the CSR".to_string(),
                why: e.to_string(),
            })?;
        csr.verify_signature()
            .map_err(|e| PkiError::CsrSignature { why: e.to_string() })?;
        let requested = requested_sans(&csr, &identity)?;
        match requested.uris.as_slice() {
            [] => {
                return Err(PkiError::CsrNoIdentity {
                    expected: identity.uri(),
                });
            }
            [one] if *one == identity.uri() => {}
            [one] => {
                return Err(PkiError::CsrIdentityMismatch {
                    found: one.clone(),
                    expected: identity.uri(),
                });
            }
            many => {
                return Err(PkiError::CsrManyIdentities {
                    count: many.len(),
                    uris: many.join(", "),
                });
            }
        }
        for name in &requested.dns_names {
            if !dns_names
                .iter()
                .any(|granted| granted.eq_ignore_ascii_case(name))
            {
                return Err(PkiError::CsrUngrantedSan {
                    identity: identity.uri(),
                    kind: "DNS",
                    value: name.clone(),
                    flag: "--dns",
                });
            }
        }
        for ip in &requested.ip_addresses {
            if !ip_addresses.contains(ip) {
                return Err(PkiError::CsrUngrantedSan {
                    identity: identity.uri(),
                    kind: "IP",
                    value: ip.to_string(),
                    flag: "--ip",
                });
            }
        }
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| PkiError::CsrKey {
                identity: identity.uri(),
                why: e.to_string(),
            })?;
        let params = self.leaf_params(&identity, &validity, dns_names, ip_addresses)?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|cause| PkiError::Rcgen {
                what: format!("signing the CSR for {identity}"),
                cause,
            })?;
        Ok((cert.pem(), serial_of_cert_der(cert.der())?))
    }

    /// Signs a CRL listing `revoked`.
    pub fn crl_pem(
        &self,
        revoked: &[Revocation],
        crl_number: u64,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, PkiError> {
        if next_update <= this_update {
            return Err(PkiError::CrlPeriod {
                this_update: rfc3339(this_update),
                next_update: rfc3339(next_update),
            });
        }
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let serial = normalize_serial(&r.serial_hex)?;
                let bytes =
                    hex::decode(&serial).map_err(|_| PkiError::BadSerial(r.serial_hex.clone()))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: r.revoked_at,
                    reason_code: r.reason.as_deref().map(rcgen_reason).transpose()?,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id.clone(),
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|cause| PkiError::Rcgen {
                what: format!("signing CRL number {crl_number}"),
                cause,
            })?;
        crl.pem().map_err(|cause| PkiError::Rcgen {
            what: format!("encoding CRL number {crl_number}"),
            cause,
        })
    }

    /// The parameters every leaf this CA signs shares: CN = the identity (shortened to 64
    /// characters if need be, it is informational only), O = consortium, exactly one URI SAN
    /// (the identity), the granted DNS/IP SANs, not a CA, digitalSignature (+ contentCommitment
    /// for people, who sign job approvals), serverAuth only for servers, clientAuth for all,
    /// authority key identifier, random serial.
    fn leaf_params(
        &self,
        identity: &Identity,
        validity: &Validity,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
    ) -> Result<CertificateParams, PkiError> {
        // A leaf asked for the same lifetime as its CA moments after it (a demo or a test
        // consortium made in one go: both "30 days from now", a second apart) ends with the CA
        // instead of being refused; anything longer is the operator's mistake and is refused.
        // Checked after the clamp, so that a clamped validity is never empty.
        let mut validity = *validity;
        if validity.not_after > self.not_after
            && validity.not_after - self.not_after <= time::Duration::minutes(1)
        {
            validity.not_after = self.not_after;
        }
        validity.check(&format!("the certificate for {identity}"))?;
        if validity.not_after > self.not_after {
            return Err(PkiError::OutlivesCa {
                identity: identity.uri(),
                not_after: rfc3339(validity.not_after),
                ca_not_after: rfc3339(self.not_after),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = leaf_dn(identity);
        let mut sans = vec![uri_san(&identity.uri())?];
        let mut seen_dns: Vec<String> = Vec::new();
        for name in dns_names {
            let name = check_dns_name(identity, name)?;
            if !seen_dns.contains(&name) {
                sans.push(SanType::DnsName(name.clone().try_into().map_err(
                    |e: rcgen::Error| PkiError::BadDnsName {
                        identity: identity.uri(),
                        name: name.clone(),
                        why: e.to_string(),
                    },
                )?));
                seen_dns.push(name);
            }
        }
        let mut seen_ips: Vec<IpAddr> = Vec::new();
        for ip in ip_addresses {
            if !seen_ips.contains(ip) {
                sans.push(SanType::IpAddress(*ip));
                seen_ips.push(*ip);
            }
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let role = identity.role();
        if matches!(role, Role::User | Role::Operator) {
            params.key_usages.push(KeyUsagePurpose::ContentCommitment);
        }
        if role.is_server() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        Ok(params)
    }
}

/// Makes a key and a CSR for `identity`, to be signed by the consortium CA with
/// [`CertificateAuthority::sign_csr`]. The CSR carries the identity as its one URI SAN and the
/// given DNS names; the key never leaves the caller. Returns (csr_pem, key_pem).
pub fn make_csr(
    identity: &Identity,
    algorithm: KeyAlgorithm,
    dns_names: &[String],
) -> Result<(String, String), PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = leaf_dn(identity);
    let mut sans = vec![uri_san(&identity.uri())?];
    for name in dns_names {
        let name = check_dns_name(identity, name)?;
        sans.push(SanType::DnsName(name.clone().try_into().map_err(
            |e: rcgen::Error| PkiError::BadDnsName {
                identity: identity.uri(),
                name,
                why: e.to_string(),
            },
        )?));
    }
    params.subject_alt_names = sans;
    let key = algorithm.generate()?;
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|cause| PkiError::Rcgen {
            what: format!("making the CSR for {identity}"),
            cause,
        })?;
    Ok((csr, key.serialize_pem()))
}

fn leaf_dn(identity: &Identity) -> DistinguishedName {
    let mut cn = identity.uri();
    // ub-common-name is 64; the URI SAN, not the CN, is the identity.
    cn.truncate(64);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, identity.consortium.as_str());
    dn
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    Ok(SanType::URI(uri.to_string().try_into().map_err(
        |cause| PkiError::Rcgen {
            what: format!("encoding URI SAN {uri}"),
            cause,
        },
    )?))
}

/// Checks a DNS name's syntax (as webpki will when matching it) and returns it in lowercase.
fn check_dns_name(identity: &Identity, name: &str) -> Result<String, PkiError> {
    let lower = name.to_ascii_lowercase();
    rustls_pki_types::DnsName::try_from(lower.as_str()).map_err(|e| PkiError::BadDnsName {
        identity: identity.uri(),
        name: name.to_string(),
        why: e.to_string(),
    })?;
    if lower.parse::<IpAddr>().is_ok() {
        return Err(PkiError::BadDnsName {
            identity: identity.uri(),
            name: name.to_string(),
            why: "it is an IP address; pass it as an IP SAN instead".to_string(),
        });
    }
    Ok(lower)
}

/// A random positive 127-bit serial without a leading zero byte (RFC 5280: unpredictable,
/// at most 20 octets).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Parse {
            what: "the system random number generator".to_string(),
            why: "it failed to produce a serial number".to_string(),
        })?;
    bytes[0] = (bytes[0] & 0x7f).max(1);
    debug_assert_eq!(serial_hex_of_bytes(&bytes).len(), 32);
    Ok(SerialNumber::from_slice(&bytes))
}

/// The consortium a CA certificate serves: its `spiffe://<consortium>` URI SAN, or failing
/// that its O attribute.
fn consortium_of_ca(cert: &X509Certificate<'_>) -> Result<String, String> {
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(uri) => uri.strip_prefix("spiffe://").map(str::to_string),
                _ => None,
            })
        });
    let from_o = || {
        cert.subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .map(str::to_string)
    };
    let consortium = from_san
        .or_else(from_o)
        .ok_or("it names no consortium (no spiffe://<consortium> URI SAN, no O attribute)")?;
    validate_segment("consortium", &consortium).map_err(|e| e.to_string())?;
    Ok(consortium)
}

struct RequestedSans {
    uris: Vec<String>,
    dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
}

fn requested_sans(
    csr: &X509CertificationRequest<'_>,
    identity: &Identity,
) -> Result<RequestedSans, PkiError> {
    let mut out = RequestedSans {
        uris: Vec::new(),
        dns_names: Vec::new(),
        ip_addresses: Vec::new(),
    };
    let Some(extensions) = csr.requested_extensions() else {
        return Ok(out);
    };
    for ext in extensions {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(uri) => out.uris.push(uri.to_string()),
                GeneralName::DNSName(dns) => out.dns_names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(octets) => {
                    out.ip_addresses
                        .push(super::inspect::ip_of_octets(octets).ok_or_else(|| {
                            PkiError::CsrUnsupportedSan {
                                identity: identity.uri(),
                                what: format!("an IP address of {} bytes", octets.len()),
                            }
                        })?)
                }
                other => {
                    return Err(PkiError::CsrUnsupportedSan {
                        identity: identity.uri(),
                        what: other.to_string(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// DER as a PEM block with `label` (e.g. `CERTIFICATE`), 64 base64 characters per line.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // The base64 alphabet is ASCII, so every chunk is valid UTF-8.
        let _ = writeln!(out, "{}", String::from_utf8_lossy(chunk));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want);
        }
    }
}
