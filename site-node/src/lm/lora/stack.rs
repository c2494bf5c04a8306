//! [`LoraStack`]: a small causal sequence model made of [`LoraLinear`] layers, for the tests and
//! the benchmark of DP-SGD on adapters before the `llama` model is merged.
//!
//! A frozen token embedding, then `layers` residual blocks `x ← x + tanh(L_k(prefix_mean(x)))`,
//! where `prefix_mean` averages each position with the real positions before it (a causal,
//! padding-masked mixing across positions, so a position's gradient depends on the ones before
//! it, as in attention), then a LoRA-adapted head to the vocabulary. Every Linear is adapted.

use tch::{Device, Kind, Tensor};
use tutela_protocol::lora::{LoraAggregation, LoraSpec};

use super::dp::{AdapterModel, SequenceBatch, sequence_token_losses};
use super::{LoraError, LoraLinear, LoraTape};
use crate::train::TrainError;

/// The shape of a [`LoraStack`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraStackConfig {
    pub vocab: i64,
    pub dim: i64,
    pub layers: usize,
    pub rank: u32,
    pub alpha: f64,
    /// Whether `A` trains too (FFA-LoRA: no).
    pub train_a: bool,
    pub kind: Kind,
    pub device: Device,
    pub seed: u64,
}

/// The model (module documentation).
#[derive(Debug)]
pub struct LoraStack {
    embedding: Tensor,
    blocks: Vec<LoraLinear>,
    head: LoraLinear,
    tape: LoraTape,
}

impl LoraStack {
    /// A stack with random frozen weights (from libtorch's generator seeded with `seed`) and fresh
    /// adapters (`B = 0`).
    pub fn new(config: &LoraStackConfig) -> Result<Self, LoraError> {
        tch::manual_seed(config.seed as i64);
        let options = (config.kind, config.device);
        let spec = LoraSpec {
            rank: config.rank,
            alpha: config.alpha,
            target_modules: vec!["proj".into(), "lm_head".into()],
            dropout: 0.0,
            aggregation: LoraAggregation::Ffa,
        };
        let tape = LoraTape::new();
        let build = |path: &str, w: &Tensor, b: Option<&Tensor>| {
            if config.train_a {
                LoraLinear::new_trainable_a(path, w, b, &spec, config.seed, &tape)
            } else {
                LoraLinear::new(path, w, b, &spec, config.seed, &tape)
            }
        };
        let scale = 1.0 / (config.dim as f64).sqrt();
        let embedding = Tensor::f_randn([config.vocab, config.dim], options)?;
        let mut blocks = Vec::with_capacity(config.layers);
        for k in 0..config.layers {
            let w = Tensor::f_randn([config.dim, config.dim], options)?.f_mul_scalar(scale)?;
            let b = Tensor::f_randn([config.dim], options)?.f_mul_scalar(0.1)?;
            blocks.push(build(&format!("model.layers.{k}.proj"), &w, Some(&b))?);
        }
        let w = Tensor::f_randn([config.vocab, config.dim], options)?.f_mul_scalar(scale)?;
        let head = build("lm_head", &w, None)?;
        Ok(LoraStack {
            embedding,
            blocks,
            head,
            tape,
        })
    }

    /// Sets every `B` to random values (scaled by `std`), so that tests see adapters that do
    /// something.
    pub fn randomize_b(&mut self, std: f64) -> Result<(), LoraError> {
        for layer in self
            .blocks
            .iter_mut()
            .chain(std::iter::once(&mut self.head))
        {
            let b = layer.b().f_randn_like()?.f_mul_scalar(std)?;
            layer.set_factors(&b, None)?;
        }
        Ok(())
    }

    /// The adapted layers, mutable (to load a round's global adapter).
    pub fn lora_layers_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.blocks
            .iter_mut()
            .chain(std::iter::once(&mut self.head))
            .collect()
    }

    /// Logits `[S, T, vocab]`; with `merged`, every layer runs with its merged weight `W + s·B·A`
    /// and no adapter (the LoRA-merged model).
    pub fn logits(
        &self,
        batch: &SequenceBatch,
        train: bool,
        merged: bool,
    ) -> Result<Tensor, LoraError> {
        let linear = |layer: &LoraLinear, x: &Tensor| -> Result<Tensor, LoraError> {
            if merged {
                Ok(x.f_linear(&layer.merged_weight()?, layer.bias())?)
            } else {
                layer.forward_t(x, train)
            }
        };
        let mask = batch.mask.f_unsqueeze(-1)?;
        let mut x = self
            .embedding
            .f_index_select(0, &batch.input_ids.f_reshape([-1])?)?;
        x = x.f_view([batch.input_ids.size()[0], batch.input_ids.size()[1], -1])?;
        let counts = mask.f_cumsum(1, mask.kind())?.f_clamp_min(1.0)?;
        for block in &self.blocks {
            let mixed = x.f_mul(&mask)?.f_cumsum(1, x.kind())?.f_div(&counts)?;
            x = x.f_add(&linear(block, &mixed)?.f_tanh()?)?;
        }
        linear(&self.head, &x)
    }
}

impl AdapterModel for LoraStack {
    fn lora_layers(&self) -> Vec<&LoraLinear> {
        self.blocks
            .iter()
            .chain(std::iter::once(&self.head))
            .collect()
    }

    fn tape(&self) -> &LoraTape {
        &self.tape
    }

    fn sequence_losses(&self, batch: &SequenceBatch, train: bool) -> Result<Tensor, TrainError> {
        let logits = self
            .logits(batch, train, false)
            .map_err(|e| TrainError::InvalidConfig {
                field: "model",
                reason: e.to_string(),
            })?;
        sequence_token_losses(&logits, &batch.targets).map_err(|source| TrainError::Torch {
            context: "token losses".into(),
            source,
        })
    }
}
