//! The latest audit checkpoint this site has verified, kept in the node's work directory, so that
//! the consortium operator cannot rewrite audit history this site has seen: every newer
//! checkpoint is accepted only with a consistency proof from the one held (RFC 6962), checked by
//! [`CheckpointVerifier`]. The file survives restarts; a refused checkpoint leaves it unchanged.
//!
//! A checkpoint is public, signed data, but the node writes nothing in plaintext: with `[at_rest]`
//! the file is `audit-checkpoint.json.enc`, AES-256-GCM under the node's key-encryption key like
//! every other file it writes (and re-wrapped by `tutela-node keys rotate` with them).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tutela_audit::client::{AuditClient, AuditClientError};
use tutela_audit::{CheckpointError, CheckpointVerifier, SignedCheckpoint, Update};
use tutela_privacy::at_rest::{self, EncryptOptions, KeyEncryptionKey};

/// The file in the work directory, without `[at_rest]`.
pub const CHECKPOINT_FILE: &str = "audit-checkpoint.json";
/// The file in the work directory, with `[at_rest]`.
pub const ENCRYPTED_CHECKPOINT_FILE: &str = "audit-checkpoint.json.enc";

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
    kek: Option<Arc<dyn KeyEncryptionKey>>,
    verifier: CheckpointVerifier,
}

impl std::fmt::Debug for HeldCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldCheckpoint")
            .field("path", &self.path)
            .field("tree_size", &self.latest().map(|c| c.checkpoint.tree_size))
            .finish_non_exhaustive()
    }
}

impl HeldCheckpoint {
    /// Loads the checkpoint saved in `work_dir` (re-checking its signature with `public_key`), or
    /// starts empty for `log_id`. With `kek` the file is encrypted at rest.
    pub fn open(
        work_dir: &Path,
        public_key: &[u8],
        log_id: &str,
        kek: Option<Arc<dyn KeyEncryptionKey>>,
    ) -> Result<HeldCheckpoint, AuditCheckpointError> {
        let path = work_dir.join(match kek {
            Some(_) => ENCRYPTED_CHECKPOINT_FILE,
            None => CHECKPOINT_FILE,
        });
        let file_err = |why: String| AuditCheckpointError::File {
            path: path.clone(),
            why,
        };
        let bytes = match &kek {
            Some(k) if path.exists() => Some(
                at_rest::decrypt_to_vec(&path, k.as_ref()).map_err(|e| file_err(e.to_string()))?,
            ),
            Some(_) => None,
            None => match std::fs::read(&path) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(file_err(e.to_string())),
            },
        };
        let verifier = match bytes {
            Some(bytes) => {
                let cp: SignedCheckpoint =
                    serde_json::from_slice(&bytes).map_err(|e| file_err(e.to_string()))?;
                if cp.checkpoint.log_id != log_id {
                    return Err(file_err(format!(
                        "holds a checkpoint of log {:?}, not {log_id:?}",
                        cp.checkpoint.log_id
                    )));
                }
                CheckpointVerifier::restore(public_key, cp)?
            }
            None => CheckpointVerifier::new(public_key, log_id),
        };
        Ok(HeldCheckpoint {
            path,
            kek,
            verifier,
        })
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
        let text = serde_json::to_vec_pretty(cp).map_err(|e| file_err(e.to_string()))?;
        match &self.kek {
            // encrypt_bytes writes a temporary file beside the target and renames it.
            Some(k) => {
                at_rest::encrypt_bytes(&text, &self.path, k.as_ref(), EncryptOptions::default())
                    .map(|_| ())
                    .map_err(|e| file_err(e.to_string()))
            }
            None => {
                let tmp = self.path.with_extension("json.tmp");
                std::fs::write(&tmp, text)
                    .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|_| std::fs::rename(&tmp, &self.path))
                    .map_err(|e| file_err(e.to_string()))
            }
        }
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
        let mut held = HeldCheckpoint::open(dir.path(), &pk, LOG, None).unwrap();
        assert!(held.latest().is_none());
        held.accept(&sign(&tree, 10, &key), &[]).unwrap();
        // Restart: the checkpoint of size 10 is still held.
        let mut held = HeldCheckpoint::open(dir.path(), &pk, LOG, None).unwrap();
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
        let held = HeldCheckpoint::open(dir.path(), &pk, LOG, None).unwrap();
        assert_eq!(held.latest().unwrap().checkpoint.tree_size, 17);
    }

    #[test]
    fn with_a_key_encryption_key_the_file_is_encrypted_and_survives_restarts() {
        use tutela_privacy::at_rest::LocalKek;
        let dir = tempfile::tempdir().unwrap();
        let kek: Arc<dyn KeyEncryptionKey> = Arc::new(LocalKek::from_bytes(&[7; 32]));
        let key = Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap();
        let pk = key.public_key().as_ref().to_vec();
        let (mut chain, mut tree) = (Chain::new(), MerkleTree::new());
        grow(&mut chain, &mut tree, 5, "a");
        let mut held = HeldCheckpoint::open(dir.path(), &pk, LOG, Some(kek.clone())).unwrap();
        held.accept(&sign(&tree, 5, &key), &[]).unwrap();
        assert!(!dir.path().join(CHECKPOINT_FILE).exists());
        let on_disk = std::fs::read(dir.path().join(ENCRYPTED_CHECKPOINT_FILE)).unwrap();
        for plaintext in [&b"tree_size"[..], LOG.as_bytes()] {
            assert!(
                !on_disk.windows(plaintext.len()).any(|w| w == plaintext),
                "plaintext {:?} in the encrypted checkpoint file",
                String::from_utf8_lossy(plaintext)
            );
        }
        let held = HeldCheckpoint::open(dir.path(), &pk, LOG, Some(kek)).unwrap();
        assert_eq!(held.latest().unwrap().checkpoint.tree_size, 5);
        // Another key-encryption key cannot open it, and says which file.
        let other: Arc<dyn KeyEncryptionKey> = Arc::new(LocalKek::from_bytes(&[8; 32]));
        let err = HeldCheckpoint::open(dir.path(), &pk, LOG, Some(other)).unwrap_err();
        assert!(err.to_string().contains(ENCRYPTED_CHECKPOINT_FILE), "{err}");
    }
}
