//! Typed audit payloads: one struct per [`Action`], shared by the writers (coordinator, site
//! node, CLI, the audit service itself) and the readers (verification, reports, lineage).
//!
//! Writers build the struct and append it with [`AuditClient::append_payload`]; readers decode an
//! event with [`ActionPayload::from_event`], which checks the action and refuses a payload that
//! does not have the struct's shape (unknown fields included), naming the event's seq. No code
//! builds an audit payload with `json!` or reads one back by string key.
//!
//! [`AuditClient::append_payload`]: crate::client::AuditClient::append_payload

pub mod privacy;

use crate::event::{Action, Event};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod job;
mod pki;
mod policy;
mod quarantine;
mod registry;
mod site;
mod statistics;

pub use job::{
    JobApproved, JobCompleted, JobFailed, JobProposed, JobRejected, JobStarted, ModelInitialized,
    ModelPublished, RobustAggregation, RoundCompleted, SiteRoundMetrics, UpdateRefused,
    WatermarkRegistered,
};
pub use pki::{CertificateIssued, CertificateRevoked};
pub use policy::{PolicyDecision, PolicyLoaded};
pub use quarantine::{AuditQuarantined, QuarantineSignature, QuarantineTerms, QuarantinedRow};
pub use registry::{ModelRegistered, ModelStageChanged, StageSignature};
pub use site::{DatasetDeidentified, NodeRegistered, TextDatasetDeidentified};
pub use statistics::StatisticsPublished;

/// The payload of one action. `ACTION` ties the struct to its action so that a writer cannot
/// append a payload under another action's name and a reader cannot decode one as another.
pub trait ActionPayload: Serialize + DeserializeOwned {
    /// The action this payload belongs to.
    const ACTION: Action;

    /// The payload as the JSON value that is hashed and stored.
    fn to_value(&self) -> serde_json::Value {
        // A derived Serialize of plain structs (strings, numbers, maps with string keys) cannot
        // fail; a float that is NaN or infinite becomes null, which the reader then refuses.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Decodes `event`'s payload, refusing an event of another action or a payload of another
    /// shape.
    fn from_event(event: &Event) -> Result<Self, PayloadError> {
        if event.action != Self::ACTION {
            return Err(PayloadError::WrongAction {
                seq: event.seq,
                expected: Self::ACTION,
                found: event.action,
            });
        }
        Self::from_value(event.seq, &event.payload)
    }

    /// Decodes a payload value (the event at `seq`, for the error).
    fn from_value(seq: u64, value: &serde_json::Value) -> Result<Self, PayloadError> {
        serde_json::from_value(value.clone()).map_err(|e| PayloadError::Malformed {
            seq,
            action: Self::ACTION,
            problem: e.to_string(),
        })
    }
}

/// An event whose payload is not the typed payload of its action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("event {seq} is {found}, not {expected}")]
    WrongAction {
        seq: u64,
        expected: Action,
        found: Action,
    },
    #[error("event {seq} ({action}) has a malformed payload: {problem}")]
    Malformed {
        seq: u64,
        action: Action,
        problem: String,
    },
}

/// Checks that `payload` has the shape of `action`'s typed payload (the struct's fields, no
/// others, of their types). Exhaustive: a new action must name its payload here.
pub fn check_shape(action: Action, payload: &serde_json::Value) -> Result<(), PayloadError> {
    fn shape<P: ActionPayload>(payload: &serde_json::Value) -> Result<(), PayloadError> {
        P::from_value(0, payload).map(|_| ())
    }
    match action {
        Action::NodeRegistered => shape::<NodeRegistered>(payload),
        Action::JobProposed => shape::<JobProposed>(payload),
        Action::JobApproved => shape::<JobApproved>(payload),
        Action::JobRejected => shape::<JobRejected>(payload),
        Action::JobStarted => shape::<JobStarted>(payload),
        Action::ModelInitialized => shape::<ModelInitialized>(payload),
        Action::RoundCompleted => shape::<RoundCompleted>(payload),
        Action::UpdateRefused => shape::<UpdateRefused>(payload),
        Action::JobCompleted => shape::<JobCompleted>(payload),
        Action::JobFailed => shape::<JobFailed>(payload),
        Action::ModelPublished => shape::<ModelPublished>(payload),
        Action::WatermarkRegistered => shape::<WatermarkRegistered>(payload),
        Action::PolicyDecision => shape::<PolicyDecision>(payload),
        Action::CertificateIssued => shape::<CertificateIssued>(payload),
        Action::CertificateRevoked => shape::<CertificateRevoked>(payload),
        Action::DatasetDeidentified => shape::<DatasetDeidentified>(payload),
        Action::TextDatasetDeidentified => shape::<TextDatasetDeidentified>(payload),
        Action::PrivacySpent => shape::<privacy::PrivacySpent>(payload),
        Action::LedgerRestored => shape::<privacy::LedgerRestored>(payload),
        Action::ModelRegistered => shape::<ModelRegistered>(payload),
        Action::ModelStageChanged => shape::<ModelStageChanged>(payload),
        Action::AuditQuarantined => shape::<AuditQuarantined>(payload),
        Action::PolicyLoaded => shape::<PolicyLoaded>(payload),
        Action::StatisticsPublished => shape::<StatisticsPublished>(payload),
    }
}
