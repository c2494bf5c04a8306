//! The coordinator's handle on the audit service: every state change that matters to a regulator
//! is recorded there, as the coordinator's certificate identity.
//!
//! Configured by the `[audit]` table of coordinator.toml (`endpoint`, `server_identity`), which
//! is required: only `insecure_no_audit = true` on a loopback listener (a development setup)
//! runs without it, [`AuditTrail::disabled`], warning at start; events are then only in the
//! tracing log, which is not tamper-evident.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tutela_audit::Event;
use tutela_audit::client::{AuditClient, AuditClientError};
use tutela_audit::filter::EventFilter;
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
    /// With `[ha]`: this coordinator no longer holds the leader lease, so the event is the new
    /// leader's to record (it records each once: `record_once` looks first).
    #[error("audit: not appended: this coordinator is not the leader")]
    NotLeader,
    /// With `[ha]`: whether this coordinator still holds the lease could not be read.
    #[error("audit: not appended: the leader lease could not be checked: {0}")]
    LeaseCheck(String),
}

/// The longest wait between two tries of a durable append.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Records events at the audit service (or, when none is configured, only in the log).
pub struct AuditTrail {
    client: Option<AuditClient>,
    /// The coordinator's identity: the actor of its events, whose own events it reads back
    /// (`audit, read_own`) to append each one once.
    identity: String,
    warned: AtomicBool,
    /// The longest wait between two tries of a durable append.
    max_backoff: Duration,
    /// With `[ha]`: the fenced job store, asked before every append whether this coordinator
    /// still holds the leader lease (an old leader that woke up must not append what the new
    /// leader records).
    leader: std::sync::OnceLock<crate::store::Store>,
}

impl AuditTrail {
    /// No audit service: every record is logged at WARN ("audit disabled") once, then at DEBUG.
    pub fn disabled() -> AuditTrail {
        AuditTrail {
            client: None,
            identity: String::new(),
            warned: AtomicBool::new(false),
            max_backoff: MAX_BACKOFF,
            leader: std::sync::OnceLock::new(),
        }
    }

    /// A lazily connecting client of the configured service, over the coordinator's own TLS.
    pub fn connect(config: &AuditConfig, tls: &TlsMaterial) -> Result<AuditTrail, AuditTrailError> {
        Ok(AuditTrail {
            client: Some(config.connect_lazy(tls)?),
            identity: tls.identity.uri(),
            warned: AtomicBool::new(false),
            max_backoff: MAX_BACKOFF,
            leader: std::sync::OnceLock::new(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// Appends only while `store`'s leader lease is this coordinator's (`[ha]`; see
    /// [`crate::store::Store::still_leader`]).
    pub fn only_while_leader(&self, store: crate::store::Store) {
        let _ = self.leader.set(store);
    }

    /// Whether this coordinator may append now: always without `[ha]`.
    async fn check_leader(&self) -> Result<(), AuditTrailError> {
        let Some(store) = self.leader.get() else {
            return Ok(());
        };
        match store.still_leader().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuditTrailError::NotLeader),
            Err(e) => Err(AuditTrailError::LeaseCheck(e.to_string())),
        }
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
        self.check_leader().await?;
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

    /// [`Self::record_payload`] unless this coordinator's events of the same action and subject
    /// already include it (`is_it`): one look, then one append, failing closed on either (for
    /// a caller that answers a request and must not wait for the service).
    pub async fn record_payload_unless_present<P: ActionPayload>(
        &self,
        subject: &str,
        payload: &P,
        is_it: impl Fn(&Event) -> bool,
    ) -> Result<(), AuditTrailError> {
        if let Some(client) = &self.client {
            let mut client = client.clone();
            if self.find(&mut client, P::ACTION, subject, &is_it).await? {
                return Ok(());
            }
        }
        self.record_payload(subject, payload).await.map(|_| ())
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

/// Durable appends: what the federation does is recorded before it goes on.
impl AuditTrail {
    /// Records one engine event and returns only once the audit service has committed it: while
    /// the service cannot be reached the caller (a job's runner) waits, retrying, so no round
    /// starts, completes or publishes off the record. Before each retry it looks for the event in
    /// the trail (an append whose answer was lost may have been committed), so the event is
    /// recorded once. A refusal by the service (a malformed event, a denied action) stops the
    /// caller the same way, logged at ERROR with the event at every try.
    pub async fn note_durably(&self, action: Action, subject: &str, payload: serde_json::Value) {
        // Compared as canonical text: a float that is a whole number (3.0) reads back from the
        // trail as an integer (3), which `Value`'s equality would call different.
        let same = tutela_audit::canonical_json(&payload);
        self.record_once(action, subject, payload, false, move |e| {
            tutela_audit::canonical_json(&e.payload) == same
        })
        .await;
    }

    /// [`Self::note_durably`] with a typed payload under its own action.
    pub async fn note_payload_durably<P: ActionPayload>(&self, subject: &str, payload: &P) {
        self.note_durably(P::ACTION, subject, payload.to_value())
            .await
    }

    /// [`Self::record_once`] with a typed payload under its own action.
    pub async fn record_payload_once<P: ActionPayload>(
        &self,
        subject: &str,
        payload: &P,
        look_first: bool,
        is_it: impl Fn(&Event) -> bool,
    ) {
        self.record_once(P::ACTION, subject, payload.to_value(), look_first, is_it)
            .await
    }

    /// [`Self::note_durably`] for an event that may be in the trail already (one the store
    /// committed before a crash): `is_it` recognises it among this coordinator's events of the
    /// same action and subject; `look_first` checks before the first try too.
    pub async fn record_once(
        &self,
        action: Action,
        subject: &str,
        payload: serde_json::Value,
        look_first: bool,
        is_it: impl Fn(&Event) -> bool,
    ) {
        let Some(client) = &self.client else {
            let _ = self.record(action, subject, payload).await;
            return;
        };
        let mut client = client.clone();
        let mut look = look_first;
        let mut delay = Duration::from_millis(100);
        let mut waiting_since: Option<std::time::Instant> = None;
        loop {
            match self.check_leader().await {
                Ok(()) => {}
                Err(AuditTrailError::NotLeader) => {
                    tracing::warn!(action = %action, subject, "not the leader any more: the event is left to the new leader, which records it once");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, action = %action, subject, "cannot tell whether this coordinator is still the leader: waiting before appending");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_backoff);
                    continue;
                }
            }
            let outcome = async {
                if look {
                    match self.find(&mut client, action, subject, &is_it).await {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) if is_outage(&e) => return Err(e),
                        // A policy without `audit, read_own` for the coordinator: the event is
                        // appended all the same (at least once rather than never).
                        Err(e) => tracing::warn!(error = %e, action = %action, subject, "cannot read this coordinator's own events back, so the event is appended without checking that it is there already"),
                    }
                }
                client.append(action, subject, &payload).await.map(|_| ())
            }
            .await;
            match outcome {
                Ok(()) => {
                    if let Some(since) = waiting_since {
                        tracing::info!(action = %action, subject, waited_secs = since.elapsed().as_secs_f64(), "audit trail back: event recorded");
                    }
                    return;
                }
                // A refusal (the policy no longer lets this coordinator write, a payload the
                // service will not take) is not skipped either: going on would train, aggregate
                // or publish off the record. The job waits, saying why at every try, until an
                // operator fixes the policy or the service.
                Err(e) if !is_outage(&e) => {
                    tracing::error!(error = %e, action = %action, subject, %payload, "audit event refused by the audit service: the job waits until it can be recorded (nothing goes on off the record)");
                    waiting_since.get_or_insert_with(std::time::Instant::now);
                    look = true;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_backoff);
                }
                Err(e) => {
                    if waiting_since.is_none() {
                        tracing::error!(error = %e, action = %action, subject, "the audit trail cannot record this event: waiting for it (nothing goes on off the record)");
                        waiting_since = Some(std::time::Instant::now());
                    }
                    look = true;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_backoff);
                }
            }
        }
    }

    /// Whether this coordinator's events of `action` on `subject` include one `is_it` accepts.
    async fn find(
        &self,
        client: &mut AuditClient,
        action: Action,
        subject: &str,
        is_it: &impl Fn(&Event) -> bool,
    ) -> Result<bool, AuditClientError> {
        let events = client
            .query(&EventFilter {
                actor: Some(self.identity.clone()),
                action: Some(action),
                subject: Some(subject.to_string()),
                ..Default::default()
            })
            .await?;
        Ok(events.iter().any(is_it))
    }

    /// The rounds of `subject` (a job) among this coordinator's `round.completed` events; `None`
    /// without an audit service.
    pub async fn recorded_rounds(
        &self,
        subject: &str,
    ) -> Result<Option<std::collections::BTreeSet<u32>>, AuditTrailError> {
        let Some(client) = &self.client else {
            return Ok(None);
        };
        let mut client = client.clone();
        let events = client
            .query(&EventFilter {
                actor: Some(self.identity.clone()),
                action: Some(Action::RoundCompleted),
                subject: Some(subject.to_string()),
                ..Default::default()
            })
            .await?;
        Ok(Some(events.iter().filter_map(round_of).collect()))
    }
}

/// The round a `round.completed` event records.
pub fn round_of(event: &Event) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct RoundKey {
        round: u32,
    }
    serde_json::from_value::<RoundKey>(event.payload.clone())
        .ok()
        .map(|k| k.round)
}

/// Whether an append failed because the service could not be reached or answered (retry), as
/// opposed to refusing the event (do not).
pub fn is_outage(e: &AuditClientError) -> bool {
    match e {
        AuditClientError::Rpc(s) => !matches!(
            s.code(),
            tonic::Code::InvalidArgument
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::FailedPrecondition
                | tonic::Code::AlreadyExists
        ),
        AuditClientError::Connect(_) => true,
        AuditClientError::Config(_)
        | AuditClientError::Wire(_)
        | AuditClientError::Checkpoint(_) => false,
    }
}
