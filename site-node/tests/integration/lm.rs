//! The `llama` decoder against transformers: logits, losses and greedy tokens of tiny random
//! checkpoints built by transformers at test time (no download), checkpoints we save loaded by
//! transformers, KV-cache generation against full recomputation, and refused checkpoints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};
use tutela_site_node::lm::config::{Architecture, DecoderConfig, MoeConfig};
use tutela_site_node::lm::error::LmError;
use tutela_site_node::lm::generate::{GenerateOptions, Sampling, generate, perplexity};
use tutela_site_node::lm::hf::{
    checkpoint_digest, load_checkpoint, load_checkpoint_with_digest, save_checkpoint,
};
use tutela_site_node::lm::llama::{LanguageModel, causal_lm_loss};
use tutela_site_node::lm::moe::load_balancing_loss;
use tutela_site_node::lm::registry;
use tutela_site_node::weights::{load_safetensors, save_safetensors};

/// Logits must agree with transformers' to this absolute error.
const LOGIT_TOLERANCE: f64 = 1e-4;

fn python() -> PathBuf {
    std::env::var_os("TUTELA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn reference_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/lm_reference.py")
}

fn run_python(args: &[&std::ffi::OsStr]) {
    let python = python();
    let output = Command::new(&python)
        .arg(reference_script())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/setup.sh or set TUTELA_PYTHON",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "lm_reference.py failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The checkpoints and reference outputs transformers builds, once per test process (every
/// Python start imports torch and transformers: seconds on a loaded 2-core machine).
fn references() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        run_python(&["build".as_ref(), dir.path().as_os_str()]);
        dir
    })
    .path()
}

fn reference_tensors(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn scalar(t: &Tensor) -> f64 {
    t.reshape([-1]).double_value(&[0])
}

/// Logits, padded-batch logits and loss, perplexity and greedy tokens of one reference model.
fn check_against_transformers(name: &str) {
    let dir = references().join(name);
    let reference = reference_tensors(&dir);
    let model = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap();
    let decoder = &model.decoder;

    let ids = &reference["ids"];
    let output = tch::no_grad(|| decoder.forward(ids, None, None)).unwrap();
    let diff = max_abs_diff(&output.logits, &reference["logits"]);
    eprintln!("{name}: max |logit difference| from transformers {diff:e}");
    assert!(diff < LOGIT_TOLERANCE, "{name}: logits differ by {diff}");
    let spread = scalar(&reference["logits"].abs().max());
    assert!(
        spread > 1.0,
        "{name}: reference logits too small ({spread}) to catch bugs"
    );

    // A right-padded batch of ragged lengths: every real position as transformers has it, and
    // the loss over non-padding targets (with the MoE's load-balancing term, weighted as
    // transformers weights it).
    let padded = &reference["padded_ids"];
    let mask = &reference["padded_mask"];
    let output = tch::no_grad(|| decoder.forward(padded, Some(mask), None)).unwrap();
    let real = mask.unsqueeze(-1).to_kind(Kind::Float);
    let diff = max_abs_diff(
        &(&output.logits * &real),
        &(&reference["padded_logits"] * &real),
    );
    eprintln!("{name}: padded batch, max |logit difference| {diff:e}");
    assert!(
        diff < LOGIT_TOLERANCE,
        "{name}: padded logits differ by {diff}"
    );
    let loss = tch::no_grad(|| decoder.loss(padded, Some(mask))).unwrap();
    let diff = (scalar(&loss) - scalar(&reference["padded_loss"])).abs();
    assert!(diff < 1e-5, "{name}: padded loss differs by {diff}");
    if let (Some(moe), Some(aux)) = (&model.config().moe, reference.get("padded_aux_loss")) {
        let ours = load_balancing_loss(
            &output.router_logits,
            moe.num_experts,
            moe.num_experts_per_tok,
            Some(mask),
        );
        let diff = (scalar(&ours) - scalar(aux)).abs();
        assert!(diff < 1e-5, "{name}: aux loss differs by {diff}");
    }

    // Perplexity of one window is exp(transformers' loss on it).
    let ids_vec: Vec<i64> = Vec::try_from(ids.reshape([-1])).unwrap();
    let ppl = perplexity(decoder, &ids_vec, 64, 64, Device::Cpu).unwrap();
    assert_eq!(ppl.tokens, ids_vec.len() - 1);
    let expected = scalar(&reference["loss"]).exp();
    assert!(
        (ppl.perplexity / expected - 1.0).abs() < 1e-5,
        "{name}: perplexity {} vs transformers' {expected}",
        ppl.perplexity
    );

    // Greedy generation with the KV cache gives transformers' tokens (recomputed in full).
    let greedy: Vec<i64> = Vec::try_from(&reference["greedy"]).unwrap();
    let options = GenerateOptions {
        max_new_tokens: greedy.len(),
        ..Default::default()
    };
    let ours = generate(decoder, &ids_vec, Device::Cpu, &options).unwrap();
    assert_eq!(ours, greedy, "{name}: greedy tokens");
}

#[test]
fn llama_with_gqa_and_tied_head_matches_transformers() {
    check_against_transformers("llama_gqa_tied");
}

#[test]
fn llama_with_untied_head_biases_and_head_dim_matches_transformers() {
    let config = DecoderConfig::load(
        references()
            .join("llama_mha_untied_bias")
            .join("config.json"),
    )
    .unwrap();
    // transformers 5 writes rope_theta inside rope_parameters.
    assert_eq!(config.rope_theta, 5000.0);
    assert_eq!((config.head_dim, config.hidden_size), (16, 32));
    check_against_transformers("llama_mha_untied_bias");
}

#[test]
fn qwen2_moe_matches_transformers() {
    let config = DecoderConfig::load(references().join("qwen2_moe").join("config.json")).unwrap();
    assert_eq!(config.architecture, Architecture::Qwen2Moe);
    assert!(config.is_sparse_layer(0) && !config.is_sparse_layer(1));
    check_against_transformers("qwen2_moe");
}

fn tiny_llama() -> DecoderConfig {
    let mut config = DecoderConfig::llama(61, 32, 48, 2, 4, 2);
    config.initializer_range = 0.15;
    config.max_position_embeddings = 64;
    config
}

fn tiny_moe() -> DecoderConfig {
    let mut config = tiny_llama();
    config.architecture = Architecture::Qwen2Moe;
    config.qkv_bias = true;
    config.moe = Some(MoeConfig {
        num_experts: 4,
        num_experts_per_tok: 2,
        moe_intermediate_size: 16,
        shared_expert_intermediate_size: 24,
        norm_topk_prob: false,
        decoder_sparse_step: 1,
        mlp_only_layers: vec![],
        router_aux_loss_coef: 0.001,
    });
    config
}

#[test]
fn models_we_save_load_in_transformers_with_the_same_logits() {
    let root = tempfile::tempdir().unwrap();
    let ids = Tensor::from_slice(&[3i64, 14, 15, 9, 26, 53, 58, 9, 7, 9]).unsqueeze(0);
    let mut untied = tiny_llama();
    untied.tie_word_embeddings = false;
    let mut tied = tiny_llama();
    tied.tie_word_embeddings = true;
    tied.num_key_value_heads = 1;
    let mut dirs = Vec::new();
    let mut ours = Vec::new();
    for (name, config) in [("untied", untied), ("tied_mqa", tied), ("moe", tiny_moe())] {
        let model = registry::build("llama", &config, Device::Cpu, 7).unwrap();
        let dir = root.path().join(name);
        save_checkpoint(&model, &dir).unwrap();
        Tensor::write_safetensors(&[("ids", &ids)], dir.join("ids.safetensors")).unwrap();
        let logits = tch::no_grad(|| model.decoder.forward(&ids, None, None))
            .unwrap()
            .logits;
        // And it reads back bit for bit.
        let back = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap();
        let again = tch::no_grad(|| back.decoder.forward(&ids, None, None))
            .unwrap()
            .logits;
        assert_eq!(max_abs_diff(&logits, &again), 0.0, "{name}: reload");
        ours.push(logits);
        dirs.push(dir);
    }
    let mut args: Vec<&std::ffi::OsStr> = vec!["check".as_ref()];
    args.extend(dirs.iter().map(|d| d.as_os_str()));
    run_python(&args);
    for (dir, logits) in dirs.iter().zip(&ours) {
        let theirs = Tensor::read_safetensors(dir.join("theirs.safetensors")).unwrap();
        let diff = max_abs_diff(logits, &theirs[0].1);
        assert!(
            diff < LOGIT_TOLERANCE,
            "{}: differs by {diff}",
            dir.display()
        );
    }
}

#[test]
fn kv_cache_generation_gives_the_tokens_of_full_recomputation() {
    for config in [tiny_llama(), tiny_moe()] {
        let model = LanguageModel::new(&config, Device::Cpu, 3).unwrap();
        let prompt = [1i64, 5, 9, 2, 40];
        for sampling in [
            Sampling::Greedy,
            Sampling::TopP {
                top_p: 0.9,
                temperature: 1.0,
                seed: 11,
            },
        ] {
            let cached = GenerateOptions {
                max_new_tokens: 20,
                sampling,
                eos_token_id: None,
                use_kv_cache: true,
            };
            let full = GenerateOptions {
                use_kv_cache: false,
                ..cached.clone()
            };
            let a = generate(&model.decoder, &prompt, Device::Cpu, &cached).unwrap();
            let b = generate(&model.decoder, &prompt, Device::Cpu, &full).unwrap();
            assert_eq!(a.len(), 20);
            assert_eq!(a, b, "{:?} {sampling:?}", config.architecture);
        }
        // A seeded sampler repeats itself, and another seed goes elsewhere.
        let sample = |seed| {
            let options = GenerateOptions {
                max_new_tokens: 20,
                sampling: Sampling::TopP {
                    top_p: 0.95,
                    temperature: 1.5,
                    seed,
                },
                ..Default::default()
            };
            generate(&model.decoder, &prompt, Device::Cpu, &options).unwrap()
        };
        assert_eq!(sample(1), sample(1));
        assert_ne!(sample(1), sample(2));
    }
}

#[test]
fn cached_logits_equal_full_logits_at_every_step() {
    let model = LanguageModel::new(&tiny_moe(), Device::Cpu, 5).unwrap();
    let ids = Tensor::from_slice(&[4i64, 8, 15, 16, 23, 42, 7, 1]).unsqueeze(0);
    tch::no_grad(|| {
        let full = model.decoder.forward(&ids, None, None).unwrap().logits;
        let mut cache = model.decoder.new_cache();
        // A 3-token prefill, a 2-token chunk (explicit causal mask over the cache), then singles.
        let mut pieces = Vec::new();
        for (start, len) in [(0, 3), (3, 2), (5, 1), (6, 1), (7, 1)] {
            let chunk = ids.narrow(1, start, len);
            pieces.push(
                model
                    .decoder
                    .forward(&chunk, None, Some(&mut cache))
                    .unwrap()
                    .logits,
            );
        }
        assert_eq!(cache.len(), 8);
        let stepped = Tensor::cat(&pieces, 1);
        let diff = max_abs_diff(&full, &stepped);
        assert!(diff < 1e-5, "cached logits differ by {diff}");
    });
}

#[test]
fn padded_rows_give_the_logits_and_loss_of_the_rows_alone() {
    let model = LanguageModel::new(&tiny_llama(), Device::Cpu, 9).unwrap();
    let rows: [&[i64]; 3] = [&[5, 6, 7, 8, 9, 10], &[11, 12, 13], &[14, 15]];
    let mut padded = vec![0i64; 3 * 6];
    let mut mask = vec![0i64; 3 * 6];
    for (r, row) in rows.iter().enumerate() {
        padded[r * 6..r * 6 + row.len()].copy_from_slice(row);
        mask[r * 6..r * 6 + row.len()].fill(1);
    }
    let padded = Tensor::from_slice(&padded).view([3, 6]);
    let mask = Tensor::from_slice(&mask).view([3, 6]);
    tch::no_grad(|| {
        let batch = model.decoder.forward(&padded, Some(&mask), None).unwrap();
        let mut nll_sum = 0.0;
        let mut targets = 0;
        for (r, row) in rows.iter().enumerate() {
            let alone = Tensor::from_slice(row).unsqueeze(0);
            let logits = model.decoder.forward(&alone, None, None).unwrap().logits;
            let n = row.len() as i64;
            let diff = max_abs_diff(
                &batch.logits.narrow(0, r as i64, 1).narrow(1, 0, n),
                &logits,
            );
            assert!(diff < 1e-5, "row {r}: {diff}");
            let loss = causal_lm_loss(&logits, &alone, None).unwrap();
            nll_sum += scalar(&loss) * (n - 1) as f64;
            targets += n - 1;
        }
        let loss = model.decoder.loss(&padded, Some(&mask)).unwrap();
        let expected = nll_sum / targets as f64;
        assert!((scalar(&loss) - expected).abs() < 1e-5);
    });
}

#[test]
fn sliding_window_perplexity_scores_each_token_once() {
    let model = LanguageModel::new(&tiny_llama(), Device::Cpu, 2).unwrap();
    let ids: Vec<i64> = (0..40).map(|i| (i * 7 + 3) % 61).collect();
    let whole = perplexity(&model.decoder, &ids, 64, 64, Device::Cpu).unwrap();
    assert_eq!(whole.tokens, 39);
    let sliding = perplexity(&model.decoder, &ids, 16, 8, Device::Cpu).unwrap();
    assert_eq!(sliding.tokens, 39);
    let chunked = perplexity(&model.decoder, &ids, 16, 16, Device::Cpu).unwrap();
    // Chunks of 16 over 40 tokens: the first token of each of the 3 chunks is not scored.
    assert_eq!(chunked.tokens, 37);
    for p in [whole, sliding, chunked] {
        assert!(p.perplexity.is_finite() && p.perplexity > 1.0, "{p:?}");
    }
    assert!(perplexity(&model.decoder, &ids, 16, 17, Device::Cpu).is_err());
    assert!(perplexity(&model.decoder, &ids[..1], 16, 8, Device::Cpu).is_err());
}

#[test]
fn missing_extra_and_misshapen_tensors_are_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("base");
    let model = LanguageModel::new(&tiny_llama(), Device::Cpu, 1).unwrap();
    save_checkpoint(&model, &dir).unwrap();
    let weights_path = dir.join("model.safetensors");
    let (weights, metadata) = load_safetensors(&weights_path).unwrap();

    let rewrite = |weights: &[(tutela_protocol::tensor::TensorSpec, Vec<u8>)]| {
        save_safetensors(&weights_path, weights, metadata.clone()).unwrap();
    };
    let missing: Vec<_> = weights
        .iter()
        .filter(|(s, _)| s.name != "model.layers.1.mlp.up_proj.weight")
        .cloned()
        .collect();
    rewrite(&missing);
    let err = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(err, LmError::TensorMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("missing from the checkpoint [model.layers.1.mlp.up_proj.weight]"),
        "{err}"
    );

    let mut extra = weights.clone();
    let mut stray = extra[0].clone();
    stray.0.name = "model.layers.2.mlp.up_proj.weight".into();
    extra.push(stray);
    rewrite(&extra);
    let err = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap_err();
    assert!(
        err.to_string()
            .contains("not in the model [model.layers.2.mlp.up_proj.weight]"),
        "{err}"
    );

    // A tied model refuses a checkpoint that carries its own head.
    rewrite(&weights);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = true.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap_err();
    assert!(
        err.to_string()
            .contains("not in the model [lm_head.weight]"),
        "{err}"
    );

    // A shape that disagrees with the configuration.
    config["tie_word_embeddings"] = false.into();
    config["intermediate_size"] = 50.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(err, LmError::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("down_proj.weight"), "{err}");
}

#[test]
fn unsupported_configurations_are_refused_with_the_key_named() {
    let base = tiny_llama().to_json("float32");
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("model_type", "gpt2".into(), "model_type \"gpt2\""),
        ("hidden_act", "gelu".into(), "hidden_act"),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5}),
            "rope_type \"llama3\"",
        ),
        (
            "num_key_value_heads",
            3.into(),
            "multiple of num_key_value_heads",
        ),
        (
            "vocab_size",
            serde_json::Value::Null,
            "vocab_size is missing",
        ),
    ];
    for (key, value, expected) in cases {
        let mut json = base.clone();
        json[key] = value;
        let err = DecoderConfig::from_json(&json).unwrap_err().to_string();
        assert!(err.contains(expected), "{key}: {err}");
    }
    // transformers 4's top-level rope_theta is still read.
    let mut json = base.clone();
    json.as_object_mut().unwrap().remove("rope_parameters");
    json["rope_theta"] = 123.0.into();
    assert_eq!(DecoderConfig::from_json(&json).unwrap().rope_theta, 123.0);
    // Keys we do not interpret survive a round trip.
    json["eos_token_id"] = serde_json::json!([2, 3]);
    let config = DecoderConfig::from_json(&json).unwrap();
    assert_eq!(
        config.to_json("float32")["eos_token_id"],
        serde_json::json!([2, 3])
    );
}

#[test]
fn a_job_gives_the_hyper_parameters_as_config_json_keys_in_toml() {
    let table: toml::Value = toml::from_str(
        r#"
model_type = "llama"
vocab_size = 61
hidden_size = 32
intermediate_size = 48
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
tie_word_embeddings = true
rope_parameters = { rope_type = "default", rope_theta = 500000.0 }
"#,
    )
    .unwrap();
    let config = DecoderConfig::from_toml(&table).unwrap();
    assert_eq!(config.num_key_value_heads, 2);
    assert_eq!(config.head_dim, 8);
    assert_eq!(config.rope_theta, 500000.0);
    assert!(config.tie_word_embeddings);
}

#[test]
fn half_precision_files_load_into_the_kind_the_caller_asks_for() {
    let root = tempfile::tempdir().unwrap();
    let mut model = LanguageModel::new(&tiny_llama(), Device::Cpu, 6).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).unsqueeze(0);
    let f32_logits = tch::no_grad(|| model.decoder.forward(&ids, None, None))
        .unwrap()
        .logits;
    model.vs.set_kind(Kind::BFloat16);
    let dir = root.path().join("bf16");
    save_checkpoint(&model, &dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    // A bf16 file loads into an f32 model when f32 is asked for (not silently bf16)...
    let widened = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap();
    assert!(
        widened
            .vs
            .variables()
            .values()
            .all(|t| t.kind() == Kind::Float)
    );
    let logits = tch::no_grad(|| widened.decoder.forward(&ids, None, None))
        .unwrap()
        .logits;
    let diff = max_abs_diff(&logits, &f32_logits);
    assert!(
        diff > 0.0 && diff < 0.5,
        "bf16 rounding moved logits by {diff}"
    );
    // ... and stays bf16 when bf16 is asked for.
    let narrow = load_checkpoint(&dir, Device::Cpu, Kind::BFloat16).unwrap();
    assert!(
        narrow
            .vs
            .variables()
            .values()
            .all(|t| t.kind() == Kind::BFloat16)
    );
    let logits = tch::no_grad(|| narrow.decoder.forward(&ids, None, None))
        .unwrap()
        .logits;
    assert_eq!(logits.kind(), Kind::BFloat16);
}

#[test]
fn checkpoint_digest_ignores_layout_and_sees_every_value() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    let model = LanguageModel::new(&tiny_moe(), Device::Cpu, 4).unwrap();
    save_checkpoint(&model, &dir).unwrap();
    let digest = checkpoint_digest(&dir).unwrap();
    assert_eq!(digest.len(), 64);

    // Re-serialised config (other whitespace) and weights split into two shards: same digest.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let (weights, metadata) = load_safetensors(dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (first, second) = weights.split_at(weights.len() / 2);
    save_safetensors(dir.join("a.safetensors"), first, metadata.clone()).unwrap();
    save_safetensors(dir.join("b.safetensors"), second, metadata.clone()).unwrap();
    let weight_map: serde_json::Map<String, serde_json::Value> = first
        .iter()
        .map(|(s, _)| (s.name.clone(), "a.safetensors".into()))
        .chain(
            second
                .iter()
                .map(|(s, _)| (s.name.clone(), "b.safetensors".into())),
        )
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    assert_eq!(checkpoint_digest(&dir).unwrap(), digest);
    // The sharded checkpoint loads, with the same outputs.
    let back = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 3]).unsqueeze(0);
    let (a, b) = tch::no_grad(|| {
        (
            model.decoder.forward(&ids, None, None).unwrap().logits,
            back.decoder.forward(&ids, None, None).unwrap().logits,
        )
    });
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // A job names the base by digest: the same checkpoint loads, another is refused.
    load_checkpoint_with_digest(&dir, &digest, Device::Cpu, Kind::Float).unwrap();
    let err =
        load_checkpoint_with_digest(&dir, &"0".repeat(64), Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(err, LmError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&digest), "{err}");

    // One changed bit of one tensor, or one changed config value, changes the digest.
    let mut changed = second.to_vec();
    changed[0].1[0] ^= 1;
    save_safetensors(dir.join("b.safetensors"), &changed, metadata).unwrap();
    let flipped = checkpoint_digest(&dir).unwrap();
    assert_ne!(flipped, digest);
    let mut config = config;
    config["rms_norm_eps"] = 1e-5.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    assert_ne!(checkpoint_digest(&dir).unwrap(), flipped);
}

#[test]
fn the_registry_knows_llama_as_a_language_model() {
    use tutela_site_node::models::{ModelFamily, family_of};
    assert_eq!(family_of("llama"), Some(ModelFamily::Language));
    assert_eq!(family_of("mlp"), Some(ModelFamily::Layers));
    assert_eq!(family_of("gpt2"), None);
    assert_eq!(registry::known_language_models(), ["llama"]);
    let err = registry::build("gpt2", &tiny_llama(), Device::Cpu, 0).unwrap_err();
    assert!(err.to_string().contains("known: llama"), "{err}");
}

#[test]
fn a_training_step_lowers_the_loss_and_reaches_every_parameter() {
    let model = LanguageModel::new(&tiny_moe(), Device::Cpu, 8).unwrap();
    let ids = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]).view([2, 6]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 6]);
    let mut opt =
        tch::nn::OptimizerConfig::build(tch::nn::Adam::default(), &model.vs, 1e-2).unwrap();
    let first = model.decoder.loss(&ids, Some(&mask)).unwrap();
    opt.zero_grad();
    first.backward();
    for (name, var) in model.vs.variables() {
        let grad = var.grad();
        assert!(grad.defined(), "{name} has no gradient");
    }
    opt.step();
    let mut last = first.double_value(&[]);
    for _ in 0..20 {
        let loss = model.decoder.loss(&ids, Some(&mask)).unwrap();
        opt.zero_grad();
        loss.backward();
        opt.step();
        last = loss.double_value(&[]);
    }
    assert!(
        last < first.double_value(&[]) * 0.5,
        "{} -> {last}",
        first.double_value(&[])
    );
}

/// A word-level tokenizer.json with `words` as ids 1.. and `[UNK]` as 0 (the CLI reads any
/// Hugging Face tokenizer; this one is small enough to write by hand).
fn word_tokenizer(words: &[&str]) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), (i + 1).into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

#[test]
fn the_node_prints_perplexity_and_generates_from_a_checkpoint_directory() {
    let root = tempfile::tempdir().unwrap();
    let model_dir = root.path().join("model");
    let model = LanguageModel::new(&tiny_llama(), Device::Cpu, 12).unwrap();
    save_checkpoint(&model, &model_dir).unwrap();
    let words = [
        "the", "patient", "was", "seen", "today", "for", "a", "cough",
    ];
    let tokenizer = root.path().join("tokenizer.json");
    std::fs::write(&tokenizer, word_tokenizer(&words).to_string()).unwrap();
    let text = "the patient was seen today for a cough the patient was seen";
    let text_path = root.path().join("notes.txt");
    std::fs::write(&text_path, text).unwrap();
    let ids: Vec<i64> = text
        .split(' ')
        .map(|w| words.iter().position(|x| *x == w).unwrap() as i64 + 1)
        .collect();
    let expected = perplexity(&model.decoder, &ids, 8, 4, Device::Cpu).unwrap();

    let node = env!("CARGO_BIN_EXE_tutela-node");
    let out = Command::new(node)
        .args(["lm", "perplexity", "--window", "8", "--stride", "4"])
        .arg("--model")
        .arg(&model_dir)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--text")
        .arg(&text_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, format!("perplexity = {:.4}\n", expected.perplexity));

    let out = Command::new(node)
        .args([
            "generate",
            "--prompt",
            "the patient",
            "--max-new-tokens",
            "5",
        ])
        .arg("--model")
        .arg(&model_dir)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let greedy = generate(
        &model.decoder,
        &[1, 2],
        Device::Cpu,
        &GenerateOptions {
            max_new_tokens: 5,
            ..Default::default()
        },
    )
    .unwrap();
    // Ids past the tokenizer's words decode to nothing (a WordLevel model has no token for
    // them); the others to their word.
    let continuation: Vec<&str> = greedy
        .iter()
        .filter_map(|&id| match id {
            0 => Some("[UNK]"),
            i if (i as usize) <= words.len() => Some(words[i as usize - 1]),
            _ => None,
        })
        .collect();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("the patient"), "{stdout}");
    assert_eq!(
        stdout
            .trim_start_matches("the patient")
            .split_whitespace()
            .collect::<Vec<_>>(),
        continuation,
        "greedy ids {greedy:?}"
    );

    // A directory without a checkpoint: a clear error, non-zero exit.
    let out = Command::new(node)
        .args(["lm", "perplexity"])
        .arg("--model")
        .arg(root.path().join("nothing"))
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--text")
        .arg(&text_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
}

/// Runs `tutela-node ARGS`; returns (success, stdout, stderr).
fn node(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a new user types first, and the mistakes they make, as issue 17 item 6 writes the
/// commands: `--tokenizer` may be left out when the checkpoint directory holds its
/// tokenizer.json (as `lm pretrain`, `tutela model merge` and Hugging Face directories do);
/// generation stops at the checkpoint's `eos_token_id` by default; and a LoRA adapter's
/// directory, a published `.safetensors` file, another model's tokenizer or a window longer
/// than the model's positions are refused saying what to do instead.
#[test]
fn lm_perplexity_and_generate_take_the_checkpoint_s_tokenizer_and_refuse_mistakes_plainly() {
    use std::ffi::OsStr;
    let root = tempfile::tempdir().unwrap();
    let words = [
        "the", "patient", "was", "seen", "today", "for", "a", "cough",
    ];
    let text = "the patient was seen today for a cough the patient was seen";
    let text_path = root.path().join("notes.txt");
    std::fs::write(&text_path, text).unwrap();
    let ids: Vec<i64> = text
        .split(' ')
        .map(|w| words.iter().position(|x| *x == w).unwrap() as i64 + 1)
        .collect();
    // The checkpoint with its tokenizer beside it, and an eos_token_id in its config.json: the
    // first token greedy decoding picks after "the patient", so a run that stops at it
    // generates exactly that one token.
    let config = tiny_llama();
    let probe = LanguageModel::new(&config, Device::Cpu, 12).unwrap();
    let first = generate(
        &probe.decoder,
        &[1, 2],
        Device::Cpu,
        &GenerateOptions {
            max_new_tokens: 1,
            ..Default::default()
        },
    )
    .unwrap()[0];
    let mut with_eos = config.clone();
    with_eos
        .extra
        .insert("eos_token_id".into(), serde_json::json!(first));
    let model = LanguageModel::new(&with_eos, Device::Cpu, 12).unwrap();
    let model_dir = root.path().join("model");
    save_checkpoint(&model, &model_dir).unwrap();
    std::fs::write(
        model_dir.join("tokenizer.json"),
        word_tokenizer(&words).to_string(),
    )
    .unwrap();
    let expected = perplexity(&model.decoder, &ids, 8, 4, Device::Cpu).unwrap();
    let m = model_dir.as_os_str();
    let t = text_path.as_os_str();
    let o = OsStr::new;

    // No --tokenizer: the directory's.
    let (ok, stdout, stderr) = node(&[
        o("lm"),
        o("perplexity"),
        o("--window"),
        o("8"),
        o("--stride"),
        o("4"),
        o("--model"),
        m,
        o("--text"),
        t,
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, format!("perplexity = {:.4}\n", expected.perplexity));
    // Generation stops after the checkpoint's eos_token_id (one token here), unless told
    // another id.
    let generated = |extra: &[&OsStr]| {
        let mut args = vec![
            o("generate"),
            o("--model"),
            m,
            o("--prompt"),
            o("the patient"),
            o("--max-new-tokens"),
            o("5"),
        ];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = node(&args);
        assert!(ok, "{stderr}");
        stdout
    };
    let word = |id: i64| match id {
        0 => "[UNK]".to_string(),
        i if (i as usize) <= words.len() => words[i as usize - 1].to_string(),
        _ => String::new(),
    };
    assert_eq!(
        generated(&[]).trim_end(),
        format!("the patient {}", word(first)).trim_end()
    );
    let past_eos = generated(&[o("--eos-token-id=-1")]);
    assert!(
        past_eos.split_whitespace().count() >= generated(&[]).split_whitespace().count(),
        "{past_eos}"
    );

    // The likely mistakes, each with what to do.
    let refused = |args: &[&OsStr], says: &[&str]| {
        let (ok, _, stderr) = node(args);
        assert!(!ok, "{args:?} succeeded");
        for s in says {
            assert!(stderr.contains(s), "{args:?}: {stderr}");
        }
    };
    // A window longer than the model's 64 positions.
    refused(
        &[
            o("lm"),
            o("perplexity"),
            o("--window"),
            o("65"),
            o("--model"),
            m,
            o("--text"),
            t,
        ],
        &["max_position_embeddings", "--window 64"],
    );
    // A LoRA adapter's directory.
    let adapter = root.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
    refused(
        &[
            o("generate"),
            o("--model"),
            adapter.as_os_str(),
            o("--prompt"),
            o("the"),
        ],
        &["LoRA adapter", "tutela model merge"],
    );
    // A published model file.
    let file = model_dir.join("model.safetensors");
    refused(
        &[
            o("lm"),
            o("perplexity"),
            o("--model"),
            file.as_os_str(),
            o("--text"),
            t,
        ],
        &["is a file", "tutela model export-adapter"],
    );
    // A directory without its tokenizer, and none given.
    std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
    refused(
        &[o("generate"), o("--model"), m, o("--prompt"), o("the")],
        &["no tokenizer.json", "--tokenizer"],
    );
    // Another model's tokenizer, whose ids pass this model's vocabulary (61 ids).
    let many: Vec<String> = (0..70).map(|i| format!("w{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let big = root.path().join("big-tokenizer.json");
    std::fs::write(&big, word_tokenizer(&many).to_string()).unwrap();
    refused(
        &[
            o("generate"),
            o("--model"),
            m,
            o("--tokenizer"),
            big.as_os_str(),
            o("--prompt"),
            o("w1 w69"),
        ],
        &[
            "token id 70",
            "61 ids",
            "not the tokenizer this model was trained with",
        ],
    );
}
