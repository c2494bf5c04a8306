//! The messages of a SecAgg+ round, site to server and server to site. Each carries the round's
//! tag; a site's messages name the site (the transport checks that against the caller's
//! certificate before handing it on).

use std::fmt;

use super::shamir::{CHUNKS, Share};
use super::{RoundTag, SiteIndex};

/// The protocol's phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    /// Only when the sites sign: each survivor signs the survivor list it was sent, and unmasks
    /// only when enough survivors signed the same list.
    ConsistencyCheck,
    Unmasking,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::AdvertiseKeys => "advertise-keys",
            Phase::ShareKeys => "share-keys",
            Phase::MaskedInput => "masked-input",
            Phase::ConsistencyCheck => "consistency-check",
            Phase::Unmasking => "unmasking",
        })
    }
}

/// One X25519 public key made for one pair, with the maker's signature over it
/// ([`signing`](super::signing); empty when the round's sites do not sign).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertisedKey {
    /// In [`AdvertiseKeys`]: the neighbour the key is for. In [`KeysRelay`]: the neighbour that
    /// made it.
    pub peer: SiteIndex,
    pub public: [u8; 32],
    pub signature: Vec<u8>,
}

/// Phase 0, site → server: one X25519 public key per neighbour, addressed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub round: RoundTag,
    pub site: SiteIndex,
    pub keys: Vec<AdvertisedKey>,
}

/// Server → site after phase 0: the keys of the site's neighbours that advertised, each the one
/// that neighbour made for this site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeysRelay {
    pub round: RoundTag,
    pub to: SiteIndex,
    pub keys: Vec<AdvertisedKey>,
}

/// Phase 1, site → server: for each live neighbour, its shares sealed under the pair's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareKeys {
    pub round: RoundTag,
    pub site: SiteIndex,
    pub ciphertexts: Vec<(SiteIndex, Vec<u8>)>,
}

/// Server → site after phase 1: the ciphertexts addressed to the site, by sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharesRelay {
    pub round: RoundTag,
    pub to: SiteIndex,
    pub ciphertexts: Vec<(SiteIndex, Vec<u8>)>,
}

/// Phase 2, site → server: the masked input, `Z_2^64` per element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedInput {
    pub round: RoundTag,
    pub site: SiteIndex,
    pub masked: Vec<u64>,
}

/// Server → site after phase 2: who sent a masked input (survivors) and who shared keys but did
/// not (dropped). A site answers with shares of survivors' self seeds and of dropped sites'
/// pairwise seeds, never both for one site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub round: RoundTag,
    pub survivors: Vec<SiteIndex>,
    pub dropped: Vec<SiteIndex>,
}

/// Consistency check, site → server: the site's signatures over the [`UnmaskRequest`] it was
/// sent, one for each neighbour it advertised a key to (`signing::survivors_message`: each binds
/// the key the site advertised for that neighbour in this attempt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SurvivorsConfirmation {
    pub round: RoundTag,
    pub site: SiteIndex,
    /// `(neighbour, signature for that neighbour)`.
    pub signatures: Vec<(SiteIndex, Vec<u8>)>,
}

/// Server → site `to` after the consistency check: the request and the signatures over it that
/// `to`'s neighbours addressed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfirmedRequest {
    pub request: UnmaskRequest,
    pub to: SiteIndex,
    /// (signer, its signature for `to`).
    pub confirmations: Vec<(SiteIndex, Vec<u8>)>,
}

/// One share a site reveals in phase 3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnmaskShare {
    /// Of survivor `owner`'s self-mask seed.
    SelfSeed { owner: SiteIndex, share: Share },
    /// Of the pairwise mask seed between dropped `owner` and survivor `peer`.
    PairSeed {
        owner: SiteIndex,
        peer: SiteIndex,
        share: Share,
    },
}

/// Phase 3, site → server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskResponse {
    pub round: RoundTag,
    pub site: SiteIndex,
    pub shares: Vec<UnmaskShare>,
}

/// A site's message as the server receives it from the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    AdvertiseKeys(AdvertiseKeys),
    ShareKeys(ShareKeys),
    MaskedInput(MaskedInput),
    Confirm(SurvivorsConfirmation),
    Unmask(UnmaskResponse),
}

impl ClientMessage {
    pub fn phase(&self) -> Phase {
        match self {
            ClientMessage::AdvertiseKeys(_) => Phase::AdvertiseKeys,
            ClientMessage::ShareKeys(_) => Phase::ShareKeys,
            ClientMessage::MaskedInput(_) => Phase::MaskedInput,
            ClientMessage::Confirm(_) => Phase::ConsistencyCheck,
            ClientMessage::Unmask(_) => Phase::Unmasking,
        }
    }

    pub fn site(&self) -> SiteIndex {
        match self {
            ClientMessage::AdvertiseKeys(m) => m.site,
            ClientMessage::ShareKeys(m) => m.site,
            ClientMessage::MaskedInput(m) => m.site,
            ClientMessage::Confirm(m) => m.site,
            ClientMessage::Unmask(m) => m.site,
        }
    }

    /// Bytes this message takes in a compact binary encoding (tag, indices as 4 bytes, keys 32,
    /// vector elements 8, a length prefix of 4 per list): what a site sends, for the benchmark.
    pub fn wire_bytes(&self) -> u64 {
        const HEADER: u64 = 32 + 4 + 4;
        let n = |len: usize| len as u64;
        match self {
            ClientMessage::AdvertiseKeys(m) => {
                HEADER
                    + m.keys
                        .iter()
                        .map(|k| 4 + 32 + 4 + n(k.signature.len()))
                        .sum::<u64>()
            }
            ClientMessage::ShareKeys(m) => {
                HEADER
                    + m.ciphertexts
                        .iter()
                        .map(|(_, c)| 4 + 4 + n(c.len()))
                        .sum::<u64>()
            }
            ClientMessage::MaskedInput(m) => HEADER + n(m.masked.len()) * 8,
            ClientMessage::Confirm(m) => {
                HEADER
                    + 4
                    + m.signatures
                        .iter()
                        .map(|(_, sig)| 4 + 4 + n(sig.len()))
                        .sum::<u64>()
            }
            ClientMessage::Unmask(m) => {
                HEADER
                    + m.shares
                        .iter()
                        .map(|s| match s {
                            UnmaskShare::SelfSeed { .. } => 1 + 4 + 8 + 8 * CHUNKS as u64,
                            UnmaskShare::PairSeed { .. } => 1 + 8 + 8 + 8 * CHUNKS as u64,
                        })
                        .sum::<u64>()
            }
        }
    }
}

impl From<AdvertiseKeys> for ClientMessage {
    fn from(m: AdvertiseKeys) -> Self {
        ClientMessage::AdvertiseKeys(m)
    }
}
impl From<ShareKeys> for ClientMessage {
    fn from(m: ShareKeys) -> Self {
        ClientMessage::ShareKeys(m)
    }
}
impl From<MaskedInput> for ClientMessage {
    fn from(m: MaskedInput) -> Self {
        ClientMessage::MaskedInput(m)
    }
}
impl From<SurvivorsConfirmation> for ClientMessage {
    fn from(m: SurvivorsConfirmation) -> Self {
        ClientMessage::Confirm(m)
    }
}
impl From<UnmaskResponse> for ClientMessage {
    fn from(m: UnmaskResponse) -> Self {
        ClientMessage::Unmask(m)
    }
}

/// The plaintext of one site's shares for one holder: its self-mask seed's share and one share
/// per pairwise seed, by peer. Encoded as `count:u32`, then per entry `peer:u32` (`u32::MAX` for
/// the self seed) and five `u64` field elements, all little-endian; decoding is strict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ShareBundle {
    pub self_seed: [u64; CHUNKS],
    pub pair_seeds: Vec<(SiteIndex, [u64; CHUNKS])>,
}

const SELF_MARK: u32 = u32::MAX;
const ENTRY: usize = 4 + 8 * CHUNKS;

impl ShareBundle {
    pub fn encode(&self) -> Vec<u8> {
        let count = 1 + self.pair_seeds.len();
        let mut out = Vec::with_capacity(4 + count * ENTRY);
        out.extend_from_slice(&(count as u32).to_le_bytes());
        let entries = std::iter::once((SELF_MARK, &self.self_seed))
            .chain(self.pair_seeds.iter().map(|(p, y)| (*p, y)));
        for (peer, ys) in entries {
            out.extend_from_slice(&peer.to_le_bytes());
            for y in ys {
                out.extend_from_slice(&y.to_le_bytes());
            }
        }
        out
    }

    /// Strict decoding: exact length, exactly one self-seed entry first, distinct peers, every
    /// value inside the field.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let count = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("its share bundle is shorter than its 4-byte count")?;
        if count == 0 || bytes.len() != 4 + count * ENTRY {
            return Err(format!(
                "its share bundle is {} bytes, which is not {count} entries of {ENTRY} bytes",
                bytes.len()
            ));
        }
        let mut entries = bytes[4..].chunks_exact(ENTRY).map(|e| {
            let peer = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let mut ys = [0u64; CHUNKS];
            for (i, y) in ys.iter_mut().enumerate() {
                let at = 4 + 8 * i;
                let mut w = [0u8; 8];
                w.copy_from_slice(&e[at..at + 8]);
                *y = u64::from_le_bytes(w);
            }
            (peer, ys)
        });
        let (first, self_seed) = entries.next().ok_or("its share bundle is empty")?;
        if first != SELF_MARK {
            return Err("its share bundle does not start with the self-seed share".into());
        }
        let pair_seeds: Vec<_> = entries.collect();
        let mut peers: Vec<u32> = pair_seeds.iter().map(|(p, _)| *p).collect();
        peers.sort_unstable();
        if peers.windows(2).any(|w| w[0] == w[1]) || peers.contains(&SELF_MARK) {
            return Err("its share bundle repeats a peer".into());
        }
        let in_field = |ys: &[u64; CHUNKS]| ys.iter().all(|&y| y < super::shamir::P);
        if !in_field(&self_seed) || !pair_seeds.iter().all(|(_, ys)| in_field(ys)) {
            return Err("its share bundle holds a value outside the field".into());
        }
        Ok(ShareBundle {
            self_seed,
            pair_seeds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_bundles_round_trip_and_malformed_ones_are_refused() {
        let b = ShareBundle {
            self_seed: [1, 2, 3, 4, 5],
            pair_seeds: vec![(3, [6, 7, 8, 9, 10]), (8, [0; 5])],
        };
        let bytes = b.encode();
        assert_eq!(ShareBundle::decode(&bytes).unwrap(), b);
        assert!(ShareBundle::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(ShareBundle::decode(&[]).is_err());
        let mut dup = b.clone();
        dup.pair_seeds[1].0 = 3;
        assert!(
            ShareBundle::decode(&dup.encode())
                .unwrap_err()
                .contains("repeats")
        );
        let mut big = b.clone();
        big.self_seed[0] = u64::MAX;
        assert!(
            ShareBundle::decode(&big.encode())
                .unwrap_err()
                .contains("field")
        );
        let mut no_self = bytes.clone();
        no_self[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert!(ShareBundle::decode(&no_self).is_err());
    }
}
