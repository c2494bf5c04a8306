//! Statistical and structural tests of Poisson sampling and the secure discrete Gaussian.
//! Every test uses a fixed seed (through the `insecure_*` constructors, which exist for tests
//! only), so each outcome is reproducible; each threshold is one a wrong sampler would cross.

use std::num::NonZeroUsize;

use tutela_privacy::noise::{NoiseError, SecureGaussian, SecureRng};
use tutela_privacy::sampling::{PoissonSampler, SamplingError};

fn seed(byte: u8) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[0] = byte;
    s[31] = 0xa5;
    s
}

fn rng(byte: u8) -> SecureRng {
    SecureRng::insecure_from_seed(seed(byte))
}

/// Upper critical value of χ²(df) at p = 0.001, by Wilson & Hilferty (1931):
/// χ² ≈ df·(1 − 2/(9df) + z·√(2/(9df)))³ with z = 3.0902.
fn chi2_crit_001(df: usize) -> f64 {
    let d = df as f64;
    let h = 2.0 / (9.0 * d);
    d * (1.0 - h + 3.0902 * h.sqrt()).powi(3)
}

/// Groups consecutive cells (in order) until each group's expected count is ≥ 5, merging the
/// remainder into the last group: the usual binning of the tails. Returns (observed, expected).
fn merge_bins(observed: &[f64], expected: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let (mut co, mut ce) = (0.0, 0.0);
    for (&ob, &ex) in observed.iter().zip(expected) {
        co += ob;
        ce += ex;
        if ce >= 5.0 {
            o.push(co);
            e.push(ce);
            co = 0.0;
            ce = 0.0;
        }
    }
    if let (Some(lo), Some(le)) = (o.last_mut(), e.last_mut()) {
        *lo += co;
        *le += ce;
    }
    (o, e)
}

/// Pearson's χ² goodness of fit; panics with the statistic when it exceeds the 0.1% critical
/// value.
fn assert_chi2_fits(what: &str, observed: &[f64], expected: &[f64]) {
    let (o, e) = merge_bins(observed, expected);
    assert!(o.len() >= 3, "{what}: too few bins ({})", o.len());
    let stat: f64 = o.iter().zip(&e).map(|(o, e)| (o - e).powi(2) / e).sum();
    let crit = chi2_crit_001(o.len() - 1);
    assert!(
        stat < crit,
        "{what}: chi-square {stat:.1} >= critical {crit:.1} with {} bins",
        o.len()
    );
}

/// Two-sample χ² homogeneity test on counts over the same cells (equal sample sizes).
fn assert_same_distribution(what: &str, a: &[f64], b: &[f64]) {
    let total: Vec<f64> = a.iter().zip(b).map(|(x, y)| x + y).collect();
    // Merge cells by pooled count ≥ 10, in order.
    let (mut ma, mut mb) = (Vec::new(), Vec::new());
    let (mut ca, mut cb, mut ct) = (0.0, 0.0, 0.0);
    for i in 0..a.len() {
        ca += a[i];
        cb += b[i];
        ct += total[i];
        if ct >= 10.0 {
            ma.push(ca);
            mb.push(cb);
            ca = 0.0;
            cb = 0.0;
            ct = 0.0;
        }
    }
    if let (Some(x), Some(y)) = (ma.last_mut(), mb.last_mut()) {
        *x += ca;
        *y += cb;
    }
    let stat: f64 = ma
        .iter()
        .zip(&mb)
        .map(|(x, y)| (x - y).powi(2) / (x + y))
        .sum();
    let crit = chi2_crit_001(ma.len() - 1);
    assert!(
        stat < crit,
        "{what}: two-sample chi-square {stat:.1} >= critical {crit:.1} ({} cells)",
        ma.len()
    );
}

fn binomial_pmf(n: usize, q: f64) -> Vec<f64> {
    // p_0 = (1 − q)^n, p_{k+1} = p_k · (n − k)/(k + 1) · q/(1 − q).
    let mut p = vec![0.0; n + 1];
    p[0] = (1.0 - q).powi(n as i32);
    for k in 0..n {
        p[k + 1] = p[k] * (n - k) as f64 / (k + 1) as f64 * q / (1.0 - q);
    }
    p
}

// ---------------------------------------------------------------- Poisson sampling

#[test]
fn poisson_batch_size_is_binomial_by_chi_square() {
    let (n, q, batches) = (1000, 0.05, 20_000);
    let mut s = PoissonSampler::with_rng(n, q, rng(1)).unwrap();
    let mut counts = vec![0.0; n + 1];
    for _ in 0..batches {
        counts[s.next_batch().len()] += 1.0;
    }
    let expected: Vec<f64> = binomial_pmf(n, q)
        .iter()
        .map(|p| p * batches as f64)
        .collect();
    assert_chi2_fits("batch size vs Binomial(1000, 0.05)", &counts, &expected);
}

#[test]
fn poisson_batches_are_ascending_distinct_and_in_range() {
    let mut s = PoissonSampler::with_rng(500, 0.2, rng(2)).unwrap();
    for _ in 0..1000 {
        let b = s.next_batch();
        assert!(b.windows(2).all(|w| w[0] < w[1]), "not strictly ascending");
        assert!(b.iter().all(|&i| i < 500));
    }
}

#[test]
fn poisson_inclusion_frequency_per_record_is_q() {
    let (n, q, batches) = (1000, 0.05, 20_000);
    let mut s = PoissonSampler::with_rng(n, q, rng(3)).unwrap();
    let mut hits = vec![0u32; n];
    for _ in 0..batches {
        for i in s.next_batch() {
            hits[i] += 1;
        }
    }
    let mean = batches as f64 * q;
    let sd = (batches as f64 * q * (1.0 - q)).sqrt();
    // The max of 1000 standard normals exceeds 5 with probability ~6e-4.
    for (i, &h) in hits.iter().enumerate() {
        assert!(
            (f64::from(h) - mean).abs() < 5.0 * sd,
            "record {i} included {h} times, expected {mean} ± {sd:.1}"
        );
    }
    // Each record's count is Binomial(20000, q): χ² of the counts against that law.
    let lo = (mean - 6.0 * sd) as usize;
    let hi = (mean + 6.0 * sd) as usize;
    let pmf = {
        // Binomial(batches, q) around its mean, via logs.
        let ln_choose = |k: usize| -> f64 {
            let lg = |x: f64| libm::lgamma(x);
            lg(batches as f64 + 1.0) - lg(k as f64 + 1.0) - lg((batches - k) as f64 + 1.0)
        };
        (lo..=hi)
            .map(|k| {
                (ln_choose(k) + k as f64 * q.ln() + (batches - k) as f64 * (1.0 - q).ln()).exp()
            })
            .collect::<Vec<_>>()
    };
    let mut obs = vec![0.0; hi - lo + 1];
    for &h in &hits {
        let h = (h as usize).clamp(lo, hi);
        obs[h - lo] += 1.0;
    }
    let exp: Vec<f64> = pmf.iter().map(|p| p * n as f64).collect();
    assert_chi2_fits("per-record inclusion counts", &obs, &exp);
}

#[test]
fn geometric_skip_matches_bernoulli_reference() {
    let (n, q, batches) = (500, 0.04, 20_000);
    let mut fast = PoissonSampler::with_rng(n, q, rng(4)).unwrap();
    let mut slow = PoissonSampler::with_rng(n, q, rng(5)).unwrap();
    let (mut size_f, mut size_s) = (vec![0.0; n + 1], vec![0.0; n + 1]);
    // The first included index (n when empty) exercises the geometric gap directly.
    let (mut first_f, mut first_s) = (vec![0.0; n + 1], vec![0.0; n + 1]);
    let (mut incl_f, mut incl_s) = (vec![0.0; 20], vec![0.0; 20]);
    for _ in 0..batches {
        let f = fast.next_batch();
        let s = slow.next_batch_bernoulli();
        size_f[f.len()] += 1.0;
        size_s[s.len()] += 1.0;
        first_f[f.first().copied().unwrap_or(n)] += 1.0;
        first_s[s.first().copied().unwrap_or(n)] += 1.0;
        // Inclusions by position (20 blocks of 25 records).
        for i in f {
            incl_f[i / 25] += 1.0;
        }
        for i in s {
            incl_s[i / 25] += 1.0;
        }
    }
    assert_same_distribution("batch size, skip vs Bernoulli", &size_f, &size_s);
    assert_same_distribution("first index, skip vs Bernoulli", &first_f, &first_s);
    assert_same_distribution("inclusions by block, skip vs Bernoulli", &incl_f, &incl_s);
    // And the reference itself against the exact law.
    let expected: Vec<f64> = binomial_pmf(n, q)
        .iter()
        .map(|p| p * batches as f64)
        .collect();
    assert_chi2_fits("Bernoulli reference batch size", &size_s, &expected);
}

#[test]
fn geometric_skip_is_right_for_tiny_q_on_a_large_dataset() {
    // n = 10^7, q = 10^-5: mean batch 100. Batch sizes must be Binomial(n, q) ≈ Poisson(100).
    let (n, q, batches) = (10_000_000, 1e-5, 5000);
    let mut s = PoissonSampler::with_rng(n, q, rng(6)).unwrap();
    let mut counts = vec![0.0; 400];
    let mut sum = 0usize;
    for _ in 0..batches {
        let b = s.next_batch();
        sum += b.len();
        counts[b.len().min(399)] += 1.0;
    }
    let lambda = n as f64 * q;
    let mut pmf = vec![(-lambda).exp(); 400];
    for k in 1..400 {
        pmf[k] = pmf[k - 1] * lambda / k as f64;
    }
    let exp: Vec<f64> = pmf.iter().map(|p| p * batches as f64).collect();
    assert_chi2_fits("batch size, n=1e7 q=1e-5", &counts, &exp);
    let mean = sum as f64 / batches as f64;
    assert!((mean - lambda).abs() < 4.0 * (lambda / batches as f64).sqrt());
}

#[test]
fn poisson_edge_cases_and_errors() {
    let mut none = PoissonSampler::with_rng(100, 0.0, rng(7)).unwrap();
    assert!(none.next_batch().is_empty());
    assert!(none.next_batch_bernoulli().is_empty());
    let mut all = PoissonSampler::with_rng(100, 1.0, rng(7)).unwrap();
    assert_eq!(all.next_batch(), (0..100).collect::<Vec<_>>());
    assert_eq!(all.next_batch_bernoulli(), (0..100).collect::<Vec<_>>());
    let mut empty = PoissonSampler::with_rng(0, 0.5, rng(7)).unwrap();
    assert!(empty.next_batch().is_empty());
    for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        let err = PoissonSampler::with_rng(10, bad, rng(7)).unwrap_err();
        assert!(matches!(err, SamplingError::InvalidProbability(_)), "{bad}");
        assert!(err.to_string().contains("[0, 1]"), "{err}");
    }
    let batches = PoissonSampler::with_rng(10, 0.5, rng(7))
        .unwrap()
        .batches(7);
    assert_eq!(batches.q(), 0.5);
    assert_eq!(batches.len(), 7);
    assert_eq!(batches.count(), 7);
}

#[test]
fn bernoulli_reference_is_exact_for_tiny_dyadic_q() {
    // q = 2^-70 needs the multi-word comparison; with 10^5 coins none should come up, and
    // q = 1 − 2^-53 (all but never excluded) must include essentially everything.
    let mut tiny = PoissonSampler::with_rng(100_000, 2f64.powi(-70), rng(8)).unwrap();
    assert!(tiny.next_batch_bernoulli().is_empty());
    let mut big = PoissonSampler::with_rng(100_000, 1.0 - 2f64.powi(-53), rng(8)).unwrap();
    assert_eq!(big.next_batch_bernoulli().len(), 100_000);
    // q = 0.75 = 3/4: a two-bit comparison; frequency within 5 standard errors.
    let mut s = PoissonSampler::with_rng(100_000, 0.75, rng(9)).unwrap();
    let k = s.next_batch_bernoulli().len() as f64;
    assert!((k - 75_000.0).abs() < 5.0 * (100_000.0f64 * 0.75 * 0.25).sqrt());
}

// ---------------------------------------------------------------- discrete Gaussian

/// Mean and variance of the discrete Gaussian N_ℤ(0, s2), by direct summation.
fn dg_pmf(s2: f64, k: i64) -> Vec<f64> {
    let w: Vec<f64> = (-k..=k)
        .map(|x| (-(x as f64).powi(2) / (2.0 * s2)).exp())
        .collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|v| v / z).collect()
}

#[test]
fn noise_mean_and_variance_match_sigma_within_4_standard_errors() {
    let n = 200_000;
    for (i, (sigma, g)) in [
        (1.0, 1.0),
        (1.0, 2f64.powi(-10)),
        (3.0, 2f64.powi(-4)),
        (1e-3, 2f64.powi(-20)),
        (50.0, 2f64.powi(-8)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut noise = SecureGaussian::with_rng(sigma, g, rng(20 + i as u8)).unwrap();
        let mut buf = vec![0f32; n];
        noise.fill(&mut buf);
        // The exact variance of N_ℤ(0, σ_g²) (slightly below σ_g² for σ_g near 1), in real units.
        let s2 = noise.grid_variance();
        let k = (12.0 * s2.sqrt()).ceil() as i64;
        let pmf = dg_pmf(s2, k);
        let var_exact: f64 = pmf
            .iter()
            .enumerate()
            .map(|(j, p)| p * ((j as i64 - k) as f64).powi(2))
            .sum::<f64>()
            * g
            * g;
        assert!(
            (var_exact / (sigma * sigma) - 1.0).abs() < 1e-3,
            "{var_exact}"
        );
        let mean = buf.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = buf.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64;
        let se_mean = (var_exact / n as f64).sqrt();
        let se_var = var_exact * (2.0 / n as f64).sqrt();
        assert!(
            mean.abs() < 4.0 * se_mean,
            "sigma {sigma}: mean {mean:e}, standard error {se_mean:e}"
        );
        assert!(
            (var - var_exact).abs() < 4.0 * se_var,
            "sigma {sigma}: variance {var:e}, expected {var_exact:e} ± {se_var:e}"
        );
    }
}

/// Draws `n` values from `draw`, histogrammed by grid value clamped to `[-k, k]` in `width`-wide
/// cells.
fn histogram(n: usize, k: i64, width: i64, mut draw: impl FnMut() -> i64) -> Vec<f64> {
    let cells = (2 * k / width + 1) as usize;
    let mut h = vec![0.0; cells];
    for _ in 0..n {
        let x = draw().clamp(-k, k);
        h[((x + k) / width) as usize] += 1.0;
    }
    h
}

#[test]
fn fast_sampler_agrees_with_the_reference_implementation_by_chi_square() {
    // Same parameters, independent seeds: the two-sample test compares the distributions, from
    // the smallest scale the sampler accepts (σ_g = 1) through non-integer ones to the largest
    // (σ_g = 2^16, the production grid of `grid_for`), and an odd 2^16 − 0.1.
    let n = 60_000;
    for (i, (sigma, g)) in [
        (1.0, 1.0),
        (1.5, 1.0),
        (7.3, 1.0),
        (1000.0, 1.0),
        (65535.9, 1.0),
        (1.0, 2f64.powi(-16)),
    ]
    .into_iter()
    .enumerate()
    {
        let steps = sigma / g;
        let mut fast = SecureGaussian::with_rng(sigma, g, rng(100 + i as u8)).unwrap();
        let mut reference = SecureGaussian::with_rng(sigma, g, rng(120 + i as u8)).unwrap();
        // Cells of about a tenth of σ over ±6σ (single grid steps for small σ).
        let width = ((steps / 10.0).floor() as i64).max(1);
        let k = (6.0 * steps).ceil() as i64 / width * width;
        let a = histogram(n, k, width, || fast.sample_grid());
        let b = histogram(n, k, width, || reference.sample_grid_reference());
        assert_same_distribution(&format!("fast vs reference, σ_g = {steps}"), &a, &b);
        // Each one against the exact pmf too, for the scales where the pmf is cheap to sum.
        if steps <= 10.0 {
            let exp: Vec<f64> = dg_pmf(fast.grid_variance(), k)
                .iter()
                .map(|p| p * n as f64)
                .collect();
            assert_chi2_fits(&format!("fast sampler pmf, σ_g = {steps}"), &a, &exp);
            assert_chi2_fits(&format!("reference sampler pmf, σ_g = {steps}"), &b, &exp);
        }
    }
}

#[test]
fn fast_and_reference_samplers_differ_in_the_bits_they_consume() {
    // Guards the test above against comparing a sampler with itself: from one seed the two
    // implementations read the keystream differently, so their sequences differ.
    let mut a = SecureGaussian::with_rng(3.0, 1.0, rng(140)).unwrap();
    let mut b = SecureGaussian::with_rng(3.0, 1.0, rng(140)).unwrap();
    let fast: Vec<i64> = (0..200).map(|_| a.sample_grid()).collect();
    let reference: Vec<i64> = (0..200).map(|_| b.sample_grid_reference()).collect();
    assert_ne!(fast, reference);
}

#[test]
fn tail_frequencies_match_the_exact_discrete_gaussian() {
    // The coins deciding large |x| are the long loops (exp(−γ) with γ > 1, several exp(−1)
    // coins): P(|X| ≥ 3σ) must match the exact tail at σ_g = 1.5 and 40.
    let n = 400_000;
    for (i, steps) in [1.5, 40.0].into_iter().enumerate() {
        let mut noise = SecureGaussian::with_rng(steps, 1.0, rng(150 + i as u8)).unwrap();
        let s2 = noise.grid_variance();
        let k = (14.0 * s2.sqrt()).ceil() as i64;
        let pmf = dg_pmf(s2, k);
        let edge = (3.0 * steps).ceil() as i64;
        let p_tail: f64 = pmf
            .iter()
            .enumerate()
            .filter(|(j, _)| (*j as i64 - k).abs() >= edge)
            .map(|(_, p)| p)
            .sum();
        let hits = (0..n).filter(|_| noise.sample_grid().abs() >= edge).count() as f64;
        let se = (n as f64 * p_tail * (1.0 - p_tail)).sqrt();
        assert!(
            (hits - n as f64 * p_tail).abs() < 5.0 * se,
            "σ_g {steps}: {hits} draws with |x| ≥ {edge}, expected {:.0} ± {se:.0}",
            n as f64 * p_tail
        );
    }
}

#[test]
fn noise_lies_on_the_declared_grid() {
    for (i, k) in [0, 3, 10, 20, 30].into_iter().enumerate() {
        let g = 2f64.powi(-k);
        let sigma = 37.5 * g;
        let mut noise = SecureGaussian::with_rng(sigma, g, rng(40 + i as u8)).unwrap();
        let mut buf = vec![0f32; 50_000];
        noise.fill(&mut buf);
        let mut odd = 0;
        for &x in &buf {
            let steps = f64::from(x) / g;
            assert_eq!(steps.fract(), 0.0, "{x:e} is not a multiple of 2^-{k}");
            if steps.rem_euclid(2.0) == 1.0 {
                odd += 1;
            }
        }
        // The grid is really used (not a coarser one): about half the values are odd steps.
        assert!((20_000..30_000).contains(&odd), "{odd} odd multiples");
    }
}

#[test]
fn discrete_gaussian_pmf_matches_by_chi_square_for_small_sigma() {
    let n = 100_000;
    for (i, sigma) in [1.0, 1.5, 2.7, 6.0].into_iter().enumerate() {
        let mut noise = SecureGaussian::with_rng(sigma, 1.0, rng(60 + i as u8)).unwrap();
        let k = (10.0 * sigma).ceil() as i64;
        let mut obs = vec![0.0; (2 * k + 1) as usize];
        for _ in 0..n {
            let x = noise.sample_grid().clamp(-k, k);
            obs[(x + k) as usize] += 1.0;
        }
        let exp: Vec<f64> = dg_pmf(noise.grid_variance(), k)
            .iter()
            .map(|p| p * n as f64)
            .collect();
        assert_chi2_fits(&format!("discrete Gaussian pmf, sigma {sigma}"), &obs, &exp);
    }
}

#[test]
fn rounded_continuous_gaussian_would_fail_the_pmf_test() {
    // Guards the test above: at σ = 1 the discrete Gaussian puts 1/Σexp(−y²/2) ≈ 0.39894 at 0,
    // a rounded normal 0.38292. With 10^5 draws that is 30 standard errors apart.
    let mut noise = SecureGaussian::with_rng(1.0, 1.0, rng(70)).unwrap();
    let zeros = (0..100_000).filter(|_| noise.sample_grid() == 0).count() as f64 / 1e5;
    assert!((zeros - 0.39894).abs() < 0.006, "P(0) = {zeros}");
    assert!((zeros - 0.38292).abs() > 0.01, "P(0) = {zeros}");
}

#[test]
fn same_seed_same_noise_different_seed_different_noise() {
    let draw = |byte: u8| {
        let mut noise = SecureGaussian::with_rng(1.0, 2f64.powi(-12), rng(byte)).unwrap();
        let mut buf = vec![0f32; 1000];
        noise.fill(&mut buf);
        buf
    };
    assert_eq!(draw(80), draw(80));
    let (a, b) = (draw(80), draw(81));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same < 20, "{same} of 1000 values coincide across seeds");
}

#[test]
fn os_seeded_generators_differ() {
    let mut a = SecureGaussian::new(1.0, 2f64.powi(-12)).unwrap();
    let mut b = SecureGaussian::new(1.0, 2f64.powi(-12)).unwrap();
    let (mut x, mut y) = (vec![0f32; 256], vec![0f32; 256]);
    a.fill(&mut x);
    b.fill(&mut y);
    assert_ne!(x, y);
}

#[test]
fn fill_parallel_is_on_grid_with_the_right_variance_and_fresh_streams() {
    let g = 2f64.powi(-10);
    let mut noise = SecureGaussian::with_rng(2.0, g, rng(90)).unwrap();
    let n = 100_000;
    let threads = NonZeroUsize::new(3).unwrap();
    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
    noise.fill_parallel(&mut a, threads);
    noise.fill_parallel(&mut b, threads);
    // Later calls use new streams: no chunk repeats.
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same < 200, "{same} coincide");
    let var = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64;
    assert!(
        (var - 4.0).abs() < 4.0 * 4.0 * (2.0 / n as f64).sqrt(),
        "{var}"
    );
    assert!(a.iter().all(|&x| (f64::from(x) / g).fract() == 0.0));
}

#[test]
fn bad_parameters_are_refused_with_a_reason() {
    let e = SecureGaussian::with_rng(0.0, 1.0, rng(1)).unwrap_err();
    assert_eq!(e, NoiseError::InvalidSigma(0.0));
    assert!(e.to_string().contains("sigma"), "{e}");
    assert!(matches!(
        SecureGaussian::with_rng(f64::NAN, 1.0, rng(1)),
        Err(NoiseError::InvalidSigma(_))
    ));
    let e = SecureGaussian::with_rng(1.0, 0.3, rng(1)).unwrap_err();
    assert_eq!(e, NoiseError::InvalidGranularity(0.3));
    assert!(e.to_string().contains("power of two"), "{e}");
    // Granularity coarser than sigma, and finer than sigma·2^-16.
    let e = SecureGaussian::with_rng(0.5, 1.0, rng(1)).unwrap_err();
    assert!(matches!(e, NoiseError::ScaleOutOfRange { .. }), "{e}");
    assert!(
        e.to_string().contains("between sigma * 2^-16 and sigma"),
        "{e}"
    );
    assert!(matches!(
        SecureGaussian::with_rng(1.0, 2f64.powi(-17), rng(1)),
        Err(NoiseError::ScaleOutOfRange { .. })
    ));
    // The effective sigma is never below the requested one, and within 2^-40 of it.
    let n = SecureGaussian::with_rng(0.1, 2f64.powi(-12), rng(1)).unwrap();
    assert!(n.effective_sigma() >= 0.1 * (1.0 - 1e-15));
    assert!((n.effective_sigma() / 0.1 - 1.0).abs() < 2f64.powi(-40));
}

// ---------------------------------------------------------------- the generator is ChaCha20

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn generator_is_chacha20_rfc8439_block_test_vector() {
    // RFC 8439 §2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block count 1.
    // In rand_chacha's layout: block = 1 | n0 << 32 with n0 = 0x09000000, stream = n1 | n2 << 32.
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let mut r = SecureRng::insecure_chacha20_keystream(key, 0x4a00_0000, 1 | (0x0900_0000 << 32));
    let mut block = [0u8; 64];
    r.fill_bytes(&mut block);
    assert_eq!(
        hex(&block),
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e\
         d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    );
}

#[test]
fn seeded_generator_is_the_chacha20_keystream_from_block_zero() {
    // The constructor the samplers use is keystream(key, nonce 0, counter 0): RFC 8439 A.1 test
    // vector #1 for the all-zero key, and an independently computed one for key 00..1f.
    let mut zero = SecureRng::insecure_from_seed([0u8; 32]);
    let mut block = [0u8; 64];
    zero.fill_bytes(&mut block);
    assert_eq!(
        hex(&block),
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7\
         da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    );
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let mut r = SecureRng::insecure_from_seed(key);
    r.fill_bytes(&mut block);
    assert_eq!(
        hex(&block),
        "39fd2b7dd9c5196a8dbd0377b8dc4a498a35d86fbcde6accb2cc7d4cd8ea2492\
         2b23cce7a26023ab3f0eef693ac87f64258235eab1f7a32dc22762a0485b410c"
    );
    // And the first values are not torch's: torch.manual_seed(0); torch.randn(4) gives
    // [1.5410, -0.2934, -2.1788, 0.5684]; our seed-0 noise on a 2^-12 grid is on the grid
    // (those four are not) and differs from them.
    let mut noise = SecureGaussian::with_rng(
        1.0,
        2f64.powi(-12),
        SecureRng::insecure_from_seed([0u8; 32]),
    )
    .unwrap();
    let mut first = [0f32; 4];
    noise.fill(&mut first);
    for (ours, torch) in first.iter().zip([1.5410f32, -0.2934, -2.1788, 0.5684]) {
        assert!((ours - torch).abs() > 1e-3, "{ours} vs torch {torch}");
    }
}
