//! A site's privacy ledger: what every job has spent on one dataset, composed tightly.
//!
//! One ledger file per dataset. It records each job's mechanisms — groups of DP-SGD steps with
//! one (sampling rate q, effective noise multiplier σ) — not ε values: ε does not add up
//! tightly, RDP curves and privacy-loss distributions do. The total spent is the accountant's ε
//! of *all* recorded groups composed together ([`crate::accountant::epsilon`] over the
//! concatenated groups: RDP curves added order by order, or PLDs convolved).
//!
//! * [`Ledger::check`] is called before a job reads any data: it composes what the dataset has
//!   spent with what the job plans to spend and refuses (with the numbers) a job whose spend would
//!   pass the per-job or the total cap.
//! * [`Ledger::record`] is called after each round with the steps that really ran, and is written
//!   to disk before the round's update leaves the site: a job cut short has recorded exactly what
//!   it spent.
//! * The file is written atomically (a temporary file beside it, then a rename), encrypted with
//!   [`crate::at_rest`] when the node has a key-encryption key, and read back at every start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::accountant::{self, Accountant, AccountantError, Guarantee, SampledGaussian};
use crate::at_rest::{self, AtRestError, EncryptOptions, KeyEncryptionKey};

/// Version of the ledger file's layout.
const FORMAT_VERSION: u32 = 1;

/// Why the ledger cannot be read or written, or refuses a job.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("privacy ledger {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("privacy ledger {}: {source}", .path.display())]
    AtRest {
        path: PathBuf,
        #[source]
        source: Box<AtRestError>,
    },
    #[error("privacy ledger {}: not a ledger file: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "privacy ledger {}: it is for dataset {found:?}, not {expected:?}",
        .path.display()
    )]
    WrongDataset {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "privacy budget: job {job} would spend ε = {planned:.4} (δ = {delta:e}) on dataset \
         {dataset:?}, over the per-job cap ε ≤ {cap}"
    )]
    JobCapExceeded {
        job: String,
        dataset: String,
        planned: f64,
        cap: f64,
        delta: f64,
    },
    #[error(
        "privacy budget: dataset {dataset:?} has spent ε = {spent:.4} (δ = {delta:e}); job {job} \
         would bring it to ε = {after:.4}, over the total cap ε ≤ {cap}"
    )]
    TotalCapExceeded {
        job: String,
        dataset: String,
        spent: f64,
        after: f64,
        cap: f64,
        delta: f64,
    },
    #[error("privacy accounting: {0}")]
    Accountant(#[from] AccountantError),
}

/// The caps a site's policy sets on one dataset, at one δ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Caps {
    /// ε one job may spend.
    pub per_job_epsilon: Option<f64>,
    /// ε all jobs together may spend.
    pub total_epsilon: Option<f64>,
    /// The δ every ε above is stated at.
    pub delta: f64,
}

/// What a group's steps released. Every kind is a (sampled) Gaussian mechanism, so the
/// accountant composes them all alike; the kind keeps them apart in the file, the trail and the
/// plan (a job's DP-SGD steps still to run count only DP-SGD groups).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MechanismKind {
    /// DP-SGD steps: Poisson-sampled, clipped, noised gradient sums.
    #[default]
    DpSgd,
    /// A round's evaluation metrics (`crate::metrics`): unsampled (`q = 1`) Gaussian releases of
    /// clipped per-unit sums, one step per released sum.
    Metrics,
    /// Record-level distributed DP-SGD (`crate::accountant::distributed::RecordLevelPlan`): one
    /// Poisson-sampled, clipped gradient sum per round, whose noise is the survivors' shares
    /// summed under secure aggregation; charged at the noise multiplier of the minimum of
    /// survivors, before the masked input leaves the site. A DP-SGD step for the plan's count of
    /// steps.
    DistributedDpSgd,
}

impl MechanismKind {
    pub fn is_dp_sgd(&self) -> bool {
        *self == MechanismKind::DpSgd
    }

    /// Whether the group's steps are training steps a job's plan counts (local or distributed
    /// DP-SGD), as opposed to metric releases.
    pub fn is_training_step(&self) -> bool {
        matches!(self, MechanismKind::DpSgd | MechanismKind::DistributedDpSgd)
    }

    /// The name the trail's `privacy.spent` carries (`mechanism`) for a kind other than DP-SGD.
    pub fn as_str(&self) -> &'static str {
        match self {
            MechanismKind::DpSgd => "dp_sgd",
            MechanismKind::Metrics => "metrics",
            MechanismKind::DistributedDpSgd => "distributed_dp_sgd",
        }
    }
}

/// One group of identical steps, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub sample_rate: f64,
    pub noise_multiplier: f64,
    pub steps: u64,
    /// Left out of the file for DP-SGD, so ledgers written before metrics read and write alike.
    #[serde(default, skip_serializing_if = "MechanismKind::is_dp_sgd")]
    pub kind: MechanismKind,
}

impl Group {
    pub fn mechanism(&self) -> Result<SampledGaussian, AccountantError> {
        SampledGaussian::new(self.sample_rate, self.noise_multiplier, self.steps)
    }

    /// The group of `mechanism`'s steps, of `kind`.
    pub fn of(kind: MechanismKind, mechanism: SampledGaussian) -> Self {
        Group {
            sample_rate: mechanism.sample_rate(),
            noise_multiplier: mechanism.noise_multiplier(),
            steps: mechanism.steps(),
            kind,
        }
    }

    /// Whether `other` may be merged into this group (same kind, bit-equal q and σ).
    fn merges_with(&self, other: &Group) -> bool {
        self.kind == other.kind
            && self.sample_rate.to_bits() == other.sample_rate.to_bits()
            && self.noise_multiplier.to_bits() == other.noise_multiplier.to_bits()
    }
}

/// What one job spent on the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    pub job_id: String,
    pub groups: Vec<Group>,
    /// Unix milliseconds of the last record.
    pub updated_unix_ms: i64,
    /// Each round attempt charged, in the order charged: what lets the node see that a round was
    /// charged already (a coordinator that resumed after a crash sends it again) and what it
    /// anchors in the audit trail. (Ledgers written before charges were kept have none.)
    #[serde(default)]
    pub charges: Vec<RoundCharge>,
}

impl JobEntry {
    /// DP-SGD steps recorded (metric releases are not training steps).
    pub fn steps(&self) -> u64 {
        self.groups
            .iter()
            .filter(|g| g.kind.is_training_step())
            .map(|g| g.steps)
            .sum()
    }

    /// The charges of round `round` (every attempt).
    pub fn charges_of_round(&self, round: u32) -> impl Iterator<Item = &RoundCharge> {
        self.charges.iter().filter(move |c| c.round == round)
    }
}

/// One round attempt's spend, as charged to the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundCharge {
    pub round: u32,
    pub attempt: u32,
    pub group: Group,
    /// The round's metric releases, charged with its steps (absent: none under DP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Group>,
    /// The seq of the `privacy.spent` event that records this charge in the audit trail; `None`
    /// until it is recorded there (the node appends it before the round's update leaves the
    /// site, and again before it trains next if that failed).
    #[serde(default)]
    pub anchored_seq: Option<u64>,
}

/// A spend as the audit trail records it, for rebuilding a ledger from the trail.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrailSpend<'a> {
    pub job_id: &'a str,
    pub round: u32,
    pub attempt: u32,
    pub group: Group,
    /// The round's metric releases recorded with the spend.
    pub metrics: Option<Group>,
    pub rows: usize,
    pub seq: u64,
    pub timestamp_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    version: u32,
    dataset: String,
    /// The dataset's training rows when it was last trained on: lets the node plan a job's
    /// sampling rate before it reads the data again.
    #[serde(default)]
    rows: Option<usize>,
    jobs: Vec<JobEntry>,
}

/// The outcome of a successful [`Ledger::check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpendCheck {
    /// ε the dataset has spent so far (all jobs).
    pub spent: f64,
    /// ε of this job: what it has recorded plus what it still plans.
    pub job_planned: f64,
    /// ε of the dataset if the job runs to its end.
    pub total_after: f64,
}

/// Merges `group` into the group of `groups` with the same kind and bit-equal q and σ, or appends
/// it. Bit-equal parameters only: merging groups whose σ differ in the last bit would understate
/// neither, but it would make the file say something that did not happen.
fn merge_group(groups: &mut Vec<Group>, group: Group) {
    match groups.iter_mut().find(|g| g.merges_with(&group)) {
        Some(g) => g.steps += group.steps,
        None => groups.push(group),
    }
}

/// A dataset's privacy ledger, loaded from (and saved to) one file.
pub struct Ledger {
    path: PathBuf,
    kek: Option<Arc<dyn KeyEncryptionKey>>,
    file: LedgerFile,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("encrypted", &self.kek.is_some())
            .field("dataset", &self.file.dataset)
            .field("jobs", &self.file.jobs.len())
            .finish()
    }
}

impl Ledger {
    /// Opens the ledger of `dataset` at `path` (a missing file is an empty ledger: nothing spent).
    /// With `kek`, the file is encrypted at rest.
    pub fn open(
        path: impl Into<PathBuf>,
        dataset: &str,
        kek: Option<Arc<dyn KeyEncryptionKey>>,
    ) -> Result<Self, LedgerError> {
        let path = path.into();
        let bytes = if !path.exists() {
            None
        } else {
            Some(match &kek {
                Some(k) => {
                    at_rest::decrypt_to_vec(&path, k.as_ref()).map_err(|e| LedgerError::AtRest {
                        path: path.clone(),
                        source: Box::new(e),
                    })?
                }
                None => std::fs::read(&path).map_err(|source| LedgerError::Io {
                    path: path.clone(),
                    source,
                })?,
            })
        };
        let file = match bytes {
            None => LedgerFile {
                version: FORMAT_VERSION,
                dataset: dataset.to_owned(),
                rows: None,
                jobs: Vec::new(),
            },
            Some(b) => {
                let file: LedgerFile =
                    serde_json::from_slice(&b).map_err(|e| LedgerError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.version != FORMAT_VERSION {
                    return Err(LedgerError::Corrupt {
                        path,
                        reason: format!("format version {} is not {FORMAT_VERSION}", file.version),
                    });
                }
                if file.dataset != dataset {
                    return Err(LedgerError::WrongDataset {
                        path,
                        expected: dataset.to_owned(),
                        found: file.dataset,
                    });
                }
                for job in &file.jobs {
                    for g in &job.groups {
                        g.mechanism().map_err(|e| LedgerError::Corrupt {
                            path: path.clone(),
                            reason: format!("job {}: {e}", job.job_id),
                        })?;
                    }
                }
                file
            }
        };
        Ok(Ledger { path, kek, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dataset(&self) -> &str {
        &self.file.dataset
    }

    /// The dataset's training rows at the last record, if any.
    pub fn rows(&self) -> Option<usize> {
        self.file.rows
    }

    pub fn jobs(&self) -> &[JobEntry] {
        &self.file.jobs
    }

    pub fn job(&self, job_id: &str) -> Option<&JobEntry> {
        self.file.jobs.iter().find(|j| j.job_id == job_id)
    }

    fn mechanisms<'a>(
        jobs: impl Iterator<Item = &'a JobEntry>,
    ) -> Result<Vec<SampledGaussian>, AccountantError> {
        let mut out = Vec::new();
        for j in jobs {
            for g in &j.groups {
                out.push(g.mechanism()?);
            }
        }
        Ok(out)
    }

    /// The guarantee of `mechanisms` composed; (0, δ) by the asked accountant when there are
    /// none.
    fn guarantee_of(
        mechanisms: &[SampledGaussian],
        delta: f64,
        accountant: Accountant,
    ) -> Result<Guarantee, AccountantError> {
        if mechanisms.is_empty() {
            return Ok(Guarantee {
                epsilon: 0.0,
                delta,
                order: None,
                by: accountant,
            });
        }
        accountant::epsilon(mechanisms, delta, accountant)
    }

    fn epsilon_of(
        mechanisms: &[SampledGaussian],
        delta: f64,
        accountant: Accountant,
    ) -> Result<f64, AccountantError> {
        Ok(Self::guarantee_of(mechanisms, delta, accountant)?.epsilon)
    }

    /// ε the dataset has spent, all jobs composed, at `delta`.
    pub fn spent(&self, delta: f64, accountant: Accountant) -> Result<f64, LedgerError> {
        Ok(self.spent_guarantee(delta, accountant)?.epsilon)
    }

    /// What the dataset has spent, all jobs composed, at `delta`, with the accountant whose bound
    /// it is (with `pld` asked for, RDP's when that is the smaller).
    pub fn spent_guarantee(
        &self,
        delta: f64,
        accountant: Accountant,
    ) -> Result<Guarantee, LedgerError> {
        let all = Self::mechanisms(self.file.jobs.iter())?;
        Ok(Self::guarantee_of(&all, delta, accountant)?)
    }

    /// ε job `job_id` has spent, at `delta`.
    pub fn spent_by_job(
        &self,
        job_id: &str,
        delta: f64,
        accountant: Accountant,
    ) -> Result<f64, LedgerError> {
        Ok(self
            .spent_by_job_guarantee(job_id, delta, accountant)?
            .epsilon)
    }

    /// What job `job_id` has spent, at `delta`, with the accountant whose bound it is.
    pub fn spent_by_job_guarantee(
        &self,
        job_id: &str,
        delta: f64,
        accountant: Accountant,
    ) -> Result<Guarantee, LedgerError> {
        let mine = Self::mechanisms(self.file.jobs.iter().filter(|j| j.job_id == job_id))?;
        Ok(Self::guarantee_of(&mine, delta, accountant)?)
    }

    /// ε job `job_id` would have spent at `delta` after `extra` more steps, merged into its group
    /// of the same (q, σ) as [`record`](Self::record) merges them, so that the figure is the one
    /// the ledger will report after recording them.
    pub fn job_epsilon_after(
        &self,
        job_id: &str,
        extra: SampledGaussian,
        delta: f64,
        accountant: Accountant,
    ) -> Result<f64, LedgerError> {
        self.job_epsilon_after_groups(
            job_id,
            &[Group::of(MechanismKind::DpSgd, extra)],
            delta,
            accountant,
        )
    }

    /// [`job_epsilon_after`](Self::job_epsilon_after) for several groups (a round's steps and
    /// its metric releases).
    pub fn job_epsilon_after_groups(
        &self,
        job_id: &str,
        extra: &[Group],
        delta: f64,
        accountant: Accountant,
    ) -> Result<f64, LedgerError> {
        let mut groups: Vec<Group> = self
            .job(job_id)
            .map(|j| j.groups.clone())
            .unwrap_or_default();
        for e in extra {
            merge_group(&mut groups, *e);
        }
        let mechanisms = groups
            .iter()
            .map(Group::mechanism)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::epsilon_of(&mechanisms, delta, accountant)?)
    }

    /// Whether job `job_id` may go on to spend `remaining` more (its steps still to run), on
    /// top of what it and every other job recorded, under `caps`. Refuses with the numbers.
    pub fn check(
        &self,
        job_id: &str,
        remaining: &[SampledGaussian],
        caps: &Caps,
        accountant: Accountant,
    ) -> Result<SpendCheck, LedgerError> {
        let mut mine = Self::mechanisms(self.file.jobs.iter().filter(|j| j.job_id == job_id))?;
        mine.extend_from_slice(remaining);
        let job_planned = Self::epsilon_of(&mine, caps.delta, accountant)?;
        let spent = self.spent(caps.delta, accountant)?;
        if let Some(cap) = caps.per_job_epsilon
            && job_planned > cap
        {
            return Err(LedgerError::JobCapExceeded {
                job: job_id.to_owned(),
                dataset: self.file.dataset.clone(),
                planned: job_planned,
                cap,
                delta: caps.delta,
            });
        }
        let mut all = Self::mechanisms(self.file.jobs.iter())?;
        all.extend_from_slice(remaining);
        let total_after = Self::epsilon_of(&all, caps.delta, accountant)?;
        if let Some(cap) = caps.total_epsilon
            && total_after > cap
        {
            return Err(LedgerError::TotalCapExceeded {
                job: job_id.to_owned(),
                dataset: self.file.dataset.clone(),
                spent,
                after: total_after,
                cap,
                delta: caps.delta,
            });
        }
        Ok(SpendCheck {
            spent,
            job_planned,
            total_after,
        })
    }

    /// Records that job `job_id` ran `mechanism` (merged into its group with the same q and σ) on
    /// the dataset's `rows` training rows, and writes the ledger to disk before returning.
    pub fn record(
        &mut self,
        job_id: &str,
        mechanism: SampledGaussian,
        rows: Option<usize>,
        now_unix_ms: i64,
    ) -> Result<(), LedgerError> {
        self.add_group(job_id, mechanism, rows, now_unix_ms);
        self.save()
    }

    /// Adds `mechanism` to the job's groups in memory (see [`record`](Self::record)).
    fn add_group(
        &mut self,
        job_id: &str,
        mechanism: SampledGaussian,
        rows: Option<usize>,
        now_unix_ms: i64,
    ) {
        self.add_group_of(
            job_id,
            Group::of(MechanismKind::DpSgd, mechanism),
            rows,
            now_unix_ms,
        );
    }

    fn add_group_of(&mut self, job_id: &str, group: Group, rows: Option<usize>, now_unix_ms: i64) {
        if rows.is_some() {
            self.file.rows = rows;
        }
        let job = self.entry_mut(job_id, now_unix_ms);
        merge_group(&mut job.groups, group);
        job.updated_unix_ms = now_unix_ms;
    }

    /// [`record`](Self::record) for one round attempt of a job: the steps also become a
    /// [`RoundCharge`] (not yet anchored in the trail). Returns the charge.
    pub fn record_round(
        &mut self,
        job_id: &str,
        (round, attempt): (u32, u32),
        mechanism: SampledGaussian,
        rows: Option<usize>,
        now_unix_ms: i64,
    ) -> Result<RoundCharge, LedgerError> {
        self.record_round_with_metrics(job_id, (round, attempt), mechanism, None, rows, now_unix_ms)
    }

    /// [`record_round`](Self::record_round) with the round's metric releases (`crate::metrics`),
    /// charged in the same write and the same [`RoundCharge`] as the steps: a round's update and
    /// its metrics leave the site together, so they are spent together.
    pub fn record_round_with_metrics(
        &mut self,
        job_id: &str,
        (round, attempt): (u32, u32),
        mechanism: SampledGaussian,
        metrics: Option<SampledGaussian>,
        rows: Option<usize>,
        now_unix_ms: i64,
    ) -> Result<RoundCharge, LedgerError> {
        self.record_round_of_kind(
            job_id,
            (round, attempt),
            Group::of(MechanismKind::DpSgd, mechanism),
            metrics,
            rows,
            now_unix_ms,
        )
    }

    /// [`record_round_with_metrics`](Self::record_round_with_metrics) for steps of any training
    /// kind (`group.kind`: local or distributed DP-SGD), composed with everything else alike.
    pub fn record_round_of_kind(
        &mut self,
        job_id: &str,
        (round, attempt): (u32, u32),
        group: Group,
        metrics: Option<SampledGaussian>,
        rows: Option<usize>,
        now_unix_ms: i64,
    ) -> Result<RoundCharge, LedgerError> {
        let metrics = metrics.map(|m| Group::of(MechanismKind::Metrics, m));
        let charge = RoundCharge {
            round,
            attempt,
            group,
            metrics,
            anchored_seq: None,
        };
        // Pushed first so that the one save below writes both.
        self.entry_mut(job_id, now_unix_ms).charges.push(charge);
        if let Some(m) = metrics {
            self.add_group_of(job_id, m, None, now_unix_ms);
        }
        self.add_group_of(job_id, group, rows, now_unix_ms);
        self.save()?;
        Ok(charge)
    }

    /// Whether job `job_id` has a charge for `round` (any attempt).
    pub fn charged(&self, job_id: &str, round: u32) -> bool {
        self.job(job_id)
            .is_some_and(|j| j.charges_of_round(round).next().is_some())
    }

    /// Whether the charge `(job, round, attempt)` is in this ledger.
    pub fn has_charge(&self, job_id: &str, round: u32, attempt: u32) -> bool {
        self.job(job_id).is_some_and(|j| {
            j.charges
                .iter()
                .any(|c| c.round == round && c.attempt == attempt)
        })
    }

    /// The charge `(job, round, attempt)`, if in this ledger.
    pub fn charge(&self, job_id: &str, round: u32, attempt: u32) -> Option<&RoundCharge> {
        self.job(job_id)?
            .charges
            .iter()
            .find(|c| c.round == round && c.attempt == attempt)
    }

    /// The charges not yet recorded in the audit trail, with their job.
    pub fn unanchored(&self) -> Vec<(String, RoundCharge)> {
        self.file
            .jobs
            .iter()
            .flat_map(|j| {
                j.charges
                    .iter()
                    .filter(|c| c.anchored_seq.is_none())
                    .map(|c| (j.job_id.clone(), *c))
            })
            .collect()
    }

    /// Notes that a charge `(job, round, attempt)` is the trail's event `seq`, and saves: the
    /// oldest such charge not yet anchored (none when one is anchored at `seq` already). A
    /// `(round, attempt)` can be charged more than once (a coordinator that resumed after a
    /// crash sends the same attempt again, and the node trains it again): each charge is its own
    /// event, so one event never anchors two charges.
    pub fn mark_anchored(
        &mut self,
        job_id: &str,
        (round, attempt): (u32, u32),
        seq: u64,
    ) -> Result<(), LedgerError> {
        let Some(job) = self.file.jobs.iter_mut().find(|j| j.job_id == job_id) else {
            return Ok(());
        };
        let same = |c: &RoundCharge| c.round == round && c.attempt == attempt;
        if job
            .charges
            .iter()
            .any(|c| same(c) && c.anchored_seq == Some(seq))
        {
            return Ok(());
        }
        if let Some(c) = job
            .charges
            .iter_mut()
            .find(|c| same(c) && c.anchored_seq.is_none())
        {
            c.anchored_seq = Some(seq);
        }
        self.save()
    }

    /// Rebuilds the ledger of `dataset` at `path` from the spends the audit trail holds (each
    /// event one charge, in seq order) and writes it, replacing whatever
    /// file was there. Every charge is anchored at its event's seq.
    pub fn rebuild_from_trail<'a>(
        path: impl Into<PathBuf>,
        dataset: &str,
        kek: Option<Arc<dyn KeyEncryptionKey>>,
        spends: impl IntoIterator<Item = TrailSpend<'a>>,
    ) -> Result<Self, LedgerError> {
        let ledger = Self::from_trail(path, dataset, kek, spends)?;
        ledger.save()?;
        Ok(ledger)
    }

    /// [`rebuild_from_trail`](Self::rebuild_from_trail) in memory only: what the rebuilt ledger
    /// would say, without writing it.
    pub fn from_trail<'a>(
        path: impl Into<PathBuf>,
        dataset: &str,
        kek: Option<Arc<dyn KeyEncryptionKey>>,
        spends: impl IntoIterator<Item = TrailSpend<'a>>,
    ) -> Result<Self, LedgerError> {
        let mut ledger = Ledger {
            path: path.into(),
            kek,
            file: LedgerFile {
                version: FORMAT_VERSION,
                dataset: dataset.to_owned(),
                rows: None,
                jobs: Vec::new(),
            },
        };
        let mut spends: Vec<TrailSpend<'a>> = spends.into_iter().collect();
        spends.sort_by_key(|s| s.seq);
        // One charge per event (the same event read twice counts once). Not one per
        // (job, round, attempt): a round attempt the node trained twice (a coordinator that
        // resumed after a crash sent it again) was charged twice and is two events, and a
        // rebuild that kept one would hand the site back a round's ε.
        spends.dedup_by_key(|s| s.seq);
        for s in spends {
            s.group.mechanism().map_err(|e| LedgerError::Corrupt {
                path: ledger.path.clone(),
                reason: format!("the trail's spend at seq {}: {e}", s.seq),
            })?;
            let entry = ledger.entry_mut(s.job_id, s.timestamp_unix_ms);
            entry.charges.push(RoundCharge {
                round: s.round,
                attempt: s.attempt,
                group: s.group,
                metrics: s.metrics,
                anchored_seq: Some(s.seq),
            });
            if let Some(m) = s.metrics {
                m.mechanism().map_err(|e| LedgerError::Corrupt {
                    path: ledger.path.clone(),
                    reason: format!("the trail's metrics spend at seq {}: {e}", s.seq),
                })?;
                ledger.add_group_of(s.job_id, m, None, s.timestamp_unix_ms);
            }
            // Of the spend's own kind (local or distributed DP-SGD).
            ledger.add_group_of(s.job_id, s.group, Some(s.rows), s.timestamp_unix_ms);
        }
        Ok(ledger)
    }

    fn entry_mut(&mut self, job_id: &str, now_unix_ms: i64) -> &mut JobEntry {
        let idx = match self.file.jobs.iter().position(|j| j.job_id == job_id) {
            Some(i) => i,
            None => {
                self.file.jobs.push(JobEntry {
                    job_id: job_id.to_owned(),
                    groups: Vec::new(),
                    updated_unix_ms: now_unix_ms,
                    charges: Vec::new(),
                });
                self.file.jobs.len() - 1
            }
        };
        &mut self.file.jobs[idx]
    }

    /// Writes the ledger atomically: a temporary file beside it, then a rename.
    fn save(&self) -> Result<(), LedgerError> {
        let bytes = serde_json::to_vec_pretty(&self.file).map_err(|e| LedgerError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let io = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        match &self.kek {
            Some(k) => {
                // EncryptedWriter writes a temporary file and renames it on `finish`.
                at_rest::encrypt_bytes(&bytes, &self.path, k.as_ref(), EncryptOptions::default())
                    .map_err(|e| LedgerError::AtRest {
                    path: self.path.clone(),
                    source: Box::new(e),
                })?;
            }
            None => {
                use std::io::Write;
                let dir = match self.path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
                tmp.write_all(&bytes).map_err(io)?;
                tmp.as_file().sync_all().map_err(io)?;
                tmp.persist(&self.path).map_err(|e| io(e.error))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::at_rest::LocalKek;

    fn sg(q: f64, s: f64, t: u64) -> SampledGaussian {
        SampledGaussian::new(q, s, t).unwrap()
    }

    /// The ledger says whose bound its spend is: PLD's when asked and tighter, RDP's otherwise.
    #[test]
    fn spend_names_the_accountant_whose_bound_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path().join("d.json"), "d", None).unwrap();
        assert_eq!(
            l.spent_guarantee(1e-5, Accountant::pld()).unwrap().epsilon,
            0.0
        );
        l.record("a", sg(256.0 / 60000.0, 1.1, 14_062), None, 1)
            .unwrap();
        let by_pld = l.spent_guarantee(1e-5, Accountant::pld()).unwrap();
        let by_rdp = l.spent_guarantee(1e-5, Accountant::Rdp).unwrap();
        assert_eq!(by_pld.by, Accountant::pld());
        assert_eq!(by_rdp.by, Accountant::Rdp);
        assert!(by_pld.epsilon < by_rdp.epsilon);
        assert_eq!(
            l.spent_by_job_guarantee("a", 1e-5, Accountant::pld())
                .unwrap(),
            by_pld
        );
        assert_eq!(l.spent(1e-5, Accountant::pld()).unwrap(), by_pld.epsilon);
    }

    #[test]
    fn spend_composes_tightly_not_by_summing_epsilons() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path().join("d.json"), "d", None).unwrap();
        l.record("a", sg(0.01, 1.1, 1000), None, 1).unwrap();
        l.record("b", sg(0.01, 1.1, 1000), None, 2).unwrap();
        let each = accountant::epsilon(&[sg(0.01, 1.1, 1000)], 1e-5, Accountant::Rdp)
            .unwrap()
            .epsilon;
        let both = l.spent(1e-5, Accountant::Rdp).unwrap();
        let composed = accountant::epsilon(&[sg(0.01, 1.1, 2000)], 1e-5, Accountant::Rdp)
            .unwrap()
            .epsilon;
        assert!((both - composed).abs() < 1e-9, "{both} vs {composed}");
        assert!(both < 2.0 * each);
    }

    #[test]
    fn caps_refuse_with_the_numbers_and_the_ledger_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json.enc");
        let kek: Arc<dyn KeyEncryptionKey> = Arc::new(LocalKek::from_bytes(&[7u8; 32]));
        let mut l = Ledger::open(&path, "d", Some(kek.clone())).unwrap();
        l.record("a", sg(0.02, 1.0, 500), Some(25_000), 1).unwrap();
        let spent = l.spent(1e-5, Accountant::Rdp).unwrap();
        // Encrypted: the JSON is not on disk in the clear.
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"job_id"));
        let l = Ledger::open(&path, "d", Some(kek)).unwrap();
        assert_eq!(l.spent(1e-5, Accountant::Rdp).unwrap(), spent);
        assert_eq!(l.rows(), Some(25_000));
        let caps = Caps {
            per_job_epsilon: Some(100.0),
            total_epsilon: Some(spent + 0.01),
            delta: 1e-5,
        };
        let err = l
            .check("b", &[sg(0.02, 1.0, 500)], &caps, Accountant::Rdp)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, LedgerError::TotalCapExceeded { .. }),
            "{text}"
        );
        assert!(text.contains(&format!("{spent:.4}")), "{text}");
        let ok = l
            .check(
                "b",
                &[sg(0.02, 1.0, 1)],
                &Caps {
                    total_epsilon: None,
                    ..caps
                },
                Accountant::Rdp,
            )
            .unwrap();
        assert!(ok.total_after > ok.spent);
        let err = l
            .check(
                "b",
                &[sg(0.02, 1.0, 500)],
                &Caps {
                    per_job_epsilon: Some(0.1),
                    total_epsilon: None,
                    delta: 1e-5,
                },
                Accountant::Rdp,
            )
            .unwrap_err();
        assert!(matches!(err, LedgerError::JobCapExceeded { .. }), "{err}");
    }

    #[test]
    fn round_charges_are_kept_anchored_and_rebuilt_from_the_trail_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        let mut l = Ledger::open(&path, "d", None).unwrap();
        let m = sg(0.1, 1.3, 20);
        l.record_round("j", (1, 1), m, Some(300), 1).unwrap();
        l.record_round("j", (2, 1), m, Some(300), 2).unwrap();
        assert!(l.charged("j", 1) && l.charged("j", 2) && !l.charged("j", 3));
        assert_eq!(l.unanchored().len(), 2);
        l.mark_anchored("j", (1, 1), 7).unwrap();
        let l = Ledger::open(&path, "d", None).unwrap();
        assert_eq!(
            l.unanchored(),
            vec![("j".to_string(), l.job("j").unwrap().charges[1])]
        );
        assert_eq!(l.job("j").unwrap().steps(), 40);
        let spent = l.spent(1e-5, Accountant::Rdp).unwrap();

        // The file is lost; the trail holds both spends (one of them read twice, as a reader
        // that merged two pages might hand it over): the rebuilt ledger counts each event once.
        std::fs::remove_file(&path).unwrap();
        let g = Group {
            sample_rate: 0.1,
            noise_multiplier: 1.3,
            steps: 20,
            kind: MechanismKind::DpSgd,
        };
        let spend = |round, seq| TrailSpend {
            job_id: "j",
            round,
            attempt: 1,
            group: g,
            metrics: None,
            rows: 300,
            seq,
            timestamp_unix_ms: seq as i64,
        };
        let rebuilt =
            Ledger::rebuild_from_trail(&path, "d", None, [spend(2, 9), spend(1, 7), spend(2, 9)])
                .unwrap();
        assert_eq!(rebuilt.spent(1e-5, Accountant::Rdp).unwrap(), spent);
        assert_eq!(rebuilt.rows(), Some(300));
        assert!(rebuilt.unanchored().is_empty());
        let reopened = Ledger::open(&path, "d", None).unwrap();
        assert_eq!(reopened.job("j").unwrap().charges.len(), 2);
        assert_eq!(reopened.job("j").unwrap().steps(), 40);

        // Round 2's attempt 1 trained twice (a coordinator that resumed after a crash sent it
        // again): two charges, two events; the rebuild keeps both, each anchored at its own.
        let mut l = Ledger::open(&path, "d", None).unwrap();
        l.record_round("j", (2, 1), m, Some(300), 3).unwrap();
        l.mark_anchored("j", (2, 1), 15).unwrap();
        let twice = l.spent(1e-5, Accountant::Rdp).unwrap();
        assert!(twice > spent);
        let seqs: Vec<_> = l
            .job("j")
            .unwrap()
            .charges
            .iter()
            .map(|c| c.anchored_seq)
            .collect();
        assert_eq!(seqs, vec![Some(7), Some(9), Some(15)]);
        std::fs::remove_file(&path).unwrap();
        let rebuilt =
            Ledger::rebuild_from_trail(&path, "d", None, [spend(1, 7), spend(2, 9), spend(2, 15)])
                .unwrap();
        assert_eq!(rebuilt.spent(1e-5, Accountant::Rdp).unwrap(), twice);
        assert_eq!(rebuilt.job("j").unwrap().charges.len(), 3);
    }

    #[test]
    fn a_ledger_for_another_dataset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let mut l = Ledger::open(&path, "x", None).unwrap();
        l.record("a", sg(0.5, 2.0, 3), None, 1).unwrap();
        assert!(matches!(
            Ledger::open(&path, "y", None),
            Err(LedgerError::WrongDataset { .. })
        ));
    }

    /// A round's metrics are charged with its steps, as the accountant composes the Gaussian
    /// releases with them: the job's ε grows by exactly what the accountant says, not by a sum.
    /// The file, a reopened ledger and a ledger rebuilt from the trail all say the same, and the
    /// metric releases are not counted as training steps.
    #[test]
    fn metrics_are_charged_with_the_round_and_composed_by_the_accountant() {
        let dir = tempfile::tempdir().unwrap();
        let steps = sg(0.1, 1.3, 20);
        let metrics = crate::metrics::MetricsRelease::new(4.0, 10.0)
            .unwrap()
            .mechanism(1)
            .unwrap();
        let mut without = Ledger::open(dir.path().join("a.json"), "a", None).unwrap();
        let path = dir.path().join("b.json");
        let mut with = Ledger::open(&path, "b", None).unwrap();
        for round in 1..=3 {
            without
                .record_round("j", (round, 1), steps, Some(300), 1)
                .unwrap();
            with.record_round_with_metrics("j", (round, 1), steps, Some(metrics), Some(300), 1)
                .unwrap();
        }
        let (delta, acct) = (1e-5, Accountant::Rdp);
        let eps_without = without.spent_by_job("j", delta, acct).unwrap();
        let eps_with = with.spent_by_job("j", delta, acct).unwrap();
        let expected = crate::accountant::epsilon(
            &[
                sg(0.1, 1.3, 60),
                crate::metrics::MetricsRelease::new(4.0, 10.0)
                    .unwrap()
                    .mechanism(3)
                    .unwrap(),
            ],
            delta,
            acct,
        )
        .unwrap()
        .epsilon;
        assert!(eps_with > eps_without, "{eps_with} <= {eps_without}");
        assert!(
            (eps_with - expected).abs() < 1e-12,
            "{eps_with} vs {expected}"
        );
        let reopened = Ledger::open(&path, "b", None).unwrap();
        assert_eq!(reopened.job("j").unwrap().steps(), 60);
        assert_eq!(reopened.spent_by_job("j", delta, acct).unwrap(), eps_with);
        let charges = reopened.job("j").unwrap().charges.clone();
        let trail: Vec<TrailSpend> = charges
            .iter()
            .enumerate()
            .map(|(i, c)| TrailSpend {
                job_id: "j",
                round: c.round,
                attempt: c.attempt,
                group: c.group,
                metrics: c.metrics,
                rows: 300,
                seq: i as u64 + 1,
                timestamp_unix_ms: 1,
            })
            .collect();
        let rebuilt = Ledger::from_trail(dir.path().join("c.json"), "b", None, trail).unwrap();
        assert_eq!(rebuilt.spent_by_job("j", delta, acct).unwrap(), eps_with);
    }

    /// A job whose training alone fits the per-job cap, but whose metrics push it over, is
    /// refused by the check (before training) with the numbers.
    #[test]
    fn metrics_that_push_a_job_over_its_cap_are_refused_before_it_trains() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path().join("d.json"), "d", None).unwrap();
        let steps = sg(0.01, 1.0, 1000);
        let metrics = crate::metrics::MetricsRelease::new(1.0, 10.0)
            .unwrap()
            .mechanism(10)
            .unwrap();
        let acct = Accountant::Rdp;
        let alone = crate::accountant::epsilon(&[steps], 1e-5, acct)
            .unwrap()
            .epsilon;
        let caps = Caps {
            per_job_epsilon: Some(alone * 1.01),
            total_epsilon: None,
            delta: 1e-5,
        };
        l.check("j", &[steps], &caps, acct).unwrap();
        let err = l.check("j", &[steps, metrics], &caps, acct).unwrap_err();
        assert!(
            matches!(err, LedgerError::JobCapExceeded { planned, .. } if planned > alone * 1.01),
            "{err}"
        );
    }
}
