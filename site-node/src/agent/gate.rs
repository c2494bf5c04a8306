//! The checks a task passes before the node touches data.

mod check;
mod statistics;

pub use statistics::AdmittedStatistics;

use std::collections::BTreeMap;
use std::sync::Arc;

use tutela_protocol::pb;

use super::language::LanguageRound;
use super::readiness::TableReadiness;
use super::round::{LocalError, LocalRound};
use super::tabular::TabularRound;
use super::{NODE_VERSION, now_ms};
use crate::dataset::SiteDataset;
use crate::jobspec::{JobView, StrategyView};
use crate::ledger::SiteLedgers;
use crate::lm::base::{ApprovedBase, BaseModelRefusal, SiteBaseModels};
use crate::lm::round::job::LmJob;
use crate::lm::text_dataset::TextDataset;
use crate::lm::tokenizer::site::{ApprovedTokenizer, SiteTokenizers, TokenizerRefusal};
use crate::models::{ModelFamily, family_of};
use crate::resend::ResendCache;

/// Why the node will not do a task; decided before any data is touched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the task's deadline passed {late_ms} ms ago")]
    DeadlinePassed { late_ms: i64 },
    #[error(
        "unknown task kind {0}: this node (version {NODE_VERSION}) does INITIALIZE, TRAIN and \
         STATISTICS (and answers CHECK without training)"
    )]
    UnknownKind(i32),
    #[error("{0}")]
    JobSpec(String),
    /// A table the site has but whose last data check failed (its source down, bad rows): the
    /// node re-checks it and announces it once it passes. The problems stay in the site's log.
    #[error(
        "this site's dataset {schema:?} is not ready (it failed its last data check; the node \
         re-checks it and announces it when it passes)"
    )]
    DatasetNotReady { schema: String },
    /// The dataset's source file cannot be read now (gone since the node started): its budget,
    /// keyed by the file's data (`crate::budget_identity`), cannot be told either. The node
    /// withdraws the dataset until a re-check passes (`agent::readiness`).
    #[error("this site's dataset {dataset:?} cannot be read now")]
    SourceUnreadable { dataset: String },
    #[error("this site has no {kind} for schema {schema:?}; it has: {known}")]
    UnknownSchema {
        /// `dataset` (a table, for a layer network) or `text dataset` (for a language model).
        kind: &'static str,
        schema: String,
        known: String,
    },
    #[error("a TRAIN task must name its global model (global_model_id is empty)")]
    NoGlobalModel,
    /// The job names a schema file other than this site's (digest prefixes only, never a path).
    #[error("{0}")]
    SchemaDigest(#[from] crate::dataset::SchemaDigestMismatch),
    /// The job's planned privacy spend would pass a cap of the site's budget (with the numbers).
    #[error("{0}")]
    PrivacyBudget(String),
    /// The site's privacy ledger could not be read (the error names its file: not sent).
    #[error("{0}")]
    Ledger(String),
    /// Not approved by this site's officers, or against the site policy (naming the clause).
    #[error("{0}")]
    Policy(#[from] crate::approvals::ApprovalRefusal),
    /// The job's tokenizer is not one this site holds (with both digests, never a path).
    #[error("{0}")]
    Tokenizer(#[from] TokenizerRefusal),
    /// A language-model job that names no tokenizer: the node will not guess one.
    #[error(
        "the job's model {model:?} is a language model, but the job names no tokenizer \
         (`model.tokenizer_sha256`)"
    )]
    NoTokenizer { model: String },
    /// The job's base checkpoint is not one this site holds (with digests, never a path).
    #[error("{0}")]
    BaseModel(#[from] BaseModelRefusal),
    /// The job's model could not be sized from the site's base checkpoint (the error may name
    /// its files: not sent).
    #[error("the job's model: {0}")]
    ModelUnusable(String),
}

/// A dataset's budget that cannot be read, as a refusal: the dataset's own data unreadable
/// (its source gone, its records unparseable) is [`Refusal::SourceUnreadable`], which the node
/// declines `data.unreadable` and withdraws the dataset for; a ledger or identity map that cannot
/// be read is [`Refusal::Ledger`] (its text names the node's file: never sent).
pub fn budget_refusal(dataset: &str, e: crate::ledger::BudgetError) -> Refusal {
    if e.is_source_unreadable() {
        Refusal::SourceUnreadable {
            dataset: dataset.to_string(),
        }
    } else {
        Refusal::Ledger(e.to_string())
    }
}

impl Refusal {
    /// Whether the refusal is sent to the coordinator. A task past its deadline is closed there
    /// already, so telling it would only be refused in turn.
    pub fn is_reported(&self) -> bool {
        !matches!(self, Refusal::DeadlinePassed { .. })
    }
}

/// What the node does for an admitted task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Initialize,
    Train,
    /// A TRAIN task for a round this node already released an update of, on the same global
    /// model: the update is sent again, nothing is trained or charged (see [`crate::resend`]).
    Resend,
}

/// A task that passed [`TaskGate::check_task`], with what the node needs to do it.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub work: Work,
    pub job: JobView,
    pub strategy: StrategyView,
    /// The round the job's model family trains, on the dataset the job's schema names (not
    /// read yet), chosen here once.
    pub round: Arc<dyn LocalRound>,
    /// The task's job, for the privacy ledger.
    pub job_id: String,
    /// The site's privacy ledgers, when it keeps a budget (see [`crate::ledger`]).
    pub ledgers: Option<Arc<SiteLedgers>>,
    /// The tokenizer the job names (`model.tokenizer_sha256`), read and digested when the task
    /// was admitted: training loads these bytes, not the file again.
    pub tokenizer: Option<ApprovedTokenizer>,
    /// The base checkpoint the job names (`model.base_sha256`), found among the site's.
    pub base: Option<ApprovedBase>,
}

/// A task that passed the first half of the gate ([`TaskGate::approve`]): approved by the
/// site's officers and policy, its tokenizer the site's, its planned privacy spend within the
/// site's budget. What the node may fetch for it (a base model) is fetched only now;
/// [`TaskGate::admit`] finishes the checks that need it.
pub struct Approved {
    work: Work,
    job: JobView,
    strategy: StrategyView,
    data: JobData,
    tokenizer: Option<ApprovedTokenizer>,
    budget: BudgetChecked,
}

/// How far [`TaskGate::approve`] could check a task's planned spend against the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BudgetChecked {
    /// Nothing to check: not a TRAIN task (a resend spends nothing) nor an INITIALIZE that
    /// would fetch a base, or no ledgers.
    NotNeeded,
    /// With the exact number of trained parameters (a table's model, built from its schema).
    Exact,
    /// Before the base checkpoint was read: a language model's adapters take their shapes
    /// from the base, so the plan was weighed at dimension 0 (no noise-grid correction);
    /// [`TaskGate::admit`] weighs it again at the adapters' real size.
    BeforeBase,
}

impl Approved {
    /// The task's job spec, as the gate parsed it.
    pub fn job(&self) -> &JobView {
        &self.job
    }
}

/// The dataset a job's schema names, of the kind its model family reads.
enum JobData {
    Table(Arc<SiteDataset>),
    Text(Arc<TextDataset>),
}

impl JobData {
    fn name(&self) -> &str {
        match self {
            JobData::Table(d) => d.name(),
            JobData::Text(d) => d.name(),
        }
    }
}

/// The checks a task passes before the node touches data: the seam where local policy, signed
/// approvals and the privacy budget will plug in.
#[derive(Debug, Clone)]
pub struct TaskGate {
    /// The site's tables and which of them are ready (see [`super::readiness`]).
    datasets: Arc<TableReadiness>,
    ledgers: Option<Arc<SiteLedgers>>,
    /// The last released update, which a repeated round is answered with.
    resends: Arc<ResendCache>,
    /// The site policy and approval check (`site_policy` in node.toml); `None`: not checked,
    /// which the node allows only under `insecure_no_approvals = true` (each task warns).
    approvals: Option<Arc<crate::approvals::SiteApprovals>>,
    /// The tokenizer files the site holds (`tokenizers` in node.toml).
    tokenizers: SiteTokenizers,
    /// The text datasets language models train on (`[text_datasets.<name>]` in node.toml).
    text_datasets: BTreeMap<String, Arc<TextDataset>>,
    /// The base checkpoints the site holds, by digest (`base_models` in node.toml).
    base_models: SiteBaseModels,
}

impl TaskGate {
    /// A gate that checks no approvals until [`with_approvals`](Self::with_approvals) adds them;
    /// [`super::Agent::new`] always does, unless node.toml sets `insecure_no_approvals = true`.
    /// Every table in `datasets` is taken as ready; [`with_tables`](Self::with_tables) gives
    /// tables checked at start.
    pub fn new(datasets: BTreeMap<String, Arc<SiteDataset>>) -> Self {
        Self::with_tables(Arc::new(TableReadiness::all_ready(datasets)))
    }

    /// A gate over tables whose readiness the agent keeps up to date.
    pub fn with_tables(datasets: Arc<TableReadiness>) -> Self {
        TaskGate {
            datasets,
            ledgers: None,
            resends: Arc::default(),
            approvals: None,
            tokenizers: SiteTokenizers::default(),
            text_datasets: BTreeMap::new(),
            base_models: SiteBaseModels::default(),
        }
    }

    /// The text datasets a language-model job's `data.schema` is matched against.
    pub fn with_text_datasets(mut self, text_datasets: BTreeMap<String, Arc<TextDataset>>) -> Self {
        self.text_datasets = text_datasets;
        self
    }

    /// The base checkpoints a job's `model.base_sha256` is matched against; without them, every
    /// job that names a base is declined.
    pub fn with_base_models(mut self, base_models: SiteBaseModels) -> Self {
        self.base_models = base_models;
        self
    }

    /// The site's base checkpoints and its cache of fetched ones.
    pub fn base_models(&self) -> &SiteBaseModels {
        &self.base_models
    }

    /// The tokenizer files a job's `model.tokenizer_sha256` is matched against; without them,
    /// every job that names a tokenizer is declined.
    pub fn with_tokenizers(mut self, tokenizers: SiteTokenizers) -> Self {
        self.tokenizers = tokenizers;
        self
    }

    /// Requires every task to carry a valid approval by one of this site's compliance officers
    /// and to satisfy the site policy, checked before any data is read.
    pub fn with_approvals(mut self, approvals: crate::approvals::SiteApprovals) -> Self {
        self.approvals = Some(Arc::new(approvals));
        self
    }

    /// The site policy in force, reloaded in place (`None` without approvals): the agent polls
    /// it and re-reads it on SIGHUP, so an officer's edit takes effect without a restart.
    pub fn site_policy(&self) -> Option<&Arc<tutela_policy::site_policy::ReloadingSitePolicy>> {
        self.approvals.as_ref().map(|a| a.reloading())
    }

    /// Checks every TRAIN task's planned privacy spend against these ledgers' caps.
    pub fn with_ledgers(mut self, ledgers: Arc<SiteLedgers>) -> Self {
        self.ledgers = Some(ledgers);
        self
    }

    /// The node's last released update.
    /// The site's privacy ledgers, when it keeps a budget.
    pub fn ledgers(&self) -> Option<&Arc<SiteLedgers>> {
        self.ledgers.as_ref()
    }

    pub fn resends(&self) -> &Arc<ResendCache> {
        &self.resends
    }

    /// The schema names this node has data for: its tables and its text datasets (node.toml
    /// keeps the two sets of names apart).
    /// Only the ready tables are named.
    pub fn dataset_names(&self) -> Vec<String> {
        self.datasets
            .ready_names()
            .into_iter()
            .chain(self.text_datasets.keys().cloned())
            .collect()
    }

    /// The site's tables and their readiness.
    pub fn tables(&self) -> &Arc<TableReadiness> {
        &self.datasets
    }

    /// The dataset the job's schema names, of the kind its model family reads: a text dataset
    /// for a language model, a table otherwise (an unknown model name is refused later, where
    /// the model is built, as it always was).
    fn job_data(&self, job: &JobView) -> Result<JobData, Refusal> {
        let language = job
            .model_name()
            .ok()
            .and_then(family_of)
            .is_some_and(|f| f == ModelFamily::Language);
        let schema = &job.data.schema;
        if !language {
            return self.table_for(schema).map(JobData::Table);
        }
        self.text_datasets
            .get(schema)
            .cloned()
            .map(JobData::Text)
            .ok_or_else(|| Refusal::UnknownSchema {
                kind: "text dataset",
                schema: schema.clone(),
                known: self
                    .text_datasets
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The ready table of `schema` (a layer network's or a statistics job's data).
    fn table_for(&self, schema: &str) -> Result<Arc<SiteDataset>, Refusal> {
        if let Some(found) = self.datasets.ready(schema) {
            return Ok(found);
        }
        if self.datasets.is_configured(schema) {
            return Err(Refusal::DatasetNotReady {
                schema: schema.to_string(),
            });
        }
        Err(Refusal::UnknownSchema {
            kind: "dataset",
            schema: schema.to_string(),
            known: self.datasets.ready_names().join(", "),
        })
    }

    /// The round for `data`: the one place a job's model family decides how it trains.
    fn round_for(
        job: &JobView,
        data: JobData,
        tokenizer: Option<&ApprovedTokenizer>,
        base: Option<&ApprovedBase>,
    ) -> Result<Arc<dyn LocalRound>, Refusal> {
        Ok(match data {
            JobData::Table(dataset) => Arc::new(TabularRound { dataset }),
            JobData::Text(dataset) => {
                // `[lora]` and `model.base_sha256` are required: a federated language model
                // trains and sends adapters only, on a base every site holds.
                let lm_job =
                    LmJob::from_view(job.clone()).map_err(|e| Refusal::JobSpec(e.to_string()))?;
                lm_job
                    .base_sha256()
                    .map_err(|e| Refusal::JobSpec(e.to_string()))?;
                Arc::new(LanguageRound {
                    job: lm_job,
                    dataset,
                    tokenizer: tokenizer.cloned().ok_or_else(|| Refusal::NoTokenizer {
                        model: job.model_name().unwrap_or_default().to_string(),
                    })?,
                    // Named (checked just above), so approved or refused already.
                    base: base.cloned().ok_or_else(|| {
                        Refusal::JobSpec("job spec: `model.base_sha256` is required".into())
                    })?,
                })
            }
        })
    }

    /// Decides whether the node does `task` now: [`approve`](Self::approve), then
    /// [`admit`](Self::admit).
    pub fn check_task(&self, task: &pb::Task) -> Result<Admitted, Refusal> {
        self.check_task_at(task, now_ms())
    }

    /// [`check_task`](Self::check_task) at a given time (Unix milliseconds), for tests.
    pub fn check_task_at(&self, task: &pb::Task, now_ms: i64) -> Result<Admitted, Refusal> {
        let approved = self.approve_at(task, now_ms)?;
        self.admit(task, approved)
    }

    /// The first half of the gate: every check that does not need the job's base checkpoint,
    /// before the node fetches anything for the task (a base model it lacks): the deadline,
    /// the task's kind, the spec, the dataset its schema names (its readiness and the table's
    /// schema digest), the signed approvals and site policy, the tokenizer, the strategy, the
    /// global model a TRAIN task names, a resend, and the privacy budget with the job's whole
    /// plan. A job no officer of this site signed, or that the site would decline anyway for
    /// its tokenizer or its spend, never makes the node download a base or touch its cache.
    pub fn approve(&self, task: &pb::Task) -> Result<Approved, Refusal> {
        self.approve_at(task, now_ms())
    }

    /// [`approve`](Self::approve) at a given time (Unix milliseconds), for tests.
    pub fn approve_at(&self, task: &pb::Task, now_ms: i64) -> Result<Approved, Refusal> {
        // A deadline of 0 (unset) means none.
        if task.deadline_unix_ms > 0 && now_ms > task.deadline_unix_ms {
            return Err(Refusal::DeadlinePassed {
                late_ms: now_ms - task.deadline_unix_ms,
            });
        }
        let work = match pb::TaskKind::try_from(task.kind) {
            Ok(pb::TaskKind::Initialize) => Work::Initialize,
            Ok(pb::TaskKind::Train) => Work::Train,
            _ => return Err(Refusal::UnknownKind(task.kind)),
        };
        let job = JobView::from_toml_str(&task.job_spec_toml)
            .map_err(|e| Refusal::JobSpec(e.to_string()))?;
        let data = self.job_data(&job)?;
        // The dataset's budget is keyed by its data (`crate::budget_identity`): data that cannot
        // be read now (a source file gone since the start) has no budget to tell, and is declined
        // `data.unreadable` from the identity's own typed error. No record is read here, before
        // the approvals; after them `admit` reads what changed.
        if let Some(ledgers) = &self.ledgers {
            ledgers
                .known_key(data.name())
                .map_err(|e| budget_refusal(data.name(), e))?;
        }
        // Before the approvals: a site whose schema file is not the one the officers signed
        // would encode other columns than the job expects, whatever its officers said.
        if let JobData::Table(dataset) = &data {
            dataset.check_job_schema(job.data.schema_sha256.as_deref())?;
        }
        if let Some(approvals) = &self.approvals {
            // The ledger's own caps are checked below with the DP plan; the site policy's budget
            // clause weighs the job's target ε against what the dataset has spent already.
            let spent = match &self.ledgers {
                Some(ledgers) => ledgers
                    .spent_known(data.name())
                    .map_err(|e| budget_refusal(data.name(), e))?,
                None => 0.0,
            };
            approvals.check(task, now_ms, spent)?;
        } else {
            // Only `insecure_no_approvals = true` builds a gate without approvals; every task it
            // lets through says so, so that no unapproved training goes unnoticed in the log.
            tracing::warn!(
                job = %task.job_id,
                task = %task.task_id,
                "insecure_no_approvals = true: running this task WITHOUT any approval check"
            );
        }
        // After the approvals: the digest checked here is inside the spec the officers signed.
        let tokenizer = match job
            .tokenizer_sha256()
            .map_err(|e| Refusal::JobSpec(e.to_string()))?
        {
            Some(wanted) => Some(self.tokenizers.approve(wanted)?),
            None => None,
        };
        let strategy = StrategyView::from_json(&task.strategy_config_json)
            .map_err(|e| Refusal::JobSpec(e.to_string()))?;
        if work == Work::Train && task.global_model_id.is_empty() {
            return Err(Refusal::NoGlobalModel);
        }
        // A round already released on this global model is sent again: it spends nothing.
        // Not under record-level distributed DP: its noise is drawn at encoding, so a second
        // masked input is a second release; the retried attempt trains a fresh step and is
        // charged again (the first attempt's masked input left the site: it has spent), within
        // the job's target (`SiteLedgers::check`).
        let distributed = crate::ledger::training_kind(&job)
            == tutela_privacy::ledger::MechanismKind::DistributedDpSgd;
        let work = if work == Work::Train
            && !distributed
            && self
                .resends
                .holds(&task.job_id, task.round, &task.global_model_id)
        {
            Work::Resend
        } else {
            work
        };
        // The budget before anything is fetched for the task: a job the site would decline
        // for its spend must not cost it a download, disk or a trail event. The job's whole
        // plan is weighed (every round still to run), as `admit` weighs it.
        let weigh_budget = match work {
            Work::Train => true,
            // An INITIALIZE spends nothing, and a site over budget declines the job's TRAIN
            // tasks; but it must not fetch a base for a job it would decline.
            Work::Initialize => job
                .base_sha256()
                .ok()
                .flatten()
                .is_some_and(|wanted| self.base_models.would_fetch(wanted)),
            Work::Resend => false,
        };
        let budget = match &self.ledgers {
            Some(ledgers) if weigh_budget => match &data {
                JobData::Table(dataset) => {
                    // Building a table's model reads no data and needs no base.
                    let dimension = TabularRound {
                        dataset: dataset.clone(),
                    }
                    .trained_parameters(&job)
                    .map_err(sizing_refusal)?;
                    check_budget(ledgers, task, data.name(), &job, dimension)?;
                    BudgetChecked::Exact
                }
                JobData::Text(dataset) => {
                    // The adapters' shapes are the base's, which may not be here yet. At
                    // dimension 0 the plan has no noise-grid correction: for a stated σ that
                    // understates ε (so only what the exact check refuses too is refused
                    // here); for a σ calibrated to the target the correction is absorbed in
                    // σ and the planned ε is the same.
                    check_budget(ledgers, task, dataset.name(), &job, 0)?;
                    BudgetChecked::BeforeBase
                }
            },
            _ => BudgetChecked::NotNeeded,
        };
        Ok(Approved {
            work,
            job,
            strategy,
            data,
            tokenizer,
            budget,
        })
    }

    /// The second half of the gate, on a task [`approve`](Self::approve) passed: only what
    /// needs the job's base checkpoint (the site's own, or one fetched after approval): the
    /// base itself, the round built on it, and a language model's budget weighed again with
    /// its adapters' real size.
    pub fn admit(&self, task: &pb::Task, approved: Approved) -> Result<Admitted, Refusal> {
        let Approved {
            work,
            job,
            strategy,
            data,
            tokenizer,
            budget,
        } = approved;
        let base = match job
            .base_sha256()
            .map_err(|e| Refusal::JobSpec(e.to_string()))?
        {
            Some(wanted) => Some(self.base_models.approve(wanted)?),
            None => None,
        };
        let round = Self::round_for(&job, data, tokenizer.as_ref(), base.as_ref())?;
        if budget == BudgetChecked::BeforeBase
            && let Some(ledgers) = &self.ledgers
        {
            // The adapters' size enters the noise grid's correction; sizing them reads the
            // base, no document.
            let dimension = round.trained_parameters(&job).map_err(sizing_refusal)?;
            check_budget(ledgers, task, round.dataset_name(), &job, dimension)?;
        }
        Ok(Admitted {
            work,
            job,
            strategy,
            round,
            job_id: task.job_id.clone(),
            ledgers: self.ledgers.clone(),
            tokenizer,
            base,
        })
    }
}

/// A round that could not be sized for the ledger's plan, as a refusal.
pub(super) fn sizing_refusal(e: LocalError) -> Refusal {
    match e {
        // About the job's spec: quoting it tells the coordinator nothing of the site.
        LocalError::JobSpec(_) | LocalError::Model(_) => Refusal::JobSpec(e.to_string()),
        // May name a file of the site (a base checkpoint's config.json).
        other => Refusal::ModelUnusable(other.to_string()),
    }
}

/// `job`'s whole planned spend on `dataset`, its model of `dimension` trained parameters,
/// against the ledger's caps and what is left of the job's own target.
pub(super) fn check_budget(
    ledgers: &SiteLedgers,
    task: &pb::Task,
    dataset: &str,
    job: &JobView,
    dimension: usize,
) -> Result<(), Refusal> {
    // A ledger that cannot be read is refused as such here: `check` reports it as a string
    // that names the ledger's file, which must not be sent as a budget reason.
    ledgers
        .open(dataset)
        .map_err(|e| budget_refusal(dataset, e))?;
    ledgers
        .check(&task.job_id, task.round, dataset, job, dimension)
        .map_err(Refusal::PrivacyBudget)
}
