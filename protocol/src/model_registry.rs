//! What each model of the site node's registry is made of, without libtorch.
//!
//! The coordinator never builds a model (it does not link libtorch), yet it must know what a
//! job's model looks like: the first global model comes from one site's INITIALIZE answer, and
//! anything that answer holds would otherwise become the job's model. So each registry model is
//! described here as the list of its parameters — names, dtypes, and shapes as a function of the
//! job's `[model]` hyper-parameters and of the data (input features or image shape, classes). The
//! coordinator checks an initial model against [`ModelDescription::check`]; the site node's tests
//! check that its tch registry builds exactly [`ModelDescription::concrete`] for every model kind,
//! so the two cannot drift apart.
//!
//! The coordinator does not know a site's dataset schema, so the data's dimensions are variables
//! ([`DimVar`]): an upload must use one value for each variable throughout (the classes of
//! `out.weight` are those of `out.bias`), every other dimension is fixed by the job spec.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::job::ModelSpec;
use crate::tensor::{DType, TensorSpec};

/// A dimension the job spec does not fix: it comes from the site's dataset schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DimVar {
    /// Values per example, flattened (`product(input_shape)`).
    InputFeatures,
    /// An image's channels (`input_shape[0]`).
    InputChannels,
    /// Pixels per channel after the `cnn`'s two 2×2 pools (`⌊h/4⌋ · ⌊w/4⌋`).
    PooledPixels,
    /// The label's classes (at least 2).
    Classes,
}

impl DimVar {
    fn minimum(self) -> u64 {
        match self {
            DimVar::Classes => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for DimVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DimVar::InputFeatures => "input_features",
            DimVar::InputChannels => "input_channels",
            DimVar::PooledPixels => "pooled_pixels",
            DimVar::Classes => "classes",
        })
    }
}

/// One dimension of a parameter's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// Set by the job spec (a hidden width, a kernel size, ...).
    Fixed(u64),
    /// `times × var`, the variable taken from the data.
    Var { var: DimVar, times: u64 },
}

impl Dim {
    fn var(var: DimVar) -> Dim {
        Dim::Var { var, times: 1 }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Var { var, times: 1 } => write!(f, "{var}"),
            Dim::Var { var, times } => write!(f, "{times}*{var}"),
        }
    }
}

/// One parameter of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamDescription {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// The data's dimensions at a site: what fills the [`DimVar`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDims {
    /// One example's shape: `[features]`, or `[channels, height, width]`.
    pub input_shape: Vec<u64>,
    pub num_classes: u64,
}

/// The `[model]` hyper-parameters the registry's models take (every key but `name`), read as the
/// site node reads them: an unknown key is an error.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperParams {
    #[serde(default)]
    pub hidden: Vec<u64>,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_conv_channels")]
    pub conv_channels: [u64; 2],
}

fn default_conv_channels() -> [u64; 2] {
    [16, 32]
}

/// The registry's models, by name.
pub const MODEL_NAMES: &[&str] = &["mlp", "cnn"];

/// The site node's language models (`site-node::lm::registry::LANGUAGE_MODELS`; a site-node
/// test keeps the two lists equal). Listed here so that the coordinator, which does not link
/// libtorch, can refuse at submission a job naming a model no site could build.
pub const LANGUAGE_MODEL_NAMES: &[&str] = &["llama"];

/// Whether a site node can build model `name` (a layer network or a language model).
pub fn is_known_model(name: &str) -> bool {
    MODEL_NAMES.contains(&name) || LANGUAGE_MODEL_NAMES.contains(&name)
}

/// Why a job's model is refused at submission: no site's registry has it.
pub fn unknown_model_message(name: &str) -> String {
    format!(
        "model.name = {name:?}: unknown model; no site's model registry has it (known models: {})",
        MODEL_NAMES
            .iter()
            .chain(LANGUAGE_MODEL_NAMES)
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The `cnn`'s convolution kernel side (3×3, stride 1, same padding).
const CNN_KERNEL: u64 = 3;

/// Why a model cannot be described, or a set of tensors is not that model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    #[error("unknown model {name:?}; known models: {}", MODEL_NAMES.join(", "))]
    UnknownModel { name: String },
    #[error("model.{key}: {reason}")]
    HyperParams { key: String, reason: String },
    #[error("the data does not fit the model: {0}")]
    Data(String),
    #[error("tensor {name:?} is not a parameter of the job's model {model:?}")]
    Unexpected { model: String, name: String },
    #[error("parameter {name:?} of the job's model {model:?} is missing")]
    Missing { model: String, name: String },
    #[error("tensor {name:?} has dtype {found}, the model's is {expected}")]
    WrongDType {
        name: String,
        expected: DType,
        found: DType,
    },
    #[error("tensor {name:?} has shape {found:?}, the model's is [{expected}]")]
    WrongShape {
        name: String,
        expected: String,
        found: Vec<u64>,
    },
    #[error("tensor {name:?} gives {var} = {found}, but an earlier tensor gave {var} = {earlier}")]
    Inconsistent {
        name: String,
        var: DimVar,
        earlier: u64,
        found: u64,
    },
}

/// A registry model's parameters, sorted by name (the order the site node exports them in).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDescription {
    model: String,
    params: Vec<ParamDescription>,
}

impl ModelDescription {
    /// The description of a job spec's `[model]`.
    pub fn for_job(spec: &ModelSpec) -> Result<Self, RegistryError> {
        let hyper =
            HyperParams::deserialize(toml::Value::Table(spec.params.clone())).map_err(|e| {
                RegistryError::HyperParams {
                    key: "*".into(),
                    reason: format!(
                        "not understood by the {:?} model: {}",
                        spec.name,
                        e.message()
                    ),
                }
            })?;
        Self::new(&spec.name, &hyper)
    }

    /// The description of registry model `name` with `hyper`.
    pub fn new(name: &str, hyper: &HyperParams) -> Result<Self, RegistryError> {
        if !(hyper.dropout.is_finite() && (0.0..1.0).contains(&hyper.dropout)) {
            return Err(RegistryError::HyperParams {
                key: "dropout".into(),
                reason: format!("must be in [0, 1), got {}", hyper.dropout),
            });
        }
        if hyper.hidden.contains(&0) {
            return Err(RegistryError::HyperParams {
                key: "hidden".into(),
                reason: format!("widths {:?} must be positive", hyper.hidden),
            });
        }
        let mut params = Vec::new();
        let input = match name {
            "mlp" => Dim::var(DimVar::InputFeatures),
            "cnn" => {
                let [c1, c2] = hyper.conv_channels;
                if c1 == 0 || c2 == 0 {
                    return Err(RegistryError::HyperParams {
                        key: "conv_channels".into(),
                        reason: format!("{:?} must be positive", hyper.conv_channels),
                    });
                }
                let k = Dim::Fixed(CNN_KERNEL);
                let input_channels = Dim::var(DimVar::InputChannels);
                conv(&mut params, "conv1", c1, input_channels, k);
                conv(&mut params, "conv2", c2, Dim::Fixed(c1), k);
                Dim::Var {
                    var: DimVar::PooledPixels,
                    times: c2,
                }
            }
            other => {
                return Err(RegistryError::UnknownModel {
                    name: other.to_string(),
                });
            }
        };
        // The dense head: fc0, fc1, ... then out.
        let mut width = input;
        for (i, &hidden) in hyper.hidden.iter().enumerate() {
            linear(&mut params, &format!("fc{i}"), Dim::Fixed(hidden), width);
            width = Dim::Fixed(hidden);
        }
        linear(&mut params, "out", Dim::var(DimVar::Classes), width);
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ModelDescription {
            model: name.to_string(),
            params,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn params(&self) -> &[ParamDescription] {
        &self.params
    }

    /// The exact tensors the model has for data of `dims`, sorted by name.
    pub fn concrete(&self, dims: &DataDims) -> Result<Vec<TensorSpec>, RegistryError> {
        let data = |reason: String| RegistryError::Data(reason);
        let features = dims
            .input_shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| data(format!("input shape {:?} overflows", dims.input_shape)))?;
        let mut values = BTreeMap::from([
            (DimVar::InputFeatures, features),
            (DimVar::Classes, dims.num_classes),
        ]);
        if self.model == "cnn" {
            let &[channels, height, width] = dims.input_shape.as_slice() else {
                return Err(data(format!(
                    "the cnn needs a [channels, height, width] input, found {:?}",
                    dims.input_shape
                )));
            };
            values.insert(DimVar::InputChannels, channels);
            values.insert(DimVar::PooledPixels, (height / 4) * (width / 4));
        }
        for (var, &value) in &values {
            if value < var.minimum() {
                return Err(data(format!("{var} = {value} is below {}", var.minimum())));
            }
        }
        self.params
            .iter()
            .map(|p| {
                let shape = p
                    .shape
                    .iter()
                    .map(|d| match *d {
                        Dim::Fixed(n) => Some(n),
                        Dim::Var { var, times } => values.get(&var)?.checked_mul(times),
                    })
                    .collect::<Option<Vec<u64>>>()
                    .ok_or_else(|| data(format!("{}: a dimension overflows", p.name)))?;
                Ok(TensorSpec::new(p.name.clone(), p.dtype, shape))
            })
            .collect()
    }

    /// Checks that `tensors` are exactly this model's parameters (in any order): the same
    /// names, no more and no fewer, each with its dtype and shape, and one value for each data
    /// dimension across all of them.
    pub fn check(&self, tensors: &[TensorSpec]) -> Result<(), RegistryError> {
        let by_name: BTreeMap<&str, &ParamDescription> =
            self.params.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut bound: BTreeMap<DimVar, u64> = BTreeMap::new();
        let mut seen = 0usize;
        for t in tensors {
            let Some(p) = by_name.get(t.name.as_str()) else {
                return Err(RegistryError::Unexpected {
                    model: self.model.clone(),
                    name: t.name.clone(),
                });
            };
            seen += 1;
            if t.dtype != p.dtype {
                return Err(RegistryError::WrongDType {
                    name: t.name.clone(),
                    expected: p.dtype,
                    found: t.dtype,
                });
            }
            let wrong_shape = || RegistryError::WrongShape {
                name: t.name.clone(),
                expected: p
                    .shape
                    .iter()
                    .map(Dim::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                found: t.shape.clone(),
            };
            if t.shape.len() != p.shape.len() {
                return Err(wrong_shape());
            }
            for (&found, dim) in t.shape.iter().zip(&p.shape) {
                match *dim {
                    Dim::Fixed(n) if n == found => {}
                    Dim::Fixed(_) => return Err(wrong_shape()),
                    Dim::Var { var, times } => {
                        if times == 0 || found % times != 0 || found / times < var.minimum() {
                            return Err(wrong_shape());
                        }
                        let value = found / times;
                        match bound.get(&var) {
                            Some(&earlier) if earlier != value => {
                                return Err(RegistryError::Inconsistent {
                                    name: t.name.clone(),
                                    var,
                                    earlier,
                                    found: value,
                                });
                            }
                            _ => {
                                bound.insert(var, value);
                            }
                        }
                    }
                }
            }
        }
        // Names are unique in a manifest, so fewer seen than described means one is missing.
        if seen < self.params.len() {
            let present: std::collections::BTreeSet<&str> =
                tensors.iter().map(|t| t.name.as_str()).collect();
            if let Some(p) = self
                .params
                .iter()
                .find(|p| !present.contains(p.name.as_str()))
            {
                return Err(RegistryError::Missing {
                    model: self.model.clone(),
                    name: p.name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A Linear layer's `weight [out, in]` and `bias [out]`.
fn linear(params: &mut Vec<ParamDescription>, layer: &str, out: Dim, input: Dim) {
    params.push(ParamDescription {
        name: format!("{layer}.weight"),
        dtype: DType::F32,
        shape: vec![out, input],
    });
    params.push(ParamDescription {
        name: format!("{layer}.bias"),
        dtype: DType::F32,
        shape: vec![out],
    });
}

/// A Conv2d layer's `weight [out, in, k, k]` and `bias [out]`.
fn conv(params: &mut Vec<ParamDescription>, layer: &str, out: u64, input: Dim, kernel: Dim) {
    params.push(ParamDescription {
        name: format!("{layer}.weight"),
        dtype: DType::F32,
        shape: vec![Dim::Fixed(out), input, kernel, kernel],
    });
    params.push(ParamDescription {
        name: format!("{layer}.bias"),
        dtype: DType::F32,
        shape: vec![Dim::Fixed(out)],
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_model(toml_text: &str) -> ModelSpec {
        toml::from_str(toml_text).unwrap()
    }

    fn mlp() -> ModelDescription {
        ModelDescription::for_job(&job_model("name = \"mlp\"\nhidden = [8, 4]\ndropout = 0.1"))
            .unwrap()
    }

    fn honest_mlp() -> Vec<TensorSpec> {
        mlp()
            .concrete(&DataDims {
                input_shape: vec![30],
                num_classes: 2,
            })
            .unwrap()
    }

    #[test]
    fn the_concrete_model_passes_its_own_check() {
        let names: Vec<_> = honest_mlp().iter().map(|t| t.name.clone()).collect();
        assert_eq!(
            names,
            [
                "fc0.bias",
                "fc0.weight",
                "fc1.bias",
                "fc1.weight",
                "out.bias",
                "out.weight"
            ]
        );
        mlp().check(&honest_mlp()).unwrap();
        let cnn = ModelDescription::for_job(&job_model("name = \"cnn\"\nhidden = [16]")).unwrap();
        let t = cnn
            .concrete(&DataDims {
                input_shape: vec![1, 28, 28],
                num_classes: 10,
            })
            .unwrap();
        cnn.check(&t).unwrap();
        let fc0 = t.iter().find(|t| t.name == "fc0.weight").unwrap();
        assert_eq!(fc0.shape, [16, 32 * 7 * 7]);
    }

    #[test]
    fn a_rogue_initial_model_is_refused() {
        let d = mlp();
        // One tensor named `evil`.
        let evil = vec![TensorSpec::new("evil", DType::F32, vec![1])];
        assert!(matches!(
            d.check(&evil),
            Err(RegistryError::Unexpected { .. })
        ));
        // The honest model plus an extra tensor.
        let mut extra = honest_mlp();
        extra.push(TensorSpec::new("zz.extra", DType::F32, vec![1]));
        assert!(matches!(
            d.check(&extra),
            Err(RegistryError::Unexpected { .. })
        ));
        // One missing.
        let mut missing = honest_mlp();
        missing.remove(0);
        assert!(matches!(
            d.check(&missing),
            Err(RegistryError::Missing { .. })
        ));
        // A wrong fixed dimension (hidden width 8 → 9).
        let mut shape = honest_mlp();
        shape[1].shape[0] = 9;
        assert!(matches!(
            d.check(&shape),
            Err(RegistryError::WrongShape { .. })
        ));
        // A wrong rank.
        let mut rank = honest_mlp();
        rank[0].shape.push(1);
        assert!(matches!(
            d.check(&rank),
            Err(RegistryError::WrongShape { .. })
        ));
        // A wrong dtype.
        let mut dtype = honest_mlp();
        dtype[0].dtype = DType::F64;
        assert!(matches!(
            d.check(&dtype),
            Err(RegistryError::WrongDType { .. })
        ));
        // Classes disagreeing between out.bias and out.weight.
        let mut classes = honest_mlp();
        classes[4].shape = vec![3];
        assert!(matches!(
            d.check(&classes),
            Err(RegistryError::Inconsistent {
                var: DimVar::Classes,
                ..
            })
        ));
        // One class is no classifier.
        let mut one = honest_mlp();
        one[4].shape = vec![1];
        one[5].shape[0] = 1;
        assert!(d.check(&one).is_err());
        assert!(d.check(&[]).is_err());
    }

    #[test]
    fn unknown_models_and_hyper_parameters_are_refused() {
        assert!(matches!(
            ModelDescription::for_job(&job_model("name = \"gpt\"")),
            Err(RegistryError::UnknownModel { .. })
        ));
        assert!(matches!(
            ModelDescription::for_job(&job_model("name = \"mlp\"\nlayers = 3")),
            Err(RegistryError::HyperParams { .. })
        ));
        assert!(ModelDescription::for_job(&job_model("name = \"mlp\"\nhidden = [0]")).is_err());
    }
}
