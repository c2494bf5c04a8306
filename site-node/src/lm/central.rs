//! Central runs on the federated round's loop, for the demo and the benchmarks:
//! - [`pretrain`]: full-parameter training of a small base from a seeded random init on a
//!   plain text file (`tutela-node lm pretrain`), written as a Hugging Face checkpoint with its
//!   tokenizer files;
//! - [`finetune`]: one site's LoRA fine-tune on a text dataset, DP or not
//!   (`tutela-node lm finetune`): the job it would be is written as a job spec and read by
//!   [`LmJob`], and the same pieces as [`super::round::local_lm_round`] run (base by digest,
//!   text pipeline, windows by privacy unit, [`super::round::train::train_adapters`], the
//!   ledger's plan and accountant); the PEFT adapter is written, and the merged model on request.
//!
//! Progress goes to a callback `(step, steps, loss)` (the binary draws a bar).

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::OptimizerConfig;
use tch::{Device, Tensor};

use super::config::DecoderConfig;
use super::error::LmError;
use super::hf::{checkpoint_digest, save_checkpoint};
use super::llama::LanguageModel;
use super::round::data::{LmEval, evaluate};
use super::round::job::LmJob;
use super::round::train::{Progress, train_adapters};
use super::round::{LmRoundError, adapted_base, tokenize_dataset};
use super::text_dataset::{TextDataset, TextDatasetConfig};
use super::tokenizer::train::tokenizer_config_json;
use super::tokenizer::{SpecialTokens, TextTokenizer, TokenizerError};
use crate::ledger::RoundCharging;

/// Why a central run failed (local paths included: these run at the operator's console).
#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    #[error(transparent)]
    Model(#[from] LmError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Round(#[from] LmRoundError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CentralError {
    let path = path.to_path_buf();
    move |source| CentralError::Io { path, source }
}

/// Writes `tokenizer.json` (the bytes given) and the `tokenizer_config.json` transformers'
/// `AutoTokenizer` wants into a checkpoint directory.
fn write_tokenizer_files(dir: &Path, json: &[u8]) -> Result<(), CentralError> {
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).map_err(io(&path))?;
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, tokenizer_config_json(&SpecialTokens::default())).map_err(io(&path))
}

/// `tutela-node lm pretrain`'s settings.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    /// Plain UTF-8 text, read whole.
    pub text: PathBuf,
    pub tokenizer: PathBuf,
    /// A `config.json` of the model (transformers' keys; `vocab_size` must hold the tokenizer).
    pub config: PathBuf,
    pub output: PathBuf,
    pub steps: u64,
    /// Tokens per training window.
    pub seq_len: usize,
    pub learning_rate: f64,
    /// Windows per step.
    pub batch_size: usize,
    /// The last share of the text, held out to report perplexity.
    pub validation_fraction: f64,
    pub seed: u64,
    pub device: Device,
}

/// What a pretraining run did.
#[derive(Debug, Clone)]
pub struct PretrainReport {
    pub parameters: i64,
    pub train_tokens: usize,
    pub validation_before: LmEval,
    pub validation_after: LmEval,
    pub steps: u64,
    pub seconds: f64,
    /// Tokens trained on per second (every position of every window).
    pub tokens_per_second: f64,
}

/// The loss of `model` over consecutive windows of `ids` (each token scored once).
fn stream_eval(
    model: &LanguageModel,
    ids: &[i64],
    seq_len: usize,
    device: Device,
) -> Result<LmEval, CentralError> {
    let windows: Vec<Vec<Vec<i64>>> = super::round::data::cut_windows(ids, seq_len)
        .into_iter()
        .map(|w| vec![w])
        .collect();
    let data = super::round::data::UnitWindows {
        targets: windows.iter().map(|u| u[0].len() - 1).sum(),
        documents: 1,
        units: windows,
    };
    evaluate(&model.decoder, &data, 0, device)
        .map_err(|e| CentralError::Invalid(format!("validation: {e}")))
}

/// Trains every parameter of a fresh model (seeded init) on random windows of the text's
/// first `1 - validation_fraction`, with Adam, and writes the checkpoint and the tokenizer
/// files to `output`.
pub fn pretrain(
    options: &PretrainOptions,
    progress: Progress<'_>,
) -> Result<PretrainReport, CentralError> {
    let json = std::fs::read(&options.tokenizer).map_err(io(&options.tokenizer))?;
    let tokenizer = TextTokenizer::from_bytes(&json, &SpecialTokens::default())?;
    let config = DecoderConfig::load(&options.config)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(CentralError::Invalid(format!(
            "{}: vocab_size {} is smaller than the tokenizer's {} ids",
            options.config.display(),
            config.vocab_size,
            tokenizer.vocab_size()
        )));
    }
    let seq_len = options.seq_len.clamp(2, config.max_position_embeddings);
    let text = std::fs::read_to_string(&options.text).map_err(io(&options.text))?;
    let mut ids: Vec<i64> = vec![i64::from(tokenizer.bos_id())];
    ids.extend(tokenizer.encode(&text)?.into_iter().map(i64::from));
    let held = ((ids.len() as f64) * options.validation_fraction.clamp(0.0, 0.5)) as usize;
    let (train, validation) = ids.split_at(ids.len() - held);
    if train.len() < seq_len + 1 || validation.len() < 2 {
        return Err(CentralError::Invalid(format!(
            "{}: {} tokens are too few for windows of {seq_len} and a validation share",
            options.text.display(),
            ids.len()
        )));
    }
    let model = LanguageModel::new(&config, options.device, options.seed)?;
    let validation_before = stream_eval(&model, validation, seq_len, options.device)?;
    let mut optimizer = tch::nn::Adam::default()
        .build(&model.vs, options.learning_rate)
        .map_err(LmError::torch("creating the optimizer"))?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let batch = options.batch_size.max(1);
    let start = Instant::now();
    for step in 0..options.steps {
        let mut rows = Vec::with_capacity(batch * (seq_len + 1));
        for _ in 0..batch {
            let at = rng.random_range(0..train.len() - seq_len);
            rows.extend_from_slice(&train[at..at + seq_len + 1]);
        }
        let windows = Tensor::from_slice(&rows)
            .view([batch as i64, seq_len as i64 + 1])
            .to_device(options.device);
        let loss = model.decoder.loss(&windows, None)?;
        optimizer.zero_grad();
        loss.backward();
        optimizer.step();
        let value = loss.double_value(&[]);
        progress(step + 1, options.steps, value);
    }
    let seconds = start.elapsed().as_secs_f64();
    let validation_after = stream_eval(&model, validation, seq_len, options.device)?;
    save_checkpoint(&model, &options.output)?;
    write_tokenizer_files(&options.output, &json)?;
    let tokens = options.steps as f64 * (batch * seq_len) as f64;
    Ok(PretrainReport {
        parameters: model.parameter_count(),
        train_tokens: train.len(),
        validation_before,
        validation_after,
        steps: options.steps,
        seconds,
        tokens_per_second: tokens / seconds.max(1e-9),
    })
}

/// `tutela-node lm finetune`'s settings.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub base: PathBuf,
    pub tokenizer: PathBuf,
    /// A text dataset: a TOML file holding one `[text_datasets.<name>]`-style table (every key
    /// of node.toml's), or a JSON Lines file (field `text`, and `patient_field` when given).
    pub dataset: PathBuf,
    /// JSON Lines datasets: the field naming each note's patient (split and unit by patient).
    pub patient_field: Option<String>,
    pub output: PathBuf,
    /// Also write base + adapter as a full checkpoint here.
    pub merged: Option<PathBuf>,
    /// DP-SGD's target ε (δ = `delta`, clip `clip`); `None`: no DP.
    pub epsilon: Option<f64>,
    pub delta: f64,
    pub clip: f64,
    /// `document` or `patient`.
    pub unit: String,
    pub rank: u32,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub epochs: u32,
    /// Privacy units per step (expected, under DP).
    pub batch_size: u32,
    pub seq_len: u32,
    pub learning_rate: f64,
    pub seed: u64,
    pub device: Device,
}

/// What a fine-tune did.
#[derive(Debug, Clone)]
pub struct FinetuneReport {
    pub train_units: usize,
    pub train_documents: usize,
    pub validation_before: LmEval,
    pub validation_after: LmEval,
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    /// ε spent at `delta` (DP only) and the noise multiplier used.
    pub epsilon: Option<f64>,
    pub noise_multiplier: Option<f64>,
    /// The adapter's bytes as it travels (f32 `B`), and the base model's parameters.
    pub adapter_parameters: usize,
    pub base_parameters: i64,
}

/// The job spec a fine-tune with `options` would be, on the base with `base_sha256`.
fn job_spec(options: &FinetuneOptions, base_sha256: &str) -> String {
    let privacy = match options.epsilon {
        Some(epsilon) => format!(
            "[privacy]\nmode = \"local\"\ntarget_epsilon = {epsilon:?}\ndelta = {:?}\n\
             max_grad_norm = {:?}\nunit = {:?}\n",
            options.delta, options.clip, options.unit
        ),
        None => String::new(),
    };
    let targets: Vec<String> = options.targets.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "name = \"central-finetune\"\nrounds = 1\nmin_sites = 1\nround_deadline_secs = 1\n\
         update_norm_bound = 1.0\nseed = {}\n[model]\nname = \"llama\"\nbase_sha256 = {:?}\n\
         [data]\nschema = \"text\"\n[training]\noptimizer = \"adam\"\nlearning_rate = {:?}\n\
         local_epochs = {}\nbatch_size = {}\nmax_seq_len = {}\n{privacy}[lora]\nrank = {}\n\
         alpha = {:?}\ntarget_modules = [{}]\n",
        options.seed,
        base_sha256,
        options.learning_rate,
        options.epochs,
        options.batch_size,
        options.seq_len,
        options.rank,
        options.alpha,
        targets.join(", ")
    )
}

/// The dataset of `options`, read through the text protection pipeline.
fn dataset_config(options: &FinetuneOptions) -> Result<TextDatasetConfig, CentralError> {
    let path = &options.dataset;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let mut config: TextDatasetConfig = if is_toml {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        toml::from_str(&text)
            .map_err(|e| CentralError::Invalid(format!("{}: {e}", path.display())))?
    } else {
        let patient = options
            .patient_field
            .as_ref()
            .map(|f| format!("patient_field = {f:?}\n"))
            .unwrap_or_default();
        toml::from_str(&format!(
            "path = {:?}\n{patient}",
            path.display().to_string()
        ))
        .map_err(|e| CentralError::Invalid(e.to_string()))?
    };
    if is_toml && let Some(dir) = path.parent() {
        config.resolve_paths(dir);
    }
    Ok(config)
}

/// One site's LoRA fine-tune (module documentation).
pub fn finetune(
    options: &FinetuneOptions,
    progress: Progress<'_>,
) -> Result<FinetuneReport, CentralError> {
    let json = std::fs::read(&options.tokenizer).map_err(io(&options.tokenizer))?;
    let tokenizer = TextTokenizer::from_bytes(&json, &SpecialTokens::default())?;
    let base_sha256 = checkpoint_digest(&options.base)?;
    let job = LmJob::from_toml_str(&job_spec(options, &base_sha256))
        .map_err(|e| CentralError::Invalid(e.to_string()))?;
    let mut secret = [0u8; 32];
    StdRng::from_os_rng().fill(&mut secret);
    let text = TextDataset::prepare("text", &dataset_config(options)?, &secret)
        .and_then(|d| d.load())
        .map_err(|e| CentralError::Invalid(e.to_string()))?;
    let model = adapted_base(&job, &options.base, &tokenizer, options.device)?;
    let (train, validation) = tokenize_dataset(&job, &text, &tokenizer, model.config())?;
    let pad_id = i64::from(tokenizer.pad_id());
    let eval = |model: &LanguageModel| {
        evaluate(&model.decoder, &validation, pad_id, options.device)
            .map_err(|e| CentralError::Invalid(format!("validation: {e}")))
    };
    let validation_before = eval(&model)?;
    let dimension: usize = model.adapter_parameters().iter().map(|p| p.numel()).sum();
    let charging = RoundCharging {
        ledgers: None,
        job_id: "central",
        dataset: "text",
        round: 0,
        attempt: 0,
    };
    let plan = charging
        .plan(&job.view, train.units.len(), dimension)
        .map_err(CentralError::Invalid)?;
    let config = job
        .view
        .train_config(&Default::default(), options.seed)
        .map_err(|e| CentralError::Invalid(e.to_string()))?;
    let (report, spend) = train_adapters(
        &model.decoder,
        &train,
        &config,
        plan.as_ref(),
        None,
        pad_id,
        options.device,
        progress,
    );
    let report = report.map_err(LmRoundError::from)?;
    let epsilon = match (&plan, spend) {
        (Some(plan), Some(spend)) => Some(
            charging
                .charge(train.units.len(), plan, &spend, 0)
                .map_err(CentralError::Invalid)?
                .round_epsilon,
        ),
        _ => None,
    };
    let validation_after = eval(&model)?;
    model.decoder.save_adapter(&options.output)?;
    if let Some(dir) = &options.merged {
        save_checkpoint(&model.merged()?, dir)?;
        write_tokenizer_files(dir, &json)?;
    }
    let base_parameters = model.parameter_count();
    Ok(FinetuneReport {
        train_units: train.units.len(),
        train_documents: train.documents,
        validation_before,
        validation_after,
        steps: report.steps,
        tokens: report.tokens,
        seconds: report.seconds,
        epsilon,
        noise_multiplier: plan.as_ref().map(|p| p.noise_multiplier),
        adapter_parameters: dimension,
        base_parameters,
    })
}
