//! Privacy accountants for DP-SGD: the Poisson-subsampled Gaussian mechanism under
//! add/remove-one neighbours, composed over steps and over jobs on the same dataset.
//!
//! * [`rdp`]: Rényi DP (Mironov, Talwar & Zhang 2019) with the classic (Mironov 2017) and the
//!   Balle et al. 2020 conversions to (ε, δ).
//! * [`pld`]: a privacy-loss-distribution accountant (connect-the-dots discretisation, FFT
//!   composition) to the standard of Google's dp-accounting; its ε is an upper bound, and
//!   [`Accountant::Pld`] reports the smaller of it and RDP's, naming which ([`Guarantee::by`]).
//! * [`distributed`]: the distributed discrete Gaussian of secure aggregation (Kairouz, Liu &
//!   Steinke 2021): each site's noise share, the survivors a release needs, the rounding's
//!   sensitivity, the modulus, and the ε of T rounds.
//! * [`calibrate_noise`]: the smallest noise multiplier that reaches a target ε.
//! * [`opendp_check`]: what OpenDP provides (the Gaussian mechanism's zCDP and the zCDP →
//!   approx-DP conversion), used to cross-check the non-subsampled case. OpenDP has no privacy
//!   amplification by subsampling for RDP/zCDP, so the subsampled accountant is ours.

pub mod distributed;
pub mod opendp_check;
pub mod plan;
pub mod pld;
pub mod rdp;
mod special;

use std::fmt;
use std::str::FromStr;

/// What is wrong with an accountant's input, or why it could not answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountantError {
    #[error("sample rate q = {0} is outside (0, 1]")]
    SampleRate(f64),
    #[error("noise multiplier σ = {0} must be positive and finite")]
    NoiseMultiplier(f64),
    #[error("δ = {0} is outside (0, 1)")]
    Delta(f64),
    #[error("the number of steps must be at least 1")]
    ZeroSteps,
    #[error("target ε = {0} must be positive and finite")]
    TargetEpsilon(f64),
    #[error("no RDP orders given")]
    NoOrders,
    #[error("RDP order α = {0} must be greater than 1")]
    Order(f64),
    #[error("RDP curves to compose must have the same orders and as many values as orders")]
    CurveMismatch,
    #[error("the composition has no steps")]
    EmptyComposition,
    #[error("PLD discretisation interval {0} must be positive and finite")]
    Discretization(f64),
    #[error("PLD grid would need {0} points; use a coarser discretisation or more noise")]
    GridTooLarge(u64),
    #[error("no noise multiplier up to {max_sigma} reaches ε = {target}")]
    Unreachable { target: f64, max_sigma: f64 },
    #[error("numerical failure: {0}")]
    Numerical(&'static str),
    #[error("unknown accountant {0:?}: expected rdp, rdp-classic, pld or pld-pessimistic")]
    UnknownAccountant(String),
    #[error("the clipping norm {0} must be positive and finite")]
    Clip(f64),
    #[error("the grid step (granularity) {0} must be positive and finite")]
    Granularity(f64),
    #[error("the contribution must have at least one coordinate")]
    Dimension,
    #[error("conditional rounding's β = {0} is outside [0, 1)")]
    Beta(f64),
    #[error(
        "each site's noise is {0} grid steps; the distributed discrete Gaussian bound needs at least 0.5"
    )]
    SiteNoise(f64),
    #[error(
        "{minimum} surviving sites required of {expected} expected: need 1 ≤ minimum ≤ expected"
    )]
    Sites { expected: usize, minimum: usize },
    #[error(
        "only {survivors} sites survived the round; releasing its sum needs at least {minimum}"
    )]
    TooFewSurvivors { survivors: usize, minimum: usize },
    #[error(
        "with {survivors} survivors the job would spend ε = {epsilon}, above the planned {planned}"
    )]
    OverBudget {
        survivors: usize,
        epsilon: f64,
        planned: f64,
    },
    #[error("no ring of up to {bits} bits holds the sum without likely wrap-around")]
    Modulus { bits: u32 },
}

pub(crate) fn validate_sample_rate(q: f64) -> Result<(), AccountantError> {
    if q > 0.0 && q <= 1.0 {
        Ok(())
    } else {
        Err(AccountantError::SampleRate(q))
    }
}

pub(crate) fn validate_noise(sigma: f64) -> Result<(), AccountantError> {
    if sigma > 0.0 && sigma.is_finite() {
        Ok(())
    } else {
        Err(AccountantError::NoiseMultiplier(sigma))
    }
}

pub(crate) fn validate_delta(delta: f64) -> Result<(), AccountantError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(AccountantError::Delta(delta))
    }
}

pub(crate) fn validate_steps(steps: u64) -> Result<(), AccountantError> {
    if steps == 0 {
        Err(AccountantError::ZeroSteps)
    } else {
        Ok(())
    }
}

/// `steps` steps of the Poisson-subsampled Gaussian mechanism with one (q, σ).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledGaussian {
    sample_rate: f64,
    noise_multiplier: f64,
    steps: u64,
}

impl SampledGaussian {
    /// Checks 0 < q ≤ 1, 0 < σ < ∞ and T ≥ 1.
    pub fn new(
        sample_rate: f64,
        noise_multiplier: f64,
        steps: u64,
    ) -> Result<Self, AccountantError> {
        validate_sample_rate(sample_rate)?;
        validate_noise(noise_multiplier)?;
        validate_steps(steps)?;
        Ok(Self {
            sample_rate,
            noise_multiplier,
            steps,
        })
    }
    pub fn sample_rate(&self) -> f64 {
        self.sample_rate
    }
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

/// Which accountant turns a composition into (ε, δ).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accountant {
    /// RDP on [`rdp::default_orders`] with the Balle et al. 2020 conversion (Opacus's default).
    Rdp,
    /// RDP with the classic Mironov 2017 conversion (older published tables).
    RdpClassic,
    /// Privacy loss distributions (connect the dots by default, `pld` module documentation),
    /// with RDP beside it: [`epsilon`] reports the smaller of the two upper bounds and names the
    /// one it took, so the answer is never worse than RDP's (and never ∞ where RDP is finite,
    /// e.g. when the PLD grid would be too large).
    Pld(pld::PldOptions),
}

impl Accountant {
    /// The PLD accountant with its default options.
    pub fn pld() -> Self {
        Self::Pld(pld::PldOptions::default())
    }
}

impl fmt::Display for Accountant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rdp => f.write_str("rdp"),
            Self::RdpClassic => f.write_str("rdp-classic"),
            Self::Pld(o) => match o.rounding {
                pld::Rounding::ConnectTheDots => f.write_str("pld"),
                pld::Rounding::Pessimistic => f.write_str("pld-pessimistic"),
                pld::Rounding::Optimistic => f.write_str("pld-optimistic"),
            },
        }
    }
}

impl FromStr for Accountant {
    type Err = AccountantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rdp" => Ok(Self::Rdp),
            "rdp-classic" => Ok(Self::RdpClassic),
            "pld" => Ok(Self::pld()),
            "pld-pessimistic" => Ok(Self::Pld(pld::PldOptions {
                rounding: pld::Rounding::Pessimistic,
                ..pld::PldOptions::default()
            })),
            other => Err(AccountantError::UnknownAccountant(other.to_owned())),
        }
    }
}

/// An (ε, δ) guarantee, the accountant whose bound it is, and the RDP order that gave it (when
/// that accountant is an RDP one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guarantee {
    pub epsilon: f64,
    pub delta: f64,
    pub order: Option<f64>,
    /// The accountant whose bound this is: the one asked for, or [`Accountant::Rdp`] when PLD
    /// was asked for and RDP's bound was the smaller (or PLD had none).
    pub by: Accountant,
}

impl fmt::Display for Guarantee {
    /// `epsilon = 2.381703 (delta = 0.00001, by pld)`, with the optimal order for RDP.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epsilon = {:.6} (delta = {}, by {}",
            self.epsilon, self.delta, self.by
        )?;
        if let Some(order) = self.order {
            write!(f, ", optimal order {order}")?;
        }
        f.write_str(")")
    }
}

/// The RDP curve of a heterogeneous composition on `orders`: the sum of the groups' curves.
pub fn rdp_curve(
    composition: &[SampledGaussian],
    orders: &[f64],
) -> Result<rdp::RdpCurve, AccountantError> {
    let mut groups = composition.iter();
    let first = groups.next().ok_or(AccountantError::EmptyComposition)?;
    let mut curve = rdp::RdpCurve::sampled_gaussian(
        first.sample_rate,
        first.noise_multiplier,
        first.steps,
        orders,
    )?;
    for g in groups {
        let c =
            rdp::RdpCurve::sampled_gaussian(g.sample_rate, g.noise_multiplier, g.steps, orders)?;
        curve = curve.compose(&c)?;
    }
    Ok(curve)
}

/// ε for δ of a composition of sampled-Gaussian groups (one job, or several jobs on the same
/// dataset), by the chosen accountant. For [`Accountant::Pld`] the smaller of the PLD and RDP
/// bounds (both are upper bounds on the same ε), named in [`Guarantee::by`].
pub fn epsilon(
    composition: &[SampledGaussian],
    delta: f64,
    accountant: Accountant,
) -> Result<Guarantee, AccountantError> {
    validate_delta(delta)?;
    let rdp = |conversion, by| -> Result<Guarantee, AccountantError> {
        let (epsilon, order) =
            rdp_curve(composition, &rdp::default_orders())?.epsilon(delta, conversion)?;
        Ok(Guarantee {
            epsilon,
            delta,
            order: Some(order),
            by,
        })
    };
    match accountant {
        Accountant::Rdp => rdp(rdp::Conversion::Balle, accountant),
        Accountant::RdpClassic => rdp(rdp::Conversion::Classic, accountant),
        Accountant::Pld(options) => {
            let by_rdp = rdp(rdp::Conversion::Balle, Accountant::Rdp)?;
            match pld::epsilon(composition, delta, &options) {
                Ok(epsilon) if epsilon < by_rdp.epsilon => Ok(Guarantee {
                    epsilon,
                    delta,
                    order: None,
                    by: accountant,
                }),
                Ok(_) => Ok(by_rdp),
                // A grid too large to hold, or a numerical failure, leaves RDP's bound standing.
                Err(AccountantError::GridTooLarge(_) | AccountantError::Numerical(_)) => Ok(by_rdp),
                Err(e) => Err(e),
            }
        }
    }
}

/// The result of [`calibrate_noise`]: `noise_multiplier` reaches the target; `below` (closer than
/// the tolerance) does not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub noise_multiplier: f64,
    pub epsilon: f64,
    pub below: f64,
    pub epsilon_below: f64,
}

/// The smallest noise multiplier σ (to a relative tolerance `rel_tol`) for which `steps` steps at
/// sampling rate `q` are (target ε, δ)-DP by `accountant`. Bisection: every accountant's ε
/// decreases as σ grows. The returned σ always meets the target (ε(σ) ≤ target is checked, not
/// assumed) and `below` = a σ less than `rel_tol`·σ smaller is checked to miss it.
pub fn calibrate_noise(
    target_epsilon: f64,
    q: f64,
    steps: u64,
    delta: f64,
    accountant: Accountant,
    rel_tol: f64,
) -> Result<Calibration, AccountantError> {
    calibrate_noise_beside(target_epsilon, q, steps, &[], delta, accountant, rel_tol)
}

/// [`calibrate_noise`] for steps that run beside other, fixed mechanisms (a job's DP metric
/// releases): the smallest σ for which the steps *composed with* `beside` meet the target.
/// Refuses when `beside` alone spends the target.
pub fn calibrate_noise_beside(
    target_epsilon: f64,
    q: f64,
    steps: u64,
    beside: &[SampledGaussian],
    delta: f64,
    accountant: Accountant,
    rel_tol: f64,
) -> Result<Calibration, AccountantError> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(AccountantError::TargetEpsilon(target_epsilon));
    }
    validate_sample_rate(q)?;
    validate_steps(steps)?;
    validate_delta(delta)?;
    let rel_tol = if rel_tol > 0.0 && rel_tol < 0.5 {
        rel_tol
    } else {
        1e-6
    };
    const MAX_SIGMA: f64 = 1e4;
    if !beside.is_empty() && epsilon(beside, delta, accountant)?.epsilon >= target_epsilon {
        return Err(AccountantError::Numerical(
            "the job's metric releases alone spend its target ε: raise \
             privacy.metrics_noise_multiplier or the target",
        ));
    }
    let eps = |sigma: f64| -> Result<f64, AccountantError> {
        let mut all = Vec::with_capacity(beside.len() + 1);
        all.push(SampledGaussian::new(q, sigma, steps)?);
        all.extend_from_slice(beside);
        Ok(epsilon(&all, delta, accountant)?.epsilon)
    };
    // Bracket: hi meets the target, lo misses it. For PLD, start from the RDP answer (PLD's ε is
    // never above RDP's, so it meets the target) to keep the PLD grid small.
    let mut hi = match accountant {
        Accountant::Pld(_) => {
            calibrate_noise_beside(
                target_epsilon,
                q,
                steps,
                beside,
                delta,
                Accountant::Rdp,
                1e-3,
            )?
            .noise_multiplier
        }
        _ => 1.0,
    };
    let mut eps_hi = eps(hi)?;
    while eps_hi > target_epsilon {
        hi *= 2.0;
        if hi > MAX_SIGMA {
            return Err(AccountantError::Unreachable {
                target: target_epsilon,
                max_sigma: MAX_SIGMA,
            });
        }
        eps_hi = eps(hi)?;
    }
    let mut lo = hi / 2.0;
    let mut eps_lo = eps(lo)?;
    while eps_lo <= target_epsilon {
        hi = lo;
        eps_hi = eps_lo;
        lo /= 2.0;
        if lo < 1e-6 {
            return Err(AccountantError::Numerical(
                "ε stays below the target as σ → 0",
            ));
        }
        eps_lo = eps(lo)?;
    }
    while hi - lo > rel_tol * hi {
        let mid = 0.5 * (lo + hi);
        let e = eps(mid)?;
        if e <= target_epsilon {
            hi = mid;
            eps_hi = e;
        } else {
            lo = mid;
            eps_lo = e;
        }
    }
    Ok(Calibration {
        noise_multiplier: hi,
        epsilon: eps_hi,
        below: lo,
        epsilon_below: eps_lo,
    })
}
