//! `tutela-node`: the site node. Thin: it parses arguments and calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tutela_site_node::agent::Agent;
use tutela_site_node::config::NodeConfig;
use tutela_site_node::offline::{self, Standardization};

mod cli_lm;

/// The Tutela site node: runs next to a site's data, connects out to the consortium's
/// coordinator over mutual TLS, and trains the consortium's models locally. Raw data never leaves
/// the site; only model updates do.
#[derive(Parser)]
#[command(
    name = "tutela-node",
    version,
    after_help = "Examples:\n  \
    tutela-node run --config /etc/tutela/node.toml\n  \
    tutela-node tokenizer train --input notes.jsonl --vocab-size 8192 --output tok/\n  \
    tutela-node lm perplexity --model ./llama-dir --text notes.txt\n  \
    tutela-node lm pretrain --text tinyshakespeare.txt --tokenizer tok/tokenizer.json --config config.json --output base/\n  \
    tutela-node lm finetune --base base/ --tokenizer tok/tokenizer.json --dataset notes.jsonl --epsilon 8 --output adapter/\n  \
    tutela-node generate --model ./llama-dir --prompt 'Patient' --top-p 0.9\n  \
    tutela-node evaluate --model final.safetensors --job-spec job.toml --csv test.csv \\\n    \
    --schema breast_cancer.schema.toml --standardize-from site-a.csv --standardize-from site-b.csv\n  \
    tutela-node predict --model final.safetensors --job-spec job.toml --csv test.csv \\\n    \
    --schema breast_cancer.schema.toml --standardize-self --rows 5"
)]
struct Cli {
    /// Log JSON lines instead of text (the filter comes from RUST_LOG, default `info`).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the node: connects to the coordinator named in the config and serves its tasks
    /// (build the initial model, evaluate and train each round, upload the update) until SIGINT
    /// or SIGTERM, reconnecting with backoff whenever the coordinator goes away.
    ///
    /// Before it reads any data for a task, the node checks that the task carries a valid signed
    /// approval by one of the compliance officers of the config's `site_policy`, and every
    /// clause of that policy; it declines the task otherwise. A config without `site_policy` is
    /// refused (only `insecure_no_approvals = true`, for labs and tests, runs tasks unapproved).
    ///
    /// With a [metrics] table it serves Prometheus metrics (ε spent per dataset and its cap,
    /// rounds, training time, bytes uploaded, declines by reason) on a plain-HTTP loopback port
    /// (docs/monitoring.md).
    Run {
        /// The node's config file; every key is documented in deploy/config/node.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The site's datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Manages the key-encryption key (KEK) of the files the node writes.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The node's privacy ledgers.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Tokenizers for language-model jobs: train one, or print a tokenizer file's digest (the
    /// `[model] tokenizer_sha256` by which a job names its tokenizer).
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Benchmarks (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Language models in the Hugging Face layout (config.json + safetensors).
    #[command(subcommand)]
    Lm(cli_lm::LmCommand),
    /// Continues a prompt with a Hugging Face checkpoint (Llama or Qwen2-MoE architecture) and
    /// prints the continuation. Greedy unless --top-p is given; sampling is seeded.
    Generate {
        /// The checkpoint directory (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// The tokenizer (tokenizer.json); default: the one in the --model directory, where
        /// `lm pretrain`, `tutela model merge` and Hugging Face checkpoints keep it.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Nucleus sampling: draw among the most likely tokens holding this much probability,
        /// in (0, 1].
        #[arg(long)]
        top_p: Option<f64>,
        /// Softens (> 1) or sharpens (< 1) the distribution --top-p draws from.
        #[arg(long, default_value_t = 1.0, requires = "top_p")]
        temperature: f64,
        /// The seed of --top-p's draws: the same seed, the same text.
        #[arg(long, default_value_t = 0, requires = "top_p")]
        seed: u64,
        /// Stop after this token id; default: the checkpoint's `eos_token_id` (config.json),
        /// else the tokenizer's `<|eos|>`.
        #[arg(long)]
        eos_token_id: Option<i64>,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
    /// Scores a model on a labelled CSV and prints {"loss":..,"accuracy":..,"n":..,"auc":..,
    /// "f1":..,"confusion":[[..]],"expected_calibration_error":..,"reliability":[..]} as JSON on
    /// stdout, and the same rounded for people (ROC AUC with ties counted half, F1 of the
    /// positive class or macro, the confusion matrix, a 10-bin reliability table) on stderr.
    ///
    /// Features are scaled the way the sites scaled them in training. When the schema declares
    /// [standardize] reference statistics, the sites used those and so does this command (the
    /// options below are then ignored). Otherwise each site used its own training split's
    /// statistics and you choose explicitly: --standardize-from the sites' training data (pooled;
    /// uses no test row: the honest choice for a held-out test split) or --standardize-self (fits
    /// on the scored file itself, which flatters the score slightly). Image data without
    /// reference statistics is not standardised.
    Evaluate(Scoring),
    /// Prints each row's predicted class probabilities as JSON lines:
    /// {"row":0,"predicted":1,"class":"benign","probabilities":[..]}.
    ///
    /// The same model loading and standardisation rules as `evaluate`.
    Predict {
        #[command(flatten)]
        scoring: Scoring,
        /// Only the first N rows of the CSV.
        #[arg(long)]
        rows: Option<usize>,
    },
    /// Trains the job's model centrally on one CSV (e.g. the union of the sites' data) for
    /// rounds × local_epochs epochs and prints its {"loss":..,"accuracy":..,"n":..} on a test
    /// CSV as JSON: the baseline a federated model is compared with. Features are standardised
    /// with the schema's reference statistics, or else with the training CSV's.
    Centralized {
        /// The job spec (TOML): model, optimizer, epochs, seed, rounds.
        #[arg(long)]
        job_spec: PathBuf,
        /// The training rows.
        #[arg(long)]
        csv: PathBuf,
        /// The rows to score the trained model on.
        #[arg(long)]
        test_csv: PathBuf,
        /// The dataset schema of both CSVs.
        #[arg(long)]
        schema: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
}

#[derive(clap::Args)]
struct Scoring {
    /// The model's weights (safetensors), e.g. the coordinator's published final model.
    #[arg(long)]
    model: PathBuf,
    /// The job spec (TOML) the model was trained with: its [model] table rebuilds the network.
    #[arg(long)]
    job_spec: PathBuf,
    /// The labelled rows to score.
    #[arg(long)]
    csv: PathBuf,
    /// The dataset schema of the CSV.
    #[arg(long)]
    schema: PathBuf,
    /// Standardise with the pooled statistics of these CSVs (same schema); repeat for several.
    #[arg(long, value_name = "CSV", conflicts_with = "standardize_self")]
    standardize_from: Vec<PathBuf>,
    /// Standardise with the statistics of --csv itself.
    #[arg(long)]
    standardize_self: bool,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Rebuilds the node's privacy ledgers from its `privacy.spent` events in the audit trail
    /// and re-pins its held checkpoint, as a compliance officer of the node's site: for a node
    /// that refuses to train because its ledger or held checkpoint is missing or older than the
    /// trail. Each dataset's restore is recorded first, as `ledger.restored` by the officer. Run
    /// it with the node stopped.
    Restore {
        /// The node's config file (its [audit], [at_rest], [privacy], work_dir, datasets).
        #[arg(long, short)]
        config: PathBuf,
        /// The officer's certificate (PEM), issued by the consortium CA to a user of this site.
        #[arg(long)]
        officer_cert: PathBuf,
        /// The officer's private key (PEM).
        #[arg(long)]
        officer_key: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl Scoring {
    fn prepare(&self) -> anyhow::Result<offline::Scoring> {
        let standardization = if self.standardize_self {
            Standardization::FitOnInput
        } else if !self.standardize_from.is_empty() {
            Standardization::FitOn(self.standardize_from.clone())
        } else {
            Standardization::Unspecified
        };
        Ok(offline::prepare(
            &self.model,
            &self.job_spec,
            &self.csv,
            &self.schema,
            &standardization,
            self.device.device()?,
        )?)
    }
}

impl DeviceArg {
    fn device(self) -> anyhow::Result<tch::Device> {
        Ok(match self {
            DeviceArg::Cpu => tch::Device::Cpu,
            DeviceArg::Auto => tutela_site_node::default_device(),
            DeviceArg::Cuda if tch::Cuda::is_available() => tch::Device::Cuda(0),
            DeviceArg::Cuda => anyhow::bail!("--device cuda: libtorch sees no CUDA GPU"),
        })
    }
}

fn print_eval(eval: &tutela_site_node::train::Eval) {
    println!(
        "{}",
        serde_json::json!({"loss": eval.loss, "accuracy": eval.accuracy, "n": eval.n})
    );
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One crypto provider for the whole process (STACK.md pitfall 1); an Err means one is
    // installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tutela_protocol::logging::init(cli.log_json);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tutela-node: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the message before it
/// already quotes (our errors name their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !previous.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        previous = text;
    }
    out
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One DP-SGD step against one plain step (same model, same batch, CPU): median time and
    /// peak memory growth, each (model, mode) in a fresh child process. Plain and DP children
    /// alternate, `--pairs` times, so that both see the same machine (a shared machine's speed
    /// drifts by tens of percent over seconds); the summary gives the median of the pairs' ratios.
    DpStep {
        #[arg(long, default_value_t = 256)]
        batch: usize,
        #[arg(long, default_value_t = 30)]
        iters: usize,
        /// Alternating (plain, DP) measurements per model.
        #[arg(long, default_value_t = 3)]
        pairs: usize,
        /// libtorch's intra-op threads in every child (both modes alike); 0 keeps libtorch's
        /// default of one per core. The default, 1, is how nodes sharing a machine run
        /// (`torch_threads`), and leaves a core to DP's noise thread.
        #[arg(long, default_value_t = 1)]
        torch_threads: usize,
        /// The models to measure, comma-separated: `mlp`, `cnn` (the batch is `--batch` rows)
        /// and `lora` (DP-SGD on the LoRA adapters of a small sequence model; the batch is
        /// `--lora-sequences` sequences of 128 tokens, one privacy unit each), `llama-lora` (the
        /// same on a small `llama` decoder with adapters on its seven projections).
        #[arg(long, default_value = "mlp,cnn", value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long, default_value_t = 16)]
        lora_sequences: usize,
        /// Internal: measure one (model, mode) in this process and print it as JSON.
        #[arg(long, hide = true, num_args = 2, value_names = ["MODEL", "MODE"])]
        child: Option<Vec<String>>,
    },
    /// Trains a byte-level BPE tokenizer on the inputs and encodes them with it (in one parallel
    /// batch, then one by one), best of --repeats; prints the times and ids/s as JSON.
    Tokenizer {
        /// The corpus: text files (by line) or JSON Lines (`.jsonl`, by document's "text").
        #[arg(long = "input", value_name = "FILE", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        #[arg(long, value_name = "N", default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

#[allow(clippy::too_many_arguments)]
fn bench_dp_step(
    models: Vec<String>,
    lora_sequences: usize,
    batch: usize,
    iters: usize,
    pairs: usize,
    torch_threads: usize,
    child: Option<Vec<String>>,
) -> anyhow::Result<()> {
    use tutela_site_node::dp_bench::{StepBench, measure};
    if torch_threads > 0 {
        tch::set_num_threads(i32::try_from(torch_threads)?);
    }
    if let Some(c) = child {
        let r = measure(&c[0], c[1] == "dp", batch, 5, iters)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    anyhow::ensure!(
        pairs > 0 && iters > 0,
        "--pairs and --iters must be at least 1"
    );
    let exe = std::env::current_exe()?;
    let threads = if torch_threads == 0 {
        "libtorch's default".to_string()
    } else {
        torch_threads.to_string()
    };
    println!("libtorch threads: {threads}; median of {iters} steps per measurement");
    println!(
        "model  batch  plain ms  DP ms  time ratio  plain peak MiB  DP peak MiB  memory ratio"
    );
    let mut summary = Vec::new();
    for model in &models {
        let model = model.as_str();
        let batch = if model == "lora" || model == "llama-lora" {
            lora_sequences
        } else {
            batch
        };
        let mut ratios = Vec::with_capacity(pairs);
        let mut worst_memory = 0f64;
        for _ in 0..pairs {
            let mut r = Vec::new();
            for mode in ["plain", "dp"] {
                let out = std::process::Command::new(&exe)
                    .args(["bench", "dp-step", "--batch", &batch.to_string()])
                    .args(["--iters", &iters.to_string()])
                    .args(["--torch-threads", &torch_threads.to_string()])
                    .args(["--child", model, mode])
                    .output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                r.push(serde_json::from_slice::<StepBench>(&out.stdout)?);
            }
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let ratio = r[1].seconds / r[0].seconds;
            // A growth under 1 MiB is allocator noise: compare against at least 1 MiB.
            let memory = mib(r[1].peak_bytes).max(1.0) / mib(r[0].peak_bytes).max(1.0);
            println!(
                "{model:<5}  {batch:>5}  {:>8.2}  {:>5.2}  {:>10.2}  {:>14.1}  {:>11.1}  {:>12.2}",
                r[0].seconds * 1e3,
                r[1].seconds * 1e3,
                ratio,
                mib(r[0].peak_bytes),
                mib(r[1].peak_bytes),
                memory
            );
            ratios.push(ratio);
            worst_memory = worst_memory.max(memory);
        }
        ratios.sort_by(f64::total_cmp);
        summary.push((model, ratios[ratios.len() / 2], worst_memory));
    }
    for (model, ratio, memory) in summary {
        // The targets: DP-LoRA ≤ 1.3× time and ≤ 1.5× memory; the others ≤ 1.5× and ≤ 2×.
        let (time_target, memory_target) = if model == "lora" || model == "llama-lora" {
            (1.3, 1.5)
        } else {
            (1.5, 2.0)
        };
        println!(
            "{model}: median time ratio {ratio:.2} (target ≤ {time_target}), largest memory ratio {memory:.2} (target ≤ {memory_target}, growths under 1 MiB counted as 1 MiB)"
        );
    }
    Ok(())
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Trains a byte-level BPE tokenizer and writes DIR/tokenizer.json and
    /// DIR/tokenizer_config.json, which Python's `tokenizers` and `transformers.AutoTokenizer`
    /// load unchanged. Prints the SHA-256 of tokenizer.json and the file (as sha256sum does):
    /// a job names its tokenizer by that digest, `[model] tokenizer_sha256 = "..."`.
    ///
    /// Every byte value keeps a token of its own, so any text encodes. The special tokens take
    /// the first ids (bos, eos, pad, then each --special-token); text that contains one of their
    /// strings is encoded as ordinary text, never as the control id. The same inputs and options
    /// give the same file, byte for byte. The vocabulary is made of frequent strings of the
    /// inputs: train on public text or on text already through the site's redaction.
    Train(TokenizerTrainArgs),
    /// Prints the SHA-256 of a tokenizer.json and the file (as sha256sum does), after checking
    /// that it loads as a byte-level tokenizer: the value of a job's `[model] tokenizer_sha256`.
    Digest {
        /// The tokenizer.json file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct TokenizerTrainArgs {
    /// A training text, read streaming: plain UTF-8 text, fed line by line, or JSON Lines
    /// (`.jsonl`, `.ndjson`), each object's --text-field one document. Repeat the flag or list
    /// several files after it.
    #[arg(long = "input", value_name = "FILE", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// Ids in all: the 256 byte tokens, the special tokens, and the merges learned (fewer when
    /// the text has too few frequent pairs).
    #[arg(long, value_name = "N")]
    vocab_size: usize,
    /// A further special token after bos, eos and pad, e.g. `<|sep|>`; repeat for several. One
    /// equal to the bos, eos or pad token is that token.
    #[arg(long = "special-token", value_name = "T")]
    special_tokens: Vec<String>,
    /// The beginning-of-sequence token, put first in every encoded sequence (id 0).
    #[arg(long, value_name = "T", default_value = "<|bos|>")]
    bos_token: String,
    /// The end-of-document token, put after every training document (id 1).
    #[arg(long, value_name = "T", default_value = "<|eos|>")]
    eos_token: String,
    /// The padding token of batches, masked out by the attention mask (id 2).
    #[arg(long, value_name = "T", default_value = "<|pad|>")]
    pad_token: String,
    /// Two tokens are merged only if the pair occurs at least this often: above 1, a string
    /// seen once (a rare name, say) never becomes a token of its own.
    #[arg(long, value_name = "N", default_value_t = 2)]
    min_frequency: u64,
    /// The field of each JSON Lines object that holds its text.
    #[arg(long, value_name = "NAME", default_value = "text")]
    text_field: String,
    /// The directory to write into, created if absent. An existing tokenizer.json or
    /// tokenizer_config.json there is never replaced (it may be one a job was approved with).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// No progress bar (one is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    quiet: bool,
}

fn tokenizer_command(command: TokenizerCommand) -> anyhow::Result<()> {
    use tutela_site_node::lm::tokenizer::train::{self, TrainOptions, TrainProgress};
    use tutela_site_node::lm::tokenizer::{SpecialTokens, check_tokenizer_json, sha256_hex};
    match command {
        TokenizerCommand::Digest { file } => {
            let json = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
            check_tokenizer_json(&json).with_context(|| format!("{}", file.display()))?;
            println!("{}  {}", sha256_hex(&json), file.display());
        }
        TokenizerCommand::Train(args) => {
            let roles = [&args.bos_token, &args.eos_token, &args.pad_token];
            let options = TrainOptions {
                vocab_size: args.vocab_size,
                min_frequency: args.min_frequency,
                special: SpecialTokens {
                    extra: args
                        .special_tokens
                        .iter()
                        .filter(|t| !roles.contains(t))
                        .cloned()
                        .collect(),
                    bos: args.bos_token,
                    eos: args.eos_token,
                    pad: args.pad_token,
                },
                text_field: args.text_field,
            };
            let bar = if args.quiet {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(0)
            };
            bar.set_style(indicatif::ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes}",
            )?);
            bar.set_message("counting words");
            let started = std::time::Instant::now();
            let progress = |p: TrainProgress| match p {
                TrainProgress::Reading { done, total } => {
                    bar.set_length(total);
                    bar.set_position(done);
                }
                TrainProgress::Merging => bar.set_message("learning merges"),
            };
            let trained = train::train(&args.inputs, &options, &progress)?;
            bar.finish_and_clear();
            let written = train::write_dir(&trained, &options.special, &args.output)?;
            eprintln!(
                "trained a vocabulary of {} on {} sequences ({} bytes) in {:.1} s; wrote {} and {}",
                trained.vocab_size,
                trained.sequences,
                trained.bytes,
                started.elapsed().as_secs_f64(),
                written.tokenizer_json.display(),
                written.tokenizer_config_json.display()
            );
            eprintln!(
                "a job names this tokenizer with, in its [model] table: tokenizer_sha256 = \"{}\"",
                written.sha256
            );
            println!("{}  {}", written.sha256, written.tokenizer_json.display());
        }
    }
    Ok(())
}

/// `model` if it is a checkpoint directory; else an error that says what the user gave and
/// what to do: the commands that take `--model` read a Hugging Face directory, and the
/// look-alikes (a LoRA adapter's directory, a published `.safetensors` file) are the likely
/// mistakes.
fn checkpoint_dir(model: &std::path::Path) -> anyhow::Result<&std::path::Path> {
    const EXPECTED: &str = "--model takes a Hugging Face checkpoint directory (config.json, \
                            model.safetensors)";
    if model.is_file() {
        anyhow::bail!(
            "{} is a file; {EXPECTED}. A LoRA job's published model holds only its adapters: \
             write them out with `tutela model export-adapter`, then merge them into the base \
             with `tutela model merge`",
            model.display()
        );
    }
    if !model.is_dir() {
        anyhow::bail!("{} is not a directory; {EXPECTED}", model.display());
    }
    if !model.join("config.json").is_file() && model.join("adapter_config.json").is_file() {
        anyhow::bail!(
            "{} is a LoRA adapter (PEFT layout), not a model: merge it into its base first, \
             `tutela model merge --base BASE_DIR --adapter {} --output MERGED_DIR`, and pass \
             --model MERGED_DIR",
            model.display(),
            model.display()
        );
    }
    Ok(model)
}

/// The tokenizer file given, else `tokenizer.json` in the checkpoint directory `model`.
fn tokenizer_path(given: Option<PathBuf>, model: &std::path::Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let beside = model.join("tokenizer.json");
    if beside.is_file() {
        Ok(beside)
    } else {
        anyhow::bail!(
            "{} has no tokenizer.json: name the model's tokenizer with --tokenizer FILE",
            model.display()
        )
    }
}

/// The id generation stops at by default: config.json's `eos_token_id` (transformers' key; the
/// first of a list), else the tokenizer's `<|eos|>` (what `tutela-node tokenizer train` names
/// it), else none.
fn eos_of(
    model: &tutela_site_node::lm::llama::LanguageModel,
    tokenizer: &tokenizers::Tokenizer,
) -> Option<i64> {
    let configured = match model.config().extra.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::Array(ids)) => ids.first().and_then(serde_json::Value::as_i64),
        _ => None,
    };
    configured.or_else(|| tokenizer.token_to_id("<|eos|>").map(i64::from))
}

fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(anyhow::Error::from_boxed)
        .with_context(|| format!("reading the tokenizer {}", path.display()))
}

/// `text` encoded for `model`: an id past the model's vocabulary means the tokenizer is not the
/// one the model was trained with, which is said as such (not as an index error deep inside).
fn encode_for(
    model: &tutela_site_node::lm::llama::LanguageModel,
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
) -> anyhow::Result<Vec<i64>> {
    let ids = encode(tokenizer, text)?;
    let vocab = model.config().vocab_size as i64;
    if let Some(&id) = ids.iter().max()
        && id >= vocab
    {
        anyhow::bail!(
            "the tokenizer gave token id {id}, but the model's vocabulary has {vocab} ids \
             (config.json vocab_size): it is not the tokenizer this model was trained with \
             (pass that one with --tokenizer)"
        );
    }
    if ids.is_empty() {
        anyhow::bail!("the text is empty: nothing to encode");
    }
    Ok(ids)
}

fn encode(tokenizer: &tokenizers::Tokenizer, text: &str) -> anyhow::Result<Vec<i64>> {
    let encoding = tokenizer
        .encode(text, true)
        .map_err(anyhow::Error::from_boxed)
        .context("tokenizing")?;
    Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
}

#[derive(Subcommand)]
enum DataCommand {
    /// Reads every dataset of the config (tables and text) as a task would and lists every
    /// problem at once: file, line, column and what to do. Exits non-zero if any dataset has a
    /// problem. The node runs the same check at start and does not offer a dataset that fails.
    /// The output is for the site: it may quote cell values.
    Check {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-wraps the data key of every encrypted file under the node's work_dir from the KEK in
    /// the config's [at_rest] to a new KEK, without re-encrypting any data. Run it while the node
    /// is stopped, then point [at_rest] at the new key. Files that fail are listed and the
    /// command exits non-zero; the others are rotated.
    Rotate {
        /// The node's config file (its [at_rest] names the current KEK).
        #[arg(long, short)]
        config: PathBuf,
        /// The new KEK's key file (mode 0600, outside work_dir); `head -c 32 /dev/urandom > F`.
        #[arg(long)]
        new_kek_file: PathBuf,
    },
}

fn rotate_keys(config: &std::path::Path, new_kek_file: &std::path::Path) -> anyhow::Result<()> {
    let config = NodeConfig::load(config)?;
    let old = config
        .key_encryption_key()?
        .context("the config has no [at_rest] key-encryption key to rotate from")?;
    let new =
        tutela_privacy::at_rest::LocalKek::from_key_file_outside(new_kek_file, &config.work_dir)?;
    let report = tutela_privacy::at_rest::rotate_dir(&config.work_dir, &old, &new)?;
    println!(
        "{}: {} file(s) re-wrapped, {} already under the new key",
        config.work_dir.display(),
        report.rotated,
        report.already_current
    );
    for path in &report.not_encrypted {
        println!("not encrypted (look at it): {}", path.display());
    }
    for (path, e) in &report.failed {
        eprintln!("FAILED {}: {e}", path.display());
    }
    if !report.is_complete() {
        anyhow::bail!("{} file(s) could not be rotated", report.failed.len());
    }
    println!("now point [at_rest] kek_file at {}", new_kek_file.display());
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Data(DataCommand::Check { config }) => {
            let config = NodeConfig::load(&config)?;
            let checks = tutela_site_node::data_check::check_all(&config);
            for check in &checks {
                print!("{check}");
            }
            let failing: Vec<&str> = checks
                .iter()
                .filter(|c| !c.is_ok())
                .map(|c| c.name.as_str())
                .collect();
            if !failing.is_empty() {
                anyhow::bail!(
                    "{} of {} dataset(s) failed the check: {}",
                    failing.len(),
                    checks.len(),
                    failing.join(", ")
                );
            }
        }
        Command::Keys(KeysCommand::Rotate {
            config,
            new_kek_file,
        }) => rotate_keys(&config, &new_kek_file)?,
        Command::Tokenizer(command) => tokenizer_command(command)?,
        Command::Bench(BenchCommand::Tokenizer {
            inputs,
            vocab_size,
            repeats,
        }) => {
            use tutela_site_node::lm::tokenizer::{bench, train::TrainOptions};
            let options = TrainOptions {
                vocab_size,
                ..TrainOptions::default()
            };
            let result = bench::measure(&inputs, &options, repeats)?;
            println!("{}", serde_json::to_string(&result)?);
        }
        Command::Bench(BenchCommand::DpStep {
            batch,
            iters,
            pairs,
            torch_threads,
            models,
            lora_sequences,
            child,
        }) => bench_dp_step(
            models,
            lora_sequences,
            batch,
            iters,
            pairs,
            torch_threads,
            child,
        )?,
        Command::Ledger(LedgerCommand::Restore {
            config,
            officer_cert,
            officer_key,
        }) => {
            let config = NodeConfig::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let (restored, tree_size) = runtime
                .block_on(tutela_site_node::ledger_restore::restore(
                    &config,
                    &officer_cert,
                    &officer_key,
                ))
                .context("the ledger was not restored")?;
            for r in &restored {
                println!(
                    "{}: {} spend(s) from the trail ({} missing from the ledger), ε = {} at δ = {:e}; recorded as ledger.restored at seq {}",
                    r.dataset,
                    r.spends,
                    r.missing_spends,
                    r.dataset_epsilon,
                    config.privacy.delta,
                    r.seq
                );
            }
            println!("held checkpoint: {tree_size} events");
        }
        Command::Lm(command) => cli_lm::run(command)?,
        Command::Generate {
            model,
            tokenizer,
            prompt,
            max_new_tokens,
            top_p,
            temperature,
            seed,
            eos_token_id,
            device,
        } => {
            use tutela_site_node::lm::generate::{GenerateOptions, Sampling, generate};
            let device = device.device()?;
            let tokenizer = load_tokenizer(&tokenizer_path(tokenizer, checkpoint_dir(&model)?)?)?;
            let model =
                tutela_site_node::lm::hf::load_checkpoint(&model, device, tch::Kind::Float)?;
            let ids = encode_for(&model, &tokenizer, &prompt)?;
            let eos_token_id = eos_token_id.or_else(|| eos_of(&model, &tokenizer));
            let sampling = match top_p {
                Some(top_p) => Sampling::TopP {
                    top_p,
                    temperature,
                    seed,
                },
                None => Sampling::Greedy,
            };
            let options = GenerateOptions {
                max_new_tokens,
                sampling,
                eos_token_id,
                use_kv_cache: true,
            };
            let new_ids = generate(&model.decoder, &ids, device, &options)?;
            let new_ids: Vec<u32> = new_ids
                .into_iter()
                .map(u32::try_from)
                .collect::<Result<_, _>>()
                .context("a generated id does not fit the tokenizer's id type")?;
            let text = tokenizer
                .decode(&new_ids, true)
                .map_err(anyhow::Error::from_boxed)
                .context("decoding the generated ids")?;
            println!("{prompt}{text}");
        }
        Command::Run { config: path } => {
            let config = NodeConfig::load(&path)?;
            config.check_trail(&path)?;
            config.check_files(&path)?;
            if config.audit.is_none() {
                // `check_trail` let this through only with `insecure_no_audit = true`, the
                // coordinator on loopback.
                tracing::warn!(
                    coordinator = %config.coordinator,
                    "insecure_no_audit = true: NO AUDIT TRAIL. This node's de-identification                      reports and privacy spends are anchored nowhere but its own disk. For a                      development setup on this machine only; configure [audit]"
                );
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let agent = Agent::new(config).context("the node cannot start")?;
                agent
                    .run(tutela_protocol::logging::shutdown_signal())
                    .await
                    .context("the node stopped")
            })?;
        }
        Command::Evaluate(scoring) => {
            let prepared = scoring.prepare()?;
            let eval = offline::score(&prepared)?;
            let report = offline::classification(&prepared)?;
            // People read the rounded report (stderr); scripts read the JSON line (stdout).
            eprint!(
                "{}",
                tutela_site_node::metrics::render(&report, &prepared.table.class_names)
            );
            let mut json =
                serde_json::json!({"loss": eval.loss, "accuracy": eval.accuracy, "n": eval.n});
            if let (Some(map), Ok(serde_json::Value::Object(metrics))) =
                (json.as_object_mut(), serde_json::to_value(&report))
            {
                for key in [
                    "auc",
                    "f1",
                    "confusion",
                    "expected_calibration_error",
                    "reliability",
                ] {
                    if let Some(v) = metrics.get(key) {
                        map.insert(key.to_string(), v.clone());
                    }
                }
            }
            println!("{json}");
        }
        Command::Centralized {
            job_spec,
            csv,
            test_csv,
            schema,
            device,
        } => {
            let eval = offline::centralized(&job_spec, &csv, &test_csv, &schema, device.device()?)?;
            print_eval(&eval);
        }
        Command::Predict { scoring, rows } => {
            let prepared = scoring.prepare()?;
            let probabilities = offline::predict(&prepared.model, &prepared.table, rows)?;
            let classes = &prepared.schema.label.classes;
            for (row, p) in probabilities.iter().enumerate() {
                let predicted = p
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                let line = serde_json::json!({
                    "row": row,
                    "predicted": predicted,
                    "class": classes.get(predicted),
                    "probabilities": p,
                });
                println!("{line}");
            }
        }
    }
    Ok(())
}
