//! What a site does to its update before masking: clip, move onto the job's integer grid by
//! conditional randomized rounding, add its share of the distributed discrete Gaussian noise.
//!
//! # The grid
//!
//! The job fixes `scale_bits = k` (`[secure_aggregation]` in the job spec, inside its digest):
//! a value `x` is represented by the integer nearest-ish `x · 2^k`, as in the coordinator's
//! fixed-point accumulator (a power-of-two scale, `i64` wrapping sums). The update norm bound `C`
//! times `2^k` must be at most `2^50`, the coordinator's per-contribution limit, so that with the
//! noise (at most `2^31` grid steps by the sampler's tail cut) the sum of up to 2048 sites ([`MAX_SITES`](super::MAX_SITES), which
//! `RoundConfig::validate` enforces) stays
//! below `2^62` and the `Z_2^64` sum read as `i64` never wraps.
//!
//! # Randomized rounding, conditional (Kairouz, Liu & Steinke, ICML 2021, Algorithm 1)
//!
//! Each coordinate `y = x · 2^k` becomes `⌊y⌋ + Bernoulli(y − ⌊y⌋)` (unbiased; the coin compares
//! a 53-bit uniform with the fraction, exact to `2^-53`), and the whole vector is drawn again
//! until its L2 norm is within [`rounded_norm_bound`]:
//! `min(c² + d/4 + √(2 ln(1/β))·(c + √d/2), (c + √d)²)` in grid units, `c = C·2^k`. Plain
//! randomized rounding can stretch the norm by up to `√d` grid steps; conditioning bounds the
//! sensitivity the accountant must use by this number instead, at a cost of `1/(1 − β)`
//! expected draws (β = e^(−1/2) by default: at most about 2.5 draws).
//!
//! # Distributed noise
//!
//! Each site adds independent exact discrete Gaussian noise `N_ℤ(0, σ_site²)` per coordinate
//! (grid units), drawn by the project's sampler (`tutela_privacy::noise::SecureGaussian`,
//! CKS20, ChaCha20 keyed by the OS). The sum over `m` surviving sites carries the sum of `m`
//! discrete Gaussians, which the distributed accountant bounds (`σ_site` and the survivors check
//! come from it; this module takes `σ_site` as given).

use std::num::NonZeroUsize;

use tutela_privacy::noise::{NoiseError, SecureGaussian, SecureRng};

/// The coordinator's per-contribution limit, `2^50` grid steps for a whole update's norm bound.
pub const CONTRIBUTION_LIMIT: f64 = 1_125_899_906_842_624.0;

/// Default β of conditional randomized rounding, `e^(−1/2)` (Kairouz et al.'s choice).
pub const DEFAULT_ROUNDING_BETA: f64 = 0.606_530_659_712_633_4;

/// Draws of the rounding after which the encoder gives up (each succeeds with probability at
/// least `1 − β`; 200 failures in a row have probability below `0.61^200 < 10^-42`).
const MAX_ROUNDING_DRAWS: u32 = 200;

/// How a site encodes its update for a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EncodeParams {
    /// L2 bound `C` the update is clipped to (the job's `update_norm_bound`).
    pub clip_norm: f64,
    /// The grid: a value is `round(x · 2^scale_bits)`.
    pub scale_bits: u32,
    /// β of conditional randomized rounding, in (0, 1); 0: plain unbiased randomized rounding,
    /// never redrawn (record-level distributed DP, whose unit is a row inside the update: the
    /// conditional bound is on the update's norm, not on what one row changes).
    pub rounding_beta: f64,
    /// σ_site in grid steps, or `None` for no noise (secure aggregation without distributed DP).
    pub noise_sigma_grid: Option<f64>,
}

/// A site's encoding refused; never carries a value of the update.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EncodeError {
    #[error("secure aggregation encoding: {0}")]
    Params(String),
    #[error("the update's element {index} is not a finite number")]
    NonFinite { index: usize },
    #[error("distributed noise: {0}")]
    Noise(#[from] NoiseError),
    #[error(
        "conditional randomized rounding found no draw within the norm bound in \
         {MAX_ROUNDING_DRAWS} tries (β too close to 1?)"
    )]
    RoundingFailed,
}

impl EncodeParams {
    pub fn validate(&self) -> Result<(), EncodeError> {
        let scale = self.scale();
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(EncodeError::Params(format!(
                "clip norm must be a finite number > 0, got {}",
                self.clip_norm
            )));
        }
        if self.scale_bits > 62 || self.clip_norm * scale > CONTRIBUTION_LIMIT {
            return Err(EncodeError::Params(format!(
                "clip norm {} × 2^{} exceeds 2^50 grid steps: lower scale_bits",
                self.clip_norm, self.scale_bits
            )));
        }
        if !(self.rounding_beta >= 0.0 && self.rounding_beta < 1.0) {
            return Err(EncodeError::Params(format!(
                "rounding beta must be in [0, 1), got {}",
                self.rounding_beta
            )));
        }
        Ok(())
    }

    /// `2^scale_bits`.
    pub fn scale(&self) -> f64 {
        2f64.powi(self.scale_bits.min(1023) as i32)
    }
}

/// The L2 norm (grid steps) a conditionally rounded update of dimension `d` stays within: its
/// sensitivity for the accountant.
pub fn rounded_norm_bound(params: &EncodeParams, d: usize) -> f64 {
    let c = params.clip_norm * params.scale();
    let d = d as f64;
    if params.rounding_beta == 0.0 {
        // Plain randomized rounding: each coordinate moves by less than one grid step.
        return c + d.sqrt();
    }
    let slack = (2.0 * (1.0 / params.rounding_beta).ln()).sqrt();
    let conditioned = c * c + d / 4.0 + slack * (c + d.sqrt() / 2.0);
    let worst = (c + d.sqrt()).powi(2);
    conditioned.min(worst).sqrt()
}

/// What [`encode`] produced.
#[derive(Debug)]
pub struct Encoded {
    /// The integer vector to mask.
    pub values: Vec<i64>,
    /// Whether clipping scaled the update down.
    pub clipped: bool,
    /// Draws of the randomized rounding until one met the bound.
    pub rounding_draws: u32,
}

/// Clips `update` to `clip_norm`, rounds it onto the grid (conditional randomized rounding) and
/// adds the site's noise. `threads` splits the noise sampling (each thread its own ChaCha20
/// stream).
pub fn encode(
    update: &[f32],
    params: &EncodeParams,
    threads: usize,
) -> Result<Encoded, EncodeError> {
    params.validate()?;
    let mut noise = params
        .noise_sigma_grid
        .map(|sigma| SecureGaussian::new(sigma, 1.0))
        .transpose()?;
    let mut rng = SecureRng::from_os()?;
    encode_with(update, params, &mut rng, noise.as_mut(), threads)
}

/// As [`encode`] with the caller's generators (tests pass seeded ones).
pub fn encode_with(
    update: &[f32],
    params: &EncodeParams,
    rng: &mut SecureRng,
    noise: Option<&mut SecureGaussian>,
    threads: usize,
) -> Result<Encoded, EncodeError> {
    params.validate()?;
    if let Some(index) = update.iter().position(|x| !x.is_finite()) {
        return Err(EncodeError::NonFinite { index });
    }
    let norm = update
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let clipped = norm > params.clip_norm;
    // Multiplying by a power of two is exact; the clip factor rounds once per element.
    let factor = if clipped {
        params.clip_norm / norm * params.scale()
    } else {
        params.scale()
    };
    let bound = rounded_norm_bound(params, update.len());
    let mut values = vec![0i64; update.len()];
    let mut draws = 0;
    loop {
        draws += 1;
        if draws > MAX_ROUNDING_DRAWS {
            return Err(EncodeError::RoundingFailed);
        }
        let mut sq = 0.0f64;
        for (out, &x) in values.iter_mut().zip(update) {
            let y = f64::from(x) * factor;
            let floor = y.floor();
            let frac = y - floor;
            let coin = (rng.next_u64() >> 11) as f64;
            let v = floor as i64 + i64::from(coin < frac * 9_007_199_254_740_992.0);
            sq += (v as f64) * (v as f64);
            *out = v;
        }
        if sq.sqrt() <= bound {
            break;
        }
    }
    if let Some(noise) = noise {
        add_noise(&mut values, noise, threads);
    }
    Ok(Encoded {
        values,
        clipped,
        rounding_draws: draws,
    })
}

/// Adds `N_ℤ(0, σ²)` (the sampler's granularity is 1: grid steps) to every element. The sampler
/// writes integers as `f32`, exact below `2^24` (the tail cut keeps draws below `2^31`, and one
/// above `2^24` — probability below `2^-46000` — is still an integer).
fn add_noise(values: &mut [i64], noise: &mut SecureGaussian, threads: usize) {
    const BLOCK: usize = 1 << 20;
    let threads = NonZeroUsize::new(threads).unwrap_or(NonZeroUsize::MIN);
    let mut buf = vec![0f32; BLOCK.min(values.len())];
    for chunk in values.chunks_mut(BLOCK) {
        let draws = &mut buf[..chunk.len()];
        noise.fill_parallel(draws, threads);
        for (v, &n) in chunk.iter_mut().zip(draws.iter()) {
            *v = v.wrapping_add(n as i64);
        }
    }
}

/// The real-valued sum from the unmasked integer sum: `sum · 2^-scale_bits`.
pub fn decode_sum(sum: &[i64], scale_bits: u32) -> Vec<f64> {
    let inv = 2f64.powi(-(scale_bits.min(1022) as i32));
    sum.iter().map(|&s| s as f64 * inv).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(noise: Option<f64>) -> EncodeParams {
        EncodeParams {
            clip_norm: 1.0,
            scale_bits: 10,
            rounding_beta: DEFAULT_ROUNDING_BETA,
            noise_sigma_grid: noise,
        }
    }

    #[test]
    fn rounding_is_unbiased_and_within_one_step() {
        let p = params(None);
        let mut rng = SecureRng::insecure_from_seed([1; 32]);
        // 0.3 / 1024 · 1024 = 0.3 grid steps: rounds to 0 or 1, mean 0.3.
        let update = vec![0.3f32 / 1024.0; 20_000];
        let e = encode_with(&update, &p, &mut rng, None, 1).unwrap();
        assert!(e.values.iter().all(|&v| v == 0 || v == 1));
        let mean = e.values.iter().sum::<i64>() as f64 / 20_000.0;
        assert!((mean - 0.3).abs() < 0.015, "{mean}");
        assert!(!e.clipped);
    }

    #[test]
    fn clipping_and_the_norm_bound_hold() {
        let p = params(None);
        let mut rng = SecureRng::insecure_from_seed([2; 32]);
        let update: Vec<f32> = (0..1000).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
        let e = encode_with(&update, &p, &mut rng, None, 1).unwrap();
        assert!(e.clipped);
        let norm = e
            .values
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(norm <= rounded_norm_bound(&p, 1000));
        assert!((norm / 1024.0 - 1.0).abs() < 0.05, "{norm}");
    }

    #[test]
    fn noise_has_the_requested_spread() {
        let p = params(Some(8.0));
        let mut rng = SecureRng::insecure_from_seed([3; 32]);
        let mut g =
            SecureGaussian::with_rng(8.0, 1.0, SecureRng::insecure_from_seed([4; 32])).unwrap();
        let update = vec![0f32; 50_000];
        let e = encode_with(&update, &p, &mut rng, Some(&mut g), 2).unwrap();
        let var = e.values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 50_000.0;
        assert!((var.sqrt() - 8.0).abs() < 0.15, "{}", var.sqrt());
    }

    #[test]
    fn bad_input_and_parameters_are_refused_without_values() {
        let p = params(None);
        let mut rng = SecureRng::insecure_from_seed([5; 32]);
        let err = encode_with(&[1.0, f32::NAN], &p, &mut rng, None, 1).unwrap_err();
        assert_eq!(err, EncodeError::NonFinite { index: 1 });
        let mut big = p;
        big.scale_bits = 51;
        assert!(matches!(big.validate(), Err(EncodeError::Params(m)) if m.contains("2^50")));
        assert!(matches!(
            encode(&[0.0], &params(Some(1e9)), 1),
            Err(EncodeError::Noise(NoiseError::ScaleOutOfRange { .. }))
        ));
        assert_eq!(decode_sum(&[2048, -1024], 10), vec![2.0, -1.0]);
    }
}
