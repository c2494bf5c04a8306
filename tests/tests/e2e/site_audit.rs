//! A site node's own entries in the audit trail and its watch over the trail, with real
//! processes: `tutela-audit` (SQLite), a coordinator and two anonymizing site nodes with `[audit]`
//! in their node.toml.
//!
//! - The node whose pinned checkpoint key is the log's records its de-identification report
//!   (`dataset.deidentified`, as itself) before it trains, once per dataset.
//! - The node that pinned another key declines to train: the log's checkpoints are not trusted.
//! - When the trail is replaced by a fresh one (the operator deletes the database and restarts the
//!   service with the same key), the node that held a checkpoint of the old history declines.

use std::path::Path;
use std::time::{Duration, Instant};

use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::{audit_events, free_port, wait_for_log};
use tutela_protocol::pb;

/// The trail's `dataset.deidentified` events.
fn deidentified_events(d: &Path) -> Vec<serde_json::Value> {
    audit_events(&d.join("audit/audit.db"), "dataset.deidentified")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_record_their_deidentification_and_decline_an_untrusted_or_reset_trail() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    // The trail's own authorization is tested in audit.rs; here any consortium member may append.
    let audit = c.start_audit(audit_port, AuditPolicy::Open);
    // The service made its checkpoint key at start; st-mary pins it, general pins another.
    let pinned = d.join("audit/checkpoint.key.pub");
    assert!(pinned.exists());
    let wrong = d.join("not-the-audit-key.pub");
    std::fs::write(&wrong, format!("{}\n", hex::encode([0x5a_u8; 32]))).unwrap();

    c.start_coordinator();
    let (header, shares, _test) = breast_cancer_shares(2);
    let audit_table = |key: &Path| {
        format!(
            "[audit]\nendpoint = \"localhost:{audit_port}\"\ncheckpoint_public_key = \"{}\"\n",
            key.display()
        )
    };
    let people = c.start_node_anonymized("st-mary", &header, &shares[0], &audit_table(&pinned));
    c.start_node_anonymized("general", &header, &shares[1], &audit_table(&wrong));
    let sites = ["st-mary", "general"];
    let mut op = c.operator().await;
    let mut run_job = async |rounds: u32, deadline_secs: u64| {
        let job = op
            .submit_job(pb::SubmitJobRequest {
                spec_toml: job_spec(rounds, 1, deadline_secs, &sites),
            })
            .await
            .expect("the job is accepted")
            .into_inner()
            .job_id;
        c.wait_for_job(&job, Duration::from_secs(240), |_| false)
            .await
    };

    // Job 1: st-mary records its report once and trains; general declines every round.
    let last = run_job(2, 60).await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    let general_log = d.join("sites/general/node.log");
    wait_for_log(
        &general_log,
        "its checkpoints are not trusted",
        1,
        Duration::from_secs(5),
    );
    let events = deidentified_events(d);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["actor"], "spiffe://e2e/site/st-mary/node", "{e}");
    assert_eq!(e["subject"], "st-mary/breast_cancer", "{e}");
    assert_eq!(e["payload"]["job"], last.job_id, "{e}");
    let report = &e["payload"]["report"];
    assert_eq!(
        report["rows_in"].as_u64().unwrap(),
        shares[0].len() as u64,
        "{e}"
    );
    assert!(report["cells_changed"].as_u64().unwrap() > 0, "{e}");
    assert!(
        report["k_anonymity"]["k_achieved"].as_u64().unwrap() >= 2,
        "{e}"
    );
    // Counts and column names only: no identity value reaches the trail.
    let payload = e["payload"].to_string();
    for p in &people {
        for value in [&p.record_number, &p.name, &p.national_id, &p.date_of_birth] {
            assert!(!payload.contains(value.as_str()), "{value:?} in {payload}");
        }
    }

    // Job 2, after a checkpoint covers job 1: st-mary now holds a signed view of the trail, and
    // does not record the same report twice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let last = run_job(1, 60).await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    assert_eq!(deidentified_events(d).len(), 1);
    let held = d.join("sites/st-mary/work/audit-checkpoint.json.enc");
    assert!(held.exists(), "st-mary holds no checkpoint");
    // And it told the audit service so (`ReportHeldCheckpoint`, for the console's overview): the
    // service keeps st-mary's latest held checkpoint, under st-mary only; general, which trusts
    // no checkpoint of this log, reports none.
    let held_reports = {
        let url = format!("sqlite://{}?mode=ro", d.join("audit/audit.db").display());
        let start = Instant::now();
        loop {
            let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
                .await
                .expect("the audit database");
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT site, tree_size FROM audit_site_checkpoints ORDER BY site")
                    .fetch_all(&mut conn)
                    .await
                    .expect("audit_site_checkpoints");
            if !rows.is_empty() || start.elapsed() > Duration::from_secs(15) {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    assert_eq!(held_reports.len(), 1, "{held_reports:?}");
    assert_eq!(held_reports[0].0, "st-mary", "{held_reports:?}");
    assert!(held_reports[0].1 > 0, "{held_reports:?}");

    // The operator replaces the trail: same key, fresh database. st-mary declines to train.
    audit.signal("KILL");
    drop(audit);
    for f in std::fs::read_dir(d.join("audit")).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with("audit.db") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    // A short deadline: with both sites declining, the round is retried and the job fails.
    let last = run_job(1, 5).await;
    let st_mary_log = d.join("sites/st-mary/node.log");
    // Nobody appends to the fresh log before st-mary looks (the coordinator has no [audit], and
    // general is refused its key first), so it finds no checkpoint where it held one.
    let log = wait_for_log(
        &st_mary_log,
        "the trail's history was reset or replaced",
        1,
        Duration::from_secs(5),
    );
    assert!(log.contains("task declined"), "{log}");
    // Neither site trained, so the round could not close.
    assert_ne!(last.state, "completed", "{last:?}");
}
