//! Alignment before detection (`super::super::align`, issue 14): copies whose hidden units were
//! permuted or whose matrices were written transposed — function-preserving rewrites that strip
//! the positional mark from the plain test — are found again once laid onto the registry's
//! model, and unrelated models stay under the null. `--nocapture` prints the z-scores
//! (BENCHMARKS.md, "Watermarks").

use super::*;
use crate::watermark::align::transpose;

type Model = Vec<(String, Vec<usize>, Vec<f32>)>;

fn named(m: &Model) -> Vec<NamedTensor> {
    m.iter()
        .map(|(name, shape, values)| NamedTensor {
            name: name.clone(),
            shape: shape.clone(),
            values: values.clone(),
        })
        .collect()
}

fn shuffle(rng: &mut StdRng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.random_range(0..=i));
    }
    p
}

/// Every matrix written `[in, out]`.
fn transposed(m: &Model) -> Model {
    m.iter()
        .map(|(n, s, v)| match s.as_slice() {
            [rows, cols] => (n.clone(), vec![*cols, *rows], transpose(v, *rows, *cols)),
            _ => (n.clone(), s.clone(), v.clone()),
        })
        .collect()
}

/// Moves unit `j` of dimension `dim` (0: rows; 1: columns, in units of `block` columns) of
/// tensor `name` to position `perm[j]`.
fn move_units(m: &mut Model, name: &str, dim: usize, block: usize, perm: &[usize]) {
    let (_, shape, values) = m.iter_mut().find(|(n, _, _)| n == name).unwrap();
    let rows = shape[0];
    let cols = shape.get(1).copied().unwrap_or(1);
    let rest: usize = shape.iter().skip(2).product();
    let old = values.clone();
    let row_len = cols * rest;
    for r in 0..rows {
        for c in 0..cols {
            for k in 0..rest {
                let (to_r, to_c) = if dim == 0 {
                    (perm[r], c)
                } else {
                    (r, perm[c / block] * block + c % block)
                };
                values[to_r * row_len + to_c * rest + k] = old[r * row_len + c * rest + k];
            }
        }
    }
}

fn aligned(mark: &MarkKey, suspect: &Model, reference: &Model) -> (Detection, AlignmentReport) {
    let (d, report) = detect_aligned_tensors(
        &named(suspect),
        &named(reference),
        std::slice::from_ref(mark),
    );
    (d[0], report)
}

#[test]
fn unmarking_gives_back_the_unmarked_weights() {
    let mark = key(7).mark("job-1");
    let clean = model(3);
    let mut marked = clean.clone();
    let a = embed_mem(&mark, &mut marked);
    for ((name, shape, want), (_, _, got)) in clean.iter().zip(&marked) {
        let mut values = got.clone();
        assert_eq!(
            unmark_tensor(&mark, shape, &mut values, a),
            marks_shape(shape),
            "{name}"
        );
        let (_, std) = mean_std(want);
        let worst = values
            .iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(f64::from(worst) < 1e-5 * std, "{name}: {worst} (σ {std})");
    }
    // Unmarking with another job's mark takes nothing out: the model is still detected.
    let other = key(7).mark("job-2");
    let mut wrong = marked.clone();
    for (_, shape, values) in wrong.iter_mut() {
        unmark_tensor(&other, shape, values, a);
    }
    assert!(detect_mem(&mark, &wrong).log10_p() < -9.0);
}

/// A two-hidden-layer MLP: the copy with both hidden layers permuted, the copy written
/// transposed, and the copy permuted, transposed, renamed and reordered are all detected after
/// alignment (informed, against the unmarked model); 8 unrelated models, and 8 permuted and
/// transposed ones, are not.
#[test]
fn permuted_and_transposed_copies_are_detected_after_alignment_and_unrelated_models_are_not() {
    let mark = key(7).mark("job-1");
    let source = mlp(3);
    let mut marked = source.clone();
    embed_mem(&mark, &mut marked);
    let mut rng = StdRng::seed_from_u64(11);
    let mut permuted = marked.clone();
    permute_units(&mut permuted, "fc0", "fc1", &shuffle(&mut rng, 128));
    permute_units(&mut permuted, "fc1", "out", &shuffle(&mut rng, 128));
    let mut disguised = transposed(&permuted);
    for (i, (name, _, _)) in disguised.iter_mut().enumerate() {
        *name = format!("layer_{i}/kernel");
    }
    disguised.reverse();
    for (what, suspect) in [
        ("as published", &marked),
        ("hidden units permuted", &permuted),
        ("transposed", &transposed(&marked)),
        ("permuted, transposed, renamed, reordered", &disguised),
    ] {
        let blind = detect_mem(&mark, suspect);
        let (d, report) = aligned(&mark, suspect, &source);
        eprintln!(
            "{what}: without alignment z = {:.2}, aligned z = {:.2} (log10 p = {:.1}); {report:?}",
            blind.z,
            d.z,
            d.log10_p()
        );
        assert!(d.log10_p() < -9.0, "{what}: {d:?}");
        assert!(report.unpaired_reference.is_empty(), "{what}: {report:?}");
    }
    let mut smallest = 1f64;
    for s in 0..8 {
        let other = mlp(100 + s);
        let mut other_permuted = other.clone();
        permute_units(&mut other_permuted, "fc0", "fc1", &shuffle(&mut rng, 128));
        for m in [&other, &transposed(&other_permuted)] {
            let (d, _) = aligned(&mark, m, &source);
            assert!(d.p_value() > 0.01, "unrelated model {s}: {d:?}");
            smallest = smallest.min(d.p_value());
        }
    }
    eprintln!("16 unrelated models aligned: smallest p = {smallest:.3}");
}

/// Why alignment uses the *unmarked* model: aligned to the marked one, an unrelated model's
/// units are chosen partly for their fit to the pattern, and the blind z of 8 unrelated
/// models drifts well above 0 (the null's mean). Aligned to the unmarked model it does not.
#[test]
fn aligning_to_the_marked_model_would_bias_the_null() {
    let mark = key(7).mark("job-1");
    let source = mlp(3);
    let mut marked = source.clone();
    embed_mem(&mark, &mut marked);
    let blind_after = |suspect: &Model, reference: &Model| {
        let reference = named(reference);
        let (aligned, _) = align_to_reference(&named(suspect), &reference);
        let tensors: Vec<(&[usize], Vec<f32>)> = reference
            .iter()
            .zip(aligned)
            .filter_map(|(r, a)| Some((r.shape.as_slice(), a?)))
            .collect();
        detect_tensors(&mark, tensors.iter().map(|(s, v)| (*s, v.as_slice()))).z
    };
    let (mut to_marked, mut to_clean) = (0.0, 0.0);
    for s in 0..8 {
        let other = mlp(200 + s);
        to_marked += blind_after(&other, &marked) / 8.0;
        to_clean += blind_after(&other, &source) / 8.0;
    }
    eprintln!(
        "mean blind z of 8 unrelated models aligned to the marked model {to_marked:.2}, to the \
         unmarked one {to_clean:.2}"
    );
    assert!(to_marked > to_clean + 1.0, "{to_marked} vs {to_clean}");
    assert!(to_clean.abs() < 1.0, "{to_clean}");
}

/// A small CNN: convolution channels permuted (the next convolution's input channels with
/// them), the second convolution's channels permuted with the blocks of the flattened fully
/// connected layer's columns, and the hidden units of that layer permuted too.
#[test]
fn a_cnn_with_permuted_channels_is_detected_after_alignment() {
    let mut rng = StdRng::seed_from_u64(21);
    let mut gauss = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * scale
            })
            .collect()
    };
    let mut cnn = |scale: f32| -> Model {
        vec![
            ("conv1.weight".into(), vec![16, 1, 3, 3], gauss(144, scale)),
            (
                "conv2.weight".into(),
                vec![32, 16, 3, 3],
                gauss(4608, scale),
            ),
            (
                "fc1.weight".into(),
                vec![64, 32 * 16],
                gauss(64 * 512, scale),
            ),
            ("fc2.weight".into(), vec![10, 64], gauss(640, scale)),
        ]
    };
    let source = cnn(0.1);
    let mark = key(3).mark("job-cnn");
    let mut marked = source.clone();
    embed_mem(&mark, &mut marked);
    let mut rng = StdRng::seed_from_u64(22);
    let mut permuted = marked.clone();
    let p1 = shuffle(&mut rng, 16);
    move_units(&mut permuted, "conv1.weight", 0, 1, &p1);
    move_units(&mut permuted, "conv2.weight", 1, 1, &p1);
    let p2 = shuffle(&mut rng, 32);
    move_units(&mut permuted, "conv2.weight", 0, 1, &p2);
    move_units(&mut permuted, "fc1.weight", 1, 16, &p2);
    let p3 = shuffle(&mut rng, 64);
    move_units(&mut permuted, "fc1.weight", 0, 1, &p3);
    move_units(&mut permuted, "fc2.weight", 1, 1, &p3);
    let blind = detect_mem(&mark, &permuted);
    let (d, report) = aligned(&mark, &permuted, &source);
    eprintln!(
        "CNN, channels and units permuted: without alignment z = {:.2}, aligned z = {:.2} \
         (log10 p = {:.1}); {report:?}",
        blind.z,
        d.z,
        d.log10_p()
    );
    assert!(blind.p_value() > 1e-3, "{blind:?}");
    assert!(d.log10_p() < -9.0, "{d:?}");
    let (d, _) = aligned(&mark, &cnn(0.1), &source);
    assert!(d.p_value() > 0.01, "unrelated CNN: {d:?}");
}

/// The file path the CLI takes: the registry's *published* (marked) model as the reference,
/// unmarked as it is read with the entry's mark and amplitude.
#[test]
fn the_published_model_serves_as_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mark = key(7).mark("job-1");
    let source = mlp(3);
    let mut marked = source.clone();
    let amplitude = embed_mem(&mark, &mut marked);
    let published = dir.path().join("published.safetensors");
    write(&published, &marked, Dtype::F32);
    let mut rng = StdRng::seed_from_u64(12);
    let mut permuted = marked.clone();
    permute_units(&mut permuted, "fc0", "fc1", &shuffle(&mut rng, 128));
    let suspect = dir.path().join("suspect.safetensors");
    write(&suspect, &transposed(&permuted), Dtype::F32);
    let detect = |file: &Path| {
        let mut reference = Reference::open_published(&published, mark.clone(), amplitude).unwrap();
        detect_aligned_marks(file, &mut reference, std::slice::from_ref(&mark))
            .unwrap()
            .0[0]
    };
    let d = detect(&suspect);
    eprintln!(
        "permuted and transposed, against the published model: z = {:.2}, log10 p = {:.1}",
        d.z,
        d.log10_p()
    );
    assert!(d.log10_p() < -9.0, "{d:?}");
    for s in 0..10 {
        let other = dir.path().join(format!("other-{s}.safetensors"));
        write(&other, &mlp(300 + s), Dtype::F32);
        let d = detect(&other);
        assert!(d.p_value() > 0.01, "unrelated model {s}: {d:?}");
    }
    // The streamed informed test (no alignment) reads the published reference unmarked too.
    let mut reference = Reference::open_published(&published, mark.clone(), amplitude).unwrap();
    let d = detect_file_marks_against(
        &published,
        Some(&mut reference),
        std::slice::from_ref(&mark),
    )
    .unwrap()[0];
    assert!(d.log10_p() < -9.0, "{d:?}");
}
