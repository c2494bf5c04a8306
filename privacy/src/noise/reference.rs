//! The reference discrete Gaussian sampler: CKS20 Algorithms 1–3 exactly as first implemented,
//! every coin an exact [`SecureRng::bernoulli_ratio`] on a fresh uniform integer (128-bit
//! arithmetic, one to four 64-bit words per coin). It is slower than `discrete.rs` but has the
//! fewest moving parts, so the tests check the fast sampler against it (the two must agree in
//! distribution) and `examples/bench_noise.rs` times both. Releases never use it.
//!
//! CKS20 is Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential Privacy",
//! NeurIPS 2020 (arXiv:2004.00010), §5.

use super::rng::SecureRng;

/// Bernoulli(exp(−γ)) for `γ = num / den ∈ [0, 1]` (CKS20 Algorithm 1, first case):
/// `K ← 1; while Bernoulli(γ / K) { K ← K + 1 }; return K odd`.
/// P(K odd) = Σ_k (−1)^(k+1)… = e^(−γ) (CKS20 Prop. 5 proof).
#[inline]
fn bernoulli_exp_minus_unit(rng: &mut SecureRng, num: u128, den: u128) -> bool {
    debug_assert!(num <= den && den > 0);
    let mut k: u128 = 1;
    loop {
        // A ~ Bernoulli(num / (den · k)); when den · k overflows u128 (K ≥ 2^28 — probability
        // ≤ 1 / (2^28)!), use Bernoulli(p · q) = Bernoulli(p) ∧ Bernoulli(q), still exact.
        let a = match den.checked_mul(k) {
            Some(dk) => rng.bernoulli_ratio(num, dk),
            None => rng.bernoulli_ratio(num, den) && rng.bernoulli_ratio(1, k),
        };
        if !a {
            break;
        }
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(−1)).
#[inline]
fn bernoulli_exp_minus_one(rng: &mut SecureRng) -> bool {
    bernoulli_exp_minus_unit(rng, 1, 1)
}

/// Bernoulli(exp(−γ)) for any rational `γ = num / den ≥ 0` (CKS20 Algorithm 1, second case):
/// `exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋))`, each factor an independent coin. The loop stops at
/// the first failed coin, so its expected length is below 1 / (1 − e^−1) ≈ 1.58 whatever ⌊γ⌋ is.
fn bernoulli_exp_minus(rng: &mut SecureRng, num: u128, den: u128) -> bool {
    let whole = num / den;
    let rem = num % den;
    let mut i: u128 = 0;
    while i < whole {
        if !bernoulli_exp_minus_one(rng) {
            return false;
        }
        i += 1;
    }
    bernoulli_exp_minus_unit(rng, rem, den)
}

/// The discrete Laplace distribution with scale `t`: P(x) ∝ exp(−|x| / t), x ∈ ℤ
/// (CKS20 Algorithm 2). Returns (negative, |x|).
fn discrete_laplace(rng: &mut SecureRng, t: u128) -> (bool, u128) {
    loop {
        let u = rng.below(t);
        if !bernoulli_exp_minus_unit(rng, u, t) {
            continue;
        }
        // V ~ Geometric(1 − e^−1) on {0, 1, …}.
        let mut v: u128 = 0;
        while bernoulli_exp_minus_one(rng) {
            v += 1;
        }
        // u + t·v cannot overflow in practice (v ≥ 2^100 has probability e^(−2^100)); if it
        // did, saturate: the candidate is then rejected by the caller's range check.
        let x = t.saturating_mul(v).saturating_add(u);
        let negative = rng.next_u64() & 1 == 1;
        if negative && x == 0 {
            continue;
        }
        return (negative, x);
    }
}

/// The exact discrete Gaussian N_ℤ(0, σ²) with rational `σ² = a / b`:
/// P(x) = exp(−x² / 2σ²) / Σ_{y∈ℤ} exp(−y² / 2σ²), x ∈ ℤ (CKS20 Definition 1).
#[derive(Clone, Debug)]
pub(crate) struct ReferenceDiscreteGaussian {
    /// The numerator of σ² = a / b (b enters only through `bt` and `den`).
    a: u128,
    /// The discrete Laplace scale, t = ⌊σ⌋ + 1 (CKS20 Algorithm 3).
    t: u128,
    /// b · t.
    bt: u128,
    /// 2 · a · b · t², the denominator of the acceptance exponent.
    den: u128,
}

impl ReferenceDiscreteGaussian {
    /// From σ² = a / b and t ≥ 1. The caller guarantees `2·a·b·t² < 2^128`.
    pub(crate) fn new(a: u128, b: u128, t: u128) -> Option<Self> {
        if a == 0 || b == 0 || t == 0 {
            return None;
        }
        let bt = b.checked_mul(t)?;
        let den = a.checked_mul(2)?.checked_mul(bt)?.checked_mul(t)?;
        Some(Self { a, t, bt, den })
    }

    /// One draw, in grid units (CKS20 Algorithm 3):
    /// `Y ← DLap(t); accept with probability exp(−(|Y| − σ²/t)² / 2σ²)`.
    /// With σ² = a/b the exponent is `(|Y|·b·t − a)² / (2·a·b·t²)`, an exact ratio of integers.
    ///
    /// Truncation: a candidate with `(|Y|·b·t − a)² ≥ 2^128` is rejected instead of evaluated.
    /// With the parameters [`super::SecureGaussian`] builds (`a < 2^48 + 1`,
    /// `b·t ≤ 2^49 / σ`) that needs `|Y| > 2^15·σ`, so the output is the discrete Gaussian
    /// conditioned on `|x| ≤ 2^15·σ`: total-variation distance below `exp(−2^29)`, which is the
    /// most it can add to δ.
    #[inline]
    pub(crate) fn sample(&self, rng: &mut SecureRng) -> i64 {
        loop {
            let (negative, y) = discrete_laplace(rng, self.t);
            let Some(ybt) = y.checked_mul(self.bt) else {
                continue;
            };
            let diff = ybt.abs_diff(self.a);
            let Some(num) = diff.checked_mul(diff) else {
                continue;
            };
            if !bernoulli_exp_minus(rng, num, self.den) {
                continue;
            }
            let Ok(y) = i64::try_from(y) else {
                continue;
            };
            return if negative { -y } else { y };
        }
    }
}
