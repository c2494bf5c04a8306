//! The security review's attacks on SecAgg+ (a malicious coordinator that recovers one site's
//! input), kept as scenarios that must now be REFUSED: by the round configuration's validation or
//! by the honest sites refusing to unmask. Before the fixes each of them recovered the input.

use std::sync::Arc;

use tutela_protocol::pki::{LeafOptions, Validity};
use tutela_protocol::secagg::signing::{IdentityKey, SiteCertificates};
use tutela_protocol::secagg::{
    ClientAdvertising, ClientAwaitingUnmask, ConfirmedRequest, MaskedInput, Phase, RoundConfig,
    SecAggError, ServerCollectingKeys, SharesRelay, SiteIndex, UnmaskRequest,
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
    let (_server, mut relays) = server.close().unwrap();
    tamper(&mut relays);
    next.into_iter()
        .zip(relays)
        .enumerate()
        .map(|(s, (c, r))| c.masked_input(r, &input(s as SiteIndex)).unwrap())
        .collect()
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
        confirmations.push((msg.site, msg.signature));
        confirmed_states.push(c);
    }
    let confirmed = ConfirmedRequest {
        request,
        confirmations,
    };
    // Each survivor has only two neighbours' signatures on the list (the other two survivors),
    // fewer than t = 3: every one refuses, and the server gets no share at all.
    for c in confirmed_states {
        let err = c.unmask(confirmed.clone()).unwrap_err();
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
    let (mut signed_a, mut signed_b) = (Vec::new(), Vec::new());
    let (mut conf_a, mut conf_b) = (Vec::new(), Vec::new());
    for (s, (c, _)) in sites.into_iter().enumerate() {
        let (list, signed, conf) = if s < 5 {
            (&r_a, &mut signed_a, &mut conf_a)
        } else {
            (&r_b, &mut signed_b, &mut conf_b)
        };
        let (c, m) = c.confirm(list.clone()).unwrap();
        conf.push((m.site, m.signature));
        signed.push(c);
    }
    let ca_req = ConfirmedRequest {
        request: r_a,
        confirmations: conf_a,
    };
    let cb_req = ConfirmedRequest {
        request: r_b,
        confirmations: conf_b,
    };
    let mut refused = 0;
    for (c, req) in signed_a
        .into_iter()
        .map(|c| (c, &ca_req))
        .chain(signed_b.into_iter().map(|c| (c, &cb_req)))
    {
        let err = c.unmask(req.clone()).unwrap_err();
        assert!(
            err.to_string()
                .contains("4 of this site's neighbours confirmed the survivor list, fewer than the threshold 5"),
            "{err}"
        );
        refused += 1;
    }
    assert_eq!(refused, 10);
}
