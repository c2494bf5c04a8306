//! The sources of a dataset that declares its columns (`columns` in node.toml), on both sides of
//! the anonymization pipeline: [`read_raw`] reads the raw records into the pipeline's table (CSV
//! and JSON Lines with the pipeline's own reader, Parquet and SQL through their
//! [`RecordSource`]s and [`raw_table`]), and [`anonymized_source`] gives the pipeline's output
//! back as records for the training schema's encoding.

use std::collections::HashMap;
use std::path::Path;

use tutela_privacy::anonymize::reader::{self, parse_cell};
use tutela_privacy::anonymize::{
    BadKind, ColumnType, ReadError, Role, Schema, Table as RawTable, Value,
};

use super::{CellsSource, FileFormat, RecordSource, SourceKind};
use crate::config::DatasetConfig;
use crate::data::{Cell, DataError, DatasetSchema, OwnedCell};

/// Reads a declared dataset's raw records, whatever its source.
pub fn read_raw(
    dataset: &str,
    config: &DatasetConfig,
    columns: &Schema,
) -> Result<RawTable, DataError> {
    match SourceKind::of(config) {
        SourceKind::File(format @ (FileFormat::Csv | FileFormat::Jsonl)) => Ok(reader::read_file(
            &config.path,
            format.text_format(),
            columns,
        )?),
        _ => raw_table(super::open(dataset, config)?.as_mut(), columns),
    }
}

/// A source's records as the declared columns' values, with the checks and errors of the
/// pipeline's own readers: every declared column present, no undeclared column, each cell of its
/// declared type.
pub fn raw_table(source: &mut dyn RecordSource, columns: &Schema) -> Result<RawTable, DataError> {
    let origin = source.origin().to_path_buf();
    let bad = |line: u64, column: &str, kind: BadKind, reason: String| {
        DataError::Raw(ReadError::Bad {
            path: origin.clone(),
            line,
            column: column.to_string(),
            kind,
            reason,
        })
    };
    let mut by_name = HashMap::new();
    for (i, name) in source.header().iter().enumerate() {
        if by_name.insert(name.clone(), i).is_some() {
            return Err(bad(
                1,
                name,
                BadKind::DuplicateColumn,
                "the header names this column twice".into(),
            ));
        }
        if columns.index_of(name).is_err() {
            return Err(bad(
                1,
                name,
                BadKind::UndeclaredColumn,
                "is not declared in the schema; declare it (with its role) or remove it".into(),
            ));
        }
    }
    let positions = columns
        .columns
        .iter()
        .map(|c| {
            by_name.get(&c.name).copied().ok_or_else(|| {
                bad(
                    1,
                    &c.name,
                    BadKind::MissingColumn,
                    "is declared in the schema but missing from the header".into(),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::new();
    while let Some((line, record)) = source.next_record()? {
        let mut row = Vec::with_capacity(positions.len());
        for (spec, &position) in columns.columns.iter().zip(&positions) {
            let value = value_of(record.cell(position), spec.ty)
                .map_err(|reason| bad(line, &spec.name, BadKind::InvalidValue, reason))?;
            row.push(value);
        }
        rows.push(row);
    }
    Ok(RawTable {
        schema: columns.clone(),
        rows,
    })
}

/// A cell as a value of its declared type; text is parsed as the CSV reader parses it.
fn value_of(cell: Cell<'_>, ty: ColumnType) -> Result<Value, String> {
    Ok(match (cell, ty) {
        (Cell::Missing, _) => Value::Null,
        (Cell::Text(t), _) => parse_cell(t, ty)?,
        (Cell::Number(x), ColumnType::Float) => Value::Float(x),
        (Cell::Number(x), ColumnType::Int) if x.fract() == 0.0 && x.abs() < 9e15 => {
            Value::Int(x as i64)
        }
        (Cell::Date(d), ColumnType::Date) => Value::Date(d),
        (cell, ColumnType::Text) => Value::Text(cell.canonical()),
        (cell, ty) => {
            return Err(format!(
                "a {} value in a column declared {ty:?}",
                match cell {
                    Cell::Number(_) => "number",
                    Cell::Bool(_) => "boolean",
                    _ => "date",
                }
            ));
        }
    })
}

/// The anonymized table's training columns as records: those whose role is `feature` or `label`,
/// plus any other kept column the training schema names explicitly. Lines are those of the
/// anonymized rows (the header is line 1).
pub fn anonymized_source(
    anonymized: &RawTable,
    schema: &DatasetSchema,
    origin: &Path,
) -> CellsSource {
    let named_by_schema = |name: &str| {
        schema.label.column == name || schema.features.columns.iter().any(|c| c.name == name)
    };
    let keep: Vec<usize> = anonymized
        .schema
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.role, Role::Feature | Role::Label) || named_by_schema(&c.name))
        .map(|(i, _)| i)
        .collect();
    let header = keep
        .iter()
        .map(|&i| anonymized.schema.columns[i].name.clone())
        .collect();
    let rows = anonymized
        .rows
        .iter()
        .map(|row| {
            keep.iter()
                .map(|&i| match &row[i] {
                    Value::Null => OwnedCell::Missing,
                    Value::Int(x) => OwnedCell::Number(*x as f64),
                    Value::Float(x) => OwnedCell::Number(*x),
                    Value::Text(t) => OwnedCell::Text(t.clone()),
                    Value::Date(d) => OwnedCell::Date(*d),
                })
                .collect()
        })
        .collect();
    CellsSource::new(
        format!("{} (anonymized)", origin.display()).into(),
        header,
        rows,
    )
}
