//! Payloads of a site's privacy budget in the trail: each ledger spend (`privacy.spent`, appended
//! by the node that spent) and an officer's rebuild of a node's ledger from those spends
//! (`ledger.restored`, appended by the officer). Counts, rates and ε only: never a data value or
//! a local path.

use serde::{Deserialize, Serialize};

use super::ActionPayload;
use crate::event::Action;

/// `privacy.spent`: one round of DP-SGD charged to a dataset's ledger. Subject:
/// `<site>/<dataset>`, where `dataset` is the dataset's *budget key* (the identity its data
/// determines, `site-node::budget_identity`; a ledger from before budget keys keeps the dataset's
/// name as its key); the actor is the node (only a site's own node may assert its spends).
///
/// `(job, round, attempt)` is the spend's key: a node appends it once, and a reader (the node
/// checking its ledger, an officer's restore) counts it once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpent {
    pub site: String,
    pub dataset: String,
    pub job: String,
    pub round: u32,
    pub attempt: u32,
    /// The Poisson sampling rate q of the steps.
    pub sample_rate: f64,
    /// The effective noise multiplier σ_eff the accountant is told (after the noise grid's
    /// correction).
    pub noise_multiplier: f64,
    /// Steps that ran with this (q, σ_eff).
    pub steps: u64,
    /// The dataset's training rows (what a restored ledger plans the next job's q with).
    pub rows: u64,
    /// ε of the job on this dataset after the spend, at `delta`.
    pub job_epsilon: f64,
    /// ε of every job on this dataset after the spend, at `dataset_delta` (the site's δ).
    pub dataset_epsilon: f64,
    pub delta: f64,
    pub dataset_delta: f64,
    /// The fingerprint of the data the budget was charged for (a prefix of its source file):
    /// anchors the mapping from data to budget key in the trail, so that a node whose local
    /// mapping was deleted is caught, and an officer's restore rebinds the data to its budget.
    /// Absent in spends written before budget keys, and for sources without a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DatasetSource>,
    /// The round's evaluation metrics released under DP with the update (unsampled Gaussian
    /// releases, `tutela_privacy::metrics`): their σ and how many sums. Absent for spends
    /// without DP metrics (and in events written before they were charged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_noise_multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_releases: Option<u64>,
    /// The kind of the steps when they are not local DP-SGD: `distributed_dp_sgd` for a
    /// record-level distributed DP round (one Poisson-sampled clipped sum whose noise is the
    /// secure sum of the sites' shares, charged at the minimum of survivors before the masked
    /// input left the site). Absent: local DP-SGD (and every event written before the kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
}

/// What identifies a dataset's data, whatever the operator calls it or wherever the file lies:
/// the SHA-256 (under a domain tag) of the first `prefix_len` bytes of its source file, where
/// `prefix_len` is the file's length when first seen, at most 64 KiB. A file *extends* a
/// fingerprint when it is at least `prefix_len` long and its first `prefix_len` bytes hash to
/// it: the same file renamed, declared twice, copied, or with rows appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSource {
    pub prefix_len: u64,
    /// Hex SHA-256 of `tutela/dataset-source/v1` followed by the prefix.
    pub prefix_sha256: String,
}

impl ActionPayload for PrivacySpent {
    const ACTION: Action = Action::PrivacySpent;
}

impl PrivacySpent {
    /// The subject every spend of `dataset` at `site` is recorded under.
    pub fn subject(site: &str, dataset: &str) -> String {
        format!("{site}/{dataset}")
    }
}

/// `ledger.restored`: a site's compliance officer rebuilt a node's ledger of one dataset from the
/// trail's `privacy.spent` events of that node, and re-pinned the node's held checkpoint. Subject:
/// `<site>/<dataset>`; the actor is the officer (the restore runs with the officer's certificate
/// and key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerRestored {
    pub site: String,
    pub dataset: String,
    /// The node whose ledger was rebuilt (its SPIFFE identity).
    pub node: String,
    /// The `privacy.spent` events the ledger was rebuilt from, and the last one's seq.
    pub spends: u64,
    pub last_spend_seq: Option<u64>,
    /// ε of every job on the dataset as rebuilt, at `dataset_delta`.
    pub dataset_epsilon: f64,
    pub dataset_delta: f64,
    /// What the node's ledger held before: the spends of the trail it lacked.
    pub missing_spends: u64,
    /// The signed checkpoint (tree size) the node holds after the restore.
    pub checkpoint_tree_size: u64,
}

impl ActionPayload for LedgerRestored {
    const ACTION: Action = Action::LedgerRestored;
}
