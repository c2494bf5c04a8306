//! A privacy-loss-distribution (PLD) accountant for the Poisson-subsampled Gaussian mechanism
//! under add/remove-one neighbours, with pessimistic discretisation so that every ε it reports is
//! an upper bound (up to the floating-point error bound it carries, see below).
//!
//! Why the result is an upper bound. For a pair (P, Q) with privacy loss L = log(dP/dQ) under P,
//! the hockey-stick divergence is δ(ε) = E_P[(1 − e^{ε−L})₊] (plus P's mass where Q = 0, i.e.
//! L = +∞), and composition adds independent losses. The function ℓ ↦ (1 − e^{ε−ℓ})₊ is
//! non-decreasing, so any coupling that only moves loss *upwards* can only increase δ, also after
//! composition (moving each summand up moves the sum up). Every approximation here is such a
//! move: each loss is rounded up to the grid ih (Meiser & Mohammadi 2018; Koskela et al. 2020;
//! the "pessimistic estimate" of Google's dp-accounting), mass below the window is moved into its
//! lowest bucket, and mass above it goes to +∞ (it then counts fully in δ).
//!
//! Add/remove: with one example removed the dominating pair is
//! (P, Q) = ((1−q)N(0,σ²) + qN(1,σ²), N(0,σ²)); with one added it is (N(0,σ²), that mixture)
//! (Zhu, Dong & Wang 2022, Theorem 11). All steps of one pair of datasets share a direction, so
//! δ(ε) = max(δ_remove(ε), δ_add(ε)) after composing each direction separately.
//!
//! Two discretisations ([`Rounding`]):
//!
//! - **Pessimistic** (above): every loss rounded up. Simple and a strict upper bound, but each
//!   step's loss moves up by up to h, so ε is overestimated by up to T·h (about T·h/2 in
//!   practice): at T = 14062 and h = 1e-4 some 0.7 in ε, looser than RDP.
//! - **Mean-preserving** (the default; the "PRV" accountant of Gopi, Lee & Wutschitz 2021 and
//!   the "connect-the-dots" idea of Doroshenko et al. 2022 rest on the same observation): each
//!   loss y in the bucket (a, a+h] goes to a or a+h at random, with the probability of a+h
//!   equal to (y − a)/h, so the rounding error Z = Y' − Y lies in [−h, h] and has mean zero.
//!   The masses this puts on a and a+h are E[(a+h−Y)/h; bucket] and E[(Y−a)/h; bucket]; with
//!   F the loss's distribution function, the latter is F(a+h) − (1/h)∫ₐ^{a+h}F, which
//!   Simpson's rule gives as (5·(F(a+h) − F(m)) + (F(m) − F(a)))/6 from differences of F at the
//!   bucket's ends and middle m (no cancellation against 1). Simpson's rule is exact enough
//!   where F is smooth across a bucket, but not where the loss distribution is only a few
//!   buckets wide (small q), where it can leave the mean low: the rounded distribution's mean is
//!   therefore compared with the true one (Gauss–Legendre quadrature over the sampled output,
//!   where the integrand is smooth), and a shortfall d per step is added to the shift as T·d
//!   (measured: 0.014·h per step at q = 1e-4, σ = 1; below 1e-12 at the DP-SGD settings of the
//!   tests). Over T steps the errors, less their mean, add up to a sum of independent bounded
//!   terms, so by Hoeffding's inequality P(ΣZ < −t − T·d) ≤ exp(−t²/(2Th²)). Since (1 − e^{ε−y})₊ is
//!   non-decreasing and at most 1, δ_Y(ε) ≤ δ_{Y'}(ε − t) + exp(−t²/(2Th²)) for every t > 0:
//!   the accountant reports ε_{Y'}(δ − η) + h·√(2T·ln(1/η)), minimised over a few η < δ. The
//!   shift grows like √T·h, not T·h: 0.07 in ε at T = 14062 and h = 1e-4. The tails are still
//!   moved up (the lowest bucket, +∞), which only increases δ. For compositions of fewer than
//!   [`MEAN_PRESERVING_MIN_STEPS`] steps the pessimistic drift is the smaller one, and
//!   [`epsilon`] and [`delta`] use it there.
//!
//! Floating point. The masses are differences of erfc values (relative error of a few ulp) and
//! the compositions are FFT convolutions. Each distribution carries `err`, a bound on the L1
//! distance between its computed and exact pmf (16 ulp per bucket for the discretisation; for an
//! FFT convolution a bound of the usual form 30·log₂N·u·max(‖a‖₂, ‖b‖₂) on the L2 error,
//! enlarged to L1 by √N — a generous constant, an engineering bound rather than a proof), and `err` is added to every δ reported. It is
//! ~1e-10 or less in practice, far below any δ one would use.

use super::special::{norm_cdf, norm_sf};
use super::{
    AccountantError, SampledGaussian, validate_delta, validate_noise, validate_sample_rate,
};

/// Options of the PLD accountant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PldOptions {
    /// Grid spacing of the privacy loss. Smaller is tighter and slower; 1e-4 is dp-accounting's
    /// usual choice.
    pub discretization: f64,
    /// Probability mass allowed to be cut from each end of a distribution (the upper cut goes to
    /// +∞ and is counted in δ; the lower cut is moved up into the window).
    pub tail_mass: f64,
    /// How each step's loss is put on the grid (module documentation).
    pub rounding: Rounding,
}

/// How a privacy loss is put on the grid `hℤ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Rounded up: a strict upper bound that drifts by up to h per composed step.
    Pessimistic,
    /// Rounded to a neighbouring grid point at random, keeping the mean; the bound then adds a
    /// shift of h·√(2T·ln(1/η)) (Hoeffding) and η to δ.
    #[default]
    MeanPreserving,
    /// Rounded down, the lower tail dropped and the upper tail kept at the top of the grid: a
    /// *lower* bound on ε, for checking the others (never for accounting).
    Optimistic,
}

impl Default for PldOptions {
    fn default() -> Self {
        Self {
            discretization: 1e-4,
            tail_mass: 1e-15,
            rounding: Rounding::default(),
        }
    }
}

/// Shares of δ tried as Hoeffding's η when answering ε for a δ (the smallest ε is reported).
const ETA_SHARES: [f64; 6] = [0.5, 0.2, 0.1, 1e-2, 1e-3, 1e-4];

/// η tried when answering δ for an ε (the smallest δ is reported).
const ETAS: [f64; 8] = [1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-12, 1e-14, 1e-16];

/// P(L ≤ l) or P(L > l) as a function of l.
type TailFn<'a> = Box<dyn Fn(f64) -> f64 + 'a>;

/// Largest grid we allocate (2^25 points, 256 MiB of f64).
const MAX_POINTS: u64 = 1 << 25;

/// A discrete privacy-loss distribution: `pmf[j]` is the mass at loss (offset + j)·h, `p_inf` the
/// mass at +∞, `err` the L1 round-off bound described in the module docs.
#[derive(Debug, Clone)]
pub struct Pld {
    h: f64,
    offset: i64,
    pmf: Vec<f64>,
    p_inf: f64,
    err: f64,
    /// Steps composed with mean-preserving rounding (each adds a bounded error that Hoeffding's
    /// inequality covers); 0 for pessimistic rounding.
    rounded_steps: u64,
    /// How far below the true mean the rounding left the composed loss's mean (the sum over the
    /// steps of each step's measured shortfall, see `mean_shortfall`): added to the shift.
    drift: f64,
}

/// Which neighbouring direction a PLD describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// One example removed: P = mixture, Q = N(0, σ²).
    Remove,
    /// One example added: P = N(0, σ²), Q = mixture.
    Add,
}

impl Pld {
    /// One step of the sampled Gaussian in one direction, discretised pessimistically.
    pub fn sampled_gaussian(
        q: f64,
        sigma: f64,
        direction: Direction,
        options: &PldOptions,
    ) -> Result<Self, AccountantError> {
        validate_sample_rate(q)?;
        validate_noise(sigma)?;
        let h = options.discretization;
        if !(h > 0.0 && h.is_finite()) {
            return Err(AccountantError::Discretization(h));
        }
        let tail = options.tail_mass.clamp(0.0, 1e-6);
        let log_1mq = (-q).ln_1p(); // −∞ when q = 1
        let x_of = |l: f64| output_at_loss(l, q, sigma);
        // P(L ≤ l) and P(L > l), each evaluated in the form that is accurate in its small tail.
        let (cdf, sf, l_inf, l_sup): (TailFn<'_>, TailFn<'_>, f64, f64) = match direction {
            Direction::Remove => {
                // L = log(dM/dN0)(X), X ~ M = (1−q)N(0,σ²) + qN(1,σ²); L increasing in X.
                let cdf = move |l: f64| {
                    if l <= log_1mq {
                        return 0.0;
                    }
                    let x = x_of(l);
                    (1.0 - q) * norm_cdf(x / sigma) + q * norm_cdf((x - 1.0) / sigma)
                };
                let sf = move |l: f64| {
                    if l <= log_1mq {
                        return 1.0;
                    }
                    let x = x_of(l);
                    (1.0 - q) * norm_sf(x / sigma) + q * norm_sf((x - 1.0) / sigma)
                };
                (Box::new(cdf), Box::new(sf), log_1mq, f64::INFINITY)
            }
            Direction::Add => {
                // L = −log(dM/dN0)(X), X ~ N(0,σ²); L decreasing in X, L < −log(1−q).
                let cdf = move |l: f64| {
                    if -l <= log_1mq {
                        1.0
                    } else {
                        norm_sf(x_of(-l) / sigma)
                    }
                };
                let sf = move |l: f64| {
                    if -l <= log_1mq {
                        0.0
                    } else {
                        norm_cdf(x_of(-l) / sigma)
                    }
                };
                (Box::new(cdf), Box::new(sf), f64::NEG_INFINITY, -log_1mq)
            }
        };
        // The window [lo, hi]: below lo and above hi lies at most `tail` mass each.
        let mut lo = -1.0_f64;
        while cdf(lo) > tail && lo > l_inf {
            lo *= 2.0;
            if lo < -1e7 {
                return Err(AccountantError::Numerical(
                    "privacy loss lower tail does not decay",
                ));
            }
        }
        let lo = lo.max(l_inf);
        let mut hi = 1.0_f64;
        while sf(hi) > tail && hi < l_sup {
            hi *= 2.0;
            if hi > 1e7 {
                return Err(AccountantError::Numerical(
                    "privacy loss upper tail does not decay",
                ));
            }
        }
        let hi = hi.min(l_sup);
        // Grid points ih for i in [i_lo, i_hi]; bucket i is ((i−1)h, ih].
        let i_lo = (lo / h).floor() as i64 + 1;
        let i_hi = ((hi / h).ceil() as i64).max(i_lo);
        let n = (i_hi - i_lo + 1) as u64;
        if n > MAX_POINTS {
            return Err(AccountantError::GridTooLarge(n));
        }
        // (P(L ≤ l), P(L > l)) at every grid point, each evaluated once.
        let tails = |l: f64| (cdf(l), sf(l));
        let grid: Vec<(f64, f64)> = (i_lo..=i_hi).map(|i| tails(i as f64 * h)).collect();
        // Mass of (x, y], from whichever of the two tails is small there: no cancellation
        // against 1.
        let mass = |(cx, sx): (f64, f64), (cy, sy): (f64, f64)| -> f64 {
            let m = if cy < 0.5 { cy - cx } else { sx - sy };
            m.max(0.0)
        };
        let mut pmf = Vec::with_capacity(n as usize);
        // Lowest point: everything at or below i_lo·h (the lower tail is moved up into it).
        pmf.push(grid[0].0);
        let mut p_inf = grid[grid.len() - 1].1.max(0.0);
        let mut drift = 0.0;
        let rounded_steps = match options.rounding {
            Rounding::Pessimistic => {
                // Bucket i reported as ih (rounded up).
                pmf.extend(grid.windows(2).map(|w| mass(w[0], w[1])));
                0
            }
            Rounding::Optimistic => {
                // Bucket i reported as (i−1)h (rounded down); below the grid dropped (it adds
                // nothing to δ), above it kept at the top.
                pmf[0] = 0.0;
                pmf.resize(n as usize, 0.0);
                for (j, w) in grid.windows(2).enumerate() {
                    pmf[j] += mass(w[0], w[1]);
                }
                pmf[(i_hi - i_lo) as usize] += p_inf;
                p_inf = 0.0;
                0
            }
            Rounding::MeanPreserving => {
                pmf.resize(n as usize, 0.0);
                for (j, w) in grid.windows(2).enumerate() {
                    let middle = tails((i_lo + j as i64) as f64 * h + 0.5 * h);
                    let (lower_half, upper_half) = (mass(w[0], middle), mass(middle, w[1]));
                    // E[(Y − a)/h; bucket] by Simpson's rule (module documentation).
                    let up = (5.0 * upper_half + lower_half) / 6.0;
                    let down = (upper_half + 5.0 * lower_half) / 6.0;
                    pmf[j + 1] += up;
                    pmf[j] += down;
                }
                drift = mean_shortfall(
                    &pmf,
                    i_lo,
                    h,
                    grid[0].0,
                    exact_mean(q, sigma, direction, i_lo as f64 * h, i_hi as f64 * h),
                );
                1
            }
        };
        let err = 16.0 * f64::EPSILON * (n as f64 + 1.0);
        Ok(Self {
            h,
            offset: i_lo,
            pmf,
            p_inf,
            err,
            rounded_steps,
            drift,
        })
    }

    /// The Hoeffding shift of ε that covers the mean-preserving rounding of this distribution's
    /// steps with failure probability `eta`: h·√(2T·ln(1/η)).
    fn shift(&self, eta: f64) -> f64 {
        self.h * (2.0 * self.rounded_steps as f64 * (1.0 / eta).ln()).sqrt() + self.drift
    }

    /// The shift's part that covers the rounding's measured bias (0 when it kept the mean).
    pub fn drift(&self) -> f64 {
        self.drift
    }

    /// An upper bound on the true δ(ε): the discretised distribution's, with the rounding's
    /// Hoeffding shift when it was mean-preserving (module documentation).
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        if self.rounded_steps == 0 {
            return self.discrete_delta(epsilon);
        }
        ETAS.iter()
            .map(|&eta| (self.discrete_delta(epsilon - self.shift(eta)) + eta).min(1.0))
            .fold(1.0, f64::min)
    }

    /// An upper bound on the smallest ε with true δ(ε) ≤ δ (∞ if none is found).
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        if self.rounded_steps == 0 {
            return self.discrete_epsilon(delta);
        }
        ETA_SHARES
            .iter()
            .map(|&share| {
                let eta = share * delta;
                // The discrete ε can be negative; the bound is then the shift alone.
                let eps = self.discrete_epsilon_signed(delta - eta);
                (eps + self.shift(eta)).max(0.0)
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// δ(ε) = p_∞ + Σ_{l > ε} p_l (1 − e^{ε−l}) + err of the discretised distribution.
    fn discrete_delta(&self, epsilon: f64) -> f64 {
        let mut d = 0.0;
        for (j, &p) in self.pmf.iter().enumerate().rev() {
            let l = (self.offset + j as i64) as f64 * self.h;
            if l <= epsilon {
                break;
            }
            d += p * (-(epsilon - l).exp_m1());
        }
        (self.p_inf + d + self.err).min(1.0)
    }

    /// The smallest ε ≥ 0 with `discrete_delta(ε)` ≤ δ (∞ if p_∞ + err ≥ δ).
    fn discrete_epsilon(&self, delta: f64) -> f64 {
        self.discrete_epsilon_signed(delta).max(0.0)
    }

    /// The smallest ε, negative ones included, with `discrete_delta(ε)` ≤ δ (∞ if p_∞ + err ≥ δ;
    /// the lowest grid point if every ε above it qualifies).
    fn discrete_epsilon_signed(&self, delta: f64) -> f64 {
        let target = delta - self.p_inf - self.err;
        if target <= 0.0 {
            return f64::INFINITY;
        }
        // On [l_{k−1}, l_k) the sum runs over buckets ≥ k: δ(ε) = A − e^ε·B. Scan down from the
        // top; the first interval where the solution of A − e^ε·B = target lies is the answer.
        let (mut a, mut b) = (0.0_f64, 0.0_f64);
        for (j, &p) in self.pmf.iter().enumerate().rev() {
            let l = (self.offset + j as i64) as f64 * self.h;
            a += p;
            b += p * (-l).exp();
            let l_below = l - self.h;
            if a > target {
                let eps = ((a - target) / b).ln();
                if eps >= l_below {
                    return eps;
                }
            }
        }
        self.offset as f64 * self.h - self.h
    }

    /// The composition of two PLDs on the same grid (the independent sum of their losses).
    pub fn compose(&self, other: &Self, tail_mass: f64) -> Result<Self, AccountantError> {
        let n = self.pmf.len() + other.pmf.len() - 1;
        if n as u64 > MAX_POINTS {
            return Err(AccountantError::GridTooLarge(n as u64));
        }
        let (pmf, conv_err) = convolve(&self.pmf, &other.pmf);
        let mut out = Self {
            h: self.h,
            offset: self.offset + other.offset,
            pmf,
            // P(either is ∞) = 1 − (1−a)(1−b).
            p_inf: self.p_inf + other.p_inf - self.p_inf * other.p_inf,
            // ‖ã*b̃ − a*b‖₁ ≤ ‖ã−a‖₁‖b̃‖₁ + ‖a‖₁‖b̃−b‖₁ (+ the convolution's own round-off).
            err: self.err * (1.0 + other.err) + other.err + conv_err,
            rounded_steps: self.rounded_steps + other.rounded_steps,
            drift: self.drift + other.drift,
        };
        out.truncate(tail_mass, conv_err);
        Ok(out)
    }

    /// T-fold self-composition by repeated squaring.
    pub fn self_compose(&self, steps: u64, tail_mass: f64) -> Result<Self, AccountantError> {
        super::validate_steps(steps)?;
        let mut result: Option<Self> = None;
        let mut base = self.clone();
        let mut t = steps;
        loop {
            if t & 1 == 1 {
                result = Some(match result {
                    None => base.clone(),
                    Some(r) => r.compose(&base, tail_mass)?,
                });
            }
            t >>= 1;
            if t == 0 {
                break;
            }
            base = base.compose(&base, tail_mass)?;
        }
        result.ok_or(AccountantError::ZeroSteps)
    }

    /// Mass at +∞ (counted fully in δ).
    pub fn infinity_mass(&self) -> f64 {
        self.p_inf
    }

    /// The carried bound on the L1 round-off error (added to δ).
    pub fn roundoff_bound(&self) -> f64 {
        self.err
    }

    /// Drops FFT noise from the ends (entries below `noise`, their mass added to `err`), then
    /// moves up to `tail_mass` from the top to +∞ and up to `tail_mass` from the bottom into the
    /// lowest kept bucket. All moves are upwards (pessimistic) or accounted in `err`.
    fn truncate(&mut self, tail_mass: f64, noise: f64) {
        let floor = noise / (self.pmf.len() as f64).sqrt().max(1.0);
        let mut end = self.pmf.len();
        while end > 1 && self.pmf[end - 1] <= floor {
            self.err += self.pmf[end - 1];
            end -= 1;
        }
        let mut cut = 0.0;
        while end > 1 && cut + self.pmf[end - 1] <= tail_mass {
            cut += self.pmf[end - 1];
            end -= 1;
        }
        self.p_inf += cut;
        self.pmf.truncate(end);
        let mut start = 0;
        while start + 1 < self.pmf.len() && self.pmf[start] <= floor {
            self.err += self.pmf[start];
            start += 1;
        }
        let mut low = 0.0;
        while start + 1 < self.pmf.len() && low + self.pmf[start] <= tail_mass {
            low += self.pmf[start];
            start += 1;
        }
        if start > 0 {
            self.pmf.drain(..start);
            self.pmf[0] += low;
            self.offset += start as i64;
        }
    }
}

/// x(l): the output x at which log(dM/dN0)(x) = log(1 − q + q·e^{(2x−1)/(2σ²)}) equals l
/// (monotone increasing in x); −∞ for l ≤ log(1−q), the loss's infimum.
fn output_at_loss(l: f64, q: f64, sigma: f64) -> f64 {
    let arg = l.exp_m1() + q;
    if arg <= 0.0 {
        f64::NEG_INFINITY
    } else {
        sigma * sigma * (arg.ln() - q.ln()) + 0.5
    }
}

/// How far the mean of the rounded losses inside the grid falls short of the true mean there,
/// per step (0 if it does not), with a margin for the quadrature and the sums' round-off.
///
/// Simpson's rule splits a bucket's mass exactly when the distribution function is smooth across
/// the bucket; where the loss distribution is only a few buckets wide (a small q) it is not, and
/// the split can leave the mean a little low. Hoeffding's inequality needs each step's rounding
/// error to have mean ≥ 0 (a positive mean only makes the bound looser), so a shortfall is
/// measured here, against [`exact_mean`], and added to the shift for every step.
fn mean_shortfall(pmf: &[f64], i_lo: i64, h: f64, lower_tail: f64, exact: f64) -> f64 {
    // The rounded losses inside the grid: every point's mass, less the lower tail moved up into
    // the lowest point (its error is upward by construction and is not rounding).
    let rounded: f64 = pmf
        .iter()
        .enumerate()
        .map(|(j, &p)| (i_lo + j as i64) as f64 * h * p)
        .sum::<f64>()
        - i_lo as f64 * h * lower_tail;
    let margin = 1e-12 * (1.0 + exact.abs()) + 1e-13 * h;
    (exact - rounded).max(0.0) + margin
}

/// E[L; a < L ≤ b] for one step's privacy loss L, by composite 8-point Gauss–Legendre quadrature
/// over the sampled output x, where the integrand (a Gaussian mixture times a smooth log) is
/// smooth even when L's own distribution is squeezed into a few grid buckets.
fn exact_mean(q: f64, sigma: f64, direction: Direction, a: f64, b: f64) -> f64 {
    let s2 = sigma * sigma;
    // log(dM/dN0)(x), M = (1−q)N(0,σ²) + qN(1,σ²), computed without overflow or cancellation.
    let log_ratio = |x: f64| -> f64 {
        let u = (2.0 * x - 1.0) / (2.0 * s2);
        if u > 30.0 {
            u + q.ln() + ((1.0 - q) * (-u).exp() / q).ln_1p()
        } else {
            (q * u.exp_m1()).ln_1p()
        }
    };
    let x_of = |l: f64| output_at_loss(l, q, sigma);
    let phi = |z: f64| (-0.5 * z * z).exp() / (sigma * (2.0 * std::f64::consts::PI).sqrt());
    let (x_lo, x_hi, density, loss): (f64, f64, TailFn<'_>, TailFn<'_>) = match direction {
        Direction::Remove => (
            x_of(a),
            x_of(b),
            Box::new(move |x: f64| (1.0 - q) * phi(x / sigma) + q * phi((x - 1.0) / sigma)),
            Box::new(log_ratio),
        ),
        Direction::Add => (
            x_of(-b),
            x_of(-a),
            Box::new(move |x: f64| phi(x / sigma)),
            Box::new(move |x: f64| -log_ratio(x)),
        ),
    };
    // Beyond 40σ of either centre the density is below 1e-340: nothing to integrate.
    let lo = x_lo.max(-40.0 * sigma - 1.0);
    let hi = x_hi.min(40.0 * sigma + 2.0);
    if hi.is_nan() || lo.is_nan() || hi <= lo {
        return 0.0;
    }
    const NODES: [(f64, f64); 4] = [
        (0.1834346424956498, 0.362683783378362),
        (0.525532409916329, 0.3137066458778873),
        (0.7966664774136267, 0.2223810344533745),
        (0.9602898564975363, 0.1012285362903763),
    ];
    let panels = (((hi - lo) / (sigma / 16.0)).ceil() as usize).clamp(1, 1 << 20);
    let width = (hi - lo) / panels as f64;
    let mut total = 0.0;
    for k in 0..panels {
        let mid = lo + (k as f64 + 0.5) * width;
        let half = 0.5 * width;
        for &(t, w) in &NODES {
            for x in [mid - half * t, mid + half * t] {
                total += w * half * density(x) * loss(x);
            }
        }
    }
    total
}

/// ε(δ) of a heterogeneous composition under add/remove: each group's PLD composed over its
/// steps, the groups composed together, both directions, the larger ε.
pub fn epsilon(
    composition: &[SampledGaussian],
    delta: f64,
    options: &PldOptions,
) -> Result<f64, AccountantError> {
    validate_delta(delta)?;
    if composition.is_empty() {
        return Err(AccountantError::EmptyComposition);
    }
    let mut eps = 0.0_f64;
    for direction in [Direction::Remove, Direction::Add] {
        let pld = compose_all(composition, direction, options)?;
        eps = eps.max(pld.epsilon_for_delta(delta));
    }
    Ok(eps)
}

/// δ(ε) of a heterogeneous composition under add/remove (the larger of the two directions).
pub fn delta(
    composition: &[SampledGaussian],
    epsilon: f64,
    options: &PldOptions,
) -> Result<f64, AccountantError> {
    if composition.is_empty() {
        return Err(AccountantError::EmptyComposition);
    }
    let mut d = 0.0_f64;
    for direction in [Direction::Remove, Direction::Add] {
        let pld = compose_all(composition, direction, options)?;
        d = d.max(pld.delta_for_epsilon(epsilon));
    }
    Ok(d)
}

/// Below this many steps in all, mean-preserving rounding falls back to pessimistic rounding:
/// its Hoeffding shift h·√(2T·ln(1/η)) (about 5h·√T at the usual δ) is then larger than the
/// pessimistic drift (about T·h/2 in practice), which is the better bound for short
/// compositions (a single release, a few rounds of central DP).
pub const MEAN_PRESERVING_MIN_STEPS: u64 = 128;

fn compose_all(
    composition: &[SampledGaussian],
    direction: Direction,
    options: &PldOptions,
) -> Result<Pld, AccountantError> {
    let steps: u64 = composition.iter().map(SampledGaussian::steps).sum();
    let options =
        &if options.rounding == Rounding::MeanPreserving && steps < MEAN_PRESERVING_MIN_STEPS {
            PldOptions {
                rounding: Rounding::Pessimistic,
                ..*options
            }
        } else {
            *options
        };
    let mut total: Option<Pld> = None;
    for g in composition {
        let one = Pld::sampled_gaussian(g.sample_rate(), g.noise_multiplier(), direction, options)?;
        let many = one.self_compose(g.steps(), options.tail_mass)?;
        total = Some(match total {
            None => many,
            Some(t) => t.compose(&many, options.tail_mass)?,
        });
    }
    total.ok_or(AccountantError::EmptyComposition)
}

/// Linear convolution of two non-negative vectors and a bound on its L1 round-off error.
fn convolve(a: &[f64], b: &[f64]) -> (Vec<f64>, f64) {
    let n = a.len() + b.len() - 1;
    if (a.len() as u64) * (b.len() as u64) <= 1 << 22 {
        // Direct: sums of non-negative products, relative error ≤ len·u per entry.
        let mut c = vec![0.0; n];
        for (i, &x) in a.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            for (j, &y) in b.iter().enumerate() {
                c[i + j] += x * y;
            }
        }
        let err = (a.len().min(b.len()) as f64 + 2.0) * f64::EPSILON;
        return (c, err);
    }
    let size = n.next_power_of_two();
    let mut fa: Vec<(f64, f64)> = a.iter().map(|&x| (x, 0.0)).collect();
    fa.resize(size, (0.0, 0.0));
    let mut fb: Vec<(f64, f64)> = b.iter().map(|&x| (x, 0.0)).collect();
    fb.resize(size, (0.0, 0.0));
    let tw = twiddles(size);
    fft(&mut fa, &tw, false);
    fft(&mut fb, &tw, false);
    for (x, y) in fa.iter_mut().zip(&fb) {
        *x = (x.0 * y.0 - x.1 * y.1, x.0 * y.1 + x.1 * y.0);
    }
    fft(&mut fa, &tw, true);
    let scale = 1.0 / size as f64;
    let c: Vec<f64> = fa[..n].iter().map(|z| (z.0 * scale).max(0.0)).collect();
    // Round-off of FFT convolution (radix-2, accurately computed twiddles): ‖Δc‖₂ ≲
    // c·log₂N·u·‖a‖₂‖b‖₁-type terms, each ≤ max(‖a‖₂, ‖b‖₂) for probability vectors. We take
    // the constant 10 per transform (three transforms) and the L1 bound √N·‖Δc‖₂.
    let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let log_n = (size as f64).log2();
    let l2_err = 30.0 * log_n * f64::EPSILON * l2(a).max(l2(b));
    (c, l2_err * (size as f64).sqrt())
}

fn twiddles(size: usize) -> Vec<(f64, f64)> {
    // Each twiddle computed directly (not by recurrence) so its error is one rounding.
    (0..size / 2)
        .map(|k| {
            let t = -2.0 * std::f64::consts::PI * k as f64 / size as f64;
            (t.cos(), t.sin())
        })
        .collect()
}

/// In-place iterative radix-2 FFT (size a power of two); `inverse` conjugates the twiddles and
/// leaves the 1/N scaling to the caller.
fn fft(v: &mut [(f64, f64)], tw: &[(f64, f64)], inverse: bool) {
    let n = v.len();
    let mut j = 0;
    for i in 1..n {
        let mut bit = n >> 1;
        while j & bit != 0 {
            j ^= bit;
            bit >>= 1;
        }
        j |= bit;
        if i < j {
            v.swap(i, j);
        }
    }
    let mut len = 2;
    while len <= n {
        let step = n / len;
        for start in (0..n).step_by(len) {
            for k in 0..len / 2 {
                let (wr, wi) = tw[k * step];
                let wi = if inverse { -wi } else { wi };
                let (ur, ui) = v[start + k];
                let (xr, xi) = v[start + k + len / 2];
                let (tr, ti) = (xr * wr - xi * wi, xr * wi + xi * wr);
                v[start + k] = (ur + tr, ui + ti);
                v[start + k + len / 2] = (ur - tr, ui - ti);
            }
        }
        len <<= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fft_convolution_matches_direct() {
        let a: Vec<f64> = (0..3000).map(|i| ((i * 7919) % 101) as f64 / 1e5).collect();
        let b: Vec<f64> = (0..2000)
            .map(|i| ((i * 104729) % 97) as f64 / 1e5)
            .collect();
        let (fast, err) = convolve(&a, &b);
        let mut direct = vec![0.0; a.len() + b.len() - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                direct[i + j] += x * y;
            }
        }
        let l1: f64 = fast.iter().zip(&direct).map(|(x, y)| (x - y).abs()).sum();
        assert!(l1 <= err, "L1 error {l1} above the carried bound {err}");
    }

    #[test]
    fn single_step_pmf_sums_to_one() {
        for dir in [Direction::Remove, Direction::Add] {
            let p = Pld::sampled_gaussian(0.01, 1.0, dir, &PldOptions::default())
                .unwrap_or_else(|e| panic!("{e}"));
            let total: f64 = p.pmf.iter().sum::<f64>() + p.p_inf;
            assert!((total - 1.0).abs() < 1e-12, "{dir:?}: {total}");
        }
    }

    #[test]
    fn truncation_only_moves_mass_up() {
        let mut p = Pld {
            h: 0.1,
            offset: -2,
            pmf: vec![1e-17, 0.5, 0.5 - 2e-17, 1e-17],
            p_inf: 0.0,
            err: 0.0,
            rounded_steps: 0,
            drift: 0.0,
        };
        let before = p.delta_for_epsilon(0.0);
        p.truncate(1e-15, 0.0);
        assert_eq!(p.pmf.len(), 2);
        assert!(p.delta_for_epsilon(0.0) >= before);
    }
}
