//! The TOML job spec an operator submits and its canonical digest.
//!
//! It lives in `protocol` because three parties read it: the coordinator runs it, each site node
//! recomputes its digest to check the approvals it is shown (a site does not take the
//! coordinator's word for what was approved), and the policy crate evaluates site policies against it.
//!
//! A job spec is parsed strictly (`deny_unknown_fields`: a misspelt key is an error, never a silently
//! ignored setting) and then validated; every validation error names the key it is about, as
//! `training.learning_rate`. The spec's [`SpecDigest`] is what compliance officers will sign when they
//! approve a job, so it is computed over a canonical encoding (see [`canonical_json`]) of the *parsed*
//! spec, defaults filled in: reordering keys, reformatting or adding comments to the TOML leaves it
//! unchanged, and changing any setting — including one left to its default before — changes it.
//!
//! Every job spec key is documented in `deploy/jobs/*.toml`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod aggregation;
pub mod distributed;
pub use aggregation::{AggregationRuleName, AggregationSpec};

mod watermark;
pub use watermark::{WatermarkScheme, WatermarkSpec};

pub mod statistics;
pub use statistics::{JobKind, StatisticsJobSpec, SubmittedSpec};

/// A job spec, as written in a job's TOML file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's human-readable name (not unique: a job is identified by its [`JobId`]).
    pub name: String,
    /// Number of federated rounds.
    pub rounds: u32,
    /// A round completes only with at least this many accepted site updates.
    pub min_sites: u32,
    /// Fraction of the eligible connected sites sampled for each round, in (0, 1]. The coordinator
    /// samples `max(min_sites, ceil(fraction * eligible))` sites.
    #[serde(default = "default_fraction")]
    pub fraction: f64,
    /// Seconds from a round's start until it closes with the updates that arrived.
    pub round_deadline_secs: u64,
    /// How many times a round that ends with fewer than `min_sites` accepted updates is retried
    /// before the job fails.
    #[serde(default)]
    pub max_round_retries: u32,
    /// L2 bound on a site's update; an update over it is refused.
    pub update_norm_bound: f64,
    /// The participating sites; empty means any registered site.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Seed of the job's randomness (site sampling, model initialisation).
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub training: TrainingSpec,
    /// The aggregation strategy's table, parsed by the strategy module's `StrategyConfig`; absent
    /// means FedAvg. Kept opaque here so that a new strategy needs no change to the job spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<toml::Value>,
    /// `[privacy]`: differential privacy (DP-SGD at the sites, or DP-FedAvg at the coordinator).
    /// Absent: no DP. Every DP parameter is here, inside the digest the officers sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySpec>,
    /// `[lora]`: train low-rank adapters on a frozen base model (`crate::lora`). Absent: the
    /// whole model trains. Inside the digest, like every setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::lora::LoraSpec>,
    /// `[secure_aggregation]`: SecAgg+ (`crate::secagg`): the coordinator sees only the sum of the
    /// sites' clipped, quantized, masked updates. Absent: plain aggregation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<crate::secagg::SecureAggregationSpec>,
    /// `[aggregation]`: how the coordinator combines a round's updates (`aggregation`). Absent:
    /// FedAvg's streaming weighted sum, and the digest of a job without it is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<AggregationSpec>,
    /// `[watermark]`: the final model is watermarked before it is published (`watermark`).
    /// Absent: published as aggregated, and the digest of a job without it is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<WatermarkSpec>,
    /// `[publish]`: how the final model is published (its registry name). Absent: the job's
    /// `name` is its registry name, and the digest of a job without it is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishSpec>,
}

/// `[publish]`: the model registry entry a job's final model becomes (`crate::release`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    /// The registry name; each model published under it is its next version.
    pub name: String,
}

fn default_fraction() -> f64 {
    1.0
}

/// `[model]`: a model registry name, what the model is built from, and its free-form
/// hyper-parameters.
///
/// No `deny_unknown_fields` here: every key other than the named fields is a hyper-parameter for
/// the model registry to interpret (serde cannot combine `flatten` with `deny_unknown_fields`
/// anyway).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Model registry name, e.g. `mlp` or `cnn`.
    pub name: String,
    /// A language model's tokenizer: the SHA-256 of its `tokenizer.json`, 64 lowercase hex
    /// digits (`tutela-node tokenizer digest FILE` prints it). Part of the spec, and so of the
    /// digest the officers sign: they approve that exact file, and a site whose tokenizer file
    /// differs declines the job. Absent (every job without a tokenizer), it is left out of the
    /// canonical JSON, so such jobs keep the digest they had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
    /// A language model's base checkpoint: `checkpoint_digest` of its Hugging Face directory
    /// (SHA-256 over the canonical `config.json` and every tensor's name, dtype, shape and
    /// bytes; `tutela-node lm digest DIR` prints it), 64 lowercase hex digits. Inside the digest
    /// the officers sign, so they approve that exact base; a site that holds no checkpoint with
    /// this digest declines. Absent, it is left out of the canonical JSON, like the tokenizer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// Hyper-parameters, e.g. `hidden = [64, 32]`, `dropout = 0.1`.
    #[serde(flatten)]
    pub params: toml::Table,
}

/// `[data]`: what data the sites train on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Dataset schema name, e.g. `breast_cancer`; each site maps it to its local files.
    pub schema: String,
    /// The SHA-256 of the consortium's schema file (64 lowercase hex digits; `tutela-node data
    /// check` prints it per dataset). Part of the spec, and so of the digest the officers sign:
    /// they approve that exact schema (columns, types, categories, encoding), and a site whose
    /// schema file differs declines the job naming both digests' prefixes. Optional: a job
    /// without it (every job written before it existed) keeps its digest and is checked by the
    /// schema's name only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_sha256: Option<String>,
}

/// `[training]`: the sites' local training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    /// Passes over the local training split per round.
    pub local_epochs: u32,
    pub batch_size: u32,
    /// L2 weight decay, >= 0.
    #[serde(default)]
    pub weight_decay: f64,
    /// SGD momentum in [0, 1); only for `optimizer = "sgd"`.
    #[serde(default)]
    pub momentum: f64,
    /// Language models: the longest token window a sequence trains on, in 2..=[`MAX_SEQ_LEN`];
    /// a longer document is cut into consecutive windows (all of them in its privacy unit).
    /// Absent: the model's `max_position_embeddings`. Left out of the canonical JSON when
    /// absent, so jobs without it keep their digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<u32>,
}

/// The longest `training.max_seq_len` a job may ask for.
pub const MAX_SEQ_LEN: u32 = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    Sgd,
    Adam,
}

/// `[privacy]`: where the noise is added and how much privacy the job may spend.
///
/// The node and the coordinator turn this into noise with the `tutela-privacy` accountant
/// (the job spec only states the settings): with `noise_multiplier` absent, each site calibrates σ so
/// that the job's planned steps on *its* dataset (Poisson rate `q = batch_size / rows`, `rounds ×
/// local_epochs × ⌈rows / batch_size⌉` steps) spend exactly `target_epsilon` at `delta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// `local`: DP-SGD at every site (per-example clipping, Poisson batches, noise), the guarantee
    /// is per site dataset. `central`: DP-FedAvg at the coordinator (each site's update clipped,
    /// noise on the aggregate), the guarantee is per site (user-level). `none`: no DP.
    pub mode: PrivacyMode,
    /// The job's (ε, δ) budget: per site dataset (`local`) or per site (`central`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// `local`: the per-example clipping norm C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// `local`: σ, the noise standard deviation over C. Absent: calibrated from `target_epsilon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// Which accountant turns the steps into ε.
    #[serde(default)]
    pub accountant: AccountantName,
    /// `central`: DP-FedAvg's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central: Option<CentralDpSpec>,
    /// `local`: what one "example" of the guarantee is: a `document` (the default), or a
    /// `patient` (every document of one patient clipped and sampled together, which needs a
    /// dataset that declares a patient field). The default is left out of the canonical JSON,
    /// so jobs without the key keep their digest; `patient` changes it.
    #[serde(default, skip_serializing_if = "PrivacyUnit::is_document")]
    pub unit: PrivacyUnit,
    /// `local`: σ of the noise on each round's released metric sums (clipped per-unit loss,
    /// correct predictions, unit count; `tutela_privacy::metrics`), in units of each sum's
    /// sensitivity. Absent: calibrated from `metrics_epsilon_share` of `target_epsilon`, or
    /// `tutela_privacy::metrics::DEFAULT_METRICS_NOISE_MULTIPLIER` for a job without a target.
    /// Absent keys are left out of the canonical JSON, so older jobs keep their digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_noise_multiplier: Option<f64>,
    /// `local`: the share of `target_epsilon` the metric releases alone may spend (default
    /// `tutela_privacy::metrics::DEFAULT_METRICS_EPSILON_SHARE`); DP-SGD is calibrated beside
    /// them so that both together spend the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_epsilon_share: Option<f64>,
    /// `local`: the public upper clip of a unit's mean loss in the released metrics (nats,
    /// default `tutela_privacy::metrics::DEFAULT_METRICS_LOSS_MAX`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_loss_max: Option<f64>,
    /// `distributed`: q, the probability with which every site includes each of its privacy
    /// units (rows) in a round's one DP-SGD step (Poisson sampling, the same q at every site, so
    /// that the job's noise is calibrated once for all of them). Absent: 1, every unit every
    /// round (full batch, no amplification by sampling claimed). Left out of the canonical JSON
    /// when absent, so jobs without it keep their digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<f64>,
    /// `distributed`: retried round attempts the plan sets ε aside for (absent: 0). Every
    /// attempt of a distributed round spends at each site (its noised, masked input left it even
    /// when the round is not released), so the plan is calibrated for `rounds + retry_reserve`
    /// steps: up to that many retried attempts over the whole job fit within `target_epsilon`
    /// and within the caps a site checks the plan against before it joins; past them a site
    /// refuses the next attempt, naming this key. Left out of the canonical JSON when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_reserve: Option<u32>,
}

/// The most retried attempts `privacy.retry_reserve` may set ε aside for: each one is a step the
/// whole job's noise is calibrated for, so a large reserve buys noise for rounds never run.
pub const MAX_RETRY_RESERVE: u32 = 1000;

/// `privacy.unit`: the privacy unit of DP-SGD at the sites.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyUnit {
    /// One document (one row of a table) is one example.
    #[default]
    Document,
    /// All the documents of one patient are one example.
    Patient,
}

impl PrivacyUnit {
    pub fn is_document(&self) -> bool {
        *self == PrivacyUnit::Document
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PrivacyUnit::Document => "document",
            PrivacyUnit::Patient => "patient",
        }
    }
}

fn default_delta() -> f64 {
    1e-5
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyMode {
    Local,
    Central,
    /// Distributed DP over secure aggregation: each site clips its update, rounds it onto the
    /// job's grid and adds its share of the discrete Gaussian noise; only the masked sum, which
    /// carries the job's noise, is ever seen (`job::distributed`).
    Distributed,
    None,
}

/// The accountant's name as the job spec writes it (`tutela_privacy::accountant::Accountant`
/// parses the same names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountantName {
    /// Rényi DP with the Balle et al. 2020 conversion.
    #[default]
    Rdp,
    /// Privacy-loss distributions (tighter, slower).
    Pld,
}

impl AccountantName {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountantName::Rdp => "rdp",
            AccountantName::Pld => "pld",
        }
    }

    /// The accountant this name denotes.
    pub fn accountant(self) -> tutela_privacy::accountant::Accountant {
        match self {
            AccountantName::Rdp => tutela_privacy::accountant::Accountant::Rdp,
            AccountantName::Pld => tutela_privacy::accountant::Accountant::pld(),
        }
    }
}

/// `[privacy.central]`: DP-FedAvg (McMahan et al., ICLR 2018) at the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralDpSpec {
    /// C: each site's update is scaled to L2 norm at most C (the initial C with `adaptive`).
    pub clip_norm: f64,
    /// z: the aggregate's noise is N(0, (z·C)²) per coordinate on the sum of clipped updates.
    /// Absent: calibrated from `privacy.target_epsilon` over `rounds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// Adaptive clipping (Andrew et al., NeurIPS 2021): C follows a quantile of the update norms.
    #[serde(default)]
    pub adaptive: bool,
    /// The quantile of the sites' update norms C tracks, in (0, 1).
    #[serde(default = "default_target_quantile")]
    pub target_quantile: f64,
    /// η_C: C ← C · exp(−η_C (b̃ − γ)) each round.
    #[serde(default = "default_clip_learning_rate")]
    pub clip_learning_rate: f64,
    /// σ_b: noise on the count of unclipped updates (adaptive only). It is private too: the
    /// accountant charges it together with the update noise.
    #[serde(default = "default_count_noise")]
    pub count_noise_multiplier: f64,
}

fn default_target_quantile() -> f64 {
    0.5
}
fn default_clip_learning_rate() -> f64 {
    0.2
}
fn default_count_noise() -> f64 {
    10.0
}

fn positive(key: &str, v: f64) -> Result<(), SpecError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(SpecError::invalid(
            key,
            format!("must be a finite number > 0, got {v}"),
        ))
    }
}

impl PrivacySpec {
    /// How a DP job's per-round metrics are released (`tutela_privacy::metrics`): σ from
    /// `metrics_noise_multiplier`, else calibrated so that `rounds` rounds of metrics alone
    /// spend `metrics_epsilon_share` (default 10 %) of the target, else (no target) the
    /// default σ. The job's DP-SGD plan is calibrated beside it.
    pub fn metrics_release(
        &self,
        rounds: u64,
    ) -> Result<tutela_privacy::metrics::MetricsRelease, tutela_privacy::metrics::MetricsError>
    {
        tutela_privacy::metrics::MetricsRelease::for_job(
            (
                self.metrics_noise_multiplier,
                self.metrics_epsilon_share,
                self.metrics_loss_max,
            ),
            self.target_epsilon,
            rounds,
            self.delta,
            self.accountant.accountant(),
        )
    }

    /// Checks the ranges and that the keys fit the mode; errors name the key.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(e) = self.target_epsilon {
            positive("privacy.target_epsilon", e)?;
        }
        if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1.0) {
            return Err(SpecError::invalid(
                "privacy.delta",
                format!("must be in (0, 1), got {}", self.delta),
            ));
        }
        if let Some(c) = self.max_grad_norm {
            positive("privacy.max_grad_norm", c)?;
        }
        if let Some(z) = self.noise_multiplier {
            positive("privacy.noise_multiplier", z)?;
        }
        if let Some(z) = self.metrics_noise_multiplier
            && !(z.is_finite() && z >= 1.0)
        {
            return Err(SpecError::invalid(
                "privacy.metrics_noise_multiplier",
                format!("must be a finite number >= 1, got {z}"),
            ));
        }
        if let Some(share) = self.metrics_epsilon_share
            && !(share.is_finite() && share > 0.0 && share < 1.0)
        {
            return Err(SpecError::invalid(
                "privacy.metrics_epsilon_share",
                format!("must be in (0, 1), got {share}"),
            ));
        }
        if let Some(l) = self.metrics_loss_max {
            positive("privacy.metrics_loss_max", l)?;
        }
        let metrics_keys = self.metrics_noise_multiplier.is_some()
            || self.metrics_epsilon_share.is_some()
            || self.metrics_loss_max.is_some();
        if metrics_keys && !matches!(self.mode, PrivacyMode::Local | PrivacyMode::Distributed) {
            return Err(SpecError::invalid(
                "privacy.metrics_noise_multiplier",
                "and the other metrics_* keys apply only to mode = \"local\" or \"distributed\" \
                 (the sites' metrics are released under DP there)",
            ));
        }
        if let Some(q) = self.sample_rate {
            if self.mode != PrivacyMode::Distributed {
                return Err(SpecError::invalid(
                    "privacy.sample_rate",
                    "applies only to mode = \"distributed\" (with mode = \"local\" each site \
                     samples at training.batch_size / its rows)",
                ));
            }
            if !(q.is_finite() && q > 0.0 && q <= 1.0) {
                return Err(SpecError::invalid(
                    "privacy.sample_rate",
                    format!("must be in (0, 1], got {q}"),
                ));
            }
        }
        if let Some(reserve) = self.retry_reserve {
            if self.mode != PrivacyMode::Distributed {
                return Err(SpecError::invalid(
                    "privacy.retry_reserve",
                    "applies only to mode = \"distributed\" (a local DP-SGD round retried is \
                     answered by re-sending the update released for it, which spends nothing)",
                ));
            }
            if reserve > MAX_RETRY_RESERVE {
                return Err(SpecError::invalid(
                    "privacy.retry_reserve",
                    format!("must be at most {MAX_RETRY_RESERVE}, got {reserve}"),
                ));
            }
        }
        if self.unit == PrivacyUnit::Patient && self.mode != PrivacyMode::Local {
            return Err(SpecError::invalid(
                "privacy.unit",
                "= \"patient\" applies only to mode = \"local\" (DP-SGD's example at the sites)",
            ));
        }
        match self.mode {
            PrivacyMode::None => {
                if self.target_epsilon.is_some()
                    || self.max_grad_norm.is_some()
                    || self.noise_multiplier.is_some()
                    || self.central.is_some()
                {
                    return Err(SpecError::invalid(
                        "privacy.mode",
                        "is \"none\" but DP settings are given: a setting that is not in force \
                         must not look as if it were; remove them or choose a mode",
                    ));
                }
            }
            PrivacyMode::Local => {
                if self.max_grad_norm.is_none() {
                    return Err(SpecError::invalid(
                        "privacy.max_grad_norm",
                        "is required with mode = \"local\" (the per-example clipping norm)",
                    ));
                }
                if self.target_epsilon.is_none() && self.noise_multiplier.is_none() {
                    return Err(SpecError::invalid(
                        "privacy.target_epsilon",
                        "is required with mode = \"local\" unless noise_multiplier is given",
                    ));
                }
                if self.central.is_some() {
                    return Err(SpecError::invalid(
                        "privacy.central",
                        "applies only to mode = \"central\"",
                    ));
                }
            }
            PrivacyMode::Distributed => {
                if self.max_grad_norm.is_none() {
                    return Err(SpecError::invalid(
                        "privacy.max_grad_norm",
                        "is required with mode = \"distributed\" (the per-row clipping norm C: \
                         each site sums its sampled rows' clipped gradients, and the survivors' \
                         noise shares add up to noise_multiplier x C on the sum)",
                    ));
                }
                if self.central.is_some() {
                    return Err(SpecError::invalid(
                        "privacy.central",
                        "applies only to mode = \"central\"",
                    ));
                }
                if self.target_epsilon.is_none() && self.noise_multiplier.is_none() {
                    return Err(SpecError::invalid(
                        "privacy.target_epsilon",
                        "is required with mode = \"distributed\" unless noise_multiplier is \
                         given",
                    ));
                }
            }
            PrivacyMode::Central => {
                let Some(c) = &self.central else {
                    return Err(SpecError::invalid(
                        "privacy.central",
                        "is required with mode = \"central\" (at least clip_norm)",
                    ));
                };
                if self.max_grad_norm.is_some() || self.noise_multiplier.is_some() {
                    return Err(SpecError::invalid(
                        "privacy.max_grad_norm",
                        "max_grad_norm and noise_multiplier are DP-SGD's (mode = \"local\"); \
                         with mode = \"central\" set privacy.central.clip_norm and \
                         privacy.central.noise_multiplier",
                    ));
                }
                positive("privacy.central.clip_norm", c.clip_norm)?;
                if let Some(z) = c.noise_multiplier {
                    positive("privacy.central.noise_multiplier", z)?;
                } else if self.target_epsilon.is_none() {
                    return Err(SpecError::invalid(
                        "privacy.target_epsilon",
                        "is required with mode = \"central\" unless \
                         privacy.central.noise_multiplier is given",
                    ));
                }
                if !(c.target_quantile > 0.0 && c.target_quantile < 1.0) {
                    return Err(SpecError::invalid(
                        "privacy.central.target_quantile",
                        format!("must be in (0, 1), got {}", c.target_quantile),
                    ));
                }
                positive("privacy.central.clip_learning_rate", c.clip_learning_rate)?;
                positive(
                    "privacy.central.count_noise_multiplier",
                    c.count_noise_multiplier,
                )?;
            }
        }
        Ok(())
    }
}

/// A job spec that cannot be used, with the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not TOML, or not the shape of a job spec (unknown key, missing key, wrong type). toml's
    /// message names the key and shows the offending line.
    #[error("job spec: {0}")]
    Toml(#[from] toml::de::Error),
    /// Well-formed, but a value is out of its range.
    #[error("job spec: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

impl SpecError {
    pub(crate) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        SpecError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// The dotted key a validation error is about (`None` for a TOML error, whose message names it).
    pub fn key(&self) -> Option<&str> {
        match self {
            SpecError::Invalid { key, .. } => Some(key),
            SpecError::Toml(_) => None,
        }
    }
}

impl JobSpec {
    /// Parses and validates a job spec.
    pub fn from_toml_str(text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every value's range; the error names the first bad key.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("name", &self.name, 64)?;
        check_name("model.name", &self.model.name, 64)?;
        if let Some(d) = &self.model.tokenizer_sha256
            && !is_hex_digest(d)
        {
            return Err(SpecError::invalid(
                "model.tokenizer_sha256",
                format!(
                    "must be the SHA-256 of the tokenizer's tokenizer.json as 64 lowercase hex \
                     digits (`tutela-node tokenizer digest FILE` prints it), got {d:?}"
                ),
            ));
        }
        if let Some(d) = &self.model.base_sha256
            && !is_hex_digest(d)
        {
            return Err(SpecError::invalid(
                "model.base_sha256",
                format!(
                    "must be the digest of the base checkpoint as 64 lowercase hex digits \
                     (`tutela-node lm digest DIR` prints it), got {d:?}"
                ),
            ));
        }
        for (k, v) in &self.model.params {
            check_finite(&format!("model.{k}"), v)?;
        }
        // The registry's own models have known hyper-parameters and ranges (dropout in [0, 1),
        // positive widths): checked at submission rather than at the first site.
        if crate::model_registry::MODEL_NAMES.contains(&self.model.name.as_str()) {
            use crate::model_registry::{ModelDescription, RegistryError};
            ModelDescription::for_job(&self.model).map_err(|e| match e {
                RegistryError::HyperParams { key, reason } => {
                    SpecError::invalid(format!("model.{key}"), reason)
                }
                other => SpecError::invalid("model", other.to_string()),
            })?;
        }
        check_name("data.schema", &self.data.schema, 64)?;
        if let Some(d) = &self.data.schema_sha256
            && !is_hex_digest(d)
        {
            return Err(SpecError::invalid(
                "data.schema_sha256",
                format!(
                    "must be the SHA-256 of the dataset schema file as 64 lowercase hex digits \
                     (`tutela-node data check` prints it), got {d:?}"
                ),
            ));
        }

        let t = &self.training;
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(SpecError::invalid(
                "training.learning_rate",
                format!("must be a finite number > 0, got {}", t.learning_rate),
            ));
        }
        if t.local_epochs == 0 {
            return Err(SpecError::invalid(
                "training.local_epochs",
                "must be at least 1",
            ));
        }
        if t.batch_size == 0 {
            return Err(SpecError::invalid(
                "training.batch_size",
                "must be at least 1",
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(SpecError::invalid(
                "training.weight_decay",
                format!("must be a finite number >= 0, got {}", t.weight_decay),
            ));
        }
        if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
            return Err(SpecError::invalid(
                "training.momentum",
                format!("must be in [0, 1), got {}", t.momentum),
            ));
        }
        if t.optimizer != Optimizer::Sgd && t.momentum != 0.0 {
            // Adam has its own moment estimates; a momentum that would be silently ignored is a
            // setting the operator believes is in force and is not.
            return Err(SpecError::invalid(
                "training.momentum",
                "applies only to optimizer = \"sgd\"; remove it or set it to 0",
            ));
        }
        if let Some(len) = t.max_seq_len
            && !(2..=MAX_SEQ_LEN).contains(&len)
        {
            return Err(SpecError::invalid(
                "training.max_seq_len",
                format!("must be in 2..={MAX_SEQ_LEN} tokens, got {len}"),
            ));
        }

        if self.rounds == 0 {
            return Err(SpecError::invalid("rounds", "must be at least 1"));
        }
        if self.min_sites == 0 {
            return Err(SpecError::invalid("min_sites", "must be at least 1"));
        }
        if !(self.fraction.is_finite() && self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(SpecError::invalid(
                "fraction",
                format!("must be in (0, 1], got {}", self.fraction),
            ));
        }
        if self.round_deadline_secs == 0 {
            return Err(SpecError::invalid(
                "round_deadline_secs",
                "must be at least 1",
            ));
        }
        if !(self.update_norm_bound.is_finite() && self.update_norm_bound > 0.0) {
            return Err(SpecError::invalid(
                "update_norm_bound",
                format!(
                    "must be a finite number > 0, got {}",
                    self.update_norm_bound
                ),
            ));
        }
        check_sites(&self.sites, self.min_sites)?;
        if let Some(v) = &self.strategy {
            check_finite("strategy", v)?;
        }
        if let Some(p) = &self.privacy {
            p.validate()?;
        }
        if let Some(lora) = &self.lora {
            let local_dp = self.dp().is_some_and(|p| p.mode == PrivacyMode::Local);
            lora.validate(local_dp)?;
        }
        if let Some(secagg) = &self.secure_aggregation {
            secagg.validate(self.update_norm_bound)?;
        }
        distributed::validate(self)?;
        if let Some(a) = &self.aggregation {
            a.validate(self)?;
        }
        if let Some(w) = &self.watermark {
            w.validate()?;
        }
        if let Some(p) = &self.publish
            && let Some(problem) = crate::release::name_problem(&p.name)
        {
            return Err(SpecError::invalid("publish.name", problem));
        }
        Ok(())
    }

    /// The registry name the job's final model is published under: `[publish] name`, or the
    /// job's own `name` (which satisfies the same rule).
    pub fn registry_name(&self) -> &str {
        self.publish.as_ref().map_or(&self.name, |p| &p.name)
    }

    /// The job's privacy settings when it uses differential privacy (`mode` other than `none`).
    pub fn dp(&self) -> Option<&PrivacySpec> {
        self.privacy
            .as_ref()
            .filter(|p| p.mode != PrivacyMode::None)
    }

    /// SHA-256 of [`canonical_json`] of this spec (defaults filled in).
    pub fn digest(&self) -> SpecDigest {
        // Serializing a struct of strings, numbers and toml values into a `serde_json::Value`
        // cannot fail; the fallback keeps this function total without an `unwrap`.
        digest_of_value(&serde_json::to_value(self).unwrap_or(serde_json::Value::Null))
    }

    /// The canonical JSON text the digest is computed over, for a verifier to recompute it.
    pub fn canonical_json(&self) -> String {
        canonical_json(&serde_json::to_value(self).unwrap_or(serde_json::Value::Null))
    }
}

/// SHA-256 of a parsed spec's canonical JSON: the digest of every kind of job spec.
fn digest_of_value(value: &serde_json::Value) -> SpecDigest {
    let canonical = canonical_json(value);
    let d = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    SpecDigest(out)
}

/// `sites`: site names, each once, and at least `min_sites` of them when any are listed.
fn check_sites(sites: &[String], min_sites: u32) -> Result<(), SpecError> {
    for (i, site) in sites.iter().enumerate() {
        crate::identity::validate_segment("site", site).map_err(|_| {
            SpecError::invalid(
                format!("sites[{i}]"),
                format!(
                    "{site:?} is not a site name (1 to 63 of a-z, 0-9, '-', '_', '.', not starting with '.' or '-')"
                ),
            )
        })?;
        if sites[..i].contains(site) {
            return Err(SpecError::invalid(
                format!("sites[{i}]"),
                format!("{site:?} is listed twice"),
            ));
        }
    }
    if !sites.is_empty() && sites.len() < min_sites as usize {
        return Err(SpecError::invalid(
            "min_sites",
            format!(
                "is {} but `sites` lists only {}: no round could ever complete",
                min_sites,
                sites.len()
            ),
        ));
    }
    Ok(())
}

fn check_name(key: &str, value: &str, max: usize) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(SpecError::invalid(
            key,
            format!(
                "must be 1 to {max} letters, digits, '-', '_' or '.', starting with a letter or digit; got {value:?}"
            ),
        ))
    }
}

/// JSON has no NaN or infinity: serde_json would turn them into `null`, so that `nan` and `inf`
/// would digest alike. Refuse them, naming the key.
fn check_finite(key: &str, value: &toml::Value) -> Result<(), SpecError> {
    match value {
        toml::Value::Float(f) if !f.is_finite() => Err(SpecError::invalid(
            key,
            format!("must be a finite number, got {f}"),
        )),
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_finite(&format!("{key}[{i}]"), v)),
        toml::Value::Table(t) => t
            .iter()
            .try_for_each(|(k, v)| check_finite(&format!("{key}.{k}"), v)),
        _ => Ok(()),
    }
}

/// The SHA-256 digest of a job spec's canonical JSON; shown and stored as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpecDigest(pub [u8; 32]);

impl SpecDigest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for SpecDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SpecDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpecDigest({})", self.to_hex())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a digest: expected 64 lowercase hex digits")]
pub struct BadDigest(pub String);

impl FromStr for SpecDigest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !is_hex_digest(s) {
            return Err(BadDigest(s.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadDigest(s.to_string()))?;
        Ok(SpecDigest(out))
    }
}

/// True for a SHA-256 digest written as 64 lowercase hex digits, the one spelling used for every
/// digest the coordinator stores (specs, models, updates), so that equal digests compare equal as text.
pub fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Canonical JSON text of `value` (RFC 8785): the one canonicaliser of the project, shared with
/// the audit trail's event hashes.
pub use crate::canonical::canonical_json;

/// The domain-separation tag of a compliance officer's approval signature.
pub const APPROVAL_CONTEXT: &str = "tutela/job-approval/v1";

/// The bytes a compliance officer signs to approve job `job_id` whose spec digests to
/// `digest_hex` (64 lowercase hex digits), valid from `signed_at_ms` until `expires_at_ms` (Unix
/// milliseconds). One definition for the policy crate that signs and checks approvals and the
/// audit service that checks them again before storing them.
pub fn approval_message(
    job_id: &str,
    digest_hex: &str,
    signed_at_ms: i64,
    expires_at_ms: i64,
) -> Vec<u8> {
    format!(
        "{APPROVAL_CONTEXT}\njob={job_id}\nspec-digest={digest_hex}\nsigned-at-ms={signed_at_ms}\nexpires-at-ms={expires_at_ms}\n"
    )
    .into_bytes()
}

/// The domain-separation tag of a compliance officer's rejection signature. It differs from
/// [`APPROVAL_CONTEXT`] and neither is a prefix of the other, so that no signature over one kind
/// of message is ever a signature over the other: a rejection cannot be replayed as an approval,
/// nor an approval as a rejection.
pub const REJECTION_CONTEXT: &str = "tutela/job-rejection/v1";

/// The longest reason a signed rejection may give, in bytes of UTF-8. A reason is for people to
/// read in `tutela job status` and the audit trail; the bound keeps a rejection a small record.
pub const MAX_REJECTION_REASON_BYTES: usize = 2048;

/// The bytes a compliance officer signs to reject job `job_id` whose spec digests to `digest_hex`
/// (64 lowercase hex digits), at `signed_at_ms` (Unix milliseconds), for `reason`. One definition
/// for the policy crate that signs and checks rejections and the audit service that checks them
/// again before storing them.
///
/// The reason is the last field and is preceded by its length in bytes, so that no reason (which
/// may hold newlines or text that looks like a field) can make two different rejections sign the
/// same bytes.
pub fn rejection_message(
    job_id: &str,
    digest_hex: &str,
    reason: &str,
    signed_at_ms: i64,
) -> Vec<u8> {
    format!(
        "{REJECTION_CONTEXT}\njob={job_id}\nspec-digest={digest_hex}\nsigned-at-ms={signed_at_ms}\nreason-bytes={}\nreason={reason}\n",
        reason.len()
    )
    .into_bytes()
}

/// Why a rejection's reason is not acceptable, or `None` when it is: it must say something (not
/// only whitespace), fit in [`MAX_REJECTION_REASON_BYTES`], and hold no control character other
/// than newline and tab (which a terminal showing `tutela job status` would otherwise interpret).
pub fn rejection_reason_problem(reason: &str) -> Option<String> {
    if reason.trim().is_empty() {
        return Some("is empty: a rejection must say why".to_string());
    }
    if reason.len() > MAX_REJECTION_REASON_BYTES {
        return Some(format!(
            "is {} bytes, over the limit of {MAX_REJECTION_REASON_BYTES}",
            reason.len()
        ));
    }
    if let Some(c) = reason
        .chars()
        .find(|c| c.is_control() && *c != '\n' && *c != '\t')
    {
        return Some(format!(
            "holds the control character U+{:04X}; only newlines and tabs are allowed",
            u32::from(c)
        ));
    }
    None
}

#[cfg(test)]
mod tests;
