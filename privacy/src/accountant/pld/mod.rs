//! A privacy-loss-distribution (PLD) accountant for the Poisson-subsampled Gaussian mechanism
//! under add/remove-one neighbours, built to Google's `dp-accounting` standard: the
//! connect-the-dots discretisation (Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022), mass
//! cut from the tails tracked as mass at +∞, and composition by FFT. Every ε it reports is an
//! upper bound (up to the floating-point error bound it carries, see below).
//!
//! Why the result is an upper bound. For a pair (P, Q) with privacy loss L = log(dP/dQ) under P,
//! the hockey-stick divergence is δ(ε) = E_P[(1 − e^{ε−L})₊] (plus P's mass where Q = 0, i.e.
//! L = +∞), and composition adds independent losses. A discretised pair that *dominates* the true
//! one (its δ(ε) is at least the true one at every ε) still dominates after composition with
//! others (Zhu, Dong & Wang 2022), so the composed δ, and the ε read off it, are upper bounds.
//! [`discretise`] says why each step's discretisation dominates; cutting the tails moves mass up
//! (to the lowest kept point from below, to +∞ from above), which also only raises δ.
//!
//! Directions. All steps of one pair of datasets share a direction (one example removed, or one
//! added), so δ(ε) = max(δ_remove(ε), δ_add(ε)) after composing each direction separately.
//!
//! Composition ([`compose`]). The T-fold composition of a step is the T-fold convolution of its
//! pmf: one FFT of the step's pmf, each coefficient raised to the T-th power by repeated
//! squaring, one inverse FFT (several groups of steps: the product of their powers). The grid is
//! only as long as the composed loss's window: Chernoff bounds on the composed loss give the
//! window outside which at most `tail_mass` lies (dp-accounting's `compute_self_convolve_bounds`),
//! that mass is counted at +∞, and the FFT is of the window's length (its circular wrap-around
//! only moves that same outside mass into the window, which the +∞ count already covers).
//!
//! Floating point. Each distribution carries `err`, a bound on how far its computed distribution
//! function is from the exact one of the discretised pair at any point (16 ulp per step for the
//! discretisation; for the FFT, a bound of the usual form 3·log₂N·u per coefficient carried
//! through the power and the inverse transform: an engineering bound rather than a proof). Since
//! (1 − e^{ε−l})₊ is monotone in l with values in [0, 1], `err` bounds the error of every δ, and
//! it is added to each δ reported. It is about 1e-10 at 10^6 steps, far below any δ one would use.

mod compose;
mod discretise;

pub use compose::compose;

use super::{AccountantError, SampledGaussian, validate_delta};

/// Options of the PLD accountant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PldOptions {
    /// Grid spacing of the privacy loss. Smaller is tighter and slower; 1e-4 is dp-accounting's
    /// default.
    pub discretization: f64,
    /// Probability mass allowed outside a composition's window (counted at +∞, so in δ);
    /// dp-accounting's default is 1e-15.
    pub tail_mass: f64,
    /// How each step's loss is put on the grid.
    pub rounding: Rounding,
}

/// How a step's privacy loss is put on the grid `hℤ` ([`discretise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Connect the dots (Doroshenko et al. 2022): the discrete δ(ε) joins the true one at the
    /// grid points by chords; an upper bound, and the tightest on a given grid.
    #[default]
    ConnectTheDots,
    /// Every loss rounded up to the grid: an upper bound that drifts by up to h per composed
    /// step (the "privacy buckets" pessimistic estimate).
    Pessimistic,
    /// Every loss rounded down, the lower tail dropped and the upper tail kept at the top of the
    /// grid: a *lower* bound on ε, for checking the others (never for accounting).
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

/// Largest grid we allocate: 2^23 points. A composition holds two complex vectors of its FFT
/// length (at most this), so 256 MiB at most; the settings of the tests and benchmarks need at
/// most 2^20 (10^6 steps at q = 0.004, σ = 1: 32 MiB).
pub(crate) const MAX_POINTS: u64 = 1 << 23;

/// A discrete privacy-loss distribution: `pmf[j]` is the mass at loss (offset + j)·h, `p_inf` the
/// mass at +∞, `err` the bound on its distribution function's round-off (module documentation).
#[derive(Debug, Clone)]
pub struct Pld {
    h: f64,
    offset: i64,
    pmf: Vec<f64>,
    p_inf: f64,
    err: f64,
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
    /// One step of the sampled Gaussian in one direction, discretised as `options` say.
    pub fn sampled_gaussian(
        q: f64,
        sigma: f64,
        direction: Direction,
        options: &PldOptions,
    ) -> Result<Self, AccountantError> {
        discretise::sampled_gaussian(q, sigma, direction, options)
    }

    /// T-fold self-composition ([`compose`]).
    pub fn self_compose(&self, steps: u64, tail_mass: f64) -> Result<Self, AccountantError> {
        compose(&[(self, steps)], tail_mass)
    }

    /// An upper bound on the true δ(ε).
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        self.discrete_delta(epsilon)
    }

    /// An upper bound on the smallest ε ≥ 0 with true δ(ε) ≤ δ (∞ if the mass at +∞ and the
    /// round-off bound alone reach δ).
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        self.discrete_epsilon_signed(delta).max(0.0)
    }

    /// Mass at +∞ (counted fully in δ).
    pub fn infinity_mass(&self) -> f64 {
        self.p_inf
    }

    /// The carried bound on the distribution function's round-off (added to δ).
    pub fn roundoff_bound(&self) -> f64 {
        self.err
    }

    /// Number of grid points held.
    pub fn len(&self) -> usize {
        self.pmf.len()
    }

    /// Whether no grid point is held (never, for a distribution this module built).
    pub fn is_empty(&self) -> bool {
        self.pmf.is_empty()
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

    /// The smallest ε, negative ones included, with `discrete_delta(ε)` ≤ δ (∞ if p_∞ + err ≥ δ;
    /// the lowest grid point if every ε above it qualifies).
    fn discrete_epsilon_signed(&self, delta: f64) -> f64 {
        let target = delta - self.p_inf - self.err;
        if target <= 0.0 {
            return f64::INFINITY;
        }
        // On [l_{k−1}, l_k) the sum runs over points ≥ k: δ(ε) = A − e^ε·B. Scan down from the
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
}

/// ε(δ) of a heterogeneous composition under add/remove: the groups composed together in each
/// direction, the larger ε.
pub fn epsilon(
    composition: &[SampledGaussian],
    delta: f64,
    options: &PldOptions,
) -> Result<f64, AccountantError> {
    validate_delta(delta)?;
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
    let mut d = 0.0_f64;
    for direction in [Direction::Remove, Direction::Add] {
        let pld = compose_all(composition, direction, options)?;
        d = d.max(pld.delta_for_epsilon(epsilon));
    }
    Ok(d)
}

/// The composition in one direction: each group's step discretised once, all composed by one
/// FFT.
pub fn compose_all(
    composition: &[SampledGaussian],
    direction: Direction,
    options: &PldOptions,
) -> Result<Pld, AccountantError> {
    if composition.is_empty() {
        return Err(AccountantError::EmptyComposition);
    }
    let steps = composition
        .iter()
        .map(|g| {
            Pld::sampled_gaussian(g.sample_rate(), g.noise_multiplier(), direction, options)
                .map(|p| (p, g.steps()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parts: Vec<(&Pld, u64)> = steps.iter().map(|(p, t)| (p, *t)).collect();
    compose(&parts, options.tail_mass)
}
