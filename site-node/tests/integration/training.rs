//! Local training on the real datasets with libtorch on the CPU (or a GPU when present).

use crate::common;

use common::{breast_cancer, mnist};
use tutela_site_node::data::{ShardConfig, Standardizer, Table, site_shards, stratified_split};
use tutela_site_node::default_device;
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::train::{OptimizerKind, TrainConfig, TrainError, evaluate, train_local};
use tutela_site_node::weights::{export_weights, f32_values};

/// One libtorch CPU thread per test: the harness runs tests in parallel on a 2-core machine, and
/// OpenMP's busy-waiting threads slow down by an order of magnitude when oversubscribed.
fn single_threaded() {
    tch::set_num_threads(1);
}

/// Breast cancer, split 80/20 stratified, standardised with the training rows' statistics.
fn breast_cancer_split() -> (Table, Table) {
    let (_, table) = breast_cancer();
    let split = stratified_split(&table, 0.2, 2024).unwrap();
    let standardizer = Standardizer::fit(&split.train).unwrap();
    (
        standardizer.applied(&split.train).unwrap(),
        standardizer.applied(&split.validation).unwrap(),
    )
}

#[test]
fn mlp_trained_centrally_on_breast_cancer_reaches_95_percent() {
    single_threaded();
    let (train, test) = breast_cancer_split();
    let spec = ModelSpec::new(vec![train.n_features], train.n_classes())
        .with_hidden(vec![32, 16])
        .with_dropout(0.1);
    let model = Model::new("mlp", spec, default_device(), 1).unwrap();
    let before = evaluate(&model, &test).unwrap();
    let config = TrainConfig {
        optimizer: OptimizerKind::Adam,
        learning_rate: 3e-3,
        epochs: 30,
        batch_size: 32,
        weight_decay: 1e-4,
        proximal_mu: 0.0,
        seed: 11,
    };
    let report = train_local(&model, &train, &config).unwrap();
    let after = evaluate(&model, &test).unwrap();
    eprintln!(
        "mlp breast cancer: test accuracy {:.3} -> {:.3}, loss {:.3} -> {:.3}; {} samples in \
         {:.2} s ({:.0} samples/s on {:?})",
        before.accuracy,
        after.accuracy,
        before.loss,
        after.loss,
        report.samples_seen,
        report.seconds,
        report.samples_per_second,
        model.device()
    );
    assert_eq!(
        after.n, 113,
        "round(0.2 × 212) + round(0.2 × 357) test rows"
    );
    assert_eq!(report.samples_seen, 30 * train.n_rows);
    assert_eq!(report.steps, 30 * train.n_rows.div_ceil(32));
    assert!(after.accuracy >= 0.95, "test accuracy {}", after.accuracy);
    assert!(after.loss < before.loss);
    assert!(report.seconds < 10.0, "took {} s", report.seconds);
}

#[test]
fn cnn_on_1000_mnist_digits_learns_well_above_chance() {
    single_threaded();
    let (schema, digits) = mnist();
    // 1000 training and 500 disjoint test digits, 100 and 50 per class.
    let first = stratified_split(&digits, 0.2, 5).unwrap();
    let train = first.validation;
    let test = stratified_split(&first.train, 0.125, 6).unwrap().validation;
    assert_eq!((train.n_rows, test.n_rows), (1000, 500));
    let spec = ModelSpec::new(schema.input_shape(digits.n_features), 10)
        .with_conv_channels([8, 16])
        .with_hidden(vec![64]);
    let model = Model::new("cnn", spec, default_device(), 3).unwrap();
    let before = evaluate(&model, &test).unwrap();
    let config = TrainConfig {
        optimizer: OptimizerKind::Adam,
        learning_rate: 2e-3,
        epochs: 4,
        batch_size: 32,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 4,
    };
    let report = train_local(&model, &train, &config).unwrap();
    let after = evaluate(&model, &test).unwrap();
    eprintln!(
        "cnn mnist: test accuracy {:.3} -> {:.3}, loss {:.3} -> {:.3}; {} samples in {:.2} s \
         ({:.0} samples/s on {:?}, {} parameters)",
        before.accuracy,
        after.accuracy,
        before.loss,
        after.loss,
        report.samples_seen,
        report.seconds,
        report.samples_per_second,
        model.device(),
        model.parameter_count()
    );
    assert!(
        before.accuracy < 0.3,
        "untrained accuracy {}",
        before.accuracy
    );
    assert!(after.accuracy >= 0.7, "test accuracy {}", after.accuracy);
    assert!(after.loss < before.loss);
}

/// ||w − w_global||₂ over all tensors.
fn distance(a: &Model, b: &Model) -> f64 {
    let a = export_weights(a.var_store()).unwrap();
    let b = export_weights(b.var_store()).unwrap();
    let mut sum = 0f64;
    for ((sa, ba), (sb, bb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        let va = f32_values(sa, ba).unwrap();
        let vb = f32_values(sb, bb).unwrap();
        sum += va
            .iter()
            .zip(&vb)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>();
    }
    sum.sqrt()
}

#[test]
fn fedprox_keeps_local_weights_closer_to_the_global_ones() {
    single_threaded();
    let (_, table) = breast_cancer();
    let shards = site_shards(
        &table,
        &ShardConfig {
            n_sites: 3,
            test_fraction: 0.2,
            dirichlet_alpha: 0.3,
            min_per_class: 5,
            seed: 9,
        },
    )
    .unwrap();
    let site = Standardizer::fit(&shards.sites[0])
        .unwrap()
        .applied(&shards.sites[0])
        .unwrap();
    let spec = ModelSpec::new(vec![30], 2).with_hidden(vec![16]);
    let global = Model::new("mlp", spec.clone(), default_device(), 8).unwrap();
    let train_with = |mu: f64| {
        // Every run starts from the same global weights and sees the same batches.
        let local = Model::new("mlp", spec.clone(), default_device(), 8).unwrap();
        let config = TrainConfig {
            optimizer: OptimizerKind::Sgd { momentum: 0.9 },
            learning_rate: 0.05,
            epochs: 10,
            batch_size: 16,
            weight_decay: 0.0,
            proximal_mu: mu,
            seed: 1,
        };
        train_local(&local, &site, &config).unwrap();
        distance(&local, &global)
    };
    let fedavg = train_with(0.0);
    let fedavg_again = train_with(0.0);
    let fedprox = train_with(1.0);
    eprintln!("distance from global: FedAvg {fedavg:.4}, FedProx(mu=1) {fedprox:.4}");
    assert_eq!(fedavg, fedavg_again, "training is deterministic for a seed");
    assert!(fedavg > 0.1, "local training moved the weights: {fedavg}");
    assert!(
        fedprox < 0.8 * fedavg,
        "FedProx {fedprox} is not closer than FedAvg {fedavg}"
    );
}

#[test]
fn data_that_does_not_fit_the_model_is_refused_not_a_panic() {
    let (train, _) = breast_cancer_split();
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd { momentum: 0.0 },
        learning_rate: 0.1,
        epochs: 1,
        batch_size: 8,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 0,
    };
    let wrong_width = Model::new("mlp", ModelSpec::new(vec![29], 2), default_device(), 0).unwrap();
    let err = train_local(&wrong_width, &train, &config).unwrap_err();
    assert!(matches!(err, TrainError::DataModelMismatch { .. }));
    assert!(err.to_string().contains("30 features"), "{err}");

    let wrong_classes =
        Model::new("mlp", ModelSpec::new(vec![30], 3), default_device(), 0).unwrap();
    let err = evaluate(&wrong_classes, &train).unwrap_err();
    assert!(err.to_string().contains("malignant, benign"), "{err}");

    let model = Model::new("mlp", ModelSpec::new(vec![30], 2), default_device(), 0).unwrap();
    let empty = train.select_rows(&[]).unwrap();
    assert!(matches!(
        train_local(&model, &empty, &config),
        Err(TrainError::EmptyData { .. })
    ));
    for bad in [
        TrainConfig {
            learning_rate: 0.0,
            ..config.clone()
        },
        TrainConfig {
            batch_size: 0,
            ..config.clone()
        },
        TrainConfig {
            proximal_mu: -1.0,
            ..config.clone()
        },
        TrainConfig {
            optimizer: OptimizerKind::Sgd { momentum: 1.5 },
            ..config.clone()
        },
    ] {
        assert!(matches!(
            train_local(&model, &train, &bad),
            Err(TrainError::InvalidConfig { .. })
        ));
    }
}

#[test]
fn a_diverging_run_reports_the_epoch_and_batch() {
    // Raw (unstandardised) areas in the thousands and an absurd learning rate overflow quickly.
    let (_, table) = breast_cancer();
    let model = Model::new(
        "mlp",
        ModelSpec::new(vec![30], 2).with_hidden(vec![8]),
        default_device(),
        0,
    )
    .unwrap();
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd { momentum: 0.9 },
        learning_rate: 1e30,
        epochs: 5,
        batch_size: 64,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 0,
    };
    let err = train_local(&model, &table, &config).unwrap_err();
    assert!(matches!(err, TrainError::NonFiniteLoss { .. }), "{err}");
    assert!(err.to_string().contains("lower the learning rate"), "{err}");
}

#[test]
fn train_config_reads_from_toml() {
    let config: TrainConfig = toml::from_str(
        r#"
        learning_rate = 0.01
        epochs = 2
        batch_size = 64
        proximal_mu = 0.01
        [optimizer]
        kind = "sgd"
        momentum = 0.9
        "#,
    )
    .unwrap();
    assert_eq!(config.optimizer, OptimizerKind::Sgd { momentum: 0.9 });
    assert_eq!((config.weight_decay, config.seed), (0.0, 0));
    config.validate().unwrap();
}
