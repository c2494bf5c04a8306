//! A consortium-statistics job's charge (`kind = "statistics"`): its release is one unsampled
//! Gaussian mechanism (`q = 1`, one step, noise multiplier σ/Δ₂ of the job's `StatsPlan`), so it
//! is recorded as a round's charge is — round 1, one step —, checked against the site's caps
//! first, and anchored in the trail by the same `privacy.spent` ([`crate::spend_anchor`]) before
//! the vector leaves the site.
//!
//! [`SiteLedgers::release_statistics`] is the site's whole release in its private order
//! (schema digest, budget check, read and noise, charge), handing back only a charged release.
//!
//! A statistics job releases once per dataset: a second charge of the same job (a resent task,
//! a node restarted after charging) is refused rather than noised and released again, since a
//! fresh draw of the noise would be a second release of the same data.

use tutela_privacy::accountant::SampledGaussian;
use tutela_privacy::ledger::{Ledger, RoundCharge};
use tutela_privacy::noise::SecureRng;
use tutela_privacy::stats::{StatsAggregation, StatsPlan};
use tutela_protocol::job::StatisticsJobSpec;

use super::{SiteLedgers, accountant};
use crate::data::source::RecordSource;
use crate::data::stats::{StatsRelease, layout_of, release_for_job_with};
use crate::data::{DataError, DatasetSchema};
use crate::dataset::{SchemaDigestMismatch, check_schema_digest};

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
        let unusable =
            |e: tutela_privacy::ledger::LedgerError| StatisticsChargeError::Ledger(e.to_string());
        let _g = self.guard();
        let mut ledger = self
            .open(dataset)
            .map_err(|e| StatisticsChargeError::Ledger(e.to_string()))?;
        let release = self.admissible(&ledger, job_id, dataset, plan)?;
        let charge = ledger
            .record_round_with_metrics(job_id, (1, 1), release, None, Some(rows), now_unix_ms)
            .map_err(unusable)?;
        Ok(StatisticsCharge {
            charge,
            epsilon: plan.epsilon,
            dataset_epsilon: ledger
                .spent(self.budget.delta, accountant(self.budget.accountant))
                .map_err(unusable)?,
        })
    }

    /// [`SiteLedgers::charge_statistics`]'s checks alone, recording nothing: before any record
    /// of the dataset is read.
    pub fn check_statistics(
        &self,
        job_id: &str,
        dataset: &str,
        plan: &StatsPlan,
    ) -> Result<(), StatisticsChargeError> {
        let _g = self.guard();
        let ledger = self
            .open(dataset)
            .map_err(|e| StatisticsChargeError::Ledger(e.to_string()))?;
        self.admissible(&ledger, job_id, dataset, plan).map(|_| ())
    }

    /// The release `plan` makes, if `ledger` (of `dataset`) may be charged with it: the one
    /// place the charge's checks are written.
    fn admissible(
        &self,
        ledger: &Ledger,
        job_id: &str,
        dataset: &str,
        plan: &StatsPlan,
    ) -> Result<SampledGaussian, StatisticsChargeError> {
        use StatisticsChargeError::Refused;
        if let StatsAggregation::Secure { .. } = plan.aggregation {
            // Its ε is the distributed discrete Gaussian's over the survivors, which the ledger's
            // (q, σ, steps) record cannot state yet.
            return Err(Refused(
                "a statistics job under [secure_aggregation] cannot be charged to this site's \
                 ledger yet: its ε is the masked sum's, which the ledger does not record"
                    .into(),
            ));
        }
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
        // The ledger is read already: what `check` refuses is the budget.
        ledger
            .check(
                job_id,
                &[release],
                &caps,
                accountant(self.budget.accountant),
            )
            .map_err(|e| Refused(e.to_string()))?;
        Ok(release)
    }

    /// A statistics job's release at this site, in the order that keeps it private: the job's
    /// schema digest against the site's schema file's, then the budget (before any record is
    /// read), then the read and the noise (`release_for_job`), then the charge. Only a charged
    /// release comes back ([`ChargedRelease`]): the caller anchors its charge in the trail
    /// ([`crate::spend_anchor::anchor_charge`]) and only then sends the vector.
    pub fn release_statistics(
        &self,
        (job_id, dataset): (&str, &str),
        job: &StatisticsJobSpec,
        (schema, site_schema_sha256): (&DatasetSchema, &str),
        source: &mut dyn RecordSource,
        rng: Option<SecureRng>,
        now_unix_ms: i64,
    ) -> Result<ChargedRelease, StatisticsReleaseError> {
        check_schema_digest(job.data.schema_sha256.as_deref(), site_schema_sha256)?;
        let layout = layout_of(schema, source.origin())?;
        let plan = job.plan(&layout).map_err(|e| {
            StatisticsChargeError::Refused(format!("the job's statistics plan: {e}"))
        })?;
        self.check_statistics(job_id, dataset, &plan)?;
        let release = release_for_job_with(source, schema, job, rng)?;
        let rows = usize::try_from(release.rows).unwrap_or(usize::MAX);
        let charge = self.charge_statistics(job_id, dataset, &release.plan, rows, now_unix_ms)?;
        Ok(ChargedRelease { release, charge })
    }
}

/// A statistics release the site's ledger has charged: the only form in which the node hands a
/// vector on (built by [`SiteLedgers::release_statistics`] alone).
#[derive(Debug, Clone)]
pub struct ChargedRelease {
    release: StatsRelease,
    charge: StatisticsCharge,
}

impl ChargedRelease {
    /// The layout, plan and noised vector to send.
    pub fn release(&self) -> &StatsRelease {
        &self.release
    }

    /// The ledger's charge, to anchor as `privacy.spent` before the vector leaves.
    pub fn charge(&self) -> &StatisticsCharge {
        &self.charge
    }
}

/// Why a site does not release a statistics job's vector.
#[derive(Debug, thiserror::Error)]
pub enum StatisticsReleaseError {
    /// The job names another schema file (both digests' prefixes: may leave the site).
    #[error("{0}")]
    SchemaDigest(#[from] SchemaDigestMismatch),
    /// The budget refused it, or the ledger is unusable ([`StatisticsChargeError`] says which
    /// may leave the site).
    #[error("{0}")]
    Charge(#[from] StatisticsChargeError),
    /// The data or schema could not be read: names the file, line and column, for the site's
    /// log only (what leaves is the gate's code for it, never this text).
    #[error("{0}")]
    Data(#[from] DataError),
}
