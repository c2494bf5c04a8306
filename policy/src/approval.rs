//! Signed approvals and rejections: a compliance officer signs a job's spec digest with the
//! private key of their certificate; anyone holding the consortium CA can check it.
//!
//! An [`Approval`] signs a domain-separated message ([`signed_message`], context
//! [`APPROVAL_CONTEXT`]) over the job id, the spec digest and the approval's validity window, so
//! that a signature can never be replayed for another job, another spec, a longer window, or as
//! anything but a Tutela approval. A [`Rejection`] signs its own message
//! ([`rejection_signed_message`], context [`REJECTION_CONTEXT`]) over the job id, the spec digest,
//! the time of signing and the officer's reason: the two contexts differ, so an approval's
//! signature never verifies as a rejection, nor a rejection's as an approval.
//!
//! [`ApprovalVerifier::verify`] checks, in order: that the approval is for the job and digest
//! expected, its window, the signer's certificate chain to the consortium CA at the time of the
//! check (rustls's own webpki client verifier: signature chain, validity, client-auth usage, the
//! CRLs), that the certificate names a principal of the consortium, and the signature with the
//! certificate's key (ECDSA P-256/SHA-256 or Ed25519, via ring).
//! [`ApprovalVerifier::verify_rejection`] makes the same checks of a rejection, with its reason
//! and freshness in place of the window. Whether the signer holds the role that counts is the
//! caller's question (the consortium policy on the coordinator, the site policy on a node).

use std::sync::Arc;

use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use tutela_protocol::identity::Identity;
use tutela_protocol::job::SpecDigest;
use tutela_protocol::pki;
use tutela_protocol::tls::TlsMaterial;

/// The domain-separation prefix of every approval signature.
pub use tutela_protocol::job::APPROVAL_CONTEXT;
/// The domain-separation prefix of every rejection signature.
pub use tutela_protocol::job::REJECTION_CONTEXT;

/// Clocks differ a little between an officer's laptop and a server: a signature dated up to this
/// far in the future is accepted.
pub(crate) const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// How old a rejection may be when it is verified. `tutela job reject` signs and submits at once;
/// the bound keeps the signing time in the record close to the time the rejection took effect.
pub const MAX_REJECTION_AGE_MS: i64 = 60 * 60 * 1000;

/// What an officer signed: an approval or a rejection (named in errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignedKind {
    Approval,
    Rejection,
    /// A move of a registered model's stage (`crate::stage`).
    StageMove,
    /// An order quarantining forged audit rows (`tutela_audit::quarantine`).
    AuditQuarantine,
}

impl std::fmt::Display for SignedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignedKind::Approval => "approval",
            SignedKind::Rejection => "rejection",
            SignedKind::StageMove => "stage move",
            SignedKind::AuditQuarantine => "audit quarantine order",
        })
    }
}

/// A compliance officer's signed approval of one job's spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    pub job_id: String,
    pub spec_digest: SpecDigest,
    /// The signer's certificate chain, DER, leaf first.
    pub signer_chain_der: Vec<Vec<u8>>,
    pub signature: Vec<u8>,
    /// Unix milliseconds.
    pub signed_at_ms: i64,
    /// Unix milliseconds; the approval no longer counts from then on.
    pub expires_at_ms: i64,
}

/// The bytes an officer signs.
pub fn signed_message(
    job_id: &str,
    digest: &SpecDigest,
    signed_at_ms: i64,
    expires_at_ms: i64,
) -> Vec<u8> {
    tutela_protocol::job::approval_message(job_id, &digest.to_hex(), signed_at_ms, expires_at_ms)
}

/// The bytes an officer signs to reject a job.
pub fn rejection_signed_message(
    job_id: &str,
    digest: &SpecDigest,
    reason: &str,
    signed_at_ms: i64,
) -> Vec<u8> {
    tutela_protocol::job::rejection_message(job_id, &digest.to_hex(), reason, signed_at_ms)
}

/// Why an approval or a rejection does not count (or cannot be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("the {kind} is for job {found}, not job {expected}")]
    OtherJob {
        kind: SignedKind,
        expected: String,
        found: String,
    },
    #[error(
        "the {kind} signs spec digest {found}, but the job's spec digests to {expected}: the spec changed after it was signed, or this is another job's {kind}"
    )]
    DigestMismatch {
        kind: SignedKind,
        expected: String,
        found: String,
    },
    #[error("the approval expired at {expires_at_ms} (unix ms); it is now {now_ms}")]
    Expired { expires_at_ms: i64, now_ms: i64 },
    #[error(
        "the approval's window is empty or inverted (signed at {signed_at_ms}, expires at {expires_at_ms})"
    )]
    BadWindow {
        signed_at_ms: i64,
        expires_at_ms: i64,
    },
    #[error("the {kind} is dated {signed_at_ms}, in the future (now {now_ms})")]
    FromTheFuture {
        kind: SignedKind,
        signed_at_ms: i64,
        now_ms: i64,
    },
    #[error(
        "the rejection was signed at {signed_at_ms} (unix ms), more than {max_age_ms} ms before now ({now_ms}): sign it again"
    )]
    Stale {
        signed_at_ms: i64,
        now_ms: i64,
        max_age_ms: i64,
    },
    #[error("the rejection's reason {0}")]
    BadReason(String),
    #[error("the {0} carries no signer certificate")]
    NoCertificate(SignedKind),
    #[error("the signer's certificate does not verify against the consortium CA: {0}")]
    Chain(String),
    #[error("the signer's certificate: {0}")]
    Certificate(String),
    #[error("the signer {signer} is not a principal of consortium {consortium}")]
    OtherConsortium { signer: String, consortium: String },
    #[error("the signature of {signer} does not verify with the key of their certificate")]
    BadSignature { signer: String },
    #[error("the signing key: {0}")]
    Key(String),
    #[error("malformed {kind}: {problem}")]
    Malformed { kind: SignedKind, problem: String },
}

/// An approval whose chain and signature verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedApproval {
    pub signer: Identity,
    pub approval: Approval,
}

impl Approval {
    /// Signs the approval of `job_id` at `digest` with a PKCS#8 private key (PEM, ECDSA P-256 or
    /// Ed25519), attaching `chain_pem` (the signer's certificate, leaf first). It does not check
    /// that the key belongs to the certificate: [`Approval::check_own_signature`] does, and every
    /// verifier will.
    pub fn sign(
        key_pem: &str,
        chain_pem: &str,
        job_id: &str,
        digest: &SpecDigest,
        signed_at_ms: i64,
        expires_at_ms: i64,
    ) -> Result<Approval, ApprovalError> {
        if expires_at_ms <= signed_at_ms {
            return Err(ApprovalError::BadWindow {
                signed_at_ms,
                expires_at_ms,
            });
        }
        let message = signed_message(job_id, digest, signed_at_ms, expires_at_ms);
        let (chain, signature) =
            sign_with_certificate_key(key_pem, chain_pem, &message, SignedKind::Approval)?;
        Ok(Approval {
            job_id: job_id.to_string(),
            spec_digest: *digest,
            signer_chain_der: chain,
            signature,
            signed_at_ms,
            expires_at_ms,
        })
    }

    /// The signer's identity as the leaf certificate names it (unverified).
    pub fn claimed_signer(&self) -> Result<Identity, ApprovalError> {
        claimed_signer(&self.signer_chain_der, SignedKind::Approval)
    }

    /// Checks only the signature against the leaf's key: the signer's own check that the key
    /// they used belongs to the certificate they attached.
    pub fn check_own_signature(&self) -> Result<(), ApprovalError> {
        check_own_signature(
            &self.signer_chain_der,
            &self.message(),
            &self.signature,
            SignedKind::Approval,
        )
    }

    /// The wire form carried by `ApproveJob` and by every task.
    pub fn to_pb(&self) -> tutela_protocol::pb::SignedApproval {
        tutela_protocol::pb::SignedApproval {
            job_id: self.job_id.clone(),
            spec_digest: self.spec_digest.to_hex(),
            signer_chain_der: self.signer_chain_der.clone(),
            signature: self.signature.clone(),
            signed_at_unix_ms: self.signed_at_ms,
            expires_at_unix_ms: self.expires_at_ms,
        }
    }

    pub fn from_pb(a: &tutela_protocol::pb::SignedApproval) -> Result<Approval, ApprovalError> {
        let spec_digest = parse_digest(&a.spec_digest, SignedKind::Approval)?;
        Ok(Approval {
            job_id: a.job_id.clone(),
            spec_digest,
            signer_chain_der: a.signer_chain_der.clone(),
            signature: a.signature.clone(),
            signed_at_ms: a.signed_at_unix_ms,
            expires_at_ms: a.expires_at_unix_ms,
        })
    }

    fn message(&self) -> Vec<u8> {
        signed_message(
            &self.job_id,
            &self.spec_digest,
            self.signed_at_ms,
            self.expires_at_ms,
        )
    }
}

/// A compliance officer's signed rejection of one version of a job's spec: the job must not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub job_id: String,
    pub spec_digest: SpecDigest,
    /// Why, in words ([`tutela_protocol::job::rejection_reason_problem`] says what is allowed).
    pub reason: String,
    /// The signer's certificate chain, DER, leaf first.
    pub signer_chain_der: Vec<Vec<u8>>,
    pub signature: Vec<u8>,
    /// Unix milliseconds.
    pub signed_at_ms: i64,
}

/// A rejection whose chain and signature verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRejection {
    pub signer: Identity,
    pub rejection: Rejection,
}

impl Rejection {
    /// Signs the rejection of `job_id` at `digest` for `reason` with a PKCS#8 private key (PEM,
    /// ECDSA P-256 or Ed25519), attaching `chain_pem` (the signer's certificate, leaf first). Like
    /// [`Approval::sign`], it does not check that the key belongs to the certificate:
    /// [`Rejection::check_own_signature`] does, and every verifier will.
    pub fn sign(
        key_pem: &str,
        chain_pem: &str,
        job_id: &str,
        digest: &SpecDigest,
        reason: &str,
        signed_at_ms: i64,
    ) -> Result<Rejection, ApprovalError> {
        if let Some(problem) = tutela_protocol::job::rejection_reason_problem(reason) {
            return Err(ApprovalError::BadReason(problem));
        }
        let message = rejection_signed_message(job_id, digest, reason, signed_at_ms);
        let (chain, signature) =
            sign_with_certificate_key(key_pem, chain_pem, &message, SignedKind::Rejection)?;
        Ok(Rejection {
            job_id: job_id.to_string(),
            spec_digest: *digest,
            reason: reason.to_string(),
            signer_chain_der: chain,
            signature,
            signed_at_ms,
        })
    }

    /// The signer's identity as the leaf certificate names it (unverified).
    pub fn claimed_signer(&self) -> Result<Identity, ApprovalError> {
        claimed_signer(&self.signer_chain_der, SignedKind::Rejection)
    }

    /// Checks only the signature against the leaf's key: the signer's own check that the key
    /// they used belongs to the certificate they attached.
    pub fn check_own_signature(&self) -> Result<(), ApprovalError> {
        check_own_signature(
            &self.signer_chain_der,
            &self.message(),
            &self.signature,
            SignedKind::Rejection,
        )
    }

    /// The wire form carried by `RejectJob`.
    pub fn to_pb(&self) -> tutela_protocol::pb::SignedRejection {
        tutela_protocol::pb::SignedRejection {
            job_id: self.job_id.clone(),
            spec_digest: self.spec_digest.to_hex(),
            reason: self.reason.clone(),
            signer_chain_der: self.signer_chain_der.clone(),
            signature: self.signature.clone(),
            signed_at_unix_ms: self.signed_at_ms,
        }
    }

    pub fn from_pb(r: &tutela_protocol::pb::SignedRejection) -> Result<Rejection, ApprovalError> {
        Ok(Rejection {
            job_id: r.job_id.clone(),
            spec_digest: parse_digest(&r.spec_digest, SignedKind::Rejection)?,
            reason: r.reason.clone(),
            signer_chain_der: r.signer_chain_der.clone(),
            signature: r.signature.clone(),
            signed_at_ms: r.signed_at_unix_ms,
        })
    }

    /// The signed bytes.
    pub fn message(&self) -> Vec<u8> {
        rejection_signed_message(
            &self.job_id,
            &self.spec_digest,
            &self.reason,
            self.signed_at_ms,
        )
    }
}

fn parse_digest(hex: &str, kind: SignedKind) -> Result<SpecDigest, ApprovalError> {
    hex.parse().map_err(
        |e: tutela_protocol::job::BadDigest| ApprovalError::Malformed {
            kind,
            problem: format!("spec_digest: {e}"),
        },
    )
}

/// Signs the terms of an audit quarantine order (`tutela_audit::quarantine::terms_message`, built
/// by the caller: this crate does not depend on the audit crate) with a PKCS#8 key (PEM), returning
/// the certificate chain of `chain_pem` (DER, leaf first) and the signature.
pub fn sign_quarantine_terms(
    key_pem: &str,
    chain_pem: &str,
    message: &[u8],
) -> Result<(Vec<Vec<u8>>, Vec<u8>), ApprovalError> {
    sign_with_certificate_key(key_pem, chain_pem, message, SignedKind::AuditQuarantine)
}

/// Signs `message` with a PKCS#8 key (PEM; ECDSA P-256 SHA-256 in ASN.1 DER, or Ed25519) and
/// returns the certificate chain of `chain_pem` (DER, leaf first) with the signature.
pub(crate) fn sign_with_certificate_key(
    key_pem: &str,
    chain_pem: &str,
    message: &[u8],
    kind: SignedKind,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), ApprovalError> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ApprovalError::Key(format!("no PEM private key: {e}")))?;
    let PrivateKeyDer::Pkcs8(pkcs8) = key else {
        return Err(ApprovalError::Key(
            "not a PKCS#8 key (\"PRIVATE KEY\"); `tutela pki` writes PKCS#8".into(),
        ));
    };
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApprovalError::Certificate(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(ApprovalError::NoCertificate(kind));
    }
    let rng = ring::rand::SystemRandom::new();
    let der = pkcs8.secret_pkcs8_der();
    let signature =
        if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng) {
            k.sign(&rng, message)
                .map_err(|_| ApprovalError::Key("ECDSA signing failed".into()))?
                .as_ref()
                .to_vec()
        } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            k.sign(message).as_ref().to_vec()
        } else {
            return Err(ApprovalError::Key(
                "neither an ECDSA P-256 nor an Ed25519 PKCS#8 key".into(),
            ));
        };
    Ok((chain, signature))
}

pub(crate) fn claimed_signer(
    chain: &[Vec<u8>],
    kind: SignedKind,
) -> Result<Identity, ApprovalError> {
    let leaf = chain.first().ok_or(ApprovalError::NoCertificate(kind))?;
    pki::identity_of_cert_der(leaf).map_err(|e| ApprovalError::Certificate(e.to_string()))
}

pub(crate) fn check_own_signature(
    chain: &[Vec<u8>],
    message: &[u8],
    signature: &[u8],
    kind: SignedKind,
) -> Result<(), ApprovalError> {
    let leaf = chain.first().ok_or(ApprovalError::NoCertificate(kind))?;
    let signer = claimed_signer(chain, kind)?;
    verify_signature(leaf, message, signature, &signer.uri())
}

fn verify_signature(
    leaf_der: &[u8],
    message: &[u8],
    signature: &[u8],
    signer: &str,
) -> Result<(), ApprovalError> {
    pki::verify_signed_by_certificate(leaf_der, message, signature).map_err(|e| match e {
        pki::CertSignatureError::BadSignature => ApprovalError::BadSignature {
            signer: signer.to_string(),
        },
        other => ApprovalError::Certificate(other.to_string()),
    })
}

/// Checks approvals against the consortium CA (and its CRLs).
#[derive(Clone)]
pub struct ApprovalVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    consortium: String,
}

impl std::fmt::Debug for ApprovalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalVerifier")
            .field("consortium", &self.consortium)
            .finish()
    }
}

impl ApprovalVerifier {
    /// A verifier over `roots` and `crls` for principals of `consortium`.
    pub fn new(
        roots: Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        consortium: &str,
    ) -> Result<Self, ApprovalError> {
        let chain = WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .with_crls(crls)
        .build()
        .map_err(|e| ApprovalError::Chain(format!("building the verifier: {e}")))?;
        Ok(ApprovalVerifier {
            chain,
            consortium: consortium.to_string(),
        })
    }

    /// The verifier of an endpoint's TLS material: its CA bundle, its CRLs, its consortium.
    pub fn from_tls(material: &TlsMaterial) -> Result<Self, ApprovalError> {
        Self::new(
            material.roots.clone(),
            material.crls.clone(),
            &material.identity.consortium,
        )
    }

    /// Verifies `approval` for `job_id` at `expected` at time `now_ms` (unix ms).
    pub fn verify(
        &self,
        approval: &Approval,
        job_id: &str,
        expected: &SpecDigest,
        now_ms: i64,
    ) -> Result<VerifiedApproval, ApprovalError> {
        check_subject(
            SignedKind::Approval,
            &approval.job_id,
            &approval.spec_digest,
            job_id,
            expected,
        )?;
        if approval.expires_at_ms <= approval.signed_at_ms {
            return Err(ApprovalError::BadWindow {
                signed_at_ms: approval.signed_at_ms,
                expires_at_ms: approval.expires_at_ms,
            });
        }
        if now_ms >= approval.expires_at_ms {
            return Err(ApprovalError::Expired {
                expires_at_ms: approval.expires_at_ms,
                now_ms,
            });
        }
        if approval.signed_at_ms > now_ms + CLOCK_SKEW_MS {
            return Err(ApprovalError::FromTheFuture {
                kind: SignedKind::Approval,
                signed_at_ms: approval.signed_at_ms,
                now_ms,
            });
        }
        let signer = self.verify_signed(
            SignedKind::Approval,
            &approval.signer_chain_der,
            &approval.message(),
            &approval.signature,
            now_ms,
        )?;
        Ok(VerifiedApproval {
            signer,
            approval: approval.clone(),
        })
    }

    /// Verifies `rejection` of `job_id` at `expected` at time `now_ms` (unix ms): the job and
    /// digest, the reason, that it was signed within [`MAX_REJECTION_AGE_MS`] (and not in the
    /// future), the signer's chain to the consortium CA and CRLs, and the signature over the
    /// rejection message (never the approval message).
    pub fn verify_rejection(
        &self,
        rejection: &Rejection,
        job_id: &str,
        expected: &SpecDigest,
        now_ms: i64,
    ) -> Result<VerifiedRejection, ApprovalError> {
        check_subject(
            SignedKind::Rejection,
            &rejection.job_id,
            &rejection.spec_digest,
            job_id,
            expected,
        )?;
        if let Some(problem) = tutela_protocol::job::rejection_reason_problem(&rejection.reason) {
            return Err(ApprovalError::BadReason(problem));
        }
        if rejection.signed_at_ms > now_ms + CLOCK_SKEW_MS {
            return Err(ApprovalError::FromTheFuture {
                kind: SignedKind::Rejection,
                signed_at_ms: rejection.signed_at_ms,
                now_ms,
            });
        }
        if rejection.signed_at_ms < now_ms.saturating_sub(MAX_REJECTION_AGE_MS) {
            return Err(ApprovalError::Stale {
                signed_at_ms: rejection.signed_at_ms,
                now_ms,
                max_age_ms: MAX_REJECTION_AGE_MS,
            });
        }
        let signer = self.verify_signed(
            SignedKind::Rejection,
            &rejection.signer_chain_der,
            &rejection.message(),
            &rejection.signature,
            now_ms,
        )?;
        Ok(VerifiedRejection {
            signer,
            rejection: rejection.clone(),
        })
    }

    /// The checks every signed decision shares: the chain (leaf first) to the consortium CA at
    /// `now_ms` with the CRLs, the identity it names being of this consortium, and `signature`
    /// over `message` with the leaf's key. Returns the signer.
    pub(crate) fn verify_signed(
        &self,
        kind: SignedKind,
        chain: &[Vec<u8>],
        message: &[u8],
        signature: &[u8],
        now_ms: i64,
    ) -> Result<Identity, ApprovalError> {
        let signer = self.verify_chain(kind, chain, now_ms)?;
        let leaf = chain.first().ok_or(ApprovalError::NoCertificate(kind))?;
        verify_signature(leaf, message, signature, &signer.uri())?;
        Ok(signer)
    }

    /// A certificate chain (DER, leaf first) checked as the signers' are: to the consortium CA
    /// at `now_ms` with the CRLs, its identity of this consortium. Returns that identity. (Secure
    /// aggregation's node certificates, relayed by the coordinator, are checked with it.)
    pub fn verify_certificate(
        &self,
        chain: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<Identity, ApprovalError> {
        self.verify_chain(SignedKind::Approval, chain, now_ms)
    }

    fn verify_chain(
        &self,
        kind: SignedKind,
        chain: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<Identity, ApprovalError> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or(ApprovalError::NoCertificate(kind))?;
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = rest
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_millis(
            u64::try_from(now_ms).unwrap_or(0),
        ));
        self.chain
            .verify_client_cert(&leaf_der, &intermediates, now)
            .map_err(|e| ApprovalError::Chain(e.to_string()))?;
        let signer = pki::identity_of_cert_der(leaf)
            .map_err(|e| ApprovalError::Certificate(e.to_string()))?;
        if signer.consortium != self.consortium {
            return Err(ApprovalError::OtherConsortium {
                signer: signer.uri(),
                consortium: self.consortium.clone(),
            });
        }
        Ok(signer)
    }
}

/// That a signed decision is about job `job_id` at `expected`.
fn check_subject(
    kind: SignedKind,
    signed_job: &str,
    signed_digest: &SpecDigest,
    job_id: &str,
    expected: &SpecDigest,
) -> Result<(), ApprovalError> {
    if signed_job != job_id {
        return Err(ApprovalError::OtherJob {
            kind,
            expected: job_id.to_string(),
            found: signed_job.to_string(),
        });
    }
    if signed_digest != expected {
        return Err(ApprovalError::DigestMismatch {
            kind,
            expected: expected.to_hex(),
            found: signed_digest.to_hex(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tutela_protocol::identity::Principal;
    use tutela_protocol::pki::{
        CertificateAuthority, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity,
    };

    pub fn ca(name: &str) -> CertificateAuthority {
        CertificateAuthority::create(name, KeyAlgorithm::EcdsaP256, Validity::days_from_now(30))
            .unwrap()
    }

    pub fn user(
        ca: &CertificateAuthority,
        site: &str,
        name: &str,
        alg: KeyAlgorithm,
    ) -> IssuedCertificate {
        let mut o = LeafOptions::new(Validity::days_from_now(10));
        o.algorithm = alg;
        ca.issue(
            &Principal::User {
                site: site.into(),
                name: name.into(),
            },
            &o,
        )
        .unwrap()
    }

    pub fn verifier(ca: &CertificateAuthority) -> ApprovalVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        ApprovalVerifier::new(Arc::new(roots), vec![], ca.consortium()).unwrap()
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp() * 1000
    }

    const JOB: &str = "0123456789abcdef0123456789abcdef";
    const DIGEST: SpecDigest = SpecDigest([7; 32]);

    #[test]
    fn an_honest_approval_verifies_with_either_key_type() {
        let ca = ca("acme");
        for alg in KeyAlgorithm::ALL {
            let alice = user(&ca, "a", "alice", alg);
            let t = now();
            let a = Approval::sign(&alice.key_pem, &alice.cert_pem, JOB, &DIGEST, t, t + 60_000)
                .unwrap();
            a.check_own_signature().unwrap();
            let v = verifier(&ca).verify(&a, JOB, &DIGEST, t + 1).unwrap();
            assert_eq!(v.signer.uri(), "spiffe://acme/site/a/user/alice");
        }
    }

    #[test]
    fn forged_approvals_are_refused_each_for_its_reason() {
        let ca_ = ca("acme");
        let alice = user(&ca_, "a", "alice", KeyAlgorithm::EcdsaP256);
        let mallory = user(&ca_, "a", "mallory", KeyAlgorithm::EcdsaP256);
        let t = now();
        let v = verifier(&ca_);

        // Wrong key: Mallory's key, Alice's certificate.
        let a = Approval::sign(
            &mallory.key_pem,
            &alice.cert_pem,
            JOB,
            &DIGEST,
            t,
            t + 60_000,
        )
        .unwrap();
        assert!(a.check_own_signature().is_err());
        assert!(matches!(
            v.verify(&a, JOB, &DIGEST, t),
            Err(ApprovalError::BadSignature { .. })
        ));

        // A certificate from another CA, even one claiming the same identity.
        let other = ca("acme");
        let fake_alice = user(&other, "a", "alice", KeyAlgorithm::EcdsaP256);
        let a = Approval::sign(
            &fake_alice.key_pem,
            &fake_alice.cert_pem,
            JOB,
            &DIGEST,
            t,
            t + 60_000,
        )
        .unwrap();
        assert!(matches!(
            v.verify(&a, JOB, &DIGEST, t),
            Err(ApprovalError::Chain(_))
        ));

        // Another job's digest, and another job's id.
        let a = Approval::sign(
            &alice.key_pem,
            &alice.cert_pem,
            JOB,
            &SpecDigest([8; 32]),
            t,
            t + 60_000,
        )
        .unwrap();
        assert!(matches!(
            v.verify(&a, JOB, &DIGEST, t),
            Err(ApprovalError::DigestMismatch { .. })
        ));
        let a = Approval::sign(
            &alice.key_pem,
            &alice.cert_pem,
            "ffff",
            &DIGEST,
            t,
            t + 60_000,
        )
        .unwrap();
        assert!(matches!(
            v.verify(&a, JOB, &DIGEST, t),
            Err(ApprovalError::OtherJob { .. })
        ));

        // Expired, and a window stretched after signing (the signature covers the window).
        let mut a =
            Approval::sign(&alice.key_pem, &alice.cert_pem, JOB, &DIGEST, t, t + 1000).unwrap();
        assert!(matches!(
            v.verify(&a, JOB, &DIGEST, t + 1000),
            Err(ApprovalError::Expired { .. })
        ));
        a.expires_at_ms += 3_600_000;
        assert!(matches!(
            v.verify(&a, JOB, &DIGEST, t + 1000),
            Err(ApprovalError::BadSignature { .. })
        ));

        // A revoked certificate.
        let serial = alice.serial_hex.clone();
        let crl_pem = ca_
            .crl_pem(
                &[tutela_protocol::pki::Revocation {
                    serial_hex: serial,
                    revoked_at: time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
                    reason: None,
                }],
                1,
                time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
                time::OffsetDateTime::now_utc() + time::Duration::days(1),
            )
            .unwrap();
        let crls = CertificateRevocationListDer::pem_slice_iter(crl_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca_.cert_der().clone()).unwrap();
        let with_crl = ApprovalVerifier::new(Arc::new(roots), crls, "acme").unwrap();
        let a =
            Approval::sign(&alice.key_pem, &alice.cert_pem, JOB, &DIGEST, t, t + 60_000).unwrap();
        assert!(matches!(
            with_crl.verify(&a, JOB, &DIGEST, t),
            Err(ApprovalError::Chain(_))
        ));
    }

    #[test]
    fn an_honest_rejection_verifies_with_either_key_type() {
        let ca = ca("acme");
        for alg in KeyAlgorithm::ALL {
            let alice = user(&ca, "a", "alice", alg);
            let t = now();
            let r = Rejection::sign(
                &alice.key_pem,
                &alice.cert_pem,
                JOB,
                &DIGEST,
                "the DP budget is too high\nfor our data",
                t,
            )
            .unwrap();
            r.check_own_signature().unwrap();
            let back = Rejection::from_pb(&r.to_pb()).unwrap();
            assert_eq!(back, r);
            let v = verifier(&ca)
                .verify_rejection(&r, JOB, &DIGEST, t + 1)
                .unwrap();
            assert_eq!(v.signer.uri(), "spiffe://acme/site/a/user/alice");
            assert_eq!(
                v.rejection.reason,
                "the DP budget is too high\nfor our data"
            );
        }
    }

    #[test]
    fn an_approval_signature_is_no_rejection_and_a_rejection_signature_no_approval() {
        let ca = ca("acme");
        let v = verifier(&ca);
        for alg in KeyAlgorithm::ALL {
            let alice = user(&ca, "a", "alice", alg);
            let t = now();
            let approval =
                Approval::sign(&alice.key_pem, &alice.cert_pem, JOB, &DIGEST, t, t + 60_000)
                    .unwrap();
            let rejection =
                Rejection::sign(&alice.key_pem, &alice.cert_pem, JOB, &DIGEST, "no", t).unwrap();
            // Both genuine as what they are.
            v.verify(&approval, JOB, &DIGEST, t).unwrap();
            v.verify_rejection(&rejection, JOB, &DIGEST, t).unwrap();

            // The approval's signature carried in a rejection of the same job, digest and time.
            let replayed_approval = Rejection {
                signature: approval.signature.clone(),
                ..rejection.clone()
            };
            assert!(replayed_approval.check_own_signature().is_err());
            assert!(matches!(
                v.verify_rejection(&replayed_approval, JOB, &DIGEST, t),
                Err(ApprovalError::BadSignature { .. })
            ));
            // The rejection's signature carried in an approval of the same job, digest and time.
            let replayed_rejection = Approval {
                signature: rejection.signature.clone(),
                ..approval.clone()
            };
            assert!(replayed_rejection.check_own_signature().is_err());
            assert!(matches!(
                v.verify(&replayed_rejection, JOB, &DIGEST, t),
                Err(ApprovalError::BadSignature { .. })
            ));
            // And the messages themselves differ from the first line on.
            assert_ne!(
                approval.message().split(|b| *b == b'\n').next(),
                rejection.message().split(|b| *b == b'\n').next()
            );
        }
    }

    #[test]
    fn forged_rejections_are_refused_each_for_its_reason() {
        let ca_ = ca("acme");
        let alice = user(&ca_, "a", "alice", KeyAlgorithm::EcdsaP256);
        let mallory = user(&ca_, "a", "mallory", KeyAlgorithm::Ed25519);
        let t = now();
        let v = verifier(&ca_);
        let sign = |who: &IssuedCertificate, cert: &str, job: &str, digest: &SpecDigest| {
            Rejection::sign(&who.key_pem, cert, job, digest, "not in our protocol", t).unwrap()
        };

        // Wrong key: Mallory's key, Alice's certificate.
        let r = sign(&mallory, &alice.cert_pem, JOB, &DIGEST);
        assert!(r.check_own_signature().is_err());
        let err = v.verify_rejection(&r, JOB, &DIGEST, t).unwrap_err();
        assert!(matches!(err, ApprovalError::BadSignature { .. }), "{err}");
        assert!(
            err.to_string().contains("spiffe://acme/site/a/user/alice"),
            "{err}"
        );

        // A certificate from another CA claiming the same identity.
        let other = ca("acme");
        let fake_alice = user(&other, "a", "alice", KeyAlgorithm::EcdsaP256);
        let r = sign(&fake_alice, &fake_alice.cert_pem, JOB, &DIGEST);
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t),
            Err(ApprovalError::Chain(_))
        ));

        // Another job's digest, and another job's id.
        let r = sign(&alice, &alice.cert_pem, JOB, &SpecDigest([8; 32]));
        let err = v.verify_rejection(&r, JOB, &DIGEST, t).unwrap_err();
        assert!(
            matches!(
                err,
                ApprovalError::DigestMismatch {
                    kind: SignedKind::Rejection,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("the rejection signs"), "{err}");
        let r = sign(&alice, &alice.cert_pem, "ffff", &DIGEST);
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t),
            Err(ApprovalError::OtherJob { .. })
        ));

        // The reason changed after signing (the signature covers it).
        let mut r = sign(&alice, &alice.cert_pem, JOB, &DIGEST);
        r.reason = "approved after all".into();
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t),
            Err(ApprovalError::BadSignature { .. })
        ));

        // The signing time moved after signing, too old, and in the future.
        let mut r = sign(&alice, &alice.cert_pem, JOB, &DIGEST);
        r.signed_at_ms += 1;
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t),
            Err(ApprovalError::BadSignature { .. })
        ));
        let r = sign(&alice, &alice.cert_pem, JOB, &DIGEST);
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t + MAX_REJECTION_AGE_MS + 1),
            Err(ApprovalError::Stale { .. })
        ));
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t - CLOCK_SKEW_MS - 1),
            Err(ApprovalError::FromTheFuture {
                kind: SignedKind::Rejection,
                ..
            })
        ));

        // No reason, or no certificate.
        assert!(matches!(
            Rejection::sign(&alice.key_pem, &alice.cert_pem, JOB, &DIGEST, "  ", t),
            Err(ApprovalError::BadReason(_))
        ));
        let mut r = sign(&alice, &alice.cert_pem, JOB, &DIGEST);
        r.reason = String::new();
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t),
            Err(ApprovalError::BadReason(_))
        ));
        let mut r = sign(&alice, &alice.cert_pem, JOB, &DIGEST);
        r.signer_chain_der.clear();
        assert!(matches!(
            v.verify_rejection(&r, JOB, &DIGEST, t),
            Err(ApprovalError::NoCertificate(SignedKind::Rejection))
        ));
        let mut wire = sign(&alice, &alice.cert_pem, JOB, &DIGEST).to_pb();
        wire.spec_digest = "not hex".into();
        assert!(matches!(
            Rejection::from_pb(&wire),
            Err(ApprovalError::Malformed {
                kind: SignedKind::Rejection,
                ..
            })
        ));
    }
}
