//! `tutela demo --dataset notes`: three hospitals fine-tune a small language model on clinical
//! notes, federated, with LoRA under DP-SGD (the patient as privacy unit).
//!
//! 1. The consortium's base model: a byte-level BPE tokenizer and a small Llama-style decoder
//!    pretrained on public text (tinyshakespeare), built once with `tutela-node tokenizer train`
//!    and `tutela-node lm pretrain` and cached under a digest of everything that shapes it (see
//!    [`BaseRecipe::key`]), so a second run starts at once.
//! 2. The Synthea notes split by patient: a few patients held out for the final score, the others
//!    dealt to the three hospitals (no patient at two of them).
//! 3. The job (deploy/jobs/notes_lora_dp.toml with the demo's digests and schedule), approved by
//!    each hospital's officer; the sites' validation perplexity printed as rounds finish.
//! 4. The final scores on the held-out patients' notes: the base, the federated adapters merged
//!    into it, and a central fine-tune on the pooled notes under the same ε and the same number
//!    of passes; a greedy sample from the base and from the federated model.
//! 5. No note's text in any node's work directory (checked, not assumed), and the audit trail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;

mod base;

use self::base::{cached_base, default_cache_dir};
use super::DemoArgs;
use super::consortium::{self, Consortium, sibling, spawn_logged, toml_path};
use crate::job_cmd;

const SITES: [&str; 3] = ["st-mary", "general", "riverside"];
const NOTES: &str = "synthea_clinical_notes.jsonl";
const CORPUS: &str = "tinyshakespeare.txt";
/// The fixed prompt of the samples before and after (greedy decoding: reproducible).
const PROMPT: &str = "# Chief Complaint\n";
const SAMPLE_TOKENS: &str = "40";

/// The federated fine-tuning's schedule (the rest is deploy/jobs/notes_lora_dp.toml's), chosen by
/// measurement (BENCHMARKS.md, "The notes demo against the halving target"): every unit's
/// adapter gradient is clipped (norms of 100 to 240 against C = 1), so Adam's step is scale-free
/// and what decides the result is DP's noise against the clipped signal, σ·C·√d / B per step.
/// 20 rounds: with B = 16 the held-out perplexity still falls after round 10 (2.24x at 20
/// rounds against 2.11x at 10, the same ε: σ rises from 1.3 to 1.6).
const ROUNDS: u32 = 20;
const UPDATE_NORM_BOUND: f64 = 100.0;
/// The projections that get adapters: every attention and MLP projection of the small base.
const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// The adapters' rank and alpha (scale alpha/rank = 2). A lower rank shrinks the noise's norm
/// (√d) but measured no better: rank 4 the same, rank 2 worse (BENCHMARKS.md).
const RANK: u32 = 8;
const ALPHA: f64 = 16.0;
const LOCAL_EPOCHS: u32 = 1;
const LEARNING_RATE: f64 = 0.05;
/// 16 documents expected per Poisson batch (a site holds about 75 training documents): the
/// noise on a step's mean gradient, σ/B, falls faster with B than σ grows (ε = 8 over
/// ⌈75/B⌉ × 20 steps), and ⌈75/B⌉ steps a round still move the adapters (B = 32 and 64 did
/// worse: too few steps).
const BATCH_SIZE: u32 = 16;
const SEQ_LEN: u32 = 64;
const EPSILON: f64 = 8.0;
/// At most this many held-out notes (after de-duplication) are scored.
const HELD_OUT_DOCUMENTS: usize = 40;

/// Runs a command to completion, its stderr (progress bars) on the terminal; returns stdout.
fn run_step(cmd: &mut Command, what: &str) -> Result<String> {
    // The child's progress bar and summary, without its info logs.
    let out = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command to completion with its stderr kept; returns stdout.
fn run_quiet(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The notes as JSON Lines, grouped by patient in file order.
fn notes_by_patient(path: &Path) -> Result<BTreeMap<String, Vec<(String, String)>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut by_patient: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        let field = |name: &str| {
            v[name].as_str().map(str::to_string).with_context(|| {
                format!(
                    "{}: line {} has no string field {name:?}",
                    path.display(),
                    i + 1
                )
            })
        };
        let patient = field("patient_id")?;
        let note = field("text")?;
        by_patient
            .entry(patient)
            .or_default()
            .push((line.to_string(), note));
    }
    Ok(by_patient)
}

/// The split by patient: the held-out patients (about a tenth of the notes, never the largest
/// patient) and each site's patients, dealt round robin in a seeded order.
struct Split {
    held_out: Vec<(String, String)>,
    sites: Vec<Vec<(String, String)>>,
    held_out_patients: usize,
}

fn split_by_patient(
    by_patient: BTreeMap<String, Vec<(String, String)>>,
    seed: u64,
) -> Result<Split> {
    let total: usize = by_patient.values().map(Vec::len).sum();
    let largest = by_patient.values().map(Vec::len).max().unwrap_or(0);
    let mut patients: Vec<Vec<(String, String)>> = by_patient.into_values().collect();
    if patients.len() < SITES.len() + 1 {
        bail!(
            "{NOTES} has {} patients: too few for {} hospitals and a held-out patient",
            patients.len(),
            SITES.len()
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    patients.shuffle(&mut rng);
    let mut held_out = Vec::new();
    let mut held_out_patients = 0;
    let mut sites = vec![Vec::new(); SITES.len()];
    let mut dealt = 0;
    for notes in patients {
        if held_out.len() * 10 < total && notes.len() < largest {
            held_out.extend(notes);
            held_out_patients += 1;
        } else {
            sites[dealt % SITES.len()].extend(notes);
            dealt += 1;
        }
    }
    Ok(Split {
        held_out,
        sites,
        held_out_patients,
    })
}

/// The held-out notes as the sites' models see text: through the same protection pipeline as a
/// node's defaults (names and dates redacted, near-duplicates dropped), so the score is about the
/// notes and not about names no site ever trained on. Joined by blank lines.
fn protected_text(notes: &[(String, String)], seed: u64) -> Result<String> {
    use tutela_privacy::anonymize::text::{
        SplitUnit, TextDocument, TextPipeline, TextProtectionConfig,
    };
    let pipeline = TextPipeline::new(TextProtectionConfig {
        names: Vec::new(),
        digit_suffixed_names: true,
        content_filter: None,
        near_duplicates: Default::default(),
        split_unit: SplitUnit::Document,
        // Both sides are scored: the split only has to be a valid one.
        validation_fraction: 0.5,
        split_seed: seed,
    })?;
    let documents = notes
        .iter()
        .enumerate()
        .map(|(i, (_, text))| TextDocument {
            line: i as u64 + 1,
            id: None,
            patient: None,
            date: None,
            text: text.clone(),
        })
        .collect();
    let (protected, _) = pipeline.run(documents)?;
    // A sample of them keeps the three scorings short; seeded, so runs compare.
    Ok(protected
        .train
        .iter()
        .chain(&protected.validation)
        .take(HELD_OUT_DOCUMENTS)
        .map(|d| d.text.as_str())
        .collect::<Vec<_>>()
        .join("\n\n"))
}

/// The note lines worth looking for on a disk (long enough to be the note's own, not a heading).
fn snippets(notes: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = notes
        .iter()
        .flat_map(|(_, text)| text.lines().filter(|l| l.trim().len() > 40).take(2))
        .map(|l| l.trim().to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The held-out perplexity of a checkpoint (`tutela-node lm perplexity`).
fn perplexity(node: &Path, model: &Path, tokenizer: &Path, text: &Path) -> Result<f64> {
    let out = run_quiet(
        Command::new(node)
            .args(["lm", "perplexity", "--model"])
            .arg(model)
            .arg("--tokenizer")
            .arg(tokenizer)
            .arg("--text")
            .arg(text)
            .args(["--window", &SEQ_LEN.to_string()])
            // Non-overlapping windows: half the forward passes of the default stride, which
            // matters in a debug build on 2 cores.
            .args(["--stride", &SEQ_LEN.to_string()]),
        "scoring the held-out notes",
    )?;
    out.trim()
        .strip_prefix("perplexity = ")
        .and_then(|x| x.parse().ok())
        .with_context(|| format!("tutela-node lm perplexity printed {out:?}"))
}

fn sample(node: &Path, model: &Path, tokenizer: &Path) -> Result<String> {
    run_quiet(
        Command::new(node)
            .args(["generate", "--model"])
            .arg(model)
            .arg("--tokenizer")
            .arg(tokenizer)
            .args(["--prompt", PROMPT, "--max-new-tokens", SAMPLE_TOKENS]),
        "generating a sample",
    )
}

fn indented(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub(super) async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let dir = std::path::absolute(&args.dir)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let data_dir = std::path::absolute(&args.data_dir)?;
    let node = sibling("tutela-node")?;
    let cache_dir = match &args.cache_dir {
        Some(d) => std::path::absolute(d)?,
        None => default_cache_dir()?,
    };
    let epsilon = args.epsilon.unwrap_or(EPSILON);
    let rounds = args.rounds.unwrap_or(ROUNDS);

    // 1. The base model and tokenizer, from public text only.
    let base = cached_base(&node, &data_dir, &cache_dir)?;
    let tokenizer_bytes = std::fs::read(&base.tokenizer)?;
    let tokenizer_sha256 =
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &tokenizer_bytes).as_ref());
    let base_sha256 = run_quiet(
        Command::new(&node).args(["lm", "digest"]).arg(&base.model),
        "digesting the base model",
    )?
    .split_whitespace()
    .next()
    .context("tutela-node lm digest printed nothing")?
    .to_string();

    // 2. The notes, split by patient.
    let split = split_by_patient(notes_by_patient(&data_dir.join(NOTES))?, args.seed)?;
    // The operator's evaluation files: the held-out notes' text and the pooled training notes
    // (the central baseline). Outside every site's directory, and removed at the end.
    let eval_dir = dir.join("evaluation");
    std::fs::create_dir_all(&eval_dir)?;
    let held_out_text = eval_dir.join("held-out.txt");
    std::fs::write(&held_out_text, protected_text(&split.held_out, args.seed)?)?;
    let pooled = eval_dir.join("pooled.jsonl");
    std::fs::write(
        &pooled,
        split
            .sites
            .iter()
            .flatten()
            .map(|(line, _)| format!("{line}\n"))
            .collect::<String>(),
    )?;
    println!(
        "{} notes of {}: {} notes of {} patients held out for the final score",
        split.held_out.len() + split.sites.iter().map(Vec::len).sum::<usize>(),
        NOTES,
        split.held_out.len(),
        split.held_out_patients
    );

    // 3. The consortium and one node per hospital, each holding its own patients' notes, the
    // tokenizer and the base.
    let mut consortium = Consortium::certify(&dir, &SITES)?;
    consortium.start()?;
    let mut probes = Vec::new();
    for (site, notes) in SITES.iter().zip(&split.sites) {
        let site_dir = dir.join("sites").join(site);
        std::fs::create_dir_all(&site_dir)?;
        // The hospital's own records, as its systems hold them (outside the node's work dir).
        let notes_path = site_dir.join("notes.jsonl");
        std::fs::write(
            &notes_path,
            notes
                .iter()
                .map(|(line, _)| format!("{line}\n"))
                .collect::<String>(),
        )?;
        probes.extend(snippets(notes));
        let kek = site_dir.join("kek");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&kek)
            .with_context(|| format!("cannot make {}", kek.display()))?;
        let secret = site_dir.join("site-secret");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&secret)
            .with_context(|| format!("cannot make {}", secret.display()))?;
        let toml = site_dir.join("node.toml");
        std::fs::write(
            &toml,
            format!(
                "tokenizers = [\"{tokenizer}\"]\nbase_models = [\"{base}\"]\n{head}[text_datasets.notes]\npath = \"{notes}\"\ntext_field = \"text\"\nid_field = \"note_id\"\npatient_field = \"patient_id\"\ndate_field = \"date\"\nvalidation_fraction = 0.2\n",
                tokenizer = toml_path(&base.tokenizer),
                base = toml_path(&base.model),
                head = consortium.node_toml_head(site, &site_dir, &kek, &secret),
                notes = toml_path(&notes_path),
            ),
        )?;
        let log = site_dir.join("node.log");
        let child = spawn_logged(
            Command::new(&node).arg("run").arg("--config").arg(&toml),
            &log,
        )?;
        consortium.procs.0.push((site.to_string(), child));
        let patients: std::collections::BTreeSet<&str> = notes
            .iter()
            .filter_map(|(line, _)| {
                line.split("\"patient_id\": \"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
            })
            .collect();
        println!(
            "site node {site:<10} {:>4} notes of {} patients",
            notes.len(),
            patients.len()
        );
    }

    // 4. The job: the documented example with the demo's digests and schedule.
    let mut spec: toml::Table =
        toml::from_str(include_str!("../../../deploy/jobs/notes_lora_dp.toml"))
            .context("the built-in notes job spec is not valid TOML")?;
    let table = |spec: &mut toml::Table, key: &str| -> Result<toml::Table> {
        match spec.remove(key) {
            Some(toml::Value::Table(t)) => Ok(t),
            _ => bail!("the built-in notes job spec has no [{key}]"),
        }
    };
    let mut model = table(&mut spec, "model")?;
    model.insert("tokenizer_sha256".into(), tokenizer_sha256.clone().into());
    model.insert("base_sha256".into(), base_sha256.clone().into());
    spec.insert("model".into(), model.into());
    let mut training = table(&mut spec, "training")?;
    training.insert("learning_rate".into(), LEARNING_RATE.into());
    training.insert("local_epochs".into(), i64::from(LOCAL_EPOCHS).into());
    training.insert("batch_size".into(), i64::from(BATCH_SIZE).into());
    training.insert("max_seq_len".into(), i64::from(SEQ_LEN).into());
    spec.insert("training".into(), training.into());
    let mut lora = table(&mut spec, "lora")?;
    lora.insert("rank".into(), i64::from(RANK).into());
    lora.insert("alpha".into(), ALPHA.into());
    lora.insert(
        "target_modules".into(),
        toml::Value::Array(TARGET_MODULES.iter().map(|m| (*m).into()).collect()),
    );
    spec.insert("lora".into(), lora.into());
    // Adapters on every projection carry DP noise in every coordinate: their update's norm is
    // larger than the q/v-only example's bound allows.
    spec.insert("update_norm_bound".into(), UPDATE_NORM_BOUND.into());
    if epsilon.is_infinite() {
        spec.remove("privacy");
    } else {
        let mut privacy = table(&mut spec, "privacy")?;
        privacy.insert("target_epsilon".into(), epsilon.into());
        privacy.insert("unit".into(), args.privacy_unit.clone().into());
        spec.insert("privacy".into(), privacy.into());
    }
    spec.insert("rounds".into(), i64::from(rounds).into());
    spec.insert(
        "sites".into(),
        toml::Value::Array(SITES.iter().map(|s| (*s).into()).collect()),
    );
    let spec_text = toml::to_string(&spec)?;
    let job_toml = dir.join("job.toml");
    std::fs::write(&job_toml, &spec_text)?;
    let (mut jobs, status) = consortium.submit_and_approve(spec_text.clone()).await?;

    println!(
        "each round: the perplexity of the round's starting model on every site's validation notes (its own patients'), before local training"
    );
    // Under DP each site's validation loss is a noised release (`tutela_privacy::metrics`):
    // shown clamped to its range [0, L_max] before it is exponentiated, as `tutela job status`
    // shows it, or a noised loss of -40 or 300 nats would print as 0.0 or 1e130.
    let loss_max = tutela_protocol::job::JobSpec::from_toml_str(&spec_text)?
        .privacy
        .and_then(|p| p.metrics_loss_max)
        .unwrap_or(tutela_privacy::metrics::DEFAULT_METRICS_LOSS_MAX);
    if epsilon.is_finite() {
        println!(
            "  under DP these are noised releases charged to each site's budget (± one standard deviation in nats, each site's loss clamped to [0, {loss_max}]): with a few dozen validation notes a site they are mostly noise; the final scores below are exact, on held-out notes no site holds"
        );
    }
    let shown_loss = move |m: &tutela_protocol::pb::SiteMetrics| {
        if m.eval_loss_stddev > 0.0 {
            m.eval_loss.clamp(0.0, loss_max)
        } else {
            m.eval_loss
        }
    };
    let bar = consortium::rounds_bar(status.rounds_total, "waiting for the initial adapters");
    let mut printed = 0;
    let last = job_cmd::watch_job(&mut jobs, &status.job_id, |s| {
        let since = printed;
        for r in s.rounds.iter().filter(|r| r.round > since) {
            let per_site: Vec<String> = r
                .metrics
                .iter()
                .map(|m| {
                    let noise = if m.eval_loss_stddev > 0.0 {
                        format!(" ±{:.1}", m.eval_loss_stddev)
                    } else {
                        String::new()
                    };
                    format!("{} {:.1}{noise}", m.site, shown_loss(m).exp())
                })
                .collect();
            // The mean validation loss over all sites' tokens... weighted by their sequences.
            let n: u64 = r.metrics.iter().map(|m| m.eval_samples).sum();
            let loss: f64 = r
                .metrics
                .iter()
                .map(|m| shown_loss(m) * m.eval_samples as f64)
                .sum::<f64>()
                / n.max(1) as f64;
            let spent = r
                .metrics
                .iter()
                .map(|m| m.dp_job_epsilon)
                .fold(0.0, f64::max);
            // Each site's DP-SGD noise as job status reports it: σ and the expected batch B of
            // privacy units (σ/B is a step's noise against its clipped signal).
            let noise: Vec<String> = r
                .metrics
                .iter()
                .filter(|m| m.dp_noise_multiplier > 0.0)
                .map(|m| format!("{:.2}/{:.0}", m.dp_noise_multiplier, m.dp_expected_batch))
                .collect();
            let line = format!(
                "round {:>2}  validation perplexity {:.1}  ({})  {:.1}s{}{}",
                r.round,
                loss.exp(),
                per_site.join(", "),
                r.seconds,
                if spent > 0.0 {
                    format!("  ε spent {spent:.2}")
                } else {
                    String::new()
                },
                if noise.is_empty() {
                    String::new()
                } else {
                    format!("  σ/B {}", noise.join(" "))
                }
            );
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
            printed = r.round;
        }
        bar.set_position(u64::from(s.rounds_completed));
        bar.set_message(format!(
            "{} | sites connected: {}",
            s.state,
            s.connected_sites.len()
        ));
    })
    .await?;
    bar.finish_and_clear();
    if last.state != "completed" {
        bail!("the job ended {}: {}", last.state, last.reason);
    }

    // 5. The federated adapters merged into the base, beside a central fine-tune on the pooled
    // notes: same ε (one ledger over all the patients), same number of passes over the notes.
    let job = tutela_protocol::job::JobSpec::from_toml_str(&spec_text)?;
    let lora = job.lora.as_ref().context("the notes job has no [lora]")?;
    let adapter = dir.join("federated-adapter");
    tutela_protocol::peft_export::export_peft_adapter(
        lora,
        job.seed,
        Path::new(&last.model_path),
        &base.model,
        &adapter,
    )
    .context("exporting the federated adapters")?;
    let federated = dir.join("federated-merged");
    tutela_protocol::checkpoint::merge_lora(&base.model, &adapter, &federated)
        .context("merging the federated adapters into the base")?;
    let central = if args.skip_central {
        println!("central baseline: skipped (--skip-central)");
        None
    } else {
        println!(
            "central baseline: the same LoRA fine-tuned on the pooled notes of all three hospitals, {}, {} epochs",
            if epsilon.is_infinite() {
                "no DP".to_string()
            } else {
                format!("ε = {epsilon} by {}", args.privacy_unit)
            },
            rounds * LOCAL_EPOCHS
        );
        let central = dir.join("central-merged");
        let mut finetune = Command::new(&node);
        finetune
            .args(["lm", "finetune", "--base"])
            .arg(&base.model)
            .arg("--tokenizer")
            .arg(&base.tokenizer)
            .arg("--dataset")
            .arg(&pooled)
            .args([
                "--patient-field",
                "patient_id",
                "--unit",
                &args.privacy_unit,
            ])
            .arg("--output")
            .arg(dir.join("central-adapter"))
            .arg("--merged")
            .arg(&central)
            .args(["--rank", &lora.rank.to_string()])
            .args(["--alpha", &lora.alpha.to_string()])
            .args(["--targets", &lora.target_modules.join(",")])
            .args(["--epochs", &(rounds * LOCAL_EPOCHS).to_string()])
            .args(["--batch-size", &BATCH_SIZE.to_string()])
            .args(["--seq-len", &SEQ_LEN.to_string()])
            .args(["--lr", &LEARNING_RATE.to_string()])
            .args(["--seed", &args.seed.to_string()]);
        if epsilon.is_finite() {
            finetune.args(["--epsilon", &epsilon.to_string()]);
        }
        run_step(&mut finetune, "the central fine-tune")?;
        Some(central)
    };

    let scoring = spinner("scoring the held-out notes");
    let base_ppl = perplexity(&node, &base.model, &base.tokenizer, &held_out_text)?;
    let federated_ppl = perplexity(&node, &federated, &base.tokenizer, &held_out_text)?;
    let central_ppl = central
        .map(|central| perplexity(&node, &central, &base.tokenizer, &held_out_text))
        .transpose()?;
    scoring.set_message("generating the samples");
    let before = sample(&node, &base.model, &base.tokenizer)?;
    let after = sample(&node, &federated, &base.tokenizer)?;
    scoring.finish_and_clear();
    println!(
        "held-out perplexity (up to {HELD_OUT_DOCUMENTS} distinct notes of the {} notes of {} patients no site holds):",
        split.held_out.len(),
        split.held_out_patients
    );
    println!("  base model (tinyshakespeare only)        {base_ppl:>8.1}");
    println!(
        "  federated, 3 hospitals, {:<16} {federated_ppl:>8.1}  ({:.2}x lower)",
        if epsilon.is_infinite() {
            "no DP".to_string()
        } else {
            format!("DP ε = {epsilon}/site")
        },
        base_ppl / federated_ppl
    );
    if let Some(central_ppl) = central_ppl {
        println!(
            "  central, pooled notes, {:<17} {central_ppl:>8.1}  ({:.2}x lower)",
            if epsilon.is_infinite() {
                "no DP".to_string()
            } else {
                format!("DP ε = {epsilon}")
            },
            base_ppl / central_ppl
        );
    }
    println!("greedy sample of the base model:\n{}", indented(&before));
    println!(
        "greedy sample after federated fine-tuning:\n{}",
        indented(&after)
    );
    println!(
        "federated model (Hugging Face checkpoint): {}",
        federated.display()
    );

    // 6. No note's text in any node's work directory, and the trail.
    drop(jobs);
    let scanned = SITES
        .iter()
        .flat_map(|site| files(&dir.join("sites").join(site).join("work")))
        .collect::<Vec<_>>();
    for f in &scanned {
        let bytes = std::fs::read(f)?;
        let content = String::from_utf8_lossy(&bytes);
        if let Some(found) = probes.iter().find(|p| content.contains(p.as_str())) {
            bail!(
                "a note's text ({} bytes of it) is in plaintext in {}",
                found.len(),
                f.display()
            );
        }
    }
    println!(
        "no note text in the nodes' work directories: {} files checked for {} note lines",
        scanned.len(),
        probes.len()
    );
    std::fs::remove_dir_all(&eval_dir)?;
    let source = consortium.verify_trail().await?;
    let reports =
        crate::audit_cmd::events_of(&source, tutela_audit::Action::TextDatasetDeidentified)
            .await
            .context("reading the text de-identification reports from the audit trail")?;
    for e in &reports {
        println!(
            "  seq {:>3}  {}: text de-identification report by {}",
            e.seq, e.subject, e.actor
        );
    }
    println!(
        "tokenizer {}…, base {}…, adapters {}…: in the signed spec and the trail (`tutela audit lineage --model {}`)",
        &tokenizer_sha256[..16],
        &base_sha256[..16],
        &last.model_id[..16.min(last.model_id.len())],
        last.model_id
    );
    println!(
        "demo finished in {:.1}s; logs and configs in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}
