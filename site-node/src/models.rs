//! The model registry and [`Model`], a network together with its parameters.
//!
//! Every site must build exactly the same parameter set for a job, because the coordinator
//! averages tensors by name. So a model is a pure function of its registry name and a
//! [`ModelSpec`]: layer names are fixed strings (`fc0.weight`, `conv1.bias`, `out.weight`, ...),
//! and [`seeded_init`] draws the initial values from a seeded RNG in Rust rather than from
//! libtorch's process-wide generator, so the same (name, spec, seed) gives bit-identical weights
//! on any machine and device.
//!
//! Adding a model is one entry in [`MODELS`].

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor, nn};

/// A network: what the registry builds. A concrete type rather than a `SequentialT` of closures,
/// because DP-SGD must see each Linear/Conv2d layer's input and output
/// ([`LayerNet::forward_traced`]): tch has no module hooks.
pub type Net = LayerNet;

/// One step of a [`LayerNet`].
#[derive(Debug)]
enum Layer {
    /// `xs.view(shape)`: rows arrive flattened; restores `[batch, channels, height, width]`.
    View(Vec<i64>),
    Flatten,
    Linear(nn::Linear),
    Conv2d {
        conv: nn::Conv2D,
        kernel: i64,
        padding: i64,
    },
    Relu,
    MaxPool2,
    Dropout(f64),
}

/// The registry's networks: a straight sequence of layers.
#[derive(Debug)]
pub struct LayerNet {
    layers: Vec<Layer>,
}

/// What a parametrised layer is, for per-example gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracedKind {
    /// `y = x Wᵀ + b`, `x: [batch, in]`, `W: [out, in]`.
    Linear,
    /// 2-D convolution, square kernel, stride 1, `padding` on each side, `W: [out, in, k, k]`.
    Conv2d { kernel: i64, padding: i64 },
}

/// A Linear or Conv2d layer as one forward pass saw it.
#[derive(Debug)]
pub struct LayerTrace {
    pub kind: TracedKind,
    /// The layer's input (the same tensor the layer saw, not detached: a `detach` is one more
    /// libtorch call per layer, which a small model's DP step feels; every use of it is read-only
    /// or under `no_grad`).
    pub input: Tensor,
    /// The layer's output before the activation, still in the graph: the gradient of the loss
    /// with respect to it is the per-example "backprop" signal.
    pub output: Tensor,
    /// The layer's parameters (shallow clones: same storage and `.grad` as the VarStore's).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl LayerNet {
    fn forward_layers(
        &self,
        xs: &Tensor,
        train: bool,
        mut trace: Option<&mut Vec<LayerTrace>>,
    ) -> Tensor {
        let mut x = xs.shallow_clone();
        for layer in &self.layers {
            x = match layer {
                Layer::View(shape) => x.view(shape.as_slice()),
                Layer::Flatten => x.flatten(1, -1),
                Layer::Relu => x.relu(),
                Layer::MaxPool2 => x.max_pool2d_default(2),
                Layer::Dropout(p) => x.dropout(*p, train),
                Layer::Linear(linear) => {
                    let y = x.apply(linear);
                    if let Some(t) = trace.as_deref_mut() {
                        t.push(LayerTrace {
                            kind: TracedKind::Linear,
                            input: x.shallow_clone(),
                            output: y.shallow_clone(),
                            weight: linear.ws.shallow_clone(),
                            bias: linear.bs.as_ref().map(Tensor::shallow_clone),
                        });
                    }
                    y
                }
                Layer::Conv2d {
                    conv,
                    kernel,
                    padding,
                } => {
                    let y = x.apply(conv);
                    if let Some(t) = trace.as_deref_mut() {
                        t.push(LayerTrace {
                            kind: TracedKind::Conv2d {
                                kernel: *kernel,
                                padding: *padding,
                            },
                            input: x.shallow_clone(),
                            output: y.shallow_clone(),
                            weight: conv.ws.shallow_clone(),
                            bias: conv.bs.as_ref().map(Tensor::shallow_clone),
                        });
                    }
                    y
                }
            };
        }
        x
    }

    /// Whether every parametrised layer is a Linear layer applied to `[batch, features]` rows
    /// (no convolution, no reshape to images): the networks whose per-example gradient norms
    /// follow from each layer's input and output gradient alone (`crate::dp`'s ghost clipping).
    pub fn is_linear_on_rows(&self) -> bool {
        self.layers.iter().all(|l| {
            matches!(
                l,
                Layer::Linear(_) | Layer::Relu | Layer::Dropout(_) | Layer::Flatten
            )
        })
    }

    /// The forward pass, recording each Linear/Conv2d layer's input and output in order.
    pub fn forward_traced(&self, xs: &Tensor, train: bool) -> (Tensor, Vec<LayerTrace>) {
        let mut trace = Vec::new();
        let out = self.forward_layers(xs, train, Some(&mut trace));
        (out, trace)
    }
}

impl nn::ModuleT for LayerNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_layers(xs, train, None)
    }
}

/// Why a model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("model {model:?}: {reason}")]
    InvalidSpec { model: String, reason: String },
    #[error("{context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
}

/// What a model is built for: its input, its outputs and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// One example's shape without the batch dimension: `[n_features]` for tabular data,
    /// `[channels, height, width]` for images. Models receive each example flattened to
    /// `product(input_shape)` values (a [`crate::data::Table`] row) and reshape as they need.
    pub input_shape: Vec<usize>,
    pub num_classes: usize,
    /// Widths of the hidden fully connected layers (the `mlp`'s body, the `cnn`'s head).
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Dropout probability after each hidden layer; 0 disables it.
    #[serde(default)]
    pub dropout: f64,
    /// Output channels of the `cnn`'s two convolution blocks.
    #[serde(default = "default_conv_channels")]
    pub conv_channels: [usize; 2],
}

fn default_conv_channels() -> [usize; 2] {
    [16, 32]
}

impl ModelSpec {
    /// A spec with no hidden layers, no dropout and the default convolution channels.
    pub fn new(input_shape: Vec<usize>, num_classes: usize) -> Self {
        ModelSpec {
            input_shape,
            num_classes,
            hidden: Vec::new(),
            dropout: 0.0,
            conv_channels: default_conv_channels(),
        }
    }

    pub fn with_hidden(mut self, hidden: Vec<usize>) -> Self {
        self.hidden = hidden;
        self
    }

    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    pub fn with_conv_channels(mut self, conv_channels: [usize; 2]) -> Self {
        self.conv_channels = conv_channels;
        self
    }

    /// Values per example: the product of `input_shape`, or `None` on overflow.
    pub fn input_features(&self) -> Option<usize> {
        self.input_shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// Checks what every model needs; `model` names the model in errors.
    fn check_common(&self, model: &str) -> Result<usize, ModelError> {
        let invalid = |reason: String| ModelError::InvalidSpec {
            model: model.to_owned(),
            reason,
        };
        if self.input_shape.is_empty() || self.input_shape.contains(&0) {
            return Err(invalid(format!(
                "input_shape {:?} must be non-empty with positive dimensions",
                self.input_shape
            )));
        }
        let features = self
            .input_features()
            .filter(|&f| i64::try_from(f).is_ok())
            .ok_or_else(|| invalid(format!("input_shape {:?} is too large", self.input_shape)))?;
        if self.num_classes < 2 {
            return Err(invalid(format!(
                "num_classes must be at least 2, found {}",
                self.num_classes
            )));
        }
        if self.hidden.contains(&0) {
            return Err(invalid(format!(
                "hidden layer widths {:?} must be positive",
                self.hidden
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid(format!(
                "dropout must lie in [0, 1), found {}",
                self.dropout
            )));
        }
        Ok(features)
    }
}

/// A registry entry: a name, what the model is for, and how to build it under a VarStore path.
pub struct ModelEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub build: fn(&ModelSpec, &nn::Path) -> Result<Net, ModelError>,
}

/// Every model a job may name.
pub const MODELS: &[ModelEntry] = &[
    ModelEntry {
        name: "mlp",
        description: "multilayer perceptron for tabular data: hidden linear layers with ReLU \
                      (and dropout), then a linear output layer",
        build: build_mlp,
    },
    ModelEntry {
        name: "cnn",
        description: "small convolutional network for [channels, height, width] images: two \
                      3×3 conv + ReLU + 2×2 max-pool blocks, hidden linear layers, linear output",
        build: build_cnn,
    },
];

/// The registry's model names, in registry order.
pub fn known_models() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// What kind of input a registered model takes, and so which registry builds it and which
/// training loop runs it: layer networks ([`MODELS`]) take feature rows and are built from a
/// [`ModelSpec`]; language models ([`crate::lm::registry::LANGUAGE_MODELS`]) take token ids and
/// are built from a [`crate::lm::config::DecoderConfig`] or a Hugging Face checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    Layers,
    Language,
}

/// The family of the registered model `name`, or `None` for an unknown name.
pub fn family_of(name: &str) -> Option<ModelFamily> {
    if MODELS.iter().any(|m| m.name == name) {
        Some(ModelFamily::Layers)
    } else if crate::lm::registry::LANGUAGE_MODELS
        .iter()
        .any(|m| m.name == name)
    {
        Some(ModelFamily::Language)
    } else {
        None
    }
}

/// Builds the named model's layers under `vs`, creating its parameters there.
pub fn build(name: &str, spec: &ModelSpec, vs: &nn::Path) -> Result<Net, ModelError> {
    let entry = MODELS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| ModelError::UnknownModel {
            name: name.to_owned(),
            known: known_models().join(", "),
        })?;
    (entry.build)(spec, vs)
}

/// `size` as the i64 libtorch wants; callers have checked sizes against `i64::MAX` already via
/// [`ModelSpec::check_common`], so saturation never happens in practice.
fn dim(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

/// Appends the hidden layers `fc0`, `fc1`, ... and the output layer `out`.
fn dense_head(layers: &mut Vec<Layer>, spec: &ModelSpec, vs: &nn::Path, in_features: usize) {
    let mut width = in_features;
    for (i, &hidden) in spec.hidden.iter().enumerate() {
        layers.push(Layer::Linear(nn::linear(
            vs / format!("fc{i}"),
            dim(width),
            dim(hidden),
            Default::default(),
        )));
        layers.push(Layer::Relu);
        if spec.dropout > 0.0 {
            layers.push(Layer::Dropout(spec.dropout));
        }
        width = hidden;
    }
    layers.push(Layer::Linear(nn::linear(
        vs / "out",
        dim(width),
        dim(spec.num_classes),
        Default::default(),
    )));
}

fn build_mlp(spec: &ModelSpec, vs: &nn::Path) -> Result<Net, ModelError> {
    let in_features = spec.check_common("mlp")?;
    // Image-shaped inputs are accepted too: the MLP sees them flattened.
    let mut layers = vec![Layer::Flatten];
    dense_head(&mut layers, spec, vs, in_features);
    Ok(LayerNet { layers })
}

fn build_cnn(spec: &ModelSpec, vs: &nn::Path) -> Result<Net, ModelError> {
    spec.check_common("cnn")?;
    let invalid = |reason: String| ModelError::InvalidSpec {
        model: "cnn".into(),
        reason,
    };
    let &[channels, height, width] = spec.input_shape.as_slice() else {
        return Err(invalid(format!(
            "input_shape must be [channels, height, width], found {:?}",
            spec.input_shape
        )));
    };
    // Two 2×2 pools halve each side twice; below 4 pixels nothing is left.
    if height < 4 || width < 4 {
        return Err(invalid(format!(
            "images must be at least 4×4 pixels, found {height}×{width}"
        )));
    }
    let [c1, c2] = spec.conv_channels;
    if c1 == 0 || c2 == 0 {
        return Err(invalid(format!(
            "conv_channels {:?} must be positive",
            spec.conv_channels
        )));
    }
    const KERNEL: i64 = 3;
    const PADDING: i64 = 1;
    let same_padding = nn::ConvConfig {
        padding: PADDING,
        ..Default::default()
    };
    let mut layers = vec![
        // Rows arrive flattened; restore [batch, channels, height, width].
        Layer::View(vec![-1, dim(channels), dim(height), dim(width)]),
        Layer::Conv2d {
            conv: nn::conv2d(vs / "conv1", dim(channels), dim(c1), KERNEL, same_padding),
            kernel: KERNEL,
            padding: PADDING,
        },
        Layer::Relu,
        Layer::MaxPool2,
        Layer::Conv2d {
            conv: nn::conv2d(vs / "conv2", dim(c1), dim(c2), KERNEL, same_padding),
            kernel: KERNEL,
            padding: PADDING,
        },
        Layer::Relu,
        Layer::MaxPool2,
        Layer::Flatten,
    ];
    let flat = c2 * (height / 4) * (width / 4);
    dense_head(&mut layers, spec, vs, flat);
    Ok(LayerNet { layers })
}

/// Re-draws every variable in `vs` from an RNG seeded with `seed`, in name order.
///
/// Weights and biases are uniform in ±1/√fan_in, PyTorch's default for linear and convolution
/// layers (fan_in = input features × kernel size; a bias uses its sibling weight's fan_in).
/// Values are generated on the CPU in f32 and copied, so they do not depend on the device.
pub fn seeded_init(vs: &nn::VarStore, seed: u64) -> Result<(), ModelError> {
    let torch = |context: String| move |source| ModelError::Torch { context, source };
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    for name in names {
        let tensor = &variables[name];
        let shape = tensor.size();
        let fan_in = fan_in_of(name, &shape, &variables);
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let numel = shape.iter().product::<i64>().max(0) as usize;
        let values: Vec<f32> = (0..numel)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let fresh = Tensor::f_from_slice(&values)
            .and_then(|t| t.f_view(shape.as_slice()))
            .and_then(|t| t.f_to_kind(tensor.kind()))
            .and_then(|t| t.f_to_device(tensor.device()))
            .map_err(torch(format!("initialising {name}")))?;
        let mut target = tensor.shallow_clone();
        tch::no_grad(|| target.f_copy_(&fresh)).map_err(torch(format!("initialising {name}")))?;
    }
    Ok(())
}

fn fan_in_of(
    name: &str,
    shape: &[i64],
    variables: &std::collections::HashMap<String, Tensor>,
) -> i64 {
    if shape.len() >= 2 {
        return shape[1..].iter().product();
    }
    if let Some(prefix) = name.strip_suffix(".bias")
        && let Some(weight) = variables.get(&format!("{prefix}.weight"))
    {
        let weight_shape = weight.size();
        if weight_shape.len() >= 2 {
            return weight_shape[1..].iter().product();
        }
    }
    shape.iter().product()
}

/// A built network, its parameters and what it was built from.
pub struct Model {
    name: String,
    spec: ModelSpec,
    vs: nn::VarStore,
    net: Net,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("device", &self.vs.device())
            .field("parameters", &self.vs.len())
            .finish()
    }
}

impl Model {
    /// Builds the registry's `name` model on `device`, its parameters drawn by [`seeded_init`]
    /// from `init_seed`. A site then usually overwrites them with the round's global weights
    /// ([`crate::weights::load_weights`]).
    pub fn new(
        name: &str,
        spec: ModelSpec,
        device: Device,
        init_seed: u64,
    ) -> Result<Model, ModelError> {
        let vs = nn::VarStore::new(device);
        let net = build(name, &spec, &vs.root())?;
        seeded_init(&vs, init_seed)?;
        Ok(Model {
            name: name.to_owned(),
            spec,
            vs,
            net,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn net(&self) -> &dyn nn::ModuleT {
        &self.net
    }

    /// The network as layers, for DP-SGD's traced forward pass.
    pub fn layers(&self) -> &LayerNet {
        &self.net
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Parameter names, sorted.
    pub fn parameter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.vs.variables().into_keys().collect();
        names.sort();
        names
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.vs
            .variables()
            .values()
            .map(|t| t.size().iter().product::<i64>().max(0) as usize)
            .sum()
    }
}
