//! The payloads about sites: a node's registration (written by the coordinator) and a dataset's
//! de-identification (written by the site's node).

use serde::{Deserialize, Serialize};

use super::ActionPayload;
use crate::event::Action;

/// `node.registered` (subject: the node's identity).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRegistered {
    pub site: String,
    /// The node certificate's serial, hex.
    #[serde(default)]
    pub certificate_serial: Option<String>,
    pub node_version: String,
    #[serde(default)]
    pub datasets: Vec<String>,
}

impl ActionPayload for NodeRegistered {
    const ACTION: Action = Action::NodeRegistered;
}

/// `dataset.deidentified` (subject: `<site>/<dataset>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetDeidentified {
    /// The node's own site.
    pub site: String,
    pub dataset: String,
    /// The job it was read for.
    pub job: String,
    /// The de-identification report (`privacy::anonymize`'s: transforms, counts, k and l,
    /// configuration digest; never a value).
    pub report: serde_json::Value,
    #[serde(default)]
    pub dataset_commitment: Option<String>,
}

impl ActionPayload for DatasetDeidentified {
    const ACTION: Action = Action::DatasetDeidentified;
}

/// `dataset.text_deidentified` (subject: `<site>/<dataset>`): a text dataset read through the
/// text protection pipeline before a language model trains on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextDatasetDeidentified {
    /// The node's own site.
    pub site: String,
    pub dataset: String,
    /// The job it was read for.
    pub job: String,
    /// SHA-256 of the protection configuration (names and blocklist files by digest, SimHash
    /// threshold, split settings): the report's `config_sha256`.
    pub config_sha256: String,
    /// What each document was counted against: `document` or `patient` (the split unit, and the
    /// privacy unit a patient-level job clips and samples by).
    pub split_unit: String,
    pub documents_in: u64,
    pub documents_out: u64,
    /// The text pipeline's report (`privacy::anonymize::text::TextDeidReport`: empty, filtered,
    /// redacted and near-duplicate counts, the split's sizes; counts and settings only, never a
    /// term, name or text).
    pub report: serde_json::Value,
    /// The dataset commitment (hex) over the protected documents, train then validation.
    pub dataset_commitment: String,
}

impl ActionPayload for TextDatasetDeidentified {
    const ACTION: Action = Action::TextDatasetDeidentified;
}
