//! The two trails `verify-report` reads: the audit service over mutual TLS (its signed head and
//! its proofs), or the log's database read directly (proofs computed here from the stored
//! hashes, against the newest checkpoint the database holds).

use crate::Hash;
use crate::checkpoint::SignedCheckpoint;
use crate::client::AuditClient;
use crate::event::Event;
use crate::filter::EventFilter;
use crate::merkle::MerkleTree;
use crate::store::AuditStore;

use super::check::Trail;

impl Trail for AuditClient {
    async fn head(&mut self) -> Result<SignedCheckpoint, String> {
        self.checkpoint(None).await.map_err(|e| e.to_string())
    }

    async fn consistency(&mut self, old: u64, new: u64) -> Result<Vec<Hash>, String> {
        self.consistency_proof(old, new)
            .await
            .map_err(|e| e.to_string())
    }

    async fn inclusion(&mut self, seq: u64, tree_size: u64) -> Result<(Event, Vec<Hash>), String> {
        let p = self
            .inclusion_proof(seq, Some(tree_size))
            .await
            .map_err(|e| e.to_string())?;
        Ok((p.event, p.path))
    }

    async fn events(&mut self, filter: EventFilter) -> Result<Vec<Event>, String> {
        self.query(&filter).await.map_err(|e| e.to_string())
    }
}

/// The log's database as a trail: its newest stored checkpoint is the head, and proofs come
/// from a Merkle tree of the stored hashes (built once, on first use).
pub struct StoreTrail {
    store: AuditStore,
    tree: Option<MerkleTree>,
}

impl StoreTrail {
    pub fn new(store: AuditStore) -> StoreTrail {
        StoreTrail { store, tree: None }
    }

    async fn tree(&mut self) -> Result<&MerkleTree, String> {
        if self.tree.is_none() {
            let mut t = MerkleTree::new();
            for (seq, h) in self.store.hashes_from(0).await.map_err(|e| e.to_string())? {
                if seq != t.len() {
                    return Err(format!(
                        "the stored log has a gap at seq {} (run tutela audit verify)",
                        t.len()
                    ));
                }
                t.push_entry(&h);
            }
            self.tree = Some(t);
        }
        self.tree.as_ref().ok_or_else(|| "no tree".to_string())
    }
}

impl Trail for StoreTrail {
    async fn head(&mut self) -> Result<SignedCheckpoint, String> {
        self.store
            .latest_checkpoint()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the database holds no signed checkpoint".to_string())
    }

    async fn consistency(&mut self, old: u64, new: u64) -> Result<Vec<Hash>, String> {
        self.tree()
            .await?
            .consistency_proof(old, new)
            .map_err(|e| e.to_string())
    }

    async fn inclusion(&mut self, seq: u64, tree_size: u64) -> Result<(Event, Vec<Hash>), String> {
        let path = self
            .tree()
            .await?
            .audit_path(seq, tree_size)
            .map_err(|e| e.to_string())?;
        let event = self
            .store
            .event(seq)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the trail holds no event {seq}"))?;
        Ok((event, path))
    }

    async fn events(&mut self, filter: EventFilter) -> Result<Vec<Event>, String> {
        self.store.events(&filter).await.map_err(|e| e.to_string())
    }
}
