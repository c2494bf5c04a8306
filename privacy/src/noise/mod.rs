//! Secure Gaussian noise for DP-SGD: the exact discrete Gaussian on a grid of granularity `2^-k`,
//! drawn from ChaCha20 keyed by the operating system.
//!
//! # What is sampled
//!
//! [`SecureGaussian::new(sigma, granularity)`](SecureGaussian::new) fixes a grid `g·ℤ` with
//! `g = granularity`, a power of two, and draws `g · X` with `X ~ N_ℤ(0, σ_g²)`, the discrete
//! Gaussian of Canonne, Kamath & Steinke (NeurIPS 2020, "CKS20"),
//! `P(X = x) = exp(−x²/2σ_g²) / Σ_y exp(−y²/2σ_g²)`, on the scale `σ_g = sigma / g` in grid units.
//!
//! * `σ_g²` is the exact binary value of `(sigma / g)²` rounded **up** to a rational `a / b`
//!   with `a < 2^48 + 1` and `b` a power of two: the relative error in σ is below `2^-47`, and it
//!   only adds noise ([`SecureGaussian::effective_sigma`] reports the value used).
//! * The sampler (`noise/discrete.rs`) is CKS20 Algorithms 1–3 in integer arithmetic driven by
//!   fair bits and exact uniform integers: its output distribution is exactly the discrete
//!   Gaussian (conditioned on `|X| ≤ 2^15·σ_g`, a total-variation change below `exp(−2^29)`).
//! * `g · X` is converted to `f32` exactly while `|X| < 2^24` (always, unless `|X| > 256·σ_g`,
//!   probability below `2^-46000`); even then the `f32` is a multiple of `g`. So every output is
//!   a multiple of `g`: its low-order bits are zero and carry no information, which defeats the
//!   least-significant-bit attacks on floating-point samplers (Mironov, CCS 2012; Jin et al.,
//!   IEEE S&P 2022).
//!
//! # Accounting consequence
//!
//! For a query `q(D) ∈ (gℤ)^d` whose L2 sensitivity is `Δ`, adding independent discrete Gaussian
//! noise of scale `σ_g` per coordinate (in grid units, i.e. `sigma` in real units) satisfies
//! `ρ = Δ² / (2·sigma²)`-zCDP. For `d = 1` this is CKS20 Theorem 4 (the Rényi divergence of
//! order α between `N_ℤ(μ, σ²)` and `N_ℤ(ν, σ²)`, μ, ν integers, is at most `α(μ − ν)²/(2σ²)`);
//! for `d > 1` Rényi divergence adds over independent coordinates, giving `α·Σ(μ_i − ν_i)²/(2σ²)
//! ≤ α·Δ²/(2σ²)`. That is Rényi DP `ε(α) = α·Δ²/(2·sigma²)`: **at most the RDP of the continuous
//! Gaussian with the same `sigma`**. Two caveats the DP-SGD step and the accountant must respect:
//!
//! 1. The query must lie on the grid. A clipped gradient sum in `f32` does not; rounding each
//!    coordinate to `gℤ` moves two neighbouring sums apart by at most `g·√d` more, so account
//!    with `Δ + g·√d` (or use randomized rounding, Kairouz, Liu & Steinke, ICML 2021, "The
//!    distributed discrete Gaussian mechanism"). With `g = sigma·2^-16` and `d = 10^7`
//!    this is `Δ + 0.05·sigma`: pick `g` small.
//! 2. The result above is for the unsampled mechanism. Our accountant bounds the *Poisson
//!    subsampled* Gaussian; the tight sampled-Gaussian RDP (Mironov, Talwar & Zhang 2019) is a
//!    computation for the continuous Gaussian. A bound that needs only the base mechanism's RDP
//!    curve is Zhu & Wang, ICML 2019 ("Poisson subsampled Rényi DP"), Theorem 6.
//!
//! # Speed
//!
//! Each coin of the sampler is an exact Bernoulli of a ratio of integers decided by comparing
//! fair bits with the ratio's binary expansion (two bits on average, 64-bit arithmetic wherever
//! the ranges allow; see `noise/discrete.rs`), so one ChaCha20 word serves many coins.
//! `cargo run --release -p tutela-privacy --example bench_noise` times it against the first
//! implementation (`noise/reference.rs`, kept as the tests' reference). `fill` runs on the
//! calling thread; [`SecureGaussian::fill_parallel`] splits the slice over threads, each with
//! its own ChaCha20 stream (same key, distinct stream id), and gives exactly the same guarantee.
//!
//! # Keyed releases and the GPU
//!
//! [`KeyedGaussian`] (`noise/keyed.rs`) draws the same sampler's values laid out per element:
//! element `i` of a release comes from chunk `i / KEYED_CHUNK`'s own ChaCha20 stream under the
//! release's [`NoiseKey`], so it is a pure function of `(key, i)` and any processor can draw
//! any part of a release. `noise/discrete_gaussian.cu` is the same ChaCha20 and the same
//! integer sampler in CUDA C ([`DEVICE_KERNEL_SOURCE`]): the site node draws DP noise for CUDA
//! tensors with it, and the `tutela-noise-kernel-check` crate compiles it as C and checks it
//! against [`KeyedGaussian::fill`] bit for bit.

mod discrete;
mod keyed;
mod reference;
pub mod rng;

use std::num::NonZeroUsize;

pub use keyed::{
    DEVICE_KERNEL_NAME, DEVICE_KERNEL_SOURCE, DeviceSampler, KEYED_CHUNK, KeyedGaussian, NoiseKey,
    split_u128,
};
pub use rng::SecureRng;

use discrete::DiscreteGaussian;

/// What is wrong with a noise request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NoiseError {
    #[error("sigma must be a finite number > 0, got {0}")]
    InvalidSigma(f64),
    #[error(
        "granularity must be a power of two 2^k with -100 <= k <= 100 (e.g. 2^-20 = \
         9.5367431640625e-7), got {0}"
    )]
    InvalidGranularity(f64),
    #[error(
        "sigma / granularity must lie in [1, 2^16] (the noise scale in grid steps), got \
         {sigma} / {granularity} = {ratio}: choose granularity between sigma * 2^-16 and sigma"
    )]
    ScaleOutOfRange {
        sigma: f64,
        granularity: f64,
        ratio: f64,
    },
    #[error("the operating system's random number generator is unavailable")]
    OsRandomUnavailable,
}

/// Largest supported noise scale in grid steps, `sigma / granularity ≤ 2^16`.
pub const MAX_GRID_SCALE: f64 = 65536.0;

/// Exact discrete Gaussian noise on the grid `granularity · ℤ`, from ChaCha20 keyed by the OS.
/// See the [module documentation](self) for the guarantee and its accounting consequence.
#[derive(Debug)]
pub struct SecureGaussian {
    sigma: f64,
    granularity: f64,
    dg: DiscreteGaussian,
    rng: SecureRng,
    /// Next ChaCha20 stream id handed to a worker of `fill_parallel` (the main stream is 0).
    next_stream: u64,
}

impl SecureGaussian {
    /// Noise of standard deviation `sigma` (real units) on the grid `granularity · ℤ`, with a
    /// generator keyed from the operating system. `granularity` must be a power of two and
    /// `1 ≤ sigma / granularity ≤ 2^16`.
    pub fn new(sigma: f64, granularity: f64) -> Result<Self, NoiseError> {
        // Validate before touching the OS generator so that the error names the real problem.
        let dg = Self::params(sigma, granularity)?;
        Ok(Self {
            sigma,
            granularity,
            dg,
            rng: SecureRng::from_os()?,
            next_stream: 1,
        })
    }

    /// As [`SecureGaussian::new`] with a caller-supplied generator. Tests pass
    /// [`SecureRng::insecure_from_seed`] for reproducibility; releases use [`SecureGaussian::new`].
    pub fn with_rng(sigma: f64, granularity: f64, rng: SecureRng) -> Result<Self, NoiseError> {
        Ok(Self {
            sigma,
            granularity,
            dg: Self::params(sigma, granularity)?,
            rng,
            next_stream: 1,
        })
    }

    fn params(sigma: f64, granularity: f64) -> Result<DiscreteGaussian, NoiseError> {
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(NoiseError::InvalidSigma(sigma));
        }
        if !is_power_of_two_in_range(granularity) {
            return Err(NoiseError::InvalidGranularity(granularity));
        }
        // Exact: dividing by a power of two only changes the exponent (no under/overflow for
        // the ranges accepted here, checked by the range test that follows).
        let ratio = sigma / granularity;
        if !(1.0..=MAX_GRID_SCALE).contains(&ratio) {
            return Err(NoiseError::ScaleOutOfRange {
                sigma,
                granularity,
                ratio,
            });
        }
        let (a, b) = variance_rounded_up(ratio);
        // t = ⌊σ_g⌋ + 1 (CKS20 Algorithm 3); any t ≥ 1 is correct, this one is efficient.
        let t = ratio.floor() as u128 + 1;
        // a ≤ 2^48, b ≤ 2^47, t ≤ 2^16 + 1: 2·a·b·t² < 2^130 is not excluded a priori for the
        // extreme corner, so the constructor checks; with σ_g ≥ 1, b·t² ≤ 4·2^47 and it fits.
        DiscreteGaussian::new(a, b, t).ok_or(NoiseError::ScaleOutOfRange {
            sigma,
            granularity,
            ratio,
        })
    }

    /// The requested standard deviation, in real units.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// The grid step: every output is an integer multiple of it.
    pub fn granularity(&self) -> f64 {
        self.granularity
    }

    /// The scale parameter actually used, `√(a/b) · granularity ≥ sigma` (rounded up by a
    /// relative `< 2^-47`). Account with `sigma`: more noise only helps.
    pub fn effective_sigma(&self) -> f64 {
        self.dg.variance_f64().sqrt() * self.granularity
    }

    /// The exact variance parameter σ_g² = a / b of the discrete Gaussian, in grid units.
    pub fn grid_variance(&self) -> f64 {
        self.dg.variance_f64()
    }

    /// One draw in grid units: the noise is `granularity ×` this integer.
    pub fn sample_grid(&mut self) -> i64 {
        self.dg.sample(&mut self.rng)
    }

    /// One draw in grid units from the same distribution by the reference implementation
    /// (`noise/reference.rs`: the first, slower sampler, one uniform integer per coin).
    /// **Tests and benchmarks only**: the tests check that both samplers agree in distribution.
    #[doc(hidden)]
    pub fn sample_grid_reference(&mut self) -> i64 {
        self.dg.reference().sample(&mut self.rng)
    }

    /// As [`SecureGaussian::fill`], by the reference implementation. **Benchmarks only**.
    #[doc(hidden)]
    pub fn fill_reference(&mut self, out: &mut [f32]) {
        let reference = self.dg.reference();
        for v in out.iter_mut() {
            *v = (reference.sample(&mut self.rng) as f64 * self.granularity) as f32;
        }
    }

    /// Fills `out` with independent noise values (overwrites; add them to the gradient).
    pub fn fill(&mut self, out: &mut [f32]) {
        fill_with(&self.dg, self.granularity, &mut self.rng, out);
    }

    /// As [`SecureGaussian::fill`], for `f64` buffers (exact for `|X| < 2^53`).
    pub fn fill_f64(&mut self, out: &mut [f64]) {
        for v in out.iter_mut() {
            *v = self.dg.sample(&mut self.rng) as f64 * self.granularity;
        }
    }

    /// As [`SecureGaussian::fill`], split over `threads` scoped threads. Each chunk is drawn from
    /// its own ChaCha20 stream (this generator's key, a stream id never used before by this
    /// value), so the chunks are independent and the guarantee is the same as `fill`'s.
    pub fn fill_parallel(&mut self, out: &mut [f32], threads: NonZeroUsize) {
        let threads = threads.get();
        if threads == 1 || out.len() < 4096 {
            self.fill(out);
            return;
        }
        let chunk = out.len().div_ceil(threads);
        let mut rngs = Vec::with_capacity(threads);
        for _ in 0..threads {
            rngs.push(self.rng.fork_stream(self.next_stream));
            self.next_stream += 1;
        }
        let dg = &self.dg;
        let g = self.granularity;
        std::thread::scope(|s| {
            for (part, mut rng) in out.chunks_mut(chunk).zip(rngs) {
                s.spawn(move || fill_with(dg, g, &mut rng, part));
            }
        });
    }
}

fn fill_with(dg: &DiscreteGaussian, granularity: f64, rng: &mut SecureRng, out: &mut [f32]) {
    for v in out.iter_mut() {
        // i64 → f64 is exact (|x| < 2^48), × 2^k is exact, f64 → f32 is exact for |x| < 2^24
        // and otherwise rounds to a coarser multiple of the grid step.
        *v = (dg.sample(rng) as f64 * granularity) as f32;
    }
}

/// Whether `x` is exactly 2^k with −100 ≤ k ≤ 100.
fn is_power_of_two_in_range(x: f64) -> bool {
    if !(x.is_finite() && x > 0.0) {
        return false;
    }
    let bits = x.to_bits();
    let mantissa = bits & ((1u64 << 52) - 1);
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    mantissa == 0 && (bits >> 52) & 0x7ff != 0 && (-100..=100).contains(&exponent)
}

/// The exact value of `s²` for a normal `s ∈ [1, 2^16]`, rounded up to `a / b` with
/// `2^47 ≤ a ≤ 2^48` and `b = 2^j` a power of two.
fn variance_rounded_up(s: f64) -> (u128, u128) {
    // s = m · 2^e with m a 53-bit integer.
    let bits = s.to_bits();
    let m = u128::from((bits & ((1u64 << 52) - 1)) | (1u64 << 52));
    let e = ((bits >> 52) & 0x7ff) as i64 - 1075;
    // s² = m² · 2^(2e), m² ∈ [2^104, 2^106): keep the top 48 bits, rounding up.
    let m2 = m * m;
    let len = 128 - i64::from(m2.leading_zeros()); // 105 or 106
    let drop = (len - 48) as u32;
    let mut a = m2 >> drop;
    if a << drop != m2 {
        a += 1;
    }
    // s² ≤ a · 2^(2e + drop) = a / b with b = 2^-(2e + drop); s ≥ 1 makes 2e + drop ≤ 0.
    let j = -(2 * e + i64::from(drop));
    debug_assert!((0..=47).contains(&j));
    (a, 1u128 << j.clamp(0, 127))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variance_of_exact_powers_is_exact() {
        let (a, b) = variance_rounded_up(4.0);
        assert_eq!(a, 16 * b);
        let (a, b) = variance_rounded_up(1.0);
        assert_eq!(a, b);
        let (a, b) = variance_rounded_up(65536.0);
        assert_eq!(a, (1u128 << 32) * b);
    }

    #[test]
    fn variance_is_rounded_up() {
        for s in [1.1, 1.7, 3.3, 1234.567, 65535.9] {
            let (a, b) = variance_rounded_up(s);
            assert!(a as f64 / b as f64 >= s * s * (1.0 - 1e-15));
            assert!((a as f64 / b as f64 / (s * s) - 1.0).abs() < 1e-13);
        }
    }

    #[test]
    fn granularity_must_be_a_power_of_two() {
        assert!(is_power_of_two_in_range(1.0 / 1024.0));
        assert!(is_power_of_two_in_range(2.0));
        assert!(!is_power_of_two_in_range(0.3));
        assert!(!is_power_of_two_in_range(0.0));
        assert!(!is_power_of_two_in_range(-0.5));
        assert!(!is_power_of_two_in_range(f64::NAN));
        assert!(!is_power_of_two_in_range(2f64.powi(-101)));
    }
}
