//! Record sources: one [`RecordSource`] implementation per kind of input, chosen in one place,
//! [`open`]. Every source gives the same records for the same data (a header of column names, then
//! records of [`Cell`]s), so the schema's encoding ([`super::read_table`]) and the anonymization
//! pipeline ([`raw::raw_table`]) do not know where a record came from.
//!
//! - [`csv::CsvSource`]: CSV with a header line, gzip-compressed when the name ends in `.gz`;
//! - [`parquet::ParquetSource`]: a Parquet file, read batch by batch;
//! - [`postgres::fetch`]: a SQL query against the site's PostgreSQL, in a read-only transaction;
//! - [`CellsSource`]: records already decoded (a query's rows, an anonymized table).
//!
//! JSON Lines is read by the anonymization pipeline's reader (it needs a column declaration).
//!
//! Records are numbered as lines: the header is line 1 and the first record line 2, for every
//! source, so an error in a Parquet file or a query names the line the record would have in a CSV
//! export of the same table.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tutela_privacy::anonymize::RecordFormat;

use super::DataError;
use super::encode::{Cell, OwnedCell};
use crate::config::DatasetConfig;

pub mod csv;
pub mod parquet;
pub mod postgres;
pub mod raw;

/// One record, borrowed from its source until the next is read.
pub enum Record<'a> {
    Text(&'a ::csv::StringRecord),
    Cells(&'a [OwnedCell]),
}

impl Record<'_> {
    pub fn len(&self) -> usize {
        match self {
            Record::Text(r) => r.len(),
            Record::Cells(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cell `i` (missing past the end).
    pub fn cell(&self, i: usize) -> Cell<'_> {
        match self {
            Record::Text(r) => r.get(i).map_or(Cell::Missing, Cell::text),
            Record::Cells(c) => c.get(i).map_or(Cell::Missing, OwnedCell::as_cell),
        }
    }
}

/// Where a dataset's records come from.
pub trait RecordSource {
    /// The file, or `postgres:<dataset>` for a query; names the source in errors.
    fn origin(&self) -> &Path;
    /// The column names, in record order.
    fn header(&self) -> &[String];
    /// The next record and its line number (the header is line 1), or `None` at the end. An
    /// error here ends the read (the source cannot find the next record boundary).
    fn next_record(&mut self) -> Result<Option<(u64, Record<'_>)>, DataError>;
}

/// The formats of a dataset file (`format` in node.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    /// JSON Lines: needs a column declaration (`columns`).
    Jsonl,
    Parquet,
}

impl FileFormat {
    /// The format a file name implies: `.parquet`/`.parq` is Parquet, `.jsonl`/`.ndjson`
    /// (optionally `.gz`) JSON Lines, anything else CSV.
    pub fn from_path(path: &Path) -> FileFormat {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if name.ends_with(".parquet") || name.ends_with(".parq") {
            return FileFormat::Parquet;
        }
        match RecordFormat::from_path(path) {
            RecordFormat::Csv => FileFormat::Csv,
            RecordFormat::Jsonl => FileFormat::Jsonl,
        }
    }

    /// The anonymization reader's format, for the text formats it reads itself.
    pub fn text_format(self) -> Option<RecordFormat> {
        match self {
            FileFormat::Csv => Some(RecordFormat::Csv),
            FileFormat::Jsonl => Some(RecordFormat::Jsonl),
            FileFormat::Parquet => None,
        }
    }
}

/// Where a configured dataset's records are: a file in a format, or a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File(FileFormat),
    Postgres,
}

impl SourceKind {
    pub fn of(config: &DatasetConfig) -> SourceKind {
        match &config.postgres {
            Some(_) => SourceKind::Postgres,
            None => SourceKind::File(
                config
                    .format
                    .unwrap_or_else(|| FileFormat::from_path(&config.path)),
            ),
        }
    }
}

/// The name a query source goes by in errors and logs: never its URL.
pub fn postgres_origin(dataset: &str) -> PathBuf {
    PathBuf::from(format!("postgres:{dataset}"))
}

/// Opens a configured dataset's records: the one place a source is chosen. JSON Lines has no
/// source of its own here (it is read through the column declaration, [`raw::read_raw`]).
pub fn open(dataset: &str, config: &DatasetConfig) -> Result<Box<dyn RecordSource>, DataError> {
    match SourceKind::of(config) {
        SourceKind::File(FileFormat::Csv) => Ok(Box::new(csv::CsvSource::open(&config.path)?)),
        SourceKind::File(FileFormat::Parquet) => {
            Ok(Box::new(parquet::ParquetSource::open(&config.path)?))
        }
        SourceKind::File(FileFormat::Jsonl) => Err(DataError::SchemaInvalid {
            path: config.path.clone(),
            reason: "JSON Lines needs `columns`, the declaration of the file's columns".into(),
        }),
        SourceKind::Postgres => match &config.postgres {
            Some(query) => Ok(Box::new(postgres::fetch(dataset, query)?)),
            None => Err(DataError::Source {
                origin: dataset.to_string(),
                reason: "no [postgres] table".into(),
            }),
        },
    }
}

/// Records already decoded, numbered from line 2.
pub struct CellsSource {
    origin: PathBuf,
    header: Vec<String>,
    rows: std::vec::IntoIter<Vec<OwnedCell>>,
    current: Vec<OwnedCell>,
    line: u64,
}

impl CellsSource {
    pub fn new(origin: PathBuf, header: Vec<String>, rows: Vec<Vec<OwnedCell>>) -> Self {
        CellsSource {
            origin,
            header,
            rows: rows.into_iter(),
            current: Vec::new(),
            line: 1,
        }
    }
}

impl RecordSource for CellsSource {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn header(&self) -> &[String] {
        &self.header
    }

    fn next_record(&mut self) -> Result<Option<(u64, Record<'_>)>, DataError> {
        match self.rows.next() {
            None => Ok(None),
            Some(row) => {
                self.current = row;
                self.line += 1;
                Ok(Some((self.line, Record::Cells(&self.current))))
            }
        }
    }
}

/// A single-precision float as the number its shortest decimal text is (`0.1f32` as 0.1, not
/// 0.10000000149011612), so a `float4`/Parquet float32 cell matches the level or category a
/// CSV export of it spells, and narrows back to the same f32.
pub fn f32_as_decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// An exact decimal (`unscaled` × 10^-`scale`) as its decimal text with `scale` fraction digits,
/// as PostgreSQL writes a `numeric` (Parquet `Decimal128(_, 2)` 150 is `1.50`), so both sources
/// give the same cell.
pub fn decimal_text(unscaled: i128, scale: i8) -> String {
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale <= 0 {
        let zeros = if unscaled == 0 {
            0
        } else {
            usize::from(scale.unsigned_abs())
        };
        return format!("{sign}{digits}{}", "0".repeat(zeros));
    }
    let scale = usize::from(scale.unsigned_abs());
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_and_floats_as_their_decimal_text() {
        assert_eq!(decimal_text(150, 2), "1.50");
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(decimal_text(0, 3), "0.000");
        assert_eq!(decimal_text(7, -2), "700");
        assert_eq!(decimal_text(42, 0), "42");
        assert_eq!(f32_as_decimal(0.1), 0.1);
        assert_eq!(f32_as_decimal(0.1) as f32, 0.1f32);
        assert_eq!(f32_as_decimal(3.0), 3.0);
    }
}
