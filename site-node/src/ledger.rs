//! The node's privacy budget: its caps, the plan of a job's DP-SGD on a dataset, and the
//! per-dataset ledgers ([`tutela_privacy::ledger`]) under `work_dir/privacy-ledger/`.
//!
//! The ε caps have one home, the site policy (`site-policy.toml`: `privacy.max_epsilon_per_job`
//! and `privacy.budget.<dataset>`), which the compliance officers own and the node reloads on
//! change and on SIGHUP; the ledger reads them through [`EpsilonCaps`] at every check, so the
//! policy's clauses and the ledger's composed spend weigh the same numbers. node.toml's
//! `[privacy]` keeps what is the node's own: the δ the caps are stated at, the accountant, and
//! `require_local_dp`; its former cap keys are refused, naming where they moved
//! ([`PrivacyBudgetConfig::moved_caps`]).
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
//! uploaded, as a charge of (job, round, attempt) that the node then records in the audit trail
//! ([`crate::spend_anchor`]).
//!
//! # The job's target
//!
//! Besides the site's caps, one more round of a job must keep the job's ε within its
//! `privacy.target_epsilon` (or its plan's ε when it gives σ): a round the ledger has charged
//! already (a coordinator that resumed, a retried attempt) is normally answered by re-sending the
//! update released for it ([`crate::resend`]), and trained again only while that still fits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tutela_privacy::accountant::distributed::RecordLevelPlan;
use tutela_privacy::accountant::plan::{DpSgdInputs, DpSgdPlan};
use tutela_privacy::accountant::{Accountant, SampledGaussian};
use tutela_privacy::at_rest::KeyEncryptionKey;
use tutela_privacy::ledger::{Caps, Group, Ledger, LedgerError, MechanismKind, RoundCharge};
use tutela_privacy::metrics::MetricsRelease;
use tutela_protocol::job::{AccountantName, PrivacyMode, PrivacySpec};

use crate::budget_identity::records::Stamp;
use crate::budget_identity::sketch::RecordSketch;
use crate::budget_identity::{BudgetSource, IdentityError};
use crate::dp::DpSpend;
use crate::jobspec::JobView;

/// Why a dataset's budget could not be read: its ledger, or its identity (the data could not be
/// read to tell which budget it spends). Typed, so that the gate tells a source gone
/// (`data.unreadable`) from a damaged ledger.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl BudgetError {
    /// Whether the dataset's own data could not be read (not the node's ledger or map).
    pub fn is_source_unreadable(&self) -> bool {
        matches!(
            self,
            BudgetError::Identity(IdentityError::Source { .. } | IdentityError::Records { .. })
        )
    }
}

/// `[privacy]` in `node.toml`: how the node accounts for its privacy budget. The caps themselves
/// are in the site policy ([`EpsilonCaps`]).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacyBudgetConfig {
    /// Read only to be refused, naming where it moved (`privacy.max_epsilon_per_job` of
    /// site-policy.toml): see [`Self::moved_caps`].
    #[serde(default, rename = "max_epsilon_per_job")]
    pub moved_max_epsilon_per_job: Option<f64>,
    /// Read only to be refused (`[privacy.budget]` of site-policy.toml, one line per dataset).
    #[serde(default, rename = "max_epsilon_total")]
    pub moved_max_epsilon_total: Option<f64>,
    /// The δ the caps are stated at.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// `rdp` or `pld`: how the ledger composes jobs.
    #[serde(default)]
    pub accountant: AccountantName,
    /// Refuse jobs whose updates leave the site without DP-SGD (`privacy.mode` other than
    /// `local`). Default: true when a cap is set (such a job's spend is unbounded), except for
    /// record-level distributed DP (charged like DP-SGD); `true` set explicitly refuses that too
    /// (part of its noise comes from the other sites).
    #[serde(default)]
    pub require_local_dp: Option<bool>,
}

fn default_delta() -> f64 {
    1e-5
}

impl Default for PrivacyBudgetConfig {
    fn default() -> Self {
        PrivacyBudgetConfig {
            moved_max_epsilon_per_job: None,
            moved_max_epsilon_total: None,
            delta: default_delta(),
            accountant: AccountantName::Rdp,
            require_local_dp: None,
        }
    }
}

impl PrivacyBudgetConfig {
    /// Checks the ranges; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "`privacy.delta` must be in (0, 1), got {}",
                self.delta
            ));
        }
        Ok(())
    }

    /// The former cap keys this config still sets, each with the lines the site policy needs
    /// instead (`datasets`: the node's dataset names, one `[privacy.budget]` line each):
    /// `(key, lines)`. Refused at start: two homes for one cap could disagree.
    pub fn moved_caps(&self, datasets: &[String]) -> Vec<(&'static str, String)> {
        let mut moved = Vec::new();
        if let Some(v) = self.moved_max_epsilon_per_job {
            moved.push((
                "privacy.max_epsilon_per_job",
                format!("[privacy]\nmax_epsilon_per_job = {}", number(v)),
            ));
        }
        if let Some(v) = self.moved_max_epsilon_total {
            let mut lines = String::from("[privacy.budget]");
            for d in datasets {
                lines.push_str(&format!("\n{d} = {}", number(v)));
            }
            moved.push(("privacy.max_epsilon_total", lines));
        }
        moved
    }

    fn requires_local_dp(&self, caps: &Caps) -> bool {
        self.require_local_dp
            .unwrap_or(caps.per_job_epsilon.is_some() || caps.total_epsilon.is_some())
    }
}

/// A number as TOML and people write it (`3.0`, `0.5`, `20.0`).
fn number(v: f64) -> String {
    let text = v.to_string();
    if text.contains(['.', 'e', 'E', 'i', 'N']) {
        text
    } else {
        format!("{text}.0")
    }
}

/// Where the ledger's ε caps come from, read at every check: the site policy in force
/// ([`tutela_policy::site_policy::ReloadingSitePolicy`]) on a node, fixed caps in tests and tools.
pub trait EpsilonCaps: Send + Sync {
    /// `(per job, total)` ε on `dataset`; `None`: no such cap.
    fn epsilon_caps(&self, dataset: &str) -> (Option<f64>, Option<f64>);
}

/// Caps that do not change; [`FixedCaps::default`] caps nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FixedCaps {
    pub per_job: Option<f64>,
    pub total: Option<f64>,
}

impl EpsilonCaps for FixedCaps {
    fn epsilon_caps(&self, _dataset: &str) -> (Option<f64>, Option<f64>) {
        (self.per_job, self.total)
    }
}

impl EpsilonCaps for tutela_policy::site_policy::ReloadingSitePolicy {
    fn epsilon_caps(&self, dataset: &str) -> (Option<f64>, Option<f64>) {
        let policy = self.current();
        (
            policy.privacy.max_epsilon_per_job,
            policy.privacy.budget.get(dataset).copied(),
        )
    }
}

/// The accountant a name denotes.
pub fn accountant(name: AccountantName) -> Accountant {
    name.accountant()
}

/// The job's DP-SGD plan on a dataset of `rows` training rows and a model of `dimension`
/// parameters; `None` when the job does not use DP-SGD. Under record-level distributed DP it
/// is the job's one plan ([`distributed_plan`]), the same at every site whatever its rows.
pub fn plan(job: &JobView, rows: usize, dimension: usize) -> Result<Option<DpSgdPlan>, String> {
    if let Some(distributed) = distributed_plan(job, dimension)? {
        return Ok(Some(distributed.dp_sgd));
    }
    let Some(p) = job
        .privacy
        .as_ref()
        .filter(|p| p.mode == PrivacyMode::Local)
    else {
        return Ok(None);
    };
    plan_for(p, job, rows, dimension).map(Some)
}

/// The job's record-level distributed DP plan (`tutela_protocol::job::distributed`, the one the
/// coordinator and every site compute from the signed spec) for a model of `dimension`
/// parameters; `None` unless `privacy.mode = "distributed"`.
pub fn distributed_plan(
    job: &JobView,
    dimension: usize,
) -> Result<Option<RecordLevelPlan>, String> {
    let Some(p) = job
        .privacy
        .as_ref()
        .filter(|p| p.mode == PrivacyMode::Distributed)
    else {
        return Ok(None);
    };
    let secure = job.secure_aggregation.as_ref().ok_or(
        "privacy.mode = \"distributed\" requires [secure_aggregation] (each site's noise share \
         protects it only inside the masked sum)",
    )?;
    let min_sites = job
        .min_sites
        .ok_or("privacy.mode = \"distributed\" needs the job's min_sites (the survivors the noise is shared among)")?;
    tutela_protocol::job::distributed::plan_parts(
        p,
        secure,
        (job.training.learning_rate, job.training.batch_size),
        (min_sites, job.rounds()),
        dimension,
    )
    .map(Some)
    .map_err(|e| e.to_string())
}

/// The kind of training step a job's rounds charge.
pub fn training_kind(job: &JobView) -> MechanismKind {
    match job.privacy.as_ref().map(|p| p.mode) {
        Some(PrivacyMode::Distributed) => MechanismKind::DistributedDpSgd,
        _ => MechanismKind::DpSgd,
    }
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
        metrics: Some(
            metrics_release(p, job.rounds() as u64)?
                .mechanism(job.rounds() as u64)
                .map_err(|e| e.to_string())?,
        ),
    })
    .map_err(|e| format!("planning DP-SGD on {rows} rows: {e}"))
}

/// Whether `job` releases its per-round metrics under DP (a DP-SGD job: `privacy.mode =
/// "local"` or `"distributed"`); other jobs' metrics stay exact.
pub fn releases_dp_metrics(job: &JobView) -> bool {
    job.privacy
        .as_ref()
        .is_some_and(|p| matches!(p.mode, PrivacyMode::Local | PrivacyMode::Distributed))
}

/// How a DP job's per-round metrics are released (`tutela_privacy::metrics`): σ from
/// `privacy.metrics_noise_multiplier`, else calibrated so that `rounds` rounds of metrics alone
/// spend `privacy.metrics_epsilon_share` (default 10 %) of the target, else (no target) the
/// default σ. The job's DP-SGD plan is calibrated beside it.
pub fn metrics_release(p: &PrivacySpec, rounds: u64) -> Result<MetricsRelease, String> {
    p.metrics_release(rounds)
        .map_err(|e| format!("the job's metrics release: {e}"))
}

/// One round's metric releases of `plan` (as charged with the round), if it releases any.
pub fn round_metrics(plan: &DpSgdPlan) -> Result<Option<SampledGaussian>, String> {
    plan.metrics
        .map(|m| {
            SampledGaussian::new(
                1.0,
                m.noise_multiplier(),
                tutela_privacy::metrics::RELEASES_PER_ROUND,
            )
        })
        .transpose()
        .map_err(|e| e.to_string())
}

/// What one round spent, for the upload's metadata and the operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundSpend {
    /// The charge written to the ledger (none when no step ran), which the node records in the
    /// audit trail as `privacy.spent` before the update leaves the site.
    pub charge: Option<RoundCharge>,
    /// The dataset's training rows the round sampled from.
    pub rows: usize,
    /// The δ of `dataset_epsilon` (the site's).
    pub dataset_delta: f64,
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
    /// The ε caps (the site policy's), read at every check.
    caps: Arc<dyn EpsilonCaps>,
    /// Each dataset's source, by name: its budget key is what its data determines
    /// ([`crate::budget_identity`]). A dataset not listed is keyed by name.
    sources: BTreeMap<String, BudgetSource>,
    /// The last sketch of each dataset's records, with the source's stamp when it was taken:
    /// reused while the stamp holds, so that a check reads no record of unchanged data.
    sketches: Mutex<BTreeMap<String, (Option<Stamp>, Arc<RecordSketch>)>>,
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
            caps: Arc::new(FixedCaps::default()),
            sources: BTreeMap::new(),
            sketches: Mutex::new(BTreeMap::new()),
            lock: Mutex::new(()),
        }
    }

    /// Caps every dataset's ε by `caps` (without: no caps, the spend is still recorded).
    pub fn with_caps(mut self, caps: Arc<dyn EpsilonCaps>) -> Self {
        self.caps = caps;
        self
    }

    pub fn budget(&self) -> &PrivacyBudgetConfig {
        &self.budget
    }

    /// The caps in force for `dataset`, at the site's δ.
    pub fn caps(&self, dataset: &str) -> Caps {
        let (per_job_epsilon, total_epsilon) = self.caps.epsilon_caps(dataset);
        Caps {
            per_job_epsilon,
            total_epsilon,
            delta: self.budget.delta,
        }
    }

    /// The ledger file of a budget key.
    fn path(&self, key: &str) -> PathBuf {
        let ext = if self.kek.is_some() {
            "json.enc"
        } else {
            "json"
        };
        self.dir.join(format!("{key}.{ext}"))
    }

    /// The ledger of `dataset`'s budget, as on disk now.
    pub fn open(&self, dataset: &str) -> Result<Ledger, BudgetError> {
        let key = self.key(dataset)?;
        Ok(Ledger::open(self.path(&key), &key, self.kek.clone())?)
    }

    /// ε every job together has spent on `dataset`, composed by the site's accountant at its
    /// δ: what the site policy's total-budget clause weighs a new job against.
    pub fn spent(&self, dataset: &str) -> Result<f64, BudgetError> {
        let _g = self.guard();
        let budget = self.budget();
        Ok(self
            .open(dataset)?
            .spent(budget.delta, accountant(budget.accountant))?)
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
        round: u32,
        dataset: &str,
        job: &JobView,
        dimension: usize,
    ) -> Result<(), String> {
        let _g = self.guard();
        let caps = self.caps(dataset);
        if job
            .privacy
            .as_ref()
            .is_some_and(|p| p.mode == PrivacyMode::Distributed)
        {
            // Record-level distributed DP is charged like DP-SGD, so the default lets it pass;
            // a site that set `require_local_dp = true` in so many words does not rely on other
            // sites' noise shares.
            if self.budget.require_local_dp == Some(true) {
                return Err(format!(
                    "this site requires DP-SGD at the site (privacy.mode = \"local\", node.toml's \
                     require_local_dp = true) for every job on dataset {dataset:?}: under \
                     distributed DP part of its rows' noise comes from the other sites"
                ));
            }
            // The job's plan does not depend on the rows, so it is checked whole (every round
            // still to run, at the minimum of survivors) against the caps now, exactly as a
            // local job on a dataset the ledger knows.
            let ledger = self.open(dataset).map_err(|e| e.to_string())?;
            let rows = ledger.rows().unwrap_or(1);
            return self.check_plan(&ledger, dataset, (job_id, round), job, rows, dimension);
        }
        let local = job
            .privacy
            .as_ref()
            .filter(|p| p.mode == PrivacyMode::Local);
        let Some(p) = local else {
            if self.budget.requires_local_dp(&caps) {
                return Err(format!(
                    "this site requires DP-SGD (privacy.mode = \"local\") for every job on \
                     dataset {dataset:?}: its privacy budget caps ε (per job {}, total {} at \
                     δ = {:e}), and an update without local noise has no bounded ε",
                    tutela_protocol::human::optional(caps.per_job_epsilon),
                    tutela_protocol::human::optional(caps.total_epsilon),
                    caps.delta
                ));
            }
            return Ok(());
        };
        let ledger = self.open(dataset).map_err(|e| e.to_string())?;
        if let Some(rows) = ledger.rows() {
            return self.check_plan(&ledger, dataset, (job_id, round), job, rows, dimension);
        }
        // Never trained on: nothing spent. A calibrated job spends at most its target.
        match (p.noise_multiplier, p.target_epsilon) {
            (None, Some(target)) => {
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

    /// `dataset` is the name the site policy's caps are stated under; `ledger` is its budget
    /// (keyed by its data, [`crate::budget_identity`]).
    fn check_plan(
        &self,
        ledger: &Ledger,
        dataset: &str,
        (job_id, round): (&str, u32),
        job: &JobView,
        rows: usize,
        dimension: usize,
    ) -> Result<(), String> {
        let Some(plan) = plan(job, rows, dimension)? else {
            return Ok(());
        };
        within_job_target(ledger, (job_id, round), job, &plan)?;
        let recorded = ledger.job(job_id).map_or(0, |j| j.steps());
        // What is left of the plan's steps (retried attempts use up its reserve, if any), and
        // never less than the rounds still to run from this one: a job whose retries ate the
        // reserve still needs a step per round left, and the caps must hold for all of them.
        let rounds_left = job
            .rounds
            .map_or(1, |r| u64::from(r.saturating_sub(round.max(1))) + 1);
        let remaining = plan
            .total_steps
            .saturating_sub(recorded)
            .max(rounds_left * plan.steps_per_round)
            .max(plan.steps_per_round);
        let mechanism = plan.mechanism(remaining).map_err(|e| e.to_string())?;
        let mut remaining_mechanisms = vec![mechanism];
        // The metrics of every round still to run (at least this one), as for the steps.
        if let Some(m) = plan.metrics {
            let released = ledger.job(job_id).map_or(0, |j| {
                j.groups
                    .iter()
                    .filter(|g| g.kind == MechanismKind::Metrics)
                    .map(|g| g.steps)
                    .sum::<u64>()
            });
            let per_round = tutela_privacy::metrics::RELEASES_PER_ROUND;
            let steps = m.steps().saturating_sub(released).max(per_round);
            remaining_mechanisms.push(
                SampledGaussian::new(1.0, m.noise_multiplier(), steps)
                    .map_err(|e| e.to_string())?,
            );
        }
        ledger
            .check(
                job_id,
                &remaining_mechanisms,
                &self.caps(dataset),
                accountant(self.budget.accountant),
            )
            .map(|_| ())
            .map_err(|e| {
                let retried = retried_attempts(ledger, job_id);
                if retried == 0 {
                    return e.to_string();
                }
                format!(
                    "{e} (the job's spend so far includes {retried} retried round attempt(s), \
                     each charged as it ran; its spec reserves ε for {}: privacy.retry_reserve)",
                    retry_reserve(job)
                )
            })
    }

    /// The check again with the dataset's real row count, after the read and before the first
    /// step; returns the plan to train with.
    pub fn check_with_rows(
        &self,
        job_id: &str,
        round: u32,
        dataset: &str,
        job: &JobView,
        rows: usize,
        dimension: usize,
    ) -> Result<Option<DpSgdPlan>, String> {
        let _g = self.guard();
        let ledger = self.open(dataset).map_err(|e| e.to_string())?;
        self.check_plan(&ledger, dataset, (job_id, round), job, rows, dimension)?;
        plan(job, rows, dimension)
    }

    /// Records a round attempt's spend (what really ran) as a charge and returns the ε figures
    /// to report.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        job_id: &str,
        (round, attempt): (u32, u32),
        dataset: &str,
        rows: usize,
        plan: &DpSgdPlan,
        spend: &DpSpend,
        now_unix_ms: i64,
    ) -> Result<RoundSpend, String> {
        let _g = self.guard();
        let mut ledger = self.open(dataset).map_err(|e| e.to_string())?;
        let acct = accountant(self.budget.accountant);
        let (round_epsilon, charge) = if spend.steps > 0 {
            let m = SampledGaussian::new(
                spend.sample_rate,
                spend.effective_noise_multiplier,
                spend.steps,
            )
            .map_err(|e| e.to_string())?;
            // The round's metrics leave with its update: charged in the same record.
            let metrics = round_metrics(plan)?;
            let charge = ledger
                .record_round_of_kind(
                    job_id,
                    (round, attempt),
                    Group::of(spend.kind, m),
                    metrics,
                    Some(rows),
                    now_unix_ms,
                )
                .map_err(|e| e.to_string())?;
            let mut released = vec![m];
            released.extend(metrics);
            let eps = tutela_privacy::accountant::epsilon(&released, plan.delta, plan.accountant)
                .map_err(|e| e.to_string())?
                .epsilon;
            (eps, Some(charge))
        } else {
            (0.0, None)
        };
        Ok(RoundSpend {
            charge,
            rows,
            dataset_delta: self.budget.delta,
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

/// The job's target: the spend of one more round must keep the job's ε on the dataset within
/// `privacy.target_epsilon` (or, for a job with an explicit noise multiplier and no target, within
/// the ε of its plan: what the officers approved). A round the ledger has charged already (a
/// coordinator that resumed after a crash sends it again, or a failed attempt is retried) is
/// trained again only when it still fits; otherwise the refusal says so.
fn within_job_target(
    ledger: &Ledger,
    (job_id, round): (&str, u32),
    job: &JobView,
    plan: &DpSgdPlan,
) -> Result<(), String> {
    let target = job
        .privacy
        .as_ref()
        .and_then(|p| p.target_epsilon)
        .unwrap_or(plan.planned_epsilon);
    let next = plan
        .mechanism(plan.steps_per_round)
        .map_err(|e| e.to_string())?;
    let mut next_round = vec![Group::of(MechanismKind::DpSgd, next)];
    if let Some(m) = round_metrics(plan)? {
        next_round.push(Group::of(MechanismKind::Metrics, m));
    }
    let after = ledger
        .job_epsilon_after_groups(job_id, &next_round, plan.delta, plan.accountant)
        .map_err(|e| e.to_string())?;
    // The calibration meets the target from below; the slack only absorbs rounding.
    if after <= target * (1.0 + 1e-9) {
        return Ok(());
    }
    let dataset = ledger.dataset();
    let attempts: Vec<String> = ledger
        .job(job_id)
        .map(|j| {
            j.charges_of_round(round)
                .map(|c| c.attempt.to_string())
                .collect()
        })
        .unwrap_or_default();
    let retried = retried_attempts(ledger, job_id);
    if attempts.is_empty() && retried > 0 {
        // Under distributed DP every attempt spends: retries used the job's share for its
        // later rounds once its reserve ran out.
        Err(format!(
            "privacy budget: one more round of job {job_id} would bring its ε on dataset \
             {dataset:?} to {after:.4} (δ = {:e}), over the job's target ε = {target}: {retried} \
             retried round attempt(s) were charged (each attempt spends) and the plan reserves \
             ε for {} (privacy.retry_reserve)",
            plan.delta,
            retry_reserve(job)
        ))
    } else if attempts.is_empty() {
        Err(format!(
            "privacy budget: one more round of job {job_id} would bring its ε on dataset \
             {dataset:?} to {after:.4} (δ = {:e}), over the job's target ε = {target}",
            plan.delta
        ))
    } else {
        Err(format!(
            "privacy budget: round {round} of job {job_id} was charged already on dataset \
             {dataset:?} (attempt {}); training it again would bring the job's ε to {after:.4} \
             (δ = {:e}), over its target ε = {target}, so the round is not trained twice",
            attempts.join(", "),
            plan.delta
        ))
    }
}

/// The round attempts of `job_id` charged beyond the first of their round (retries, and rounds
/// trained again after a resume).
fn retried_attempts(ledger: &Ledger, job_id: &str) -> usize {
    ledger.job(job_id).map_or(0, |j| {
        let rounds: std::collections::BTreeSet<u32> = j.charges.iter().map(|c| c.round).collect();
        j.charges.len().saturating_sub(rounds.len())
    })
}

/// `privacy.retry_reserve` of the job (0 when absent).
fn retry_reserve(job: &JobView) -> u32 {
    job.privacy
        .as_ref()
        .and_then(|p| p.retry_reserve)
        .unwrap_or(0)
}

mod identity;
mod statistics;
mod trail;
pub use statistics::{
    ChargedRelease, StatisticsCharge, StatisticsChargeError, StatisticsReleaseError,
};
pub use trail::{AnchoredSpend, LedgerBehindTrail};

/// Where a round's DP-SGD spend is planned and charged: the node's ledgers, or none (central
/// runs and tests, where ε is only computed). The two halves of a DP round's bookkeeping, for
/// every kind of round: [`RoundCharging::plan`] before the first step (with the real count of
/// rows or privacy units), [`RoundCharging::charge`] after the last one that ran, even when
/// training failed part-way.
#[derive(Debug, Clone, Copy)]
pub struct RoundCharging<'a> {
    pub ledgers: Option<&'a SiteLedgers>,
    pub job_id: &'a str,
    /// The dataset's name: its ledger.
    pub dataset: &'a str,
    pub round: u32,
    pub attempt: u32,
}

impl RoundCharging<'_> {
    /// The plan for a round over `rows` rows (privacy units) of a model with `dimension`
    /// trainable values, checked against the ledger and the job's target when there is a
    /// ledger; `None` without DP-SGD. The reason for a refusal otherwise.
    pub fn plan(
        &self,
        job: &JobView,
        rows: usize,
        dimension: usize,
    ) -> Result<Option<DpSgdPlan>, String> {
        match self.ledgers {
            Some(l) => {
                l.check_with_rows(self.job_id, self.round, self.dataset, job, rows, dimension)
            }
            None => plan(job, rows, dimension),
        }
    }

    /// Charges the steps that ran (`spend`) to the ledger, or, without one, computes what they
    /// spent; returns the ε figures to report.
    pub fn charge(
        &self,
        rows: usize,
        plan: &DpSgdPlan,
        spend: &DpSpend,
        now_unix_ms: i64,
    ) -> Result<RoundSpend, String> {
        if let Some(l) = self.ledgers {
            return l.record(
                self.job_id,
                (self.round, self.attempt),
                self.dataset,
                rows,
                plan,
                spend,
                now_unix_ms,
            );
        }
        let round_epsilon = if spend.steps == 0 {
            0.0
        } else {
            let m = SampledGaussian::new(
                spend.sample_rate,
                spend.effective_noise_multiplier,
                spend.steps,
            )
            .map_err(|e| e.to_string())?;
            tutela_privacy::accountant::epsilon(&[m], plan.delta, plan.accountant)
                .map_err(|e| e.to_string())?
                .epsilon
        };
        Ok(RoundSpend {
            charge: None,
            rows,
            dataset_delta: plan.delta,
            round_epsilon,
            job_epsilon: round_epsilon,
            dataset_epsilon: round_epsilon,
            delta: plan.delta,
        })
    }
}
