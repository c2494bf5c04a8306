//! Log-space arithmetic and the normal distribution, accurate in the tails.

use std::f64::consts::{LN_2, PI, SQRT_2};

/// log(e^a + e^b) without overflow.
pub(crate) fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// log(e^a - e^b) for a >= b; `None` when a < b (the result would be the log of a negative).
pub(crate) fn log_sub(a: f64, b: f64) -> Option<f64> {
    if a < b {
        return None;
    }
    if b == f64::NEG_INFINITY {
        return Some(a);
    }
    if a == b {
        return Some(f64::NEG_INFINITY);
    }
    // log(e^a - e^b) = b + log(e^(a-b) - 1); for huge a-b, expm1 overflows and the result is a.
    let d = (a - b).exp_m1();
    if d.is_infinite() {
        Some(a)
    } else {
        Some(d.ln() + b)
    }
}

/// log(erfc(x)), finite far into the upper tail where erfc(x) underflows.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        let r = libm::erfc(x);
        if r > 0.0 {
            return r.ln();
        }
    }
    // Laurent series of log(erfc(x)) at infinity (as TF-Privacy's `_log_erfc`):
    // erfc(x) ~ exp(-x^2 - .5/x^2 + .625/x^4 - 37/24/x^6 + 353/64/x^8) / (x sqrt(pi)).
    // At x >= 25 the first omitted term is below 1e-13.
    let x2 = x * x;
    -PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2) - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

/// Φ(z), the standard normal CDF, with full relative accuracy in the lower tail.
pub(crate) fn norm_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / SQRT_2)
}

/// 1 - Φ(z), with full relative accuracy in the upper tail.
pub(crate) fn norm_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / SQRT_2)
}

/// log(0.5) + log_erfc(x), i.e. log(Φ(-x·√2)).
pub(crate) fn log_half_erfc(x: f64) -> f64 {
    -LN_2 + log_erfc(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_add_and_sub_invert_each_other() {
        let s = log_add(2.0_f64.ln(), 3.0_f64.ln());
        assert!((s - 5.0_f64.ln()).abs() < 1e-15);
        let d = log_sub(5.0_f64.ln(), 3.0_f64.ln()).unwrap_or(f64::NAN);
        assert!((d - 2.0_f64.ln()).abs() < 1e-15);
        assert_eq!(log_sub(1.0, 2.0), None);
    }

    #[test]
    fn log_erfc_series_meets_direct_value() {
        // Just below the switch both ways are available: they must agree.
        let direct = libm::erfc(24.0).ln();
        let x2 = 24.0_f64 * 24.0;
        let series = -PI.ln() / 2.0 - 24.0_f64.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
            - 37.0 / 24.0 / (x2 * x2 * x2)
            + 353.0 / 64.0 / (x2 * x2 * x2 * x2);
        assert!((direct - series).abs() < 1e-12, "{direct} vs {series}");
        assert!(log_erfc(40.0).is_finite());
        assert!((log_erfc(1.0) - libm::erfc(1.0).ln()).abs() < 1e-15);
    }
}
