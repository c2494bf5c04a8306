//! [`LoraLinear`]: a frozen Linear layer plus a low-rank adapter, `y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`
//! with `s = alpha / r`, `A: [r, in]`, `B: [out, r]`.
//!
//! The aggregation rule is FFA-LoRA (`tutela_protocol::lora`): `A` is frozen at the shared
//! seeded initialisation [`tutela_protocol::lora::init_lora_a`] and only `B` is trained; `B`
//! starts at zero, so a fresh adapter gives the base model exactly. [`LoraLinear::new_trainable_a`]
//! builds a layer whose `A` trains too (for other rules and for the tests of the per-example
//! gradients of both factors).
//!
//! For DP-SGD ([`dp`]) a layer can record, on a shared [`LoraTape`], its input `x`,
//! `h = x Aᵀ` (both detached) and its output `y` (in the graph): the per-example gradients of `B`
//! and `A` are then sums over positions of `g_t (A x_t)ᵀ` and `(Bᵀ g_t) x_tᵀ`, with `g = ∂L/∂y`.
//!
//! Adapters are saved and loaded in PEFT's layout (`adapter_config.json`,
//! `adapter_model.safetensors` with `base_model.model.<path>.lora_A.weight` / `lora_B.weight`),
//! so `peft` loads what a site trains.

pub mod bench;
pub mod dp;
pub mod stack;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};
use tutela_protocol::lora::{LoraSpec, init_lora_a, lora_a_name, lora_b_name};

/// Why an adapter could not be built, saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA layer {path:?}: {reason}")]
    Shape { path: String, reason: String },
    #[error("adapter file: {0}")]
    File(String),
    #[error("{context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
}

impl From<tch::TchError> for LoraError {
    fn from(source: tch::TchError) -> Self {
        LoraError::Torch {
            context: "LoRA tensor operation".into(),
            source,
        }
    }
}

/// What one [`LoraLinear`] forward recorded for per-example clipping.
#[derive(Debug)]
pub struct LoraRecord {
    /// Which layer (its index in the model's [`dp::AdapterModel::lora_layers`]
    /// order is found by this path).
    pub path: String,
    /// The layer's input `[.., in]`, detached.
    pub input: Tensor,
    /// `x Aᵀ` `[.., r]`, detached.
    pub projected: Tensor,
    /// The layer's output `[.., out]`, in the graph: the per-example gradients start from
    /// `∂L/∂output`.
    pub output: Tensor,
}

/// A recorder shared by a model's LoRA layers: while [`LoraTape::start`]ed, every forward of a
/// layer built with this tape appends a [`LoraRecord`]. Cloning shares the recorder.
#[derive(Debug, Clone, Default)]
pub struct LoraTape(Arc<Mutex<Option<Vec<LoraRecord>>>>);

impl LoraTape {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts recording (dropping anything recorded before).
    pub fn start(&self) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(Vec::new());
        }
    }

    /// Stops recording and returns the records, in forward order.
    pub fn take(&self) -> Vec<LoraRecord> {
        self.0
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .unwrap_or_default()
    }

    fn record(&self, record: impl FnOnce() -> LoraRecord) {
        if let Ok(mut slot) = self.0.lock()
            && let Some(records) = slot.as_mut()
        {
            records.push(record());
        }
    }
}

/// A frozen Linear layer with a LoRA adapter (module documentation).
#[derive(Debug)]
pub struct LoraLinear {
    path: String,
    weight: Tensor,
    bias: Option<Tensor>,
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
    train_a: bool,
    tape: LoraTape,
}

impl LoraLinear {
    /// Wraps the frozen `weight` `[out, in]` (and `bias` `[out]`) at module `path` with an
    /// FFA-LoRA adapter: `A` from the job's `seed` and `path` (frozen), `B = 0` (trained), in
    /// the weight's kind and device.
    pub fn new(
        path: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        spec: &LoraSpec,
        seed: u64,
        tape: &LoraTape,
    ) -> Result<Self, LoraError> {
        Self::build(path, weight, bias, spec, seed, tape, false)
    }

    /// As [`LoraLinear::new`], but `A` is trained too.
    pub fn new_trainable_a(
        path: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        spec: &LoraSpec,
        seed: u64,
        tape: &LoraTape,
    ) -> Result<Self, LoraError> {
        Self::build(path, weight, bias, spec, seed, tape, true)
    }

    fn build(
        path: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        spec: &LoraSpec,
        seed: u64,
        tape: &LoraTape,
        train_a: bool,
    ) -> Result<Self, LoraError> {
        let (out, input) = match weight.size().as_slice() {
            [o, i] => (*o, *i),
            other => {
                return Err(LoraError::Shape {
                    path: path.into(),
                    reason: format!("the base weight has shape {other:?}, not [out, in]"),
                });
            }
        };
        if let Some(b) = bias
            && b.size() != [out]
        {
            return Err(LoraError::Shape {
                path: path.into(),
                reason: format!("the bias has shape {:?}, not [{out}]", b.size()),
            });
        }
        let rank = i64::from(spec.rank);
        let options = (weight.kind(), weight.device());
        let a_values = init_lora_a(seed, path, rank as usize, input as usize);
        let a = Tensor::f_from_slice(&a_values)?
            .f_view([rank, input])?
            .f_to_kind(weight.kind())?
            .f_to_device(weight.device())?
            .set_requires_grad(train_a);
        let b = Tensor::f_zeros([out, rank], options)?.set_requires_grad(true);
        Ok(LoraLinear {
            path: path.to_owned(),
            weight: weight.detach(),
            bias: bias.map(Tensor::detach),
            a,
            b,
            scaling: spec.scaling(),
            dropout: spec.dropout,
            train_a,
            tape: tape.clone(),
        })
    }

    /// The module's path (`model.layers.0.self_attn.q_proj`).
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn a(&self) -> &Tensor {
        &self.a
    }

    pub fn b(&self) -> &Tensor {
        &self.b
    }

    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    pub fn trains_a(&self) -> bool {
        self.train_a
    }

    /// The tensors an optimizer steps: `B`, then `A` when it trains.
    pub fn trainable(&self) -> Vec<Tensor> {
        let mut t = vec![self.b.shallow_clone()];
        if self.train_a {
            t.push(self.a.shallow_clone());
        }
        t
    }

    /// Overwrites `B` (and `A`) in place, e.g. with the round's global adapter.
    pub fn set_factors(&mut self, b: &Tensor, a: Option<&Tensor>) -> Result<(), LoraError> {
        let check = |name: &str, have: &Tensor, new: &Tensor| {
            if have.size() == new.size() {
                Ok(())
            } else {
                Err(LoraError::Shape {
                    path: self.path.clone(),
                    reason: format!(
                        "{name} has shape {:?}, the layer's is {:?}",
                        new.size(),
                        have.size()
                    ),
                })
            }
        };
        check("B", &self.b, b)?;
        if let Some(a) = a {
            check("A", &self.a, a)?;
        }
        tch::no_grad(|| -> Result<(), tch::TchError> {
            self.b.f_copy_(b)?;
            if let Some(a) = a {
                self.a.f_copy_(a)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// `y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`, recording on the tape when it is started. An
    /// input whose last dimension is not the layer's `in` is an error, not a panic.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor, LoraError> {
        let base = x.f_linear(&self.weight, self.bias.as_ref())?;
        let adapter_input = if train && self.dropout > 0.0 {
            x.f_dropout(self.dropout, true)?
        } else {
            x.shallow_clone()
        };
        let projected = adapter_input.f_matmul(&self.a.f_tr()?)?;
        let output = base.f_add(
            &projected
                .f_matmul(&self.b.f_tr()?)?
                .f_mul_scalar(self.scaling)?,
        )?;
        self.tape.record(|| LoraRecord {
            path: self.path.clone(),
            input: x.detach(),
            projected: projected.detach(),
            output: output.shallow_clone(),
        });
        Ok(output)
    }

    /// `W + s · B·A`: the merged weight, in the weight's kind.
    pub fn merged_weight(&self) -> Result<Tensor, LoraError> {
        Ok(tch::no_grad(|| -> Result<Tensor, tch::TchError> {
            self.weight
                .f_add(&self.b.f_matmul(&self.a)?.f_mul_scalar(self.scaling)?)
        })?)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32) for `layers`, in
/// PEFT's layout.
pub fn save_peft_adapter(
    dir: &Path,
    layers: &[&LoraLinear],
    spec: &LoraSpec,
) -> Result<(), LoraError> {
    let file = |e: &dyn std::fmt::Display| LoraError::File(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| file(&e))?;
    let config = serde_json::to_string_pretty(&spec.peft_config_json()).map_err(|e| file(&e))?;
    std::fs::write(dir.join("adapter_config.json"), config).map_err(|e| file(&e))?;
    let mut named = Vec::new();
    for layer in layers {
        named.push((lora_a_name(&layer.path), layer.a.shallow_clone()));
        named.push((lora_b_name(&layer.path), layer.b.shallow_clone()));
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .into_iter()
        .map(|(name, t)| -> Result<_, LoraError> {
            let t = t
                .f_detach()?
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?
                .f_contiguous()?;
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let values = Vec::<f32>::try_from(t.f_view([-1])?)?;
            Ok((
                name,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ))
        })
        .collect::<Result<_, _>>()?;
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| file(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(
        views,
        Some(metadata),
        &dir.join("adapter_model.safetensors"),
    )
    .map_err(|e| file(&e))
}

/// Loads `B` (and `A`) of every layer from a PEFT adapter file; every layer must be in it.
pub fn load_peft_adapter(file: &Path, layers: &mut [&mut LoraLinear]) -> Result<(), LoraError> {
    let bytes = std::fs::read(file).map_err(|e| LoraError::File(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| LoraError::File(e.to_string()))?;
    let read = |name: &str, like: &Tensor| -> Result<Tensor, LoraError> {
        let view = st
            .tensor(name)
            .map_err(|_| LoraError::File(format!("{name:?} is missing")))?;
        let values = tutela_protocol::checkpoint::to_f32(view.dtype(), view.data())
            .ok_or_else(|| LoraError::File(format!("{name:?} is not a float tensor")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_slice(&values)?
            .f_view(shape.as_slice())?
            .f_to_kind(like.kind())?
            .f_to_device(like.device())?)
    };
    for layer in layers.iter_mut() {
        let b = read(&lora_b_name(&layer.path), &layer.b)?;
        let a = read(&lora_a_name(&layer.path), &layer.a)?;
        layer.set_factors(&b, Some(&a))?;
    }
    Ok(())
}

/// The adapter tensors that travel in a round's update, as wire tensors (f32, PEFT names, in
/// layer order): each layer's `B`, and its `A` only when `A` trains. Under FFA-LoRA that is `B`
/// alone: every site derives `A` from the job's seed, so it never needs to travel.
pub fn adapter_update_tensors(
    layers: &[&LoraLinear],
) -> Result<Vec<(tutela_protocol::tensor::TensorSpec, Vec<u8>)>, LoraError> {
    let mut out = Vec::new();
    for layer in layers {
        let mut factors = vec![(lora_b_name(&layer.path), &layer.b)];
        if layer.train_a {
            factors.push((lora_a_name(&layer.path), &layer.a));
        }
        for (name, t) in factors {
            let host = t
                .f_detach()?
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?
                .f_contiguous()?;
            let shape: Vec<u64> = host.size().iter().map(|&d| d.max(0) as u64).collect();
            let values = Vec::<f32>::try_from(host.f_view([-1])?)?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.push((
                tutela_protocol::tensor::TensorSpec::new(
                    name,
                    tutela_protocol::tensor::DType::F32,
                    shape,
                ),
                bytes,
            ));
        }
    }
    Ok(out)
}

/// Overwrites the layers' travelling tensors ([`adapter_update_tensors`]) with `tensors`, which
/// must name exactly those tensors, f32, with the layers' shapes. Nothing is written unless all
/// match.
pub fn load_adapter_update(
    layers: &mut [&mut LoraLinear],
    tensors: &[(tutela_protocol::tensor::TensorSpec, Vec<u8>)],
) -> Result<(), LoraError> {
    let mut by_name: HashMap<&str, &(tutela_protocol::tensor::TensorSpec, Vec<u8>)> =
        HashMap::with_capacity(tensors.len());
    for entry in tensors {
        if by_name.insert(entry.0.name.as_str(), entry).is_some() {
            return Err(LoraError::File(format!("{:?} appears twice", entry.0.name)));
        }
    }
    let mut expected = Vec::new();
    for layer in layers.iter() {
        expected.push((lora_b_name(&layer.path), layer.b.size()));
        if layer.train_a {
            expected.push((lora_a_name(&layer.path), layer.a.size()));
        }
    }
    if expected.len() != by_name.len() {
        let unexpected: Vec<&str> = by_name
            .keys()
            .filter(|n| !expected.iter().any(|(e, _)| e == *n))
            .copied()
            .collect();
        return Err(LoraError::File(format!(
            "the update holds {} tensors, the adapters {} (unexpected: {unexpected:?})",
            by_name.len(),
            expected.len()
        )));
    }
    let mut decoded = Vec::with_capacity(expected.len());
    for (name, shape) in &expected {
        let (spec, bytes) = by_name
            .get(name.as_str())
            .ok_or_else(|| LoraError::File(format!("{name:?} is missing from the update")))?;
        let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        if spec.dtype != tutela_protocol::tensor::DType::F32 || spec.shape != want {
            return Err(LoraError::File(format!(
                "{name:?} is {} {:?}, the adapter's is f32 {want:?}",
                spec.dtype, spec.shape
            )));
        }
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if values.len() as i64 != shape.iter().product::<i64>() {
            return Err(LoraError::File(format!(
                "{name:?} has the wrong number of bytes"
            )));
        }
        decoded.push(Tensor::f_from_slice(&values)?.f_view(shape.as_slice())?);
    }
    let mut next = decoded.into_iter();
    for layer in layers.iter_mut() {
        let b = next
            .next()
            .ok_or_else(|| LoraError::File("update too short".into()))?;
        let b = b.f_to_kind(layer.b.kind())?.f_to_device(layer.b.device())?;
        if layer.train_a {
            let a = next
                .next()
                .ok_or_else(|| LoraError::File("update too short".into()))?;
            let a = a.f_to_kind(layer.a.kind())?.f_to_device(layer.a.device())?;
            layer.set_factors(&b, Some(&a))?;
        } else {
            layer.set_factors(&b, None)?;
        }
    }
    Ok(())
}
