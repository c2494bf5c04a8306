//! The publication watermark (`tutela_protocol::watermark`) on the demo's real models, trained
//! here with the site node's code: its accuracy cost, no detection on independently trained
//! models or on the unmarked aggregate, and each attack a thief can make, with the p-value it
//! leaves (printed: run with `--nocapture` to see the table BENCHMARKS.md quotes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{breast_cancer, mnist};
use tutela_protocol::checkpoint::{SafetensorsReader, SafetensorsWriter, export_int8, from_f32};
use tutela_protocol::stream::SafetensorsFileSink;
use tutela_protocol::watermark::{
    Detection, MarkKey, Strength, WatermarkKey, detect_file, embed_stream,
};
use tutela_site_node::data::{Standardizer, Table, stratified_split};
use tutela_site_node::default_device;
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::train::{OptimizerKind, TrainConfig, evaluate, train_local};
use tutela_site_node::weights::{export_weights, load_safetensors, load_weights, save_safetensors};

/// The job spec's defaults (`[watermark]` with nothing set).
const STRENGTH: Strength = tutela_protocol::watermark::DEFAULT_STRENGTH;

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn save(model: &Model, path: &Path) {
    save_safetensors(
        path,
        &export_weights(model.var_store()).unwrap(),
        BTreeMap::new(),
    )
    .unwrap();
}

fn read(path: &Path) -> Tensors {
    let mut r = SafetensorsReader::open(path).unwrap();
    r.names()
        .into_iter()
        .map(|n| {
            let (s, v) = r.read_f32(&n).unwrap();
            (n, s, v)
        })
        .collect()
}

fn write(path: &Path, tensors: &Tensors) {
    let declared: Vec<_> = tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), safetensors::Dtype::F32, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &declared, None).unwrap();
    for (n, _, v) in tensors {
        w.write_next(n, &from_f32(safetensors::Dtype::F32, v).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
}

/// One of the demo's models with its data: how to build and train it, and where files go.
struct Case {
    name: &'static str,
    build: Box<dyn Fn(u64) -> Model>,
    train: Table,
    test: Table,
    config: TrainConfig,
    dir: tempfile::TempDir,
}

impl Case {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn trained(&self, seed: u64, data: &Table, epochs: usize) -> Model {
        let model = (self.build)(seed);
        let config = TrainConfig {
            seed,
            epochs,
            ..self.config.clone()
        };
        train_local(&model, data, &config).unwrap();
        model
    }

    /// Test accuracy of the weights in `path`.
    fn accuracy(&self, path: &Path) -> f64 {
        let mut model = (self.build)(0);
        let (weights, _) = load_safetensors(path).unwrap();
        load_weights(model.var_store_mut(), &weights).unwrap();
        evaluate(&model, &self.test).unwrap().accuracy
    }

    fn model_accuracy(&self, model: &Model) -> f64 {
        evaluate(model, &self.test).unwrap().accuracy
    }
}

fn report(case: &str, what: &str, d: &Detection, accuracy: Option<f64>) {
    eprintln!(
        "watermark | {case} | {what} | z = {:.2} | log10 p = {:.1}{}",
        d.z,
        d.log10_p(),
        accuracy
            .map(|a| format!(" | test accuracy {:.2}%", 100.0 * a))
            .unwrap_or_default()
    );
}

/// Adds N(0, (rel · σ_t)²) to every tensor `t` (σ_t its standard deviation), seeded.
fn add_noise(tensors: &Tensors, rel: f64, seed: u64) -> Tensors {
    let mut rng = StdRng::seed_from_u64(seed);
    tensors
        .iter()
        .map(|(n, s, v)| {
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
            let std = (v
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / v.len() as f64)
                .sqrt();
            let noisy = v
                .iter()
                .map(|&x| {
                    let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                    let g = (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos();
                    x + (rel * std * g) as f32
                })
                .collect();
            (n.clone(), s.clone(), noisy)
        })
        .collect()
}

/// Sets the 30% smallest-magnitude weights of every matrix or kernel (not biases) to zero.
fn prune(tensors: &Tensors, fraction: f64) -> Tensors {
    tensors
        .iter()
        .map(|(n, s, v)| {
            if s.len() < 2 {
                return (n.clone(), s.clone(), v.clone());
            }
            let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            mags.sort_by(f32::total_cmp);
            let cut = mags[((mags.len() as f64) * fraction) as usize];
            let pruned = v
                .iter()
                .map(|&x| if x.abs() < cut { 0.0 } else { x })
                .collect();
            (n.clone(), s.clone(), pruned)
        })
        .collect()
}

/// The whole story on one model: the published aggregate is trained, watermarked as the
/// coordinator does (streamed, file to file), and attacked.
fn run_case(case: &Case, nulls: usize, null_epochs: usize) {
    let mark: MarkKey = WatermarkKey::from_bytes([0x5a; 32]).mark("job-watermark-test");
    let aggregate = case.trained(1, &case.train, case.config.epochs);
    let clean = case.path("aggregate.safetensors");
    save(&aggregate, &clean);
    let marked = case.path("marked.safetensors");
    let (_, _, embedded) =
        embed_stream(&clean, SafetensorsFileSink::at(&marked), &mark, STRENGTH).unwrap();
    let (acc_clean, acc_marked) = (case.accuracy(&clean), case.accuracy(&marked));
    eprintln!(
        "watermark | {} | embedded: amplitude {:.4} σ over {} values in {} tensors, expected z {:.1} | accuracy {:.2}% -> {:.2}% ({:+.2} points)",
        case.name,
        embedded.amplitude,
        embedded.values,
        embedded.tensors,
        embedded.expected_z,
        100.0 * acc_clean,
        100.0 * acc_marked,
        100.0 * (acc_marked - acc_clean)
    );
    assert!(
        acc_clean - acc_marked <= 0.005 + 1e-9,
        "{}: embedding cost {:.2} points",
        case.name,
        100.0 * (acc_clean - acc_marked)
    );
    let d = detect_file(&marked, &mark).unwrap();
    report(case.name, "watermarked", &d, Some(acc_marked));
    assert!(d.log10_p() < -9.0, "{}: {d:?}", case.name);

    // No detection: the same aggregate unmarked, and independently trained models.
    let d = detect_file(&clean, &mark).unwrap();
    report(case.name, "unmarked aggregate", &d, Some(acc_clean));
    assert!(
        d.p_value() > 0.01,
        "{}: the unmarked aggregate {d:?}",
        case.name
    );
    let mut smallest = 1.0f64;
    for seed in 0..nulls as u64 {
        let other = case.trained(100 + seed, &case.train, null_epochs);
        let path = case.path("independent.safetensors");
        save(&other, &path);
        let d = detect_file(&path, &mark).unwrap();
        assert!(
            d.p_value() > 0.01,
            "{}: independent model {seed}: {d:?}",
            case.name
        );
        smallest = smallest.min(d.p_value());
    }
    eprintln!(
        "watermark | {} | {nulls} independently trained models | smallest p = {smallest:.3}",
        case.name
    );

    // Fine-tuning the marked model on 10% of the training data for 5 epochs.
    let tenth = stratified_split(&case.train, 0.1, 77).unwrap().validation;
    let mut thief = (case.build)(0);
    let (weights, _) = load_safetensors(&marked).unwrap();
    load_weights(thief.var_store_mut(), &weights).unwrap();
    let config = TrainConfig {
        epochs: 5,
        seed: 78,
        ..case.config.clone()
    };
    train_local(&thief, &tenth, &config).unwrap();
    let tuned = case.path("fine-tuned.safetensors");
    save(&thief, &tuned);
    let d = detect_file(&tuned, &mark).unwrap();
    report(
        case.name,
        "fine-tuned: 10% of the data, 5 epochs",
        &d,
        Some(case.model_accuracy(&thief)),
    );
    assert!(d.log10_p() < -9.0, "{}: fine-tuned {d:?}", case.name);

    // 30% magnitude pruning.
    let pruned = case.path("pruned.safetensors");
    write(&pruned, &prune(&read(&marked), 0.3));
    let d = detect_file(&pruned, &mark).unwrap();
    report(
        case.name,
        "30% magnitude pruning",
        &d,
        Some(case.accuracy(&pruned)),
    );
    assert!(d.log10_p() < -9.0, "{}: pruned {d:?}", case.name);

    // INT8 weight-only quantization (protocol::checkpoint::export_int8).
    let model_dir = case.path("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("config.json"), "{}").unwrap();
    std::fs::copy(&marked, model_dir.join("model.safetensors")).unwrap();
    let int8 = case.path("int8");
    export_int8(&model_dir, &int8).unwrap();
    let d = detect_file(&int8.join("model.safetensors"), &mark).unwrap();
    report(case.name, "INT8 export", &d, None);
    assert!(d.log10_p() < -9.0, "{}: INT8 {d:?}", case.name);

    // Gaussian noise, growing until accuracy drops by 2 points: still detected there.
    let tensors = read(&marked);
    let noisy = case.path("noisy.safetensors");
    let mut reached = None;
    for rel in [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0] {
        write(&noisy, &add_noise(&tensors, rel, 99));
        let acc = case.accuracy(&noisy);
        let d = detect_file(&noisy, &mark).unwrap();
        report(case.name, &format!("Gaussian noise {rel} σ"), &d, Some(acc));
        if acc_marked - acc >= 0.02 {
            reached = Some((rel, d));
            break;
        }
    }
    let (rel, d) = reached.unwrap_or_else(|| panic!("{}: noise never cost 2 points", case.name));
    assert!(
        d.log10_p() < -9.0,
        "{}: noise {rel} σ (2-point drop): {d:?}",
        case.name
    );
}

fn single_threaded() {
    tch::set_num_threads(1);
}

#[test]
fn mlp_watermark_costs_nothing_is_not_found_in_independent_models_and_survives_attacks() {
    single_threaded();
    let (_, table) = breast_cancer();
    let split = stratified_split(&table, 0.2, 2024).unwrap();
    let standardizer = Standardizer::fit(&split.train).unwrap();
    let train = standardizer.applied(&split.train).unwrap();
    let test = standardizer.applied(&split.validation).unwrap();
    let spec = ModelSpec::new(vec![train.n_features], train.n_classes())
        .with_hidden(vec![32, 16])
        .with_dropout(0.1);
    let case = Case {
        name: "mlp breast cancer",
        build: Box::new(move |seed| {
            Model::new("mlp", spec.clone(), default_device(), seed).unwrap()
        }),
        train,
        test,
        config: TrainConfig {
            optimizer: OptimizerKind::Adam,
            learning_rate: 3e-3,
            epochs: 30,
            batch_size: 32,
            weight_decay: 1e-4,
            proximal_mu: 0.0,
            seed: 1,
        },
        dir: tempfile::tempdir().unwrap(),
    };
    run_case(&case, 20, 30);
}

#[test]
fn cnn_watermark_costs_nothing_is_not_found_in_independent_models_and_survives_attacks() {
    single_threaded();
    let (schema, digits) = mnist();
    let first = stratified_split(&digits, 0.2, 5).unwrap();
    let train = first.validation;
    let test = stratified_split(&first.train, 0.125, 6).unwrap().validation;
    let spec = ModelSpec::new(schema.input_shape(digits.n_features), 10)
        .with_conv_channels([8, 16])
        .with_hidden(vec![64]);
    let case = Case {
        name: "cnn mnist",
        build: Box::new(move |seed| {
            Model::new("cnn", spec.clone(), default_device(), seed).unwrap()
        }),
        train,
        test,
        config: TrainConfig {
            optimizer: OptimizerKind::Adam,
            learning_rate: 2e-3,
            epochs: 4,
            batch_size: 32,
            weight_decay: 0.0,
            proximal_mu: 0.0,
            seed: 1,
        },
        dir: tempfile::tempdir().unwrap(),
    };
    // The independent CNNs: seeded inits with one epoch each (the statistic's null does not
    // depend on how long a model trained, only on its independence from the key).
    run_case(&case, 20, 1);
}

mod language_model;
