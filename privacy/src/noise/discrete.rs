//! Exact samplers in integer arithmetic, after Canonne, Kamath & Steinke, "The Discrete Gaussian
//! for Differential Privacy", NeurIPS 2020 (arXiv:2004.00010), §5 — cited below as CKS20.
//!
//! No floating-point number is touched between the uniform bits from ChaCha20 and the integer
//! output: every probability is a ratio of integers and every coin is an exact Bernoulli of that
//! ratio ([`bernoulli_ratio`]). The output distribution is therefore exactly the discrete
//! Gaussian with the rational variance parameter `a / b` (up to the truncation described on
//! [`DiscreteGaussian::sample`]), so no low-order bit of a float can leak anything (Mironov,
//! "On significance of the least significant bits for differential privacy", CCS 2012; Jin et
//! al., "Are we there yet? Timing and floating-point attacks on differential privacy systems",
//! IEEE S&P 2022).
//!
//! # Why this is faster than the first implementation (`reference.rs`), and still exact
//!
//! The algorithm is the same (CKS20 Algorithms 1–3, same parameters, same accept/reject
//! decisions in distribution); what changed is how each coin is flipped:
//!
//! * **Bernoulli(num / den) by lazy comparison.** The reference drew a uniform integer below
//!   `den` for every coin (a 64-bit word, two for `den > 2^64`, with rejection). Here a uniform
//!   real `U ∈ [0, 1)` is revealed one fair bit at a time and compared with the binary expansion
//!   of `p = num / den`, computed by long division as it goes; the first bit where they differ
//!   decides `U < p`. That event has probability exactly `p`
//!   (`Σ_i 2^-i · p_i = p`, the i-th step deciding with probability 2^-i), and the expected
//!   number of bits is 2 whatever `p` is. One 64-bit ChaCha20 word thus serves about 32 coins.
//! * **64-bit arithmetic where the ranges allow it.** The long division keeps a remainder
//!   `r < den` and doubles it, so it needs `2·den ≤ 2^w` in a `w`-bit integer: `u64` for
//!   `den ≤ 2^63` (every coin of the discrete Laplace step: `den = t·k` with `t ≤ 2^17` in our
//!   parameters, see [`DiscreteGaussian::new`]), `u128` for the Gaussian acceptance coin, whose
//!   denominator `2·a·b·t²` is below `2^100` (bound proved on [`DiscreteGaussian::new`]).
//! * **No 128-bit division.** `exp(−γ)` for `γ = num / den > 1` splits off whole units by
//!   subtracting `den` (each unit an `exp(−1)` coin that stops the loop on failure, so about 1.6
//!   subtractions on average) instead of computing `num / den` and `num % den`, which in `u128`
//!   is a slow library call.
//! * **Uniform draws below `t` from 32-bit words** (Lemire's method; `t ≤ 2^32`), half a ChaCha20
//!   word each instead of a whole one.
//!
//! Timing: the number of loop iterations is random and independent of the data (the sampler
//! never sees the data), so it reveals nothing about it; it does correlate with the magnitude of
//! the noise drawn, which is why callers draw noise for a whole tensor and release only the sum.

use super::reference::ReferenceDiscreteGaussian;
use super::rng::RandomBits;

/// Exact Bernoulli(num / den) for any `num ≥ 0` and `1 ≤ den ≤ 2^127` (true when
/// `num ≥ den`), by lazy comparison of a uniform `U` with `num / den` (see the module
/// documentation). 64-bit arithmetic when `den ≤ 2^63`, 128-bit otherwise.
#[inline]
pub(crate) fn bernoulli_ratio<R: RandomBits>(rng: &mut R, num: u128, den: u128) -> bool {
    debug_assert!((1..=1 << 127).contains(&den));
    if num >= den {
        return true;
    }
    if num == 0 {
        return false;
    }
    // Both casts are exact: 0 < num < den ≤ 2^63.
    if den <= 1 << 63 {
        lazy_compare_u64(rng, num as u64, den as u64)
    } else {
        lazy_compare_u128(rng, num, den)
    }
}

/// `U < r / den` for a uniform `U` revealed bit by bit, `0 < r < den ≤ 2^63`.
///
/// Loop invariant: `0 < r < den`, where `r / den` is the part of `p` not yet compared, so
/// `2·r < 2·den ≤ 2^64` cannot overflow. Each step produces p's next bit (`2r ≥ den`) and
/// compares it with U's: `U`'s bit 0 against p's 1 means `U < p`, the reverse `U > p`. When the
/// remainder becomes 0 the rest of p is all zeros, so `U ≥ p` whatever U's remaining bits are.
#[inline]
fn lazy_compare_u64<R: RandomBits>(rng: &mut R, mut r: u64, den: u64) -> bool {
    loop {
        r <<= 1;
        let p_bit = r >= den;
        if p_bit {
            r -= den;
        }
        if rng.bit() != p_bit {
            return p_bit;
        }
        if r == 0 {
            return false;
        }
    }
}

/// As [`lazy_compare_u64`] for `0 < r < den ≤ 2^127` (`2·r < 2^128`).
#[inline]
fn lazy_compare_u128<R: RandomBits>(rng: &mut R, mut r: u128, den: u128) -> bool {
    loop {
        r <<= 1;
        let p_bit = r >= den;
        if p_bit {
            r -= den;
        }
        if rng.bit() != p_bit {
            return p_bit;
        }
        if r == 0 {
            return false;
        }
    }
}

/// Bernoulli(exp(−γ)) for `γ = num / den ∈ [0, 1]`, `1 ≤ den ≤ 2^127` (CKS20 Algorithm 1, first
/// case): `K ← 1; while Bernoulli(γ / K) { K ← K + 1 }; return K odd`.
/// P(K odd) = e^(−γ) (CKS20 Prop. 5 proof).
#[inline]
fn bernoulli_exp_minus_unit<R: RandomBits>(rng: &mut R, num: u128, den: u128) -> bool {
    debug_assert!(num <= den);
    let mut k: u128 = 1;
    loop {
        // A ~ Bernoulli(num / (den · k)). When den · k passes 2^127 (for the Gaussian coin,
        // den < 2^100, so K > 2^27: probability below 1 / (2^27)!), use
        // Bernoulli(p · q) = Bernoulli(p) ∧ Bernoulli(q) with independent coins: still exact.
        let a = match den.checked_mul(k) {
            Some(dk) if dk <= 1 << 127 => bernoulli_ratio(rng, num, dk),
            _ => bernoulli_ratio(rng, num, den) && bernoulli_ratio(rng, 1, k),
        };
        if !a {
            break;
        }
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(−1)): [`bernoulli_exp_minus_unit`] with γ = 1, whose first coin (Bernoulli(1))
/// always succeeds, so the loop starts at K = 2.
#[inline]
fn bernoulli_exp_minus_one<R: RandomBits>(rng: &mut R) -> bool {
    // K = 2: Bernoulli(1/2) is one bit.
    if !rng.bit() {
        return false;
    }
    let mut k: u128 = 3;
    // Bernoulli(1 / K) needs K ≤ 2^127: reaching K = 2^127 has probability 1 / (2^127 − 1)!,
    // and no loop runs 2^127 times anyway.
    while bernoulli_ratio(rng, 1, k) {
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(−γ)) for any rational `γ = num / den ≥ 0`, `1 ≤ den ≤ 2^127` (CKS20
/// Algorithm 1, second case): `exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋))`, each factor an
/// independent coin. The loop stops at the first failed coin, so its expected length is below
/// 1 / (1 − e^−1) ≈ 1.58 whatever ⌊γ⌋ is; it peels whole units off by subtraction, never by a
/// 128-bit division.
pub(crate) fn bernoulli_exp_minus<R: RandomBits>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut rem = num;
    while rem >= den {
        if !bernoulli_exp_minus_one(rng) {
            return false;
        }
        rem -= den;
    }
    bernoulli_exp_minus_unit(rng, rem, den)
}

/// The discrete Laplace distribution with scale `t`, `1 ≤ t ≤ 2^32`: P(x) ∝ exp(−|x| / t),
/// x ∈ ℤ (CKS20 Algorithm 2). Returns (negative, |x|).
fn discrete_laplace<R: RandomBits>(rng: &mut R, t: u64) -> (bool, u64) {
    loop {
        let u = rng.below_u32(t);
        // Bernoulli(exp(−u/t)): its coins have denominators t·K ≤ 2^32·2^31 = 2^63 for K ≤ 2^31,
        // hence 64-bit arithmetic (a larger K, probability below 1 / (2^31)!, takes the 128-bit
        // path; the result is the same).
        if !bernoulli_exp_minus_unit(rng, u128::from(u), u128::from(t)) {
            continue;
        }
        // V ~ Geometric(1 − e^−1) on {0, 1, …}.
        let mut v: u64 = 0;
        while bernoulli_exp_minus_one(rng) {
            v = v.saturating_add(1);
        }
        // u + t·v cannot overflow in practice (v ≥ 2^32 has probability e^(−2^32)); if it did,
        // saturate: the candidate is then rejected by the caller's range check.
        let x = t.saturating_mul(v).saturating_add(u);
        let negative = rng.bit();
        if negative && x == 0 {
            continue;
        }
        return (negative, x);
    }
}

/// The exact discrete Gaussian N_ℤ(0, σ²) with rational `σ² = a / b`:
/// P(x) = exp(−x² / 2σ²) / Σ_{y∈ℤ} exp(−y² / 2σ²), x ∈ ℤ (CKS20 Definition 1).
#[derive(Clone, Debug)]
pub(crate) struct DiscreteGaussian {
    /// σ² = a / b exactly.
    a: u128,
    b: u128,
    /// The discrete Laplace scale, t = ⌊σ⌋ + 1 (CKS20 Algorithm 3).
    t: u64,
    /// b · t.
    bt: u128,
    /// 2 · a · b · t², the denominator of the acceptance exponent.
    den: u128,
}

impl DiscreteGaussian {
    /// From σ² = a / b and t ≥ 1; `None` unless `t ≤ 2^32` and `2·a·b·t² ≤ 2^127`, the ranges
    /// the coins' integer arithmetic is exact in.
    ///
    /// With the parameters [`super::SecureGaussian`] builds both hold with room to spare:
    /// `a ≤ 2^48` and `a / b ≥ σ_g²` (σ² rounded up), so `b ≤ 2^48 / σ_g²`; `t = ⌊σ_g⌋ + 1 ≤ 2σ_g`
    /// since `σ_g ≥ 1`, so `t ≤ 2^17` (σ_g ≤ 2^16) and `b·t² ≤ 2^48 / σ_g² · 4σ_g² = 2^50`;
    /// hence `2·a·b·t² ≤ 2 · 2^48 · 2^50 = 2^99`.
    pub(crate) fn new(a: u128, b: u128, t: u128) -> Option<Self> {
        if a == 0 || b == 0 || t == 0 {
            return None;
        }
        let t64 = u64::try_from(t).ok().filter(|&t| t <= 1 << 32)?;
        let bt = b.checked_mul(t)?;
        let den = a.checked_mul(2)?.checked_mul(bt)?.checked_mul(t)?;
        if den > 1 << 127 {
            return None;
        }
        Some(Self {
            a,
            b,
            t: t64,
            bt,
            den,
        })
    }

    /// The integers the sampler computes with, for the device kernel (`noise/kernel/`), which
    /// must decide exactly as [`DiscreteGaussian::sample`] does: `(a, b·t, 2·a·b·t², t)`.
    pub(crate) fn integer_parameters(&self) -> (u128, u128, u128, u64) {
        (self.a, self.bt, self.den, self.t)
    }

    /// σ² as a float, for reporting only.
    pub(crate) fn variance_f64(&self) -> f64 {
        self.a as f64 / self.b as f64
    }

    /// The same distribution drawn by the reference implementation (for tests and benchmarks).
    pub(crate) fn reference(&self) -> ReferenceDiscreteGaussian {
        ReferenceDiscreteGaussian::new(self.a, self.b, u128::from(self.t))
            .expect("the reference accepts every parameter set the fast sampler accepts")
    }

    /// One draw, in grid units (CKS20 Algorithm 3):
    /// `Y ← DLap(t); accept with probability exp(−(|Y| − σ²/t)² / 2σ²)`.
    /// With σ² = a/b the exponent is `(|Y|·b·t − a)² / (2·a·b·t²)`, an exact ratio of integers.
    ///
    /// Truncation: a candidate with `(|Y|·b·t − a)² ≥ 2^128` is rejected instead of evaluated.
    /// With the parameters [`super::SecureGaussian`] builds (`a < 2^48 + 1`,
    /// `b·t ≤ 2^49 / σ`) that needs `|Y| > 2^15·σ`, so the output is the discrete Gaussian
    /// conditioned on `|x| ≤ 2^15·σ`: total-variation distance below `exp(−2^29)`, which is the
    /// most it can add to δ. (The same truncation as the reference implementation's.)
    #[inline]
    pub(crate) fn sample<R: RandomBits>(&self, rng: &mut R) -> i64 {
        loop {
            let (negative, y) = discrete_laplace(rng, self.t);
            let Some(ybt) = u128::from(y).checked_mul(self.bt) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::SecureRng;

    /// Hands out the bits of `x` (most significant of `len` first) and then zeros, noting
    /// whether the sampler asked for more than `len` bits.
    struct Script {
        x: u64,
        len: u32,
        used: u32,
        overrun: bool,
    }

    impl RandomBits for Script {
        fn bit(&mut self) -> bool {
            if self.used == self.len {
                self.overrun = true;
                return false;
            }
            self.used += 1;
            (self.x >> (self.len - self.used)) & 1 == 1
        }
        fn word32(&mut self) -> u32 {
            unreachable!("the Bernoulli coins use single bits only")
        }
    }

    /// `a · b` as a 256-bit (high, low) pair, so that the checks below cannot overflow.
    fn mul_wide(a: u128, b: u64) -> (u128, u128) {
        let (high, low) = (a >> 64, a & u128::from(u64::MAX));
        let (p_low, p_high) = (low * u128::from(b), high * u128::from(b));
        let sum = p_low.wrapping_add(p_high << 64);
        ((p_high >> 64) + u128::from(sum < p_low), sum)
    }

    /// For every n-bit prefix x of U, the coin must decide `U < p` correctly whenever the prefix
    /// settles it, and ask for more bits only for the one prefix interval that contains p.
    /// That is exactness at resolution 2^-n, checked exhaustively: `yes` must be the number of
    /// intervals `[x, x+1)·2^-n` below p, ⌊p·2^n⌋, and `open` at most one.
    fn assert_exact_at_resolution(num: u128, den: u128, n: u32) {
        let (mut yes, mut no, mut open) = (0u64, 0u64, 0u64);
        let scaled_p = mul_wide(num, 1 << n); // p · 2^n · den
        for x in 0..1u64 << n {
            let mut s = Script {
                x,
                len: n,
                used: 0,
                overrun: false,
            };
            let decision = bernoulli_ratio(&mut s, num, den);
            if s.overrun {
                open += 1;
                continue;
            }
            if decision {
                // The whole interval lies below p: (x + 1)·den ≤ p·2^n·den.
                assert!(
                    mul_wide(den, x + 1) <= scaled_p,
                    "{num}/{den}: prefix {x} said U < p"
                );
                yes += 1;
            } else {
                assert!(
                    mul_wide(den, x) >= scaled_p,
                    "{num}/{den}: prefix {x} said U ≥ p"
                );
                no += 1;
            }
        }
        assert_eq!(yes + no + open, 1 << n);
        assert!(open <= 1, "{num}/{den}: {open} undecided prefixes");
        // ⌊p·2^n⌋ intervals lie wholly below p (p·2^n < 2^n + 1 here, num ≤ den + 1).
        let below = (0..=1u64 << n)
            .take_while(|&k| mul_wide(den, k) <= scaled_p)
            .count() as u64
            - 1;
        assert_eq!(yes, below.min(1 << n), "{num}/{den}");
    }

    #[test]
    fn lazy_bernoulli_is_exact_for_64_and_128_bit_denominators() {
        for (num, den) in [
            (1, 2),
            (1, 3),
            (2, 3),
            (5, 8),
            (7, 1000),
            (999, 1000),
            (1, 1 << 63),
            ((1 << 63) - 1, 1 << 63),
            (12_345, (1 << 63) - 25),
            (1, (1 << 63) + 1),
            ((1 << 96) + 7, (1 << 97) + 12_345),
            ((1 << 126) - 3, 1 << 127),
            ((1 << 127) - 1, 1 << 127),
            (0, 5),
            (5, 5),
            (6, 5),
        ] {
            assert_exact_at_resolution(num, den, 12);
        }
    }

    /// Frequency of `coin` over `n` draws against `p`, within 5 standard errors.
    fn assert_frequency(what: &str, n: u32, p: f64, mut coin: impl FnMut() -> bool) {
        let hits = (0..n).filter(|_| coin()).count() as f64;
        let se = (f64::from(n) * p * (1.0 - p)).sqrt().max(1.0);
        assert!(
            (hits - f64::from(n) * p).abs() < 5.0 * se,
            "{what}: {hits} of {n}, expected {:.1} ± {se:.1}",
            f64::from(n) * p
        );
    }

    #[test]
    fn exponential_coins_have_the_right_frequency() {
        let mut rng = SecureRng::insecure_from_seed([7; 32]);
        let n = 200_000;
        assert_frequency("exp(-1)", n, (-1f64).exp(), || {
            bernoulli_exp_minus_one(&mut rng)
        });
        for (num, den) in [
            (0u128, 1u128),
            (1, 3),
            (3, 4),
            (5, 2),
            (7, 1),
            (1 << 98, 3 << 96),
        ] {
            let gamma = num as f64 / den as f64;
            assert_frequency(&format!("exp(-{gamma})"), n, (-gamma).exp(), || {
                bernoulli_exp_minus(&mut rng, num, den)
            });
        }
    }

    #[test]
    fn uniform_below_is_uniform_and_in_range() {
        let mut rng = SecureRng::insecure_from_seed([8; 32]);
        assert!((0..100).all(|_| rng.below_u32(1) == 0));
        let m = 7u64;
        let n = 70_000;
        let mut counts = [0f64; 7];
        for _ in 0..n {
            counts[rng.below_u32(m) as usize] += 1.0;
        }
        let e = f64::from(n) / 7.0;
        let chi2: f64 = counts.iter().map(|c| (c - e).powi(2) / e).sum();
        // χ²(6) at p = 0.001 is 22.46.
        assert!(chi2 < 22.46, "{counts:?}");
        let top = 1u64 << 32;
        assert!((0..1000).all(|_| rng.below_u32(top) < top));
    }

    #[test]
    fn parameters_outside_the_exact_ranges_are_refused() {
        assert!(DiscreteGaussian::new(1, 1, 1).is_some());
        assert!(DiscreteGaussian::new(1, 1, (1 << 32) + 1).is_none());
        assert!(DiscreteGaussian::new(1 << 100, 1 << 20, 1 << 4).is_none());
        assert!(DiscreteGaussian::new(0, 1, 1).is_none());
        // The largest scale SecureGaussian builds: a ≤ 2^48, σ_g = 2^16, t = 2^16 + 1.
        assert!(DiscreteGaussian::new(1 << 48, 1 << 16, (1 << 16) + 1).is_some());
    }
}
