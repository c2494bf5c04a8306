//! A dataset's records as the pipeline reads them, turned into a [`RecordSketch`]: the one
//! place a budget's data is read for its identity, whatever its source (CSV, JSON Lines,
//! Parquet, a PostgreSQL query, a text file or a directory of documents).
//!
//! Each cell is hashed in a canonical form, so that the spellings one record gets from
//! two exports are one record: text trimmed, case-folded and its runs of whitespace made one
//! space; text that reads as a finite number, and every number, as that number's shortest
//! decimal (`7`, `7.0`, `007`, a Parquet `7` and PostgreSQL's `7.00` are one key); booleans as
//! `true`/`false`; dates as `YYYY-MM-DD`; a missing cell is no part of the record. A document of
//! a text dataset is one record: its text, normalised the same way.
//!
//! Reading here never names a path or a value in the error it returns (a refusal that may leave
//! the site is built from it); what went wrong is logged in the site's own log.

use std::path::{Path, PathBuf};

use tutela_privacy::anonymize::{Schema, Value};

use super::IdentityError;
use super::sketch::{CellHasher, NUMBER_TAG, RecordSketch, SketchBuilder, TEXT_TAG};
use crate::config::DatasetConfig;
use crate::data::source::{self, SourceKind};
use crate::data::{Cell, DataError};
use crate::lm::text_source::{TextSource, TextSourceError};

/// Where a dataset's records come from, for its budget's identity.
#[derive(Debug, Clone)]
pub enum BudgetSource {
    /// A table (`[datasets.<name>]`): a file or a query, with its column declaration if any.
    Table { config: DatasetConfig },
    /// A text dataset (`[text_datasets.<name>]`): a file or a directory of documents.
    Text { source: TextSource },
}

/// What says whether a source changed since its sketch was taken: its files' lengths and
/// modification times. A query has none (its sketch is kept while the node runs, as the records
/// it trains on are: [`crate::dataset::SiteDataset::load`] reads a dataset once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Vec<(PathBuf, u64, Option<std::time::SystemTime>)>);

impl BudgetSource {
    /// A plain table file (no column declaration), its format from its name: tests and tools.
    pub fn table_file(path: impl Into<PathBuf>) -> Self {
        BudgetSource::Table {
            config: DatasetConfig {
                path: path.into(),
                ..DatasetConfig::default()
            },
        }
    }

    /// The one file whose bytes the prefix fingerprint covers, if the data is one file.
    pub fn file(&self) -> Option<&Path> {
        match self {
            BudgetSource::Table { config } if config.postgres.is_none() => Some(&config.path),
            BudgetSource::Text { source } if !source.path.is_dir() => Some(&source.path),
            _ => None,
        }
    }

    /// The source's stamp now; `None` for a query. An error when a file cannot be read.
    pub fn stamp(&self) -> std::io::Result<Option<Stamp>> {
        let path = match self {
            BudgetSource::Table { config } if config.postgres.is_some() => return Ok(None),
            BudgetSource::Table { config } => &config.path,
            BudgetSource::Text { source } => &source.path,
        };
        let meta = std::fs::metadata(path)?;
        let mut stamp = vec![(path.clone(), meta.len(), meta.modified().ok())];
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                let entry = entry?;
                let m = entry.metadata()?;
                stamp.push((entry.path(), m.len(), m.modified().ok()));
            }
            stamp.sort();
        }
        Ok(Some(Stamp(stamp)))
    }

    /// Reads every record and sketches them.
    pub fn sketch(&self, dataset: &str) -> Result<RecordSketch, IdentityError> {
        match self {
            BudgetSource::Table { config } => sketch_table(dataset, config),
            BudgetSource::Text { source } => sketch_text(dataset, source),
        }
    }
}

/// A text cell's hash: trimmed, text that reads as a finite number as that number, other text
/// case-folded with its whitespace runs made one space; `None` when empty.
fn text_hash(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(x) = text.parse::<f64>()
        && x.is_finite()
    {
        return Some(number_hash(x));
    }
    Some(words_hash(text))
}

/// The hash of `text` case-folded, its whitespace runs one space (streamed: no copy).
pub fn words_hash(text: &str) -> u64 {
    let mut h = CellHasher::new(TEXT_TAG);
    let mut buf = [0u8; 4];
    for (i, word) in text.split_whitespace().enumerate() {
        if i > 0 {
            h.write(b" ");
        }
        for c in word.chars().flat_map(char::to_lowercase) {
            h.write(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    h.finish()
}

/// A finite number's hash, by value (-0 is 0): `7`, `7.0`, `007` and a typed 7 are one.
fn number_hash(x: f64) -> u64 {
    let x = if x == 0.0 { 0.0 } else { x };
    let mut h = CellHasher::new(NUMBER_TAG);
    h.write(&x.to_bits().to_le_bytes());
    h.finish()
}

/// A source cell's hash (see the module documentation).
pub fn cell_hash(cell: Cell<'_>) -> Option<u64> {
    match cell {
        Cell::Missing => None,
        Cell::Text(t) => text_hash(t),
        Cell::Number(x) if x.is_finite() => Some(number_hash(x)),
        Cell::Number(x) => Some(words_hash(&x.to_string())),
        Cell::Bool(b) => Some(words_hash(if b { "true" } else { "false" })),
        Cell::Date(d) => Some(words_hash(&d.to_string())),
    }
}

/// A declared column's value's hash: as the same cell read undeclared.
pub fn value_hash(value: &Value) -> Option<u64> {
    match value {
        Value::Null => None,
        Value::Int(i) => Some(number_hash(*i as f64)),
        Value::Float(x) => cell_hash(Cell::Number(*x)),
        Value::Text(t) => text_hash(t),
        Value::Date(d) => Some(words_hash(&d.to_string())),
    }
}

/// The error for records that cannot be read: the kind of an I/O error, else only that they
/// could not be read (the details, which name the file and line, go to the site's log).
fn unreadable(dataset: &str, e: &DataError) -> IdentityError {
    let io = match e {
        DataError::Io { source, .. } => Some(source.kind()),
        _ => None,
    };
    match io {
        Some(kind) => IdentityError::Source {
            dataset: dataset.to_string(),
            kind,
        },
        None => {
            tracing::warn!(dataset, error = %e, "the dataset's records could not be read to find its privacy budget");
            IdentityError::Records {
                dataset: dataset.to_string(),
            }
        }
    }
}

fn sketch_table(dataset: &str, config: &DatasetConfig) -> Result<RecordSketch, IdentityError> {
    let err = |e: DataError| unreadable(dataset, &e);
    let mut builder = SketchBuilder::new();
    match &config.columns {
        // A declared dataset's raw records, before anonymization: what identifies the people
        // (the anonymization's salt or settings must not make the same people new data).
        Some(columns_path) => {
            let text = std::fs::read_to_string(columns_path).map_err(|source| {
                err(DataError::Io {
                    path: columns_path.clone(),
                    source,
                })
            })?;
            let columns = Schema::from_toml(&text).map_err(|e| {
                err(DataError::Source {
                    origin: dataset.to_string(),
                    reason: e.to_string(),
                })
            })?;
            let table = source::raw::read_raw(dataset, config, &columns).map_err(err)?;
            for row in &table.rows {
                builder.add_record(row.iter().map(value_hash));
            }
        }
        None => {
            if let SourceKind::File(_) = SourceKind::of(config) {
                // Opened first so that a file gone is an I/O error with its kind.
                std::fs::metadata(&config.path).map_err(|source| {
                    err(DataError::Io {
                        path: config.path.clone(),
                        source,
                    })
                })?;
            }
            let mut records = source::open(dataset, config).map_err(err)?;
            while let Some((_, record)) = records.next_record().map_err(err)? {
                builder.add_record((0..record.len()).map(|i| cell_hash(record.cell(i))));
            }
        }
    }
    Ok(builder.finish())
}

fn sketch_text(dataset: &str, source: &TextSource) -> Result<RecordSketch, IdentityError> {
    let documents = source.read().map_err(|e| match &e {
        TextSourceError::Io { source, .. } => IdentityError::Source {
            dataset: dataset.to_string(),
            kind: source.kind(),
        },
        _ => {
            tracing::warn!(dataset, error = %e, "the text dataset's documents could not be read to find its privacy budget");
            IdentityError::Records {
                dataset: dataset.to_string(),
            }
        }
    })?;
    let mut builder = SketchBuilder::new();
    for d in &documents {
        if d.text.split_whitespace().next().is_some() {
            builder.add_single(words_hash(&d.text));
        }
    }
    Ok(builder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_cell_are_one_key() {
        for (a, b) in [
            (Cell::Text(" 7.0"), Cell::Number(7.0)),
            (Cell::Text("007"), Cell::Text("7")),
            (Cell::Text("-0"), Cell::Number(0.0)),
            (Cell::Text("Jane  DOE"), Cell::Text("jane doe")),
            (Cell::Text("TRUE"), Cell::Bool(true)),
            (Cell::Text("NaN"), Cell::Number(f64::NAN)),
        ] {
            assert_eq!(cell_hash(a), cell_hash(b), "{a:?} vs {b:?}");
        }
        assert_eq!(cell_hash(Cell::Text("  ")), None);
        assert_eq!(value_hash(&Value::Int(7)), cell_hash(Cell::Text("7.00")));
        assert_eq!(
            value_hash(&Value::Text("0042".into())),
            cell_hash(Cell::Number(42.0))
        );
        let date = tutela_privacy::anonymize::Date::from_ymd(2020, 1, 5).unwrap();
        assert_eq!(
            value_hash(&Value::Date(date)),
            cell_hash(Cell::Text("2020-01-05"))
        );
        assert_eq!(
            cell_hash(Cell::Date(date)),
            cell_hash(Cell::Text("2020-01-05"))
        );
        assert_ne!(cell_hash(Cell::Text("7.5")), cell_hash(Cell::Text("7")));
        // A number and the text of another spelling never meet by accident of tags.
        assert_ne!(cell_hash(Cell::Text("seven")), cell_hash(Cell::Number(7.0)));
    }
}
