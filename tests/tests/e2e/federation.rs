//! Federated training end to end with real processes: a coordinator and site nodes that train
//! with libtorch on CPU, over loopback mutual TLS.

use std::process::Command;
use std::time::Duration;

use tutela_e2e::consortium::{
    Consortium, breast_cancer_shares, evaluate_breast_cancer, job_spec, write_csv,
};
use tutela_e2e::*;
use tutela_protocol::pb;

/// These tests each start a coordinator and several libtorch processes; on a 2-core machine they
/// run one at a time so that round deadlines measure the system, not the contention.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn submit(c: &Consortium, spec: String) -> String {
    c.operator()
        .await
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .expect("the job is accepted")
        .into_inner()
        .job_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_fedavg_matches_central_training_and_the_model_loads_in_python() {
    let _serial = SERIAL.lock().await;
    init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.start_coordinator();
    let (header, shares, test) = breast_cancer_shares(3);
    let sites = ["st-mary", "general", "riverside"];
    // The sites' records carry names, national IDs, dates of birth, postcodes and notes, which
    // each node anonymizes before training.
    let mut people = Vec::new();
    for (site, rows) in sites.iter().zip(&shares) {
        people.extend(c.start_node_anonymized(site, &header, rows, ""));
    }
    let spec = job_spec(10, 3, 60, &sites);
    let spec_path = d.join("job.toml");
    std::fs::write(&spec_path, &spec).unwrap();
    let job = submit(&c, spec).await;
    let status = c
        .wait_for_job(&job, Duration::from_secs(300), |_| false)
        .await;
    assert_eq!(
        status.state,
        "completed",
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
    assert_eq!(status.rounds.len(), 10);

    // Nothing the nodes wrote is plaintext: no model file in their work directories holds a
    // tensor name, a safetensors header key or a row of their data.
    let probes: Vec<Vec<u8>> = [b"fc0.weight".to_vec(), b"data_offsets".to_vec()]
        .into_iter()
        .chain(shares.iter().map(|rows| rows[0].as_bytes().to_vec()))
        .chain(people.iter().take(20).flat_map(|p| {
            [
                p.name.clone(),
                p.national_id.clone(),
                p.record_number.clone(),
            ]
            .map(String::into_bytes)
        }))
        .collect();
    for site in sites {
        let work = d.join("sites").join(site).join("work");
        let files = all_files(&work);
        assert!(
            !files.is_empty(),
            "{site} wrote nothing under {}",
            work.display()
        );
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            for p in &probes {
                assert!(
                    !bytes.windows(p.len()).any(|w| w == p.as_slice()),
                    "{} holds plaintext {:?}",
                    f.display(),
                    String::from_utf8_lossy(p)
                );
            }
        }
    }
    assert!(
        status
            .rounds
            .iter()
            .all(|r| r.participants.len() == 3 && r.refused.is_empty())
    );
    // Every site committed to the anonymized rows it trained on, the same commitment every
    // round (same data, same site secret), and reported its anonymization configuration.
    for site in sites {
        let commitments: std::collections::BTreeSet<(String, String)> = status
            .rounds
            .iter()
            .flat_map(|r| r.metrics.iter().filter(|m| m.site == site))
            .map(|m| (m.dataset_commitment.clone(), m.deid_config_sha256.clone()))
            .collect();
        assert_eq!(commitments.len(), 1, "{site}: {commitments:?}");
        let (root, deid) = commitments.into_iter().next().unwrap();
        assert_eq!((root.len(), deid.len()), (64, 64), "{site}");
    }

    // The federated model on the held-out rows.
    let test_csv = d.join("test.csv");
    write_csv(&test_csv, &header, &test);
    let fed = evaluate_breast_cancer(&status.model_path, &spec_path, &test_csv);
    let fed_acc = fed["accuracy"].as_f64().unwrap();

    // The same model trained centrally on the union of the sites' data, same epochs in total.
    let union: Vec<String> = shares.concat();
    let union_csv = d.join("union.csv");
    write_csv(&union_csv, &header, &union);
    let out = run_ok(
        Command::new(bin("tutela-node"))
            .args(["centralized", "--job-spec"])
            .arg(&spec_path)
            .arg("--csv")
            .arg(&union_csv)
            .arg("--test-csv")
            .arg(&test_csv)
            .arg("--schema")
            .arg(repo_root().join("data/breast_cancer.schema.toml")),
    );
    let central: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let central_acc = central["accuracy"].as_f64().unwrap();
    eprintln!(
        "federated {fed_acc:.4} vs central {central_acc:.4} on {} test rows",
        test.len()
    );
    assert!(fed_acc >= 0.95, "federated accuracy {fed_acc}");
    assert!(
        (central_acc - fed_acc) <= 0.02,
        "federated {fed_acc} is more than 2 points below central {central_acc}"
    );

    // The published safetensors file loads in Python and predicts as the node does.
    let out = run_ok(
        Command::new(bin("tutela-node"))
            .args(["predict", "--model", &status.model_path, "--job-spec"])
            .arg(&spec_path)
            .arg("--csv")
            .arg(&test_csv)
            .arg("--schema")
            .arg(repo_root().join("data/breast_cancer.schema.toml"))
            .args(["--rows", "10"]),
    );
    let rust_preds = String::from_utf8(out.stdout).unwrap();
    let out = run_ok(
        Command::new(python())
            .arg(repo_root().join("tests/python/predict_mlp.py"))
            .arg(&status.model_path)
            .arg(&test_csv)
            .arg(repo_root().join("data/breast_cancer.schema.toml"))
            .arg("10"),
    );
    let py_preds = String::from_utf8(out.stdout).unwrap();
    let parse = |s: &str| -> Vec<Vec<f64>> {
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["probabilities"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let (r, p) = (parse(&rust_preds), parse(&py_preds));
    assert_eq!(r.len(), 10, "{rust_preds}");
    assert_eq!(p.len(), 10, "{py_preds}");
    for (a, b) in r.iter().zip(&p) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "node {a:?} vs python {b:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_with_their_reason_and_the_round_goes_on() {
    let _serial = SERIAL.lock().await;
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Consortium::new(dir.path());
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(5);
    c.start_node("good-a", &header, &shares[0], "");
    c.start_node("good-b", &header, &shares[1], "");
    c.start_node(
        "nan",
        &header,
        &shares[2],
        "[testing]\ncorrupt_update = \"nan\"\n",
    );
    c.start_node(
        "shape",
        &header,
        &shares[3],
        "[testing]\ncorrupt_update = \"wrong_shape\"\n",
    );
    c.start_node(
        "huge",
        &header,
        &shares[4],
        "[testing]\ncorrupt_update = \"scale\"\n",
    );
    let job = submit(
        &c,
        job_spec(2, 2, 30, &["good-a", "good-b", "nan", "shape", "huge"]),
    )
    .await;
    let status = c
        .wait_for_job(&job, Duration::from_secs(180), |_| false)
        .await;
    assert_eq!(
        status.state,
        "completed",
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
    for r in &status.rounds {
        let reason = |site: &str| {
            r.refused
                .iter()
                .find(|x| x.site == site)
                .map(|x| x.reason.clone())
                .unwrap_or_else(|| {
                    panic!("round {}: no refusal for {site}: {:?}", r.round, r.refused)
                })
        };
        assert!(reason("nan").contains("finite"), "{}", reason("nan"));
        assert!(reason("shape").contains("shape"), "{}", reason("shape"));
        assert!(reason("huge").contains("norm"), "{}", reason("huge"));
        let accepted: Vec<&str> = r.metrics.iter().map(|m| m.site.as_str()).collect();
        assert_eq!(accepted, ["good-a", "good-b"], "round {}", r.round);
    }
    // The node saw the reason too.
    let log = std::fs::read_to_string(dir.path().join("sites/nan/node.log")).unwrap();
    assert!(log.contains("finite"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_round_is_left_behind_at_the_deadline() {
    let _serial = SERIAL.lock().await;
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Consortium::new(dir.path());
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(3);
    c.start_node("a", &header, &shares[0], "");
    c.start_node("b", &header, &shares[1], "");
    // This node fetches the round's model and never answers; the test then kills it outright.
    c.start_node(
        "doomed",
        &header,
        &shares[2],
        "[testing]\nstall_after_fetch = true\n",
    );
    let job = submit(&c, job_spec(1, 2, 8, &["a", "b", "doomed"])).await;
    // Wait until the round is under way (the doomed node logged its fetch), then kill it.
    let log = dir.path().join("sites/doomed/node.log");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("stalling")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the doomed node never stalled:\n{}\ncoordinator:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            c.log("coordinator.log")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.kill_node("doomed");
    let status = c
        .wait_for_job(&job, Duration::from_secs(120), |_| false)
        .await;
    assert_eq!(
        status.state,
        "completed",
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
    let r = &status.rounds[0];
    assert_eq!(r.metrics.len(), 2);
    assert!(
        r.refused
            .iter()
            .any(|x| x.site == "doomed" && x.reason.contains("deadline")),
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_job_resumes_without_losing_or_repeating_a_round() {
    kill_and_resume(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_postgres_killed_mid_job_resumes_too() {
    match tutela_e2e::consortium::fresh_postgres_database() {
        Some(url) => kill_and_resume(Some(url)).await,
        None => {
            eprintln!("the PostgreSQL variant was not run: TUTELA_TEST_POSTGRES_URL is not set")
        }
    }
}

/// Runs a job, SIGKILLs the coordinator after two rounds, restarts it on the same database, and
/// checks the job completes with every round recorded exactly once.
async fn kill_and_resume(database_url: Option<String>) {
    let _serial = SERIAL.lock().await;
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Consortium::new(dir.path());
    let on_postgres = database_url.is_some();
    c.database_url = database_url;
    c.start_coordinator();
    if on_postgres {
        // The listener is bound before the store is opened: the migration's log line (naming
        // the database) may come a moment after the port opens, later on a loaded machine.
        let mut log = c.log("coordinator.log");
        let waited = std::time::Instant::now();
        while !log.contains("postgres://") && waited.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            log = c.log("coordinator.log");
        }
        assert!(
            log.contains("postgres://"),
            "the coordinator is not on Postgres:\n{log}"
        );
    }
    let (header, shares, _) = breast_cancer_shares(3);
    for (site, rows) in ["a", "b", "c"].iter().zip(&shares) {
        c.start_node(site, &header, rows, "");
    }
    // Enough rounds that the kill lands mid-job even though a round takes tens of milliseconds.
    let rounds = 60;
    let job = submit(&c, job_spec(rounds, 3, 30, &["a", "b", "c"])).await;
    let status = c
        .wait_for_job(&job, Duration::from_secs(180), |s| s.rounds_completed >= 2)
        .await;
    assert_eq!(
        status.state, "running",
        "the job ended before the kill: {status:?}"
    );
    // SIGKILL: no chance to clean up.
    c.coordinator.take().unwrap().signal("KILL");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_coordinator();
    let status = c
        .wait_for_job(&job, Duration::from_secs(300), |_| false)
        .await;
    assert_eq!(
        status.state,
        "completed",
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
    let numbers: Vec<u32> = status.rounds.iter().map(|r| r.round).collect();
    assert_eq!(
        numbers,
        (1..=rounds).collect::<Vec<_>>(),
        "rounds must have no gap and no duplicate"
    );
    assert!(c.log("coordinator.log").contains("resuming job"));
}
