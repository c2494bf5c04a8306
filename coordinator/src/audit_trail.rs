//! The coordinator's handle on the audit service: every state change that matters to a regulator
//! is recorded there, as the coordinator's certificate identity.
//!
//! Configured by the optional `[audit]` table of coordinator.toml (`endpoint`, `server_identity`).
//! Without it the coordinator runs and logs "audit disabled" at WARN once; events are then only
//! in the tracing log, which is not tamper-evident.

use std::sync::atomic::{AtomicBool, Ordering};

use tutela_audit::client::{AuditClient, AuditClientError};
use tutela_audit::log::Receipt;
use tutela_audit::payload::ActionPayload;
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

/// `[audit]` in coordinator.toml (`endpoint`, `server_identity`): the same table as a node's,
/// less the node's pinned checkpoint key.
pub type AuditConfig = tutela_audit::client::AuditEndpoint;

#[derive(Debug, thiserror::Error)]
pub enum AuditTrailError {
    #[error("audit: {0}")]
    Client(#[from] AuditClientError),
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
        Ok(AuditTrail {
            client: Some(config.connect_lazy(tls)?),
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

    /// [`Self::record`] of a typed payload: its action is the payload's.
    pub async fn record_payload<P: ActionPayload>(
        &self,
        subject: &str,
        payload: &P,
    ) -> Result<Option<Receipt>, AuditTrailError> {
        self.record(P::ACTION, subject, payload.to_value()).await
    }

    /// [`Self::note`] of a typed payload: its action is the payload's.
    pub async fn note_payload<P: ActionPayload>(&self, subject: &str, payload: &P) {
        self.note(P::ACTION, subject, payload.to_value()).await
    }

    /// [`Self::record`] for events that must not stop the federation: a failure is logged at
    /// ERROR with the event, so that it can be replayed by an operator.
    pub async fn note(&self, action: Action, subject: &str, payload: serde_json::Value) {
        if let Err(e) = self.record(action, subject, payload.clone()).await {
            tracing::error!(error = %e, action = %action, subject, %payload, "audit event NOT recorded");
        }
    }
}
