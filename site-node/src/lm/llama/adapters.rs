//! LoRA inside the decoder: the job's `[lora]` target modules become [`LoraLinear`] layers in
//! place of the frozen projections, and the decoder is an [`AdapterModel`] for DP-SGD on them.
//!
//! Adaptable modules are the Linear projections a PEFT `target_modules` list can name on a Llama
//! (`q_proj`, `k_proj`, `v_proj`, `o_proj` in attention; `gate_proj`, `up_proj`, `down_proj` in a
//! dense MLP; `lm_head` when the head is untied), matched by their last name as PEFT matches a
//! list. The projections of a mixture-of-experts layer (routed experts, shared expert) are not
//! adapted: an expert sees only the tokens routed to it, so its inputs are not `[sequence,
//! position]` tensors and the per-sequence gradients of [`crate::lm::lora::dp`] do not apply. A
//! target that would match one is refused naming the module, as is a target that matches
//! nothing (PEFT refuses that too): a job must never train other weights than the officers
//! approved.
//!
//! The base is frozen ([`LanguageModel::attach_lora`] freezes every variable of the VarStore;
//! the adapted layers hold detached views of their weights), so only the adapters' `B` (and `A`
//! where it trains) receive gradients.

use std::path::Path;

use tch::{Kind, Tensor, nn};
use tutela_protocol::lora::LoraSpec;

use super::{Decoder, LanguageModel, Mlp};
use crate::lm::error::LmError;
use crate::lm::lora::dp::{AdapterModel, SequenceBatch, sequence_token_losses};
use crate::lm::lora::{LoraLinear, LoraTape, load_peft_adapter, save_peft_adapter};
use crate::train::TrainError;

/// A Linear projection of the decoder: the base layer, or the base layer with a LoRA adapter.
#[derive(Debug)]
pub enum Projection {
    Base(nn::Linear),
    Adapted(LoraLinear),
}

impl Projection {
    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor, LmError> {
        match self {
            Projection::Base(linear) => xs
                .f_linear(&linear.ws, linear.bs.as_ref())
                .map_err(LmError::torch("linear projection")),
            Projection::Adapted(layer) => Ok(layer.forward_t(xs, train)?),
        }
    }

    /// Replaces the base layer by the same layer with an adapter (`A` from `seed` and `path`,
    /// `B = 0`); `A` trains too with `train_a`.
    fn adapt(
        &mut self,
        path: &str,
        spec: &LoraSpec,
        seed: u64,
        tape: &LoraTape,
        train_a: bool,
    ) -> Result<(), LmError> {
        if let Projection::Base(linear) = self {
            let layer = if train_a {
                LoraLinear::new_trainable_a(path, &linear.ws, linear.bs.as_ref(), spec, seed, tape)?
            } else {
                LoraLinear::new(path, &linear.ws, linear.bs.as_ref(), spec, seed, tape)?
            };
            *self = Projection::Adapted(layer);
        }
        Ok(())
    }

    fn adapted(&self) -> Option<&LoraLinear> {
        match self {
            Projection::Adapted(layer) => Some(layer),
            Projection::Base(_) => None,
        }
    }

    fn adapted_mut(&mut self) -> Option<&mut LoraLinear> {
        match self {
            Projection::Adapted(layer) => Some(layer),
            Projection::Base(_) => None,
        }
    }
}

/// What [`Decoder::attach_lora`] recorded.
#[derive(Debug, Clone)]
pub(super) struct Adapters {
    spec: LoraSpec,
}

/// The last names a LoRA target may match.
pub const ADAPTABLE_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

impl Decoder {
    /// Every adaptable projection with its module path, in the adapters' fixed order: per layer
    /// q, k, v, o, then the dense MLP's gate, up, down; then the untied head.
    fn projections_mut(&mut self) -> Vec<(String, &mut Projection)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let attn = &mut layer.self_attn;
            let prefix = format!("model.layers.{i}.self_attn");
            out.push((format!("{prefix}.q_proj"), &mut attn.q_proj));
            out.push((format!("{prefix}.k_proj"), &mut attn.k_proj));
            out.push((format!("{prefix}.v_proj"), &mut attn.v_proj));
            out.push((format!("{prefix}.o_proj"), &mut attn.o_proj));
            if let Mlp::Dense(mlp) = &mut layer.mlp {
                let prefix = format!("model.layers.{i}.mlp");
                out.push((format!("{prefix}.gate_proj"), &mut mlp.gate_proj));
                out.push((format!("{prefix}.up_proj"), &mut mlp.up_proj));
                out.push((format!("{prefix}.down_proj"), &mut mlp.down_proj));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    fn projections(&self) -> Vec<&Projection> {
        let mut out = Vec::new();
        for layer in &self.layers {
            let attn = &layer.self_attn;
            out.extend([&attn.q_proj, &attn.k_proj, &attn.v_proj, &attn.o_proj]);
            if let Mlp::Dense(mlp) = &layer.mlp {
                out.extend([&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj]);
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(head);
        }
        out
    }

    /// Checks `spec`'s targets against this model: each must match at least one adaptable
    /// projection, and none may match a projection of a mixture-of-experts layer. Errors name
    /// the key (`lora.target_modules[1]`) and, for an expert, the module.
    pub fn check_lora_targets(&self, spec: &LoraSpec) -> Result<(), LmError> {
        let key = |i: usize| format!("lora.target_modules[{i}]");
        for (i, target) in spec.target_modules.iter().enumerate() {
            if let Some(sparse) = (0..self.layers.len()).find(|&l| {
                matches!(self.layers[l].mlp, Mlp::Sparse(_))
                    && ["gate_proj", "up_proj", "down_proj"].contains(&target.as_str())
            }) {
                return Err(LmError::InvalidConfig(format!(
                    "{} = {target:?} matches model.layers.{sparse}.mlp.experts.0.{target}, a \
                     mixture-of-experts projection: LoRA on experts is not supported (an expert \
                     sees only the tokens routed to it); target the attention projections",
                    key(i)
                )));
            }
            let matches = match target.as_str() {
                "lm_head" => self.lm_head.is_some(),
                "gate_proj" | "up_proj" | "down_proj" => {
                    self.layers.iter().any(|l| matches!(l.mlp, Mlp::Dense(_)))
                }
                "q_proj" | "k_proj" | "v_proj" | "o_proj" => !self.layers.is_empty(),
                _ => false,
            };
            if !matches {
                return Err(LmError::InvalidConfig(format!(
                    "{} = {target:?} names no Linear module of this model (adaptable: {}; \
                     lm_head only when the head is untied)",
                    key(i),
                    ADAPTABLE_MODULES.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Puts a LoRA adapter (FFA-LoRA: `A` from the job's `seed` and the module path, frozen;
    /// `B = 0`) on every projection `spec` targets. Refused once adapters are attached, and for
    /// targets [`Decoder::check_lora_targets`] refuses; nothing changes on a refusal.
    pub fn attach_lora(&mut self, spec: &LoraSpec, seed: u64) -> Result<(), LmError> {
        self.attach_lora_with(spec, seed, false)
    }

    /// [`Decoder::attach_lora`]; with `train_a`, `A` trains too (for other aggregation rules and
    /// the tests of both factors' per-example gradients).
    pub fn attach_lora_with(
        &mut self,
        spec: &LoraSpec,
        seed: u64,
        train_a: bool,
    ) -> Result<(), LmError> {
        if self.adapters.is_some() {
            return Err(LmError::InvalidConfig(
                "LoRA adapters are attached already".into(),
            ));
        }
        self.check_lora_targets(spec)?;
        let tape = self.tape.clone();
        for (path, projection) in self.projections_mut() {
            if spec.targets(&path) {
                projection.adapt(&path, spec, seed, &tape, train_a)?;
            }
        }
        self.adapters = Some(Adapters { spec: spec.clone() });
        Ok(())
    }

    /// The adapters' settings, when attached.
    pub fn lora_spec(&self) -> Option<&LoraSpec> {
        self.adapters.as_ref().map(|a| &a.spec)
    }

    /// The adapted layers, mutable (to load a round's global adapter), in
    /// [`AdapterModel::lora_layers`] order.
    pub fn lora_layers_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.projections_mut()
            .into_iter()
            .filter_map(|(_, p)| p.adapted_mut())
            .collect()
    }

    fn spec_or_error(&self) -> Result<&LoraSpec, LmError> {
        self.lora_spec()
            .ok_or_else(|| LmError::InvalidConfig("the model has no LoRA adapters".into()))
    }

    /// Writes the adapters in PEFT's layout (`adapter_config.json`,
    /// `adapter_model.safetensors`) to `dir`.
    pub fn save_adapter(&self, dir: &Path) -> Result<(), LmError> {
        let spec = self.spec_or_error()?;
        save_peft_adapter(dir, &self.lora_layers(), spec)?;
        Ok(())
    }

    /// Loads every adapter's `A` and `B` from a PEFT adapter directory (or its
    /// `adapter_model.safetensors`); every adapted module must be in it.
    pub fn load_adapter(&mut self, path: &Path) -> Result<(), LmError> {
        self.spec_or_error()?;
        let file = if path.is_dir() {
            path.join("adapter_model.safetensors")
        } else {
            path.to_path_buf()
        };
        load_peft_adapter(&file, &mut self.lora_layers_mut())?;
        Ok(())
    }
}

impl AdapterModel for Decoder {
    fn lora_layers(&self) -> Vec<&LoraLinear> {
        self.projections()
            .into_iter()
            .filter_map(Projection::adapted)
            .collect()
    }

    fn tape(&self) -> &LoraTape {
        &self.tape
    }

    /// Each sequence's summed next-token loss. A mixture of experts' load-balancing loss is
    /// left out: it mixes the batch's sequences (so per-sequence gradients would not be
    /// separable) and regularises the router, which LoRA keeps frozen.
    fn sequence_losses(&self, batch: &SequenceBatch, train: bool) -> Result<Tensor, TrainError> {
        let output = self
            .forward_t(&batch.input_ids, Some(&batch.mask), None, train)
            .map_err(|e| TrainError::InvalidConfig {
                field: "model",
                reason: e.to_string(),
            })?;
        sequence_token_losses(&output.logits, &batch.targets).map_err(|source| TrainError::Torch {
            context: "token losses".into(),
            source,
        })
    }
}

impl LanguageModel {
    /// Freezes the base (every variable of the VarStore) and attaches the job's adapters
    /// ([`Decoder::attach_lora`]).
    pub fn attach_lora(&mut self, spec: &LoraSpec, seed: u64) -> Result<(), LmError> {
        self.attach_lora_with(spec, seed, false)
    }

    /// [`LanguageModel::attach_lora`], `A` trained too with `train_a`.
    pub fn attach_lora_with(
        &mut self,
        spec: &LoraSpec,
        seed: u64,
        train_a: bool,
    ) -> Result<(), LmError> {
        self.decoder.check_lora_targets(spec)?;
        self.vs.freeze();
        self.decoder.attach_lora_with(spec, seed, train_a)
    }

    /// The adapters' tensors an optimizer steps (`B`, and `A` where it trains).
    pub fn adapter_parameters(&self) -> Vec<Tensor> {
        AdapterModel::adapter_parameters(&self.decoder)
    }

    /// A copy of the model with every adapter merged into its weight (`W + s·B·A`) and no
    /// adapters: the checkpoint [`crate::lm::hf::save_checkpoint`] writes for the merged model.
    pub fn merged(&self) -> Result<LanguageModel, LmError> {
        let variables = self.vs.variables();
        let first = variables.values().next();
        let kind = first.map_or(Kind::Float, Tensor::kind);
        let mut vs = nn::VarStore::new(self.vs.device());
        let decoder = Decoder::new(&vs.root(), self.config())?;
        vs.set_kind(kind);
        let merged: Vec<(String, Tensor)> = self
            .decoder
            .lora_layers()
            .into_iter()
            .map(|l| Ok((format!("{}.weight", l.path()), l.merged_weight()?)))
            .collect::<Result<_, LmError>>()?;
        let targets = vs.variables();
        tch::no_grad(|| -> Result<(), LmError> {
            for (name, source) in &variables {
                let source = merged
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(source, |(_, w)| w);
                let target = targets.get(name).ok_or_else(|| {
                    LmError::InvalidConfig(format!("{name} is not a variable of the model"))
                })?;
                target
                    .shallow_clone()
                    .f_copy_(source)
                    .map_err(LmError::torch(format!("merging {name}")))?;
            }
            Ok(())
        })?;
        Ok(LanguageModel { vs, decoder })
    }
}
