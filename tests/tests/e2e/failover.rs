//! Leader failover with real processes (issue 16 item 3): two coordinators with `[ha]` on one
//! PostgreSQL database, three nodes that know both addresses, the audit service, a multi-round
//! job. The leader is SIGKILLed mid-round; the follower takes the lease over, re-issues the
//! interrupted round as the next attempt, and the job completes: rounds 1..N each once in the
//! history, every coordinator event once in the trail, and `tutela audit verify` passes.
//!
//! Needs `TUTELA_TEST_POSTGRES_URL` (`source scripts/test-postgres.sh`); without it the test says
//! so and does nothing, like the other PostgreSQL variants.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::{audit_events, bin, free_port, run_ok, wait_for_log};
use tutela_protocol::pb;

/// `[ha]` of coordinator `name`, reachable by nodes at `localhost:port`.
fn ha_table(name: &str, port: u16) -> String {
    format!(
        "[ha]\ninstance_id = \"{name}\"\nlease_ttl_secs = 3\nrenew_every_secs = 1\nadvertise_address = \"localhost:{port}\"\n"
    )
}

fn psql(url: &str, sql: &str) -> String {
    let out = run_ok(Command::new("psql").arg(url).args(["-At", "-c", sql]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The coordinator actions whose events must each be in the trail once. (`node.registered` is
/// recorded at every connection of a node, so a node that moves to the new leader is recorded
/// again, as it is after any reconnection: that is a new event, not a duplicate.)
const COORDINATOR_ACTIONS: &[&str] = &[
    "job.proposed",
    "job.started",
    "model.initialized",
    "round.completed",
    "update.refused",
    "job.completed",
    "model.published",
    "model.registered",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_round_is_replaced_and_the_job_completes_with_every_round_once() {
    let Some(database_url) = tutela_e2e::consortium::fresh_postgres_database() else {
        eprintln!("the failover test was not run: TUTELA_TEST_POSTGRES_URL is not set");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.database_url = Some(database_url.clone());
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    c.coordinator_extra = format!("[audit]\nendpoint = \"localhost:{audit_port}\"\n");
    let (port_a, port_b) = (c.port, free_port());
    let (log_a, log_b) = (d.join("coord-a.log"), d.join("coord-b.log"));
    let leader = c.start_coordinator_instance("coord-a", port_a, &ha_table("coord-a", port_a));
    wait_for_log(&log_a, "took the leader lease", 1, Duration::from_secs(30));
    let _follower = c.start_coordinator_instance("coord-b", port_b, &ha_table("coord-b", port_b));
    wait_for_log(&log_b, "follower", 1, Duration::from_secs(30));

    // The follower refuses an operator with UNAVAILABLE, naming the leader and its address.
    c.port = port_b;
    let refused = c
        .operator()
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("a follower serves no Jobs call");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("not leader: coordinator coord-b")
            && refused
                .message()
                .contains(&format!("coord-a at localhost:{port_a}")),
        "{}",
        refused.message()
    );
    c.port = port_a;
    // `probe --leader` (a readiness check that only the leader passes); the plain probe
    // (liveness) passes on both.
    let probe = |name: &str, leader: bool| {
        let mut cmd = Command::new(bin("tutela-coordinator"));
        cmd.arg("--config")
            .arg(d.join(format!("{name}.toml")))
            .arg("probe");
        if leader {
            cmd.arg("--leader");
        }
        cmd.output().unwrap().status.success()
    };
    assert!(probe("coord-a", true) && probe("coord-a", false));
    assert!(!probe("coord-b", true) && probe("coord-b", false));

    // Every node knows both coordinators, the follower first for one of them: it is told "not
    // leader" and goes on to the leader.
    let (header, shares, _) = breast_cancer_shares(3);
    let sites = ["s1", "s2", "s3"];
    for (i, site) in sites.iter().enumerate() {
        c.node_coordinators = Some(if i == 0 {
            format!("[\"localhost:{port_b}\", \"localhost:{port_a}\"]")
        } else {
            format!("[\"localhost:{port_a}\", \"localhost:{port_b}\"]")
        });
        c.start_node(site, &header, &shares[i], "");
    }
    let rounds = 4;
    // Enough local epochs that a round lasts a few seconds: the kill lands inside one.
    let spec = job_spec(rounds, 3, 60, &sites).replace("local_epochs = 3", "local_epochs = 40");
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .expect("the leader accepts the job")
        .into_inner()
        .job_id;

    // Mid-round 2: round 1 is recorded and round 2's tasks are out.
    wait_for_log(&log_a, "round started", 2, Duration::from_secs(180));
    leader.signal("KILL");
    let killed = Instant::now();
    drop(leader);
    wait_for_log(&log_b, "round started", 1, Duration::from_secs(60));
    let failover = killed.elapsed();
    eprintln!(
        "FAILOVER: leader SIGKILLed -> next round running on the follower: {:.2} s (lease_ttl_secs = 3, renew_every_secs = 1)",
        failover.as_secs_f64()
    );

    c.port = port_b;
    let last = c
        .wait_for_job(&job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    let history: Vec<u32> = last.rounds.iter().map(|r| r.round).collect();
    assert_eq!(
        history,
        (1..=rounds).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );

    // The round the old leader was in: recorded as an interrupted attempt, re-issued as the next.
    let interrupted = psql(
        &database_url,
        &format!(
            "SELECT round || ':' || attempt FROM round_attempts WHERE job_id = '{job}' AND outcome = 'failed' AND reason LIKE 'interrupted:%'"
        ),
    );
    let interrupted: Vec<&str> = interrupted.lines().collect();
    assert_eq!(interrupted.len(), 1, "{interrupted:?}");
    let (round, attempt) = interrupted[0].split_once(':').unwrap();
    let completed = &last.rounds[round.parse::<usize>().unwrap() - 1];
    assert_eq!(
        completed.attempt,
        attempt.parse::<u32>().unwrap() + 1,
        "{completed:?}"
    );
    // The new leader holds the lease at the next epoch.
    assert_eq!(
        psql(
            &database_url,
            "SELECT holder || ':' || epoch FROM coordinator_lease"
        )
        .trim(),
        "coord-b:2"
    );

    // Every coordinator event is in the trail once; each round completed once.
    let audit_db = d.join("audit/audit.db");
    for action in COORDINATOR_ACTIONS {
        let mut seen = BTreeMap::new();
        for e in audit_events(&audit_db, action) {
            if e["actor"] != "spiffe://e2e/coordinator" {
                continue;
            }
            let key = format!("{} {} {}", e["action"], e["subject"], e["payload"]);
            *seen.entry(key).or_insert(0) += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{action}: recorded more than once: {twice:#?}"
        );
    }
    let mut recorded: Vec<u64> = audit_events(&audit_db, "round.completed")
        .iter()
        .filter(|e| e["subject"] == job.as_str())
        .map(|e| e["payload"]["round"].as_u64().unwrap())
        .collect();
    recorded.sort();
    assert_eq!(recorded, (1..=u64::from(rounds)).collect::<Vec<_>>());
    for action in ["job.started", "job.completed"] {
        let n = audit_events(&audit_db, action)
            .iter()
            .filter(|e| e["subject"] == job.as_str())
            .count();
        assert_eq!(n, 1, "{action}");
    }

    let mut verify = Command::new(bin("tutela"));
    verify
        .args(["audit", "verify", "--audit"])
        .arg(format!("localhost:{audit_port}"))
        .arg("--tls-dir")
        .arg(c.certs())
        .args(["--stem", "operator-op"]);
    let out = run_ok(&mut verify);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("OK: "), "{text}");
}
