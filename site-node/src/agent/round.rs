//! The seam between the agent's handling of a task and what a model family does with the site's
//! data: [`LocalRound`].
//!
//! Whatever the model, a task goes the same way (see `worker`): admitted by the gate, the
//! dataset's de-identification recorded in the trail, the global model fetched, one local round
//! on a blocking thread, its spend anchored in the trail, the update filtered and uploaded. What
//! differs is the round itself: a layer network on a table ([`super::tabular::TabularRound`]) or
//! a language model on a text dataset ([`super::language::LanguageRound`]). The gate picks the
//! implementation once, from the job's model family ([`crate::models::family_of`]), and nothing
//! after it asks which kind of model a job has.

use std::fmt;
use std::path::{Path, PathBuf};

use tch::Device;
use tutela_audit::payload::{DatasetDeidentified, TextDatasetDeidentified};
use tutela_privacy::at_rest::{KeyEncryptionKey, decrypt_to_vec};

use super::gate::Admitted;
use crate::data::DataError;
pub use crate::dp::DpNoise;
use crate::jobspec::{JobSpecError, JobView};
use crate::ledger::RoundSpend;
use crate::lm::round::LmRoundError;
use crate::lm::text_dataset::TextDatasetError;
use crate::models::ModelError;
use crate::train::TrainError;
use crate::weights::{NamedTensors, WeightsError, from_safetensors_bytes, load_safetensors};

/// The round's global model as received: decrypted in memory when the node keeps it encrypted
/// (no plaintext byte of it on disk), sorted by name.
pub fn read_global_model(
    path: &Path,
    kek: Option<&dyn KeyEncryptionKey>,
) -> Result<NamedTensors, LocalError> {
    let global_err = |source| LocalError::GlobalModel {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let (global, _metadata) = match kek {
        Some(kek) => {
            let bytes = decrypt_to_vec(path, kek)
                .map_err(|e| LocalError::GlobalModelAtRest(Box::new(e)))?;
            from_safetensors_bytes(&bytes, path).map_err(global_err)?
        }
        None => load_safetensors(path).map_err(global_err)?,
    };
    Ok(global)
}

/// One kind of local round, chosen by the gate from the job's model family.
pub trait LocalRound: Send + Sync + fmt::Debug {
    /// The dataset the round reads: it names the privacy ledger and the trail's subject.
    fn dataset_name(&self) -> &str;

    /// How many parameters a round trains (and DP noises), for the ledger's planned spend;
    /// reads no data.
    fn trained_parameters(&self, job: &JobView) -> Result<usize, LocalError>;

    /// The job's round-0 model, the same at every site (drawn from the job's seed, or the
    /// adapters' zero init); reads no data.
    fn initial_weights(&self, job: &JobView, device: Device) -> Result<NamedTensors, LocalError>;

    /// Reads the dataset (the first time; later calls reuse it) and says what the trail must
    /// hold of its de-identification before anything trains on it, if anything.
    fn deidentification(
        &self,
        site: &str,
        job_id: &str,
    ) -> Result<Option<Deidentification>, LocalError>;

    /// Evaluates the global model at `round.global_path` on the validation split, trains it on
    /// the training split, charges the ledger and returns the update.
    fn run(&self, admitted: &Admitted, round: RoundInput<'_>) -> Result<RoundResult, LocalError>;
}

/// What a round is run on besides the admitted task.
#[derive(Clone, Copy)]
pub struct RoundInput<'a> {
    /// The global model as received (encrypted when `kek` is given).
    pub global_path: &'a Path,
    pub kek: Option<&'a dyn KeyEncryptionKey>,
    pub device: Device,
    pub round: u32,
    pub attempt: u32,
    pub site: &'a str,
}

/// The trail's record of how a dataset was protected, one typed payload per kind of dataset.
#[derive(Clone, Debug, PartialEq)]
pub enum Deidentification {
    /// `dataset.deidentified`: a table through the anonymization pipeline.
    Table(DatasetDeidentified),
    /// `dataset.text_deidentified`: a text dataset through the text protection pipeline.
    Text(TextDatasetDeidentified),
}

impl Deidentification {
    pub fn dataset(&self) -> &str {
        match self {
            Deidentification::Table(p) => &p.dataset,
            Deidentification::Text(p) => &p.dataset,
        }
    }

    /// What makes two records the same: the protection configuration and the commitment (the
    /// node records a dataset once per process, not once per task).
    pub fn identity(&self) -> String {
        match self {
            Deidentification::Table(p) => format!(
                "table:{}:{}",
                p.report
                    .get("config_sha256")
                    .and_then(|v| v.as_str())
                    .unwrap_or("-"),
                p.dataset_commitment.as_deref().unwrap_or("-")
            ),
            Deidentification::Text(p) => {
                format!("text:{}:{}", p.config_sha256, p.dataset_commitment)
            }
        }
    }
}

/// What one local round produced.
#[derive(Debug)]
pub struct RoundResult {
    /// `local − global`, F32, sorted by name (for a LoRA job: the adapter tensors only).
    pub delta: NamedTensors,
    /// The global model on the validation split, before training (for a language model: the
    /// mean next-token cross-entropy, whose exponential is the perplexity; accuracy 0).
    pub eval: crate::train::Eval,
    /// A language model's validation perplexity (exp of `eval.loss`); `None` for other models.
    pub eval_perplexity: Option<f64>,
    /// Each validation privacy unit's loss and accuracy, for a DP job's noised metrics
    /// (`tutela_privacy::metrics`); empty without DP. Never leaves the site as is.
    pub eval_units: Vec<tutela_privacy::metrics::UnitMetric>,
    /// Training examples: rows, or documents for a language model.
    pub train_samples: usize,
    pub train_loss: f64,
    pub train_seconds: f64,
    /// The dataset commitment (hex) and the anonymization configuration's digest, for lineage.
    pub dataset_commitment: Option<String>,
    pub deid_config_sha256: Option<String>,
    /// What the round spent of the dataset's privacy budget (DP-SGD jobs only).
    pub privacy: Option<RoundSpend>,
    /// The DP-SGD noise the round trained under (any DP-SGD round, tabular or language
    /// model), for job status, the round's trail event and the coordinator's noise-to-signal
    /// warning; `None` without DP-SGD.
    pub dp_noise: Option<DpNoise>,
    /// The class the trained model predicted for every validation row, when it did (it has
    /// learnt the majority class only); `None` otherwise, and for language models.
    pub single_class_predicted: Option<usize>,
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
    /// The text dataset could not be read or protected (the error names the file and line).
    #[error("the local text dataset: {0}")]
    TextData(#[source] Box<TextDatasetError>),
    /// The language-model round failed (its errors may name the site's files, never a
    /// document's text).
    #[error("the language-model round: {0}")]
    LanguageRound(#[source] Box<LmRoundError>),
    #[error("computing the update: {0}")]
    Update(#[source] Box<WeightsError>),
    /// DP-SGD could not be planned, the budget refuses it, or the ledger could not be written.
    #[error("privacy: {0}")]
    Privacy(String),
}
