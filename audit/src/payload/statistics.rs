//! The payload of a consortium-statistics job's result (`statistics.published`, appended by the
//! coordinator): what was released, by digest, and what it cost each site. Figures of the result
//! itself are in the statistics file the digest names, never in the trail (they are the
//! consortium's, not the regulator's record; the digest binds them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ActionPayload;
use crate::event::Action;

/// `statistics.published` (subject: the job id): the coordinator summed the sites' noised
/// sufficient statistics of a `kind = "statistics"` job and finished the data dictionary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsPublished {
    /// The job's spec digest (what the officers signed).
    pub spec_digest: String,
    /// The schema the statistics are of, by name and by the SHA-256 of its file.
    pub schema: String,
    pub schema_sha256: String,
    /// The SHA-256 (hex) of the statistics file (`tutela_privacy::stats::DataDictionary`'s
    /// file text): what a schema's `[standardize] sha256` names.
    pub result_sha256: String,
    /// The sites whose statistics are in the sum, sorted.
    pub sites: Vec<String>,
    /// Site -> the ε its one release spent, at `delta` (under secure aggregation, the ε of the
    /// sum with this many survivors, the same for every site).
    pub epsilon_per_site: BTreeMap<String, f64>,
    pub delta: f64,
    /// The accountant that gave the ε (`rdp`, `pld`, or `distributed` for secure aggregation's
    /// distributed discrete Gaussian).
    pub accountant: String,
    /// True when the coordinator saw only the masked sum (`[secure_aggregation]`).
    pub secure_aggregation: bool,
    /// The confidence at which every figure of the result lies within its stated bound.
    pub confidence: f64,
    /// Rows in the sum, noised (as the result states them).
    pub rows: f64,
}

impl ActionPayload for StatisticsPublished {
    const ACTION: Action = Action::StatisticsPublished;
}
