//! The site node's readers on the fuzz corpus. The site node links libtorch, so cargo-fuzz does not
//! build it (see "Fuzzing" in docs/architecture.md); its two readers of outside input are checked
//! here on the corpus the libtorch-free targets grow (`fuzz/corpus/`):
//! - every CSV input of `tabular_reader` through `data::load_csv` (the node's training-data
//!   loader) with the breast-cancer dataset schema: refused with an error, or a consistent table of
//!   finite features;
//! - every safetensors input of `safetensors_file` through `weights::from_safetensors_bytes` (the
//!   node's reader of the global model it receives): whatever the coordinator's reader
//!   (`tutela_protocol::stream::load_model`) accepts, the node reads as the same tensors and metadata.

use std::path::{Path, PathBuf};

use crate::common::data_dir;
use tutela_site_node::data::{DatasetSchema, load_csv};
use tutela_site_node::weights::from_safetensors_bytes;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
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

#[test]
fn csv_inputs_load_or_are_refused() {
    let schema = DatasetSchema::load(data_dir().join("breast_cancer.schema.toml")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut tables = 0;
    for (path, bytes) in corpus("tabular_reader") {
        // The first byte chooses the harness's format: 0 is CSV, 2 gzipped CSV (by file name).
        let Some((choice, records)) = bytes.split_first() else {
            continue;
        };
        let name = match choice % 4 {
            0 => "input.csv",
            2 => "input.csv.gz",
            _ => continue,
        };
        let file = scratch.path().join(name);
        std::fs::write(&file, records).unwrap();
        match load_csv(&file, &schema) {
            Ok(table) => {
                table
                    .check()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(table.n_features, 30, "{}", path.display());
                assert!(
                    table.features.iter().all(|x| x.is_finite()),
                    "{}: a non-finite feature was loaded",
                    path.display()
                );
                tables += 1;
            }
            Err(e) => assert!(
                e.to_string().contains(name),
                "{}: the error does not name the file: {e}",
                path.display()
            ),
        }
    }
    // The seeds made from data/breast_cancer_wisconsin.csv load.
    assert!(tables >= 2, "only {tables} corpus inputs loaded as tables");
}

#[test]
fn the_node_reads_every_model_the_coordinator_reads() {
    let scratch = tempfile::tempdir().unwrap();
    let mut models = 0;
    for (path, bytes) in corpus("safetensors_file") {
        let file = scratch.path().join("input.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        let node = from_safetensors_bytes(&bytes, &file);
        let Ok((manifest, data)) = tutela_protocol::stream::load_model(&file) else {
            continue;
        };
        let (tensors, metadata) =
            node.unwrap_or_else(|e| panic!("{}: the node refuses: {e}", path.display()));
        let mut coordinator: Vec<_> = manifest.tensors().iter().cloned().zip(data).collect();
        coordinator.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        assert!(tensors == coordinator, "{}: other tensors", path.display());
        assert_eq!(metadata, manifest.metadata, "{}", path.display());
        models += 1;
    }
    assert!(models >= 2, "only {models} corpus inputs read as models");
}
