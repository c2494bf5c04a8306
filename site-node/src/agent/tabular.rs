//! The local round of a layer network (MLP, CNN) on a table.

use std::path::Path;

use tch::Device;

use tutela_privacy::at_rest::KeyEncryptionKey;

use std::sync::Arc;

use tutela_audit::payload::DatasetDeidentified;

use super::gate::Admitted;
use super::now_ms;
use super::round::{
    Deidentification, DpNoise, LocalError, LocalRound, RoundInput, RoundResult, read_global_model,
};
use crate::data::DatasetSchema;
use crate::dataset::SiteDataset;
use crate::jobspec::{JobView, batch_seed};
use crate::ledger::RoundSpend;
use crate::models::Model;
use crate::train::{evaluate, train_local};
use crate::weights::{NamedTensors, delta, export_weights, load_weights};

/// The job's initial weights: its model built from the job's seed for data of `schema` with
/// `n_features` features. Reads no data.
pub fn initial_weights(
    job: &JobView,
    schema: &DatasetSchema,
    n_features: usize,
    device: Device,
) -> Result<NamedTensors, LocalError> {
    let model = build_model(job, schema, n_features, device)?;
    export_weights(model.var_store()).map_err(|e| LocalError::Update(Box::new(e)))
}

pub(super) fn build_model(
    job: &JobView,
    schema: &DatasetSchema,
    n_features: usize,
    device: Device,
) -> Result<Model, LocalError> {
    let spec = job.model_spec(schema, n_features)?;
    Ok(Model::new(job.model_name()?, spec, device, job.seed)?)
}

/// The round of a layer network on one of the site's tables.
#[derive(Debug, Clone)]
pub struct TabularRound {
    pub dataset: Arc<SiteDataset>,
}

impl LocalRound for TabularRound {
    fn dataset_name(&self) -> &str {
        self.dataset.name()
    }

    fn trained_parameters(&self, job: &JobView) -> Result<usize, LocalError> {
        // Building the model reads no data.
        Ok(build_model(
            job,
            self.dataset.schema(),
            self.dataset.n_features(),
            Device::Cpu,
        )?
        .parameter_count())
    }

    fn initial_weights(&self, job: &JobView, device: Device) -> Result<NamedTensors, LocalError> {
        initial_weights(
            job,
            self.dataset.schema(),
            self.dataset.n_features(),
            device,
        )
    }

    fn deidentification(
        &self,
        site: &str,
        job_id: &str,
    ) -> Result<Option<Deidentification>, LocalError> {
        let data = self
            .dataset
            .load()
            .map_err(|e| LocalError::Data(Box::new(e)))?;
        let Some(report) = &data.deid else {
            return Ok(None);
        };
        Ok(Some(Deidentification::Table(DatasetDeidentified {
            site: site.to_string(),
            dataset: self.dataset.name().to_string(),
            job: job_id.to_string(),
            // The report is counts and column names (serialising plain data cannot fail).
            report: serde_json::to_value(report).unwrap_or_default(),
            dataset_commitment: data.commitment.map(|c| c.root_hex()),
        })))
    }

    fn run(&self, admitted: &Admitted, input: RoundInput<'_>) -> Result<RoundResult, LocalError> {
        local_round(
            admitted,
            &self.dataset,
            input.global_path,
            input.kek,
            input.device,
            input.round,
            input.attempt,
            input.site,
        )
    }
}

/// Loads the global model at `global_path`, evaluates it on the validation split, trains it on
/// the training split and returns the delta.
#[allow(clippy::too_many_arguments)]
pub fn local_round(
    admitted: &Admitted,
    dataset: &SiteDataset,
    global_path: &Path,
    kek: Option<&dyn KeyEncryptionKey>,
    device: Device,
    round: u32,
    attempt: u32,
    site: &str,
) -> Result<RoundResult, LocalError> {
    let name = dataset.name();
    let dataset = dataset.load().map_err(|e| LocalError::Data(Box::new(e)))?;
    let job = &admitted.job;
    let config = job.train_config(
        &admitted.strategy,
        batch_seed(job.seed, round, attempt, site),
    )?;
    let mut model = build_model(job, &dataset.schema, dataset.n_features(), device)?;
    let global_err = |source| LocalError::GlobalModel {
        path: global_path.to_path_buf(),
        source: Box::new(source),
    };
    let global = read_global_model(global_path, kek)?;
    load_weights(model.var_store_mut(), &global).map_err(global_err)?;
    let eval = evaluate(&model, &dataset.validation)?;
    let eval_units = if crate::ledger::releases_dp_metrics(job) {
        crate::train::evaluate_units(&model, &dataset.validation)?
    } else {
        Vec::new()
    };
    let (report, privacy, dp_noise) = train_round(
        admitted,
        name,
        (round, attempt),
        &model,
        &dataset.train,
        &config,
    )?;
    let single_class_predicted = single_class_predicted(&model, &dataset.validation);
    if let Some(class) = single_class_predicted {
        tracing::warn!(
            class,
            rows = dataset.validation.n_rows,
            "the trained model predicts one class for every validation row: it has learnt the \
             majority class only (see `tutela privacy plan` for the noise, `tutela-node evaluate`)"
        );
    }
    let local = export_weights(model.var_store()).map_err(|e| LocalError::Update(Box::new(e)))?;
    // Both lists are sorted by name (export_weights and load_safetensors sort), as delta needs.
    let delta = delta(&local, &global).map_err(|e| LocalError::Update(Box::new(e)))?;
    Ok(RoundResult {
        delta,
        eval,
        eval_perplexity: None,
        eval_units,
        train_samples: dataset.train.n_rows,
        train_loss: report.mean_loss,
        train_seconds: report.seconds,
        dataset_commitment: dataset.commitment.map(|c| c.root_hex()),
        deid_config_sha256: dataset.deid.as_ref().map(|r| r.config_sha256.clone()),
        privacy,
        dp_noise,
        single_class_predicted,
    })
}

/// The class `model` predicts for every row of `validation`, when it predicts only one (and
/// there are at least two rows); a report that cannot be made is no warning.
fn single_class_predicted(model: &Model, validation: &crate::data::Table) -> Option<usize> {
    if validation.n_rows < 2 {
        return None;
    }
    let probabilities = crate::offline::predict(model, validation, None).ok()?;
    let labels: Vec<usize> = validation
        .labels
        .iter()
        .map(|&l| usize::try_from(l).unwrap_or(usize::MAX))
        .collect();
    let classes = probabilities.first().map_or(0, Vec::len);
    crate::metrics::classification_report(&probabilities, &labels, classes)
        .ok()?
        .single_class_predicted
}

/// Trains one round: DP-SGD when the job says `privacy.mode = "local"`, one clipped step of
/// record-level distributed DP-SGD with `"distributed"` (both checked against the
/// ledger with the real row count first, and the steps that ran recorded afterwards, even when
/// training fails part-way), plain training otherwise.
fn train_round(
    admitted: &Admitted,
    dataset: &str,
    round_attempt: (u32, u32),
    model: &Model,
    train: &crate::data::Table,
    config: &crate::train::TrainConfig,
) -> Result<
    (
        crate::train::TrainReport,
        Option<RoundSpend>,
        Option<DpNoise>,
    ),
    LocalError,
> {
    let job = &admitted.job;
    let dimension = model.parameter_count();
    let plan = match &admitted.ledgers {
        Some(l) => l.check_with_rows(
            &admitted.job_id,
            round_attempt.0,
            dataset,
            job,
            train.n_rows,
            dimension,
        ),
        None => crate::ledger::plan(job, train.n_rows, dimension),
    }
    .map_err(LocalError::Privacy)?;
    let Some(plan) = plan else {
        return Ok((train_local(model, train, config)?, None, None));
    };
    // Record-level distributed DP: one clipped step, its noise added at encoding as this
    // site's share; charged below like a local round, before anything leaves.
    let (report, spend) = match crate::ledger::training_kind(job) {
        tutela_privacy::ledger::MechanismKind::DistributedDpSgd => {
            crate::dp::train_distributed_step(model, train, config, &plan)
        }
        _ => crate::dp::train_dp(model, train, config, &plan),
    };
    let spent = match &admitted.ledgers {
        Some(l) => l
            .record(
                &admitted.job_id,
                round_attempt,
                dataset,
                train.n_rows,
                &plan,
                &spend,
                now_ms(),
            )
            .map_err(LocalError::Privacy)?,
        None => {
            let eps = |steps| -> Result<f64, LocalError> {
                if steps == 0 {
                    return Ok(0.0);
                }
                let m = plan
                    .mechanism(steps)
                    .map_err(|e| LocalError::Privacy(e.to_string()))?;
                tutela_privacy::accountant::epsilon(&[m], plan.delta, plan.accountant)
                    .map(|g| g.epsilon)
                    .map_err(|e| LocalError::Privacy(e.to_string()))
            };
            let round = eps(spend.steps)?;
            RoundSpend {
                charge: None,
                rows: train.n_rows,
                dataset_delta: plan.delta,
                round_epsilon: round,
                job_epsilon: round,
                dataset_epsilon: round,
                delta: plan.delta,
            }
        }
    };
    tracing::info!(
        round_epsilon = spent.round_epsilon,
        job_epsilon = spent.job_epsilon,
        dataset_epsilon = spent.dataset_epsilon,
        delta = spent.delta,
        planned_job_epsilon = plan.planned_epsilon,
        noise_multiplier = plan.noise_multiplier,
        "privacy spent"
    );
    let mut noise = DpNoise::of_plan(&plan, train.n_rows);
    if spend.kind == tutela_privacy::ledger::MechanismKind::DistributedDpSgd {
        // The job's noise is on the sum over every site's sample: its batch is the job's B.
        noise.expected_batch = config.batch_size as f64;
    }
    Ok((report?, Some(spent), Some(noise)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelSpec;

    fn table(rows: usize) -> crate::data::Table {
        crate::data::Table {
            features: (0..rows * 3).map(|i| i as f32 / 10.0).collect(),
            n_rows: rows,
            n_features: 3,
            labels: (0..rows as i64).map(|i| i % 2).collect(),
            feature_names: vec!["a".into(), "b".into(), "c".into()],
            class_names: vec!["no".into(), "yes".into()],
        }
    }

    #[test]
    fn a_model_that_predicts_one_class_for_every_row_is_reported() {
        let spec = ModelSpec::new(vec![3], 2).with_hidden(vec![4]);
        let model = Model::new("mlp", spec, Device::Cpu, 1).unwrap();
        // Zero weights and an output bias for class 1: every row is predicted 1.
        tch::no_grad(|| {
            for (name, mut v) in model.var_store().variables() {
                if name.ends_with("bias") && v.size() == [2] {
                    v.copy_(&tch::Tensor::from_slice(&[-5.0f32, 5.0]));
                } else {
                    let _ = v.zero_();
                }
            }
        });
        assert_eq!(single_class_predicted(&model, &table(6)), Some(1));
        // Class 1's logit is feature a (hidden unit 0 = relu(a)), class 0's a constant 0.7: the
        // rows with a below it are predicted 0, the others 1, so no warning.
        let spec = ModelSpec::new(vec![3], 2).with_hidden(vec![4]);
        let model = Model::new("mlp", spec, Device::Cpu, 1).unwrap();
        tch::no_grad(|| {
            for (_, mut v) in model.var_store().variables() {
                let _ = v.zero_();
                let values: Option<Vec<f32>> = match v.size().as_slice() {
                    [4, 3] => Some(vec![1., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.]),
                    [2, 4] => Some(vec![0., 0., 0., 0., 1., 0., 0., 0.]),
                    [2] => Some(vec![0.7, 0.]),
                    _ => None,
                };
                if let Some(values) = values {
                    let shaped = tch::Tensor::from_slice(&values).view(v.size().as_slice());
                    v.copy_(&shaped);
                }
            }
        });
        assert_eq!(single_class_predicted(&model, &table(6)), None);
        // Too few rows to say anything.
        assert_eq!(single_class_predicted(&model, &table(1)), None);
    }
}
