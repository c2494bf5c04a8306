//! What a language-model round reads of a job spec: the node's [`JobView`] (strict `[privacy]`
//! and `[lora]`) plus the keys only language models have.

use tutela_protocol::job::{PrivacyMode, PrivacyUnit};
use tutela_protocol::lora::LoraSpec;

use crate::jobspec::{JobSpecError, JobView};
use crate::lm::config::DecoderConfig;
use crate::models::{ModelFamily, family_of};

/// A language-model job as the round needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct LmJob {
    pub view: JobView,
    /// `[lora]`: required, since only adapters travel in a federated language-model round.
    pub lora: LoraSpec,
}

fn invalid(key: &str, problem: impl Into<String>) -> JobSpecError {
    JobSpecError::Invalid {
        key: key.to_string(),
        problem: problem.into(),
    }
}

impl LmJob {
    /// Parses a job spec (as [`JobView::from_toml_str`]) that must be a language-model job with
    /// `[lora]`.
    pub fn from_toml_str(text: &str) -> Result<LmJob, JobSpecError> {
        Self::from_view(JobView::from_toml_str(text)?)
    }

    /// The job of `view`, which must name a language model and have `[lora]`; errors name the
    /// key.
    pub fn from_view(view: JobView) -> Result<LmJob, JobSpecError> {
        let name = view.model_name()?;
        if family_of(name) != Some(ModelFamily::Language) {
            return Err(invalid(
                "model.name",
                format!("{name:?} is not a language model (the registry's: \"llama\")"),
            ));
        }
        let Some(lora) = view.lora.clone() else {
            return Err(invalid(
                "lora",
                "is required for a language-model job: its round trains and sends adapters only",
            ));
        };
        // The key's form is the node's one check (`JobView::base_sha256`).
        view.base_sha256()?;
        Ok(LmJob { view, lora })
    }

    /// `[model] base_sha256`: the digest of the base checkpoint the adapters sit on.
    pub fn base_sha256(&self) -> Result<&str, JobSpecError> {
        self.view.base_sha256()?.ok_or_else(|| {
            invalid(
                "model.base_sha256",
                "is required: the base checkpoint's digest (`lm::hf::checkpoint_digest`)",
            )
        })
    }

    /// Whether the sites run DP-SGD (`privacy.mode = "local"`).
    pub fn local_dp(&self) -> bool {
        self.view
            .privacy
            .as_ref()
            .is_some_and(|p| p.mode == PrivacyMode::Local)
    }

    /// `privacy.unit` (the document when there is no `[privacy]`).
    pub fn privacy_unit(&self) -> PrivacyUnit {
        self.view
            .privacy
            .as_ref()
            .map_or(PrivacyUnit::Document, |p| p.unit)
    }

    /// Tokens per training window: `training.max_seq_len`, or the model's context length, never
    /// more than the context length.
    pub fn window(&self, config: &DecoderConfig) -> usize {
        let context = config.max_position_embeddings.max(2);
        self.view
            .training
            .max_seq_len
            .map_or(context, |n| (n as usize).min(context))
            .max(2)
    }
}
