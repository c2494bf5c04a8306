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
//!    A known task kind, a job spec this node can read, a dataset of the kind the job's model
//!    family reads for its schema (a table, or a text dataset for a language model), a deadline
//!    not yet passed, the signed approvals and site policy, the tokenizer and base checkpoint a
//!    language-model job names by digest ([`crate::lm::tokenizer::site`], [`crate::lm::base`]),
//!    and the privacy budget. It picks the job's [`LocalRound`] once.
//!    A refusal is sent as `DeclineTask` with its reason, except a passed deadline, which is only
//!    logged (the coordinator has closed the task already).
//! 2. `INITIALIZE`: the round's initial weights are sent as the update: a layer network built
//!    from its registry name and hyper-parameters, the local schema's input shape and classes,
//!    and the job's seed ([`crate::models::seeded_init`]: every site would build bit-identical
//!    weights); a language model's adapters with every B zero.
//! 3. `TRAIN`: the global model is fetched and its stream digest checked against the task's model
//!    id; the round evaluates it on the local validation split, trains it on the training split
//!    with the job's settings (FedProx's `proximal_mu` from the strategy settings), and the delta
//!    `local − global` goes through the [`UpdateFilter`]s (where DP clipping and noise will go)
//!    and is uploaded with the [`meta`] keys.
//! 4. Anything the node cannot do (bad spec, unknown model, a training error, even a panic) is
//!    declined with the reason. A failed RPC (coordinator away, update refused) is logged: the
//!    coordinator already knows, or will re-send.
//!
//! # Where things are
//!
//! - `gate`: [`TaskGate`], what a task must pass before any data is touched.
//! - `filter`: [`UpdateFilter`], what an update passes through before it leaves the site.
//! - [`readiness`]: which tables are ready, re-checked until they are, and announced when that
//!   changes.
//! - `worker`: the sessions and the worker that take tasks one at a time and run them.
//! - `transfer`: fetching the global model and uploading the update.
//! - [`round`]: [`LocalRound`], the seam between a task and what a model family does with the
//!   site's data, chosen once by the gate from the job's model family:
//!   - [`tabular`]: the round of a layer network (MLP, CNN) on a table;
//!   - [`language`]: the round of a language model on a text dataset.

mod base_fetch;
mod filter;
mod gate;
pub mod language;
mod metrics;
pub mod readiness;
pub mod round;
mod secagg;
mod statistics;
pub mod tabular;
mod transfer;
mod worker;

pub use filter::UpdateFilter;
pub use gate::{Admitted, Approved, Refusal, TaskGate, Work};
pub use round::{Deidentification, DpNoise, LocalError, LocalRound, RoundInput, RoundResult};
pub use tabular::{initial_weights, local_round};

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tch::Device;
use tokio::sync::mpsc;
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::tls::{TlsError, TlsMaterial};

use tutela_privacy::at_rest::KeyEncryptionKey;

use crate::config::{DeviceChoice, NodeConfig};
use crate::data::DataError;
use crate::dataset::SiteDataset;
use crate::ledger::SiteLedgers;
use crate::lm::base::SiteBaseModels;
use crate::lm::text_dataset::TextDataset;
use crate::lm::tokenizer::site::SiteTokenizers;
use crate::site_audit::SiteAudit;
use worker::{Session, Shared, worker};

/// Manifest metadata keys of a task's result (shared with the coordinator).
pub use tutela_protocol::federation::meta;

/// The node software version sent with `Connect`.
pub const NODE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Tasks queued between the task stream and the worker.
const TASK_QUEUE: usize = 64;
/// How often the site policy file is compared with the policy in force.
const SITE_POLICY_POLL: Duration = Duration::from_secs(5);
/// How many answered task ids are remembered, to skip a task the coordinator sends again.
const ANSWERED_MEMORY: usize = 1024;
/// How many received global models are kept under `work_dir/models`.
const KEEP_MODELS: usize = 8;
/// Why the agent cannot start (or, for `run`, cannot go on).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Metrics(String),
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
    #[error("{0}")]
    TextDataset(String),
    #[error("{0}")]
    BaseModels(String),
}

/// The pause before trying the next coordinator address after one failed.
const NEXT_ADDRESS_DELAY: Duration = Duration::from_millis(100);

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
    /// Signs and checks secure aggregation's keys and survivor lists.
    secagg_identity: Option<Arc<secagg::SecAggIdentity>>,
    /// The node's Prometheus metrics (`crate::node_metrics`), served with `[metrics]`.
    metrics: Arc<crate::node_metrics::NodeMetrics>,
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
                "dataset prepared; checking its data"
            );
            datasets.insert(name.clone(), Arc::new(dataset));
        }
        // A table that fails its check now (a database that is down, bad rows) is kept as not
        // ready: `run` re-checks it and announces it once it passes.
        let tables = Arc::new(readiness::TableReadiness::checked_at_start(datasets));
        for name in tables.ready_names() {
            tracing::info!(dataset = %name, "dataset ready (read when a task first needs it)");
        }
        for name in tables.not_ready_names() {
            tracing::warn!(
                dataset = %name,
                retry_in_secs = config.recheck.initial_secs,
                "dataset not ready: not offered to jobs; re-checked on a backoff and on SIGHUP"
            );
        }
        let mut text_datasets = BTreeMap::new();
        for (name, d) in &config.text_datasets {
            // `NodeConfig::validate` requires the site secret for a text dataset.
            let secret = site_secret.as_deref().ok_or_else(|| {
                AgentError::SiteSecret(format!(
                    "text dataset {name} needs `site_secret_file` (its commitment's salt)"
                ))
            })?;
            // Checks the keys, the path and the protection files; reads no document.
            let dataset = TextDataset::prepare(name, d, secret)
                .map_err(|e| AgentError::TextDataset(e.to_string()))?;
            tracing::info!(
                dataset = %name,
                protection = %dataset.protection_digest(),
                "text dataset ready (read when a task first needs it)"
            );
            text_datasets.insert(name.clone(), Arc::new(dataset));
        }
        let base_models = SiteBaseModels::index(&config.base_models)
            .map_err(|e| AgentError::BaseModels(e.to_string()))?;
        for (sha256, dir) in base_models.held() {
            tracing::info!(base_model = %dir.display(), %sha256, "base checkpoint held");
        }
        // Fetched bases are kept only encrypted: without a KEK there is no cache.
        let base_models = match (&kek, config.base_cache.fetch) {
            (Some(kek), true) => base_models.with_cache(
                crate::lm::base_cache::BaseModelCache::open_dir(
                    config.work_dir.join("base-models"),
                    kek.clone(),
                    config.base_cache.limits(),
                )
                .map_err(|e| AgentError::BaseModels(e.to_string()))?,
            ),
            (None, true) => {
                tracing::warn!(
                    "[base_cache] fetch = true but no [at_rest] KEK: fetched base models are kept \
                     only encrypted, so none is cached or used"
                );
                base_models
            }
            (_, false) => base_models,
        };
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
        let ledgers = SiteLedgers::new(
            config.work_dir.join("privacy-ledger"),
            kek.clone(),
            config.privacy.clone(),
        )
        .with_budget_sources(SiteLedgers::sources_of(&config));
        ledgers.learn_budgets();
        let secagg_identity = match secagg::SecAggIdentity::from_tls(&material) {
            Ok(id) => Some(Arc::new(id)),
            Err(why) => {
                tracing::warn!(
                    %why,
                    "this node cannot sign secure aggregation keys: it will decline secure \
                     aggregation tasks"
                );
                None
            }
        };
        Ok(Agent {
            secagg_identity,
            identity,
            coordinator,
            device,
            models_dir,
            audit,
            kek,
            gate: match (&config.site_policy, config.insecure_no_approvals) {
                (Some(path), false) => {
                    let approvals =
                        crate::approvals::SiteApprovals::load(&config.site, path, &material)
                            .map_err(|e| AgentError::SitePolicy(e.to_string()))?;
                    // The ε caps are the site policy's, read as it is reloaded.
                    let ledgers = ledgers.with_caps(approvals.reloading().clone());
                    TaskGate::with_tables(tables)
                        .with_ledgers(Arc::new(ledgers))
                        .with_tokenizers(tokenizers)
                        .with_text_datasets(text_datasets)
                        .with_base_models(base_models)
                        .with_approvals(approvals)
                }
                (None, true) => {
                    tracing::warn!(
                        "insecure_no_approvals = true: NO APPROVALS. This node trains on its data \
                         for any task the coordinator sends, without checking that this site's \
                         compliance officers approved the job and without a site policy. Never \
                         run a site like this; configure `site_policy`"
                    );
                    // No site policy, so no ε caps: the spend is still recorded.
                    TaskGate::with_tables(tables)
                        .with_ledgers(Arc::new(ledgers))
                        .with_tokenizers(tokenizers)
                        .with_text_datasets(text_datasets)
                        .with_base_models(base_models)
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
            metrics: Arc::new(
                crate::node_metrics::NodeMetrics::new()
                    .map_err(|e| AgentError::Metrics(e.to_string()))?,
            ),
            config,
        })
    }

    /// The node's metrics handle.
    pub fn metrics(&self) -> &Arc<crate::node_metrics::NodeMetrics> {
        &self.metrics
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
            secagg_identity: self.secagg_identity,
            client: Mutex::new(None),
            answered: Mutex::new(VecDeque::new()),
            metrics: self.metrics.clone(),
        });
        // `[metrics]`: served for as long as the agent runs; each budget read once now, then
        // after every round that charges it.
        let _metrics_task = match &self.config.metrics {
            Some(m) => Some(
                tutela_protocol::metrics::MetricsServer::bind(m)
                    .await
                    .map_err(|e| AgentError::Metrics(e.to_string()))?
                    .spawn(self.metrics.registry()),
            ),
            None => None,
        };
        if let Some(ledgers) = shared.gate.ledgers() {
            for dataset in shared.gate.dataset_names() {
                self.metrics.refresh_budget(ledgers, &dataset);
            }
        }
        // The site policy is re-read when its file changes and on SIGHUP, like the
        // coordinator's; a file that does not load leaves the policy in force (logged). The
        // tables that are not ready are re-checked on SIGHUP too, and on a backoff. The watchers
        // end by themselves once the gate (and its policy and tables) is dropped.
        let tables = shared.gate.tables().clone();
        let mut on_sighup: Vec<Arc<dyn tutela_policy::reload::Reloadable>> = vec![tables.clone()];
        if let Some(policy) = shared.gate.site_policy() {
            on_sighup.push(policy.clone());
            tutela_policy::reload::spawn_watcher(policy, SITE_POLICY_POLL);
        }
        if let Err(e) = tutela_policy::reload::reload_all_on_sighup(on_sighup) {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the site policy is reloaded on file change only, datasets re-checked on the backoff only");
        }
        readiness::spawn_rechecks(
            &tables,
            Backoff::new(self.config.recheck.initial(), self.config.recheck.max()),
        );
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
            not_ready = ?shared.gate.tables().not_ready_names(),
            version = NODE_VERSION,
            "site node starting"
        );
        // With several coordinator addresses (coordinators sharing one database, one leader at a
        // time), a session that ends (the coordinator is unreachable, died, or answered that it is
        // not the leader) is followed by one at the next address, at once; the backoff applies
        // once every address was tried.
        let addresses = &self.config.coordinator;
        let mut next = 0usize;
        loop {
            let address = addresses.nth_cyclic(next);
            let ended = tokio::select! {
                _ = &mut shutdown => break,
                ended = session.run(address, &mut backoff) => ended,
            };
            next += 1;
            let wait = if next % addresses.len().max(1) == 0 {
                backoff.next_delay()
            } else {
                NEXT_ADDRESS_DELAY
            };
            tracing::warn!(coordinator = %address, reason = %ended, next = %addresses.nth_cyclic(next), retry_in_secs = wait.as_secs_f64(), "not connected to the coordinator; reconnecting");
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
