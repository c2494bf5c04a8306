//! Tasks handed to site nodes, and the sink their results stream into.
//!
//! Every task a round sends is registered here with its deadline and its destination (the round's
//! aggregator, or the model store for an initial model). A `SubmitUpdate` stream is routed by the
//! `tutela.task` key of its manifest metadata, covered by the stream digest, and the submitting
//! node must be the task's site (from its certificate, never from the message). An update for a
//! closed or unknown task is refused before a single byte is folded in: a late update is never
//! mixed into the next round.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use tutela_protocol::initial_model::InitialModel;
use tutela_protocol::stream::{SafetensorsFileSink, SinkError, TensorSink};
use tutela_protocol::tensor::Manifest;

use crate::aggregate::{RoundAggregation, SiteSink};

mod initial_model;
mod routing;
use initial_model::FiniteModel;
pub use routing::{Routed, RoutingSink, site_metrics};
#[cfg(test)]
mod statistics_tests;

pub use tutela_protocol::federation::meta;

/// Where a task's result goes.
#[derive(Clone)]
pub enum Destination {
    /// The job's initial weights, stored as a model once they match `expected` (the job's
    /// model as the registry describes it, or a LoRA job's zero adapters).
    InitialModel {
        model_dir: PathBuf,
        expected: Arc<InitialModel>,
    },
    /// A training update, into the round's aggregation (whichever the job's is).
    Round {
        aggregator: Arc<dyn RoundAggregation>,
    },
    /// A statistics job's release (`SubmitStatistics`, never a tensor stream): kept as the
    /// task's outcome ([`Outcome::Released`]) for the job's runner to collect.
    Statistics,
}

/// What a site reported with its update.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SiteMetrics {
    pub site: String,
    pub train_samples: u64,
    pub train_loss: f64,
    pub train_seconds: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    pub eval_samples: u64,
    /// A language model's validation perplexity; 0 for other models (or when not sent).
    #[serde(default)]
    pub eval_perplexity: f64,
    /// Under DP, the standard deviations of the noised eval loss and accuracy; 0 when exact.
    #[serde(default)]
    pub eval_loss_stddev: f64,
    #[serde(default)]
    pub eval_accuracy_stddev: f64,
    /// The site's dataset commitment (hex), for lineage; empty when the node sent none.
    #[serde(default)]
    pub dataset_commitment: String,
    /// SHA-256 of the site's anonymization configuration (hex); empty when none.
    #[serde(default)]
    pub deid_config_sha256: String,
    /// ε this round's DP-SGD spent on the site's dataset, and ε of the job there so far (both
    /// at `dp_delta`), as the site's own accountant reports them; 0 without DP.
    #[serde(default)]
    pub dp_round_epsilon: f64,
    #[serde(default)]
    pub dp_job_epsilon: f64,
    #[serde(default)]
    pub dp_delta: f64,
    /// DP-SGD's noise multiplier and expected batch at the site; 0 without DP.
    #[serde(default)]
    pub dp_noise_multiplier: f64,
    #[serde(default)]
    pub dp_expected_batch: f64,
    /// The class the site's trained model predicted for every validation row, when it did.
    #[serde(default)]
    pub single_class_predicted: Option<u32>,
}

/// How a task ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    Accepted {
        digest: String,
        metrics: SiteMetrics,
        /// For an initial-model task: the stored model's id.
        model_id: Option<String>,
    },
    Refused {
        reason: String,
    },
    Declined {
        reason: String,
    },
    /// A statistics task's release, as the site sent it (checked by the runner's collection).
    Released {
        release: crate::statistics::SiteRelease,
    },
}

struct Entry {
    site: String,
    /// The job the task is of: a site may fetch the job's base only while it holds one.
    job_id: String,
    /// The global model the task starts from (empty for an initial-model task).
    model_id: String,
    deadline: Instant,
    destination: Destination,
    closed: bool,
    in_flight: bool,
    outcome: Option<Outcome>,
    group: Arc<TaskGroup>,
}

/// The tasks of one round attempt: the runner waits on it until every task has an outcome or
/// the deadline passes.
#[derive(Default)]
pub struct TaskGroup {
    pub notify: Notify,
}

#[derive(Default)]
pub struct TaskTable {
    entries: Mutex<HashMap<String, Entry>>,
}

impl TaskTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(
        &self,
        task_id: &str,
        job_id: &str,
        site: &str,
        model_id: &str,
        deadline: Instant,
        destination: Destination,
        group: Arc<TaskGroup>,
    ) {
        self.lock().insert(
            task_id.to_string(),
            Entry {
                site: site.to_string(),
                job_id: job_id.to_string(),
                model_id: model_id.to_string(),
                deadline,
                destination,
                closed: false,
                in_flight: false,
                outcome: None,
                group,
            },
        );
    }

    /// Records an outcome, unless the task already has one or was closed. Returns whether it was
    /// recorded.
    pub fn finish(&self, task_id: &str, outcome: Outcome) -> bool {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(task_id) else {
            return false;
        };
        e.in_flight = false;
        if e.closed || e.outcome.is_some() {
            return false;
        }
        e.outcome = Some(outcome);
        e.group.notify.notify_waiters();
        true
    }

    /// A stream for the task broke before it was accepted: the node may try again before the
    /// deadline.
    pub fn release(&self, task_id: &str) {
        if let Some(e) = self.lock().get_mut(task_id) {
            e.in_flight = false;
        }
    }

    /// Tasks sent and not answered yet (the `tutela_coordinator_open_tasks` gauge).
    pub fn open_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| !e.closed && e.outcome.is_none())
            .count()
    }

    /// Whether every listed task has an outcome.
    pub fn all_finished(&self, task_ids: &[String]) -> bool {
        let entries = self.lock();
        task_ids
            .iter()
            .all(|t| entries.get(t).is_none_or(|e| e.outcome.is_some()))
    }

    /// Closes the tasks (nothing more is accepted for them) and returns (task, site, outcome) for
    /// each; tasks without an outcome ran out of time.
    pub fn close(&self, task_ids: &[String]) -> Vec<(String, String, Option<Outcome>)> {
        let mut entries = self.lock();
        task_ids
            .iter()
            .filter_map(|t| {
                let mut e = entries.remove(t)?;
                e.closed = true;
                Some((t.clone(), e.site, e.outcome))
            })
            .collect()
    }

    pub fn model_of(&self, task_id: &str) -> Option<String> {
        self.lock()
            .get(task_id)
            .filter(|e| !e.model_id.is_empty())
            .map(|e| e.model_id.clone())
    }

    /// Whether a task still accepts data (registered, not closed, not past its deadline).
    pub fn is_open(&self, task_id: &str) -> bool {
        self.lock()
            .get(task_id)
            .is_some_and(|e| !e.closed && Instant::now() <= e.deadline)
    }

    /// Whether `site` holds a task of `job_id` that is open now (registered, not closed, not past
    /// its deadline): what entitles a site to the job's base model.
    pub fn site_holds_open_task_of(&self, site: &str, job_id: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .values()
            .any(|e| e.site == site && e.job_id == job_id && !e.closed && now <= e.deadline)
    }

    pub fn site_of(&self, task_id: &str) -> Option<String> {
        self.lock().get(task_id).map(|e| e.site.clone())
    }

    /// Records `site`'s statistics release for `task_id`: only for a statistics task of that
    /// site, open, before its deadline and without an answer yet ([`TaskTable::claim`]'s
    /// checks, whose errors say which failed).
    pub fn release_statistics(
        &self,
        task_id: &str,
        site: &str,
        release: crate::statistics::SiteRelease,
    ) -> Result<(), SinkError> {
        match self.claim(task_id, site)? {
            Destination::Statistics => {}
            _ => {
                self.release(task_id);
                return Err(SinkError::Rejected(format!(
                    "task {task_id} is not a statistics task: its result is a model update \
                     (SubmitUpdate)"
                )));
            }
        }
        if self.finish(task_id, Outcome::Released { release }) {
            Ok(())
        } else {
            Err(SinkError::Rejected(format!(
                "task {task_id} closed while its statistics arrived: they are refused"
            )))
        }
    }

    /// Checks that `site` may submit for `task_id` now and marks the stream in flight.
    fn claim(&self, task_id: &str, site: &str) -> Result<Destination, SinkError> {
        let mut entries = self.lock();
        let e = entries.get_mut(task_id).ok_or_else(|| {
            SinkError::Rejected(format!(
                "task {task_id} is not open: its round closed (a late update is refused and never carried into another round) or it never existed"
            ))
        })?;
        if e.site != site {
            return Err(SinkError::Rejected(format!(
                "task {task_id} was given to site {}, not to {site}",
                e.site
            )));
        }
        if e.closed || Instant::now() > e.deadline {
            return Err(SinkError::Rejected(format!(
                "task {task_id} is past its deadline: the update is late and refused"
            )));
        }
        if e.outcome.is_some() {
            return Err(SinkError::Rejected(format!(
                "task {task_id} already has a result"
            )));
        }
        if e.in_flight {
            return Err(SinkError::Rejected(format!(
                "another upload for task {task_id} is in progress"
            )));
        }
        e.in_flight = true;
        Ok(e.destination.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tutela_protocol::tensor::{DType, TensorSpec};

    use super::*;

    fn manifest_for(task: &str) -> Manifest {
        manifest_with(task, honest_model(), &[])
    }

    /// A logistic regression: the registry's `mlp` without hidden layers, 3 features, 2 classes.
    fn expected_model() -> Arc<InitialModel> {
        let spec: tutela_protocol::job::ModelSpec = toml::from_str("name = \"mlp\"").unwrap();
        Arc::new(InitialModel::Layers(
            tutela_protocol::model_registry::ModelDescription::for_job(&spec).unwrap(),
        ))
    }

    fn honest_model() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("out.bias", DType::F32, vec![2]),
            TensorSpec::new("out.weight", DType::F32, vec![2, 3]),
        ]
    }

    fn manifest_with(task: &str, tensors: Vec<TensorSpec>, metadata: &[(&str, &str)]) -> Manifest {
        let mut meta_map: std::collections::BTreeMap<String, String> =
            [(meta::TASK.to_string(), task.to_string())].into();
        for (k, v) in metadata {
            meta_map.insert(k.to_string(), v.to_string());
        }
        Manifest::new(tensors, meta_map).expect("a valid manifest")
    }

    fn open_table(dir: &std::path::Path) -> Arc<TaskTable> {
        table_with("t1", "a", Instant::now() + Duration::from_secs(60), dir)
    }

    #[test]
    fn a_rogue_initial_model_is_refused_at_the_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rogue: Vec<(&str, Vec<TensorSpec>)> = vec![
            ("evil", vec![TensorSpec::new("evil", DType::F32, vec![1])]),
            ("extra", {
                let mut t = honest_model();
                t.push(TensorSpec::new("zz", DType::F32, vec![1]));
                t
            }),
            ("shape", {
                let mut t = honest_model();
                t[1].shape = vec![2, 3, 1];
                t
            }),
            ("dtype", {
                let mut t = honest_model();
                t[0].dtype = DType::F64;
                t
            }),
            ("missing", honest_model()[..1].to_vec()),
        ];
        for (case, tensors) in rogue {
            let table = open_table(dir.path());
            let mut sink = RoutingSink::new(table, "a".into(), Default::default());
            match sink.begin(&manifest_with("t1", tensors, &[])) {
                Err(SinkError::Rejected(why)) => {
                    assert!(why.starts_with("the initial model: "), "{case}: {why}")
                }
                other => panic!("{case}: expected a refusal, got {:?}", other.err()),
            }
        }
        // Nothing of them was stored.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let table = open_table(dir.path());
        let mut sink = RoutingSink::new(table, "a".into(), Default::default());
        sink.begin(&manifest_for("t1")).expect("the job's model");
    }

    #[test]
    fn out_of_range_metrics_are_refused_naming_the_metric() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = [
            (meta::EVAL_ACCURACY, "NaN"),
            (meta::EVAL_ACCURACY, "inf"),
            (meta::TRAIN_LOSS, "-1"),
            (meta::TRAIN_LOSS, "inf"),
            (meta::EVAL_LOSS, "NaN"),
            (meta::TRAIN_SECONDS, "-3"),
            (meta::SAMPLES, "-5"),
            (meta::SAMPLES, "1e30"),
            (meta::SAMPLES, "99999999999999999"),
            (meta::EVAL_SAMPLES, "18446744073709551615"),
            (meta::DP_ROUND_EPSILON, "-0.5"),
            (meta::DP_JOB_EPSILON, "inf"),
            (meta::DP_DELTA, "2"),
            (meta::EVAL_PERPLEXITY, "NaN"),
            (meta::EVAL_PERPLEXITY, "-2"),
            (meta::DP_NOISE_MULTIPLIER, "-1"),
            (meta::DP_EXPECTED_BATCH, "NaN"),
            (meta::SINGLE_CLASS_PREDICTED, "-1"),
            (meta::SINGLE_CLASS_PREDICTED, "first"),
        ];
        for (key, value) in bad {
            let table = open_table(dir.path());
            let mut sink = RoutingSink::new(table, "a".into(), Default::default());
            match sink.begin(&manifest_with("t1", honest_model(), &[(key, value)])) {
                Err(SinkError::Rejected(why)) => assert!(why.contains(key), "{key}={value}: {why}"),
                other => panic!("{key}={value}: expected a refusal, got {:?}", other.err()),
            }
        }
        // Noised metrics of an honest site under DP can leave [0, 1] and go below 0.
        for (key, value) in [
            (meta::EVAL_ACCURACY, "1.07"),
            (meta::EVAL_ACCURACY, "-0.1"),
            (meta::EVAL_LOSS, "-0.4"),
        ] {
            let table = open_table(dir.path());
            let mut sink = RoutingSink::new(table, "a".into(), Default::default());
            sink.begin(&manifest_with("t1", honest_model(), &[(key, value)]))
                .unwrap_or_else(|e| panic!("{key}={value}: a noised metric is refused: {e:?}"));
        }
        let good = [
            (meta::EVAL_ACCURACY, "1"),
            (meta::EVAL_ACCURACY, "0.93"),
            (meta::EVAL_PERPLEXITY, "13.25"),
            (meta::TRAIN_LOSS, "0.25"),
            (meta::SAMPLES, "120"),
            (meta::DP_DELTA, "0.00001"),
            (meta::DP_NOISE_MULTIPLIER, "4.5"),
            (meta::DP_EXPECTED_BATCH, "3.2"),
            (meta::SINGLE_CLASS_PREDICTED, "1"),
        ];
        let table = open_table(dir.path());
        let mut sink = RoutingSink::new(table, "a".into(), Default::default());
        sink.begin(&manifest_with("t1", honest_model(), &good))
            .expect("in-range metrics");
        assert_eq!(sink.metrics.eval_accuracy, 0.93);
        assert_eq!(sink.metrics.train_samples, 120);
        assert_eq!(
            (
                sink.metrics.dp_noise_multiplier,
                sink.metrics.dp_expected_batch,
                sink.metrics.single_class_predicted
            ),
            (4.5, 3.2, Some(1))
        );
    }

    #[test]
    fn a_site_holds_an_open_task_of_a_job_until_it_closes_or_its_deadline_passes() {
        let dir = tempfile::tempdir().unwrap();
        let table = table_with(
            "t1",
            "a",
            Instant::now() + Duration::from_secs(60),
            dir.path(),
        );
        assert!(table.site_holds_open_task_of("a", "job"));
        assert!(!table.site_holds_open_task_of("b", "job"));
        assert!(!table.site_holds_open_task_of("a", "other-job"));
        table.close(&["t1".to_string()]);
        assert!(!table.site_holds_open_task_of("a", "job"));
        let late = table_with(
            "t2",
            "a",
            Instant::now() - Duration::from_secs(1),
            dir.path(),
        );
        assert!(!late.site_holds_open_task_of("a", "job"));
    }

    fn table_with(
        task: &str,
        site: &str,
        deadline: Instant,
        dir: &std::path::Path,
    ) -> Arc<TaskTable> {
        let table = Arc::new(TaskTable::default());
        table.register(
            task,
            "job",
            site,
            "",
            deadline,
            Destination::InitialModel {
                model_dir: dir.to_path_buf(),
                expected: expected_model(),
            },
            Arc::new(TaskGroup::default()),
        );
        table
    }

    fn refusal(sink: &mut RoutingSink, task: &str) -> String {
        match sink.begin(&manifest_for(task)) {
            Err(SinkError::Rejected(why)) => why,
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }

    #[test]
    fn a_late_update_is_refused_before_any_byte_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let past = Instant::now() - Duration::from_millis(1);
        let table = table_with("t1", "a", past, dir.path());
        let mut sink = RoutingSink::new(table, "a".into(), Default::default());
        let why = refusal(&mut sink, "t1");
        assert!(why.contains("past its deadline"), "{why}");
    }

    #[test]
    fn an_update_for_a_closed_round_is_refused_as_late() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = table_with(
            "t1",
            "a",
            Instant::now() + Duration::from_secs(60),
            dir.path(),
        );
        assert_eq!(table.close(&["t1".to_string()]).len(), 1);
        let mut sink = RoutingSink::new(table, "a".into(), Default::default());
        let why = refusal(&mut sink, "t1");
        assert!(why.contains("late update is refused"), "{why}");
    }

    #[test]
    fn a_site_cannot_answer_another_sites_task_nor_answer_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = table_with(
            "t1",
            "a",
            Instant::now() + Duration::from_secs(60),
            dir.path(),
        );
        let mut other = RoutingSink::new(table.clone(), "b".into(), Default::default());
        let why = refusal(&mut other, "t1");
        assert!(why.contains("was given to site a, not to b"), "{why}");

        let mut first = RoutingSink::new(table.clone(), "a".into(), Default::default());
        first
            .begin(&manifest_for("t1"))
            .expect("the task's own site may answer");
        let mut second = RoutingSink::new(table.clone(), "a".into(), Default::default());
        let why = refusal(&mut second, "t1");
        assert!(why.contains("in progress"), "{why}");
        // Committed: the task has its result, and a repeat is refused.
        let routed = first.commit(&[7u8; 32]).expect("commit");
        assert!(table.finish(
            &routed.task_id,
            Outcome::Accepted {
                digest: String::new(),
                metrics: routed.metrics,
                model_id: routed.model_id,
            }
        ));
        let mut third = RoutingSink::new(table, "a".into(), Default::default());
        let why = refusal(&mut third, "t1");
        assert!(why.contains("already has a result"), "{why}");
    }

    #[test]
    fn a_stream_cut_off_by_the_close_is_refused_at_its_next_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = table_with(
            "t1",
            "a",
            Instant::now() + Duration::from_secs(60),
            dir.path(),
        );
        let mut sink = RoutingSink::new(table.clone(), "a".into(), Default::default());
        sink.begin(&manifest_for("t1")).expect("open task");
        table.close(&["t1".to_string()]);
        match sink.write(0, 0, &[0u8; 8]) {
            Err(SinkError::Rejected(why)) => assert!(why.contains("late"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_lora_job_s_initial_model_is_its_zero_adapters_and_nothing_trained() {
        let lora: tutela_protocol::lora::LoraSpec =
            toml::from_str("rank = 2\nalpha = 4.0\ntarget_modules = [\"q_proj\"]").unwrap();
        let expected = Arc::new(InitialModel::Adapters(
            tutela_protocol::initial_model::AdapterDescription::new(&lora),
        ));
        let adapters = vec![TensorSpec::new(
            tutela_protocol::lora::lora_b_name("model.layers.0.self_attn.q_proj"),
            DType::F32,
            vec![4, 2],
        )];
        let sink_for = |dir: &std::path::Path| {
            let table = Arc::new(TaskTable::default());
            table.register(
                "t1",
                "job",
                "a",
                "",
                Instant::now() + Duration::from_secs(60),
                Destination::InitialModel {
                    model_dir: dir.to_path_buf(),
                    expected: expected.clone(),
                },
                Arc::new(TaskGroup::default()),
            );
            RoutingSink::new(table, "a".into(), Default::default())
        };
        let dir = tempfile::tempdir().expect("tempdir");
        // The registry's layer network is not this job's model.
        let mut sink = sink_for(dir.path());
        match sink.begin(&manifest_for("t1")) {
            Err(SinkError::Rejected(why)) => assert!(why.contains("not a LoRA adapter"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
        // B with a trained value in it is refused at the byte.
        let mut sink = sink_for(dir.path());
        sink.begin(&manifest_with("t1", adapters.clone(), &[]))
            .expect("the adapters' names and shapes");
        let mut bytes = vec![0u8; 32];
        bytes[13] = 1;
        match sink.write(0, 0, &bytes) {
            Err(SinkError::Rejected(why)) => assert!(why.contains("not all zeros"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // B = 0 is stored as the job's first global model.
        let mut sink = sink_for(dir.path());
        sink.begin(&manifest_with("t1", adapters, &[])).unwrap();
        sink.write(0, 0, &[0u8; 32]).unwrap();
    }
}
