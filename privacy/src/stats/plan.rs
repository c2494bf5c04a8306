//! The noise of a statistics query and what it costs: one release of the whole vector, the
//! Gaussian mechanism of the layout's sensitivity, calibrated and accounted by the project's
//! accountants (module documentation of [`super`]).

use crate::accountant::distributed::{DistributedGaussian, Sensitivity, site_noise_share};
use crate::accountant::plan::grid_for;
use crate::accountant::{Accountant, SampledGaussian, calibrate_noise, epsilon};
use crate::noise::{SecureGaussian, SecureRng};

use super::{StatsError, StatsLayout};

/// What a statistics job may spend at each site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatsPrivacy {
    pub target_epsilon: f64,
    pub delta: f64,
    pub accountant: Accountant,
}

/// How the sites' vectors are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsAggregation {
    /// Each site releases its own noised vector; the coordinator adds them.
    Plain,
    /// Secure aggregation: the coordinator sees only the sum of at least `min_survivors` sites'
    /// vectors, each carrying its share of the noise.
    Secure { min_survivors: usize },
}

/// The smallest noise scale a site's share may have, in grid steps, so that the grid is fine
/// (about 2^15 steps per noise standard deviation, [`grid_for`]) and its rounding negligible.
const MIN_SCALE: i64 = 2;

/// A statistics query's noise: each site's standard deviation per coordinate, the grid, and the
/// ε one release spends at each site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatsPlan {
    pub aggregation: StatsAggregation,
    /// One row's bounds (real units).
    pub sensitivity: Sensitivity,
    pub dimension: usize,
    /// The noise standard deviation each site adds to each coordinate (real units).
    pub site_noise: f64,
    /// The noise grid step γ = 1 / [`StatsPlan::scale`] (a power of two).
    pub granularity: f64,
    /// ε of one release at δ, by the accountant named in `by`.
    pub epsilon: f64,
    pub delta: f64,
    pub by: Accountant,
}

impl StatsPlan {
    /// Calibrates the noise for `privacy` over `layout`. Plain: each site's release meets the
    /// target alone. Secure: the sum of `min_survivors` sites' vectors meets it.
    pub fn new(
        layout: &StatsLayout,
        privacy: &StatsPrivacy,
        aggregation: StatsAggregation,
    ) -> Result<Self, StatsError> {
        layout.validate()?;
        let sensitivity = layout.sensitivity();
        let dimension = layout.len();
        let (site_noise, epsilon, by) = match aggregation {
            StatsAggregation::Plain => {
                // One unsampled step of the Gaussian mechanism: q = 1, T = 1.
                let z = calibrate_noise(
                    privacy.target_epsilon,
                    1.0,
                    1,
                    privacy.delta,
                    privacy.accountant,
                    1e-6,
                )?
                .noise_multiplier;
                let g = epsilon(
                    &[SampledGaussian::new(1.0, z, 1)?],
                    privacy.delta,
                    privacy.accountant,
                )?;
                (z * sensitivity.l2, g.epsilon, g.by)
            }
            StatsAggregation::Secure { min_survivors } => {
                let total = calibrate_distributed(
                    privacy.target_epsilon,
                    privacy.delta,
                    sensitivity,
                    dimension,
                    min_survivors,
                )?;
                let share = site_noise_share(total, min_survivors)?;
                let eps = distributed(sensitivity, dimension, share)?.epsilon(
                    1.0,
                    &[(min_survivors, 1)],
                    privacy.delta,
                )?;
                (share, eps.epsilon, eps.by)
            }
        };
        let granularity = grid_for(site_noise);
        if 1.0 / granularity < MIN_SCALE as f64 {
            return Err(StatsError::Privacy(format!(
                "the noise per site ({site_noise}) is too large for the grid: a larger ε, or fewer \
                 columns"
            )));
        }
        Ok(StatsPlan {
            aggregation,
            sensitivity,
            dimension,
            site_noise,
            granularity,
            epsilon,
            delta: privacy.delta,
            by,
        })
    }

    /// Grid steps per unit: the integer scale of [`super::SiteStatistics`].
    pub fn scale(&self) -> i64 {
        (1.0 / self.granularity).round() as i64
    }

    /// ε of a secure-aggregation release whose sum holds `survivors` sites' noise (more
    /// survivors, more noise, less ε); for plain aggregation the plan's ε (each site's own).
    pub fn epsilon_with(&self, survivors: usize) -> Result<f64, StatsError> {
        match self.aggregation {
            StatsAggregation::Plain => Ok(self.epsilon),
            StatsAggregation::Secure { min_survivors } => {
                if survivors < min_survivors {
                    return Err(StatsError::Privacy(format!(
                        "only {survivors} sites' statistics are in the sum; the job needs at \
                         least {min_survivors} to release it"
                    )));
                }
                Ok(
                    distributed(self.sensitivity, self.dimension, self.site_noise)?
                        .epsilon(1.0, &[(survivors, 1)], self.delta)?
                        .epsilon,
                )
            }
        }
    }

    /// Adds this site's noise to its exact `sums` (grid units), from the OS-keyed generator.
    pub fn noise_site(&self, sums: &mut [i64]) -> Result<(), StatsError> {
        self.noise_site_with(sums, SecureRng::from_os()?)
    }

    /// As [`StatsPlan::noise_site`] with a given generator (tests pass a seeded one).
    pub fn noise_site_with(&self, sums: &mut [i64], rng: SecureRng) -> Result<(), StatsError> {
        if sums.len() != self.dimension {
            return Err(StatsError::VectorLength {
                expected: self.dimension,
                found: sums.len(),
            });
        }
        let mut noise = SecureGaussian::with_rng(self.site_noise, self.granularity, rng)?;
        for s in sums.iter_mut() {
            *s = s
                .checked_add(noise.sample_grid())
                .ok_or(StatsError::Overflow)?;
        }
        Ok(())
    }

    /// The standard deviation of the noise in a sum of `sites` sites' vectors (real units): the
    /// sampler's effective σ (never below the plan's) summed in variance.
    pub fn sum_noise(&self, sites: usize) -> f64 {
        // The sampler rounds σ² up by a relative 2^-47 at most; 1e-9 covers it.
        self.site_noise * (1.0 + 1e-9) * (sites as f64).sqrt()
    }
}

fn distributed(
    sensitivity: Sensitivity,
    dimension: usize,
    site_noise: f64,
) -> Result<DistributedGaussian, StatsError> {
    let g = grid_for(site_noise);
    Ok(DistributedGaussian::for_integer_query(
        Sensitivity {
            l2: sensitivity.l2 / g,
            l1: sensitivity.l1 / g,
        },
        g,
        dimension,
        site_noise,
    )?)
}

/// The smallest total noise σ (relative tolerance 1e-6) whose release with `min_survivors`
/// sites' shares meets `target` (ε falls as σ grows).
fn calibrate_distributed(
    target: f64,
    delta: f64,
    sensitivity: Sensitivity,
    dimension: usize,
    min_survivors: usize,
) -> Result<f64, StatsError> {
    if !(target > 0.0 && target.is_finite()) {
        return Err(crate::accountant::AccountantError::TargetEpsilon(target).into());
    }
    let eps = |total: f64| -> Result<f64, StatsError> {
        let share = site_noise_share(total, min_survivors)?;
        Ok(distributed(sensitivity, dimension, share)?
            .epsilon(1.0, &[(min_survivors, 1)], delta)?
            .epsilon)
    };
    let mut hi = sensitivity.l2;
    while eps(hi)? > target {
        hi *= 2.0;
        if hi > 1e6 * sensitivity.l2 {
            return Err(crate::accountant::AccountantError::Unreachable {
                target,
                max_sigma: hi,
            }
            .into());
        }
    }
    let mut lo = hi / 2.0;
    while eps(lo)? <= target {
        hi = lo;
        lo /= 2.0;
        if lo < 1e-6 * sensitivity.l2 {
            return Ok(hi);
        }
    }
    while hi - lo > 1e-6 * hi {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? <= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}
