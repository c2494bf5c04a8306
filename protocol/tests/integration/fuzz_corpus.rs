//! The fuzz corpus under `cargo test`: every file of `fuzz/corpus/<target>/` (seeds made from real
//! inputs, what the fuzzer kept, and every crash it found, minimized) replayed through the harness
//! its target runs (`tutela_protocol::fuzzing`), so that CI checks them on every run whether or
//! not cargo-fuzz is installed. A failure names the corpus file; reproduce it with
//! `cargo fuzz run <target> fuzz/corpus/<target>/<file>` (from `fuzz/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tutela_protocol::fuzzing::{job, safetensors_file, stream};
use tutela_protocol::pb::tensor_frame::Frame;
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

/// `fuzz/corpus/<target>/`'s files, sorted by name.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

/// Runs `harness` on every file of the target's corpus; a panic names the file.
pub fn replay(target: &str, harness: fn(&[u8])) {
    for (path, bytes) in corpus(target) {
        if let Err(panic) = std::panic::catch_unwind(|| harness(&bytes)) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{}: {why}", path.display());
        }
    }
}

#[test]
fn stream_frames_corpus() {
    replay("stream_frames", stream::frames);
}

#[test]
fn stream_wire_corpus() {
    replay("stream_wire", stream::wire_bytes);
}

#[test]
fn safetensors_file_corpus() {
    replay("safetensors_file", safetensors_file::read);
}

#[test]
fn job_spec_corpus() {
    replay("job_spec", job::spec);
}

/// A small model like the ones the streaming tests send: several dtypes, an empty tensor, a scalar,
/// metadata.
fn small_model() -> (Manifest, Vec<Vec<u8>>) {
    let tensors = vec![
        (TensorSpec::new("fc1.weight", DType::F32, vec![2, 3]), 24),
        (TensorSpec::new("fc1.bias", DType::BF16, vec![3]), 6),
        (TensorSpec::new("empty", DType::F64, vec![0, 4]), 0),
        (TensorSpec::new("step", DType::I64, vec![]), 8),
        (TensorSpec::new("mask", DType::Bool, vec![5]), 5),
    ];
    let data = tensors
        .iter()
        .enumerate()
        .map(|(i, (_, n))| (0..*n).map(|k| (k * 7 + i) as u8).collect())
        .collect();
    let manifest = Manifest::new(
        tensors.into_iter().map(|(s, _)| s).collect(),
        BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
    .expect("a valid manifest");
    (manifest, data)
}

/// The seeds made from real inputs: a real tensor stream as the encoder sends it (whole, and cut
/// short), the file the sink stores for it, and the repository's job specs. Each must pass its
/// harness; with `TUTELA_WRITE_FUZZ_SEEDS=1` they are (re)written into `fuzz/corpus/`.
#[test]
fn seeds_from_real_inputs_pass_their_harnesses() {
    let (manifest, data) = small_model();
    let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let frames = stream::well_formed_frames(&manifest, &slices, 7);
    assert!(matches!(
        frames.last().and_then(|f| f.frame.as_ref()),
        Some(Frame::Trailer(_))
    ));
    let model: Vec<(TensorSpec, Vec<u8>)> = manifest
        .tensors()
        .iter()
        .cloned()
        .zip(data.iter().cloned())
        .collect();
    stream::check_frames(&frames, Some(&model));
    let whole = stream::encode_wire(&frames);
    let cut_short = stream::encode_wire(&frames[..frames.len() - 1]);

    let dir = tempfile::tempdir().unwrap();
    let (_, stored) = tutela_protocol::stream::store_model(dir.path(), &manifest, &slices).unwrap();
    let stored = std::fs::read(stored).unwrap();

    let jobs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/jobs");
    let mut specs = Vec::new();
    for entry in std::fs::read_dir(&jobs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            specs.push((format!("seed-{name}"), std::fs::read(&path).unwrap()));
        }
    }
    assert!(!specs.is_empty(), "no job specs in {}", jobs.display());

    type Seed = (&'static str, String, Vec<u8>, fn(&[u8]));
    let seeds: Vec<Seed> = [
        (
            "stream_wire",
            "seed-small-model".to_string(),
            whole,
            stream::wire_bytes as fn(&[u8]),
        ),
        (
            "stream_wire",
            "seed-small-model-no-trailer".to_string(),
            cut_short,
            stream::wire_bytes,
        ),
        (
            "safetensors_file",
            "seed-small-model.safetensors".to_string(),
            stored,
            safetensors_file::read,
        ),
    ]
    .into_iter()
    .chain(
        specs
            .into_iter()
            .map(|(name, bytes)| ("job_spec", name, bytes, job::spec as fn(&[u8]))),
    )
    .collect();
    let write = std::env::var_os("TUTELA_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes, harness) in seeds {
        harness(&bytes);
        if write {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus")
                .join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
