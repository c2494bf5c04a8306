//! The node's privacy budget: its caps (`[privacy]` in `node.toml`), the plan of a job's DP-SGD
//! on a dataset, and the per-dataset ledgers ([`tutela_privacy::ledger`]) under
//! `work_dir/privacy-ledger/`.
//!
//! The caps are read from the node config's `[privacy]` section. (The site policy file of the
//! `policy` crate will hold them once it exists; this section is the interim home.)
//!
//! # When the check happens
//!
//! [`SiteLedgers::check`] runs in [`crate::agent::TaskGate::check_task`], before any record of the
//! dataset is read. A job's spend depends on the dataset's size (the sampling rate is
//! `batch_size / rows`), which the node only knows once it has read the data, so:
//! - a dataset the ledger has seen before is planned with the row count the ledger recorded;
//! - a dataset never trained on has spent nothing, and a calibrated job spends at most its
//!   `target_epsilon` whatever the size: both caps are checked against that;
//! - only a job with an explicit `noise_multiplier` on a dataset never trained on is checked
//!   after the read (before any training): [`SiteLedgers::check_with_rows`].
//!
//! In every case [`crate::agent::local_round`] checks again with the real row count before the
//! first step, and [`SiteLedgers::record`] writes each round's steps before the update is
//! uploaded.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tutela_privacy::accountant::plan::{DpSgdInputs, DpSgdPlan};
use tutela_privacy::accountant::{Accountant, SampledGaussian};
use tutela_privacy::at_rest::KeyEncryptionKey;
use tutela_privacy::ledger::{Caps, Ledger, LedgerError};
use tutela_protocol::job::{AccountantName, PrivacyMode, PrivacySpec};

use crate::dp::DpSpend;
use crate::jobspec::JobView;

/// `[privacy]` in `node.toml`: the site's privacy budget per dataset.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacyBudgetConfig {
    /// ε one job may spend on one dataset. Absent: no per-job cap.
    #[serde(default)]
    pub max_epsilon_per_job: Option<f64>,
    /// ε all jobs together may spend on one dataset. Absent: no total cap.
    #[serde(default)]
    pub max_epsilon_total: Option<f64>,
    /// The δ the caps are stated at.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// `rdp` or `pld`: how the ledger composes jobs.
    #[serde(default)]
    pub accountant: AccountantName,
    /// Refuse jobs whose updates leave the site without DP-SGD (`privacy.mode` other than
    /// `local`). Default: true when a cap is set (such a job's spend is unbounded).
    #[serde(default)]
    pub require_local_dp: Option<bool>,
}

fn default_delta() -> f64 {
    1e-5
}

impl Default for PrivacyBudgetConfig {
    fn default() -> Self {
        PrivacyBudgetConfig {
            max_epsilon_per_job: None,
            max_epsilon_total: None,
            delta: default_delta(),
            accountant: AccountantName::Rdp,
            require_local_dp: None,
        }
    }
}

impl PrivacyBudgetConfig {
    /// Checks the ranges; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in [
            ("privacy.max_epsilon_per_job", self.max_epsilon_per_job),
            ("privacy.max_epsilon_total", self.max_epsilon_total),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return Err(format!("`{key}` must be a finite number > 0, got {v}"));
            }
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "`privacy.delta` must be in (0, 1), got {}",
                self.delta
            ));
        }
        Ok(())
    }

    fn caps(&self) -> Caps {
        Caps {
            per_job_epsilon: self.max_epsilon_per_job,
            total_epsilon: self.max_epsilon_total,
            delta: self.delta,
        }
    }

    fn has_caps(&self) -> bool {
        self.max_epsilon_per_job.is_some() || self.max_epsilon_total.is_some()
    }

    fn requires_local_dp(&self) -> bool {
        self.require_local_dp.unwrap_or(self.has_caps())
    }
}

/// The accountant a name denotes.
pub fn accountant(name: AccountantName) -> Accountant {
    match name {
        AccountantName::Rdp => Accountant::Rdp,
        AccountantName::Pld => Accountant::pld(),
    }
}

/// The job's DP-SGD plan on a dataset of `rows` training rows and a model of `dimension`
/// parameters; `None` when the job does not use DP-SGD.
pub fn plan(job: &JobView, rows: usize, dimension: usize) -> Result<Option<DpSgdPlan>, String> {
    let Some(p) = job
        .privacy
        .as_ref()
        .filter(|p| p.mode == PrivacyMode::Local)
    else {
        return Ok(None);
    };
    plan_for(p, job, rows, dimension).map(Some)
}

fn plan_for(
    p: &PrivacySpec,
    job: &JobView,
    rows: usize,
    dimension: usize,
) -> Result<DpSgdPlan, String> {
    let clip = p
        .max_grad_norm
        .ok_or("`privacy.max_grad_norm` is required with mode = \"local\"")?;
    DpSgdPlan::new(&DpSgdInputs {
        rows,
        batch_size: job.training.batch_size as usize,
        epochs_per_round: job.training.local_epochs as usize,
        rounds: job.rounds() as usize,
        clip,
        dimension,
        target_epsilon: p.target_epsilon,
        noise_multiplier: p.noise_multiplier,
        delta: p.delta,
        accountant: accountant(p.accountant),
    })
    .map_err(|e| format!("planning DP-SGD on {rows} rows: {e}"))
}

/// What one round spent, for the upload's metadata and the operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundSpend {
    /// ε of this round alone (at the job's δ).
    pub round_epsilon: f64,
    /// ε of the job so far on this dataset.
    pub job_epsilon: f64,
    /// ε of all jobs on this dataset (at the site's δ).
    pub dataset_epsilon: f64,
    pub delta: f64,
}

/// The per-dataset ledgers of a node.
pub struct SiteLedgers {
    dir: PathBuf,
    kek: Option<Arc<dyn KeyEncryptionKey>>,
    budget: PrivacyBudgetConfig,
    /// Reads and writes of the ledgers are serialised (a node runs one task at a time, but the
    /// gate and a finishing round may overlap).
    lock: Mutex<()>,
}

impl std::fmt::Debug for SiteLedgers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteLedgers")
            .field("dir", &self.dir)
            .field("encrypted", &self.kek.is_some())
            .field("budget", &self.budget)
            .finish()
    }
}

impl SiteLedgers {
    /// Ledgers under `dir` (created on first write), encrypted with `kek` when given.
    pub fn new(
        dir: impl Into<PathBuf>,
        kek: Option<Arc<dyn KeyEncryptionKey>>,
        budget: PrivacyBudgetConfig,
    ) -> Self {
        SiteLedgers {
            dir: dir.into(),
            kek,
            budget,
            lock: Mutex::new(()),
        }
    }

    pub fn budget(&self) -> &PrivacyBudgetConfig {
        &self.budget
    }

    fn path(&self, dataset: &str) -> PathBuf {
        let ext = if self.kek.is_some() {
            "json.enc"
        } else {
            "json"
        };
        self.dir.join(format!("{dataset}.{ext}"))
    }

    /// The ledger of `dataset`, as on disk now.
    pub fn open(&self, dataset: &str) -> Result<Ledger, LedgerError> {
        Ledger::open(self.path(dataset), dataset, self.kek.clone())
    }

    /// ε every job together has spent on `dataset`, composed by the site's accountant at its
    /// δ: what the site policy's total-budget clause weighs a new job against.
    pub fn spent(&self, dataset: &str) -> Result<f64, LedgerError> {
        let _g = self.guard();
        let budget = self.budget();
        self.open(dataset)?
            .spent(budget.delta, accountant(budget.accountant))
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The gate's check, before any data is read (see the module documentation). `dimension` is
    /// the model's parameter count. Returns the reason for a refusal.
    pub fn check(
        &self,
        job_id: &str,
        dataset: &str,
        job: &JobView,
        dimension: usize,
    ) -> Result<(), String> {
        let _g = self.guard();
        let local = job
            .privacy
            .as_ref()
            .filter(|p| p.mode == PrivacyMode::Local);
        let Some(p) = local else {
            if self.budget.requires_local_dp() {
                return Err(format!(
                    "this site requires DP-SGD (privacy.mode = \"local\") for every job on \
                     dataset {dataset:?}: its privacy budget caps ε (per job {:?}, total {:?} at \
                     δ = {:e}), and an update without local noise has no bounded ε",
                    self.budget.max_epsilon_per_job,
                    self.budget.max_epsilon_total,
                    self.budget.delta
                ));
            }
            return Ok(());
        };
        let ledger = self.open(dataset).map_err(|e| e.to_string())?;
        if let Some(rows) = ledger.rows() {
            return self.check_plan(&ledger, job_id, job, rows, dimension);
        }
        // Never trained on: nothing spent. A calibrated job spends at most its target.
        match (p.noise_multiplier, p.target_epsilon) {
            (None, Some(target)) => {
                let caps = self.budget.caps();
                // The job's target is stated at its δ; the caps at the site's. A target at a
                // larger δ than the site's says nothing about ε at the site's δ.
                if p.delta > caps.delta {
                    return Err(format!(
                        "the job's δ = {:e} is larger than this site's δ = {:e}; its ε cannot be \
                         compared with the site's caps",
                        p.delta, caps.delta
                    ));
                }
                for (what, cap) in [
                    ("per-job", caps.per_job_epsilon),
                    ("total", caps.total_epsilon),
                ] {
                    if let Some(cap) = cap
                        && target > cap
                    {
                        return Err(format!(
                            "privacy budget: job {job_id} plans ε = {target} (δ = {:e}) on \
                             dataset {dataset:?}, over the {what} cap ε ≤ {cap}; dataset spent \
                             so far: ε = 0",
                            p.delta
                        ));
                    }
                }
                Ok(())
            }
            // Explicit σ on a dataset of unknown size: checked after the read, before training.
            _ => Ok(()),
        }
    }

    fn check_plan(
        &self,
        ledger: &Ledger,
        job_id: &str,
        job: &JobView,
        rows: usize,
        dimension: usize,
    ) -> Result<(), String> {
        let Some(plan) = plan(job, rows, dimension)? else {
            return Ok(());
        };
        let recorded = ledger.job(job_id).map_or(0, |j| j.steps());
        let remaining = plan
            .total_steps
            .saturating_sub(recorded)
            .max(plan.steps_per_round);
        let mechanism = plan.mechanism(remaining).map_err(|e| e.to_string())?;
        ledger
            .check(
                job_id,
                &[mechanism],
                &self.budget.caps(),
                accountant(self.budget.accountant),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The check again with the dataset's real row count, after the read and before the first
    /// step; returns the plan to train with.
    pub fn check_with_rows(
        &self,
        job_id: &str,
        dataset: &str,
        job: &JobView,
        rows: usize,
        dimension: usize,
    ) -> Result<Option<DpSgdPlan>, String> {
        let _g = self.guard();
        let ledger = self.open(dataset).map_err(|e| e.to_string())?;
        self.check_plan(&ledger, job_id, job, rows, dimension)?;
        plan(job, rows, dimension)
    }

    /// Records a round's spend (what really ran) and returns the ε figures to report.
    pub fn record(
        &self,
        job_id: &str,
        dataset: &str,
        rows: usize,
        plan: &DpSgdPlan,
        spend: &DpSpend,
        now_unix_ms: i64,
    ) -> Result<RoundSpend, String> {
        let _g = self.guard();
        let mut ledger = self.open(dataset).map_err(|e| e.to_string())?;
        let acct = accountant(self.budget.accountant);
        let round_epsilon = if spend.steps > 0 {
            let m = SampledGaussian::new(
                spend.sample_rate,
                spend.effective_noise_multiplier,
                spend.steps,
            )
            .map_err(|e| e.to_string())?;
            ledger
                .record(job_id, m, Some(rows), now_unix_ms)
                .map_err(|e| e.to_string())?;
            tutela_privacy::accountant::epsilon(&[m], plan.delta, plan.accountant)
                .map_err(|e| e.to_string())?
                .epsilon
        } else {
            0.0
        };
        Ok(RoundSpend {
            round_epsilon,
            job_epsilon: ledger
                .spent_by_job(job_id, plan.delta, plan.accountant)
                .map_err(|e| e.to_string())?,
            dataset_epsilon: ledger
                .spent(self.budget.delta, acct)
                .map_err(|e| e.to_string())?,
            delta: plan.delta,
        })
    }
}
