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
