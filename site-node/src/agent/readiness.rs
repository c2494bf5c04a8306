//! Which of the site's tables are ready, re-checked until they are, and announced when that
//! changes.
//!
//! At start every table is read once through the data check ([`crate::data_check`]); one that
//! fails (a PostgreSQL source that is down, a file with bad rows) is kept here as *not ready*
//! instead of being dropped. The agent re-checks the tables that are not ready on an exponential
//! backoff with a cap (`[recheck]` in node.toml, [`spawn_rechecks`]) and at once on SIGHUP (this
//! is a [`Reloadable`], registered with the site policy through the same
//! `tutela_policy::reload::reload_all_on_sighup`). When the set of ready tables changes, the
//! session announces the new set to the coordinator (`Connect` again, see `worker::Session`);
//! a table whose source fails when a task first reads it becomes not ready again
//! ([`TableReadiness::mark_unreadable`]) and is withdrawn the same way.
//!
//! What leaves the site is only the dataset names the coordinator already knows from
//! `Connect`; the problems a check found (which may quote a value or a path) stay in the site's
//! log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock, Weak};

use tokio::sync::{Notify, watch};
use tutela_policy::reload::{ReloadFuture, Reloadable};

use super::Backoff;
use crate::data_check;
use crate::dataset::SiteDataset;

/// The site's tables and which of them are ready. See the module documentation.
pub struct TableReadiness {
    tables: BTreeMap<String, Arc<SiteDataset>>,
    ready: RwLock<BTreeSet<String>>,
    /// Bumped whenever the ready set changes: the session re-announces.
    changed: watch::Sender<u64>,
    /// Wakes the re-check loop when a table becomes not ready (its backoff starts over).
    wake: Arc<Notify>,
}

impl std::fmt::Debug for TableReadiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableReadiness")
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .field("ready", &self.ready_names())
            .finish()
    }
}

impl TableReadiness {
    /// Every table ready, unchecked (tests and gates built in code).
    pub fn all_ready(tables: BTreeMap<String, Arc<SiteDataset>>) -> Self {
        let ready = tables.keys().cloned().collect();
        Self::with_ready(tables, ready)
    }

    /// Runs the data check on every table now (it reads each whole table); those that fail are
    /// logged with every problem and kept as not ready.
    pub fn checked_at_start(tables: BTreeMap<String, Arc<SiteDataset>>) -> Self {
        let ready = tables
            .iter()
            .filter(|(_, t)| data_check::passes_at_start(t))
            .map(|(name, _)| name.clone())
            .collect();
        Self::with_ready(tables, ready)
    }

    fn with_ready(tables: BTreeMap<String, Arc<SiteDataset>>, ready: BTreeSet<String>) -> Self {
        TableReadiness {
            tables,
            ready: RwLock::new(ready),
            changed: watch::channel(0).0,
            wake: Arc::default(),
        }
    }

    fn ready_set(&self) -> std::sync::RwLockReadGuard<'_, BTreeSet<String>> {
        self.ready.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The table of this name, if it is ready.
    pub fn ready(&self, name: &str) -> Option<Arc<SiteDataset>> {
        self.ready_set()
            .contains(name)
            .then(|| self.tables.get(name).cloned())
            .flatten()
    }

    /// Whether the site has a table of this name, ready or not.
    pub fn is_configured(&self, name: &str) -> bool {
        self.tables.contains_key(name)
    }

    /// The names of the ready tables, sorted.
    pub fn ready_names(&self) -> Vec<String> {
        self.ready_set().iter().cloned().collect()
    }

    /// The names of the tables that are not ready, sorted.
    pub fn not_ready_names(&self) -> Vec<String> {
        let ready = self.ready_set();
        self.tables
            .keys()
            .filter(|n| !ready.contains(*n))
            .cloned()
            .collect()
    }

    /// A receiver that sees a change whenever the ready set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn set_ready(&self, name: &str, ready: bool) -> bool {
        let changed = {
            let mut set = self.ready.write().unwrap_or_else(|p| p.into_inner());
            if ready {
                set.insert(name.to_string())
            } else {
                set.remove(name)
            }
        };
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
        changed
    }

    /// Re-checks every table that is not ready (reading each whole: blocking); those that pass
    /// become ready. Returns whether any did.
    pub fn recheck(&self) -> bool {
        let mut any = false;
        for name in self.not_ready_names() {
            let Some(table) = self.tables.get(&name) else {
                continue;
            };
            if data_check::passes_at_start(table) && self.set_ready(&name, true) {
                tracing::info!(dataset = %name, "dataset ready now: announcing it to the coordinator");
                any = true;
            }
        }
        any
    }

    /// A task could not read `name` from its source: it is withdrawn from the coordinator and
    /// re-checked like a table that failed at start.
    pub fn mark_unreadable(&self, name: &str) {
        if self.set_ready(name, false) {
            tracing::warn!(dataset = %name, "dataset not readable: withdrawn from the coordinator until a re-check passes");
            self.wake.notify_one();
        }
    }
}

impl Reloadable for TableReadiness {
    fn describe(&self) -> String {
        format!("datasets not ready ({})", self.not_ready_names().join(", "))
    }

    fn reload(&self) -> ReloadFuture<'_> {
        Box::pin(async move {
            // The check reads whole tables (a PostgreSQL query runs on a thread of its own): off
            // the runtime's worker where the runtime allows it.
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            Ok(if multi_thread {
                tokio::task::block_in_place(|| self.recheck())
            } else {
                self.recheck()
            })
        })
    }
}

/// How long the re-check loop sleeps, with nothing to re-check, before it looks whether the
/// agent is gone.
const IDLE_LOOK: std::time::Duration = std::time::Duration::from_secs(60);

/// Re-checks the tables that are not ready after each of `backoff`'s delays; the backoff starts
/// over whenever a table becomes not ready. Ends once the readiness is dropped.
pub fn spawn_rechecks(
    readiness: &Arc<TableReadiness>,
    mut backoff: Backoff,
) -> tokio::task::JoinHandle<()> {
    let weak: Weak<TableReadiness> = Arc::downgrade(readiness);
    let wake = readiness.wake.clone();
    tokio::spawn(async move {
        loop {
            let pending = match weak.upgrade() {
                Some(this) => !this.not_ready_names().is_empty(),
                None => return,
            };
            let delay = if pending {
                backoff.next_delay()
            } else {
                IDLE_LOOK
            };
            let woken = tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                _ = wake.notified() => true,
            };
            if woken {
                // A table was just withdrawn: its first re-check comes after the initial delay.
                backoff.reset();
                continue;
            }
            let Some(this) = weak.upgrade() else { return };
            if pending {
                tutela_policy::reload::reload_logged(this.as_ref(), "re-check").await;
            }
        }
    })
}
