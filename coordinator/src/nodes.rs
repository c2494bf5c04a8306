//! The site nodes connected to this coordinator right now, and the channel each receives its
//! tasks on. A node's site is the one in its certificate; a second connection from the same site
//! replaces the first (a node that restarted), and the first's task stream ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};
use tonic::Status;
use tutela_protocol::identity::Identity;
use tutela_protocol::pb;

/// Tasks queued per node before `send` reports the node as not keeping up.
const TASK_QUEUE: usize = 16;

struct Connected {
    conn_id: u64,
    identity: Identity,
    datasets: Vec<String>,
    device: String,
    tx: mpsc::Sender<Result<pb::Task, Status>>,
}

/// What the operator sees of a connected node.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub site: String,
    pub identity: Identity,
    pub datasets: Vec<String>,
    pub device: String,
}

pub struct NodeRegistry {
    nodes: Mutex<HashMap<String, Connected>>,
    next_conn: AtomicU64,
    /// Bumped on every connect and disconnect, so a round waiting for sites wakes up.
    changed: watch::Sender<u64>,
}

impl Default for NodeRegistry {
    fn default() -> Self {
        NodeRegistry {
            nodes: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            changed: watch::channel(0).0,
        }
    }
}

impl NodeRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connected>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a node and returns its connection id and the receiving end of its task stream.
    pub fn connect(
        &self,
        site: &str,
        identity: Identity,
        datasets: Vec<String>,
        device: String,
    ) -> (u64, mpsc::Receiver<Result<pb::Task, Status>>) {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(TASK_QUEUE);
        let previous = self.lock().insert(
            site.to_string(),
            Connected {
                conn_id,
                identity,
                datasets,
                device,
                tx,
            },
        );
        if previous.is_some() {
            tracing::info!(
                site,
                "a node reconnected; its previous connection is replaced"
            );
        }
        self.changed.send_modify(|v| *v += 1);
        (conn_id, rx)
    }

    /// Forgets a node, if `conn_id` is still its current connection.
    pub fn disconnect(&self, site: &str, conn_id: u64) {
        let mut nodes = self.lock();
        if nodes.get(site).is_some_and(|n| n.conn_id == conn_id) {
            nodes.remove(site);
            drop(nodes);
            tracing::info!(site, "node disconnected");
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Ends every node's task stream with `status` and forgets them (this coordinator stopped
    /// being the leader: the nodes go on to the next coordinator address they know).
    pub fn disconnect_all(&self, status: Status) {
        let nodes: Vec<(String, Connected)> = self.lock().drain().collect();
        if nodes.is_empty() {
            return;
        }
        for (site, n) in nodes {
            let _ = n.tx.try_send(Err(status.clone()));
            tracing::info!(%site, "node sent away: {}", status.message());
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Queues a task for a site's node. False if the node is not connected or not reading.
    pub fn send(&self, site: &str, task: pb::Task) -> bool {
        let nodes = self.lock();
        match nodes.get(site) {
            Some(n) => n.tx.try_send(Ok(task)).is_ok(),
            None => false,
        }
    }

    /// Sites whose nodes are connected, hold data of `schema`, and are allowed by the job
    /// (`allowed` empty means any site), sorted by name.
    pub fn eligible(&self, schema: &str, allowed: &[String]) -> Vec<String> {
        let mut sites: Vec<String> = self
            .lock()
            .iter()
            .filter(|(site, n)| {
                n.datasets.iter().any(|d| d == schema)
                    && (allowed.is_empty() || allowed.contains(site))
            })
            .map(|(site, _)| site.clone())
            .collect();
        sites.sort();
        sites
    }

    pub fn is_connected(&self, site: &str) -> bool {
        self.lock().contains_key(site)
    }

    pub fn list(&self) -> Vec<NodeInfo> {
        let mut out: Vec<NodeInfo> = self
            .lock()
            .iter()
            .map(|(site, n)| NodeInfo {
                site: site.clone(),
                identity: n.identity.clone(),
                datasets: n.datasets.clone(),
                device: n.device.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.site.cmp(&b.site));
        out
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
