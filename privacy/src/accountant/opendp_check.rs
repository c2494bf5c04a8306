//! What OpenDP provides for our accounting, used as an independent check.
//!
//! OpenDP (0.16, `contrib`) has the Gaussian mechanism's zCDP (ρ = Δ²/(2σ²)), zCDP composition
//! and the zCDP → approx-DP conversion (`make_zCDP_to_approxDP`, the optimal conversion of
//! Canonne, Kamath & Steinke 2020, Proposition 12 — algebraically the same bound as Balle et al.
//! 2020 Theorem 21 applied to the RDP curve α·ρ). It has no amplification by Poisson subsampling
//! for RDP/zCDP (a subsampled Gaussian is not zCDP), and no PLD accountant, so the DP-SGD
//! accountant is ours; at q = 1 the two must agree, which the tests check.

use opendp::combinators::{make_composition, make_zCDP_to_approxDP};
use opendp::core::Measurement;
use opendp::domains::AtomDomain;
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::AbsoluteDistance;

use super::{AccountantError, validate_delta, validate_noise, validate_steps};

fn opendp_err(_: opendp::error::Error) -> AccountantError {
    AccountantError::Numerical("OpenDP refused the Gaussian-mechanism accounting")
}

/// OpenDP's composed Gaussian mechanism: a scalar in, a vector of noisy copies out, zCDP.
type ComposedGaussian =
    Measurement<AtomDomain<f64>, AbsoluteDistance<f64>, ZeroConcentratedDivergence, Vec<f64>>;

/// `steps` compositions of OpenDP's Gaussian mechanism (zCDP) on a sensitivity-1 scalar.
fn composed_gaussian(sigma: f64, steps: u64) -> Result<ComposedGaussian, AccountantError> {
    let steps = usize::try_from(steps).map_err(|_| AccountantError::Numerical("too many steps"))?;
    let one = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        AtomDomain::<f64>::new_non_nan(),
        AbsoluteDistance::<f64>::default(),
        sigma,
        None,
    )
    .map_err(opendp_err)?;
    make_composition(vec![one; steps]).map_err(opendp_err)
}

/// ρ of `steps` compositions of OpenDP's Gaussian mechanism with noise scale σ on a
/// sensitivity-1 scalar (OpenDP's own privacy maps).
pub fn gaussian_zcdp_rho(sigma: f64, steps: u64) -> Result<f64, AccountantError> {
    validate_noise(sigma)?;
    validate_steps(steps)?;
    composed_gaussian(sigma, steps)?
        .map(&1.0)
        .map_err(opendp_err)
}

/// ε for δ of `steps` Gaussian mechanisms (no subsampling), by OpenDP's zCDP composition and
/// zCDP → approx-DP conversion.
pub fn gaussian_epsilon(sigma: f64, steps: u64, delta: f64) -> Result<f64, AccountantError> {
    validate_noise(sigma)?;
    validate_steps(steps)?;
    validate_delta(delta)?;
    let approx = make_zCDP_to_approxDP(composed_gaussian(sigma, steps)?).map_err(opendp_err)?;
    approx
        .map(&1.0)
        .map_err(opendp_err)?
        .epsilon(delta)
        .map_err(opendp_err)
}
