//! The Llama decoder in tch, parameter for parameter the layout of transformers'
//! `LlamaForCausalLM` (and, with [`super::moe`]'s MLP, `Qwen2MoeForCausalLM`).
//!
//! Every variable's name in the VarStore is the Hugging Face tensor name
//! (`model.layers.0.self_attn.q_proj.weight`, ...), so checkpoints load and save by name with no
//! renaming table ([`super::hf`]).
//!
//! Batches are right-padded: sequence `i` holds its tokens at positions `0..len_i`, and the
//! attention mask (`[batch, past + time]`, 1 for a token, 0 for padding) hides the padding from
//! every query. Positions are `past..past + time` for every row, as transformers computes them
//! when it is given no `position_ids`; with right padding this gives each row exactly the
//! logits it has alone.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor, nn};

use super::config::DecoderConfig;
use super::error::LmError;
use super::lora::LoraTape;
use super::moe::SparseMoe;

mod adapters;
pub use adapters::Projection;

/// Root-mean-square layer norm, computed in f32 as transformers does (`LlamaRMSNorm`), or in f64
/// for an f64 model (the tests compare gradients in f64, which an f32 detour would blur).
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vs: &nn::Path, size: i64, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: vs.ones("weight", &[size]),
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let input_kind = xs.kind();
        let compute = if input_kind == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let xs = xs.to_kind(compute);
        let variance = xs.pow_tensor_scalar(2).mean_dim(-1, true, compute);
        let normed = &xs * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(input_kind)
    }
}

/// A linear layer under `vs / name`, with transformers' names (`weight`, `bias`).
fn linear(vs: &nn::Path, name: &str, input: usize, output: usize, bias: bool) -> Projection {
    Projection::Base(nn::linear(
        vs / name,
        dim(input),
        dim(output),
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    ))
}

/// Sizes were checked against `i64::MAX` by [`DecoderConfig::validate`].
pub(crate) fn dim(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct SwiGlu {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

impl SwiGlu {
    pub fn new(vs: &nn::Path, hidden: usize, intermediate: usize, bias: bool) -> SwiGlu {
        SwiGlu {
            gate_proj: linear(vs, "gate_proj", hidden, intermediate, bias),
            up_proj: linear(vs, "up_proj", hidden, intermediate, bias),
            down_proj: linear(vs, "down_proj", intermediate, hidden, bias),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, LmError> {
        self.forward_t(xs, false)
    }

    /// The forward pass; `train` applies the adapters' dropout, if any.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, LmError> {
        let gated = self.gate_proj.forward(xs, train)?.silu() * self.up_proj.forward(xs, train)?;
        self.down_proj.forward(&gated, train)
    }
}

/// The rotary embedding's cosines and sines for a range of positions, `[time, head_dim]`.
#[derive(Debug)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// transformers' default RoPE: `inv_freq = 1 / theta^(2i/d)` in f32, frequencies repeated
    /// twice along the head (`cat(freqs, freqs)`), the layout `rotate_half` expects.
    pub fn new(
        head_dim: usize,
        theta: f64,
        start: i64,
        len: i64,
        kind: Kind,
        device: Device,
    ) -> Rotary {
        let d = dim(head_dim);
        let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / (d as f64);
        let inv_freq = Tensor::from(theta)
            .to_kind(Kind::Float)
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        let positions =
            Tensor::arange_start(start, start + len, (Kind::Int64, device)).to_kind(Kind::Float);
        let freqs = positions.unsqueeze(-1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rotary {
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
        }
    }

    /// Rotates `xs: [batch, heads, time, head_dim]`: `x cos + rotate_half(x) sin`.
    pub fn apply(&self, xs: &Tensor) -> Tensor {
        let half = xs.size().last().copied().unwrap_or(0) / 2;
        let x1 = xs.narrow(-1, 0, half);
        let x2 = xs.narrow(-1, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
        xs * &self.cos + rotated * &self.sin
    }
}

/// One layer's cached keys and values, `[batch, kv_heads, past, head_dim]`, after RoPE.
#[derive(Debug, Default)]
pub struct LayerCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

/// Keys and values of the tokens seen so far, per layer, for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: i64,
}

impl KvCache {
    pub fn new(layers: usize) -> KvCache {
        KvCache {
            layers: (0..layers).map(|_| LayerCache::default()).collect(),
            len: 0,
        }
    }

    /// Tokens already cached (the next token's position).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Grouped-query causal self-attention.
#[derive(Debug)]
pub struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    pub fn new(vs: &nn::Path, config: &DecoderConfig) -> Attention {
        let (h, d) = (config.hidden_size, config.head_dim);
        Attention {
            q_proj: linear(
                vs,
                "q_proj",
                h,
                config.num_attention_heads * d,
                config.qkv_bias,
            ),
            k_proj: linear(
                vs,
                "k_proj",
                h,
                config.num_key_value_heads * d,
                config.qkv_bias,
            ),
            v_proj: linear(
                vs,
                "v_proj",
                h,
                config.num_key_value_heads * d,
                config.qkv_bias,
            ),
            o_proj: linear(
                vs,
                "o_proj",
                config.num_attention_heads * d,
                h,
                config.o_bias,
            ),
            heads: dim(config.num_attention_heads),
            kv_heads: dim(config.num_key_value_heads),
            head_dim: dim(d),
        }
    }

    /// `xs: [batch, time, hidden]`; `mask`: `[batch, 1, time, past + time]`, true where a query
    /// may attend a key, or `None` for plain causal attention with nothing cached.
    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
        train: bool,
    ) -> Result<Tensor, LmError> {
        let (batch, time) = (xs.size()[0], xs.size()[1]);
        let split =
            |t: Tensor, heads: i64| t.view([batch, time, heads, self.head_dim]).transpose(1, 2);
        let q = rotary.apply(&split(self.q_proj.forward(xs, train)?, self.heads));
        let mut k = rotary.apply(&split(self.k_proj.forward(xs, train)?, self.kv_heads));
        let mut v = split(self.v_proj.forward(xs, train)?, self.kv_heads);
        let mut past = 0;
        if let Some(cache) = cache {
            if let (Some(pk), Some(pv)) = (&cache.keys, &cache.values) {
                past = pk.size()[2];
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            cache.keys = Some(k.shallow_clone());
            cache.values = Some(v.shallow_clone());
        }
        // Without an explicit mask: causal when the queries are the whole sequence, none when a
        // single new query follows cached keys (it may see all of them).
        let is_causal = mask.is_none() && past == 0 && time > 1;
        let attended = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            0.0,
            is_causal,
            None,
            self.kv_heads != self.heads,
        );
        let attended =
            attended
                .transpose(1, 2)
                .contiguous()
                .view([batch, time, self.heads * self.head_dim]);
        self.o_proj.forward(&attended, train)
    }
}

/// A layer's MLP: dense SwiGLU, or a mixture of experts.
#[derive(Debug)]
pub enum Mlp {
    Dense(SwiGlu),
    Sparse(SparseMoe),
}

#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct LmOutput {
    /// `[batch, time, vocab]`.
    pub logits: Tensor,
    /// Each sparse layer's router logits, `[batch * time, num_experts]` (empty when dense).
    pub router_logits: Vec<Tensor>,
}

/// The decoder: embedding, layers, final norm and head.
#[derive(Debug)]
pub struct Decoder {
    config: DecoderConfig,
    embed_tokens: nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    lm_head: Option<Projection>,
    /// The LoRA adapters' settings once [`Decoder::attach_lora`] ran.
    adapters: Option<adapters::Adapters>,
    /// The recorder every adapted projection shares (DP-SGD reads it: `lora::dp`).
    tape: LoraTape,
}

impl Decoder {
    /// Builds the decoder's variables under `vs` (the VarStore's root, so the names are
    /// transformers'). Values are libtorch's defaults: call [`seeded_init`] or load a
    /// checkpoint.
    pub fn new(vs: &nn::Path, config: &DecoderConfig) -> Result<Decoder, LmError> {
        config.validate()?;
        let model = vs / "model";
        let hidden = dim(config.hidden_size);
        let embed_tokens = nn::embedding(
            &model / "embed_tokens",
            dim(config.vocab_size),
            hidden,
            Default::default(),
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let layer = &model / "layers" / i;
                let sparse = config.moe.as_ref().filter(|_| config.is_sparse_layer(i));
                let mlp = if let Some(moe) = sparse {
                    Mlp::Sparse(SparseMoe::new(&(&layer / "mlp"), config.hidden_size, moe))
                } else {
                    Mlp::Dense(SwiGlu::new(
                        &(&layer / "mlp"),
                        config.hidden_size,
                        config.intermediate_size,
                        config.mlp_bias,
                    ))
                };
                DecoderLayer {
                    input_layernorm: RmsNorm::new(
                        &(&layer / "input_layernorm"),
                        hidden,
                        config.rms_norm_eps,
                    ),
                    self_attn: Attention::new(&(&layer / "self_attn"), config),
                    post_attention_layernorm: RmsNorm::new(
                        &(&layer / "post_attention_layernorm"),
                        hidden,
                        config.rms_norm_eps,
                    ),
                    mlp,
                }
            })
            .collect();
        let norm = RmsNorm::new(&(&model / "norm"), hidden, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| linear(vs, "lm_head", config.hidden_size, config.vocab_size, false));
        Ok(Decoder {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            adapters: None,
            tape: LoraTape::new(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// An empty cache for [`Decoder::forward`]'s incremental decoding.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Checks `input_ids: [batch, time]` (int64, every id below `vocab_size`) and the mask.
    fn check_inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        past: i64,
    ) -> Result<(), LmError> {
        let invalid = |reason: String| Err(LmError::InvalidInput(reason));
        let size = input_ids.size();
        if size.len() != 2 || size[0] == 0 || size[1] == 0 {
            return invalid(format!(
                "input ids must be [batch, time] with both positive, found {size:?}"
            ));
        }
        if input_ids.kind() != Kind::Int64 {
            return invalid(format!(
                "input ids must be int64, found {:?}",
                input_ids.kind()
            ));
        }
        let (min, max) = (
            input_ids.min().int64_value(&[]),
            input_ids.max().int64_value(&[]),
        );
        let vocab = dim(self.config.vocab_size);
        if min < 0 || max >= vocab {
            return invalid(format!(
                "token ids must lie in 0..{vocab}, found ids from {min} to {max}"
            ));
        }
        if let Some(mask) = attention_mask {
            let expected = [size[0], past + size[1]];
            if mask.size() != expected {
                return invalid(format!(
                    "the attention mask must be [batch, past + time] = {expected:?}, found {:?}",
                    mask.size()
                ));
            }
        }
        Ok(())
    }

    /// The forward pass. `attention_mask` (`[batch, past + time]`, nonzero for real tokens)
    /// is needed only for padded batches; `cache` carries keys and values from earlier calls
    /// and is extended with this call's.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<LmOutput, LmError> {
        self.forward_t(input_ids, attention_mask, cache, false)
    }

    /// [`Decoder::forward`]; `train` applies the adapters' dropout, if any (nothing else in
    /// the decoder behaves differently in training).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<LmOutput, LmError> {
        let past = cache.as_ref().map_or(0, |c| c.len);
        self.check_inputs(input_ids, attention_mask, past)?;
        let time = input_ids.size()[1];
        let mut xs = input_ids.apply(&self.embed_tokens);
        let device = xs.device();
        let rotary = Rotary::new(
            self.config.head_dim,
            self.config.rope_theta,
            past,
            time,
            xs.kind(),
            device,
        );
        let mask = attention_mask
            .map(|m| key_padding_mask(m, past, time))
            .or_else(|| (past > 0 && time > 1).then(|| causal_mask(past, time, device)));
        let mut router_logits = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let attended = layer.self_attn.forward(
                &layer.input_layernorm.forward(&xs),
                &rotary,
                mask.as_ref(),
                layer_cache,
                train,
            )?;
            xs = xs + attended;
            let normed = layer.post_attention_layernorm.forward(&xs);
            let mlp_out = match &layer.mlp {
                Mlp::Dense(mlp) => mlp.forward_t(&normed, train)?,
                Mlp::Sparse(moe) => {
                    let (out, logits) = moe.forward(&normed)?;
                    router_logits.push(logits);
                    out
                }
            };
            xs = xs + mlp_out;
        }
        if let Some(cache) = cache {
            cache.len = past + time;
        }
        let xs = self.norm.forward(&xs);
        let logits = match &self.lm_head {
            Some(head) => head.forward(&xs, train)?,
            None => xs.linear::<Tensor>(&self.embed_tokens.ws, None),
        };
        Ok(LmOutput {
            logits,
            router_logits,
        })
    }

    /// The training loss: the causal-LM cross-entropy over the non-padding targets, plus
    /// `router_aux_loss_coef` times the load-balancing loss for a mixture of experts.
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor, LmError> {
        let output = self.forward(input_ids, attention_mask, None)?;
        let mut loss = causal_lm_loss(&output.logits, input_ids, attention_mask)?;
        if let Some(moe) = &self.config.moe
            && !output.router_logits.is_empty()
        {
            let aux = super::moe::load_balancing_loss(
                &output.router_logits,
                moe.num_experts,
                moe.num_experts_per_tok,
                attention_mask,
            );
            loss = loss + aux * moe.router_aux_loss_coef;
        }
        Ok(loss)
    }
}

/// A decoder with its parameters.
#[derive(Debug)]
pub struct LanguageModel {
    pub vs: nn::VarStore,
    pub decoder: Decoder,
}

impl LanguageModel {
    /// A fresh model: parameters drawn by [`seeded_init`] from `seed`.
    pub fn new(config: &DecoderConfig, device: Device, seed: u64) -> Result<Self, LmError> {
        let vs = nn::VarStore::new(device);
        let decoder = Decoder::new(&vs.root(), config)?;
        seeded_init(&vs, config, seed)?;
        Ok(LanguageModel { vs, decoder })
    }

    pub fn config(&self) -> &DecoderConfig {
        self.decoder.config()
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> i64 {
        self.vs
            .variables()
            .values()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum()
    }
}

/// `[batch, 1, time, past + time]`: query `i` (position `past + i`) may attend key `j` when
/// `j <= past + i` and key `j` is not padding.
fn key_padding_mask(attention_mask: &Tensor, past: i64, time: i64) -> Tensor {
    let causal = causal_mask(past, time, attention_mask.device());
    let keys = attention_mask.ne(0).unsqueeze(1).unsqueeze(1);
    causal.logical_and(&keys)
}

/// `[1, 1, time, past + time]`, true on and below the shifted diagonal.
fn causal_mask(past: i64, time: i64, device: Device) -> Tensor {
    let queries = Tensor::arange_start(past, past + time, (Kind::Int64, device)).unsqueeze(1);
    let keys = Tensor::arange(past + time, (Kind::Int64, device)).unsqueeze(0);
    keys.le_tensor(&queries).unsqueeze(0).unsqueeze(0)
}

/// Mean next-token cross-entropy of `logits: [batch, time, vocab]` against `input_ids` shifted
/// by one, counting only targets whose mask is nonzero (transformers' `ForCausalLMLoss` with
/// padding labelled -100).
pub fn causal_lm_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
) -> Result<Tensor, LmError> {
    let size = logits.size();
    let (time, vocab) = (size[1], size[2]);
    if time < 2 {
        return Err(LmError::InvalidInput(
            "a causal-LM loss needs sequences of at least 2 tokens".into(),
        ));
    }
    let predictions = logits.narrow(1, 0, time - 1).reshape([-1, vocab]);
    let mut targets = input_ids.narrow(1, 1, time - 1);
    if let Some(mask) = attention_mask {
        let padded = mask.narrow(1, mask.size()[1] - time + 1, time - 1).eq(0);
        targets = targets.masked_fill(&padded, IGNORE_INDEX);
    }
    let counted = targets.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
    if counted == 0 {
        return Err(LmError::InvalidInput(
            "the batch has no target token (every sequence is shorter than 2 tokens)".into(),
        ));
    }
    predictions
        .to_kind(Kind::Float)
        .f_cross_entropy_loss::<Tensor>(
            &targets.reshape([-1]),
            None,
            tch::Reduction::Mean,
            IGNORE_INDEX,
            0.0,
        )
        .map_err(LmError::torch("cross-entropy"))
}

const IGNORE_INDEX: i64 = -100;

/// Draws every variable of a decoder from a generator seeded with `seed`, in name order:
/// weights normal with standard deviation `initializer_range` (transformers' `_init_weights`),
/// biases zero, norms one. Drawn on the CPU in f32, so the same seed gives the same weights on
/// every machine and device.
pub fn seeded_init(vs: &nn::VarStore, config: &DecoderConfig, seed: u64) -> Result<(), LmError> {
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    let std = config.initializer_range;
    for name in names {
        let tensor = &variables[name];
        let shape = tensor.size();
        let fresh = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu))
        } else {
            let numel = shape.iter().product::<i64>().max(0) as usize;
            let values: Vec<f32> = (0..numel)
                .map(|_| (std * standard_normal(&mut rng)) as f32)
                .collect();
            Tensor::from_slice(&values).view(shape.as_slice())
        };
        let fresh = fresh
            .f_to_kind(tensor.kind())
            .and_then(|t| t.f_to_device(tensor.device()))
            .map_err(LmError::torch(format!("initialising {name}")))?;
        let mut target = tensor.shallow_clone();
        tch::no_grad(|| target.f_copy_(&fresh))
            .map_err(LmError::torch(format!("initialising {name}")))?;
    }
    Ok(())
}

/// A standard normal draw by the Box–Muller transform (initial weights need no more than this;
/// DP noise comes from `tutela_privacy`'s samplers, never from here).
fn standard_normal(rng: &mut StdRng) -> f64 {
    // 1 - u lies in (0, 1], so its logarithm is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
