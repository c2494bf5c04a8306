//! Distributed DP end to end: five site nodes on breast cancer, the same model (logistic
//! regression) trained at the same ε per site under local DP-SGD (`mode = "local"`) and under
//! record-level distributed DP over secure aggregation (`mode = "distributed"`), at ε = 1 and
//! ε = 3, in one run. Both protect one row of a site's table (the same unit). Under distributed
//! DP each round is one Poisson-sampled DP-SGD step (q = 0.5) whose clipped per-row gradients
//! every site sums, scales by −lr/B and encodes with its share of the noise; the coordinator
//! unmasks only the survivors' sum, which is one central DP-SGD step over all five sites' rows.
//! Every round releases only with all five survivors (the plan's minimum), every node signs its
//! keys and runs the consistency check, each site's ledger charges every distributed round
//! before its masked input leaves (the ε it reports grows with the rounds and ends within the
//! target), and the coordinator's stored state holds no 32-byte piece of any site's plain
//! update (the nodes record theirs with `[testing] record_unmasked_updates`).
//!
//! Measured (2-core VM; 113 held-out rows; accuracy and mean log-loss; BENCHMARKS.md has the
//! table): see `distributed_holds_up_against_local` below for what is asserted and why.

use std::path::Path;
use std::time::Duration;

use tutela_e2e::consortium::{Consortium, breast_cancer_shares, evaluate_breast_cancer, write_csv};
use tutela_protocol::pb;

const SITES: [&str; 5] = ["site-a", "site-b", "site-c", "site-d", "site-e"];
/// Local DP-SGD: the settings the earlier local-vs-distributed runs used (3 local epochs of
/// Poisson batches of 32 per round, Adam).
const LOCAL_ROUNDS: u32 = 5;
/// Distributed: one central DP-SGD step per round, so more rounds (each is one step).
const DISTRIBUTED_ROUNDS: u32 = 10;

/// The job: `rounds`, the round's window, `[training]` and `[privacy]`/`[secure_aggregation]`
/// as given.
fn spec(rounds: u32, norm_bound: f64, training: &str, privacy: &str) -> String {
    // A secure round's phases wait up to a quarter of the window each for the slowest node:
    // 32 s keeps them short on a loaded 2-core VM (a round takes ~12 s there, 19 s at 60).
    let deadline = if privacy.contains("[secure_aggregation]") {
        32
    } else {
        60
    };
    format!(
        r#"name = "e2e-distributed"
rounds = {rounds}
min_sites = 5
round_deadline_secs = {deadline}
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
{training}
{privacy}"#,
        sites = SITES
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn local_spec(epsilon: f64) -> String {
    spec(
        LOCAL_ROUNDS,
        50.0,
        "optimizer = \"adam\"\nlearning_rate = 0.05\nlocal_epochs = 3\nbatch_size = 32\n",
        &format!(
            "[privacy]\nmode = \"local\"\ntarget_epsilon = {epsilon}\ndelta = 1e-5\nmax_grad_norm = 1.0\n"
        ),
    )
}

/// q = 0.5 of each site's ~73 training rows: B = 180 expected rows a round across the five
/// sites; each site's update is −2.0/180 · its clipped sum.
fn distributed_spec(epsilon: f64) -> String {
    spec(
        DISTRIBUTED_ROUNDS,
        2.0,
        "optimizer = \"sgd\"\nlearning_rate = 2.0\nlocal_epochs = 1\nbatch_size = 180\n",
        &format!(
            "[privacy]\nmode = \"distributed\"\ntarget_epsilon = {epsilon}\ndelta = 1e-5\nmax_grad_norm = 1.0\nsample_rate = 0.5\n\n[secure_aggregation]\nscale_bits = 16\n"
        ),
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

/// Held-out accuracy and mean log-loss of a job's model.
#[derive(Debug, Clone, Copy)]
struct Quality {
    accuracy: f64,
    loss: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_level_distributed_dp_against_local_dp_at_the_same_epsilon_charged_per_site() {
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

    let mut quality = std::collections::BTreeMap::new();
    for epsilon in [1.0, 3.0] {
        for (mode, spec) in [
            ("local", local_spec(epsilon)),
            ("distributed", distributed_spec(epsilon)),
        ] {
            let name = format!("{mode} at ε = {epsilon}");
            let spec_path = d.join(format!("job-{mode}-{epsilon}.toml"));
            std::fs::write(&spec_path, &spec).unwrap();
            let started = std::time::Instant::now();
            let job = c
                .operator()
                .await
                .submit_job(pb::SubmitJobRequest { spec_toml: spec })
                .await
                .unwrap_or_else(|e| panic!("{name}: the job is refused: {e}"))
                .into_inner()
                .job_id;
            let status = c
                .wait_for_job(&job, Duration::from_secs(600), |_| false)
                .await;
            assert_eq!(
                status.state,
                "completed",
                "{name}: {status:?}\n{}",
                c.log("coordinator.log")
            );
            let rounds = if mode == "local" {
                LOCAL_ROUNDS
            } else {
                DISTRIBUTED_ROUNDS
            };
            assert_eq!(status.rounds.len(), rounds as usize, "{name}");
            for r in &status.rounds {
                assert_eq!(
                    r.metrics.len(),
                    5,
                    "{name} round {}: {:?}",
                    r.round,
                    r.refused
                );
            }
            // Each site's ledger charged every round before its update left: the job's ε it
            // reports grows round by round and ends at the job's target (calibrated from below).
            for site in SITES {
                let spent: Vec<f64> = status
                    .rounds
                    .iter()
                    .map(|r| {
                        r.metrics
                            .iter()
                            .find(|m| m.site == site)
                            .unwrap_or_else(|| panic!("{name}: no metrics of {site}"))
                            .dp_job_epsilon
                    })
                    .collect();
                assert!(
                    spent.windows(2).all(|w| w[1] > w[0]),
                    "{name}: {site}'s charged ε does not grow every round: {spent:?}"
                );
                let last = *spent.last().unwrap();
                assert!(
                    last <= epsilon * (1.0 + 1e-6) && last > 0.9 * epsilon,
                    "{name}: {site} charged ε = {last} for the whole job (target {epsilon})"
                );
            }
            let evaluated = evaluate_breast_cancer(&status.model_path, &spec_path, &test_csv);
            let q = Quality {
                accuracy: evaluated["accuracy"]
                    .as_f64()
                    .expect("evaluate reports accuracy"),
                loss: evaluated["loss"].as_f64().expect("evaluate reports loss"),
            };
            eprintln!(
                "{name}: accuracy {:.4}, log-loss {:.4} on {} held-out rows ({:.0} s)",
                q.accuracy,
                q.loss,
                test.len(),
                started.elapsed().as_secs_f64()
            );
            quality.insert((mode, epsilon.to_string()), q);
        }
    }
    let log = c.log("coordinator.log");
    assert!(
        log.contains("distributed DP (record level)"),
        "the plan was made:\n{log}"
    );
    eprintln!("quality: {quality:?}");
    for epsilon in ["1", "3"] {
        let local = quality[&("local", epsilon.to_string())];
        let distributed = quality[&("distributed", epsilon.to_string())];
        assert!(
            distributed_holds_up_against_local(local, distributed),
            "ε = {epsilon}: distributed {distributed:?} falls behind local {local:?}"
        );
    }

    // Nothing the coordinator stores holds a piece of a site's plain update.
    let mut updates = Vec::new();
    for site in SITES {
        let recorded = d.join("sites").join(site).join("work/testing-unmasked");
        files(&recorded, &mut updates);
    }
    assert!(
        updates.len() >= SITES.len() * 2 * DISTRIBUTED_ROUNDS as usize,
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

/// What one run asserts of distributed against local DP-SGD at the same ε. NOT "clearly
/// better": on breast cancer both sit near the dataset's ceiling at ε = 1 and ε = 3, and the
/// run-to-run spread (distributed, simulated over 20 seeds at ε = 1: accuracy 0.965 ± 0.017,
/// log-loss 0.070 ± 0.019; BENCHMARKS.md "Distributed DP") covers the gap to local DP-SGD
/// (0.947–0.982, log-loss 0.071–0.114 in three runs; distributed's mean log-loss was lower at
/// both ε over two runs: 0.065 against 0.088 at ε = 1). What holds in every run: a useful model (the
/// site-level mode this replaced fell to 0.16 at ε = 1; the majority class is 0.63) whose
/// log-loss is not far behind local DP-SGD's. The step's arithmetic (the survivors' sum, not
/// their mean) is checked exactly in `coordinator/tests/integration/distributed_dp.rs`.
fn distributed_holds_up_against_local(local: Quality, distributed: Quality) -> bool {
    distributed.accuracy >= 0.90 && distributed.loss <= 1.5 * local.loss + 0.02
}
