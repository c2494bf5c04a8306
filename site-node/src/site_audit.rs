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
//!   means the trail's history was rewritten or reset: the node declines to train and says so. A
//!   log with no checkpoint yet is normal for a young log. A node whose checkpoint file is gone
//!   while the trail has its events under a signed checkpoint declines too: it does not pin the
//!   trail again by itself (an officer's `tutela-node ledger restore` does); a marker file tells
//!   a node that pinned a young log before any checkpoint from one whose checkpoint was deleted.
//! - **Fail closed.** An unreachable service declines the task: nothing is trained that could not
//!   be recorded. The node's privacy spends are recorded too ([`crate::spend_anchor`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tutela_audit::Update;
use tutela_audit::client::{AuditClient, AuditClientError, AuditEndpoint};
use tutela_audit::filter::EventFilter;
use tutela_audit::payload::ActionPayload;

use tutela_audit::payload::privacy::PrivacySpent;
use tutela_privacy::at_rest::KeyEncryptionKey;
use tutela_protocol::tls::TlsMaterial;

use crate::agent::Deidentification;
use crate::audit_checkpoint::{AuditCheckpointError, HeldCheckpoint};
use crate::ledger::AnchoredSpend;

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
    #[error(
        "the audit service cannot be reached, so what this node would do could not be recorded: \
         it does not train off the record ({0})"
    )]
    Unreachable(AuditClientError),
    #[error(
        "this node cannot read its own events back from the audit trail (the consortium policy \
         must allow its node `audit, read_own`), so it cannot check its held checkpoint and \
         ledger against the trail and does not train: {0}"
    )]
    ReadOwnEvents(AuditClientError),
    #[error(
        "this node holds no checkpoint of the audit trail, but the trail has this node's events \
         from seq {first_own_seq} on, covered by a signed checkpoint of {tree_size} events: the \
         held checkpoint was deleted. The node does not pin the trail again by itself; a \
         compliance officer of the site re-pins it with `tutela-node ledger restore`"
    )]
    CheckpointMissing { first_own_seq: u64, tree_size: u64 },
    #[error(
        "the privacy spend of job {job} round {round} on dataset {dataset} could not be recorded \
         in the audit trail, so its update does not leave the site: {source}"
    )]
    RecordSpend {
        job: String,
        round: u32,
        dataset: String,
        #[source]
        source: AuditClientError,
    },
    #[error(
        "a privacy spend in the audit trail cannot be read, so the ledger cannot be checked: {0}"
    )]
    BadSpend(tutela_audit::payload::PayloadError),
    #[error("reading this node's spends of dataset {dataset} from the audit trail: {source}")]
    ReadSpends {
        dataset: String,
        #[source]
        source: AuditClientError,
    },
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
    /// This node's identity: the actor of its own events.
    identity: String,
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
            identity: tls.identity.uri(),
            pinned_key,
            work_dir: work_dir.to_path_buf(),
            kek,
            held: tokio::sync::Mutex::new(None),
            recorded: Mutex::new(BTreeSet::new()),
        })
    }

    /// Appends the dataset's de-identification event (`dataset.deidentified` for a table,
    /// `dataset.text_deidentified` for a text dataset) unless this process already did (same
    /// dataset, same protection configuration and commitment). Returns whether it appended.
    pub async fn record_deidentification(
        &self,
        site: &str,
        record: &Deidentification,
    ) -> Result<bool, SiteAuditError> {
        let dataset = record.dataset().to_string();
        let key = (dataset.clone(), record.identity());
        if self.lock_recorded().contains(&key) {
            return Ok(false);
        }
        let subject = format!("{site}/{dataset}");
        let mut client = self.client.clone();
        let appended = match record {
            Deidentification::Table(payload) => client.append_payload(&subject, payload).await,
            Deidentification::Text(payload) => client.append_payload(&subject, payload).await,
        };
        let receipt = appended.map_err(|source| SiteAuditError::Record {
            dataset: dataset.clone(),
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
            let info = client
                .log_info()
                .await
                .map_err(SiteAuditError::Unreachable)?;
            if info.public_key != self.pinned_key {
                return Err(SiteAuditError::KeyMismatch {
                    served: hex::encode(&info.public_key),
                    pinned: hex::encode(&self.pinned_key),
                });
            }
            let opened = HeldCheckpoint::open(
                &self.work_dir,
                &self.pinned_key,
                &info.log_id,
                self.kek.clone(),
            )?;
            if opened.latest().is_none() && !self.pinned_without_checkpoint(&info.log_id) {
                self.refuse_a_silent_repin(&mut client).await?;
                self.mark_pinned(&info.log_id)?;
            }
            *held = Some(opened);
        }
        let checkpoint = held.as_mut().expect("opened above");
        match checkpoint.refresh(&mut client).await {
            Ok(update) => {
                tracing::debug!(?update, "audit trail checkpoint verified");
                // The checkpoint file now says what the site saw; the marker is no longer needed.
                clear_pin_marker(&self.work_dir);
                // Tell the service what this site now holds, for the officers' overview. Not
                // needed for anything the node does: a failure is logged, never fatal.
                if let Some(held) = checkpoint.latest()
                    && let Err(e) = client.report_held_checkpoint(held).await
                {
                    tracing::warn!(error = %e, tree_size = held.checkpoint.tree_size, "could not report the held audit checkpoint");
                }
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
            Err(AuditCheckpointError::Client(e)) => Err(SiteAuditError::Unreachable(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether this node pinned log `log_id` before it ever held a checkpoint of it (a young log
    /// had none yet): the marker it wrote then, encrypted like its other files under `[at_rest]`.
    fn pinned_without_checkpoint(&self, log_id: &str) -> bool {
        let path = pin_marker_path(&self.work_dir, self.kek.is_some());
        let bytes = match &self.kek {
            Some(k) => tutela_privacy::at_rest::decrypt_to_vec(&path, k.as_ref()).ok(),
            None => std::fs::read(&path).ok(),
        };
        bytes.is_some_and(|b| b == log_id.as_bytes())
    }

    fn mark_pinned(&self, log_id: &str) -> Result<(), SiteAuditError> {
        let path = pin_marker_path(&self.work_dir, self.kek.is_some());
        let written = match &self.kek {
            Some(k) => tutela_privacy::at_rest::encrypt_bytes(
                log_id.as_bytes(),
                &path,
                k.as_ref(),
                tutela_privacy::at_rest::EncryptOptions::default(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string()),
            None => std::fs::write(&path, log_id).map_err(|e| e.to_string()),
        };
        written.map_err(|why| SiteAuditError::Checkpoint(AuditCheckpointError::File { path, why }))
    }

    /// A node that holds no checkpoint pins the log's next one, unless the log already has
    /// events of this node under a signed checkpoint: then the node held one before (it watches
    /// the trail before every event it appends) and the file was deleted.
    async fn refuse_a_silent_repin(&self, client: &mut AuditClient) -> Result<(), SiteAuditError> {
        let own = client
            .query(&EventFilter {
                actor: Some(self.identity.clone()),
                limit: Some(1),
                ..Default::default()
            })
            .await
            .map_err(own_events_error)?;
        let Some(first) = own.first() else {
            return Ok(());
        };
        match client.checkpoint(None).await {
            Ok(cp) if cp.checkpoint.tree_size > first.seq => {
                Err(SiteAuditError::CheckpointMissing {
                    first_own_seq: first.seq,
                    tree_size: cp.checkpoint.tree_size,
                })
            }
            Ok(_) => Ok(()),
            Err(AuditClientError::Rpc(s)) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(SiteAuditError::Unreachable(e)),
        }
    }

    /// This node's `privacy.spent` events of `dataset` in the trail, in seq order.
    pub async fn own_spends(
        &self,
        site: &str,
        dataset: &str,
    ) -> Result<Vec<AnchoredSpend>, SiteAuditError> {
        let mut client = self.client.clone();
        own_spends(&mut client, &self.identity, site, dataset).await
    }

    /// Every `privacy.spent` event of this node, in seq order.
    pub async fn all_own_spends(&self) -> Result<Vec<AnchoredSpend>, SiteAuditError> {
        let mut client = self.client.clone();
        all_own_spends(&mut client, &self.identity).await
    }

    /// Appends a `privacy.spent` event; returns its seq.
    pub async fn record_spend(&self, spend: &PrivacySpent) -> Result<u64, SiteAuditError> {
        let mut client = self.client.clone();
        let receipt = client
            .append_payload(&PrivacySpent::subject(&spend.site, &spend.dataset), spend)
            .await
            .map_err(|source| SiteAuditError::RecordSpend {
                job: spend.job.clone(),
                round: spend.round,
                dataset: spend.dataset.clone(),
                source,
            })?;
        tracing::info!(
            dataset = %spend.dataset,
            job = %spend.job,
            round = spend.round,
            attempt = spend.attempt,
            job_epsilon = spend.job_epsilon,
            seq = receipt.seq,
            "privacy spend recorded in the audit trail"
        );
        Ok(receipt.seq)
    }

    fn lock_recorded(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, String)>> {
        self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A failed read of the node's own events: the service could not be reached, or refused it.
fn own_events_error(e: AuditClientError) -> SiteAuditError {
    match &e {
        AuditClientError::Rpc(s)
            if matches!(
                s.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::InvalidArgument
            ) =>
        {
            SiteAuditError::ReadOwnEvents(e)
        }
        AuditClientError::Rpc(_) | AuditClientError::Connect(_) => SiteAuditError::Unreachable(e),
        _ => SiteAuditError::ReadOwnEvents(e),
    }
}

/// The marker a node writes when it pins a log that has no checkpoint yet, so that after a restart
/// it can tell "never held one" from "its checkpoint file was deleted"; removed once a checkpoint
/// is held.
fn pin_marker_path(work_dir: &Path, encrypted: bool) -> PathBuf {
    work_dir.join(if encrypted {
        "audit-pinned.enc"
    } else {
        "audit-pinned"
    })
}

/// Removes the pin marker (see [`pin_marker_path`]), whichever form it has.
pub fn clear_pin_marker(work_dir: &Path) {
    for encrypted in [true, false] {
        let _ = std::fs::remove_file(pin_marker_path(work_dir, encrypted));
    }
}

/// The `privacy.spent` events of `node` on `<site>/<dataset>`, in seq order. Under the shipped
/// policy a node reads only its own events (`audit, read_own`), and the service answers with
/// those whatever the filter; the actor is named here all the same.
pub async fn own_spends(
    client: &mut AuditClient,
    node: &str,
    site: &str,
    dataset: &str,
) -> Result<Vec<AnchoredSpend>, SiteAuditError> {
    spends_by(
        client,
        node,
        Some(PrivacySpent::subject(site, dataset)),
        dataset,
    )
    .await
}

/// Every `privacy.spent` event of `node`, whatever its budget, in seq order: what tells which
/// budget key the trail holds each version of a dataset's data under
/// ([`crate::budget_identity`]).
pub async fn all_own_spends(
    client: &mut AuditClient,
    node: &str,
) -> Result<Vec<AnchoredSpend>, SiteAuditError> {
    spends_by(client, node, None, "(all)").await
}

async fn spends_by(
    client: &mut AuditClient,
    node: &str,
    subject: Option<String>,
    dataset: &str,
) -> Result<Vec<AnchoredSpend>, SiteAuditError> {
    let events = client
        .query(&EventFilter {
            actor: Some(node.to_string()),
            action: Some(PrivacySpent::ACTION),
            subject,
            ..Default::default()
        })
        .await
        .map_err(|source| match own_events_error(source) {
            SiteAuditError::ReadOwnEvents(source) => SiteAuditError::ReadSpends {
                dataset: dataset.to_string(),
                source,
            },
            unreachable => unreachable,
        })?;
    let mut spends = Vec::with_capacity(events.len());
    for e in &events {
        match PrivacySpent::from_event(e) {
            Ok(payload) => spends.push(AnchoredSpend {
                seq: e.seq,
                timestamp_unix_ms: e.timestamp.unix_millis(),
                payload,
            }),
            // A spend this node cannot read still counts against it: refused, not skipped.
            Err(err) => return Err(SiteAuditError::BadSpend(err)),
        }
    }
    Ok(spends)
}

/// A 32-byte Ed25519 public key, hex, alone in its file (surrounding whitespace allowed).
pub(crate) fn read_public_key(path: &Path) -> Result<Vec<u8>, SiteAuditError> {
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
