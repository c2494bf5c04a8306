//! The model registry: names, deterministic parameters, spec checks, and libtorch linkage.

use tch::Device;
use tutela_site_node::models::{Model, ModelError, ModelSpec, build, known_models};
use tutela_site_node::weights::export_weights;

fn tabular() -> ModelSpec {
    ModelSpec::new(vec![30], 2).with_hidden(vec![16, 8])
}

fn image() -> ModelSpec {
    ModelSpec::new(vec![1, 28, 28], 10)
        .with_hidden(vec![32])
        .with_conv_channels([4, 8])
}

#[test]
fn unknown_model_error_lists_the_known_ones() {
    assert_eq!(known_models(), ["mlp", "cnn"]);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let err = build("transformer", &tabular(), &vs.root()).unwrap_err();
    assert!(matches!(err, ModelError::UnknownModel { .. }));
    let message = err.to_string();
    assert!(message.contains("\"transformer\""), "{message}");
    assert!(message.contains("mlp, cnn"), "{message}");
}

#[test]
fn parameter_names_and_shapes_are_fixed() {
    let mlp = Model::new("mlp", tabular(), Device::Cpu, 0).unwrap();
    assert_eq!(
        mlp.parameter_names(),
        [
            "fc0.bias",
            "fc0.weight",
            "fc1.bias",
            "fc1.weight",
            "out.bias",
            "out.weight"
        ]
    );
    assert_eq!(mlp.parameter_count(), 30 * 16 + 16 + 16 * 8 + 8 + 8 * 2 + 2);

    let cnn = Model::new("cnn", image(), Device::Cpu, 0).unwrap();
    let shapes: Vec<(String, Vec<u64>)> = export_weights(cnn.var_store())
        .unwrap()
        .into_iter()
        .map(|(spec, _)| (spec.name, spec.shape))
        .collect();
    let expected: Vec<(String, Vec<u64>)> = [
        ("conv1.bias", vec![4]),
        ("conv1.weight", vec![4, 1, 3, 3]),
        ("conv2.bias", vec![8]),
        ("conv2.weight", vec![8, 4, 3, 3]),
        ("fc0.bias", vec![32]),
        ("fc0.weight", vec![32, 8 * 7 * 7]),
        ("out.bias", vec![10]),
        ("out.weight", vec![10, 32]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(shapes, expected);
}

#[test]
fn same_seed_gives_identical_weights_other_seed_does_not() {
    for (name, spec) in [("mlp", tabular()), ("cnn", image())] {
        let a = export_weights(
            Model::new(name, spec.clone(), Device::Cpu, 5)
                .unwrap()
                .var_store(),
        )
        .unwrap();
        let b = export_weights(
            Model::new(name, spec.clone(), Device::Cpu, 5)
                .unwrap()
                .var_store(),
        )
        .unwrap();
        let c =
            export_weights(Model::new(name, spec, Device::Cpu, 6).unwrap().var_store()).unwrap();
        assert_eq!(a, b, "{name}: same seed");
        assert_ne!(a, c, "{name}: other seed");
    }
}

#[test]
fn initial_weights_follow_the_fan_in_bound() {
    let model = Model::new("mlp", tabular(), Device::Cpu, 1).unwrap();
    for (spec, bytes) in export_weights(model.var_store()).unwrap() {
        let fan_in = match spec.name.split('.').next().unwrap() {
            "fc0" => 30.0,
            "fc1" => 16.0,
            _ => 8.0,
        };
        let bound = 1.0 / f32::sqrt(fan_in);
        let values = tutela_site_node::weights::f32_values(&spec, &bytes).unwrap();
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= bound, "{}: max |w| {max}, bound {bound}", spec.name);
        // With enough draws the largest one comes near the bound (a too-narrow init would not).
        if values.len() >= 16 {
            assert!(
                max > 0.8 * bound,
                "{}: max |w| {max}, bound {bound}",
                spec.name
            );
        }
    }
}

#[test]
fn invalid_specs_are_refused_with_the_model_named() {
    let cases = [
        (
            "cnn",
            ModelSpec::new(vec![784], 10),
            "[channels, height, width]",
        ),
        ("cnn", ModelSpec::new(vec![1, 3, 3], 10), "at least 4×4"),
        ("mlp", ModelSpec::new(vec![30], 1), "num_classes"),
        ("mlp", ModelSpec::new(vec![30, 0], 2), "input_shape"),
        ("mlp", tabular().with_hidden(vec![8, 0]), "hidden"),
        ("mlp", tabular().with_dropout(1.0), "dropout"),
    ];
    for (name, spec, expected) in cases {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let err = build(name, &spec, &vs.root()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&format!("{name:?}")), "{message}");
        assert!(
            message.contains(expected),
            "expected {expected:?} in: {message}"
        );
    }
}

#[test]
fn model_spec_reads_from_toml_with_defaults() {
    let spec: ModelSpec = toml::from_str("input_shape = [1, 28, 28]\nnum_classes = 10\n").unwrap();
    assert_eq!(spec, ModelSpec::new(vec![1, 28, 28], 10));
    assert!(
        toml::from_str::<ModelSpec>("input_shape = [3]\nnum_classes = 2\nwidth = 4\n").is_err()
    );
}

/// build.rs keeps libtorch.so in the binary's NEEDED list (`--no-as-needed -ltorch`), which
/// pulls in libtorch_cuda.so; without it `tch::Cuda::is_available()` is false even on a GPU.
/// This holds on CPU-only machines too, so it is checked everywhere.
#[test]
fn libtorch_cuda_is_linked_so_gpus_can_be_found() {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        maps.contains("libtorch_cuda.so"),
        "libtorch_cuda.so is not loaded"
    );
    let device = tutela_site_node::default_device();
    assert_eq!(device.is_cuda(), tch::Cuda::is_available());
    eprintln!(
        "default device: {device:?} (CUDA devices: {})",
        tch::Cuda::device_count()
    );
}

/// The coordinator checks a job's initial model against `tutela_protocol::model_registry`, a
/// libtorch-free description of this registry: for every model kind and a spread of
/// hyper-parameters and data shapes, the tch registry builds exactly the described tensors
/// (names, dtypes, shapes), so the two cannot drift apart.
#[test]
fn the_registry_builds_exactly_what_the_protocol_describes() {
    use tutela_protocol::job::ModelSpec as JobModel;
    use tutela_protocol::model_registry::{DataDims, MODEL_NAMES, ModelDescription};

    assert_eq!(known_models(), MODEL_NAMES);
    let hyper = [
        "",
        "hidden = [8]",
        "hidden = [16, 8, 4]\ndropout = 0.2",
        "hidden = [5]\nconv_channels = [3, 6]",
    ];
    let data: &[(Vec<usize>, usize)] = &[
        (vec![30], 2),
        (vec![7], 5),
        (vec![1, 28, 28], 10),
        (vec![3, 9, 13], 4),
    ];
    let mut checked = 0;
    for name in MODEL_NAMES {
        for h in hyper {
            for (input_shape, classes) in data {
                if *name == "cnn" && input_shape.len() != 3 {
                    continue;
                }
                // The same [model] table both sides read.
                let table: JobModel = toml::from_str(&format!("name = \"{name}\"\n{h}")).unwrap();
                let described = ModelDescription::for_job(&table)
                    .unwrap()
                    .concrete(&DataDims {
                        input_shape: input_shape.iter().map(|&d| d as u64).collect(),
                        num_classes: *classes as u64,
                    })
                    .unwrap();
                let mut params = table.params.clone();
                params.insert(
                    "input_shape".into(),
                    toml::Value::Array(
                        input_shape
                            .iter()
                            .map(|&d| toml::Value::Integer(d as i64))
                            .collect(),
                    ),
                );
                params.insert("num_classes".into(), toml::Value::Integer(*classes as i64));
                let spec: ModelSpec = toml::Value::Table(params).try_into().unwrap();
                let model = Model::new(name, spec, Device::Cpu, 1).unwrap();
                let built: Vec<_> = export_weights(model.var_store())
                    .unwrap()
                    .into_iter()
                    .map(|(spec, _)| spec)
                    .collect();
                assert_eq!(built, described, "{name} {h:?} {input_shape:?} {classes}");
                ModelDescription::for_job(&table)
                    .unwrap()
                    .check(&built)
                    .unwrap();
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked}");
}
