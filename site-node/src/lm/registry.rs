//! The language models a job may name: the seam beside [`crate::models::MODELS`].
//!
//! The layer networks of [`crate::models`] take feature rows and are built from a
//! [`crate::models::ModelSpec`]; a language model takes token ids and is built from a
//! [`DecoderConfig`] (Hugging Face's `config.json` keys, which a job gives as its
//! hyper-parameters) or loaded from a checkpoint named by digest. So they are two families,
//! each with its own registry, and [`crate::models::family_of`] says which a name belongs to.
//!
//! What a training loop needs of an entry: batches of right-padded token ids `[batch, time]`
//! with their attention mask, [`super::llama::Decoder::loss`] (cross-entropy over non-padding
//! targets, plus the MoE load-balancing term), the VarStore's trainable variables for the
//! optimiser (or only the adapters', with the base frozen, for LoRA), and
//! [`super::hf::save_checkpoint`] / [`super::hf::load_weights`] for the round's weights.

use tch::Device;

use super::config::{Architecture, DecoderConfig};
use super::error::LmError;
use super::llama::LanguageModel;

/// A registry entry: a name, what it is, and which `config.json` architectures it builds.
pub struct LanguageModelEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub architectures: &'static [Architecture],
}

/// Every language model a job may name.
pub const LANGUAGE_MODELS: &[LanguageModelEntry] = &[LanguageModelEntry {
    name: "llama",
    description: "Llama-architecture decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU), \
                  with an optional Qwen2-MoE mixture-of-experts MLP; Hugging Face checkpoints",
    architectures: &[Architecture::Llama, Architecture::Qwen2Moe],
}];

/// The registry's language-model names.
pub fn known_language_models() -> Vec<&'static str> {
    LANGUAGE_MODELS.iter().map(|m| m.name).collect()
}

/// Builds the registry's `name` model from `config`, its parameters drawn from `seed`.
pub fn build(
    name: &str,
    config: &DecoderConfig,
    device: Device,
    seed: u64,
) -> Result<LanguageModel, LmError> {
    let entry = LANGUAGE_MODELS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            LmError::InvalidConfig(format!(
                "unknown language model {name:?}; known: {}",
                known_language_models().join(", ")
            ))
        })?;
    if !entry.architectures.contains(&config.architecture) {
        return Err(LmError::InvalidConfig(format!(
            "model {name:?} does not build model_type {:?}",
            config.architecture.model_type()
        )));
    }
    LanguageModel::new(config, device, seed)
}

#[cfg(test)]
mod registry_names {
    /// The coordinator refuses jobs by `tutela_protocol::model_registry::LANGUAGE_MODEL_NAMES`:
    /// it must be this registry's list.
    #[test]
    fn the_protocol_lists_exactly_these_language_models() {
        assert_eq!(
            super::known_language_models(),
            tutela_protocol::model_registry::LANGUAGE_MODEL_NAMES
        );
    }
}
