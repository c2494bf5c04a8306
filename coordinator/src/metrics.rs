//! The coordinator's Prometheus metrics (`[metrics]` in coordinator.toml; `docs/monitoring.md`
//! lists them). One [`CoordinatorMetrics`] per engine, built with it and reached through it by
//! the engine and the services: each event is counted by one line where it happens. Gauges of
//! what is true right now (connected nodes, open tasks, when each site was last seen) are read
//! from the node registry and the task table at each scrape ([`LiveState`]), so they cannot
//! drift from the state they describe.
//!
//! Labels are bounded: a job id and a site name (both bounded by the consortium), and the
//! reasons of [`UpdateRefusal`]. No reason text from a node is ever a label.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tutela_protocol::metrics::prometheus::core::{Collector, Desc};
use tutela_protocol::metrics::prometheus::proto::MetricFamily;
use tutela_protocol::metrics::prometheus::{
    GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};
use tutela_protocol::metrics::{
    self as m, FAST_SECONDS_BUCKETS, MetricLabel, MetricsError, SLOW_SECONDS_BUCKETS, TlsMetrics,
};
use tutela_protocol::stream::StreamError;

use crate::nodes::NodeRegistry;
use crate::tasks::TaskTable;

/// Why a round's task brought no update, as a bounded label
/// (`tutela_coordinator_updates_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateRefusal {
    /// The upload was not a well-formed tensor stream (frames out of order, sizes, truncated).
    MalformedStream,
    /// The stream's trailer digest did not match its bytes.
    DigestMismatch,
    /// The coordinator's checks refused it: the task closed or late, wrong tensors, non-finite
    /// values, over the norm bound, metrics out of range.
    Rejected,
    /// The coordinator could not store or fold it.
    Storage,
    /// The node declined the task (its policy, budget, data or the approvals).
    Declined,
    /// No update arrived by the round's deadline.
    Deadline,
}

impl MetricLabel for UpdateRefusal {
    const ALL: &'static [Self] = &[
        UpdateRefusal::MalformedStream,
        UpdateRefusal::DigestMismatch,
        UpdateRefusal::Rejected,
        UpdateRefusal::Storage,
        UpdateRefusal::Declined,
        UpdateRefusal::Deadline,
    ];
    fn label(self) -> &'static str {
        match self {
            UpdateRefusal::MalformedStream => "malformed_stream",
            UpdateRefusal::DigestMismatch => "digest_mismatch",
            UpdateRefusal::Rejected => "rejected",
            UpdateRefusal::Storage => "storage",
            UpdateRefusal::Declined => "declined",
            UpdateRefusal::Deadline => "deadline",
        }
    }
}

impl UpdateRefusal {
    /// The reason of an upload that failed; `None` for a broken connection, which the node may
    /// retry before the deadline (not a refusal).
    pub fn of_stream_error(e: &StreamError) -> Option<Self> {
        Some(match e {
            StreamError::Transport(_) => return None,
            StreamError::DigestMismatch { .. } | StreamError::BadDigestLength(_) => {
                UpdateRefusal::DigestMismatch
            }
            StreamError::Rejected(_) => UpdateRefusal::Rejected,
            StreamError::Storage(_) | StreamError::Source(_) => UpdateRefusal::Storage,
            _ => UpdateRefusal::MalformedStream,
        })
    }
}

/// How a job ended (`tutela_coordinator_jobs_ended_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Completed,
    Failed,
    Cancelled,
}

impl MetricLabel for JobOutcome {
    const ALL: &'static [Self] = &[
        JobOutcome::Completed,
        JobOutcome::Failed,
        JobOutcome::Cancelled,
    ];
    fn label(self) -> &'static str {
        match self {
            JobOutcome::Completed => "completed",
            JobOutcome::Failed => "failed",
            JobOutcome::Cancelled => "cancelled",
        }
    }
}

/// The coordinator's metrics handle.
pub struct CoordinatorMetrics {
    registry: Registry,
    /// The mutual-TLS listener's handshakes (`server::serve_with_metrics`).
    pub tls: TlsMetrics,
    rounds_completed: IntCounterVec,
    round_attempts_failed: IntCounterVec,
    jobs_ended: IntCounterVec,
    updates_accepted: IntCounter,
    updates_refused: IntCounterVec,
    received_bytes: IntCounter,
    sent_bytes: IntCounter,
    aggregation_finish: HistogramVec,
    approval_latency: HistogramVec,
}

impl CoordinatorMetrics {
    /// A registry with every coordinator metric, reading the live gauges from `nodes` and
    /// `tasks`.
    pub fn new(nodes: Arc<NodeRegistry>, tasks: Arc<TaskTable>) -> Result<Self, MetricsError> {
        let r = Registry::new();
        let live = LiveState::new(nodes, tasks)?;
        r.register(Box::new(live))?;
        Ok(CoordinatorMetrics {
            tls: TlsMetrics::register(&r)?,
            rounds_completed: m::counter_vec(
                &r,
                "tutela_coordinator_rounds_completed_total",
                "Rounds completed and recorded, by job.",
                &["job"],
            )?,
            round_attempts_failed: m::counter_vec(
                &r,
                "tutela_coordinator_round_attempts_failed_total",
                "Round attempts that failed (too few updates, an unusable aggregate), by job.",
                &["job"],
            )?,
            jobs_ended: m::counter_by_reason_named::<JobOutcome>(
                &r,
                "tutela_coordinator_jobs_ended_total",
                "Jobs that ended, by outcome.",
                "outcome",
            )?,
            updates_accepted: m::counter(
                &r,
                "tutela_coordinator_updates_accepted_total",
                "Updates (and initial models) received and accepted.",
            )?,
            updates_refused: m::counter_by_reason::<UpdateRefusal>(
                &r,
                "tutela_coordinator_updates_refused_total",
                "Tasks that brought no update, by reason.",
            )?,
            received_bytes: m::counter(
                &r,
                "tutela_coordinator_stream_received_bytes_total",
                "Bytes of tensor-stream frames received from nodes (updates, initial models).",
            )?,
            sent_bytes: m::counter(
                &r,
                "tutela_coordinator_stream_sent_bytes_total",
                "Bytes of tensor-stream frames sent to nodes (global models).",
            )?,
            aggregation_finish: m::histogram(
                &r,
                "tutela_coordinator_aggregation_finish_seconds",
                "Time to finish a round's aggregation once its uploads are in (the robust rules' \
                 pass over the spools; the streaming sum's final division).",
                &[],
                FAST_SECONDS_BUCKETS,
            )?,
            approval_latency: m::histogram(
                &r,
                "tutela_coordinator_approval_latency_seconds",
                "From a job's proposal to its approval quorum being met.",
                &[],
                SLOW_SECONDS_BUCKETS,
            )?,
            registry: r,
        })
    }

    /// The registry the `/metrics` listener serves.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    pub fn round_completed(&self, job: &str) {
        self.rounds_completed.with_label_values(&[job]).inc();
    }

    pub fn round_attempt_failed(&self, job: &str) {
        self.round_attempts_failed.with_label_values(&[job]).inc();
    }

    pub fn job_ended(&self, outcome: JobOutcome) {
        self.jobs_ended.with_label_values(&[outcome.label()]).inc();
    }

    pub fn update_accepted(&self) {
        self.updates_accepted.inc();
    }

    pub fn update_refused(&self, reason: UpdateRefusal) {
        self.updates_refused
            .with_label_values(&[reason.label()])
            .inc();
    }

    pub fn received(&self, bytes: usize) {
        self.received_bytes.inc_by(bytes as u64);
    }

    pub fn sent(&self, bytes: usize) {
        self.sent_bytes.inc_by(bytes as u64);
    }

    pub fn aggregation_finished(&self, took: Duration) {
        self.aggregation_finish
            .with_label_values(&[] as &[&str])
            .observe(took.as_secs_f64());
    }

    /// A job's quorum was met `waited` after it was proposed.
    pub fn approval_quorum_met(&self, waited: Duration) {
        self.approval_latency
            .with_label_values(&[] as &[&str])
            .observe(waited.as_secs_f64());
    }
}

/// The gauges read from the engine's state at each scrape.
struct LiveState {
    nodes: Arc<NodeRegistry>,
    tasks: Arc<TaskTable>,
    connected_nodes: IntGauge,
    open_tasks: IntGauge,
    site_connected: IntGaugeVec,
    site_last_seen: GaugeVec,
    descs: Vec<Desc>,
}

impl LiveState {
    fn new(nodes: Arc<NodeRegistry>, tasks: Arc<TaskTable>) -> Result<Self, MetricsError> {
        use tutela_protocol::metrics::prometheus::Opts;
        let connected_nodes = IntGauge::with_opts(Opts::new(
            "tutela_coordinator_connected_nodes",
            "Site nodes connected now.",
        ))?;
        let open_tasks = IntGauge::with_opts(Opts::new(
            "tutela_coordinator_open_tasks",
            "Tasks sent to nodes and not answered yet.",
        ))?;
        let site_connected = IntGaugeVec::new(
            Opts::new(
                "tutela_coordinator_site_connected",
                "1 while the site's node is connected, 0 after it disconnected.",
            ),
            &["site"],
        )?;
        let site_last_seen = GaugeVec::new(
            Opts::new(
                "tutela_coordinator_site_last_seen_timestamp_seconds",
                "When the site's node was last connected (Unix time; now while it is connected).",
            ),
            &["site"],
        )?;
        let descs = [
            connected_nodes.desc(),
            open_tasks.desc(),
            site_connected.desc(),
            site_last_seen.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(LiveState {
            nodes,
            tasks,
            connected_nodes,
            open_tasks,
            site_connected,
            site_last_seen,
            descs,
        })
    }
}

impl Collector for LiveState {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let connected = self.nodes.list();
        self.connected_nodes.set(connected.len() as i64);
        self.open_tasks.set(self.tasks.open_count() as i64);
        // A site seen before keeps its last time and shows 0 connected; a connected one is seen
        // now.
        for g in self
            .site_connected
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
        {
            if let Some(site) = g.get_label().first() {
                self.site_connected
                    .with_label_values(&[site.value()])
                    .set(0);
            }
        }
        for n in &connected {
            self.site_connected.with_label_values(&[&n.site]).set(1);
            self.site_last_seen.with_label_values(&[&n.site]).set(now);
        }
        let mut out = Vec::new();
        out.extend(self.connected_nodes.collect());
        out.extend(self.open_tasks.collect());
        out.extend(self.site_connected.collect());
        out.extend(self.site_last_seen.collect());
        out
    }
}
