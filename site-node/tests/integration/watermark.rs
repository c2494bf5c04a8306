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
const STRENGTH: Strength = Strength {
    target_z: 16.0,
    max_amplitude: 0.25,
};

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

mod language_model {
    //! The demo's `llama` shape (vocabulary 512, hidden 64, 2 layers) with rank-8 adapters on
    //! every projection, merged, written as a Hugging Face checkpoint and watermarked: the
    //! perplexity cost on text the model itself writes, detection, no detection in 20 other
    //! seeds' merged models, and pruning and INT8 export.

    use super::*;
    use tch::{Device, Kind, Tensor};
    use tutela_protocol::lora::{LoraAggregation, LoraSpec};
    use tutela_site_node::lm::config::DecoderConfig;
    use tutela_site_node::lm::hf::{load_checkpoint, save_checkpoint};
    use tutela_site_node::lm::llama::LanguageModel;

    fn config() -> DecoderConfig {
        let mut c = DecoderConfig::llama(512, 64, 128, 2, 4, 2);
        c.max_position_embeddings = 128;
        c.tie_word_embeddings = true;
        // Peaked next-token distributions, so that text the model writes has a low perplexity
        // the mark could visibly raise.
        c.initializer_range = 0.15;
        c
    }

    /// A merged LoRA model of `seed`, written to `dir` (config.json, model.safetensors).
    fn merged_checkpoint(seed: u64, dir: &Path) {
        let mut model = LanguageModel::new(&config(), Device::Cpu, seed).unwrap();
        let spec = LoraSpec {
            rank: 8,
            alpha: 16.0,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            dropout: 0.0,
            aggregation: LoraAggregation::Ffa,
        };
        model.attach_lora(&spec, seed + 1).unwrap();
        tch::manual_seed(seed as i64 + 2);
        for layer in model.decoder.lora_layers_mut() {
            let b = layer.b().randn_like() * 0.05;
            layer.set_factors(&b, None).unwrap();
        }
        save_checkpoint(&model.merged().unwrap(), dir).unwrap();
    }

    /// Perplexity of the checkpoint in `dir` on `ids` (`[batch, time + 1]`).
    fn perplexity(dir: &Path, ids: &Tensor) -> f64 {
        let model = load_checkpoint(dir, Device::Cpu, Kind::Float).unwrap();
        let t = ids.size()[1] - 1;
        let logits = tch::no_grad(|| {
            model
                .decoder
                .forward(&ids.narrow(1, 0, t), None, None)
                .unwrap()
                .logits
        });
        let loss = logits
            .view([-1, 512])
            .cross_entropy_for_logits(&ids.narrow(1, 1, t).reshape([-1]));
        loss.double_value(&[]).exp()
    }

    /// 16 sequences of 48 tokens sampled from the checkpoint in `dir`.
    fn sample(dir: &Path) -> Tensor {
        let model = load_checkpoint(dir, Device::Cpu, Kind::Float).unwrap();
        tch::manual_seed(5);
        let mut ids = Tensor::randint(512, [16, 1], (Kind::Int64, Device::Cpu));
        tch::no_grad(|| {
            for _ in 0..48 {
                let logits = model.decoder.forward(&ids, None, None).unwrap().logits;
                let last = logits.select(1, -1).softmax(-1, Kind::Float);
                let next = last.multinomial(1, true);
                ids = Tensor::cat(&[ids.shallow_clone(), next], 1);
            }
        });
        ids
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    }

    #[test]
    fn merged_lora_llama_is_marked_within_1_percent_perplexity_and_detected_after_attacks() {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let mark = WatermarkKey::from_bytes([0x5a; 32]).mark("job-lm");
        let clean = dir.path().join("clean");
        merged_checkpoint(7, &clean);
        let text = sample(&clean);
        let before = perplexity(&clean, &text);
        // The cost grows as the amplitude squared, and the amplitude is target_z / √N: this model
        // has only 1e5 marked values, so the default z = 16 costs more than 1% (recorded, not
        // asserted), and a job publishing so small a language model asks for z = 7.5 (p < 1e-12).
        let embed = |target_z: f64, name: &str| {
            let marked = dir.path().join(name);
            copy_dir(&clean, &marked);
            let strength = Strength {
                target_z,
                ..STRENGTH
            };
            let (_, _, embedded) = embed_stream(
                &clean.join("model.safetensors"),
                SafetensorsFileSink::at(marked.join("model.safetensors")),
                &mark,
                strength,
            )
            .unwrap();
            let after = perplexity(&marked, &text);
            eprintln!(
                "watermark | llama merged LoRA | target z {target_z}: amplitude {:.4} σ over {} values in {} tensors, expected z {:.1} | perplexity {before:.3} -> {after:.3} ({:+.2}%)",
                embedded.amplitude,
                embedded.values,
                embedded.tensors,
                embedded.expected_z,
                100.0 * (after / before - 1.0)
            );
            (marked, after)
        };
        embed(16.0, "marked-z16");
        let (marked, after) = embed(7.5, "marked");
        assert!(
            after / before - 1.0 <= 0.01,
            "perplexity {before} -> {after}"
        );
        let d = detect_file(&marked.join("model.safetensors"), &mark).unwrap();
        report("llama merged LoRA", "watermarked", &d, None);
        assert!(d.log10_p() < -9.0, "{d:?}");
        let d = detect_file(&clean.join("model.safetensors"), &mark).unwrap();
        report("llama merged LoRA", "unmarked", &d, None);
        assert!(d.p_value() > 0.01, "{d:?}");

        let mut smallest = 1.0f64;
        for seed in 100..120 {
            let other = dir.path().join(format!("other-{seed}"));
            merged_checkpoint(seed, &other);
            let d = detect_file(&other.join("model.safetensors"), &mark).unwrap();
            assert!(d.p_value() > 0.01, "seed {seed}: {d:?}");
            smallest = smallest.min(d.p_value());
            std::fs::remove_dir_all(&other).unwrap();
        }
        eprintln!("watermark | llama merged LoRA | 20 other seeds | smallest p = {smallest:.3}");

        let pruned = dir.path().join("pruned");
        copy_dir(&clean, &pruned);
        write(
            &pruned.join("model.safetensors"),
            &prune(&read(&marked.join("model.safetensors")), 0.3),
        );
        let d = detect_file(&pruned.join("model.safetensors"), &mark).unwrap();
        report("llama merged LoRA", "30% magnitude pruning", &d, None);
        assert!(d.log10_p() < -9.0, "{d:?}");

        let int8 = dir.path().join("int8");
        export_int8(&marked, &int8).unwrap();
        let d = detect_file(&int8.join("model.safetensors"), &mark).unwrap();
        report("llama merged LoRA", "INT8 export", &d, None);
        assert!(d.log10_p() < -9.0, "{d:?}");
    }
}
