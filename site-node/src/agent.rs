//! The site node's agent: connects out to the coordinator, takes tasks, trains, uploads.
//!
//! # Life cycle
//!
//! [`Agent::new`] checks everything that can be checked before the network: the TLS files load,
//! the node certificate names this config's site, the device exists, the work directory is
//! writable, and every configured dataset loads, splits and standardises. A misconfigured node
//! stops here with an error that names the file or key.
//!
//! [`Agent::run`] then loops until shutdown: a *session* opens a mutually authenticated channel to
//! the coordinator (which must present `spiffe://<consortium>/coordinator`, the consortium being
//! the one in the node's own certificate), calls `Connect` with the node's dataset names, version
//! and device, and forwards every task it receives to a worker. When the stream breaks or ends,
//! the agent waits (exponential backoff with jitter, [`Backoff`]) and opens a new session. Each
//! session re-reads the TLS files, so a renewed certificate or a fresh CRL takes effect at the next
//! reconnect.
//!
//! The worker handles tasks one at a time (local training uses the whole machine, and libtorch's
//! seed is process-wide). It outlives sessions: a task being trained when the connection drops is
//! finished and uploaded over the new connection. The node keeps no per-job state: what a task
//! needs is in the task (job spec, model id, strategy settings, deadline) and in the coordinator's
//! global model, so after a reconnect the node simply serves whatever tasks the coordinator
//! (re-)sends. The only memory is a short list of tasks already answered, so a re-sent task is
//! not trained twice.
//!
//! # A task
//!
//! 1. [`TaskGate::check_task`] decides, before any data is touched, whether the node will do it.
//!    Today: a known task kind, a job spec this node can read, a dataset for its schema, and a
//!    deadline not yet passed. Local policy, signed approvals and the privacy budget plug in here,
//!    and so does the tokenizer a language-model job names by digest ([`crate::lm::tokenizer::site`]).
//!    A refusal is sent as `DeclineTask` with its reason, except a passed deadline, which is only
//!    logged (the coordinator has closed the task already).
//! 2. `INITIALIZE`: the job's model is built from its registry name and hyper-parameters, the
//!    input shape and classes of the local schema, and the job's seed ([`crate::models::seeded_init`]:
//!    every site would build bit-identical weights), and sent as the update.
//! 3. `TRAIN`: the global model is fetched and its stream digest checked against the task's model
//!    id; it is evaluated on the local validation split, trained on the training split with the
//!    job's settings (FedProx's `proximal_mu` from the strategy settings), and the delta
//!    `local − global` goes through the [`UpdateFilter`]s (where DP clipping and noise will go)
//!    and is uploaded with the [`meta`] keys.
//! 4. Anything the node cannot do (bad spec, unknown model, a training error, even a panic) is
//!    declined with the reason. A failed RPC (coordinator away, update refused) is logged: the
//!    coordinator already knows, or will re-send.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use tch::Device;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::Instrument;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::federation_client::FederationClient;
use tutela_protocol::server::MAX_MESSAGE_BYTES;
use tutela_protocol::stream::{self, MemorySource, SafetensorsFileSink};
use tutela_protocol::tensor::DType;
use tutela_protocol::tls::{TlsError, TlsMaterial};

use tutela_privacy::at_rest::{KeyEncryptionKey, decrypt_to_vec};

use crate::at_rest::EncryptedSafetensorsSink;
use crate::config::{Corruption, DeviceChoice, NodeConfig, TestingConfig};
use crate::data::DataError;
use crate::data::DatasetSchema;
use crate::dataset::SiteDataset;
use crate::failure::{FailureCode, SiteFailure};
use crate::jobspec::{JobSpecError, JobView, StrategyView, batch_seed};
use crate::ledger::{RoundSpend, SiteLedgers};
use crate::lm::tokenizer::site::{ApprovedTokenizer, SiteTokenizers, TokenizerRefusal};
use crate::models::{Model, ModelError};
use crate::resend::{ReleasedUpdate, ResendCache};
use crate::site_audit::SiteAudit;
use crate::train::{TrainError, evaluate, train_local};
use crate::weights::{
    NamedTensors, WeightsError, delta, export_weights, from_safetensors_bytes, load_safetensors,
    load_weights,
};

/// Manifest metadata keys of a task's result (shared with the coordinator).
pub use tutela_protocol::federation::meta;

/// The node software version sent with `Connect`.
pub const NODE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Tasks queued between the task stream and the worker.
const TASK_QUEUE: usize = 64;
/// How many answered task ids are remembered, to skip a task the coordinator sends again.
const ANSWERED_MEMORY: usize = 1024;
/// How many received global models are kept under `work_dir/models`.
const KEEP_MODELS: usize = 8;

/// Why the agent cannot start (or, for `run`, cannot go on).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("[at_rest]: {0}")]
    KeyEncryptionKey(#[from] tutela_privacy::at_rest::AtRestError),
    #[error(
        "the node certificate {} names {identity}, which is not a site node: a node needs a \
         certificate for spiffe://<consortium>/site/<site>/node",
        .cert.display()
    )]
    NotANode { cert: PathBuf, identity: String },
    #[error(
        "node.toml says site = {configured:?}, but the node certificate {} is for site {in_cert:?} \
         ({identity}); fix `site` or use the certificate issued to this site",
        .cert.display()
    )]
    SiteMismatch {
        configured: String,
        in_cert: String,
        identity: String,
        cert: PathBuf,
    },
    #[error("the coordinator identity: {0}")]
    ServerIdentity(String),
    #[error("`device = \"cuda\"`, but libtorch sees no CUDA GPU; use \"auto\" or \"cpu\"")]
    NoCuda,
    #[error("{0}")]
    SitePolicy(String),
    #[error("`work_dir` {}: {source}", .path.display())]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`datasets.{name}`: {source}")]
    Dataset {
        name: String,
        // Boxed: DataError is large, and it is rare.
        #[source]
        source: Box<DataError>,
    },
    #[error("`site_secret_file`: {0}")]
    SiteSecret(String),
    #[error("{0}")]
    Audit(String),
    #[error("`tokenizers`: {0}")]
    Tokenizer(String),
}

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

/// Transforms an update before it leaves the site: the seam where DP clipping and noise (and
/// secure-aggregation masking) plug in. It is the coordinator's trait too
/// (`tutela_protocol::update_filter`: one meaning of a filter on both sides); here the chain runs
/// on the update in memory ([`tutela_protocol::update_filter::filter_in_memory`]), in the order
/// the filters were added, on TRAIN updates only (initial weights are drawn from the job's seed
/// and carry no data).
pub use tutela_protocol::update_filter::UpdateFilter;

/// Runs the node's filters on an update, then `[testing] corrupt_update` if set (after every
/// honest filter, as a broken or malicious node would bypass them).
fn filter_update(shared: &Shared, update: &mut NamedTensors) -> Result<(), Failure> {
    let declined =
        |why: String| Failure::Decline(SiteFailure::new(FailureCode::UpdateFiltered, why));
    if !shared.filters.is_empty() {
        let manifest = tutela_protocol::update_filter::manifest_of(update)
            .map_err(|e| declined(format!("the update's tensors: {e}")))?;
        let info = tutela_protocol::update_filter::UpdateInfo {
            site: &shared.site,
            weight: 1.0,
            manifest: &manifest,
        };
        tutela_protocol::update_filter::filter_in_memory(&shared.filters, &info, update)
            .map_err(|why| declined(format!("update filter: {why}")))?;
    }
    if let Some(c) = shared.testing.corrupt_update {
        corrupt_update(c, update);
    }
    Ok(())
}

/// `[testing] corrupt_update`: spoils an update like a malicious or broken node would (it may
/// change a shape, which no filter can, so it is not one).
fn corrupt_update(corruption: Corruption, update: &mut NamedTensors) {
    {
        let Some((spec, bytes)) = update.first_mut() else {
            return;
        };
        match corruption {
            Corruption::Nan => {
                if spec.dtype == DType::F32 && bytes.len() >= 4 {
                    bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
                }
            }
            Corruption::WrongShape => {
                let numel = spec.numel().unwrap_or(0);
                spec.shape = vec![numel + 1];
                bytes.extend_from_slice(&vec![0u8; spec.dtype.size() as usize]);
            }
            Corruption::Scale => scale_update(update, 1e6),
            Corruption::Scale100 => scale_update(update, 100.0),
            Corruption::SignFlip => scale_update(update, -10.0),
        }
    }
}

/// Multiplies every F32 value of `update` by `factor`.
fn scale_update(update: &mut NamedTensors, factor: f32) {
    for (spec, bytes) in update.iter_mut() {
        if spec.dtype != DType::F32 {
            continue;
        }
        for word in bytes.chunks_exact_mut(4) {
            let mut w = [0u8; 4];
            w.copy_from_slice(word);
            word.copy_from_slice(&(f32::from_le_bytes(w) * factor).to_le_bytes());
        }
    }
}

/// Exponential backoff with jitter between connection attempts.
///
/// Each delay is drawn uniformly from [d/2, d], where d starts at the initial delay and doubles
/// after every attempt up to the maximum. The jitter keeps a consortium's nodes from reconnecting
/// in lockstep after a coordinator restart; the lower half-bound keeps the delay growing.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter: f64 = rand::rng().random_range(0.5..=1.0);
        d.mul_f64(jitter)
    }

    /// Back to the initial delay, after a successful connection.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// The site node's agent. See the module documentation.
pub struct Agent {
    config: NodeConfig,
    identity: Identity,
    coordinator: Identity,
    device: Device,
    models_dir: PathBuf,
    /// The key-encryption key of the files the node writes; `None`: written in the clear.
    kek: Option<Arc<dyn KeyEncryptionKey>>,
    gate: TaskGate,
    filters: Vec<Arc<dyn UpdateFilter>>,
    /// The node's own connection to the audit trail (`[audit]`).
    audit: Option<Arc<SiteAudit>>,
}

impl Agent {
    /// Checks the configuration against the certificate, the device, the work directory and the
    /// data, and loads every dataset.
    pub fn new(config: NodeConfig) -> Result<Agent, AgentError> {
        let material = TlsMaterial::load(&config.tls)?;
        let identity = material.identity.clone();
        match &identity.principal {
            Principal::Node { site } if *site == config.site => {}
            Principal::Node { site } => {
                return Err(AgentError::SiteMismatch {
                    configured: config.site.clone(),
                    in_cert: site.clone(),
                    identity: identity.uri(),
                    cert: config.tls.cert.clone(),
                });
            }
            _ => {
                return Err(AgentError::NotANode {
                    cert: config.tls.cert.clone(),
                    identity: identity.uri(),
                });
            }
        }
        let coordinator = Identity::new(&identity.consortium, Principal::Coordinator)
            .map_err(|e| AgentError::ServerIdentity(e.to_string()))?;
        // Fails now on TLS material rustls cannot use, rather than at every reconnect.
        ClientTls::from_material(&material, Some(coordinator.clone()))?;
        if config.torch_threads > 0 {
            tch::set_num_threads(config.torch_threads as i32);
        }
        let device = match config.device {
            DeviceChoice::Auto => crate::default_device(),
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceChoice::Cuda => return Err(AgentError::NoCuda),
        };
        let models_dir = config.work_dir.join("models");
        std::fs::create_dir_all(&models_dir).map_err(|source| AgentError::WorkDir {
            path: models_dir.clone(),
            source,
        })?;
        let kek: Option<Arc<dyn KeyEncryptionKey>> = match config.key_encryption_key()? {
            Some(k) => Some(Arc::new(k)),
            None => {
                tracing::warn!(
                    "no [at_rest] key-encryption key: the models this node receives are written to {} in the clear",
                    models_dir.display()
                );
                None
            }
        };
        let audit = match &config.audit {
            Some(a) => Some(Arc::new(
                SiteAudit::new(a, &material, &config.work_dir, kek.clone())
                    .map_err(|e| AgentError::Audit(e.to_string()))?,
            )),
            None => None,
        };
        let site_secret = match &config.site_secret_file {
            Some(path) => Some(
                tutela_privacy::at_rest::read_secret_file_outside(path, &config.work_dir)
                    .map_err(|e| AgentError::SiteSecret(e.to_string()))?,
            ),
            None => None,
        };
        let mut datasets = BTreeMap::new();
        for (name, d) in &config.datasets {
            // Checks the schema, the column declaration and the anonymization pipeline; reads
            // no record (that waits for the first task the node admits).
            let dataset =
                SiteDataset::prepare(name, d, site_secret.as_deref()).map_err(|source| {
                    AgentError::Dataset {
                        name: name.clone(),
                        source: Box::new(source),
                    }
                })?;
            tracing::info!(
                dataset = %name,
                path = %d.path.display(),
                features = dataset.n_features(),
                anonymized = dataset.is_anonymized(),
                "dataset ready (read when a task first needs it)"
            );
            datasets.insert(name.clone(), Arc::new(dataset));
        }
        let tokenizers = SiteTokenizers::new(config.tokenizers.clone());
        for (path, sha256) in tokenizers
            .check()
            .map_err(|e| AgentError::Tokenizer(e.to_string()))?
        {
            tracing::info!(tokenizer = %path.display(), %sha256, "tokenizer held");
        }
        if let Some(t) = &config.testing {
            tracing::warn!(
                testing = ?t,
                "[testing] is set: this node misbehaves on purpose; never use this config in production"
            );
        }
        // The privacy ledgers live in the work directory, encrypted like everything else there.
        let ledgers = Arc::new(SiteLedgers::new(
            config.work_dir.join("privacy-ledger"),
            kek.clone(),
            config.privacy.clone(),
        ));
        Ok(Agent {
            identity,
            coordinator,
            device,
            models_dir,
            audit,
            kek,
            gate: match (&config.site_policy, config.insecure_no_approvals) {
                (Some(path), false) => TaskGate::new(datasets)
                    .with_ledgers(ledgers)
                    .with_tokenizers(tokenizers)
                    .with_approvals(
                        crate::approvals::SiteApprovals::load(&config.site, path, &material)
                            .map_err(|e| AgentError::SitePolicy(e.to_string()))?,
                    ),
                (None, true) => {
                    tracing::warn!(
                        "insecure_no_approvals = true: NO APPROVALS. This node trains on its data \
                         for any task the coordinator sends, without checking that this site's \
                         compliance officers approved the job and without a site policy. Never \
                         run a site like this; configure `site_policy`"
                    );
                    TaskGate::new(datasets)
                        .with_ledgers(ledgers)
                        .with_tokenizers(tokenizers)
                }
                // `NodeConfig::validate` refuses both; checked again for configs built in code.
                (None, false) => {
                    return Err(AgentError::SitePolicy(
                        "`site_policy` is required (or, for a lab or a test only, \
                         `insecure_no_approvals = true`)"
                            .into(),
                    ));
                }
                (Some(_), true) => {
                    return Err(AgentError::SitePolicy(
                        "`site_policy` and `insecure_no_approvals = true` are both set: remove \
                         `insecure_no_approvals`"
                            .into(),
                    ));
                }
            },
            filters: Vec::new(),
            config,
        })
    }

    /// Adds an update filter (DP clipping and noise, later masking). Filters run in the order
    /// they are added; a `[testing]` corruption runs after all of them.
    pub fn with_update_filter(mut self, filter: Arc<dyn UpdateFilter>) -> Self {
        self.filters.push(filter);
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// "cuda" or "cpu", as `Connect` reports it.
    pub fn device_name(&self) -> &'static str {
        match self.device {
            Device::Cuda(_) => "cuda",
            _ => "cpu",
        }
    }

    pub fn gate(&self) -> &TaskGate {
        &self.gate
    }

    /// Serves the coordinator until `shutdown` completes, reconnecting whenever the connection
    /// is lost. Returns only at shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let device_name = self.device_name();
        let filters = self.filters;
        let shared = Arc::new(Shared {
            site: self.config.site.clone(),
            device: self.device,
            models_dir: self.models_dir,
            kek: self.kek,
            gate: self.gate,
            audit: self.audit,
            filters,
            testing: self.config.testing.clone().unwrap_or_default(),
            client: Mutex::new(None),
            answered: Mutex::new(VecDeque::new()),
        });
        let (tx, rx) = mpsc::channel(TASK_QUEUE);
        let worker = tokio::spawn(worker(shared.clone(), rx));
        let mut backoff =
            Backoff::new(self.config.reconnect.initial(), self.config.reconnect.max());
        let session = Session {
            config: &self.config,
            coordinator: &self.coordinator,
            device_name,
            shared: &shared,
            tasks: &tx,
        };
        let mut shutdown = std::pin::pin!(shutdown);
        tracing::info!(
            node = %self.identity,
            coordinator = %self.config.coordinator,
            device = device_name,
            datasets = ?shared.gate.dataset_names(),
            version = NODE_VERSION,
            "site node starting"
        );
        loop {
            let ended = tokio::select! {
                _ = &mut shutdown => break,
                ended = session.run(&mut backoff) => ended,
            };
            let wait = backoff.next_delay();
            tracing::warn!(reason = %ended, retry_in_secs = wait.as_secs_f64(), "not connected to the coordinator; reconnecting");
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        worker.abort();
        tracing::info!("site node stopped");
        Ok(())
    }
}

/// What the worker and the sessions share.
struct Shared {
    site: String,
    device: Device,
    models_dir: PathBuf,
    kek: Option<Arc<dyn KeyEncryptionKey>>,
    gate: TaskGate,
    audit: Option<Arc<SiteAudit>>,
    filters: Vec<Arc<dyn UpdateFilter>>,
    testing: TestingConfig,
    /// The client of the latest session; the worker uses it for FetchModel, SubmitUpdate and
    /// DeclineTask. tonic's channel reconnects by itself, and a new session replaces it.
    client: Mutex<Option<FederationClient<Channel>>>,
    /// Task ids already answered, oldest first.
    answered: Mutex<VecDeque<String>>,
}

impl Shared {
    fn client(&self) -> Option<FederationClient<Channel>> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn was_answered(&self, task_id: &str) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|t| t == task_id)
    }

    fn mark_answered(&self, task_id: &str) {
        let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        if answered.len() >= ANSWERED_MEMORY {
            answered.pop_front();
        }
        answered.push_back(task_id.to_string());
    }
}

/// One connection's worth of the agent loop.
struct Session<'a> {
    config: &'a NodeConfig,
    coordinator: &'a Identity,
    device_name: &'static str,
    shared: &'a Arc<Shared>,
    tasks: &'a mpsc::Sender<pb::Task>,
}

impl Session<'_> {
    /// Connects, announces the node and forwards tasks until the stream ends or breaks; returns
    /// why it ended.
    async fn run(&self, backoff: &mut Backoff) -> String {
        // Re-read on every session: a renewed certificate or a new CRL applies at the next
        // reconnect without a restart.
        let tls = match ClientTls::load(&self.config.tls, Some(self.coordinator.clone())) {
            Ok(t) => t,
            Err(e) => return format!("loading the TLS files: {e}"),
        };
        let channel = match client::connect_lazy(&self.config.coordinator, tls) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        let mut client = FederationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        *self.shared.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        tracing::info!(coordinator = %self.config.coordinator, "connecting");
        let request = pb::ConnectRequest {
            datasets: self.shared.gate.dataset_names(),
            node_version: NODE_VERSION.to_string(),
            device: self.device_name.to_string(),
        };
        let mut stream = match client.connect(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return describe_status("Connect", &status),
        };
        backoff.reset();
        tracing::info!(coordinator = %self.config.coordinator, "connected; waiting for tasks");
        loop {
            match stream.message().await {
                Ok(Some(task)) => {
                    tracing::info!(
                        task = %task.task_id,
                        job = %task.job_id,
                        round = task.round,
                        attempt = task.attempt,
                        kind = ?pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified),
                        "task received"
                    );
                    if self.tasks.send(task).await.is_err() {
                        return "the task worker stopped".into();
                    }
                }
                Ok(None) => return "the coordinator ended the task stream".into(),
                Err(status) => return describe_status("the task stream", &status),
            }
        }
    }
}

fn describe_status(what: &str, status: &tonic::Status) -> String {
    format!("{what}: {:?}: {}", status.code(), status.message())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How a task ended, for the log.
enum Done {
    Uploaded(pb::UpdateReceipt),
    Declined(SiteFailure),
    Skipped(String),
    Stalled,
}

/// Why a task failed.
enum Failure {
    /// The node cannot do it: the coordinator is told the failure's wire reason (a code, a
    /// column), the site's log gets the detail.
    Decline(SiteFailure),
    /// An exchange with the coordinator failed or was refused; the coordinator knows, or will
    /// re-send. Only logged.
    Coordinator(String),
}

/// Takes tasks one at a time. Each runs in its own tokio task, so that even a panic ends only
/// that task (and is declined), never the worker.
async fn worker(shared: Arc<Shared>, mut rx: mpsc::Receiver<pb::Task>) {
    while let Some(task) = rx.recv().await {
        if shared.was_answered(&task.task_id) {
            tracing::info!(task = %task.task_id, "task already answered; ignoring the repeat");
            continue;
        }
        let span = tracing::info_span!(
            "task",
            id = %task.task_id,
            job = %task.job_id,
            round = task.round,
            attempt = task.attempt
        );
        let mut handle = AbortOnDrop(tokio::spawn(
            handle_task(shared.clone(), task.clone()).instrument(span.clone()),
        ));
        let result = match (&mut handle.0).await {
            Ok(r) => r,
            Err(e) => Err(Failure::Decline(SiteFailure::new(
                FailureCode::Internal,
                format!("internal error in the node: {e}"),
            ))),
        };
        async {
            match result {
                Ok(Done::Uploaded(receipt)) => {
                    shared.mark_answered(&task.task_id);
                    tracing::info!(update = %receipt.update_digest, "update accepted by the coordinator");
                }
                Ok(Done::Declined(failure)) => {
                    shared.mark_answered(&task.task_id);
                    tracing::warn!(reason = %failure, "task declined");
                }
                Ok(Done::Skipped(reason)) => tracing::warn!(%reason, "task skipped"),
                Ok(Done::Stalled) => tracing::warn!("testing.stall_after_fetch: stalling; the task is left unanswered"),
                Err(Failure::Coordinator(why)) => tracing::warn!(error = %why, "task failed at the coordinator"),
                Err(Failure::Decline(failure)) => {
                    match decline(&shared, &task.task_id, &failure).await {
                        Ok(()) => {
                            shared.mark_answered(&task.task_id);
                            tracing::warn!(reason = %failure, "task declined");
                        }
                        Err(e) => tracing::warn!(reason = %failure, error = %e, "task failed, and declining it failed too"),
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }
}

/// A failure inside the node itself (a panicked or cancelled blocking task): code only.
fn internal(detail: String) -> Failure {
    Failure::Decline(SiteFailure::new(FailureCode::Internal, detail))
}

/// Aborts a task's handling when the worker is aborted (at shutdown): its RPCs stop with it.
/// (A training step already on a blocking thread runs to its end, and its result is dropped.)
struct AbortOnDrop(tokio::task::JoinHandle<Result<Done, Failure>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells the coordinator that the node will not do `task_id`: only the failure's wire reason
/// leaves the site (see [`crate::failure`]).
async fn decline(shared: &Shared, task_id: &str, failure: &SiteFailure) -> Result<(), String> {
    let mut client = shared.client().ok_or("not connected")?;
    client
        .decline_task(pb::DeclineTaskRequest {
            task_id: task_id.to_string(),
            reason: failure.wire_reason(),
        })
        .await
        .map(|_| ())
        .map_err(|s| describe_status("DeclineTask", &s))
}

async fn handle_task(shared: Arc<Shared>, task: pb::Task) -> Result<Done, Failure> {
    let admitted = match shared.gate.check_task(&task) {
        Ok(a) => a,
        Err(refusal) if !refusal.is_reported() => return Ok(Done::Skipped(refusal.to_string())),
        Err(refusal) => {
            let failure = SiteFailure::from(&refusal);
            return match decline(&shared, &task.task_id, &failure).await {
                Ok(()) => Ok(Done::Declined(failure)),
                Err(e) => Err(Failure::Coordinator(format!("declining ({failure}): {e}"))),
            };
        }
    };
    match admitted.work {
        Work::Initialize => initialize(&shared, &task, admitted).await,
        Work::Train => train(&shared, &task, admitted).await,
        Work::Resend => resend(&shared, &task, admitted).await,
    }
}

async fn initialize(shared: &Shared, task: &pb::Task, admitted: Admitted) -> Result<Done, Failure> {
    let device = shared.device;
    tracing::info!(
        model = admitted.job.model_name().unwrap_or_default(),
        seed = admitted.job.seed,
        "building the job's initial model"
    );
    let weights = tokio::task::spawn_blocking(move || {
        initial_weights(
            &admitted.job,
            admitted.dataset.schema(),
            admitted.dataset.n_features(),
            device,
        )
    })
    .await
    .map_err(|e| internal(format!("internal error building the model: {e}")))?
    .map_err(|e| Failure::Decline(SiteFailure::from(&e)))?;
    let metadata = BTreeMap::from([(meta::TASK.to_string(), task.task_id.clone())]);
    let receipt = upload(shared, weights, metadata).await?;
    Ok(Done::Uploaded(receipt))
}

async fn train(shared: &Shared, task: &pb::Task, admitted: Admitted) -> Result<Done, Failure> {
    if let Some(audit) = &shared.audit {
        record_in_audit_trail(shared, audit, task, &admitted).await?;
    }
    let model_path = fetch_model(shared, task).await?;
    if shared.testing.stall_after_fetch {
        return Ok(Done::Stalled);
    }
    let site = shared.site.clone();
    let device = shared.device;
    let (round, attempt) = (task.round, task.attempt);
    let kek = shared.kek.clone();
    let dataset_name = admitted.dataset.name().to_string();
    let privacy_spec = admitted.job.privacy.clone();
    let ledgers = admitted.ledgers.clone();
    let result = tokio::task::spawn_blocking(move || {
        local_round(
            &admitted,
            &model_path,
            kek.as_deref(),
            device,
            round,
            attempt,
            &site,
        )
    })
    .await
    .map_err(|e| internal(format!("internal error in local training: {e}")))?
    .map_err(|e| Failure::Decline(SiteFailure::from(&e)))?;
    tracing::info!(
        eval_loss = result.eval.loss,
        eval_accuracy = result.eval.accuracy,
        eval_samples = result.eval.n,
        train_loss = result.train_loss,
        train_seconds = result.train_seconds,
        train_samples = result.train_samples,
        "local round done"
    );
    // Kept at once: if the spend cannot be recorded now, or the coordinator dies before it
    // answers, the round it asks for again is answered with this same update (see
    // [`crate::resend`]), once its spend is in the trail.
    let released_metadata = round_metadata(task, &result);
    shared.gate.resends().keep(ReleasedUpdate {
        job_id: task.job_id.clone(),
        round,
        global_model_id: task.global_model_id.clone(),
        update: result.delta.clone(),
        metadata: released_metadata.clone(),
    });
    // The spend is in the trail before anything of the round leaves the site.
    if let (Some(audit), Some(ledgers), Some(spend)) = (&shared.audit, &ledgers, &result.privacy)
        && let Some(charge) = &spend.charge
    {
        let accountant = crate::ledger::accountant(
            privacy_spec
                .as_ref()
                .map(|p| p.accountant)
                .unwrap_or_default(),
        );
        crate::spend_anchor::anchor_charge(
            audit,
            ledgers,
            (&shared.site, &dataset_name, &task.job_id),
            charge,
            (spend.delta, accountant),
        )
        .await
        .map_err(|why| Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, why)))?;
    }
    let mut update = result.delta;
    filter_update(shared, &mut update)?;
    if task.deadline_unix_ms > 0 && now_ms() > task.deadline_unix_ms {
        return Ok(Done::Skipped(
            "training ended after the task's deadline; the update would be refused as late".into(),
        ));
    }
    let metadata = released_metadata;
    let receipt = upload(shared, update, metadata).await?;
    Ok(Done::Uploaded(receipt))
}

/// The manifest metadata of a round's update: the task, samples, metrics, dataset commitment
/// and the round's ε.
fn round_metadata(task: &pb::Task, result: &RoundResult) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::from([
        (meta::TASK.to_string(), task.task_id.clone()),
        (meta::SAMPLES.to_string(), result.train_samples.to_string()),
        (meta::TRAIN_LOSS.to_string(), result.train_loss.to_string()),
        (
            meta::TRAIN_SECONDS.to_string(),
            result.train_seconds.to_string(),
        ),
        (meta::EVAL_LOSS.to_string(), result.eval.loss.to_string()),
        (
            meta::EVAL_ACCURACY.to_string(),
            result.eval.accuracy.to_string(),
        ),
        (meta::EVAL_SAMPLES.to_string(), result.eval.n.to_string()),
    ]);
    if let Some(c) = &result.dataset_commitment {
        metadata.insert(meta::DATASET_COMMITMENT.to_string(), c.clone());
    }
    if let Some(d) = &result.deid_config_sha256 {
        metadata.insert(meta::DEID_CONFIG.to_string(), d.clone());
    }
    if let Some(p) = &result.privacy {
        metadata.insert(
            meta::DP_ROUND_EPSILON.to_string(),
            p.round_epsilon.to_string(),
        );
        metadata.insert(meta::DP_JOB_EPSILON.to_string(), p.job_epsilon.to_string());
        metadata.insert(meta::DP_DELTA.to_string(), p.delta.to_string());
    }
    metadata
}

/// Sends again the update this node released for the task's round (see [`crate::resend`]): no
/// data is read, nothing is trained, no ε is charged.
async fn resend(shared: &Shared, task: &pb::Task, admitted: Admitted) -> Result<Done, Failure> {
    // Its spend is in the trail first (recorded now if that failed when it was trained).
    if let (Some(audit), Some(ledgers)) = (&shared.audit, &admitted.ledgers) {
        audit
            .watch()
            .await
            .map_err(|e| Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, e)))?;
        crate::spend_anchor::reconcile(audit, ledgers, &shared.site, admitted.dataset.name())
            .await
            .map_err(|why| {
                Failure::Decline(SiteFailure::new(FailureCode::PrivacyLedgerUnusable, why))
            })?;
    }
    let Some(released) = shared
        .gate
        .resends()
        .get(&task.job_id, task.round, &task.global_model_id)
    else {
        return Err(Failure::Decline(SiteFailure::new(
            FailureCode::TaskInvalid,
            "the update of this round is no longer kept; the task can be sent again",
        )));
    };
    tracing::info!(
        round = task.round,
        attempt = task.attempt,
        "this round's update was released already: sending it again, without training or \
         charging ε again"
    );
    let mut update = released.update;
    filter_update(shared, &mut update)?;
    let mut metadata = released.metadata;
    metadata.insert(meta::TASK.to_string(), task.task_id.clone());
    let receipt = upload(shared, update, metadata).await?;
    Ok(Done::Uploaded(receipt))
}

/// Before training: the trail's history is still the one this site saw, and the dataset's
/// de-identification report is in it (the dataset is read here, the first time, so that the report
/// exists; see [`crate::site_audit`]).
async fn record_in_audit_trail(
    shared: &Shared,
    audit: &Arc<SiteAudit>,
    task: &pb::Task,
    admitted: &Admitted,
) -> Result<(), Failure> {
    // The trail's errors may name the node's files (its pinned checkpoint): code only.
    let audit_failure = |e: &dyn std::fmt::Display| {
        Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, e))
    };
    audit.watch().await.map_err(|e| audit_failure(&e))?;
    let dataset = admitted.dataset.clone();
    let data = tokio::task::spawn_blocking(move || dataset.load())
        .await
        .map_err(|e| internal(format!("internal error reading the dataset: {e}")))?
        .map_err(|e| Failure::Decline(SiteFailure::from(&e)))?;
    let recorded = audit
        .record_deidentification(&shared.site, &task.job_id, admitted.dataset.name(), &data)
        .await
        .map_err(|e| audit_failure(&e))?;
    if let Some(ledgers) = &admitted.ledgers {
        crate::spend_anchor::reconcile(audit, ledgers, &shared.site, admitted.dataset.name())
            .await
            .map_err(|why| {
                Failure::Decline(SiteFailure::new(FailureCode::PrivacyLedgerUnusable, why))
            })?;
    }
    if recorded {
        // The checkpoint that covers the new event, when the log has signed one already.
        audit.watch().await.map_err(|e| audit_failure(&e))?;
    }
    Ok(())
}

/// Downloads the task's global model into `work_dir/models/<id>.safetensors` and checks that its
/// stream digest is the model id the task names.
async fn fetch_model(shared: &Shared, task: &pb::Task) -> Result<PathBuf, Failure> {
    let mut client = shared
        .client()
        .ok_or_else(|| Failure::Coordinator("not connected".into()))?;
    tracing::info!(model = %task.global_model_id, "fetching the global model");
    let frames = client
        .fetch_model(pb::FetchModelRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .map_err(|s| Failure::Coordinator(describe_status("FetchModel", &s)))?
        .into_inner();
    let receive_err =
        |e: stream::StreamError| Failure::Coordinator(format!("receiving the global model: {e}"));
    let received = match &shared.kek {
        // The model goes to disk encrypted, under the name of the model the task expects; a
        // stream with another digest is caught below.
        Some(kek) => {
            let path = shared
                .models_dir
                .join(format!("{}.safetensors.enc", task.global_model_id));
            stream::receive(frames, EncryptedSafetensorsSink::new(path, kek.clone()))
                .await
                .map_err(receive_err)?
        }
        None => stream::receive(
            frames,
            SafetensorsFileSink::content_addressed(&shared.models_dir),
        )
        .await
        .map_err(receive_err)?,
    };
    let digest = received.digest_hex();
    if digest != task.global_model_id {
        // The bytes verified against the sender's own digest, but they are not the model the
        // task is about: train on nothing rather than on the wrong model.
        let _ = std::fs::remove_file(&received.output);
        // Both digests are the coordinator's own: nothing of the site in them.
        return Err(Failure::Decline(SiteFailure::with_public_note(
            FailureCode::GlobalModelMismatch,
            format!(
                "the model received has digest {digest}, but the task names model {}",
                task.global_model_id
            ),
        )));
    }
    prune_models(&shared.models_dir, KEEP_MODELS);
    Ok(received.output)
}

/// Keeps the `keep` most recent models in `dir`; best effort (a failure is only logged).
fn prune_models(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut models: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "safetensors" || x == "enc")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    models.sort();
    let excess = models.len().saturating_sub(keep);
    for (_, path) in models.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an old model");
        }
    }
}

/// Streams `tensors` to the coordinator with `metadata` in the manifest.
async fn upload(
    shared: &Shared,
    tensors: NamedTensors,
    metadata: BTreeMap<String, String>,
) -> Result<pb::UpdateReceipt, Failure> {
    let local = |e: &dyn std::fmt::Display| {
        Failure::Decline(SiteFailure::new(
            FailureCode::UpdateFailed,
            format!("preparing the upload: {e}"),
        ))
    };
    let manifest = crate::weights::manifest(&tensors, metadata).map_err(|e| local(&e))?;
    let data = tensors.into_iter().map(|(_, b)| Bytes::from(b)).collect();
    let source = MemorySource::from_parts(manifest, data).map_err(|e| local(&e))?;
    let mut client = shared
        .client()
        .ok_or_else(|| Failure::Coordinator("not connected".into()))?;
    tracing::info!("uploading the update");
    let (frames, source_error) = stream::send_for_upload(source);
    match client.submit_update(frames).await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => {
            let source_error = source_error.lock().ok().and_then(|mut s| s.take());
            Err(match source_error {
                Some(e) => Failure::Decline(SiteFailure::new(
                    FailureCode::UpdateFailed,
                    format!("reading the update to send: {e}"),
                )),
                None => Failure::Coordinator(describe_status("SubmitUpdate", &status)),
            })
        }
    }
}

/// Why a local step of a task failed: the reason a task is declined with.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The stored global model did not decrypt (tampered, truncated, or the wrong key).
    #[error("the global model: {0}")]
    GlobalModelAtRest(Box<tutela_privacy::at_rest::AtRestError>),
    #[error(transparent)]
    JobSpec(#[from] JobSpecError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the global model {}: {source}", .path.display())]
    GlobalModel {
        path: PathBuf,
        // Boxed, like `Update`'s: WeightsError is large and this error travels in every Result.
        #[source]
        source: Box<WeightsError>,
    },
    #[error("local training: {0}")]
    Train(#[from] TrainError),
    /// The dataset could not be read or anonymized (the error names the file, line, column).
    #[error("the local dataset: {0}")]
    Data(#[source] Box<DataError>),
    #[error("computing the update: {0}")]
    Update(#[source] Box<WeightsError>),
    /// DP-SGD could not be planned, the budget refuses it, or the ledger could not be written.
    #[error("privacy: {0}")]
    Privacy(String),
}

/// The job's initial weights: its model built from the job's seed for data of `schema` with
/// `n_features` features. Reads no data.
pub fn initial_weights(
    job: &JobView,
    schema: &DatasetSchema,
    n_features: usize,
    device: Device,
) -> Result<NamedTensors, LocalError> {
    let model = build_model(job, schema, n_features, device)?;
    export_weights(model.var_store()).map_err(|e| LocalError::Update(Box::new(e)))
}

fn build_model(
    job: &JobView,
    schema: &DatasetSchema,
    n_features: usize,
    device: Device,
) -> Result<Model, LocalError> {
    let spec = job.model_spec(schema, n_features)?;
    Ok(Model::new(job.model_name()?, spec, device, job.seed)?)
}

/// What one local round produced.
#[derive(Debug)]
pub struct RoundResult {
    /// `local − global`, F32, sorted by name.
    pub delta: NamedTensors,
    /// The global model on the validation split, before training.
    pub eval: crate::train::Eval,
    pub train_samples: usize,
    pub train_loss: f64,
    pub train_seconds: f64,
    /// The dataset commitment (hex) and the anonymization configuration's digest, for lineage.
    pub dataset_commitment: Option<String>,
    pub deid_config_sha256: Option<String>,
    /// What the round spent of the dataset's privacy budget (DP-SGD jobs only).
    pub privacy: Option<RoundSpend>,
}

/// Loads the global model at `global_path`, evaluates it on the validation split, trains it on
/// the training split and returns the delta.
pub fn local_round(
    admitted: &Admitted,
    global_path: &Path,
    kek: Option<&dyn KeyEncryptionKey>,
    device: Device,
    round: u32,
    attempt: u32,
    site: &str,
) -> Result<RoundResult, LocalError> {
    let dataset = admitted
        .dataset
        .load()
        .map_err(|e| LocalError::Data(Box::new(e)))?;
    let job = &admitted.job;
    let config = job.train_config(
        &admitted.strategy,
        batch_seed(job.seed, round, attempt, site),
    )?;
    let mut model = build_model(job, &dataset.schema, dataset.n_features(), device)?;
    let global_err = |source| LocalError::GlobalModel {
        path: global_path.to_path_buf(),
        source: Box::new(source),
    };
    let (global, _metadata) = match kek {
        Some(kek) => {
            let bytes = decrypt_to_vec(global_path, kek)
                .map_err(|e| LocalError::GlobalModelAtRest(Box::new(e)))?;
            from_safetensors_bytes(&bytes, global_path).map_err(global_err)?
        }
        None => load_safetensors(global_path).map_err(global_err)?,
    };
    load_weights(model.var_store_mut(), &global).map_err(global_err)?;
    let eval = evaluate(&model, &dataset.validation)?;
    let (report, privacy) =
        train_round(admitted, (round, attempt), &model, &dataset.train, &config)?;
    let local = export_weights(model.var_store()).map_err(|e| LocalError::Update(Box::new(e)))?;
    // Both lists are sorted by name (export_weights and load_safetensors sort), as delta needs.
    let delta = delta(&local, &global).map_err(|e| LocalError::Update(Box::new(e)))?;
    Ok(RoundResult {
        delta,
        eval,
        train_samples: dataset.train.n_rows,
        train_loss: report.mean_loss,
        train_seconds: report.seconds,
        dataset_commitment: dataset.commitment.map(|c| c.root_hex()),
        deid_config_sha256: dataset.deid.as_ref().map(|r| r.config_sha256.clone()),
        privacy,
    })
}

/// Trains one round: DP-SGD when the job says `privacy.mode = "local"` (checked against the
/// ledger with the real row count first, and the steps that ran recorded afterwards, even when
/// training fails part-way), plain training otherwise.
fn train_round(
    admitted: &Admitted,
    round_attempt: (u32, u32),
    model: &Model,
    train: &crate::data::Table,
    config: &crate::train::TrainConfig,
) -> Result<(crate::train::TrainReport, Option<RoundSpend>), LocalError> {
    let job = &admitted.job;
    let dimension = model.parameter_count();
    let dataset = admitted.dataset.name();
    let plan = match &admitted.ledgers {
        Some(l) => l.check_with_rows(
            &admitted.job_id,
            round_attempt.0,
            dataset,
            job,
            train.n_rows,
            dimension,
        ),
        None => crate::ledger::plan(job, train.n_rows, dimension),
    }
    .map_err(LocalError::Privacy)?;
    let Some(plan) = plan else {
        return Ok((train_local(model, train, config)?, None));
    };
    let (report, spend) = crate::dp::train_dp(model, train, config, &plan);
    let spent = match &admitted.ledgers {
        Some(l) => l
            .record(
                &admitted.job_id,
                round_attempt,
                dataset,
                train.n_rows,
                &plan,
                &spend,
                now_ms(),
            )
            .map_err(LocalError::Privacy)?,
        None => {
            let eps = |steps| -> Result<f64, LocalError> {
                if steps == 0 {
                    return Ok(0.0);
                }
                let m = plan
                    .mechanism(steps)
                    .map_err(|e| LocalError::Privacy(e.to_string()))?;
                tutela_privacy::accountant::epsilon(&[m], plan.delta, plan.accountant)
                    .map(|g| g.epsilon)
                    .map_err(|e| LocalError::Privacy(e.to_string()))
            };
            let round = eps(spend.steps)?;
            RoundSpend {
                charge: None,
                rows: train.n_rows,
                dataset_delta: plan.delta,
                round_epsilon: round,
                job_epsilon: round,
                dataset_epsilon: round,
                delta: plan.delta,
            }
        }
    };
    tracing::info!(
        round_epsilon = spent.round_epsilon,
        job_epsilon = spent.job_epsilon,
        dataset_epsilon = spent.dataset_epsilon,
        delta = spent.delta,
        planned_job_epsilon = plan.planned_epsilon,
        noise_multiplier = plan.noise_multiplier,
        "privacy spent"
    );
    Ok((report?, Some(spent)))
}
