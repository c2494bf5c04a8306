//! Secure aggregation that recovers: a node SIGKILLed between the key phases and its upload
//! (its seeds are rebuilt from its neighbours' shares and the round completes without it), and
//! a coordinator SIGKILLed while a round's masked updates come in (on restart it resumes the
//! round; a node whose update was released already re-runs the protocol from its first phase,
//! with this attempt's fresh keys and masks, instead of re-sending anything masked before).

use std::path::Path;
use std::time::{Duration, Instant};

use tutela_e2e::consortium::{Consortium, breast_cancer_shares, job_spec};
use tutela_protocol::pb;

const SITES: [&str; 5] = ["site-a", "site-b", "site-c", "site-d", "site-e"];

fn secure_job(rounds: u32, min_sites: u32) -> String {
    format!(
        "{}\n[secure_aggregation]\nscale_bits = 20\n",
        job_spec(rounds, min_sites, 40, &SITES)
    )
}

async fn wait_for_line(log: &Path, line: &str, c: &Consortium) {
    let start = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(line)
    {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} never logged {line:?}:\n{}\ncoordinator:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default(),
            c.log("coordinator.log")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_between_phases_and_a_coordinator_restarted_mid_round_leave_the_job_complete()
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(5);
    for (site, rows) in SITES.iter().zip(&shares) {
        c.start_node(site, &header, rows, "");
    }

    // 1. site-e dies after the key phases of round 1, before its upload.
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest {
            spec_toml: secure_job(2, 3),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    wait_for_line(
        &d.join("sites/site-e/node.log"),
        "neighbours' keys and certificates checked",
        &c,
    )
    .await;
    c.kill_node("site-e");
    let status = c
        .wait_for_job(&job, Duration::from_secs(180), |_| false)
        .await;
    assert_eq!(
        status.state,
        "completed",
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
    assert_eq!(status.rounds.len(), 2);
    for r in &status.rounds {
        assert!(
            r.metrics.iter().all(|m| m.site != "site-e") && r.metrics.len() == 4,
            "round {}: {:?}",
            r.round,
            r.metrics.iter().map(|m| &m.site).collect::<Vec<_>>()
        );
    }
    c.restart_node("site-e");

    // 2. The coordinator dies once a masked update of round 2 is in.
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest {
            spec_toml: secure_job(3, 5),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    c.wait_for_job(&job, Duration::from_secs(120), |s| s.rounds_completed >= 1)
        .await;
    let uploaded = "masked update uploaded";
    let before: usize = SITES
        .iter()
        .map(|s| {
            std::fs::read_to_string(d.join(format!("sites/{s}/node.log")))
                .unwrap_or_default()
                .matches(uploaded)
                .count()
        })
        .sum();
    let start = Instant::now();
    loop {
        let now: usize = SITES
            .iter()
            .map(|s| {
                std::fs::read_to_string(d.join(format!("sites/{s}/node.log")))
                    .unwrap_or_default()
                    .matches(uploaded)
                    .count()
            })
            .sum();
        if now > before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no upload in round 2"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.coordinator.take().unwrap().signal("KILL");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.start_coordinator();
    let status = c
        .wait_for_job(&job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(
        status.state,
        "completed",
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
    let numbers: Vec<u32> = status.rounds.iter().map(|r| r.round).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    for r in &status.rounds {
        assert_eq!(r.metrics.len(), 5, "round {}: {:?}", r.round, r.refused);
    }
    let resent = SITES.iter().any(|s| {
        std::fs::read_to_string(d.join(format!("sites/{s}/node.log")))
            .unwrap_or_default()
            .contains("sending it again")
    });
    eprintln!("a node re-ran a released round's protocol: {resent}");
}
