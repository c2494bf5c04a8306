//! Safetensors files as Tutela reads them back: [`load_model`] (the coordinator's reader of the
//! models it stores and serves, through [`crate::stream::SafetensorsFileSource`]) and the
//! `safetensors` crate's parser, which the site node's reader (`from_safetensors_bytes`, in a crate
//! that links libtorch and so is not built here) delegates to.
//!
//! Properties checked, beyond "no panic, no hang, memory bounded by the input":
//! - a file the coordinator's reader accepts, the site node's parser accepts with the same
//!   tensors (name, dtype, shape, bytes) and metadata;
//! - writing what was read ([`store_model`], the same writer as the file sink) and reading it again
//!   gives the same manifest, in the same order, the same bytes, and the stream digest the file is
//!   named by: what the coordinator serves from a stored file is what it stored.

use std::collections::BTreeMap;
use std::path::Path;

use crate::stream::{StreamDigest, load_model, store_model};
use crate::tensor::{DType, Manifest};

/// Reads `data` as a safetensors file.
pub fn read(data: &[u8]) {
    let dir = super::stream::scratch_dir();
    let path = dir.path().join("input.safetensors");
    if let Err(e) = std::fs::write(&path, data) {
        panic!("cannot write the scratch file: {e}");
    }
    let Ok((manifest, tensors)) = load_model(&path) else {
        return;
    };
    for (i, t) in tensors.iter().enumerate() {
        assert_eq!(
            t.len() as u64,
            manifest.byte_len(i),
            "tensor {:?} was read with a length other than its shape's",
            manifest.tensors()[i].name
        );
    }
    check_site_reader_agrees(data, &manifest, &tensors);
    let slices: Vec<&[u8]> = tensors.iter().map(Vec::as_slice).collect();
    let stored = dir.path().join("stored");
    if let Err(e) = std::fs::create_dir(&stored) {
        panic!("cannot make a scratch directory: {e}");
    }
    match store_model(&stored, &manifest, &slices) {
        Ok((digest, path)) => check_stored_model(&path, &manifest, &slices, &digest),
        Err(e) => panic!("a model read from a safetensors file cannot be stored again: {e}"),
    }
}

/// Checks a model file the file sink (or [`store_model`]) wrote for `manifest` and `tensors`:
/// read back, it is the same model with the same stream digest, and the site node's parser reads
/// the same tensors.
pub fn check_stored_model(path: &Path, manifest: &Manifest, tensors: &[&[u8]], digest: &[u8; 32]) {
    let (read_manifest, read_tensors) = match load_model(path) {
        Ok(read) => read,
        Err(e) => panic!("a stored model cannot be read back: {e}"),
    };
    assert_eq!(
        &read_manifest, manifest,
        "a stored model reads back with another manifest (order, names, dtypes, shapes or metadata)"
    );
    assert!(
        read_tensors
            .iter()
            .map(Vec::as_slice)
            .eq(tensors.iter().copied()),
        "a stored model reads back with other bytes"
    );
    let mut again = StreamDigest::new(&read_manifest);
    for t in &read_tensors {
        again.update(t);
    }
    assert_eq!(
        &again.finish(),
        digest,
        "a stored model is served with another stream digest than the one it is named by"
    );
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => panic!("cannot read the stored model: {e}"),
    };
    let owned: Vec<Vec<u8>> = tensors.iter().map(|t| t.to_vec()).collect();
    check_site_reader_agrees(&bytes, manifest, &owned);
}

/// The `safetensors` crate's parser (the site node's reader) reads `bytes` as the same tensors.
fn check_site_reader_agrees(bytes: &[u8], manifest: &Manifest, tensors: &[Vec<u8>]) {
    let parsed = match safetensors::SafeTensors::deserialize(bytes) {
        Ok(p) => p,
        Err(e) => panic!("the coordinator reads a safetensors file the site node refuses: {e}"),
    };
    let mut site: Vec<(String, DType, Vec<u64>, &[u8])> = Vec::new();
    for (name, view) in parsed.tensors() {
        let Some(dtype) = DType::from_safetensors(view.dtype()) else {
            panic!("the coordinator read tensor {name:?} whose dtype the site node does not carry");
        };
        let shape = view.shape().iter().map(|&d| d as u64).collect();
        site.push((name, dtype, shape, view.data()));
    }
    site.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ours: Vec<(String, DType, Vec<u64>, &[u8])> = manifest
        .tensors()
        .iter()
        .zip(tensors)
        .map(|(t, d)| (t.name.clone(), t.dtype, t.shape.clone(), d.as_slice()))
        .collect();
    ours.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        site == ours,
        "the site node's parser reads other tensors than the coordinator's reader"
    );
    let (_, header) = match safetensors::SafeTensors::read_metadata(bytes) {
        Ok(h) => h,
        Err(e) => panic!("the site node's parser cannot read the header it just read: {e}"),
    };
    let site_metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    assert_eq!(
        site_metadata, manifest.metadata,
        "the site node's parser reads other metadata than the coordinator's reader"
    );
}

/// The names of the files in `dir` (for "nothing left behind" checks).
pub(crate) fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    }
}
