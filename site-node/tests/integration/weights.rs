//! Weights ↔ wire tensors ↔ safetensors files, bit for bit, and refusals that name the tensor.

use std::collections::BTreeMap;
use std::process::Command;

use tch::Device;
use tutela_protocol::tensor::{DType, TensorSpec};
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::weights::{
    WeightsError, delta, export_weights, f32_values, load_safetensors, load_weights,
    save_safetensors,
};

use crate::common::python;

fn cnn(seed: u64) -> Model {
    let spec = ModelSpec::new(vec![1, 28, 28], 10)
        .with_conv_channels([4, 8])
        .with_hidden(vec![16]);
    Model::new("cnn", spec, Device::Cpu, seed).unwrap()
}

#[test]
fn export_is_sorted_little_endian_f32() {
    let model = cnn(1);
    let weights = export_weights(model.var_store()).unwrap();
    let names: Vec<&str> = weights.iter().map(|(s, _)| s.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for (spec, bytes) in &weights {
        assert_eq!(spec.dtype, DType::F32);
        assert_eq!(bytes.len() as u64, spec.byte_len().unwrap());
    }
    // The bytes are the tensor's values: compare one with libtorch's own reading.
    let (spec, bytes) = &weights[0];
    let first = f32::from_le_bytes(bytes[..4].try_into().unwrap());
    let variables = model.var_store().variables();
    let tensor = variables[&spec.name].flatten(0, -1);
    assert_eq!(first, tensor.double_value(&[0]) as f32);
}

#[test]
fn weights_round_trip_bit_exactly_through_load() {
    let source = export_weights(cnn(1).var_store()).unwrap();
    let mut target = cnn(2);
    assert_ne!(export_weights(target.var_store()).unwrap(), source);
    // Order does not matter on load.
    let mut shuffled = source.clone();
    shuffled.reverse();
    load_weights(target.var_store_mut(), &shuffled).unwrap();
    assert_eq!(export_weights(target.var_store()).unwrap(), source);
}

#[test]
fn weights_round_trip_bit_exactly_through_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let weights = export_weights(cnn(3).var_store()).unwrap();
    let metadata: BTreeMap<String, String> = [
        ("model".to_string(), "cnn".to_string()),
        ("round".to_string(), "7".to_string()),
    ]
    .into();
    save_safetensors(&path, &weights, metadata.clone()).unwrap();
    let (read, read_metadata) = load_safetensors(&path).unwrap();
    assert_eq!(read, weights);
    assert_eq!(read_metadata, metadata);

    let mut model = cnn(4);
    load_weights(model.var_store_mut(), &read).unwrap();
    assert_eq!(export_weights(model.var_store()).unwrap(), weights);
}

#[test]
fn pythons_safetensors_reads_and_rewrites_our_files() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.safetensors");
    let theirs = dir.path().join("theirs.safetensors");
    let weights = export_weights(cnn(5).var_store()).unwrap();
    save_safetensors(&ours, &weights, [("model".into(), "cnn".into())].into()).unwrap();

    let script = r#"
import sys
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
tensors = load_file(sys.argv[1])
with safe_open(sys.argv[1], "np") as f:
    metadata = f.metadata()
for name in sorted(tensors):
    t = tensors[name]
    print(name, t.dtype, "x".join(map(str, t.shape)))
save_file(tensors, sys.argv[2], metadata=metadata)
"#;
    let python = python();
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&ours)
        .arg(&theirs)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/setup-torch.sh or set TUTELA_PYTHON",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listing = String::from_utf8(output.stdout).unwrap();
    let expected: String = weights
        .iter()
        .map(|(s, _)| {
            let shape: Vec<String> = s.shape.iter().map(u64::to_string).collect();
            format!("{} float32 {}\n", s.name, shape.join("x"))
        })
        .collect();
    assert_eq!(listing, expected);

    let (back, metadata) = load_safetensors(&theirs).unwrap();
    assert_eq!(back, weights, "python's rewrite holds the same bits");
    assert_eq!(metadata.get("model").map(String::as_str), Some("cnn"));
}

#[test]
fn shape_mismatch_is_refused_with_the_tensors_name_and_nothing_is_loaded() {
    let mut weights = export_weights(cnn(1).var_store()).unwrap();
    let mut target = cnn(2);
    let before = export_weights(target.var_store()).unwrap();

    // Corrupt the last tensor in name order, so every other tensor passed its checks first.
    let last = weights.len() - 1;
    let spec = &mut weights[last].0;
    assert_eq!(spec.name, "out.weight");
    spec.shape = vec![16, 10];
    let err = load_weights(target.var_store_mut(), &weights).unwrap_err();
    assert!(matches!(err, WeightsError::ShapeMismatch { .. }));
    let message = err.to_string();
    assert!(message.contains("\"out.weight\""), "{message}");
    assert!(
        message.contains("[10, 16]") && message.contains("[16, 10]"),
        "{message}"
    );
    assert_eq!(
        export_weights(target.var_store()).unwrap(),
        before,
        "a refused load leaves the model as it was"
    );

    // Right shape, wrong number of bytes.
    weights[last].0.shape = vec![10, 16];
    weights[last].1.pop();
    let err = load_weights(target.var_store_mut(), &weights).unwrap_err();
    assert!(matches!(err, WeightsError::ByteLength { .. }), "{err}");
    assert!(err.to_string().contains("\"out.weight\""), "{err}");
}

#[test]
fn missing_extra_and_mistyped_tensors_are_named() {
    let weights = export_weights(cnn(1).var_store()).unwrap();
    let mut target = cnn(2);

    let mut renamed = weights.clone();
    renamed[0].0.name = "conv1.gamma".into();
    let err = load_weights(target.var_store_mut(), &renamed).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("conv1.bias") && message.contains("conv1.gamma"),
        "{message}"
    );

    let mut retyped = weights.clone();
    retyped[1].0.dtype = DType::I32;
    let err = load_weights(target.var_store_mut(), &retyped).unwrap_err();
    assert!(matches!(err, WeightsError::DTypeMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{:?}", weights[1].0.name))
    );

    let mut doubled = weights.clone();
    doubled.push(weights[0].clone());
    let err = load_weights(target.var_store_mut(), &doubled).unwrap_err();
    assert!(matches!(err, WeightsError::DuplicateName { .. }), "{err}");

    let mlp = Model::new("mlp", ModelSpec::new(vec![784], 10), Device::Cpu, 0).unwrap();
    let err = load_weights(
        target.var_store_mut(),
        &export_weights(mlp.var_store()).unwrap(),
    );
    assert!(matches!(err, Err(WeightsError::NameMismatch { .. })));
}

#[test]
fn delta_is_local_minus_global() {
    let global = export_weights(cnn(1).var_store()).unwrap();
    let local = export_weights(cnn(2).var_store()).unwrap();
    let update = delta(&local, &global).unwrap();
    for (((spec, d), (_, l)), (_, g)) in update.iter().zip(&local).zip(&global) {
        let d = f32_values(spec, d).unwrap();
        let l = f32_values(spec, l).unwrap();
        let g = f32_values(spec, g).unwrap();
        for i in 0..d.len() {
            assert_eq!(d[i], l[i] - g[i]);
        }
    }
    let zero = delta(&global, &global).unwrap();
    assert!(zero.iter().all(|(_, b)| b.iter().all(|&x| x == 0)));

    let mut other = global.clone();
    other[0].0 = TensorSpec::new(other[0].0.name.clone(), DType::F32, vec![2, 2]);
    other[0].1 = vec![0; 16];
    let err = delta(&local, &other).unwrap_err();
    assert!(
        err.to_string().contains(&format!("{:?}", other[0].0.name)),
        "{err}"
    );
}
