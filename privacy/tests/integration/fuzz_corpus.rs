//! The fuzz corpus under `cargo test`: every file of `fuzz/corpus/tabular_reader/` (seeds made from
//! `data/` and synthetic rows, what the fuzzer kept, and every crash it found, minimized) replayed
//! through the harness the `tabular_reader` target runs (`tutela_privacy::fuzzing::tabular`), so
//! that CI checks them whether or not cargo-fuzz is installed. A failure names the corpus file;
//! reproduce it with `cargo fuzz run tabular_reader fuzz/corpus/tabular_reader/<file>` (from `fuzz/`).

use std::path::{Path, PathBuf};

#[test]
fn tabular_reader_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tabular_reader");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for path in files {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(panic) = std::panic::catch_unwind(|| tutela_privacy::fuzzing::tabular(&bytes)) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{}: {why}", path.display());
        }
    }
}

/// The seeds read as tables (not only refused): the harness's schemas fit the rows they were made
/// from, so the corpus starts inside the readers' accepting paths.
#[test]
fn seeds_are_read_as_tables() {
    use tutela_privacy::anonymize::Schema;
    use tutela_privacy::anonymize::reader::{read_csv, read_jsonl};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tabular_reader");
    for (name, rows) in [
        ("seed-breast-cancer-rows.csv", 3),
        ("seed-breast-cancer-rows.jsonl", 3),
        ("seed-mixed-rows.csv", 3),
        ("seed-mixed-rows.jsonl", 2),
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let (choice, records) = bytes.split_first().unwrap();
        let schema = if choice & 4 == 0 {
            tutela_privacy::fuzzing::MIXED_SCHEMA.to_string()
        } else {
            tutela_privacy::fuzzing::breast_cancer_schema()
        };
        let schema = Schema::from_toml(&schema).unwrap();
        let table = if choice % 2 == 0 {
            read_csv(records, Path::new(name), &schema)
        } else {
            read_jsonl(records, Path::new(name), &schema)
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(table.rows.len(), rows, "{name}");
    }
}
