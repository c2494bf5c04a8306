//! The security review's attacks on SecAgg+ (a malicious coordinator that recovers one site's
//! input), kept as scenarios that must now be REFUSED: by the round configuration's validation or
//! by the honest sites refusing to unmask. Before the fixes each of them recovered the input.

use std::sync::Arc;

use tutela_protocol::pki::{LeafOptions, Validity};
use tutela_protocol::secagg::signing::{IdentityKey, SiteCertificates};
use tutela_protocol::secagg::{
    ClientAdvertising, ClientAwaitingUnmask, ConfirmedRequest, MaskedInput, Phase, RoundConfig,
    SecAggError, ServerCollectingKeys, SharesRelay, SiteIndex, SurvivorsConfirmation,
    UnmaskRequest,
};

/// `n` sites with identity keys and certificates from a consortium CA made now.
fn identities(n: u32) -> (Vec<Arc<IdentityKey>>, Arc<SiteCertificates>) {
    let ca = crate::common::ca(crate::common::CONSORTIUM);
    let mut certs = SiteCertificates::new();
    let mut keys = Vec::new();
    for s in 0..n {
        let issued = ca
            .issue(
                &crate::common::node(&format!("site-{s}")),
                &LeafOptions::new(Validity::days_from_now(1)),
            )
            .unwrap();
        certs.insert_pem(s, &issued.cert_pem).unwrap();
        keys.push(Arc::new(
            IdentityKey::from_pkcs8_pem(&issued.key_pem).unwrap(),
        ));
    }
    (keys, Arc::new(certs))
}

/// Every site (all signing) through phase 2; `tamper` edits the share relays before the sites see
/// them (the server's move). Returns each site's state and masked input.
fn through_masking(
    cfg: &RoundConfig,
    input: impl Fn(SiteIndex) -> Vec<i64>,
    tamper: impl FnOnce(&mut Vec<SharesRelay>),
) -> Vec<(ClientAwaitingUnmask, MaskedInput)> {
    through_masking_as(&identities(cfg.sites), cfg, input, tamper)
}

/// [`through_masking`] with given identities (the same sites in two attempts of a round).
fn through_masking_as(
    (keys, certs): &(Vec<Arc<IdentityKey>>, Arc<SiteCertificates>),
    cfg: &RoundConfig,
    input: impl Fn(SiteIndex) -> Vec<i64>,
    tamper: impl FnOnce(&mut Vec<SharesRelay>),
) -> Vec<(ClientAwaitingUnmask, MaskedInput)> {
    let mut server = ServerCollectingKeys::new(cfg.clone()).unwrap();
    let mut states = Vec::new();
    for s in 0..cfg.sites {
        let (c, msg) = ClientAdvertising::new(cfg.clone(), s)
            .unwrap()
            .with_signed_keys(keys[s as usize].clone(), certs.clone())
            .advertise_keys()
            .unwrap();
        server.receive(msg.into()).unwrap();
        states.push(c);
    }
    let (mut server, relays) = server.close().unwrap();
    let mut next = Vec::new();
    for (c, r) in states.into_iter().zip(relays) {
        let (c, msg) = c.share_keys(r).unwrap();
        server.receive(msg.into()).unwrap();
        next.push(c);
    }
    let (_server, mut relays) = server.close().unwrap();
    tamper(&mut relays);
    next.into_iter()
        .zip(relays)
        .enumerate()
        .map(|(s, (c, r))| c.masked_input(r, &input(s as SiteIndex)).unwrap())
        .collect()
}

/// What a server routes to site `to`: `request` with every signature addressed to `to` among
/// `confirmations` (the attacker's best: all it has).
fn addressed(
    to: SiteIndex,
    request: &UnmaskRequest,
    confirmations: &[SurvivorsConfirmation],
) -> ConfirmedRequest {
    ConfirmedRequest {
        request: request.clone(),
        to,
        confirmations: confirmations
            .iter()
            .flat_map(|c| {
                c.signatures
                    .iter()
                    .filter(|(t, _)| *t == to)
                    .map(|(_, sig)| (c.site, sig.clone()))
            })
            .collect(),
    }
}

fn config(sites: u32, degree: u32, threshold: u32, vector_len: u64) -> RoundConfig {
    RoundConfig {
        job_digest: [1; 32],
        round: 1,
        sites,
        degree,
        threshold,
        min_survivors: threshold,
        graph_seed: [2; 32],
        vector_len,
    }
}

/// The review's first attack: n = 6, complete graph k = 5. The server hands site 0 only `t` of its
/// neighbours' shares (so it masks with those pairs only), then sends everyone one consistent
/// list calling those `t` dropped: the other neighbours give site 0's self seed, the dropped ones'
/// holders their pairwise seeds with site 0. With t = 2 (2t ≤ k) that unmasked site 0.
#[test]
fn a_threshold_of_half_the_degree_or_less_is_refused_and_the_split_fails_above_it() {
    // t = 2 (share_threshold 0.3): no party accepts the round at all.
    let low = config(6, 5, 2, 8);
    let err = low.validate().unwrap_err();
    assert!(
        matches!(&err, SecAggError::Config(m) if m.contains("threshold must be in 3..=5")),
        "{err}"
    );
    assert_eq!(ClientAdvertising::new(low.clone(), 0).unwrap_err(), err);
    assert_eq!(ServerCollectingKeys::new(low).unwrap_err(), err);

    // The same attack at the smallest threshold allowed, t = 3: site 0 keeps shares from 1, 2, 3
    // only; the list calls them dropped and 0, 4, 5 survivors.
    let cfg = config(6, 5, 3, 8);
    let secret: Vec<i64> = vec![42, -7, 1_000_000, 3, 0, 5, -123456789, 99];
    let sites = through_masking(
        &cfg,
        |s| {
            if s == 0 {
                secret.clone()
            } else {
                vec![s as i64; 8]
            }
        },
        |relays| {
            relays[0]
                .ciphertexts
                .retain(|(from, _)| (1..=3).contains(from))
        },
    );
    let request = UnmaskRequest {
        round: cfg.tag(),
        survivors: vec![0, 4, 5],
        dropped: vec![1, 2, 3],
    };
    let mut confirmed_states = Vec::new();
    let mut confirmations = Vec::new();
    for (s, (c, _)) in sites.into_iter().enumerate() {
        if (1..=3).contains(&s) {
            continue;
        }
        let (c, msg) = c.confirm(request.clone()).unwrap();
        confirmations.push(msg);
        confirmed_states.push((s as SiteIndex, c));
    }
    // Each survivor has only two neighbours' signatures on the list (the other two survivors),
    // fewer than t = 3: every one refuses, and the server gets no share at all.
    for (s, c) in confirmed_states {
        let err = c
            .unmask(addressed(s, &request, &confirmations))
            .unwrap_err();
        assert!(
            matches!(&err, SecAggError::Refused { phase: Phase::Unmasking, reason, .. }
                if reason.contains("2 of this site's neighbours confirmed")),
            "{err}"
        );
    }
}

/// The review's second attack, at default parameters (complete graph n = 10, k = 9, t = 5 =
/// threshold_for(9, 0.5), min_survivors = 5): the server tells sites {0,…,4} "nobody dropped" and
/// sites {5,…,9} "site 0 dropped". Each list gathered min_survivors valid signatures from anyone,
/// so every honest site answered: 4 shares of site 0's self seed and 5 of each of its pairwise
/// seeds (one colluding neighbour would have supplied the missing self-seed share). Now a site
/// counts only its own neighbours' signatures and needs t of them: each list has at most 4 other
/// signers among any site's neighbours, so every site refuses.
#[test]
fn two_disjoint_survivor_lists_cannot_both_pass_the_consistency_check() {
    let cfg = config(10, 9, 5, 4);
    let sites = through_masking(&cfg, |s| vec![s as i64; 4], |_| {});
    let r_a = UnmaskRequest {
        round: cfg.tag(),
        survivors: (0..10).collect(),
        dropped: vec![],
    };
    let r_b = UnmaskRequest {
        round: cfg.tag(),
        survivors: (1..10).collect(),
        dropped: vec![0],
    };
    let mut signed = Vec::new();
    let mut confirmations = Vec::new();
    for (s, (c, _)) in sites.into_iter().enumerate() {
        let list = if s < 5 { &r_a } else { &r_b };
        let (c, m) = c.confirm(list.clone()).unwrap();
        confirmations.push((list, m));
        signed.push((s as SiteIndex, list, c));
    }
    let mut refused = 0;
    for (s, list, c) in signed {
        // The server routes to each site every signature on that site's list.
        let on_list: Vec<SurvivorsConfirmation> = confirmations
            .iter()
            .filter(|(l, _)| *l == list)
            .map(|(_, m)| m.clone())
            .collect();
        let err = c.unmask(addressed(s, list, &on_list)).unwrap_err();
        assert!(
            err.to_string().contains(
                "4 of this site's neighbours confirmed the survivor list, fewer than the threshold 5"
            ),
            "{err}"
        );
        refused += 1;
    }
    assert_eq!(refused, 10);
}

/// Replaying an earlier attempt's confirmations (review item 3). Two attempts of one round with
/// the same [`RoundConfig`] (same tag): in the first, sites 1–4 are told "site 0 dropped" (list
/// B) and sites 5–9 "nobody dropped" (list A), they sign and the server aborts. In the second,
/// sites 0–4 get A and 5–9 get B: each list has only 4 fresh neighbour signatures at any site, but
/// with the first attempt's signatures on the same list added it had 8 or 9, and every site
/// answered (4 shares of site 0's self seed, 5 of each of its pairwise seeds: one colluding
/// neighbour from its input). The signatures now cover the key the signer advertised to the
/// receiver in that attempt, so the replayed ones do not verify and every site refuses.
#[test]
fn an_earlier_attempts_confirmations_cannot_be_replayed() {
    let cfg = config(10, 9, 5, 4);
    let ids = identities(cfg.sites);
    let all = UnmaskRequest {
        round: cfg.tag(),
        survivors: (0..10).collect(),
        dropped: vec![],
    };
    let without_0 = UnmaskRequest {
        round: cfg.tag(),
        survivors: (1..10).collect(),
        dropped: vec![0],
    };
    // Attempt 1: signatures on both lists, then an abort.
    let mut first = Vec::new();
    for (s, (c, _)) in through_masking_as(&ids, &cfg, |s| vec![s as i64; 4], |_| {})
        .into_iter()
        .enumerate()
    {
        let list = match s {
            0 => continue,
            1..=4 => &without_0,
            _ => &all,
        };
        first.push(c.confirm(list.clone()).unwrap().1);
    }
    // Attempt 2, same configuration, fresh keys: the split the other way round.
    let mut second = Vec::new();
    let mut states = Vec::new();
    for (s, (c, _)) in through_masking_as(&ids, &cfg, |s| vec![s as i64; 4], |_| {})
        .into_iter()
        .enumerate()
    {
        let list = if s < 5 { &all } else { &without_0 };
        let (c, m) = c.confirm(list.clone()).unwrap();
        second.push(m);
        states.push((s as SiteIndex, list, c));
    }
    let replayed: Vec<SurvivorsConfirmation> = first.iter().chain(&second).cloned().collect();
    for (s, list, c) in states {
        let relay = addressed(s, list, &replayed);
        // Enough signers on the list if the old ones counted: the attack is there to be refused.
        assert!(
            relay.confirmations.len() >= 8,
            "{}",
            relay.confirmations.len()
        );
        let err = c.unmask(relay).unwrap_err();
        assert!(
            matches!(&err, SecAggError::Malformed { phase: Phase::ConsistencyCheck, reason, .. }
                if reason.contains("survivor-list confirmation")),
            "site {s}: {err}"
        );
    }
}

/// Review item 4: a hostile configuration with 200,000 sites (or a degree near `u32::MAX`) would
/// have a site build a huge graph; the site and the server refuse it before building anything.
#[test]
fn a_hostile_participant_count_is_refused_before_any_graph_is_built() {
    let mut cfg = config(200_000, 34, 18, 4);
    for bad in [
        ClientAdvertising::new(cfg.clone(), 0).unwrap_err(),
        ServerCollectingKeys::new(cfg.clone()).unwrap_err(),
    ] {
        assert!(
            matches!(&bad, SecAggError::Config(m) if m.contains("sites must be in 2..=2048") && m.ends_with("got 200000")),
            "{bad}"
        );
    }
    cfg.sites = 100;
    cfg.degree = u32::MAX - 1;
    assert!(
        ClientAdvertising::new(cfg, 0)
            .unwrap_err()
            .to_string()
            .contains("degree")
    );
}

/// The control for the fixes above: an honest signed round on a sparse graph (n = 12, k = 4,
/// t = 3) with one site silent from the masked input on still passes the neighbours-only
/// consistency check and gives the exact sum; the server refuses a confirmation addressed to a
/// site that is not the signer's neighbour.
#[test]
fn an_honest_sparse_signed_round_passes_the_neighbours_check() {
    let cfg = config(12, 4, 3, 6);
    let (keys, certs) = identities(cfg.sites);
    let mut server = ServerCollectingKeys::new(cfg.clone()).unwrap();
    let mut states = Vec::new();
    for s in 0..cfg.sites {
        let (c, msg) = ClientAdvertising::new(cfg.clone(), s)
            .unwrap()
            .with_signed_keys(keys[s as usize].clone(), certs.clone())
            .advertise_keys()
            .unwrap();
        server.receive(msg.into()).unwrap();
        states.push(c);
    }
    let (mut server, relays) = server.close().unwrap();
    let mut next = Vec::new();
    for (c, r) in states.into_iter().zip(relays) {
        let (c, msg) = c.share_keys(r).unwrap();
        server.receive(msg.into()).unwrap();
        next.push(c);
    }
    let (mut server, relays) = server.close().unwrap();
    let silent: SiteIndex = 7;
    let mut last = Vec::new();
    for (s, (c, r)) in next.into_iter().zip(relays).enumerate() {
        if s as SiteIndex == silent {
            continue;
        }
        let (c, msg) = c.masked_input(r, &[s as i64 + 1; 6]).unwrap();
        server.receive(msg.into()).unwrap();
        last.push(c);
    }
    let (mut server, request) = server.close_with_consistency_check().unwrap();
    assert_eq!(request.dropped, vec![silent]);
    let graph = tutela_protocol::secagg::CommunicationGraph::harary(12, 4, &cfg.graph_seed);
    let mut confirmed = Vec::new();
    for c in last {
        let (c, msg) = c.confirm(request.clone()).unwrap();
        assert_eq!(msg.signatures.len(), 4);
        if msg.site == 0 {
            let stranger = (1..12).find(|v| !graph.are_neighbours(0, *v)).unwrap();
            let mut astray = msg.clone();
            astray.signatures[0].0 = stranger;
            let err = server.receive(astray.into()).unwrap_err();
            assert!(err.to_string().contains("not a neighbour"), "{err}");
        }
        server.receive(msg.into()).unwrap();
        confirmed.push(c);
    }
    let (mut server, relays) = server.close().unwrap();
    for (c, relay) in confirmed.into_iter().zip(relays) {
        // Each site's live neighbours' signatures: 4, or 3 next to the silent site.
        assert!(relay.confirmations.len() >= 3, "{relay:?}");
        server.receive(c.unmask(relay).unwrap().into()).unwrap();
    }
    let expected: i64 = (1..=12).filter(|&v| v != i64::from(silent) + 1).sum();
    assert_eq!(server.finish().unwrap().sum, vec![expected; 6]);
}
