//! The load generator's 100-site run (tutela_e2e::loadgen): a hundred site agents, each with its
//! own certificate and mutual-TLS connection, against one real coordinator with approvals and the
//! audit trail on. Every round must sample every site and accept every update, and the trail must
//! hold every site's approval and node registration and every round with all its updates. Its
//! larger runs (300, 1,000 sites, 1 M parameters) are benchmarks: BENCHMARKS.md, "Hundreds of
//! sites".

use std::time::Duration;

use tutela_audit::Action;
use tutela_audit::payload::{ActionPayload, RoundCompleted};
use tutela_audit::store::EventFilter;
use tutela_e2e::loadgen::{self, LoadConfig, Silent};

const SITES: usize = 100;
const ROUNDS: u32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_sites_each_round_accepts_every_update_and_the_trail_holds_them() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut config = LoadConfig::new(SITES, dir.path());
    config.rounds = ROUNDS;
    config.hidden = vec![16];
    config.round_deadline_secs = 60;
    let run = loadgen::run(&config, &Silent)
        .await
        .unwrap_or_else(|e| panic!("{e}; logs in {}", dir.path().display()));
    let r = &run.report;
    assert_eq!(r.state, "completed");
    assert_eq!(r.rounds.len(), ROUNDS as usize, "{r:#?}");
    for round in &r.rounds {
        assert_eq!(round.participants, SITES, "round {}: {r:#?}", round.round);
        assert_eq!(round.accepted, SITES, "round {}: {r:#?}", round.round);
        assert_eq!(round.refused, 0, "round {}: {r:#?}", round.round);
    }
    assert_eq!(r.agent_failures, 0, "{:?}", r.agent_last_failure);
    // Every connection is the coordinator's to hold: one per site, and the listener, the
    // operator's and the audit client's.
    assert!(
        r.coordinator_sockets_connected > SITES as u64,
        "{} sockets with {SITES} sites connected",
        r.coordinator_sockets_connected
    );

    // The trail, read as a compliance officer: every approval, every node, every round with every
    // site's update digest.
    let mut trail = run.audit_reader().await.unwrap();
    let query = |action| EventFilter {
        action: Some(action),
        ..Default::default()
    };
    // Round events are durable before the job goes on; registrations are best effort and may
    // trail by a moment.
    let mut registered = Vec::new();
    for _ in 0..50 {
        registered = trail.query(&query(Action::NodeRegistered)).await.unwrap();
        if registered.len() >= SITES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sites: Vec<String> = registered
        .iter()
        .filter_map(|e| e.payload["site"].as_str().map(String::from))
        .collect();
    sites.sort();
    sites.dedup();
    assert_eq!(
        sites.len(),
        SITES,
        "node.registered for {} sites",
        sites.len()
    );

    let approved = trail
        .query(&EventFilter {
            job: Some(r.job_id.clone()),
            action: Some(Action::JobApproved),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        approved.len(),
        SITES,
        "{} job.approved events",
        approved.len()
    );

    let rounds = trail
        .query(&EventFilter {
            job: Some(r.job_id.clone()),
            action: Some(Action::RoundCompleted),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rounds.len(), ROUNDS as usize, "{rounds:#?}");
    for (i, event) in rounds.iter().enumerate() {
        let round = RoundCompleted::from_event(event).unwrap();
        assert_eq!(round.round, i as u32 + 1);
        assert_eq!(round.participants.len(), SITES, "round {}", round.round);
        assert_eq!(round.update_digests.len(), SITES, "round {}", round.round);
        // Every upload is its own stream: no two sites' digests alike.
        let mut digests: Vec<&String> = round.update_digests.values().collect();
        digests.sort();
        digests.dedup();
        assert_eq!(digests.len(), SITES, "round {}", round.round);
    }
}
