//! The coordinator's audit trail end to end: `tutela-audit` (SQLite), a coordinator with `[audit]`
//! and three site nodes run a job; the trail then holds the proposal, the start, every round (with
//! participants and update digests) and the published model, `tutela audit verify` passes, and
//! `tutela audit lineage --model DIGEST` finds the job's rounds and sites.

use std::process::Command;
use std::time::Duration;

use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::{bin, free_port, run_ok};
use tutela_protocol::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_records_the_job_and_the_trail_verifies_with_lineage() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    // This test is about what the coordinator records; the audit service's own policy is tested
    // in audit.rs and approvals.rs, so it runs without one here (any consortium certificate may
    // append and read).
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    let certs = c.certs();

    c.coordinator_extra = format!("[audit]\nendpoint = \"localhost:{audit_port}\"\n");
    c.start_coordinator();
    let (header, shares, _test) = breast_cancer_shares(3);
    let sites = ["st-mary", "general", "riverside"];
    for (site, rows) in sites.iter().zip(&shares) {
        c.start_node(site, &header, rows, "");
    }
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest {
            spec_toml: job_spec(2, 3, 60, &sites),
        })
        .await
        .expect("the job is accepted")
        .into_inner()
        .job_id;
    let last = c
        .wait_for_job(&job, Duration::from_secs(300), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    let model = last.model_id.clone();
    // Let a signed checkpoint cover the last events.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let source = |cmd: &mut Command| {
        cmd.arg("--audit")
            .arg(format!("localhost:{audit_port}"))
            .arg("--tls-dir")
            .arg(&certs)
            .arg("--stem")
            .arg("operator-op");
    };
    let mut log_cmd = Command::new(bin("tutela"));
    log_cmd.args(["audit", "log", "--json"]);
    source(&mut log_cmd);
    let out = run_ok(&mut log_cmd);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |action: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["action"] == action).collect()
    };
    assert!(
        of("job.proposed")
            .iter()
            .any(|e| e["subject"] == job.as_str()),
        "{events:#?}"
    );
    assert!(
        of("job.started")
            .iter()
            .any(|e| e["subject"] == job.as_str()),
        "{events:#?}"
    );
    // Which site supplied the model every round started from is on the record, before round 1.
    let initialized = of("model.initialized");
    assert_eq!(initialized.len(), 1, "{events:#?}");
    let init = &initialized[0];
    assert_eq!(init["subject"], job.as_str(), "{init:#}");
    assert!(
        sites.contains(&init["payload"]["site"].as_str().unwrap()),
        "{init:#}"
    );
    assert_eq!(
        init["payload"]["model_digest"].as_str().unwrap().len(),
        64,
        "{init:#}"
    );
    assert!(
        init["seq"].as_u64()
            < of("round.completed")
                .first()
                .and_then(|r| r["seq"].as_u64()),
        "{events:#?}"
    );
    assert!(of("node.registered").len() >= 3, "{events:#?}");
    let rounds = of("round.completed");
    assert_eq!(rounds.len(), 2, "{events:#?}");
    for r in &rounds {
        let p = &r["payload"];
        assert_eq!(p["participants"].as_array().unwrap().len(), 3, "{r:#}");
        let digests = p["update_digests"].as_object().unwrap();
        for site in sites {
            assert_eq!(digests[site].as_str().unwrap().len(), 64, "{r:#}");
        }
    }
    let published = of("model.published");
    assert!(
        published
            .iter()
            .any(|e| e["subject"] == model.as_str() && e["payload"]["job"] == job.as_str()),
        "{events:#?}"
    );

    let mut verify = Command::new(bin("tutela"));
    verify.args(["audit", "verify"]);
    source(&mut verify);
    let out = run_ok(&mut verify);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("OK: "), "{text}");

    let mut lineage = Command::new(bin("tutela"));
    lineage.args(["audit", "lineage", "--model", &model]);
    source(&mut lineage);
    let out = run_ok(&mut lineage);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&job), "{text}");
    for site in sites {
        assert!(text.contains(site), "{text}");
    }
}
