//! Files reloaded in place while a service runs: the consortium policy (coordinator, audit
//! service), TLS files, and a site's own policy (site node). One seam for all of them: each is a
//! [`Reloadable`], polled for changes by [`spawn_watcher`] and re-read on every SIGHUP by
//! [`reload_all_on_sighup`]. A file that does not load is logged at ERROR and what is in force
//! stays: a half-edited file never opens or closes anything.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// What [`Reloadable::reload`] returns: whether it changed, or why the file was not taken.
pub type ReloadFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;

/// Something read from files that can be re-read in place.
pub trait Reloadable: Send + Sync {
    /// What it is, for the log: `site policy /etc/tutela/site-policy.toml`.
    fn describe(&self) -> String;
    /// Re-reads the files; swaps the new contents in if they differ. Returns whether they did.
    /// On an error what is in force stays.
    fn reload(&self) -> ReloadFuture<'_>;
}

/// Reloads `item`, logging the outcome with `why` (`SIGHUP`, `file change`).
pub async fn reload_logged(item: &dyn Reloadable, why: &str) -> bool {
    match item.reload().await {
        Ok(changed) => {
            if changed {
                tracing::info!(what = %item.describe(), "{why}: reloaded");
            } else {
                tracing::debug!(what = %item.describe(), "{why}: unchanged");
            }
            changed
        }
        Err(e) => {
            tracing::error!(what = %item.describe(), error = %e, "{why}: reload failed; what is in force stays");
            false
        }
    }
}

/// Polls `item` every `interval` and reloads it on change (contents are compared, not mtimes,
/// which a rename-into-place can keep). Ends when the last strong reference to `item` is dropped.
pub fn spawn_watcher<T: Reloadable + 'static>(
    item: &Arc<T>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    let weak: Weak<T> = Arc::downgrade(item);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(this) = weak.upgrade() else { return };
            // Errors are logged at every poll until the file is fixed.
            if let Err(e) = this.reload().await {
                tracing::error!(what = %this.describe(), error = %e, "reload failed; what is in force stays");
            }
        }
    })
}

/// Re-reads every item of `items` on each SIGHUP.
pub fn reload_all_on_sighup(items: Vec<Arc<dyn Reloadable>>) -> std::io::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            for item in &items {
                reload_logged(item.as_ref(), "SIGHUP").await;
            }
        }
    });
    Ok(())
}

impl Reloadable for tutela_protocol::tls::ReloadingServerConfig {
    fn describe(&self) -> String {
        format!("TLS files ({})", self.files().cert.display())
    }
    fn reload(&self) -> ReloadFuture<'_> {
        Box::pin(async move {
            tutela_protocol::tls::ReloadingServerConfig::reload(self).map_err(|e| e.to_string())
        })
    }
}

impl Reloadable for crate::Authorizer {
    fn describe(&self) -> String {
        format!(
            "consortium policy {} (now {})",
            self.policy_path().display(),
            self.digest()
        )
    }
    fn reload(&self) -> ReloadFuture<'_> {
        Box::pin(async move {
            crate::Authorizer::reload(self)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
