//! Robust aggregation end to end: five site nodes on breast cancer, one of them poisoning its
//! update (`[testing] corrupt_update = "scale_100"`: every value ×100, under a norm bound loose
//! enough to let it through). FedAvg's model collapses; the coordinate-wise median, the trimmed
//! mean and Multi-Krum stay within 2 points of the honest federation's accuracy, and each round
//! reports whom the rule left out or trimmed most, in the job status and in the CLI's.

use std::process::Command;
use std::time::Duration;

use tutela_e2e::consortium::{
    Consortium, breast_cancer_shares, evaluate_breast_cancer, job_spec, write_csv,
};
use tutela_e2e::*;
use tutela_protocol::pb;

const ROUNDS: u32 = 5;
const HONEST: [&str; 5] = ["site-a", "site-b", "site-c", "site-d", "site-e"];
/// The attacker holds site-e's share of the data, and poisons what it sends.
const ATTACKED: [&str; 5] = ["site-a", "site-b", "site-c", "site-d", "mallory"];

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The job for `sites` with `aggregation` (a TOML table, or empty for FedAvg). The norm bound is
/// loose on purpose: the poisoned update passes it, as one a little less crude would pass any.
fn spec(sites: &[&str], aggregation: &str) -> String {
    let base = job_spec(ROUNDS, 5, 60, sites)
        .replace("update_norm_bound = 50.0", "update_norm_bound = 100000.0");
    assert!(
        base.contains("update_norm_bound = 100000.0"),
        "the base spec changed: {base}"
    );
    format!("{base}\n{aggregation}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robust_rules_survive_a_poisoning_site_that_wrecks_fedavg() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.start_coordinator();
    let (header, shares, test) = breast_cancer_shares(5);
    for (site, rows) in HONEST.iter().zip(&shares) {
        c.start_node(site, &header, rows, "");
    }
    c.start_node(
        "mallory",
        &header,
        &shares[4],
        "[testing]\ncorrupt_update = \"scale_100\"\n",
    );
    let test_csv = d.join("test.csv");
    write_csv(&test_csv, &header, &test);

    let runs = [
        ("honest fedavg", &HONEST, ""),
        ("attacked fedavg", &ATTACKED, ""),
        (
            "attacked median",
            &ATTACKED,
            "[aggregation]\nrule = \"median\"\n",
        ),
        (
            "attacked trimmed_mean",
            &ATTACKED,
            "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.2\n",
        ),
        (
            "attacked multi_krum",
            &ATTACKED,
            "[aggregation]\nrule = \"multi_krum\"\nf = 1\n",
        ),
    ];
    let mut accuracy = Vec::new();
    for (i, (name, sites, aggregation)) in runs.iter().enumerate() {
        let spec = spec(&sites[..], aggregation);
        let spec_path = d.join(format!("job-{i}.toml"));
        std::fs::write(&spec_path, &spec).unwrap();
        let job = c
            .operator()
            .await
            .submit_job(pb::SubmitJobRequest { spec_toml: spec })
            .await
            .unwrap_or_else(|e| panic!("{name}: the job is refused: {e}"))
            .into_inner()
            .job_id;
        let status = c
            .wait_for_job(&job, Duration::from_secs(120), |_| false)
            .await;
        assert_eq!(
            status.state,
            "completed",
            "{name}: {status:?}\n{}",
            c.log("coordinator.log")
        );
        assert_eq!(status.rounds.len(), ROUNDS as usize, "{name}");
        for r in &status.rounds {
            assert_eq!(
                r.metrics.len(),
                5,
                "{name} round {}: {:?}",
                r.round,
                r.refused
            );
            let report = r.robust_aggregation.as_ref();
            if aggregation.is_empty() {
                assert!(report.is_none(), "{name}: FedAvg reports no robust rule");
                continue;
            }
            let report = report.unwrap_or_else(|| panic!("{name} round {}: no report", r.round));
            if aggregation.contains("multi_krum") {
                assert_eq!(
                    report.excluded,
                    ["mallory"],
                    "{name} round {}: {report:?}",
                    r.round
                );
            } else {
                // The poisoned values sit at the extremes: the attacker is trimmed most.
                assert_eq!(
                    report.trimmed.first().map(|t| t.site.as_str()),
                    Some("mallory"),
                    "{name} round {}: {report:?}",
                    r.round
                );
            }
        }
        if aggregation.contains("multi_krum") {
            // The operator sees the exclusion in `tutela job status`.
            let out = run_ok(
                Command::new(bin("tutela"))
                    .args(["job", "status", &job, "--coordinator"])
                    .arg(format!("localhost:{}", c.port))
                    .arg("--tls-dir")
                    .arg(c.certs())
                    .args(["--stem", "operator-op"]),
            );
            let printed = String::from_utf8_lossy(&out.stdout);
            assert!(
                printed.contains("multi_krum(f=1, m=n-f); excluded: mallory"),
                "{printed}"
            );
        }
        let acc = evaluate_breast_cancer(&status.model_path, &spec_path, &test_csv)["accuracy"]
            .as_f64()
            .expect("evaluate reports accuracy");
        eprintln!("{name}: accuracy {acc:.4} on {} held-out rows", test.len());
        accuracy.push(acc);
    }
    let honest = accuracy[0];
    assert!(honest >= 0.9, "the honest federation learns: {honest}");
    assert!(
        accuracy[1] <= honest - 0.15,
        "FedAvg under attack should collapse: {} vs honest {honest}",
        accuracy[1]
    );
    for (i, (name, _, _)) in runs.iter().enumerate().skip(2) {
        assert!(
            accuracy[i] >= honest - 0.02,
            "{name}: accuracy {} is more than 2 points below the honest run's {honest}",
            accuracy[i]
        );
    }
}
