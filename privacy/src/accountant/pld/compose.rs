//! Composition of discrete PLDs by FFT: the sum of T₁ losses of one kind, T₂ of another, ... has
//! the pmf whose Fourier coefficients are the product of the steps' coefficients raised to the
//! powers Tᵢ (repeated squaring), on a grid only as long as the window the Chernoff bound allows.

use rustfft::algorithm::Radix4;
use rustfft::num_complex::Complex64;
use rustfft::{Fft, FftDirection};

use super::super::AccountantError;
use super::{MAX_POINTS, Pld};

/// The composition of `steps` copies of each PLD in `parts` (all on one grid). At most
/// `tail_mass` of the composed loss lies outside the window kept; it is counted at +∞.
pub fn compose(parts: &[(&Pld, u64)], tail_mass: f64) -> Result<Pld, AccountantError> {
    let (first, _) = parts.first().ok_or(AccountantError::EmptyComposition)?;
    let h = first.h;
    for (p, t) in parts {
        if *t == 0 {
            return Err(AccountantError::ZeroSteps);
        }
        if p.h != h || p.pmf.is_empty() {
            return Err(AccountantError::Numerical(
                "PLDs to compose must be non-empty and on the same grid",
            ));
        }
    }
    if let [(p, 1)] = parts {
        return Ok((*p).clone());
    }
    let tail = if tail_mass > 0.0 {
        tail_mass.min(1e-6)
    } else {
        0.0
    };
    // The composed loss's support, in grid indices, and the window the Chernoff bound allows.
    let support_lo: i64 = parts.iter().map(|(p, t)| p.offset * *t as i64).sum();
    let support_hi: i64 = parts
        .iter()
        .map(|(p, t)| (p.offset + p.pmf.len() as i64 - 1) * *t as i64)
        .sum();
    let (mut lo, mut hi) = (support_lo, support_hi);
    if tail > 0.0 {
        let (c_lo, c_hi) = chernoff_window(parts, tail);
        lo = lo.max(c_lo);
        hi = hi.min(c_hi).max(lo);
    }
    let width = (hi - lo + 1) as u64;
    if width > MAX_POINTS {
        return Err(AccountantError::GridTooLarge(width));
    }
    // Powers of two and rustfft's radix-4 algorithm alone: its planner would compile every
    // algorithm it might choose into this crate (about three times the build time, measured)
    // for transforms about twice as fast; the radix-4 ones meet the time target.
    let n = (width as usize).next_power_of_two();
    let forward = Radix4::<f64>::new(n, FftDirection::Forward);
    let inverse = Radix4::<f64>::new(n, FftDirection::Inverse);
    // Per-coefficient round-off of a length-n FFT of a vector of L1 norm s: ≤ 3·log₂n·u·s.
    let eta = 3.0 * (n as f64).log2().max(1.0) * f64::EPSILON;
    let mut product = vec![Complex64::new(1.0, 0.0); n];
    let mut coefficient_error = 0.0;
    let mut buffer = vec![Complex64::new(0.0, 0.0); n];
    for (p, t) in parts {
        buffer.fill(Complex64::new(0.0, 0.0));
        // Folding the pmf modulo n is exact for a circular convolution of length n.
        for (j, &m) in p.pmf.iter().enumerate() {
            buffer[j % n].re += m;
        }
        forward.process(&mut buffer);
        let e = eta * p.pmf.iter().sum::<f64>();
        for (acc, z) in product.iter_mut().zip(&buffer) {
            let (power, bound) = power_with_bound(*z, *t, e);
            *acc *= power;
            coefficient_error += bound;
        }
    }
    let coefficient_sum: f64 = product.iter().map(|z| z.norm()).sum();
    inverse.process(&mut product);
    let scale = 1.0 / n as f64;
    // Position i of the circular result holds the composed index support_lo + i (mod n).
    let pmf: Vec<f64> = (0..width as i64)
        .map(|k| {
            let position = (lo + k - support_lo).rem_euclid(n as i64) as usize;
            (product[position].re * scale).max(0.0)
        })
        .collect();
    // Each output's error ≤ (1/n)·(the coefficients' errors + the inverse transform's own).
    let fft_error = width as f64 * scale * (1.01 * coefficient_error + eta * coefficient_sum);
    // P(some step is +∞) = 1 − Π(1 − p_∞)^T, and what the window leaves out on either side.
    let finite_log: f64 = parts
        .iter()
        .map(|(p, t)| *t as f64 * (-p.p_inf).ln_1p())
        .sum();
    let cut =
        0.5 * tail * (f64::from(u8::from(lo > support_lo)) + f64::from(u8::from(hi < support_hi)));
    Ok(Pld {
        h,
        offset: lo,
        pmf,
        p_inf: (-finite_log.exp_m1() + cut).min(1.0),
        err: parts.iter().map(|(p, t)| *t as f64 * p.err).sum::<f64>() + fft_error,
    })
}

/// z^t by repeated squaring, and a bound on how far it can be from the exact coefficient's t-th
/// power when z itself is off by at most `e`: t·e·(|z| + e)^{t−1}.
fn power_with_bound(z: Complex64, t: u64, e: f64) -> (Complex64, f64) {
    let magnitude = z.norm();
    let tf = t as f64;
    let bound_log = (tf - 1.0) * (magnitude + e).ln() + (tf * e).ln();
    let bound = if bound_log < -745.0 {
        0.0
    } else {
        bound_log.exp()
    };
    if tf * magnitude.ln() < -745.0 {
        // Underflows to zero anyway; skip the squarings.
        return (Complex64::new(0.0, 0.0), bound);
    }
    let (mut result, mut base, mut k) = (Complex64::new(1.0, 0.0), z, t);
    loop {
        if k & 1 == 1 {
            result *= base;
        }
        k >>= 1;
        if k == 0 {
            break;
        }
        base *= base;
    }
    (result, bound)
}

/// The grid indices [lo, hi] outside which the composed loss has at most `tail`/2 on each side,
/// by the Chernoff bound P(S ≥ u) ≤ e^{K(λ) − λu} (λ > 0, and its mirror for λ < 0), where K is
/// the composed loss's log-moment generating function, the sum of the steps' (dp-accounting's
/// `compute_self_convolve_bounds`, with λ searched around the Gaussian optimum instead of a
/// fixed list).
fn chernoff_window(parts: &[(&Pld, u64)], tail: f64) -> (i64, i64) {
    // Each step's pmf around its mean, for a log-sum-exp that neither overflows nor underflows.
    struct Centred {
        centre: f64,
        log_mass: Vec<(f64, f64)>,
        steps: f64,
    }
    let mut variance = 0.0;
    let centred: Vec<Centred> = parts
        .iter()
        .map(|(p, t)| {
            let total: f64 = p.pmf.iter().sum();
            let mean = p
                .pmf
                .iter()
                .enumerate()
                .map(|(j, &m)| j as f64 * m)
                .sum::<f64>()
                / total;
            variance += *t as f64
                * p.pmf
                    .iter()
                    .enumerate()
                    .map(|(j, &m)| (j as f64 - mean).powi(2) * m)
                    .sum::<f64>()
                / total;
            Centred {
                centre: p.offset as f64 + mean,
                log_mass: p
                    .pmf
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m > 0.0)
                    .map(|(j, &m)| (j as f64 - mean, m.ln()))
                    .collect(),
                steps: *t as f64,
            }
        })
        .collect();
    let log_two_over_tail = (2.0 / tail).ln();
    let cumulant = |lambda: f64| -> f64 {
        centred
            .iter()
            .map(|c| {
                let max = c
                    .log_mass
                    .iter()
                    .map(|(d, lm)| lm + lambda * d)
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = c
                    .log_mass
                    .iter()
                    .map(|(d, lm)| (lm + lambda * d - max).exp())
                    .sum();
                c.steps * (lambda * c.centre + max + sum.ln())
            })
            .sum()
    };
    // For a Gaussian of variance V the best λ is √(2·ln(2/tail)/V); search a factor 2^±6 around.
    let best = (2.0 * log_two_over_tail / variance.max(1e-12)).sqrt();
    let (mut lo, mut hi) = (f64::NEG_INFINITY, f64::INFINITY);
    for k in -24..=24 {
        let lambda = best * 2f64.powf(f64::from(k) / 4.0);
        let upper = (cumulant(lambda) + log_two_over_tail) / lambda;
        if upper.is_finite() {
            hi = hi.min(upper.ceil());
        }
        let lower = (cumulant(-lambda) + log_two_over_tail) / -lambda;
        if lower.is_finite() {
            lo = lo.max(lower.floor());
        }
    }
    let clamp = |x: f64, default: i64| {
        if x.is_finite() && x.abs() < 9e15 {
            x as i64
        } else {
            default
        }
    };
    (clamp(lo, i64::MIN / 4), clamp(hi, i64::MAX / 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pld(offset: i64, pmf: Vec<f64>) -> Pld {
        Pld {
            h: 0.1,
            offset,
            pmf,
            p_inf: 0.0,
            err: 0.0,
        }
    }

    #[test]
    fn fft_composition_matches_direct_convolution() {
        let a = pld(
            -3,
            (0..300)
                .map(|i| ((i * 7919) % 101) as f64 / 15_000.0)
                .collect(),
        );
        let b = pld(
            5,
            (0..200)
                .map(|i| ((i * 104_729) % 97) as f64 / 10_000.0)
                .collect(),
        );
        // a*a*b directly.
        let conv = |x: &[f64], y: &[f64]| {
            let mut c = vec![0.0; x.len() + y.len() - 1];
            for (i, u) in x.iter().enumerate() {
                for (j, v) in y.iter().enumerate() {
                    c[i + j] += u * v;
                }
            }
            c
        };
        let direct = conv(&conv(&a.pmf, &a.pmf), &b.pmf);
        let fast = compose(&[(&a, 2), (&b, 1)], 0.0).unwrap();
        assert_eq!(fast.offset, -1);
        assert_eq!(fast.pmf.len(), direct.len());
        let l1: f64 = fast
            .pmf
            .iter()
            .zip(&direct)
            .map(|(x, y)| (x - y).abs())
            .sum();
        assert!(
            l1 <= fast.err,
            "L1 error {l1} above the carried bound {}",
            fast.err
        );
        assert!(fast.err < 1e-10, "{}", fast.err);
    }

    #[test]
    fn window_keeps_all_but_the_tail() {
        // A fair coin on {0, 1}: 10^4 tosses; the window must hold all but 1e-15 of Bin(10^4, ½).
        let coin = pld(0, vec![0.5, 0.5]);
        let many = compose(&[(&coin, 10_000)], 1e-15).unwrap();
        let kept: f64 = many.pmf.iter().sum();
        assert!(kept > 1.0 - 1e-15 - 1e-12, "{kept}");
        assert!(many.pmf.len() < 2_000, "{}", many.pmf.len());
        assert!(many.p_inf >= 1e-15 && many.p_inf < 2e-15);
    }
}
