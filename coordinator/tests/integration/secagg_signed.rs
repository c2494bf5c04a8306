//! The wired protocol's signatures and consistency check through the coordinator's real
//! `MaskedAggregation` in signing mode (`Signing::Required`, what `aggregate::plan` opens for a
//! job with `[secure_aggregation]`): every message crosses the wire encoding
//! (`secagg::wire`: the advertisement carries the node certificate, the keys relay carries each
//! maker's), the sites hold identity keys and certificates from a CA made at test time, and the
//! coordinator is made to cheat between its honest state machine and the sites (a forged key
//! advertisement relayed in place of a neighbour's; different survivor lists told to different
//! neighbours). Each cheat is refused by the sites, naming why, and the round fails.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use tutela_coordinator::aggregate::masked::{MaskedAggregation, PhasedRound, Relay, Signing};
use tutela_coordinator::aggregate::{RoundAggregation, RoundResult};
use tutela_protocol::identity::Principal;
use tutela_protocol::pki::{CertificateAuthority, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::secagg::signing::{IdentityKey, KeyVerifier, SiteCertificates};
use tutela_protocol::secagg::wire::{self, ServerRelay};
use tutela_protocol::secagg::{
    ClientAdvertising, ClientAwaitingUnmask, ClientMessage, ConfirmedRequest, Phase, RoundConfig,
    SecureAggregationSpec, SiteIndex, SurvivorsConfirmation, UnmaskRequest,
};

use super::secagg::{input, model, upload};

const SITES: u32 = 6;
const SCALE_BITS: u32 = 16;

fn names() -> Vec<String> {
    (0..SITES).map(|i| format!("site-{i:02}")).collect()
}

/// Six sites: the complete graph (k = 5), t = 3, at least 3 survivors.
fn config() -> RoundConfig {
    let spec: SecureAggregationSpec =
        toml::from_str(&format!("scale_bits = {SCALE_BITS}")).unwrap();
    spec.round_config([7; 32], 2, 1, SITES, 3, 7)
}

/// Each site's identity key and node certificate (DER), from a consortium CA made now.
fn identities() -> Vec<(Arc<IdentityKey>, Vec<u8>)> {
    let ca = CertificateAuthority::create(
        "signed-test",
        KeyAlgorithm::EcdsaP256,
        Validity::days_from_now(1),
    )
    .unwrap();
    names()
        .iter()
        .map(|site| {
            let issued = ca
                .issue(
                    &Principal::Node { site: site.clone() },
                    &LeafOptions::new(Validity::days_from_now(1)),
                )
                .unwrap();
            let der = rustls::pki_types::CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
                .as_ref()
                .to_vec();
            (
                Arc::new(IdentityKey::from_pkcs8_pem(&issued.key_pem).unwrap()),
                der,
            )
        })
        .collect()
}

/// The neighbours' certificates as a site holds them once the keys relay has come.
#[derive(Default)]
struct RelayedVerifier(std::sync::RwLock<Option<SiteCertificates>>);

impl KeyVerifier for RelayedVerifier {
    fn verify(&self, site: SiteIndex, message: &[u8], signature: &[u8]) -> Result<(), String> {
        match &*self.0.read().unwrap() {
            Some(c) => c.verify(site, message, signature),
            None => Err("no certificates yet".into()),
        }
    }
}

/// A relay as it reaches a site: encoded by the coordinator, decoded by the site.
fn over_the_wire(relay: Relay) -> ServerRelay {
    wire::decode_reply(&wire::reply(&relay)).unwrap()
}

/// A site's message as the coordinator's handler gets it.
fn deliver(phases: &dyn PhasedRound, site: &str, msg: ClientMessage) {
    let pb = wire::request_message(&msg).unwrap();
    let decoded = wire::decode_request(&pb).unwrap().unwrap();
    phases.receive(site, decoded).unwrap();
}

/// How the coordinator cheats, between its honest state and the sites.
#[derive(Clone, Copy, PartialEq)]
enum Cheat {
    None,
    /// Every neighbour's key in every keys relay replaced by one of the coordinator's own (a
    /// man in the middle on every pair), signatures left as they were.
    ForgedKeys,
    /// Sites 1, 2, 3 are told that site 0 dropped, sites 0, 4, 5 that it survived; each site then
    /// gets the request it signed and every signature over that same list (the attacker's best).
    SplitSurvivors,
}

/// One round through the wire with `cheat`. Returns the round's result or the coordinator's
/// failure, and every refusal a site made (site, reason).
fn signed_round(cheat: Cheat) -> (Result<RoundResult, String>, Vec<(u32, String)>) {
    let names = names();
    let config = config();
    let ids = identities();
    let round = MaskedAggregation::with_signing(
        &model(),
        names.clone(),
        config.clone(),
        SCALE_BITS,
        Signing::Required,
        None,
    )
    .unwrap();
    let phases: &dyn PhasedRound = round.masked().unwrap();
    let mut refusals = Vec::new();

    // Phase 0: keys, signed, each advertisement with its certificate.
    let mut states = BTreeMap::new();
    let mut verifiers: BTreeMap<SiteIndex, Arc<RelayedVerifier>> = BTreeMap::new();
    for i in 0..SITES {
        let (key, der) = &ids[i as usize];
        // Filled from the keys relay below, as the site driver's verifier is (which also checks
        // each certificate's chain to its own CA and the site it names).
        let verifier = Arc::new(RelayedVerifier::default());
        let (state, msg) = ClientAdvertising::new(config.clone(), i)
            .unwrap()
            .with_signed_keys(key.clone(), verifier.clone())
            .advertise_keys()
            .unwrap();
        let pb = wire::advertise_request(&msg, der);
        let cert = wire::advertised_certificate(&pb).unwrap().to_vec();
        phases
            .present_certificate(&names[i as usize], cert)
            .unwrap();
        phases
            .receive(
                &names[i as usize],
                wire::decode_request(&pb).unwrap().unwrap(),
            )
            .unwrap();
        states.insert(i, state);
        verifiers.insert(i, verifier);
    }
    phases.close_phase().unwrap();
    let attacker_keys = ClientAdvertising::new(config.clone(), 0)
        .unwrap()
        .advertise_keys()
        .unwrap()
        .1;

    // Phase 1: each site checks the relayed certificates are its neighbours' and their keys'
    // signatures, then shares.
    let mut sharing = BTreeMap::new();
    for (i, state) in states {
        let ServerRelay::SignedKeys {
            mut keys,
            certificates,
        } = over_the_wire(phases.relay_for(&names[i as usize]).unwrap())
        else {
            panic!("a signed round relays keys with certificates");
        };
        for k in &keys.keys {
            assert_eq!(
                certificates[&k.peer], ids[k.peer as usize].1,
                "the coordinator relays each maker's own certificate"
            );
        }
        if cheat == Cheat::ForgedKeys {
            for k in &mut keys.keys {
                k.public = attacker_keys.keys[0].public;
            }
        }
        let mut held = SiteCertificates::new();
        for (peer, der) in &certificates {
            held.insert_pem(*peer, &tutela_protocol::pki::pem_encode("CERTIFICATE", der))
                .unwrap();
        }
        *verifiers[&i].0.write().unwrap() = Some(held);
        match state.share_keys(keys) {
            Ok((state, msg)) => {
                deliver(phases, &names[i as usize], ClientMessage::from(msg));
                sharing.insert(i, state);
            }
            Err(e) => refusals.push((i, e.to_string())),
        }
    }
    if let Err(e) = phases.close_phase() {
        return (finish(&round, Some(e.to_string())), refusals);
    }

    // Phase 2: masked inputs, as uploads.
    let mut unmasking: BTreeMap<SiteIndex, ClientAwaitingUnmask> = BTreeMap::new();
    for (i, state) in sharing {
        let Some(Relay::Shares(shares)) = phases.relay_for(&names[i as usize]) else {
            panic!("no shares relayed to site {i}");
        };
        let (state, msg) = state.masked_input(shares, &input(i)).unwrap();
        upload(&round, &names[i as usize], &msg.masked).unwrap();
        unmasking.insert(i, state);
    }
    phases.close_phase().unwrap();
    assert_eq!(phases.phase(), Some(Phase::ConsistencyCheck));

    // The consistency check: each survivor signs the list it was sent.
    let told = |i: SiteIndex, honest: &UnmaskRequest| -> UnmaskRequest {
        if cheat == Cheat::SplitSurvivors && [1, 2, 3].contains(&i) {
            UnmaskRequest {
                round: honest.round,
                survivors: honest
                    .survivors
                    .iter()
                    .copied()
                    .filter(|&s| s != 0)
                    .collect(),
                dropped: vec![0],
            }
        } else {
            honest.clone()
        }
    };
    let mut confirmed = BTreeMap::new();
    let mut signed: Vec<(UnmaskRequest, SurvivorsConfirmation)> = Vec::new();
    for (i, state) in unmasking {
        let ServerRelay::Unmask(honest) =
            over_the_wire(phases.relay_for(&names[i as usize]).unwrap())
        else {
            panic!("no survivor list relayed to site {i}");
        };
        let request = told(i, &honest);
        match state.confirm(request.clone()) {
            Ok((state, msg)) => {
                if request == honest {
                    deliver(phases, &names[i as usize], ClientMessage::from(msg.clone()));
                }
                signed.push((request, msg));
                confirmed.insert(i, state);
            }
            Err(e) => refusals.push((i, e.to_string())),
        }
    }
    // Sites told the split list have their signatures delivered too, as the honest state would
    // refuse a list it never sent: the cheat routes them itself.
    phases.close_phase().unwrap();

    // Unmasking: each site answers only if t of its neighbours signed the list it signed.
    for (i, state) in confirmed {
        let honest_relay =
            over_the_wire(phases.relay_for(&names[i as usize]).unwrap_or(Relay::Done));
        let relay = match cheat {
            Cheat::SplitSurvivors => {
                let mine = signed.iter().find(|(_, c)| c.site == i).unwrap().0.clone();
                ConfirmedRequest {
                    request: mine.clone(),
                    to: i,
                    confirmations: signed
                        .iter()
                        .filter(|(r, _)| *r == mine)
                        .flat_map(|(_, c)| {
                            c.signatures
                                .iter()
                                .filter(|(to, _)| *to == i)
                                .map(|(_, sig)| (c.site, sig.clone()))
                        })
                        .collect(),
                }
            }
            _ => match honest_relay {
                ServerRelay::Confirmed(c) => c,
                other => panic!("site {i} was relayed {other:?} after the check"),
            },
        };
        match state.unmask(relay) {
            Ok(msg) => deliver(phases, &names[i as usize], ClientMessage::from(msg)),
            Err(e) => refusals.push((i, e.to_string())),
        }
    }
    let closed = phases.close_phase().err().map(|e| e.to_string());
    (finish(&round, closed), refusals)
}

fn finish(round: &Arc<MaskedAggregation>, closed: Option<String>) -> Result<RoundResult, String> {
    match round.clone().finish() {
        Ok(f) => {
            assert!(closed.is_none());
            Ok(f.result)
        }
        Err(e) => Err(format!("{e} (phase close: {closed:?})")),
    }
}

#[test]
fn an_honest_signed_round_over_the_wire_gives_the_plain_mean() {
    let (result, refusals) = signed_round(Cheat::None);
    assert!(refusals.is_empty(), "{refusals:?}");
    let result = result.unwrap();
    let mut sum = vec![0i64; 7];
    for i in 0..SITES {
        for (s, v) in sum.iter_mut().zip(input(i)) {
            *s += v;
        }
    }
    let mean: Vec<f64> = tutela_protocol::secagg::encode::decode_sum(&sum, SCALE_BITS)
        .into_iter()
        .map(|v| v / f64::from(SITES))
        .collect();
    assert_eq!(
        result.mean_delta,
        vec![mean[..6].to_vec(), mean[6..].to_vec()]
    );
}

#[test]
fn a_forged_key_advertisement_is_refused_by_every_site_and_the_round_fails() {
    let (result, refusals) = signed_round(Cheat::ForgedKeys);
    assert_eq!(refusals.len(), SITES as usize, "{refusals:?}");
    for (site, reason) in &refusals {
        assert!(
            reason.contains("advertise-keys") && reason.contains("signature"),
            "site {site}: {reason}"
        );
    }
    let reason = result.expect_err("no site shared keys");
    assert!(reason.contains("share-keys"), "{reason}");
}

#[test]
fn a_survivor_list_split_between_neighbours_is_refused_and_the_round_fails() {
    let (result, refusals) = signed_round(Cheat::SplitSurvivors);
    // Three neighbours signed each list, fewer than t = 3 besides the site itself for everyone:
    // nobody unmasks, so site 0's self seed and its pairwise seeds both stay hidden.
    assert_eq!(refusals.len(), SITES as usize, "{refusals:?}");
    for (site, reason) in &refusals {
        assert!(
            reason.contains("confirmed the survivor list, fewer than the threshold 3"),
            "site {site}: {reason}"
        );
    }
    let reason = result.expect_err("nobody unmasked");
    assert!(
        reason.contains("shares of") && reason.contains("threshold is 3"),
        "{reason}"
    );
}
