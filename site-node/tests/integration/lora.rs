//! LoRA adapters: merged = unmerged, B = 0 is the base, per-unit clipped adapter gradients
//! against the per-unit loop (padding, ragged lengths, units of several sequences), the release
//! through DP-SGD's sampler, and PEFT/transformers reading what we write.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, Kind, Tensor};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::accountant::plan::{DpSgdInputs, DpSgdPlan};
use tutela_privacy::noise::SecureRng;
use tutela_protocol::lora::{LoraAggregation, LoraSpec};
use tutela_site_node::dp::{DpSgdStep, PoissonBatchSampler};
use tutela_site_node::lm::lora::dp::{
    AdapterGradientStep, AdapterModel, DpAdapterStep, IGNORE_INDEX, SequenceBatch,
    clipped_adapter_gradient_sum, clipped_adapter_gradient_sum_chunked,
    clipped_adapter_gradient_sum_reference,
};
use tutela_site_node::lm::lora::stack::{LoraStack, LoraStackConfig};
use tutela_site_node::lm::lora::{
    LoraLinear, LoraTape, adapter_update_tensors, load_adapter_update, save_peft_adapter,
};

const VOCAB: i64 = 23;

fn config(train_a: bool) -> LoraStackConfig {
    LoraStackConfig {
        vocab: VOCAB,
        dim: 12,
        layers: 2,
        rank: 3,
        alpha: 6.0,
        train_a,
        kind: Kind::Double,
        device: Device::Cpu,
        seed: 11,
    }
}

fn stack(train_a: bool) -> LoraStack {
    let mut model = LoraStack::new(&config(train_a)).unwrap();
    model.randomize_b(0.3).unwrap();
    model
}

/// Sequences of the given real lengths, right-padded to the longest; `units[s]` is sequence
/// `s`'s unit. Targets are the next token (the last real position and padding take no loss).
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

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-300)
}

#[test]
fn merged_equals_unmerged_and_b_zero_is_the_base() {
    let model = stack(false);
    let batch = sequences(&[7, 5, 7], &[0, 1, 2], 3, 1);
    let unmerged = model.logits(&batch, false, false).unwrap();
    let merged = model.logits(&batch, false, true).unwrap();
    let err = (&unmerged - &merged).abs().max().double_value(&[]);
    assert!(err < 1e-10, "merged and unmerged differ by {err:e}");
    // The adapters do something, or the comparison shows nothing.
    let fresh = LoraStack::new(&config(false)).unwrap();
    let base = fresh.logits(&batch, false, false).unwrap();
    assert!((&base - &unmerged).abs().max().double_value(&[]) > 1e-3);
    // B = 0 at init: the adapted model is the base model, bit for bit.
    assert!(base.equal(&fresh.logits(&batch, false, true).unwrap()));

    let tape = LoraTape::new();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into()],
        dropout: 0.0,
        aggregation: LoraAggregation::Ffa,
    };
    let w = Tensor::randn([5, 9], (Kind::Double, Device::Cpu));
    let bias = Tensor::randn([5], (Kind::Double, Device::Cpu));
    let layer = LoraLinear::new("m.q_proj", &w, Some(&bias), &spec, 3, &tape).unwrap();
    let x = Tensor::randn([2, 4, 9], (Kind::Double, Device::Cpu));
    assert!(
        layer
            .forward_t(&x, true)
            .unwrap()
            .equal(&x.linear(&w, Some(&bias)))
    );
    // A wrong input width is an error, not a panic.
    assert!(
        layer
            .forward_t(&Tensor::zeros([2, 8], (Kind::Double, Device::Cpu)), true)
            .is_err()
    );
    assert_eq!(layer.trainable().len(), 1, "FFA-LoRA trains B only");
    assert!(!layer.a().requires_grad());
    // A is the shared seeded init: another site builds the same bits.
    let again = LoraLinear::new("m.q_proj", &w, Some(&bias), &spec, 3, &tape).unwrap();
    assert!(layer.a().equal(again.a()));
}

/// Compares the batched route with the per-unit loop at a clipping norm chosen so that some
/// units are clipped and (with several) some are not: the median of the nonzero unit norms
/// (half the norm for a single unit).
fn check_against_loop(train_a: bool, lengths: &[i64], units: &[i64], n_units: usize) {
    tch::set_num_threads(1);
    let model = stack(train_a);
    let batch = sequences(lengths, units, n_units, 5 + lengths.len() as i64);
    let unclipped = clipped_adapter_gradient_sum_reference(&model, &batch, f64::INFINITY).unwrap();
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
    let fast = clipped_adapter_gradient_sum(&model, &batch, clip).unwrap();
    let slow = clipped_adapter_gradient_sum_reference(&model, &batch, clip).unwrap();
    let expected_tensors = 3 * if train_a { 2 } else { 1 };
    assert_eq!(fast.parameters.len(), expected_tensors);
    assert_eq!(fast.norms.size(), [n_units as i64]);
    let norms_err = relative_error(&fast.norms, &slow.norms);
    assert!(norms_err < 1e-10, "unit norms differ by {norms_err:e}");
    let clipped = slow.norms.gt(clip).sum(Kind::Int64).int64_value(&[]);
    assert!(
        clipped >= 1,
        "no unit was clipped at C = {clip}: {:?}",
        Vec::<f64>::try_from(&slow.norms)
    );
    if n_units > 1 {
        assert!(
            clipped < n_units as i64,
            "every unit was clipped at C = {clip}"
        );
    }
    let err = relative_error(&fast.flat, &slow.flat);
    eprintln!("{lengths:?} units {units:?} (A trains: {train_a}): relative error {err:e}");
    assert!(
        err < 1e-6,
        "{lengths:?} {units:?}: clipped sums differ by {err:e} (relative)"
    );
    let loss_err = (fast.loss_sum - slow.loss_sum).abs() / slow.loss_sum.abs();
    assert!(loss_err < 1e-10, "losses differ by {loss_err:e}");
}

#[test]
fn clipped_adapter_gradients_equal_the_per_unit_loop() {
    // One sequence.
    check_against_loop(false, &[6], &[0], 1);
    // Ragged lengths, padded, one unit per sequence (document-level).
    check_against_loop(false, &[9, 3, 6, 9, 2], &[0, 1, 2, 3, 4], 5);
    // Patient-level: units of several sequences (not adjacent), and a unit with no sequence.
    check_against_loop(false, &[9, 3, 6, 9, 2, 5], &[2, 0, 2, 1, 0, 2], 4);
}

#[test]
fn clipped_gradients_of_a_and_b_equal_the_per_unit_loop() {
    check_against_loop(true, &[4], &[0], 1);
    check_against_loop(true, &[8, 2, 5, 8], &[1, 0, 1, 2], 3);
}

fn plan(clip: f64, sigma: f64, dimension: usize) -> DpSgdPlan {
    DpSgdPlan::new(&DpSgdInputs {
        rows: 100,
        batch_size: 4,
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
fn the_dp_step_releases_the_clipped_sum_with_the_projects_noise() {
    tch::set_num_threads(1);
    let model = stack(false);
    let batch = sequences(&[9, 3, 6, 9], &[0, 1, 1, 2], 3, 9);
    let clip = 1.0;
    let dimension: i64 = model
        .adapter_parameters()
        .iter()
        .map(|p| p.numel() as i64)
        .sum();
    let p = plan(clip, 0.7, dimension as usize);
    let seed = [3u8; 32];
    let mut step = DpAdapterStep::new(
        clip,
        DpSgdStep::with_rng(&p, SecureRng::insecure_from_seed(seed)).unwrap(),
    );
    assert!(step.overwrites_gradients());
    let expected_units = 4;
    step.compute_gradients(&model, &batch, expected_units)
        .unwrap();
    assert_eq!(step.steps_taken(), 1);
    let released = Tensor::cat(
        &model
            .adapter_parameters()
            .iter()
            .map(|p| p.grad().reshape([-1]))
            .collect::<Vec<_>>(),
        0,
    );
    // The same release by DP-SGD's own step, from the same generator, of the loop's clipped sum.
    let reference = clipped_adapter_gradient_sum_reference(&model, &batch, clip).unwrap();
    let mut same = DpSgdStep::with_rng(&p, SecureRng::insecure_from_seed(seed)).unwrap();
    let expected = same.privatize(&reference.flat).unwrap() / expected_units as f64;
    let err = relative_error(&released, &expected);
    assert!(
        err < 1e-9,
        "released gradients differ from the reference release by {err:e}"
    );
    // The noise is there: the release is not the clipped sum.
    assert!(relative_error(&released, &(&reference.flat / expected_units as f64)) > 0.1);

    // An empty Poisson batch is still a step: noise only.
    let empty = sequences(&[3], &[0], 1, 1);
    let empty = SequenceBatch {
        input_ids: empty.input_ids.narrow(0, 0, 0),
        targets: empty.targets.narrow(0, 0, 0),
        mask: empty.mask.narrow(0, 0, 0),
        units: vec![],
        n_units: 0,
    };
    step.compute_gradients(&model, &empty, expected_units)
        .unwrap();
    assert_eq!(step.steps_taken(), 2);
}

#[test]
fn bad_batches_are_refused() {
    let model = stack(false);
    let mut batch = sequences(&[4, 2], &[0, 1], 2, 2);
    batch.units = vec![0, 2];
    let err = clipped_adapter_gradient_sum(&model, &batch, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unit index 2"), "{err}");
    batch.units = vec![0];
    let err = clipped_adapter_gradient_sum(&model, &batch, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 sequences but 1 unit"), "{err}");
}

fn python() -> PathBuf {
    std::env::var_os("TUTELA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

pub(crate) fn run_python(script: &str, args: &[&Path]) -> String {
    let python = python();
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); set TUTELA_PYTHON", python.display()));
    assert!(
        output.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A tiny random Llama (GQA, untied head) written by transformers, with a large init so that a
/// wrong merge shows (STACK.md pitfall 9).
pub(crate) const MAKE_BASE: &str = r#"
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=False, initializer_range=0.15)
model = LlamaForCausalLM(config).to(torch.float32)
model.save_pretrained(sys.argv[1], safe_serialization=True)
"#;

/// Imports torch, transformers' `AutoModelForCausalLM` and peft's `PeftModel`.
///
/// The shared virtualenv has peft (installed `--no-deps`) but not `accelerate`, which peft
/// imports at module level and never calls on this CPU path: the script stubs it (after
/// transformers is imported, whose version check would otherwise look for its metadata).
pub(crate) const PEFT_IMPORT: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM
import sys, types, importlib.abc, importlib.machinery
class _Stub(types.ModuleType):
    __version__ = "1.10.0"
    __path__ = []
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.startswith("is_") and name.endswith("_available"):
            return lambda *a, **k: False
        def stub(*a, **k):
            raise RuntimeError(f"accelerate.{name} is a test stub")
        return type(name, (), {"__init__": stub}) if name[:1].isupper() else stub
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "accelerate" or fullname.startswith("accelerate."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    def create_module(self, spec):
        return _Stub(spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Finder())
from peft import PeftModel
"#;

/// After [`PEFT_IMPORT`]: loads our adapter with peft, compares its unmerged logits with the
/// logits of our merged checkpoint, and peft's `merge_and_unload()` weights with ours.
const CHECK_WITH_PEFT: &str = r#"
from safetensors.torch import load_file
base_dir, adapter_dir, merged_dir = sys.argv[1:4]
torch.manual_seed(1)
ids = torch.randint(0, 64, (2, 9))
base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
base_logits = base(ids).logits
peft_model = PeftModel.from_pretrained(base, adapter_dir)
peft_model.eval()
with torch.no_grad():
    adapted = peft_model(ids).logits
assert (adapted - base_logits).abs().max() > 1e-3, "the adapter changed nothing"
ours = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32)
with torch.no_grad():
    ours_logits = ours(ids).logits
logit_err = (ours_logits - adapted).abs().max().item()
merged = peft_model.merge_and_unload()
theirs = {k: v for k, v in merged.state_dict().items()}
mine = load_file(merged_dir + "/model.safetensors")
weight_err = 0.0
for name, t in mine.items():
    weight_err = max(weight_err, (t - theirs[name]).abs().max().item())
print(f"logits {logit_err:.3e} weights {weight_err:.3e} tensors {len(mine)}")
assert logit_err < 1e-4, logit_err
assert weight_err < 1e-6, weight_err
"#;

#[test]
fn peft_loads_our_adapter_and_our_merge_equals_merge_and_unload() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let adapter = dir.path().join("adapter");
    let merged = dir.path().join("merged");
    run_python(MAKE_BASE, &[&base]);

    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        dropout: 0.0,
        aggregation: LoraAggregation::Ffa,
    };
    let tape = LoraTape::new();
    let mut layers = Vec::new();
    let mut names: Vec<&str> = st.names();
    names.sort();
    for name in names {
        let Some(path) = name.strip_suffix(".weight") else {
            continue;
        };
        if !spec.targets(path) {
            continue;
        }
        let view = st.tensor(name).unwrap();
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let w = Tensor::from_slice(&values).view(shape.as_slice());
        let mut layer = LoraLinear::new(path, &w, None, &spec, 42, &tape).unwrap();
        // A trained B (random here): a zero B would make every comparison trivially pass.
        let b = layer.b().randn_like() * 0.2;
        layer.set_factors(&b, None).unwrap();
        layers.push(layer);
    }
    assert_eq!(layers.len(), 6, "2 layers × q_proj, v_proj, down_proj");
    save_peft_adapter(&adapter, &layers.iter().collect::<Vec<_>>(), &spec).unwrap();
    let report = tutela_protocol::checkpoint::merge_lora(&base, &adapter, &merged).unwrap();
    assert_eq!(report.merged_modules, 6);
    let out = run_python(
        &format!("{PEFT_IMPORT}{CHECK_WITH_PEFT}"),
        &[&base, &adapter, &merged],
    );
    eprintln!("{out}");

    // Our merge is also our own layer's merged weight.
    let merged_bytes = std::fs::read(merged.join("model.safetensors")).unwrap();
    let merged_st = safetensors::SafeTensors::deserialize(&merged_bytes).unwrap();
    for layer in &layers {
        let view = merged_st
            .tensor(&format!("{}.weight", layer.path()))
            .unwrap();
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let ours = Vec::<f32>::try_from(layer.merged_weight().unwrap().reshape([-1])).unwrap();
        let err = values
            .iter()
            .zip(&ours)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-6, "{}: {err}", layer.path());
    }
}

#[test]
fn only_b_travels_under_ffa_and_an_update_loads_back_exactly() {
    let mut sender = stack(false);
    let update = adapter_update_tensors(&sender.lora_layers()).unwrap();
    assert_eq!(update.len(), 3);
    assert!(
        update
            .iter()
            .all(|(s, _)| s.name.ends_with(".lora_B.weight")),
        "{update:?}"
    );
    assert_eq!(update[2].0.name, "base_model.model.lm_head.lora_B.weight");
    let mut receiver = LoraStack::new(&config(false)).unwrap();
    {
        let mut layers = receiver.lora_layers_mut();
        load_adapter_update(&mut layers, &update).unwrap();
    }
    for (a, b) in sender.lora_layers().iter().zip(receiver.lora_layers()) {
        assert!(
            a.b()
                .to_kind(Kind::Float)
                .equal(&b.b().to_kind(Kind::Float))
        );
    }
    // A missing or misnamed tensor is refused and nothing is written.
    let before = receiver.lora_layers()[0].b().copy();
    let mut short = update.clone();
    short[0].0.name = "base_model.model.x.lora_B.weight".into();
    let err = load_adapter_update(&mut receiver.lora_layers_mut(), &short)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    assert!(receiver.lora_layers()[0].b().equal(&before));
    // With A trained, A travels too.
    sender = stack(true);
    assert_eq!(
        adapter_update_tensors(&sender.lora_layers()).unwrap().len(),
        6
    );
}

#[test]
fn poisson_sampled_units_become_a_padded_batch_clipped_unit_by_unit() {
    tch::set_num_threads(1);
    // Six patients with ragged token windows (one window too short to train on).
    let units: Vec<Vec<Vec<i64>>> = vec![
        vec![vec![1, 2, 3, 4, 5], vec![6, 7]],
        vec![vec![8, 9, 10]],
        vec![vec![11], vec![12, 13, 14, 15, 16, 17, 18]],
        vec![vec![19, 20, 21, 22]],
        vec![vec![3, 1, 4, 1, 5, 9], vec![2, 6, 5], vec![3, 5]],
        vec![vec![8, 9, 7, 9]],
    ];
    let mut sampler =
        PoissonBatchSampler::with_rng(units.len(), 3, SecureRng::insecure_from_seed([9; 32]))
            .unwrap();
    let sampled = (0..20)
        .map(|_| sampler.next_batch())
        .find(|b| b.len() >= 3)
        .expect("a batch of at least 3 units in 20 draws at q = 1/2");
    let batch = SequenceBatch::from_units(&units, &sampled, 0, Kind::Double, Device::Cpu).unwrap();
    let windows: usize = sampled
        .iter()
        .map(|&u| units[u].iter().filter(|w| w.len() >= 2).count())
        .sum();
    assert_eq!(batch.sequences() as usize, windows);
    assert_eq!(batch.n_units, sampled.len());
    let longest = sampled
        .iter()
        .flat_map(|&u| units[u].iter().map(|w| w.len() as i64 - 1))
        .max()
        .unwrap();
    assert_eq!(batch.input_ids.size(), [windows as i64, longest]);
    // Row 0 is the first window of the first sampled unit: inputs w[..n-1], targets w[1..].
    let first = units[sampled[0]].iter().find(|w| w.len() >= 2).unwrap();
    let n = first.len() as i64 - 1;
    assert_eq!(
        Vec::<i64>::try_from(batch.input_ids.get(0).narrow(0, 0, n)).unwrap(),
        first[..first.len() - 1]
    );
    assert_eq!(
        Vec::<i64>::try_from(batch.targets.get(0).narrow(0, 0, n)).unwrap(),
        first[1..]
    );
    assert_eq!(
        batch.mask.sum(Kind::Double).double_value(&[]) as i64,
        batch
            .targets
            .ne(IGNORE_INDEX)
            .sum(Kind::Int64)
            .int64_value(&[])
    );

    let model = stack(false);
    // Clip at the median unit norm, so that some units are clipped and some not.
    let unclipped = clipped_adapter_gradient_sum_reference(&model, &batch, f64::INFINITY).unwrap();
    let mut norms = Vec::<f64>::try_from(&unclipped.norms).unwrap();
    norms.sort_by(f64::total_cmp);
    let clip = norms[norms.len() / 2] * 0.999;
    let fast = clipped_adapter_gradient_sum(&model, &batch, clip).unwrap();
    let slow = clipped_adapter_gradient_sum_reference(&model, &batch, clip).unwrap();
    let clipped = slow.norms.gt(clip).sum(Kind::Int64).int64_value(&[]);
    assert!(
        clipped >= 1 && clipped < sampled.len() as i64,
        "{clipped} of {} clipped",
        sampled.len()
    );
    let err = relative_error(&fast.flat, &slow.flat);
    assert!(
        err < 1e-6,
        "sampled patients: clipped sums differ by {err:e}"
    );

    // Clipping a few units at a time releases the same sum (units 0..n in slices of 2).
    for chunk in [1, 2] {
        let sliced = clipped_adapter_gradient_sum_chunked(&model, &batch, clip, chunk).unwrap();
        let err = relative_error(&sliced.flat, &fast.flat);
        assert!(err < 1e-12, "slices of {chunk} units differ by {err:e}");
        assert!(relative_error(&sliced.norms, &fast.norms) < 1e-12);
    }

    let err = SequenceBatch::from_units(&units, &[7], 0, Kind::Double, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sampled unit 7"), "{err}");
}

#[test]
fn dp_lora_training_on_sampled_units_lowers_the_loss() {
    use tch::nn::OptimizerConfig;
    tch::set_num_threads(1);
    // 40 documents that follow one rule (next token = token + 3 mod 23), ragged lengths.
    let units: Vec<Vec<Vec<i64>>> = (0..40)
        .map(|d| {
            let len = 6 + d % 7;
            vec![(0..len).map(|i| (d + 3 * i) % VOCAB).collect()]
        })
        .collect();
    let all: Vec<usize> = (0..units.len()).collect();
    let everything = SequenceBatch::from_units(&units, &all, 0, Kind::Double, Device::Cpu).unwrap();
    let model = LoraStack::new(&config(false)).unwrap();
    let mean_loss = |model: &LoraStack| {
        tch::no_grad(|| {
            model
                .sequence_losses(&everything, false)
                .unwrap()
                .sum(Kind::Double)
                .double_value(&[])
        }) / everything
            .targets
            .ne(IGNORE_INDEX)
            .sum(Kind::Int64)
            .int64_value(&[]) as f64
    };
    let before = mean_loss(&model);
    let parameters = model.adapter_parameters();
    let dimension: i64 = parameters.iter().map(|p| p.numel() as i64).sum();
    let expected_units = 8;
    let p = DpSgdPlan::new(&DpSgdInputs {
        rows: units.len(),
        batch_size: expected_units,
        epochs_per_round: 1,
        rounds: 1,
        clip: 1.0,
        dimension: dimension as usize,
        target_epsilon: None,
        noise_multiplier: Some(0.5),
        delta: 1e-5,
        accountant: Accountant::Rdp,
        metrics: None,
    })
    .unwrap();
    // Clipped three units at a time (the same release, less memory).
    let mut step = DpAdapterStep::new(p.clip, DpSgdStep::new(&p).unwrap()).with_units_per_chunk(3);
    let mut sampler = PoissonBatchSampler::new(units.len(), expected_units).unwrap();
    let mut adam = tch::nn::Adam::default().build_copt(0.05).unwrap();
    for p in &parameters {
        adam.add_parameters(p, 0).unwrap();
    }
    for _ in 0..60 {
        let sampled = sampler.next_batch();
        let batch =
            SequenceBatch::from_units(&units, &sampled, 0, Kind::Double, Device::Cpu).unwrap();
        step.compute_gradients(&model, &batch, expected_units)
            .unwrap();
        adam.step().unwrap();
    }
    assert_eq!(
        step.steps_taken(),
        60,
        "every step, empty batches included, is counted"
    );
    let after = mean_loss(&model);
    eprintln!("mean token loss {before:.3} -> {after:.3}");
    assert!(
        after < 0.7 * before,
        "DP-LoRA did not learn: {before} -> {after}"
    );
    // Only the adapters moved: A is the shared init still.
    let fresh = LoraStack::new(&config(false)).unwrap();
    for (a, b) in model.lora_layers().iter().zip(fresh.lora_layers()) {
        assert!(a.a().equal(b.a()));
    }
}

#[test]
fn the_node_reads_the_lora_section_strictly_and_only_for_language_models() {
    use tutela_site_node::jobspec::{JobSpecError, JobView};
    const EXAMPLE: &str = include_str!("../../../deploy/jobs/notes_lora_dp.toml");
    let key = |text: &str| match JobView::from_toml_str(text) {
        Err(JobSpecError::Invalid { key, .. }) => key,
        other => panic!("expected a refusal naming a key, got {other:?}"),
    };
    assert_eq!(
        key(&EXAMPLE.replace("dropout = 0.0", "dropout = 0.1")),
        "lora.dropout"
    );
    assert_eq!(key(&EXAMPLE.replace("rank = 8", "rank = 0")), "lora.rank");
    // A valid [lora] section on a language model is read.
    let view = JobView::from_toml_str(EXAMPLE).unwrap();
    assert_eq!(view.lora.map(|l| l.rank), Some(8));
    // On a layer network it is refused: that round would train every weight of a model the
    // officers approved for adapters only.
    assert_eq!(
        key(&EXAMPLE.replace("name = \"llama\"", "name = \"mlp\"")),
        "lora"
    );
    // Unknown keys in [lora] are errors, not ignored.
    assert!(matches!(
        JobView::from_toml_str(&EXAMPLE.replace("rank = 8", "rank = 8\nrnak = 8")),
        Err(JobSpecError::Toml(_))
    ));
}
