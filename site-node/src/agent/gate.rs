//! The checks a task passes before the node touches data.

use std::collections::BTreeMap;
use std::sync::Arc;

use tch::Device;
use tutela_protocol::pb;


use super::tabular::build_model;
use super::{NODE_VERSION, now_ms};
use crate::dataset::SiteDataset;
use crate::jobspec::{JobView, StrategyView};
use crate::ledger::SiteLedgers;
use crate::lm::tokenizer::site::{ApprovedTokenizer, SiteTokenizers, TokenizerRefusal};
use crate::resend::ResendCache;

/// Why the node will not do a task; decided before any data is touched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the task's deadline passed {late_ms} ms ago")]
    DeadlinePassed { late_ms: i64 },
    #[error("unknown task kind {0}: this node (version {NODE_VERSION}) does INITIALIZE and TRAIN")]
    UnknownKind(i32),
    #[error("{0}")]
    JobSpec(String),
    #[error("this site has no dataset for schema {schema:?}; it has: {known}")]
    UnknownSchema { schema: String, known: String },
    #[error("a TRAIN task must name its global model (global_model_id is empty)")]
    NoGlobalModel,
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
    /// The dataset the job's schema names; not read yet (see [`SiteDataset::load`]).
    pub dataset: Arc<SiteDataset>,
    /// The task's job, for the privacy ledger.
    pub job_id: String,
    /// The site's privacy ledgers, when it keeps a budget (see [`crate::ledger`]).
    pub ledgers: Option<Arc<SiteLedgers>>,
    /// The tokenizer the job names (`model.tokenizer_sha256`), read and digested when the task
    /// was admitted: training loads these bytes, not the file again.
    pub tokenizer: Option<ApprovedTokenizer>,
}

/// The checks a task passes before the node touches data: the seam where local policy, signed
/// approvals and the privacy budget will plug in.
#[derive(Debug, Clone)]
pub struct TaskGate {
    datasets: BTreeMap<String, Arc<SiteDataset>>,
    ledgers: Option<Arc<SiteLedgers>>,
    /// The last released update, which a repeated round is answered with.
    resends: Arc<ResendCache>,
    /// The site policy and approval check (`site_policy` in node.toml); `None`: not checked,
    /// which the node allows only under `insecure_no_approvals = true` (each task warns).
    approvals: Option<Arc<crate::approvals::SiteApprovals>>,
    /// The tokenizer files the site holds (`tokenizers` in node.toml).
    tokenizers: SiteTokenizers,
}

impl TaskGate {
    /// A gate that checks no approvals until [`with_approvals`](Self::with_approvals) adds them;
    /// [`Agent::new`] always does, unless node.toml sets `insecure_no_approvals = true`.
    pub fn new(datasets: BTreeMap<String, Arc<SiteDataset>>) -> Self {
        TaskGate {
            datasets,
            ledgers: None,
            resends: Arc::default(),
            approvals: None,
            tokenizers: SiteTokenizers::default(),
        }
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

    /// Checks every TRAIN task's planned privacy spend against these ledgers' caps.
    pub fn with_ledgers(mut self, ledgers: Arc<SiteLedgers>) -> Self {
        self.ledgers = Some(ledgers);
        self
    }

    /// The node's last released update.
    pub fn resends(&self) -> &Arc<ResendCache> {
        &self.resends
    }

    /// The schema names this node has data for.
    pub fn dataset_names(&self) -> Vec<String> {
        self.datasets.keys().cloned().collect()
    }

    /// Decides whether the node does `task` now.
    pub fn check_task(&self, task: &pb::Task) -> Result<Admitted, Refusal> {
        self.check_task_at(task, now_ms())
    }

    /// [`check_task`](Self::check_task) at a given time (Unix milliseconds), for tests.
    pub fn check_task_at(&self, task: &pb::Task, now_ms: i64) -> Result<Admitted, Refusal> {
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
        let dataset = self
            .datasets
            .get(&job.data.schema)
            .cloned()
            .ok_or_else(|| Refusal::UnknownSchema {
                schema: job.data.schema.clone(),
                known: self.dataset_names().join(", "),
            })?;
        if let Some(approvals) = &self.approvals {
            // The ledger's own caps are checked below with the DP plan; the site policy's budget
            // clause weighs the job's target ε against what the dataset has spent already.
            let spent = match &self.ledgers {
                Some(ledgers) => ledgers
                    .spent(dataset.name())
                    .map_err(|e| Refusal::Ledger(e.to_string()))?,
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
        let work = if work == Work::Train
            && self
                .resends
                .holds(&task.job_id, task.round, &task.global_model_id)
        {
            Work::Resend
        } else {
            work
        };
        if work == Work::Train
            && let Some(ledgers) = &self.ledgers
        {
            // The model's size enters the noise grid's correction; building it reads no data.
            let dimension = build_model(&job, dataset.schema(), dataset.n_features(), Device::Cpu)
                .map_err(|e| Refusal::JobSpec(e.to_string()))?
                .parameter_count();
            // A ledger that cannot be read is refused as such here: `check` reports it as a
            // string that names the ledger's file, which must not be sent as a budget reason.
            ledgers
                .open(dataset.name())
                .map_err(|e| Refusal::Ledger(e.to_string()))?;
            ledgers
                .check(&task.job_id, task.round, dataset.name(), &job, dimension)
                .map_err(Refusal::PrivacyBudget)?;
        }
        Ok(Admitted {
            work,
            job,
            strategy,
            dataset,
            job_id: task.job_id.clone(),
            ledgers: self.ledgers.clone(),
            tokenizer,
        })
    }
}
