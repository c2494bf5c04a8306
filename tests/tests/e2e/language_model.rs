//! A language-model job end to end, with real processes over loopback mutual TLS: `tutela-audit`
//! (SQLite), a coordinator that records to it, and three hospitals whose nodes hold the Synthea
//! notes split by patient, the tokenizer and the base checkpoint the job names by digest. They
//! fine-tune LoRA adapters under DP-SGD (privacy unit: the patient).
//!
//! - The coordinator takes the zero adapters as the initial model and aggregates the adapters'
//!   B only; the job completes.
//! - `job status` shows each site's validation perplexity in every round.
//! - The trail holds each site's `dataset.text_deidentified` (as the node itself), the job's
//!   tokenizer and base digests from the signed spec, and `tutela audit lineage` shows them with
//!   the published adapters' digest.
//! - No note's text is on any node's disk after the job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tutela_e2e::consortium::{AuditPolicy, Consortium};
use tutela_e2e::{audit_events, bin, free_port, repo_root, run_ok};
use tutela_protocol::pb;

const SITES: [&str; 3] = ["st-mary", "general", "riverside"];
/// The site that does not hold the base checkpoint and fetches it from the coordinator.
const FETCHING_SITE: &str = "riverside";

/// The notes, grouped by patient, each patient's notes going to one site (round robin).
fn notes_by_site() -> Vec<Vec<String>> {
    let text =
        std::fs::read_to_string(repo_root().join("data/synthea_clinical_notes.jsonl")).unwrap();
    let mut by_patient: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let patient = v["patient_id"].as_str().unwrap().to_string();
        by_patient
            .entry(patient)
            .or_default()
            .push(line.to_string());
    }
    let mut shares = vec![Vec::new(); SITES.len()];
    for (i, notes) in by_patient.into_values().enumerate() {
        shares[i % SITES.len()].extend(notes);
    }
    shares
}

/// The lines of the notes' text worth looking for on disk (long enough to be the note's own).
fn note_snippets(notes: &[String]) -> Vec<String> {
    let mut snippets = Vec::new();
    for line in notes.iter().step_by(7) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = v["text"].as_str().unwrap();
        snippets.extend(
            text.lines()
                .filter(|l| l.len() > 40)
                .take(2)
                .map(str::to_string),
        );
    }
    snippets
}

/// Every file under `dir`, recursively.
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

/// The first whitespace-separated word of a command's stdout.
fn first_word(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hospitals_fine_tune_adapters_under_dp_on_notes_split_by_patient() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shared = d.join("shared");
    std::fs::create_dir_all(&shared).unwrap();

    // The consortium's tokenizer and base, made from public text (Shakespeare) at test time.
    let node = bin("tutela-node");
    let shakespeare = shared.join("shakespeare.txt");
    let text = std::fs::read_to_string(repo_root().join("data/tinyshakespeare.txt")).unwrap();
    std::fs::write(
        &shakespeare,
        text.split_inclusive('\n').take(3000).collect::<String>(),
    )
    .unwrap();
    let tokenizer_dir = shared.join("tokenizer");
    let out = run_ok(
        Command::new(&node)
            .args(["tokenizer", "train", "--vocab-size", "300", "--input"])
            .arg(&shakespeare)
            .arg("--output")
            .arg(&tokenizer_dir),
    );
    let tokenizer_sha256 = first_word(&out);
    let tokenizer = tokenizer_dir.join("tokenizer.json");
    let config = shared.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true, "initializer_range": 0.02
        })
        .to_string(),
    )
    .unwrap();
    let base = shared.join("base");
    run_ok(
        Command::new(&node)
            .args(["lm", "pretrain", "--text"])
            .arg(&shakespeare)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .arg("--config")
            .arg(&config)
            .arg("--output")
            .arg(&base)
            .args([
                "--steps",
                "20",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--quiet",
            ]),
    );
    let base_sha256 = first_word(&run_ok(
        Command::new(&node).args(["lm", "digest"]).arg(&base),
    ));
    assert_eq!(base_sha256.len(), 64);

    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    c.coordinator_extra = format!("[audit]\nendpoint = \"localhost:{audit_port}\"\n");
    c.start_coordinator();
    let shares = notes_by_site();
    let mut snippets = Vec::new();
    for (site, notes) in SITES.iter().zip(&shares) {
        let site_dir = d.join("sites").join(site);
        std::fs::create_dir_all(&site_dir).unwrap();
        let notes_path = site_dir.join("notes.jsonl");
        std::fs::write(&notes_path, notes.join("\n") + "\n").unwrap();
        snippets.extend(note_snippets(notes));
        let secret = site_dir.join("site-secret");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&secret).unwrap();
        // The last site does not hold the base: it fetches it from the coordinator (the
        // operator uploads it with the job), into its encrypted cache (`[base_cache]`, on by
        // default with a KEK).
        let base_models = if *site == FETCHING_SITE {
            String::new()
        } else {
            format!("base_models = [\"{}\"]\n", base.display())
        };
        let dataset = format!(
            "site_secret_file = \"{secret}\"\ntokenizers = [\"{tokenizer}\"]\n{base_models}\
             [text_datasets.notes]\npath = \"{notes}\"\ntext_field = \"text\"\nid_field = \"note_id\"\n\
             patient_field = \"patient_id\"\ndate_field = \"date\"\nvalidation_fraction = 0.25\n",
            secret = secret.display(),
            tokenizer = tokenizer.display(),
            notes = notes_path.display(),
        );
        let audit = format!(
            "[audit]\nendpoint = \"localhost:{audit_port}\"\ncheckpoint_public_key = \"{}\"\n",
            d.join("audit/checkpoint.key.pub").display()
        );
        c.start_node_with(site, &dataset, &audit);
    }
    assert!(snippets.len() > 20);

    let spec = format!(
        r#"name = "notes-lora-dp"
rounds = 2
min_sites = 3
round_deadline_secs = 240
max_round_retries = 1
update_norm_bound = 100.0
sites = ["st-mary", "general", "riverside"]
seed = 11

[model]
name = "llama"
tokenizer_sha256 = "{tokenizer_sha256}"
base_sha256 = "{base_sha256}"

[data]
schema = "notes"

[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 2
max_seq_len = 32

[privacy]
mode = "local"
target_epsilon = 8.0
delta = 1e-5
max_grad_norm = 1.0
unit = "patient"

[lora]
rank = 4
alpha = 8.0
target_modules = ["q_proj", "v_proj"]
"#
    );
    // Submitted with its base, which the coordinator keeps by digest for the site that lacks it.
    let job_toml = shared.join("job.toml");
    std::fs::write(&job_toml, &spec).unwrap();
    let submitted = run_ok(
        Command::new(bin("tutela"))
            .args(["job", "submit"])
            .arg(&job_toml)
            .arg("--base-model")
            .arg(&base)
            .arg("--coordinator")
            .arg(format!("localhost:{}", c.port))
            .arg("--tls-dir")
            .arg(c.certs())
            .args(["--stem", "operator-op"]),
    );
    let submitted = String::from_utf8_lossy(&submitted.stdout).to_string();
    assert!(
        submitted.contains(&format!("base model {base_sha256} uploaded")),
        "{submitted}"
    );
    let job = submitted
        .lines()
        .find_map(|l| l.strip_prefix("job "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the job id")
        .to_string();
    let last = c
        .wait_for_job(&job, Duration::from_secs(420), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());

    // Each site's validation perplexity in every round.
    assert_eq!(last.rounds.len(), 2, "{last:?}");
    for r in &last.rounds {
        assert_eq!(r.metrics.len(), 3, "{r:?}");
        for m in &r.metrics {
            // Under DP the perplexity is exp of the noised validation loss
            // (`tutela_privacy::metrics`): finite and positive, below 1 when the noise made the
            // loss negative.
            assert!(
                m.eval_perplexity > 0.0 && m.eval_perplexity.is_finite(),
                "{m:?}"
            );
            assert!((m.eval_perplexity.ln() - m.eval_loss).abs() < 1e-6, "{m:?}");
            assert!(
                m.dp_round_epsilon > 0.0 && m.dp_job_epsilon <= 8.0 + 1e-9,
                "{m:?}"
            );
        }
    }
    let status = run_ok(
        Command::new(bin("tutela"))
            .args(["job", "status", &job, "--coordinator"])
            .arg(format!("localhost:{}", c.port))
            .arg("--tls-dir")
            .arg(c.certs())
            .args(["--stem", "operator-op"]),
    );
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("eval perplexity"), "{status}");

    // The trail: each site's text de-identification, the spec's digests, and the lineage.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let db = d.join("audit/audit.db");
    let text_reports = audit_events(&db, "dataset.text_deidentified");
    assert_eq!(text_reports.len(), 3, "{text_reports:#?}");
    for e in &text_reports {
        let p = &e["payload"];
        assert_eq!(p["split_unit"], "patient", "{e}");
        assert_eq!(p["dataset_commitment"].as_str().unwrap().len(), 64, "{e}");
        assert!(e["actor"].as_str().unwrap().ends_with("/node"), "{e}");
    }
    let mut lineage = Command::new(bin("tutela"));
    lineage
        .args(["audit", "lineage", "--model", &last.model_id])
        .arg("--audit")
        .arg(format!("localhost:{audit_port}"))
        .arg("--tls-dir")
        .arg(c.certs())
        .args(["--stem", "operator-op"]);
    let out = run_ok(&mut lineage);
    let lineage: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lm = &lineage["job"]["language_model"];
    assert_eq!(
        lm["tokenizer_sha256"],
        tokenizer_sha256.as_str(),
        "{lineage:#}"
    );
    assert_eq!(lm["base_sha256"], base_sha256.as_str(), "{lineage:#}");
    assert_eq!(lm["adapter_digest"], last.model_id.as_str(), "{lineage:#}");
    assert_eq!(lm["lora"]["rank"], 4, "{lineage:#}");
    // The model.published event names the base the adapters sit on.
    assert_eq!(
        lineage["job"]["base_model"],
        base_sha256.as_str(),
        "{lineage:#}"
    );
    assert_eq!(
        lineage["job"]["text_deidentified"]
            .as_object()
            .unwrap()
            .len(),
        3,
        "{lineage:#}"
    );

    // The base was fetched once, by the one site that lacked it, for both rounds.
    assert_eq!(
        c.log("coordinator.log")
            .matches("base model served")
            .count(),
        1,
        "logs in {}",
        d.display()
    );
    let fetcher_log = c.log(&format!("sites/{FETCHING_SITE}/node.log"));
    assert!(
        fetcher_log.contains("base model fetched and cached"),
        "{fetcher_log}"
    );

    // A second job on the same base, for the fetching site alone: it takes the base from its
    // cache, and the coordinator serves nothing more.
    let for_fetcher = |name: &str, base_digest: &str| {
        spec.replace("notes-lora-dp", name)
            .replace("rounds = 2", "rounds = 1")
            .replace("min_sites = 3", "min_sites = 1")
            .replace(
                r#"sites = ["st-mary", "general", "riverside"]"#,
                &format!("sites = [\"{FETCHING_SITE}\"]"),
            )
            .replace(&base_sha256, base_digest)
    };
    let submit = |spec_toml: String| {
        let c = &c;
        async move {
            c.operator()
                .await
                .submit_job(pb::SubmitJobRequest { spec_toml })
                .await
                .expect("the job is accepted")
                .into_inner()
                .job_id
        }
    };
    let second = submit(for_fetcher("notes-again", &base_sha256)).await;
    let second = c
        .wait_for_job(&second, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(
        second.state,
        "completed",
        "{second:?}; logs in {}",
        d.display()
    );
    assert_eq!(
        c.log("coordinator.log")
            .matches("base model served")
            .count(),
        1,
        "logs in {}",
        d.display()
    );

    // A base whose file is damaged on the coordinator's disk is refused at the site by digest:
    // another base (its config differs), stored as if uploaded, with one weight byte flipped.
    let other_base = shared.join("other-base");
    std::fs::create_dir_all(&other_base).unwrap();
    let mut other_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    other_config["rms_norm_eps"] = serde_json::json!(1e-5);
    std::fs::write(other_base.join("config.json"), other_config.to_string()).unwrap();
    std::fs::copy(
        base.join("model.safetensors"),
        other_base.join("model.safetensors"),
    )
    .unwrap();
    let other_sha256 = first_word(&run_ok(
        Command::new(&node).args(["lm", "digest"]).arg(&other_base),
    ));
    let stored = d.join("coordinator/state/base-models").join(&other_sha256);
    std::fs::create_dir_all(&stored).unwrap();
    std::fs::write(stored.join("config.json"), other_config.to_string()).unwrap();
    let mut damaged = std::fs::read(base.join("model.safetensors")).unwrap();
    let last_byte = damaged.len() - 1;
    damaged[last_byte] ^= 0x40;
    std::fs::write(stored.join("model.safetensors"), &damaged).unwrap();
    let third = submit(for_fetcher("notes-damaged-base", &other_sha256)).await;
    let third = c
        .wait_for_job(&third, Duration::from_secs(240), |_| false)
        .await;
    assert_ne!(third.state, "completed", "{third:?}");
    let coordinator_log = c.log("coordinator.log");
    let refusal = coordinator_log
        .lines()
        .find(|l| l.contains("task declined") && l.contains("model.base_refused"))
        .unwrap_or_else(|| panic!("no refusal of the damaged base; logs in {}", d.display()));
    // The coordinator keeps only the refusal's code (hole (f) of the security review: no free
    // text from a site); the node's own log says why, with the digests.
    assert!(!refusal.contains(&d.display().to_string()), "{refusal}");
    let fetcher_log = c.log(&format!("sites/{FETCHING_SITE}/node.log"));
    assert!(
        fetcher_log
            .lines()
            .any(|l| l.contains(&other_sha256) && l.contains("but the job names")),
        "the fetching node does not say why it refused the damaged base; logs in {}",
        d.display()
    );
    assert!(
        !d.join("sites")
            .join(FETCHING_SITE)
            .join("work/base-models")
            .join(&other_sha256)
            .exists(),
        "the damaged base was kept"
    );

    // The published adapters, as the PEFT directory the sites trained, merged into the base.
    let peft = shared.join("adapter");
    run_ok(
        Command::new(bin("tutela"))
            .args(["model", "export-adapter", "--job"])
            .arg(&job_toml)
            .arg("--model")
            .arg(&last.model_path)
            .arg("--base")
            .arg(&base)
            .arg("--output")
            .arg(&peft),
    );
    let merged = shared.join("merged");
    let out = run_ok(
        Command::new(bin("tutela"))
            .args(["model", "merge", "--base"])
            .arg(&base)
            .arg("--adapter")
            .arg(&peft)
            .arg("--output")
            .arg(&merged),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("merged 4 adapted modules"),
        "{out:?}"
    );

    // No note's text on any node's disk (their data files aside, which are the hospitals' own).
    drop(c);
    // The fetched base is on the fetching site's disk only as ciphertext: neither config.json's
    // text nor the bytes of a tensor (the last 256 of the weights file) appear in any file.
    let config_text = std::fs::read(base.join("config.json")).unwrap();
    let weights = std::fs::read(base.join("model.safetensors")).unwrap();
    let tensor_bytes = &weights[weights.len() - 256..];
    let fetcher_files = files(&d.join("sites").join(FETCHING_SITE).join("work"));
    assert!(!fetcher_files.is_empty());
    for f in fetcher_files {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [config_text.as_slice(), tensor_bytes] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "plaintext of the fetched base in {}",
                f.display()
            );
        }
    }
    for site in SITES {
        for f in files(&d.join("sites").join(site)) {
            if f.file_name().is_some_and(|n| n == "notes.jsonl") {
                continue;
            }
            let bytes = std::fs::read(&f).unwrap();
            let content = String::from_utf8_lossy(&bytes);
            for s in &snippets {
                assert!(!content.contains(s.as_str()), "{s:?} in {}", f.display());
            }
        }
    }
}
