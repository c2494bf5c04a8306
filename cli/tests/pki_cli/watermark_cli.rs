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

/// A one-hidden-layer MLP `[32, 24]`, `[32]`, `[10, 32]`, plus a `[32, 32]` middle layer, as
/// torch writes it (`[out, in]`).
fn mlp(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (
            "fc0.weight".into(),
            vec![32, 24],
            values(32 * 24, seed, 0.2),
        ),
        ("fc0.bias".into(), vec![32], values(32, seed + 1, 0.02)),
        (
            "fc1.weight".into(),
            vec![32, 32],
            values(32 * 32, seed + 2, 0.2),
        ),
        (
            "out.weight".into(),
            vec![10, 32],
            values(10 * 32, seed + 3, 0.2),
        ),
    ]
}

/// The thief's disguise: hidden units of both layers permuted (a rotation by 7 and by 13, with
/// the next layer's columns), every matrix written transposed, tensors renamed.
fn permuted_and_transposed(
    m: &[(String, Vec<usize>, Vec<f32>)],
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let p0: Vec<usize> = (0..32).map(|j| (j * 7 + 3) % 32).collect();
    let p1: Vec<usize> = (0..32).map(|j| (j * 13 + 5) % 32).collect();
    let get = |n: &str| m.iter().find(|(name, _, _)| name == n).unwrap().2.clone();
    let (fc0, b0, fc1, out) = (
        get("fc0.weight"),
        get("fc0.bias"),
        get("fc1.weight"),
        get("out.weight"),
    );
    let (mut fc0p, mut b0p, mut fc1p, mut outp) =
        (fc0.clone(), b0.clone(), fc1.clone(), out.clone());
    for j in 0..32 {
        fc0p[p0[j] * 24..(p0[j] + 1) * 24].copy_from_slice(&fc0[j * 24..(j + 1) * 24]);
        b0p[p0[j]] = b0[j];
    }
    for r in 0..32 {
        for c in 0..32 {
            fc1p[p1[r] * 32 + p0[c]] = fc1[r * 32 + c];
        }
    }
    for r in 0..10 {
        for c in 0..32 {
            outp[r * 32 + p1[c]] = out[r * 32 + c];
        }
    }
    let t = |v: &[f32], rows: usize, cols: usize| {
        let mut t = vec![0.0; v.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = v[r * cols + c];
            }
        }
        t
    };
    vec![
        ("dense.kernel".into(), vec![24, 32], t(&fc0p, 32, 24)),
        ("dense.bias".into(), vec![32], b0p),
        ("dense_1.kernel".into(), vec![32, 32], t(&fc1p, 32, 32)),
        ("logits.kernel".into(), vec![32, 10], t(&outp, 10, 32)),
    ]
}

/// Issue 14: `--reference` must be the registered model (its digest the entry's published or
/// source digest), else it is refused naming both; with it, `--align` finds a copy whose hidden
/// units were permuted and whose matrices were written transposed, which the plain test misses;
/// an unrelated model stays undetected.
#[test]
fn a_permuted_transposed_copy_is_found_against_the_registered_reference() {
    use tutela_audit::payload::ActionPayload;
    use tutela_audit::payload::WatermarkRegistered;
    use tutela_audit::store::AuditStore;
    use tutela_audit::{Action, Chain, Timestamp};
    use tutela_protocol::stream::model_digest_of_file;

    let s = Scratch::new("watermark-align");
    let p = |rel: &str| s.arg(rel);
    let key = WatermarkKey::from_bytes([5; 32]);
    std::fs::write(s.path("key"), key.to_hex()).unwrap();
    let mark = key.mark("job-align-1");
    write(&s.path("source.safetensors"), &mlp(11));
    let (_, digest, report) = embed_stream(
        &s.path("source.safetensors"),
        SafetensorsFileSink::at(&s.path("published.safetensors")),
        &mark,
        DEFAULT_STRENGTH,
    )
    .unwrap();
    let published = hex::encode(digest);
    let source = hex::encode(model_digest_of_file(&s.path("source.safetensors")).unwrap());

    // The trail: one watermark.registered by the coordinator.
    let url = format!("sqlite://{}?mode=rwc", s.path("trail.db").display());
    let registered = WatermarkRegistered {
        job: "job-align-1".into(),
        model_digest: published.clone(),
        source_digest: source.clone(),
        scheme: "spread_spectrum_v1".into(),
        key_commitment: key.commitment(),
        mark_id: "job-align-1".into(),
        amplitude: report.amplitude,
        expected_z: report.expected_z,
        threshold: 1e-9,
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = AuditStore::open(&url).await.unwrap();
        let event = Chain::new()
            .append(
                Timestamp::now(),
                "spiffe://test/coordinator",
                Action::WatermarkRegistered,
                published.clone(),
                registered.to_value(),
            )
            .unwrap();
        store.insert_events(&[event]).await.unwrap();
    });

    let read = |path: &str| {
        let mut r = tutela_protocol::checkpoint::SafetensorsReader::open(&s.path(path)).unwrap();
        r.names()
            .into_iter()
            .map(|n| {
                let (shape, v) = r.read_f32(&n).unwrap();
                (n, shape, v)
            })
            .collect::<Vec<_>>()
    };
    write(
        &s.path("suspect.safetensors"),
        &permuted_and_transposed(&read("published.safetensors")),
    );
    write(
        &s.path("stranger.safetensors"),
        &permuted_and_transposed(&mlp(99)),
    );
    let verify = |file: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["model", "verify-watermark"].map(String::from).to_vec();
        args.extend([
            p(file),
            "--key".into(),
            p("key"),
            "--database-url".into(),
            url.clone(),
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let run_ok = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let run_fails = |args: Vec<String>| fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Tested, and not detected (exit status 1), as opposed to refused.
    let not_detected = |args: Vec<String>| {
        let out = super::tutela(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("not detected"), "{stdout}");
    };

    // Without alignment the disguised copy shows nothing.
    not_detected(verify("suspect.safetensors", &[]));
    // Aligned to the published model (unmarked with the entry's key and amplitude) or to the
    // source: detected, and matched to the entry.
    for reference in ["published.safetensors", "source.safetensors"] {
        let out = run_ok(verify(
            "suspect.safetensors",
            &["--reference", &p(reference), "--align"],
        ));
        assert!(
            out.contains("DETECTED") && out.contains("job-align-1"),
            "{out}"
        );
    }
    // An unrelated model, disguised the same way: not detected.
    not_detected(verify(
        "stranger.safetensors",
        &["--reference", &p("published.safetensors"), "--align"],
    ));
    // A reference that is not the registered model is refused, naming both digests.
    let stranger = hex::encode(model_digest_of_file(&s.path("stranger.safetensors")).unwrap());
    let err = run_fails(verify(
        "suspect.safetensors",
        &["--reference", &p("stranger.safetensors"), "--align"],
    ));
    assert!(
        err.contains(&stranger) && err.contains(&published) && err.contains(&source),
        "{err}"
    );
    // --align needs a reference.
    let err = run_fails(verify("suspect.safetensors", &["--align"]));
    assert!(err.contains("--reference"), "{err}");
}
