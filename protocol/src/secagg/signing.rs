//! Signed key advertisements: each public key a site advertises for a neighbour is signed with the
//! site's identity key (the private key of its node certificate, ECDSA P-256 or Ed25519 as `tutela
//! pki` issues them), and the neighbour checks the signature with the site's certificate before
//! agreeing. Without it a malicious coordinator could hand each site its own keys in place of the
//! neighbours' (a man in the middle on every pair) and unmask everyone; with it, substituting a key
//! needs a site's private key.
//!
//! The signed message is `"tutela-secagg-v1 key\0" ‖ round tag ‖ from ‖ to ‖ public key`: a
//! signature is good for one key, one ordered pair and one round only.
//!
//! The library checks signatures only; that a certificate chains to the consortium CA, is not
//! revoked and names the site the coordinator says it does is the site node's check (as for
//! approvals: `pki::verify_signed_by_certificate` likewise checks only the signature).

use std::collections::BTreeMap;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{RoundTag, SecAggError, SiteIndex};

/// Signs this site's advertised keys.
pub trait KeySigner: Send + Sync {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String>;
}

/// Checks a neighbour's signature over the key it advertised.
pub trait KeyVerifier: Send + Sync {
    fn verify(&self, site: SiteIndex, message: &[u8], signature: &[u8]) -> Result<(), String>;
}

/// The message a key's signature covers.
pub(crate) fn key_message(
    tag: &RoundTag,
    from: SiteIndex,
    to: SiteIndex,
    public: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(21 + 32 + 8 + 32);
    m.extend_from_slice(b"tutela-secagg-v1 key\0");
    m.extend_from_slice(&tag.0);
    m.extend_from_slice(&from.to_le_bytes());
    m.extend_from_slice(&to.to_le_bytes());
    m.extend_from_slice(public);
    m
}

/// The message survivor `from` signs for its neighbour `to` in the consistency check: the whole
/// request it was sent, bound to this attempt's transcript of the pair, the X25519 public key
/// `from` advertised for `to` (fresh per attempt, signed in phase 0 and held by `to`). A
/// signature from an earlier attempt with the same [`RoundConfig`](super::RoundConfig) (same tag)
/// covers another key, so it cannot be replayed to make a different list pass.
pub(crate) fn survivors_message(
    request: &super::UnmaskRequest,
    from: SiteIndex,
    to: SiteIndex,
    key_from_for_to: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(b"tutela-secagg-v2 survivors\0");
    m.extend_from_slice(&request.round.0);
    m.extend_from_slice(&from.to_le_bytes());
    m.extend_from_slice(&to.to_le_bytes());
    m.extend_from_slice(key_from_for_to);
    for list in [&request.survivors, &request.dropped] {
        m.extend_from_slice(&(list.len() as u32).to_le_bytes());
        for s in list {
            m.extend_from_slice(&s.to_le_bytes());
        }
    }
    m
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A site's identity key, from its node certificate's PKCS#8 PEM private key.
pub struct IdentityKey {
    pair: Pair,
    rng: SystemRandom,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityKey(private key hidden)")
    }
}

impl IdentityKey {
    pub fn from_pkcs8_pem(key_pem: &str) -> Result<Self, SecAggError> {
        let bad = |what: &str| SecAggError::Crypto(format!("the site's identity key: {what}"));
        let PrivateKeyDer::Pkcs8(pkcs8) = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| bad("no PEM private key"))?
        else {
            return Err(bad("not a PKCS#8 key (\"PRIVATE KEY\")"));
        };
        let der = pkcs8.secret_pkcs8_der();
        let rng = SystemRandom::new();
        let pair =
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng) {
                Pair::Ecdsa(k)
            } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                Pair::Ed25519(k)
            } else {
                return Err(bad("neither an ECDSA P-256 nor an Ed25519 key"));
            };
        Ok(IdentityKey { pair, rng })
    }

    /// The public key (for tests and diagnostics).
    pub fn public_key(&self) -> &[u8] {
        match &self.pair {
            Pair::Ecdsa(k) => k.public_key().as_ref(),
            Pair::Ed25519(k) => k.public_key().as_ref(),
        }
    }
}

impl KeySigner for IdentityKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        match &self.pair {
            Pair::Ecdsa(k) => k
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ECDSA signing failed".to_string()),
            Pair::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
        }
    }
}

/// The participants' node certificates by site index (the caller has checked each chains to the
/// consortium CA and names that site).
#[derive(Clone, Debug, Default)]
pub struct SiteCertificates {
    der: BTreeMap<SiteIndex, Vec<u8>>,
}

impl SiteCertificates {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds site `site`'s certificate, PEM.
    pub fn insert_pem(&mut self, site: SiteIndex, cert_pem: &str) -> Result<(), SecAggError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| {
            SecAggError::Crypto(format!(
                "site {site}'s certificate is not a PEM certificate"
            ))
        })?;
        self.der.insert(site, der.as_ref().to_vec());
        Ok(())
    }
}

impl KeyVerifier for SiteCertificates {
    fn verify(&self, site: SiteIndex, message: &[u8], signature: &[u8]) -> Result<(), String> {
        let der = self
            .der
            .get(&site)
            .ok_or_else(|| format!("no certificate is known for site {site}"))?;
        crate::pki::verify_signed_by_certificate(der, message, signature)
            .map_err(|e| format!("its key's signature: {e}"))
    }
}
