//! A language-model job at the gate: the text dataset its schema names, the tokenizer and the
//! base checkpoint it names by digest, each matched against the site's before any document is
//! read; declines that carry digests and codes, never a path; the round the gate picks for the
//! job's model family, and the typed `dataset.text_deidentified` record it gives the trail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::Device;
use tutela_audit::Action;
use tutela_audit::payload::{ActionPayload, check_shape};
use tutela_protocol::pb;
use tutela_site_node::agent::{Deidentification, Refusal, RoundInput, TaskGate, Work};
use tutela_site_node::failure::SiteFailure;
use tutela_site_node::ledger::{FixedCaps, PrivacyBudgetConfig, SiteLedgers};
use tutela_site_node::lm::base::{BaseModelRefusal, BaseModelsError, SiteBaseModels};
use tutela_site_node::lm::config::DecoderConfig;
use tutela_site_node::lm::hf::{checkpoint_digest, save_checkpoint};
use tutela_site_node::lm::text_dataset::{TextDataset, TextDatasetConfig};
use tutela_site_node::lm::tokenizer::site::SiteTokenizers;
use tutela_site_node::lm::tokenizer::train::{TrainOptions, train, write_dir};
use tutela_site_node::weights::NamedTensors;

use crate::common::data_dir;

const SECRET: [u8; 32] = [7u8; 32];

/// A tiny random Llama checkpoint in `dir`, drawn from `seed`; returns its digest.
fn base_checkpoint(dir: &Path, seed: u64) -> String {
    let mut config = DecoderConfig::llama(300, 16, 32, 1, 2, 1);
    config.max_position_embeddings = 32;
    let model = tutela_site_node::lm::registry::build("llama", &config, Device::Cpu, seed).unwrap();
    save_checkpoint(&model, dir).unwrap();
    checkpoint_digest(dir).unwrap()
}

/// A byte-level BPE trained on a few notes, written under `dir`; returns (file, digest).
fn tokenizer(dir: &Path) -> (PathBuf, String) {
    let text = std::fs::read_to_string(data_dir().join("tinyshakespeare.txt")).unwrap();
    let head: String = text.split_inclusive('\n').take(400).collect();
    let input = dir.join("head.txt");
    std::fs::write(&input, head).unwrap();
    let options = TrainOptions {
        vocab_size: 300,
        ..TrainOptions::default()
    };
    let trained = train(&[input], &options, &|_| {}).unwrap();
    let written = write_dir(&trained, &Default::default(), &dir.join("tokenizer")).unwrap();
    (written.tokenizer_json, trained.sha256())
}

/// The Synthea notes as a text dataset split by patient. The notes are copied into `dir` and
/// the copy is deleted after `prepare`, when `delete_after_prepare`: a gate that decides from
/// such a dataset cannot have read a document.
fn notes(dir: &Path, delete_after_prepare: bool) -> Arc<TextDataset> {
    let jsonl = dir.join("notes.jsonl");
    std::fs::copy(data_dir().join("synthea_clinical_notes.jsonl"), &jsonl).unwrap();
    let config: TextDatasetConfig = toml::from_str(&format!(
        r#"
path = "{}"
text_field = "text"
id_field = "note_id"
patient_field = "patient_id"
date_field = "date"
validation_fraction = 0.2
"#,
        jsonl.display()
    ))
    .unwrap();
    let dataset = TextDataset::prepare("notes", &config, &SECRET).unwrap();
    if delete_after_prepare {
        std::fs::remove_file(&jsonl).unwrap();
    }
    Arc::new(dataset)
}

fn lm_job(schema: &str, tokenizer: Option<&str>, base: Option<&str>) -> String {
    let mut model = String::from("name = \"llama\"\n");
    if let Some(t) = tokenizer {
        model.push_str(&format!("tokenizer_sha256 = \"{t}\"\n"));
    }
    if let Some(b) = base {
        model.push_str(&format!("base_sha256 = \"{b}\"\n"));
    }
    format!(
        r#"
name = "notes-lm"
rounds = 1
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 10.0
[model]
{model}
[data]
schema = "{schema}"
[training]
optimizer = "adam"
learning_rate = 0.001
local_epochs = 1
batch_size = 8
[lora]
rank = 2
alpha = 4.0
target_modules = ["q_proj", "v_proj"]
"#
    )
}

fn initialize(spec: String) -> pb::Task {
    pb::Task {
        task_id: "t1".into(),
        job_id: "job-1".into(),
        kind: pb::TaskKind::Initialize as i32,
        job_spec_toml: spec,
        ..Default::default()
    }
}

/// The site-only directory every path of these tests lies under: no reason may name it.
const SITE_ONLY: &str = "site-only-place";

struct Site {
    _dir: tempfile::TempDir,
    gate: TaskGate,
    tokenizer_sha256: String,
    base_sha256: String,
    other_base_sha256: String,
}

fn site(delete_notes: bool) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(SITE_ONLY);
    std::fs::create_dir_all(&root).unwrap();
    let (tokenizer_json, tokenizer_sha256) = tokenizer(&root);
    // A directory of checkpoints: the site's one base, and one it does not offer.
    let bases = root.join("bases");
    let base_sha256 = base_checkpoint(&bases.join("tiny"), 1);
    let other_base_sha256 = base_checkpoint(&root.join("elsewhere"), 2);
    assert_ne!(base_sha256, other_base_sha256);
    let gate = TaskGate::new(BTreeMap::new())
        .with_text_datasets(BTreeMap::from([(
            "notes".to_string(),
            notes(&root, delete_notes),
        )]))
        .with_tokenizers(SiteTokenizers::new(vec![tokenizer_json]))
        .with_base_models(SiteBaseModels::index(&[bases]).unwrap());
    Site {
        _dir: dir,
        gate,
        tokenizer_sha256,
        base_sha256,
        other_base_sha256,
    }
}

/// A refusal as the coordinator is told it: the wire reason, which must name no site path.
fn sent(refusal: &Refusal) -> String {
    let wire = SiteFailure::from(refusal).wire_reason();
    assert!(!wire.contains(SITE_ONLY) && !wire.contains('/'), "{wire}");
    wire
}

#[test]
fn a_language_model_job_is_admitted_with_the_site_s_tokenizer_base_and_text_dataset_unread() {
    let s = site(true);
    assert_eq!(s.gate.dataset_names(), vec!["notes".to_string()]);
    let admitted = s
        .gate
        .check_task(&initialize(lm_job(
            "notes",
            Some(&s.tokenizer_sha256),
            Some(&s.base_sha256),
        )))
        .unwrap();
    // The gate picked the language round, on the text dataset, with what it matched.
    assert_eq!(admitted.round.dataset_name(), "notes");
    assert!(format!("{:?}", admitted.round).contains("LanguageRound"));
    assert_eq!(admitted.base.as_ref().unwrap().sha256(), s.base_sha256);
    assert_eq!(
        admitted.tokenizer.as_ref().unwrap().sha256(),
        s.tokenizer_sha256
    );
    // Its INITIALIZE answer: the adapters' B on every q_proj and v_proj, all zero (what the
    // coordinator's initial-model check accepts), nothing of the base.
    let initial = admitted
        .round
        .initial_weights(&admitted.job, Device::Cpu)
        .unwrap();
    assert_eq!(initial.len(), 2, "one layer, two targets");
    for (spec, bytes) in &initial {
        assert!(spec.name.ends_with(".lora_B.weight"), "{}", spec.name);
        assert_eq!(spec.shape[1], 2, "the job's rank");
        assert!(bytes.iter().all(|&b| b == 0), "{} is not zero", spec.name);
    }
    let lora: tutela_protocol::lora::LoraSpec =
        toml::from_str("rank = 2\nalpha = 4.0\ntarget_modules = [\"q_proj\", \"v_proj\"]").unwrap();
    tutela_protocol::initial_model::AdapterDescription::new(&lora)
        .check(&initial.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>())
        .unwrap();
    // A language-model job needs adapters: without [lora] it is refused, naming the key.
    let without = lm_job("notes", Some(&s.tokenizer_sha256), Some(&s.base_sha256));
    let without = without.split("[lora]").next().unwrap().to_string();
    match s.gate.check_task(&initialize(without)) {
        Err(Refusal::JobSpec(why)) => assert!(why.contains("lora"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_base_the_site_does_not_hold_is_declined_with_both_digests_and_no_path() {
    let s = site(true);
    let refusal = s
        .gate
        .check_task(&initialize(lm_job(
            "notes",
            Some(&s.tokenizer_sha256),
            Some(&s.other_base_sha256),
        )))
        .unwrap_err();
    match &refusal {
        Refusal::BaseModel(BaseModelRefusal::NotHeld { wanted, held }) => {
            assert_eq!(wanted, &s.other_base_sha256);
            assert_eq!(held, &vec![s.base_sha256.clone()]);
        }
        other => panic!("{other:?}"),
    }
    let wire = sent(&refusal);
    assert!(wire.starts_with("model.base_refused: "), "{wire}");
    assert!(
        wire.contains(&s.other_base_sha256) && wire.contains(&s.base_sha256),
        "{wire}"
    );
    // A site that holds no base declines every job that names one.
    let bare = TaskGate::new(BTreeMap::new())
        .with_text_datasets(BTreeMap::from([(
            "notes".to_string(),
            notes(s._dir.path(), true),
        )]))
        .with_tokenizers(SiteTokenizers::new(vec![
            s._dir
                .path()
                .join(SITE_ONLY)
                .join("tokenizer/tokenizer.json"),
        ]));
    match bare.check_task(&initialize(lm_job(
        "notes",
        Some(&s.tokenizer_sha256),
        Some(&s.base_sha256),
    ))) {
        Err(r @ Refusal::BaseModel(BaseModelRefusal::NotHeld { .. })) => {
            assert!(sent(&r).contains("none"), "{r}");
        }
        other => panic!("{other:?}"),
    }
    // Not a digest: the spec is refused, naming the key.
    match s.gate.check_task(&initialize(lm_job(
        "notes",
        Some(&s.tokenizer_sha256),
        Some("ABC"),
    ))) {
        Err(Refusal::JobSpec(why)) => assert!(why.contains("model.base_sha256"), "{why}"),
        other => panic!("{other:?}"),
    }
}

/// A language model's privacy budget is weighed in the gate's first half, before its base is
/// needed (a site that lacks the base fetches it between the halves): a job over a cap, or one
/// that has spent its own target already, is refused by `approve` even when it names a base the
/// site does not hold; a job within budget passes `approve`, leaves the missing base to
/// `admit`, and with the site's base is admitted (weighed again with the adapters' real size).
#[test]
fn a_language_model_job_over_its_budget_is_refused_before_its_base_is_needed() {
    use tutela_privacy::accountant::{self, Accountant, SampledGaussian};
    let s = site(true);
    let dir = tempfile::tempdir().unwrap();
    let ledgers = Arc::new(
        SiteLedgers::new(
            dir.path().join("ledger"),
            None,
            PrivacyBudgetConfig::default(),
        )
        .with_caps(Arc::new(FixedCaps {
            per_job: Some(4.0),
            total: Some(100.0),
        })),
    );
    let gate = s.gate.clone().with_ledgers(ledgers.clone());
    let dp = |epsilon: f64, base: &str| {
        format!(
            "{}[privacy]\nmode = \"local\"\ntarget_epsilon = {epsilon}\ndelta = 1e-5\nmax_grad_norm = 1.0\nunit = \"document\"\n",
            lm_job("notes", Some(&s.tokenizer_sha256), Some(base))
        )
    };
    let train = |spec: String| pb::Task {
        task_id: "t2".into(),
        job_id: "job-1".into(),
        kind: pb::TaskKind::Train as i32,
        round: 1,
        job_spec_toml: spec,
        global_model_id: "a".repeat(64),
        ..Default::default()
    };

    // Over the per-job cap, naming a base the site does not hold: the budget refuses it first.
    match gate.approve(&train(dp(6.0, &s.other_base_sha256))) {
        Err(r @ Refusal::PrivacyBudget(_)) => {
            let wire = sent(&r);
            assert!(wire.starts_with("privacy.budget: "), "{wire}");
            assert!(wire.contains("per-job cap ε ≤ 4"), "{wire}");
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("a job over the per-job cap passed the gate's first half"),
    }
    // Within the cap: approved; the base it names is the second half's to refuse.
    let task = train(dp(3.0, &s.other_base_sha256));
    let approved = gate.approve(&task).unwrap();
    match gate.admit(&task, approved) {
        Err(Refusal::BaseModel(BaseModelRefusal::NotHeld { .. })) => {}
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("admitted without its base"),
    }
    // Within the cap, on the site's base: admitted to train.
    let admitted = gate.check_task(&train(dp(3.0, &s.base_sha256))).unwrap();
    assert_eq!(admitted.work, Work::Train);

    // job-1 has now spent more than its target (an earlier round, in the ledger): its next
    // TRAIN task is refused before any base is needed, with the job's own figures.
    let earlier = SampledGaussian::new(0.2, 0.7, 200).unwrap();
    let spent = accountant::epsilon(&[earlier], 1e-5, Accountant::Rdp)
        .unwrap()
        .epsilon;
    assert!(spent > 3.0, "{spent}");
    ledgers
        .open("notes")
        .unwrap()
        .record("job-1", earlier, Some(60), 1)
        .unwrap();
    for base in [&s.other_base_sha256, &s.base_sha256] {
        match gate.approve(&train(dp(3.0, base))) {
            Err(r @ Refusal::PrivacyBudget(_)) => {
                let wire = sent(&r);
                assert!(wire.contains("over the job's target ε = 3"), "{wire}");
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a job past its target passed the gate's first half"),
        }
    }
}

#[test]
fn the_model_family_chooses_the_kind_of_dataset_and_a_language_model_needs_a_tokenizer() {
    let s = site(true);
    // A language model without a tokenizer: declined, not tokenized with a guess.
    let r = s
        .gate
        .check_task(&initialize(lm_job("notes", None, Some(&s.base_sha256))))
        .unwrap_err();
    assert!(matches!(r, Refusal::NoTokenizer { .. }), "{r:?}");
    assert!(sent(&r).starts_with("job.spec_invalid: "), "{r}");
    // A language model names a text dataset: a schema the site has only as a table, or not at
    // all, is unknown, and the reason lists the text datasets.
    let r = s
        .gate
        .check_task(&initialize(lm_job(
            "breast_cancer",
            Some(&s.tokenizer_sha256),
            None,
        )))
        .unwrap_err();
    match &r {
        Refusal::UnknownSchema { kind, known, .. } => {
            assert_eq!(*kind, "text dataset");
            assert_eq!(known, "notes");
        }
        other => panic!("{other:?}"),
    }
    // A layer network never trains on a text dataset of the same name.
    let mlp = lm_job("notes", None, None)
        .replace("name = \"llama\"", "name = \"mlp\"\nhidden = [4]")
        .split("[lora]")
        .next()
        .unwrap()
        .to_string();
    match s.gate.check_task(&initialize(mlp)) {
        Err(Refusal::UnknownSchema { kind, known, .. }) => {
            assert_eq!(kind, "dataset");
            assert_eq!(known, "");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_language_round_gives_the_trail_a_typed_text_deidentification_without_text() {
    let s = site(false);
    let admitted = s
        .gate
        .check_task(&initialize(lm_job(
            "notes",
            Some(&s.tokenizer_sha256),
            Some(&s.base_sha256),
        )))
        .unwrap();
    let record = admitted
        .round
        .deidentification("hospital-a", "job-1")
        .unwrap()
        .expect("a text dataset is always reported");
    let Deidentification::Text(payload) = &record else {
        panic!("{record:?}")
    };
    assert_eq!(payload.site, "hospital-a");
    assert_eq!(payload.dataset, "notes");
    assert_eq!(payload.job, "job-1");
    assert_eq!(payload.split_unit, "patient");
    assert!(payload.documents_out > 0 && payload.documents_out <= payload.documents_in);
    assert_eq!(payload.dataset_commitment.len(), 64);
    // The payload has the action's shape, as the audit service checks at append.
    let value = payload.to_value();
    check_shape(Action::TextDatasetDeidentified, &value).unwrap();
    // Counts and settings only: no word of any note.
    let json = value.to_string();
    let notes = std::fs::read_to_string(data_dir().join("synthea_clinical_notes.jsonl")).unwrap();
    for line in notes.lines().take(50) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = v["text"].as_str().unwrap();
        for snippet in text.split('\n').filter(|l| l.len() > 24) {
            assert!(!json.contains(snippet), "{snippet:?} in {json}");
        }
        let patient = v["patient_id"].as_str().unwrap();
        assert!(!json.contains(patient), "{patient} in {json}");
    }
    // Recorded once per dataset and protection: the same record again has the same identity.
    let again = admitted
        .round
        .deidentification("hospital-a", "job-1")
        .unwrap()
        .unwrap();
    assert_eq!(again.identity(), record.identity());
}

#[test]
fn base_models_are_found_as_checkpoints_or_directories_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = base_checkpoint(&dir.path().join("a"), 1);
    let b = base_checkpoint(&dir.path().join("parent/b"), 2);
    let c = base_checkpoint(&dir.path().join("parent/c"), 3);
    let index = SiteBaseModels::index(&[dir.path().join("a"), dir.path().join("parent")]).unwrap();
    let held: Vec<&str> = index.held().map(|(d, _)| d).collect();
    let mut expected = vec![a.as_str(), b.as_str(), c.as_str()];
    expected.sort();
    assert_eq!(held, expected);
    assert_eq!(
        index.approve(&b).unwrap().dir(),
        dir.path().join("parent/b")
    );
    // An entry with no checkpoint is refused at start, naming the key.
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    match SiteBaseModels::index(&[dir.path().join("empty")]) {
        Err(e @ BaseModelsError::Empty { index: 0, .. }) => {
            assert!(e.to_string().contains("base_models[0]"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        SiteBaseModels::index(&[dir.path().join("missing")]),
        Err(BaseModelsError::Unreadable { .. })
    ));
}

#[test]
fn a_language_model_site_needs_no_table_and_lists_its_base_models() {
    let text_only = r#"
site = "hospital-a"
coordinator = "coord.example:7443"
work_dir = "work"
insecure_no_approvals = true
site_secret_file = "secret"
tokenizers = ["tok/tokenizer.json"]
base_models = ["models"]
[tls]
ca = "ca.crt"
cert = "node.crt"
key = "node.key"
[text_datasets.notes]
path = "notes.jsonl"
"#;
    let c = tutela_site_node::config::NodeConfig::from_toml_str(text_only, "/etc/tutela/node.toml")
        .unwrap();
    // Relative to the config's directory, like every path.
    assert_eq!(c.base_models, vec![PathBuf::from("/etc/tutela/models")]);
    assert!(c.datasets.is_empty());
    let twice = text_only.replace(
        "base_models = [\"models\"]",
        "base_models = [\"models\", \"models\"]",
    );
    let e = tutela_site_node::config::NodeConfig::from_toml_str(&twice, "/etc/tutela/node.toml")
        .unwrap_err();
    assert_eq!(e.key(), Some("base_models[1]"), "{e}");
    // No dataset of either kind: refused.
    let none = text_only.replace("[text_datasets.notes]\npath = \"notes.jsonl\"\n", "");
    assert!(
        tutela_site_node::config::NodeConfig::from_toml_str(&none, "/etc/tutela/node.toml")
            .is_err()
    );
    // The example documents the key.
    let example = tutela_site_node::config::NodeConfig::load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node.toml"),
    )
    .unwrap();
    assert_eq!(example.base_models.len(), 1);
}

#[test]
fn the_node_prints_the_digest_a_job_names_its_base_by() {
    let dir = tempfile::tempdir().unwrap();
    let digest = base_checkpoint(&dir.path().join("base"), 5);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args(["lm", "digest"])
        .arg(dir.path().join("base"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with(&format!("{digest}  ")), "{stdout}");
}

#[test]
fn an_admitted_train_task_runs_the_language_round_on_the_global_adapter() {
    let s = site(false);
    let dir = tempfile::tempdir().unwrap();
    let mut task = initialize(lm_job(
        "notes",
        Some(&s.tokenizer_sha256),
        Some(&s.base_sha256),
    ));
    let admitted = s.gate.check_task(&task).unwrap();
    let initial = admitted
        .round
        .initial_weights(&admitted.job, Device::Cpu)
        .unwrap();
    let global = dir.path().join("global.safetensors");
    tutela_site_node::weights::save_safetensors(&global, &initial, Default::default()).unwrap();
    task.kind = pb::TaskKind::Train as i32;
    task.global_model_id = "a".repeat(64);
    let admitted = s.gate.check_task(&task).unwrap();
    let result = admitted
        .round
        .run(
            &admitted,
            RoundInput {
                global_path: &global,
                kek: None,
                device: Device::Cpu,
                round: 1,
                attempt: 0,
                site: "hospital-a",
            },
        )
        .unwrap();
    // The round's evaluation is a language model's: perplexity, scored on tokens.
    let ppl = result
        .eval_perplexity
        .expect("a language model's perplexity");
    assert!((ppl - result.eval.loss.exp()).abs() < 1e-6 * ppl, "{ppl}");
    assert!(result.eval.n > 0);
    // Only the adapters' B travel, in the global adapter's names and shapes.
    let names = |t: &NamedTensors| t.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>();
    assert_eq!(names(&result.delta), names(&initial));
    assert!(result.delta.iter().any(|(_, b)| b.iter().any(|&x| x != 0)));
    assert!(result.train_samples > 0 && result.privacy.is_none());
    assert_eq!(result.dataset_commitment.as_deref().map(str::len), Some(64));
}

#[test]
fn the_published_adapters_export_as_the_peft_directory_the_sites_trained() {
    use tutela_protocol::checkpoint::SafetensorsReader;
    use tutela_site_node::lm::lora::dp::AdapterModel;
    use tutela_site_node::lm::lora::{adapter_update_tensors, load_adapter_update};

    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("base");
    base_checkpoint(&base_dir, 3);
    let lora: tutela_protocol::lora::LoraSpec =
        toml::from_str("rank = 2\nalpha = 4.0\ntarget_modules = [\"q_proj\", \"v_proj\"]").unwrap();
    let seed = 9;
    // A site's adapters after training: A from the seed, B some trained values.
    let mut model =
        tutela_site_node::lm::hf::load_checkpoint(&base_dir, Device::Cpu, tch::Kind::Float)
            .unwrap();
    model.attach_lora(&lora, seed).unwrap();
    let mut b = adapter_update_tensors(&model.decoder.lora_layers()).unwrap();
    for (i, (_, bytes)) in b.iter_mut().enumerate() {
        for (j, word) in bytes.chunks_exact_mut(4).enumerate() {
            word.copy_from_slice(&((i * 31 + j) as f32 * 0.01 - 0.2).to_le_bytes());
        }
    }
    load_adapter_update(&mut model.decoder.lora_layers_mut(), &b).unwrap();
    let site_dir = dir.path().join("site-adapter");
    model.decoder.save_adapter(&site_dir).unwrap();
    // What the coordinator published: the B tensors alone.
    let published = dir.path().join("published.safetensors");
    tutela_site_node::weights::save_safetensors(&published, &b, Default::default()).unwrap();
    let exported = dir.path().join("exported");
    let report = tutela_protocol::peft_export::export_peft_adapter(
        &lora, seed, &published, &base_dir, &exported,
    )
    .unwrap();
    assert_eq!(report.modules, 2);
    // The same tensors, bit for bit: every A as the sites derived it, every B as published.
    let mut ours = SafetensorsReader::open(&exported.join("adapter_model.safetensors")).unwrap();
    let mut theirs = SafetensorsReader::open(&site_dir.join("adapter_model.safetensors")).unwrap();
    let mut names = ours.names();
    names.sort();
    let mut expected = theirs.names();
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(names.len(), 4);
    for name in &names {
        assert_eq!(
            ours.read_bytes(name).unwrap(),
            theirs.read_bytes(name).unwrap(),
            "{name}"
        );
    }
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(config(&exported)["r"], config(&site_dir)["r"]);
    assert_eq!(
        config(&exported)["lora_alpha"],
        config(&site_dir)["lora_alpha"]
    );
    // A model that is not adapters is refused.
    let e = tutela_protocol::peft_export::export_peft_adapter(
        &lora,
        seed,
        &base_dir.join("model.safetensors"),
        &base_dir,
        &dir.path().join("bad"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a LoRA adapter"), "{e}");
}
