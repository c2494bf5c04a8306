//! The anonymization pipeline a site node runs over its data before training.
//!
//! - [`schema`]: declared column roles (direct identifier, quasi-identifier, sensitive, feature,
//!   label, free text) and types; cells ([`Value`]) and [`Table`]s.
//! - [`transform`]: the declarative TOML configuration and its pure per-cell transforms: drop,
//!   keyed pseudonymization (HMAC-SHA-256), generalization (numeric bins, date truncation,
//!   prefixes, category hierarchies), per-person date shifting, free-text redaction.
//! - [`kanon`]: k-anonymity (optionally distinct l-diversity) by a search of the generalization
//!   lattice with bounded row suppression, choosing the least information loss.
//! - [`pii`]: free-text PII detection and redaction with checksum validation; [`corpus`] is the
//!   seeded, labelled synthetic corpus its precision and recall are measured on.
//! - [`pipeline`]: runs all of the above, produces the serializable [`DeidReport`], and
//!   [`refuses_to_train`] on configurations that leave identifiers in the clear.
//! - [`text`]: the same for text datasets (language models): content filter, PII redaction,
//!   SimHash near-duplicate removal, a split by patient or document, a [`text::TextDeidReport`].

pub mod bounded;
pub mod corpus;
pub mod json_line;
pub mod kanon;
pub mod pii;
pub mod pipeline;
pub mod reader;
pub mod schema;
pub mod synthetic;
pub mod text;
pub mod transform;

pub use kanon::{KAnonConfig, KAnonResult, QiLevels, anonymize_k};
pub use pii::{PiiKind, PiiRedactor, PiiSpan};
pub use pipeline::{ColumnReport, DeidReport, Pipeline, refuses_to_train};
pub use reader::{BadKind, ReadError, RecordFormat};
pub use schema::{ColumnSpec, ColumnType, Date, Record, Role, Schema, Table, Value};
pub use transform::{AnonymizeConfig, DatePrecision, SiteSecret, Transform};

use thiserror::Error;

/// Everything that can go wrong in the pipeline; each variant names the column (and row) at
/// fault so that a site engineer can fix the data or the configuration.
#[derive(Debug, Error)]
pub enum AnonymizeError {
    #[error("cannot parse {0}")]
    Parse(String),
    #[error("unknown column `{0}`")]
    UnknownColumn(String),
    #[error("column `{column}`: {reason}")]
    InvalidConfig { column: String, reason: String },
    #[error("row {row}: expected {expected} cells, got {got}")]
    RowWidth {
        row: usize,
        expected: usize,
        got: usize,
    },
    #[error("column `{column}`, row {row}: expected {expected:?}, got a {got} cell")]
    CellType {
        column: String,
        row: usize,
        expected: ColumnType,
        got: &'static str,
    },
    #[error("column `{column}`, row {row}: {reason}")]
    BadCell {
        column: String,
        row: usize,
        reason: String,
    },
    #[error("column `{column}`, row {row}: value `{value}` is not in hierarchy `{hierarchy}`")]
    NotInHierarchy {
        column: String,
        row: usize,
        value: String,
        hierarchy: String,
    },
    #[error("hierarchy `{hierarchy}`: {reason}")]
    BadHierarchy { hierarchy: String, reason: String },
    #[error("refusing to train: column `{column}` {reason}")]
    Refused { column: String, reason: String },
    #[error(
        "k-anonymity infeasible: even full generalization leaves {suppressed} rows to suppress, budget {budget}"
    )]
    Infeasible { suppressed: usize, budget: usize },
    #[error("the site secret must be at least {min} bytes, got {got}")]
    WeakSecret { min: usize, got: usize },
}
