//! `tutela privacy plan`: DP-SGD settings for one site, suggested from what a site engineer knows
//! (row count, the job's ε and δ, rounds, the model's size), with the signal-to-noise they buy.
//!
//! # What is traded
//!
//! One DP-SGD step sums the clipped per-example gradients of a Poisson batch (expected size `B`,
//! each of norm ≤ C) and adds Gaussian noise of standard deviation `σ·C` per coordinate. Divided
//! by `B·C`, the noise is `σ / B` per coordinate against a signal of at most 1 (all examples
//! agreeing): the **noise-to-signal ratio** `σ / B` that `job status` also reports per round.
//! Over the whole parameter vector the noise's norm is `σ·C·√d` against at most `B·C`, so
//! `B / (σ·√d)` is the best case of the averaged gradient's norm-wise signal-to-noise.
//!
//! For a fixed ε, larger batches raise `B / σ` (σ grows more slowly than `B`), but a small
//! dataset then gives few steps. Over `T` steps noise averages out as `√T`, so the suggestion
//! maximises `√T · B / σ` over batch sizes and local epochs, keeping the sampling rate at most
//! one half (a batch of the whole dataset is no longer subsampled and loses the amplification
//! the accountant counts on) and at least one step per round.

use crate::accountant::plan::{DpSgdInputs, DpSgdPlan};
use crate::accountant::{Accountant, AccountantError};

/// What the site engineer knows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanRequest {
    /// Training rows at the site.
    pub rows: usize,
    pub target_epsilon: f64,
    pub delta: f64,
    pub rounds: usize,
    /// The model's parameter count.
    pub dimension: usize,
    /// The per-example clipping norm C (σ and the ratios do not depend on it).
    pub clip: f64,
    pub accountant: Accountant,
    /// The job's metric releases over all rounds (`crate::metrics`), which every candidate is
    /// calibrated beside; `None` for a job that releases none under DP.
    pub metrics: Option<crate::accountant::SampledGaussian>,
}

/// One candidate: the settings and what they buy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Suggestion {
    pub batch_size: usize,
    pub local_epochs: usize,
    pub plan: DpSgdPlan,
    /// `σ / B`: per-coordinate noise std of the summed gradient over `C·B`.
    pub noise_to_signal: f64,
    /// `B / (σ·√d)`: the averaged gradient's best-case norm signal-to-noise per step.
    pub norm_signal_to_noise: f64,
    /// `√T · B / σ`, what the suggestion maximises.
    pub score: f64,
}

/// The suggestion and the candidates it was chosen from (best first).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanAdvice {
    pub best: Suggestion,
    pub candidates: Vec<Suggestion>,
}

/// The noise-to-signal ratio `σ / B` above which the noise of one step is larger than the
/// largest possible signal on every coordinate: training on such steps mostly follows noise.
pub const SWAMPED: f64 = 1.0;

/// `σ / B`: the noise std of the summed gradient over the clip × expected batch.
pub fn noise_to_signal(noise_multiplier: f64, expected_batch: f64) -> f64 {
    noise_multiplier / expected_batch
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("rows = {0}: a DP-SGD plan needs at least 2 training rows")]
    TooFewRows(usize),
    #[error("rounds must be at least 1")]
    NoRounds,
    #[error("the model's size (parameter count) must be at least 1")]
    NoParameters,
    #[error("no batch size and epoch count reaches ε = {epsilon} at δ = {delta:e}: {last}")]
    Unreachable {
        epsilon: f64,
        delta: f64,
        last: AccountantError,
    },
}

/// The batch sizes tried: powers of two and their 1.5×, from 8 (or 1 for tiny data) to half the
/// rows.
fn batch_sizes(rows: usize) -> Vec<usize> {
    let max = (rows / 2).max(1);
    let mut out = Vec::new();
    let mut b = 1usize;
    while b <= max {
        if b >= 8.min(max) {
            out.push(b);
        }
        let half_step = b + b / 2;
        if b >= 2 && half_step <= max && half_step >= 8.min(max) {
            out.push(half_step);
        }
        b *= 2;
    }
    if !out.contains(&max) {
        out.push(max);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Suggests batch size, local epochs and noise multiplier for `request`.
pub fn suggest(request: &PlanRequest) -> Result<PlanAdvice, PlanError> {
    if request.rows < 2 {
        return Err(PlanError::TooFewRows(request.rows));
    }
    if request.rounds == 0 {
        return Err(PlanError::NoRounds);
    }
    if request.dimension == 0 {
        return Err(PlanError::NoParameters);
    }
    let mut candidates = Vec::new();
    let mut last = None;
    for batch_size in batch_sizes(request.rows) {
        for local_epochs in [1usize, 2, 3, 5] {
            let inputs = DpSgdInputs {
                rows: request.rows,
                batch_size,
                epochs_per_round: local_epochs,
                rounds: request.rounds,
                clip: request.clip,
                dimension: request.dimension,
                target_epsilon: Some(request.target_epsilon),
                noise_multiplier: None,
                delta: request.delta,
                accountant: request.accountant,
                metrics: request.metrics,
            };
            match DpSgdPlan::new(&inputs) {
                Ok(plan) => {
                    let b = batch_size as f64;
                    let sigma = plan.noise_multiplier;
                    candidates.push(Suggestion {
                        batch_size,
                        local_epochs,
                        plan,
                        noise_to_signal: noise_to_signal(sigma, b),
                        norm_signal_to_noise: b / (sigma * (request.dimension as f64).sqrt()),
                        score: (plan.total_steps as f64).sqrt() * b / sigma,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
    }
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    match candidates.first() {
        Some(best) => Ok(PlanAdvice {
            best: *best,
            candidates,
        }),
        None => Err(PlanError::Unreachable {
            epsilon: request.target_epsilon,
            delta: request.delta,
            last: last.unwrap_or(AccountantError::Numerical("no candidate was tried")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(rows: usize, epsilon: f64) -> PlanRequest {
        PlanRequest {
            rows,
            target_epsilon: epsilon,
            delta: 1e-5,
            rounds: 10,
            dimension: 1000,
            clip: 1.0,
            accountant: Accountant::Rdp,
            metrics: None,
        }
    }

    #[test]
    fn the_suggestion_meets_the_target_and_is_the_best_candidate() {
        let advice = suggest(&request(100, 3.0)).unwrap();
        let best = advice.best;
        assert!(best.plan.planned_epsilon <= 3.0 + 1e-9, "{best:?}");
        assert!(best.batch_size <= 50 && best.batch_size >= 8, "{best:?}");
        assert!(best.plan.sample_rate <= 0.5);
        for c in &advice.candidates {
            assert!(c.score <= best.score);
            assert!(c.plan.planned_epsilon <= 3.0 + 1e-9);
        }
        // The reported ratios are the plan's own σ and B.
        let sigma = best.plan.noise_multiplier;
        assert!((best.noise_to_signal - sigma / best.batch_size as f64).abs() < 1e-12);
        assert!(
            (best.norm_signal_to_noise - best.batch_size as f64 / (sigma * 1000f64.sqrt())).abs()
                < 1e-12
        );
    }

    #[test]
    fn a_larger_site_or_a_larger_budget_gets_a_better_signal() {
        let small = suggest(&request(100, 3.0)).unwrap().best;
        let large = suggest(&request(10_000, 3.0)).unwrap().best;
        let generous = suggest(&request(100, 30.0)).unwrap().best;
        assert!(
            large.noise_to_signal < small.noise_to_signal,
            "{small:?} {large:?}"
        );
        assert!(generous.noise_to_signal < small.noise_to_signal);
    }

    #[test]
    fn impossible_requests_say_why() {
        assert!(matches!(
            suggest(&request(1, 3.0)),
            Err(PlanError::TooFewRows(1))
        ));
        let mut r = request(100, 3.0);
        r.rounds = 0;
        assert!(matches!(suggest(&r), Err(PlanError::NoRounds)));
        let err = suggest(&request(100, -1.0)).unwrap_err().to_string();
        assert!(err.contains("ε = -1"), "{err}");
    }

    #[test]
    fn batch_sizes_stay_within_half_the_rows() {
        assert_eq!(batch_sizes(100), vec![8, 12, 16, 24, 32, 48, 50]);
        assert_eq!(batch_sizes(4), vec![2]);
        assert!(batch_sizes(10_000).iter().all(|&b| (8..=5000).contains(&b)));
    }
}
