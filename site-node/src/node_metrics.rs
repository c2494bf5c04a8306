//! The site node's Prometheus metrics (`[metrics]` in node.toml; `docs/monitoring.md`). One
//! [`NodeMetrics`] per agent, built with it and reached by the worker through its shared state:
//! each event is counted by one line where it happens (a round trained, an update uploaded, a
//! task declined), and each dataset's privacy budget (ε spent and its total cap) is re-read from
//! its ledger at start and after every round that charged it.
//!
//! Labels are bounded and carry nothing of the data: a dataset's configured name (never its
//! path, never a value) and the refusal codes of `tutela_protocol::refusal::FailureCode`.

use tutela_protocol::metrics::prometheus::{
    GaugeVec, HistogramVec, IntCounter, IntCounterVec, Registry,
};
use tutela_protocol::metrics::{self as m, MetricsError, SLOW_SECONDS_BUCKETS};
use tutela_protocol::refusal::FailureCode;

use crate::ledger::SiteLedgers;

/// The node's metrics handle.
pub struct NodeMetrics {
    registry: Registry,
    rounds_trained: IntCounter,
    training_seconds: HistogramVec,
    uploaded_bytes: IntCounter,
    updates_uploaded: IntCounter,
    tasks_declined: IntCounterVec,
    epsilon_spent: GaugeVec,
    epsilon_cap: GaugeVec,
}

impl NodeMetrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        let tasks_declined = m::counter_vec(
            &r,
            "tutela_node_tasks_declined_total",
            "Tasks this node declined, by refusal code (tutela_protocol::refusal).",
            &["reason"],
        )?;
        for code in FailureCode::ALL {
            tasks_declined.with_label_values(&[code.as_str()]);
        }
        Ok(NodeMetrics {
            rounds_trained: m::counter(
                &r,
                "tutela_node_rounds_trained_total",
                "Local training rounds finished (before the update is filtered and sent).",
            )?,
            training_seconds: m::histogram(
                &r,
                "tutela_node_training_seconds",
                "Local training time of a round.",
                &[],
                SLOW_SECONDS_BUCKETS,
            )?,
            uploaded_bytes: m::counter(
                &r,
                "tutela_node_uploaded_bytes_total",
                "Bytes of tensor-stream frames sent to the coordinator (updates, initial models).",
            )?,
            updates_uploaded: m::counter(
                &r,
                "tutela_node_updates_uploaded_total",
                "Updates (and initial models) the coordinator accepted.",
            )?,
            tasks_declined,
            epsilon_spent: m::gauge_vec(
                &r,
                "tutela_node_epsilon_spent",
                "ε every job together has spent on the dataset's budget, at the site's δ, as its \
                 ledger composes it.",
                &["dataset"],
            )?,
            epsilon_cap: m::gauge_vec(
                &r,
                "tutela_node_epsilon_cap",
                "The site policy's total ε cap of the dataset (absent: no cap).",
                &["dataset"],
            )?,
            registry: r,
        })
    }

    /// The registry the `/metrics` listener serves.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    pub fn round_trained(&self, train_seconds: f64) {
        self.rounds_trained.inc();
        self.training_seconds
            .with_label_values(&[] as &[&str])
            .observe(train_seconds.max(0.0));
    }

    pub fn uploaded_frame(&self, bytes: usize) {
        self.uploaded_bytes.inc_by(bytes as u64);
    }

    pub fn update_accepted(&self) {
        self.updates_uploaded.inc();
    }

    pub fn task_declined(&self, code: FailureCode) {
        self.tasks_declined
            .with_label_values(&[code.as_str()])
            .inc();
    }

    /// Re-reads `dataset`'s spend and cap from its ledger; a ledger that cannot be read leaves
    /// the gauges as they were (logged: the gate refuses the dataset with the reason anyway).
    pub fn refresh_budget(&self, ledgers: &SiteLedgers, dataset: &str) {
        match ledgers.spent(dataset) {
            Ok(spent) => self.epsilon_spent.with_label_values(&[dataset]).set(spent),
            Err(e) => {
                tracing::debug!(dataset, error = %e, "metrics: the ledger's spend is unreadable")
            }
        }
        match ledgers.caps(dataset).total_epsilon {
            Some(cap) => self.epsilon_cap.with_label_values(&[dataset]).set(cap),
            None => {
                let _ = self.epsilon_cap.remove_label_values(&[dataset]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ledger::{FixedCaps, PrivacyBudgetConfig};

    #[test]
    fn a_budget_shows_its_spend_and_its_cap_and_a_removed_cap_disappears() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = NodeMetrics::new().unwrap();
        let capped = SiteLedgers::new(dir.path(), None, PrivacyBudgetConfig::default()).with_caps(
            Arc::new(FixedCaps {
                per_job: Some(1.0),
                total: Some(4.0),
            }),
        );
        metrics.refresh_budget(&capped, "cohort");
        let text = tutela_protocol::metrics::render(&metrics.registry()).unwrap();
        assert!(
            text.contains("tutela_node_epsilon_spent{dataset=\"cohort\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tutela_node_epsilon_cap{dataset=\"cohort\"} 4\n"),
            "{text}"
        );
        // Every refusal code is a series from the start, at 0.
        assert!(
            text.contains("tutela_node_tasks_declined_total{reason=\"privacy.budget\"} 0\n"),
            "{text}"
        );
        metrics.task_declined(FailureCode::PrivacyBudget);
        let uncapped = SiteLedgers::new(dir.path(), None, PrivacyBudgetConfig::default());
        metrics.refresh_budget(&uncapped, "cohort");
        let text = tutela_protocol::metrics::render(&metrics.registry()).unwrap();
        assert!(!text.contains("tutela_node_epsilon_cap{"), "{text}");
        assert!(
            text.contains("tutela_node_tasks_declined_total{reason=\"privacy.budget\"} 1\n"),
            "{text}"
        );
        // A dataset's path is never a label: only the name given.
        assert!(!text.contains(&dir.path().display().to_string()), "{text}");
    }
}
