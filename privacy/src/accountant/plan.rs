//! DP-SGD's plan for one job on one dataset: the sampling rate, the number of steps, the noise
//! multiplier (given, or calibrated from a target ε) and the ε the job will spend if it runs to
//! the end. The site node trains with it, the site's ledger checks it against the caps before any
//! data is read, and a site policy can evaluate its clauses on it.
//!
//! # The noise grid and the sensitivity it adds
//!
//! The noise is an exact discrete Gaussian on a grid `g·ℤ` ([`crate::noise::SecureGaussian`]),
//! so the clipped gradient sum is rounded to that grid first (otherwise the output's low bits
//! would reveal the sum's). Rounding each of `d` coordinates moves two neighbouring sums apart by
//! at most `g·√d` more, so the released sum has sensitivity `C + g·√d`, and the accountant is
//! told the **effective** noise multiplier `σ·C / (C + g·√d)`. [`grid_for`] takes `g` as small as
//! the sampler allows (`σ·C / g ∈ (2^15, 2^16]`): the correction is below `σ·√d·2^-15`, about 1%
//! for a 100k-parameter model at σ = 1. A calibrated plan raises σ until the *effective* σ meets
//! the target, so the correction costs noise, never ε.

use super::{
    Accountant, AccountantError, SampledGaussian, calibrate_noise_beside, epsilon, validate_delta,
};

/// What a DP-SGD plan is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdInputs {
    /// Training rows of the site's dataset.
    pub rows: usize,
    /// Expected batch size: Poisson sampling includes each row with `q = batch_size / rows`.
    pub batch_size: usize,
    /// Local epochs per round: `⌈rows / batch_size⌉` steps each.
    pub epochs_per_round: usize,
    pub rounds: usize,
    /// The per-example clipping norm C.
    pub clip: f64,
    /// Number of model parameters (noised coordinates), for the grid's sensitivity correction.
    pub dimension: usize,
    /// Calibrate σ to this ε when `noise_multiplier` is `None`.
    pub target_epsilon: Option<f64>,
    pub noise_multiplier: Option<f64>,
    pub delta: f64,
    pub accountant: Accountant,
    /// The job's DP metric releases over all its rounds (`crate::metrics`), composed with the
    /// steps: a calibrated σ leaves room for them, and `planned_epsilon` includes them. `None`:
    /// the job releases no metrics under DP (or they are accounted elsewhere).
    pub metrics: Option<SampledGaussian>,
}

/// A DP-SGD plan: how to train, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdPlan {
    pub sample_rate: f64,
    pub steps_per_round: u64,
    pub total_steps: u64,
    pub clip: f64,
    /// σ: the noise's standard deviation is `σ·C` per coordinate.
    pub noise_multiplier: f64,
    /// σ as the accountant sees it, after the grid's sensitivity correction.
    pub effective_noise_multiplier: f64,
    /// The noise grid step g (a power of two).
    pub granularity: f64,
    /// ε the whole job spends at `delta` if every step runs and every round's metrics are
    /// released.
    pub planned_epsilon: f64,
    pub delta: f64,
    pub accountant: Accountant,
    /// The metric releases of the whole job, as in [`DpSgdInputs::metrics`].
    pub metrics: Option<SampledGaussian>,
}

/// The finest grid the discrete Gaussian sampler accepts for standard deviation `sigma_real`:
/// `g = 2^⌈log2(sigma_real) − 16⌉`, so that `sigma_real / g ∈ (2^15, 2^16]`.
pub fn grid_for(sigma_real: f64) -> f64 {
    let e = (sigma_real.log2() - 16.0).ceil();
    let g = 2f64.powi(e as i32);
    // Guard against log2's rounding at exact powers of two: keep the ratio within 2^16.
    if sigma_real / g > 65536.0 { g * 2.0 } else { g }
}

/// σ·C / (C + g·√d): the noise multiplier the accountant must use for noise `σ·C` on a grid `g`.
pub fn effective_noise_multiplier(
    sigma: f64,
    clip: f64,
    granularity: f64,
    dimension: usize,
) -> f64 {
    sigma * clip / (clip + granularity * (dimension as f64).sqrt())
}

impl DpSgdPlan {
    /// Plans a job; errors name what is out of range.
    pub fn new(inputs: &DpSgdInputs) -> Result<Self, AccountantError> {
        validate_delta(inputs.delta)?;
        if inputs.rows == 0 || inputs.batch_size == 0 {
            return Err(AccountantError::SampleRate(0.0));
        }
        if !(inputs.clip.is_finite() && inputs.clip > 0.0) {
            return Err(AccountantError::Numerical(
                "the clipping norm must be a finite number > 0",
            ));
        }
        let sample_rate = (inputs.batch_size as f64 / inputs.rows as f64).min(1.0);
        let steps_per_round =
            (inputs.epochs_per_round * inputs.rows.div_ceil(inputs.batch_size)) as u64;
        let total_steps = steps_per_round * inputs.rounds as u64;
        let (sigma, granularity, sigma_eff) = match (inputs.noise_multiplier, inputs.target_epsilon)
        {
            (Some(sigma), _) => {
                super::validate_noise(sigma)?;
                let g = grid_for(sigma * inputs.clip);
                (
                    sigma,
                    g,
                    effective_noise_multiplier(sigma, inputs.clip, g, inputs.dimension),
                )
            }
            (None, Some(target)) => {
                let needed = calibrate_noise_beside(
                    target,
                    sample_rate,
                    total_steps,
                    inputs.metrics.as_slice(),
                    inputs.delta,
                    inputs.accountant,
                    1e-4,
                )?
                .noise_multiplier;
                // Raise σ until the effective σ meets `needed`; g only grows with σ, so a few
                // iterations settle it.
                let mut sigma = needed;
                let mut g = grid_for(sigma * inputs.clip);
                for _ in 0..8 {
                    let eff = effective_noise_multiplier(sigma, inputs.clip, g, inputs.dimension);
                    if eff >= needed {
                        break;
                    }
                    sigma *= needed / eff;
                    g = grid_for(sigma * inputs.clip);
                }
                let eff = effective_noise_multiplier(sigma, inputs.clip, g, inputs.dimension);
                if eff < needed {
                    return Err(AccountantError::Numerical(
                        "the noise grid's correction did not settle",
                    ));
                }
                (sigma, g, eff)
            }
            (None, None) => return Err(AccountantError::TargetEpsilon(f64::NAN)),
        };
        let mut all = vec![SampledGaussian::new(sample_rate, sigma_eff, total_steps)?];
        all.extend(inputs.metrics);
        let planned_epsilon = epsilon(&all, inputs.delta, inputs.accountant)?.epsilon;
        Ok(DpSgdPlan {
            sample_rate,
            steps_per_round,
            total_steps,
            clip: inputs.clip,
            noise_multiplier: sigma,
            effective_noise_multiplier: sigma_eff,
            granularity,
            planned_epsilon,
            delta: inputs.delta,
            accountant: inputs.accountant,
            metrics: inputs.metrics,
        })
    }

    /// The mechanism of `steps` steps of this plan, as a ledger records it.
    pub fn mechanism(&self, steps: u64) -> Result<SampledGaussian, AccountantError> {
        SampledGaussian::new(self.sample_rate, self.effective_noise_multiplier, steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> DpSgdInputs {
        DpSgdInputs {
            rows: 60_000,
            batch_size: 256,
            epochs_per_round: 1,
            rounds: 15,
            clip: 1.0,
            dimension: 100_000,
            target_epsilon: Some(3.0),
            noise_multiplier: None,
            delta: 1e-5,
            accountant: Accountant::Rdp,
            metrics: None,
        }
    }

    #[test]
    fn grid_keeps_the_ratio_in_the_samplers_range() {
        for s in [1e-3, 0.37, 1.0, 2.0, 3.3, 1024.0, 5e4] {
            let g = grid_for(s);
            let r = s / g;
            assert!(r > 32768.0 && r <= 65536.0, "sigma {s}: ratio {r}");
        }
    }

    #[test]
    fn a_calibrated_plan_meets_its_target_with_the_grid_correction() {
        let plan = DpSgdPlan::new(&inputs()).unwrap();
        assert!(plan.planned_epsilon <= 3.0, "{}", plan.planned_epsilon);
        assert!(plan.planned_epsilon > 2.99, "{}", plan.planned_epsilon);
        assert!(plan.effective_noise_multiplier < plan.noise_multiplier);
        assert_eq!(plan.steps_per_round, 235);
        assert_eq!(plan.total_steps, 235 * 15);
    }

    #[test]
    fn an_explicit_noise_multiplier_gives_its_epsilon() {
        let mut i = inputs();
        i.noise_multiplier = Some(1.1);
        i.target_epsilon = None;
        let plan = DpSgdPlan::new(&i).unwrap();
        assert_eq!(plan.noise_multiplier, 1.1);
        let direct = epsilon(
            &[
                SampledGaussian::new(256.0 / 60_000.0, plan.effective_noise_multiplier, 235 * 15)
                    .unwrap(),
            ],
            1e-5,
            Accountant::Rdp,
        )
        .unwrap()
        .epsilon;
        assert_eq!(plan.planned_epsilon, direct);
    }

    /// A calibrated plan leaves room for the job's metric releases: steps and metrics together
    /// meet the target, so a job that fits its cap still fits it with its metrics.
    #[test]
    fn a_calibrated_plan_with_metrics_meets_its_target_with_them() {
        let metrics = SampledGaussian::new(1.0, 20.0, 3 * 15).unwrap();
        let plain = DpSgdPlan::new(&inputs()).unwrap();
        let with = DpSgdPlan::new(&DpSgdInputs {
            metrics: Some(metrics),
            ..inputs()
        })
        .unwrap();
        assert!(with.noise_multiplier > plain.noise_multiplier);
        assert!(
            with.planned_epsilon <= 3.0 && with.planned_epsilon > 2.9,
            "{}",
            with.planned_epsilon
        );
        let composed = epsilon(
            &[with.mechanism(with.total_steps).unwrap(), metrics],
            1e-5,
            Accountant::Rdp,
        )
        .unwrap()
        .epsilon;
        assert_eq!(composed, with.planned_epsilon);
        // Metrics that alone spend the target are refused.
        let greedy = SampledGaussian::new(1.0, 1.0, 300).unwrap();
        let err = DpSgdPlan::new(&DpSgdInputs {
            metrics: Some(greedy),
            ..inputs()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("metrics_noise_multiplier"),
            "{err}"
        );
    }
}
