//! The sink a `SubmitUpdate` stream is routed through to its task's destination, and the
//! manifest metadata it checks (the task, the sample count, each metric's range).

use super::*;

pub(super) fn parse_meta<T: std::str::FromStr>(
    m: &Manifest,
    key: &str,
) -> Result<Option<T>, SinkError> {
    match m.metadata.get(key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            SinkError::Rejected(format!(
                "manifest metadata {key} = {v:?} is not a valid value"
            ))
        }),
    }
}

/// The most rows or samples a metric may count: far above any site's dataset, low enough that
/// sums and weights stay exact in an f64.
pub const MAX_METRIC_COUNT: u64 = 1 << 40;

/// A metadata value in `range` (finite), or absent (0). The reason names the metric and the range.
pub(super) fn ranged_meta(
    m: &Manifest,
    key: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f64, SinkError> {
    match parse_meta::<f64>(m, key)? {
        None => Ok(0.0),
        Some(x) if x.is_finite() && range.contains(&x) => Ok(x),
        Some(x) => Err(SinkError::Rejected(format!(
            "manifest metadata {key} = {x} is out of range: it must be a finite number in [{}, {}]",
            range.start(),
            range.end()
        ))),
    }
}

/// A metadata value that must be a finite number >= 0, or absent (0).
pub(super) fn finite_meta(m: &Manifest, key: &str) -> Result<f64, SinkError> {
    ranged_meta(m, key, 0.0..=f64::MAX)
}

/// A count that must be an integer in [0, [`MAX_METRIC_COUNT`]], or absent (0).
pub(super) fn count_meta(m: &Manifest, key: &str) -> Result<u64, SinkError> {
    match parse_meta::<u64>(m, key)? {
        None => Ok(0),
        Some(n) if n <= MAX_METRIC_COUNT => Ok(n),
        Some(n) => Err(SinkError::Rejected(format!(
            "manifest metadata {key} = {n} is out of range: a count is at most {MAX_METRIC_COUNT}"
        ))),
    }
}

/// What a node reported in its result's manifest, every value range-checked where it is
/// received: eval loss and accuracy finite (noised under DP, so any sign), train loss and seconds
/// finite and >= 0, counts bounded, ε finite
/// and >= 0, δ in [0, 1]. Out of range is refused with a reason naming the metric, never stored
/// or shown.
pub fn site_metrics(manifest: &Manifest, site: &str) -> Result<SiteMetrics, SinkError> {
    let m = manifest;
    Ok(SiteMetrics {
        site: site.to_string(),
        train_samples: count_meta(m, meta::SAMPLES)?,
        train_loss: finite_meta(m, meta::TRAIN_LOSS)?,
        train_seconds: finite_meta(m, meta::TRAIN_SECONDS)?,
        // Under DP these are noised releases (`tutela_privacy::metrics`): an honest value may be
        // below 0 or above 1. They are taken as they come (finite only) and clamped for display.
        eval_loss: ranged_meta(m, meta::EVAL_LOSS, f64::MIN..=f64::MAX)?,
        eval_accuracy: ranged_meta(m, meta::EVAL_ACCURACY, f64::MIN..=f64::MAX)?,
        eval_samples: count_meta(m, meta::EVAL_SAMPLES)?,
        eval_perplexity: finite_meta(m, meta::EVAL_PERPLEXITY)?,
        eval_loss_stddev: finite_meta(m, meta::EVAL_LOSS_STDDEV)?,
        eval_accuracy_stddev: finite_meta(m, meta::EVAL_ACCURACY_STDDEV)?,
        dataset_commitment: hex_meta(m, meta::DATASET_COMMITMENT)?,
        deid_config_sha256: hex_meta(m, meta::DEID_CONFIG)?,
        dp_round_epsilon: finite_meta(m, meta::DP_ROUND_EPSILON)?,
        dp_job_epsilon: finite_meta(m, meta::DP_JOB_EPSILON)?,
        dp_delta: ranged_meta(m, meta::DP_DELTA, 0.0..=1.0)?,
        dp_noise_multiplier: finite_meta(m, meta::DP_NOISE_MULTIPLIER)?,
        dp_expected_batch: finite_meta(m, meta::DP_EXPECTED_BATCH)?,
        single_class_predicted: parse_meta::<u32>(m, meta::SINGLE_CLASS_PREDICTED)?,
    })
}

/// A metadata value that must be a SHA-256 digest in lowercase hex, or absent (empty).
pub(super) fn hex_meta(m: &Manifest, key: &str) -> Result<String, SinkError> {
    match m.metadata.get(key) {
        None => Ok(String::new()),
        Some(v) if crate::job::is_hex_digest(v) => Ok(v.clone()),
        Some(v) => Err(SinkError::Rejected(format!(
            "manifest metadata {key} = {v:?} is not a SHA-256 digest (64 lowercase hex digits)"
        ))),
    }
}

pub(super) enum Inner {
    Unrouted,
    /// An initial model; `zeros_only`: every byte must be zero (a LoRA job's B = 0).
    Model {
        sink: SafetensorsFileSink,
        zeros_only: bool,
        finite: Box<FiniteModel>,
    },
    Update(SiteSink),
}

/// The sink of a `SubmitUpdate` stream: routed to its task's destination when the manifest
/// arrives.
pub struct RoutingSink {
    tasks: Arc<TaskTable>,
    site: String,
    task_id: Option<String>,
    /// The task id, shared with the handler, which records a refusal against it after the sink
    /// is gone.
    routed_to: Arc<Mutex<Option<String>>>,
    pub(super) metrics: SiteMetrics,
    inner: Inner,
}

/// What a committed `SubmitUpdate` stream produced.
pub struct Routed {
    pub task_id: String,
    pub metrics: SiteMetrics,
    pub model_id: Option<String>,
}

impl RoutingSink {
    pub fn new(tasks: Arc<TaskTable>, site: String, routed_to: Arc<Mutex<Option<String>>>) -> Self {
        RoutingSink {
            tasks,
            routed_to,
            metrics: SiteMetrics {
                site: site.clone(),
                ..Default::default()
            },
            site,
            task_id: None,
            inner: Inner::Unrouted,
        }
    }
}

impl Drop for RoutingSink {
    fn drop(&mut self) {
        // Not committed: let the node try again before the deadline (a refusal is recorded by
        // the handler, which knows the reason).
        if let Some(t) = &self.task_id {
            self.tasks.release(t);
        }
    }
}

impl RoutingSink {
    /// A stream still running when its round closes is cut off: what it folded in is undone
    /// when the sink is dropped, and the update counts as late.
    fn check_open(&self) -> Result<(), SinkError> {
        match &self.task_id {
            Some(t) if !self.tasks.is_open(t) => Err(SinkError::Rejected(format!(
                "task {t} closed at its round's deadline before the update finished: it is late and refused"
            ))),
            _ => Ok(()),
        }
    }
}

impl TensorSink for RoutingSink {
    type Output = Routed;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        let task_id = manifest.metadata.get(meta::TASK).cloned().ok_or_else(|| {
            SinkError::Rejected(format!(
                "the update's manifest has no {} metadata naming its task",
                meta::TASK
            ))
        })?;
        let destination = self.tasks.claim(&task_id, &self.site)?;
        if let Ok(mut slot) = self.routed_to.lock() {
            *slot = Some(task_id.clone());
        }
        self.task_id = Some(task_id);
        self.metrics = site_metrics(manifest, &self.site)?;
        match destination {
            Destination::InitialModel {
                model_dir,
                expected,
            } => {
                // The first global model must be the job's model, built as the registry builds
                // it; anything else (another tensor set, shape or dtype) is refused here, before
                // a byte of it is stored.
                expected
                    .check(manifest.tensors())
                    .map_err(|e| SinkError::Rejected(format!("the initial model: {e}")))?;
                let finite = Box::new(FiniteModel::new(manifest)?);
                let mut sink = SafetensorsFileSink::content_addressed(model_dir);
                sink.begin(manifest)?;
                self.inner = Inner::Model {
                    sink,
                    zeros_only: expected.must_be_zero(),
                    finite,
                };
            }
            Destination::Statistics => {
                return Err(SinkError::Rejected(format!(
                    "task {task_id} is a statistics task: its release goes through \
                     SubmitStatistics, not an update stream",
                    task_id = self.task_id.as_deref().unwrap_or_default()
                )));
            }
            Destination::Round { aggregator } => {
                if self.metrics.train_samples == 0 {
                    return Err(SinkError::Rejected(format!(
                        "the update must say how many samples it was trained on ({} > 0): it is the update's weight",
                        meta::SAMPLES
                    )));
                }
                let mut sink =
                    aggregator.open(self.site.clone(), self.metrics.train_samples as f64);
                sink.begin(manifest)?;
                self.inner = Inner::Update(sink);
            }
        }
        Ok(())
    }

    fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        self.check_open()?;
        match &mut self.inner {
            Inner::Model {
                sink,
                zeros_only,
                finite,
            } => {
                // +0.0 is the only F32 whose bytes are all zero: -0.0 and denormals are refused.
                if *zeros_only && data.iter().any(|&b| b != 0) {
                    return Err(SinkError::Rejected(format!(
                        "the initial model: tensor {index} is not all zeros; an initial adapter \
                         is B = 0 (the base model exactly), with nothing trained in it"
                    )));
                }
                finite.write(index, offset, data)?;
                sink.write(index, offset, data)
            }
            Inner::Update(s) => s.write(index, offset, data),
            Inner::Unrouted => Err(SinkError::Rejected("data before the manifest".into())),
        }
    }

    fn commit(mut self, digest: &[u8; 32]) -> Result<Routed, SinkError> {
        self.check_open()?;
        let inner = std::mem::replace(&mut self.inner, Inner::Unrouted);
        let task_id = self.task_id.take().unwrap_or_default();
        let model_id = match inner {
            Inner::Model { sink, .. } => {
                sink.commit(digest)?;
                Some(hex::encode(digest))
            }
            Inner::Update(s) => {
                s.commit(digest)?;
                None
            }
            Inner::Unrouted => return Err(SinkError::Rejected("empty stream".into())),
        };
        Ok(Routed {
            task_id,
            metrics: std::mem::take(&mut self.metrics),
            model_id,
        })
    }
}
