//! `tutela-node lm ...`: part of the binary (`main.rs`), not of the library: argument parsing
//! and printing around `tutela_site_node::lm` (perplexity, `lm::central` for pretraining and
//! fine-tuning).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use tutela_site_node::lm::central::{self, FinetuneOptions, PretrainOptions};

use super::{DeviceArg, checkpoint_dir, encode_for, load_tokenizer, tokenizer_path};

#[derive(Subcommand)]
pub enum LmCommand {
    /// Prints the digest that names a Hugging Face checkpoint directory (a job's
    /// `[model] base_sha256`): SHA-256 over the canonical config.json and every tensor.
    Digest {
        /// The checkpoint directory (config.json, model.safetensors or its shards).
        dir: PathBuf,
    },
    /// Prints `perplexity = X` of a Hugging Face checkpoint on a text file, in windows of at
    /// most --window tokens advancing by --stride (each token scored once). An INT8 export
    /// (`tutela model export-int8`) is scored dequantized.
    Perplexity {
        /// The checkpoint directory (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// The tokenizer (tokenizer.json); default: the one in the --model directory, where
        /// `lm pretrain`, `tutela model merge` and Hugging Face checkpoints keep it.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The text to score (UTF-8).
        #[arg(long)]
        text: PathBuf,
        /// Tokens per window; default: the model's max_position_embeddings, at most 512.
        #[arg(long)]
        window: Option<usize>,
        /// Tokens the window advances by; default: half the window.
        #[arg(long)]
        stride: Option<usize>,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
    /// Trains every parameter of a small base from a seeded random init on a text file (e.g.
    /// data/tinyshakespeare.txt) and writes a Hugging Face checkpoint (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json) that `lm perplexity`,
    /// `generate` and transformers load. The text's last --validation-fraction is held out and
    /// its perplexity reported before and after.
    Pretrain {
        /// Plain UTF-8 text.
        #[arg(long)]
        text: PathBuf,
        /// The tokenizer (tokenizer.json, `tutela-node tokenizer train`).
        #[arg(long)]
        tokenizer: PathBuf,
        /// The model's config.json (transformers' Llama keys; vocab_size must hold the
        /// tokenizer's ids).
        #[arg(long)]
        config: PathBuf,
        /// The checkpoint directory to write.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 500)]
        steps: u64,
        /// Tokens per training window (at most the model's max_position_embeddings).
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        /// Windows per step.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 0.1)]
        validation_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// One site's LoRA fine-tune of a base on a text dataset, DP or not, on the federated
    /// round's loop (text protection pipeline, windows by privacy unit, Poisson sampling,
    /// per-unit clipping and the project's noise with --epsilon). Writes the PEFT adapter to
    /// --output and, with --merged, base + adapter as a full checkpoint.
    Finetune {
        /// The base checkpoint directory.
        #[arg(long)]
        base: PathBuf,
        /// The tokenizer (tokenizer.json).
        #[arg(long)]
        tokenizer: PathBuf,
        /// A JSON Lines file (field `text`), or a TOML file with one text dataset's keys (those
        /// of node.toml's `[text_datasets.<name>]`, relative paths from the file's directory).
        #[arg(long)]
        dataset: PathBuf,
        /// JSON Lines: the field naming each document's patient (split by patient).
        #[arg(long)]
        patient_field: Option<String>,
        /// The PEFT adapter directory to write.
        #[arg(long)]
        output: PathBuf,
        /// Also write the merged model (base + adapter) here.
        #[arg(long)]
        merged: Option<PathBuf>,
        /// DP-SGD at this ε (calibrated σ); without it, no DP.
        #[arg(long)]
        epsilon: Option<f64>,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Per-unit clipping norm C.
        #[arg(long, default_value_t = 1.0)]
        clip: f64,
        /// The privacy unit: document or patient.
        #[arg(long, default_value = "document")]
        unit: String,
        #[arg(long, default_value_t = 8)]
        rank: u32,
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Target modules, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        )]
        targets: Vec<String>,
        #[arg(long, default_value_t = 1)]
        epochs: u32,
        /// Privacy units per step (expected, under DP).
        #[arg(long, default_value_t = 16)]
        batch_size: u32,
        #[arg(long, default_value_t = 128)]
        seq_len: u32,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        #[arg(long)]
        quiet: bool,
    },
}

/// A progress bar over steps that shows the last loss (hidden with `quiet`).
fn step_bar(quiet: bool, what: &str) -> anyhow::Result<indicatif::ProgressBar> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} steps, {msg}",
    )?);
    bar.set_prefix(what.to_string());
    Ok(bar)
}

pub fn run(command: LmCommand) -> anyhow::Result<()> {
    match command {
        LmCommand::Digest { dir } => {
            let digest = tutela_site_node::lm::hf::checkpoint_digest(&dir)
                .with_context(|| format!("digesting the checkpoint {}", dir.display()))?;
            println!("{digest}  {}", dir.display());
            Ok(())
        }
        LmCommand::Perplexity {
            model,
            tokenizer,
            text,
            window,
            stride,
            device,
        } => {
            let tokenizer = tokenizer_path(tokenizer, &checkpoint_dir(&model)?)?;
            lm_perplexity(&model, &tokenizer, &text, window, stride, device.device()?)
        }
        LmCommand::Pretrain {
            text,
            tokenizer,
            config,
            output,
            steps,
            seq_len,
            lr,
            batch_size,
            validation_fraction,
            seed,
            device,
            quiet,
        } => {
            let bar = step_bar(quiet, "pretraining")?;
            let report = central::pretrain(
                &PretrainOptions {
                    text,
                    tokenizer,
                    config,
                    output: output.clone(),
                    steps,
                    seq_len,
                    learning_rate: lr,
                    batch_size,
                    validation_fraction,
                    seed,
                    device: device.device()?,
                },
                &mut |done, total, loss| {
                    bar.set_length(total);
                    bar.set_position(done);
                    bar.set_message(format!("loss {loss:.3}"));
                },
            )?;
            bar.finish_and_clear();
            eprintln!(
                "{} parameters, {} steps in {:.1} s ({:.0} tokens/s); held-out perplexity {:.2} -> {:.2}",
                report.parameters,
                report.steps,
                report.seconds,
                report.tokens_per_second,
                report.validation_before.perplexity,
                report.validation_after.perplexity
            );
            println!("{}", output.display());
            Ok(())
        }
        LmCommand::Finetune {
            base,
            tokenizer,
            dataset,
            patient_field,
            output,
            merged,
            epsilon,
            delta,
            clip,
            unit,
            rank,
            alpha,
            targets,
            epochs,
            batch_size,
            seq_len,
            lr,
            seed,
            device,
            quiet,
        } => {
            let bar = step_bar(quiet, "fine-tuning")?;
            let report = central::finetune(
                &FinetuneOptions {
                    base,
                    tokenizer,
                    dataset,
                    patient_field,
                    output: output.clone(),
                    merged,
                    epsilon,
                    delta,
                    clip,
                    unit,
                    rank,
                    alpha,
                    targets,
                    epochs,
                    batch_size,
                    seq_len,
                    learning_rate: lr,
                    seed,
                    device: device.device()?,
                },
                &mut |done, total, loss| {
                    bar.set_length(total);
                    bar.set_position(done);
                    bar.set_message(format!("loss {loss:.3}"));
                },
            )?;
            bar.finish_and_clear();
            let privacy = match (report.epsilon, report.noise_multiplier) {
                (Some(e), Some(z)) => format!("ε = {e:.3} at δ = {delta:e} (σ = {z:.3})"),
                _ => "no DP".to_string(),
            };
            eprintln!(
                "{} units ({} documents), {} steps, {} tokens in {:.1} s, {privacy}; adapter {} \
                 parameters ({} bytes f32) on a base of {}; validation perplexity {:.2} -> {:.2}",
                report.train_units,
                report.train_documents,
                report.steps,
                report.tokens,
                report.seconds,
                report.adapter_parameters,
                report.adapter_parameters * 4,
                report.base_parameters,
                report.validation_before.perplexity,
                report.validation_after.perplexity
            );
            println!("perplexity = {:.4}", report.validation_after.perplexity);
            Ok(())
        }
    }
}

fn lm_perplexity(
    model_dir: &std::path::Path,
    tokenizer: &std::path::Path,
    text: &std::path::Path,
    window: Option<usize>,
    stride: Option<usize>,
    device: tch::Device,
) -> anyhow::Result<()> {
    use tutela_site_node::lm::{generate, hf};
    // An INT8 export is scored dequantized (its perplexity cost against the f32 model).
    let model = if hf::is_int8_export(model_dir) {
        hf::load_int8_checkpoint(model_dir, device)?
    } else {
        hf::load_checkpoint(model_dir, device, tch::Kind::Float)?
    };
    let tokenizer = load_tokenizer(tokenizer)?;
    let text =
        std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let ids = encode_for(&model, &tokenizer, &text)?;
    let positions = model.config().max_position_embeddings;
    let window = window.unwrap_or(positions.min(512));
    // Positions past the ones the model was trained on score as if they were text it never saw
    // (RoPE extrapolates silently), which would make the perplexity say nothing of the model.
    anyhow::ensure!(
        window <= positions,
        "--window {window} is longer than the {positions} positions {} was trained on \
         (max_position_embeddings): use --window {positions} or less",
        model_dir.display()
    );
    let stride = stride.unwrap_or((window / 2).max(1));
    let bar = indicatif::ProgressBar::new(ids.len().saturating_sub(1) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "scoring [{elapsed_precise}] {wide_bar} {pos}/{len} tokens, {eta} left",
    )?);
    let result = generate::perplexity_with_progress(
        &model.decoder,
        &ids,
        window,
        stride,
        device,
        &mut |scored, _| bar.set_position(scored as u64),
    )?;
    bar.finish_and_clear();
    eprintln!(
        "{} tokens scored (window {window}, stride {stride}), mean NLL {:.4} nats",
        result.tokens, result.mean_nll
    );
    println!("perplexity = {:.4}", result.perplexity);
    Ok(())
}
