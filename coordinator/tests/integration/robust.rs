//! The buffered aggregation and its robust rules, through the sinks the task router uses
//! (`RoundAggregation::open`), against a direct computation on the same updates.

use std::path::Path;
use std::sync::Arc;

use tutela_coordinator::aggregate::buffered::{BufferedAggregator, BufferedOptions};
use tutela_coordinator::aggregate::plan::{JobAggregation, Method, RoundContext, Spools};
use tutela_coordinator::aggregate::{
    AggregateError, BLOCK, RobustRule, RoundAggregation, SiteSink, SpoolPool,
};
use tutela_privacy::at_rest::LocalKek;
use tutela_protocol::job::JobSpec;
use tutela_protocol::stream::{SinkError, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

/// Two tensors, the first longer than one block, so the spools are read in several runs.
fn model() -> Manifest {
    Manifest::new(
        vec![
            TensorSpec::new("w", DType::F32, vec![BLOCK as u64 + 1_000]),
            TensorSpec::new("b", DType::F32, vec![3]),
        ],
        Default::default(),
    )
    .unwrap()
}

/// A deterministic update of the model's shape, scaled to stay well inside the norm bound.
fn update(seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // A few levels only: ties across sites are common.
        ((x % 7) as f32 - 3.0) * 1e-3
    };
    vec![
        (0..BLOCK + 1_000).map(|_| next()).collect(),
        (0..3).map(|_| next()).collect(),
    ]
}

fn aggregator(dir: &Path, rule: RobustRule) -> Arc<BufferedAggregator> {
    BufferedAggregator::new(
        &model(),
        BufferedOptions {
            rule,
            norm_bound: 100.0,
            spool_dir: dir.to_path_buf(),
            kek: Arc::new(LocalKek::from_bytes(&[9u8; 32])),
            filters: Vec::new(),
        },
    )
    .unwrap()
}

/// Streams `tensors` into `sink` in chunks of `chunk` bytes (chunks may split an element).
fn upload(mut sink: SiteSink, tensors: &[Vec<f32>], chunk: usize) -> Result<(), SinkError> {
    sink.begin(&model())?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (c, piece) in bytes.chunks(chunk).enumerate() {
            sink.write(i, (c * chunk) as u64, piece)?;
        }
    }
    sink.commit(&[7u8; 32]).map(|_| ())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn trimmed(mut v: Vec<f64>, k: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    let kept = &v[k..v.len() - k];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// Every coordinate of the round's result against `direct` over the sites' values.
fn check_coordinatewise(
    result: &tutela_coordinator::aggregate::RoundResult,
    updates: &[Vec<Vec<f32>>],
    direct: impl Fn(Vec<f64>) -> f64,
) {
    for (t, tensor) in result.mean_delta.iter().enumerate() {
        for (j, got) in tensor.iter().enumerate() {
            let column: Vec<f64> = updates.iter().map(|u| f64::from(u[t][j])).collect();
            let want = direct(column);
            assert!(
                (got - want).abs() <= 1e-12,
                "tensor {t} element {j}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn median_and_trimmed_mean_match_a_direct_computation_for_odd_and_even_counts() {
    // ⌊0.2·n⌋ = 1 at 5 and 6; at 4 the trimmed mean would trim nothing and is refused (see
    // `a_rule_short_of_the_updates_it_needs_to_be_robust_fails_the_round_with_the_reason`).
    for n in [5usize, 6] {
        let updates: Vec<_> = (0..n as u64).map(|i| update(i + 1)).collect();
        for rule in [RobustRule::Median, RobustRule::TrimmedMean { beta: 0.2 }] {
            let dir = tempfile::tempdir().unwrap();
            let agg = aggregator(dir.path(), rule);
            // Arrival order differs from site order; chunk sizes split elements.
            for (i, u) in updates.iter().enumerate().rev() {
                upload(agg.clone().open(format!("site-{i}"), 100.0), u, 4093).unwrap();
            }
            let finished = agg.finish().unwrap();
            let result = &finished.result;
            let sites: Vec<&str> = result.accepted.iter().map(|a| a.site.as_str()).collect();
            let expected: Vec<String> = (0..n).map(|i| format!("site-{i}")).collect();
            assert_eq!(sites, expected, "accepted in site order");
            assert!(
                result.accepted.iter().all(|a| a.weight == 1.0),
                "sites weigh equally"
            );
            let k = (0.2 * n as f64).floor() as usize;
            match rule {
                RobustRule::Median => check_coordinatewise(result, &updates, median),
                _ => check_coordinatewise(result, &updates, |v| trimmed(v, k)),
            }
            let report = finished.robust.expect("a robust rule reports");
            assert_eq!(report.trimmed.len(), n);
            assert!(report.excluded.is_empty());
            // Spools are gone with the round.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}

#[test]
fn multi_krum_leaves_out_a_scaled_update_and_averages_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), RobustRule::MultiKrum { f: 1, m: None });
    let mut updates: Vec<_> = (0..5u64).map(|i| update(i + 1)).collect();
    // Site 2 sends a ×100 update.
    for t in &mut updates[2] {
        for v in t.iter_mut() {
            *v *= 100.0;
        }
    }
    for (i, u) in updates.iter().enumerate() {
        upload(agg.clone().open(format!("site-{i}"), 1.0), u, 1 << 20).unwrap();
    }
    let finished = agg.finish().unwrap();
    let report = finished.robust.unwrap();
    assert_eq!(report.excluded, vec!["site-2".to_string()]);
    assert_eq!(report.trimmed["site-2"], 1.0);
    assert_eq!(report.most_trimmed(), Some(("site-2", 1.0)));
    assert_eq!(report.scores.len(), 5);
    let selected = [0usize, 1, 3, 4];
    for (t, tensor) in finished.result.mean_delta.iter().enumerate() {
        for (j, got) in tensor.iter().enumerate() {
            let want = selected
                .iter()
                .map(|&i| f64::from(updates[i][t][j]))
                .sum::<f64>()
                / 4.0;
            assert!((got - want).abs() <= 1e-15, "{t}/{j}");
        }
    }
}

#[test]
fn multi_krum_with_too_few_updates_fails_the_round_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), RobustRule::MultiKrum { f: 1, m: None });
    for i in 0..4u64 {
        upload(agg.clone().open(format!("s{i}"), 1.0), &update(i), 1 << 16).unwrap();
    }
    match agg.finish() {
        Err(
            e @ AggregateError::TooFewForRule {
                need: 5, have: 4, ..
            },
        ) => {
            assert!(e.to_string().contains("multi_krum"), "{e}")
        }
        other => panic!("expected too few updates, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn nan_and_infinity_are_refused_naming_the_element_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), RobustRule::Median);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut u = update(3);
        u[0][BLOCK + 5] = bad;
        match upload(agg.clone().open("a".into(), 1.0), &u, 1 << 16) {
            Err(SinkError::Rejected(why)) => {
                assert!(
                    why.contains(&format!("\"w\" element {}", BLOCK + 5)),
                    "{why}"
                );
            }
            other => panic!("{bad}: expected a refusal, got {other:?}"),
        }
        assert_eq!(agg.in_flight(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "a refused update leaves no spool"
        );
    }
    // The site may still send a good one; the same site twice is refused.
    upload(agg.clone().open("a".into(), 1.0), &update(3), 1 << 16).unwrap();
    let again = upload(agg.clone().open("a".into(), 1.0), &update(4), 1 << 16);
    assert!(matches!(again, Err(SinkError::Rejected(w)) if w.contains("already contributed")));
    assert_eq!(agg.accepted().len(), 1);
}

#[test]
fn an_update_over_the_norm_bound_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), RobustRule::Median);
    let mut u = update(1);
    u[1][0] = 1000.0;
    match upload(agg.clone().open("a".into(), 1.0), &u, 1 << 16) {
        Err(SinkError::Rejected(why)) => assert!(why.contains("L2 norm"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn what_the_coordinator_spools_is_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), RobustRule::Median);
    // A recognisable update: the same distinctive value everywhere.
    let marker = 0.012_345_67f32;
    let u = vec![vec![marker; BLOCK + 1_000], vec![marker; 3]];
    upload(agg.clone().open("a".into(), 1.0), &u, 1 << 16).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one spool for one update");
    let stored = std::fs::read(&files[0]).unwrap();
    assert!(
        stored.len() > (BLOCK + 1_003) * 4,
        "the whole update is spooled"
    );
    let needle = marker.to_le_bytes();
    let plain = stored.windows(4).filter(|w| *w == needle).count();
    // Random ciphertext holds a given 4-byte pattern about once per 4 GiB.
    assert_eq!(plain, 0, "the update's values appear in clear in the spool");
    drop(agg);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_job_spec_chooses_the_aggregation_in_one_place() {
    let base = r#"
name = "robust"
rounds = 1
min_sites = 5
round_deadline_secs = 60
update_norm_bound = 10.0
[model]
name = "mlp"
[data]
schema = "breast_cancer"
[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 16
"#;
    let dir = tempfile::tempdir().unwrap();
    let spools = Spools {
        pool: SpoolPool::new(Some(dir.path().to_path_buf())),
        dir: dir.path().join("spools"),
        kek: Arc::new(LocalKek::from_bytes(&[1u8; 32])),
    };
    let cases = [
        ("", Method::Streaming, "fedavg"),
        (
            "[aggregation]\nrule = \"fedavg\"\n",
            Method::Streaming,
            "fedavg",
        ),
        (
            "[aggregation]\nrule = \"median\"\n",
            Method::Buffered(RobustRule::Median),
            "median",
        ),
        (
            "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.2\n",
            Method::Buffered(RobustRule::TrimmedMean { beta: 0.2 }),
            "trimmed_mean",
        ),
        (
            "[aggregation]\nrule = \"multi_krum\"\nf = 1\nm = 3\n",
            Method::Buffered(RobustRule::MultiKrum { f: 1, m: Some(3) }),
            "multi_krum",
        ),
        (
            "[secure_aggregation]\nscale_bits = 16\n",
            Method::Masked,
            "secagg",
        ),
    ];
    let participants: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let round = RoundContext {
        job_digest: [1; 32],
        round: 1,
        attempt: 1,
        participants: &participants,
        min_sites: 2,
    };
    for (extra, method, name) in cases {
        let spec = JobSpec::from_toml_str(&format!("{base}{extra}")).unwrap();
        let plan = JobAggregation::for_job(&spec, 100, 0, spools.clone()).unwrap();
        assert_eq!(plan.method(), method, "{extra}");
        assert_eq!(plan.open_round(&model(), &round).unwrap().name(), name);
    }
}

// Attacks on the robust rules (docs/security-review.md, "Holes from the 2026-11 review, and
// aggregation"): what a Byzantine site can send, through the same sinks the task router uses.

/// The honest sites' updates: small values around a common direction, so that the honest
/// result is known and an attacker's pull is measurable.
fn honest(n: usize) -> Vec<Vec<Vec<f32>>> {
    (0..n as u64)
        .map(|i| {
            update(i + 11)
                .into_iter()
                .map(|t| t.into_iter().map(|v| v + 0.01).collect())
                .collect()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn run(
    rule: RobustRule,
    updates: &[Vec<Vec<f32>>],
) -> Result<(Vec<Vec<f64>>, Vec<String>), AggregateError> {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), rule);
    for (i, u) in updates.iter().enumerate() {
        upload(agg.clone().open(format!("site-{i}"), 1.0), u, 1 << 16).unwrap();
    }
    let finished = agg.finish()?;
    let excluded = finished.robust.map(|r| r.excluded).unwrap_or_default();
    Ok((finished.result.mean_delta, excluded))
}

/// A sign-flipped update (−20× the honest mean direction, inside the norm bound) drags the plain
/// mean the wrong way; the median, the trimmed mean and Multi-Krum stay within the honest
/// values' spread, and Multi-Krum leaves the flipped site out.
#[test]
fn a_sign_flipped_update_does_not_turn_the_robust_rules_around() {
    let mut updates = honest(5);
    let flipped: Vec<Vec<f32>> = updates[0]
        .iter()
        .map(|t| t.iter().map(|_| -0.2f32).collect())
        .collect();
    updates[4] = flipped;
    // The honest values are in [0.007, 0.013]: each coordinate's median and 1-trimmed mean must
    // stay there; the flipped site's -0.2 would pull the plain mean to about -0.03.
    for rule in [
        RobustRule::Median,
        RobustRule::TrimmedMean { beta: 0.2 },
        RobustRule::MultiKrum { f: 1, m: None },
    ] {
        let (result, excluded) = run(rule, &updates).unwrap();
        for v in result.iter().flatten() {
            assert!(
                (0.0069..=0.0131).contains(v),
                "{rule:?}: a coordinate moved to {v} by the sign-flipped site"
            );
        }
        if let RobustRule::MultiKrum { .. } = rule {
            assert_eq!(excluded, vec!["site-4".to_string()]);
        }
    }
}

/// More Byzantine sites than the rule tolerates is refused, at submission (see the protocol
/// crate's `a_rule_that_tolerates_no_byzantine_site_is_refused_with_the_reason`) and again at
/// the round: a median of two values or a trimmed mean that trims nothing is the plain mean, and
/// the round fails saying so instead of aggregating as if it were robust.
#[test]
fn a_rule_short_of_the_updates_it_needs_to_be_robust_fails_the_round_with_the_reason() {
    let updates = honest(4);
    for (rule, n, need) in [
        (RobustRule::Median, 2usize, 3usize),
        (RobustRule::TrimmedMean { beta: 0.2 }, 4, 5),
        (RobustRule::MultiKrum { f: 1, m: None }, 4, 5),
    ] {
        match run(rule, &updates[..n]) {
            Err(e @ AggregateError::TooFewForRule { .. }) => {
                let why = e.to_string();
                assert!(why.contains(&format!("at least {need}")), "{rule:?}: {why}");
                assert!(why.contains("Byzantine"), "{rule:?}: {why}");
            }
            other => panic!(
                "{rule:?} over {n}: expected a refusal, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    match run(RobustRule::TrimmedMean { beta: 0.0 }, &updates) {
        Err(e @ AggregateError::NeverRobust { .. }) => {
            assert!(e.to_string().contains("trims nothing"), "{e}")
        }
        other => panic!("beta = 0: expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// Two colluding sites against the median of five: the rule tolerates two (the middle of five
/// values is never one of two extremes on the same side); three of five move it, as the
/// definition says, and the test pins that boundary.
#[test]
fn the_median_tolerates_a_minority_of_colluding_sites_and_no_more() {
    let bad = |u: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
        u.iter()
            .map(|t| t.iter().map(|_| 0.3f32).collect())
            .collect()
    };
    let mut two = honest(5);
    two[3] = bad(&two[3]);
    two[4] = bad(&two[4]);
    let (result, _) = run(RobustRule::Median, &two).unwrap();
    assert!(
        result.iter().flatten().all(|v| *v <= 0.0131),
        "two of five moved the median"
    );
    let mut three = two.clone();
    three[2] = bad(&three[2]);
    let (result, _) = run(RobustRule::Median, &three).unwrap();
    assert!(
        result.iter().flatten().all(|v| *v == f64::from(0.3f32)),
        "a majority sets the median"
    );
}

/// Ties: five identical updates (or two sybils sending the same values) give the exact value,
/// Multi-Krum's equal scores are broken by site order, and the result does not depend on the
/// order the updates arrived in.
#[test]
fn ties_give_the_same_result_whatever_the_arrival_order() {
    let same = update(5);
    let updates = vec![same.clone(); 5];
    for rule in [
        RobustRule::Median,
        RobustRule::TrimmedMean { beta: 0.2 },
        RobustRule::MultiKrum { f: 1, m: None },
    ] {
        let (result, excluded) = run(rule, &updates).unwrap();
        let want: Vec<Vec<f64>> = same
            .iter()
            .map(|t| t.iter().map(|v| f64::from(*v)).collect())
            .collect();
        assert_eq!(max_abs_diff(&result, &want), 0.0, "{rule:?}");
        if let RobustRule::MultiKrum { .. } = rule {
            // Every score is 0: the last site by order is the one left out.
            assert_eq!(excluded, vec!["site-4".to_string()]);
        }
    }
    // Sybils: two identical outliers, arriving first or last, are treated the same.
    let mut forward = honest(7);
    forward[5] = vec![vec![0.3; BLOCK + 1_000], vec![0.3; 3]];
    forward[6] = forward[5].clone();
    for rule in [RobustRule::Median, RobustRule::MultiKrum { f: 2, m: None }] {
        let dir = tempfile::tempdir().unwrap();
        let agg = aggregator(dir.path(), rule);
        for (i, u) in forward.iter().enumerate().rev() {
            upload(agg.clone().open(format!("site-{i}"), 1.0), u, 1 << 16).unwrap();
        }
        let reversed = agg.finish().unwrap();
        let (in_order, excluded) = run(rule, &forward).unwrap();
        assert_eq!(reversed.result.mean_delta, in_order, "{rule:?}");
        if let RobustRule::MultiKrum { .. } = rule {
            assert_eq!(excluded, vec!["site-5".to_string(), "site-6".to_string()]);
        }
    }
}

/// Updates of the wrong shape: a tensor of another length or dtype in the manifest, a tensor
/// missing or added, more bytes than the manifest declares, or fewer, are each refused with the
/// reason, and none is counted or leaves a spool.
#[test]
fn an_update_of_the_wrong_length_or_dtype_is_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), RobustRule::Median);
    let manifest = |tensors: Vec<TensorSpec>| Manifest::new(tensors, Default::default()).unwrap();
    let cases = [
        (
            "a shorter tensor",
            manifest(vec![
                TensorSpec::new("w", DType::F32, vec![BLOCK as u64 + 999]),
                TensorSpec::new("b", DType::F32, vec![3]),
            ]),
            "shape",
        ),
        (
            "another dtype",
            manifest(vec![
                TensorSpec::new("w", DType::F64, vec![BLOCK as u64 + 1_000]),
                TensorSpec::new("b", DType::F32, vec![3]),
            ]),
            "F32",
        ),
        (
            "a missing tensor",
            manifest(vec![TensorSpec::new(
                "w",
                DType::F32,
                vec![BLOCK as u64 + 1_000],
            )]),
            "missing",
        ),
        (
            "an extra tensor",
            manifest(vec![
                TensorSpec::new("w", DType::F32, vec![BLOCK as u64 + 1_000]),
                TensorSpec::new("b", DType::F32, vec![3]),
                TensorSpec::new("x", DType::F32, vec![1]),
            ]),
            "not in the global model",
        ),
    ];
    for (case, m, needle) in cases {
        let mut sink = agg.clone().open("a".into(), 1.0);
        match sink.begin(&m) {
            Err(SinkError::Rejected(why)) => assert!(why.contains(needle), "{case}: {why}"),
            other => panic!("{case}: expected a refusal, got {other:?}"),
        }
    }
    // The right manifest, then bytes past the tensor's end.
    let mut sink = agg.clone().open("a".into(), 1.0);
    sink.begin(&model()).unwrap();
    let past = sink.write(0, 0, &vec![0u8; (BLOCK + 1_000) * 4 + 4]);
    assert!(past.is_err(), "bytes past the tensor's end: {past:?}");
    drop(sink);
    // The right manifest, then fewer bytes than it declares.
    let mut sink = agg.clone().open("a".into(), 1.0);
    sink.begin(&model()).unwrap();
    sink.write(0, 0, &vec![0u8; (BLOCK + 1_000) * 4]).unwrap();
    sink.write(1, 0, &[0u8; 8]).unwrap();
    let short = sink.commit(&[7u8; 32]);
    assert!(
        short.is_err(),
        "an update with a tensor missing its values was accepted"
    );
    assert_eq!(agg.accepted().len(), 0);
    assert_eq!(agg.in_flight(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no spool is left"
    );
}

/// A site sending two updates to one round: while the first is still uploading, and after it
/// was accepted. Both are refused; its one update counts once.
#[test]
fn a_site_sending_two_updates_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let agg = aggregator(dir.path(), RobustRule::Median);
    let mut first = agg.clone().open("a".into(), 1.0);
    first.begin(&model()).unwrap();
    let mut second = agg.clone().open("a".into(), 1.0);
    match second.begin(&model()) {
        Err(SinkError::Rejected(why)) => assert!(why.contains("in progress"), "{why}"),
        other => panic!("a concurrent second upload: {other:?}"),
    }
    drop(second);
    drop(first);
    upload(agg.clone().open("a".into(), 1.0), &update(1), 1 << 16).unwrap();
    let again = upload(agg.clone().open("a".into(), 1.0), &update(2), 1 << 16);
    assert!(matches!(again, Err(SinkError::Rejected(w)) if w.contains("already contributed")));
    for i in 1..3u64 {
        upload(
            agg.clone().open(format!("s{i}"), 1.0),
            &update(i + 2),
            1 << 16,
        )
        .unwrap();
    }
    let finished = agg.finish().unwrap();
    let sites: Vec<&str> = finished
        .result
        .accepted
        .iter()
        .map(|a| a.site.as_str())
        .collect();
    assert_eq!(sites, vec!["a", "s1", "s2"]);
}
