//! The local round of a language model on one of the site's text datasets: LoRA adapters on
//! the base checkpoint the job names, trained on the protected documents
//! ([`crate::lm::round::local_lm_round`]).
//!
//! Admission has already matched the job's tokenizer and base checkpoint (by digest) against
//! the site's and parsed the job as a language-model job ([`LmJob`]: `[lora]` and
//! `model.base_sha256` required). The round reads the text dataset through its protection
//! pipeline, reports its de-identification for the trail, and trains; the ledger is planned
//! and charged inside the round with the real number of privacy units, as the tabular round
//! does with rows, so spend anchoring and resend are the agent's, unchanged.

use std::sync::Arc;

use tch::Device;
use tutela_audit::payload::TextDatasetDeidentified;

use super::gate::Admitted;
use super::round::{
    Deidentification, LocalError, LocalRound, RoundInput, RoundResult, read_global_model,
};
use crate::jobspec::{JobView, batch_seed};
use crate::ledger::RoundCharging;
use crate::lm::base::ApprovedBase;
use crate::lm::round::job::LmJob;
use crate::lm::round::{
    LmRoundError, LmRoundInputs, adapted_base, initial_adapter, local_lm_round,
};
use crate::lm::text_dataset::TextDataset;
use crate::lm::tokenizer::site::ApprovedTokenizer;
use crate::lm::tokenizer::{SpecialTokens, TextTokenizer};
use crate::weights::NamedTensors;

/// The round of a language model's adapters on a text dataset, with the tokenizer and base
/// checkpoint the job names (as admitted).
#[derive(Debug, Clone)]
pub struct LanguageRound {
    pub job: LmJob,
    pub dataset: Arc<TextDataset>,
    pub tokenizer: ApprovedTokenizer,
    pub base: ApprovedBase,
}

fn lm(e: LmRoundError) -> LocalError {
    LocalError::LanguageRound(Box::new(e))
}

impl LanguageRound {
    /// The tokenizer from the bytes the gate digested (its special tokens are the file's own;
    /// the defaults name them as `tutela-node tokenizer train` writes them).
    fn tokenizer(&self) -> Result<TextTokenizer, LocalError> {
        self.tokenizer
            .load(&SpecialTokens::default())
            .map_err(|e| lm(LmRoundError::Tokenizer(e)))
    }
}

impl LocalRound for LanguageRound {
    fn dataset_name(&self) -> &str {
        self.dataset.name()
    }

    fn trained_parameters(&self, _job: &JobView) -> Result<usize, LocalError> {
        // The adapters' trainable values (B under FFA-LoRA), counted on the adapted base as the
        // round counts them: the base is read (by digest), no document is.
        let model = adapted_base(&self.job, self.base.dir(), &self.tokenizer()?, Device::Cpu)
            .map_err(lm)?;
        Ok(model.adapter_parameters().iter().map(|p| p.numel()).sum())
    }

    fn initial_weights(&self, _job: &JobView, _device: Device) -> Result<NamedTensors, LocalError> {
        // Every B zero: the adapted model starts as the base model exactly (the coordinator
        // checks that it is all zeros).
        initial_adapter(&self.job, self.base.dir(), &self.tokenizer()?).map_err(lm)
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

    fn run(&self, admitted: &Admitted, input: RoundInput<'_>) -> Result<RoundResult, LocalError> {
        if crate::ledger::training_kind(&admitted.job)
            == tutela_privacy::ledger::MechanismKind::DistributedDpSgd
        {
            // Record-level distributed DP's one clipped step per round is built for the layer
            // networks' rounds (`crate::dp::train_distributed_step`), not for adapters.
            return Err(LocalError::Privacy(
                "privacy.mode = \"distributed\" is not supported for language models: use \
                 mode = \"local\""
                    .into(),
            ));
        }
        let text = self
            .dataset
            .load()
            .map_err(|e| LocalError::TextData(Box::new(e)))?;
        let tokenizer = self.tokenizer()?;
        let global = read_global_model(input.global_path, input.kek)?;
        let result = local_lm_round(&LmRoundInputs {
            job: &self.job,
            base_dir: self.base.dir(),
            tokenizer: &tokenizer,
            text: &text,
            global_adapter: &global,
            device: input.device,
            charging: RoundCharging {
                ledgers: admitted.ledgers.as_deref(),
                job_id: &admitted.job_id,
                dataset: self.dataset.name(),
                round: input.round,
                attempt: input.attempt,
            },
            batch_seed: batch_seed(admitted.job.seed, input.round, input.attempt, input.site),
        })
        .map_err(lm)?;
        tracing::info!(
            eval_perplexity = result.eval.perplexity,
            eval_tokens = result.eval.tokens,
            train_units = result.train_units,
            train_steps = result.train_steps,
            train_tokens = result.train_tokens,
            "language-model round done"
        );
        Ok(RoundResult {
            dp_noise: result.dp_noise,
            single_class_predicted: None,
            delta: result.delta,
            eval: crate::train::Eval {
                loss: result.eval.loss,
                // Not a classifier: the perplexity says how good the model is.
                accuracy: 0.0,
                n: result.eval.tokens,
            },
            eval_perplexity: Some(result.eval.perplexity),
            eval_units: if crate::ledger::releases_dp_metrics(&admitted.job) {
                result.eval.units.clone()
            } else {
                Vec::new()
            },
            // The update's FedAvg weight: the documents it was trained on.
            train_samples: result.train_documents,
            train_loss: result.train_loss,
            train_seconds: result.train_seconds,
            dataset_commitment: Some(result.dataset_commitment),
            deid_config_sha256: Some(result.deid_config_sha256),
            privacy: result.privacy,
        })
    }
}
