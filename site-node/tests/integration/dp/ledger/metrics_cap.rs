//! The gap left by branch `metric-dp`: a job whose round metrics push it over the site's cap
//! was refused at the ledger only (`privacy::ledger` tests). Here the node's gate refuses it,
//! before any record is read, and admits the same job whose metrics are noised enough.

use super::*;

/// DIMENSION of the job's MLP (30 features, 8 hidden, 2 classes), as the gate sizes it.
const DIMENSION: usize = 30 * 8 + 8 + 8 * 2 + 2;
const ROWS: usize = 455;

/// The job with an explicit σ for DP-SGD and `metrics_sigma` for its round metrics.
fn job_with_metrics(metrics_sigma: f64) -> String {
    job(50.0).replace(
        "max_grad_norm = 1.0",
        &format!("max_grad_norm = 1.0\nnoise_multiplier = 1.2\nmetrics_noise_multiplier = {metrics_sigma}"),
    )
}

/// ε of the job's plan at the site's δ: its DP-SGD steps alone, and with its metrics.
fn planned(metrics_sigma: f64) -> (f64, f64) {
    let view = tutela_site_node::jobspec::JobView::from_toml_str(&job_with_metrics(metrics_sigma))
        .unwrap();
    let plan = tutela_site_node::ledger::plan(&view, ROWS, DIMENSION)
        .unwrap()
        .unwrap();
    let steps = plan.mechanism(plan.total_steps).unwrap();
    let metrics = plan.metrics.unwrap();
    let eps = |m: &[SampledGaussian]| {
        accountant::epsilon(m, 1e-5, Accountant::Rdp)
            .unwrap()
            .epsilon
    };
    (eps(&[steps]), eps(&[steps, metrics]))
}

#[test]
fn a_job_its_metrics_push_over_the_per_job_cap_is_refused_by_the_gate() {
    let (steps_alone, with_loud_metrics) = planned(1.0);
    let (_, with_quiet_metrics) = planned(1000.0);
    assert!(
        with_loud_metrics > steps_alone * 1.2,
        "{steps_alone} vs {with_loud_metrics}"
    );
    // The cap sits between the steps alone (and with quiet metrics) and the steps with loud ones.
    let cap = (with_quiet_metrics.max(steps_alone) + with_loud_metrics) / 2.0;
    assert!(with_quiet_metrics < cap, "{with_quiet_metrics} vs {cap}");
    let dir = tempfile::tempdir().unwrap();
    let ledgers =
        SiteLedgers::new(dir.path().join("l"), None, budget()).with_caps(Arc::new(FixedCaps {
            per_job: Some(cap),
            total: None,
        }));
    // The dataset was trained on before: the gate plans with its recorded rows.
    ledgers
        .open("breast_cancer")
        .unwrap()
        .record(
            "j0",
            SampledGaussian::new(0.01, 5.0, 1).unwrap(),
            Some(ROWS),
            1,
        )
        .unwrap();
    let gate = TaskGate::new(BTreeMap::from([(
        "breast_cancer".to_string(),
        dataset_without_its_file(dir.path()),
    )]))
    .with_ledgers(Arc::new(ledgers));

    gate.check_task(&task("quiet", job_with_metrics(1000.0)))
        .unwrap();
    match gate.check_task(&task("loud", job_with_metrics(1.0))) {
        Err(Refusal::PrivacyBudget(why)) => {
            assert!(why.contains("per-job cap"), "{why}");
            assert!(!why.contains(dir.path().to_str().unwrap()), "{why}");
        }
        other => panic!("the metrics' spend was not weighed at the gate: {other:?}"),
    }
}
