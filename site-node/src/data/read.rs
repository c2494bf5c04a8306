//! Records to a training table, through the schema's encoding: [`read_table`] stops at the first
//! problem (loading for training), [`check_source`] lists every problem it can find in one pass
//! (`tutela-node data check`, and the node's check at start).

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use super::encode::{CellProblem, ColumnEncoder, LevelKey, abbreviated};
use super::schema::{DatasetSchema, FeatureColumn};
use super::source::csv::CsvSource;
use super::source::{Record, RecordSource};
use super::{Cell, DataError, Table};

/// Where the problems of a read go: the first ends it ([`FailFast`]), or each is listed
/// ([`CheckReport`]) and the read goes on with the next record.
pub(super) trait Problems {
    fn report(&mut self, problem: DataError) -> Result<(), DataError>;
}

pub(super) struct FailFast;

impl Problems for FailFast {
    fn report(&mut self, problem: DataError) -> Result<(), DataError> {
        Err(problem)
    }
}

/// Every problem one read of a dataset found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// The problems, in the order found; at most [`CheckReport::MAX_LISTED`].
    pub problems: Vec<DataError>,
    /// Problems found past the listed ones.
    pub more: usize,
    /// Records read without a problem.
    pub good_rows: usize,
    /// The encoded features per record, when the header could be matched to the schema.
    pub n_features: Option<usize>,
}

impl CheckReport {
    /// Enough to fix a file by; a file with a problem on every line would list millions.
    pub const MAX_LISTED: usize = 200;

    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// A problem found outside a read (the schema, the file's opening).
    pub fn with_problem(problem: DataError) -> Self {
        CheckReport {
            problems: vec![problem],
            ..CheckReport::default()
        }
    }
}

impl Problems for CheckReport {
    fn report(&mut self, problem: DataError) -> Result<(), DataError> {
        if self.problems.len() < Self::MAX_LISTED {
            self.problems.push(problem);
        } else {
            self.more += 1;
        }
        Ok(())
    }
}

impl fmt::Display for CheckReport {
    /// One problem a line; for the site's own eyes (it names files, lines and values).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        if self.more > 0 {
            writeln!(f, "  ... and {} more problems", self.more)?;
        }
        Ok(())
    }
}

/// Reads every record of `source` as `schema` describes, stopping at the first problem.
///
/// Cells are encoded by their columns' declared types and missing-value rules (see
/// [`super::encode`]); image pixels are divided by the schema's `pixel_max`; labels must be one of
/// the schema's class names, exactly (after trimming).
pub fn read_table(
    source: &mut dyn RecordSource,
    schema: &DatasetSchema,
) -> Result<Table, DataError> {
    match read_with(source, schema, &mut FailFast)? {
        Some(table) => Ok(table),
        // FailFast returns every problem as an error, so a read without a table had one.
        None => Err(DataError::NoRows {
            path: source.origin().to_path_buf(),
        }),
    }
}

/// Reads every record of `source` and lists every problem: each bad cell of each record (the
/// record is left out and the read goes on), each missing column; a problem that leaves no way
/// to find the next record (CSV syntax, a line past the limit, an unreadable file) ends the list.
pub fn check_source(source: &mut dyn RecordSource, schema: &DatasetSchema) -> CheckReport {
    let mut report = CheckReport::default();
    match read_with(source, schema, &mut report) {
        Ok(Some(table)) => {
            report.good_rows = table.n_rows;
            report.n_features = Some(table.n_features);
        }
        Ok(None) => {}
        Err(fatal) => {
            let _ = report.report(fatal);
        }
    }
    report
}

/// Loads a CSV file (gzip-compressed when its name ends in `.gz`) as the schema describes.
pub fn load_csv(path: impl AsRef<Path>, schema: &DatasetSchema) -> Result<Table, DataError> {
    read_table(&mut CsvSource::open(path.as_ref())?, schema)
}

/// Reads CSV text from any reader; `origin` names it in errors.
pub fn read_csv(
    reader: impl Read,
    origin: impl AsRef<Path>,
    schema: &DatasetSchema,
) -> Result<Table, DataError> {
    read_table(
        &mut CsvSource::new(Box::new(reader), origin.as_ref())?,
        schema,
    )
}

/// Column positions in the source of the label and of each feature column, with its encoder.
pub(super) struct ResolvedColumns {
    pub(super) label: usize,
    pub(super) features: Vec<(usize, ColumnEncoder)>,
}

fn read_with(
    source: &mut dyn RecordSource,
    schema: &DatasetSchema,
    problems: &mut dyn Problems,
) -> Result<Option<Table>, DataError> {
    let path = source.origin().to_path_buf();
    let header = source.header().to_vec();
    let Some(columns) = resolve_columns(&header, schema, &path, problems)? else {
        return Ok(None);
    };
    let n_features: usize = columns.features.iter().map(|(_, e)| e.width()).sum();
    let class_index: HashMap<LevelKey, i64> = schema
        .label
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (LevelKey::of_text(c), i as i64))
        .collect();
    let label_column = &schema.label.column;

    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut any_record = false;
    loop {
        let (line, record) = match source.next_record() {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(fatal) => {
                problems.report(fatal)?;
                return Ok(None);
            }
        };
        any_record = true;
        if record.len() != header.len() {
            problems.report(DataError::FieldCount {
                path: path.clone(),
                line,
                expected: header.len(),
                found: record.len(),
            })?;
            continue;
        }
        let start = features.len();
        let mut good = true;
        for (position, encoder) in &columns.features {
            let cell = record.cell(*position);
            if let Err(problem) = encoder.encode(cell, &mut features) {
                good = false;
                problems.report(cell_error(problem, &path, line, encoder.column()))?;
            }
        }
        match label_of(&record, columns.label, &class_index) {
            Ok(label) if good => labels.push(label),
            Ok(_) => features.truncate(start),
            Err(value) => {
                features.truncate(start);
                problems.report(match value {
                    None => DataError::MissingValue {
                        path: path.clone(),
                        line,
                        column: label_column.clone(),
                    },
                    Some(value) => DataError::UnknownLabel {
                        path: path.clone(),
                        line,
                        column: label_column.clone(),
                        value,
                        known: schema.label.classes.join(", "),
                    },
                })?;
            }
        }
    }
    if !any_record {
        problems.report(DataError::NoRows { path })?;
        return Ok(None);
    }
    let table = Table {
        n_rows: labels.len(),
        n_features,
        features,
        labels,
        feature_names: columns
            .features
            .iter()
            .flat_map(|(_, e)| e.feature_names().iter().cloned())
            .collect(),
        class_names: schema.label.classes.clone(),
    };
    table.check()?;
    Ok(Some(table))
}

/// The class of a record's label; `Err(None)` when missing, `Err(Some(text))` when unknown.
fn label_of(
    record: &Record<'_>,
    position: usize,
    classes: &HashMap<LevelKey, i64>,
) -> Result<i64, Option<String>> {
    match record.cell(position) {
        Cell::Missing => Err(None),
        // Matched as a category is: pandas' `1.0` is the class `1`.
        cell => classes
            .get(&LevelKey::of_cell(cell))
            .copied()
            .ok_or_else(|| Some(cell.canonical())),
    }
}

pub(super) fn cell_error(problem: CellProblem, path: &Path, line: u64, column: &str) -> DataError {
    let (path, column) = (path.to_path_buf(), column.to_string());
    match problem {
        CellProblem::Missing => DataError::MissingValue { path, line, column },
        CellProblem::NotNumeric(value) => DataError::NotNumeric {
            path,
            line,
            column,
            value,
        },
        CellProblem::NotFinite(value) => DataError::NotFinite {
            path,
            line,
            column,
            value,
        },
        CellProblem::UnknownCategory { value, known } => DataError::UnknownCategory {
            path,
            line,
            column,
            value,
            known,
        },
        CellProblem::Invalid { value, expected } => DataError::InvalidValue {
            path,
            line,
            column,
            value,
            expected,
        },
    }
}

/// Matches the header to the schema; every missing or doubled column is reported, and `None`
/// returned when any was.
pub(super) fn resolve_columns(
    header: &[String],
    schema: &DatasetSchema,
    path: &Path,
    problems: &mut dyn Problems,
) -> Result<Option<ResolvedColumns>, DataError> {
    let mut position = HashMap::with_capacity(header.len());
    let mut usable = true;
    for (i, name) in header.iter().enumerate() {
        if position.insert(name.as_str(), i).is_some() {
            usable = false;
            problems.report(DataError::DuplicateColumn {
                path: path.to_path_buf(),
                column: name.clone(),
            })?;
        }
    }
    let mut find = |name: &str, problems: &mut dyn Problems| -> Result<Option<usize>, DataError> {
        match position.get(name) {
            Some(&i) => Ok(Some(i)),
            None => {
                usable = false;
                problems.report(DataError::MissingColumn {
                    path: path.to_path_buf(),
                    column: name.to_owned(),
                    available: abbreviated(header),
                })?;
                Ok(None)
            }
        }
    };
    let label = find(&schema.label.column, problems)?;
    let pixel_scale = schema.image.as_ref().map(|image| 1.0 / image.pixel_max);
    let compile = |column: &FeatureColumn| {
        ColumnEncoder::compile(column, pixel_scale).map_err(|reason| DataError::SchemaInvalid {
            path: path.to_path_buf(),
            reason: format!("features.columns {:?}: {reason}", column.name),
        })
    };
    let mut features = Vec::new();
    if schema.features.all_other_columns {
        for (i, name) in header.iter().enumerate() {
            if Some(i) != label {
                let mut column = FeatureColumn::numeric(name);
                column.kind = schema.features.kind;
                features.push((i, compile(&column)?));
            }
        }
    } else {
        for column in &schema.features.columns {
            if let Some(i) = find(&column.name, problems)? {
                features.push((i, compile(column)?));
            }
        }
    }
    let Some(label) = label.filter(|_| usable) else {
        return Ok(None);
    };
    let width: usize = features.iter().map(|(_, e)| e.width()).sum();
    if let Some(expected) = schema.features.count
        && expected != features.len()
    {
        let names: Vec<String> = features.iter().map(|(i, _)| header[*i].clone()).collect();
        problems.report(DataError::FeatureColumnCount {
            path: path.to_path_buf(),
            expected,
            found: features.len(),
            columns: abbreviated(&names),
        })?;
        return Ok(None);
    }
    if let Some(image) = &schema.image {
        let expected = image.shape.iter().product::<usize>();
        if expected != width {
            problems.report(DataError::ImageShape {
                path: path.to_path_buf(),
                shape: image.shape,
                expected,
                found: width,
            })?;
            return Ok(None);
        }
    }
    Ok(Some(ResolvedColumns { label, features }))
}
