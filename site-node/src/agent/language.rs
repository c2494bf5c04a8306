//! The local round of a language model on one of the site's text datasets.
//!
//! Admission has already matched the job's tokenizer and base checkpoint (by digest) against
//! the site's; this round reads the text dataset through its protection pipeline and reports
//! the de-identification for the trail. The training itself (LoRA adapters under DP-SGD,
//! `lm::round`) is built on another branch and plugs in at [`LanguageRound::run`] and
//! [`LanguageRound::initial_weights`]; until it lands, a language-model task is declined there
//! with `training.unsupported`, after every admission check has run.

use std::sync::Arc;

use tch::Device;
use tutela_audit::payload::TextDatasetDeidentified;

use super::gate::Admitted;
use super::round::{Deidentification, LocalError, LocalRound, RoundInput, RoundResult};
use crate::jobspec::JobView;
use crate::lm::base::ApprovedBase;
use crate::lm::config::DecoderConfig;
use crate::lm::text_dataset::TextDataset;
use crate::lm::tokenizer::site::ApprovedTokenizer;
use crate::weights::NamedTensors;

/// The `[model]` keys that name things rather than set a hyper-parameter of the decoder.
const NOT_HYPER_PARAMETERS: [&str; 3] = ["name", "tokenizer_sha256", "base_sha256"];

/// The round of a language model on a text dataset, with the tokenizer and base checkpoint the
/// job names (as admitted).
#[derive(Debug, Clone)]
pub struct LanguageRound {
    pub dataset: Arc<TextDataset>,
    pub tokenizer: ApprovedTokenizer,
    pub base: Option<ApprovedBase>,
}

impl LanguageRound {
    /// The decoder's configuration: the base checkpoint's `config.json`, or the job's `[model]`
    /// hyper-parameters (`config.json`'s keys) for a model drawn from the job's seed.
    pub fn decoder_config(&self, job: &JobView) -> Result<DecoderConfig, LocalError> {
        let lm = |e| LocalError::LanguageModel(Box::new(e));
        match &self.base {
            Some(base) => DecoderConfig::load(base.dir().join("config.json")).map_err(lm),
            None => {
                let mut table = job.model.clone();
                for key in NOT_HYPER_PARAMETERS {
                    table.remove(key);
                }
                DecoderConfig::from_toml(&toml::Value::Table(table)).map_err(lm)
            }
        }
    }
}

fn unsupported() -> LocalError {
    LocalError::Unsupported(
        "language-model training rounds are not available in this node yet".into(),
    )
}

impl LocalRound for LanguageRound {
    fn dataset_name(&self) -> &str {
        self.dataset.name()
    }

    fn trained_parameters(&self, job: &JobView) -> Result<usize, LocalError> {
        let config = self.decoder_config(job)?;
        // The full model (a job without adapters trains every weight). Built on the CPU from
        // the configuration alone: no checkpoint and no data is read.
        let model = crate::lm::registry::build(job.model_name()?, &config, Device::Cpu, job.seed)
            .map_err(|e| LocalError::LanguageModel(Box::new(e)))?;
        usize::try_from(model.parameter_count())
            .map_err(|_| LocalError::Unsupported("the model's parameter count".into()))
    }

    fn initial_weights(&self, _job: &JobView, _device: Device) -> Result<NamedTensors, LocalError> {
        Err(unsupported())
    }

    fn deidentification(
        &self,
        site: &str,
        job_id: &str,
    ) -> Result<Option<Deidentification>, LocalError> {
        let loaded = self
            .dataset
            .load()
            .map_err(|e| LocalError::TextData(Box::new(e)))?;
        let report = &loaded.report;
        let split_unit = match report.split.unit {
            tutela_privacy::anonymize::text::SplitUnit::Document => "document",
            tutela_privacy::anonymize::text::SplitUnit::Patient => "patient",
        };
        Ok(Some(Deidentification::Text(TextDatasetDeidentified {
            site: site.to_string(),
            dataset: self.dataset.name().to_string(),
            job: job_id.to_string(),
            config_sha256: report.config_sha256.clone(),
            split_unit: split_unit.to_string(),
            documents_in: report.documents_in as u64,
            documents_out: report.documents_out as u64,
            // Counts and settings only (serialising plain data cannot fail).
            report: serde_json::to_value(report).unwrap_or_default(),
            dataset_commitment: loaded.commitment.root_hex(),
        })))
    }

    fn run(&self, _admitted: &Admitted, _input: RoundInput<'_>) -> Result<RoundResult, LocalError> {
        Err(unsupported())
    }
}
