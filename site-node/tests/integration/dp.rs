//! DP-SGD at the site: per-example clipping against the per-example loop, Poisson batch sizes,
//! the noise's variance and origin, a DP training round, and the privacy ledger's refusals.

use crate::common;

use tch::{Device, Kind, Tensor};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::accountant::plan::{DpSgdInputs, DpSgdPlan};
use tutela_privacy::noise::SecureRng;
use tutela_site_node::data::{Standardizer, stratified_split};
use tutela_site_node::dp::{
    DpSgdStep, PoissonBatchSampler, clip_linear_into_gradients, clipped_gradient_sum,
    clipped_gradient_sum_reference, train_dp,
};
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::train::{Batch, GradientStep, OptimizerKind, TrainConfig, evaluate};

fn single_threaded() {
    tch::set_num_threads(1);
}

fn model_f64(name: &str, spec: ModelSpec) -> Model {
    let mut model = Model::new(name, spec, Device::Cpu, 3).unwrap();
    model.var_store_mut().double();
    model
}

/// Random inputs and labels from a fixed torch seed (test data only; no noise comes from torch).
fn batch(rows: i64, features: i64, classes: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let x = Tensor::randn([rows, features], (Kind::Double, Device::Cpu));
    let y = Tensor::randint(classes, [rows], (Kind::Int64, Device::Cpu));
    (x, y)
}

fn max_relative_error(model: &Model, rows: i64, features: i64, classes: i64, clip: f64) {
    let (x, y) = batch(rows, features, classes, 17 + rows);
    let fast = clipped_gradient_sum(model.layers(), &x, &y, clip, false).unwrap();
    let slow = clipped_gradient_sum_reference(model.layers(), &x, &y, clip).unwrap();
    assert_eq!(fast.gradients.len(), slow.gradients.len());
    assert_eq!(
        fast.gradients.len(),
        model.var_store().trainable_variables().len()
    );
    let norms_err = (&fast.norms - &slow.norms).abs().max().double_value(&[])
        / slow.norms.abs().max().double_value(&[]);
    assert!(norms_err < 1e-10, "norms differ by {norms_err:e}");
    // Some examples must be clipped and (for batches > 1) some not, or the test shows little.
    let clipped = slow.norms.gt(clip).sum(Kind::Int64).int64_value(&[]);
    assert!(clipped >= 1, "no example was clipped at C = {clip}");
    for ((pf, gf), (ps, gs)) in fast.gradients.iter().zip(&slow.gradients) {
        assert_eq!(pf.size(), ps.size());
        assert_eq!(gf.size(), gs.size());
        let err = (gf - gs).norm().double_value(&[]) / gs.norm().double_value(&[]).max(1e-300);
        assert!(
            err < 1e-5,
            "{} rows: relative error {err:e} for a parameter of shape {:?}",
            rows,
            pf.size()
        );
    }
    assert!((fast.loss_sum - slow.loss_sum).abs() < 1e-9 * slow.loss_sum.abs().max(1.0));
}

#[test]
fn fast_clipping_equals_the_per_example_loop_for_the_mlp() {
    single_threaded();
    let spec = ModelSpec::new(vec![12], 3).with_hidden(vec![16, 8]);
    let model = model_f64("mlp", spec);
    for rows in [1, 2, 7, 33] {
        max_relative_error(&model, rows, 12, 3, 0.5);
    }
}

#[test]
fn fast_clipping_equals_the_per_example_loop_for_the_cnn() {
    single_threaded();
    let spec = ModelSpec::new(vec![1, 12, 12], 4)
        .with_hidden(vec![10])
        .with_conv_channels([3, 5]);
    let model = model_f64("cnn", spec);
    for rows in [1, 2, 9, 40] {
        max_relative_error(&model, rows, 144, 4, 0.3);
    }
}

/// On 4×4 images the second convolution has L = 4 positions and 27 × 5 weights: the ghost norm
/// (L×L Gram matrices) is the cheaper path there, the direct one for the first convolution.
#[test]
fn fast_clipping_equals_the_per_example_loop_for_the_cnn_with_ghost_norms() {
    single_threaded();
    let spec = ModelSpec::new(vec![1, 4, 4], 3)
        .with_hidden(vec![6])
        .with_conv_channels([3, 5]);
    let model = model_f64("cnn", spec);
    for rows in [1, 3, 20] {
        max_relative_error(&model, rows, 16, 3, 0.2);
    }
}

/// Each parameter's `.grad`, copied out.
fn grads_of(parameters: &[Tensor]) -> Vec<Tensor> {
    parameters.iter().map(|p| p.grad().copy()).collect()
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-300)
}

/// The Linear route writes the per-example-loop reference's clipped sum into `.grad`, whatever
/// `.grad` held before, and adds a later micro-batch's to it.
#[test]
fn linear_route_equals_the_per_example_loop_and_accumulates_micro_batches() {
    single_threaded();
    let spec = ModelSpec::new(vec![12], 3).with_hidden(vec![16, 8]);
    let model = model_f64("mlp", spec);
    for rows in [1, 2, 7, 33] {
        let (x, y) = batch(rows, 12, 3, 40 + rows);
        let slow = clipped_gradient_sum_reference(model.layers(), &x, &y, 0.5).unwrap();
        // Twice: the second call finds the first one's `.grad` and must overwrite it.
        for _ in 0..2 {
            let fast =
                clip_linear_into_gradients(model.layers(), &x, &y, 0.5, false, false).unwrap();
            assert_eq!(fast.parameters.len(), slow.gradients.len());
            let slow_norms = Vec::<f64>::try_from(&slow.norms).unwrap();
            for (f, s) in fast.norms.iter().zip(&slow_norms) {
                assert!(
                    (f - s).abs() <= 1e-10 * s.abs().max(1e-12),
                    "norm {f} vs {s}"
                );
            }
            assert!(slow_norms.iter().any(|&n| n > 0.5), "nothing was clipped");
            for (p, (_, reference)) in fast.parameters.iter().zip(&slow.gradients) {
                let err = relative_error(&p.grad(), reference);
                assert!(
                    err < 1e-10,
                    "{rows} rows: relative error {err:e}, shape {:?}",
                    p.size()
                );
            }
            assert!((fast.loss_sum - slow.loss_sum).abs() < 1e-9 * slow.loss_sum.abs().max(1.0));
        }
    }
    // Two micro-batches, the second accumulated, give the whole batch's sum.
    let (x, y) = batch(30, 12, 3, 99);
    let whole = clipped_gradient_sum_reference(model.layers(), &x, &y, 0.5).unwrap();
    let first = clip_linear_into_gradients(
        model.layers(),
        &x.narrow(0, 0, 11),
        &y.narrow(0, 0, 11),
        0.5,
        false,
        false,
    )
    .unwrap();
    clip_linear_into_gradients(
        model.layers(),
        &x.narrow(0, 11, 19),
        &y.narrow(0, 11, 19),
        0.5,
        false,
        true,
    )
    .unwrap();
    for (p, (_, reference)) in first.parameters.iter().zip(&whole.gradients) {
        let err = relative_error(&p.grad(), reference);
        assert!(err < 1e-10, "micro-batches: relative error {err:e}");
    }
}

/// A convolutional network is not for the Linear route: it says so instead of computing
/// something else.
#[test]
fn linear_route_refuses_a_convolutional_network() {
    let spec = ModelSpec::new(vec![1, 4, 4], 3)
        .with_hidden(vec![6])
        .with_conv_channels([3, 5]);
    let model = model_f64("cnn", spec);
    let (x, y) = batch(3, 16, 3, 5);
    let err = clip_linear_into_gradients(model.layers(), &x, &y, 1.0, false, false).unwrap_err();
    assert!(err.to_string().contains("Linear layers"), "{err}");
}

/// With the same noise generator, the Linear route and the general route release the same
/// gradients: same clipped sum, same rounding to the grid, same noise values in the same places.
#[test]
fn both_dp_routes_release_the_same_gradients() {
    single_threaded();
    let spec = ModelSpec::new(vec![12], 3).with_hidden(vec![16, 8]);
    let model = model_f64("mlp", spec);
    let parameters = model.var_store().trainable_variables();
    let p = plan(0.7, 1.1, model.parameter_count());
    let (x, y) = batch(50, 12, 3, 7);
    let seed = [9u8; 32];
    let release = |linear_route: bool| {
        let mut step = DpSgdStep::with_rng(&p, SecureRng::insecure_from_seed(seed)).unwrap();
        step.use_linear_route(linear_route);
        assert!(step.overwrites_gradients());
        let loss = step
            .compute_gradients(&Batch {
                net: model.layers(),
                parameters: &parameters,
                inputs: &x,
                labels: &y,
                expected_batch_size: 50,
            })
            .unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        grads_of(&parameters)
    };
    let general = release(false);
    let linear = release(true);
    // The clipped sums agree to ~1e-16; a value within that of a grid midpoint may round the
    // other way, which moves it by one grid step (÷ the batch size). Anything more is a bug.
    let step = p.granularity / 50.0;
    let mut equal = 0;
    let mut total = 0;
    for (a, b) in linear.iter().zip(&general) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(
            diff <= step * 1.000_001,
            "routes differ by {diff} (grid step {step})"
        );
        equal += a.eq_tensor(b).sum(Kind::Int64).int64_value(&[]);
        total += a.numel() as i64;
    }
    assert!(
        equal * 100 >= total * 99,
        "only {equal} of {total} values are identical"
    );
}

/// Regularised lower incomplete gamma's complement is overkill here: the test statistic is
/// compared with a critical value computed once (chi-square, the df below, p = 0.001).
#[test]
fn poisson_batch_sizes_follow_the_binomial_distribution() {
    let n = 200usize;
    let expected_batch = 20usize; // q = 0.1
    let draws = 20_000usize;
    let mut sampler =
        PoissonBatchSampler::with_rng(n, expected_batch, SecureRng::insecure_from_seed([9; 32]))
            .unwrap();
    assert_eq!(sampler.q(), 0.1);
    let mut counts = vec![0usize; n + 1];
    for _ in 0..draws {
        let b = sampler.next_batch();
        assert!(b.windows(2).all(|w| w[0] < w[1]) && b.iter().all(|&i| i < n));
        counts[b.len()] += 1;
    }
    // Binomial(200, 0.1) pmf by recurrence.
    let q: f64 = 0.1;
    let mut pmf = vec![0f64; n + 1];
    pmf[0] = (1.0 - q).powi(n as i32);
    for k in 1..=n {
        pmf[k] = pmf[k - 1] * ((n - k + 1) as f64 / k as f64) * (q / (1.0 - q));
    }
    // Bins with expected count ≥ 5; the tails pooled.
    let (mut chi2, mut bins) = (0.0, 0usize);
    let (mut lo_obs, mut lo_exp) = (0.0, 0.0);
    let mut k = 0;
    while k <= n && (lo_exp + pmf[k] * draws as f64) < 5.0 {
        lo_obs += counts[k] as f64;
        lo_exp += pmf[k] * draws as f64;
        k += 1;
    }
    lo_obs += counts[k] as f64;
    lo_exp += pmf[k] * draws as f64;
    chi2 += (lo_obs - lo_exp).powi(2) / lo_exp;
    bins += 1;
    k += 1;
    let mut hi = n;
    let (mut hi_obs, mut hi_exp) = (0.0, 0.0);
    while hi > k && (hi_exp + pmf[hi] * draws as f64) < 5.0 {
        hi_obs += counts[hi] as f64;
        hi_exp += pmf[hi] * draws as f64;
        hi -= 1;
    }
    for j in k..hi {
        let e = pmf[j] * draws as f64;
        chi2 += (counts[j] as f64 - e).powi(2) / e;
        bins += 1;
    }
    hi_obs += counts[hi] as f64;
    hi_exp += pmf[hi] * draws as f64;
    chi2 += (hi_obs - hi_exp).powi(2) / hi_exp;
    bins += 1;
    let df = bins - 1;
    // χ²(0.999) for df in this range is below df + 3.1·√(2·df) + 8 (Wilson–Hilferty, rounded up).
    let critical = df as f64 + 3.1 * (2.0 * df as f64).sqrt() + 8.0;
    eprintln!("Poisson batch sizes: χ² = {chi2:.1} on {df} df (critical {critical:.1})");
    assert!(chi2 < critical, "χ² = {chi2} on {df} df");
    // A fixed-size batcher would fail the same test badly: every batch of size 20.
    let fixed = {
        let e = pmf[20] * draws as f64;
        (draws as f64 - e).powi(2) / e
    };
    assert!(fixed > critical);
}

fn plan(clip: f64, sigma: f64, dimension: usize) -> DpSgdPlan {
    DpSgdPlan::new(&DpSgdInputs {
        rows: 1000,
        batch_size: 50,
        epochs_per_round: 1,
        rounds: 1,
        clip,
        dimension,
        target_epsilon: None,
        noise_multiplier: Some(sigma),
        delta: 1e-5,
        accountant: Accountant::Rdp,
        metrics: None,
    })
    .unwrap()
}

#[test]
fn noise_has_the_planned_variance_lies_on_the_grid_and_is_not_torchs() {
    let p = plan(2.0, 1.5, 200_000);
    let seed = [5u8; 32];
    let mut step = DpSgdStep::with_rng(&p, SecureRng::insecure_from_seed(seed)).unwrap();
    let n = 200_000i64;
    let zeros = Tensor::zeros([n], (Kind::Float, Device::Cpu));
    let noise = step.privatize(&zeros).unwrap();
    assert_eq!(noise.kind(), Kind::Float);
    let var = noise.square().mean(Kind::Double).double_value(&[]);
    let want = (1.5f64 * 2.0).powi(2);
    // Var of the sample variance: 2σ⁴/n → relative sd √(2/n) = 0.32%; allow 5 sd.
    assert!(
        (var / want - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
        "{var} vs {want}"
    );
    let mean = noise.mean(Kind::Double).double_value(&[]);
    assert!(mean.abs() < 5.0 * 3.0 / (n as f64).sqrt(), "mean {mean}");
    // Every value is a multiple of the grid step.
    let on_grid = (&noise / p.granularity)
        .frac()
        .abs()
        .max()
        .double_value(&[]);
    assert_eq!(on_grid, 0.0);
    // The clipped sum is rounded to the grid before the noise: the output stays on it.
    let mut again = DpSgdStep::with_rng(&p, SecureRng::insecure_from_seed(seed)).unwrap();
    let offset = Tensor::full([n], 0.123_456_789, (Kind::Float, Device::Cpu));
    let shifted = again.privatize(&offset).unwrap();
    assert_eq!(
        (&shifted / p.granularity)
            .frac()
            .abs()
            .max()
            .double_value(&[]),
        0.0
    );
    // Not torch's generator: the same seed in torch gives other bits.
    let torch_seed = i64::from_le_bytes(seed[..8].try_into().unwrap());
    tch::manual_seed(torch_seed);
    let torch_noise = Tensor::randn([n], (Kind::Double, Device::Cpu)) * (1.5 * 2.0);
    let same = noise
        .eq_tensor(&torch_noise)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(same < 10, "{same} values equal torch's");
    // And two OS-keyed steps differ.
    let mut a = DpSgdStep::new(&p).unwrap();
    let mut b = DpSgdStep::new(&p).unwrap();
    let small = Tensor::zeros([64], (Kind::Float, Device::Cpu));
    assert!(
        !a.privatize(&small)
            .unwrap()
            .equal(&b.privatize(&small).unwrap())
    );
}

#[test]
fn a_dp_round_on_breast_cancer_learns_and_counts_its_steps() {
    single_threaded();
    let (_, table) = common::breast_cancer();
    let split = stratified_split(&table, 0.2, 2024).unwrap();
    let standardizer = Standardizer::fit(&split.train).unwrap();
    let train = standardizer.applied(&split.train).unwrap();
    let test = standardizer.applied(&split.validation).unwrap();
    let spec = ModelSpec::new(vec![train.n_features], train.n_classes()).with_hidden(vec![16]);
    let model = Model::new("mlp", spec, Device::Cpu, 1).unwrap();
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd { momentum: 0.5 },
        learning_rate: 0.5,
        epochs: 10,
        batch_size: 64,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 1,
    };
    let plan = DpSgdPlan::new(&DpSgdInputs {
        rows: train.n_rows,
        batch_size: 64,
        epochs_per_round: 10,
        rounds: 1,
        clip: 1.0,
        dimension: model.parameter_count(),
        target_epsilon: Some(8.0),
        noise_multiplier: None,
        delta: 1e-5,
        accountant: Accountant::Rdp,
        metrics: None,
    })
    .unwrap();
    let before = evaluate(&model, &test).unwrap();
    let (report, spend) = train_dp(&model, &train, &config, &plan);
    let report = report.unwrap();
    let after = evaluate(&model, &test).unwrap();
    eprintln!(
        "DP-SGD (ε = {:.2}, σ = {:.3}): accuracy {:.3} -> {:.3} in {} steps",
        plan.planned_epsilon, plan.noise_multiplier, before.accuracy, after.accuracy, spend.steps
    );
    assert_eq!(spend.steps, plan.steps_per_round);
    assert_eq!(report.steps as u64, spend.steps);
    assert!(plan.planned_epsilon <= 8.0);
    assert!(after.accuracy > 0.85, "{}", after.accuracy);
}

pub(crate) mod ledger {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use tutela_privacy::accountant::{self, Accountant, SampledGaussian};
    use tutela_privacy::at_rest::{KeyEncryptionKey, LocalKek};
    use tutela_protocol::pb;
    use tutela_site_node::agent::{Refusal, TaskGate};
    use tutela_site_node::config::DatasetConfig;
    use tutela_site_node::dataset::SiteDataset;
    use tutela_site_node::ledger::{FixedCaps, PrivacyBudgetConfig, SiteLedgers};

    pub(crate) fn job(target: f64) -> String {
        format!(
            r#"
name = "dp-test"
rounds = 5
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 10.0
seed = 1
[model]
name = "mlp"
hidden = [8]
[data]
schema = "breast_cancer"
[training]
optimizer = "sgd"
learning_rate = 0.1
local_epochs = 1
batch_size = 32
[privacy]
mode = "local"
target_epsilon = {target}
delta = 1e-5
max_grad_norm = 1.0
"#
        )
    }

    fn task(job_id: &str, spec: String) -> pb::Task {
        pb::Task {
            task_id: format!("{job_id}-r1"),
            job_id: job_id.into(),
            kind: pb::TaskKind::Train as i32,
            job_spec_toml: spec,
            global_model_id: "ab".repeat(32),
            ..Default::default()
        }
    }

    /// The site policy's caps (per job 5, total 4), as the node reads them from it.
    mod metrics_cap;

    fn caps() -> Arc<FixedCaps> {
        Arc::new(FixedCaps {
            per_job: Some(5.0),
            total: Some(4.0),
        })
    }

    fn budget() -> PrivacyBudgetConfig {
        PrivacyBudgetConfig::default()
    }

    /// A dataset whose file is deleted after `prepare`: any read of a record would fail, so a
    /// refusal that names the budget was decided without reading data.
    fn dataset_without_its_file(dir: &std::path::Path) -> Arc<SiteDataset> {
        let data = super::common::data_dir();
        let csv = dir.join("bc.csv");
        std::fs::copy(data.join("breast_cancer_wisconsin.csv"), &csv).unwrap();
        let config = DatasetConfig {
            path: csv.clone(),
            schema: data.join("breast_cancer.schema.toml"),
            validation_fraction: 0.2,
            split_seed: 1,
            ..Default::default()
        };
        let ds = SiteDataset::prepare("breast_cancer", &config, None).unwrap();
        std::fs::remove_file(&csv).unwrap();
        Arc::new(ds)
    }

    /// The ledger's caps are the site policy's (its one home), read at every check: an officer's
    /// edit of the file, once reloaded, moves the cap the ledger weighs a job's plan against.
    #[test]
    fn the_ledgers_caps_are_the_site_policy_in_force_and_follow_its_reload() {
        use tutela_policy::site_policy::ReloadingSitePolicy;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site-policy.toml");
        let policy = |total: f64| {
            format!(
                "site = \"st-mary\"\ncompliance_officers = [\"spiffe://acme/site/st-mary/user/alice\"]\n\
                 [privacy]\nmax_epsilon_per_job = 5.0\n[privacy.budget]\nbreast_cancer = {total}\n"
            )
        };
        std::fs::write(&path, policy(4.0)).unwrap();
        let site_policy = Arc::new(ReloadingSitePolicy::load("st-mary", &path).unwrap());
        let g = TaskGate::new(BTreeMap::from([(
            "breast_cancer".to_string(),
            dataset_without_its_file(dir.path()),
        )]))
        .with_ledgers(Arc::new(
            SiteLedgers::new(dir.path().join("l"), None, budget()).with_caps(site_policy.clone()),
        ));
        match g.check_task(&task("j", job(4.5))) {
            Err(Refusal::PrivacyBudget(why)) => assert!(why.contains("total cap ε ≤ 4"), "{why}"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, policy(10.0)).unwrap();
        assert!(site_policy.reload_now().unwrap());
        g.check_task(&task("j", job(4.5))).unwrap();
        // The per-job cap is the policy's too.
        match g.check_task(&task("j", job(6.0))) {
            Err(Refusal::PrivacyBudget(why)) => assert!(why.contains("per-job cap ε ≤ 5"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_job_over_the_cap_is_refused_before_data_is_read_and_the_ledger_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let kek: Arc<dyn KeyEncryptionKey> = Arc::new(LocalKek::from_bytes(&[3u8; 32]));
        let ledger_dir = dir.path().join("privacy-ledger");
        let gate = |ledgers: SiteLedgers| {
            TaskGate::new(BTreeMap::from([(
                "breast_cancer".to_string(),
                dataset_without_its_file(dir.path()),
            )]))
            .with_ledgers(Arc::new(ledgers))
        };
        let ledgers = SiteLedgers::new(&ledger_dir, Some(kek.clone()), budget()).with_caps(caps());

        // Nothing spent yet: a calibrated job of ε = 3 fits under both caps; ε = 6 is over the
        // per-job cap, ε = 4.5 over the total.
        let g = gate(SiteLedgers::new(&ledger_dir, Some(kek.clone()), budget()).with_caps(caps()));
        g.check_task(&task("j1", job(3.0))).unwrap();
        for (target, cap) in [(6.0, "per-job"), (4.5, "total")] {
            match g.check_task(&task("j1", job(target))) {
                Err(Refusal::PrivacyBudget(why)) => {
                    assert!(
                        why.contains(cap) && why.contains(&target.to_string()),
                        "{why}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }

        // An earlier job spent ε ≈ 2 on the dataset (455 training rows).
        let earlier = SampledGaussian::new(32.0 / 455.0, 1.25, 60).unwrap();
        let earlier_eps = accountant::epsilon(&[earlier], 1e-5, Accountant::Rdp)
            .unwrap()
            .epsilon;
        assert!(earlier_eps > 1.5 && earlier_eps < 3.2, "{earlier_eps}");
        ledgers
            .open("breast_cancer")
            .unwrap()
            .record("j0", earlier, Some(455), 1)
            .unwrap();

        // Restart: a new gate over the same directory reads the spend back (encrypted file).
        let g = gate(SiteLedgers::new(&ledger_dir, Some(kek.clone()), budget()).with_caps(caps()));
        let refusal = g.check_task(&task("j1", job(3.0))).unwrap_err();
        let Refusal::PrivacyBudget(why) = &refusal else {
            panic!("{refusal:?}")
        };
        assert!(why.contains("total cap ε ≤ 4"), "{why}");
        assert!(why.contains(&format!("{earlier_eps:.4}")), "{why}");
        assert!(refusal.is_reported());
        // A small job still fits, composed tightly with the earlier one.
        g.check_task(&task("j2", job(0.5))).unwrap();
        // One encrypted ledger file; without the key there is nothing to read it with.
        let files: Vec<_> = std::fs::read_dir(&ledger_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            files,
            vec![std::ffi::OsString::from("breast_cancer.json.enc")]
        );
    }

    /// A job that pins another schema file (`[data] schema_sha256`) is declined before anything
    /// else is checked, with both digests' prefixes and no path; the site's own digest, or none,
    /// is admitted.
    #[test]
    fn a_job_pinning_another_schema_file_is_declined_with_digest_prefixes_only() {
        let dir = tempfile::tempdir().unwrap();
        let dataset = dataset_without_its_file(dir.path());
        let site_digest = dataset.schema_sha256().to_string();
        let gate = TaskGate::new(BTreeMap::from([("breast_cancer".to_string(), dataset)]));
        let pinned = |digest: &str| {
            job(3.0).replace(
                "schema = \"breast_cancer\"",
                &format!("schema = \"breast_cancer\"\nschema_sha256 = \"{digest}\""),
            )
        };
        gate.check_task(&task("j1", pinned(&site_digest))).unwrap();
        gate.check_task(&task("j1", job(3.0))).unwrap();
        let other = "0f".repeat(32);
        let refusal = gate.check_task(&task("j1", pinned(&other))).unwrap_err();
        assert!(matches!(refusal, Refusal::SchemaDigest(_)), "{refusal:?}");
        let failure = tutela_site_node::failure::SiteFailure::from(&refusal);
        let wire = failure.wire_reason();
        assert!(wire.starts_with("data.schema_mismatch"), "{wire}");
        assert!(
            wire.contains(&other[..12]) && wire.contains(&site_digest[..12]),
            "{wire}"
        );
        assert!(
            !wire.contains(&other) && !wire.contains("schema.toml"),
            "{wire}"
        );
    }

    /// A coordinator that resumed after a crash asks for a round the node was charged for
    /// already. Until the job's last round that fits within the job's target ε (the plan is
    /// calibrated to the target over all rounds, and a retrain uses up one of the later rounds'
    /// share, which the gate then refuses); once the job's rounds are all charged, retraining one
    /// is refused, naming the round, and the gate's own check refuses it before any data is read.
    #[test]
    fn a_round_charged_already_is_not_trained_again_past_the_jobs_target() {
        use tutela_site_node::dp::DpSpend;
        use tutela_site_node::jobspec::JobView;
        let dir = tempfile::tempdir().unwrap();
        let ledgers = SiteLedgers::new(dir.path().join("l"), None, PrivacyBudgetConfig::default());
        let spec = job(1.0);
        let view = JobView::from_toml_str(&spec).unwrap();
        let (rows, dimension) = (455, 250);
        let charge = |round: u32, attempt: u32| {
            let plan = ledgers
                .check_with_rows("j", round, "breast_cancer", &view, rows, dimension)?
                .expect("a DP-SGD job");
            let spend = DpSpend {
                steps: plan.steps_per_round,
                sample_rate: plan.sample_rate,
                effective_noise_multiplier: plan.effective_noise_multiplier,
                kind: tutela_privacy::ledger::MechanismKind::DpSgd,
            };
            ledgers
                .record(
                    "j",
                    (round, attempt),
                    "breast_cancer",
                    rows,
                    &plan,
                    &spend,
                    1,
                )
                .map(|s| s.job_epsilon)
        };
        for round in 1..=4 {
            charge(round, 1).unwrap();
        }
        // Round 4 again (the coordinator resumed): it fits, using up round 5's share.
        let after_retrain = charge(4, 1).unwrap();
        assert!(after_retrain <= 1.0 + 1e-9, "{after_retrain}");
        // Round 5 would now pass the target: refused.
        let why = charge(5, 1).unwrap_err();
        assert!(why.contains("over the job's target ε = 1"), "{why}");
        // And round 4 a third time is refused as a round charged already.
        let why = charge(4, 2).unwrap_err();
        assert!(
            why.contains("round 4 of job j was charged already") && why.contains("attempt 1"),
            "{why}"
        );
        let ledger = ledgers.open("breast_cancer").unwrap();
        let spent = ledger.spent_by_job("j", 1e-5, Accountant::Rdp).unwrap();
        assert!(
            spent <= 1.0 + 1e-9,
            "the job's ε {spent} is over its target"
        );
        assert_eq!(ledger.job("j").unwrap().charges.len(), 5);

        // The gate refuses too, before any record is read (its dataset file is gone).
        let gate = TaskGate::new(BTreeMap::from([(
            "breast_cancer".to_string(),
            dataset_without_its_file(dir.path()),
        )]))
        .with_ledgers(Arc::new(SiteLedgers::new(
            dir.path().join("l"),
            None,
            PrivacyBudgetConfig::default(),
        )));
        let mut t = task("j", spec.clone());
        t.round = 4;
        t.attempt = 3;
        match gate.check_task(&t) {
            Err(Refusal::PrivacyBudget(why)) => {
                assert!(why.contains("charged already"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// The ledger against the trail's spends: a ledger that lacks one is behind (naming the first
    /// missing spend and the restore command); the rebuilt ledger holds them all, anchored, with
    /// the same ε; charges the trail lacks are the ones left unanchored.
    #[test]
    fn a_ledger_behind_the_trail_is_named_and_rebuilt_from_it() {
        use tutela_site_node::dp::DpSpend;
        use tutela_site_node::jobspec::JobView;
        use tutela_site_node::ledger::AnchoredSpend;
        let dir = tempfile::tempdir().unwrap();
        let kek: Arc<dyn KeyEncryptionKey> = Arc::new(LocalKek::from_bytes(&[5u8; 32]));
        let ledgers = SiteLedgers::new(
            dir.path().join("l"),
            Some(kek.clone()),
            PrivacyBudgetConfig::default(),
        );
        let view = JobView::from_toml_str(&job(2.0)).unwrap();
        let plan = ledgers
            .check_with_rows("j", 1, "breast_cancer", &view, 455, 266)
            .unwrap()
            .unwrap();
        let spend = DpSpend {
            steps: plan.steps_per_round,
            sample_rate: plan.sample_rate,
            effective_noise_multiplier: plan.effective_noise_multiplier,
            kind: tutela_privacy::ledger::MechanismKind::DpSgd,
        };
        let mut trail = Vec::new();
        for round in 1..=2 {
            let s = ledgers
                .record("j", (round, 1), "breast_cancer", 455, &plan, &spend, 1)
                .unwrap();
            let charge = s.charge.unwrap();
            let payload = ledgers
                .spend_payload("a", "breast_cancer", "j", &charge, 1e-5, Accountant::Rdp)
                .unwrap();
            assert_eq!(
                (payload.round, payload.steps, payload.rows),
                (round, plan.steps_per_round, 455)
            );
            trail.push(AnchoredSpend {
                seq: 10 + u64::from(round),
                timestamp_unix_ms: 1,
                payload,
            });
        }
        assert_eq!(ledgers.unanchored("breast_cancer").unwrap().len(), 2);
        ledgers
            .mark_anchored("breast_cancer", "j", (1, 1), 11)
            .unwrap();
        assert_eq!(ledgers.unanchored("breast_cancer").unwrap().len(), 1);
        ledgers
            .check_against_trail("breast_cancer", &trail)
            .unwrap();
        let spent = ledgers.spent("breast_cancer").unwrap();

        // The file is deleted: behind by both spends, naming the first and the restore.
        let file = dir.path().join("l/breast_cancer.json.enc");
        std::fs::remove_file(&file).unwrap();
        let behind = ledgers
            .check_against_trail("breast_cancer", &trail)
            .unwrap_err();
        assert_eq!(
            (behind.missing, behind.first_round, behind.first_seq),
            (2, 1, 11)
        );
        let text = behind.to_string();
        assert!(text.contains("tutela-node ledger restore"), "{text}");
        // Rebuilt: the same ε, every charge anchored at its event, the plan's rows kept.
        let rebuilt = ledgers.restore_from_trail("breast_cancer", &trail).unwrap();
        assert!((rebuilt - spent).abs() < 1e-12, "{rebuilt} vs {spent}");
        assert_eq!(ledgers.spent("breast_cancer").unwrap(), rebuilt);
        assert!(ledgers.unanchored("breast_cancer").unwrap().is_empty());
        ledgers
            .check_against_trail("breast_cancer", &trail)
            .unwrap();
        assert_eq!(ledgers.open("breast_cancer").unwrap().rows(), Some(455));
    }

    /// Record-level distributed DP is charged like DP-SGD: a node whose site policy caps ε
    /// admits it within the caps (the plan's ε for the whole job, checked before any record is
    /// read), refuses it over them, and charges each round as a `distributed_dp_sgd` group that
    /// the trail's `privacy.spent` names, so that a ledger rebuilt from the trail keeps it.
    #[test]
    fn a_node_with_caps_admits_distributed_dp_within_them_and_charges_it_by_kind() {
        use tutela_privacy::ledger::MechanismKind;
        use tutela_site_node::dp::DpSpend;
        use tutela_site_node::jobspec::JobView;
        use tutela_site_node::ledger::AnchoredSpend;
        let distributed = |target: f64| {
            job(target)
                .replace("min_sites = 1", "min_sites = 2")
                .replace(
                    "mode = \"local\"",
                    "mode = \"distributed\"\nsample_rate = 0.5",
                )
                + "[secure_aggregation]\nscale_bits = 16\n"
        };
        let dir = tempfile::tempdir().unwrap();
        let ledgers =
            Arc::new(SiteLedgers::new(dir.path().join("l"), None, budget()).with_caps(caps()));
        let gate = TaskGate::new(BTreeMap::from([(
            "breast_cancer".to_string(),
            dataset_without_its_file(dir.path()),
        )]))
        .with_ledgers(ledgers.clone());
        // Within the caps (per job 5, total 4): admitted, no longer refused for not being local.
        gate.check_task(&task("j", distributed(3.0))).unwrap();
        match gate.check_task(&task("j", distributed(4.5))) {
            Err(Refusal::PrivacyBudget(why)) => {
                assert!(why.contains("total cap"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // One round, charged as the site node charges it (before its masked input leaves).
        let view = JobView::from_toml_str(&distributed(3.0)).unwrap();
        let plan = tutela_site_node::ledger::plan(&view, 455, 266)
            .unwrap()
            .unwrap();
        assert_eq!(
            (plan.sample_rate, plan.steps_per_round, plan.total_steps),
            (0.5, 1, 5)
        );
        let spend = DpSpend {
            steps: 1,
            sample_rate: plan.sample_rate,
            effective_noise_multiplier: plan.effective_noise_multiplier,
            kind: MechanismKind::DistributedDpSgd,
        };
        let spent = ledgers
            .record("j", (1, 1), "breast_cancer", 455, &plan, &spend, 1_000)
            .unwrap();
        let charge = spent.charge.unwrap();
        assert_eq!(charge.group.kind, MechanismKind::DistributedDpSgd);
        assert!(
            spent.round_epsilon > 0.0 && spent.job_epsilon < 3.0,
            "{spent:?}"
        );
        let payload = ledgers
            .spend_payload(
                "st-mary",
                "breast_cancer",
                "j",
                &charge,
                1e-5,
                Accountant::Rdp,
            )
            .unwrap();
        assert_eq!(payload.mechanism.as_deref(), Some("distributed_dp_sgd"));
        // The kind survives a rebuild from the trail, and so does the ε.
        let before = ledgers.spent("breast_cancer").unwrap();
        std::fs::remove_dir_all(dir.path().join("l")).unwrap();
        let trail = [AnchoredSpend {
            seq: 7,
            timestamp_unix_ms: 1_000,
            payload,
        }];
        let rebuilt = ledgers.restore_from_trail("breast_cancer", &trail).unwrap();
        assert!((rebuilt - before).abs() < 1e-12, "{rebuilt} vs {before}");
        let ledger = ledgers.open("breast_cancer").unwrap();
        let job = ledger.job("j").unwrap();
        assert!(
            job.groups
                .iter()
                .any(|g| g.kind == MechanismKind::DistributedDpSgd && g.steps == 1)
        );
        assert_eq!(job.steps(), 1);
    }

    /// Under distributed DP every attempt of a round spends (its masked input left the site,
    /// released or not). Each retried attempt is charged as it ran; the plan covers
    /// `privacy.retry_reserve` of them, so the job still ends within its target; one retry past
    /// the reserve is paid for by a later round, which the node then refuses, naming the retries
    /// and the key. A reserve the site's caps cannot hold is refused up front, before any record
    /// is read.
    #[test]
    fn distributed_retries_are_charged_each_within_the_reserve_and_refused_past_it() {
        use tutela_privacy::ledger::MechanismKind;
        use tutela_site_node::dp::DpSpend;
        use tutela_site_node::jobspec::JobView;
        let distributed = |privacy: &str| {
            job(3.0).replace("min_sites = 1", "min_sites = 2").replace(
                "mode = \"local\"",
                &format!("mode = \"distributed\"\nsample_rate = 0.5\n{privacy}"),
            ) + "[secure_aggregation]\nscale_bits = 16\n"
        };
        let dir = tempfile::tempdir().unwrap();
        let ledgers =
            Arc::new(SiteLedgers::new(dir.path().join("l"), None, budget()).with_caps(caps()));
        let spec = distributed("retry_reserve = 2");
        let view = JobView::from_toml_str(&spec).unwrap();
        let (rows, dimension) = (455, 266);
        let charge = |round: u32, attempt: u32| {
            let plan = ledgers
                .check_with_rows("j", round, "breast_cancer", &view, rows, dimension)?
                .expect("a DP-SGD job");
            let spend = DpSpend {
                steps: 1,
                sample_rate: plan.sample_rate,
                effective_noise_multiplier: plan.effective_noise_multiplier,
                kind: MechanismKind::DistributedDpSgd,
            };
            ledgers
                .record(
                    "j",
                    (round, attempt),
                    "breast_cancer",
                    rows,
                    &plan,
                    &spend,
                    1,
                )
                .map(|s| s.job_epsilon)
        };
        let plan = tutela_site_node::ledger::plan(&view, rows, dimension)
            .unwrap()
            .unwrap();
        assert_eq!(
            plan.total_steps,
            5 + 2,
            "the rounds and the reserved attempts"
        );

        // Round 2 fails twice at the coordinator (too few survivors): three attempts, each
        // charged; with the reserve of two, rounds 3 to 5 still fit.
        charge(1, 1).unwrap();
        for attempt in 1..=3 {
            charge(2, attempt).unwrap();
        }
        for round in 3..=5 {
            let spent = charge(round, 1).unwrap();
            assert!(spent <= 3.0 + 1e-9, "round {round}: {spent}");
        }
        let ledger = ledgers.open("breast_cancer").unwrap();
        assert_eq!(ledger.job("j").unwrap().charges.len(), 7);
        assert_eq!(ledger.job("j").unwrap().steps(), 7);
        let spent = ledger.spent_by_job("j", 1e-5, Accountant::Rdp).unwrap();
        assert!(spent <= 3.0 + 1e-9 && spent > 2.9, "{spent}");

        // The same job on another dataset with a third retry of round 2: charged (it fits), and
        // then round 5 is refused: the retries ate its share. The refusal says why.
        let other =
            Arc::new(SiteLedgers::new(dir.path().join("m"), None, budget()).with_caps(caps()));
        let charge_other = |round: u32, attempt: u32| {
            let plan = other
                .check_with_rows("j", round, "breast_cancer", &view, rows, dimension)?
                .expect("a DP-SGD job");
            let spend = DpSpend {
                steps: 1,
                sample_rate: plan.sample_rate,
                effective_noise_multiplier: plan.effective_noise_multiplier,
                kind: MechanismKind::DistributedDpSgd,
            };
            other
                .record(
                    "j",
                    (round, attempt),
                    "breast_cancer",
                    rows,
                    &plan,
                    &spend,
                    1,
                )
                .map(|s| s.job_epsilon)
        };
        charge_other(1, 1).unwrap();
        for attempt in 1..=4 {
            charge_other(2, attempt).unwrap();
        }
        charge_other(3, 1).unwrap();
        charge_other(4, 1).unwrap();
        let why = charge_other(5, 1).unwrap_err();
        assert!(
            why.contains("over the job's target ε = 3")
                && why.contains("3 retried round attempt(s)")
                && why.contains("privacy.retry_reserve"),
            "{why}"
        );
        let ledger = other.open("breast_cancer").unwrap();
        assert!(ledger.spent_by_job("j", 1e-5, Accountant::Rdp).unwrap() <= 3.0 + 1e-9);

        // Up front: a job with an explicit noise multiplier fits the caps (per job 5, total 4)
        // without a reserve, and not with one the caps cannot hold; the gate refuses it before
        // any record is read (the dataset's file is gone), naming the cap.
        let gate = TaskGate::new(BTreeMap::from([(
            "breast_cancer".to_string(),
            dataset_without_its_file(dir.path()),
        )]))
        .with_ledgers(Arc::new(
            SiteLedgers::new(dir.path().join("n"), None, budget()).with_caps(caps()),
        ));
        let explicit = |reserve: u32| {
            distributed(&format!(
                "noise_multiplier = 3.0\nretry_reserve = {reserve}"
            ))
            .replace("target_epsilon = 3\n", "")
        };
        let planned = |reserve: u32| {
            let view = JobView::from_toml_str(&explicit(reserve)).unwrap();
            tutela_site_node::ledger::plan(&view, rows, dimension)
                .unwrap()
                .unwrap()
                .planned_epsilon
        };
        assert!(
            planned(0) < 4.0 && planned(200) > 4.0,
            "{} {}",
            planned(0),
            planned(200)
        );
        gate.check_task(&task("k", explicit(0))).unwrap();
        match gate.check_task(&task("k", explicit(200))) {
            Err(Refusal::PrivacyBudget(why)) => assert!(why.contains("cap"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_with_caps_refuses_a_job_without_local_dp() {
        let dir = tempfile::tempdir().unwrap();
        let gate = TaskGate::new(BTreeMap::from([(
            "breast_cancer".to_string(),
            dataset_without_its_file(dir.path()),
        )]))
        .with_ledgers(Arc::new(
            SiteLedgers::new(dir.path().join("l"), None, budget()).with_caps(caps()),
        ));
        let spec = job(1.0);
        let plain = &spec[..spec.find("[privacy]").unwrap()];
        match gate.check_task(&task("j", plain.to_string())) {
            Err(Refusal::PrivacyBudget(why)) => assert!(why.contains("requires DP-SGD"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
