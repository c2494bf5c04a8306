//! The audit service's Prometheus metrics (`[metrics]` in audit.toml; `docs/monitoring.md`). One
//! [`AuditMetrics`] per log, carried by [`crate::log::LogConfig`] into the appender, where the
//! events happen: each append's latency and outcome, the chain's length after each commit, each
//! checkpoint signed; and the result of the last verification of the stored trail (at start,
//! and each run of the console's verification task).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tutela_protocol::metrics::prometheus::{
    Gauge, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry,
};
use tutela_protocol::metrics::{
    self as m, FAST_SECONDS_BUCKETS, MetricLabel, MetricsError, TlsMetrics,
};

use crate::log::AppendError;

/// How an append ended (`tutela_audit_appends_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendResult {
    /// Committed.
    Ok,
    /// Refused by the authority rules (an actor asserting what it may not, a bad approval
    /// signature, a malformed payload): the trail working as designed, not a failure.
    Refused,
    /// Not stored: the database failed, the log halted on a forged row, or the appender stopped.
    Failed,
}

impl MetricLabel for AppendResult {
    const ALL: &'static [Self] = &[
        AppendResult::Ok,
        AppendResult::Refused,
        AppendResult::Failed,
    ];
    fn label(self) -> &'static str {
        match self {
            AppendResult::Ok => "ok",
            AppendResult::Refused => "refused",
            AppendResult::Failed => "failed",
        }
    }
}

impl AppendResult {
    pub fn of<T>(result: &Result<T, AppendError>) -> Self {
        match result {
            Ok(_) => AppendResult::Ok,
            Err(
                AppendError::Unauthorized(_) | AppendError::Approval(_) | AppendError::Payload(_),
            ) => AppendResult::Refused,
            Err(_) => AppendResult::Failed,
        }
    }
}

/// The audit service's metrics handle (cheap to clone: the metrics are shared).
#[derive(Clone)]
pub struct AuditMetrics {
    registry: Registry,
    /// The gRPC listener's handshakes (`server::serve_with_metrics`).
    pub tls: TlsMetrics,
    appends: IntCounterVec,
    appends_failed: IntCounter,
    append_latency: HistogramVec,
    chain_length: IntGauge,
    checkpoints_signed: IntCounter,
    verification_ok: IntGauge,
    verification_time: Gauge,
}

impl std::fmt::Debug for AuditMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditMetrics").finish_non_exhaustive()
    }
}

impl AuditMetrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        Ok(AuditMetrics {
            tls: TlsMetrics::register(&r)?,
            appends: m::counter_by_reason_named::<AppendResult>(
                &r,
                "tutela_audit_appends_total",
                "Append requests answered, by result (ok, refused by the authority rules, failed).",
                "result",
            )?,
            appends_failed: m::counter(
                &r,
                "tutela_audit_appends_failed_total",
                "Appends that were not stored because the service failed (database, halted log).",
            )?,
            append_latency: m::histogram(
                &r,
                "tutela_audit_append_duration_seconds",
                "From an append's request to its commit (or refusal), batching included.",
                &[],
                FAST_SECONDS_BUCKETS,
            )?,
            chain_length: m::int_gauge(
                &r,
                "tutela_audit_chain_length",
                "Events in the hash chain (the log's size).",
            )?,
            checkpoints_signed: m::counter(
                &r,
                "tutela_audit_checkpoints_signed_total",
                "Signed checkpoints stored.",
            )?,
            verification_ok: m::int_gauge(
                &r,
                "tutela_audit_last_verification_ok",
                "1 if the last verification of the stored trail passed, 0 if it found a bad row.",
            )?,
            verification_time: m::gauge(
                &r,
                "tutela_audit_last_verification_timestamp_seconds",
                "When the stored trail was last verified (Unix time).",
            )?,
            registry: r,
        })
    }

    /// Counts nowhere a registry is served: for logs opened by tools and tests.
    pub fn unregistered() -> Self {
        match AuditMetrics::new() {
            Ok(m) => m,
            Err(_) => unreachable!("fixed metric names and labels are valid"),
        }
    }

    /// The registry the `/metrics` listener serves.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    pub fn appended(&self, result: AppendResult, took: Duration) {
        self.appends.with_label_values(&[result.label()]).inc();
        if result == AppendResult::Failed {
            self.appends_failed.inc();
        }
        self.append_latency
            .with_label_values(&[] as &[&str])
            .observe(took.as_secs_f64());
    }

    pub fn chain_length(&self, size: u64) {
        self.chain_length.set(size as i64);
    }

    pub fn checkpoint_signed(&self) {
        self.checkpoints_signed.inc();
    }

    /// The stored trail was verified just now; `ok` whether it passed.
    pub fn verified(&self, ok: bool) {
        self.verification_ok.set(i64::from(ok));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.verification_time.set(now);
    }
}
