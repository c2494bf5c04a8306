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
