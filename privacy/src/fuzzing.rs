//! Fuzz harnesses (feature `fuzzing`): what the `tabular_reader` target in `fuzz/` runs on every
//! input, and what `tests/integration/fuzz_corpus.rs` replays `fuzz/corpus/tabular_reader/`
//! through under `cargo test`.
//!
//! [`tabular`] reads its input as a site's raw records, CSV or JSON Lines, plain or gzipped, against
//! one of two schemas (the first byte chooses both): [`MIXED_SCHEMA`], a column of every type, or
//! [`breast_cancer_schema`], the columns of `data/breast_cancer_wisconsin.csv`. Properties checked,
//! beyond "no panic, no hang, memory bounded by the input":
//! - a table that is read has one cell per declared column in every row, each of its column's
//!   type or null, floats finite;
//! - a refusal names the file it is about (`ReadError`'s `Display` starts with the path), and a
//!   line number when it is about a line (counted from 1);
//! - what the CSV reader reads, written as JSON Lines, the JSON Lines reader reads back the same.

use std::path::Path;
use std::sync::OnceLock;

use crate::anonymize::reader::{read_csv, read_file, read_jsonl};
use crate::anonymize::{ColumnType, ReadError, Schema, Table, Value};

/// One of the two schemas inputs are read against: a column of each type and several roles.
pub const MIXED_SCHEMA: &str = r#"
[[column]]
name = "patient_id"
role = "direct_identifier"
type = "text"
[[column]]
name = "age"
role = "quasi_identifier"
type = "int"
[[column]]
name = "admitted"
role = "quasi_identifier"
type = "date"
[[column]]
name = "x"
role = "feature"
type = "float"
[[column]]
name = "notes"
role = "free_text"
type = "text"
"#;

/// The columns of `data/breast_cancer_wisconsin.csv`, in file order.
pub const BREAST_CANCER_COLUMNS: [&str; 31] = [
    "mean_radius",
    "mean_texture",
    "mean_perimeter",
    "mean_area",
    "mean_smoothness",
    "mean_compactness",
    "mean_concavity",
    "mean_concave_points",
    "mean_symmetry",
    "mean_fractal_dimension",
    "radius_error",
    "texture_error",
    "perimeter_error",
    "area_error",
    "smoothness_error",
    "compactness_error",
    "concavity_error",
    "concave_points_error",
    "symmetry_error",
    "fractal_dimension_error",
    "worst_radius",
    "worst_texture",
    "worst_perimeter",
    "worst_area",
    "worst_smoothness",
    "worst_compactness",
    "worst_concavity",
    "worst_concave_points",
    "worst_symmetry",
    "worst_fractal_dimension",
    "diagnosis",
];

/// The schema of `data/breast_cancer_wisconsin.csv`: 30 float features and a text label.
pub fn breast_cancer_schema() -> String {
    BREAST_CANCER_COLUMNS
        .iter()
        .map(|name| {
            let (role, ty) = if *name == "diagnosis" {
                ("label", "text")
            } else {
                ("feature", "float")
            };
            format!("[[column]]\nname = \"{name}\"\nrole = \"{role}\"\ntype = \"{ty}\"\n")
        })
        .collect()
}

/// How the bytes after the first are read: the first byte modulo 4 chooses the format, its bit 2
/// the schema ([`MIXED_SCHEMA`] when clear, [`breast_cancer_schema`] when set).
const ORIGINS: [&str; 4] = ["raw.csv", "raw.jsonl", "raw.csv.gz", "raw.jsonl.gz"];

/// Reads `data[1..]` as raw records in the format and against the schema `data[0]` chooses.
pub fn tabular(data: &[u8]) {
    let Some((&choice, records)) = data.split_first() else {
        return;
    };
    // Parsed once per process: parsing them took most of an input's time.
    static SCHEMAS: OnceLock<[Schema; 2]> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        [MIXED_SCHEMA.to_string(), breast_cancer_schema()].map(|text| {
            Schema::from_toml(&text)
                .unwrap_or_else(|e| panic!("the harness's schema is invalid: {e}"))
        })
    });
    let schema = &schemas[usize::from(choice & 4 != 0)];
    let origin = Path::new(ORIGINS[choice as usize % ORIGINS.len()]);
    let result = match choice % 4 {
        0 => read_csv(records, origin, schema),
        1 => read_jsonl(records, origin, schema),
        _ => {
            // Through a file, as a site reads a gzipped export.
            let dir = match tempfile::tempdir() {
                Ok(d) => d,
                Err(e) => panic!("cannot make a scratch directory: {e}"),
            };
            let path = dir.path().join(origin);
            if let Err(e) = std::fs::write(&path, records) {
                panic!("cannot write the scratch file: {e}");
            }
            read_file(&path, None, schema).map_err(|e| relabel(e, &path, origin))
        }
    };
    match result {
        Ok(table) => {
            check_table(&table, schema);
            if choice % 2 == 0 {
                check_jsonl_reads_back(&table, schema);
            }
        }
        Err(e) => check_error(&e, origin),
    }
}

/// The error as if `origin` had been read, so that its message can be checked the same way.
fn relabel(e: ReadError, path: &Path, origin: &Path) -> ReadError {
    match e {
        ReadError::Io { path: p, source } if p == path => ReadError::Io {
            path: origin.to_path_buf(),
            source,
        },
        ReadError::Empty { path: p } if p == path => ReadError::Empty {
            path: origin.to_path_buf(),
        },
        ReadError::Bad {
            path: p,
            line,
            column,
            kind,
            reason,
        } if p == path => ReadError::Bad {
            path: origin.to_path_buf(),
            line,
            column,
            kind,
            reason,
        },
        other => other,
    }
}

fn check_table(table: &Table, schema: &Schema) {
    for (r, row) in table.rows.iter().enumerate() {
        assert_eq!(
            row.len(),
            schema.columns.len(),
            "row {r} has another width than the schema"
        );
        for (cell, column) in row.iter().zip(&schema.columns) {
            let fits = match (cell, column.ty) {
                (Value::Null, _) => true,
                (Value::Int(_), ColumnType::Int) => true,
                (Value::Float(x), ColumnType::Float) => x.is_finite(),
                (Value::Text(_), ColumnType::Text) => true,
                (Value::Date(_), ColumnType::Date) => true,
                _ => false,
            };
            assert!(
                fits,
                "row {r}, column `{}`: a {} cell in a {:?} column",
                column.name,
                cell.kind(),
                column.ty
            );
        }
    }
}

fn check_error(e: &ReadError, origin: &Path) {
    let message = e.to_string();
    assert!(
        message.starts_with(&origin.display().to_string()),
        "an error does not name the file it is about: {message}"
    );
    if let ReadError::Bad { line, .. } = e {
        assert!(*line >= 1, "an error names line {line}: {message}");
    }
}

/// The table written as JSON Lines reads back as the same rows.
fn check_jsonl_reads_back(table: &Table, schema: &Schema) {
    let mut text = String::new();
    for row in &table.rows {
        let object: serde_json::Map<String, serde_json::Value> = schema
            .columns
            .iter()
            .zip(row)
            .map(|(column, cell)| {
                let json = match cell {
                    Value::Null => serde_json::Value::Null,
                    Value::Int(i) => serde_json::Value::from(*i),
                    Value::Float(x) => serde_json::Value::from(*x),
                    Value::Text(s) => serde_json::Value::from(s.as_str()),
                    Value::Date(d) => serde_json::Value::from(d.to_string()),
                };
                (column.name.clone(), json)
            })
            .collect();
        text.push_str(&serde_json::Value::Object(object).to_string());
        text.push('\n');
    }
    match read_jsonl(text.as_bytes(), Path::new("written.jsonl"), schema) {
        Ok(back) => assert!(
            back.rows == table.rows,
            "a table read from CSV, written as JSON Lines, reads back other rows"
        ),
        Err(e) => panic!("a table read from CSV, written as JSON Lines, is refused: {e}"),
    }
}
