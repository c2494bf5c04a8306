//! One step of the Poisson-subsampled Gaussian mechanism, in one direction, put on the grid `hℤ`.
//!
//! The pair and its loss. With one example removed the dominating pair is
//! (P, Q) = ((1−q)N(0,σ²) + qN(1,σ²), N(0,σ²)) and the loss L(x) = log(dP/dQ)(x) grows with x;
//! with one added it is (N(0,σ²), that mixture) and L(x) = −log(dM/dN0)(x) falls with x (Zhu,
//! Dong & Wang 2022, Theorem 11). Under P, L's distribution function is read off the Gaussians'
//! tails at the output x(l) where the loss equals l ([`output_at_loss`]).
//!
//! The window. As in dp-accounting (`GaussianPrivacyLoss.privacy_loss_tail`), the noise is cut
//! where a Gaussian's tail holds ½·e^−50 (z = −9.7455σ), on both sides of both components: the
//! grid runs from the loss at one end of that range to the loss at the other, rounded outwards.
//! What lies below the lowest point is moved up into it; what lies above the highest goes to +∞
//! (counted in full in every δ). Both moves only raise δ.
//!
//! Connect the dots (Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022, Algorithm 1; the
//! default). The discrete PLD is chosen so that its hockey-stick curve δ(ε), as a function of
//! e^ε, joins the true curve's values at the grid points by straight lines; the true curve is
//! convex in e^ε, so the chords lie above it, and a pair whose curve lies above another's
//! dominates it, also after composition. dp-accounting computes the masses as second
//! differences of δ at the grid points divided by e^h − 1, which loses about four digits at
//! h = 1e-4. Here the same masses are computed bucket by bucket: the P-mass of losses in
//! (a, b] = (a, a+h] is split between a and b so that the Q-mass e^{−l}·P is kept,
//!
//! ```text
//!   to a: ∫_(a,b] (e^{b−l} − 1)/(e^h − 1) dP(l),      to b: the rest of the bucket's P-mass,
//! ```
//!
//! which is algebraically the same pmf (summing the two expressions over the buckets next to a
//! grid point gives the paper's formula), with the down share integrated directly over the
//! output x (Gauss–Legendre, where its integrand is smooth) so that nothing cancels. The bucket's
//! P-mass is a difference of the distribution function taken from its smaller tail, so the pmf
//! telescopes: its distribution function at every grid point is the true one at that loss plus
//! the next bucket's down share, each to a few ulp.
//!
//! [`Rounding::Pessimistic`] puts each bucket's mass at b (the "privacy buckets" pessimistic
//! estimate: a strict upper bound that drifts by up to h per composed step), and
//! [`Rounding::Optimistic`] at a, dropping the lower tail and keeping the upper one at the top:
//! a lower bound, for checks only.

use super::super::special::{norm_cdf, norm_sf};
use super::super::{AccountantError, validate_noise, validate_sample_rate};
use super::{Direction, MAX_POINTS, Pld, PldOptions, Rounding};

/// Φ^{-1}(½·e^{−50}): where dp-accounting cuts each Gaussian's tails (scipy's `norm.ppf`).
const NOISE_TRUNCATION_Z: f64 = -9.745474864965935;

/// The error, in the distribution function, of one discretised step: the tails are erfc values
/// good to a few ulp and a bucket's split is a quadrature good to about 1e-15 of its mass.
const STEP_CDF_ERROR: f64 = 16.0 * f64::EPSILON;

/// Eight-point Gauss–Legendre nodes on [−1, 1] (positive half) and weights.
const GAUSS_LEGENDRE_8: [(f64, f64); 4] = [
    (0.183_434_642_495_649_8, 0.362_683_783_378_362),
    (0.525_532_409_916_329, 0.313_706_645_877_887_3),
    (0.796_666_477_413_626_7, 0.222_381_034_453_374_5),
    (0.960_289_856_497_536_3, 0.101_228_536_290_376_3),
];

/// The sampled Gaussian's loss, density and tails in one direction.
struct SampledGaussianLoss {
    q: f64,
    sigma: f64,
    direction: Direction,
}

impl SampledGaussianLoss {
    /// log(dM/dN0)(x) = log(1 − q + q·e^{(2x−1)/(2σ²)}), without overflow or cancellation.
    fn log_ratio(&self, x: f64) -> f64 {
        let u = (2.0 * x - 1.0) / (2.0 * self.sigma * self.sigma);
        if self.q == 1.0 {
            u
        } else if u > 30.0 {
            u + self.q.ln() + ((1.0 - self.q) * (-u).exp() / self.q).ln_1p()
        } else {
            (self.q * u.exp_m1()).ln_1p()
        }
    }

    fn loss(&self, x: f64) -> f64 {
        match self.direction {
            Direction::Remove => self.log_ratio(x),
            Direction::Add => -self.log_ratio(x),
        }
    }

    fn gaussian_density(&self, z: f64) -> f64 {
        (-0.5 * z * z).exp() / (self.sigma * (2.0 * std::f64::consts::PI).sqrt())
    }

    /// P's density at x.
    fn density(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.direction {
            Direction::Remove => {
                (1.0 - self.q) * self.gaussian_density(x / s)
                    + self.q * self.gaussian_density((x - 1.0) / s)
            }
            Direction::Add => self.gaussian_density(x / s),
        }
    }

    /// The outputs [x₀, x₁] where the loss lies in [a, b] (clamped to ±40σ, beyond which every
    /// density is below 1e-340).
    fn outputs_between(&self, a: f64, b: f64) -> (f64, f64) {
        let (lo, hi) = match self.direction {
            Direction::Remove => (
                output_at_loss(a, self.q, self.sigma),
                output_at_loss(b, self.q, self.sigma),
            ),
            Direction::Add => (
                output_at_loss(-b, self.q, self.sigma),
                output_at_loss(-a, self.q, self.sigma),
            ),
        };
        let limit = 40.0 * self.sigma + 2.0;
        (lo.max(-limit), hi.min(limit))
    }

    /// (P(L ≤ l), P(L > l)), each in the form that is accurate in its own small tail.
    fn tails(&self, l: f64) -> (f64, f64) {
        let (q, s) = (self.q, self.sigma);
        let log_1mq = (-q).ln_1p(); // −∞ when q = 1
        match self.direction {
            Direction::Remove => {
                if l <= log_1mq {
                    return (0.0, 1.0);
                }
                let x = output_at_loss(l, q, s);
                (
                    (1.0 - q) * norm_cdf(x / s) + q * norm_cdf((x - 1.0) / s),
                    (1.0 - q) * norm_sf(x / s) + q * norm_sf((x - 1.0) / s),
                )
            }
            Direction::Add => {
                if -l <= log_1mq {
                    return (1.0, 0.0);
                }
                let x = output_at_loss(-l, q, s);
                (norm_sf(x / s), norm_cdf(x / s))
            }
        }
    }

    /// The share of the P-mass of losses in (a, a+h] that connect-the-dots puts at a:
    /// ∫ (e^{a+h−L} − 1)/(e^h − 1) dP over that bucket, by composite Gauss–Legendre over x with
    /// panels no wider than σ/8.
    fn down_share(&self, a: f64, h: f64) -> f64 {
        let b = a + h;
        let (lo, hi) = self.outputs_between(a, b);
        if lo.is_nan() || hi.is_nan() || hi <= lo {
            return 0.0;
        }
        let scale = h.exp_m1();
        let weight = |x: f64| ((b - self.loss(x)).clamp(0.0, h)).exp_m1() / scale;
        let panels = (((hi - lo) / (self.sigma / 8.0)).ceil() as usize).clamp(1, 1 << 16);
        let width = (hi - lo) / panels as f64;
        let half = 0.5 * width;
        let mut total = 0.0;
        for k in 0..panels {
            let mid = lo + (k as f64 + 0.5) * width;
            for &(t, w) in &GAUSS_LEGENDRE_8 {
                for x in [mid - half * t, mid + half * t] {
                    total += w * half * self.density(x) * weight(x);
                }
            }
        }
        total
    }

    /// The losses at the ends of the noise window (module documentation), lowest first.
    fn loss_range(&self) -> (f64, f64) {
        let z = NOISE_TRUNCATION_Z * self.sigma;
        match self.direction {
            Direction::Remove => (self.loss(z), self.loss(1.0 - z)),
            Direction::Add => (self.loss(-z), self.loss(z - 1.0)),
        }
    }
}

/// x(l): the output x at which log(dM/dN0)(x) = l (increasing in x); −∞ for l ≤ log(1−q), the
/// loss's infimum.
pub(super) fn output_at_loss(l: f64, q: f64, sigma: f64) -> f64 {
    let arg = l.exp_m1() + q;
    if arg <= 0.0 {
        f64::NEG_INFINITY
    } else {
        sigma * sigma * (arg.ln() - q.ln()) + 0.5
    }
}

/// One step of the sampled Gaussian in one direction, on the grid of `options`.
pub(super) fn sampled_gaussian(
    q: f64,
    sigma: f64,
    direction: Direction,
    options: &PldOptions,
) -> Result<Pld, AccountantError> {
    validate_sample_rate(q)?;
    validate_noise(sigma)?;
    let h = options.discretization;
    if !(h > 0.0 && h.is_finite()) {
        return Err(AccountantError::Discretization(h));
    }
    let loss = SampledGaussianLoss {
        q,
        sigma,
        direction,
    };
    let (l_lo, l_hi) = loss.loss_range();
    if !(l_lo.is_finite() && l_hi.is_finite()) {
        return Err(AccountantError::Numerical(
            "the privacy loss at the noise window's ends is not finite",
        ));
    }
    let i_lo = (l_lo / h).floor();
    let i_hi = (l_hi / h).ceil().max(i_lo + 1.0);
    let points = i_hi - i_lo + 1.0;
    if points > MAX_POINTS as f64 {
        return Err(AccountantError::GridTooLarge(points as u64));
    }
    let (i_lo, n) = (i_lo as i64, points as usize);
    let grid: Vec<(f64, f64)> = (0..n)
        .map(|j| loss.tails((i_lo + j as i64) as f64 * h))
        .collect();
    // The P-mass of (x, y], from whichever tail is small there: no cancellation against 1, and
    // the masses telescope.
    let mass = |(cx, sx): (f64, f64), (cy, sy): (f64, f64)| -> f64 {
        let m = if cy < 0.5 { cy - cx } else { sx - sy };
        m.max(0.0)
    };
    let mut pmf = vec![0.0; n];
    let mut p_inf = grid[n - 1].1.max(0.0);
    match options.rounding {
        Rounding::ConnectTheDots => {
            pmf[0] = grid[0].0;
            for (j, w) in grid.windows(2).enumerate() {
                let bucket = mass(w[0], w[1]);
                let a = (i_lo + j as i64) as f64 * h;
                let down = loss.down_share(a, h).clamp(0.0, bucket);
                pmf[j] += down;
                pmf[j + 1] += bucket - down;
            }
        }
        Rounding::Pessimistic => {
            pmf[0] = grid[0].0;
            for (j, w) in grid.windows(2).enumerate() {
                pmf[j + 1] += mass(w[0], w[1]);
            }
        }
        Rounding::Optimistic => {
            for (j, w) in grid.windows(2).enumerate() {
                pmf[j] += mass(w[0], w[1]);
            }
            pmf[n - 1] += p_inf;
            p_inf = 0.0;
        }
    }
    Ok(Pld {
        h,
        offset: i_lo,
        pmf,
        p_inf,
        err: STEP_CDF_ERROR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucketwise split gives dp-accounting's formula: the discrete curve passes through the
    /// exact δ at every grid point (checked against δ(ε) = P(L > ε) − e^ε·Q(L > ε) computed from
    /// the Gaussians' tails).
    #[test]
    fn connect_the_dots_passes_through_the_exact_curve() {
        let (q, sigma) = (0.05, 0.9);
        for direction in [Direction::Remove, Direction::Add] {
            let options = PldOptions {
                discretization: 1e-3,
                ..PldOptions::default()
            };
            let pld = sampled_gaussian(q, sigma, direction, &options).unwrap();
            for eps in [0.0, 0.01, 0.05, 0.1, 0.2] {
                let x = output_at_loss(
                    if direction == Direction::Remove {
                        eps
                    } else {
                        -eps
                    },
                    q,
                    sigma,
                );
                let sf = |z: f64| norm_sf(z);
                let cdf = |z: f64| norm_cdf(z);
                let exact = match direction {
                    Direction::Remove => {
                        (1.0 - q) * sf(x / sigma) + q * sf((x - 1.0) / sigma)
                            - eps.exp() * sf(x / sigma)
                    }
                    Direction::Add => {
                        cdf(x / sigma)
                            - eps.exp() * ((1.0 - q) * cdf(x / sigma) + q * cdf((x - 1.0) / sigma))
                    }
                };
                let ours = pld.discrete_delta(eps) - pld.err;
                assert!(
                    (ours - exact).abs() < 1e-12 + 1e-9 * exact,
                    "{direction:?} ε={eps}: {ours} vs exact {exact}"
                );
            }
        }
    }

    #[test]
    fn single_step_pmf_sums_to_one() {
        for rounding in [Rounding::ConnectTheDots, Rounding::Pessimistic] {
            for dir in [Direction::Remove, Direction::Add] {
                let options = PldOptions {
                    rounding,
                    ..PldOptions::default()
                };
                let p = sampled_gaussian(0.01, 1.0, dir, &options).unwrap();
                let total: f64 = p.pmf.iter().sum::<f64>() + p.p_inf;
                assert!((total - 1.0).abs() < 1e-12, "{dir:?}: {total}");
            }
        }
    }
}
