//! Rényi-DP of the Poisson-subsampled Gaussian mechanism and its conversions to (ε, δ).
//!
//! The mechanism adds N(0, σ²) noise to a sum of per-example contributions of L2 norm ≤ 1, each
//! example being included independently with probability q. Under add/remove-one neighbours its
//! RDP of order α is bounded by D_α((1−q)·N(0,σ²) + q·N(1,σ²) ‖ N(0,σ²)) (Mironov, Talwar & Zhang
//! 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", Theorem 4; the other
//! direction is never larger, their Theorem 5). We compute A_α = exp((α−1)·D_α) in log space.

use super::AccountantError;
use super::special::{log_add, log_half_erfc, log_sub};

/// Opacus's and TF-Privacy's default orders: `[1 + x/10 for x in 1..100] + [12, ..., 63]`.
pub fn default_orders() -> Vec<f64> {
    // Same float operations as Python's `1 + x / 10.0`, so the orders are bit-identical and the
    // integer ones among them (2.0, 3.0, ...) take the exact integer formula, as there.
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((12..64).map(f64::from));
    orders
}

/// Which RDP → (ε, δ) conversion to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Mironov 2017, Proposition 3: ε = RDP(α) − log δ / (α − 1). What TF-Privacy and Opacus
    /// printed before 2020, and so what older published tables used.
    Classic,
    /// Balle, Barthe, Gaboardi, Hsu & Sato 2020, "Hypothesis testing interpretations and Rényi
    /// differential privacy", Theorem 21: ε = RDP(α) + log((α−1)/α) − (log δ + log α)/(α − 1).
    /// Opacus's `get_privacy_spent`. Never larger than [`Conversion::Classic`] at any order
    /// α > 1, since log((α−1)/α) < 0 < log(α)/(α−1).
    Balle,
}

/// RDP(α) of one step of the sampled Gaussian mechanism with sampling rate `q` and noise
/// multiplier `sigma`. Inputs are assumed validated (0 < q ≤ 1, σ > 0, α > 1).
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: f64) -> Result<f64, AccountantError> {
    if q == 1.0 {
        // No subsampling: the Gaussian mechanism, D_α(N(1,σ²)‖N(0,σ²)) = α/(2σ²).
        return Ok(alpha / (2.0 * sigma * sigma));
    }
    if alpha.is_infinite() {
        return Ok(f64::INFINITY);
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= 1e6 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)?
    };
    Ok(log_a / (alpha - 1.0))
}

/// log A_α for integer α: the binomial expansion of Mironov et al. 2019, Section 3.3, eq. (3):
/// A_α = Σ_{i=0..α} C(α,i) (1−q)^{α−i} q^i exp((i² − i)/(2σ²)). Every term is positive, so a
/// log-sum-exp around the largest term is exact to rounding.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_s2 = 2.0 * sigma * sigma;
    let mut terms = Vec::with_capacity(alpha as usize + 1);
    let mut log_binom = 0.0_f64; // log C(α, 0)
    for i in 0..=alpha {
        if i > 0 {
            // C(α,i) = C(α,i−1)·(α−i+1)/i
            log_binom += ((alpha - i + 1) as f64).ln() - (i as f64).ln();
        }
        let fi = i as f64;
        terms.push(log_binom + fi * log_q + (alpha - i) as f64 * log_1mq + (fi * fi - fi) / two_s2);
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
    max + sum.ln()
}

/// log A_α for fractional α: the two series of Mironov et al. 2019, Section 3.3 (the split of
/// the integral at z₀ = σ² log(1/q − 1) + 1/2 where the two mixture components cross), exactly
/// as TF-Privacy's / Opacus's `_compute_log_a_frac`. Generalised binomial coefficients alternate
/// in sign, hence the signed log-space accumulation; the series stops when both new terms are
/// below e^-30 relative to 1 (their criterion).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> Result<f64, AccountantError> {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let z0 = sigma * sigma * (log_1mq - log_q) + 0.5;
    let s2 = sigma * sigma;
    let denom = std::f64::consts::SQRT_2 * sigma;
    let (mut log_coef, mut coef_positive) = (0.0_f64, true); // C(α, 0) = 1
    for i in 0..100_000u32 {
        let fi = f64::from(i);
        if i > 0 {
            // C(α,i) = C(α,i−1)·(α−i+1)/i; the sign flips whenever α−i+1 < 0.
            let factor = alpha - fi + 1.0;
            if factor == 0.0 {
                // α is a non-negative integer: the series is finite and has ended.
                return Ok(log_add(log_a0, log_a1));
            }
            log_coef += factor.abs().ln() - fi.ln();
            if factor < 0.0 {
                coef_positive = !coef_positive;
            }
        }
        let j = alpha - fi;
        let log_t0 = log_coef + fi * log_q + j * log_1mq;
        let log_t1 = log_coef + j * log_q + fi * log_1mq;
        let log_e0 = log_half_erfc((fi - z0) / denom);
        let log_e1 = log_half_erfc((z0 - j) / denom);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * s2) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * s2) + log_e1;
        if coef_positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0).ok_or(AccountantError::Numerical(
                "fractional-order RDP series went negative (first series)",
            ))?;
            log_a1 = log_sub(log_a1, log_s1).ok_or(AccountantError::Numerical(
                "fractional-order RDP series went negative (second series)",
            ))?;
        }
        if log_s0.max(log_s1) < -30.0 {
            return Ok(log_add(log_a0, log_a1));
        }
    }
    Err(AccountantError::Numerical(
        "fractional-order RDP series did not converge in 100000 terms",
    ))
}

/// An RDP curve: RDP(α) for each order α of a fixed grid.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpCurve {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl RdpCurve {
    /// The curve of `steps` steps of the sampled Gaussian: T·RDP(α) (RDP composes additively,
    /// Mironov 2017, Proposition 1).
    pub fn sampled_gaussian(
        q: f64,
        sigma: f64,
        steps: u64,
        orders: &[f64],
    ) -> Result<Self, AccountantError> {
        super::validate_sample_rate(q)?;
        super::validate_noise(sigma)?;
        super::validate_steps(steps)?;
        validate_orders(orders)?;
        let rdp = orders
            .iter()
            .map(|&a| rdp_sampled_gaussian(q, sigma, a).map(|r| r * steps as f64))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            orders: orders.to_vec(),
            rdp,
        })
    }

    /// A curve from raw values (e.g. another mechanism's), checked for shape.
    pub fn from_parts(orders: Vec<f64>, rdp: Vec<f64>) -> Result<Self, AccountantError> {
        validate_orders(&orders)?;
        if orders.len() != rdp.len() {
            return Err(AccountantError::CurveMismatch);
        }
        Ok(Self { orders, rdp })
    }

    /// The orders α.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// RDP(α) at each order.
    pub fn values(&self) -> &[f64] {
        &self.rdp
    }

    /// Composition with another curve on the same orders (heterogeneous steps, e.g. jobs with
    /// different q or σ on one dataset): RDP adds order by order.
    pub fn compose(&self, other: &Self) -> Result<Self, AccountantError> {
        if self.orders != other.orders {
            return Err(AccountantError::CurveMismatch);
        }
        let rdp = self
            .rdp
            .iter()
            .zip(&other.rdp)
            .map(|(a, b)| a + b)
            .collect();
        Ok(Self {
            orders: self.orders.clone(),
            rdp,
        })
    }

    /// The smallest ε over the orders for which the curve gives (ε, δ)-DP, and that order.
    pub fn epsilon(
        &self,
        delta: f64,
        conversion: Conversion,
    ) -> Result<(f64, f64), AccountantError> {
        super::validate_delta(delta)?;
        let log_delta = delta.ln();
        let mut best = (f64::INFINITY, f64::NAN);
        for (&a, &r) in self.orders.iter().zip(&self.rdp) {
            let eps = match conversion {
                Conversion::Classic => r - log_delta / (a - 1.0),
                Conversion::Balle => r - (log_delta + a.ln()) / (a - 1.0) + (-1.0 / a).ln_1p(),
            };
            if eps < best.0 {
                best = (eps, a);
            }
        }
        if best.1.is_nan() {
            return Err(AccountantError::Numerical("no order gives a finite ε"));
        }
        // A negative value still certifies (0, δ)-DP.
        Ok((best.0.max(0.0), best.1))
    }
}

fn validate_orders(orders: &[f64]) -> Result<(), AccountantError> {
    if orders.is_empty() {
        return Err(AccountantError::NoOrders);
    }
    match orders.iter().find(|&&a| a.is_nan() || a <= 1.0) {
        Some(&a) => Err(AccountantError::Order(a)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_matches_opacus() {
        let o = default_orders();
        assert_eq!(o.len(), 99 + 52);
        assert_eq!(o[0], 1.1);
        assert_eq!(o[9], 2.0);
        assert_eq!(o[98], 10.9);
        assert_eq!(o[99], 12.0);
        assert_eq!(o[150], 63.0);
    }

    #[test]
    fn fractional_formula_agrees_with_integer_formula_at_integers() {
        // The two-series formula is valid at every α; at integers it must reproduce the exact sum.
        for &(q, s) in &[(0.01, 1.0), (0.1, 0.8), (0.004, 1.1), (0.5, 2.0)] {
            for a in [2u64, 3, 5, 10, 32] {
                let int = log_a_int(q, s, a);
                let frac = log_a_frac(q, s, a as f64).unwrap_or(f64::NAN);
                assert!(
                    (int - frac).abs() < 1e-9 * int.abs().max(1e-3),
                    "{q} {s} {a}: {int} {frac}"
                );
            }
        }
    }

    #[test]
    fn rdp_is_continuous_across_integer_orders() {
        let q = 0.01;
        let s = 1.0;
        let at = |a: f64| rdp_sampled_gaussian(q, s, a).unwrap_or(f64::NAN);
        assert!((at(4.0) - at(4.0 + 1e-9)).abs() < 1e-7 * at(4.0));
        assert!((at(4.0) - at(4.0 - 1e-9)).abs() < 1e-7 * at(4.0));
    }

    #[test]
    fn balle_conversion_is_tighter_than_classic() {
        let c = RdpCurve::sampled_gaussian(0.01, 1.0, 1000, &default_orders())
            .unwrap_or_else(|e| panic!("{e}"));
        let (classic, _) = c
            .epsilon(1e-5, Conversion::Classic)
            .unwrap_or_else(|e| panic!("{e}"));
        let (balle, _) = c
            .epsilon(1e-5, Conversion::Balle)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(balle < classic, "{balle} {classic}");
    }
}
