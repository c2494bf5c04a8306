//! A LoRA job's watermark on a language model, as the platform makes and a thief passes it on:
//! rank-8 adapters on every projection of the demo's `llama` shape (vocabulary 512, hidden 64,
//! 2 layers) are trained on "site" text; their B (what a LoRA job publishes) is marked with a
//! LoRA job's defaults, exactly as the coordinator does (`embed_stream`); the thief exports the
//! adapter (`export_peft_adapter`) and merges it into the base (`merge_lora`). Measured: the
//! perplexity cost of the mark on held-out site text, detection on the merged checkpoint against
//! the job's base and unmarked adapter (`detect_merged_marks`, informed), no detection on the
//! unmarked merge or on 20 other adapters, and the attacks on the merged model: fine-tuning on other text, Gaussian noise up
//! to a 1% and a 5% perplexity loss, the INT8 export and 30% magnitude pruning. Run with
//! `--nocapture` for the table BENCHMARKS.md quotes.

use super::*;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};
use tutela_protocol::checkpoint::merge_lora;
use tutela_protocol::checkpoint_digest::checkpoint_digest_of_dir;
use tutela_protocol::lora::{LoraAggregation, LoraSpec};
use tutela_protocol::peft_export::export_peft_adapter;
use tutela_protocol::watermark::{
    LORA_DEFAULT_STRENGTH, Reference, detect_file_marks_against, detect_merged_marks,
    job_base_weights,
};
use tutela_site_node::lm::config::DecoderConfig;
use tutela_site_node::lm::hf::{load_checkpoint, save_checkpoint};
use tutela_site_node::lm::llama::LanguageModel;
use tutela_site_node::lm::lora::adapter_update_tensors;
use tutela_site_node::lm::lora::dp::AdapterModel;
use tutela_site_node::lm::round::data::UnitWindows;
use tutela_site_node::lm::round::train::train_adapters;

const VOCAB: i64 = 512;
/// Adapter training steps (16 of the 256 site sequences each).
const STEPS: u64 = 150;
/// The job's seed: every site's (and the verifier's) A.
const JOB_SEED: u64 = 31;

fn config() -> DecoderConfig {
    let mut c = DecoderConfig::llama(512, 64, 128, 2, 4, 2);
    c.max_position_embeddings = 128;
    c.tie_word_embeddings = true;
    // Peaked next-token distributions: text a model writes has a low perplexity that a change
    // of the weights visibly raises (the sensitive case).
    c.initializer_range = 0.15;
    c
}

fn lora() -> LoraSpec {
    LoraSpec {
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
    }
}

/// `n` sequences of `len + 1` tokens written by `model` at temperature 0.5 (peaked text, whose
/// perplexity a change of the weights visibly raises), seeded.
fn sample(model: &LanguageModel, n: i64, len: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let mut ids = Tensor::randint(VOCAB, [n, 1], (Kind::Int64, Device::Cpu));
    tch::no_grad(|| {
        for _ in 0..len {
            let logits = model.decoder.forward(&ids, None, None).unwrap().logits;
            let last = (logits.select(1, -1) / 0.5).softmax(-1, Kind::Float);
            let next = last.multinomial(1, true);
            ids = Tensor::cat(&[ids.shallow_clone(), next], 1);
        }
    });
    ids
}

/// Perplexity of `model` on `ids` (`[batch, time + 1]`).
fn model_perplexity(model: &LanguageModel, ids: &Tensor) -> f64 {
    let t = ids.size()[1] - 1;
    let logits = tch::no_grad(|| {
        model
            .decoder
            .forward(&ids.narrow(1, 0, t), None, None)
            .unwrap()
            .logits
    });
    let loss = logits
        .view([-1, VOCAB])
        .cross_entropy_for_logits(&ids.narrow(1, 1, t).reshape([-1]));
    loss.double_value(&[]).exp()
}

fn perplexity(dir: &Path, ids: &Tensor) -> f64 {
    model_perplexity(
        &load_checkpoint(dir, Device::Cpu, Kind::Float).unwrap(),
        ids,
    )
}

/// `ids` as training data: each sequence one privacy unit of one window.
fn windows(ids: &Tensor) -> UnitWindows {
    let rows = Vec::<Vec<i64>>::try_from(ids).unwrap();
    let targets = rows.iter().map(|r| r.len() - 1).sum();
    UnitWindows {
        documents: rows.len(),
        units: rows.into_iter().map(|r| vec![r]).collect(),
        targets,
    }
}

/// The B tensors of `model`'s adapters, as a LoRA job publishes them (PEFT names, f32).
fn published_adapter(model: &LanguageModel) -> Tensors {
    adapter_update_tensors(&model.decoder.lora_layers())
        .unwrap()
        .into_iter()
        .map(|(spec, bytes)| {
            let values = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = spec.shape.iter().map(|&d| d as usize).collect();
            (spec.name, shape, values)
        })
        .collect()
}

/// `tutela model export-adapter` then `tutela model merge`: the merged checkpoint's directory.
fn export_and_merge(adapter: &Path, base: &Path, out: &Path) -> PathBuf {
    let peft = out.with_extension("peft");
    export_peft_adapter(&lora(), JOB_SEED, adapter, base, &peft).unwrap();
    merge_lora(base, &peft, out).unwrap();
    out.to_path_buf()
}

fn weights(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

#[test]
fn a_lora_jobs_mark_costs_under_1_percent_perplexity_and_is_found_in_the_merged_model_after_attacks()
 {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let case = "llama LoRA, merged";

    // The job's base, named by digest, and the sites' text (another model's writing).
    let base_model = LanguageModel::new(&config(), Device::Cpu, 7).unwrap();
    let base = path("base");
    save_checkpoint(&base_model, &base).unwrap();
    let base_weights =
        job_base_weights(&base, Some(&checkpoint_digest_of_dir(&base).unwrap())).unwrap();
    // The sites' text: written by the base shifted by a random rank-8 adapter (on the job's A:
    // a domain shift of the rank the job's adapters can represent).
    let mut writer = LanguageModel::new(&config(), Device::Cpu, 7).unwrap();
    writer.attach_lora(&lora(), JOB_SEED).unwrap();
    tch::manual_seed(12);
    for layer in writer.decoder.lora_layers_mut() {
        let b = layer.b().randn_like() * 0.1;
        layer.set_factors(&b, None).unwrap();
    }
    let writer = writer.merged().unwrap();
    let site_text = sample(&writer, 256, 48, 1);
    let held_out = sample(&writer, 16, 48, 2);

    // The federation's adapters (plain Adam here: the mark does not care how B was trained).
    let mut adapted = load_checkpoint(&base, Device::Cpu, Kind::Float).unwrap();
    adapted.attach_lora(&lora(), JOB_SEED).unwrap();
    let train = TrainConfig {
        optimizer: OptimizerKind::Adam,
        learning_rate: 0.01,
        epochs: 1,
        batch_size: 16,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 3,
    };
    let (trained, _) = train_adapters(
        &adapted.decoder,
        &windows(&site_text),
        &train,
        None,
        Some(STEPS),
        0,
        Device::Cpu,
        &mut |_, _, _| {},
    );
    trained.unwrap();
    let published = path("adapter.safetensors");
    let adapter = published_adapter(&adapted);
    write(&published, &adapter);

    // The coordinator marks the published B with a LoRA job's defaults.
    let mark = WatermarkKey::from_bytes([0x5a; 32]).mark("job-lm");
    let marked = path("adapter-marked.safetensors");
    let (_, _, embedded) = embed_stream(
        &published,
        SafetensorsFileSink::at(&marked),
        &mark,
        LORA_DEFAULT_STRENGTH,
    )
    .unwrap();
    let clean_merged = export_and_merge(&published, &base, &path("merged-clean"));
    let marked_merged = export_and_merge(&marked, &base, &path("merged-marked"));
    let base_ppl = model_perplexity(&base_model, &held_out);
    let (clean_ppl, marked_ppl) = (
        perplexity(&clean_merged, &held_out),
        perplexity(&marked_merged, &held_out),
    );
    eprintln!(
        "watermark | {case} | embedded: amplitude {:.4} σ over {} B values in {} tensors, expected z {:.1} | held-out perplexity: writer {:.3}, base {base_ppl:.3}, adapted {clean_ppl:.3} -> marked {marked_ppl:.3} ({:+.2}%)",
        embedded.amplitude,
        embedded.values,
        embedded.tensors,
        embedded.expected_z,
        model_perplexity(&writer, &held_out),
        100.0 * (marked_ppl / clean_ppl - 1.0)
    );
    assert!(clean_ppl < 0.9 * base_ppl, "the adapters learned nothing");
    // What a full model's default (z = 12 blind, 0.13 σ of these 8,192 values) would cost here:
    // recorded, not asserted (why a LoRA job's cap is lower).
    let strong = path("adapter-z12.safetensors");
    let (_, _, z12) = embed_stream(
        &published,
        SafetensorsFileSink::at(&strong),
        &mark,
        STRENGTH,
    )
    .unwrap();
    let strong_ppl = perplexity(
        &export_and_merge(&strong, &base, &path("merged-z12")),
        &held_out,
    );
    eprintln!(
        "watermark | {case} | at a full model's default: amplitude {:.4} σ, expected z {:.1} | perplexity {clean_ppl:.3} -> {strong_ppl:.3} ({:+.2}%)",
        z12.amplitude,
        z12.expected_z,
        100.0 * (strong_ppl / clean_ppl - 1.0)
    );
    assert!(
        marked_ppl / clean_ppl - 1.0 <= 0.01,
        "mark cost: {clean_ppl} -> {marked_ppl}"
    );

    // Informed detection: against the base and the job's unmarked adapter (the aggregate the
    // coordinator keeps), as `tutela model verify-watermark --merged-base --job --reference` does.
    let detect_with = |file: &Path, informed: bool| {
        let mut reference = Reference::open(&published).unwrap();
        let (d, recovery) = detect_merged_marks(
            file,
            &base_weights,
            &lora(),
            JOB_SEED,
            informed.then_some(&mut reference),
            std::slice::from_ref(&mark),
        )
        .unwrap();
        assert!(recovery.missing.is_empty(), "{:?}", recovery.missing);
        d[0]
    };
    let detect = |file: &Path| detect_with(file, true);
    let mut reference = Reference::open(&published).unwrap();
    let d = detect_file_marks_against(&marked, Some(&mut reference), std::slice::from_ref(&mark))
        .unwrap()[0];
    report(case, "published adapter (B), informed", &d, None);
    assert!(d.log10_p() < -9.0, "adapter: {d:?}");
    report(
        case,
        "watermarked, merged, blind",
        &detect_with(&weights(&marked_merged), false),
        None,
    );
    let d = detect(&weights(&marked_merged));
    report(case, "watermarked, merged", &d, None);
    assert!(d.log10_p() < -9.0, "merged: {d:?}");
    let d = detect(&weights(&clean_merged));
    report(case, "unmarked, merged", &d, None);
    assert!(d.p_value() > 0.01, "unmarked merged: {d:?}");

    // 20 other adapters of the same spread, merged into the same base with the same A.
    let spread = mean_std_of(&adapter);
    let mut smallest = 1f64;
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(500 + seed);
        let other: Tensors = adapter
            .iter()
            .map(|(n, s, v)| {
                let values = v.iter().map(|_| spread * gaussian(&mut rng)).collect();
                (n.clone(), s.clone(), values)
            })
            .collect();
        let file = path("other.safetensors");
        write(&file, &other);
        let merged = export_and_merge(&file, &base, &path(&format!("merged-other-{seed}")));
        let d = detect(&weights(&merged));
        assert!(d.p_value() > 0.01, "other adapter {seed}: {d:?}");
        smallest = smallest.min(d.p_value());
        std::fs::remove_dir_all(&merged).unwrap();
    }
    eprintln!("watermark | {case} | 20 other adapters, merged | smallest p = {smallest:.3}");

    // Fine-tuning the whole merged model on other text (a third model's writing).
    let other_writer = LanguageModel::new(&config(), Device::Cpu, 13).unwrap();
    let thief_text = sample(&other_writer, 64, 48, 4);
    let thief = load_checkpoint(&marked_merged, Device::Cpu, Kind::Float).unwrap();
    let mut optimizer = tch::nn::Adam::default().build(&thief.vs, 1e-3).unwrap();
    for step in 0..40i64 {
        let batch = thief_text.narrow(0, (step * 16) % 64, 16);
        let loss = thief.decoder.loss(&batch, None).unwrap();
        optimizer.backward_step(&loss);
    }
    let tuned = path("merged-fine-tuned");
    save_checkpoint(&thief, &tuned).unwrap();
    let d = detect(&weights(&tuned));
    eprintln!(
        "watermark | {case} | fine-tuned on other text (40 steps of 16 sequences, Adam 1e-3, every weight): perplexity on that text {:.3} -> {:.3}, held-out {:.3} | z = {:.2} | log10 p = {:.1}",
        perplexity(&marked_merged, &thief_text),
        perplexity(&tuned, &thief_text),
        perplexity(&tuned, &held_out),
        d.z,
        d.log10_p()
    );
    assert!(d.log10_p() < -9.0, "fine-tuned: {d:?}");

    // Gaussian noise on every weight, growing until the held-out perplexity is 1%, then 5%, worse.
    let tensors = read(&weights(&marked_merged));
    let noisy = path("merged-noisy");
    copy_config(&marked_merged, &noisy);
    let mut bounds = vec![0.05, 0.01];
    for rel in [
        0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5,
    ] {
        write(&weights(&noisy), &add_noise(&tensors, rel, 99));
        let loss = perplexity(&noisy, &held_out) / marked_ppl - 1.0;
        let d = detect(&weights(&noisy));
        eprintln!(
            "watermark | {case} | Gaussian noise {rel} σ: perplexity {:+.2}% | z = {:.2} | log10 p = {:.1}",
            100.0 * loss,
            d.z,
            d.log10_p()
        );
        while bounds.last().is_some_and(|&b| loss >= b) {
            assert!(d.log10_p() < -9.0, "noise {rel} σ ({loss:+.3}): {d:?}");
            bounds.pop();
        }
        if bounds.is_empty() {
            break;
        }
    }
    assert!(bounds.is_empty(), "noise never cost 5% perplexity");

    // The INT8 export and 30% magnitude pruning of the merged model.
    let int8 = path("merged-int8");
    export_int8(&marked_merged, &int8).unwrap();
    let d = detect(&weights(&int8));
    report(case, "INT8 export", &d, None);
    assert!(d.log10_p() < -9.0, "INT8: {d:?}");
    let pruned = path("merged-pruned");
    copy_config(&marked_merged, &pruned);
    write(&weights(&pruned), &prune(&tensors, 0.3));
    let d = detect(&weights(&pruned));
    eprintln!(
        "watermark | {case} | 30% magnitude pruning: perplexity {:+.2}% | z = {:.2} | log10 p = {:.1}",
        100.0 * (perplexity(&pruned, &held_out) / marked_ppl - 1.0),
        d.z,
        d.log10_p()
    );
    assert!(d.log10_p() < -9.0, "pruned: {d:?}");
}

fn copy_config(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
}

fn gaussian(rng: &mut StdRng) -> f32 {
    let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
}

/// The standard deviation of all the values of `tensors` together.
fn mean_std_of(tensors: &Tensors) -> f32 {
    let all: Vec<f64> = tensors
        .iter()
        .flat_map(|(_, _, v)| v.iter().map(|&x| f64::from(x)))
        .collect();
    let n = all.len() as f64;
    let mean = all.iter().sum::<f64>() / n;
    (all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt() as f32
}
