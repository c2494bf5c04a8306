//! The site's own entries in the consortium's audit trail, and its watch over that trail.
//!
//! With `[audit]` in node.toml the node talks to `tutela-audit` itself, as its own certificate
//! identity (the coordinator is not trusted to speak for the site):
//!
//! - **The de-identification report.** The first time a task needs a dataset, the node reads and
//!   anonymizes it ([`crate::dataset::SiteDataset::load`]) and, before it trains on it, appends a
//!   `dataset.deidentified` event: each transform, rows and cells changed, k and l achieved,
//!   suppressed rows, the configuration's digest and the dataset commitment — counts and column
//!   names, never a value. If the event cannot be recorded the task is declined (fail closed, like
//!   the coordinator's own events): the trail never lacks the anonymization of data a model was
//!   trained on.
//! - **The held checkpoint.** Before each training task the node fetches the log's latest signed
//!   checkpoint and a consistency proof from the one it holds ([`HeldCheckpoint`]); the log's
//!   checkpoint key is pinned in node.toml, never taken from the service. A checkpoint that does
//!   not extend what the site saw, or a log with no checkpoint at all once the site has held one,
//!   means the trail's history was rewritten or reset: the node declines to train and says so. An unreachable service or a log with no checkpoint yet is only logged
//!   there; recording the report, when there is one, still needs the service.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tutela_audit::Update;
use tutela_audit::client::{AuditClient, AuditClientError, AuditEndpoint};
use tutela_audit::payload::DatasetDeidentified;
use tutela_privacy::at_rest::KeyEncryptionKey;
use tutela_protocol::tls::TlsMaterial;

use crate::audit_checkpoint::{AuditCheckpointError, HeldCheckpoint};
use crate::local::LocalDataset;

/// `[audit]` of node.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAuditConfig {
    /// `host:port` of `tutela-audit`.
    pub endpoint: String,
    /// The SPIFFE identity the audit service's certificate must carry; default
    /// `spiffe://<consortium>/audit`.
    #[serde(default)]
    pub server_identity: Option<String>,
    /// A file holding the log's checkpoint public key, hex (the `KEY.pub` written by
    /// `tutela-audit keygen`), distributed to the sites out of band.
    pub checkpoint_public_key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SiteAuditError {
    #[error("[audit] checkpoint_public_key {}: {why}", .path.display())]
    PinnedKey { path: PathBuf, why: String },
    #[error("[audit]: {0}")]
    Client(AuditClientError),
    #[error(
        "the audit service signs its checkpoints with key {served}, not the key pinned in [audit] \
         checkpoint_public_key ({pinned}): its checkpoints are not trusted"
    )]
    KeyMismatch { served: String, pinned: String },
    #[error("the audit trail: {0}")]
    Checkpoint(#[from] AuditCheckpointError),
    #[error(
        "the audit log says it has no signed checkpoint, but this site holds one of {held} events: \
         the trail's history was reset or replaced, so the node does not train"
    )]
    Reset { held: u64 },
    #[error(
        "the de-identification report of dataset {dataset} could not be recorded in the audit \
         trail, so the node does not train on it: {source}"
    )]
    Record {
        dataset: String,
        #[source]
        source: AuditClientError,
    },
}

/// The node's connection to the audit trail.
pub struct SiteAudit {
    client: AuditClient,
    pinned_key: Vec<u8>,
    work_dir: PathBuf,
    kek: Option<Arc<dyn KeyEncryptionKey>>,
    /// Opened on first use: it needs the log's id, which only the service can tell.
    held: tokio::sync::Mutex<Option<HeldCheckpoint>>,
    /// (dataset, report digest + commitment) already recorded by this process.
    recorded: Mutex<BTreeSet<(String, String)>>,
}

impl std::fmt::Debug for SiteAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteAudit")
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

impl SiteAudit {
    /// Reads the pinned key and makes a client that connects on first use.
    pub fn new(
        config: &NodeAuditConfig,
        tls: &TlsMaterial,
        work_dir: &Path,
        kek: Option<Arc<dyn KeyEncryptionKey>>,
    ) -> Result<SiteAudit, SiteAuditError> {
        let pinned_key = read_public_key(&config.checkpoint_public_key)?;
        let endpoint = AuditEndpoint {
            endpoint: config.endpoint.clone(),
            server_identity: config.server_identity.clone(),
        };
        Ok(SiteAudit {
            client: endpoint.connect_lazy(tls).map_err(SiteAuditError::Client)?,
            pinned_key,
            work_dir: work_dir.to_path_buf(),
            kek,
            held: tokio::sync::Mutex::new(None),
            recorded: Mutex::new(BTreeSet::new()),
        })
    }

    /// Appends the `dataset.deidentified` event for `data` unless this process already did
    /// (same dataset, same report and commitment). Returns whether it appended.
    pub async fn record_deidentification(
        &self,
        site: &str,
        job_id: &str,
        dataset: &str,
        data: &LocalDataset,
    ) -> Result<bool, SiteAuditError> {
        let Some(report) = &data.deid else {
            return Ok(false);
        };
        let commitment = data.commitment.map(|c| c.root_hex());
        let key = (
            dataset.to_string(),
            format!(
                "{}:{}",
                report.config_sha256,
                commitment.as_deref().unwrap_or("-")
            ),
        );
        if self.lock_recorded().contains(&key) {
            return Ok(false);
        }
        let payload = DatasetDeidentified {
            site: site.to_string(),
            dataset: dataset.to_string(),
            job: job_id.to_string(),
            // The report is counts and column names (serialising plain data cannot fail).
            report: serde_json::to_value(report).unwrap_or_default(),
            dataset_commitment: commitment,
        };
        let mut client = self.client.clone();
        let receipt = client
            .append_payload(&format!("{site}/{dataset}"), &payload)
            .await
            .map_err(|source| SiteAuditError::Record {
                dataset: dataset.to_string(),
                source,
            })?;
        tracing::info!(
            %dataset,
            seq = receipt.seq,
            "de-identification report recorded in the audit trail"
        );
        self.lock_recorded().insert(key);
        Ok(true)
    }

    /// Advances the held checkpoint to the log's latest. `Ok(None)` when the service cannot be
    /// reached or has no checkpoint yet (logged); an error only when the log is not the one
    /// this site saw (another key, another log, or rewritten history).
    pub async fn watch(&self) -> Result<Option<Update>, SiteAuditError> {
        let mut held = self.held.lock().await;
        let mut client = self.client.clone();
        if held.is_none() {
            let info = match client.log_info().await {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!(error = %e, "audit trail not checked: the audit service did not answer");
                    return Ok(None);
                }
            };
            if info.public_key != self.pinned_key {
                return Err(SiteAuditError::KeyMismatch {
                    served: hex::encode(&info.public_key),
                    pinned: hex::encode(&self.pinned_key),
                });
            }
            *held = Some(HeldCheckpoint::open(
                &self.work_dir,
                &self.pinned_key,
                &info.log_id,
                self.kek.clone(),
            )?);
        }
        let checkpoint = held.as_mut().expect("opened above");
        match checkpoint.refresh(&mut client).await {
            Ok(update) => {
                tracing::debug!(?update, "audit trail checkpoint verified");
                Ok(Some(update))
            }
            Err(AuditCheckpointError::Client(AuditClientError::Rpc(s)))
                if s.code() == tonic::Code::NotFound =>
            {
                // No checkpoint yet is normal for a young log, but not for one this site has
                // seen signed: a log that lost its checkpoints was reset or replaced.
                match checkpoint.latest() {
                    Some(held) => Err(SiteAuditError::Reset {
                        held: held.checkpoint.tree_size,
                    }),
                    None => {
                        tracing::debug!("the audit log has no checkpoint yet");
                        Ok(None)
                    }
                }
            }
            Err(AuditCheckpointError::Client(e)) => {
                tracing::warn!(error = %e, "audit trail not checked: the audit service did not answer");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn lock_recorded(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, String)>> {
        self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A 32-byte Ed25519 public key, hex, alone in its file (surrounding whitespace allowed).
fn read_public_key(path: &Path) -> Result<Vec<u8>, SiteAuditError> {
    let err = |why: String| SiteAuditError::PinnedKey {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let key = hex::decode(text.trim()).map_err(|e| err(format!("not hex: {e}")))?;
    if key.len() != 32 {
        return Err(err(format!(
            "{} bytes, but an Ed25519 public key is 32",
            key.len()
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_key_file_must_hold_32_bytes_of_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.pub");
        std::fs::write(&path, format!("{}\n", hex::encode([9u8; 32]))).unwrap();
        assert_eq!(read_public_key(&path).unwrap(), vec![9u8; 32]);
        std::fs::write(&path, hex::encode([9u8; 31])).unwrap();
        let e = read_public_key(&path).unwrap_err().to_string();
        assert!(e.contains("audit.pub") && e.contains("31 bytes"), "{e}");
        std::fs::write(&path, "not a key").unwrap();
        let e = read_public_key(&path).unwrap_err().to_string();
        assert!(e.contains("not hex"), "{e}");
        let e = read_public_key(&dir.path().join("missing.pub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pub"), "{e}");
    }
}
