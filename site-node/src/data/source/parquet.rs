//! Parquet files, read as Arrow record batches (a batch of rows in memory at a time besides the
//! parquet reader's column chunk buffers). Each top-level column becomes a header name; its
//! values become cells by their Arrow type: strings (also dictionary-encoded, as pandas writes
//! categoricals) as text, integers and floats as numbers (a float32 as its shortest decimal,
//! [`super::f32_as_decimal`]), decimals as their decimal text (as a PostgreSQL `numeric` is,
//! [`super::decimal_text`]), booleans, dates; a null is a missing cell. Other types (timestamps,
//! lists, structs) are refused, naming the column and its type, so the site engineer can cast them
//! in the export. A text longer than CSV's field limit ([`MAX_FIELD_BYTES`]) and a `date64` beyond
//! the dates a CSV file can spell are refused, naming line and column (never the value).

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Date64Type, Decimal128Type, Float32Type, Float64Type, Int8Type, Int16Type,
    Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrowPrimitiveType, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use tutela_privacy::anonymize::Date;
use tutela_privacy::anonymize::bounded::MAX_FIELD_BYTES;

use super::{Record, RecordSource, decimal_text, f32_as_decimal};
use crate::data::{DataError, OwnedCell};

/// Rows per batch: small enough that a wide table's batch stays a few MiB.
const BATCH_ROWS: usize = 1024;

/// A Parquet file's records.
pub struct ParquetSource {
    origin: PathBuf,
    header: Vec<String>,
    reader: ParquetRecordBatchReader,
    batch: Vec<Vec<OwnedCell>>,
    next: usize,
    current: Vec<OwnedCell>,
    line: u64,
}

fn source_error(path: &Path, reason: impl std::fmt::Display) -> DataError {
    let reason = reason.to_string();
    // Only uncompressed and Snappy pages are compiled in (see site-node/Cargo.toml).
    let hint = if reason.contains("feature") || reason.contains("codec") {
        " (this node reads uncompressed and Snappy-compressed Parquet: export with compression \"snappy\")"
    } else {
        ""
    };
    DataError::Source {
        origin: path.display().to_string(),
        reason: format!("not a readable Parquet file: {reason}{hint}"),
    }
}

impl ParquetSource {
    pub fn open(path: &Path) -> Result<ParquetSource, DataError> {
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| source_error(path, e))?;
        let header = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().trim().to_string())
            .collect();
        let reader = builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| source_error(path, e))?;
        Ok(ParquetSource {
            origin: path.to_path_buf(),
            header,
            reader,
            batch: Vec::new(),
            next: 0,
            current: Vec::new(),
            line: 1,
        })
    }

    /// A batch as rows of cells.
    fn decode(&self, batch: &RecordBatch) -> Result<Vec<Vec<OwnedCell>>, DataError> {
        let mut rows = vec![Vec::with_capacity(batch.num_columns()); batch.num_rows()];
        // The batch's first row is the line after the last one given out.
        let line_of = |row: usize| self.line + 1 + row as u64;
        for (c, column) in batch.columns().iter().enumerate() {
            let name = self.header.get(c).map(String::as_str).unwrap_or("");
            let source = |reason: String| DataError::Source {
                origin: self.origin.display().to_string(),
                reason,
            };
            let cells = cells_of(column.as_ref()).map_err(|problem| match problem {
                ColumnProblem::Unsupported(type_name) => source(format!(
                    "column {name:?} has the type {type_name}, which the node does not read; export it as text, a number, a boolean or a date"
                )),
                ColumnProblem::DateOutOfRange(row) => source(format!(
                    "line {}, column {name:?}: a date64 value outside the dates the node reads (those of a 32-bit day count, as in a CSV file); correct the value",
                    line_of(row)
                )),
            })?;
            for (i, (row, cell)) in rows.iter_mut().zip(cells).enumerate() {
                if matches!(&cell, OwnedCell::Text(t) if t.len() > MAX_FIELD_BYTES) {
                    return Err(DataError::TooLong {
                        path: self.origin.clone(),
                        line: line_of(i),
                        what: "a field",
                        max: MAX_FIELD_BYTES as u64,
                    });
                }
                row.push(cell);
            }
        }
        Ok(rows)
    }
}

fn numbers<T>(array: &dyn Array, to_f64: impl Fn(T::Native) -> f64) -> Vec<OwnedCell>
where
    T: ArrowPrimitiveType,
{
    let array = array.as_primitive::<T>();
    (0..array.len())
        .map(|i| {
            if array.is_null(i) {
                OwnedCell::Missing
            } else {
                OwnedCell::Number(to_f64(array.value(i)))
            }
        })
        .collect()
}

/// Why a column's values cannot be cells.
enum ColumnProblem {
    /// A type the node does not read, by name.
    Unsupported(String),
    /// A date whose day count does not fit the node's dates, at this row of the batch. Refused
    /// rather than read as missing, which the schema might then impute.
    DateOutOfRange(usize),
}

fn dates<T>(
    array: &dyn Array,
    to_days: impl Fn(T::Native) -> i64,
) -> Result<Vec<OwnedCell>, ColumnProblem>
where
    T: ArrowPrimitiveType,
{
    let array = array.as_primitive::<T>();
    (0..array.len())
        .map(|i| {
            if array.is_null(i) {
                return Ok(OwnedCell::Missing);
            }
            i32::try_from(to_days(array.value(i)))
                .map(|days| OwnedCell::Date(Date(days)))
                .map_err(|_| ColumnProblem::DateOutOfRange(i))
        })
        .collect()
}

/// The cells of one column.
fn cells_of(array: &dyn Array) -> Result<Vec<OwnedCell>, ColumnProblem> {
    let text = |value: Option<&str>| {
        value.map_or(OwnedCell::Missing, |v| {
            OwnedCell::Text(v.trim().to_string())
        })
    };
    Ok(match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().iter().map(text).collect(),
        DataType::LargeUtf8 => array.as_string::<i64>().iter().map(text).collect(),
        DataType::Utf8View => array.as_string_view().iter().map(text).collect(),
        DataType::Boolean => array
            .as_boolean()
            .iter()
            .map(|b| b.map_or(OwnedCell::Missing, OwnedCell::Bool))
            .collect(),
        DataType::Int8 => numbers::<Int8Type>(array, f64::from),
        DataType::Int16 => numbers::<Int16Type>(array, f64::from),
        DataType::Int32 => numbers::<Int32Type>(array, f64::from),
        DataType::Int64 => numbers::<Int64Type>(array, |x| x as f64),
        DataType::UInt8 => numbers::<UInt8Type>(array, f64::from),
        DataType::UInt16 => numbers::<UInt16Type>(array, f64::from),
        DataType::UInt32 => numbers::<UInt32Type>(array, f64::from),
        DataType::UInt64 => numbers::<UInt64Type>(array, |x| x as f64),
        DataType::Float32 => numbers::<Float32Type>(array, f32_as_decimal),
        DataType::Float64 => numbers::<Float64Type>(array, |x| x),
        DataType::Decimal128(_, scale) => {
            let array = array.as_primitive::<Decimal128Type>();
            (0..array.len())
                .map(|i| {
                    if array.is_null(i) {
                        OwnedCell::Missing
                    } else {
                        OwnedCell::Text(decimal_text(array.value(i), *scale))
                    }
                })
                .collect()
        }
        DataType::Date32 => dates::<Date32Type>(array, i64::from)?,
        DataType::Date64 => dates::<Date64Type>(array, |ms| ms.div_euclid(86_400_000))?,
        DataType::Dictionary(_, _) => {
            let dictionary = array.as_any_dictionary();
            let keys = dictionary.normalized_keys();
            let values =
                cells_of(dictionary.values().as_ref()).map_err(|problem| match problem {
                    // The first row that uses the value.
                    ColumnProblem::DateOutOfRange(value) => ColumnProblem::DateOutOfRange(
                        keys.iter()
                            .enumerate()
                            .position(|(i, &k)| k == value && !array.is_null(i))
                            .unwrap_or(0),
                    ),
                    other => other,
                })?;
            keys.into_iter()
                .enumerate()
                .map(|(i, key)| {
                    if array.is_null(i) {
                        OwnedCell::Missing
                    } else {
                        values.get(key).cloned().unwrap_or(OwnedCell::Missing)
                    }
                })
                .collect()
        }
        other => return Err(ColumnProblem::Unsupported(other.to_string())),
    })
}

impl RecordSource for ParquetSource {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn header(&self) -> &[String] {
        &self.header
    }

    fn next_record(&mut self) -> Result<Option<(u64, Record<'_>)>, DataError> {
        while self.next >= self.batch.len() {
            match self.reader.next() {
                None => return Ok(None),
                Some(Err(e)) => return Err(source_error(&self.origin, e)),
                Some(Ok(batch)) => {
                    self.batch = self.decode(&batch)?;
                    self.next = 0;
                }
            }
        }
        self.current = std::mem::take(&mut self.batch[self.next]);
        self.next += 1;
        self.line += 1;
        Ok(Some((self.line, Record::Cells(&self.current))))
    }
}
