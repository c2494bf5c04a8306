//! The keyed, per-element noise layout (`noise/keyed.rs`): the exact discrete Gaussian by χ²
//! against its pmf, each element a pure function of (key, index), and each chunk the same draws
//! as the sequential sampler on that chunk's ChaCha20 stream. Fixed keys, so every outcome is
//! reproducible; thresholds are p = 0.001 critical values a wrong sampler would cross.

use std::num::NonZeroUsize;

use tutela_privacy::noise::{KEYED_CHUNK, KeyedGaussian, NoiseKey, SecureGaussian, SecureRng};

fn key(byte: u8) -> NoiseKey {
    let mut k = [0x5au8; 32];
    k[0] = byte;
    NoiseKey::insecure_from_bytes(k)
}

/// Upper critical value of χ²(df) at p = 0.001 (Wilson & Hilferty), as in `noise.rs`.
fn chi2_crit_001(df: usize) -> f64 {
    let d = df as f64;
    let h = 2.0 / (9.0 * d);
    d * (1.0 - h + 3.0902 * h.sqrt()).powi(3)
}

/// The pmf of N_ℤ(0, s2) on [-k, k], by direct summation.
fn dg_pmf(s2: f64, k: i64) -> Vec<f64> {
    let w: Vec<f64> = (-k..=k)
        .map(|x| (-(x as f64).powi(2) / (2.0 * s2)).exp())
        .collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|v| v / z).collect()
}

/// Pearson's χ² of `observed` against `expected`, cells merged in order until each expects ≥ 5.
fn assert_chi2_fits(what: &str, observed: &[f64], expected: &[f64]) {
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let (mut co, mut ce) = (0.0, 0.0);
    for (&ob, &ex) in observed.iter().zip(expected) {
        co += ob;
        ce += ex;
        if ce >= 5.0 {
            o.push(co);
            e.push(ce);
            (co, ce) = (0.0, 0.0);
        }
    }
    if let (Some(lo), Some(le)) = (o.last_mut(), e.last_mut()) {
        *lo += co;
        *le += ce;
    }
    assert!(o.len() >= 3, "{what}: too few bins");
    let stat: f64 = o.iter().zip(&e).map(|(o, e)| (o - e).powi(2) / e).sum();
    let crit = chi2_crit_001(o.len() - 1);
    assert!(
        stat < crit,
        "{what}: chi-square {stat:.1} >= {crit:.1} ({} bins)",
        o.len()
    );
}

#[test]
fn keyed_noise_matches_the_exact_pmf_by_chi_square() {
    // 200 000 draws = 782 chunks, so the test spans many streams as well as many draws per
    // stream; σ_g from the smallest scale accepted through non-integer ones.
    let n = 200_000;
    for (i, sigma) in [1.0, 1.5, 2.7, 6.0, 40.0].into_iter().enumerate() {
        let noise = KeyedGaussian::new(sigma, 1.0).unwrap();
        let mut buf = vec![0f32; n];
        noise.fill(&key(10 + i as u8), &mut buf);
        let k = (8.0 * sigma).ceil() as i64;
        let mut observed = vec![0.0; (2 * k + 1) as usize];
        for &x in &buf {
            assert_eq!(x.fract(), 0.0, "σ {sigma}: {x} is off the grid");
            observed[((x as i64).clamp(-k, k) + k) as usize] += 1.0;
        }
        let expected: Vec<f64> = dg_pmf(noise.grid_variance(), k)
            .iter()
            .map(|p| p * n as f64)
            .collect();
        assert_chi2_fits(&format!("keyed pmf, σ_g = {sigma}"), &observed, &expected);
    }
}

#[test]
fn keyed_noise_on_a_fine_grid_has_the_right_variance_and_uses_the_grid() {
    let (n, g, sigma) = (400_000, 2f64.powi(-12), 0.75);
    let noise = KeyedGaussian::new(sigma, g).unwrap();
    let mut buf = vec![0f32; n];
    noise.fill_parallel(&key(30), &mut buf, NonZeroUsize::new(3).unwrap());
    let mut odd = 0usize;
    let mut sum2 = 0.0;
    for &x in &buf {
        let steps = f64::from(x) / g;
        assert_eq!(steps.fract(), 0.0, "{x:e} is not on the 2^-12 grid");
        odd += usize::from(steps.rem_euclid(2.0) == 1.0);
        sum2 += f64::from(x).powi(2);
    }
    let var = sum2 / n as f64;
    let expected = noise.grid_variance() * g * g;
    let se = expected * (2.0 / n as f64).sqrt();
    assert!(
        (var - expected).abs() < 4.0 * se,
        "variance {var}, expected {expected} ± {se}"
    );
    assert!(
        (n * 49 / 100..n * 51 / 100).contains(&odd),
        "{odd} odd grid steps of {n}"
    );
}

#[test]
fn each_element_is_a_pure_function_of_key_and_index() {
    let noise = KeyedGaussian::new(3.0, 2f64.powi(-8)).unwrap();
    let n = 20 * KEYED_CHUNK + 77;
    let mut whole = vec![0f32; n];
    noise.fill(&key(40), &mut whole);
    // The same key again: the same release.
    let mut again = vec![0f32; n];
    noise.fill(&key(40), &mut again);
    assert_eq!(whole, again);
    // A shorter release is a prefix, at a chunk boundary and inside a chunk.
    for len in [1, KEYED_CHUNK, 3 * KEYED_CHUNK + 5, n - 1] {
        let mut part = vec![0f32; len];
        noise.fill(&key(40), &mut part);
        assert_eq!(part[..], whole[..len], "release of {len}");
    }
    // Any number of threads gives the same values.
    for threads in [1, 2, 3, 7, 64] {
        let mut par = vec![0f32; n];
        noise.fill_parallel(&key(40), &mut par, NonZeroUsize::new(threads).unwrap());
        assert_eq!(par, whole, "{threads} threads");
    }
    // Another key gives other noise (equal in at most a few per cent of places).
    let mut other = vec![0f32; n];
    noise.fill(&key(41), &mut other);
    let same = whole.iter().zip(&other).filter(|(a, b)| a == b).count();
    assert!(same < n / 10, "{same} of {n} equal under another key");
    // And the chunks differ from each other (distinct streams, not one stream repeated).
    assert_ne!(whole[..KEYED_CHUNK], whole[KEYED_CHUNK..2 * KEYED_CHUNK]);
}

#[test]
fn each_chunk_is_the_sequential_sampler_on_its_own_chacha20_stream() {
    // What makes the keyed form the same sampler as `SecureGaussian`: chunk c is exactly what
    // `SecureGaussian::fill` draws from the keystream (key, stream c, block 0). The GPU kernel
    // must match this layout; the kernel-check crate compares it with the C build.
    let (sigma, g) = (2.5, 2f64.powi(-4));
    let noise = KeyedGaussian::new(sigma, g).unwrap();
    let bytes = [0x33u8; 32];
    let mut keyed = vec![0f32; 5 * KEYED_CHUNK];
    noise.fill(&NoiseKey::insecure_from_bytes(bytes), &mut keyed);
    for c in 0..5u64 {
        let rng = SecureRng::insecure_chacha20_keystream(bytes, c, 0);
        let mut sequential = SecureGaussian::with_rng(sigma, g, rng).unwrap();
        let mut chunk = vec![0f32; KEYED_CHUNK];
        sequential.fill(&mut chunk);
        let start = c as usize * KEYED_CHUNK;
        assert_eq!(chunk[..], keyed[start..start + KEYED_CHUNK], "chunk {c}");
    }
}

#[test]
fn keyed_parameters_are_validated_like_the_sequential_samplers() {
    assert!(KeyedGaussian::new(0.0, 1.0).is_err());
    assert!(KeyedGaussian::new(1.0, 0.3).is_err());
    assert!(KeyedGaussian::new(0.5, 1.0).is_err());
    let os_a = NoiseKey::from_os().unwrap();
    let os_b = NoiseKey::from_os().unwrap();
    assert_ne!(os_a.words(), os_b.words());
}
