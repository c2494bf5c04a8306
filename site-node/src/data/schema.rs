//! The consortium's dataset schema (TOML): label, feature columns and their encodings, image
//! shape, reference statistics. Every key is documented in `docs/schema.md`.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::encode::{ColumnEncoder, LevelKey, OwnedCell};
use super::{DataError, Standardizer};

/// How a feature column's cells become numbers (see `docs/schema.md`). The encoding is done by
/// the node from the consortium's schema, so every site feeds the model the same columns in the
/// same order whatever its local data holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// A decimal number, parsed as f64 and kept as f32; NaN and infinities are refused. One
    /// feature.
    #[default]
    Numeric,
    /// One of `categories`, one-hot encoded in the listed order (plus an `(other)` feature when
    /// `unseen = "other"`).
    Categorical,
    /// One of `levels`, encoded as its position in the list (0, 1, ...). One feature.
    Ordinal,
    /// One of `true_values` (1) or `false_values` (0). One feature.
    Boolean,
    /// A date in `format`, encoded as the number of days since `epoch` (negative before it). One
    /// feature.
    Date,
}

/// What a categorical value not in the schema's `categories` becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnseenRule {
    /// An error naming the line and column (the default: a value the consortium did not foresee
    /// is worth a look).
    #[default]
    Refuse,
    /// A 1 in an extra last feature, `<column>=(other)`.
    Other,
    /// All the column's features 0.
    Ignore,
}

/// What a missing cell (an empty CSV field, a JSON or SQL null, a Parquet null) becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingRule {
    /// An error naming the line and column (the default).
    #[default]
    Refuse,
    /// The column's `impute.value`, encoded like any cell of the column.
    Impute,
    /// As `impute`, plus a feature `<column>(missing)` that is 1 where the cell was missing and 0
    /// elsewhere, so the model can tell an imputed value from a measured one.
    ImputeWithIndicator,
}

/// Which consortium statistic an imputed value is. It says where `value` came from (it is part of
/// the schema's digest, so the officers who approve a job see it); the node imputes `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    Mean,
    Median,
    Mode,
}

/// An imputed value as the schema writes it: a number, a boolean, or text (a category, a level,
/// a boolean spelling or a date in the column's format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImputeValue {
    Number(f64),
    Bool(bool),
    Text(String),
}

impl ImputeValue {
    /// The value as a cell of the column, so it is encoded exactly as a present cell would be.
    pub fn to_cell(&self) -> OwnedCell {
        match self {
            ImputeValue::Number(x) => OwnedCell::Number(*x),
            ImputeValue::Bool(b) => OwnedCell::Bool(*b),
            ImputeValue::Text(t) => OwnedCell::Text(t.clone()),
        }
    }
}

/// `impute = { statistic = "median", value = 1.2 }` of a column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Imputation {
    pub statistic: Statistic,
    pub value: ImputeValue,
}

/// One named feature column and its encoding. The keys other than `name`, `type`, `missing` and
/// `impute` belong to one type each (`categories`/`unseen` to categorical, `levels` to ordinal,
/// `true_values`/`false_values` to boolean, `format`/`epoch` to date); a key of another type is
/// refused by [`DatasetSchema::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureColumn {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: FeatureKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categories: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unseen: Option<UnseenRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub false_values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(default)]
    pub missing: MissingRule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impute: Option<Imputation>,
}

impl FeatureColumn {
    /// A numeric column with the default rules (what `all_other_columns` selects).
    pub fn numeric(name: &str) -> Self {
        FeatureColumn {
            name: name.to_string(),
            kind: FeatureKind::Numeric,
            categories: None,
            unseen: None,
            levels: None,
            true_values: None,
            false_values: None,
            format: None,
            epoch: None,
            missing: MissingRule::Refuse,
            impute: None,
        }
    }

    /// How many features the column becomes.
    pub fn encoded_width(&self) -> usize {
        let values = match self.kind {
            FeatureKind::Categorical => {
                self.categories.as_ref().map_or(0, Vec::len)
                    + usize::from(self.unseen == Some(UnseenRule::Other))
            }
            _ => 1,
        };
        values + usize::from(self.missing == MissingRule::ImputeWithIndicator)
    }
}

/// Which columns are features: either an explicit list, or every column except the label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// The feature columns, in the order the model sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<FeatureColumn>,
    /// Every column except the label is a feature, in file order.
    #[serde(default)]
    pub all_other_columns: bool,
    /// The type of every column when `all_other_columns` is set: `numeric` or `boolean` (the
    /// types with no per-column settings).
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
    /// `[statistics]`: the public ranges of the numeric columns, which bound each row's influence
    /// on the consortium statistics (`data::stats`). Part of the schema, so of its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<StatisticsSpec>,
}

/// `[statistics]` of a schema: what a statistics job may assume of the data without looking at
/// it (see `docs/schema.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsSpec {
    /// Histogram bins over a numeric or date column's range, unless its range says otherwise.
    #[serde(default = "default_bins")]
    pub bins: u32,
    /// One entry per numeric or date feature column (with `all_other_columns`: per feature
    /// column, in the file's order).
    #[serde(default)]
    pub ranges: Vec<StatisticsRange>,
}

fn default_bins() -> u32 {
    20
}

/// `{ column = "age", low = 0, high = 110 }`: a column's public range (a value outside it is
/// clipped to the nearer end in the statistics, never in training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsRange {
    pub column: String,
    pub low: f64,
    pub high: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bins: Option<u32>,
}

/// `[standardize]` of a schema: one mean and one standard deviation per feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardizeSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mean: Vec<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub std: Vec<f32>,
    /// Instead of `mean` and `std`: a consortium statistics file (relative to the schema file)
    /// whose dictionary gives them ([`super::stats::standardize_from`]), with its SHA-256, so
    /// the schema's digest binds the statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
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
        let mut schema: DatasetSchema =
            toml::from_str(text).map_err(|source| DataError::SchemaSyntax {
                path: origin.to_path_buf(),
                source,
            })?;
        schema.validate(origin)?;
        super::stats::resolve_standardize(&mut schema, origin)?;
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
        // Classes are matched as categories are (a number by its value), so `1` and `1.0` are one.
        let mut seen = HashSet::new();
        for class in &self.label.classes {
            if !seen.insert(LevelKey::of_text(class)) {
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
        if self.features.all_other_columns
            && !matches!(
                self.features.kind,
                FeatureKind::Numeric | FeatureKind::Boolean
            )
        {
            return Err(invalid(format!(
                "features.type = {:?} needs settings per column: list the columns instead of all_other_columns",
                self.features.kind
            )));
        }
        let mut seen = HashSet::new();
        for column in &self.features.columns {
            ColumnEncoder::compile(column, None).map_err(|reason| {
                invalid(format!("features.columns {:?}: {reason}", column.name))
            })?;
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
        if self.statistics.is_some() {
            // The layout checks every range against the columns, so a bad one is found when the
            // schema is read, not when a statistics job runs.
            super::stats::layout_of(self, origin)?;
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

    /// How many features the schema itself fixes (the encoded width of an explicit list, `count`,
    /// or the image shape); `None` when only the file's header can tell (`all_other_columns` without `count`).
    pub fn declared_feature_count(&self) -> Option<usize> {
        if let Some(image) = &self.image {
            return Some(image.shape.iter().product());
        }
        if !self.features.columns.is_empty() {
            return Some(
                self.features
                    .columns
                    .iter()
                    .map(FeatureColumn::encoded_width)
                    .sum(),
            );
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
