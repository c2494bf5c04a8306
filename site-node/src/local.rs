//! The site's datasets, prepared once for every task that uses them.
//!
//! A [`LocalDataset`] is a configured CSV read through its schema, split into training and
//! validation parts by a stratified split from the configured seed (the same split at every start,
//! so a round's validation metrics are comparable with the previous round's), and standardised.
//!
//! Standardisation, in order of preference ([`standardizer_for`]):
//!
//! 1. The schema's `[standardize]` reference statistics, part of the consortium's data
//!    dictionary: every site scales its features identically, whatever its local class mix.
//! 2. Tabular data without them: the statistics of the site's own *training* split, applied to
//!    both parts (no validation row leaks into them). Limitation: each site then standardises
//!    differently, so the same raw value means slightly different things to the global model at
//!    different sites; consortium-wide statistics (the schema's, or ones computed privately, e.g.
//!    by secure aggregation of sums and sums of squares) are better.
//! 3. Image data without them: none. The schema's `pixel_max` already scales pixels to [0, 1] at
//!    load time, and per-pixel statistics of a border pixel are meaningless.
//!
//! The offline `evaluate`, `predict` and `centralized` commands follow the same rules.

use std::path::{Path, PathBuf};

use tutela_privacy::anonymize::DeidReport;
use tutela_privacy::commitment::DatasetCommitment;

use crate::config::DatasetConfig;
use crate::data::{DataError, DatasetSchema, Standardizer, Table, stratified_split};

/// Where a dataset's standardisation statistics come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatisticsSource {
    /// The schema's `[standardize]` reference statistics.
    Schema,
    /// Fitted on the local training rows.
    LocalTraining,
    /// Not standardised (image data).
    None,
}

/// The standardiser for data of `schema` whose training rows are `train`, and where its
/// statistics come from (see the module documentation).
pub fn standardizer_for(
    schema: &DatasetSchema,
    train: &Table,
) -> Result<(Option<Standardizer>, StatisticsSource), DataError> {
    if let Some(reference) = schema.standardizer()? {
        return Ok((Some(reference), StatisticsSource::Schema));
    }
    if schema.image.is_some() {
        return Ok((None, StatisticsSource::None));
    }
    Ok((
        Some(Standardizer::fit(train)?),
        StatisticsSource::LocalTraining,
    ))
}

/// A dataset ready for training and evaluation.
#[derive(Debug, Clone)]
pub struct LocalDataset {
    /// The schema name jobs use for it (the key of `[datasets.<name>]`).
    pub name: String,
    /// The data file it was read from.
    pub path: PathBuf,
    pub schema: DatasetSchema,
    pub train: Table,
    pub validation: Table,
    /// The statistics applied to both parts (`None`: not standardised).
    pub standardizer: Option<Standardizer>,
    pub statistics: StatisticsSource,
    /// The salted commitment to every row read (after anonymization), for lineage; `None`
    /// without a site secret to derive the salt from (see [`crate::dataset`]).
    pub commitment: Option<DatasetCommitment>,
    /// What the anonymization pipeline did, when the dataset declares its columns.
    pub deid: Option<DeidReport>,
}

impl LocalDataset {
    /// Loads, splits and standardises one configured dataset that declares no `columns` (a
    /// plain CSV of features and label); see [`crate::dataset::SiteDataset`] for the general case.
    pub fn load(name: &str, config: &DatasetConfig) -> Result<LocalDataset, DataError> {
        let schema = DatasetSchema::load(&config.schema)?;
        let table =
            crate::data::read_table(crate::data::source::open(name, config)?.as_mut(), &schema)?;
        Self::from_table(name, &config.path, schema, &table, config)
    }

    /// Splits and standardises a table already loaded.
    pub fn from_table(
        name: &str,
        csv: &Path,
        schema: DatasetSchema,
        table: &Table,
        config: &DatasetConfig,
    ) -> Result<LocalDataset, DataError> {
        let split = stratified_split(table, config.validation_fraction, config.split_seed)?;
        let (mut train, mut validation) = (split.train, split.validation);
        if train.is_empty() || validation.is_empty() {
            return Err(DataError::Split {
                reason: format!(
                    "{}: {} rows give {} training and {} validation rows with validation_fraction \
                     {}; both parts need rows",
                    csv.display(),
                    table.n_rows,
                    train.n_rows,
                    validation.n_rows,
                    config.validation_fraction
                ),
            });
        }
        let (standardizer, statistics) = standardizer_for(&schema, &train)?;
        if let Some(s) = &standardizer {
            s.apply(&mut train)?;
            s.apply(&mut validation)?;
        }
        Ok(LocalDataset {
            name: name.to_string(),
            path: csv.to_path_buf(),
            schema,
            train,
            validation,
            standardizer,
            statistics,
            commitment: None,
            deid: None,
        })
    }

    pub fn n_features(&self) -> usize {
        self.train.n_features
    }
}
