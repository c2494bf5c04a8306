//! Pairwise key agreement (X25519, ring) and what it derives: the pair's mask seed and its
//! share-encryption key (HKDF-SHA256), and the share encryption (ChaCha20-Poly1305, ring).
//!
//! A site makes one ephemeral key pair per neighbour (ring's agreement keys are single-use and
//! cannot be exported: see the module documentation of `secagg` for why that is the design).
//! Both ends of the pair `{u, v}` derive the same two 32-byte keys:
//! `HKDF-SHA256(salt = round tag, ikm = X25519(sk_u→v, pk_v→u), info = label ‖ min ‖ max)` with
//! the labels `mask` and `encrypt`. Each encryption key seals exactly two messages (u → v and
//! v → u), so the nonce is fixed by the direction; the associated data binds the round tag,
//! sender and receiver.

use std::collections::BTreeMap;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::SystemRandom;

use super::{RoundTag, SecAggError, SiteIndex};

/// A 32-byte seed a mask is expanded from.
pub type Seed = [u8; 32];

/// Length of a Poly1305 tag appended to a ciphertext.
pub const TAG_LEN: usize = 16;

/// A site's private halves for this round, one per neighbour it advertised a key to.
pub(crate) struct PairKeys {
    private: BTreeMap<SiteIndex, EphemeralPrivateKey>,
}

impl std::fmt::Debug for PairKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PairKeys({} neighbours, private keys hidden)",
            self.private.len()
        )
    }
}

/// What one agreement gives a pair.
pub(crate) struct PairSecrets {
    pub mask_seed: Seed,
    pub encryption_key: [u8; 32],
}

impl PairKeys {
    /// A fresh key pair for each neighbour; returns the public halves to advertise.
    pub fn generate(
        neighbours: &[SiteIndex],
        rng: &SystemRandom,
    ) -> Result<(Self, Vec<(SiteIndex, [u8; 32])>), SecAggError> {
        let mut private = BTreeMap::new();
        let mut public = Vec::with_capacity(neighbours.len());
        for &v in neighbours {
            let sk = EphemeralPrivateKey::generate(&X25519, rng)
                .map_err(|_| SecAggError::Crypto("the OS random generator failed".into()))?;
            let pk = sk
                .compute_public_key()
                .map_err(|_| SecAggError::Crypto("computing an X25519 public key failed".into()))?;
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(pk.as_ref());
            public.push((v, bytes));
            private.insert(v, sk);
        }
        Ok((PairKeys { private }, public))
    }

    /// Agrees with `peer`'s key addressed to `me`, consuming the private key for that peer.
    /// `None` when no key was made for `peer`; an error when the peer's key is not a valid X25519
    /// point (ring refuses low-order points, whose shared secret would be known to anyone).
    pub fn agree(
        &mut self,
        me: SiteIndex,
        peer: SiteIndex,
        peer_public: &[u8; 32],
        tag: &RoundTag,
    ) -> Option<Result<PairSecrets, String>> {
        let sk = self.private.remove(&peer)?;
        let peer_key = UnparsedPublicKey::new(&X25519, peer_public);
        Some(
            agreement::agree_ephemeral(sk, &peer_key, |shared| {
                derive(shared, me.min(peer), me.max(peer), tag)
            })
            .map_err(|_| "its X25519 public key is invalid (a low-order point)".to_string())
            .and_then(|r| r),
        )
    }
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn derive(
    shared: &[u8],
    low: SiteIndex,
    high: SiteIndex,
    tag: &RoundTag,
) -> Result<PairSecrets, String> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &tag.0).extract(shared);
    let expand = |label: &[u8]| -> Result<[u8; 32], String> {
        let mut out = [0u8; 32];
        let low = low.to_le_bytes();
        let high = high.to_le_bytes();
        prk.expand(&[b"tutela-secagg-v1 ", label, &low, &high], Len32)
            .and_then(|okm| okm.fill(&mut out))
            .map_err(|_| "HKDF expansion failed".to_string())?;
        Ok(out)
    };
    Ok(PairSecrets {
        mask_seed: expand(b"mask")?,
        encryption_key: expand(b"encrypt")?,
    })
}

fn nonce(sender: SiteIndex, receiver: SiteIndex) -> Nonce {
    // The pair's key seals one message in each direction: the direction is the nonce.
    let mut n = [0u8; 12];
    n[0] = u8::from(sender > receiver);
    Nonce::assume_unique_for_key(n)
}

fn aad(tag: &RoundTag, sender: SiteIndex, receiver: SiteIndex) -> [u8; 40] {
    let mut a = [0u8; 40];
    a[..32].copy_from_slice(&tag.0);
    a[32..36].copy_from_slice(&sender.to_le_bytes());
    a[36..].copy_from_slice(&receiver.to_le_bytes());
    a
}

/// Seals `plaintext` from `sender` to `receiver` under the pair's key.
pub(crate) fn seal(
    key: &[u8; 32],
    tag: &RoundTag,
    sender: SiteIndex,
    receiver: SiteIndex,
    plaintext: Vec<u8>,
) -> Result<Vec<u8>, SecAggError> {
    let key = LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, key)
            .map_err(|_| SecAggError::Crypto("bad ChaCha20-Poly1305 key".into()))?,
    );
    let mut buf = plaintext;
    key.seal_in_place_append_tag(
        nonce(sender, receiver),
        Aad::from(aad(tag, sender, receiver)),
        &mut buf,
    )
    .map_err(|_| SecAggError::Crypto("ChaCha20-Poly1305 sealing failed".into()))?;
    Ok(buf)
}

/// Opens a ciphertext `sender` sealed for `receiver`; `Err` with the reason when it was altered,
/// truncated, sealed for another pair or round, or under another key.
pub(crate) fn open(
    key: &[u8; 32],
    tag: &RoundTag,
    sender: SiteIndex,
    receiver: SiteIndex,
    ciphertext: &[u8],
) -> Result<Vec<u8>, String> {
    if ciphertext.len() < TAG_LEN {
        return Err(format!(
            "its ciphertext is {} bytes, shorter than the {TAG_LEN}-byte authentication tag",
            ciphertext.len()
        ));
    }
    let key = LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| "bad key".to_string())?,
    );
    let mut buf = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            nonce(sender, receiver),
            Aad::from(aad(tag, sender, receiver)),
            &mut buf,
        )
        .map_err(|_| {
            "its ciphertext does not authenticate (altered, or not sealed by that site for this \
             site in this round)"
                .to_string()
        })?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_derive_the_same_keys_and_seal_open_round_trips() {
        let rng = SystemRandom::new();
        let tag = RoundTag([3; 32]);
        let (mut a, a_pub) = PairKeys::generate(&[1], &rng).unwrap();
        let (mut b, b_pub) = PairKeys::generate(&[0], &rng).unwrap();
        let sa = a.agree(0, 1, &b_pub[0].1, &tag).unwrap().unwrap();
        let sb = b.agree(1, 0, &a_pub[0].1, &tag).unwrap().unwrap();
        assert_eq!(sa.mask_seed, sb.mask_seed);
        assert_eq!(sa.encryption_key, sb.encryption_key);
        assert_ne!(sa.mask_seed, sa.encryption_key);
        // Single use: the key for that peer is gone.
        assert!(a.agree(0, 1, &b_pub[0].1, &tag).is_none());

        let ct = seal(&sa.encryption_key, &tag, 0, 1, b"shares".to_vec()).unwrap();
        assert_eq!(
            open(&sb.encryption_key, &tag, 0, 1, &ct).unwrap(),
            b"shares"
        );
        // Wrong direction, wrong round, altered byte, truncated: refused.
        assert!(open(&sb.encryption_key, &tag, 1, 0, &ct).is_err());
        assert!(open(&sb.encryption_key, &RoundTag([4; 32]), 0, 1, &ct).is_err());
        let mut altered = ct.clone();
        altered[2] ^= 1;
        assert!(open(&sb.encryption_key, &tag, 0, 1, &altered).is_err());
        assert!(
            open(&sb.encryption_key, &tag, 0, 1, &ct[..10])
                .unwrap_err()
                .contains("shorter")
        );
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let rng = SystemRandom::new();
        let (mut a, _) = PairKeys::generate(&[1], &rng).unwrap();
        let zero = [0u8; 32];
        assert!(a.agree(0, 1, &zero, &RoundTag([0; 32])).unwrap().is_err());
    }
}
