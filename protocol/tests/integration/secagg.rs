//! SecAgg+ rounds in process (`tutela_protocol::secagg`): exact sums under dropouts at every
//! phase, failure below the threshold with the reason, what the server holds of an update,
//! refusal of malformed and late messages, and distributed DP noise through the masking.

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};
use tutela_protocol::secagg::encode::{self, EncodeParams};
use tutela_protocol::secagg::simulate::{Dropouts, run_round};
use tutela_protocol::secagg::{
    ClientAdvertising, MaskedInput, Phase, RoundConfig, SecAggError, ServerCollectingKeys,
    ServerCollectingMasked, SiteIndex, UnmaskShare, default_degree, threshold_for,
};

const PHASES: [Phase; 4] = [
    Phase::AdvertiseKeys,
    Phase::ShareKeys,
    Phase::MaskedInput,
    Phase::Unmasking,
];

fn config(sites: u32, degree: u32, threshold: u32, len: u64) -> RoundConfig {
    RoundConfig {
        job_digest: [0x5a; 32],
        round: 1,
        sites,
        degree,
        threshold,
        min_survivors: threshold,
        graph_seed: [sites as u8; 32],
        vector_len: len,
    }
}

/// Site `s`'s input: values over the whole i64 range (so the test sees wrap-around in `Z_2^64`),
/// reproducible from the site index.
fn input(s: SiteIndex, len: usize) -> Vec<i64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + u64::from(s));
    (0..len)
        .map(|i| match i % 3 {
            0 => rng.random::<i64>(),
            1 => rng.random_range(-1000..1000),
            _ => i64::MAX - s as i64,
        })
        .collect()
}

fn plain_sum(sites: impl IntoIterator<Item = SiteIndex>, len: usize) -> Vec<i64> {
    let mut sum = vec![0i64; len];
    for s in sites {
        for (a, x) in sum.iter_mut().zip(input(s, len)) {
            *a = a.wrapping_add(x);
        }
    }
    sum
}

fn run(
    cfg: &RoundConfig,
    dropouts: &Dropouts,
) -> Result<tutela_protocol::secagg::AggregateOutput, SecAggError> {
    let len = cfg.vector_len as usize;
    run_round(cfg, |s| input(s, len), dropouts, 2, 2, None).map(|(out, _)| out)
}

#[test]
fn ten_sites_with_three_dropping_at_each_phase_give_the_exact_sum() {
    // Complete graph (k = 9), t = 5; 10,007 elements cross the mask expansion's blocks.
    let cfg = config(10, 9, threshold_for(9, 0.5), 10_007);
    let len = cfg.vector_len as usize;
    let out = run(&cfg, &Dropouts::none()).unwrap();
    assert_eq!(out.sum, plain_sum(0..10, len));
    for phase in PHASES {
        let dropped = [1, 4, 7];
        let out = run(&cfg, &Dropouts::at(phase, dropped)).unwrap();
        // Sites that drop at unmasking sent their input: it is in the sum, recovered from their
        // neighbours' shares of their self-mask seeds.
        let survivors: Vec<SiteIndex> = if phase == Phase::Unmasking {
            (0..10).collect()
        } else {
            (0..10).filter(|s| !dropped.contains(s)).collect()
        };
        assert_eq!(out.survivors, survivors, "{phase}");
        assert_eq!(
            out.sum,
            plain_sum(survivors.iter().copied(), len),
            "bit for bit, {phase}"
        );
        // Only a site that shared keys and then sent nothing has pairwise masks to remove.
        let expected_dropped: Vec<SiteIndex> = if phase == Phase::MaskedInput {
            dropped.to_vec()
        } else {
            vec![]
        };
        assert_eq!(out.dropped, expected_dropped, "{phase}");
    }
}

#[test]
fn a_sparse_graph_recovers_from_dropouts_at_every_phase() {
    // 40 sites, k = 16 (default for 40), t = 9: each site talks to 16, not 39.
    let k = default_degree(40);
    assert_eq!(k, 16);
    let cfg = config(40, k, threshold_for(k, 0.5), 3000);
    for phase in PHASES {
        let dropped = [0, 13, 27, 39];
        let out = run(&cfg, &Dropouts::at(phase, dropped)).unwrap();
        let survivors = out.survivors.clone();
        assert_eq!(out.sum, plain_sum(survivors, 3000), "{phase}");
    }
    // Dropouts spread over all phases in one round.
    let mut d = Dropouts::at(Phase::AdvertiseKeys, [2]);
    d.at.insert(Phase::ShareKeys, BTreeSet::from([5]));
    d.at.insert(Phase::MaskedInput, BTreeSet::from([8, 9]));
    d.at.insert(Phase::Unmasking, BTreeSet::from([11]));
    let out = run(&cfg, &d).unwrap();
    assert_eq!(out.dropped, vec![8, 9]);
    assert!(out.survivors.contains(&11) && !out.survivors.contains(&2));
    assert_eq!(out.sum, plain_sum(out.survivors.clone(), 3000));
}

#[test]
fn below_the_threshold_the_round_fails_with_the_reason() {
    let cfg = config(10, 9, 5, 64);
    // Six silent at unmasking: four answer, every survivor's self seed has 4 shares < t = 5.
    let err = run(&cfg, &Dropouts::at(Phase::Unmasking, [0, 1, 2, 3, 4, 5])).unwrap_err();
    match err {
        SecAggError::RoundFailed { phase, reason } => {
            assert_eq!(phase, Phase::Unmasking);
            assert!(
                reason.contains("only 4 shares of site 0's self-mask seed"),
                "{reason}"
            );
            assert!(reason.contains("threshold is 5"), "{reason}");
        }
        other => panic!("{other}"),
    }
    // Six silent from the start: the round stops when phase 0 closes.
    let err = run(&cfg, &Dropouts::at(Phase::AdvertiseKeys, 0..6)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "round failed in phase advertise-keys: only 4 of 10 sites advertised keys, fewer than \
         the minimum of 5"
    );
    let err = run(&cfg, &Dropouts::at(Phase::MaskedInput, 0..6)).unwrap_err();
    assert!(
        matches!(&err, SecAggError::RoundFailed { phase: Phase::MaskedInput, reason } if reason.contains("sent their masked input")),
        "{err}"
    );
    // In a sparse graph, a site left with fewer than t live neighbours aborts itself.
    let sparse = config(20, 4, 3, 16);
    let graph = tutela_protocol::secagg::CommunicationGraph::harary(20, 4, &sparse.graph_seed);
    let victim = 0;
    let gone: Vec<SiteIndex> = graph.neighbours(victim)[..2].to_vec();
    let err = run(&sparse, &Dropouts::at(Phase::AdvertiseKeys, gone)).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::TooFewNeighbours {
                live: 2,
                threshold: 3,
                ..
            }
        ),
        "{err}"
    );
}

/// Pearson's chi-square of the byte values at positions `lane, lane + 8, …` against uniform
/// over 256 values.
fn chi_square_lane(values: &[u64], lane: usize) -> f64 {
    let mut counts = [0u64; 256];
    for v in values {
        counts[v.to_le_bytes()[lane] as usize] += 1;
    }
    let expected = values.len() as f64 / 256.0;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// The 1 − 10⁻⁸ quantile of chi-square with 255 degrees of freedom is about 408 (Wilson–Hilferty:
/// 255·(1 − 2/2295 + 5.61·√(2/2295))³ ≈ 408): a uniform byte lane exceeds it once in 10⁸ runs.
const CHI2_255_CRITICAL: f64 = 408.0;

#[test]
fn the_server_holds_only_masked_forms_indistinguishable_from_uniform() {
    let len = 1 << 15;
    let cfg = config(10, 9, 5, len as u64);
    // Structured inputs (a small ramp): their bytes are far from uniform.
    let structured =
        |s: SiteIndex| -> Vec<i64> { (0..len as i64).map(|i| i % 100 + i64::from(s)).collect() };
    let mut checked = 0;
    let mut observe = |server: &ServerCollectingMasked, msg: &MaskedInput| {
        let x = structured(msg.site);
        let plain: Vec<u64> = x.iter().map(|&v| v as u64).collect();
        // The test can fail: the plain input is nowhere near uniform.
        assert!(chi_square_lane(&plain, 0) > 10.0 * CHI2_255_CRITICAL);
        assert_ne!(msg.masked, plain);
        if server.received().len() == 1 {
            // After the first input, all the server holds is exactly that site's masked vector.
            assert_eq!(server.stored_sum(), msg.masked.as_slice());
        }
        // Every byte lane of the masked vector, and of the running sum the server stores,
        // passes chi-square against uniform.
        for lane in 0..8 {
            let c = chi_square_lane(&msg.masked, lane);
            assert!(
                c < CHI2_255_CRITICAL,
                "site {} lane {lane}: chi2 = {c}",
                msg.site
            );
            let c = chi_square_lane(server.stored_sum(), lane);
            assert!(c < CHI2_255_CRITICAL, "stored sum lane {lane}: chi2 = {c}");
        }
        checked += 1;
    };
    let (out, _) = run_round(
        &cfg,
        structured,
        &Dropouts::at(Phase::MaskedInput, [3]),
        1,
        1,
        Some(&mut observe),
    )
    .unwrap();
    assert_eq!(checked, 9);
    let expected: Vec<i64> = (0..len as i64)
        .map(|i| (0..10).filter(|&s| s != 3).map(|s| i % 100 + s).sum())
        .collect();
    assert_eq!(out.sum, expected);
}

#[test]
fn malformed_and_late_messages_are_refused() {
    let cfg = config(4, 3, 2, 8);
    let mut server = ServerCollectingKeys::new(cfg.clone()).unwrap();
    let mut clients = Vec::new();
    let mut adverts = Vec::new();
    for s in 0..4 {
        let (c, msg) = ClientAdvertising::new(cfg.clone(), s)
            .unwrap()
            .advertise_keys()
            .unwrap();
        clients.push(c);
        adverts.push(msg);
    }
    // Another round's message, a key missing, a site out of range: refused, nothing stored.
    let mut other = adverts[0].clone();
    other.round.0[0] ^= 1;
    assert_eq!(
        server.receive(other.into()).unwrap_err(),
        SecAggError::WrongRound { site: 0 }
    );
    let mut short = adverts[0].clone();
    short.keys.pop();
    assert!(
        server
            .receive(short.into())
            .unwrap_err()
            .to_string()
            .contains("exactly one key")
    );
    let mut stranger = adverts[0].clone();
    stranger.site = 9;
    assert!(
        server
            .receive(stranger.into())
            .unwrap_err()
            .to_string()
            .contains("not a participant")
    );
    for a in &adverts {
        server.receive(a.clone().into()).unwrap();
    }
    assert!(
        server
            .receive(adverts[1].clone().into())
            .unwrap_err()
            .to_string()
            .contains("already sent")
    );
    let (mut server, relays) = server.close().unwrap();
    // A phase-0 message after phase 0 closed: out of phase.
    let err = server.receive(adverts[2].clone().into()).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::OutOfPhase {
                site: 2,
                got: Phase::AdvertiseKeys,
                expected: Phase::ShareKeys,
                ..
            }
        ),
        "{err}"
    );

    // A relay addressed to another site is refused by the site.
    let mut clients_iter = clients.into_iter();
    let c0 = clients_iter.next().unwrap();
    let mut wrong = relays[1].clone();
    wrong.to = 1;
    assert!(
        c0.share_keys(wrong)
            .unwrap_err()
            .to_string()
            .contains("addressed to site 1")
    );

    // A low-order public key in the relay: refused, naming the neighbour that sent it.
    let mut fresh = Vec::new();
    for s in 0..4 {
        fresh.push(
            ClientAdvertising::new(cfg.clone(), s)
                .unwrap()
                .advertise_keys()
                .unwrap(),
        );
    }
    let mut server2 = ServerCollectingKeys::new(cfg.clone()).unwrap();
    for (_, a) in &fresh {
        server2.receive(a.clone().into()).unwrap();
    }
    let (mut server2, relays2) = server2.close().unwrap();
    let mut states: Vec<_> = fresh.into_iter().map(|(c, _)| Some(c)).collect();
    let mut poisoned = relays2[0].clone();
    poisoned.keys[0].public = [0; 32];
    let victim = states[0].take().unwrap();
    let err = victim.share_keys(poisoned).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Malformed {
                site: 1,
                phase: Phase::AdvertiseKeys,
                ..
            }
        ),
        "{err}"
    );

    // Sites 1..4 share keys properly; refusals on the server's side of phase 1.
    let mut shared = Vec::new();
    for s in 1..4usize {
        let (st, msg) = states[s]
            .take()
            .unwrap()
            .share_keys(relays2[s].clone())
            .unwrap();
        let mut to_stranger = msg.clone();
        to_stranger.ciphertexts[0].0 = 7;
        assert!(
            server2
                .receive(to_stranger.into())
                .unwrap_err()
                .to_string()
                .contains("not a neighbour")
        );
        let mut stub = msg.clone();
        stub.ciphertexts[0].1.truncate(3);
        assert!(
            server2
                .receive(stub.into())
                .unwrap_err()
                .to_string()
                .contains("shorter than an authentication tag")
        );
        server2.receive(msg.into()).unwrap();
        shared.push((s as SiteIndex, st));
    }
    // Site 0 never shared (its round aborted): its message now would be late.
    let (mut server2, share_relays) = server2.close().unwrap();
    let late = MaskedInput {
        round: cfg.tag(),
        site: 0,
        masked: vec![0; 8],
    };
    assert!(
        server2
            .receive(late.into())
            .unwrap_err()
            .to_string()
            .contains("dropped out in an earlier phase")
    );

    // Tampered ciphertext: the receiving site refuses it, naming the sender.
    let (s1, st1) = shared.remove(0);
    let mut tampered = share_relays.iter().find(|r| r.to == s1).unwrap().clone();
    let last = tampered.ciphertexts[0].1.len() - 1;
    tampered.ciphertexts[0].1[last] ^= 0x80;
    let from = tampered.ciphertexts[0].0;
    let err = st1.masked_input(tampered, &[0; 8]).unwrap_err();
    assert!(
        matches!(&err, SecAggError::Malformed { site, phase: Phase::ShareKeys, reason } if *site == from && reason.contains("does not authenticate")),
        "{err}"
    );
    // A ciphertext replayed under another sender's name: does not authenticate either.
    let (s2, st2) = shared.remove(0);
    let mut swapped = share_relays.iter().find(|r| r.to == s2).unwrap().clone();
    let (a, b) = (
        swapped.ciphertexts[0].1.clone(),
        swapped.ciphertexts[1].1.clone(),
    );
    swapped.ciphertexts[0].1 = b;
    swapped.ciphertexts[1].1 = a;
    assert!(
        st2.masked_input(swapped, &[0; 8])
            .unwrap_err()
            .to_string()
            .contains("does not authenticate")
    );
    // Wrong input length: refused by the site itself.
    let (s3, st3) = shared.remove(0);
    let relay3 = share_relays.iter().find(|r| r.to == s3).unwrap().clone();
    assert!(st3.masked_input(relay3.clone(), &[0; 7]).is_err());
}

#[test]
fn unmasking_requests_and_responses_are_checked_on_both_sides() {
    let cfg = config(5, 4, 3, 8);
    let mut server = ServerCollectingKeys::new(cfg.clone()).unwrap();
    let mut states = Vec::new();
    for s in 0..5 {
        let (c, msg) = ClientAdvertising::new(cfg.clone(), s)
            .unwrap()
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
    let mut waiting = Vec::new();
    for (s, (c, r)) in next.into_iter().zip(relays).enumerate() {
        let (c, msg) = c.masked_input(r, &[s as i64; 8]).unwrap();
        if s != 4 {
            server.receive(msg.into()).unwrap();
            waiting.push(c);
        }
    }
    let (mut server, request) = server.close().unwrap();
    assert_eq!(request.dropped, vec![4]);

    // A site refuses a request that lists a site both ways, or omits itself.
    let c0 = waiting.remove(0);
    let mut both = request.clone();
    both.dropped.push(1);
    assert!(
        c0.unmask(both)
            .unwrap_err()
            .to_string()
            .contains("both survivor and dropped")
    );
    let c1 = waiting.remove(0);
    let mut without = request.clone();
    without.survivors.retain(|&s| s != 1);
    without.dropped.push(1);
    assert!(
        c1.unmask(without)
            .unwrap_err()
            .to_string()
            .contains("not list this site as a survivor")
    );

    // The server refuses forged responses: a self-seed share of the dropped site, a share at
    // another x-coordinate.
    let c2 = waiting.remove(0);
    let good = c2.unmask(request.clone()).unwrap();
    let mut forged = good.clone();
    if let Some(UnmaskShare::SelfSeed { owner, .. }) = forged
        .shares
        .iter_mut()
        .find(|s| matches!(s, UnmaskShare::SelfSeed { .. }))
    {
        *owner = 4;
    }
    assert!(
        server
            .receive(forged.into())
            .unwrap_err()
            .to_string()
            .contains("not a survivor")
    );
    let mut moved = good.clone();
    let (UnmaskShare::SelfSeed { share, .. } | UnmaskShare::PairSeed { share, .. }) =
        &mut moved.shares[0];
    share.x += 1;
    assert!(
        server
            .receive(moved.into())
            .unwrap_err()
            .to_string()
            .contains("x-coordinate")
    );
    server.receive(good.clone().into()).unwrap();
    let c3 = waiting.remove(0);
    server
        .receive(c3.unmask(request.clone()).unwrap().into())
        .unwrap();
    // A late answer, a second one: refused.
    assert!(
        server
            .receive(good.clone().into())
            .unwrap_err()
            .to_string()
            .contains("already sent")
    );
    // Sites 0 and 1 refused to answer; sites 2 and 3 answered: 2 shares of each seed < t = 3.
    let err = server.finish().unwrap_err();
    assert!(err.to_string().contains("only 2 shares"), "{err}");
}

#[test]
fn distributed_noise_survives_masking_and_the_sum_carries_all_of_it() {
    // 10 sites encode the same update with σ_site = 40 grid steps each; 3 drop at masked input.
    // The unmasked sum is the 7 survivors' rounded updates plus noise of σ = 40·√7 per element.
    let len = 20_000;
    let cfg = config(10, 9, 5, len as u64);
    let params = EncodeParams {
        clip_norm: 1.0,
        scale_bits: 16,
        rounding_beta: encode::DEFAULT_ROUNDING_BETA,
        noise_sigma_grid: Some(40.0),
    };
    let update: Vec<f32> = (0..len).map(|i| ((i % 11) as f32 - 5.0) * 1e-3).collect();
    let norm = update
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        norm < 1.0,
        "not clipped: the expected sum is 7 × the update"
    );
    let (out, _) = run_round(
        &cfg,
        |_| encode::encode(&update, &params, 2).unwrap().values,
        &Dropouts::at(Phase::MaskedInput, [0, 5, 9]),
        2,
        2,
        None,
    )
    .unwrap();
    let real = encode::decode_sum(&out.sum, params.scale_bits);
    let scale = 65536.0;
    let residuals: Vec<f64> = real
        .iter()
        .zip(&update)
        .map(|(s, u)| (s - 7.0 * f64::from(*u)) * scale)
        .collect();
    let mean = residuals.iter().sum::<f64>() / len as f64;
    let sd = (residuals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / len as f64).sqrt();
    // Rounding adds variance ≤ 7/4 grid steps², negligible beside 7·1600.
    let want = 40.0 * 7f64.sqrt();
    assert!((sd / want - 1.0).abs() < 0.03, "sd {sd}, want {want}");
    assert!(mean.abs() < 4.0 * want / (len as f64).sqrt(), "mean {mean}");
}

#[test]
fn signed_keys_and_the_consistency_check_defeat_a_lying_server() {
    use std::sync::Arc;
    use tutela_protocol::pki::{LeafOptions, Validity};
    use tutela_protocol::secagg::signing::{IdentityKey, SiteCertificates};

    let ca = crate::common::ca(crate::common::CONSORTIUM);
    let mut certs = SiteCertificates::new();
    let mut keys = Vec::new();
    for s in 0..6u32 {
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
    let certs = Arc::new(certs);
    let cfg = config(6, 5, 3, 16);
    let start = || -> Vec<_> {
        (0..6u32)
            .map(|s| {
                ClientAdvertising::new(cfg.clone(), s)
                    .unwrap()
                    .with_signed_keys(keys[s as usize].clone(), certs.clone())
                    .advertise_keys()
                    .unwrap()
            })
            .collect()
    };

    // An honest round with signed keys: the exact sum.
    let mut server = ServerCollectingKeys::new(cfg.clone()).unwrap();
    let mut states = Vec::new();
    for (c, msg) in start() {
        assert!(msg.keys.iter().all(|k| !k.signature.is_empty()));
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
    let mut last = Vec::new();
    for (s, (c, r)) in next.into_iter().zip(relays).enumerate() {
        let (c, msg) = c.masked_input(r, &[s as i64 + 1; 16]).unwrap();
        server.receive(msg.into()).unwrap();
        last.push(c);
    }
    let (mut server, request) = server.close_with_consistency_check().unwrap();
    // A signing site unmasks only after the consistency check.
    let mut confirmed_states = Vec::new();
    for c in last {
        let (c, msg) = c.confirm(request.clone()).unwrap();
        server.receive(msg.into()).unwrap();
        confirmed_states.push(c);
    }
    let (mut server, confirmed) = server.close().unwrap();
    // One relay per survivor, with the signatures its five neighbours addressed to it.
    assert_eq!(confirmed.len(), 6);
    for (s, c) in confirmed.iter().enumerate() {
        assert_eq!(c.to, s as SiteIndex);
        assert_eq!(c.confirmations.len(), 5);
    }

    // A server that lies about the survivors: it tells site 4 that site 0 dropped, hoping for
    // site 0's pairwise seeds (it already holds site 0's self-seed shares from the others). The
    // signatures it holds are over the true list, so site 4 refuses; and it refuses the honest
    // list too once it signed the false one.
    let mut lie = confirmed[4].clone();
    lie.request.survivors.retain(|&s| s != 0);
    lie.request.dropped.push(0);
    let mut confirmed_states = confirmed_states.into_iter();
    let honest: Vec<_> = confirmed_states.by_ref().take(4).collect();
    let (c4, c5) = (
        confirmed_states.next().unwrap(),
        confirmed_states.next().unwrap(),
    );
    let err = c4.unmask(lie.clone()).unwrap_err();
    assert!(err.to_string().contains("another survivor list"), "{err}");
    // A confirmation whose signature was altered: site 5 refuses, naming the signer.
    let mut forged = confirmed[5].clone();
    forged.confirmations[1].1[8] ^= 1;
    let err = c5.unmask(forged).unwrap_err();
    assert!(
        matches!(
            &err,
            SecAggError::Malformed {
                phase: Phase::ConsistencyCheck,
                ..
            }
        ),
        "{err}"
    );
    for (c, relay) in honest.into_iter().zip(&confirmed) {
        server
            .receive(c.unmask(relay.clone()).unwrap().into())
            .unwrap();
    }
    assert_eq!(server.finish().unwrap().sum, vec![21; 16]);

    // The server puts its own key where site 1's was: site 0 refuses, naming site 1.
    let mut server = ServerCollectingKeys::new(cfg.clone()).unwrap();
    let mut states = Vec::new();
    for (c, msg) in start() {
        server.receive(msg.into()).unwrap();
        states.push(c);
    }
    let (_, relays) = server.close().unwrap();
    let (_, forged) = ClientAdvertising::new(cfg.clone(), 1)
        .unwrap()
        .advertise_keys()
        .unwrap();
    let mut mitm = relays[0].clone();
    let slot = mitm.keys.iter().position(|k| k.peer == 1).unwrap();
    let own = forged.keys.iter().find(|k| k.peer == 0).unwrap();
    mitm.keys[slot].public = own.public;
    let mut states = states.into_iter();
    let err = states.next().unwrap().share_keys(mitm).unwrap_err();
    assert!(
        matches!(&err, SecAggError::Malformed { site: 1, phase: Phase::AdvertiseKeys, reason } if reason.contains("signature")),
        "{err}"
    );
    // Site 1's genuine key and signature for site 2, replayed to site 3 as if made for it: the
    // signature covers the pair, so site 4 refuses too.
    let mut replay = relays[3].clone();
    let for_two = relays[2].keys.iter().find(|k| k.peer == 1).unwrap().clone();
    let slot = replay.keys.iter().position(|k| k.peer == 1).unwrap();
    replay.keys[slot] = for_two;
    let three = states.nth(2).unwrap();
    assert!(
        three
            .share_keys(replay)
            .unwrap_err()
            .to_string()
            .contains("signature")
    );
}

#[test]
fn a_site_encodes_and_masks_its_real_valued_update_in_one_step() {
    // Three sites, complete graph, each masking an f32 update through `masked_update` with
    // σ_site = 2 grid steps on a 2^-12 grid: the unmasked sum is the clipped updates' sum within
    // the noise, and an update over the norm bound is clipped to it.
    let cfg = config(3, 2, 2, 4);
    let params = EncodeParams {
        clip_norm: 1.0,
        scale_bits: 12,
        rounding_beta: encode::DEFAULT_ROUNDING_BETA,
        noise_sigma_grid: Some(2.0),
    };
    let updates: [Vec<f32>; 3] = [
        vec![0.5, -0.25, 0.0, 0.125],
        vec![0.1, 0.2, 0.3, 0.4],
        vec![30.0, 0.0, 0.0, 40.0], // norm 50: clipped to (0.6, 0, 0, 0.8)
    ];
    let mut server = ServerCollectingKeys::new(cfg.clone()).unwrap();
    let mut states = Vec::new();
    for s in 0..3 {
        let (c, msg) = ClientAdvertising::new(cfg.clone(), s)
            .unwrap()
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
    let mut last = Vec::new();
    for ((c, r), u) in next.into_iter().zip(relays).zip(&updates) {
        let (c, msg) = c.masked_update(r, u, &params).unwrap();
        server.receive(msg.into()).unwrap();
        last.push(c);
    }
    let (mut server, request) = server.close().unwrap();
    for c in last {
        server
            .receive(c.unmask(request.clone()).unwrap().into())
            .unwrap();
    }
    let sum = encode::decode_sum(&server.finish().unwrap().sum, 12);
    let want = [1.2, -0.05, 0.3, 1.325];
    for (got, want) in sum.iter().zip(want) {
        // Noise: σ = 2·√3 grid steps of 2^-12 ≈ 0.00085; rounding: under 3 steps ≈ 0.0007.
        // 0.01 is over 10σ away.
        assert!((got - want).abs() < 0.01, "{got} vs {want}");
    }
}
