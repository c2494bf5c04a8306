//! Each site's held checkpoint, as its node reports it (`ReportHeldCheckpoint`): who may report,
//! and what is accepted. The handler in [`crate::service`] is thin; this is the decision, tested
//! without a network.
//!
//! A report is accepted only
//! - from a site's node certificate, for that site: the site is read from the certificate, the
//!   request has no field for it, so a node cannot report for another site;
//! - of a checkpoint of this log (its log id), signed by this log's key, that this log stored
//!   with the same root. A node holding a signed checkpoint this log does not have (another root
//!   for the same size) holds evidence of a fork: refused, and logged at ERROR.

use tonic::Status;
use tutela_protocol::identity::{Identity, Principal};

use crate::checkpoint::SignedCheckpoint;
use crate::event::Timestamp;
use crate::log::AuditLog;
use crate::store::{SiteCheckpoint, StoreError};

/// Why a report was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("only a site's node reports the checkpoint its site holds; {0} is not a site node")]
    NotANode(String),
    #[error("the reported checkpoint is of log {got:?}, not this log ({expected:?})")]
    OtherLog { got: String, expected: String },
    #[error("the reported checkpoint does not verify with this log's key: {0}")]
    Signature(crate::checkpoint::CheckpointError),
    #[error("this log signed no checkpoint of size {0}")]
    Unknown(u64),
    #[error(
        "this log's checkpoint of size {tree_size} has root {stored}, the reported one {reported}: the node holds a different history"
    )]
    Fork {
        tree_size: u64,
        stored: String,
        reported: String,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl ReportError {
    pub fn status(&self) -> Status {
        match self {
            ReportError::NotANode(_) => Status::permission_denied(self.to_string()),
            ReportError::OtherLog { .. } | ReportError::Signature(_) => {
                Status::invalid_argument(self.to_string())
            }
            ReportError::Unknown(_) | ReportError::Fork { .. } => {
                Status::failed_precondition(self.to_string())
            }
            ReportError::Store(_) => Status::unavailable(self.to_string()),
        }
    }
}

/// The record to store for `caller` reporting `held`, or why it is refused.
pub async fn check_report(
    log: &AuditLog,
    caller: &Identity,
    held: &SignedCheckpoint,
) -> Result<SiteCheckpoint, ReportError> {
    let Principal::Node { site } = &caller.principal else {
        return Err(ReportError::NotANode(caller.uri()));
    };
    let c = &held.checkpoint;
    if c.log_id != log.log_id() {
        return Err(ReportError::OtherLog {
            got: c.log_id.clone(),
            expected: log.log_id().to_string(),
        });
    }
    held.verify(log.public_key())
        .map_err(ReportError::Signature)?;
    let stored = log
        .store()
        .checkpoint_at(c.tree_size)
        .await?
        .ok_or(ReportError::Unknown(c.tree_size))?;
    if stored.checkpoint.root != c.root {
        let e = ReportError::Fork {
            tree_size: c.tree_size,
            stored: hex::encode(stored.checkpoint.root),
            reported: hex::encode(c.root),
        };
        tracing::error!(node = %caller.uri(), error = %e, "a site holds a signed checkpoint of another history");
        return Err(e);
    }
    Ok(SiteCheckpoint {
        site: site.clone(),
        node: caller.uri(),
        tree_size: c.tree_size,
        root: c.root,
        reported_at: Timestamp::now(),
    })
}
