//! Detection on a merged checkpoint (`super::super::merged`): a LoRA job's marked adapter,
//! exported (`peft_export`) and merged into its base (`checkpoint::merge_lora`) exactly as
//! `tutela model export-adapter` and `tutela model merge` do, is found in the merged file; the
//! same adapter unmarked, other adapters, and a wrong job seed are not.

use super::*;
use crate::checkpoint::merge_lora;
use crate::checkpoint_digest::checkpoint_digest_of_dir;
use crate::lora::{LoraAggregation, LoraSpec, lora_b_name};
use crate::peft_export::export_peft_adapter;
use crate::watermark::align::transpose;

const LAYERS: usize = 4;

fn lora() -> LoraSpec {
    LoraSpec {
        rank: 8,
        alpha: 16.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        dropout: 0.0,
        aggregation: LoraAggregation::Ffa,
    }
}

fn gaussian(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * scale
        })
        .collect()
}

/// A Llama-like base in `dir` (config.json, model.safetensors): per layer q [64, 64], v [32, 64]
/// (adapted), o [64, 64] (not), and an embedding.
fn write_base(dir: &Path, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![256, 64],
        gaussian(&mut rng, 256 * 64, 0.1),
    )];
    for l in 0..LAYERS {
        for (m, out) in [("q_proj", 64), ("v_proj", 32), ("o_proj", 64)] {
            tensors.push((
                format!("model.layers.{l}.self_attn.{m}.weight"),
                vec![out, 64],
                gaussian(&mut rng, out * 64, 0.1),
            ));
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    write(&dir.join("model.safetensors"), &tensors, Dtype::F32);
}

/// A job's published adapter (the B tensors, PEFT names): 4 × (64 + 32) × 8 = 3,072 values.
fn adapter(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for l in 0..LAYERS {
        for (m, rows) in [("q_proj", 64), ("v_proj", 32)] {
            out.push((
                lora_b_name(&format!("model.layers.{l}.self_attn.{m}")),
                vec![rows, 8],
                gaussian(&mut rng, rows * 8, 0.02),
            ));
        }
    }
    out
}

/// `published` (B tensors) exported with the job's seed and merged into `base`: the merged
/// model's weights file.
fn merged(published: &Path, base: &Path, seed: u64, out: &Path) -> std::path::PathBuf {
    let peft = out.with_extension("peft");
    export_peft_adapter(&lora(), seed, published, base, &peft).unwrap();
    merge_lora(base, &peft, out).unwrap();
    out.join("model.safetensors")
}

const SEED: u64 = 42;

#[test]
fn the_recovered_adapters_are_the_merged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_base(&base, 1);
    let published = dir.path().join("adapter.safetensors");
    let b = adapter(2);
    write(&published, &b, Dtype::F32);
    let file = merged(&published, &base, SEED, &dir.path().join("merged"));
    let recovery = recover_adapters(&file, &base.join("model.safetensors"), &lora(), SEED).unwrap();
    assert!(recovery.missing.is_empty());
    assert_eq!(recovery.adapters.len(), b.len());
    for r in &recovery.adapters {
        let (_, shape, want) = b.iter().find(|(n, _, _)| *n == r.name).unwrap();
        assert_eq!(&r.shape, shape);
        // The merged f32 weights round W + s·B·A; the projection recovers B to that precision.
        let worst = r
            .values
            .iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{}: {worst}", r.name);
    }
}

#[test]
fn a_marked_adapter_is_detected_after_merging_and_nothing_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_base(&base, 1);
    let base_weights =
        job_base_weights(&base, Some(&checkpoint_digest_of_dir(&base).unwrap())).unwrap();
    let mark = key(9).mark("job-lora");
    let published = dir.path().join("adapter.safetensors");
    write(&published, &adapter(2), Dtype::F32);
    let marked = dir.path().join("marked.safetensors");
    let (_, _, report) = embed_stream(
        &published,
        SafetensorsFileSink::at(&marked),
        &mark,
        DEFAULT_STRENGTH,
    )
    .unwrap();
    assert_eq!(report.values, 3072);

    let detect = |file: &Path, seed: u64| {
        let (d, recovery) = detect_merged_marks(
            file,
            &base_weights,
            &lora(),
            seed,
            None,
            std::slice::from_ref(&mark),
        )
        .unwrap();
        assert_eq!(recovery.adapters.len(), 2 * LAYERS);
        d[0]
    };
    let on_adapter = detect_file(&marked, &mark).unwrap();
    let marked_merged = merged(&marked, &base, SEED, &dir.path().join("merged-marked"));
    let d = detect(&marked_merged, SEED);
    println!(
        "marked adapter: z = {:.2} on the adapter, {:.2} merged (log10 p = {:.1})",
        on_adapter.z,
        d.z,
        d.log10_p()
    );
    assert!(d.log10_p() < -9.0, "{d:?}");
    assert!((d.z - on_adapter.z).abs() < 0.01, "{d:?} vs {on_adapter:?}");

    // The same adapter unmarked, merged: no detection.
    let clean = merged(&published, &base, SEED, &dir.path().join("merged-clean"));
    let d = detect(&clean, SEED);
    assert!(d.p_value() > 0.01, "unmarked: {d:?}");
    // The marked merge tested with another job's seed (another A): nothing to find.
    let d = detect(&marked_merged, SEED + 1);
    assert!(d.p_value() > 0.01, "wrong seed: {d:?}");
    // 20 other adapters, merged into the same base with the same A.
    let mut smallest = 1f64;
    for s in 0..20 {
        let other = dir.path().join(format!("other-{s}.safetensors"));
        write(&other, &adapter(100 + s), Dtype::F32);
        let file = merged(&other, &base, SEED, &dir.path().join(format!("merged-{s}")));
        let d = detect(&file, SEED);
        assert!(d.p_value() > 0.01, "other adapter {s}: {d:?}");
        smallest = smallest.min(d.p_value());
    }
    println!("20 other merged adapters: smallest p = {smallest:.3}");

    // INT8 export of the merged model: still detected from the quantized file.
    let int8 = dir.path().join("merged-int8");
    export_int8(&dir.path().join("merged-marked"), &int8).unwrap();
    let d = detect(&int8.join("model.safetensors"), SEED);
    println!("merged, INT8: z = {:.2}, log10 p = {:.1}", d.z, d.log10_p());
    assert!(d.log10_p() < -9.0, "INT8: {d:?}");
}

#[test]
fn a_base_other_than_the_jobs_is_refused_and_missing_modules_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (base, other) = (dir.path().join("base"), dir.path().join("other"));
    write_base(&base, 1);
    write_base(&other, 2);
    let digest = checkpoint_digest_of_dir(&base).unwrap();
    let err = job_base_weights(&other, Some(&digest))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&digest) && err.contains("model.base_sha256"),
        "{err}"
    );
    let err = job_base_weights(&base, None).unwrap_err().to_string();
    assert!(err.contains("names no model.base_sha256"), "{err}");

    // A suspect that dropped one adapted module: the others are still tested.
    let mut suspect = read(&base.join("model.safetensors"));
    suspect.retain(|(n, _, _)| n != "model.layers.0.self_attn.q_proj.weight");
    let file = dir.path().join("suspect.safetensors");
    write(&file, &suspect, Dtype::F32);
    let recovery = recover_adapters(&file, &base.join("model.safetensors"), &lora(), 1).unwrap();
    assert_eq!(
        recovery.missing,
        vec!["model.layers.0.self_attn.q_proj.weight".to_string()]
    );
    assert_eq!(recovery.adapters.len(), 2 * LAYERS - 1);
}

/// At a LoRA job's default strength (amplitude capped at 0.05 σ: a blind z of 2.8 over these
/// 3,072 values), the merged model is still matched when the verifier subtracts the job's
/// unmarked adapter (informed detection); the unmarked merge and other adapters are not.
#[test]
fn informed_detection_finds_a_lora_default_mark_the_blind_test_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_base(&base, 1);
    let base_weights = base.join("model.safetensors");
    let mark = key(9).mark("job-lora");
    let published = dir.path().join("adapter.safetensors");
    write(&published, &adapter(2), Dtype::F32);
    let marked = dir.path().join("marked.safetensors");
    let (_, _, report) = embed_stream(
        &published,
        SafetensorsFileSink::at(&marked),
        &mark,
        LORA_DEFAULT_STRENGTH,
    )
    .unwrap();
    assert!((report.amplitude - 0.05).abs() < 1e-12, "{report:?}");
    let detect = |file: &Path, informed: bool| {
        let mut reference = Reference::open(&published).unwrap();
        detect_merged_marks(
            file,
            &base_weights,
            &lora(),
            SEED,
            informed.then_some(&mut reference),
            std::slice::from_ref(&mark),
        )
        .unwrap()
        .0[0]
    };
    let marked_merged = merged(&marked, &base, SEED, &dir.path().join("merged-marked"));
    let (blind, informed) = (detect(&marked_merged, false), detect(&marked_merged, true));
    println!(
        "LoRA default (0.05 σ): blind z = {:.2}, informed z = {:.2} (log10 p = {:.1})",
        blind.z,
        informed.z,
        informed.log10_p()
    );
    assert!(blind.log10_p() > -9.0, "{blind:?}");
    assert!(informed.log10_p() < -100.0, "{informed:?}");
    // The adapter file itself, informed by the same reference.
    let mut reference = Reference::open(&published).unwrap();
    let d = detect_file_marks_against(&marked, Some(&mut reference), std::slice::from_ref(&mark))
        .unwrap()[0];
    assert!(d.log10_p() < -100.0, "adapter, informed: {d:?}");

    // Nothing made without the mark key is matched, informed either.
    let clean = merged(&published, &base, SEED, &dir.path().join("merged-clean"));
    let d = detect(&clean, true);
    assert!(d.p_value() > 0.01, "unmarked merge, informed: {d:?}");
    for s in 0..20 {
        let other = dir.path().join(format!("other-{s}.safetensors"));
        write(&other, &adapter(100 + s), Dtype::F32);
        let file = merged(&other, &base, SEED, &dir.path().join(format!("merged-{s}")));
        let d = detect(&file, true);
        assert!(d.p_value() > 0.01, "other adapter {s}, informed: {d:?}");
    }
}

/// Issue 14: a merged checkpoint whose tensors were renamed (another naming scheme, the
/// `model.` prefix stripped), one of them stored transposed, and written in another order is
/// matched to the base by content and still detected; the same renaming of an unmarked merge
/// is not.
#[test]
fn a_merged_checkpoint_with_renamed_tensors_is_matched_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_base(&base, 1);
    let base_weights = base.join("model.safetensors");
    let mark = key(9).mark("job-lora");
    let published = dir.path().join("adapter.safetensors");
    write(&published, &adapter(2), Dtype::F32);
    let marked = dir.path().join("marked.safetensors");
    embed_stream(
        &published,
        SafetensorsFileSink::at(&marked),
        &mark,
        DEFAULT_STRENGTH,
    )
    .unwrap();
    let renamed = |merged: &Path, out: &Path| {
        let mut tensors: Vec<_> = read(merged)
            .into_iter()
            .map(|(name, mut shape, mut values)| {
                let name = name
                    .trim_start_matches("model.")
                    .replace("layers.", "h.")
                    .replace("self_attn.", "attn.");
                if name == "h.1.attn.v_proj.weight" {
                    values = transpose(&values, shape[0], shape[1]);
                    shape.reverse();
                }
                (name, shape, values)
            })
            .collect();
        tensors.reverse();
        write(out, &tensors, Dtype::F32);
    };
    let detect = |file: &Path| {
        let (d, recovery) = detect_merged_marks(
            file,
            &base_weights,
            &lora(),
            SEED,
            None,
            std::slice::from_ref(&mark),
        )
        .unwrap();
        (d[0], recovery)
    };

    let marked_merged = merged(&marked, &base, SEED, &dir.path().join("merged-marked"));
    let (by_name, _) = detect(&marked_merged);
    let suspect = dir.path().join("renamed.safetensors");
    renamed(&marked_merged, &suspect);
    let (d, recovery) = detect(&suspect);
    println!(
        "renamed merged checkpoint: z = {:.2} (by name before renaming: {:.2}), log10 p = {:.1}; \
         {} module(s) matched by content",
        d.z,
        by_name.z,
        d.log10_p(),
        recovery.by_content.len()
    );
    assert!(recovery.missing.is_empty(), "{:?}", recovery.missing);
    assert_eq!(recovery.by_content.len(), 2 * LAYERS);
    assert!(
        recovery.by_content.contains(&(
            "model.layers.2.self_attn.q_proj.weight".into(),
            "h.2.attn.q_proj.weight".into()
        )),
        "{:?}",
        recovery.by_content
    );
    assert!(d.log10_p() < -9.0, "{d:?}");
    assert!((d.z - by_name.z).abs() < 0.01, "{d:?} vs {by_name:?}");

    let clean = merged(&published, &base, SEED, &dir.path().join("merged-clean"));
    let suspect = dir.path().join("renamed-clean.safetensors");
    renamed(&clean, &suspect);
    let (d, recovery) = detect(&suspect);
    assert_eq!(recovery.by_content.len(), 2 * LAYERS);
    assert!(d.p_value() > 0.01, "unmarked, renamed: {d:?}");

    // A model of the same layout that is not a merge of this base: nothing is taken by content.
    let stranger = dir.path().join("stranger");
    write_base(&stranger, 3);
    let suspect = dir.path().join("renamed-stranger.safetensors");
    renamed(&stranger.join("model.safetensors"), &suspect);
    let (_, recovery) = detect(&suspect);
    assert!(recovery.adapters.is_empty(), "{:?}", recovery.by_content);
    assert_eq!(recovery.missing.len(), 2 * LAYERS);
}

/// Attacks on merged detection (2026-12-07, branch `attack-s8`): a suspect crafted to break the
/// verifier rather than to carry a mark. Adapted modules full of NaN, infinities or values near
/// f32's limit, the base itself, a module of another float dtype, an INT8 module with no scale or
/// a scale of the wrong shape: each ends in a clear error or a detection that finds nothing
/// (`p > 0.01`), never a panic, and the memory stays the base's (the suspect's tensors are read
/// only at the base's shapes).
#[test]
fn crafted_merged_checkpoints_end_in_an_error_or_no_detection_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_base(&base, 1);
    let base_file = base.join("model.safetensors");
    let base_weights =
        job_base_weights(&base, Some(&checkpoint_digest_of_dir(&base).unwrap())).unwrap();
    let mark = key(9).mark("job-lora");
    let tensors = read(&base_file);
    let adapted = |n: &str| n.contains("q_proj") || n.contains("v_proj");
    let with = |f: &dyn Fn(usize, &mut Vec<f32>)| -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut t = tensors.clone();
        for (i, (n, _, v)) in t.iter_mut().enumerate() {
            if adapted(n) {
                f(i, v);
            }
        }
        t
    };
    type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;
    let mut suspects: Vec<(&str, Tensors, Dtype)> = vec![
        (
            "the base itself (no change at all)",
            tensors.clone(),
            Dtype::F32,
        ),
        (
            "NaN in every adapted module",
            with(&|_, v| v[3] = f32::NAN),
            Dtype::F32,
        ),
        (
            "±infinity in every adapted module",
            with(&|i, v| {
                v[0] = if i % 2 == 0 {
                    f32::INFINITY
                } else {
                    f32::NEG_INFINITY
                }
            }),
            Dtype::F32,
        ),
        (
            "values near f32's limit",
            with(&|_, v| v.iter_mut().for_each(|x| *x = f32::MAX * x.signum())),
            Dtype::F32,
        ),
        ("the base as f16", tensors.clone(), Dtype::F16),
    ];
    for (what, t, dtype) in suspects.drain(..) {
        let file = dir.path().join("suspect.safetensors");
        write(&file, &t, dtype);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            detect_merged_marks(
                &file,
                &base_weights,
                &lora(),
                SEED,
                None,
                std::slice::from_ref(&mark),
            )
        }))
        .unwrap_or_else(|_| panic!("{what}: detection panicked"));
        match outcome {
            Err(e) => assert!(!e.to_string().is_empty(), "{what}"),
            Ok((d, _)) => assert!(
                d[0].p_value() > 0.01 && d[0].z.is_finite(),
                "{what}: a false detection {d:?}"
            ),
        }
    }

    // INT8 modules without their scale, or with a scale of the wrong shape: an error naming
    // the tensor, not an index out of bounds.
    for (what, scale_shape) in [("no scale", None), ("a scale of one row", Some(vec![1]))] {
        let file = dir.path().join("int8.safetensors");
        let name = "model.layers.0.self_attn.q_proj.weight";
        let mut declared: Vec<(String, Dtype, Vec<usize>)> = tensors
            .iter()
            .filter(|(n, _, _)| n != name)
            .map(|(n, s, _)| (n.clone(), Dtype::F32, s.clone()))
            .collect();
        declared.push((name.to_string(), Dtype::I8, vec![64, 64]));
        if let Some(s) = &scale_shape {
            declared.push((
                crate::checkpoint::int8_scale_name(name),
                Dtype::F32,
                s.clone(),
            ));
        }
        let mut w = SafetensorsWriter::create(&file, &declared, None).unwrap();
        for (n, d, s) in &declared {
            let count: usize = s.iter().product();
            let bytes = match (n.as_str(), d) {
                (_, Dtype::I8) => vec![7u8; count],
                (n, _) => match tensors.iter().find(|(m, _, _)| m == n) {
                    Some((_, _, v)) => from_f32(Dtype::F32, v).unwrap(),
                    None => from_f32(Dtype::F32, &vec![1.0; count]).unwrap(),
                },
            };
            w.write_next(n, &bytes).unwrap();
        }
        w.finish().unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            recover_adapters(&file, &base_weights, &lora(), SEED)
        }))
        .unwrap_or_else(|_| panic!("INT8 with {what}: recovery panicked"));
        let e = outcome.expect_err(what).to_string();
        assert!(e.contains(name) || e.contains("scale"), "{what}: {e}");
    }
}
