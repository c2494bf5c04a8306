//! Record-level distributed DP at the site (`privacy.mode = "distributed"`): each round is ONE
//! DP-SGD step's worth of work on the site's rows, whose noise is added later, at encoding, as
//! the site's share of the job's noise (`crate::agent::secagg`; the plan is
//! `tutela_privacy::accountant::distributed::RecordLevelPlan`).
//!
//! The two seams of [`crate::train`], new implementations:
//! - the sampler is [`PoissonBatchSampler::for_distributed_step`]: each row with the job's
//!   probability q, one batch per round;
//! - the gradient step is [`ClippedSumStep`]: the per-example clipped sum of DP-SGD
//!   ([`super::clipped_gradient_sum`], the same clipping as local DP-SGD), divided by the job's
//!   expected batch across all sites B, with no noise.
//!
//! With plain SGD at the job's learning rate (the spec refuses anything else), the round's
//! update is `−lr/B · Σ_i clip(∇ℓ_i)`; the survivors' sum of these, plus their noise shares, is
//! one central DP-SGD step, which the coordinator applies as it is.

use super::{
    PoissonBatchSampler, clipped_sum_of_batch, covers_every_parameter, dp_error, ensure_gradients,
};
use crate::data::Table;
use crate::models::Model;
use crate::train::{
    Batch, GradientStep, OptimizerKind, TrainConfig, TrainError, TrainReport, train_local_with,
};
use tutela_privacy::accountant::plan::DpSgdPlan;
use tutela_privacy::ledger::MechanismKind;
use tutela_privacy::noise::SecureRng;
use tutela_privacy::sampling::PoissonSampler;

use super::DpSpend;

impl PoissonBatchSampler {
    /// One Poisson batch per epoch over `n_rows` rows at rate `q` (the job's, the same at every
    /// site), normalised by `expected_batch_size` (the job's expected batch across all sites),
    /// drawn from ChaCha20 keyed by the OS.
    pub fn for_distributed_step(
        n_rows: usize,
        q: f64,
        expected_batch_size: usize,
    ) -> Result<Self, TrainError> {
        let rng = SecureRng::from_os().map_err(|e| dp_error(e.to_string()))?;
        if n_rows == 0 || expected_batch_size == 0 {
            return Err(dp_error(format!(
                "distributed DP needs rows and an expected batch, got {n_rows} rows and batch \
                 size {expected_batch_size}"
            )));
        }
        let sampler =
            PoissonSampler::with_rng(n_rows, q, rng).map_err(|e| dp_error(e.to_string()))?;
        Ok(PoissonBatchSampler {
            sampler,
            steps_per_epoch: 1,
            expected_batch_size,
        })
    }
}

/// The clipped per-example gradient sum over the expected batch, without noise: a site's part
/// of one distributed DP-SGD step (its noise share is added at encoding).
#[derive(Debug)]
pub struct ClippedSumStep {
    clip: f64,
    steps: u64,
    rows_per_slice: Option<i64>,
}

impl ClippedSumStep {
    pub fn new(clip: f64) -> Self {
        ClippedSumStep {
            clip,
            steps: 0,
            rows_per_slice: None,
        }
    }

    /// Steps taken: what the ledger charges.
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }
}

impl GradientStep for ClippedSumStep {
    fn overwrites_gradients(&self) -> bool {
        true
    }

    fn compute_gradients(&mut self, batch: &Batch<'_>) -> Result<f64, TrainError> {
        let rows = batch.inputs.size().first().copied().unwrap_or(0);
        // An empty Poisson batch: the site's part of the step is zero (its noise share is still
        // added at encoding).
        let (parameters, flat, loss_sum) =
            clipped_sum_of_batch(batch, rows, self.clip, &mut self.rows_per_slice)?;
        covers_every_parameter(parameters.len(), batch.parameters.len())?;
        let scale = 1.0 / batch.expected_batch_size.max(1) as f64;
        let grads = ensure_gradients(&parameters)?;
        let mut offset = 0;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for (p, g) in parameters.iter().zip(&grads) {
                let n = p.numel() as i64;
                g.f_view([-1])?
                    .f_copy_(&flat.f_narrow(0, offset, n)?.f_mul_scalar(scale)?)?;
                offset += n;
            }
            Ok(())
        })?;
        self.steps += 1;
        Ok(if rows > 0 {
            loss_sum / rows as f64
        } else {
            0.0
        })
    }
}

/// The round of a site under record-level distributed DP: one Poisson-sampled step at the
/// plan's q, per-example clipping at its C, the sum over the job's expected batch
/// (`config.batch_size`), one plain SGD step at `config.learning_rate`. Returns what ran, for
/// the ledger (charged before the update leaves, as [`MechanismKind::DistributedDpSgd`]).
pub fn train_distributed_step(
    model: &Model,
    data: &Table,
    config: &TrainConfig,
    plan: &DpSgdPlan,
) -> (Result<TrainReport, TrainError>, DpSpend) {
    let mut spend = DpSpend {
        steps: 0,
        sample_rate: plan.sample_rate,
        effective_noise_multiplier: plan.effective_noise_multiplier,
        kind: MechanismKind::DistributedDpSgd,
    };
    // The spec refuses other settings; a view that slipped through must not train something
    // the accountant does not cover.
    let plain_sgd = matches!(config.optimizer, OptimizerKind::Sgd { momentum } if momentum == 0.0)
        && config.weight_decay == 0.0
        && config.epochs == 1;
    if !plain_sgd {
        return (
            Err(dp_error(
                "distributed DP trains one plain SGD step per round (local_epochs = 1, \
                 optimizer = \"sgd\", no momentum or weight decay)"
                    .into(),
            )),
            spend,
        );
    }
    let mut sampler = match PoissonBatchSampler::for_distributed_step(
        data.n_rows,
        plan.sample_rate,
        config.batch_size,
    ) {
        Ok(s) => s,
        Err(e) => return (Err(e), spend),
    };
    let mut step = ClippedSumStep::new(plan.clip);
    let result = train_local_with(model, data, config, &mut sampler, &mut step);
    spend.steps = step.steps_taken();
    tracing::info!(
        steps = spend.steps,
        q = spend.sample_rate,
        clip = plan.clip,
        expected_batch_across_sites = config.batch_size,
        "distributed DP: this site's clipped sum for the round's step is ready (its noise share \
         is added at encoding)"
    );
    (result, spend)
}
