//! The scheme's own tests: embedding, detection, the null distribution, and the attacks that need
//! no training (the site node's tests add fine-tuning and accuracy on real models).

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;

use super::*;
use crate::checkpoint::{SafetensorsReader, SafetensorsWriter, export_int8, from_f32};
use crate::stream::SafetensorsFileSink;

/// A model-like set of tensors: a few weight matrices (Gaussian, with a heavy-tailed part),
/// biases and a norm vector, seeded.
fn model(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gauss = move || {
        let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    };
    let mut t = |name: &str, shape: Vec<usize>, scale: f32| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| {
                let g = gauss() * scale;
                // Every 50th value ten times larger: weights are not Gaussian.
                if i % 50 == 0 { g * 10.0 } else { g }
            })
            .collect();
        (name.to_string(), shape, values)
    };
    vec![
        t("fc0.weight", vec![128, 64], 0.1),
        t("fc0.bias", vec![128], 0.01),
        t("fc1.weight", vec![128, 128], 0.08),
        t("fc2.weight", vec![128, 128], 0.08),
        t("norm.weight", vec![128], 0.05),
        t("out.weight", vec![10, 128], 0.1),
        t("out.bias", vec![10], 0.01),
    ]
}

const STRENGTH: Strength = Strength {
    target_z: 16.0,
    max_amplitude: 0.25,
};

fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let declared: Vec<_> = tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), dtype, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &declared, None).unwrap();
    for (n, _, v) in tensors {
        w.write_next(n, &from_f32(dtype, v).unwrap()).unwrap();
    }
    w.finish().unwrap();
}

fn read(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut r = SafetensorsReader::open(path).unwrap();
    r.names()
        .into_iter()
        .map(|n| {
            let (s, v) = r.read_f32(&n).unwrap();
            (n, s, v)
        })
        .collect()
}

fn detect_mem(mark: &MarkKey, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Detection {
    detect_tensors(
        mark,
        tensors.iter().map(|(_, s, v)| (s.as_slice(), v.as_slice())),
    )
}

fn embed_mem(mark: &MarkKey, tensors: &mut [(String, Vec<usize>, Vec<f32>)]) -> f64 {
    let n: u64 = tensors
        .iter()
        .filter(|(_, s, _)| marks_shape(s))
        .map(|(_, _, v)| v.len() as u64)
        .sum();
    let a = plan_amplitude(STRENGTH, n);
    for (_, s, v) in tensors.iter_mut() {
        embed_tensor(mark, s, v, a);
    }
    a
}

fn key(b: u8) -> WatermarkKey {
    WatermarkKey::from_bytes([b; 32])
}

#[test]
fn key_file_round_trips_and_errors_do_not_quote_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = WatermarkKey::generate().unwrap();
    let path = dir.path().join("wm.key");
    std::fs::write(&path, format!("{}\n", k.to_hex())).unwrap();
    let back = WatermarkKey::read_file(&path).unwrap();
    assert_eq!(back.commitment(), k.commitment());
    assert_ne!(key(1).commitment(), key(2).commitment());
    assert!(!format!("{k:?}").contains(&k.to_hex()));
    std::fs::write(&path, "secret-not-hex").unwrap();
    let err = WatermarkKey::read_file(&path).unwrap_err().to_string();
    assert!(err.contains("64 hex digits"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

#[test]
fn marked_model_is_detected_and_unmarked_ones_are_not() {
    let mark = key(7).mark("job-1");
    let clean = model(1);
    let mut marked = clean.clone();
    let a = embed_mem(&mark, &mut marked);
    // 128·64 + 2 · 128·128 + 10·128 values marked (the 128-value vectors are too small).
    assert!(a < 0.25 && a > 0.01, "amplitude {a}");
    let d = detect_mem(&mark, &marked);
    assert!(d.z > 14.0, "z = {}", d.z);
    assert!(d.log10_p() < -9.0, "log10 p = {}", d.log10_p());
    // The same model unmarked, another job's mark key, another consortium's key.
    for (what, m, t) in [
        ("the unmarked aggregate", &mark, &clean),
        ("another job's mark", &key(7).mark("job-2"), &marked),
        ("another key", &key(8).mark("job-1"), &marked),
    ] {
        let d = detect_mem(m, t);
        assert!(d.p_value() > 0.01, "{what}: p = {}", d.p_value());
    }
    // 20 independently drawn models.
    for seed in 100..120 {
        let d = detect_mem(&mark, &model(seed));
        assert!(d.p_value() > 0.01, "model {seed}: p = {}", d.p_value());
    }
}

/// The bound is valid: over many keys on one fixed model, the fraction of p-values ≤ α is at
/// most α (it is conservative, so much less).
#[test]
fn p_values_under_the_null_are_conservative() {
    let m = model(5);
    let trials = 400;
    let mut below = [0usize; 3];
    let levels = [0.5, 0.1, 0.02];
    for k in 0..trials {
        let d = detect_mem(&key(9).mark(&format!("null-{k}")), &m);
        for (i, &l) in levels.iter().enumerate() {
            if d.p_value() <= l {
                below[i] += 1;
            }
        }
    }
    for (i, &l) in levels.iter().enumerate() {
        let frac = below[i] as f64 / trials as f64;
        assert!(frac <= l, "{frac} of p-values ≤ {l}");
    }
    // And it has power: the bound is exp(−z²/2), so z ≈ N(0,1) gives p ≤ 0.5 about 23% of the time.
    assert!(below[0] > trials / 10, "{below:?}");
}

#[test]
fn amplitude_reaches_the_target_or_the_cap() {
    assert!((plan_amplitude(STRENGTH, 10_000_000) - 16.0 / 10_000_000f64.sqrt()).abs() < 1e-12);
    assert_eq!(plan_amplitude(STRENGTH, 1_500), 0.25);
    assert_eq!(plan_amplitude(STRENGTH, 0), 0.0);
}

#[test]
fn streamed_file_is_matched_after_rename_reorder_and_reserialization() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("final.safetensors");
    write(&input, &model(3), Dtype::F32);
    let mark = key(3).mark("job-9");
    let (path, digest, report) = embed_stream(
        &input,
        SafetensorsFileSink::content_addressed(dir.path()),
        &mark,
        STRENGTH,
    )
    .unwrap();
    assert_eq!(
        path,
        dir.path()
            .join(format!("{}.safetensors", hex::encode(digest)))
    );
    assert_eq!(report.tensors, 4);
    assert!((report.expected_z - 16.0).abs() < 0.01, "{report:?}");
    let d = detect_file(&path, &mark).unwrap();
    assert!(d.log10_p() < -9.0, "{d:?}");
    assert!(detect_file(&input, &mark).unwrap().p_value() > 0.01);

    // Renamed, reordered, written again as bf16 by another writer.
    let mut copy = read(&path);
    copy.reverse();
    for (i, (n, _, _)) in copy.iter_mut().enumerate() {
        *n = format!("stolen.layer{i}.param");
    }
    let other = dir.path().join("renamed.safetensors");
    write(&other, &copy, Dtype::BF16);
    let d = detect_file(&other, &mark).unwrap();
    assert!(d.log10_p() < -9.0, "renamed bf16 copy: {d:?}");
}

/// The attacks that need no training, each with the p-value it leaves (printed; run with
/// `--nocapture` to see them).
#[test]
fn survives_pruning_quantization_and_noise() {
    let dir = tempfile::tempdir().unwrap();
    let mark = key(4).mark("job-4");
    let mut marked = model(4);
    embed_mem(&mark, &mut marked);

    // 30% magnitude pruning, per tensor.
    let mut pruned = marked.clone();
    for (_, _, v) in pruned.iter_mut() {
        let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let cut = mags[(mags.len() * 3) / 10];
        v.iter_mut()
            .filter(|x| x.abs() < cut)
            .for_each(|x| *x = 0.0);
    }
    let d = detect_mem(&mark, &pruned);
    println!(
        "30% magnitude pruning: z = {:.2}, log10 p = {:.1}",
        d.z,
        d.log10_p()
    );
    assert!(d.log10_p() < -9.0);

    // INT8 export (per-channel, protocol::checkpoint::export_int8), detected from the file.
    let model_dir = dir.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("config.json"), "{}").unwrap();
    write(&model_dir.join("model.safetensors"), &marked, Dtype::F32);
    let int8 = dir.path().join("int8");
    export_int8(&model_dir, &int8).unwrap();
    let d = detect_file(&int8.join("model.safetensors"), &mark).unwrap();
    println!("INT8: z = {:.2}, log10 p = {:.1}", d.z, d.log10_p());
    assert!(d.log10_p() < -9.0);

    // Gaussian noise of 30% of each tensor's spread.
    let mut rng = StdRng::seed_from_u64(11);
    let mut noisy = marked.clone();
    for (_, _, v) in noisy.iter_mut() {
        let (_, std) = mean_std(v);
        for x in v.iter_mut() {
            let (u, w): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let g = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * w).cos();
            *x += (0.3 * std * g) as f32;
        }
    }
    let d = detect_mem(&mark, &noisy);
    println!("noise 0.3σ: z = {:.2}, log10 p = {:.1}", d.z, d.log10_p());
    assert!(d.log10_p() < -9.0);
}

#[test]
fn p_values_read_for_people_are_never_smaller_than_the_bound() {
    assert_eq!(human_p_value(0.0), "= 1");
    assert_eq!(human_p_value(-0.5), "= 0.316");
    assert_eq!(human_p_value(-45.3), "< 1e-45");
    assert_eq!(human_p_value(-9.0), "< 1e-9");
    assert_eq!(human_p_value(f64::NAN), "= 1");
    let d = Detection {
        z: 6.5,
        tensors: 1,
        values: 1,
    };
    assert!(d.log10_p() < -9.0 && d.log10_p() > -9.5);
    // Bonferroni over 10 entries adds one decade, and never passes 1.
    assert!((d.log10_p_among(10) - d.log10_p() - 1.0).abs() < 1e-12);
    let weak = Detection {
        z: 0.1,
        tensors: 1,
        values: 1,
    };
    assert_eq!(weak.log10_p_among(1000), 0.0);
}

#[test]
fn the_verdict_takes_the_best_candidate_and_corrects_for_the_others() {
    let d = |z: f64| Detection {
        z,
        tensors: 1,
        values: 1,
    };
    // z = 5.5 alone: p ≈ 2.7e-7 ≤ 1e-6, detected; among 10 candidates: 2.7e-6, not.
    let one = verdict(&[d(5.5)], &[1e-6]).unwrap();
    assert!(one.detected, "{one:?}");
    let many: Vec<Detection> = std::iter::once(d(0.3))
        .chain((0..9).map(|_| d(5.5)))
        .collect();
    let v = verdict(&many, &[1e-6; 10]).unwrap();
    assert_eq!(v.index, 1);
    assert!(!v.detected, "{v:?}");
    let strong = verdict(&[d(0.1), d(12.0)], &[1e-6, 1e-6]).unwrap();
    assert_eq!(strong.index, 1);
    assert!(strong.detected && strong.log10_p < -30.0, "{strong:?}");
    assert!(verdict(&[], &[]).is_none());
    // A threshold of 0 (or none given) never detects.
    assert!(!verdict(&[d(30.0)], &[0.0]).unwrap().detected);
}

/// A two-hidden-layer MLP as a thief holds it: `fc0` (128 units over 64 inputs), `fc1` (128 over
/// 128), `out` (10 over 128), row-major `[out, in]` as torch writes them.
fn mlp(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut m = model(seed);
    m.retain(|(n, _, _)| {
        matches!(
            n.as_str(),
            "fc0.weight" | "fc0.bias" | "fc1.weight" | "out.weight"
        )
    });
    m
}

fn tensor<'a>(m: &'a mut [(String, Vec<usize>, Vec<f32>)], name: &str) -> &'a mut Vec<f32> {
    &mut m.iter_mut().find(|(n, _, _)| n == name).unwrap().2
}

/// Permutes hidden unit `j` of `layer` to position `perm[j]`: its row of `layer.weight` and
/// entry of `layer.bias`, and its column of `next` (`[out, 128]`). The network computes the
/// same function.
fn permute_units(
    m: &mut [(String, Vec<usize>, Vec<f32>)],
    layer: &str,
    next: &str,
    perm: &[usize],
) {
    let width = perm.len();
    let w = tensor(m, &format!("{layer}.weight")).clone();
    let inputs = w.len() / width;
    let mut moved = vec![0.0; w.len()];
    for (j, &to) in perm.iter().enumerate() {
        moved[to * inputs..(to + 1) * inputs].copy_from_slice(&w[j * inputs..(j + 1) * inputs]);
    }
    *tensor(m, &format!("{layer}.weight")) = moved;
    if m.iter().any(|(n, _, _)| n == &format!("{layer}.bias")) {
        let b = tensor(m, &format!("{layer}.bias")).clone();
        let mut moved = vec![0.0; b.len()];
        for (j, &to) in perm.iter().enumerate() {
            moved[to] = b[j];
        }
        *tensor(m, &format!("{layer}.bias")) = moved;
    }
    let n = tensor(m, &format!("{next}.weight")).clone();
    let outs = n.len() / width;
    let mut moved = vec![0.0; n.len()];
    for o in 0..outs {
        for (j, &to) in perm.iter().enumerate() {
            moved[o * width + to] = n[o * width + j];
        }
    }
    *tensor(m, &format!("{next}.weight")) = moved;
}

/// Attacks of the 2026-12-07 review (`docs/security-review.md`, "Watermarks") that need no
/// training, each function-preserving for a ReLU MLP. The p-values are printed (`--nocapture`)
/// and the limits pinned: permuting hidden units or transposing the weight matrices removes the
/// mark from this white-box test; rescaling units by positive factors (ReLU is positively
/// homogeneous) does not, up to a large dynamic range.
#[test]
fn function_preserving_rewrites_of_an_mlp_and_what_they_do_to_the_mark() {
    let mark = key(7).mark("job-1");
    let mut marked = mlp(3);
    embed_mem(&mark, &mut marked);
    let base = detect_mem(&mark, &marked);
    eprintln!(
        "marked MLP: z = {:.2}, log10 p = {:.1}",
        base.z,
        base.log10_p()
    );
    assert!(base.log10_p() < -9.0, "{}", base.log10_p());

    // 1. Permuting the hidden units of both layers (a random permutation each).
    let mut rng = StdRng::seed_from_u64(11);
    let mut perm = |n: usize| {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, rng.random_range(0..=i));
        }
        p
    };
    let mut permuted = marked.clone();
    permute_units(&mut permuted, "fc0", "fc1", &perm(128));
    permute_units(&mut permuted, "fc1", "out", &perm(128));
    let d = detect_mem(&mark, &permuted);
    eprintln!(
        "hidden units permuted: z = {:.2}, p = {:.3}",
        d.z,
        d.p_value()
    );
    assert!(
        d.p_value() > 1e-3,
        "a permutation no longer strips the mark: update the review"
    );

    // 2. Rescaling each unit of fc0 by s_j in [1/100, 100] (log-uniform) and its column of fc1
    //    by 1/s_j.
    let mut scaled = marked.clone();
    let s: Vec<f32> = (0..128)
        .map(|_| 10f32.powf(rng.random_range(-2.0..2.0)))
        .collect();
    for (j, s_j) in s.iter().enumerate() {
        for v in &mut tensor(&mut scaled, "fc0.weight")[j * 64..(j + 1) * 64] {
            *v *= s_j;
        }
        tensor(&mut scaled, "fc0.bias")[j] *= s_j;
        for o in 0..128 {
            tensor(&mut scaled, "fc1.weight")[o * 128 + j] /= s_j;
        }
    }
    let d = detect_mem(&mark, &scaled);
    eprintln!(
        "units rescaled by 1e-2..1e2: z = {:.2}, log10 p = {:.1}",
        d.z,
        d.log10_p()
    );
    assert!(d.log10_p() < -3.0, "rescaling strips the mark: z = {}", d.z);

    // 3. The weights written transposed (`[in, out]`, as Keras or JAX lay them out).
    let mut transposed = marked.clone();
    for (_, shape, values) in transposed.iter_mut().filter(|(_, s, _)| s.len() == 2) {
        let (rows, cols) = (shape[0], shape[1]);
        let mut t = vec![0.0; values.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = values[r * cols + c];
            }
        }
        *values = t;
        *shape = vec![cols, rows];
    }
    let d = detect_mem(&mark, &transposed);
    eprintln!("weights transposed: z = {:.2}, p = {:.3}", d.z, d.p_value());
    assert!(
        d.p_value() > 1e-3,
        "transposition no longer strips the mark: update the review"
    );
}

/// The null for adversarially chosen unmarked models: another job's model trained from the same
/// initial weights (the same init plus independent updates), a model marked under another key,
/// all-zero and constant tensors, tensors under the size the pattern marks, and the same
/// unmarked model written in f16 and bf16. None may reach the detection threshold; the
/// degenerate ones must give z = 0, not NaN.
#[test]
fn adversarially_chosen_unmarked_models_stay_under_the_null() {
    let mark = key(7).mark("job-1");
    let init = mlp(3);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let mut worst = 0.0f64;
    for k in 0..50 {
        // Same init, another job's small updates.
        let mut sibling = init.clone();
        for (_, _, v) in sibling.iter_mut() {
            for x in v.iter_mut() {
                *x += 0.01 * (rng.random::<f32>() - 0.5);
            }
        }
        // Marked, but by another consortium's key or another job's mark.
        let mut other = init.clone();
        embed_mem(&key(8).mark(&format!("job-{k}")), &mut other);
        for m in [&sibling, &other] {
            worst = worst.max(detect_mem(&mark, m).z);
        }
    }
    eprintln!("largest z over 100 adversarial null models: {worst:.2}");
    // Hoeffding: P(z ≥ 6.44) ≤ 1e-9 per model.
    assert!(worst < 5.0, "z = {worst}");

    let zeros = vec![("w".to_string(), vec![64, 64], vec![0.0f32; 4096])];
    let constant = vec![("w".to_string(), vec![64, 64], vec![0.3f32; 4096])];
    let small = vec![("w".to_string(), vec![255], vec![1.0f32; 255])];
    for degenerate in [&zeros, &constant, &small] {
        let d = detect_mem(&mark, degenerate);
        assert_eq!((d.z, d.values), (0.0, 0), "{d:?}");
        assert_eq!(d.log10_p(), 0.0);
    }
    for dtype in [Dtype::F16, Dtype::BF16] {
        let path = dir.path().join(format!("init-{dtype:?}.safetensors"));
        write(&path, &init, dtype);
        let d = detect_file(&path, &mark).unwrap();
        assert!(d.z < 5.0 && d.z.is_finite(), "{dtype:?}: z = {}", d.z);
    }
}

mod align;
mod merged;
