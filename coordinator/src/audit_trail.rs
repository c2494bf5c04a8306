//! The coordinator's handle on the audit service: every state change that matters to a regulator
//! is recorded there, as the coordinator's certificate identity.
//!
//! Configured by the optional `[audit]` table of coordinator.toml (`endpoint`, `server_identity`).
//! Without it the coordinator runs and logs "audit disabled" at WARN once; events are then only
//! in the tracing log, which is not tamper-evident.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use tutela_audit::client::{AuditClient, AuditClientError};
use tutela_audit::log::Receipt;
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::tls::TlsMaterial;

pub use tutela_audit::Action;

/// The coordinator's code version for `job.proposed` / `model.published`: the package version,
/// plus `+<commit>` when the build set `TUTELA_GIT_COMMIT` (no build script provides it today).
pub fn code_version() -> String {
    match option_env!("TUTELA_GIT_COMMIT") {
        Some(c) if !c.is_empty() => format!("{}+{c}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// `[audit]` in coordinator.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit service, `HOST:PORT` (HOST must be in its certificate).
    pub endpoint: String,
    /// The identity its certificate must carry; default `spiffe://<consortium>/audit`.
    #[serde(default)]
    pub server_identity: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditTrailError {
    #[error("audit: {0}")]
    Client(#[from] AuditClientError),
    #[error("audit: server_identity {0:?} is not a SPIFFE identity: {1}")]
    BadIdentity(String, String),
    #[error("audit: {0}")]
    Tls(String),
}

/// Records events at the audit service (or, when none is configured, only in the log).
pub struct AuditTrail {
    client: Option<AuditClient>,
    warned: AtomicBool,
}

impl AuditTrail {
    /// No audit service: every record is logged at WARN ("audit disabled") once, then at DEBUG.
    pub fn disabled() -> AuditTrail {
        AuditTrail {
            client: None,
            warned: AtomicBool::new(false),
        }
    }

    /// A lazily connecting client of the configured service, over the coordinator's own TLS.
    pub fn connect(config: &AuditConfig, tls: &TlsMaterial) -> Result<AuditTrail, AuditTrailError> {
        let expect = match &config.server_identity {
            Some(s) => s
                .parse::<Identity>()
                .map_err(|e| AuditTrailError::BadIdentity(s.clone(), e.to_string()))?,
            None => Identity::new(&tls.identity.consortium, Principal::Audit)
                .map_err(|e| AuditTrailError::Tls(e.to_string()))?,
        };
        let tls = ClientTls::from_material(tls, Some(expect))
            .map_err(|e| AuditTrailError::Tls(e.to_string()))?;
        Ok(AuditTrail {
            client: Some(AuditClient::connect_lazy(&config.endpoint, tls)?),
            warned: AtomicBool::new(false),
        })
    }

    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// Records one event and waits until the audit service has committed it. `Ok(None)` when
    /// auditing is disabled. A caller that must fail closed (an approval, a policy decision)
    /// propagates the error; one that must not stop the federation logs it (see [`Self::note`]).
    pub async fn record(
        &self,
        action: Action,
        subject: &str,
        payload: serde_json::Value,
    ) -> Result<Option<Receipt>, AuditTrailError> {
        let Some(client) = &self.client else {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "audit disabled: no [audit] section in the configuration; events are only logged here"
                );
            }
            tracing::debug!(action = %action, subject, %payload, "audit event (not recorded)");
            return Ok(None);
        };
        // tonic clients are cheap clones sharing one channel.
        let mut client = client.clone();
        Ok(Some(client.append(action, subject, &payload).await?))
    }

    /// [`Self::record`] for events that must not stop the federation: a failure is logged at
    /// ERROR with the event, so that it can be replayed by an operator.
    pub async fn note(&self, action: Action, subject: &str, payload: serde_json::Value) {
        if let Err(e) = self.record(action, subject, payload.clone()).await {
            tracing::error!(error = %e, action = %action, subject, %payload, "audit event NOT recorded");
        }
    }
}
