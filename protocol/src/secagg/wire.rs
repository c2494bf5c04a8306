//! The protocol's messages on the wire (`SecAgg` in `federation.proto`) and the round
//! configuration both sides derive on their own: the coordinator and every site build the same
//! [`RoundConfig`] from the signed job spec, the round, the attempt and the participant list, so a
//! site never takes the configuration from the coordinator.

use std::collections::BTreeMap;

use super::{
    AdvertiseKeys, AdvertisedKey, ClientMessage, ConfirmedRequest, KeysRelay, RoundConfig,
    RoundTag, SecureAggregationSpec, ShareKeys, SharesRelay, SiteIndex, SurvivorsConfirmation,
    UnmaskRequest, UnmaskResponse, UnmaskShare, shamir::CHUNKS, shamir::Share,
};
use crate::pb;
use crate::pb::sec_agg_reply::Relay as PbRelay;
use crate::pb::sec_agg_request::Message as PbMessage;

/// The name of the one `I64` tensor a site's masked input is streamed as (its `Z_2^64` values bit
/// for bit), through the ordinary update upload.
pub const MASKED_TENSOR: &str = "secagg.masked";

/// The round's configuration, as the coordinator and every site compute it.
pub fn round_config(
    spec: &SecureAggregationSpec,
    job_digest: [u8; 32],
    (round, attempt): (u32, u32),
    participants: usize,
    min_sites: u32,
    vector_len: u64,
) -> RoundConfig {
    let sites = u32::try_from(participants).unwrap_or(u32::MAX);
    // The graph seed is derived from (job digest, round, attempt) inside: nobody chooses it.
    spec.round_config(job_digest, round, attempt, sites, min_sites, vector_len)
}

/// A wire message that does not decode into a protocol message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("secure aggregation message: {0}")]
pub struct WireError(pub String);

fn tag(bytes: &[u8]) -> Result<RoundTag, WireError> {
    <[u8; 32]>::try_from(bytes)
        .map(RoundTag)
        .map_err(|_| WireError(format!("round tag has {} bytes, not 32", bytes.len())))
}

fn header(h: Option<&pb::SecAggHeader>) -> Result<(RoundTag, SiteIndex), WireError> {
    let h = h.ok_or_else(|| WireError("the header is missing".into()))?;
    Ok((tag(&h.round_tag)?, h.site))
}

fn pb_header(round: RoundTag, site: SiteIndex) -> Option<pb::SecAggHeader> {
    Some(pb::SecAggHeader {
        round_tag: round.0.to_vec(),
        site,
    })
}

/// Node certificates (DER) by site index, as relayed with the keys.
pub type Certificates = BTreeMap<SiteIndex, Vec<u8>>;

fn keys_to_pb(
    round: RoundTag,
    site: SiteIndex,
    keys: &[AdvertisedKey],
    certificates: &Certificates,
) -> pb::SecAggAdvertiseKeys {
    pb::SecAggAdvertiseKeys {
        header: pb_header(round, site),
        keys: keys
            .iter()
            .map(|k| pb::SecAggKey {
                peer: k.peer,
                public_key: k.public.to_vec(),
                signature: k.signature.clone(),
                certificate: certificates.get(&k.peer).cloned().unwrap_or_default(),
            })
            .collect(),
        certificate: Vec::new(),
    }
}

fn signatures_to_pb(signatures: &[(SiteIndex, Vec<u8>)]) -> Vec<pb::SecAggSignature> {
    signatures
        .iter()
        .map(|(peer, signature)| pb::SecAggSignature {
            peer: *peer,
            signature: signature.clone(),
        })
        .collect()
}

fn signatures_from_pb(signatures: &[pb::SecAggSignature]) -> Vec<(SiteIndex, Vec<u8>)> {
    signatures
        .iter()
        .map(|s| (s.peer, s.signature.clone()))
        .collect()
}

fn unmask_request_to_pb(r: &UnmaskRequest) -> pb::SecAggUnmaskRequest {
    pb::SecAggUnmaskRequest {
        round_tag: r.round.0.to_vec(),
        survivors: r.survivors.clone(),
        dropped: r.dropped.clone(),
    }
}

fn unmask_request_from_pb(m: &pb::SecAggUnmaskRequest) -> Result<UnmaskRequest, WireError> {
    Ok(UnmaskRequest {
        round: tag(&m.round_tag)?,
        survivors: m.survivors.clone(),
        dropped: m.dropped.clone(),
    })
}

fn keys_from_pb(
    m: &pb::SecAggAdvertiseKeys,
) -> Result<(RoundTag, SiteIndex, Vec<AdvertisedKey>), WireError> {
    let (round, site) = header(m.header.as_ref())?;
    let keys = m
        .keys
        .iter()
        .map(|k| {
            let public = <[u8; 32]>::try_from(k.public_key.as_slice()).map_err(|_| {
                WireError(format!(
                    "key for peer {} has {} bytes, not 32",
                    k.peer,
                    k.public_key.len()
                ))
            })?;
            Ok(AdvertisedKey {
                peer: k.peer,
                public,
                signature: k.signature.clone(),
            })
        })
        .collect::<Result<_, WireError>>()?;
    Ok((round, site, keys))
}

fn ciphertexts_to_pb(
    round: RoundTag,
    site: SiteIndex,
    c: &[(SiteIndex, Vec<u8>)],
) -> pb::SecAggShareKeys {
    pb::SecAggShareKeys {
        header: pb_header(round, site),
        ciphertexts: c
            .iter()
            .map(|(peer, ciphertext)| pb::SecAggCiphertext {
                peer: *peer,
                ciphertext: ciphertext.clone(),
            })
            .collect(),
    }
}

/// A message's round, sender (or addressee) and ciphertexts by peer.
type Ciphertexts = (RoundTag, SiteIndex, Vec<(SiteIndex, Vec<u8>)>);

fn ciphertexts_from_pb(m: &pb::SecAggShareKeys) -> Result<Ciphertexts, WireError> {
    let (round, site) = header(m.header.as_ref())?;
    Ok((
        round,
        site,
        m.ciphertexts
            .iter()
            .map(|c| (c.peer, c.ciphertext.clone()))
            .collect(),
    ))
}

/// A site's key advertisement with its node certificate (DER), which the coordinator relays with
/// each of its keys so that the neighbours can check the keys' signatures.
pub fn advertise_request(m: &AdvertiseKeys, certificate: &[u8]) -> PbMessage {
    let mut keys = keys_to_pb(m.round, m.site, &m.keys, &Certificates::new());
    keys.certificate = certificate.to_vec();
    PbMessage::AdvertiseKeys(keys)
}

/// The node certificate a key advertisement carries (empty when the site does not sign).
pub fn advertised_certificate(msg: &PbMessage) -> Option<&[u8]> {
    match msg {
        PbMessage::AdvertiseKeys(m) if !m.certificate.is_empty() => Some(&m.certificate),
        _ => None,
    }
}

/// A site's message to the wire. `None` for a masked input: that goes as a tensor stream. A key
/// advertisement goes without certificate here ([`advertise_request`] adds it).
pub fn request_message(msg: &ClientMessage) -> Option<PbMessage> {
    Some(match msg {
        ClientMessage::AdvertiseKeys(m) => {
            PbMessage::AdvertiseKeys(keys_to_pb(m.round, m.site, &m.keys, &Certificates::new()))
        }
        ClientMessage::ShareKeys(m) => {
            PbMessage::ShareKeys(ciphertexts_to_pb(m.round, m.site, &m.ciphertexts))
        }
        ClientMessage::Unmask(m) => PbMessage::Unmask(pb::SecAggUnmaskResponse {
            header: pb_header(m.round, m.site),
            shares: m
                .shares
                .iter()
                .map(|s| match s {
                    UnmaskShare::SelfSeed { owner, share } => pb::SecAggShare {
                        owner: *owner,
                        peer: None,
                        x: share.x,
                        ys: share.ys.to_vec(),
                    },
                    UnmaskShare::PairSeed { owner, peer, share } => pb::SecAggShare {
                        owner: *owner,
                        peer: Some(*peer),
                        x: share.x,
                        ys: share.ys.to_vec(),
                    },
                })
                .collect(),
        }),
        ClientMessage::Confirm(m) => PbMessage::Confirm(pb::SecAggConfirm {
            header: pb_header(m.round, m.site),
            signatures: signatures_to_pb(&m.signatures),
        }),
        ClientMessage::MaskedInput(_) => return None,
    })
}

/// What the coordinator received, as a protocol message; `Ok(None)` for the request that only
/// waits for the survivor list.
pub fn decode_request(msg: &PbMessage) -> Result<Option<ClientMessage>, WireError> {
    Ok(Some(match msg {
        PbMessage::AdvertiseKeys(m) => {
            let (round, site, keys) = keys_from_pb(m)?;
            ClientMessage::AdvertiseKeys(AdvertiseKeys { round, site, keys })
        }
        PbMessage::ShareKeys(m) => {
            let (round, site, ciphertexts) = ciphertexts_from_pb(m)?;
            ClientMessage::ShareKeys(ShareKeys {
                round,
                site,
                ciphertexts,
            })
        }
        PbMessage::AwaitUnmask(_) => return Ok(None),
        PbMessage::Confirm(m) => {
            let (round, site) = header(m.header.as_ref())?;
            ClientMessage::Confirm(SurvivorsConfirmation {
                round,
                site,
                signatures: signatures_from_pb(&m.signatures),
            })
        }
        PbMessage::Unmask(m) => {
            let (round, site) = header(m.header.as_ref())?;
            let shares = m
                .shares
                .iter()
                .map(|s| {
                    let ys = <[u64; CHUNKS]>::try_from(s.ys.as_slice()).map_err(|_| {
                        WireError(format!(
                            "a share of site {}'s seed has {} elements, not {CHUNKS}",
                            s.owner,
                            s.ys.len()
                        ))
                    })?;
                    let share = Share { x: s.x, ys };
                    Ok(match s.peer {
                        None => UnmaskShare::SelfSeed {
                            owner: s.owner,
                            share,
                        },
                        Some(peer) => UnmaskShare::PairSeed {
                            owner: s.owner,
                            peer,
                            share,
                        },
                    })
                })
                .collect::<Result<_, WireError>>()?;
            ClientMessage::Unmask(UnmaskResponse {
                round,
                site,
                shares,
            })
        }
    }))
}

/// What the server relays to a site, for the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerRelay {
    Keys(KeysRelay),
    /// The keys of a round whose sites sign, each with its maker's node certificate.
    SignedKeys {
        keys: KeysRelay,
        certificates: Certificates,
    },
    Shares(SharesRelay),
    Unmask(UnmaskRequest),
    /// The consistency check's outcome for one site: the survivor list and its neighbours'
    /// signatures over it.
    Confirmed(ConfirmedRequest),
    Done,
}

pub fn reply(relay: &ServerRelay) -> pb::SecAggReply {
    let relay = match relay {
        ServerRelay::Keys(r) => {
            PbRelay::Keys(keys_to_pb(r.round, r.to, &r.keys, &Certificates::new()))
        }
        ServerRelay::SignedKeys { keys, certificates } => {
            PbRelay::Keys(keys_to_pb(keys.round, keys.to, &keys.keys, certificates))
        }
        ServerRelay::Shares(r) => PbRelay::Shares(ciphertexts_to_pb(r.round, r.to, &r.ciphertexts)),
        ServerRelay::Unmask(r) => PbRelay::UnmaskRequest(unmask_request_to_pb(r)),
        ServerRelay::Confirmed(c) => PbRelay::Confirmed(pb::SecAggConfirmedRequest {
            request: Some(unmask_request_to_pb(&c.request)),
            to: c.to,
            confirmations: signatures_to_pb(&c.confirmations),
        }),
        ServerRelay::Done => PbRelay::Done(pb::SecAggDone {}),
    };
    pb::SecAggReply { relay: Some(relay) }
}

pub fn decode_reply(reply: &pb::SecAggReply) -> Result<ServerRelay, WireError> {
    Ok(match &reply.relay {
        None => return Err(WireError("the reply is empty".into())),
        Some(PbRelay::Keys(m)) => {
            let (round, to, keys) = keys_from_pb(m)?;
            let keys = KeysRelay { round, to, keys };
            if m.keys.iter().any(|k| !k.certificate.is_empty()) {
                let certificates = m
                    .keys
                    .iter()
                    .filter(|k| !k.certificate.is_empty())
                    .map(|k| (k.peer, k.certificate.clone()))
                    .collect();
                ServerRelay::SignedKeys { keys, certificates }
            } else {
                ServerRelay::Keys(keys)
            }
        }
        Some(PbRelay::Shares(m)) => {
            let (round, to, ciphertexts) = ciphertexts_from_pb(m)?;
            ServerRelay::Shares(SharesRelay {
                round,
                to,
                ciphertexts,
            })
        }
        Some(PbRelay::UnmaskRequest(m)) => ServerRelay::Unmask(unmask_request_from_pb(m)?),
        Some(PbRelay::Confirmed(m)) => ServerRelay::Confirmed(ConfirmedRequest {
            request: unmask_request_from_pb(
                m.request
                    .as_ref()
                    .ok_or_else(|| WireError("the confirmed request is missing".into()))?,
            )?,
            to: m.to,
            confirmations: signatures_from_pb(&m.confirmations),
        }),
        Some(PbRelay::Done(_)) => ServerRelay::Done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::{ClientAdvertising, ServerCollectingKeys};

    #[test]
    fn messages_and_relays_survive_the_wire() {
        let spec: SecureAggregationSpec = toml::from_str("scale_bits = 16").unwrap();
        let config = round_config(&spec, [3; 32], (2, 1), 4, 2, 5);
        assert_eq!(config, round_config(&spec, [3; 32], (2, 1), 4, 2, 5));
        assert_ne!(
            config.graph_seed,
            round_config(&spec, [3; 32], (2, 2), 4, 2, 5).graph_seed,
            "a retried round gets a fresh graph"
        );
        let mut server = ServerCollectingKeys::new(config.clone()).unwrap();
        for site in 0..4 {
            let (_, advert) = ClientAdvertising::new(config.clone(), site)
                .unwrap()
                .advertise_keys()
                .unwrap();
            let msg = ClientMessage::from(advert);
            let wire = request_message(&msg).unwrap();
            assert_eq!(decode_request(&wire).unwrap(), Some(msg.clone()));
            server.receive(msg).unwrap();
        }
        let (_, relays) = server.close().unwrap();
        for r in relays {
            let relay = ServerRelay::Keys(r);
            assert_eq!(decode_reply(&reply(&relay)).unwrap(), relay);
        }
        let bad = PbMessage::AdvertiseKeys(pb::SecAggAdvertiseKeys {
            header: Some(pb::SecAggHeader {
                round_tag: vec![0; 31],
                site: 0,
            }),
            keys: vec![],
            certificate: vec![],
        });
        assert!(decode_request(&bad).unwrap_err().0.contains("31 bytes"));
    }

    #[test]
    fn certificates_confirmations_and_confirmed_requests_survive_the_wire() {
        let spec: SecureAggregationSpec = toml::from_str("scale_bits = 16").unwrap();
        let config = round_config(&spec, [4; 32], (1, 1), 3, 2, 5);
        let (_, advert) = ClientAdvertising::new(config.clone(), 1)
            .unwrap()
            .advertise_keys()
            .unwrap();
        let pb = advertise_request(&advert, b"certificate of site 1");
        assert_eq!(
            advertised_certificate(&pb),
            Some(&b"certificate of site 1"[..])
        );
        assert_eq!(
            decode_request(&pb).unwrap(),
            Some(ClientMessage::AdvertiseKeys(advert.clone()))
        );
        assert_eq!(
            advertised_certificate(&request_message(&advert.clone().into()).unwrap()),
            None
        );
        let keys = KeysRelay {
            round: advert.round,
            to: 0,
            keys: advert
                .keys
                .iter()
                .map(|k| AdvertisedKey {
                    peer: 1,
                    ..k.clone()
                })
                .collect(),
        };
        let signed = ServerRelay::SignedKeys {
            keys: keys.clone(),
            certificates: Certificates::from([(1, b"certificate of site 1".to_vec())]),
        };
        assert_eq!(decode_reply(&reply(&signed)).unwrap(), signed);
        let unsigned = ServerRelay::Keys(keys);
        assert_eq!(decode_reply(&reply(&unsigned)).unwrap(), unsigned);

        let request = UnmaskRequest {
            round: config.tag(),
            survivors: vec![0, 1],
            dropped: vec![2],
        };
        let confirm = ClientMessage::Confirm(SurvivorsConfirmation {
            round: config.tag(),
            site: 1,
            signatures: vec![(0, vec![1, 2, 3]), (2, vec![4])],
        });
        assert_eq!(
            decode_request(&request_message(&confirm).unwrap()).unwrap(),
            Some(confirm)
        );
        let confirmed = ServerRelay::Confirmed(ConfirmedRequest {
            request,
            to: 1,
            confirmations: vec![(0, vec![9; 64])],
        });
        assert_eq!(decode_reply(&reply(&confirmed)).unwrap(), confirmed);
    }
}
