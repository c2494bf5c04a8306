//! LoRA adapters as a job states them and as they travel: the job spec's `[lora]` section, the
//! PEFT tensor names and `adapter_config.json`, and the shared initialisation of `A`.
//!
//! It lives in `protocol` because the coordinator (which aggregates adapters and does not link
//! libtorch), the site node (which trains them) and the CLI (`tutela model merge`) all read it.
//!
//! # Aggregation rule: FFA-LoRA
//!
//! A LoRA layer adds `(alpha / r) · B·A` to a frozen weight. Averaging the sites' `A` and `B`
//! separately is not averaging their products (`mean(B)·mean(A) ≠ mean(B·A)`), so FedAvg on both
//! factors aggregates a model no site trained, and DP noise on both factors multiplies. The rule
//! here is FFA-LoRA (Sun et al., ICLR 2024): `A` is frozen at a random initialisation that every
//! site derives bit for bit from the job's seed and the module's name ([`init_lora_a`]), and only
//! `B` is trained. The update is then linear in `B` (`ΔW = (alpha/r)·B·A` with `A` shared), so the
//! weighted average of the sites' `B` is *exactly* the average of their weight updates, and the
//! DP-SGD noise covers half of the adapter parameters. `B` starts at zero: the adapted model is
//! the base model until the first step.

use serde::{Deserialize, Serialize};

use crate::job::SpecError;

/// `[lora]` in a job spec: train low-rank adapters on a frozen base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// r, the adapters' rank, in 1..=[`MAX_RANK`].
    pub rank: u32,
    /// The adapters' scaling is `alpha / rank`.
    pub alpha: f64,
    /// The base model's Linear modules to adapt, by their last name (`q_proj`, `v_proj`, ...), as
    /// PEFT's `target_modules`.
    pub target_modules: Vec<String>,
    /// Dropout on the adapters' input while training, in [0, 1); must be 0 under DP-SGD.
    #[serde(default)]
    pub dropout: f64,
    /// How the coordinator aggregates the adapters. `ffa` (the only rule, and the default): `A`
    /// frozen at a seeded shared initialisation, `B` trained and averaged (module documentation).
    #[serde(default)]
    pub aggregation: LoraAggregation,
}

/// The largest rank a job may ask for: beyond it an adapter is no longer small.
pub const MAX_RANK: u32 = 1024;

/// How `A` and `B` are aggregated (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraAggregation {
    /// FFA-LoRA: `A` frozen and shared, only `B` trained and averaged.
    #[default]
    Ffa,
}

impl LoraSpec {
    /// `alpha / rank`, the factor of `B·A`.
    pub fn scaling(&self) -> f64 {
        self.alpha / f64::from(self.rank.max(1))
    }

    /// Checks ranges; `local_dp` says whether the job runs DP-SGD at the sites. Errors name the
    /// key (`lora.rank`, ...).
    pub fn validate(&self, local_dp: bool) -> Result<(), SpecError> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(SpecError::invalid(
                "lora.rank",
                format!("must be in 1..={MAX_RANK}, got {}", self.rank),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(SpecError::invalid(
                "lora.alpha",
                format!("must be a finite number > 0, got {}", self.alpha),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(SpecError::invalid(
                "lora.target_modules",
                "must name at least one module (e.g. [\"q_proj\", \"v_proj\"])",
            ));
        }
        for (i, name) in self.target_modules.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(SpecError::invalid(
                    format!("lora.target_modules[{i}]"),
                    format!(
                        "must be a module name (1 to 64 letters, digits or '_', not starting \
                         with a digit), got {name:?}"
                    ),
                ));
            }
            if self.target_modules[..i].contains(name) {
                return Err(SpecError::invalid(
                    format!("lora.target_modules[{i}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(SpecError::invalid(
                "lora.dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if local_dp && self.dropout != 0.0 {
            // The per-example clipping of the adapters reads each layer's `A·x` from the forward
            // pass without a dropout mask; a setting that is not honoured must not be accepted.
            return Err(SpecError::invalid(
                "lora.dropout",
                "must be 0 with privacy.mode = \"local\" (DP-SGD on the adapters)",
            ));
        }
        Ok(())
    }

    /// Whether the Linear module at `path` (`model.layers.0.self_attn.q_proj`) is adapted: its
    /// last name is one of `target_modules`, as PEFT matches a list.
    pub fn targets(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        self.target_modules.iter().any(|m| m == last)
    }

    /// PEFT's `adapter_config.json` for these adapters.
    pub fn peft_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "base_model_name_or_path": null,
        })
    }
}

/// PEFT's name of the `A` factor of the adapter on module `path`.
pub fn lora_a_name(path: &str) -> String {
    format!("{PEFT_PREFIX}{path}.lora_A.weight")
}

/// PEFT's name of the `B` factor of the adapter on module `path`.
pub fn lora_b_name(path: &str) -> String {
    format!("{PEFT_PREFIX}{path}.lora_B.weight")
}

/// What PEFT puts before a module's path in an adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Which factor an adapter tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFactor {
    A,
    B,
}

/// Splits a PEFT adapter tensor name into the module's path and the factor, or `None` for a
/// name that is not one.
pub fn parse_adapter_name(name: &str) -> Option<(&str, LoraFactor)> {
    let rest = name.strip_prefix(PEFT_PREFIX)?;
    if let Some(path) = rest.strip_suffix(".lora_A.weight") {
        Some((path, LoraFactor::A))
    } else {
        rest.strip_suffix(".lora_B.weight")
            .map(|path| (path, LoraFactor::B))
    }
}

/// The rank and alpha read back from a PEFT `adapter_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapterConfig {
    pub rank: u32,
    pub alpha: f64,
    /// Per-module ranks and alphas (`rank_pattern`, `alpha_pattern`) are not supported: a file
    /// that uses them is refused rather than merged with the wrong scaling.
    pub target_modules: Vec<String>,
}

impl PeftAdapterConfig {
    /// Parses `adapter_config.json`; the error says which key is missing or wrong.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if value.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
            return Err("`peft_type` is not \"LORA\"".into());
        }
        let rank = value
            .get("r")
            .and_then(serde_json::Value::as_u64)
            .filter(|&r| r > 0 && r <= u64::from(MAX_RANK))
            .ok_or_else(|| format!("`r` must be an integer in 1..={MAX_RANK}"))?;
        let alpha = value
            .get("lora_alpha")
            .and_then(serde_json::Value::as_f64)
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or("`lora_alpha` must be a number > 0")?;
        for key in ["rank_pattern", "alpha_pattern"] {
            if value
                .get(key)
                .and_then(|v| v.as_object())
                .is_some_and(|m| !m.is_empty())
            {
                return Err(format!("`{key}` (per-module scaling) is not supported"));
            }
        }
        if value.get("use_rslora").and_then(|v| v.as_bool()) == Some(true) {
            return Err("`use_rslora` (scaling alpha/sqrt(r)) is not supported".into());
        }
        if value.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err("`use_dora` is not supported".into());
        }
        let target_modules = match value.get("target_modules") {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(PeftAdapterConfig {
            rank: rank as u32,
            alpha,
            target_modules,
        })
    }

    pub fn scaling(&self) -> f64 {
        self.alpha / f64::from(self.rank)
    }
}

/// FFA-LoRA's frozen `A` for the module at `path`: `[rank, in_features]` row-major, uniform in
/// `±1/√in_features` (the bound of PEFT's default Kaiming-uniform init with `a = √5`).
///
/// Every site must hold the same bits without talking to the others, and across versions of
/// every library: the values come from SHA-256 in counter mode over (domain tag, seed, path,
/// counter), not from a general-purpose generator whose stream may change with a crate update.
pub fn init_lora_a(seed: u64, path: &str, rank: usize, in_features: usize) -> Vec<f32> {
    let n = rank * in_features;
    let bound = 1.0 / (in_features.max(1) as f64).sqrt();
    let mut out = Vec::with_capacity(n);
    let mut counter = 0u64;
    while out.len() < n {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"tutela/lora-a/v1\0");
        ctx.update(&seed.to_le_bytes());
        ctx.update(&(path.len() as u64).to_le_bytes());
        ctx.update(path.as_bytes());
        ctx.update(&counter.to_le_bytes());
        let block = ctx.finish();
        for word in block.as_ref().chunks_exact(8) {
            if out.len() == n {
                break;
            }
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            // 53 random bits → a double in [0, 1), then to [−bound, bound).
            let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
            out.push(((2.0 * unit - 1.0) * bound) as f32);
        }
        counter += 1;
    }
    out
}

/// The shape of a Llama-architecture decoder, for sizing what travels (parameters, not a model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlamaShape {
    pub vocab: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub tied_embeddings: bool,
}

impl LlamaShape {
    /// Llama-2-7B's published configuration.
    pub const LLAMA_2_7B: LlamaShape = LlamaShape {
        vocab: 32_000,
        hidden: 4096,
        intermediate: 11_008,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        tied_embeddings: false,
    };

    /// `(name, out_features, in_features)` of one decoder layer's Linear modules.
    pub fn linear_modules(&self) -> [(&'static str, u64, u64); 7] {
        let kv = self.hidden / self.heads * self.kv_heads;
        let (h, i) = (self.hidden, self.intermediate);
        [
            ("q_proj", h, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, h),
            ("gate_proj", i, h),
            ("up_proj", i, h),
            ("down_proj", h, i),
        ]
    }

    /// Every parameter of the model (embeddings, layers with their two norms, final norm, head).
    pub fn parameters(&self) -> u64 {
        let per_layer: u64 = self
            .linear_modules()
            .iter()
            .map(|(_, o, i)| o * i)
            .sum::<u64>()
            + 2 * self.hidden;
        let embeddings = self.vocab * self.hidden;
        let head = if self.tied_embeddings { 0 } else { embeddings };
        embeddings + self.layers * per_layer + self.hidden + head
    }

    /// `(B parameters, A parameters)` of rank-`rank` adapters on the `targets` modules of every
    /// layer.
    pub fn adapter_parameters(&self, rank: u64, targets: &[&str]) -> (u64, u64) {
        let (mut b, mut a) = (0, 0);
        for (name, out, input) in self.linear_modules() {
            if targets.contains(&name) {
                b += out * rank;
                a += rank * input;
            }
        }
        (self.layers * b, self.layers * a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoraSpec {
        LoraSpec {
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            dropout: 0.0,
            aggregation: LoraAggregation::Ffa,
        }
    }

    #[test]
    fn llama_2_7b_has_its_published_size_and_its_adapters_are_small() {
        let shape = LlamaShape::LLAMA_2_7B;
        assert_eq!(shape.parameters(), 6_738_415_616);
        let (b, a) = shape.adapter_parameters(8, &["q_proj", "v_proj"]);
        assert_eq!((b, a), (2_097_152, 2_097_152));
        // What travels per site per round under FFA-LoRA (B in f32) against the full model in
        // bf16: BENCHMARKS.md quotes these.
        assert_eq!(b * 4, 8 * 1024 * 1024);
        assert_eq!(shape.parameters() * 2 / (b * 4), 1606);
    }

    #[test]
    fn names_round_trip_as_peft_writes_them() {
        let path = "model.layers.3.self_attn.q_proj";
        assert_eq!(
            lora_a_name(path),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            parse_adapter_name(&lora_b_name(path)),
            Some((path, LoraFactor::B))
        );
        assert_eq!(parse_adapter_name("model.embed_tokens.weight"), None);
    }

    #[test]
    fn targets_match_the_last_name() {
        let s = spec();
        assert!(s.targets("model.layers.0.self_attn.q_proj"));
        assert!(!s.targets("model.layers.0.self_attn.k_proj"));
        assert!(!s.targets("model.layers.0.self_attn.q_proj_x"));
    }

    #[test]
    fn a_is_deterministic_bounded_and_depends_on_seed_and_path() {
        let a = init_lora_a(7, "m.q_proj", 4, 33);
        assert_eq!(a.len(), 4 * 33);
        assert_eq!(a, init_lora_a(7, "m.q_proj", 4, 33));
        assert_ne!(a, init_lora_a(8, "m.q_proj", 4, 33));
        assert_ne!(a, init_lora_a(7, "m.v_proj", 4, 33));
        let bound = 1.0 / 33f32.sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound));
        let mean: f32 = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05, "{mean}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let key = |s: LoraSpec, dp: bool| s.validate(dp).unwrap_err().key().unwrap().to_owned();
        assert!(spec().validate(true).is_ok());
        assert_eq!(key(LoraSpec { rank: 0, ..spec() }, false), "lora.rank");
        assert_eq!(
            key(
                LoraSpec {
                    alpha: -1.0,
                    ..spec()
                },
                false
            ),
            "lora.alpha"
        );
        assert_eq!(
            key(
                LoraSpec {
                    target_modules: vec![],
                    ..spec()
                },
                false
            ),
            "lora.target_modules"
        );
        assert_eq!(
            key(
                LoraSpec {
                    target_modules: vec!["q_proj".into(), "q.proj".into()],
                    ..spec()
                },
                false
            ),
            "lora.target_modules[1]"
        );
        assert_eq!(
            key(
                LoraSpec {
                    dropout: 1.0,
                    ..spec()
                },
                false
            ),
            "lora.dropout"
        );
        let with_dropout = LoraSpec {
            dropout: 0.1,
            ..spec()
        };
        assert!(with_dropout.validate(false).is_ok());
        assert_eq!(key(with_dropout, true), "lora.dropout");
    }

    #[test]
    fn peft_config_round_trips() {
        let json = spec().peft_config_json().to_string();
        let back = PeftAdapterConfig::from_json(&json).unwrap();
        assert_eq!(back.rank, 8);
        assert_eq!(back.scaling(), 2.0);
        assert_eq!(back.target_modules, vec!["q_proj", "v_proj"]);
        let rs = json.replace("\"use_rslora\":false", "\"use_rslora\":true");
        assert!(
            PeftAdapterConfig::from_json(&rs)
                .unwrap_err()
                .contains("rslora")
        );
    }
}

#[cfg(test)]
mod job_spec_tests {
    use crate::job::JobSpec;

    const EXAMPLE: &str = include_str!("../../deploy/jobs/notes_lora_dp.toml");

    #[test]
    fn the_example_job_parses_and_its_lora_section_is_in_the_digest() {
        let spec = JobSpec::from_toml_str(EXAMPLE).unwrap();
        let lora = spec.lora.as_ref().unwrap();
        assert_eq!((lora.rank, lora.scaling()), (8, 2.0));
        let digest = spec.digest();

        let without: String = EXAMPLE.split("\n[lora]\n").next().unwrap().to_owned();
        assert_ne!(JobSpec::from_toml_str(&without).unwrap().digest(), digest);
        for (from, to) in [
            ("rank = 8", "rank = 4"),
            ("alpha = 16.0", "alpha = 32.0"),
            ("[\"q_proj\", \"v_proj\"]", "[\"q_proj\"]"),
        ] {
            let changed = JobSpec::from_toml_str(&EXAMPLE.replace(from, to)).unwrap();
            assert_ne!(changed.digest(), digest, "{from} -> {to}");
        }
        // A default written out is the same setting: the digest is of the parsed spec.
        let defaults_omitted = EXAMPLE
            .replace("dropout = 0.0\n", "")
            .replace("aggregation = \"ffa\"\n", "");
        assert_eq!(
            JobSpec::from_toml_str(&defaults_omitted).unwrap().digest(),
            digest
        );
    }

    #[test]
    fn bad_lora_values_are_refused_naming_the_key() {
        let key = |text: String| {
            JobSpec::from_toml_str(&text)
                .unwrap_err()
                .key()
                .map(str::to_owned)
        };
        assert_eq!(
            key(EXAMPLE.replace("rank = 8", "rank = 0")).as_deref(),
            Some("lora.rank")
        );
        assert_eq!(
            key(EXAMPLE.replace("alpha = 16.0", "alpha = 0.0")).as_deref(),
            Some("lora.alpha")
        );
        assert_eq!(
            key(EXAMPLE.replace("dropout = 0.0", "dropout = 0.1")).as_deref(),
            Some("lora.dropout")
        );
        assert_eq!(
            key(EXAMPLE.replace("[\"q_proj\", \"v_proj\"]", "[]")).as_deref(),
            Some("lora.target_modules")
        );
        // Unknown keys and unknown rules are TOML errors that name the key.
        let err = JobSpec::from_toml_str(
            &EXAMPLE.replace("aggregation = \"ffa\"", "aggregation = \"fedavg\""),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("aggregation"), "{err}");
        let err = JobSpec::from_toml_str(&EXAMPLE.replace("rank = 8", "rank = 8\nranks = 8"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ranks"), "{err}");
    }
}
