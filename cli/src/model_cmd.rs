//! `tutela model ...`: Hugging Face checkpoints on the operator's machine, without libtorch
//! (the arithmetic is `tutela_protocol::checkpoint`'s).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use tutela_protocol::checkpoint::{export_int8, merge_lora};
use tutela_protocol::job::JobSpec;
use tutela_protocol::peft_export::export_peft_adapter;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Merge a LoRA adapter (PEFT layout) into its base model: writes a full Hugging Face
    /// checkpoint with W' = W + (alpha / r) B A for every adapted module, in the base's dtype.
    Merge {
        /// The base model's directory (config.json, model.safetensors).
        #[arg(long)]
        base: PathBuf,
        /// The adapter's directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model (created; existing files are overwritten).
        #[arg(long)]
        output: PathBuf,
    },
    /// Write a LoRA job's published model (its adapters' B, as the coordinator published them)
    /// as a PEFT adapter directory that PEFT and `tutela model merge` read: each module's A is
    /// the one every site derived from the job's seed, shaped by the base's module.
    ExportAdapter {
        /// The job spec (TOML): its `[lora]` and `seed`.
        #[arg(long)]
        job: PathBuf,
        /// The published model (safetensors of the adapters' B).
        #[arg(long)]
        model: PathBuf,
        /// The base checkpoint's directory (config.json, model.safetensors).
        #[arg(long)]
        base: PathBuf,
        /// The PEFT directory to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Export a model with its Linear weights quantized to INT8 (per output channel,
    /// symmetric; format tutela-int8-v1, see docs/architecture.md).
    ExportInt8 {
        /// The model's directory (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Where to write the quantized model.
        #[arg(long)]
        output: PathBuf,
    },
    /// The coordinator's model registry: list, show, promote, rollback, fetch.
    #[command(flatten)]
    Registry(crate::registry_cmd::RegistryCommand),
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Registry(cmd) => return crate::block_on(crate::registry_cmd::run(cmd)),
        ModelCommand::Merge {
            base,
            adapter,
            output,
        } => {
            let report = merge_lora(&base, &adapter, &output).context("merging the adapter")?;
            println!(
                "merged {} adapted modules into {} tensors: {}",
                report.merged_modules,
                report.tensors,
                output.display()
            );
        }
        ModelCommand::ExportAdapter {
            job,
            model,
            base,
            output,
        } => {
            let text = std::fs::read_to_string(&job)
                .with_context(|| format!("reading the job spec {}", job.display()))?;
            let spec = JobSpec::from_toml_str(&text)
                .with_context(|| format!("the job spec {}", job.display()))?;
            let lora = spec
                .lora
                .as_ref()
                .with_context(|| format!("the job spec {} has no [lora]", job.display()))?;
            let report = export_peft_adapter(lora, spec.seed, &model, &base, &output)
                .context("exporting the adapter")?;
            println!(
                "wrote the PEFT adapter ({} modules, rank {}): {}",
                report.modules,
                lora.rank,
                output.display()
            );
        }
        ModelCommand::ExportInt8 { model, output } => {
            let report = export_int8(&model, &output).context("exporting INT8")?;
            println!(
                "quantized {} Linear weights, copied {} tensors: {} bytes -> {} bytes ({})",
                report.quantized,
                report.copied,
                report.bytes_in,
                report.bytes_out,
                output.display()
            );
        }
    }
    Ok(())
}
