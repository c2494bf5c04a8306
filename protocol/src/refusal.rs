//! A site's refusal as it crosses the wire: a stable code and, where one is known and is a plain
//! identifier, a column name — never free text. The site node converts its errors into these
//! (`site-node::failure::SiteFailure`), and the coordinator parses what a node sends back into
//! a [`TypedRefusal`] and keeps only that: a node that is buggy or hostile cannot make the
//! coordinator store, or relay into the append-only audit trail, text of its choosing (a cell
//! value, a local path, anything).
//!
//! The wire form is `code[ column=NAME][: note]`; the note is for the site's own log and for the
//! node's answers the site's policy makes public (the job check), and the coordinator drops it.

use std::fmt;
use std::str::FromStr;

/// The stable codes of a site's refusal. Their strings are an interface: the coordinator, the
/// trail and officers' tooling may match on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureCode {
    /// The dataset's file could not be opened or read.
    DataUnreadable,
    /// The dataset's schema or column declaration is unusable.
    DataSchemaInvalid,
    /// The file has no header or no rows.
    DataEmpty,
    /// A line of the wrong width, or not CSV/JSON as declared.
    DataMalformed,
    /// A line, record or field longer than the readers' limit.
    DataTooLong,
    /// A column the schema needs is not in the file.
    DataMissingColumn,
    /// A column the file has twice, or the declaration does not declare.
    DataUnexpectedColumn,
    /// A cell is empty where a value is needed.
    DataMissingValue,
    /// A cell is not of its column's type (not a number, not a date, not finite).
    DataInvalidValue,
    /// A label that is not one of the schema's classes.
    DataUnknownLabel,
    /// A categorical value that is not one of the schema's categories (and the column refuses
    /// unseen values).
    DataUnknownCategory,
    /// The data does not match the schema's feature count or image shape.
    DataSchemaMismatch,
    /// The table cannot be split or standardised.
    DataUnusable,
    /// The anonymization pipeline refused or failed.
    DataAnonymization,
    /// The site secret is missing or unusable.
    SiteSecret,
    /// The job spec or the strategy settings the coordinator sent cannot be used.
    JobSpecInvalid,
    /// The job's model cannot be built from its spec.
    ModelInvalid,
    /// The global model could not be read, decrypted or loaded.
    GlobalModelUnusable,
    /// The global model received is not the one the task names.
    GlobalModelMismatch,
    /// Local training failed.
    TrainingFailed,
    /// The update could not be computed or prepared for upload.
    UpdateFailed,
    /// An update filter (DP, masking) refused the update.
    UpdateFiltered,
    /// DP-SGD could not be planned, the budget refuses it, or the ledger could not be written.
    PrivacyRefused,
    /// The site's privacy ledger could not be read, or lacks spends the audit trail holds (it
    /// was deleted or rolled back: an officer restores it from the trail).
    PrivacyLedgerUnusable,
    /// The job's planned privacy spend would pass the site's caps.
    PrivacyBudget,
    /// Not approved by this site's officers, or against the site policy.
    PolicyRefused,
    /// The task names a schema this site has no dataset for.
    UnknownSchema,
    /// The task is of a kind this node does not do, or lacks what its kind needs.
    TaskInvalid,
    /// The task's deadline passed before the node could start.
    DeadlinePassed,
    /// The site's audit trail could not be checked or written.
    AuditUnavailable,
    /// The job's tokenizer (named by digest) is not one this site holds.
    TokenizerRefused,
    /// The job's base checkpoint (named by digest) is not one this site holds.
    BaseModelRefused,
    /// Anything else inside the node.
    Internal,
}

impl FailureCode {
    pub fn as_str(self) -> &'static str {
        use FailureCode::*;
        match self {
            DataUnreadable => "data.unreadable",
            DataSchemaInvalid => "data.schema_invalid",
            DataEmpty => "data.empty",
            DataMalformed => "data.malformed",
            DataTooLong => "data.too_long",
            DataMissingColumn => "data.missing_column",
            DataUnexpectedColumn => "data.unexpected_column",
            DataMissingValue => "data.missing_value",
            DataInvalidValue => "data.invalid_value",
            DataUnknownLabel => "data.unknown_label",
            DataUnknownCategory => "data.unknown_category",
            DataSchemaMismatch => "data.schema_mismatch",
            DataUnusable => "data.unusable",
            DataAnonymization => "data.anonymization",
            SiteSecret => "site.secret_unusable",
            JobSpecInvalid => "job.spec_invalid",
            ModelInvalid => "model.invalid",
            GlobalModelUnusable => "model.global_unusable",
            GlobalModelMismatch => "model.global_mismatch",
            TrainingFailed => "training.failed",
            UpdateFailed => "update.failed",
            UpdateFiltered => "update.filtered",
            PrivacyRefused => "privacy.refused",
            PrivacyLedgerUnusable => "privacy.ledger_unusable",
            PrivacyBudget => "privacy.budget",
            PolicyRefused => "policy.refused",
            UnknownSchema => "task.unknown_schema",
            TaskInvalid => "task.invalid",
            DeadlinePassed => "task.deadline_passed",
            AuditUnavailable => "audit.unavailable",
            TokenizerRefused => "model.tokenizer_refused",
            BaseModelRefused => "model.base_refused",
            Internal => "node.internal",
        }
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FailureCode {
    /// Every code, in declaration order.
    pub const ALL: [FailureCode; 33] = [
        FailureCode::DataUnreadable,
        FailureCode::DataSchemaInvalid,
        FailureCode::DataEmpty,
        FailureCode::DataMalformed,
        FailureCode::DataTooLong,
        FailureCode::DataMissingColumn,
        FailureCode::DataUnexpectedColumn,
        FailureCode::DataMissingValue,
        FailureCode::DataInvalidValue,
        FailureCode::DataUnknownLabel,
        FailureCode::DataUnknownCategory,
        FailureCode::DataSchemaMismatch,
        FailureCode::DataUnusable,
        FailureCode::DataAnonymization,
        FailureCode::SiteSecret,
        FailureCode::JobSpecInvalid,
        FailureCode::ModelInvalid,
        FailureCode::GlobalModelUnusable,
        FailureCode::GlobalModelMismatch,
        FailureCode::TrainingFailed,
        FailureCode::UpdateFailed,
        FailureCode::UpdateFiltered,
        FailureCode::PrivacyRefused,
        FailureCode::PrivacyLedgerUnusable,
        FailureCode::PrivacyBudget,
        FailureCode::PolicyRefused,
        FailureCode::UnknownSchema,
        FailureCode::TaskInvalid,
        FailureCode::DeadlinePassed,
        FailureCode::AuditUnavailable,
        FailureCode::TokenizerRefused,
        FailureCode::BaseModelRefused,
        FailureCode::Internal,
    ];
}

/// A code outside the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a site refusal code (see tutela_protocol::refusal::FailureCode)")]
pub struct UnknownCode(pub String);

impl FromStr for FailureCode {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FailureCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCode(s.chars().take(64).collect()))
    }
}

/// The longest column name a refusal carries.
pub const MAX_COLUMN_NAME: usize = 64;

/// Whether `column` is a name a refusal may carry: ASCII letters, digits, `_`, `.`, `-`, at most
/// [`MAX_COLUMN_NAME`] bytes (a header cell of a malformed file could hold anything).
pub fn is_plain_column(column: &str) -> bool {
    !column.is_empty()
        && column.len() <= MAX_COLUMN_NAME
        && column
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What the coordinator keeps of a site's refusal: the code and the column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypedRefusal {
    pub code: FailureCode,
    pub column: Option<String>,
}

/// Why a refusal from a site could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefusalError {
    #[error(transparent)]
    UnknownCode(#[from] UnknownCode),
    #[error("the refusal's column is not a plain identifier of at most {MAX_COLUMN_NAME} bytes")]
    Column,
}

impl TypedRefusal {
    /// Reads the wire form `code[ column=NAME][: note]`, dropping the note.
    pub fn parse(wire: &str) -> Result<TypedRefusal, RefusalError> {
        let head = wire.split_once(": ").map_or(wire, |(head, _)| head);
        let (code, column) = match head.split_once(" column=") {
            Some((code, column)) => (code, Some(column)),
            None => (head, None),
        };
        let code = code.parse::<FailureCode>()?;
        let column = match column {
            Some(c) if is_plain_column(c) => Some(c.to_string()),
            Some(_) => return Err(RefusalError::Column),
            None => None,
        };
        Ok(TypedRefusal { code, column })
    }
}

/// `code[ column=NAME]`.
impl fmt::Display for TypedRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code.as_str())?;
        if let Some(c) = &self.column {
            write!(f, " column={c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back() {
        for code in FailureCode::ALL {
            assert_eq!(code.as_str().parse::<FailureCode>(), Ok(code));
        }
    }

    #[test]
    fn only_the_code_and_a_plain_column_are_kept() {
        let r = TypedRefusal::parse("data.invalid_value column=date_of_birth: anything").unwrap();
        assert_eq!(r.code, FailureCode::DataInvalidValue);
        assert_eq!(r.to_string(), "data.invalid_value column=date_of_birth");
        let r = TypedRefusal::parse("privacy.budget: the job needs 3.0, 1.0 is left").unwrap();
        assert_eq!(r.to_string(), "privacy.budget");
        assert_eq!(
            TypedRefusal::parse("policy.refused").unwrap().to_string(),
            "policy.refused"
        );
    }

    #[test]
    fn free_text_and_unknown_codes_are_refused() {
        for wire in [
            "",
            "patient 4711 has HIV",
            "data.invalid_value\n/home/site/data.csv:3",
            "/srv/hospital/patients.csv: column ssn: 123-45-6789",
            "data.invalid_valuex",
        ] {
            assert!(TypedRefusal::parse(wire).is_err(), "{wire:?}");
        }
        assert_eq!(
            TypedRefusal::parse("data.invalid_value column=1990-13-45 x"),
            Err(RefusalError::Column)
        );
    }
}
