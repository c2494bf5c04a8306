//! The latest audit checkpoint this site has verified, kept in the node's work directory, so that
//! the consortium operator cannot rewrite audit history this site has seen: every newer
//! checkpoint is accepted only with a consistency proof from the one held (RFC 6962), checked by
//! [`CheckpointVerifier`]. The file survives restarts; a refused checkpoint leaves it unchanged.

use std::path::{Path, PathBuf};

use tutela_audit::client::{AuditClient, AuditClientError};
use tutela_audit::{CheckpointError, CheckpointVerifier, SignedCheckpoint, Update};

/// The file in the work directory.
pub const CHECKPOINT_FILE: &str = "audit-checkpoint.json";

#[derive(Debug, thiserror::Error)]
pub enum AuditCheckpointError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("the audit log's checkpoint was refused (history this site saw was rewritten?): {0}")]
    Refused(#[from] CheckpointError),
    #[error("{0}")]
    Client(AuditClientError),
}

/// A site's pinned view of the audit log.
pub struct HeldCheckpoint {
    path: PathBuf,
    verifier: CheckpointVerifier,
}

impl HeldCheckpoint {
    /// Loads the checkpoint saved in `work_dir` (re-checking its signature with `public_key`), or
    /// starts empty for `log_id`.
    pub fn open(
        work_dir: &Path,
        public_key: &[u8],
        log_id: &str,
    ) -> Result<HeldCheckpoint, AuditCheckpointError> {
        let path = work_dir.join(CHECKPOINT_FILE);
        let file_err = |why: String| AuditCheckpointError::File {
            path: path.clone(),
            why,
        };
        let verifier = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let cp: SignedCheckpoint =
                    serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?;
                if cp.checkpoint.log_id != log_id {
                    return Err(file_err(format!(
                        "holds a checkpoint of log {:?}, not {log_id:?}",
                        cp.checkpoint.log_id
                    )));
                }
                CheckpointVerifier::restore(public_key, cp)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                CheckpointVerifier::new(public_key, log_id)
            }
            Err(e) => return Err(file_err(e.to_string())),
        };
        Ok(HeldCheckpoint { path, verifier })
    }

    pub fn latest(&self) -> Option<&SignedCheckpoint> {
        self.verifier.latest()
    }

    /// Accepts `new` if `proof` shows it extends the held checkpoint, and saves it (atomically:
    /// a temporary file renamed over the old one).
    pub fn accept(
        &mut self,
        new: &SignedCheckpoint,
        proof: &[[u8; 32]],
    ) -> Result<Update, AuditCheckpointError> {
        let update = self.verifier.update(new, proof)?;
        self.save()?;
        Ok(update)
    }

    /// Fetches the latest checkpoint and its consistency proof from the audit service.
    pub async fn refresh(
        &mut self,
        client: &mut AuditClient,
    ) -> Result<Update, AuditCheckpointError> {
        let update = client
            .advance(&mut self.verifier)
            .await
            .map_err(|e| match e {
                AuditClientError::Checkpoint(c) => AuditCheckpointError::Refused(c),
                other => AuditCheckpointError::Client(other),
            })?;
        self.save()?;
        Ok(update)
    }

    fn save(&self) -> Result<(), AuditCheckpointError> {
        let Some(cp) = self.verifier.latest() else {
            return Ok(());
        };
        let file_err = |why: String| AuditCheckpointError::File {
            path: self.path.clone(),
            why,
        };
        let text = serde_json::to_string_pretty(cp).map_err(|e| file_err(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| file_err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use tutela_audit::{Action, Chain, Checkpoint, MerkleTree, Timestamp};

    const LOG: &str = "spiffe://t/audit";

    fn grow(chain: &mut Chain, tree: &mut MerkleTree, n: u64, tag: &str) {
        for i in 0..n {
            let e = chain
                .append(
                    Timestamp::now(),
                    "spiffe://t/coordinator",
                    Action::JobStarted,
                    tag,
                    serde_json::json!({"i": i}),
                )
                .unwrap();
            tree.push_entry(&e.hash);
        }
    }

    fn sign(tree: &MerkleTree, n: u64, key: &Ed25519KeyPair) -> SignedCheckpoint {
        Checkpoint {
            tree_size: n,
            root: tree.root_at(n).unwrap(),
            timestamp: Timestamp::now(),
            log_id: LOG.into(),
        }
        .sign(key)
        .unwrap()
    }

    #[test]
    fn keeps_the_latest_checkpoint_across_restarts_and_refuses_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let key = Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap();
        let pk = key.public_key().as_ref().to_vec();
        let (mut chain, mut tree) = (Chain::new(), MerkleTree::new());
        grow(&mut chain, &mut tree, 10, "a");
        let mut held = HeldCheckpoint::open(dir.path(), &pk, LOG).unwrap();
        assert!(held.latest().is_none());
        held.accept(&sign(&tree, 10, &key), &[]).unwrap();
        // Restart: the checkpoint of size 10 is still held.
        let mut held = HeldCheckpoint::open(dir.path(), &pk, LOG).unwrap();
        assert_eq!(held.latest().unwrap().checkpoint.tree_size, 10);
        grow(&mut chain, &mut tree, 7, "b");
        let proof = tree.consistency_proof(10, 17).unwrap();
        assert_eq!(
            held.accept(&sign(&tree, 17, &key), &proof).unwrap(),
            Update::Advanced { from: 10, to: 17 }
        );
        // The operator rewrites history (another log of 20 with the same key): refused, file kept.
        let (mut chain2, mut tree2) = (Chain::new(), MerkleTree::new());
        grow(&mut chain2, &mut tree2, 20, "rewritten");
        let forged = sign(&tree2, 20, &key);
        let proof2 = tree2.consistency_proof(17, 20).unwrap();
        assert!(matches!(
            held.accept(&forged, &proof2),
            Err(AuditCheckpointError::Refused(_))
        ));
        let held = HeldCheckpoint::open(dir.path(), &pk, LOG).unwrap();
        assert_eq!(held.latest().unwrap().checkpoint.tree_size, 17);
    }
}
