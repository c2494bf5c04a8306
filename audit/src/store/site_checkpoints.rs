//! The newest checkpoint each site's node reports holding (migration 6): what the console's
//! overview shows beside the log's head. Written only by the service's `ReportHeldCheckpoint`
//! handler, after it has checked who reports and that this log signed the checkpoint.

use sqlx::Row;

use super::{AuditStore, Result, db};
use crate::Hash;
use crate::event::Timestamp;
use crate::hexser;

/// A site's held checkpoint, as its node last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteCheckpoint {
    /// The site's name (from the node's certificate).
    pub site: String,
    /// The node's identity that reported it.
    pub node: String,
    pub tree_size: u64,
    pub root: Hash,
    /// When the service received the report.
    pub reported_at: Timestamp,
}

impl AuditStore {
    /// Records `held` as its site's newest held checkpoint, replacing the previous report. A
    /// report of a smaller tree than the one recorded replaces it too: it is what the node now
    /// says it holds (a node restored from a backup, say), and the overview should show that.
    pub async fn record_site_checkpoint(&self, held: &SiteCheckpoint) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_site_checkpoints (site, node, tree_size, root, reported_at_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (site) DO UPDATE SET node = excluded.node, tree_size = excluded.tree_size,
                 root = excluded.root, reported_at_ms = excluded.reported_at_ms",
        )
        .bind(held.site.clone())
        .bind(held.node.clone())
        .bind(i64::try_from(held.tree_size).unwrap_or(i64::MAX))
        .bind(hex::encode(held.root))
        .bind(held.reported_at.unix_millis())
        .execute(self.pool())
        .await
        .map_err(db(format!(
            "record the checkpoint site {} holds",
            held.site
        )))?;
        Ok(())
    }

    /// Every site's newest held checkpoint, by site name. A row that cannot be read is skipped
    /// with a warning: it is a report, not the trail.
    pub async fn site_checkpoints(&self) -> Result<Vec<SiteCheckpoint>> {
        let rows = sqlx::query(
            "SELECT site, node, tree_size, root, reported_at_ms FROM audit_site_checkpoints ORDER BY site",
        )
        .fetch_all(self.pool())
        .await
        .map_err(db("read the sites' held checkpoints"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let read = || -> std::result::Result<SiteCheckpoint, String> {
                let site: String = r.try_get(0).map_err(|e| e.to_string())?;
                let node: String = r.try_get(1).map_err(|e| e.to_string())?;
                let tree_size: i64 = r.try_get(2).map_err(|e| e.to_string())?;
                let root: String = r.try_get(3).map_err(|e| e.to_string())?;
                let at: i64 = r.try_get(4).map_err(|e| e.to_string())?;
                Ok(SiteCheckpoint {
                    site,
                    node,
                    tree_size: u64::try_from(tree_size).map_err(|e| e.to_string())?,
                    root: hexser::decode_fixed::<32>(&root)?,
                    reported_at: Timestamp::from_unix_millis(at).map_err(|e| e.to_string())?,
                })
            };
            match read() {
                Ok(c) => out.push(c),
                Err(why) => tracing::warn!(%why, "an unreadable row in audit_site_checkpoints"),
            }
        }
        Ok(out)
    }
}
