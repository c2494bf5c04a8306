//! The per-round evaluation metrics a site reports, released under differential privacy.
//!
//! # Why
//!
//! A coordinator chooses the global model it sends a site (after round 0). It can tune that model
//! so that a guessed phrase or record becomes very likely, and watch whether the site's reported
//! validation loss drops: with exact metrics, a membership/content oracle it can query every round
//! (`docs/security-review.md`, "metric oracle"). Under DP, every metric that leaves a site is
//! therefore a DP release charged to the site's ledger.
//!
//! # The mechanism
//!
//! Per privacy unit `i` (a record, document or patient: the job's unit) the node computes the
//! unit's mean loss `ℓ_i` and the fraction `a_i ∈ [0, 1]` of its predictions that were right.
//! It releases three sums, each with sensitivity 1 under adding or removing one unit:
//!
//! * `Σ u_i` with `u_i = clamp(ℓ_i / L_max, 0, 1)` rounded per unit to the grid `2^-10` (rounding
//!   each unit's value keeps it in `[0, 1]`, so the sum's sensitivity stays exactly 1);
//! * `Σ a_i`, rounded per unit likewise;
//! * the number of units `n`.
//!
//! Each sum gets independent exact discrete Gaussian noise ([`crate::noise`]) of standard
//! deviation `σ` (the job's `privacy.metrics_noise_multiplier`, in units of the sensitivity).
//! By CKS20 Theorem 4 each is at most as private-costly as the continuous Gaussian of the same σ,
//! i.e. one step of the sampled Gaussian with `q = 1`: a round's metrics are
//! `SampledGaussian::new(1.0, σ, 3)`, which the ledger records as its own mechanism kind
//! ([`crate::ledger::MechanismKind::Metrics`]) and composes with the DP-SGD steps by the same
//! accountant. The reported mean loss is `L_max · noised Σu / max(noised n, 1)` and the accuracy
//! `noised Σa / max(noised n, 1)`: post-processing, no further cost. Noised values may be negative
//! or above one; a reader clamps them for display only.

use crate::accountant::{AccountantError, SampledGaussian};
use crate::noise::{NoiseError, SecureGaussian, SecureRng};

/// The share of a job's target ε its metric releases get when the job spec states neither
/// `privacy.metrics_noise_multiplier` nor `privacy.metrics_epsilon_share`: σ is calibrated so that
/// every round's metrics alone spend this share of the target, and DP-SGD's σ is calibrated
/// beside them so that both together spend the target (composition is sub-additive, so training
/// keeps more than 90 %).
pub const DEFAULT_METRICS_EPSILON_SHARE: f64 = 0.1;
/// σ of the metrics' noise for a job with an explicit DP-SGD noise multiplier and no target ε
/// (nothing to take a share of), in units of each sum's sensitivity. 10 rounds at δ = 1e-5 cost
/// about ε ≈ 1.1 alone by RDP; with a few hundred validation units the mean loss is precise to
/// about `20 · L_max / n`.
pub const DEFAULT_METRICS_NOISE_MULTIPLIER: f64 = 20.0;
/// The public upper clip of a unit's mean loss when the job spec does not state one (nats): above
/// the loss of a uniform guess over a 4096-token vocabulary (ln 4096 ≈ 8.3).
pub const DEFAULT_METRICS_LOSS_MAX: f64 = 10.0;
/// The sums a round releases: loss, correct predictions, units.
pub const RELEASES_PER_ROUND: u64 = 3;
/// Grid of the per-unit values: 2^-10.
const GRID: f64 = 1.0 / 1024.0;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("privacy.metrics_noise_multiplier = {0} must be finite and at least 1")]
    NoiseMultiplier(f64),
    #[error("privacy.metrics_epsilon_share = {0} must be in (0, 1)")]
    Share(f64),
    #[error("privacy.metrics_loss_max = {0} must be finite and positive")]
    LossMax(f64),
    #[error("metrics noise: {0}")]
    Noise(#[from] NoiseError),
    #[error("metrics accounting: {0}")]
    Accountant(#[from] AccountantError),
}

/// One privacy unit's evaluation: its mean loss and the fraction of its predictions that were
/// right. Both are clipped by the release, so any value (even NaN, treated as `L_max` / 0) is safe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitMetric {
    pub loss: f64,
    pub correct: f64,
}

/// The settings of the release, from the job spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricsRelease {
    noise_multiplier: f64,
    loss_max: f64,
}

/// What leaves the site: noised sums and the means computed from them, with their standard
/// deviations (for people: `loss_mean ± loss_mean_stddev`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoisedMetrics {
    /// Noised unit count, rounded to an integer (may be ≤ 0 for a tiny split).
    pub units: f64,
    /// `L_max · noised Σu / max(noised n, 1)`.
    pub loss_mean: f64,
    /// `noised Σa / max(noised n, 1)`.
    pub accuracy: f64,
    /// σ of the count.
    pub units_stddev: f64,
    /// Approximate σ of `loss_mean` (the sum's noise over the noised count).
    pub loss_mean_stddev: f64,
    /// Approximate σ of `accuracy`.
    pub accuracy_stddev: f64,
}

impl MetricsRelease {
    pub fn new(noise_multiplier: f64, loss_max: f64) -> Result<Self, MetricsError> {
        // At least 1: below it a round's metrics would cost more than a typical DP-SGD round.
        if !(noise_multiplier.is_finite() && noise_multiplier >= 1.0) {
            return Err(MetricsError::NoiseMultiplier(noise_multiplier));
        }
        if !(loss_max.is_finite() && loss_max > 0.0) {
            return Err(MetricsError::LossMax(loss_max));
        }
        Ok(Self {
            noise_multiplier,
            loss_max,
        })
    }

    /// A job's release from its spec's settings (`privacy.metrics_noise_multiplier`,
    /// `metrics_epsilon_share`, `metrics_loss_max`, `target_epsilon`): σ as given; else
    /// calibrated to the share (default [`DEFAULT_METRICS_EPSILON_SHARE`]) of the target; else
    /// (no target) [`DEFAULT_METRICS_NOISE_MULTIPLIER`]. The one place the node, its gate and
    /// `tutela privacy plan` choose it.
    pub fn for_job(
        (noise_multiplier, share, loss_max): (Option<f64>, Option<f64>, Option<f64>),
        target_epsilon: Option<f64>,
        rounds: u64,
        delta: f64,
        accountant: crate::accountant::Accountant,
    ) -> Result<Self, MetricsError> {
        let loss_max = loss_max.unwrap_or(DEFAULT_METRICS_LOSS_MAX);
        match (noise_multiplier, target_epsilon) {
            (Some(sigma), _) => Self::new(sigma, loss_max),
            (None, Some(target)) => Self::calibrated(
                target,
                share.unwrap_or(DEFAULT_METRICS_EPSILON_SHARE),
                rounds,
                delta,
                accountant,
                loss_max,
            ),
            (None, None) => Self::new(DEFAULT_METRICS_NOISE_MULTIPLIER, loss_max),
        }
    }

    /// The release whose σ makes `rounds` rounds of metrics alone spend `share · target_epsilon`
    /// at `delta`, by `accountant`.
    pub fn calibrated(
        target_epsilon: f64,
        share: f64,
        rounds: u64,
        delta: f64,
        accountant: crate::accountant::Accountant,
        loss_max: f64,
    ) -> Result<Self, MetricsError> {
        if !(share.is_finite() && share > 0.0 && share < 1.0) {
            return Err(MetricsError::Share(share));
        }
        let sigma = match crate::accountant::calibrate_noise(
            share * target_epsilon,
            1.0,
            rounds.max(1) * RELEASES_PER_ROUND,
            delta,
            accountant,
            1e-4,
        ) {
            Ok(c) => c.noise_multiplier,
            // A share so small that no σ reaches it on its own (the RDP-to-(ε, δ) conversion
            // has a floor near ln(1/δ)/max order): the largest σ the calibration tries. Its
            // RDP is negligible, so composed with DP-SGD (which is calibrated beside it) the job
            // still meets its target; its metrics are then noise, which is what so small an ε
            // buys.
            Err(crate::accountant::AccountantError::Unreachable { max_sigma, .. }) => max_sigma,
            Err(e) => return Err(e.into()),
        };
        // At least 1 (the sampler's and `new`'s floor): only more noise.
        Self::new(sigma.max(1.0), loss_max)
    }

    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    pub fn loss_max(&self) -> f64 {
        self.loss_max
    }

    /// What `rounds` rounds of metrics cost, as the accountant composes it: the Gaussian mechanism
    /// (`q = 1`) at σ, [`RELEASES_PER_ROUND`] steps a round.
    pub fn mechanism(&self, rounds: u64) -> Result<SampledGaussian, MetricsError> {
        Ok(SampledGaussian::new(
            1.0,
            self.noise_multiplier,
            rounds.max(1) * RELEASES_PER_ROUND,
        )?)
    }

    /// Releases one round's metrics over `units`, with noise from the operating system's
    /// generator.
    pub fn release(&self, units: &[UnitMetric]) -> Result<NoisedMetrics, MetricsError> {
        self.release_with(units, SecureRng::from_os()?)
    }

    /// [`release`](Self::release) with a caller's generator (tests pass a seeded one).
    pub fn release_with(
        &self,
        units: &[UnitMetric],
        rng: SecureRng,
    ) -> Result<NoisedMetrics, MetricsError> {
        let sigma = self.noise_multiplier;
        // 2^-10, or coarser for a σ the sampler would otherwise not take (σ / grid ≤ 2^16).
        let grid = GRID.max(crate::accountant::plan::grid_for(sigma));
        let mut values = SecureGaussian::with_rng(sigma, grid, rng)?;
        let on_grid = |x: f64| -> i64 {
            let x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
            (x / grid).round() as i64
        };
        let loss_grid: i64 = units
            .iter()
            .map(|u| {
                on_grid(if u.loss.is_nan() {
                    1.0
                } else {
                    u.loss / self.loss_max
                })
            })
            .sum();
        let correct_grid: i64 = units.iter().map(|u| on_grid(u.correct)).sum();
        let loss_sum = (loss_grid + values.sample_grid()) as f64 * grid;
        let correct_sum = (correct_grid + values.sample_grid()) as f64 * grid;
        // The count on the grid 2^-10 too (σ/grid must be ≥ 1 and one sampler serves all three),
        // rounded to an integer afterwards: post-processing.
        let count_grid = units.len() as i64 * (1.0 / grid) as i64 + values.sample_grid();
        let count = (count_grid as f64 * grid).round();
        let denominator = count.max(1.0);
        let loss_mean = self.loss_max * loss_sum / denominator;
        let accuracy = correct_sum / denominator;
        Ok(NoisedMetrics {
            units: count,
            loss_mean,
            accuracy,
            units_stddev: sigma,
            loss_mean_stddev: self.loss_max * sigma / denominator,
            accuracy_stddev: sigma / denominator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accountant::{Accountant, epsilon};

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Security review 2026-12-07: a validation split of no unit or of one, and losses outside
    /// `[0, L_max]` (NaN, ±inf, negative, huge), released with the same noise draws as their
    /// clipped values: the release is the clipped one (NaN and +inf count as `L_max`, −inf and
    /// negatives as 0, a NaN accuracy as 0), and every figure is finite with a positive σ.
    #[test]
    fn empty_or_single_unit_splits_and_losses_out_of_range_release_their_clipped_values() {
        let release = ok(MetricsRelease::new(3.0, 10.0));
        let seeded = |units: &[UnitMetric]| {
            ok(release.release_with(units, SecureRng::insecure_from_seed([9; 32])))
        };
        let unit = |loss: f64, correct: f64| UnitMetric { loss, correct };
        for units in [vec![], vec![unit(2.0, 1.0)]] {
            let m = seeded(&units);
            for x in [m.units, m.loss_mean, m.accuracy, m.loss_mean_stddev] {
                assert!(x.is_finite(), "{m:?}");
            }
            assert!(m.loss_mean_stddev > 0.0 && m.accuracy_stddev > 0.0, "{m:?}");
        }
        for (wild, clipped) in [
            (unit(f64::NAN, f64::NAN), unit(10.0, 0.0)),
            (unit(f64::INFINITY, 2.0), unit(10.0, 1.0)),
            (unit(f64::NEG_INFINITY, -1.0), unit(0.0, 0.0)),
            (unit(-3.0, f64::INFINITY), unit(0.0, 1.0)),
            (unit(1e300, 0.5), unit(10.0, 0.5)),
        ] {
            let others = vec![unit(4.0, 1.0); 5];
            let with = |u: UnitMetric| {
                let mut v = others.clone();
                v.push(u);
                seeded(&v)
            };
            assert_eq!(with(wild), with(clipped), "{wild:?}");
        }
    }

    /// The attack of the security review, as a test: the coordinator sends a model under which a
    /// planted record is very likely (loss 0) and everything else is not (loss `L_max`), and
    /// reads one round's reported loss. The best it can do is a threshold between the two worlds'
    /// means; its advantage (true-positive rate − false-positive rate) must stay within what the
    /// charged (ε, δ) allows, `(e^ε − 1 + 2δ) / (e^ε + 1)`, plus Hoeffding's slack at confidence
    /// 1 − 10⁻⁶ over the trials. Without noise the same attack wins every time (checked too, so
    /// the test can fail).
    #[test]
    fn a_planted_record_is_not_revealed_by_one_rounds_metrics_beyond_the_charged_epsilon() {
        // σ = 4: a single round's release far stronger than the defaults give, the attacker's
        // best case.
        let release = ok(MetricsRelease::new(4.0, 10.0));
        let others: Vec<UnitMetric> = (0..200)
            .map(|_| UnitMetric {
                loss: 10.0,
                correct: 0.0,
            })
            .collect();
        let mut with = others.clone();
        with.push(UnitMetric {
            loss: 0.0,
            correct: 1.0,
        });
        let exact =
            |units: &[UnitMetric]| units.iter().map(|u| u.loss).sum::<f64>() / units.len() as f64;
        // Without noise the attack is perfect: the means differ.
        assert!(exact(&with) < exact(&others));

        let trials = 4000u64;
        // The attacker's statistic: the reported loss sum, mean × count, which its model makes
        // lower exactly when the planted record is present.
        let stat = |m: &NoisedMetrics| m.loss_mean * m.units.max(1.0) - 10.0 * m.units;
        let mut seed = 0u64;
        let mut draw = |units: &[UnitMetric]| {
            seed += 1;
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&seed.to_le_bytes());
            stat(&ok(
                release.release_with(units, SecureRng::insecure_from_seed(key))
            ))
        };
        let with_stats: Vec<f64> = (0..trials).map(|_| draw(&with)).collect();
        let without_stats: Vec<f64> = (0..trials).map(|_| draw(&others)).collect();
        // The best threshold for the attacker over a grid (chosen with hindsight: only helps it).
        let mut best: f64 = 0.0;
        for k in -200..=200 {
            let t = k as f64 * 0.25;
            let tpr = with_stats.iter().filter(|&&s| s < t).count() as f64 / trials as f64;
            let fpr = without_stats.iter().filter(|&&s| s < t).count() as f64 / trials as f64;
            best = best.max(tpr - fpr);
        }
        let delta = 1e-5;
        let eps = ok(epsilon(&[ok(release.mechanism(1))], delta, Accountant::Rdp)).epsilon;
        let allowed = (eps.exp() - 1.0 + 2.0 * delta) / (eps.exp() + 1.0);
        // Hoeffding for each rate at 1e-6 / 2 per rate, and 401 thresholds by the union bound.
        let slack = 2.0 * ((2.0 * 401.0 * 2.0 / 1e-6f64).ln() / (2.0 * trials as f64)).sqrt();
        assert!(
            best <= allowed + slack,
            "advantage {best} > allowed {allowed} + slack {slack} (ε = {eps})"
        );
        // And it is small in absolute terms: a round's metrics are not an oracle.
        assert!(best < 0.35, "advantage {best}");
    }

    #[test]
    fn honest_metrics_are_close_with_enough_units_and_may_leave_the_range_for_small_ones() {
        let release = ok(MetricsRelease::new(DEFAULT_METRICS_NOISE_MULTIPLIER, 10.0));
        let units: Vec<UnitMetric> = (0..5000)
            .map(|i| UnitMetric {
                loss: 2.0 + (i % 3) as f64 * 0.5,
                correct: (i % 2) as f64,
            })
            .collect();
        let m = ok(release.release_with(&units, SecureRng::insecure_from_seed([7; 32])));
        assert!(
            (m.loss_mean - 2.5).abs() < 6.0 * m.loss_mean_stddev + 0.01,
            "{m:?}"
        );
        assert!(
            (m.accuracy - 0.5).abs() < 6.0 * m.accuracy_stddev + 0.01,
            "{m:?}"
        );
        assert!((m.units - 5000.0).abs() < 6.0 * m.units_stddev);
        // One unit: the noise dominates; values outside [0, L_max] or [0, 1] are honest.
        let mut outside = false;
        for s in 0..50u8 {
            let m = ok(release.release_with(&units[..1], SecureRng::insecure_from_seed([s; 32])));
            assert!(m.loss_mean.is_finite() && m.accuracy.is_finite());
            outside |= m.loss_mean < 0.0 || m.accuracy > 1.0 || m.accuracy < 0.0;
        }
        assert!(outside);
    }

    #[test]
    fn a_calibrated_release_spends_its_share_of_the_target() {
        let r = ok(MetricsRelease::calibrated(
            3.0,
            DEFAULT_METRICS_EPSILON_SHARE,
            10,
            1e-5,
            Accountant::Rdp,
            10.0,
        ));
        let eps = ok(epsilon(&[ok(r.mechanism(10))], 1e-5, Accountant::Rdp)).epsilon;
        assert!(eps <= 0.3 && eps > 0.29, "{eps}");
    }

    #[test]
    fn a_tiny_share_gets_the_largest_sigma_and_still_releases() {
        let r = ok(MetricsRelease::calibrated(
            0.5,
            0.01,
            10,
            1e-5,
            Accountant::Rdp,
            10.0,
        ));
        assert!(r.noise_multiplier() >= 1000.0, "{}", r.noise_multiplier());
        let units = [UnitMetric {
            loss: 1.0,
            correct: 1.0,
        }; 10];
        let m = ok(r.release_with(&units, SecureRng::insecure_from_seed([3; 32])));
        assert!(m.loss_mean.is_finite() && m.accuracy.is_finite());
    }

    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        assert!(
            MetricsRelease::new(0.5, 10.0)
                .unwrap_err()
                .to_string()
                .contains("privacy.metrics_noise_multiplier")
        );
        assert!(
            MetricsRelease::new(4.0, f64::NAN)
                .unwrap_err()
                .to_string()
                .contains("privacy.metrics_loss_max")
        );
    }
}
