//! The security review's attacks on SecAgg+ (a malicious coordinator that recovers one site's
//! input), kept as scenarios that must now be REFUSED: by the round configuration's validation or
//! by the honest sites refusing to unmask. Before the fixes each of them recovered the input.

use std::sync::Arc;

use tutela_protocol::pki::{LeafOptions, Validity};
use tutela_protocol::secagg::shamir::{self, Share};
use tutela_protocol::secagg::signing::{IdentityKey, SiteCertificates};
use tutela_protocol::secagg::{
    ClientAdvertising, ClientAwaitingUnmask, ConfirmedRequest, MaskedInput, RoundConfig,
    SecAggError, ServerCollectingKeys, SharesRelay, SiteIndex, UnmaskRequest, UnmaskShare,
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
    let mut self0: Vec<Share> = Vec::new();
    for c in confirmed_states {
        if let Ok(resp) = c.unmask(confirmed.clone()) {
            for sh in resp.shares {
                if let UnmaskShare::SelfSeed { owner: 0, share } = sh {
                    self0.push(share);
                }
            }
        }
    }
    // Only the survivors 4 and 5 hold shares of site 0's self seed: fewer than t.
    assert!(self0.len() < 3, "{} self-seed shares", self0.len());
    assert!(shamir::reconstruct(&self0, 3, "b0").is_err());
}
