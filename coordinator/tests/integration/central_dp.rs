//! Central DP (DP-FedAvg) through the real streaming aggregator: every site's update is folded
//! with weight 1 and clipped to C at commit through the spool, then the noised sum is released
//! and the site-level ε reported.

use tutela_coordinator::aggregate::{AggregatorOptions, RoundAggregator, UpdateSink};
use tutela_coordinator::central_dp::{CentralDp, ClipToNorm, clip_factor};
use tutela_protocol::job::CentralDpSpec;
use tutela_protocol::stream::{SinkError, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

const N: usize = 4000;

fn model() -> Manifest {
    Manifest::new(
        vec![
            TensorSpec::new("w", DType::F32, vec![N as u64 - 10]),
            TensorSpec::new("b", DType::F32, vec![10]),
        ],
        Default::default(),
    )
    .unwrap()
}

fn upload(mut sink: UpdateSink, m: &Manifest, flat: &[f32]) -> Result<(), SinkError> {
    sink.begin(m)?;
    let (w, b) = flat.split_at(N - 10);
    for (i, t) in [w, b].iter().enumerate() {
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (c, piece) in bytes.chunks(1000).enumerate() {
            sink.write(i, (c * 1000) as u64, piece)?;
        }
    }
    sink.commit(&[1u8; 32]).map(|_| ())
}

/// An update of L2 norm `norm` in a direction given by `seed`.
fn update(seed: u32, norm: f64) -> Vec<f32> {
    let raw: Vec<f64> = (0..N as u32)
        .map(|i| f64::from((seed * 7919 + i * 104_729) % 1009) - 504.0)
        .collect();
    let n = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    raw.iter().map(|x| (x / n * norm) as f32).collect()
}

fn spec() -> CentralDpSpec {
    CentralDpSpec {
        clip_norm: 1.0,
        noise_multiplier: None,
        adaptive: false,
        target_quantile: 0.5,
        clip_learning_rate: 0.2,
        count_noise_multiplier: 10.0,
    }
}

#[test]
fn each_site_is_clipped_to_c_weighted_once_and_the_noised_sum_reports_epsilon() {
    let m = model();
    let clip = 1.0;
    let mut options = AggregatorOptions::new(100.0);
    options
        .filters
        .push(std::sync::Arc::new(ClipToNorm { clip: clip }));
    options.unit_weights = true;
    // Every weight is 1 under central DP: the finest fixed-point scale.
    options.max_weight = 1.0;
    let agg = RoundAggregator::with_options(&m, options).unwrap();
    let sites = [("a", 5.0, 120.0), ("b", 0.5, 40.0), ("c", 3.0, 900.0)];
    let updates: Vec<Vec<f32>> = sites
        .iter()
        .enumerate()
        .map(|(i, (_, norm, _))| update(i as u32 + 1, *norm))
        .collect();
    for ((site, _, samples), u) in sites.iter().zip(&updates) {
        // The sample count the sink is given is ignored: one site, one unit of weight.
        upload(agg.update_sink(site.to_string(), *samples), &m, u).unwrap();
    }
    let mut result = agg.finish().unwrap();
    assert_eq!(result.total_weight, 3.0);
    // Every contribution clipped to C: the expected mean is (Σ c_k Δ_k) / 3.
    let mut want = vec![0f64; N];
    for (a, ((site, norm, _), u)) in result.accepted.iter().zip(sites.iter().zip(&updates)) {
        assert_eq!(a.site, *site);
        assert_eq!(a.weight, 1.0);
        assert!((a.l2_norm - norm).abs() < 1e-4, "{} {}", a.l2_norm, norm);
        let c = clip_factor(a.l2_norm, clip);
        assert_eq!(a.clip_factor, c);
        assert!(a.l2_norm * a.clip_factor <= clip * (1.0 + 1e-12));
        for (w, x) in want.iter_mut().zip(u) {
            *w += f64::from(*x) * c / 3.0;
        }
    }
    let got: Vec<f64> = result.mean_delta.iter().flatten().copied().collect();
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-9, "clipped mean off by {err}");
    // Each site's share of the sum has norm ≤ C (a: 5 → 1, b: 0.5 stays, c: 3 → 1).
    let clipped_norms: Vec<f64> = result
        .accepted
        .iter()
        .map(|a| a.l2_norm * a.clip_factor)
        .collect();
    assert!((clipped_norms[0] - 1.0).abs() < 1e-6);
    assert!((clipped_norms[1] - 0.5).abs() < 1e-6);
    assert!((clipped_norms[2] - 1.0).abs() < 1e-6);

    // Noise on the sum, then the mean: (Σ + N(0, (zC)²)) / 3.
    let z = 2.0;
    let mut dp = CentralDp::new(&spec(), z, 1e-5, N).unwrap();
    dp.insecure_seed_for_tests([3; 32]);
    let released = dp.release_round(&mut result).unwrap();
    let noise_var = result
        .mean_delta
        .iter()
        .flatten()
        .zip(&want)
        .map(|(g, w)| ((g - w) * 3.0).powi(2))
        .sum::<f64>()
        / N as f64;
    let want_var = (z * clip).powi(2);
    assert!(
        (noise_var / want_var - 1.0).abs() < 5.0 * (2.0 / N as f64).sqrt(),
        "noise variance {noise_var} vs {want_var}"
    );
    assert_eq!(released.sites, 3);
    assert_eq!(released.unclipped, 1);
    assert_eq!(released.clip_factors.len(), 3);
    assert!(released.round_epsilon > 0.0 && released.round_epsilon.is_finite());
    assert_eq!(released.round_epsilon, released.job_epsilon);
    // A second round composes: the job's ε grows, but by less than a second round's worth.
    let agg = {
        let mut options = AggregatorOptions::new(100.0);
        options
            .filters
            .push(std::sync::Arc::new(ClipToNorm { clip: dp.clip() }));
        options.unit_weights = true;
        options.max_weight = 1.0;
        RoundAggregator::with_options(&m, options).unwrap()
    };
    upload(agg.update_sink("a".into(), 1.0), &m, &updates[0]).unwrap();
    let mut second = agg.finish().unwrap();
    let again = dp.release_round(&mut second).unwrap();
    assert!(again.job_epsilon > released.job_epsilon);
    assert!(again.job_epsilon < 2.0 * released.job_epsilon);
}

#[test]
fn without_central_dp_the_weights_and_norms_are_untouched() {
    let m = model();
    let agg = RoundAggregator::new(&m, 100.0).unwrap();
    upload(agg.update_sink("a".into(), 3.0), &m, &update(1, 5.0)).unwrap();
    let r = agg.finish().unwrap();
    assert_eq!(r.accepted[0].weight, 3.0);
    assert_eq!(r.accepted[0].clip_factor, 1.0);
}
