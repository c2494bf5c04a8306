//! LoRA inside the `llama` decoder: B = 0 is the base exactly, merged = unmerged in f64, the
//! decoder's clipped per-unit adapter gradients against the per-unit loop (padding, ragged
//! lengths, patients with several sequences, batches of one), targets refused by name, and PEFT
//! reading our adapter of a transformers Llama with the same logits.

use tch::{Device, Kind, Tensor};
use tutela_protocol::lora::{LoraAggregation, LoraSpec};
use tutela_site_node::lm::config::{Architecture, DecoderConfig, MoeConfig};
use tutela_site_node::lm::error::LmError;
use tutela_site_node::lm::hf::{load_checkpoint, save_checkpoint};
use tutela_site_node::lm::llama::LanguageModel;
use tutela_site_node::lm::lora::dp::{
    AdapterModel, IGNORE_INDEX, SequenceBatch, clipped_adapter_gradient_sum,
    clipped_adapter_gradient_sum_reference,
};

use crate::lora::{MAKE_BASE, PEFT_IMPORT, run_python};

const VOCAB: i64 = 61;
const ALL: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn config() -> DecoderConfig {
    let mut config = DecoderConfig::llama(VOCAB as usize, 32, 48, 2, 4, 2);
    config.initializer_range = 0.15;
    config.max_position_embeddings = 64;
    config
}

fn spec(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        dropout: 0.0,
        aggregation: LoraAggregation::Ffa,
    }
}

/// A tiny f64 decoder with adapters on `targets` and random `B` (so the adapters do something).
fn adapted(targets: &[&str], train_a: bool) -> LanguageModel {
    let mut model = LanguageModel::new(&config(), Device::Cpu, 7).unwrap();
    model.vs.set_kind(Kind::Double);
    model.attach_lora_with(&spec(targets), 42, train_a).unwrap();
    tch::manual_seed(3);
    for layer in model.decoder.lora_layers_mut() {
        let b = layer.b().randn_like() * 0.3;
        layer.set_factors(&b, None).unwrap();
    }
    model
}

/// Sequences of the given real lengths, right-padded; `units[s]` is sequence `s`'s unit.
fn sequences(lengths: &[i64], units: &[i64], n_units: usize, seed: i64) -> SequenceBatch {
    tch::manual_seed(seed);
    let s = lengths.len() as i64;
    let t = *lengths.iter().max().unwrap();
    let ids = Tensor::randint(VOCAB, [s, t + 1], (Kind::Int64, Device::Cpu));
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let lens = Tensor::from_slice(lengths).unsqueeze(1);
    let real = positions.lt_tensor(&lens);
    let has_target = positions.lt_tensor(&(&lens - 1));
    let input_ids = ids
        .narrow(1, 0, t)
        .where_self(&real, &Tensor::zeros_like(&real).to_kind(Kind::Int64));
    let next = ids.narrow(1, 1, t);
    let targets = next.where_self(&has_target, &Tensor::full_like(&next, IGNORE_INDEX));
    SequenceBatch {
        input_ids,
        targets,
        mask: real.to_kind(Kind::Double),
        units: units.to_vec(),
        n_units,
    }
}

fn logits(model: &LanguageModel, batch: &SequenceBatch) -> Tensor {
    model
        .decoder
        .forward(&batch.input_ids, Some(&batch.mask), None)
        .unwrap()
        .logits
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-300)
}

#[test]
fn b_zero_is_the_base_exactly_and_merged_equals_unmerged_in_f64() {
    let batch = sequences(&[9, 4, 7], &[0, 1, 2], 3, 1);
    let mut base = LanguageModel::new(&config(), Device::Cpu, 7).unwrap();
    base.vs.set_kind(Kind::Double);
    let base_logits = logits(&base, &batch);
    let mut targets = ALL.to_vec();
    targets.push("lm_head");
    base.attach_lora(&spec(&targets), 42).unwrap();
    assert_eq!(base.decoder.lora_layers().len(), 2 * 7 + 1);
    // B = 0: the adapted model is the base, bit for bit.
    assert!(logits(&base, &batch).equal(&base_logits));
    // The base is frozen: only B trains.
    assert!(base.vs.variables().values().all(|v| !v.requires_grad()));
    assert_eq!(base.adapter_parameters().len(), 15);

    let model = adapted(&targets, false);
    let unmerged = logits(&model, &batch);
    assert!(
        (&unmerged - &base_logits).abs().max().double_value(&[]) > 1e-3,
        "the adapters changed nothing"
    );
    let merged_model = model.merged().unwrap();
    assert!(merged_model.decoder.lora_layers().is_empty());
    let merged = logits(&merged_model, &batch);
    let err = (&unmerged - &merged).abs().max().double_value(&[]);
    assert!(err < 1e-10, "merged and unmerged differ by {err:e}");
    // A second attach is refused.
    let mut again = adapted(&["q_proj"], false);
    assert!(again.attach_lora(&spec(&["v_proj"]), 1).is_err());
}

/// The decoder's batched clipped sum against the per-unit loop at a clip that clips some
/// units and not others.
fn check_against_loop(train_a: bool, lengths: &[i64], units: &[i64], n_units: usize) {
    tch::set_num_threads(1);
    let model = adapted(&["q_proj", "v_proj", "o_proj", "down_proj"], train_a);
    let batch = sequences(lengths, units, n_units, 5 + lengths.len() as i64);
    let unclipped =
        clipped_adapter_gradient_sum_reference(&model.decoder, &batch, f64::INFINITY).unwrap();
    let mut norms: Vec<f64> = Vec::<f64>::try_from(&unclipped.norms)
        .unwrap()
        .into_iter()
        .filter(|&n| n > 0.0)
        .collect();
    norms.sort_by(f64::total_cmp);
    let clip = if norms.len() == 1 {
        norms[0] / 2.0
    } else {
        norms[norms.len() / 2] * 0.999
    };
    let fast = clipped_adapter_gradient_sum(&model.decoder, &batch, clip).unwrap();
    let slow = clipped_adapter_gradient_sum_reference(&model.decoder, &batch, clip).unwrap();
    assert_eq!(
        fast.parameters.len(),
        2 * 4 * if train_a { 2 } else { 1 },
        "2 layers × 4 adapted projections"
    );
    let clipped = slow.norms.gt(clip).sum(Kind::Int64).int64_value(&[]);
    assert!(clipped >= 1, "no unit was clipped at C = {clip}");
    if n_units > 1 {
        assert!(clipped < n_units as i64, "every unit was clipped");
    }
    let norms_err = relative_error(&fast.norms, &slow.norms);
    assert!(norms_err < 1e-9, "unit norms differ by {norms_err:e}");
    let err = relative_error(&fast.flat, &slow.flat);
    eprintln!("decoder {lengths:?} units {units:?} (A trains: {train_a}): relative error {err:e}");
    assert!(err < 1e-6, "clipped sums differ by {err:e} (relative)");
    let loss_err = (fast.loss_sum - slow.loss_sum).abs() / slow.loss_sum.abs();
    assert!(loss_err < 1e-9, "losses differ by {loss_err:e}");
}

#[test]
fn decoder_clipped_adapter_gradients_equal_the_per_unit_loop() {
    // A batch of one.
    check_against_loop(false, &[6], &[0], 1);
    // Ragged lengths, padded, one unit per sequence (documents).
    check_against_loop(false, &[9, 3, 6, 9, 2], &[0, 1, 2, 3, 4], 5);
    // Patients: units of several sequences (not adjacent), and a unit with no sequence.
    check_against_loop(false, &[9, 3, 6, 9, 2, 5], &[2, 0, 2, 1, 0, 2], 4);
    // Both factors trained.
    check_against_loop(true, &[8, 2, 5, 8], &[1, 0, 1, 2], 3);
}

#[test]
fn targets_that_match_nothing_or_experts_are_refused_by_name() {
    let mut model = LanguageModel::new(&config(), Device::Cpu, 1).unwrap();
    let err = model
        .attach_lora(&spec(&["q_proj", "qkv_proj"]), 1)
        .unwrap_err();
    assert!(
        matches!(&err, LmError::InvalidConfig(m) if m.contains("lora.target_modules[1]")),
        "{err}"
    );
    // Nothing changed on the refusal: the model still trains every weight.
    assert!(model.decoder.lora_layers().is_empty());
    assert!(model.vs.variables().values().all(|v| v.requires_grad()));
    // A tied head has no lm_head module.
    let mut tied = config();
    tied.tie_word_embeddings = true;
    let mut model = LanguageModel::new(&tied, Device::Cpu, 1).unwrap();
    let err = model.attach_lora(&spec(&["lm_head"]), 1).unwrap_err();
    assert!(err.to_string().contains("lora.target_modules[0]"), "{err}");

    let mut moe = config();
    moe.architecture = Architecture::Qwen2Moe;
    moe.moe = Some(MoeConfig {
        num_experts: 4,
        num_experts_per_tok: 2,
        moe_intermediate_size: 16,
        shared_expert_intermediate_size: 24,
        norm_topk_prob: false,
        decoder_sparse_step: 1,
        mlp_only_layers: vec![],
        router_aux_loss_coef: 0.001,
    });
    let mut model = LanguageModel::new(&moe, Device::Cpu, 1).unwrap();
    let err = model
        .attach_lora(&spec(&["q_proj", "up_proj"]), 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora.target_modules[1]") && err.contains("mlp.experts.0.up_proj"),
        "{err}"
    );
    // Attention of a mixture-of-experts model can be adapted.
    model.attach_lora(&spec(&["q_proj", "v_proj"]), 1).unwrap();
    assert_eq!(model.decoder.lora_layers().len(), 4);
}

/// After [`PEFT_IMPORT`]: loads the base and our adapter with peft and writes peft's logits on
/// fixed ids, with the ids, to `argv[3]`.
const PEFT_LOGITS: &str = r#"
from safetensors.torch import save_file
base_dir, adapter_dir, out = sys.argv[1:4]
torch.manual_seed(1)
ids = torch.randint(0, 64, (3, 11))
base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
with torch.no_grad():
    base_logits = base(ids).logits
model = PeftModel.from_pretrained(base, adapter_dir)
model.eval()
with torch.no_grad():
    logits = model(ids).logits
assert (logits - base_logits).abs().max() > 1e-3, "the adapter changed nothing"
save_file({"ids": ids, "logits": logits.contiguous()}, out)
"#;

#[test]
fn peft_gives_our_adapted_decoders_logits_and_our_saved_adapter_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("base");
    let adapter_dir = dir.path().join("adapter");
    let out = dir.path().join("peft_logits.safetensors");
    run_python(MAKE_BASE, &[&base_dir]);
    let mut model = load_checkpoint(&base_dir, Device::Cpu, Kind::Float).unwrap();
    model.attach_lora(&spec(ALL), 42).unwrap();
    tch::manual_seed(11);
    for layer in model.decoder.lora_layers_mut() {
        let b = layer.b().randn_like() * 0.2;
        layer.set_factors(&b, None).unwrap();
    }
    model.decoder.save_adapter(&adapter_dir).unwrap();
    run_python(
        &format!("{PEFT_IMPORT}{PEFT_LOGITS}"),
        &[&base_dir, &adapter_dir, &out],
    );
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let ours = model
        .decoder
        .forward(&reference["ids"], None, None)
        .unwrap()
        .logits;
    let err = (&ours - &reference["logits"]).abs().max().double_value(&[]);
    eprintln!("adapted decoder vs peft: max logit difference {err:e}");
    assert!(err < 1e-4, "our adapted logits differ from peft's by {err}");

    // The merged checkpoint we write gives the same logits in our own loader.
    let merged_dir = dir.path().join("merged");
    save_checkpoint(&model.merged().unwrap(), &merged_dir).unwrap();
    let merged = load_checkpoint(&merged_dir, Device::Cpu, Kind::Float).unwrap();
    let merged_logits = merged
        .decoder
        .forward(&reference["ids"], None, None)
        .unwrap()
        .logits;
    assert!(
        (&merged_logits - &reference["logits"])
            .abs()
            .max()
            .double_value(&[])
            < 1e-4
    );

    // Our adapter loads back into a fresh adapted base: the same logits.
    let mut fresh = load_checkpoint(&base_dir, Device::Cpu, Kind::Float).unwrap();
    fresh.attach_lora(&spec(ALL), 42).unwrap();
    fresh.decoder.load_adapter(&adapter_dir).unwrap();
    let again = fresh
        .decoder
        .forward(&reference["ids"], None, None)
        .unwrap()
        .logits;
    assert!(again.equal(&ours));
}
