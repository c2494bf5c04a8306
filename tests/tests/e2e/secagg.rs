//! Secure aggregation end to end: five site nodes on breast cancer, a FedAvg job and the same job
//! with `[secure_aggregation]` (no DP), real processes over mTLS. The masked job completes with
//! every site in every round, its rounds aggregated by the masked sum (the coordinator held only
//! masked inputs), and its model is as good as plain FedAvg's (the grid's rounding is 2^-20).

use std::time::Duration;

use tutela_e2e::consortium::{
    Consortium, breast_cancer_shares, evaluate_breast_cancer, job_spec, write_csv,
};
use tutela_protocol::pb;

const ROUNDS: u32 = 3;
const SITES: [&str; 5] = ["site-a", "site-b", "site-c", "site-d", "site-e"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_aggregation_job_completes_as_well_as_fedavg() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.start_coordinator();
    let (header, shares, test) = breast_cancer_shares(5);
    for (site, rows) in SITES.iter().zip(&shares) {
        c.start_node(site, &header, rows, "");
    }
    let test_csv = d.join("test.csv");
    write_csv(&test_csv, &header, &test);

    let mut accuracy = Vec::new();
    for (i, (name, extra)) in [
        ("fedavg", ""),
        ("secagg", "[secure_aggregation]\nscale_bits = 20\n"),
    ]
    .iter()
    .enumerate()
    {
        let spec = format!("{}\n{extra}", job_spec(ROUNDS, 5, 60, &SITES));
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
            .wait_for_job(&job, Duration::from_secs(150), |_| false)
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
        }
        let acc = evaluate_breast_cancer(&status.model_path, &spec_path, &test_csv)["accuracy"]
            .as_f64()
            .expect("evaluate reports accuracy");
        eprintln!("{name}: accuracy {acc:.4} on {} held-out rows", test.len());
        accuracy.push(acc);
    }
    let log = c.log("coordinator.log");
    assert!(
        log.contains("secagg"),
        "the secure job's rounds ran the masked aggregation:\n{log}"
    );
    assert!(
        accuracy[1] >= accuracy[0] - 0.03,
        "secure aggregation's model ({:.4}) is no worse than FedAvg's ({:.4})",
        accuracy[1],
        accuracy[0]
    );
}
