//! `tutela demo`, the README's first command, end to end: it runs, the sites anonymize the
//! identity columns of their records before training, and nothing the nodes wrote holds a byte
//! of plaintext data (the plaintext scan of issue "Data protection at the site"). Each node
//! records its de-identification report in the audit trail itself, and keeps the trail's latest
//! checkpoint, encrypted, in its work directory.

use std::process::Command;

use tutela_e2e::{all_files, audit_events, bin, repo_root, run_ok};

#[test]
fn the_demo_anonymizes_trains_and_leaves_no_plaintext_in_the_nodes_work_directories() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let out = run_ok(
        Command::new(bin("tutela"))
            .arg("demo")
            .arg("--dir")
            .arg(&demo_dir)
            .arg("--data-dir")
            .arg(repo_root().join("data"))
            .args(["--rounds", "3"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("  before: "), "{stdout}");
    assert!(stdout.contains("  after:  "), "{stdout}");
    assert!(
        stdout.contains("[PHONE]") || stdout.contains("[EMAIL]"),
        "{stdout}"
    );

    let sites = std::fs::read_dir(demo_dir.join("sites")).unwrap();
    let mut scanned = 0;
    for site in sites.flatten() {
        let site_dir = site.path();
        // What must never reach the node's work directory: the identity cells and the rows of
        // the site's own raw file.
        let raw = std::fs::read_to_string(site_dir.join("breast_cancer.csv")).unwrap();
        let mut reader = csv::Reader::from_reader(raw.as_bytes());
        let mut probes: Vec<String> = Vec::new();
        for record in reader.records().take(25) {
            let record = record.unwrap();
            // record number, name, national id, a raw feature row's first three values
            probes.extend([0, 1, 2].map(|i| record[i].to_string()));
            probes.push(
                (6..9)
                    .map(|i| record[i].to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        probes.extend(["fc0.weight", "data_offsets", "mean_radius"].map(String::from));
        let files = all_files(&site_dir.join("work"));
        assert!(!files.is_empty(), "{} wrote nothing", site_dir.display());
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            for p in &probes {
                assert!(
                    !bytes.windows(p.len()).any(|w| w == p.as_bytes()),
                    "{} holds plaintext {p:?}",
                    f.display()
                );
            }
            scanned += 1;
        }
    }
    assert!(scanned >= 3, "only {scanned} files scanned");

    // Each site's de-identification report is in the trail, appended by the node itself.
    let events = audit_events(&demo_dir.join("audit/audit.db"), "dataset.deidentified");
    let mut sites_reported: Vec<String> = Vec::new();
    for e in &events {
        let site = e["payload"]["site"].as_str().unwrap().to_string();
        assert_eq!(
            e["actor"].as_str().unwrap(),
            format!("spiffe://demo/site/{site}/node"),
            "{e}"
        );
        assert_eq!(
            e["subject"].as_str().unwrap(),
            format!("{site}/breast_cancer"),
            "{e}"
        );
        let report = &e["payload"]["report"];
        assert!(report["rows_in"].as_u64().unwrap() > 0, "{e}");
        assert_eq!(report["config_sha256"].as_str().unwrap().len(), 64, "{e}");
        assert!(report["cells_changed"].as_u64().unwrap() > 0, "{e}");
        assert_eq!(
            e["payload"]["dataset_commitment"].as_str().unwrap().len(),
            64,
            "{e}"
        );
        sites_reported.push(site);
    }
    sites_reported.sort();
    sites_reported.dedup();
    assert_eq!(sites_reported.len(), 3, "{events:?}");
    assert_eq!(
        events.len(),
        3,
        "one report per site and dataset: {events:?}"
    );
    for site in &sites_reported {
        let held = demo_dir
            .join("sites")
            .join(site)
            .join("work/audit-checkpoint.json.enc");
        assert!(held.exists(), "{} holds no checkpoint", held.display());
    }
}

/// The first number after `label` on the demo's summary line that starts with it (after
/// trimming), as in "federated, 3 hospitals, DP ε = 8/site   211.3  (2.29x lower)".
fn summary_value(stdout: &str, label: &str) -> f64 {
    let line = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no line {label:?} in\n{stdout}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {line:?}"))
}

/// `tutela demo --dataset notes`: three hospitals fine-tune LoRA adapters federated under DP
/// (ε = 8 per site) on the Synthea notes split by patient, and the held-out patients' perplexity
/// at least halves from the base model's: issue 17's end-to-end target (a merged model equal to
/// the base, or adapters that did not travel, fail this). The demo's own configuration
/// (measured over three seeds in BENCHMARKS.md, "The notes demo against the halving target"), its
/// base cached in target/demo-cache after the first run; the document is the privacy unit, as by
/// patient a site trains on two or three patients and DP noise leaves the base nearly unchanged.
/// Every round reports each site's σ and expected batch (job status). No note's text in any
/// node's work directory.
#[test]
fn the_notes_demo_lowers_held_out_perplexity_under_dp_and_leaves_no_note_text() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let out = run_ok(
        Command::new(bin("tutela"))
            .args([
                "demo",
                "--dataset",
                "notes",
                "--privacy-unit",
                "document",
                "--dir",
            ])
            .arg(&demo_dir)
            .arg("--data-dir")
            .arg(repo_root().join("data")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let base = summary_value(&stdout, "base model (tinyshakespeare only)");
    let federated = summary_value(&stdout, "federated, 3 hospitals, DP ε = 8/site");
    assert!(base.is_finite() && federated > 1.0, "{stdout}");
    println!("{stdout}");
    assert!(
        federated * 2.0 <= base,
        "held-out perplexity {federated} is not half the base's {base} or less:\n{stdout}"
    );
    assert!(stdout.contains("validation perplexity"), "{stdout}");
    // σ and the expected batch of every site in every round (σ/B of three sites).
    let rounds: Vec<&str> = stdout.lines().filter(|l| l.starts_with("round ")).collect();
    assert!(!rounds.is_empty(), "{stdout}");
    for line in &rounds {
        let noise = line
            .split("σ/B ")
            .nth(1)
            .unwrap_or_else(|| panic!("no σ/B in {line:?}"));
        let sites: Vec<(f64, f64)> = noise
            .split_whitespace()
            .map(|pair| {
                let (sigma, batch) = pair.split_once('/').unwrap();
                (sigma.parse().unwrap(), batch.parse().unwrap())
            })
            .collect();
        assert_eq!(sites.len(), 3, "{line}");
        assert!(sites.iter().all(|&(s, b)| s > 0.1 && b >= 1.0), "{line}");
    }
    assert!(
        stdout.contains("greedy sample after federated fine-tuning"),
        "{stdout}"
    );

    // Independently of the demo's own check: no line of a hospital's notes in its node's work
    // directory (the notes.jsonl beside it is the hospital's own record system).
    for site in ["st-mary", "general", "riverside"] {
        let site_dir = demo_dir.join("sites").join(site);
        let notes = std::fs::read_to_string(site_dir.join("notes.jsonl")).unwrap();
        let probes: Vec<String> = notes
            .lines()
            .step_by(5)
            .flat_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["text"]
                    .as_str()
                    .unwrap()
                    .lines()
                    .filter(|l| l.trim().len() > 40)
                    .map(|l| l.trim().to_string())
                    .take(2)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(probes.len() > 5, "{site}: {probes:?}");
        let files = all_files(&site_dir.join("work"));
        assert!(!files.is_empty(), "{} wrote nothing", site_dir.display());
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            let content = String::from_utf8_lossy(&bytes);
            for p in &probes {
                assert!(!content.contains(p.as_str()), "{p:?} in {}", f.display());
            }
        }
    }
}
