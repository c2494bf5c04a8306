//! The compliance officers' web console: the trail, approvals, budgets and lineage in a browser.
//!
//! `tutela-audit` serves it on its own HTTPS port (`[console] listen` in audit.toml; off when the
//! table is absent), with the gRPC listener's TLS configuration: TLS 1.3, a client certificate
//! chained to the consortium CA and not revoked (the same CRL, reloaded the same way; a live
//! connection is cut when its certificate is revoked), the principal read from the certificate by
//! the same code ([`tutela_protocol::server::authenticate`]). A connection without a certificate
//! never gets past the handshake.
//!
//! Every request is decided before any page is built, by the same casbin policy as the `Audit`
//! service's `Query`: the caller's identity must be allowed `audit, read` in its home domain
//! (officers and auditors by the shipped policy). Anyone else gets 403 with a page naming their
//! identity and the rule that refused them. The console is read-only: it answers GET and HEAD
//! only, and no route writes to the store or the log.
//!
//! Pages are server-rendered with askama templates (`audit/templates/console/`), compiled into
//! the binary and checked at build time against typed view-models ([`views`]) built from the
//! store and the log, never from JSON read back by key. No JavaScript; the one stylesheet is
//! embedded; charts and the lineage graph are inline SVG drawn on the server. The CSP allows
//! nothing else (`default-src 'none'`), so a page works offline and loads nothing from anywhere.

pub(crate) mod format;
mod http;
pub mod ledger_cache;
pub(crate) mod svg;
mod verification;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tutela_policy::Authorizer;
use tutela_protocol::tls::ReloadingServerConfig;

use crate::authority::{AuthorityCheck, AuthorityRules, OfficerTrust};
use crate::log::AuditLog;

pub use format::parse_time;
pub use http::serve;
pub use verification::{Verification, VerificationOutcome};

/// `[console]` of audit.toml. Absent: no console.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// HTTPS address of the console, `HOST:PORT` (not the gRPC port).
    pub listen: SocketAddr,
    /// How often the whole trail is re-verified for the overview page, in seconds.
    #[serde(default = "default_verify_interval")]
    pub verify_interval_secs: u64,
    /// Events per page of the event search.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

fn default_verify_interval() -> u64 {
    300
}
fn default_page_size() -> u32 {
    50
}

impl ConsoleConfig {
    /// Every value against the range deploy/config/audit.toml documents.
    pub fn check_ranges(&self) -> Result<(), tutela_protocol::config_range::OutOfRange> {
        use tutela_protocol::config_range::{MAX_PERIOD_SECS, in_range};
        in_range(
            "console.verify_interval_secs",
            self.verify_interval_secs,
            1,
            MAX_PERIOD_SECS,
        )?;
        in_range(
            "console.page_size",
            self.page_size,
            1,
            crate::store::page::MAX_PAGE,
        )?;
        Ok(())
    }
}

/// What every page is built from: the live log (its store, checkpoints and proofs), who is
/// believed (the authority rules and the consortium CA), the policy, and the last verification.
pub struct ConsoleState {
    pub(crate) log: AuditLog,
    pub(crate) check: AuthorityCheck,
    pub(crate) authorizer: Option<Arc<Authorizer>>,
    pub(crate) verification: verification::Latest,
    /// What the sites page is built from, derived once per event.
    pub(crate) ledger: ledger_cache::LedgerCache,
    pub(crate) page_size: u32,
    /// `[retention] min_days`, set once by the server at start: what reports state.
    pub retention_min_days: std::sync::OnceLock<u32>,
}

impl ConsoleState {
    /// The console over `log`, believing events by `rules` and officers' certificates chained to
    /// `trust`; `authorizer` decides who may read (`None`: `insecure_no_policy`).
    pub fn new(
        log: AuditLog,
        rules: AuthorityRules,
        trust: OfficerTrust,
        authorizer: Option<Arc<Authorizer>>,
        page_size: u32,
    ) -> Arc<ConsoleState> {
        Arc::new(ConsoleState {
            log,
            check: AuthorityCheck::new(rules, trust),
            authorizer,
            verification: verification::Latest::default(),
            ledger: ledger_cache::LedgerCache::default(),
            page_size: page_size.clamp(1, crate::store::page::MAX_PAGE),
            retention_min_days: std::sync::OnceLock::new(),
        })
    }

    /// Verifies the trail now and keeps the result for the overview.
    pub async fn verify_now(&self) -> Verification {
        verification::run(self).await
    }

    /// The live log the pages read.
    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// Brings the sites page's derived ledger up to the log's head (what the first request of
    /// the page would do).
    pub async fn warm_ledger(&self) -> Result<(), crate::store::StoreError> {
        self.ledger
            .with(self.log.store(), &self.check, self.log.size(), |_| ())
            .await
    }

    /// The last verification, if one has finished.
    pub fn last_verification(&self) -> Option<Verification> {
        self.verification.get()
    }
}

/// Starts the console's periodic verification and serves it on `listener` until `shutdown`.
pub async fn run(
    state: Arc<ConsoleState>,
    verify_every: Duration,
    listener: tokio::net::TcpListener,
    tls: Arc<ReloadingServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let verifier = verification::spawn(state.clone(), verify_every);
    // The sites page's ledger is derived from the whole newest window once; do it before the
    // first officer asks.
    let warm = state.clone();
    tokio::spawn(async move {
        if let Err(e) = warm.warm_ledger().await {
            tracing::warn!(error = %e, "console: could not derive the sites ledger at start");
        }
    });
    let result = serve(state, listener, tls, shutdown).await;
    verifier.abort();
    result
}
