//! The language-model round as a library (`lm::round`): on a tiny random base and a tokenizer
//! trained at test time, over Synthea notes read through the text protection pipeline. A round
//! without DP lowers the validation loss; with DP the spend is the accountant's for the steps
//! taken and lands in the ledger; the delta is exactly the adapters' `B`; a patient unit with no
//! patient field, and a base that is not the job's, are refused by name.

use std::path::PathBuf;
use std::sync::Arc;

use tch::Device;
use tutela_site_node::ledger::{PrivacyBudgetConfig, RoundCharging, SiteLedgers};
use tutela_site_node::lm::config::DecoderConfig;
use tutela_site_node::lm::error::LmError;
use tutela_site_node::lm::hf::{checkpoint_digest, save_checkpoint};
use tutela_site_node::lm::llama::LanguageModel;
use tutela_site_node::lm::lora::load_adapter_update;
use tutela_site_node::lm::round::data::evaluate;
use tutela_site_node::lm::round::job::LmJob;
use tutela_site_node::lm::round::{
    LmRoundError, LmRoundInputs, LmRoundResult, adapted_base, initial_adapter, local_lm_round,
    tokenize_dataset,
};
use tutela_site_node::lm::text_dataset::{LoadedText, TextDataset, TextDatasetConfig};
use tutela_site_node::lm::tokenizer::train::{TrainOptions, train};
use tutela_site_node::lm::tokenizer::{SpecialTokens, TextTokenizer};
use tutela_site_node::weights::NamedTensors;

use crate::common::data_dir;

const TARGETS: &str =
    r#"["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]"#;

/// Everything a round reads, made in a temporary directory.
struct Fixture {
    _dir: tempfile::TempDir,
    base_dir: PathBuf,
    base_sha256: String,
    tokenizer: TextTokenizer,
    tokenizer_sha256: String,
    text: Arc<LoadedText>,
}

/// Every 20th note of the Synthea file (about 60 notes of all 13 patients), read through the
/// text pipeline (redaction, near-duplicates, split by patient when `by_patient`).
fn fixture(by_patient: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let notes = std::fs::read_to_string(data_dir().join("synthea_clinical_notes.jsonl")).unwrap();
    let picked: Vec<&str> = notes.lines().step_by(20).collect();
    let jsonl = dir.path().join("notes.jsonl");
    std::fs::write(&jsonl, picked.join("\n") + "\n").unwrap();

    let trained = train(
        std::slice::from_ref(&jsonl),
        &TrainOptions {
            vocab_size: 384,
            ..TrainOptions::default()
        },
        &|_| {},
    )
    .unwrap();
    let tokenizer =
        TextTokenizer::from_bytes(trained.json.as_bytes(), &SpecialTokens::default()).unwrap();

    let mut config = DecoderConfig::llama(tokenizer.vocab_size(), 32, 64, 2, 4, 2);
    config.max_position_embeddings = 128;
    config.tie_word_embeddings = true;
    // A larger init than transformers' 0.02: activations of a trained model's size, which the
    // adapters can steer (at 0.02 every projection's output is tiny).
    config.initializer_range = 0.15;
    let base = LanguageModel::new(&config, Device::Cpu, 5).unwrap();
    let base_dir = dir.path().join("base");
    save_checkpoint(&base, &base_dir).unwrap();
    let base_sha256 = checkpoint_digest(&base_dir).unwrap();

    let patient = if by_patient {
        "patient_field = \"patient_id\""
    } else {
        ""
    };
    let config: TextDatasetConfig = toml::from_str(&format!(
        r#"
path = "{}"
text_field = "text"
id_field = "note_id"
date_field = "date"
{patient}
validation_fraction = 0.2
"#,
        jsonl.display()
    ))
    .unwrap();
    let text = TextDataset::prepare("notes", &config, &[7; 32])
        .unwrap()
        .load()
        .unwrap();
    Fixture {
        base_dir,
        base_sha256,
        tokenizer_sha256: trained.sha256(),
        tokenizer,
        text,
        _dir: dir,
    }
}

/// A LoRA job on the fixture's base and tokenizer: `epochs` local epochs, then `privacy`.
fn job(f: &Fixture, epochs: u32, privacy: &str) -> LmJob {
    LmJob::from_toml_str(&format!(
        r#"
name = "notes-lora"
rounds = 2
min_sites = 1
round_deadline_secs = 600
update_norm_bound = 10.0
seed = 42
[model]
name = "llama"
tokenizer_sha256 = "{}"
base_sha256 = "{}"
[data]
schema = "notes"
[training]
optimizer = "adam"
learning_rate = 0.02
local_epochs = {epochs}
batch_size = 4
max_seq_len = 64
{privacy}
[lora]
rank = 8
alpha = 16.0
target_modules = {TARGETS}
"#,
        f.tokenizer_sha256, f.base_sha256
    ))
    .unwrap()
}

fn round(
    f: &Fixture,
    job: &LmJob,
    global: &NamedTensors,
    ledgers: Option<&SiteLedgers>,
) -> Result<LmRoundResult, LmRoundError> {
    local_lm_round(&LmRoundInputs {
        job,
        base_dir: &f.base_dir,
        tokenizer: &f.tokenizer,
        text: &f.text,
        global_adapter: global,
        device: Device::Cpu,
        charging: RoundCharging {
            ledgers,
            job_id: "job-1",
            dataset: "notes",
            round: 1,
            attempt: 0,
        },
        batch_seed: 9,
    })
}

#[test]
fn a_round_without_dp_lowers_the_validation_loss_and_sends_exactly_the_adapters_b() {
    tch::set_num_threads(1);
    let f = fixture(true);
    let job = job(&f, 4, "");
    assert!(f.text.documents.train.len() >= 20, "{:?}", f.text.report);
    let initial = initial_adapter(&job, &f.base_dir, &f.tokenizer).unwrap();
    // B of 7 projections in each of 2 layers; zeros.
    assert_eq!(initial.len(), 14);
    for (spec, bytes) in &initial {
        assert!(
            spec.name.starts_with("base_model.model.model.layers."),
            "{}",
            spec.name
        );
        assert!(spec.name.ends_with(".lora_B.weight"), "{}", spec.name);
        assert_eq!(spec.shape[1], 8, "{}: [out, rank]", spec.name);
        assert!(bytes.iter().all(|&b| b == 0));
    }

    let result = round(&f, &job, &initial, None).unwrap();
    assert!(result.privacy.is_none());
    assert!(result.dp_noise.is_none());
    let names = |t: &NamedTensors| {
        t.iter()
            .map(|(s, _)| (s.name.clone(), s.shape.clone(), s.dtype))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&result.delta), names(&initial));
    assert!(result.train_steps > 0 && result.train_tokens > 0 && result.train_seconds > 0.0);
    assert!(result.train_units >= 5, "patients on the training side");
    assert_eq!(result.dataset_commitment, f.text.commitment.root_hex());
    let base_loss = result.eval.loss;
    assert!((result.eval.perplexity - base_loss.exp()).abs() < 1e-9);

    // The global adapter after this round (global 0 + delta) on the validation side.
    let mut model = adapted_base(&job, &f.base_dir, &f.tokenizer, Device::Cpu).unwrap();
    load_adapter_update(&mut model.decoder.lora_layers_mut(), &result.delta).unwrap();
    let (_, validation) = tokenize_dataset(&job, &f.text, &f.tokenizer, model.config()).unwrap();
    let after = evaluate(
        &model.decoder,
        &validation,
        i64::from(f.tokenizer.pad_id()),
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(after.tokens, result.eval.tokens);
    eprintln!(
        "validation loss {base_loss:.3} -> {:.3} (perplexity {:.1} -> {:.1}) in {} steps",
        after.loss, result.eval.perplexity, after.perplexity, result.train_steps
    );
    assert!(
        after.loss < base_loss - 0.3,
        "validation loss {base_loss} -> {}",
        after.loss
    );

    // The next round starts from that global adapter and evaluates it before training.
    let next = round(&f, &job, &result.delta, None).unwrap();
    assert!((next.eval.loss - after.loss).abs() < 1e-6);

    // A global adapter of the wrong shape is refused, naming the tensor.
    let mut wrong = initial.clone();
    wrong[0].0.shape = vec![7, 8];
    let err = round(&f, &job, &wrong, None).unwrap_err().to_string();
    assert!(err.contains(&initial[0].0.name), "{err}");
}

#[test]
fn with_dp_the_spend_is_the_accountants_for_the_steps_taken_and_lands_in_the_ledger() {
    tch::set_num_threads(1);
    let f = fixture(true);
    let job = job(
        &f,
        1,
        r#"[privacy]
mode = "local"
noise_multiplier = 1.0
max_grad_norm = 1.0
delta = 1e-5
unit = "patient""#,
    );
    let initial = initial_adapter(&job, &f.base_dir, &f.tokenizer).unwrap();
    let ledger_dir = tempfile::tempdir().unwrap();
    let ledgers = SiteLedgers::new(ledger_dir.path(), None, PrivacyBudgetConfig::default());
    let result = round(&f, &job, &initial, Some(&ledgers)).unwrap();
    let spent = result.privacy.expect("a DP round reports its spend");
    assert!(spent.charge.is_some(), "the ledger recorded a charge");

    // The accountant's ε for the plan's q and σ over the steps taken, with the patients as
    // the sampling's rows.
    let patients = f.text.report.split.train_units;
    assert_eq!(result.train_units, patients);
    let dimension: usize = initial
        .iter()
        .map(|(s, _)| s.shape.iter().product::<u64>() as usize)
        .sum();
    let plan = tutela_site_node::ledger::plan(&job.view, patients, dimension)
        .unwrap()
        .unwrap();
    assert_eq!(result.train_steps, plan.steps_per_round);
    assert_eq!(plan.sample_rate, 4.0 / patients as f64);
    // σ and the expected batch (of patients) are reported as a tabular round reports them.
    let noise = result
        .dp_noise
        .expect("a DP round reports its noise multiplier and expected batch");
    assert_eq!(noise.noise_multiplier, plan.effective_noise_multiplier);
    assert!(
        (noise.noise_multiplier - 1.0).abs() < 0.05,
        "σ_eff {} is the job's 1.0 up to the grid's correction",
        noise.noise_multiplier
    );
    assert!(
        (noise.expected_batch - 4.0).abs() < 1e-12,
        "{}",
        noise.expected_batch
    );
    // The round's metrics are charged with it (`tutela_privacy::metrics`): the accountant
    // composes them with the steps, so a round with metrics costs more than its steps alone.
    let metrics = tutela_site_node::ledger::round_metrics(&plan)
        .unwrap()
        .expect("a DP job releases its metrics under DP");
    let steps_alone = tutela_privacy::accountant::epsilon(
        &[plan.mechanism(result.train_steps).unwrap()],
        plan.delta,
        plan.accountant,
    )
    .unwrap()
    .epsilon;
    let expected = tutela_privacy::accountant::epsilon(
        &[plan.mechanism(result.train_steps).unwrap(), metrics],
        plan.delta,
        plan.accountant,
    )
    .unwrap()
    .epsilon;
    assert!(expected > steps_alone, "{expected} vs {steps_alone}");
    assert!(
        spent.charge.and_then(|c| c.metrics).is_some(),
        "the charge holds the round's metrics"
    );
    assert!(
        (spent.round_epsilon - expected).abs() < 1e-12,
        "{} vs {expected}",
        spent.round_epsilon
    );
    assert!((spent.job_epsilon - expected).abs() < 1e-12);
    let ledger = ledgers.open("notes").unwrap();
    assert_eq!(
        ledger.job("job-1").map(|j| j.steps()),
        Some(result.train_steps)
    );
    assert_eq!(ledger.rows(), Some(patients));
    // The released delta is not zero (noise at least) and only B travels.
    assert!(
        result
            .delta
            .iter()
            .any(|(_, bytes)| bytes.iter().any(|&b| b != 0))
    );

    // Without a ledger the round computes the ε of its steps: nothing charges its metrics, so
    // the node sends none (`agent::metrics`).
    let unrecorded = round(&f, &job, &initial, None).unwrap();
    let spent = unrecorded.privacy.unwrap();
    assert!(spent.charge.is_none());
    assert!((spent.round_epsilon - steps_alone).abs() < 1e-12);
}

#[test]
fn a_patient_unit_without_a_patient_field_and_a_base_not_the_jobs_are_refused_by_name() {
    let f = fixture(false);
    let patient = job(
        &f,
        1,
        r#"[privacy]
mode = "local"
noise_multiplier = 1.0
max_grad_norm = 1.0
unit = "patient""#,
    );
    let initial = initial_adapter(&patient, &f.base_dir, &f.tokenizer).unwrap();
    match round(&f, &patient, &initial, None) {
        Err(LmRoundError::Data { key, problem }) => {
            assert_eq!(key, "privacy.unit");
            assert!(problem.contains("patient_field"), "{problem}");
        }
        other => panic!("expected a refusal naming privacy.unit, got {other:?}"),
    }
    // By document, the same dataset trains.
    let by_document = job(&f, 1, "");
    assert!(round(&f, &by_document, &initial, None).is_ok());

    // A base whose digest is not the job's is refused with both digests.
    let other = "0".repeat(64);
    let mut wrong_base = by_document.clone();
    wrong_base
        .view
        .model
        .insert("base_sha256".into(), other.clone().into());
    match initial_adapter(&wrong_base, &f.base_dir, &f.tokenizer) {
        Err(LmRoundError::Model(LmError::DigestMismatch {
            expected, found, ..
        })) => {
            assert_eq!(expected, other);
            assert_eq!(found, f.base_sha256);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_missing_base_key(&f);
}

/// A job without `model.base_sha256` is refused naming the key.
fn assert_missing_base_key(f: &Fixture) {
    let mut job = job(f, 1, "");
    job.view.model.remove("base_sha256");
    let err = initial_adapter(&job, &f.base_dir, &f.tokenizer)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.base_sha256"), "{err}");
}

/// Checks with transformers that a directory loads as a model and a tokenizer, and prints the
/// model's mean loss on the tokenizer's ids of `argv[2]`.
const LOAD_IN_TRANSFORMERS: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok(open(sys.argv[2]).read(), return_tensors="pt").input_ids[:, :64]
with torch.no_grad():
    loss = model(ids, labels=ids).loss.item()
print(f"loss {loss:.6f}")
"#;

#[test]
fn pretraining_lowers_held_out_perplexity_and_writes_a_checkpoint_transformers_loads() {
    use tutela_site_node::lm::central::{PretrainOptions, pretrain};
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let text: String = std::fs::read_to_string(data_dir().join("tinyshakespeare.txt"))
        .unwrap()
        .chars()
        .take(30_000)
        .collect();
    let text_path = dir.path().join("shakespeare.txt");
    std::fs::write(&text_path, &text).unwrap();
    let trained = train(
        std::slice::from_ref(&text_path),
        &TrainOptions {
            vocab_size: 320,
            ..TrainOptions::default()
        },
        &|_| {},
    )
    .unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, &trained.json).unwrap();
    let mut config = DecoderConfig::llama(trained.vocab_size, 32, 64, 2, 4, 2);
    config.max_position_embeddings = 64;
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_json("float32").to_string()).unwrap();
    let output = dir.path().join("base");
    let mut seen = 0;
    let report = pretrain(
        &PretrainOptions {
            text: text_path.clone(),
            tokenizer,
            config: config_path,
            output: output.clone(),
            steps: 40,
            seq_len: 32,
            learning_rate: 1e-2,
            batch_size: 8,
            validation_fraction: 0.1,
            seed: 3,
            device: Device::Cpu,
        },
        &mut |done, total, loss| {
            assert_eq!(total, 40);
            assert!(loss.is_finite());
            seen = done;
        },
    )
    .unwrap();
    assert_eq!(seen, 40, "progress after every step");
    eprintln!(
        "held-out perplexity {:.1} -> {:.1}",
        report.validation_before.perplexity, report.validation_after.perplexity
    );
    assert!(report.validation_after.perplexity < 0.5 * report.validation_before.perplexity);
    let out = run_python_text(LOAD_IN_TRANSFORMERS, &[&output, &text_path]);
    assert!(out.starts_with("loss "), "{out}");

    // Its INT8 export loads dequantized: logits close to the f32 model's, not equal.
    let int8 = dir.path().join("int8");
    tutela_protocol::checkpoint::export_int8(&output, &int8).unwrap();
    use tutela_site_node::lm::hf::{is_int8_export, load_checkpoint, load_int8_checkpoint};
    assert!(is_int8_export(&int8) && !is_int8_export(&output));
    let full = load_checkpoint(&output, Device::Cpu, tch::Kind::Float).unwrap();
    let quantized = load_int8_checkpoint(&int8, Device::Cpu).unwrap();
    let ids = tch::Tensor::arange(20, (tch::Kind::Int64, Device::Cpu)).unsqueeze(0);
    let a = full.decoder.forward(&ids, None, None).unwrap().logits;
    let b = quantized.decoder.forward(&ids, None, None).unwrap().logits;
    let err = (&a - &b).norm().double_value(&[]) / a.norm().double_value(&[]);
    eprintln!("INT8 logits: relative error {err:e}");
    assert!(err > 0.0 && err < 0.05, "{err}");
}

fn run_python_text(script: &str, args: &[&std::path::Path]) -> String {
    crate::lora::run_python(script, args)
}

#[test]
fn the_node_fine_tunes_under_dp_by_patient_and_writes_the_adapter_and_the_merged_model() {
    let f = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let notes = std::fs::read_to_string(data_dir().join("synthea_clinical_notes.jsonl")).unwrap();
    let jsonl = dir.path().join("notes.jsonl");
    let picked: Vec<&str> = notes.lines().step_by(20).collect();
    std::fs::write(&jsonl, picked.join("\n") + "\n").unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, f.tokenizer.inner().to_string(false).unwrap()).unwrap();
    let (adapter, merged) = (dir.path().join("adapter"), dir.path().join("merged"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args([
            "lm",
            "finetune",
            "--quiet",
            "--epsilon",
            "8",
            "--unit",
            "patient",
        ])
        .args([
            "--patient-field",
            "patient_id",
            "--batch-size",
            "4",
            "--seq-len",
            "64",
        ])
        .args(["--targets", "q_proj,v_proj", "--lr", "0.01"])
        .arg("--base")
        .arg(&f.base_dir)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--dataset")
        .arg(&jsonl)
        .arg("--output")
        .arg(&adapter)
        .arg("--merged")
        .arg(&merged)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("{stderr}");
    assert!(
        stderr.contains("ε = ") && stderr.contains("units"),
        "{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("perplexity = "), "{stdout}");
    // The adapter is PEFT's layout on the job's modules; the merged model loads.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert!(adapter.join("adapter_model.safetensors").exists());
    tutela_site_node::lm::hf::load_checkpoint(&merged, Device::Cpu, tch::Kind::Float).unwrap();
    assert!(merged.join("tokenizer.json").exists());

    // A patient unit on a dataset without a patient field is refused naming the key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args([
            "lm",
            "finetune",
            "--quiet",
            "--epsilon",
            "8",
            "--unit",
            "patient",
        ])
        .arg("--base")
        .arg(&f.base_dir)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--dataset")
        .arg(&jsonl)
        .arg("--output")
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("privacy.unit"), "{stderr}");
}
