//! Reading a site's raw records (CSV or JSON Lines) into a [`Table`] of the declared [`Schema`].
//!
//! Both readers stream: they hold one line (or CSV record) at a time besides the cells already
//! parsed, so a file far larger than its parsed table never has to be in memory as text. A line
//! or record longer than [`MAX_LINE_BYTES`], or a field longer than [`MAX_FIELD_BYTES`], is
//! refused as soon as the limit is passed ([`super::bounded`]): memory stays bounded on any input. Every
//! error names the file, the line and the column, so that a site engineer can open the file at the
//! right place: a cell that is not of its column's declared type, a JSON line that is not an
//! object (or one that gives a key twice: [`super::json_line`]), a missing or undeclared column, a
//! row of the wrong width.
//!
//! Cell syntax, by declared [`ColumnType`]:
//! - `int`: a decimal integer (CSV), or a JSON integer;
//! - `float`: a finite decimal number (CSV), or a JSON number; NaN and infinities are refused;
//! - `text`: anything (CSV), or a JSON string;
//! - `date`: `YYYY-MM-DD` (a JSON string in JSON Lines);
//! - an empty CSV field, or a JSON `null` or absent key, is [`Value::Null`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::bounded::{BoundedReader, TooLong};
pub use super::bounded::{MAX_FIELD_BYTES, MAX_LINE_BYTES};
use super::schema::{ColumnType, Date, Schema, Table, Value};

/// The two input formats of a site's raw data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// Comma-separated values with a header line naming the columns.
    Csv,
    /// One JSON object per line, keyed by column name.
    Jsonl,
}

impl RecordFormat {
    /// The format a file name implies: `.jsonl` / `.ndjson` (optionally `.gz`) is JSON Lines,
    /// anything else CSV.
    pub fn from_path(path: &Path) -> RecordFormat {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            RecordFormat::Jsonl
        } else {
            RecordFormat::Csv
        }
    }
}

/// A raw file that does not match its declared schema, or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the file is empty (a CSV file needs at least its header line)", .path.display())]
    Empty { path: PathBuf },
    /// `column` is the column's name where one is known, else empty. `reason` may quote the
    /// cell: it is for the site's own log; `kind` is what may be said elsewhere.
    #[error("{}:{line}{}: {reason}", .path.display(), column_suffix(.column))]
    Bad {
        path: PathBuf,
        line: u64,
        column: String,
        kind: BadKind,
        reason: String,
    },
}

/// What is wrong with a line, without its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// A cell that is not of its column's declared type.
    InvalidValue,
    /// A column the file has and the declaration lacks.
    UndeclaredColumn,
    /// A declared column the file lacks.
    MissingColumn,
    /// A column named twice in the header.
    DuplicateColumn,
    /// A row of the wrong width, or a line that is not a JSON object, or CSV syntax.
    Malformed,
    /// A line, record or field past its limit.
    TooLong,
}

/// The error for an I/O failure of a bounded read: a [`TooLong`] becomes [`BadKind::TooLong`].
fn io_error(origin: &Path, source: std::io::Error) -> ReadError {
    match TooLong::from_io(&source) {
        Some(t) => ReadError::Bad {
            path: origin.to_path_buf(),
            line: t.line,
            column: String::new(),
            kind: BadKind::TooLong,
            reason: t.to_string(),
        },
        None => ReadError::Io {
            path: origin.to_path_buf(),
            source,
        },
    }
}

fn column_suffix(column: &str) -> String {
    if column.is_empty() {
        String::new()
    } else {
        format!(", column `{column}`")
    }
}

/// Opens `path` (gunzipping a `.gz` name) and reads it in its format ([`RecordFormat::from_path`]
/// unless `format` is given).
pub fn read_file(
    path: &Path,
    format: Option<RecordFormat>,
    schema: &Schema,
) -> Result<Table, ReadError> {
    let file = File::open(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    };
    match format.unwrap_or_else(|| RecordFormat::from_path(path)) {
        RecordFormat::Csv => read_csv(reader, path, schema),
        RecordFormat::Jsonl => read_jsonl(reader, path, schema),
    }
}

/// Parses one text cell as `ty`; `None` text (an empty field) is `Null`. Public so that readers
/// of other formats (the site node's Parquet and SQL sources) parse text cells the same way.
pub fn parse_cell(text: &str, ty: ColumnType) -> Result<Value, String> {
    if text.is_empty() {
        return Ok(Value::Null);
    }
    match ty {
        ColumnType::Text => Ok(Value::Text(text.to_string())),
        ColumnType::Int => text
            .parse::<i64>()
            .map(Value::Int)
            .map_err(|_| format!("{text:?} is not an integer")),
        ColumnType::Float => match text.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Value::Float(x)),
            _ => Err(format!("{text:?} is not a finite number")),
        },
        ColumnType::Date => Date::parse_iso(text)
            .map(Value::Date)
            .ok_or_else(|| format!("{text:?} is not a date (YYYY-MM-DD)")),
    }
}

/// Reads CSV with a header line. Columns may come in any order; every declared column must be
/// present, and an undeclared column is an error (it could hold anything, identifiers included,
/// and the schema is the declaration of what the file holds).
pub fn read_csv(reader: impl Read, origin: &Path, schema: &Schema) -> Result<Table, ReadError> {
    let bad = |line: u64, column: &str, kind: BadKind, reason: String| ReadError::Bad {
        path: origin.to_path_buf(),
        line,
        column: column.to_string(),
        kind,
        reason,
    };
    let (bounded, record_mark) = BoundedReader::new(reader, MAX_LINE_BYTES);
    let mut csv_reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(BufReader::new(bounded));
    let csv_error = |fallback_line: u64, e: csv::Error| {
        if let csv::ErrorKind::Io(_) = e.kind() {
            return match e.into_kind() {
                csv::ErrorKind::Io(source) => io_error(origin, source),
                other => ReadError::Io {
                    path: origin.to_path_buf(),
                    source: std::io::Error::other(format!("{other:?}")),
                },
            };
        }
        let line = e
            .position()
            .map(|p| p.line())
            .filter(|&l| l > 0)
            .unwrap_or(fallback_line);
        bad(line, "", BadKind::Malformed, e.to_string())
    };
    // A record's memory is bounded by the reader; a field's by this check.
    let check_fields = |record: &csv::StringRecord, line: u64| match record
        .iter()
        .position(|f| f.len() > MAX_FIELD_BYTES)
    {
        Some(i) => Err(bad(
            line,
            "",
            BadKind::TooLong,
            format!(
                "field {} is longer than the limit of {MAX_FIELD_BYTES} bytes",
                i + 1
            ),
        )),
        None => Ok(()),
    };
    let mut record = csv::StringRecord::new();
    if !csv_reader
        .read_record(&mut record)
        .map_err(|e| csv_error(1, e))?
    {
        return Err(ReadError::Empty {
            path: origin.to_path_buf(),
        });
    }
    record_mark.record_done();
    check_fields(&record, 1)?;
    // position in the file of each declared column
    let header: Vec<String> = record.iter().map(|h| h.trim().to_string()).collect();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (i, h) in header.iter().enumerate() {
        if by_name.insert(h.as_str(), i).is_some() {
            return Err(bad(
                1,
                h,
                BadKind::DuplicateColumn,
                "the header names this column twice".into(),
            ));
        }
        if schema.index_of(h).is_err() {
            return Err(bad(
                1,
                h,
                BadKind::UndeclaredColumn,
                "is not declared in the schema; declare it (with its role) or remove it".into(),
            ));
        }
    }
    let positions: Vec<usize> = schema
        .columns
        .iter()
        .map(|c| {
            by_name.get(c.name.as_str()).copied().ok_or_else(|| {
                bad(
                    1,
                    &c.name,
                    BadKind::MissingColumn,
                    "is declared in the schema but missing from the header".into(),
                )
            })
        })
        .collect::<Result<_, _>>()?;

    let mut rows = Vec::new();
    let mut line = 1u64;
    loop {
        if !csv_reader
            .read_record(&mut record)
            .map_err(|e| csv_error(line + 1, e))?
        {
            break;
        }
        record_mark.record_done();
        line = record.position().map(|p| p.line()).unwrap_or(line + 1);
        check_fields(&record, line)?;
        if record.len() != header.len() {
            return Err(bad(
                line,
                "",
                BadKind::Malformed,
                format!(
                    "expected {} fields (as in the header), found {}",
                    header.len(),
                    record.len()
                ),
            ));
        }
        let mut row = Vec::with_capacity(schema.columns.len());
        for (c, &pos) in schema.columns.iter().zip(&positions) {
            let text = record.get(pos).unwrap_or("").trim();
            row.push(
                parse_cell(text, c.ty)
                    .map_err(|reason| bad(line, &c.name, BadKind::InvalidValue, reason))?,
            );
        }
        rows.push(row);
    }
    Ok(Table {
        schema: schema.clone(),
        rows,
    })
}

/// Reads JSON Lines: one object per line keyed by column name; blank lines are skipped. An absent
/// key or `null` is `Null`; a key the schema does not declare is an error, as in CSV.
pub fn read_jsonl(reader: impl Read, origin: &Path, schema: &Schema) -> Result<Table, ReadError> {
    let bad = |line: u64, column: &str, kind: BadKind, reason: String| ReadError::Bad {
        path: origin.to_path_buf(),
        line,
        column: column.to_string(),
        kind,
        reason,
    };
    let (bounded, record_mark) = BoundedReader::new(reader, MAX_LINE_BYTES);
    let mut reader = BufReader::new(bounded);
    let mut text = String::new();
    let mut rows = Vec::new();
    let mut line = 0u64;
    loop {
        text.clear();
        let n = reader
            .read_line(&mut text)
            .map_err(|source| io_error(origin, source))?;
        if n == 0 {
            break;
        }
        record_mark.record_done();
        line += 1;
        if text.trim().is_empty() {
            continue;
        }
        let object = super::json_line::parse_object(text.as_bytes()).map_err(|e| match e {
            // A key given twice: which value is the cell would be the parser's choice.
            super::json_line::JsonLineError::DuplicateKey(key) => bad(
                line,
                &key,
                BadKind::DuplicateColumn,
                "is given twice in the line's object; keep one".into(),
            ),
            other => bad(
                line,
                "",
                BadKind::Malformed,
                format!("not a JSON object: {other}"),
            ),
        })?;
        for key in object.keys() {
            if schema.index_of(key).is_err() {
                return Err(bad(
                    line,
                    key,
                    BadKind::UndeclaredColumn,
                    "is not declared in the schema; declare it (with its role) or remove it".into(),
                ));
            }
        }
        let mut row = Vec::with_capacity(schema.columns.len());
        for c in &schema.columns {
            let cell = match object.get(&c.name) {
                None | Some(serde_json::Value::Null) => Value::Null,
                Some(serde_json::Value::String(text)) if text.len() > MAX_FIELD_BYTES => {
                    return Err(bad(
                        line,
                        &c.name,
                        BadKind::TooLong,
                        format!("the value is longer than the limit of {MAX_FIELD_BYTES} bytes"),
                    ));
                }
                Some(v) => json_cell(v, c.ty)
                    .map_err(|reason| bad(line, &c.name, BadKind::InvalidValue, reason))?,
            };
            row.push(cell);
        }
        rows.push(row);
    }
    Ok(Table {
        schema: schema.clone(),
        rows,
    })
}

fn json_cell(v: &serde_json::Value, ty: ColumnType) -> Result<Value, String> {
    use serde_json::Value as J;
    match (ty, v) {
        (ColumnType::Int, J::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .ok_or_else(|| format!("{n} is not an integer")),
        (ColumnType::Float, J::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Value::Float)
            .ok_or_else(|| format!("{n} is not a finite number")),
        (ColumnType::Text, J::String(s)) => Ok(Value::Text(s.clone())),
        (ColumnType::Date, J::String(s)) => parse_cell(s, ColumnType::Date),
        (ty, other) => Err(format!(
            "expected {} for a {ty:?} column, found {}",
            match ty {
                ColumnType::Int | ColumnType::Float => "a number",
                ColumnType::Text | ColumnType::Date => "a string",
            },
            match other {
                J::Null => "null",
                J::Bool(_) => "a boolean",
                J::Number(_) => "a number",
                J::String(_) => "a string",
                J::Array(_) => "an array",
                J::Object(_) => "an object",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::from_toml(
            r#"
            [[column]]
            name = "id"
            role = "direct_identifier"
            type = "text"
            [[column]]
            name = "age"
            role = "quasi_identifier"
            type = "int"
            [[column]]
            name = "seen"
            role = "quasi_identifier"
            type = "date"
            [[column]]
            name = "x"
            role = "feature"
            type = "float"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn csv_in_any_column_order_with_nulls() {
        let text = "x,seen,age,id\n1.5,2020-02-29,40,p1\n,2021-01-01,,p2\n";
        let t = read_csv(text.as_bytes(), Path::new("raw.csv"), &schema()).unwrap();
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0][0].canonical(), "p1");
        assert_eq!(t.rows[0][1].canonical(), "40");
        assert_eq!(t.rows[0][2].canonical(), "2020-02-29");
        assert_eq!(t.rows[0][3].canonical(), "1.5");
        assert!(matches!(t.rows[1][1], Value::Null));
        assert!(matches!(t.rows[1][3], Value::Null));
    }

    #[test]
    fn csv_errors_name_file_line_and_column() {
        let s = schema();
        let e = read_csv(
            "id,age,seen,x\np1,40,2020-01-01,1\np2,forty,2020-01-01,1\n".as_bytes(),
            Path::new("raw.csv"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "raw.csv:3, column `age`: \"forty\" is not an integer");
        let e = read_csv(
            "id,age,seen,x\np1,40,2020-13-01,1\n".as_bytes(),
            Path::new("raw.csv"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":2, column `seen`") && e.contains("not a date"),
            "{e}"
        );
        let e = read_csv(
            "id,age,seen\np1,4,2020-01-01\n".as_bytes(),
            Path::new("raw.csv"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":1, column `x`") && e.contains("missing from the header"),
            "{e}"
        );
        let e = read_csv(
            "id,age,seen,x,ssn\np1,4,2020-01-01,1,123\n".as_bytes(),
            Path::new("raw.csv"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("column `ssn`") && e.contains("not declared"),
            "{e}"
        );
        let e = read_csv(
            "id,age,seen,x\np1,4,2020-01-01\n".as_bytes(),
            Path::new("raw.csv"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("raw.csv:2") && e.contains("expected 4 fields"),
            "{e}"
        );
        let e = read_csv("x,x\n".as_bytes(), Path::new("raw.csv"), &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = read_csv("".as_bytes(), Path::new("raw.csv"), &s).unwrap_err();
        assert!(matches!(e, ReadError::Empty { .. }));
        let e = read_csv(
            "id,age,seen,x\np1,4,2020-01-01,NaN\n".as_bytes(),
            Path::new("raw.csv"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("column `x`") && e.contains("finite"), "{e}");
    }

    #[test]
    fn jsonl_reads_like_csv() {
        let s = schema();
        let csv = read_csv(
            "id,age,seen,x\np1,40,2020-02-29,1.5\np2,,2021-01-01,\n".as_bytes(),
            Path::new("raw.csv"),
            &s,
        )
        .unwrap();
        let jsonl = read_jsonl(
            "{\"id\":\"p1\",\"age\":40,\"seen\":\"2020-02-29\",\"x\":1.5}\n\n{\"id\":\"p2\",\"age\":null,\"seen\":\"2021-01-01\"}\n"
                .as_bytes(),
            Path::new("raw.jsonl"),
            &s,
        )
        .unwrap();
        assert_eq!(csv.rows, jsonl.rows);
    }

    #[test]
    fn jsonl_errors_name_file_line_and_column() {
        let s = schema();
        let e = read_jsonl(
            "{\"id\":\"p1\",\"age\":40}\n{\"id\":\"p2\",\"age\":\"40\"}\n".as_bytes(),
            Path::new("raw.jsonl"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "raw.jsonl:2, column `age`: expected a number for a Int column, found a string"
        );
        let e = read_jsonl("[1,2]\n".as_bytes(), Path::new("raw.jsonl"), &s)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("raw.jsonl:1: not a JSON object"), "{e}");
        let e = read_jsonl(
            "{\"id\":\"p1\",\"name\":\"Ann\"}\n".as_bytes(),
            Path::new("raw.jsonl"),
            &s,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("column `name`") && e.contains("not declared"),
            "{e}"
        );
        let e = read_jsonl("{\"age\":1.5}\n".as_bytes(), Path::new("raw.jsonl"), &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1.5 is not an integer"), "{e}");
        // Attack: a key given twice (serde_json would keep the last value, another tool the
        // first). Refused naming the column, never either value.
        let e = read_jsonl(
            "{\"id\":\"p1\",\"age\":40,\"age\":97}\n".as_bytes(),
            Path::new("raw.jsonl"),
            &s,
        )
        .unwrap_err();
        assert!(
            matches!(&e, ReadError::Bad { kind: BadKind::DuplicateColumn, column, line: 1, .. } if column == "age"),
            "{e}"
        );
        let e = e.to_string();
        assert!(
            e.contains("given twice") && !e.contains("97") && !e.contains("40"),
            "{e}"
        );
    }

    #[test]
    fn format_from_path() {
        assert_eq!(
            RecordFormat::from_path(Path::new("a.jsonl")),
            RecordFormat::Jsonl
        );
        assert_eq!(
            RecordFormat::from_path(Path::new("a.JSONL.gz")),
            RecordFormat::Jsonl
        );
        assert_eq!(
            RecordFormat::from_path(Path::new("a.ndjson")),
            RecordFormat::Jsonl
        );
        assert_eq!(
            RecordFormat::from_path(Path::new("a.csv.gz")),
            RecordFormat::Csv
        );
    }
}
