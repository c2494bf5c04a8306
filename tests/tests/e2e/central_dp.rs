//! Central DP (DP-FedAvg at the coordinator) end to end with real processes: a coordinator and
//! three site nodes over loopback mutual TLS run a `[privacy] mode = "central"` job. The test
//! checks what the operator is shown (every round's clip, noise multiplier and site-level ε in
//! the job status), that the ε reported is exactly the accountant's for the rounds released, and
//! that the noised model is still a useful classifier.

use std::process::Command;
use std::time::Duration;

use tutela_e2e::consortium::{
    Consortium, breast_cancer_shares, evaluate_breast_cancer, job_spec, write_csv,
};
use tutela_e2e::*;
use tutela_privacy::accountant::plan::{effective_noise_multiplier, grid_for};
use tutela_privacy::accountant::{self, Accountant, SampledGaussian};
use tutela_protocol::pb;

const ROUNDS: u32 = 4;
/// C: each site's update (the change to the global model) is scaled to L2 norm at most C.
const CLIP: f64 = 2.0;
/// z: the noise on the sum of the three clipped updates is N(0, (z·C)²) per coordinate, so on
/// the mean it is z·C/3 ≈ 0.13 per coordinate, about 2.2 in L2 norm over the model's ~270
/// parameters, more than a clipped update's own norm. The ε is large (about 100 after four
/// rounds: three sites cannot hide one of themselves cheaply, the noise needed grows with √d
/// while the signal is one site in three), but it is real noise the model must survive, and
/// what is under test is the mechanism and its accounting. Measured on this machine: accuracy
/// 0.93–1.0 at z = 0.3 over a dozen runs, 0.52–0.89 at z = 1, so z = 0.2 keeps the bound below
/// safe from the noise.
const NOISE_MULTIPLIER: f64 = 0.2;
const DELTA: f64 = 1e-5;

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The breast-cancer job with central DP: a small MLP (one hidden layer of 8) so that the noise,
/// which grows with the parameter count, stays below the signal of three sites.
fn central_dp_spec(sites: &[&str]) -> String {
    let base = job_spec(ROUNDS, 3, 60, sites).replace("hidden = [32, 16]", "hidden = [8]");
    assert!(
        base.contains("hidden = [8]"),
        "the base spec changed: {base}"
    );
    format!(
        "{base}
[privacy]
mode = \"central\"
delta = {DELTA:e}

[privacy.central]
clip_norm = {CLIP:?}
noise_multiplier = {NOISE_MULTIPLIER:?}
"
    )
}

/// Site-level ε of `rounds` rounds of the Gaussian mechanism with every site taking part
/// (q = 1: the coordinator picks sites, it does not Poisson-sample them, so no amplification)
/// at the effective noise multiplier the coordinator charges: z·C / (C + g·√d), the noise
/// grid's sensitivity correction for a model of `dimension` parameters (see
/// `tutela_privacy::accountant::plan`).
fn expected_epsilon(rounds: u64, dimension: usize) -> f64 {
    let grid = grid_for(NOISE_MULTIPLIER * CLIP);
    let z = effective_noise_multiplier(NOISE_MULTIPLIER, CLIP, grid, dimension);
    let mechanism = SampledGaussian::new(1.0, z, rounds).expect("valid mechanism");
    accountant::epsilon(&[mechanism], DELTA, Accountant::Rdp)
        .expect("the accountant converges")
        .epsilon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_dp_job_reports_the_accountants_epsilon_every_round_and_the_model_is_useful() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    c.start_coordinator();
    let (header, shares, test) = breast_cancer_shares(3);
    let sites = ["st-mary", "general", "riverside"];
    for (site, rows) in sites.iter().zip(&shares) {
        c.start_node(site, &header, rows, "");
    }
    let spec = central_dp_spec(&sites);
    let spec_path = d.join("job.toml");
    std::fs::write(&spec_path, &spec).unwrap();
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.clone(),
        })
        .await
        .expect("the central-DP job is accepted")
        .into_inner()
        .job_id;
    let status = c
        .wait_for_job(&job, Duration::from_secs(180), |_| false)
        .await;
    assert_eq!(
        status.state,
        "completed",
        "{status:?}\n{}",
        c.log("coordinator.log")
    );
    assert_eq!(status.rounds.len(), ROUNDS as usize, "{status:?}");

    // The accountant's figures depend on the model's size (the grid correction): read it from
    // the published model, as the coordinator does.
    let (manifest, _) =
        tutela_protocol::stream::load_model(std::path::Path::new(&status.model_path))
            .expect("the final model loads");
    let dimension: usize = manifest
        .tensors()
        .iter()
        .map(|t| t.numel().expect("tensor size fits") as usize)
        .sum();

    let mut previous = 0.0;
    for (i, r) in status.rounds.iter().enumerate() {
        let round = i as u64 + 1;
        assert_eq!(u64::from(r.round), round, "{status:?}");
        assert_eq!(r.participants.len(), 3, "round {round}: {r:?}");
        assert!(r.refused.is_empty(), "round {round}: {:?}", r.refused);
        // The central-DP entry is reported on its own, never as a site.
        assert_eq!(r.metrics.len(), 3, "round {round}: {:?}", r.metrics);
        assert!(
            r.metrics.iter().all(|m| m.dp_delta == 0.0),
            "no site ran DP-SGD (mode is central): {:?}",
            r.metrics
        );
        let dp = r
            .central_dp
            .as_ref()
            .unwrap_or_else(|| panic!("round {round} reports no central DP: {r:?}"));
        assert_eq!(dp.noise_multiplier, NOISE_MULTIPLIER, "round {round}");
        assert_eq!(dp.clip, CLIP, "round {round}: fixed clipping");
        assert_eq!(dp.next_clip, CLIP, "round {round}: fixed clipping");
        assert_eq!(dp.delta, DELTA, "round {round}");
        assert_eq!((dp.sites, dp.unclipped <= 3), (3, true), "round {round}");
        assert!(
            dp.job_epsilon > previous,
            "round {round}: ε {} does not increase on {previous}",
            dp.job_epsilon
        );
        let want = expected_epsilon(round, dimension);
        assert!(
            (dp.job_epsilon - want).abs() <= 1e-9 * want,
            "round {round}: job ε {} but the accountant gives {want} for {round} rounds at z = \
             {NOISE_MULTIPLIER} (d = {dimension})",
            dp.job_epsilon
        );
        let one = expected_epsilon(1, dimension);
        assert!(
            (dp.round_epsilon - one).abs() <= 1e-9 * one,
            "round {round}: round ε {} but one round costs {one}",
            dp.round_epsilon
        );
        previous = dp.job_epsilon;
    }
    let final_epsilon = previous;

    // The operator sees the same figures through the CLI.
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
        printed.contains(&format!("ε {final_epsilon:.3} for the job so far")),
        "`tutela job status` does not show the job's central-DP ε {final_epsilon:.3}:\n{printed}"
    );
    assert!(
        printed.contains(&format!("noise multiplier {NOISE_MULTIPLIER:.4}")),
        "{printed}"
    );

    // The noised model on the held-out share. Chance is the majority class's share (about
    // 0.63); the noise-free federation reaches about 0.95 on these rows. The bound leaves room
    // for the noise: the released mean moves by about 0.13 per coordinate per round.
    let test_csv = d.join("test.csv");
    write_csv(&test_csv, &header, &test);
    let accuracy = evaluate_breast_cancer(&status.model_path, &spec_path, &test_csv)["accuracy"]
        .as_f64()
        .expect("evaluate reports accuracy");
    let label = header.split(',').position(|h| h == "diagnosis").unwrap();
    let benign = test
        .iter()
        .filter(|row| row.split(',').nth(label) == Some("benign"))
        .count() as f64
        / test.len() as f64;
    let chance = benign.max(1.0 - benign);
    eprintln!(
        "central DP: ε {final_epsilon:.2} at δ {DELTA:e} after {ROUNDS} rounds, accuracy \
         {accuracy:.4} on {} test rows (chance {chance:.4})",
        test.len()
    );
    assert!(
        accuracy >= 0.85,
        "accuracy {accuracy} with central DP is not well above chance {chance}"
    );
}
