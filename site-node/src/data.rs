//! Local tabular data: dataset schemas, CSV loading, splits, site shards and standardisation.
//!
//! A [`DatasetSchema`] (TOML) says which CSV column is the label, what its classes are, and which
//! columns are features. [`load_csv`] reads a CSV (optionally gzip-compressed) into a [`Table`]
//! and refuses a malformed file with an error that names the file, the 1-based line (the header
//! is line 1) and the column. Splits and shards are deterministic functions of a seed, so every
//! run of a demo or test sees the same rows.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tutela_privacy::anonymize::bounded::{BoundedReader, MAX_FIELD_BYTES, MAX_LINE_BYTES, TooLong};

/// Why data could not be loaded, split or transformed.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid dataset schema: {source}", .path.display())]
    SchemaSyntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{}: invalid dataset schema: {reason}", .path.display())]
    SchemaInvalid { path: PathBuf, reason: String },
    #[error("{}: the file is empty (expected a header line)", .path.display())]
    EmptyFile { path: PathBuf },
    #[error("{}: no data rows after the header", .path.display())]
    NoRows { path: PathBuf },
    #[error("{}, line 1: column {column:?} is missing from the header (it has: {available})", .path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    #[error("{}, line 1: column {column:?} appears more than once in the header", .path.display())]
    DuplicateColumn { path: PathBuf, column: String },
    #[error("{}, line {line}: {found} fields, but the header has {expected}", .path.display())]
    FieldCount {
        path: PathBuf,
        line: u64,
        expected: usize,
        found: usize,
    },
    #[error("{}, line {line}, column {column:?}: the value is missing", .path.display())]
    MissingValue {
        path: PathBuf,
        line: u64,
        column: String,
    },
    #[error("{}, line {line}, column {column:?}: {value:?} is not a number", .path.display())]
    NotNumeric {
        path: PathBuf,
        line: u64,
        column: String,
        value: String,
    },
    #[error("{}, line {line}, column {column:?}: {value:?} is not a finite number (NaN, infinity, or beyond the f32 range)", .path.display())]
    NotFinite {
        path: PathBuf,
        line: u64,
        column: String,
        value: String,
    },
    #[error("{}, line {line}, column {column:?}: unknown label {value:?} (the schema's classes are {known})", .path.display())]
    UnknownLabel {
        path: PathBuf,
        line: u64,
        column: String,
        value: String,
        known: String,
    },
    #[error("{}, line {line}: {source}", .path.display())]
    Csv {
        path: PathBuf,
        line: u64,
        #[source]
        source: csv::Error,
    },
    /// A line, record or field past the readers' limit ([`tutela_privacy::anonymize::bounded`]).
    #[error("{}, line {line}: {what} is longer than the limit of {max} bytes", .path.display())]
    TooLong {
        path: PathBuf,
        line: u64,
        what: &'static str,
        max: u64,
    },
    #[error("{}, line 1: the schema expects {expected} feature columns besides the label, the header has {found}", .path.display())]
    FeatureColumnCount {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("{}: image shape {shape:?} needs {expected} feature columns, but the schema selects {found}", .path.display())]
    ImageShape {
        path: PathBuf,
        shape: [usize; 3],
        expected: usize,
        found: usize,
    },
    #[error("inconsistent table: {reason}")]
    InconsistentTable { reason: String },
    #[error("cannot split the table: {reason}")]
    Split { reason: String },
    #[error("standardizer: {reason}")]
    Standardizer { reason: String },
    /// The raw file does not match its column declaration (the error names file, line, column).
    #[error(transparent)]
    Raw(#[from] tutela_privacy::anonymize::ReadError),
    /// The column declaration or the anonymization pipeline cannot be used, or refuses to let
    /// identifying data reach training.
    #[error("{}: {source}", .path.display())]
    Anonymize {
        path: PathBuf,
        #[source]
        source: tutela_privacy::anonymize::AnonymizeError,
    },
    /// The site secret could not be read.
    #[error("the site secret: {0}")]
    SiteSecret(String),
}

/// How a feature column's text becomes a number. Only numeric columns exist for now; categorical
/// encodings would be new variants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// A decimal number, parsed as f32; NaN and infinities are refused.
    #[default]
    Numeric,
}

/// One named feature column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureColumn {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: FeatureKind,
}

/// Which columns are features: either an explicit list, or every column except the label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// The feature columns, in the order the model sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<FeatureColumn>,
    /// Every column except the label is a feature, in file order.
    #[serde(default)]
    pub all_other_columns: bool,
    /// The type of every column when `all_other_columns` is set.
    #[serde(default, rename = "type")]
    pub kind: FeatureKind,
    /// With `all_other_columns`: how many feature columns the file must have, so that a file
    /// with the wrong columns is refused at load time rather than by the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
}

/// The label column and its classes; class index `i` is `classes[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    pub column: String,
    pub classes: Vec<String>,
}

/// Image data stored one pixel per feature column, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// `[channels, height, width]`.
    pub shape: [usize; 3],
    /// Pixel values are divided by this at load time (255 for 8-bit images gives [0, 1]).
    #[serde(default = "default_pixel_max")]
    pub pixel_max: f32,
}

fn default_pixel_max() -> f32 {
    1.0
}

/// A dataset's schema, read from TOML (see `data/*.schema.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSchema {
    pub name: String,
    pub label: LabelSpec,
    pub features: FeatureSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// Reference feature statistics from the consortium's data dictionary. When present every
    /// site standardizes with them (see [`DatasetSchema::standardizer`]), so that all sites feed the
    /// model identically scaled features whatever their local mix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardize: Option<StandardizeSpec>,
}

/// `[standardize]` of a schema: one mean and one standard deviation per feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardizeSpec {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl DatasetSchema {
    /// The schema's reference standardizer, if it declares one.
    pub fn standardizer(&self) -> Result<Option<Standardizer>, DataError> {
        self.standardize
            .as_ref()
            .map(|s| Standardizer::new(s.mean.clone(), s.std.clone()))
            .transpose()
    }

    /// Reads and validates a schema file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates a schema; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: impl AsRef<Path>) -> Result<Self, DataError> {
        let origin = origin.as_ref();
        let schema: DatasetSchema =
            toml::from_str(text).map_err(|source| DataError::SchemaSyntax {
                path: origin.to_path_buf(),
                source,
            })?;
        schema.validate(origin)?;
        Ok(schema)
    }

    /// Checks what serde cannot: non-empty unique names, exactly one way of selecting features,
    /// a usable image shape.
    pub fn validate(&self, origin: &Path) -> Result<(), DataError> {
        let invalid = |reason: String| DataError::SchemaInvalid {
            path: origin.to_path_buf(),
            reason,
        };
        if self.label.column.is_empty() {
            return Err(invalid("label.column is empty".into()));
        }
        if self.label.classes.len() < 2 {
            return Err(invalid(format!(
                "label.classes needs at least two classes, found {}",
                self.label.classes.len()
            )));
        }
        let mut seen = HashSet::new();
        for class in &self.label.classes {
            if !seen.insert(class.as_str()) {
                return Err(invalid(format!("label.classes lists {class:?} twice")));
            }
        }
        match (
            self.features.all_other_columns,
            self.features.columns.is_empty(),
        ) {
            (true, false) => {
                return Err(invalid(
                    "features: set either all_other_columns = true or columns = [...], not both"
                        .into(),
                ));
            }
            (false, true) => {
                return Err(invalid(
                    "features: no feature columns (set all_other_columns = true or list columns)"
                        .into(),
                ));
            }
            _ => {}
        }
        if self.features.count.is_some() && !self.features.all_other_columns {
            return Err(invalid(
                "features.count only goes with all_other_columns = true (a list fixes the count)"
                    .into(),
            ));
        }
        let mut seen = HashSet::new();
        for column in &self.features.columns {
            if column.name.is_empty() {
                return Err(invalid("features.columns has an empty name".into()));
            }
            if column.name == self.label.column {
                return Err(invalid(format!(
                    "features.columns lists the label column {:?}",
                    column.name
                )));
            }
            if !seen.insert(column.name.as_str()) {
                return Err(invalid(format!(
                    "features.columns lists {:?} twice",
                    column.name
                )));
            }
        }
        if let Some(image) = &self.image {
            if image.shape.contains(&0) {
                return Err(invalid(format!(
                    "image.shape {:?} has a zero dimension",
                    image.shape
                )));
            }
            if !(image.pixel_max.is_finite() && image.pixel_max > 0.0) {
                return Err(invalid(format!(
                    "image.pixel_max must be a positive number, found {}",
                    image.pixel_max
                )));
            }
        }
        Ok(())
    }

    /// How many feature columns the schema itself fixes (an explicit list, `count`, or the image
    /// shape); `None` when only the file's header can tell (`all_other_columns` without `count`).
    pub fn declared_feature_count(&self) -> Option<usize> {
        if let Some(image) = &self.image {
            return Some(image.shape.iter().product());
        }
        if !self.features.columns.is_empty() {
            return Some(self.features.columns.len());
        }
        self.features.count
    }

    /// The shape of one example without the batch dimension: the image shape when there is one,
    /// `[n_features]` otherwise. This is what [`crate::models::ModelSpec::input_shape`] wants.
    pub fn input_shape(&self, n_features: usize) -> Vec<usize> {
        match &self.image {
            Some(image) => image.shape.to_vec(),
            None => vec![n_features],
        }
    }
}

/// Rows of features and labels, in memory.
///
/// `features` is row-major: row `r` is `features[r * n_features..(r + 1) * n_features]`.
/// `labels[r]` indexes `class_names`.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub features: Vec<f32>,
    pub n_rows: usize,
    pub n_features: usize,
    pub labels: Vec<i64>,
    pub feature_names: Vec<String>,
    pub class_names: Vec<String>,
}

impl Table {
    /// Checks that the fields agree with each other: lengths, and every label a valid class.
    pub fn check(&self) -> Result<(), DataError> {
        let bad = |reason: String| Err(DataError::InconsistentTable { reason });
        if self.feature_names.len() != self.n_features {
            return bad(format!(
                "{} feature names for {} features",
                self.feature_names.len(),
                self.n_features
            ));
        }
        if self.n_rows.checked_mul(self.n_features) != Some(self.features.len()) {
            return bad(format!(
                "{} feature values for {} rows of {} features",
                self.features.len(),
                self.n_rows,
                self.n_features
            ));
        }
        if self.labels.len() != self.n_rows {
            return bad(format!(
                "{} labels for {} rows",
                self.labels.len(),
                self.n_rows
            ));
        }
        let n_classes = self.class_names.len() as i64;
        if let Some((row, label)) = self
            .labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l < 0 || l >= n_classes)
        {
            return bad(format!(
                "row {row} has label {label}, but there are {n_classes} classes"
            ));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.n_rows == 0
    }

    pub fn n_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Row `index`'s features, or `None` past the end.
    pub fn row(&self, index: usize) -> Option<&[f32]> {
        let start = index.checked_mul(self.n_features)?;
        self.features
            .get(start..start.checked_add(self.n_features)?)
    }

    /// How many rows each class has, indexed by class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &label in &self.labels {
            if let Some(count) = usize::try_from(label).ok().and_then(|l| counts.get_mut(l)) {
                *count += 1;
            }
        }
        counts
    }

    /// A new table with the given rows, in the given order.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Table, DataError> {
        let mut features = Vec::with_capacity(rows.len() * self.n_features);
        let mut labels = Vec::with_capacity(rows.len());
        for &r in rows {
            let (Some(row), Some(&label)) = (self.row(r), self.labels.get(r)) else {
                return Err(DataError::InconsistentTable {
                    reason: format!("row {r} selected from a table of {} rows", self.n_rows),
                });
            };
            features.extend_from_slice(row);
            labels.push(label);
        }
        Ok(Table {
            features,
            n_rows: rows.len(),
            n_features: self.n_features,
            labels,
            feature_names: self.feature_names.clone(),
            class_names: self.class_names.clone(),
        })
    }

    /// Row indices of each class, in table order, indexed by class.
    fn rows_by_class(&self) -> Vec<Vec<usize>> {
        let mut by_class = vec![Vec::new(); self.class_names.len()];
        for (row, &label) in self.labels.iter().enumerate() {
            if let Some(rows) = usize::try_from(label)
                .ok()
                .and_then(|l| by_class.get_mut(l))
            {
                rows.push(row);
            }
        }
        by_class
    }
}

/// Loads a CSV file (gzip-compressed when its name ends in `.gz`) as the schema describes.
///
/// Values are trimmed of surrounding whitespace. Feature values are parsed as f32 and must be
/// finite; image pixels are divided by the schema's `pixel_max`. Labels must be one of the
/// schema's class names, exactly.
pub fn load_csv(path: impl AsRef<Path>, schema: &DatasetSchema) -> Result<Table, DataError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    };
    read_csv(reader, path, schema)
}

/// Reads CSV text from any reader; `origin` names it in errors.
pub fn read_csv(
    reader: impl Read,
    origin: impl AsRef<Path>,
    schema: &DatasetSchema,
) -> Result<Table, DataError> {
    let path = origin.as_ref();
    // Memory stays bounded on any input: a line or record past MAX_LINE_BYTES fails the read
    // before the csv crate's buffers grow to hold it.
    let (bounded, record_mark) = BoundedReader::new(reader, MAX_LINE_BYTES);
    let too_long_field = |record: &csv::StringRecord, line: u64| -> Result<(), DataError> {
        if record.iter().any(|f| f.len() > MAX_FIELD_BYTES) {
            return Err(DataError::TooLong {
                path: path.to_path_buf(),
                line,
                what: "a field",
                max: MAX_FIELD_BYTES as u64,
            });
        }
        Ok(())
    };
    let mut csv_reader = csv::ReaderBuilder::new()
        // The header is read as an ordinary record so that its line number and field count are
        // checked the same way as the data's.
        .has_headers(false)
        // Field counts are checked here, to name the line and both counts in the error.
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(BufReader::new(bounded));
    let csv_error = |line: u64, source: csv::Error| {
        // An I/O error (a truncated gzip stream, say) is about the file, not about a line; a
        // line or record past the limit is about its line.
        if let csv::ErrorKind::Io(io) = source.kind() {
            if let Some(t) = TooLong::from_io(io) {
                return DataError::TooLong {
                    path: path.to_path_buf(),
                    line: t.line,
                    what: "the line or record",
                    max: t.max,
                };
            }
            let message = source.to_string();
            return DataError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(message),
            };
        }
        let line = source
            .position()
            .map(|p| p.line())
            .filter(|&l| l > 0)
            .unwrap_or(line);
        DataError::Csv {
            path: path.to_path_buf(),
            line,
            source,
        }
    };

    let mut record = csv::StringRecord::new();
    let has_header = csv_reader
        .read_record(&mut record)
        .map_err(|e| csv_error(1, e))?;
    if !has_header {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    record_mark.record_done();
    too_long_field(&record, 1)?;
    let header: Vec<String> = record.iter().map(str::to_owned).collect();
    let columns = resolve_columns(&header, schema, path)?;

    let pixel_scale = schema.image.as_ref().map(|image| 1.0 / image.pixel_max);
    let n_features = columns.features.len();
    let class_index: HashMap<&str, i64> = schema
        .label
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as i64))
        .collect();

    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut last_line = 1;
    loop {
        let more = csv_reader
            .read_record(&mut record)
            .map_err(|e| csv_error(last_line + 1, e))?;
        if !more {
            break;
        }
        record_mark.record_done();
        let line = record.position().map_or(last_line + 1, |p| p.line());
        last_line = line;
        too_long_field(&record, line)?;
        if record.len() != header.len() {
            return Err(DataError::FieldCount {
                path: path.to_path_buf(),
                line,
                expected: header.len(),
                found: record.len(),
            });
        }
        for &column in &columns.features {
            let text = &record[column];
            let value = parse_numeric(text, line, &header[column], path)?;
            features.push(pixel_scale.map_or(value, |scale| value * scale));
        }
        let label_text = &record[columns.label];
        let Some(&label) = class_index.get(label_text) else {
            return Err(DataError::UnknownLabel {
                path: path.to_path_buf(),
                line,
                column: schema.label.column.clone(),
                value: label_text.to_owned(),
                known: schema.label.classes.join(", "),
            });
        };
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    }
    let table = Table {
        n_rows: labels.len(),
        n_features,
        features,
        labels,
        feature_names: columns
            .features
            .iter()
            .map(|&c| header[c].clone())
            .collect(),
        class_names: schema.label.classes.clone(),
    };
    table.check()?;
    Ok(table)
}

/// Column positions in the file of the label and of each feature, in schema order.
struct ResolvedColumns {
    label: usize,
    features: Vec<usize>,
}

fn resolve_columns(
    header: &[String],
    schema: &DatasetSchema,
    path: &Path,
) -> Result<ResolvedColumns, DataError> {
    let mut position = HashMap::with_capacity(header.len());
    for (i, name) in header.iter().enumerate() {
        if position.insert(name.as_str(), i).is_some() {
            return Err(DataError::DuplicateColumn {
                path: path.to_path_buf(),
                column: name.clone(),
            });
        }
    }
    let find = |name: &str| {
        position
            .get(name)
            .copied()
            .ok_or_else(|| DataError::MissingColumn {
                path: path.to_path_buf(),
                column: name.to_owned(),
                available: abbreviated_list(header),
            })
    };
    let label = find(&schema.label.column)?;
    let features = if schema.features.all_other_columns {
        (0..header.len()).filter(|&i| i != label).collect()
    } else {
        schema
            .features
            .columns
            .iter()
            .map(|c| find(&c.name))
            .collect::<Result<Vec<_>, _>>()?
    };
    if let Some(expected) = schema.features.count
        && expected != features.len()
    {
        return Err(DataError::FeatureColumnCount {
            path: path.to_path_buf(),
            expected,
            found: features.len(),
        });
    }
    if let Some(image) = &schema.image {
        let expected = image.shape.iter().product::<usize>();
        if expected != features.len() {
            return Err(DataError::ImageShape {
                path: path.to_path_buf(),
                shape: image.shape,
                expected,
                found: features.len(),
            });
        }
    }
    Ok(ResolvedColumns { label, features })
}

/// The header's names for an error message; wide files (784 pixels) are cut short.
fn abbreviated_list(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(", ... ({} columns)", names.len()));
    }
    text
}

fn parse_numeric(text: &str, line: u64, column: &str, path: &Path) -> Result<f32, DataError> {
    if text.is_empty() {
        return Err(DataError::MissingValue {
            path: path.to_path_buf(),
            line,
            column: column.to_owned(),
        });
    }
    let value: f32 = text.parse().map_err(|_| DataError::NotNumeric {
        path: path.to_path_buf(),
        line,
        column: column.to_owned(),
        value: text.to_owned(),
    })?;
    if !value.is_finite() {
        return Err(DataError::NotFinite {
            path: path.to_path_buf(),
            line,
            column: column.to_owned(),
            value: text.to_owned(),
        });
    }
    Ok(value)
}

/// A table cut in two.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Table,
    pub validation: Table,
}

/// Splits a table so that each class keeps its share in both parts.
///
/// Each class's rows are shuffled with one RNG seeded from `seed` (classes in index order), and
/// `round(validation_fraction × class rows)` of them go to the validation part. Both parts keep
/// the rows in their original order. The same table and seed always give the same split.
pub fn stratified_split(
    table: &Table,
    validation_fraction: f64,
    seed: u64,
) -> Result<Split, DataError> {
    table.check()?;
    if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
        return Err(DataError::Split {
            reason: format!(
                "validation fraction must lie strictly between 0 and 1, found {validation_fraction}"
            ),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut train_rows = Vec::new();
    let mut validation_rows = Vec::new();
    for mut rows in table.rows_by_class() {
        rows.shuffle(&mut rng);
        let n_validation = (rows.len() as f64 * validation_fraction).round() as usize;
        let (validation, train) = rows.split_at(n_validation.min(rows.len()));
        validation_rows.extend_from_slice(validation);
        train_rows.extend_from_slice(train);
    }
    train_rows.sort_unstable();
    validation_rows.sort_unstable();
    Ok(Split {
        train: table.select_rows(&train_rows)?,
        validation: table.select_rows(&validation_rows)?,
    })
}

/// How to cut a table into per-site shards for a federated demo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Number of sites.
    pub n_sites: usize,
    /// Share of every class held out as a common test set before sharding.
    pub test_fraction: f64,
    /// Concentration of the Dirichlet distribution each class's rows are spread with: small
    /// values (0.1–0.5) give strongly skewed sites, large values (100) nearly identical ones.
    pub dirichlet_alpha: f64,
    /// Rows of every class each site gets at least, before the Dirichlet share.
    pub min_per_class: usize,
    pub seed: u64,
}

/// Per-site training tables and the held-out test table.
#[derive(Debug, Clone, PartialEq)]
pub struct Shards {
    pub sites: Vec<Table>,
    pub test: Table,
}

/// Cuts a table into `n_sites` non-IID shards plus a stratified test split.
///
/// First `test_fraction` of every class is held out ([`stratified_split`]). Then, for each
/// class, every site receives `min_per_class` rows and the rest of the class is divided in
/// proportions drawn from Dirichlet(`alpha`, …, `alpha`), so sites see different class mixes
/// (label skew) while each still has every class. Deterministic in `seed`.
pub fn site_shards(table: &Table, config: &ShardConfig) -> Result<Shards, DataError> {
    let split_error = |reason: String| Err(DataError::Split { reason });
    if config.n_sites == 0 {
        return split_error("the number of sites must be at least 1".into());
    }
    if !(config.dirichlet_alpha.is_finite() && config.dirichlet_alpha > 0.0) {
        return split_error(format!(
            "dirichlet_alpha must be a positive number, found {}",
            config.dirichlet_alpha
        ));
    }
    let Split {
        train: pool,
        validation: test,
    } = stratified_split(table, config.test_fraction, config.seed)?;
    // A separate stream from the split's, so that changing alpha does not change the test set.
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5348_4152_4453_0001);
    let mut site_rows = vec![Vec::new(); config.n_sites];
    for (class, mut rows) in pool.rows_by_class().into_iter().enumerate() {
        let guaranteed = config.n_sites * config.min_per_class;
        if rows.len() < guaranteed {
            return split_error(format!(
                "class {:?} has {} training rows, fewer than {} sites × {} rows per class",
                pool.class_names[class],
                rows.len(),
                config.n_sites,
                config.min_per_class
            ));
        }
        rows.shuffle(&mut rng);
        let proportions = sample_dirichlet(config.dirichlet_alpha, config.n_sites, &mut rng);
        let extra = allocate(rows.len() - guaranteed, &proportions);
        let mut next = rows.into_iter();
        for (site, extra_rows) in site_rows.iter_mut().zip(extra) {
            site.extend(next.by_ref().take(config.min_per_class + extra_rows));
        }
    }
    let sites = site_rows
        .into_iter()
        .map(|mut rows| {
            rows.sort_unstable();
            pool.select_rows(&rows)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Shards { sites, test })
}

/// Splits `total` items by `proportions` (summing to 1) with the largest-remainder method, so
/// the counts add up to exactly `total`.
fn allocate(total: usize, proportions: &[f64]) -> Vec<usize> {
    let exact: Vec<f64> = proportions.iter().map(|p| p * total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let assigned: usize = counts.iter().sum();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in by_remainder.iter().take(total.saturating_sub(assigned)) {
        counts[i] += 1;
    }
    counts
}

/// A draw from the symmetric Dirichlet distribution: normalised Gamma(alpha) variates.
fn sample_dirichlet(alpha: f64, n: usize, rng: &mut StdRng) -> Vec<f64> {
    let draws: Vec<f64> = (0..n).map(|_| sample_gamma(alpha, rng)).collect();
    let sum: f64 = draws.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        draws.into_iter().map(|d| d / sum).collect()
    } else {
        // Tiny alphas can underflow every draw to 0; the distribution's limit puts all the mass
        // on one component.
        let mut one_hot = vec![0.0; n];
        one_hot[rng.random_range(0..n)] = 1.0;
        one_hot
    }
}

/// Gamma(shape, 1) by Marsaglia and Tsang's method, boosted for shape < 1.
fn sample_gamma(shape: f64, rng: &mut StdRng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random();
        return sample_gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = sample_standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u: f64 = rng.random();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// Box–Muller; `1 - random()` lies in (0, 1], so the logarithm is finite.
fn sample_standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Per-feature standardisation `(x − mean) / std`.
///
/// Kept a separate, explicit step: a site may fit it on its own training rows, or the
/// coordinator may send consortium-wide statistics ([`Standardizer::new`]), and the same
/// statistics must then be applied to validation and test rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Below this a feature counts as constant; its std is taken as 1 so that it maps to 0
    /// rather than to infinity (MNIST's border pixels are always 0).
    pub const MIN_STD: f64 = 1e-8;

    /// Statistics supplied from outside; checked for matching lengths, finite means and
    /// positive finite standard deviations.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Self, DataError> {
        let bad = |reason: String| Err(DataError::Standardizer { reason });
        if mean.len() != std.len() {
            return bad(format!("{} means but {} stds", mean.len(), std.len()));
        }
        if let Some(i) = mean.iter().position(|m| !m.is_finite()) {
            return bad(format!("mean of feature {i} is {}", mean[i]));
        }
        if let Some(i) = std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!(
                "std of feature {i} is {}, it must be positive",
                std[i]
            ));
        }
        Ok(Standardizer { mean, std })
    }

    /// The population mean and standard deviation of each feature, computed in f64.
    pub fn fit(table: &Table) -> Result<Self, DataError> {
        table.check()?;
        if table.is_empty() {
            return Err(DataError::Standardizer {
                reason: "cannot fit on an empty table".into(),
            });
        }
        let n = table.n_rows as f64;
        let mut sum = vec![0f64; table.n_features];
        for row in table.features.chunks_exact(table.n_features) {
            for (s, &x) in sum.iter_mut().zip(row) {
                *s += f64::from(x);
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let mut squares = vec![0f64; table.n_features];
        for row in table.features.chunks_exact(table.n_features) {
            for ((s, &x), m) in squares.iter_mut().zip(row).zip(&mean) {
                *s += (f64::from(x) - m).powi(2);
            }
        }
        let std = squares
            .iter()
            .map(|s| {
                let std = (s / n).sqrt();
                if std < Self::MIN_STD { 1.0 } else { std as f32 }
            })
            .collect();
        Self::new(mean.iter().map(|&m| m as f32).collect(), std)
    }

    pub fn n_features(&self) -> usize {
        self.mean.len()
    }

    /// Standardises the table's features in place.
    pub fn apply(&self, table: &mut Table) -> Result<(), DataError> {
        table.check()?;
        if table.n_features != self.n_features() {
            return Err(DataError::Standardizer {
                reason: format!(
                    "fitted on {} features, the table has {}",
                    self.n_features(),
                    table.n_features
                ),
            });
        }
        if table.n_features == 0 {
            return Ok(());
        }
        for row in table.features.chunks_exact_mut(self.n_features()) {
            for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
                *x = (*x - m) / s;
            }
        }
        Ok(())
    }

    /// A standardised copy of the table.
    pub fn applied(&self, table: &Table) -> Result<Table, DataError> {
        let mut copy = table.clone();
        self.apply(&mut copy)?;
        Ok(copy)
    }
}
