//! Distributed DP end to end: five site nodes on breast cancer, the same model trained at the
//! same ε per site under local DP-SGD (`mode = "local"`) and under distributed DP over secure
//! aggregation (`mode = "distributed"`), ε = 1 and ε = 3, in one run. The distributed jobs'
//! rounds release only with all five survivors (the plan's minimum), every node signs its keys
//! and runs the consistency check, and the coordinator's stored state (its SQLite database and
//! the rest of its data directory) holds no 32-byte piece of any site's plain update (the nodes
//! record theirs with `[testing] record_unmasked_updates`).
//!
//! Measured (three runs, 2-core VM, 5 rounds, logistic regression, 113 held-out rows): local
//! DP-SGD 0.929 / 0.965 / 0.920 at ε = 1 and 0.947 / 0.991 / 0.982 at ε = 3; distributed DP
//! 0.920 / 0.628 / 0.159 at ε = 1 and 0.832 / 0.929 / 0.912 at ε = 3 (0.628 is the majority
//! class; 0.159 a model the noise turned around). So
//! distributed DP is NOT better here, and varies too much from run to run for an accuracy
//! assertion that could not flake; the test does not claim it: its privacy unit is a
//! site's whole update each round (site-level DP, which covers every row of the site at once),
//! and with five sites the noise that protects one whole site swamps the sum (σ ≈ 2–5 × the
//! clip per coordinate of the mean), while local DP-SGD protects one row and its noise averages
//! over ~90 rows per site. Beating local DP at the same ε needs distributed DP at the row level
//! (each site's noise share added to its DP-SGD steps' clipped sums, FedSGD-style), which is not
//! built (docs/architecture.md, "Distributed DP"). What is asserted: every job completes at its
//! ε with all five sites in every round (the plan's minimum of survivors), and the coordinator keeps
//! nothing of a site's plain update.

use std::path::Path;
use std::time::Duration;

use tutela_e2e::consortium::{Consortium, breast_cancer_shares, evaluate_breast_cancer, write_csv};
use tutela_protocol::pb;

const ROUNDS: u32 = 5;
const SITES: [&str; 5] = ["site-a", "site-b", "site-c", "site-d", "site-e"];

/// The job at `privacy`; `norm_bound` is the coordinator's refusal bound under local DP and each
/// site's clipping norm (the sensitivity) under distributed DP.
fn spec(privacy: &str, norm_bound: f64) -> String {
    format!(
        r#"name = "e2e-distributed"
rounds = {ROUNDS}
min_sites = 5
round_deadline_secs = 60
max_round_retries = 2
update_norm_bound = {norm_bound}
sites = [{sites}]
seed = 3

[model]
name = "mlp"
hidden = []

[data]
schema = "breast_cancer"

[training]
optimizer = "adam"
learning_rate = 0.05
local_epochs = 3
batch_size = 32

{privacy}"#,
        sites = SITES
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Every file under `dir`, read whole.
fn files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dp_trains_at_the_same_epsilon_as_local_dp_and_the_coordinator_keeps_no_update()
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.start_coordinator();
    let (header, shares, test) = breast_cancer_shares(5);
    for (site, rows) in SITES.iter().zip(&shares) {
        c.start_node(
            site,
            &header,
            rows,
            "[testing]\nrecord_unmasked_updates = true\n",
        );
    }
    let test_csv = d.join("test.csv");
    write_csv(&test_csv, &header, &test);

    let mut accuracy = std::collections::BTreeMap::new();
    for epsilon in [1.0, 3.0] {
        for (mode, norm_bound, privacy) in [
            (
                "local",
                50.0,
                format!(
                    "[privacy]\nmode = \"local\"\ntarget_epsilon = {epsilon}\ndelta = 1e-5\nmax_grad_norm = 1.0\n"
                ),
            ),
            (
                "distributed",
                1.0,
                format!(
                    "[privacy]\nmode = \"distributed\"\ntarget_epsilon = {epsilon}\ndelta = 1e-5\n\n[secure_aggregation]\nscale_bits = 12\n"
                ),
            ),
        ] {
            let name = format!("{mode} at ε = {epsilon}");
            let spec = spec(&privacy, norm_bound);
            let spec_path = d.join(format!("job-{mode}-{epsilon}.toml"));
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
                .wait_for_job(&job, Duration::from_secs(240), |_| false)
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
            accuracy.insert(format!("{mode} {epsilon}"), acc);
        }
    }
    let log = c.log("coordinator.log");
    assert!(log.contains("distributed DP"), "the plan was made:\n{log}");
    eprintln!("accuracy: {accuracy:?}");

    // Nothing the coordinator stores holds a piece of a site's plain update.
    let mut updates = Vec::new();
    for site in SITES {
        let recorded = d.join("sites").join(site).join("work/testing-unmasked");
        files(&recorded, &mut updates);
    }
    assert!(
        updates.len() >= SITES.len() * 2 * ROUNDS as usize,
        "every site recorded each distributed round's update: {}",
        updates.len()
    );
    let mut stored = Vec::new();
    files(&d.join("coordinator"), &mut stored);
    assert!(!stored.is_empty());
    let mut pieces = 0;
    for (name, update) in &updates {
        for piece in update.chunks_exact(32) {
            // Long runs of one byte (a zero delta) say nothing about the update.
            let distinct: std::collections::BTreeSet<u8> = piece.iter().copied().collect();
            if distinct.len() < 12 {
                continue;
            }
            pieces += 1;
            for (file, bytes) in &stored {
                assert!(
                    !bytes.windows(32).any(|w| w == piece),
                    "{file} holds a piece of the plain update {name}"
                );
            }
        }
    }
    assert!(pieces > 100, "only {pieces} pieces checked");
}
