//! Secure aggregation through the coordinator's real `RoundAggregation` (`MaskedAggregation`):
//! ten sites run the protocol's client states, their masked inputs stream through the same
//! `SiteSink` an upload writes to, in chunks that split elements, and the engine's phase closes
//! are driven through `PhasedRound`. Dropouts at every phase in turn are recovered and the round's
//! mean is the plain mean of the survivors' inputs bit for bit; below the threshold the round
//! fails with the reason; what the coordinator holds while it collects is only masked.

use std::collections::BTreeMap;
use std::sync::Arc;

use tutela_coordinator::aggregate::masked::{MaskedAggregation, PhasedRound, Relay};
use tutela_coordinator::aggregate::{AggregateError, RoundAggregation, RoundResult};
use tutela_protocol::secagg::{
    ClientAdvertising, ClientMessage, Phase, RoundConfig, SecureAggregationSpec, encode,
};
use tutela_protocol::stream::TensorSink;
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

const SITES: u32 = 10;
const SCALE_BITS: u32 = 16;

/// A two-tensor model of 7 parameters.
pub(crate) fn model() -> Manifest {
    Manifest::new(
        vec![
            TensorSpec::new("w", DType::F32, vec![2, 3]),
            TensorSpec::new("b", DType::F32, vec![1]),
        ],
        Default::default(),
    )
    .unwrap()
}

fn names() -> Vec<String> {
    (0..SITES).map(|i| format!("site-{i:02}")).collect()
}

fn config() -> RoundConfig {
    let spec: SecureAggregationSpec =
        toml::from_str(&format!("scale_bits = {SCALE_BITS}")).unwrap();
    spec.round_config([9; 32], 1, 1, SITES, 3, 7)
}

/// Site `i`'s quantized input: grid integers of either sign, different per site.
pub(crate) fn input(i: u32) -> Vec<i64> {
    (0..7)
        .map(|j| (i64::from(i) * 7919 + j * 104_729) % 65_536 - 30_000)
        .collect()
}

/// Streams a masked input through the site's sink, 13 bytes at a time (chunks split elements).
pub(crate) fn upload(
    round: &Arc<MaskedAggregation>,
    site: &str,
    masked: &[u64],
) -> Result<(), String> {
    let mut sink = round.clone().open(site.to_string(), 1.0);
    let manifest = Manifest::new(
        vec![TensorSpec::new(
            "secagg.masked",
            DType::I64,
            vec![masked.len() as u64],
        )],
        Default::default(),
    )
    .unwrap();
    sink.begin(&manifest).map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = masked.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (c, piece) in bytes.chunks(13).enumerate() {
        sink.write(0, (c * 13) as u64, piece)
            .map_err(|e| e.to_string())?;
    }
    sink.commit(&[c_digest(site); 32])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn c_digest(site: &str) -> u8 {
    site.bytes().last().unwrap_or(0)
}

/// One round where `dropped` go silent from `phase` on. Returns the result, or the failure's
/// reason; checks along the way that the coordinator's running sum is never a plain sum.
fn round(phase: Phase, dropped: &[u32]) -> Result<RoundResult, String> {
    let names = names();
    let config = config();
    let round = MaskedAggregation::new(&model(), names.clone(), config.clone(), SCALE_BITS)
        .map_err(|e| e.to_string())?;
    let silent = |p: Phase, i: u32| p >= phase && dropped.contains(&i);
    let phases: &dyn PhasedRound = round.masked().expect("a masked round has phases");
    let relay = |i: u32| phases.relay_for(&names[i as usize]);

    // Phase 0: advertise keys.
    assert_eq!(phases.phase(), Some(Phase::AdvertiseKeys));
    let mut awaiting_keys = BTreeMap::new();
    for i in 0..SITES {
        if silent(Phase::AdvertiseKeys, i) {
            continue;
        }
        let (state, msg) = ClientAdvertising::new(config.clone(), i)
            .unwrap()
            .advertise_keys()
            .unwrap();
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
        awaiting_keys.insert(i, state);
    }
    assert_eq!(phases.pending(), (SITES as usize) - awaiting_keys.len());
    phases.close_phase().map_err(|e| e.to_string())?;

    // Phase 1: share keys.
    let mut awaiting_shares = BTreeMap::new();
    for (i, state) in awaiting_keys {
        let Some(Relay::Keys(keys)) = relay(i) else {
            continue;
        };
        if silent(Phase::ShareKeys, i) {
            continue;
        }
        let (state, msg) = state.share_keys(keys).map_err(|e| e.to_string())?;
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
        awaiting_shares.insert(i, state);
    }
    phases.close_phase().map_err(|e| e.to_string())?;

    // Phase 2: masked inputs, as uploads.
    let mut awaiting_unmask = BTreeMap::new();
    let mut plain_so_far = vec![0u64; 7];
    for (i, state) in awaiting_shares {
        let Some(Relay::Shares(shares)) = relay(i) else {
            continue;
        };
        if silent(Phase::MaskedInput, i) {
            continue;
        }
        let x = input(i);
        let (state, msg) = state.masked_input(shares, &x).map_err(|e| e.to_string())?;
        upload(&round, &names[i as usize], &msg.masked)?;
        for (p, v) in plain_so_far.iter_mut().zip(&x) {
            *p = p.wrapping_add(*v as u64);
        }
        let stored = round.stored_masked_sum().expect("collecting masked inputs");
        assert_ne!(
            stored, plain_so_far,
            "the coordinator holds the plain sum of the inputs folded so far"
        );
        awaiting_unmask.insert(i, state);
    }
    phases.close_phase().map_err(|e| e.to_string())?;

    // Phase 3: unmasking.
    for (i, state) in awaiting_unmask {
        let Some(Relay::Unmask(request)) = relay(i) else {
            panic!("a survivor was sent no unmask request");
        };
        if silent(Phase::Unmasking, i) {
            continue;
        }
        let msg = state.unmask(request).map_err(|e| e.to_string())?;
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
    }
    let closed = phases.close_phase();
    assert_eq!(phases.phase(), None);
    let finished = round.finish();
    match (closed, finished) {
        (Ok(()), Ok(f)) => Ok(f.result),
        (Err(e), Err(AggregateError::SecureAggregation(reason))) => {
            assert_eq!(reason, e.to_string());
            Err(reason)
        }
        (c, f) => panic!("phase close {c:?} and finish {f:?} disagree"),
    }
}

/// The mean of the plain inputs of `sites`, decoded as the coordinator decodes the sum.
fn plain_mean(sites: impl Iterator<Item = u32>) -> Vec<Vec<f64>> {
    let mut sum = vec![0i64; 7];
    let mut m = 0.0;
    for i in sites {
        for (s, v) in sum.iter_mut().zip(input(i)) {
            *s += v;
        }
        m += 1.0;
    }
    let mean: Vec<f64> = encode::decode_sum(&sum, SCALE_BITS)
        .into_iter()
        .map(|v| v / m)
        .collect();
    vec![mean[..6].to_vec(), mean[6..].to_vec()]
}

#[test]
fn no_dropout_gives_the_plain_mean_bit_for_bit() {
    let result = round(Phase::AdvertiseKeys, &[]).unwrap();
    assert_eq!(result.mean_delta, plain_mean(0..SITES));
    assert_eq!(result.accepted.len(), SITES as usize);
    assert_eq!(result.total_weight, f64::from(SITES));
}

#[test]
fn three_of_ten_dropping_at_each_phase_in_turn_are_recovered() {
    let dropped = [2, 5, 9];
    for phase in [
        Phase::AdvertiseKeys,
        Phase::ShareKeys,
        Phase::MaskedInput,
        Phase::Unmasking,
    ] {
        let result = round(phase, &dropped).unwrap_or_else(|e| panic!("{phase}: {e}"));
        // Sites dropped at unmasking sent their masked input: it is in the sum.
        let in_sum: Vec<u32> = (0..SITES)
            .filter(|i| phase == Phase::Unmasking || !dropped.contains(i))
            .collect();
        assert_eq!(
            result.mean_delta,
            plain_mean(in_sum.iter().copied()),
            "dropped at {phase}"
        );
        let sites: Vec<&str> = result.accepted.iter().map(|a| a.site.as_str()).collect();
        let expected: Vec<String> = in_sum
            .iter()
            .map(|&i| names()[i as usize].clone())
            .collect();
        assert_eq!(sites, expected, "dropped at {phase}");
    }
}

#[test]
fn below_the_threshold_the_round_fails_with_the_reason() {
    let t = config().min_survivors;
    // Leave t − 1 sites: every phase's close must refuse, naming the phase.
    let dropped: Vec<u32> = (t - 1..SITES).collect();
    for phase in [Phase::AdvertiseKeys, Phase::MaskedInput] {
        let reason = round(phase, &dropped).expect_err("too few survivors");
        assert!(reason.contains(&phase.to_string()), "{phase}: {reason}");
    }
}

#[test]
fn a_site_cannot_speak_for_another_or_upload_another_shape() {
    let names = names();
    let round = MaskedAggregation::new(&model(), names.clone(), config(), SCALE_BITS).unwrap();
    let (_, msg) = ClientAdvertising::new(config(), 3)
        .unwrap()
        .advertise_keys()
        .unwrap();
    let phases = round.masked().unwrap();
    let e = phases
        .receive(&names[4], ClientMessage::from(msg.clone()))
        .unwrap_err();
    assert!(e.to_string().contains("index 3"), "{e}");
    let e = phases
        .receive("site-99", ClientMessage::from(msg))
        .unwrap_err();
    assert!(e.to_string().contains("not a participant"), "{e}");

    let mut sink = round.clone().open(names[0].clone(), 1.0);
    let e = sink.begin(&model()).unwrap_err();
    assert!(e.to_string().contains("secagg.masked"), "{e}");
    drop(sink);
    assert_eq!(round.in_flight(), 0);
}

// Attacks on the wired secure aggregation (docs/security-review.md, "Holes from the 2026-11
// review, and aggregation"): what a site or a coordinator can send through the round's seams.

/// A masked input whose manifest is not one `I64` tensor `secagg.masked` of the round's vector
/// length (one element short, one more, another dtype), or whose bytes stop short, is refused
/// before anything is folded into the masked sum, and the site's slot stays free.
#[test]
fn a_masked_vector_of_the_wrong_length_or_dtype_is_refused_and_nothing_is_folded() {
    let names = names();
    let round = MaskedAggregation::new(&model(), names.clone(), config(), SCALE_BITS).unwrap();
    let phases = round.masked().unwrap();
    // Bring the round to the masked-input phase with every site's keys and shares.
    let mut awaiting_keys = BTreeMap::new();
    for i in 0..SITES {
        let (state, msg) = ClientAdvertising::new(config(), i)
            .unwrap()
            .advertise_keys()
            .unwrap();
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
        awaiting_keys.insert(i, state);
    }
    phases.close_phase().unwrap();
    for (i, state) in awaiting_keys {
        let Some(Relay::Keys(keys)) = phases.relay_for(&names[i as usize]) else {
            panic!("no keys for {i}");
        };
        let (_, msg) = state.share_keys(keys).unwrap();
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
    }
    phases.close_phase().unwrap();
    assert_eq!(phases.phase(), Some(Phase::MaskedInput));
    let before = round.stored_masked_sum();

    for (len, dtype) in [
        (6u64, DType::I64),
        (8, DType::I64),
        (7, DType::F64),
        (7, DType::U8),
    ] {
        let mut sink = round.clone().open(names[0].clone(), 1.0);
        let manifest = Manifest::new(
            vec![TensorSpec::new("secagg.masked", dtype, vec![len])],
            Default::default(),
        )
        .unwrap();
        let e = sink
            .begin(&manifest)
            .expect_err("a masked vector of another shape is refused");
        assert!(
            e.to_string().contains("secagg.masked") || e.to_string().contains("7"),
            "{len} {dtype}: {e}"
        );
    }
    // The right manifest, then fewer bytes than it declares.
    let mut sink = round.clone().open(names[0].clone(), 1.0);
    let manifest = Manifest::new(
        vec![TensorSpec::new("secagg.masked", DType::I64, vec![7])],
        Default::default(),
    )
    .unwrap();
    sink.begin(&manifest).unwrap();
    sink.write(0, 0, &[1u8; 48]).unwrap();
    assert!(
        sink.commit(&[1; 32]).is_err(),
        "a short masked vector was folded"
    );
    // A chunk sent twice in place of another (a gap the sink would fill with zeros).
    let mut sink = round.clone().open(names[0].clone(), 1.0);
    sink.begin(&manifest).unwrap();
    sink.write(0, 0, &[1u8; 8]).unwrap();
    assert!(
        sink.write(0, 0, &[1u8; 8]).is_err(),
        "a duplicated chunk was taken"
    );
    drop(sink);
    assert_eq!(round.in_flight(), 0);
    assert_eq!(round.stored_masked_sum(), before, "nothing was folded");
    assert_eq!(
        phases.pending(),
        SITES as usize,
        "no site counts as answered"
    );
    // The site can still send its genuine masked input.
    upload(&round, &names[0], &[5u64; 7]).unwrap();
    assert_ne!(round.stored_masked_sum(), before);
    // And only once.
    let again = upload(&round, &names[0], &[5u64; 7]);
    assert!(
        again.is_err(),
        "a second masked input from the same site was folded"
    );
}

/// A coordinator (or anyone) replaying an earlier round's or attempt's messages: an advertisement
/// made for attempt 1 is refused by attempt 2's round (its tag binds the job, round and
/// attempt), and a site's second advertisement in one phase is refused.
#[test]
fn an_old_round_s_messages_are_refused_when_replayed() {
    let spec: SecureAggregationSpec =
        toml::from_str(&format!("scale_bits = {SCALE_BITS}")).unwrap();
    let attempt =
        |round: u32, attempt: u32| spec.round_config([9; 32], round, attempt, SITES, 3, 7);
    let names = names();
    let current =
        MaskedAggregation::new(&model(), names.clone(), attempt(1, 2), SCALE_BITS).unwrap();
    let phases = current.masked().unwrap();
    for old in [attempt(1, 1), attempt(0, 2), attempt(2, 2)] {
        let (_, stale) = ClientAdvertising::new(old.clone(), 4)
            .unwrap()
            .advertise_keys()
            .unwrap();
        let e = phases
            .receive(&names[4], ClientMessage::from(stale))
            .expect_err("a replayed advertisement is refused");
        assert!(e.to_string().contains("round"), "{old:?}: {e}");
    }
    let (_, fresh) = ClientAdvertising::new(attempt(1, 2), 4)
        .unwrap()
        .advertise_keys()
        .unwrap();
    phases
        .receive(&names[4], ClientMessage::from(fresh.clone()))
        .unwrap();
    assert!(
        phases
            .receive(&names[4], ClientMessage::from(fresh))
            .is_err(),
        "the same advertisement twice"
    );
}

/// Every site's state after its masked input, and the genuine unmasking request the round's
/// close relayed (to site 0), for attacks on the unmasking.
fn to_unmasking() -> (
    BTreeMap<u32, tutela_protocol::secagg::ClientAwaitingUnmask>,
    tutela_protocol::secagg::UnmaskRequest,
) {
    let config = config();
    let names = names();
    let round =
        MaskedAggregation::new(&model(), names.clone(), config.clone(), SCALE_BITS).unwrap();
    let phases = round.masked().unwrap();
    let mut advertising = BTreeMap::new();
    for i in 0..SITES {
        let (state, msg) = ClientAdvertising::new(config.clone(), i)
            .unwrap()
            .advertise_keys()
            .unwrap();
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
        advertising.insert(i, state);
    }
    phases.close_phase().unwrap();
    let mut sharing = BTreeMap::new();
    for (i, state) in advertising {
        let Some(Relay::Keys(keys)) = phases.relay_for(&names[i as usize]) else {
            panic!("no keys for {i}");
        };
        let (state, msg) = state.share_keys(keys).unwrap();
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
        sharing.insert(i, state);
    }
    phases.close_phase().unwrap();
    let mut masked = BTreeMap::new();
    for (i, state) in sharing {
        let Some(Relay::Shares(shares)) = phases.relay_for(&names[i as usize]) else {
            panic!("no shares for {i}");
        };
        let (state, msg) = state.masked_input(shares, &input(i)).unwrap();
        upload(&round, &names[i as usize], &msg.masked).unwrap();
        masked.insert(i, state);
    }
    phases.close_phase().unwrap();
    let Some(Relay::Unmask(genuine)) = phases.relay_for(&names[0]) else {
        panic!("no unmask request");
    };
    (masked, genuine)
}

/// A coordinator that drops a subset to isolate one site's update: an unmasking request that
/// leaves fewer survivors than the round's minimum (every other site claimed dropped after it
/// sent its masked input), or that lists a site both as survivor and as dropped (asking for its
/// self-mask and its pairwise-mask shares at once), is refused by every honest site, which then
/// reveals nothing. The genuine request is answered.
#[test]
fn an_unmask_request_that_isolates_a_site_is_refused_by_the_sites() {
    let min = config().min_survivors;
    assert!(min >= 3, "the test's round needs a real minimum, got {min}");
    let (states, genuine) = to_unmasking();
    assert_eq!(genuine.survivors.len(), SITES as usize);
    let mut isolating = genuine.clone();
    isolating.survivors = (0..min - 1).collect();
    isolating.dropped = (min - 1..SITES).collect();
    let mut both = genuine.clone();
    both.dropped.push(3);
    let mut states = states.into_iter();
    for (case, request) in [("isolating", isolating), ("both ways", both)] {
        let (i, state) = states.next().unwrap();
        let e = state
            .unmask(request)
            .expect_err("an honest site refuses the request");
        assert!(
            e.to_string().contains("survivor")
                || e.to_string().contains("twice")
                || e.to_string().contains("both"),
            "{case} (site {i}): {e}"
        );
    }
    let (_, honest) = states.next().unwrap();
    honest
        .unmask(genuine)
        .expect("the genuine request is answered");
}

// A coordinator relaying a forged key advertisement is refused by every site now that the wired
// protocol signs keys: `secagg_signed::a_forged_key_advertisement_is_refused_by_every_site_and_the_round_fails`.
