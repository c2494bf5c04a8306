//! Scoring a published model outside the federation: `tutela-node evaluate` and `predict`.
//!
//! The model is rebuilt from the job spec (registry name and hyper-parameters) and the dataset
//! schema (input shape, classes), then its weights are loaded from a safetensors file, checked
//! name by name and shape by shape.
//!
//! # Standardisation, honestly
//!
//! The model expects features scaled as the sites scaled them in training
//! ([`crate::local::standardizer_for`]):
//!
//! - When the schema declares `[standardize]` reference statistics, every site used them, so they
//!   are used here too, and any option below is ignored (with a warning): other statistics would
//!   score a model on features it was never trained on.
//! - Otherwise, for tabular data, each site used its own training split's statistics, so no
//!   single set is "the" one the model expects, and the caller chooses explicitly:
//!   [`Standardization::FitOn`] the union of some CSV files, typically the sites' training data
//!   (their pooled statistics approximate what the model saw and use no test row: the honest
//!   choice for scoring a held-out test split), or [`Standardization::FitOnInput`], the scored file
//!   itself (convenient, but the test rows then shape their own scaling, which flatters the score
//!   slightly; say so when you report it). Without a choice the command refuses.
//! - Image data without reference statistics is not standardised; the options are ignored.
//!
//! [`centralized`] trains the job's model on one pooled CSV, the baseline a federated model is
//! compared with; it standardises with the schema's statistics, or those of its training CSV.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::data::{DataError, DatasetSchema, Standardizer, Table, load_csv};
use crate::jobspec::{JobSpecError, JobView};
use crate::local::{StatisticsSource, standardizer_for};
use crate::models::{Model, ModelError};
use crate::train::{Eval, TrainError, evaluate, train_local};
use crate::weights::{WeightsError, load_safetensors, load_weights};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{}: {source}", .path.display())]
    JobSpecFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    JobSpec {
        path: PathBuf,
        #[source]
        source: JobSpecError,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: {source}", .path.display())]
    Weights {
        path: PathBuf,
        // Boxed: WeightsError is large and this error travels in every Result.
        #[source]
        source: Box<WeightsError>,
    },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("classification metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(
        "{}: the schema declares no [standardize] reference statistics, so say which statistics \
         standardise the rows: --standardize-from CSV (e.g. the sites' training data; \
         repeatable) or --standardize-self (fit on the scored file itself)",
        .schema.display()
    )]
    StandardizationNeeded { schema: PathBuf },
    #[error(
        "{}: its rows have {found} features, the evaluated file {expected}",
        .path.display()
    )]
    FeatureMismatch {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("the model takes {expected} input values per row, the table has {found}")]
    ModelInput { expected: String, found: usize },
    #[error("predicting: {0}")]
    Torch(#[from] tch::TchError),
}

/// Which statistics standardise the evaluated rows (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standardization {
    /// Not chosen: fine for image data, an error for tabular data.
    Unspecified,
    /// The pooled statistics of these CSV files (read through the same schema).
    FitOn(Vec<PathBuf>),
    /// The statistics of the evaluated file itself.
    FitOnInput,
}

/// A model rebuilt for offline scoring, with the rows to score.
pub struct Scoring {
    pub model: Model,
    pub table: Table,
    pub schema: DatasetSchema,
}

/// Reads and parses a job spec file, naming the file in errors.
fn read_job(job_spec_path: &Path) -> Result<JobView, OfflineError> {
    let text =
        std::fs::read_to_string(job_spec_path).map_err(|source| OfflineError::JobSpecFile {
            path: job_spec_path.to_path_buf(),
            source,
        })?;
    JobView::from_toml_str(&text).map_err(|source| OfflineError::JobSpec {
        path: job_spec_path.to_path_buf(),
        source,
    })
}

/// Reads the job spec, the schema and the CSV, standardises the rows as asked, rebuilds the
/// model and loads its weights from `model_path`.
pub fn prepare(
    model_path: &Path,
    job_spec_path: &Path,
    csv: &Path,
    schema_path: &Path,
    standardization: &Standardization,
    device: Device,
) -> Result<Scoring, OfflineError> {
    let job = read_job(job_spec_path)?;
    let spec_err = |source| OfflineError::JobSpec {
        path: job_spec_path.to_path_buf(),
        source,
    };
    let schema = DatasetSchema::load(schema_path)?;
    let mut table = load_csv(csv, &schema)?;
    let standardizer = match (standardizer_for(&schema, &table)?, standardization) {
        ((reference, source), chosen) if source != StatisticsSource::LocalTraining => {
            if chosen != &Standardization::Unspecified {
                tracing::warn!(
                    schema = %schema_path.display(),
                    "the sites trained with the schema's own scaling ([standardize] statistics, \
                     or none for images); the standardisation option is ignored"
                );
            }
            reference
        }
        (_, Standardization::Unspecified) => {
            return Err(OfflineError::StandardizationNeeded {
                schema: schema_path.to_path_buf(),
            });
        }
        (_, Standardization::FitOnInput) => Some(Standardizer::fit(&table)?),
        (_, Standardization::FitOn(files)) => Some(Standardizer::fit(&pooled(
            files,
            &schema,
            schema_path,
            table.n_features,
        )?)?),
    };
    if let Some(s) = &standardizer {
        s.apply(&mut table)?;
    }
    let spec = job
        .model_spec(&schema, table.n_features)
        .map_err(spec_err)?;
    let name = job.model_name().map_err(spec_err)?;
    let mut model = Model::new(name, spec, device, job.seed)?;
    let weights_err = |source| OfflineError::Weights {
        path: model_path.to_path_buf(),
        source: Box::new(source),
    };
    let (weights, _metadata) = load_safetensors(model_path).map_err(weights_err)?;
    load_weights(model.var_store_mut(), &weights).map_err(weights_err)?;
    Ok(Scoring {
        model,
        table,
        schema,
    })
}

/// The rows of `files`, read through `schema`, in one table.
fn pooled(
    files: &[PathBuf],
    schema: &DatasetSchema,
    schema_path: &Path,
    n_features: usize,
) -> Result<Table, OfflineError> {
    let mut pooled: Option<Table> = None;
    for file in files {
        let t = load_csv(file, schema)?;
        if t.n_features != n_features {
            return Err(OfflineError::FeatureMismatch {
                path: file.clone(),
                expected: n_features,
                found: t.n_features,
            });
        }
        pooled = Some(match pooled {
            None => t,
            Some(mut p) => {
                p.features.extend_from_slice(&t.features);
                p.labels.extend_from_slice(&t.labels);
                p.n_rows += t.n_rows;
                p
            }
        });
    }
    pooled.ok_or_else(|| OfflineError::StandardizationNeeded {
        schema: schema_path.to_path_buf(),
    })
}

/// Mean cross-entropy and accuracy on the prepared rows.
pub fn score(scoring: &Scoring) -> Result<Eval, OfflineError> {
    Ok(evaluate(&scoring.model, &scoring.table)?)
}

/// AUC, F1, the confusion matrix and calibration of the scored model on the scored table.
pub fn classification(
    scoring: &Scoring,
) -> Result<crate::metrics::ClassificationReport, OfflineError> {
    let probabilities = predict(&scoring.model, &scoring.table, None)?;
    let labels: Vec<usize> = scoring
        .table
        .labels
        .iter()
        .map(|&l| usize::try_from(l).unwrap_or(usize::MAX))
        .collect();
    let classes = probabilities
        .first()
        .map_or(scoring.table.class_names.len(), Vec::len);
    Ok(crate::metrics::classification_report(
        &probabilities,
        &labels,
        classes,
    )?)
}

/// Class probabilities (softmax of the model's outputs, dropout off) of the first `rows` rows
/// (all when `None`), one vector per row.
pub fn predict(
    model: &Model,
    table: &Table,
    rows: Option<usize>,
) -> Result<Vec<Vec<f32>>, OfflineError> {
    let n_features = table.n_features;
    // libtorch panics on a shape mismatch inside forward_t: refuse it here with a message.
    if model.spec().input_features() != Some(n_features) {
        return Err(OfflineError::ModelInput {
            expected: model
                .spec()
                .input_features()
                .map_or("too many".into(), |f| f.to_string()),
            found: n_features,
        });
    }
    let n = rows.map_or(table.n_rows, |r| r.min(table.n_rows));
    if n == 0 {
        return Ok(Vec::new());
    }
    let inputs = Tensor::f_from_slice(&table.features[..n * n_features])?
        .f_view([n as i64, n_features as i64])?
        .f_to_device(model.device())?;
    let probabilities = tch::no_grad(|| -> Result<Tensor, tch::TchError> {
        model
            .net()
            .forward_t(&inputs, false)
            .f_softmax(-1, Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()
    })?;
    let classes = probabilities.size().get(1).copied().unwrap_or(0).max(0) as usize;
    let mut flat = vec![0f32; n * classes];
    probabilities.f_copy_data(&mut flat, n * classes)?;
    Ok(flat.chunks(classes.max(1)).map(<[f32]>::to_vec).collect())
}

/// Trains the job's model centrally on `train_csv` (the pooled data the sites hold between them)
/// for as many epochs as the federation ran in total (`rounds × local_epochs`), with the job's
/// optimizer and seed, and scores it on `test_csv`: the baseline a federated model is compared
/// with. Features are standardised with the schema's reference statistics, or else with the
/// training CSV's (never the test CSV's).
pub fn centralized(
    job_spec_path: &Path,
    train_csv: &Path,
    test_csv: &Path,
    schema_path: &Path,
    device: Device,
) -> Result<Eval, OfflineError> {
    let job = read_job(job_spec_path)?;
    let spec_err = |source| OfflineError::JobSpec {
        path: job_spec_path.to_path_buf(),
        source,
    };
    let schema = DatasetSchema::load(schema_path)?;
    let mut train = load_csv(train_csv, &schema)?;
    let mut test = load_csv(test_csv, &schema)?;
    if let (Some(s), _) = standardizer_for(&schema, &train)? {
        s.apply(&mut train)?;
        s.apply(&mut test)?;
    }
    let mut config = job
        .train_config(&Default::default(), job.seed)
        .map_err(spec_err)?;
    config.epochs = config.epochs.saturating_mul(job.rounds() as usize);
    let spec = job
        .model_spec(&schema, train.n_features)
        .map_err(spec_err)?;
    let model = Model::new(job.model_name().map_err(spec_err)?, spec, device, job.seed)?;
    train_local(&model, &train, &config)?;
    Ok(evaluate(&model, &test)?)
}
