//! Prometheus metrics on every service, with real processes (issue 15, item 3): `tutela-audit`
//! (SQLite), a coordinator with `[audit]` and two site nodes with `[audit]`, each with `[metrics]`
//! on a loopback port, run a two-round DP-SGD job. Then every service's `/metrics` parses with
//! Python's `prometheus_client` and passes `promtool check metrics`, and its numbers are what
//! happened: rounds completed = rounds run, updates accepted = the uploads, each node's rounds
//! trained and its ε gauge = the spend its last `privacy.spent` records, the audit service's chain
//! length = the events in its database, its last verification passed. A node with an invalid
//! certificate shows as a refused handshake by reason. The shipped alert rules pass `promtool
//! check rules` and their unit tests (`promtool test rules`); a non-loopback listener without
//! `allow_remote` stops the coordinator at start.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::metrics_check::{check_rules, scrape_and_check};
use tutela_e2e::{audit_events, bin, free_port, repo_root};
use tutela_protocol::pb;

fn metrics_table(port: u16) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exposes_metrics_that_match_what_happened() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let audit_metrics = free_port();
    let _audit = c.start_audit_with(audit_port, AuditPolicy::Open, &metrics_table(audit_metrics));
    let coordinator_metrics = free_port();
    c.coordinator_extra = format!(
        "[audit]\nendpoint = \"localhost:{audit_port}\"\n{}",
        metrics_table(coordinator_metrics)
    );
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(2);
    let sites = ["a", "b"];
    let mut node_metrics = Vec::new();
    for (site, rows) in sites.iter().zip(&shares) {
        let port = free_port();
        node_metrics.push(port);
        let audit = format!(
            "[audit]\nendpoint = \"localhost:{audit_port}\"\ncheckpoint_public_key = \"{}\"\n",
            d.join("audit/checkpoint.key.pub").display()
        );
        c.start_node(
            site,
            &header,
            rows,
            &format!("{audit}{}", metrics_table(port)),
        );
    }
    let rounds = 2;
    let spec = format!(
        "{}\n[privacy]\nmode = \"local\"\ntarget_epsilon = 3.0\ndelta = 1e-5\nmax_grad_norm = 1.0\n",
        job_spec(rounds, 2, 60, &sites)
    );
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .expect("the job is accepted")
        .into_inner()
        .job_id;
    let last = c
        .wait_for_job(&job, Duration::from_secs(300), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());

    // A client whose certificate another CA issued: refused at the handshake, counted by reason.
    // (A CA of the same name as the consortium's shows as `bad_certificate`: its signature does
    // not verify under the real CA's key.)
    let stranger = tutela_protocol::pki::CaDir::init(
        &d.join("other-ca"),
        "stranger",
        tutela_protocol::pki::KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    let issued = stranger
        .issue(
            &tutela_protocol::identity::Principal::Operator { name: "op".into() },
            &tutela_protocol::pki::LeafOptions::new(tutela_protocol::pki::Validity::days_from_now(
                30,
            )),
        )
        .unwrap();
    let other = d.join("other-certs");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(c.certs().join("ca.crt"), other.join("ca.crt")).unwrap();
    std::fs::write(other.join("operator-op.crt"), &issued.cert_pem).unwrap();
    std::fs::write(other.join("operator-op.key"), &issued.key_pem).unwrap();
    let tls = tutela_protocol::client::ClientTls::load(
        &tutela_protocol::tls::TlsFiles::in_dir(&other, "operator-op"),
        None,
    )
    .unwrap();
    // Under TLS 1.3 the refusal reaches the client at its first request, or at connect.
    if let Ok(channel) =
        tutela_protocol::client::connect(&format!("localhost:{}", c.port), tls).await
    {
        let refused = pb::jobs_client::JobsClient::new(channel)
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await;
        assert!(refused.is_err(), "{refused:?}");
    }

    // The coordinator.
    let m = scrape_and_check("coordinator", addr(coordinator_metrics)).await;
    let mut exposed = m.text.clone();
    assert_eq!(
        m.value(
            "tutela_coordinator_rounds_completed_total",
            &[("job", job.as_str())]
        ),
        f64::from(rounds)
    );
    // One initial model, then each site's update in each round.
    assert_eq!(
        m.value("tutela_coordinator_updates_accepted_total", &[]),
        f64::from(1 + rounds * 2)
    );
    assert_eq!(
        m.value(
            "tutela_coordinator_updates_refused_total",
            &[("reason", "rejected")]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "tutela_coordinator_jobs_ended_total",
            &[("outcome", "completed")]
        ),
        1.0
    );
    assert_eq!(
        m.value("tutela_coordinator_aggregation_finish_seconds_count", &[]),
        f64::from(rounds),
        "no attempt failed, so each round finished one aggregation"
    );
    assert_eq!(m.value("tutela_coordinator_connected_nodes", &[]), 2.0);
    assert_eq!(m.value("tutela_coordinator_open_tasks", &[]), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for site in sites {
        assert_eq!(
            m.value("tutela_coordinator_site_connected", &[("site", site)]),
            1.0
        );
        let seen = m.value(
            "tutela_coordinator_site_last_seen_timestamp_seconds",
            &[("site", site)],
        );
        assert!(
            (now - seen).abs() < 60.0,
            "{site} last seen at {seen}, now {now}"
        );
    }
    // Each round's model went down to each site, and each update came up.
    assert!(m.value("tutela_coordinator_stream_sent_bytes_total", &[]) > 0.0);
    assert!(m.value("tutela_coordinator_stream_received_bytes_total", &[]) > 0.0);
    assert!(m.value("tutela_tls_handshakes_accepted_total", &[]) >= 3.0);
    assert!(
        m.value(
            "tutela_tls_handshakes_refused_total",
            &[("reason", "unknown_ca")]
        ) >= 1.0,
        "the stranger's handshake is counted as unknown_ca:\n{}",
        m.text
    );
    // No label carries a site's path.
    assert!(!m.text.contains(&d.display().to_string()), "{}", m.text);

    // The nodes: rounds trained and the budget as the trail records it.
    let spends = audit_events(&d.join("audit/audit.db"), "privacy.spent");
    let mut uploaded = 0.0;
    for (site, port) in sites.iter().zip(&node_metrics) {
        let m = scrape_and_check(&format!("node {site}"), addr(*port)).await;
        exposed.push_str(&m.text);
        assert_eq!(
            m.value("tutela_node_rounds_trained_total", &[]),
            f64::from(rounds)
        );
        uploaded += m.value("tutela_node_updates_uploaded_total", &[]);
        assert!(m.value("tutela_node_uploaded_bytes_total", &[]) > 0.0);
        assert_eq!(
            m.value("tutela_node_training_seconds_count", &[]),
            f64::from(rounds)
        );
        let last_spend = spends
            .iter()
            .rev()
            .find(|e| e["payload"]["site"] == *site)
            .unwrap_or_else(|| panic!("no privacy.spent of {site}: {spends:#?}"));
        let recorded = last_spend["payload"]["dataset_epsilon"].as_f64().unwrap();
        let gauge = m.value("tutela_node_epsilon_spent", &[("dataset", "breast_cancer")]);
        assert!(
            recorded > 0.0 && (gauge - recorded).abs() <= 1e-9 * recorded,
            "{site}: the ε gauge {gauge} is not the spend the trail records, {recorded}"
        );
        assert!(!m.text.contains(&d.display().to_string()), "{}", m.text);
    }
    // One site sent the initial model, then both their updates, as the coordinator counted.
    assert_eq!(uploaded, f64::from(1 + rounds * 2));

    // The audit service.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = scrape_and_check("audit service", addr(audit_metrics)).await;
    exposed.push_str(&m.text);
    let url = format!("sqlite://{}", d.join("audit/audit.db").display());
    let out = tutela_e2e::run_ok(Command::new(bin("tutela")).args([
        "audit",
        "log",
        "--json",
        "--database-url",
        &url,
    ]));
    let events = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(m.value("tutela_audit_chain_length", &[]), events as f64);
    assert!(m.value("tutela_audit_appends_total", &[("result", "ok")]) >= events as f64 - 1.0);
    assert_eq!(m.value("tutela_audit_appends_failed_total", &[]), 0.0);
    assert!(m.value("tutela_audit_checkpoints_signed_total", &[]) >= 1.0);
    assert_eq!(m.value("tutela_audit_last_verification_ok", &[]), 1.0);
    assert!(m.value("tutela_audit_append_duration_seconds_count", &[]) >= 1.0);

    // Every metric the shipped dashboard and alert rules query is one a service registers (a
    // renamed metric fails here, not on an operator's empty panel). Families with a label and
    // no event yet (a job's failed attempts, a dataset without a cap) are absent from a scrape,
    // so the names are looked up where they are registered; those exposed here are checked too.
    let registered: String = [
        "protocol/src/metrics.rs",
        "coordinator/src/metrics.rs",
        "site-node/src/node_metrics.rs",
        "audit/src/metrics.rs",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(repo_root().join(f)).unwrap())
    .collect();
    let monitoring = repo_root().join("deploy/monitoring");
    let mut queried = std::collections::BTreeSet::new();
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(monitoring.join(file)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                registered.contains(&format!("\"{name}\"")),
                "{file} queries {name}, which no service registers"
            );
            queried.insert(name);
        }
    }
    let exposed_queried = queried
        .iter()
        .filter(|n| exposed.contains(&format!("\n# TYPE {n} ")))
        .count();
    assert!(
        exposed_queried >= 20,
        "{exposed_queried} of {queried:?} exposed"
    );
}

/// The `tutela_*` metric families named in a rules or dashboard file (a histogram's
/// `_bucket`/`_count`/`_sum` series by their family).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tutela_") {
        let tail = &rest[i..];
        let end = tail
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // Prose such as "tutela_tls_handshakes_refused_total's" still names the family.
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(family.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_their_unit_tests() {
    check_rules(&repo_root().join("deploy/monitoring"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_listener_other_machines_can_reach_is_refused_without_allow_remote() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.coordinator_extra = "[metrics]\nlisten = \"0.0.0.0:9464\"\n".into();
    // What `start_coordinator` writes, without waiting for a port that never opens.
    let certs = c.certs();
    let toml = format!(
        "listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\ninsecure_no_policy = true\ninsecure_no_audit = true\n[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/coordinator.crt\"\nkey = \"{c}/coordinator.key\"\n{}",
        c.port,
        d.join("coordinator").display(),
        c.coordinator_extra,
        c = certs.display()
    );
    let path = d.join("coordinator.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(bin("tutela-coordinator"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("[metrics] listen = \"0.0.0.0:9464\" is not a loopback address")
            && stderr.contains("allow_remote = true"),
        "{stderr}"
    );
}
