//! Declared schema (column roles and types), cell values, records and tables.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use super::AnonymizeError;

/// What a column is, from a data-protection point of view. The role decides which transforms
/// are mandatory before training (see [`super::refuses_to_train`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Identifies a person on its own (name, record number, e-mail): must be dropped or
    /// pseudonymized.
    DirectIdentifier,
    /// Identifies a person in combination with other columns (age, postcode, sex, dates): the
    /// subject of k-anonymity.
    QuasiIdentifier,
    /// The attribute an attacker wants to learn (diagnosis, salary): the subject of l-diversity.
    Sensitive,
    /// An ordinary input feature.
    Feature,
    /// The training target.
    Label,
    /// Unstructured text that may contain any PII: must be redacted or dropped.
    FreeText,
}

/// The declared type of a column's cells (`Null` is allowed in every column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Int,
    Float,
    Text,
    Date,
}

/// One declared column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    pub name: String,
    pub role: Role,
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

/// A declared schema: the ordered columns of every record.
///
/// TOML form:
/// ```toml
/// [[column]]
/// name = "age"
/// role = "quasi_identifier"
/// type = "int"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    #[serde(rename = "column")]
    pub columns: Vec<ColumnSpec>,
}

impl Schema {
    /// Parses and validates (non-empty, unique names) a TOML schema.
    pub fn from_toml(text: &str) -> Result<Self, AnonymizeError> {
        let schema: Schema =
            toml::from_str(text).map_err(|e| AnonymizeError::Parse(format!("schema: {e}")))?;
        schema.validate()?;
        Ok(schema)
    }

    /// Checks that names are unique and non-empty.
    pub fn validate(&self) -> Result<(), AnonymizeError> {
        for (i, c) in self.columns.iter().enumerate() {
            if c.name.is_empty() {
                return Err(AnonymizeError::InvalidConfig {
                    column: format!("#{i}"),
                    reason: "empty column name".into(),
                });
            }
            if self.columns[..i].iter().any(|o| o.name == c.name) {
                return Err(AnonymizeError::InvalidConfig {
                    column: c.name.clone(),
                    reason: "declared twice".into(),
                });
            }
        }
        Ok(())
    }

    /// Index of a column by name.
    pub fn index_of(&self, name: &str) -> Result<usize, AnonymizeError> {
        self.columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| AnonymizeError::UnknownColumn(name.to_string()))
    }

    /// The spec of a column by name.
    pub fn column(&self, name: &str) -> Result<&ColumnSpec, AnonymizeError> {
        self.index_of(name).map(|i| &self.columns[i])
    }
}

/// A calendar date, stored as days since 1970-01-01 (proleptic Gregorian), so that shifting is
/// integer arithmetic and no time-zone can creep in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Date(pub i32);

impl Date {
    /// A date from year, month (1-12) and day; `None` if it does not exist.
    pub fn from_ymd(year: i32, month: u32, day: u32) -> Option<Date> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        // Howard Hinnant's days_from_civil.
        let y = i64::from(if month <= 2 { year - 1 } else { year });
        let era = if y >= 0 { y } else { y - 399 } / 400;
        let yoe = y - era * 400;
        let mp = i64::from((month + 9) % 12);
        let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        i32::try_from(era * 146_097 + doe - 719_468).ok().map(Date)
    }

    /// (year, month, day).
    pub fn ymd(self) -> (i32, u32, u32) {
        let z = i64::from(self.0) + 719_468;
        let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
    }

    /// Parses `YYYY-MM-DD`.
    pub fn parse_iso(s: &str) -> Option<Date> {
        let mut it = s.split('-');
        let y = it.next()?.parse().ok()?;
        let m = it.next()?.parse().ok()?;
        let d = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Date::from_ymd(y, m, d)
    }

    /// The date `days` later (earlier if negative).
    pub fn add_days(self, days: i32) -> Date {
        Date(self.0.saturating_add(days))
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

/// Days in a month of the proleptic Gregorian calendar (0 for an invalid month).
pub fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

/// One cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Date(Date),
}

impl Value {
    /// The cell as text, for hashing (pseudonyms, date shifts) and display. Floats use Rust's
    /// shortest round-trip form, so equal floats give equal pseudonyms.
    pub fn canonical(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Int(i) => i.to_string(),
            Value::Float(x) => x.to_string(),
            Value::Text(s) => s.clone(),
            Value::Date(d) => d.to_string(),
        }
    }

    /// Name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Date(_) => "date",
        }
    }
}

// Equality and hashing are by bit pattern for floats so that values can key hash maps
// (equivalence classes); NaN equals itself here, which is what grouping needs.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::Date(a), Value::Date(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Value::Null => {}
            Value::Int(i) => i.hash(state),
            Value::Float(x) => x.to_bits().hash(state),
            Value::Text(s) => s.hash(state),
            Value::Date(d) => d.hash(state),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            other => f.write_str(&other.canonical()),
        }
    }
}

/// One row: cells in schema order.
pub type Record = Vec<Value>;

/// Rows under a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub schema: Schema,
    pub rows: Vec<Record>,
}

impl Table {
    /// Checks every row's width and every cell's type against the schema.
    pub fn validate(&self) -> Result<(), AnonymizeError> {
        let width = self.schema.columns.len();
        for (r, row) in self.rows.iter().enumerate() {
            if row.len() != width {
                return Err(AnonymizeError::RowWidth {
                    row: r,
                    expected: width,
                    got: row.len(),
                });
            }
            for (cell, spec) in row.iter().zip(&self.schema.columns) {
                let ok = matches!(
                    (cell, spec.ty),
                    (Value::Null, _)
                        | (Value::Int(_), ColumnType::Int)
                        | (Value::Float(_), ColumnType::Float)
                        | (Value::Int(_), ColumnType::Float)
                        | (Value::Text(_), ColumnType::Text)
                        | (Value::Date(_), ColumnType::Date)
                );
                if !ok {
                    return Err(AnonymizeError::CellType {
                        column: spec.name.clone(),
                        row: r,
                        expected: spec.ty,
                        got: cell.kind(),
                    });
                }
            }
        }
        Ok(())
    }
}
