//! What a site says when it cannot do a task: a stable code and, where useful, a column name —
//! never a cell value or a local path.
//!
//! Whatever a node sends the coordinator (a `DeclineTask` reason) is stored there and may be
//! appended to the append-only audit trail, where it stays forever. The node's own errors are
//! written for the site engineer and name the file, the line and the offending value
//! (`…/baddate.csv:3, column date_of_birth: "1990-13-45" is not a date`); none of that may leave
//! the site. So an error is converted, by type, into a [`SiteFailure`]:
//!
//! - [`SiteFailure::wire_reason`] is what leaves: the code (`data.invalid_value`), the column
//!   when one is known and its name is a plain identifier (`column=date_of_birth`), and a note
//!   only for failures about what the *coordinator* sent or the *site's policy* says (a job spec
//!   key, an approval, a budget figure), which carry nothing of the data;
//! - its `Display` is for the site's own log: the wire reason followed by the full detail.
//!
//! Every conversion is here, in one place, and each is an exhaustive `match`: a new error variant
//! does not compile until someone decides what of it may leave the site.

use std::fmt;

use tutela_privacy::anonymize::{AnonymizeError, BadKind, ReadError};

use crate::agent::{LocalError, Refusal};
use crate::data::DataError;
use crate::jobspec::JobSpecError;
use crate::lm::round::LmRoundError;
use crate::lm::text_dataset::TextDatasetError;
use crate::lm::text_source::TextSourceError;
use crate::models::ModelError;
use crate::train::TrainError;

/// The stable codes of [`SiteFailure`] (the protocol crate's, which the coordinator parses).
pub use tutela_protocol::refusal::FailureCode;

/// Why a site could not do a task: what may leave the site ([`wire_reason`](Self::wire_reason))
/// and, for its own log only, the full detail (`Display`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteFailure {
    code: FailureCode,
    /// A schema column's name; `None` where none is known or the name is not a plain identifier
    /// (a header cell of a malformed file could hold anything).
    column: Option<String>,
    /// Sent along: built only from what the coordinator sent or the site's policy says.
    note: Option<String>,
    /// For the site's log: may name files, lines and values.
    detail: String,
}

impl SiteFailure {
    /// A failure with its local detail; nothing but the code leaves the site.
    pub fn new(code: FailureCode, detail: impl fmt::Display) -> Self {
        SiteFailure {
            code,
            column: None,
            note: None,
            detail: detail.to_string(),
        }
    }

    /// About what the coordinator sent or the site's policy says, with no data in it: the whole
    /// message may be sent.
    pub fn with_public_note(code: FailureCode, note: impl fmt::Display) -> Self {
        let note = note.to_string();
        SiteFailure {
            code,
            column: None,
            detail: note.clone(),
            note: Some(note),
        }
    }

    /// Names the column at fault, when its name is a plain identifier.
    pub fn column(mut self, column: &str) -> Self {
        let plain = tutela_protocol::refusal::is_plain_column(column);
        self.column = plain.then(|| column.to_string());
        self
    }

    pub fn code(&self) -> FailureCode {
        self.code
    }

    /// What the coordinator is told: `code[ column=NAME][: note]`.
    pub fn wire_reason(&self) -> String {
        let mut reason = self.code.as_str().to_string();
        if let Some(c) = &self.column {
            reason.push_str(" column=");
            reason.push_str(c);
        }
        if let Some(n) = &self.note {
            reason.push_str(": ");
            reason.push_str(n);
        }
        reason
    }
}

/// The site's log line: the wire reason, then everything else.
impl fmt::Display for SiteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wire = self.wire_reason();
        if self.note.as_deref() == Some(self.detail.as_str()) {
            f.write_str(&wire)
        } else {
            write!(f, "{wire} ({})", self.detail)
        }
    }
}

impl From<&DataError> for SiteFailure {
    fn from(e: &DataError) -> Self {
        use FailureCode::*;
        let at = |code| SiteFailure::new(code, e);
        match e {
            DataError::Io { .. } => at(DataUnreadable),
            DataError::SchemaSyntax { .. } | DataError::SchemaInvalid { .. } => {
                at(DataSchemaInvalid)
            }
            DataError::EmptyFile { .. } | DataError::NoRows { .. } => at(DataEmpty),
            DataError::MissingColumn { column, .. } => at(DataMissingColumn).column(column),
            DataError::DuplicateColumn { column, .. } => at(DataUnexpectedColumn).column(column),
            DataError::FieldCount { .. } | DataError::Csv { .. } => at(DataMalformed),
            DataError::TooLong { .. } => at(DataTooLong),
            DataError::MissingValue { column, .. } => at(DataMissingValue).column(column),
            DataError::NotNumeric { column, .. }
            | DataError::NotFinite { column, .. }
            | DataError::InvalidValue { column, .. } => at(DataInvalidValue).column(column),
            DataError::UnknownCategory { column, .. } => at(DataUnknownCategory).column(column),
            DataError::Source { .. } => at(DataUnreadable),
            DataError::UnknownLabel { column, .. } => at(DataUnknownLabel).column(column),
            DataError::FeatureColumnCount { .. } | DataError::ImageShape { .. } => {
                at(DataSchemaMismatch)
            }
            DataError::InconsistentTable { .. }
            | DataError::Split { .. }
            | DataError::Standardizer { .. } => at(DataUnusable),
            DataError::Raw(raw) => SiteFailure::from(raw),
            DataError::Anonymize { source, .. } => {
                SiteFailure::from(source).with_detail(e.to_string())
            }
            DataError::SiteSecret(_) => at(SiteSecret),
        }
    }
}

impl SiteFailure {
    fn with_detail(mut self, detail: String) -> Self {
        self.detail = detail;
        self
    }
}

impl From<&ReadError> for SiteFailure {
    fn from(e: &ReadError) -> Self {
        use FailureCode::*;
        match e {
            ReadError::Io { .. } => SiteFailure::new(DataUnreadable, e),
            ReadError::Empty { .. } => SiteFailure::new(DataEmpty, e),
            ReadError::Bad { column, kind, .. } => {
                let code = match kind {
                    BadKind::InvalidValue => DataInvalidValue,
                    BadKind::UndeclaredColumn | BadKind::DuplicateColumn => DataUnexpectedColumn,
                    BadKind::MissingColumn => DataMissingColumn,
                    BadKind::Malformed => DataMalformed,
                    BadKind::TooLong => DataTooLong,
                };
                SiteFailure::new(code, e).column(column)
            }
        }
    }
}

impl From<&AnonymizeError> for SiteFailure {
    fn from(e: &AnonymizeError) -> Self {
        let at = || SiteFailure::new(FailureCode::DataAnonymization, e);
        match e {
            AnonymizeError::UnknownColumn(column)
            | AnonymizeError::InvalidConfig { column, .. }
            | AnonymizeError::CellType { column, .. }
            | AnonymizeError::BadCell { column, .. }
            | AnonymizeError::NotInHierarchy { column, .. }
            | AnonymizeError::Refused { column, .. } => at().column(column),
            AnonymizeError::Parse(_)
            | AnonymizeError::RowWidth { .. }
            | AnonymizeError::BadHierarchy { .. }
            | AnonymizeError::Infeasible { .. } => at(),
            AnonymizeError::WeakSecret { .. } => SiteFailure::new(FailureCode::SiteSecret, e),
        }
    }
}

impl From<&JobSpecError> for SiteFailure {
    /// The job spec and strategy settings come from the coordinator: quoting them tells it
    /// nothing of the site.
    fn from(e: &JobSpecError) -> Self {
        SiteFailure::with_public_note(FailureCode::JobSpecInvalid, e)
    }
}

impl From<&ModelError> for SiteFailure {
    fn from(e: &ModelError) -> Self {
        match e {
            // About the job's model spec.
            ModelError::UnknownModel { .. } | ModelError::InvalidSpec { .. } => {
                SiteFailure::with_public_note(FailureCode::ModelInvalid, e)
            }
            ModelError::Torch { .. } => SiteFailure::new(FailureCode::ModelInvalid, e),
        }
    }
}

impl From<&TrainError> for SiteFailure {
    fn from(e: &TrainError) -> Self {
        match e {
            TrainError::Data(d) => SiteFailure::from(d),
            TrainError::InvalidConfig { .. }
            | TrainError::EmptyData { .. }
            | TrainError::DataModelMismatch { .. }
            | TrainError::NonFiniteLoss { .. }
            | TrainError::Torch { .. } => SiteFailure::new(FailureCode::TrainingFailed, e),
        }
    }
}

impl From<&LocalError> for SiteFailure {
    fn from(e: &LocalError) -> Self {
        use FailureCode::*;
        match e {
            LocalError::GlobalModelAtRest(_) | LocalError::GlobalModel { .. } => {
                SiteFailure::new(GlobalModelUnusable, e)
            }
            LocalError::JobSpec(j) => SiteFailure::from(j),
            LocalError::Model(m) => SiteFailure::from(m),
            LocalError::Train(t) => SiteFailure::from(t),
            LocalError::Data(d) => SiteFailure::from(d.as_ref()).with_detail(e.to_string()),
            LocalError::TextData(t) => SiteFailure::from(t.as_ref()).with_detail(e.to_string()),
            LocalError::LanguageRound(r) => {
                SiteFailure::from(r.as_ref()).with_detail(e.to_string())
            }
            LocalError::Update(_) => SiteFailure::new(UpdateFailed, e),
            // Ledger errors name the ledger's file.
            LocalError::Privacy(_) => SiteFailure::new(PrivacyRefused, e),
        }
    }
}

impl From<&LmRoundError> for SiteFailure {
    /// The round's errors may name the base checkpoint's or the tokenizer's files: only what is
    /// about the job (its spec) is quoted.
    fn from(e: &LmRoundError) -> Self {
        use FailureCode::*;
        match e {
            LmRoundError::JobSpec(j) => SiteFailure::from(j),
            LmRoundError::Model(_) | LmRoundError::Tokenizer(_) => {
                SiteFailure::new(ModelInvalid, e)
            }
            LmRoundError::GlobalAdapter(_) => SiteFailure::new(GlobalModelUnusable, e),
            LmRoundError::Train(t) => SiteFailure::from(t).with_detail(e.to_string()),
            LmRoundError::Update(_) => SiteFailure::new(UpdateFailed, e),
            // The key is the job's or the dataset configuration's name, never a value.
            LmRoundError::Data { key, .. } => SiteFailure::new(DataUnusable, e).column(key),
            // Ledger errors name the ledger's file.
            LmRoundError::Privacy(_) => SiteFailure::new(PrivacyRefused, e),
        }
    }
}

impl From<&TextDatasetError> for SiteFailure {
    /// A text dataset's errors name files, lines and fields: only the code and a field name
    /// (a configured key, never a value) leave the site.
    fn from(e: &TextDatasetError) -> Self {
        use FailureCode::*;
        match e {
            TextDatasetError::Config { key, .. } => {
                SiteFailure::new(DataSchemaInvalid, e).column(key)
            }
            TextDatasetError::File { .. } => SiteFailure::new(DataUnreadable, e),
            TextDatasetError::Source { source, .. } => {
                let code = match source {
                    TextSourceError::Io { .. } => DataUnreadable,
                    TextSourceError::LineTooLong { .. }
                    | TextSourceError::DocumentTooLarge { .. } => DataTooLong,
                    TextSourceError::NotUtf8 { .. } | TextSourceError::BadJson { .. } => {
                        DataMalformed
                    }
                    TextSourceError::DuplicateField { .. } => DataUnexpectedColumn,
                    TextSourceError::MissingField { .. } => DataMissingValue,
                    TextSourceError::FieldType { .. } => DataInvalidValue,
                    TextSourceError::Empty { .. } => DataEmpty,
                };
                let failure = SiteFailure::new(code, e);
                match source {
                    TextSourceError::MissingField { field, .. }
                    | TextSourceError::FieldType { field, .. } => failure.column(field),
                    _ => failure,
                }
            }
            TextDatasetError::Protection { source, .. } => {
                SiteFailure::from(source).with_detail(e.to_string())
            }
        }
    }
}

impl From<&Refusal> for SiteFailure {
    /// The gate decides before any data is read, from the task, the site policy, the
    /// approvals and the budget: its reasons are sent, except a ledger that cannot be read.
    fn from(r: &Refusal) -> Self {
        use FailureCode::*;
        match r {
            Refusal::DeadlinePassed { .. } => SiteFailure::with_public_note(DeadlinePassed, r),
            Refusal::UnknownKind(_) | Refusal::NoGlobalModel => {
                SiteFailure::with_public_note(TaskInvalid, r)
            }
            // A language model's job must name its tokenizer: a key missing from the spec.
            Refusal::JobSpec(_) | Refusal::NoTokenizer { .. } => {
                SiteFailure::with_public_note(JobSpecInvalid, r)
            }
            Refusal::UnknownSchema { .. } => SiteFailure::with_public_note(UnknownSchema, r),
            // The dataset's name (announced already), never the problems its check found.
            Refusal::DatasetNotReady { .. } => SiteFailure::with_public_note(DataUnreadable, r),
            // The code alone, as for a read that failed: the reason names the dataset only.
            Refusal::SourceUnreadable { .. } => SiteFailure::new(DataUnreadable, r),
            // The two digests' first hex digits, never the schema file's path.
            Refusal::SchemaDigest(_) => SiteFailure::with_public_note(DataSchemaMismatch, r),
            Refusal::PrivacyBudget(_) => SiteFailure::with_public_note(PrivacyBudget, r),
            Refusal::Ledger(_) => SiteFailure::new(PrivacyLedgerUnusable, r),
            Refusal::Policy(_) => SiteFailure::with_public_note(PolicyRefused, r),
            // Carries the digest the job names and the site's, never the file's path.
            Refusal::Tokenizer(_) => SiteFailure::with_public_note(TokenizerRefused, r),
            // Digests only, never the checkpoint's directory.
            Refusal::BaseModel(_) => SiteFailure::with_public_note(BaseModelRefused, r),
            // May name a file of the site's base checkpoint.
            Refusal::ModelUnusable(_) => SiteFailure::new(ModelInvalid, r),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn the_wire_reason_has_the_code_and_column_and_the_log_has_the_rest() {
        let e = DataError::NotNumeric {
            path: PathBuf::from("/srv/site/data/patients.csv"),
            line: 3,
            column: "age".into(),
            value: "forty-two".into(),
        };
        let f = SiteFailure::from(&e);
        assert_eq!(f.wire_reason(), "data.invalid_value column=age");
        let log = f.to_string();
        assert!(
            log.contains("forty-two") && log.contains("patients.csv"),
            "{log}"
        );
    }

    #[test]
    fn a_column_name_that_is_not_a_plain_identifier_is_left_out() {
        let f = SiteFailure::new(FailureCode::DataUnexpectedColumn, "x").column("1990-13-45 x");
        assert_eq!(f.wire_reason(), "data.unexpected_column");
        let f = SiteFailure::new(FailureCode::DataUnexpectedColumn, "x").column(&"a".repeat(65));
        assert_eq!(f.wire_reason(), "data.unexpected_column");
    }

    #[test]
    fn a_refusal_about_the_task_is_sent_whole() {
        let r = Refusal::UnknownSchema {
            kind: "dataset",
            schema: "mnist".into(),
            known: "breast_cancer".into(),
        };
        let f = SiteFailure::from(&r);
        assert!(f.wire_reason().starts_with("task.unknown_schema: "));
        assert!(f.wire_reason().contains("mnist"));
        let ledger = Refusal::Ledger("privacy ledger /srv/site/ledger/x.ledger: denied".into());
        assert_eq!(
            SiteFailure::from(&ledger).wire_reason(),
            "privacy.ledger_unusable"
        );
    }
}
