//! `tutela model verify-watermark --merged-base DIR --job JOB.toml`: a LoRA job's marked
//! adapter, exported and merged with the real binary (`export-adapter`, `merge`), is detected in
//! the merged checkpoint; the unmarked merge is not (exit status 1); a LoRA job's default mark,
//! too faint to test blind, is found with `--reference` (the job's unmarked adapter); and a base
//! other than the job's is refused naming the digest.

use std::path::Path;

use safetensors::Dtype;
use tutela_protocol::checkpoint::{SafetensorsWriter, from_f32};
use tutela_protocol::checkpoint_digest::checkpoint_digest_of_dir;
use tutela_protocol::lora::lora_b_name;
use tutela_protocol::stream::SafetensorsFileSink;
use tutela_protocol::watermark::{
    DEFAULT_STRENGTH, LORA_DEFAULT_STRENGTH, WatermarkKey, embed_stream,
};

use super::{Scratch, fails, ok};

/// `n` values uniform in `[-scale, scale)` from splitmix64 seeded with `seed`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let declared: Vec<_> = tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), Dtype::F32, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &declared, None).unwrap();
    for (n, _, v) in tensors {
        w.write_next(n, &from_f32(Dtype::F32, v).unwrap()).unwrap();
    }
    w.finish().unwrap();
}

const MODULES: [&str; 2] = ["q_proj", "v_proj"];

/// A base of 4 layers with q_proj and v_proj `[64, 64]` in `dir`.
fn base(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![32, 64],
        values(32 * 64, seed, 0.1),
    )];
    for l in 0..4u64 {
        for (m, module) in MODULES.iter().enumerate() {
            tensors.push((
                format!("model.layers.{l}.self_attn.{module}.weight"),
                vec![64, 64],
                values(64 * 64, seed * 100 + l * 10 + m as u64, 0.1),
            ));
        }
    }
    write(&dir.join("model.safetensors"), &tensors);
}

/// The job's published adapter: the 8 B tensors `[64, 8]` (4,096 values).
fn adapter(path: &Path) {
    let mut tensors = Vec::new();
    for l in 0..4u64 {
        for (m, module) in MODULES.iter().enumerate() {
            tensors.push((
                lora_b_name(&format!("model.layers.{l}.self_attn.{module}")),
                vec![64, 8],
                values(64 * 8, 7000 + l * 10 + m as u64, 0.03),
            ));
        }
    }
    write(path, &tensors);
}

#[test]
fn a_merged_lora_checkpoint_is_verified_against_the_jobs_base() {
    let s = Scratch::new("watermark-merged");
    let p = |name: &str| s.path(name).display().to_string();
    base(&s.path("base"), 1);
    base(&s.path("other-base"), 2);
    let digest = checkpoint_digest_of_dir(&s.path("base")).unwrap();
    let spec = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/jobs/notes_lora_dp.toml"),
    )
    .unwrap()
    .replace(
        "base_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"",
        &format!("base_sha256 = \"{digest}\""),
    );
    assert!(spec.contains(&digest));
    std::fs::write(s.path("job.toml"), spec).unwrap();
    let key = WatermarkKey::from_bytes([0x33; 32]);
    std::fs::write(s.path("key"), key.to_hex()).unwrap();

    adapter(&s.path("adapter.safetensors"));
    embed_stream(
        &s.path("adapter.safetensors"),
        SafetensorsFileSink::at(s.path("marked.safetensors")),
        &key.mark("job-lora-7"),
        DEFAULT_STRENGTH,
    )
    .unwrap();
    // At a LoRA job's default (0.05 σ: blind z 3.2 over 4,096 values), for --reference.
    embed_stream(
        &s.path("adapter.safetensors"),
        SafetensorsFileSink::at(s.path("faint.safetensors")),
        &key.mark("job-lora-7"),
        LORA_DEFAULT_STRENGTH,
    )
    .unwrap();
    for (adapter, merged) in [
        ("marked", "merged-marked"),
        ("adapter", "merged-clean"),
        ("faint", "merged-faint"),
    ] {
        ok(&[
            "model",
            "export-adapter",
            "--job",
            &p("job.toml"),
            "--model",
            &p(&format!("{adapter}.safetensors")),
            "--base",
            &p("base"),
            "--output",
            &p(&format!("{adapter}-peft")),
        ]);
        ok(&[
            "model",
            "merge",
            "--base",
            &p("base"),
            "--adapter",
            &p(&format!("{adapter}-peft")),
            "--output",
            &p(merged),
        ]);
    }
    let verify = |merged: &str, base: &str| {
        vec![
            "model".to_string(),
            "verify-watermark".into(),
            p(merged),
            "--merged-base".into(),
            p(base),
            "--job".into(),
            p("job.toml"),
            "--key".into(),
            p("key"),
            "--mark-id".into(),
            "job-lora-7".into(),
        ]
    };
    let args = verify("merged-marked", "base");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(&args);
    assert!(out.contains("DETECTED"), "{out}");

    // Without the base, the merged weights carry no mark in their own layout: not detected.
    fails(&[
        "model",
        "verify-watermark",
        &p("merged-marked"),
        "--key",
        &p("key"),
        "--mark-id",
        "job-lora-7",
    ]);

    let args = verify("merged-clean", "base");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args);

    // The faint mark: not detected blind, detected against the job's unmarked adapter.
    let args = verify("merged-faint", "base");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args);
    let mut args = verify("merged-faint", "base");
    args.extend(["--reference".to_string(), p("adapter.safetensors")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(&args);
    assert!(out.contains("DETECTED"), "{out}");
    let mut args = verify("merged-clean", "base");
    args.extend(["--reference".to_string(), p("adapter.safetensors")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args);

    let args = verify("merged-marked", "other-base");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&args);
    assert!(
        err.contains(&digest) && err.contains("model.base_sha256"),
        "{err}"
    );
}
