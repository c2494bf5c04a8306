//! `tutela audit report` and `tutela audit verify-report`, the real binary over a real SQLite
//! trail (a job proposed, started, two rounds with a site's privacy spends, completed) with a
//! signed checkpoint: HTML and PDF reports of the job and of a period verify; an edited one
//! fails naming what differs; the flags are checked before anything is read.

use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::json;
use tutela_audit::merkle::MerkleTree;
use tutela_audit::store::AuditStore;
use tutela_audit::{Action, Chain, Checkpoint, Timestamp};

use super::{Scratch, fails, ok};

const COORDINATOR: &str = "spiffe://acme/coordinator";
const NODE: &str = "spiffe://acme/site/st-mary/node";

/// The trail, stored in `db` with one checkpoint over all of it; returns the key's hex.
fn fill(db: &std::path::Path) -> String {
    let spend = |round: u32, eps: f64| {
        json!({"site": "st-mary", "dataset": "records", "job": "job-1", "round": round,
            "attempt": 0, "sample_rate": 0.01, "noise_multiplier": 1.1, "steps": 100,
            "rows": 1000, "job_epsilon": eps, "dataset_epsilon": eps, "delta": 1e-5,
            "dataset_delta": 1e-5})
    };
    let round = |round: u32, eps: f64| {
        json!({"round": round, "attempt": 0, "participants": ["st-mary"],
            "update_digests": {"st-mary": "ab".repeat(32)},
            "metrics": {"st-mary": {"epsilon": eps}}})
    };
    let rows: Vec<(&str, Action, &str, serde_json::Value)> = vec![
        (
            COORDINATOR,
            Action::JobProposed,
            "job-1",
            json!({"spec_digest": "4a".repeat(32), "code_version": "tutela 0.1.0",
                "base_model": "mlp", "name": "readmission risk", "participants": ["st-mary"],
                "rounds": 2, "privacy": {"mode": "local", "target_epsilon": 3.0, "delta": 1e-5}}),
        ),
        (
            COORDINATOR,
            Action::JobStarted,
            "job-1",
            json!({"spec_digest": "4a".repeat(32), "approvals": 1, "participants": ["st-mary"]}),
        ),
        (
            NODE,
            Action::PrivacySpent,
            "st-mary/records",
            spend(1, 0.93),
        ),
        (COORDINATOR, Action::RoundCompleted, "job-1", round(1, 0.93)),
        (
            NODE,
            Action::PrivacySpent,
            "st-mary/records",
            spend(2, 1.46),
        ),
        (COORDINATOR, Action::RoundCompleted, "job-1", round(2, 1.46)),
        (
            COORDINATOR,
            Action::JobCompleted,
            "job-1",
            json!({"model_digest": "5e".repeat(32), "rounds": 2, "epsilon": {"st-mary": 1.46}}),
        ),
    ];
    let mut chain = Chain::new();
    let mut tree = MerkleTree::new();
    let mut events = Vec::new();
    for (i, (actor, action, subject, payload)) in rows.into_iter().enumerate() {
        let t = Timestamp::from_unix_millis(1_765_000_000_000 + 1000 * i as i64).unwrap();
        let e = chain.append(t, actor, action, subject, payload).unwrap();
        tree.push_entry(&e.hash);
        events.push(e);
    }
    let key = Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).unwrap();
    let cp = Checkpoint {
        tree_size: events.len() as u64,
        root: tree.root(),
        timestamp: Timestamp::from_unix_millis(1_765_000_010_000).unwrap(),
        log_id: "spiffe://acme/audit".into(),
    }
    .sign(&key)
    .unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = AuditStore::open(&AuditStore::sqlite_url(db).unwrap())
            .await
            .unwrap();
        store
            .insert_events_with_checkpoint(&events, &cp)
            .await
            .unwrap();
    });
    hex::encode(key.public_key().as_ref())
}

#[test]
fn reports_made_by_the_cli_verify_and_an_edited_one_is_refused() {
    let s = Scratch::new("report");
    let key = fill(&s.path("audit.db"));
    let url = AuditStore::sqlite_url(&s.path("audit.db")).unwrap();
    let source = ["--database-url", url.as_str(), "--public-key", key.as_str()];
    let report = |extra: &[&str]| {
        let mut args = vec!["audit", "report"];
        args.extend(source);
        args.extend(extra);
        ok(&args)
    };
    fn verify<'a>(file: &'a str, source: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["audit", "verify-report", file];
        args.extend(source);
        args
    }

    let out = report(&[
        "--job",
        "job-1",
        "--format",
        "pdf",
        "--out",
        &s.arg("job.pdf"),
    ]);
    assert!(
        out.contains("7 events in scope, checkpoint of size 7"),
        "{out}"
    );
    let out = ok(&verify(&s.arg("job.pdf"), &source));
    assert!(
        out.contains("ok: PDF document matches its manifest")
            && out.contains("cited event(s) included")
            && out.contains("verified:"),
        "{out}"
    );
    report(&[
        "--job",
        "job-1",
        "--format",
        "html",
        "--out",
        &s.arg("job.html"),
    ]);
    ok(&verify(&s.arg("job.html"), &source));
    report(&[
        "--from",
        "2025-12-01",
        "--to",
        "2025-12-31T00:00",
        "--format",
        "html",
        "--out",
        &s.arg("period.html"),
    ]);
    ok(&verify(&s.arg("period.html"), &source));

    // A number edited on the page.
    let html = std::fs::read_to_string(s.path("job.html")).unwrap();
    assert!(html.contains("<td>1.46</td>"), "st-mary's ε on the page");
    std::fs::write(
        s.path("edited.html"),
        html.replacen("<td>1.46</td>", "<td>0.46</td>", 1),
    )
    .unwrap();
    let err = fails(&verify(&s.arg("edited.html"), &source));
    assert!(
        err.contains("FAILED") && err.contains("<td>0.46</td>") && err.contains("<td>1.46</td>"),
        "{err}"
    );

    // Flags are checked first.
    let mut args = vec!["audit", "report"];
    args.extend(source);
    args.extend(["--job", "job-1", "--format", "pdf"]);
    assert!(fails(&args).contains("--out FILE"));
    let mut args = vec!["audit", "report"];
    args.extend(source);
    args.extend([
        "--from",
        "2025-12-31",
        "--to",
        "2025-12-01",
        "--format",
        "pdf",
        "--out",
        "x",
    ]);
    assert!(fails(&args).contains("is not before its end"));
    let mut args = vec!["audit", "report"];
    args.extend(source);
    args.extend([
        "--from",
        "yesterday",
        "--to",
        "2025-12-01",
        "--format",
        "pdf",
        "--out",
        "x",
    ]);
    assert!(fails(&args).contains("--from: \"yesterday\" is not a time"));
}
