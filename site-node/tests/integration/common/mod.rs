//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use tutela_site_node::data::{DatasetSchema, Table, load_csv};

/// The venv's python (scripts/setup-torch.sh installs safetensors, numpy, tokenizers and
/// transformers there), or `$TUTELA_PYTHON`.
pub fn python() -> PathBuf {
    std::env::var_os("TUTELA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// The repository's `data/` directory.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data")
}

pub fn breast_cancer() -> (DatasetSchema, Table) {
    let dir = data_dir();
    let schema = DatasetSchema::load(dir.join("breast_cancer.schema.toml")).unwrap();
    let table = load_csv(dir.join("breast_cancer_wisconsin.csv"), &schema).unwrap();
    (schema, table)
}

/// MNIST is parsed once per test binary: 3.9 million fields are slow in a debug build.
pub fn mnist() -> (DatasetSchema, Table) {
    static MNIST: OnceLock<(DatasetSchema, Table)> = OnceLock::new();
    MNIST
        .get_or_init(|| {
            let dir = data_dir();
            let schema = DatasetSchema::load(dir.join("mnist.schema.toml")).unwrap();
            let table = load_csv(dir.join("mnist_5k.csv.gz"), &schema).unwrap();
            (schema, table)
        })
        .clone()
}

/// A table whose single feature is the row's index, so tests can tell which rows went where.
pub fn numbered_table(labels: &[i64], n_classes: usize) -> Table {
    Table {
        features: (0..labels.len()).map(|i| i as f32).collect(),
        n_rows: labels.len(),
        n_features: 1,
        labels: labels.to_vec(),
        feature_names: vec!["row".into()],
        class_names: (0..n_classes).map(|c| format!("class{c}")).collect(),
    }
}

/// The row numbers of a [`numbered_table`] (or a selection of one).
pub fn row_ids(table: &Table) -> Vec<usize> {
    table.features.iter().map(|&x| x as usize).collect()
}
