//! The site's datasets as the node holds them: checked at start without reading a record, read
//! the first time an admitted task needs them.
//!
//! [`SiteDataset::prepare`] runs when the node starts. It reads the dataset's schema, its column
//! declaration and its anonymization pipeline, and refuses — before any record is read — a
//! declaration that would let a direct identifier or unredacted free text reach training
//! ([`tutela_privacy::anonymize::refuses_to_train`]). It reads no data: a task that the node's
//! checks refuse (policy, approvals, privacy budget) never causes a record to be read.
//!
//! [`SiteDataset::load`] runs once, for the first admitted task, and keeps the result in memory
//! (never on disk: nothing of the data is written under the node's work directory, so there is
//! no plaintext copy to encrypt or leak):
//!
//! 1. the file is read, streamed, as its column declaration says (CSV or JSON Lines; a cell that
//!    does not match gets an error naming file, line and column);
//! 2. the anonymization pipeline runs (drop, pseudonymize, generalize, shift dates, redact,
//!    k-anonymity) and produces its de-identification report;
//! 3. the salted commitment over the anonymized rows is computed (when the node has a site secret);
//! 4. the columns whose role is `feature` or `label` — and any other kept column the training
//!    schema names explicitly — become the training table, which is split and standardised as
//!    [`LocalDataset`] describes.
//!
//! A dataset that declares no columns is a plain table of features and label (CSV, Parquet or a
//! PostgreSQL query), read directly through the schema's encoding.
//!
//! [`SiteDataset::check`] reads the whole dataset the way [`SiteDataset::load`] would and lists
//! every problem it finds (`tutela-node data check`, and the node's check at start); it keeps
//! nothing of what it read.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tutela_privacy::anonymize::{AnonymizeConfig, Pipeline, Role, Schema, SiteSecret};
use tutela_privacy::commitment::{self, CommitmentBuilder, DatasetCommitment, commitment_salt};

use crate::config::DatasetConfig;
use crate::data::source::raw::{anonymized_source, read_raw};
use crate::data::source::{self, SourceKind};
use crate::data::{CheckReport, DataError, DatasetSchema, Table, check_source, read_table};
use crate::local::LocalDataset;

/// The anonymization a dataset goes through.
struct Protection {
    pipeline: Pipeline,
    secret: SiteSecret,
}

/// One configured dataset of the site, checked and ready to load.
pub struct SiteDataset {
    name: String,
    config: DatasetConfig,
    schema: DatasetSchema,
    /// SHA-256 of the schema file's bytes, hex: what a job's schema can be compared with.
    schema_sha256: String,
    n_features: usize,
    protection: Option<Protection>,
    salt: Option<[u8; 32]>,
    loaded: Mutex<Option<Arc<LocalDataset>>>,
}

impl std::fmt::Debug for SiteDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteDataset")
            .field("name", &self.name)
            .field("path", &self.config.path)
            .field("anonymized", &self.protection.is_some())
            .finish_non_exhaustive()
    }
}

fn read_text(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl SiteDataset {
    /// Checks one configured dataset without reading its records. `site_secret` is the node's
    /// site secret (required when the dataset declares `columns`).
    pub fn prepare(
        name: &str,
        config: &DatasetConfig,
        site_secret: Option<&[u8; 32]>,
    ) -> Result<SiteDataset, DataError> {
        let schema_bytes = std::fs::read(&config.schema).map_err(|source| DataError::Io {
            path: config.schema.clone(),
            source,
        })?;
        let schema_sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &schema_bytes));
        let schema =
            DatasetSchema::from_toml_str(&String::from_utf8_lossy(&schema_bytes), &config.schema)?;
        let protection = match &config.columns {
            None => None,
            Some(columns_path) => {
                let anonymize_error = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| DataError::Anonymize { path, source }
                };
                let columns = Schema::from_toml(&read_text(columns_path)?)
                    .map_err(anonymize_error(columns_path))?;
                check_training_columns(&schema, &columns, columns_path)?;
                let (anonymize, config_path) = match &config.anonymize {
                    Some(p) => (
                        AnonymizeConfig::from_toml(&read_text(p)?).map_err(anonymize_error(p))?,
                        p.as_path(),
                    ),
                    None => (AnonymizeConfig::default(), columns_path.as_path()),
                };
                let pipeline =
                    Pipeline::new(columns, anonymize).map_err(anonymize_error(config_path))?;
                let secret = site_secret.ok_or_else(|| {
                    DataError::SiteSecret(format!(
                        "dataset {name} declares its columns, which needs the node's site_secret_file"
                    ))
                })?;
                let secret =
                    SiteSecret::new(secret).map_err(|e| DataError::SiteSecret(e.to_string()))?;
                Some(Protection { pipeline, secret })
            }
        };
        // The data file must be there at start: a node that cannot read its data says so now,
        // not at its first task. Opening reads no record.
        if let SourceKind::File(_) = SourceKind::of(config) {
            std::fs::File::open(&config.path).map_err(|source| DataError::Io {
                path: config.path.clone(),
                source,
            })?;
        }
        let n_features = match schema.declared_feature_count() {
            Some(n) => n,
            // Only a plain table can lack a count (a declared dataset names its columns): its
            // header says how many. A CSV's or Parquet file's header reads no record.
            None => {
                let source = source::open(name, config)?;
                source
                    .header()
                    .iter()
                    .filter(|c| **c != schema.label.column)
                    .count()
            }
        };
        Ok(SiteDataset {
            name: name.to_string(),
            config: config.clone(),
            schema,
            schema_sha256,
            n_features,
            protection,
            salt: site_secret.map(|s| commitment_salt(s, name)),
            loaded: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn schema(&self) -> &DatasetSchema {
        &self.schema
    }

    /// SHA-256 of the schema file, hex.
    pub fn schema_sha256(&self) -> &str {
        &self.schema_sha256
    }

    /// Whether this dataset's schema file is the one a job names (`[data] schema_sha256`). A job
    /// without the key is accepted (jobs from before it existed); see [`check_schema_digest`].
    pub fn check_job_schema(
        &self,
        job_schema_sha256: Option<&str>,
    ) -> Result<(), SchemaDigestMismatch> {
        check_schema_digest(job_schema_sha256, &self.schema_sha256)
    }

    /// Reads the whole dataset as [`load`](Self::load) would (through the anonymization pipeline
    /// when it declares its columns) and lists every problem; keeps nothing of the data. A
    /// problem in the raw records of a declared dataset, or in the pipeline, ends the list (the
    /// pipeline's reader stops at the first); the training columns' encoding lists them all.
    pub fn check(&self) -> CheckReport {
        let Some(protection) = &self.protection else {
            return match source::open(&self.name, &self.config) {
                Ok(mut source) => check_source(source.as_mut(), &self.schema),
                Err(e) => CheckReport::with_problem(e),
            };
        };
        let raw = match read_raw(&self.name, &self.config, protection.pipeline.schema()) {
            Ok(raw) => raw,
            Err(e) => return CheckReport::with_problem(e),
        };
        match protection.pipeline.run(&raw, &protection.secret) {
            Ok((anonymized, _)) => check_source(
                &mut anonymized_source(&anonymized, &self.schema, &self.origin()),
                &self.schema,
            ),
            Err(source) => CheckReport::with_problem(DataError::Anonymize {
                path: self.origin(),
                source,
            }),
        }
    }

    /// Runs `read` over the dataset's records as training reads them (through the
    /// anonymization pipeline when it declares its columns), keeping nothing: what a
    /// consortium-statistics release reads (`SiteLedgers::release_statistics`).
    pub fn with_records<T, E: From<DataError>>(
        &self,
        read: impl FnOnce(&mut dyn source::RecordSource) -> Result<T, E>,
    ) -> Result<T, E> {
        let Some(protection) = &self.protection else {
            return read(source::open(&self.name, &self.config)?.as_mut());
        };
        let raw = read_raw(&self.name, &self.config, protection.pipeline.schema())?;
        let (anonymized, _) =
            protection
                .pipeline
                .run(&raw, &protection.secret)
                .map_err(|source| DataError::Anonymize {
                    path: self.origin(),
                    source,
                })?;
        read(&mut anonymized_source(
            &anonymized,
            &self.schema,
            &self.origin(),
        ))
    }

    /// The data file, or `postgres:<name>` for a query: what errors and logs name.
    pub fn origin(&self) -> std::path::PathBuf {
        match SourceKind::of(&self.config) {
            SourceKind::File(_) => self.config.path.clone(),
            SourceKind::Postgres => source::postgres_origin(&self.name),
        }
    }

    /// Features per example, known without reading a record.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Whether the dataset goes through the anonymization pipeline.
    pub fn is_anonymized(&self) -> bool {
        self.protection.is_some()
    }

    /// Reads, anonymizes, commits, splits and standardises the dataset the first time, and
    /// returns the same in-memory result afterwards.
    pub fn load(&self) -> Result<Arc<LocalDataset>, DataError> {
        // A poisoned lock only means an earlier load panicked; the slot is still consistent
        // (either empty or a finished dataset).
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let dataset = Arc::new(self.read()?);
        tracing::info!(
            dataset = %self.name,
            source = %self.origin().display(),
            train_rows = dataset.train.n_rows,
            validation_rows = dataset.validation.n_rows,
            features = dataset.n_features(),
            classes = dataset.train.n_classes(),
            statistics = ?dataset.statistics,
            anonymized = dataset.deid.is_some(),
            commitment = dataset.commitment.map(|c| c.root_hex()).unwrap_or_default(),
            "dataset loaded"
        );
        if let Some(report) = &dataset.deid {
            tracing::info!(
                dataset = %self.name,
                report = %serde_json::to_string(report).unwrap_or_default(),
                "de-identification report"
            );
        }
        *slot = Some(dataset.clone());
        Ok(dataset)
    }

    fn read(&self) -> Result<LocalDataset, DataError> {
        let origin = self.origin();
        let Some(protection) = &self.protection else {
            let table = read_table(
                source::open(&self.name, &self.config)?.as_mut(),
                &self.schema,
            )?;
            let mut dataset = LocalDataset::from_table(
                &self.name,
                &origin,
                self.schema.clone(),
                &table,
                &self.config,
            )?;
            dataset.commitment = self.salt.map(|salt| commit_training_table(&salt, &table));
            return Ok(dataset);
        };
        let raw = read_raw(&self.name, &self.config, protection.pipeline.schema())?;
        let (anonymized, report) =
            protection
                .pipeline
                .run(&raw, &protection.secret)
                .map_err(|source| DataError::Anonymize {
                    path: origin.clone(),
                    source,
                })?;
        drop(raw);
        let commitment = self
            .salt
            .map(|salt| commitment::commit_table(&salt, &anonymized));
        let table = read_table(
            &mut anonymized_source(&anonymized, &self.schema, &origin),
            &self.schema,
        )?;
        let mut dataset = LocalDataset::from_table(
            &self.name,
            &origin,
            self.schema.clone(),
            &table,
            &self.config,
        )?;
        dataset.commitment = commitment;
        dataset.deid = Some(report);
        Ok(dataset)
    }
}

/// The training schema may only use columns the declaration lets reach training: a direct
/// identifier or a free-text column as a feature or label is refused at start, naming it.
fn check_training_columns(
    schema: &DatasetSchema,
    columns: &Schema,
    origin: &Path,
) -> Result<(), DataError> {
    let refuse = |name: &str, why: &str| DataError::SchemaInvalid {
        path: origin.to_path_buf(),
        reason: format!("column {name:?} {why}"),
    };
    let mut named: Vec<&str> = schema
        .features
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    named.push(schema.label.column.as_str());
    for name in named {
        let spec = columns
            .column(name)
            .map_err(|_| refuse(name, "is used by the training schema but not declared here"))?;
        if matches!(spec.role, Role::DirectIdentifier | Role::FreeText) {
            return Err(refuse(
                name,
                "is a direct identifier or free text and may not be a feature or the label",
            ));
        }
    }
    Ok(())
}

/// The commitment of a plain (undeclared) dataset: its label and features as the model sees
/// them, each float in its shortest round-trip form.
fn commit_training_table(salt: &[u8; 32], table: &Table) -> DatasetCommitment {
    let mut builder = CommitmentBuilder::new(salt);
    let mut cells: Vec<String> = Vec::with_capacity(table.n_features + 1);
    for r in 0..table.n_rows {
        cells.clear();
        let label = table.labels[r] as usize;
        cells.push(table.class_names.get(label).cloned().unwrap_or_default());
        if let Some(row) = table.row(r) {
            cells.extend(row.iter().map(|x| x.to_string()));
        }
        builder.push_row(cells.iter().enumerate().map(|(i, c)| {
            let tag = if i == 0 {
                commitment::tag::LABEL
            } else {
                commitment::tag::FLOAT
            };
            (tag, c.as_str())
        }));
    }
    builder.finish()
}

/// A job names a schema file other than this site's (`[data] schema_sha256`): the officers
/// signed another schema (columns, categories, encoding) than the one this site would train
/// with. The message names both digests' first 12 hex digits and nothing of the site (no path),
/// so it may leave the site as the decline's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the job's schema is sha256 {job}…, this site's schema file is sha256 {site}…: update the \
     site's schema file to the consortium's, or the job's data.schema_sha256"
)]
pub struct SchemaDigestMismatch {
    /// The job's digest, first 12 hex digits.
    pub job: String,
    /// This site's, first 12 hex digits.
    pub site: String,
}

/// Compares a job's `[data] schema_sha256` with the site's schema file's digest. Absent from
/// the job: accepted (the schema is then matched by name only, as before the key existed).
pub fn check_schema_digest(job: Option<&str>, site: &str) -> Result<(), SchemaDigestMismatch> {
    const PREFIX: usize = 12;
    match job {
        Some(wanted) if !wanted.eq_ignore_ascii_case(site) => Err(SchemaDigestMismatch {
            job: wanted.chars().take(PREFIX).collect(),
            site: site.chars().take(PREFIX).collect(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod schema_digest_tests {
    use super::*;

    #[test]
    fn a_job_naming_another_schema_is_refused_with_both_prefixes_and_no_path() {
        let site = "0123456789abcdef".repeat(4);
        let other = "fedcba9876543210".repeat(4);
        check_schema_digest(Some(&site), &site).unwrap();
        check_schema_digest(None, &site).unwrap();
        let err = check_schema_digest(Some(&other), &site).unwrap_err();
        assert_eq!(err.job, "fedcba987654");
        assert_eq!(err.site, "0123456789ab");
        let text = err.to_string();
        assert!(
            text.contains("fedcba987654") && text.contains("0123456789ab"),
            "{text}"
        );
        assert!(
            !text.contains('/') || text.contains("data.schema_sha256"),
            "{text}"
        );
        assert!(
            !text.contains(&other) && !text.contains(&site),
            "prefixes only: {text}"
        );
    }
}
