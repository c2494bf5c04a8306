//! Local tabular data: dataset schemas and their feature encodings, record sources (CSV,
//! Parquet, PostgreSQL, anonymized tables), splits, site shards and standardisation.
//!
//! A [`DatasetSchema`] (TOML, the consortium's schema file; `docs/schema.md` documents every key)
//! says which column is the label, what its classes are, which columns are features, how each
//! feature's cells become numbers (numeric, categorical one-hot, ordinal, boolean, date) and what
//! a missing cell becomes. [`read_table`] reads any [`RecordSource`] through that encoding into
//! a [`Table`], and refuses a malformed record with an error that names the file, the 1-based line
//! (the header is line 1; a Parquet or SQL record is numbered as the line it would have in a CSV
//! export) and the column. [`check_source`] reads the same way but lists every problem instead of
//! stopping at the first. Splits and shards are deterministic functions of a seed, so every run of
//! a demo or test sees the same rows.
//!
//! Sections: [`schema`] (the schema file), [`encode`] (cells to feature values), [`read`] (records
//! to a table, problems), [`source`] (one [`RecordSource`] per kind of input, chosen in
//! [`source::open`]), [`table`] (the table, splits, shards), [`standardize`], [`stats`] (a site's
//! share of the consortium statistics).

use std::path::PathBuf;

pub mod encode;
pub mod read;
pub mod schema;
pub mod source;
pub mod standardize;
pub mod stats;
pub mod table;

pub use encode::{Cell, OwnedCell};
pub use read::{CheckReport, check_source, load_csv, read_csv, read_table};
pub use schema::{
    DatasetSchema, FeatureColumn, FeatureKind, FeatureSpec, ImageSpec, Imputation, ImputeValue,
    LabelSpec, MissingRule, StandardizeSpec, Statistic, StatisticsRange, StatisticsSpec,
    UnseenRule,
};
pub use source::RecordSource;
pub use standardize::Standardizer;
pub use table::{ShardConfig, Shards, Split, Table, site_shards, stratified_split};

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
    #[error("{}, line 1: column {column:?} is missing from the header (it has: {available}); add it to the export, or ask the consortium whether the schema should name it", .path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    #[error("{}, line 1: column {column:?} appears more than once in the header; rename or remove one", .path.display())]
    DuplicateColumn { path: PathBuf, column: String },
    #[error("{}, line {line}: {found} fields, but the header has {expected}; look for an unquoted comma or a cut line", .path.display())]
    FieldCount {
        path: PathBuf,
        line: u64,
        expected: usize,
        found: usize,
    },
    #[error("{}, line {line}, column {column:?}: the value is missing; fill it in, or ask the consortium for a missing-value rule for this column (`missing = \"impute\"` in the schema)", .path.display())]
    MissingValue {
        path: PathBuf,
        line: u64,
        column: String,
    },
    #[error("{}, line {line}, column {column:?}: {value:?} is not a number; correct it, or ask the consortium whether the column's type should be another (docs/schema.md)", .path.display())]
    NotNumeric {
        path: PathBuf,
        line: u64,
        column: String,
        value: String,
    },
    #[error("{}, line {line}, column {column:?}: {value:?} is not a finite number (NaN, infinity, or beyond the f32 range); correct it, or leave the cell empty if the column has a missing-value rule", .path.display())]
    NotFinite {
        path: PathBuf,
        line: u64,
        column: String,
        value: String,
    },
    #[error("{}, line {line}, column {column:?}: unknown label {value:?} (the schema's classes are {known}); correct it, or leave the row out", .path.display())]
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
    #[error("{}, line 1: the schema expects {expected} feature columns besides the label, the header has {found} ({columns}); the schema's list of columns says which each must be", .path.display())]
    FeatureColumnCount {
        path: PathBuf,
        expected: usize,
        found: usize,
        /// The header's feature columns, abbreviated.
        columns: String,
    },
    #[error("{}: image shape {shape:?} needs {expected} feature columns, but the schema selects {found}", .path.display())]
    ImageShape {
        path: PathBuf,
        shape: [usize; 3],
        expected: usize,
        found: usize,
    },
    /// A categorical cell that is not one of the schema's categories, in a column whose
    /// `unseen` rule is `refuse`.
    #[error("{}, line {line}, column {column:?}: {value:?} is not one of the schema's categories ({known}); correct the value, or ask the consortium to add the category or to set `unseen = \"other\"` or `\"ignore\"` for this column", .path.display())]
    UnknownCategory {
        path: PathBuf,
        line: u64,
        column: String,
        value: String,
        known: String,
    },
    /// A cell that its column's type cannot read: an ordinal level, a boolean spelling or a date
    /// that the schema does not list or whose format it does not match.
    #[error("{}, line {line}, column {column:?}: {value:?} is not {expected}; correct the value (or the schema's declaration of the column)", .path.display())]
    InvalidValue {
        path: PathBuf,
        line: u64,
        column: String,
        value: String,
        expected: String,
    },
    /// A Parquet file or a PostgreSQL query that cannot be read or whose column types cannot be
    /// used. `origin` is the file or `postgres:<dataset>`; `reason` names the column where there is
    /// one, never a value.
    #[error("{origin}: {reason}")]
    Source { origin: String, reason: String },
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
