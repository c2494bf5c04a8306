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
    for n in [4usize, 5] {
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
