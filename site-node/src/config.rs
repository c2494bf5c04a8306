//! The node's configuration file (`tutela-node run --config node.toml`).
//!
//! Parsed strictly: an unknown key is an error, never a silently ignored setting, and every
//! error names the key it is about (toml's own messages name the key and show the line; our
//! range checks say `datasets.breast_cancer.validation_fraction`). Relative paths are resolved
//! against the directory of the config file, so a config works whatever directory the service
//! starts in. Every key is documented in `deploy/config/node.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tutela_protocol::identity::validate_segment;
use tutela_protocol::tls::TlsFiles;

mod trail;

/// Why the configuration cannot be used. Every variant names the file, and the key where there
/// is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the shape of a node config: toml's message names the key and shows the
    /// offending line (unknown key, missing key, wrong type, unknown value).
    #[error("{}: {message}", .path.display())]
    Syntax { path: PathBuf, message: String },
    /// Well-formed, but a value is out of range.
    #[error("{}: `{key}` {problem}", .path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
    /// A file the config names is not there (see [`NodeConfig::check_files`]).
    #[error(transparent)]
    Missing(Box<tutela_protocol::config_path::ConfigPathError>),
}

impl ConfigError {
    /// The dotted key a range error is about (`None` for a syntax error, whose message names it).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Missing(e) => Some(&e.key),
            _ => None,
        }
    }
}

/// The whole `node.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The site this node serves; must equal the site in the node certificate.
    pub site: String,
    /// The coordinator's `HOST:PORT`, or several (coordinators sharing one database, one
    /// leader at a time), tried in order; HOST must be a name or address in its certificate.
    pub coordinator: CoordinatorAddresses,
    pub tls: TlsFiles,
    /// The node's own directory: received global models are kept under `models/`.
    pub work_dir: PathBuf,
    #[serde(default)]
    pub device: DeviceChoice,
    /// CPU threads libtorch may use for training; 0 (the default) leaves libtorch's own choice
    /// (one per core). Several nodes sharing a machine (a demo, a test) should set 1 each, or
    /// their thread pools oversubscribe the cores and every node slows down.
    #[serde(default)]
    pub torch_threads: usize,
    /// Local datasets by the schema name jobs use (`data.schema` in a job spec).
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetConfig>,
    /// Local text datasets (for language models) by name, read through the text protection
    /// pipeline (`crate::lm::text_dataset`). Names are shared with `datasets`: one may not be in
    /// both. Not yet offered to jobs (see `crate::lm`).
    #[serde(default)]
    pub text_datasets: BTreeMap<String, crate::lm::text_dataset::TextDatasetConfig>,
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// How often a dataset that is not ready (its source down, its data failing the check) is
    /// read again; a SIGHUP re-reads at once.
    #[serde(default)]
    pub recheck: RecheckConfig,
    /// Encryption of the files the node writes. Without it they are written in the clear (and
    /// the node says so at start).
    #[serde(default)]
    pub at_rest: Option<AtRestConfig>,
    /// The consortium's audit service (see `crate::site_audit`): the node records there, as
    /// itself, each dataset's de-identification report before training on it, and checks before
    /// each training task that the trail's history is the one it saw (the log's checkpoint key
    /// is pinned here). Required to start a node (`tutela-node run`, [`NodeConfig::check_trail`]),
    /// unless `insecure_no_audit` waives it for a development setup on one machine.
    #[serde(default)]
    pub audit: Option<crate::site_audit::NodeAuditConfig>,
    /// Runs without `[audit]`: no de-identification report, privacy spend or checkpoint is
    /// anchored in the consortium's trail. For a development setup on one machine only: refused
    /// unless `coordinator` is on a loopback address, and together with an `[audit]` table; the
    /// node warns at start.
    #[serde(default)]
    pub insecure_no_audit: bool,
    /// The site secret (a file of at least 32 bytes, mode 0600, outside `work_dir`): the key of
    /// pseudonyms and per-person date shifts, and the source of the salts of dataset
    /// commitments. It never leaves the site. Needed when a dataset declares `columns`.
    #[serde(default)]
    pub site_secret_file: Option<PathBuf>,
    /// The site's privacy budget per dataset (caps on ε per job and in total), enforced with the
    /// privacy ledger under `work_dir/privacy-ledger/`. Absent: no caps (spend is still recorded).
    #[serde(default)]
    pub privacy: crate::ledger::PrivacyBudgetConfig,
    /// The site's own policy (`site-policy.toml`, see deploy/policy/site-policy.toml): its
    /// compliance officers, allowed operators and models, DP floor, training hours. Every task
    /// must carry a valid approval by one of those officers and satisfy every clause. Required:
    /// without it the config is refused, unless `insecure_no_approvals` waives it by name.
    #[serde(default)]
    pub site_policy: Option<PathBuf>,
    /// Runs without `site_policy`: every task is done with no approval check and no site policy,
    /// and the node warns at start and for each such task. For labs and tests only. An absent
    /// `site_policy` never means this by itself, and the two cannot be set together.
    #[serde(default)]
    pub insecure_no_approvals: bool,
    /// The tokenizer files (`tokenizer.json`) this site holds for language-model jobs. A job
    /// names its tokenizer by SHA-256 (`[model] tokenizer_sha256`); the node declines a job whose
    /// digest none of these files has (see `crate::lm::tokenizer::site`). Empty: the node
    /// declines every job that names a tokenizer.
    #[serde(default)]
    pub tokenizers: Vec<PathBuf>,
    /// The base checkpoints this site holds for language-model jobs: each entry a Hugging Face
    /// directory (`config.json` + safetensors) or a directory of such directories. A job names
    /// its base by digest (`[model] base_sha256`); the node declines a job whose base none of
    /// these has (see `crate::lm::base`). Empty: every job that names a base is declined.
    #[serde(default)]
    pub base_models: Vec<PathBuf>,
    /// Whether the node may fetch a job's base checkpoint from the coordinator when it holds none
    /// with that digest, and how large its encrypted cache of fetched bases may grow
    /// (`crate::lm::base_cache`). Default: fetching allowed, 8 GiB and 4 bases.
    #[serde(default)]
    pub base_cache: BaseCacheConfig,
    /// Misbehaviour for tests of the coordinator. Never in production.
    #[serde(default)]
    pub testing: Option<TestingConfig>,
    /// `[metrics]`: the plain-HTTP Prometheus listener (`tutela_protocol::metrics`). Absent: no
    /// metrics port.
    #[serde(default)]
    pub metrics: Option<tutela_protocol::metrics::MetricsConfig>,
}

/// `[base_cache]` of node.toml: fetching a job's base from the coordinator, and the bounds of the
/// encrypted cache the fetched bases are kept in (`work_dir/base-models/`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BaseCacheConfig {
    /// Whether a base this site does not hold may be fetched (default true). False: a job whose
    /// base is not in `base_models` is declined, as before fetching existed.
    #[serde(default = "default_true")]
    pub fetch: bool,
    /// Most plaintext bytes over all cached bases (default 8 GiB).
    #[serde(default = "BaseCacheConfig::default_max_bytes")]
    pub max_bytes: u64,
    /// Most cached bases (default 4).
    #[serde(default = "BaseCacheConfig::default_max_entries")]
    pub max_entries: usize,
}

fn default_true() -> bool {
    true
}

impl BaseCacheConfig {
    fn default_max_bytes() -> u64 {
        crate::lm::base_cache::BaseCacheLimits::default().max_bytes
    }

    fn default_max_entries() -> usize {
        crate::lm::base_cache::BaseCacheLimits::default().max_entries
    }

    /// The cache's bounds.
    pub fn limits(&self) -> crate::lm::base_cache::BaseCacheLimits {
        crate::lm::base_cache::BaseCacheLimits {
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
        }
    }
}

impl Default for BaseCacheConfig {
    fn default() -> Self {
        BaseCacheConfig {
            fetch: true,
            max_bytes: Self::default_max_bytes(),
            max_entries: Self::default_max_entries(),
        }
    }
}

impl NodeConfig {
    /// The key-encryption key of `[at_rest]`, if the config has one: loaded from its key file
    /// (which must be mode 0600 and outside `work_dir`) or environment variable.
    pub fn key_encryption_key(
        &self,
    ) -> Result<Option<tutela_privacy::at_rest::LocalKek>, tutela_privacy::at_rest::AtRestError>
    {
        use tutela_privacy::at_rest::LocalKek;
        match &self.at_rest {
            Some(AtRestConfig {
                kek_file: Some(file),
                ..
            }) => LocalKek::from_key_file_outside(file, &self.work_dir).map(Some),
            Some(AtRestConfig {
                kek_env: Some(var), ..
            }) => LocalKek::from_env(var).map(Some),
            _ => Ok(None),
        }
    }
}

/// `[at_rest]`: where the key-encryption key comes from. Exactly one of the two.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AtRestConfig {
    /// A key file (32 raw bytes, 64 hex digits or base64) with mode 0600, outside `work_dir`.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// An environment variable holding the key (hex or base64).
    #[serde(default)]
    pub kek_env: Option<String>,
}

/// Where training runs.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The first CUDA GPU when libtorch sees one, the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU; the node refuses to start without one.
    Cuda,
}

/// `[datasets.<schema>]`: one local dataset.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The data file: CSV (with a header line) or JSON Lines, gzip-compressed when its name ends
    /// in `.gz`, or Parquet. `csv` is accepted as this key's former name. Exactly one of `path`
    /// and `postgres`.
    #[serde(default, alias = "csv")]
    pub path: PathBuf,
    /// `csv`, `jsonl` or `parquet`; by default from the file name (`.jsonl`/`.ndjson` is JSON
    /// Lines, `.parquet`/`.parq` Parquet, anything else CSV).
    #[serde(default)]
    pub format: Option<crate::data::source::FileFormat>,
    /// `[datasets.<name>.postgres]`: the dataset is the rows of a SQL query against the site's
    /// PostgreSQL, run in a read-only transaction (see `crate::data::source::postgres`).
    #[serde(default)]
    pub postgres: Option<crate::data::source::postgres::PostgresConfig>,
    /// The dataset schema (TOML) that says which columns are features and which is the label.
    pub schema: PathBuf,
    /// The declaration of every column of the file, its type and its data-protection role
    /// (direct identifier, quasi-identifier, sensitive, feature, label, free text). With it, the
    /// file is read through the anonymization pipeline before anything trains on it, and the node
    /// refuses a dataset whose direct identifiers or free text are left in the clear.
    #[serde(default)]
    pub columns: Option<PathBuf>,
    /// The anonymization pipeline (drop, pseudonymize, generalize, date shift, redact,
    /// k-anonymity); needs `columns`. Without it every column is kept as it is, which `columns`
    /// then allows only when no column is a direct identifier or free text.
    #[serde(default)]
    pub anonymize: Option<PathBuf>,
    /// Share of every class kept aside to evaluate each round's global model, in (0, 1).
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Seed of the stratified train/validation split, so the split is the same at every start.
    #[serde(default)]
    pub split_seed: u64,
}

fn default_validation_fraction() -> f64 {
    0.2
}

/// `[reconnect]`: exponential backoff between connection attempts.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_secs: f64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: f64,
}

fn default_initial_backoff() -> f64 {
    1.0
}

fn default_max_backoff() -> f64 {
    60.0
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial_backoff_secs: default_initial_backoff(),
            max_backoff_secs: default_max_backoff(),
        }
    }
}

impl ReconnectConfig {
    pub fn initial(&self) -> Duration {
        Duration::from_secs_f64(self.initial_backoff_secs)
    }

    pub fn max(&self) -> Duration {
        Duration::from_secs_f64(self.max_backoff_secs)
    }
}

/// `[recheck]`: exponential backoff (with jitter) between the checks of a dataset that is not
/// ready, from `initial_secs` up to `max_secs`; the node announces a dataset when it passes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecheckConfig {
    #[serde(default = "default_initial_recheck")]
    pub initial_secs: f64,
    #[serde(default = "default_max_recheck")]
    pub max_secs: f64,
}

fn default_initial_recheck() -> f64 {
    5.0
}

fn default_max_recheck() -> f64 {
    300.0
}

impl Default for RecheckConfig {
    fn default() -> Self {
        RecheckConfig {
            initial_secs: default_initial_recheck(),
            max_secs: default_max_recheck(),
        }
    }
}

impl RecheckConfig {
    pub fn initial(&self) -> Duration {
        Duration::from_secs_f64(self.initial_secs)
    }

    pub fn max(&self) -> Duration {
        Duration::from_secs_f64(self.max_secs)
    }
}

/// Checks a backoff's bounds (`[reconnect]`, `[recheck]`): `(key, problem)` naming the key.
fn check_backoff(
    (initial_key, initial): (&'static str, f64),
    (max_key, max): (&'static str, f64),
) -> Result<(), (&'static str, String)> {
    // Bounded so that Duration::from_secs_f64 cannot panic and a typo cannot park the node
    // for a year.
    const MAX_BACKOFF: f64 = 24.0 * 3600.0;
    if !(initial.is_finite() && initial > 0.0 && initial <= MAX_BACKOFF) {
        return Err((
            initial_key,
            format!("must be > 0 and at most {MAX_BACKOFF}, found {initial}"),
        ));
    }
    if !(max.is_finite() && max >= initial && max <= MAX_BACKOFF) {
        return Err((
            max_key,
            format!(
                "must be at least {initial_key} ({initial}) and at most {MAX_BACKOFF}, found {max}"
            ),
        ));
    }
    Ok(())
}

/// `[testing]`: ways to misbehave on purpose, for the coordinator's tests (refusing a corrupt
/// update, closing a round without a node that died). Never set in production.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TestingConfig {
    /// Corrupts every TRAIN update after it was computed, before it is uploaded.
    #[serde(default)]
    pub corrupt_update: Option<Corruption>,
    /// Fetches the global model of every TRAIN task and then never answers the task.
    #[serde(default)]
    pub stall_after_fetch: bool,
    /// Writes every secure round's plain update (F32, little-endian, before clipping and
    /// masking) to `work_dir/testing-unmasked/<task>.f32`, for the tests that check the
    /// coordinator stores none of it.
    #[serde(default)]
    pub record_unmasked_updates: bool,
}

/// How `[testing] corrupt_update` spoils an update.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    /// The first value of the first tensor becomes NaN.
    Nan,
    /// The first tensor gains one element (its shape no longer matches the model's).
    WrongShape,
    /// Every value is multiplied by 1e6, far beyond any norm bound.
    Scale,
    /// Every value is multiplied by 100: a poisoned update that a loose norm bound lets through
    /// (for the robust aggregation rules' tests).
    #[serde(rename = "scale_100")]
    Scale100,
    /// Every value's sign is flipped, and the update boosted ×10, as a model-poisoning site
    /// pulling the model the other way would.
    SignFlip,
}

impl NodeConfig {
    /// Reads, parses and checks a config file; relative paths are resolved against its directory.
    pub fn load(path: impl AsRef<Path>) -> Result<NodeConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Checks, before the node starts, that the files a running node reads at once exist (TLS,
    /// the at-rest key file, the site secret): an error names `origin`, the key, the value as
    /// written in the file and where it resolved, e.g. `node.toml: tls.ca = "../certs/ca.crt":
    /// no such file (resolved to /etc/certs/ca.crt)`. Not part of [`NodeConfig::load`], which
    /// offline commands use without those files.
    pub fn check_files(&self, origin: &Path) -> Result<(), ConfigError> {
        let written: toml::Table = std::fs::read_to_string(origin)
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default();
        let as_written = |key: &str| -> Option<PathBuf> {
            let mut v = None::<&toml::Value>;
            let mut table = Some(&written);
            for part in key.split('.') {
                v = table.and_then(|t| t.get(part));
                table = v.and_then(|x| x.as_table());
            }
            v.and_then(|x| x.as_str()).map(PathBuf::from)
        };
        let file = tutela_protocol::config_path::ConfigFile::new(origin);
        let mut files: Vec<(&str, &PathBuf)> = vec![
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ];
        if let Some(crl) = &self.tls.crl {
            files.push(("tls.crl", crl));
        }
        if let Some(kek) = self.at_rest.as_ref().and_then(|a| a.kek_file.as_ref()) {
            files.push(("at_rest.kek_file", kek));
        }
        if let Some(secret) = &self.site_secret_file {
            files.push(("site_secret_file", secret));
        }
        for (key, resolved) in files {
            let mut path = resolved.clone();
            if let Err(e) = file.existing_file(key, &mut path) {
                return Err(ConfigError::Missing(Box::new(
                    tutela_protocol::config_path::ConfigPathError {
                        written: as_written(key).unwrap_or(e.written.clone()),
                        ..e
                    },
                )));
            }
        }
        Ok(())
    }

    /// Parses and checks config text; `origin` names it in errors, and its directory is where
    /// relative paths start.
    pub fn from_toml_str(text: &str, origin: impl AsRef<Path>) -> Result<NodeConfig, ConfigError> {
        let origin = origin.as_ref();
        let mut config: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(origin)?;
        let base = match origin.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        config.resolve_paths(&base);
        Ok(config)
    }

    /// Checks every value's range; the error names the first bad key.
    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            key: key.to_string(),
            problem,
        };
        validate_segment("site", &self.site).map_err(|e| invalid("site", e.to_string()))?;
        // Fail closed: a node with no word on approvals refuses to start rather than train
        // whatever the coordinator sends.
        match (&self.site_policy, self.insecure_no_approvals) {
            (Some(_), false) | (None, true) => {}
            (None, false) => {
                return Err(invalid(
                    "site_policy",
                    "is required: name this site's own policy file (its compliance officers, \
                     whose signed approval every task must carry, and its clauses; see \
                     deploy/policy/site-policy.toml and `site_policy` in deploy/config/node.toml). \
                     Only for a lab or a test, `insecure_no_approvals = true` runs every task \
                     without approval"
                        .into(),
                ));
            }
            (Some(_), true) => {
                return Err(invalid(
                    "insecure_no_approvals",
                    "is set together with `site_policy`: remove `insecure_no_approvals`, which \
                     would waive the approvals the site policy requires"
                        .into(),
                ));
            }
        }
        if let Some(a) = &self.at_rest
            && a.kek_file.is_some() == a.kek_env.is_some()
        {
            return Err(invalid(
                "at_rest",
                "needs exactly one of kek_file and kek_env".to_string(),
            ));
        }
        if self.coordinator.is_empty() {
            return Err(invalid(
                "coordinator",
                "is an empty list: give at least one HOST:PORT".into(),
            ));
        }
        for address in self.coordinator.iter() {
            check_host_port(address).map_err(|why| invalid("coordinator", why))?;
        }
        if let Some(m) = &self.metrics {
            m.validate()
                .map_err(|e| invalid("metrics.listen", e.to_string()))?;
        }
        tutela_protocol::config_range::in_range(
            "torch_threads",
            self.torch_threads,
            0,
            MAX_TORCH_THREADS,
        )
        .map_err(|e| invalid("torch_threads", e.to_string()))?;
        if self.work_dir.as_os_str().is_empty() {
            return Err(invalid("work_dir", "must not be empty".into()));
        }
        for (i, tokenizer) in self.tokenizers.iter().enumerate() {
            if tokenizer.as_os_str().is_empty() {
                return Err(invalid(
                    &format!("tokenizers[{i}]"),
                    "must not be empty".into(),
                ));
            }
            if self.tokenizers[..i].contains(tokenizer) {
                return Err(invalid(
                    &format!("tokenizers[{i}]"),
                    format!("{} is listed twice", tokenizer.display()),
                ));
            }
        }
        for (i, base) in self.base_models.iter().enumerate() {
            if base.as_os_str().is_empty() {
                return Err(invalid(
                    &format!("base_models[{i}]"),
                    "must not be empty".into(),
                ));
            }
            if self.base_models[..i].contains(base) {
                return Err(invalid(
                    &format!("base_models[{i}]"),
                    format!("{} is listed twice", base.display()),
                ));
            }
        }
        if self.base_cache.max_entries == 0 {
            return Err(invalid(
                "base_cache.max_entries",
                "must be at least 1 (set `fetch = false` to never fetch a base)".into(),
            ));
        }
        if self.base_cache.max_bytes == 0 {
            return Err(invalid(
                "base_cache.max_bytes",
                "must be at least 1 (set `fetch = false` to never fetch a base)".into(),
            ));
        }
        if self.datasets.is_empty() && self.text_datasets.is_empty() {
            return Err(invalid(
                "datasets",
                "has no dataset: add a [datasets.<schema name>] table with path and schema (or a \
                 [text_datasets.<name>] table for language models)"
                    .into(),
            ));
        }
        for (name, d) in &self.datasets {
            let key = |k: &str| format!("datasets.{name}.{k}");
            validate_segment("dataset", name)
                .map_err(|e| invalid(&format!("datasets.{name}"), e.to_string()))?;
            if !(d.validation_fraction > 0.0 && d.validation_fraction < 1.0) {
                return Err(invalid(
                    &key("validation_fraction"),
                    format!(
                        "must lie strictly between 0 and 1, found {}",
                        d.validation_fraction
                    ),
                ));
            }
            if d.anonymize.is_some() && d.columns.is_none() {
                return Err(invalid(
                    &key("anonymize"),
                    "needs `columns`, the declaration of the file's columns and their roles".into(),
                ));
            }
            if d.columns.is_some() && self.site_secret_file.is_none() {
                return Err(invalid(
                    &key("columns"),
                    "needs the top-level `site_secret_file` (the key of pseudonyms and date shifts)"
                        .into(),
                ));
            }
            match (&d.postgres, d.path.as_os_str().is_empty()) {
                (Some(_), false) => {
                    return Err(invalid(
                        &key("postgres"),
                        "goes instead of `path`: give one source, a file or a query".into(),
                    ));
                }
                (None, true) => {
                    return Err(invalid(
                        &key("path"),
                        "is missing: give the data file, or a [postgres] query".into(),
                    ));
                }
                (Some(query), true) => {
                    if d.format.is_some() {
                        return Err(invalid(&key("format"), "is for files, not queries".into()));
                    }
                    query
                        .check()
                        .map_err(|(k, problem)| invalid(&key(&format!("postgres.{k}")), problem))?;
                }
                (None, false) => {}
            }
            if d.columns.is_none()
                && crate::data::source::SourceKind::of(d)
                    == crate::data::source::SourceKind::File(crate::data::source::FileFormat::Jsonl)
            {
                return Err(invalid(
                    &key("format"),
                    "JSON Lines needs `columns`, the declaration of the file's columns".into(),
                ));
            }
        }
        for (name, d) in &self.text_datasets {
            validate_segment("dataset", name)
                .map_err(|e| invalid(&format!("text_datasets.{name}"), e.to_string()))?;
            if self.datasets.contains_key(name) {
                return Err(invalid(
                    &format!("text_datasets.{name}"),
                    "has the name of a [datasets] table: a job names one dataset".into(),
                ));
            }
            if self.site_secret_file.is_none() {
                return Err(invalid(
                    &format!("text_datasets.{name}"),
                    "needs the top-level `site_secret_file` (the salt of its dataset commitment)"
                        .into(),
                ));
            }
            d.check().map_err(|(key, problem)| {
                invalid(&format!("text_datasets.{name}.{key}"), problem)
            })?;
        }
        self.privacy
            .validate()
            .map_err(|problem| invalid("privacy", problem))?;
        // One home for each ε cap: the site policy, which the officers own and the node reloads.
        let names: Vec<String> = self
            .datasets
            .keys()
            .chain(self.text_datasets.keys())
            .cloned()
            .collect();
        if let Some((key, lines)) = self.privacy.moved_caps(&names).into_iter().next() {
            let policy = match &self.site_policy {
                Some(p) => format!("the site policy {}", p.display()),
                None => {
                    "the site policy (`site_policy`, see deploy/policy/site-policy.toml)".into()
                }
            };
            return Err(invalid(
                key,
                format!(
                    "has moved to {policy}, the one home of the ε caps, which the compliance \
                     officers own and the node reloads on change: remove it from node.toml and \
                     write there:\n{lines}"
                ),
            ));
        }
        let (r, c) = (&self.reconnect, &self.recheck);
        for (initial, max) in [
            (
                ("reconnect.initial_backoff_secs", r.initial_backoff_secs),
                ("reconnect.max_backoff_secs", r.max_backoff_secs),
            ),
            (
                ("recheck.initial_secs", c.initial_secs),
                ("recheck.max_secs", c.max_secs),
            ),
        ] {
            check_backoff(initial, max).map_err(|(key, problem)| invalid(key, problem))?;
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(crl) = &mut self.tls.crl {
            fix(crl);
        }
        fix(&mut self.work_dir);
        if let Some(secret) = &mut self.site_secret_file {
            fix(secret);
        }
        if let Some(p) = &mut self.site_policy {
            fix(p);
        }
        if let Some(kek) = self.at_rest.as_mut().and_then(|a| a.kek_file.as_mut()) {
            fix(kek);
        }
        for tokenizer in &mut self.tokenizers {
            fix(tokenizer);
        }
        for base in &mut self.base_models {
            fix(base);
        }
        for d in self.datasets.values_mut() {
            if !d.path.as_os_str().is_empty() {
                fix(&mut d.path);
            }
            if let Some(file) = d.postgres.as_mut().and_then(|p| p.password_file.as_mut()) {
                fix(file);
            }
            fix(&mut d.schema);
            if let Some(p) = &mut d.columns {
                fix(p);
            }
            if let Some(p) = &mut d.anonymize {
                fix(p);
            }
        }
        for d in self.text_datasets.values_mut() {
            d.resolve_paths(base);
        }
    }
}

/// The most libtorch threads `torch_threads` may ask for (documented in deploy/config/node.toml).
pub const MAX_TORCH_THREADS: usize = 1024;

/// `HOST:PORT` with a host usable as a TLS server name and a port number (IPv6 hosts in
/// brackets), as `tutela_protocol::client` accepts it.
/// `coordinator` of node.toml: one `HOST:PORT` (`coordinator = "c1:7443"`), or a list of them
/// (`coordinator = ["c1:7443", "c2:7443"]`: coordinators sharing one database, of which one
/// leads at a time). The node tries them in order and goes on to the next when one is
/// unreachable or answers that it is not the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorAddresses(Vec<String>);

impl CoordinatorAddresses {
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `i`th address, wrapping around.
    pub fn nth_cyclic(&self, i: usize) -> &str {
        if self.0.is_empty() {
            return "";
        }
        &self.0[i % self.0.len()]
    }
}

impl From<&str> for CoordinatorAddresses {
    fn from(a: &str) -> Self {
        CoordinatorAddresses(vec![a.to_string()])
    }
}

impl From<String> for CoordinatorAddresses {
    fn from(a: String) -> Self {
        CoordinatorAddresses(vec![a])
    }
}

impl From<Vec<String>> for CoordinatorAddresses {
    fn from(a: Vec<String>) -> Self {
        CoordinatorAddresses(a)
    }
}

impl std::fmt::Display for CoordinatorAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl<'de> Deserialize<'de> for CoordinatorAddresses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a \"HOST:PORT\" string or a list of them")]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(a) => CoordinatorAddresses(vec![a]),
            OneOrMany::Many(v) => CoordinatorAddresses(v),
        })
    }
}

fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("must be HOST:PORT, found {addr:?}"))?;
    let host = host
        .strip_prefix("https://")
        .unwrap_or(host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("has no host: {addr:?}"));
    }
    // The host is the name the coordinator's certificate must carry, so it must be one.
    rustls::pki_types::ServerName::try_from(host)
        .map_err(|_| format!("host {host:?} is not a DNS name or IP address"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("has no valid port number: {addr:?}")),
    }
}
