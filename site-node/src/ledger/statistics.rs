//! A consortium-statistics job's charge (`kind = "statistics"`): its release is one unsampled
//! Gaussian mechanism (`q = 1`, one step, noise multiplier σ/Δ₂ of the job's `StatsPlan`), so it
//! is recorded as a round's charge is — round 1, one step —, checked against the site's caps
//! first, and anchored in the trail by the same `privacy.spent` ([`crate::spend_anchor`]) before
//! the vector leaves the site.
//!
//! A statistics job releases once per dataset: a second charge of the same job (a resent task,
//! a node restarted after charging) is refused rather than noised and released again, since a
//! fresh draw of the noise would be a second release of the same data.

use tutela_privacy::accountant::SampledGaussian;
use tutela_privacy::ledger::RoundCharge;
use tutela_privacy::stats::{StatsAggregation, StatsPlan};

use super::{SiteLedgers, accountant};

/// What a statistics release charged, for the `privacy.spent` record and the site's log.
#[derive(Debug, Clone, PartialEq)]
pub struct StatisticsCharge {
    pub charge: RoundCharge,
    /// ε of the release at the job's δ (the plan's).
    pub epsilon: f64,
    /// ε of all jobs on the dataset after it, at the site's δ.
    pub dataset_epsilon: f64,
}

/// Why a statistics release was not charged (so must not leave the site).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatisticsChargeError {
    /// Over a cap, charged already, a δ above the site's, or a masked release: figures and the
    /// dataset's name only, so it may be the decline's reason (the gate's `PrivacyBudget`).
    #[error("{0}")]
    Refused(String),
    /// The ledger could not be read or written: the error names its file, so it stays in the
    /// site's log (the gate's `Ledger`).
    #[error("{0}")]
    Ledger(String),
}

impl SiteLedgers {
    /// Checks `plan`'s one release of job `job_id` over `rows` rows of `dataset` against the
    /// site's caps and charges it; the reason for a refusal otherwise. Call before the vector
    /// leaves, then anchor the charge ([`crate::spend_anchor::anchor_charge`]).
    pub fn charge_statistics(
        &self,
        job_id: &str,
        dataset: &str,
        plan: &StatsPlan,
        rows: usize,
        now_unix_ms: i64,
    ) -> Result<StatisticsCharge, StatisticsChargeError> {
        use StatisticsChargeError::{Ledger, Refused};
        if let StatsAggregation::Secure { .. } = plan.aggregation {
            // Its ε is the distributed discrete Gaussian's over the survivors, which the ledger's
            // (q, σ, steps) record cannot state yet.
            return Err(Refused(
                "a statistics job under [secure_aggregation] cannot be charged to this site's \
                 ledger yet: its ε is the masked sum's, which the ledger does not record"
                    .into(),
            ));
        }
        let _g = self.guard();
        let mut ledger = self.open(dataset).map_err(|e| Ledger(e.to_string()))?;
        if let Some(done) = ledger.job(job_id).filter(|j| j.steps() > 0) {
            return Err(Refused(format!(
                "privacy budget: statistics job {job_id} was charged on dataset {dataset:?} \
                 already ({} step(s)); its statistics are released once, not noised and sent \
                 again",
                done.steps()
            )));
        }
        let caps = self.caps(dataset);
        if plan.delta > caps.delta {
            return Err(Refused(format!(
                "the job's δ = {:e} is larger than this site's δ = {:e}; its ε cannot be \
                 compared with the site's caps",
                plan.delta, caps.delta
            )));
        }
        let noise_multiplier = plan.site_noise / plan.sensitivity.l2;
        let release = SampledGaussian::new(1.0, noise_multiplier, 1)
            .map_err(|e| Refused(format!("the job's noise: {e}")))?;
        let acct = accountant(self.budget.accountant);
        // The ledger is read already: what `check` refuses now is the budget.
        ledger
            .check(job_id, &[release], &caps, acct)
            .map_err(|e| Refused(e.to_string()))?;
        let charge = ledger
            .record_round_with_metrics(job_id, (1, 1), release, None, Some(rows), now_unix_ms)
            .map_err(|e| Ledger(e.to_string()))?;
        Ok(StatisticsCharge {
            charge,
            epsilon: plan.epsilon,
            dataset_epsilon: ledger
                .spent(self.budget.delta, acct)
                .map_err(|e| Ledger(e.to_string()))?,
        })
    }
}
