//! `tutela model merge` and `tutela model export-int8`: the real binary on checkpoints written
//! at test time (the comparison with peft's `merge_and_unload` is in the site node's tests,
//! `lora::peft_loads_our_adapter_and_our_merge_equals_merge_and_unload`).

use std::path::Path;

use safetensors::Dtype;
use tutela_protocol::checkpoint::{
    SafetensorsReader, SafetensorsWriter, from_f32, int8_scale_name, load_int8_dequantized,
};
use tutela_protocol::lora::{LoraAggregation, LoraSpec, lora_a_name, lora_b_name};

use super::{Scratch, fails, ok};

/// Deterministic values in [-1, 1) with a per-row spread, so per-channel scales differ.
fn values(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let x = (i.wrapping_mul(2654435761).wrapping_add(salt * 97)) % 1000;
            (x as f32 / 500.0 - 1.0) * (1.0 + (i % 7) as f32)
        })
        .collect()
}

fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let declared: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, _)| (n.to_string(), *d, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &declared, None).unwrap();
    for (n, d, _, v) in tensors {
        w.write_next(n, &from_f32(*d, v).unwrap()).unwrap();
    }
    w.finish().unwrap();
}

/// A Llama-named base: embeddings, a norm, q_proj in f32 and v_proj in bf16.
fn base(s: &Scratch) -> (Vec<f32>, Vec<f32>) {
    std::fs::create_dir_all(s.path("base")).unwrap();
    std::fs::write(s.path("base/config.json"), "{\"model_type\": \"llama\"}").unwrap();
    let q = values(6 * 8, 1);
    let v = values(4 * 8, 2);
    write(
        &s.path("base/model.safetensors"),
        &[
            (
                "model.embed_tokens.weight",
                Dtype::F32,
                vec![10, 8],
                values(80, 3),
            ),
            (
                "model.layers.0.input_layernorm.weight",
                Dtype::F32,
                vec![8],
                values(8, 4),
            ),
            (
                "model.layers.0.self_attn.q_proj.weight",
                Dtype::F32,
                vec![6, 8],
                q.clone(),
            ),
            (
                "model.layers.0.self_attn.v_proj.weight",
                Dtype::BF16,
                vec![4, 8],
                v.clone(),
            ),
        ],
    );
    (q, v)
}

#[test]
fn merge_writes_w_plus_scaled_ba_in_the_base_dtype() {
    let s = Scratch::new("model-merge");
    let (q, v) = base(&s);
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let spec = LoraSpec {
        rank: 2,
        alpha: 3.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        dropout: 0.0,
        aggregation: LoraAggregation::Ffa,
    };
    std::fs::create_dir_all(s.path("adapter")).unwrap();
    std::fs::write(
        s.path("adapter/adapter_config.json"),
        spec.peft_config_json().to_string(),
    )
    .unwrap();
    let (qp, vp) = (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    );
    let (qa, qb, va, vb) = (values(16, 5), values(12, 6), values(16, 7), values(8, 8));
    write(
        &s.path("adapter/adapter_model.safetensors"),
        &[
            (&lora_a_name(qp), Dtype::F32, vec![2, 8], qa.clone()),
            (&lora_b_name(qp), Dtype::F32, vec![6, 2], qb.clone()),
            (&lora_a_name(vp), Dtype::F32, vec![2, 8], va.clone()),
            (&lora_b_name(vp), Dtype::F32, vec![4, 2], vb.clone()),
        ],
    );
    let out = ok(&[
        "model",
        "merge",
        "--base",
        &s.arg("base"),
        "--adapter",
        &s.arg("adapter"),
        "--output",
        &s.arg("merged"),
    ]);
    assert!(
        out.contains("merged 2 adapted modules into 4 tensors"),
        "{out}"
    );
    assert!(s.path("merged/config.json").is_file());

    let expected = |w: &[f32], b: &[f32], a: &[f32], rows: usize| -> Vec<f64> {
        (0..rows * 8)
            .map(|k| {
                let (o, i) = (k / 8, k % 8);
                let ba: f64 = (0..2)
                    .map(|r| f64::from(b[o * 2 + r]) * f64::from(a[r * 8 + i]))
                    .sum();
                f64::from(w[k]) + 1.5 * ba
            })
            .collect()
    };
    let mut merged = SafetensorsReader::open(&s.path("merged/model.safetensors")).unwrap();
    let (_, q_merged) = merged.read_f32(&format!("{qp}.weight")).unwrap();
    for (got, want) in q_merged.iter().zip(expected(&q, &qb, &qa, 6)) {
        assert!(
            (f64::from(*got) - want).abs() <= want.abs() * 1e-6 + 1e-6,
            "{got} {want}"
        );
    }
    // bf16 stays bf16, the merge rounded once from the f32 result.
    assert_eq!(
        merged.info(&format!("{vp}.weight")).unwrap().dtype,
        Dtype::BF16
    );
    let v_base: Vec<f32> = v.iter().map(|&x| bf16(x)).collect();
    let (_, v_merged) = merged.read_f32(&format!("{vp}.weight")).unwrap();
    for (got, want) in v_merged.iter().zip(expected(&v_base, &vb, &va, 4)) {
        assert_eq!(*got, bf16(want as f32));
    }
    // Untouched tensors are copied byte for byte.
    let mut original = SafetensorsReader::open(&s.path("base/model.safetensors")).unwrap();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ] {
        assert_eq!(
            merged.read_bytes(name).unwrap(),
            original.read_bytes(name).unwrap()
        );
    }

    // Writing over an input is refused, and the base is left as it was.
    let before = std::fs::read(s.path("base/model.safetensors")).unwrap();
    let err = fails(&[
        "model",
        "merge",
        "--base",
        &s.arg("base"),
        "--adapter",
        &s.arg("adapter"),
        "--output",
        &s.arg("base"),
    ]);
    assert!(err.contains("also an input"), "{err}");
    assert_eq!(
        std::fs::read(s.path("base/model.safetensors")).unwrap(),
        before
    );
    let err = fails(&[
        "model",
        "export-int8",
        "--model",
        &s.arg("base"),
        "--output",
        &s.arg("base"),
    ]);
    assert!(err.contains("also an input"), "{err}");

    // An adapter whose factors do not have the configured rank is refused, naming it.
    std::fs::write(
        s.path("adapter/adapter_config.json"),
        spec.peft_config_json()
            .to_string()
            .replace("\"r\":2", "\"r\":3"),
    )
    .unwrap();
    let err = fails(&[
        "model",
        "merge",
        "--base",
        &s.arg("base"),
        "--adapter",
        &s.arg("adapter"),
        "--output",
        &s.arg("merged2"),
    ]);
    assert!(err.contains("rank-3"), "{err}");
}

#[test]
fn int8_export_round_trips_within_half_a_step_per_channel() {
    let s = Scratch::new("model-int8");
    let (q, v) = base(&s);
    let out = ok(&[
        "model",
        "export-int8",
        "--model",
        &s.arg("base"),
        "--output",
        &s.arg("int8"),
    ]);
    assert!(
        out.contains("quantized 2 Linear weights, copied 2 tensors"),
        "{out}"
    );
    let file = s.path("int8/model.safetensors");
    let reader = SafetensorsReader::open(&file).unwrap();
    let q_name = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(reader.info(q_name).unwrap().dtype, Dtype::I8);
    assert_eq!(
        reader.info(&int8_scale_name(q_name)).unwrap().shape,
        vec![6]
    );
    assert_eq!(
        reader.info("model.embed_tokens.weight").unwrap().dtype,
        Dtype::F32
    );

    let loaded = load_int8_dequantized(&file).unwrap();
    assert_eq!(loaded.len(), 4, "scales are folded into their weights");
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let v_base: Vec<f32> = v.iter().map(|&x| bf16(x)).collect();
    for (name, original, rows) in [
        (q_name, q, 6),
        ("model.layers.0.self_attn.v_proj.weight", v_base, 4),
    ] {
        let (_, back) = &loaded[name];
        for (r, (row, back_row)) in original.chunks(8).zip(back.chunks(8)).enumerate() {
            let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let step = max / 127.0;
            for (a, b) in row.iter().zip(back_row) {
                assert!(
                    (a - b).abs() <= step * 0.5 * (1.0 + 1e-5),
                    "{name} row {r}: {a} vs {b}"
                );
            }
        }
        assert_eq!(original.len(), rows * 8);
    }
    assert_eq!(loaded["model.embed_tokens.weight"].1, values(80, 3));
    // A file that is not an INT8 export is refused by the loader.
    let err = load_int8_dequantized(&s.path("base/model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tutela-int8-v1"), "{err}");
}
