//! A LoRA job's published model as a PEFT adapter directory (`tutela model export-adapter`).
//!
//! Under FFA-LoRA the federation trains and publishes only the adapters' `B` (PEFT names,
//! `base_model.model.<path>.lora_B.weight`); every `A` is frozen at the value each site derives
//! from the job's seed and the module's path ([`init_lora_a`]), with the shape
//! `[rank, in_features]` of the base's module. So the directory PEFT and `tutela model merge`
//! read is rebuilt here without libtorch: `adapter_config.json` from the job's `[lora]`
//! ([`LoraSpec::peft_config_json`]), and `adapter_model.safetensors` with, for each published
//! `B`, the module's `A` (its `in_features` read from the base checkpoint's header) and the `B`
//! as published, in name order.

use std::path::Path;

use safetensors::Dtype;

use crate::checkpoint::{CheckpointError, SafetensorsReader, SafetensorsWriter};
use crate::lora::{LoraFactor, LoraSpec, init_lora_a, lora_a_name, parse_adapter_name};

/// What [`export_peft_adapter`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftExport {
    /// Adapted modules (each with its A and B).
    pub modules: usize,
}

fn adapter_error(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::Adapter {
        path: path.to_owned(),
        reason,
    }
}

/// Writes `output/adapter_config.json` and `output/adapter_model.safetensors` for the adapters
/// `published` (a safetensors file of `B` tensors, the LoRA job's final model) of a job with
/// `lora` and `seed`, on the base checkpoint in `base_dir` (a single `model.safetensors`).
pub fn export_peft_adapter(
    lora: &LoraSpec,
    seed: u64,
    published: &Path,
    base_dir: &Path,
    output: &Path,
) -> Result<PeftExport, CheckpointError> {
    let mut adapters = SafetensorsReader::open(published)?;
    let base_file = base_dir.join("model.safetensors");
    let base = SafetensorsReader::open(&base_file)?;
    let rank = lora.rank as usize;
    // (A name, A shape, A values) and (B name, B shape) per module, in the published order.
    let mut modules = Vec::new();
    for name in adapters.names() {
        let (path, factor) = parse_adapter_name(&name).ok_or_else(|| {
            adapter_error(
                published,
                format!("{name:?} is not a LoRA adapter tensor (PEFT naming)"),
            )
        })?;
        if factor != LoraFactor::B {
            return Err(adapter_error(
                published,
                format!("{name:?} is an A: a federated LoRA model publishes B only"),
            ));
        }
        let Some(info) = adapters.info(&name) else {
            continue;
        };
        if info.dtype != Dtype::F32 || info.shape.len() != 2 || info.shape[1] != rank {
            return Err(adapter_error(
                published,
                format!(
                    "{name:?} is {:?} {:?}; the job's B is F32 [out, {rank}]",
                    info.dtype, info.shape
                ),
            ));
        }
        let weight = format!("{path}.weight");
        let base_info = base.info(&weight).ok_or_else(|| {
            adapter_error(
                &base_file,
                format!("the base has no {weight:?}, which the adapter {name:?} adapts"),
            )
        })?;
        if base_info.shape.len() != 2 || base_info.shape[0] != info.shape[0] {
            return Err(adapter_error(
                &base_file,
                format!(
                    "{weight:?} is {:?}; the adapter {name:?} needs [{}, in]",
                    base_info.shape, info.shape[0]
                ),
            ));
        }
        let in_features = base_info.shape[1];
        modules.push((
            path.to_string(),
            name.clone(),
            info.shape.clone(),
            in_features,
        ));
    }
    if modules.is_empty() {
        return Err(adapter_error(published, "holds no adapter".into()));
    }
    std::fs::create_dir_all(output).map_err(|source| CheckpointError::Io {
        path: output.to_owned(),
        source,
    })?;
    let config = output.join("adapter_config.json");
    let json = serde_json::to_vec_pretty(&lora.peft_config_json())
        .map_err(|e| adapter_error(&config, e.to_string()))?;
    std::fs::write(&config, json).map_err(|source| CheckpointError::Io {
        path: config.clone(),
        source,
    })?;
    let mut tensors = Vec::with_capacity(2 * modules.len());
    for (path, b_name, b_shape, in_features) in &modules {
        tensors.push((lora_a_name(path), Dtype::F32, vec![rank, *in_features]));
        tensors.push((b_name.clone(), Dtype::F32, b_shape.clone()));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let file = output.join("adapter_model.safetensors");
    let mut writer = SafetensorsWriter::create(&file, &tensors, None)?;
    for (name, _, _) in &tensors {
        let bytes = match parse_adapter_name(name) {
            Some((path, LoraFactor::A)) => {
                let in_features = modules
                    .iter()
                    .find(|m| m.0 == path)
                    .map(|m| m.3)
                    .unwrap_or_default();
                init_lora_a(seed, path, rank, in_features)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            }
            _ => adapters.read_bytes(name)?,
        };
        writer.write_next(name, &bytes)?;
    }
    writer.finish()?;
    Ok(PeftExport {
        modules: modules.len(),
    })
}
