//! A decoder's hyper-parameters, read from and written to Hugging Face's `config.json`.
//!
//! Two `model_type`s are understood: `llama` (`LlamaForCausalLM`) and `qwen2_moe`
//! (`Qwen2MoeForCausalLM`: the same decoder with bias on q/k/v and a mixture-of-experts MLP).
//! A job's hyper-parameters use the same keys, so one parser serves both: a job's TOML table is
//! converted to JSON and read by [`DecoderConfig::from_json`].
//!
//! Keys this module does not interpret (`bos_token_id`, `eos_token_id`, `pad_token_id`, ...) are
//! kept in [`DecoderConfig::extra`] and written back, so a checkpoint a site starts from keeps
//! them when it is published. Keys that would change the computation in ways this port does not
//! implement (`rope_type` other than `default`, an activation other than `silu`, sliding-window
//! attention) are refused rather than ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::LmError;

/// Which transformers class the checkpoint is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`: dense SwiGLU MLP in every layer.
    Llama,
    /// `Qwen2MoeForCausalLM`: q/k/v bias, routed experts plus a gated shared expert.
    Qwen2Moe,
}

impl Architecture {
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2Moe => "qwen2_moe",
        }
    }

    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
        }
    }
}

/// The mixture-of-experts MLP's hyper-parameters (`qwen2_moe`'s keys).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    /// Width of the shared expert; 0 means none.
    pub shared_expert_intermediate_size: usize,
    /// Whether the top-k routing weights are renormalised to sum to one.
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is sparse (layer `i` when `(i + 1) % step == 0`).
    pub decoder_sparse_step: usize,
    /// Layers that keep a dense MLP whatever the step says.
    pub mlp_only_layers: Vec<usize>,
    /// Weight of the load-balancing loss in the training loss.
    pub router_aux_loss_coef: f64,
}

/// A decoder's hyper-parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense SwiGLU MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` is grouped-query attention.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Llama's `attention_bias`, Qwen2-MoE's `qkv_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` only).
    pub o_bias: bool,
    /// Bias on the MLP's projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Standard deviation of freshly initialised weights.
    pub initializer_range: f64,
    pub moe: Option<MoeConfig>,
    /// Keys kept as they were read and written back unchanged.
    pub extra: BTreeMap<String, Value>,
}

/// `config.json` as transformers writes it; only the keys we interpret.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    /// transformers 4 wrote it at the top level; 5 writes it inside `rope_parameters`.
    rope_theta: Option<f64>,
    /// transformers 4's name for what 5 calls `rope_parameters` (when scaling was used).
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    initializer_range: Option<f64>,
    use_sliding_window: Option<bool>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    router_aux_loss_coef: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// Keys [`DecoderConfig::to_json`] writes itself (or drops): everything else read is kept.
const INTERPRETED_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "qkv_bias",
    "mlp_bias",
    "hidden_act",
    "initializer_range",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
    // Written by transformers for its own bookkeeping; ours are set on save.
    "dtype",
    "torch_dtype",
    "transformers_version",
];

impl DecoderConfig {
    /// A Llama configuration with transformers' defaults for everything not given.
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> DecoderConfig {
        DecoderConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            initializer_range: 0.02,
            moe: None,
            extra: BTreeMap::new(),
        }
    }

    /// Reads and validates `config.json`.
    pub fn load(path: impl AsRef<Path>) -> Result<DecoderConfig, LmError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(LmError::io(path))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| LmError::Config {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        DecoderConfig::from_json(&value).map_err(|e| match e {
            LmError::InvalidConfig(reason) => LmError::Config {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Reads a configuration from a job spec's TOML table with `config.json`'s keys
    /// (`model_type = "llama"`, `hidden_size = 256`, `rope_parameters = { rope_theta = 1e4 }`).
    pub fn from_toml(table: &toml::Value) -> Result<DecoderConfig, LmError> {
        let json = serde_json::to_value(table)
            .map_err(|e| LmError::InvalidConfig(format!("the table is not JSON-shaped: {e}")))?;
        DecoderConfig::from_json(&json)
    }

    /// Reads a configuration from a JSON object with `config.json`'s keys.
    pub fn from_json(value: &Value) -> Result<DecoderConfig, LmError> {
        let invalid = |reason: String| LmError::InvalidConfig(reason);
        let object = value
            .as_object()
            .ok_or_else(|| invalid("the configuration is not a JSON object".into()))?;
        let raw: RawConfig = serde_json::from_value(value.clone())
            .map_err(|e| invalid(format!("a key has the wrong type: {e}")))?;
        let architecture = match raw.model_type.as_deref() {
            Some("llama") => Architecture::Llama,
            Some("qwen2_moe") => Architecture::Qwen2Moe,
            Some(other) => {
                return Err(invalid(format!(
                    "model_type {other:?} is not supported (supported: \"llama\", \"qwen2_moe\")"
                )));
            }
            None => return Err(invalid("model_type is missing".into())),
        };
        let required =
            |name: &str, v: Option<usize>| v.ok_or_else(|| invalid(format!("{name} is missing")));
        let vocab_size = required("vocab_size", raw.vocab_size)?;
        let hidden_size = required("hidden_size", raw.hidden_size)?;
        let intermediate_size = required("intermediate_size", raw.intermediate_size)?;
        let num_hidden_layers = required("num_hidden_layers", raw.num_hidden_layers)?;
        let num_attention_heads = required("num_attention_heads", raw.num_attention_heads)?;
        if num_attention_heads == 0 {
            return Err(invalid("num_attention_heads must be positive".into()));
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_attention_heads);

        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(invalid(format!(
                "hidden_act {act:?} is not supported (only \"silu\")"
            )));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(invalid(
                "use_sliding_window = true is not supported (full attention only)".into(),
            ));
        }
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(invalid(format!(
                "rope_scaling {scaling} is not supported (only the default RoPE)"
            )));
        }
        let rope = raw.rope_parameters.as_ref();
        if let Some(kind) = rope.and_then(|r| r.rope_type.as_deref())
            && kind != "default"
        {
            return Err(invalid(format!(
                "rope_parameters.rope_type {kind:?} is not supported (only \"default\")"
            )));
        }
        let rope_theta = rope
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);

        let (qkv_bias, o_bias) = match architecture {
            Architecture::Llama => {
                let bias = raw.attention_bias.unwrap_or(false);
                (bias, bias)
            }
            Architecture::Qwen2Moe => (raw.qkv_bias.unwrap_or(true), false),
        };
        let moe = match architecture {
            Architecture::Llama => None,
            Architecture::Qwen2Moe => Some(MoeConfig {
                num_experts: raw.num_experts.unwrap_or(60),
                num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(4),
                moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(1408),
                shared_expert_intermediate_size: raw
                    .shared_expert_intermediate_size
                    .unwrap_or(5632),
                norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
                decoder_sparse_step: raw.decoder_sparse_step.unwrap_or(1),
                mlp_only_layers: raw.mlp_only_layers.clone().unwrap_or_default(),
                router_aux_loss_coef: raw.router_aux_loss_coef.unwrap_or(0.001),
            }),
        };
        let extra = object
            .iter()
            .filter(|(k, _)| !INTERPRETED_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let config = DecoderConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            initializer_range: raw.initializer_range.unwrap_or(0.02),
            moe,
            extra,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks what the model needs of its sizes.
    pub fn validate(&self) -> Result<(), LmError> {
        let invalid = |reason: String| Err(LmError::InvalidConfig(reason));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return invalid(format!("{name} must be positive"));
            }
            if i64::try_from(value).is_err() {
                return invalid(format!("{name} = {value} is too large"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return invalid(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return invalid(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return invalid(format!(
                "rms_norm_eps ({}) must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return invalid(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        if !(self.initializer_range >= 0.0 && self.initializer_range.is_finite()) {
            return invalid(format!(
                "initializer_range ({}) must be non-negative",
                self.initializer_range
            ));
        }
        if let Some(moe) = &self.moe {
            if moe.num_experts == 0 || moe.moe_intermediate_size == 0 {
                return invalid(
                    "num_experts and moe_intermediate_size must be positive".to_string(),
                );
            }
            if moe.num_experts_per_tok == 0 || moe.num_experts_per_tok > moe.num_experts {
                return invalid(format!(
                    "num_experts_per_tok ({}) must lie in 1..={} (num_experts)",
                    moe.num_experts_per_tok, moe.num_experts
                ));
            }
            if moe.decoder_sparse_step == 0 {
                return invalid("decoder_sparse_step must be positive".to_string());
            }
            if !moe.router_aux_loss_coef.is_finite() {
                return invalid("router_aux_loss_coef must be finite".to_string());
            }
        }
        Ok(())
    }

    /// Whether layer `index` has the mixture-of-experts MLP (Qwen2-MoE's rule).
    pub fn is_sparse_layer(&self, index: usize) -> bool {
        self.moe.as_ref().is_some_and(|moe| {
            !moe.mlp_only_layers.contains(&index) && (index + 1) % moe.decoder_sparse_step == 0
        })
    }

    /// The configuration as `config.json`'s object, for weights stored as `dtype`
    /// (`"float32"`, `"bfloat16"`, ...).
    pub fn to_json(&self, dtype: &str) -> Value {
        let mut out: Map<String, Value> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut set = |k: &str, v: Value| {
            out.insert(k.to_string(), v);
        };
        set(
            "architectures",
            Value::from(vec![self.architecture.class_name()]),
        );
        set("model_type", self.architecture.model_type().into());
        set("vocab_size", self.vocab_size.into());
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("head_dim", self.head_dim.into());
        set("hidden_act", "silu".into());
        set("rms_norm_eps", self.rms_norm_eps.into());
        set(
            "rope_parameters",
            serde_json::json!({ "rope_theta": self.rope_theta, "rope_type": "default" }),
        );
        set(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        set("initializer_range", self.initializer_range.into());
        set("dtype", dtype.into());
        match self.architecture {
            Architecture::Llama => {
                set("attention_bias", self.qkv_bias.into());
                set("mlp_bias", self.mlp_bias.into());
            }
            Architecture::Qwen2Moe => {
                set("qkv_bias", self.qkv_bias.into());
            }
        }
        if let Some(moe) = &self.moe {
            set("num_experts", moe.num_experts.into());
            set("num_experts_per_tok", moe.num_experts_per_tok.into());
            set("moe_intermediate_size", moe.moe_intermediate_size.into());
            set(
                "shared_expert_intermediate_size",
                moe.shared_expert_intermediate_size.into(),
            );
            set("norm_topk_prob", moe.norm_topk_prob.into());
            set("decoder_sparse_step", moe.decoder_sparse_step.into());
            set("mlp_only_layers", moe.mlp_only_layers.clone().into());
            set("router_aux_loss_coef", moe.router_aux_loss_coef.into());
        }
        Value::Object(out)
    }
}
