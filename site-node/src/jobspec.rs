//! The node's reading of a job spec (the TOML the operator submitted, sent in every task) and of
//! a round's strategy settings.
//!
//! The coordinator owns the job spec's full definition and validates it strictly. The node reads
//! only what it needs to build and train the model, with its own serde structs that ignore every
//! other key (so the site node does not depend on the coordinator crate, and a new coordinator-side
//! key never breaks older nodes). What it does read it checks again: a node does not trust the
//! coordinator to hand it a sane learning rate.

use serde::Deserialize;

use crate::data::DatasetSchema;
use crate::models::ModelSpec;
use crate::train::{OptimizerKind, TrainConfig};

/// Why a job spec or strategy setting cannot be used by this node.
#[derive(Debug, thiserror::Error)]
pub enum JobSpecError {
    #[error("job spec: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("job spec: `{key}` {problem}")]
    Invalid { key: String, problem: String },
    #[error("strategy settings {json:?}: {problem}")]
    Strategy { json: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> JobSpecError {
    JobSpecError::Invalid {
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// The `[model]` key naming the job's tokenizer by digest (`tutela_protocol::job::ModelSpec`).
const TOKENIZER_SHA256: &str = "tokenizer_sha256";
/// The `[model]` key naming the job's base checkpoint by digest (`tutela_protocol::job::ModelSpec`).
const BASE_SHA256: &str = "base_sha256";

/// What the node reads of a job spec. Unknown keys are ignored on purpose (see the module doc).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct JobView {
    /// The job's seed: the initial model is drawn from it, and local batch orders derive from it.
    #[serde(default)]
    pub seed: u64,
    /// Federated rounds; only the centralised baseline needs it (its epochs match the total).
    #[serde(default)]
    pub rounds: Option<u32>,
    /// `[model]`: `name` plus free-form hyper-parameters.
    pub model: toml::Table,
    pub data: DataView,
    pub training: TrainingView,
    /// `[privacy]`, read strictly (protocol's type): a node must understand every DP setting of a
    /// job it trains for.
    #[serde(default)]
    pub privacy: Option<tutela_protocol::job::PrivacySpec>,
    /// `[lora]`, read strictly (protocol's type), so that a LoRA job is never trained as a
    /// full-model job by a node that ignored the section.
    #[serde(default)]
    pub lora: Option<tutela_protocol::lora::LoraSpec>,
    /// `min_sites`: under distributed DP, the fewest survivors a round's sum needs, which each
    /// site's noise share is computed for.
    #[serde(default)]
    pub min_sites: Option<u32>,
    /// `[secure_aggregation]`, read strictly (protocol's type): its grid fixes the distributed
    /// DP plan's noise share.
    #[serde(default)]
    pub secure_aggregation: Option<tutela_protocol::secagg::SecureAggregationSpec>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct DataView {
    pub schema: String,
    /// The SHA-256 of the schema file the officers signed (see `tutela_protocol::job::DataSpec`);
    /// a dataset whose schema file differs declines the job
    /// (`crate::dataset::check_schema_digest`).
    #[serde(default)]
    pub schema_sha256: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TrainingView {
    pub optimizer: OptimizerName,
    pub learning_rate: f64,
    pub local_epochs: u32,
    pub batch_size: u32,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub momentum: f64,
    /// Language models: the longest token window a sequence trains on
    /// (`tutela_protocol::job::TrainingSpec::max_seq_len`).
    #[serde(default)]
    pub max_seq_len: Option<u32>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Sgd,
    Adam,
}

/// A round's strategy settings (`Task.strategy_config_json`), as far as local training is
/// concerned. Keys the node does not use (server-side learning rates, ...) are ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct StrategyView {
    /// FedProx's μ; absent or 0 is plain local training.
    #[serde(default)]
    pub proximal_mu: Option<f64>,
}

impl StrategyView {
    /// Parses the JSON a task carries; empty text means no settings.
    pub fn from_json(json: &str) -> Result<StrategyView, JobSpecError> {
        if json.trim().is_empty() {
            return Ok(StrategyView::default());
        }
        let view: StrategyView =
            serde_json::from_str(json).map_err(|e| JobSpecError::Strategy {
                json: json.to_string(),
                problem: e.to_string(),
            })?;
        if let Some(mu) = view.proximal_mu
            && !(mu.is_finite() && mu >= 0.0)
        {
            return Err(JobSpecError::Strategy {
                json: json.to_string(),
                problem: format!("proximal_mu must be a finite number >= 0, found {mu}"),
            });
        }
        Ok(view)
    }
}

impl JobView {
    pub fn from_toml_str(text: &str) -> Result<JobView, JobSpecError> {
        let view: JobView = toml::from_str(text)?;
        view.model_name()?;
        view.tokenizer_sha256()?;
        view.base_sha256()?;
        if let Some(p) = &view.privacy {
            p.validate().map_err(|e| match e {
                tutela_protocol::job::SpecError::Invalid { key, problem } => {
                    JobSpecError::Invalid { key, problem }
                }
                other => invalid("privacy", other.to_string()),
            })?;
        }
        if let Some(lora) = &view.lora {
            let local_dp = view
                .privacy
                .as_ref()
                .is_some_and(|p| p.mode == tutela_protocol::job::PrivacyMode::Local);
            lora.validate(local_dp).map_err(|e| match e {
                tutela_protocol::job::SpecError::Invalid { key, problem } => {
                    JobSpecError::Invalid { key, problem }
                }
                other => invalid("lora", other.to_string()),
            })?;
            // Adapters train only in the language-model round (`crate::lm::round`); the layer
            // networks' round would train every weight of a model approved for adapters only.
            if crate::models::family_of(view.model_name()?)
                != Some(crate::models::ModelFamily::Language)
            {
                return Err(invalid(
                    "lora",
                    "applies only to a language model (model.name = \"llama\")",
                ));
            }
        }
        if let Some(len) = view.training.max_seq_len
            && !(2..=tutela_protocol::job::MAX_SEQ_LEN).contains(&len)
        {
            return Err(invalid(
                "training.max_seq_len",
                format!(
                    "must be in 2..={} tokens, found {len}",
                    tutela_protocol::job::MAX_SEQ_LEN
                ),
            ));
        }
        Ok(view)
    }

    /// `rounds`, 1 when absent.
    pub fn rounds(&self) -> u32 {
        self.rounds.unwrap_or(1).max(1)
    }

    /// `model.name`, the model registry's name.
    pub fn model_name(&self) -> Result<&str, JobSpecError> {
        match self.model.get("name") {
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(s),
            Some(other) => Err(invalid(
                "model.name",
                format!("must be a non-empty string, found {other}"),
            )),
            None => Err(invalid("model.name", "is missing")),
        }
    }

    /// `model.tokenizer_sha256`: the SHA-256 of the `tokenizer.json` the job trains with (64
    /// lowercase hex digits), when it names one.
    pub fn tokenizer_sha256(&self) -> Result<Option<&str>, JobSpecError> {
        match self.model.get(TOKENIZER_SHA256) {
            None => Ok(None),
            Some(toml::Value::String(s)) if tutela_protocol::job::is_hex_digest(s) => Ok(Some(s)),
            Some(other) => Err(invalid(
                "model.tokenizer_sha256",
                format!("must be a SHA-256 digest, 64 lowercase hex digits, found {other}"),
            )),
        }
    }

    /// `model.base_sha256`: the digest of the base checkpoint a language model starts from
    /// (`lm::hf::checkpoint_digest`), when the job names one.
    pub fn base_sha256(&self) -> Result<Option<&str>, JobSpecError> {
        match self.model.get(BASE_SHA256) {
            None => Ok(None),
            Some(toml::Value::String(s)) if tutela_protocol::job::is_hex_digest(s) => Ok(Some(s)),
            Some(other) => Err(invalid(
                "model.base_sha256",
                format!("must be a SHA-256 digest, 64 lowercase hex digits, found {other}"),
            )),
        }
    }

    /// The model's spec: the job's hyper-parameters, with the input shape and class count that
    /// the local data's schema dictates. A hyper-parameter the model registry does not know is an
    /// error (the node cannot honour a setting it does not understand).
    pub fn model_spec(
        &self,
        schema: &DatasetSchema,
        n_features: usize,
    ) -> Result<ModelSpec, JobSpecError> {
        let mut table = self.model.clone();
        // What the model is built from, not a hyper-parameter of the registry's.
        for not_a_hyper_parameter in ["name", TOKENIZER_SHA256, BASE_SHA256] {
            table.remove(not_a_hyper_parameter);
        }
        for derived in ["input_shape", "num_classes"] {
            if table.contains_key(derived) {
                return Err(invalid(
                    &format!("model.{derived}"),
                    "comes from the dataset schema and may not be set in the job spec",
                ));
            }
        }
        let shape = schema.input_shape(n_features);
        let to_int = |n: usize| i64::try_from(n).map(toml::Value::Integer);
        let shape = shape
            .into_iter()
            .map(to_int)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| invalid("model", "the input shape is too large"))?;
        table.insert("input_shape".into(), toml::Value::Array(shape));
        let classes =
            to_int(schema.label.classes.len()).map_err(|_| invalid("model", "too many classes"))?;
        table.insert("num_classes".into(), classes);
        ModelSpec::deserialize(toml::Value::Table(table)).map_err(|e| {
            invalid(
                "model",
                format!(
                    "hyper-parameters not understood by this node: {}",
                    e.message()
                ),
            )
        })
    }

    /// The local training settings for one round. `batch_seed` seeds the batch order and
    /// dropout (see [`batch_seed`]).
    pub fn train_config(
        &self,
        strategy: &StrategyView,
        batch_seed: u64,
    ) -> Result<TrainConfig, JobSpecError> {
        let t = &self.training;
        let optimizer = match t.optimizer {
            OptimizerName::Sgd => OptimizerKind::Sgd {
                momentum: t.momentum,
            },
            OptimizerName::Adam if t.momentum != 0.0 => {
                return Err(invalid(
                    "training.momentum",
                    "applies only to optimizer = \"sgd\"",
                ));
            }
            OptimizerName::Adam => OptimizerKind::Adam,
        };
        let config = TrainConfig {
            optimizer,
            learning_rate: t.learning_rate,
            epochs: t.local_epochs as usize,
            batch_size: t.batch_size as usize,
            weight_decay: t.weight_decay,
            proximal_mu: strategy.proximal_mu.unwrap_or(0.0),
            seed: batch_seed,
        };
        config
            .validate()
            .map_err(|e| invalid("training", e.to_string()))?;
        Ok(config)
    }
}

/// The seed of one site's local training in one round: a function of the job seed, the round, the
/// attempt and the site, so a rerun repeats itself exactly while different sites and rounds
/// shuffle differently (identical batch orders everywhere would correlate the sites' updates).
pub fn batch_seed(job_seed: u64, round: u32, attempt: u32, site: &str) -> u64 {
    // FNV-1a for the site name, then SplitMix64 rounds: fixed, documented functions, unlike
    // std's hasher, whose output may change between Rust releases.
    let mut site_hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site.bytes() {
        site_hash ^= u64::from(b);
        site_hash = site_hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mut x = job_seed;
    for part in [u64::from(round), u64::from(attempt), site_hash] {
        x = splitmix64(x ^ part);
    }
    x
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
