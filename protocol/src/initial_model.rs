//! What a job's first global model must be, checked by the coordinator before a byte of a site's
//! INITIALIZE answer is stored.
//!
//! Two kinds, one check ([`InitialModel::check`]):
//! - a layer network of the registry (`mlp`, `cnn`): exactly the parameters
//!   [`ModelDescription`] lists;
//! - a LoRA job's adapters ([`AdapterDescription`]): the coordinator never holds the base
//!   checkpoint (the sites do, by digest), and under FFA-LoRA only `B` travels. So the initial
//!   model is every adapted module's `B` in PEFT's naming
//!   (`base_model.model.<path>.lora_B.weight`), F32, shape `[out, rank]` with the job's rank, on
//!   exactly the job's `target_modules` and the same layers for each, the same `out` for a module
//!   in every layer, and all zeros (B = 0: the round-0 model is the base model exactly, so no
//!   site can slip trained weights into it). `A` is derived at every site from the job's seed and
//!   is refused if sent.

use std::collections::{BTreeMap, BTreeSet};

use crate::job::JobSpec;
use crate::lora::{LoraFactor, LoraSpec, parse_adapter_name};
use crate::model_registry::{ModelDescription, RegistryError};
use crate::tensor::{DType, TensorSpec};

/// The job's first global model, as the coordinator checks it.
#[derive(Clone, Debug, PartialEq)]
pub enum InitialModel {
    /// A registry layer network: every parameter, as the site builds it from the job's seed.
    Layers(ModelDescription),
    /// A LoRA job: the adapters' `B` factors, all zeros.
    Adapters(AdapterDescription),
}

/// Why an initial model is not the job's.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InitialModelError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the adapters hold no tensor")]
    NoAdapters,
    #[error(
        "tensor {name:?} is not a LoRA adapter tensor (PEFT's base_model.model.<path>.lora_B.weight): \
         a LoRA job's initial model is its adapters only"
    )]
    NotAnAdapter { name: String },
    #[error(
        "tensor {name:?} is an adapter's A: under FFA-LoRA every site derives A from the job's \
         seed, and only B travels"
    )]
    FrozenFactorSent { name: String },
    #[error(
        "tensor {name:?} adapts module {module:?}, which is not in the job's lora.target_modules"
    )]
    NotATarget { name: String, module: String },
    #[error("tensor {name:?} has dtype {found}, an adapter's is F32")]
    WrongDType { name: String, found: DType },
    #[error(
        "tensor {name:?} has shape {found:?}; an adapter's B is [out, {rank}] (lora.rank = {rank})"
    )]
    WrongShape {
        name: String,
        rank: u64,
        found: Vec<u64>,
    },
    #[error("tensor {name:?} gives module {module:?} {found} outputs, an earlier layer {earlier}")]
    Inconsistent {
        name: String,
        module: String,
        earlier: u64,
        found: u64,
    },
    #[error(
        "the adapters are not one per target module and layer: module {module:?} is adapted in \
         layers {found:?}, the model's layers are {expected:?}"
    )]
    Incomplete {
        module: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error(
        "tensor {name:?} is not zero: an initial adapter is B = 0 (the base model exactly), with \
         nothing trained in it"
    )]
    NotZero { name: String },
}

impl InitialModel {
    /// The initial model of `spec`: its adapters when it has `[lora]`, else its registry model.
    pub fn for_job(spec: &JobSpec) -> Result<InitialModel, InitialModelError> {
        match &spec.lora {
            Some(lora) => Ok(InitialModel::Adapters(AdapterDescription::new(lora))),
            None => Ok(InitialModel::Layers(ModelDescription::for_job(
                &spec.model,
            )?)),
        }
    }

    /// Checks a manifest's tensors (names, dtypes, shapes) against the job's model.
    pub fn check(&self, tensors: &[TensorSpec]) -> Result<(), InitialModelError> {
        match self {
            InitialModel::Layers(d) => Ok(d.check(tensors)?),
            InitialModel::Adapters(d) => d.check(tensors),
        }
    }

    /// Whether every value must be zero (checked on the bytes as they arrive).
    pub fn must_be_zero(&self) -> bool {
        matches!(self, InitialModel::Adapters(_))
    }
}

/// The adapters a LoRA job's initial model consists of (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterDescription {
    rank: u64,
    targets: BTreeSet<String>,
}

/// The layer index in a module path (`model.layers.<n>.self_attn.q_proj`), if any.
fn layer_of(path: &str) -> Option<u64> {
    let mut parts = path.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

impl AdapterDescription {
    pub fn new(lora: &LoraSpec) -> AdapterDescription {
        AdapterDescription {
            rank: u64::from(lora.rank),
            targets: lora.target_modules.iter().cloned().collect(),
        }
    }

    /// Checks that `tensors` are the `B` factors of rank-`rank` adapters on the target modules
    /// of the same layers (see the module documentation).
    pub fn check(&self, tensors: &[TensorSpec]) -> Result<(), InitialModelError> {
        if tensors.is_empty() {
            return Err(InitialModelError::NoAdapters);
        }
        // Module (last name) -> (out, layers it is adapted in).
        let mut modules: BTreeMap<&str, (u64, BTreeSet<u64>)> = BTreeMap::new();
        for t in tensors {
            let name = || t.name.clone();
            let (path, factor) = parse_adapter_name(&t.name)
                .ok_or_else(|| InitialModelError::NotAnAdapter { name: name() })?;
            if factor == LoraFactor::A {
                return Err(InitialModelError::FrozenFactorSent { name: name() });
            }
            let module = path.rsplit('.').next().unwrap_or(path);
            if !self.targets.contains(module) {
                return Err(InitialModelError::NotATarget {
                    name: name(),
                    module: module.to_string(),
                });
            }
            if t.dtype != DType::F32 {
                return Err(InitialModelError::WrongDType {
                    name: name(),
                    found: t.dtype,
                });
            }
            let out = match t.shape.as_slice() {
                [out, rank] if *out > 0 && *rank == self.rank => *out,
                _ => {
                    return Err(InitialModelError::WrongShape {
                        name: name(),
                        rank: self.rank,
                        found: t.shape.clone(),
                    });
                }
            };
            let entry = modules
                .entry(module)
                .or_insert_with(|| (out, BTreeSet::new()));
            if entry.0 != out {
                return Err(InitialModelError::Inconsistent {
                    name: name(),
                    module: module.to_string(),
                    earlier: entry.0,
                    found: out,
                });
            }
            // A module outside a numbered layer counts as layer 0 of its own (the same path
            // twice cannot happen: manifest names are unique).
            entry.1.insert(layer_of(path).unwrap_or(0));
        }
        // Every target module, in the same layers 0..n.
        let layers: BTreeSet<u64> = modules.values().flat_map(|(_, l)| l.clone()).collect();
        let expected: Vec<u64> = (0..layers.len() as u64).collect();
        for module in &self.targets {
            let found: Vec<u64> = modules
                .get(module.as_str())
                .map(|(_, l)| l.iter().copied().collect())
                .unwrap_or_default();
            if found != expected {
                return Err(InitialModelError::Incomplete {
                    module: module.clone(),
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::lora_b_name;

    fn lora(rank: u32, targets: &[&str]) -> LoraSpec {
        LoraSpec {
            rank,
            alpha: 16.0,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            dropout: 0.0,
            aggregation: Default::default(),
        }
    }

    fn b(path: &str, out: u64, rank: u64) -> TensorSpec {
        TensorSpec {
            name: lora_b_name(path),
            dtype: DType::F32,
            shape: vec![out, rank],
        }
    }

    fn adapters(layers: u64) -> Vec<TensorSpec> {
        (0..layers)
            .flat_map(|l| {
                [
                    b(&format!("model.layers.{l}.self_attn.q_proj"), 32, 4),
                    b(&format!("model.layers.{l}.self_attn.v_proj"), 16, 4),
                ]
            })
            .collect()
    }

    #[test]
    fn the_b_factors_of_every_target_in_every_layer_are_the_initial_adapters() {
        let d = AdapterDescription::new(&lora(4, &["q_proj", "v_proj"]));
        d.check(&adapters(3)).unwrap();
        d.check(&adapters(1)).unwrap();
    }

    #[test]
    fn anything_else_is_refused_naming_the_tensor() {
        let d = AdapterDescription::new(&lora(4, &["q_proj", "v_proj"]));
        let with = |extra: TensorSpec| {
            let mut t = adapters(2);
            t.push(extra);
            d.check(&t).unwrap_err()
        };
        // A base weight: the coordinator takes no base model from a site.
        let e = with(TensorSpec {
            name: "model.embed_tokens.weight".into(),
            dtype: DType::F32,
            shape: vec![10, 32],
        });
        assert!(matches!(e, InitialModelError::NotAnAdapter { .. }), "{e}");
        let e = with(TensorSpec {
            name: crate::lora::lora_a_name("model.layers.0.self_attn.q_proj"),
            dtype: DType::F32,
            shape: vec![4, 32],
        });
        assert!(
            matches!(e, InitialModelError::FrozenFactorSent { .. }),
            "{e}"
        );
        let e = with(b("model.layers.0.mlp.up_proj", 64, 4));
        assert!(matches!(e, InitialModelError::NotATarget { .. }), "{e}");
        // The wrong rank, dtype, or out for a module.
        let mut t = adapters(2);
        t[1].shape = vec![16, 8];
        assert!(matches!(
            d.check(&t),
            Err(InitialModelError::WrongShape { rank: 4, .. })
        ));
        let mut t = adapters(2);
        t[0].dtype = DType::F16;
        assert!(matches!(
            d.check(&t),
            Err(InitialModelError::WrongDType { .. })
        ));
        let mut t = adapters(2);
        t[2].shape = vec![33, 4];
        assert!(matches!(
            d.check(&t),
            Err(InitialModelError::Inconsistent { .. })
        ));
        // A target missing in one layer, or a gap in the layers.
        let mut t = adapters(3);
        t.remove(3);
        let e = d.check(&t).unwrap_err();
        assert!(matches!(e, InitialModelError::Incomplete { .. }), "{e}");
        assert!(e.to_string().contains("v_proj"), "{e}");
        let t: Vec<TensorSpec> = adapters(3)
            .into_iter()
            .filter(|t| !t.name.contains("layers.1."))
            .collect();
        assert!(matches!(
            d.check(&t),
            Err(InitialModelError::Incomplete { .. })
        ));
        assert_eq!(d.check(&[]), Err(InitialModelError::NoAdapters));
    }

    #[test]
    fn a_job_with_lora_expects_zero_adapters_and_one_without_its_registry_model() {
        let spec = |model: &str, lora_section: &str| {
            JobSpec::from_toml_str(&format!(
                r#"
name = "j"
rounds = 1
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 10.0
[model]
{model}
[data]
schema = "s"
[training]
optimizer = "sgd"
learning_rate = 0.1
local_epochs = 1
batch_size = 8
{lora_section}
"#
            ))
        };
        let plain =
            InitialModel::for_job(&spec("name = \"mlp\"\nhidden = [4]", "").unwrap()).unwrap();
        assert!(matches!(plain, InitialModel::Layers(_)) && !plain.must_be_zero());
        let with_lora = spec(
            "name = \"llama\"",
            "[lora]\nrank = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n",
        )
        .unwrap();
        let initial = InitialModel::for_job(&with_lora).unwrap();
        assert!(initial.must_be_zero());
        initial.check(&adapters(2)).unwrap();
        // Without [lora], a language model is not one the registry describes.
        assert!(InitialModel::for_job(&spec("name = \"llama\"", "").unwrap()).is_err());
    }
}
