//! The whole run: per-column transforms, then k-anonymity, with a de-identification report.
//!
//! Order, and why:
//! 1. Every per-column transform reads the *original* row, so date shifts are derived from the
//!    raw person id (not its pseudonym, which would change with the pseudonym length) and the
//!    redactor's name dictionary includes the raw text of direct-identifier columns.
//! 2. Dropped columns leave the schema.
//! 3. k-anonymity runs last, on the transformed values of the quasi-identifiers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::AnonymizeError;
use super::kanon::{KAnonResult, anonymize_k_indexed};
use super::pii::{PiiKind, PiiRedactor};
use super::schema::{ColumnType, Role, Schema, Table, Value};
use super::transform::{AnonymizeConfig, Hierarchies, SiteSecret, Transform, generalize};

/// What one column transform did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnReport {
    pub column: String,
    pub role: Role,
    pub transform: String,
    /// Cells whose value changed (for `drop`: every cell of the column).
    pub cells_changed: usize,
    /// For `redact`: spans replaced per PII type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redactions: BTreeMap<String, usize>,
}

/// The de-identification report of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeidReport {
    /// SHA-256 (hex) of the canonical configuration, see [`AnonymizeConfig::digest`].
    pub config_sha256: String,
    pub rows_in: usize,
    pub rows_out: usize,
    pub columns_in: Vec<String>,
    pub columns_out: Vec<String>,
    pub transforms: Vec<ColumnReport>,
    /// Rows in which at least one cell changed or which were removed.
    pub rows_changed: usize,
    pub cells_changed: usize,
    pub k_anonymity: Option<KAnonResult>,
}

/// A validated schema + configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    schema: Schema,
    config: AnonymizeConfig,
    hierarchies: Hierarchies,
}

/// Refuses configurations that would let identifying data reach training: a direct identifier
/// that is neither dropped nor pseudonymized, or a free-text column that is neither redacted nor
/// dropped. The error names the column. (A pseudonym is kept because joins need a stable key;
/// without the site secret it cannot be reversed.)
pub fn refuses_to_train(schema: &Schema, config: &AnonymizeConfig) -> Result<(), AnonymizeError> {
    for c in &schema.columns {
        let t = config.transform_for(&c.name);
        match c.role {
            Role::DirectIdentifier
                if !matches!(t, Transform::Drop | Transform::Pseudonymize { .. }) =>
            {
                return Err(AnonymizeError::Refused {
                    column: c.name.clone(),
                    reason: format!(
                        "is a direct identifier left as `{}`: drop or pseudonymize it",
                        t.describe()
                    ),
                });
            }
            Role::FreeText if !matches!(t, Transform::Drop | Transform::Redact) => {
                return Err(AnonymizeError::Refused {
                    column: c.name.clone(),
                    reason: format!("is free text left as `{}`: redact or drop it", t.describe()),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

impl Pipeline {
    /// Validates the configuration against the schema: columns exist, transforms fit their
    /// column types, hierarchies are trees, date shifting has a person column, QIs are not
    /// dropped, and [`refuses_to_train`] passes.
    pub fn new(schema: Schema, config: AnonymizeConfig) -> Result<Self, AnonymizeError> {
        schema.validate()?;
        let hierarchies = Hierarchies::new(&config.hierarchies)?;
        for (name, t) in &config.columns {
            let spec = schema.column(name)?;
            t.validate(name, spec.ty, &hierarchies)?;
            if matches!(t, Transform::DateShift { .. }) {
                let Some(p) = &config.person_column else {
                    return Err(AnonymizeError::InvalidConfig {
                        column: name.clone(),
                        reason: "date_shift needs `person_column`".into(),
                    });
                };
                schema.index_of(p)?;
            }
        }
        if let Some(k) = &config.k_anonymity {
            for q in &k.quasi_identifiers {
                schema.index_of(&q.column)?;
                if matches!(config.transform_for(&q.column), Transform::Drop) {
                    return Err(AnonymizeError::InvalidConfig {
                        column: q.column.clone(),
                        reason: "a quasi-identifier of k_anonymity is dropped".into(),
                    });
                }
            }
            if let Some(s) = &k.sensitive {
                schema.index_of(s)?;
            }
        }
        refuses_to_train(&schema, &config)?;
        Ok(Pipeline {
            schema,
            config,
            hierarchies,
        })
    }

    /// Parses both TOML documents and validates them.
    pub fn from_toml(schema_toml: &str, config_toml: &str) -> Result<Self, AnonymizeError> {
        Pipeline::new(
            Schema::from_toml(schema_toml)?,
            AnonymizeConfig::from_toml(config_toml)?,
        )
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn config(&self) -> &AnonymizeConfig {
        &self.config
    }

    /// Runs the pipeline over `table` (which must use this pipeline's schema).
    pub fn run(
        &self,
        table: &Table,
        secret: &SiteSecret,
    ) -> Result<(Table, DeidReport), AnonymizeError> {
        if table.schema != self.schema {
            return Err(AnonymizeError::InvalidConfig {
                column: "*".into(),
                reason: "the table's schema differs from the pipeline's".into(),
            });
        }
        table.validate()?;
        let cols = &self.schema.columns;
        let transforms: Vec<&Transform> = cols
            .iter()
            .map(|c| self.config.transform_for(&c.name))
            .collect();
        let person_col = match &self.config.person_column {
            Some(p) => Some(self.schema.index_of(p)?),
            None => None,
        };

        // The redactor, only if some column needs it; names from config and identifier columns.
        let redactor = if transforms.iter().any(|t| matches!(t, Transform::Redact)) {
            let mut r = PiiRedactor::new(&self.config.redaction.names)?;
            for (i, c) in cols.iter().enumerate() {
                if c.role == Role::DirectIdentifier && c.ty == ColumnType::Text {
                    r.add_names(table.rows.iter().filter_map(|row| match &row[i] {
                        Value::Text(s) => Some(s.as_str()),
                        _ => None,
                    }));
                }
            }
            Some(r)
        } else {
            None
        };

        let keep: Vec<usize> = (0..cols.len())
            .filter(|&i| !matches!(transforms[i], Transform::Drop))
            .collect();
        let mut changed = vec![0usize; cols.len()];
        let mut redactions: Vec<BTreeMap<String, usize>> = vec![BTreeMap::new(); cols.len()];
        let mut row_changed = vec![false; table.rows.len()];
        let mut rows = Vec::with_capacity(table.rows.len());
        for (r, row) in table.rows.iter().enumerate() {
            let mut out = Vec::with_capacity(keep.len());
            for (i, cell) in row.iter().enumerate() {
                let name = &cols[i].name;
                let new = match transforms[i] {
                    Transform::Keep => cell.clone(),
                    Transform::Drop => {
                        changed[i] += 1;
                        row_changed[r] = true;
                        continue;
                    }
                    Transform::Pseudonymize { length } => match cell {
                        Value::Null => Value::Null,
                        v => Value::Text(secret.pseudonym(&v.canonical(), *length)),
                    },
                    Transform::DateShift { max_days } => match (cell, person_col) {
                        (Value::Date(d), Some(p)) => {
                            let person = &row[p];
                            if matches!(person, Value::Null) {
                                return Err(AnonymizeError::BadCell {
                                    column: cols[p].name.clone(),
                                    row: r,
                                    reason: "null person id: cannot derive a date shift".into(),
                                });
                            }
                            let s = secret.date_shift_days(&person.canonical(), *max_days);
                            Value::Date(d.add_days(s))
                        }
                        (v, _) => v.clone(),
                    },
                    Transform::Redact => match (cell, &redactor) {
                        (Value::Text(s), Some(red)) => {
                            let (text, spans) = red.redact(s);
                            for sp in spans {
                                *redactions[i].entry(kind_name(sp.kind)).or_insert(0) += 1;
                            }
                            Value::Text(text)
                        }
                        (v, _) => v.clone(),
                    },
                    t => generalize(t, cell, &self.hierarchies, name, r)?,
                };
                if new != *cell {
                    changed[i] += 1;
                    row_changed[r] = true;
                }
                out.push(new);
            }
            rows.push(out);
        }
        let mut schema = Schema {
            columns: keep.iter().map(|&i| cols[i].clone()).collect(),
        };
        for c in &mut schema.columns {
            // Generalized and pseudonymized cells are labels, not numbers or dates any more.
            if matches!(
                self.config.transform_for(&c.name),
                Transform::Pseudonymize { .. }
                    | Transform::Bin { .. }
                    | Transform::DateTruncate { .. }
                    | Transform::Prefix { .. }
                    | Transform::Hierarchy { .. }
                    | Transform::Suppress
            ) {
                c.ty = ColumnType::Text;
            }
        }
        let mut transformed = Table { schema, rows };

        let mut k_result = None;
        let mut qi_changed: BTreeMap<String, usize> = BTreeMap::new();
        if let Some(kc) = &self.config.k_anonymity {
            let (out, res, kept) = anonymize_k_indexed(&transformed, kc, &self.hierarchies)?;
            let mut survived = vec![false; transformed.rows.len()];
            for (j, &i) in kept.iter().enumerate() {
                survived[i] = true;
                for (c, spec) in out.schema.columns.iter().enumerate() {
                    if transformed.rows[i][c] != out.rows[j][c] {
                        *qi_changed.entry(spec.name.clone()).or_insert(0) += 1;
                        row_changed[i] = true;
                    }
                }
            }
            // No rows are removed before k-anonymity, so its input index is the input row.
            for (i, s) in survived.iter().enumerate() {
                if !s {
                    row_changed[i] = true;
                }
            }
            transformed = out;
            k_result = Some(res);
        }

        let mut reports: Vec<ColumnReport> = cols
            .iter()
            .enumerate()
            .filter(|(i, _)| !matches!(transforms[*i], Transform::Keep))
            .map(|(i, c)| ColumnReport {
                column: c.name.clone(),
                role: c.role,
                transform: transforms[i].describe(),
                cells_changed: changed[i],
                redactions: redactions[i].clone(),
            })
            .collect();
        if let (Some(kc), Some(res)) = (&self.config.k_anonymity, &k_result) {
            for (q, lvl) in kc.quasi_identifiers.iter().zip(&res.levels) {
                let role = self.schema.column(&q.column).map(|c| c.role)?;
                reports.push(ColumnReport {
                    column: q.column.clone(),
                    role,
                    transform: format!(
                        "k-anonymity level {}/{}: {}",
                        lvl.level, lvl.max_level, lvl.description
                    ),
                    cells_changed: qi_changed.get(&q.column).copied().unwrap_or(0),
                    redactions: BTreeMap::new(),
                });
            }
        }
        let cells_changed = reports.iter().map(|r| r.cells_changed).sum::<usize>()
            + k_result
                .as_ref()
                .map_or(0, |k| k.suppressed_rows * transformed.schema.columns.len());
        let report = DeidReport {
            config_sha256: self.config.digest(),
            rows_in: table.rows.len(),
            rows_out: transformed.rows.len(),
            columns_in: cols.iter().map(|c| c.name.clone()).collect(),
            columns_out: transformed
                .schema
                .columns
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            transforms: reports,
            rows_changed: row_changed.iter().filter(|&&c| c).count(),
            cells_changed,
            k_anonymity: k_result,
        };
        Ok((transformed, report))
    }
}

fn kind_name(k: PiiKind) -> String {
    k.to_string()
}
