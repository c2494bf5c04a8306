//! The site's language-model training round, as a library: what the agent calls for a TRAIN
//! task of a `llama` job with `[lora]`, shaped like the tabular [`crate::agent::local_round`] so
//! that spend anchoring, resend and upload work unchanged.
//!
//! One round ([`local_lm_round`]):
//! 1. the base checkpoint is loaded only if its digest is the job's `[model] base_sha256`
//!    ([`crate::lm::hf::load_checkpoint_with_digest`]), frozen, and the job's `[lora]` adapters
//!    are attached ([`crate::lm::llama::Decoder::attach_lora`]; `A` from the job's seed);
//! 2. the round's global adapter (the `B` tensors, PEFT names) is loaded into them;
//! 3. the protected documents are tokenized in memory into windows of `training.max_seq_len`
//!    tokens, grouped by the job's privacy unit (`privacy.unit`: each document, or each
//!    patient, which needs a dataset that declares a patient field);
//! 4. the global adapter is evaluated on the validation side (token-weighted loss and
//!    perplexity, as the tabular round evaluates the global model before training);
//! 5. training: under `privacy.mode = "local"`, the plan is checked against the ledger with the
//!    real number of training units, then DP-SGD with Poisson sampling over units, per-unit
//!    clipping and the project's exact noise ([`train::train_adapters`]); every step that ran is
//!    charged, even when training fails part-way; otherwise plain training;
//! 6. the delta: local minus global adapter, only what travels (`B` under FFA-LoRA).
//!
//! [`initial_adapter`] is the round-0 adapter a job's init task uploads: every `B` zero.

pub mod data;
pub mod job;
pub mod train;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use tch::{Device, Kind};
use tutela_privacy::anonymize::text::SplitUnit;
use tutela_protocol::job::PrivacyUnit;

use self::data::{LmEval, UnitWindows, evaluate, tokenize_units};
use self::job::LmJob;
use self::train::train_adapters;
use crate::dp::DpNoise;
use crate::jobspec::{JobSpecError, StrategyView};
use crate::ledger::{RoundCharging, RoundSpend};
use crate::lm::error::LmError;
use crate::lm::hf::load_checkpoint_with_digest;
use crate::lm::llama::LanguageModel;
use crate::lm::lora::dp::AdapterModel;
use crate::lm::lora::{LoraError, adapter_update_tensors, load_adapter_update};
use crate::lm::text_dataset::LoadedText;
use crate::lm::tokenizer::{TextTokenizer, TokenizerError};
use crate::train::TrainError;
use crate::weights::{NamedTensors, WeightsError};

/// Why a language-model round could not run. Paths in these errors are the site's own
/// ([`LmError`]'s); no document text is in any of them.
#[derive(Debug, thiserror::Error)]
pub enum LmRoundError {
    #[error(transparent)]
    JobSpec(#[from] JobSpecError),
    /// The base model: not the job's digest, unreadable, or the adapters do not fit it.
    #[error("the base model: {0}")]
    Model(#[from] LmError),
    #[error("the tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// The round's global adapter does not fit the job's adapters.
    #[error("the global adapter: {0}")]
    GlobalAdapter(#[source] LoraError),
    #[error("local training: {0}")]
    Train(#[from] TrainError),
    #[error("computing the update: {0}")]
    Update(#[source] Box<WeightsError>),
    /// The dataset cannot serve this job (no patient field for a patient unit, too little text).
    #[error("the text dataset: `{key}` {problem}")]
    Data { key: String, problem: String },
    /// DP-SGD could not be planned, the budget refuses it, or the ledger could not be written.
    #[error("privacy: {0}")]
    Privacy(String),
}

/// What one round needs (module documentation).
pub struct LmRoundInputs<'a> {
    pub job: &'a LmJob,
    /// The base checkpoint's directory (`config.json`, safetensors), loaded only if its digest
    /// is the job's `[model] base_sha256`.
    pub base_dir: &'a Path,
    /// The job's tokenizer (the gate checked its digest).
    pub tokenizer: &'a TextTokenizer,
    /// The loaded, protected text dataset.
    pub text: &'a LoadedText,
    /// The round's global adapter: exactly the tensors [`initial_adapter`] gives (names,
    /// shapes, f32).
    pub global_adapter: &'a [(tutela_protocol::tensor::TensorSpec, Vec<u8>)],
    pub device: Device,
    /// The ledger to plan against and charge (job, dataset, round, attempt).
    pub charging: RoundCharging<'a>,
    /// Seeds the batch order of non-private training (`jobspec::batch_seed`).
    pub batch_seed: u64,
}

/// What one language-model round produced: the tabular [`crate::agent::RoundResult`]'s fields,
/// with a language model's evaluation.
#[derive(Debug)]
pub struct LmRoundResult {
    /// Local minus global adapter: only what travels (`B` under FFA-LoRA), f32, PEFT names,
    /// sorted by name.
    pub delta: NamedTensors,
    /// The global adapter on the validation side, before training.
    pub eval: LmEval,
    /// Privacy units (documents or patients) on the training side: the DP sampling's rows.
    pub train_units: usize,
    pub train_documents: usize,
    pub train_steps: u64,
    pub train_sequences: u64,
    pub train_tokens: u64,
    /// Mean training loss per target token.
    pub train_loss: f64,
    pub train_seconds: f64,
    /// The dataset commitment (hex) and the protection configuration's digest, for lineage.
    pub dataset_commitment: String,
    pub deid_config_sha256: String,
    /// What the round spent of the dataset's privacy budget (DP-SGD jobs only).
    pub privacy: Option<RoundSpend>,
    /// The noise multiplier and expected batch (of privacy units) it trained under (DP-SGD
    /// jobs only), reported as a tabular round reports them.
    pub dp_noise: Option<DpNoise>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The base model with the job's adapters attached (`B = 0`), after checking that the
/// tokenizer's ids fit its vocabulary.
pub fn adapted_base(
    job: &LmJob,
    base_dir: &Path,
    tokenizer: &TextTokenizer,
    device: Device,
) -> Result<LanguageModel, LmRoundError> {
    let mut model = load_checkpoint_with_digest(base_dir, job.base_sha256()?, device, Kind::Float)?;
    let vocab = model.config().vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(LmRoundError::Model(LmError::InvalidConfig(format!(
            "the tokenizer has {} ids, more than the base model's vocabulary of {vocab}",
            tokenizer.vocab_size()
        ))));
    }
    model.attach_lora(&job.lora, job.view.seed)?;
    Ok(model)
}

/// The adapter tensors that travel, sorted by name.
fn travelling(model: &LanguageModel) -> Result<NamedTensors, LmRoundError> {
    let mut tensors = adapter_update_tensors(&model.decoder.lora_layers())
        .map_err(LmRoundError::GlobalAdapter)?;
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(tensors)
}

/// The job's initial adapter, what a round-0 init task uploads: every travelling tensor
/// (`B` under FFA-LoRA, PEFT names, f32) zero, so the adapted model starts as the base model.
/// Reads no data; the base is loaded only if it is the job's.
pub fn initial_adapter(
    job: &LmJob,
    base_dir: &Path,
    tokenizer: &TextTokenizer,
) -> Result<NamedTensors, LmRoundError> {
    let model = adapted_base(job, base_dir, tokenizer, Device::Cpu)?;
    travelling(&model)
}

/// Checks the job's privacy unit against the dataset: `patient` needs a dataset that declares
/// a patient field (its split is then by patient).
pub fn check_privacy_unit(job: &LmJob, text: &LoadedText) -> Result<bool, LmRoundError> {
    match job.privacy_unit() {
        PrivacyUnit::Document => Ok(false),
        PrivacyUnit::Patient if text.report.split.unit == SplitUnit::Patient => Ok(true),
        PrivacyUnit::Patient => Err(LmRoundError::Data {
            key: "privacy.unit".into(),
            problem: "is \"patient\" but the site's text dataset declares no patient field \
                      (`patient_field`), so documents cannot be grouped by patient"
                .into(),
        }),
    }
}

/// Tokenizes both sides of the dataset for `job` on a model with context `config`.
pub fn tokenize_dataset(
    job: &LmJob,
    text: &LoadedText,
    tokenizer: &TextTokenizer,
    config: &crate::lm::config::DecoderConfig,
) -> Result<(UnitWindows, UnitWindows), LmRoundError> {
    let by_patient = check_privacy_unit(job, text)?;
    let window = job.window(config);
    let train = tokenize_units(&text.documents.train, tokenizer, window, by_patient)?;
    let validation = tokenize_units(&text.documents.validation, tokenizer, window, by_patient)?;
    if train.targets == 0 {
        return Err(LmRoundError::Data {
            key: "text".into(),
            problem: "the training side has no document of 2 tokens or more".into(),
        });
    }
    Ok((train, validation))
}

/// One local round of a language-model job (module documentation).
pub fn local_lm_round(inputs: &LmRoundInputs<'_>) -> Result<LmRoundResult, LmRoundError> {
    let job = inputs.job;
    let device = inputs.device;
    // Checked before the base is read: a refusal costs nothing.
    check_privacy_unit(job, inputs.text)?;
    let config = job
        .view
        .train_config(&StrategyView::default(), inputs.batch_seed)?;
    let mut model = adapted_base(job, inputs.base_dir, inputs.tokenizer, device)?;
    load_adapter_update(&mut model.decoder.lora_layers_mut(), inputs.global_adapter)
        .map_err(LmRoundError::GlobalAdapter)?;
    let global = travelling(&model)?;
    let (train, validation) = tokenize_dataset(job, inputs.text, inputs.tokenizer, model.config())?;
    let pad_id = i64::from(inputs.tokenizer.pad_id());
    let eval = evaluate(&model.decoder, &validation, pad_id, device)?;

    let dimension: usize = model.adapter_parameters().iter().map(|p| p.numel()).sum();
    let rows = train.units.len();
    let plan = inputs
        .charging
        .plan(&job.view, rows, dimension)
        .map_err(LmRoundError::Privacy)?;
    let (report, spend) = train_adapters(
        &model.decoder,
        &train,
        &config,
        plan.as_ref(),
        None,
        pad_id,
        device,
        &mut |_, _, _| {},
    );
    let dp_noise = plan.as_ref().map(|plan| DpNoise::of_plan(plan, rows));
    let privacy = match (&plan, spend) {
        (Some(plan), Some(spend)) => {
            let spent = inputs
                .charging
                .charge(rows, plan, &spend, now_ms())
                .map_err(LmRoundError::Privacy)?;
            tracing::info!(
                steps = spend.steps,
                round_epsilon = spent.round_epsilon,
                job_epsilon = spent.job_epsilon,
                dataset_epsilon = spent.dataset_epsilon,
                delta = spent.delta,
                planned_job_epsilon = plan.planned_epsilon,
                noise_multiplier = plan.noise_multiplier,
                "privacy spent (language-model round)"
            );
            Some(spent)
        }
        _ => None,
    };
    let report = report?;
    let local = travelling(&model)?;
    let delta =
        crate::weights::delta(&local, &global).map_err(|e| LmRoundError::Update(Box::new(e)))?;
    Ok(LmRoundResult {
        delta,
        eval,
        train_units: rows,
        train_documents: train.documents,
        train_steps: report.steps,
        train_sequences: report.sequences,
        train_tokens: report.tokens,
        train_loss: report.mean_loss,
        train_seconds: report.seconds,
        dataset_commitment: inputs.text.commitment.root_hex(),
        deid_config_sha256: inputs.text.report.config_sha256.clone(),
        privacy,
        dp_noise,
    })
}
