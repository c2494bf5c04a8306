//! The live audit log: one appender task that owns the hash chain and the Merkle tree, group
//! commit, signed checkpoints every N events or T seconds, and proofs.
//!
//! # Group commit
//! Appends arrive on a channel, each with a oneshot for its receipt. The appender takes whatever is
//! queued (up to [`LogConfig::max_batch`]), gives the events dense seqs from its [`Chain`], writes
//! them in one multi-row INSERT (one transaction), and only after COMMIT returns does it reply to
//! each caller. So a receipt means the event is durable, one writer decides the order, and
//! concurrent callers share one commit instead of paying one each.
//!
//! If the write fails, every request in the batch fails and the chain is re-read from the store
//! (a commit whose acknowledgement was lost may in fact have landed; the store decides).
//! Several service processes on one database are not supported: the primary key on `seq` makes
//! a second writer's batch fail rather than fork the chain.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::sync::{mpsc, oneshot};

use rustls_pki_types::TrustAnchor;

use crate::approval::{ApprovalError, ChainCheck};
use crate::authority::{
    Assertion, AuthorityConfigError, AuthorityError, AuthorityRules, AuthorityViolation,
    OfficerTrust, TrailState, verify_authority,
};
use crate::checkpoint::{Checkpoint, CheckpointError, SignedCheckpoint};
use crate::event::{Action, Chain, ChainError, Event, Timestamp};
use crate::merkle::{MerkleTree, ProofError};
use crate::store::{AuditStore, StoreError};
use crate::{Hash, verify_log};

/// How the log batches and checkpoints.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// The log's id in its checkpoints (`spiffe://<consortium>/audit`).
    pub log_id: String,
    /// Sign a checkpoint once this many events have been appended since the last one (1, the
    /// default: with every commit, in the same transaction).
    pub checkpoint_every: u64,
    /// …or once this much time has passed with unsigned events.
    pub checkpoint_interval: Duration,
    /// The most events written in one transaction.
    pub max_batch: usize,
    /// Who may assert `certificate.issued` and `certificate.revoked` (SPIFFE URIs; see
    /// [`crate::authority`]).
    pub ca_admins: Vec<String>,
    /// The consortium CA, against which officers' certificates in the stored trail are
    /// re-checked when the log is opened (valid at the time each event was recorded). Without
    /// it, only their signatures are.
    pub ca_roots: Option<Arc<Vec<TrustAnchor<'static>>>>,
    /// Where the log counts its appends, chain length, checkpoints and verifications (the
    /// service's registry; a scratch one by default).
    pub metrics: crate::metrics::AuditMetrics,
}

impl LogConfig {
    pub fn new(log_id: impl Into<String>) -> LogConfig {
        LogConfig {
            log_id: log_id.into(),
            checkpoint_every: 1,
            checkpoint_interval: Duration::from_secs(60),
            max_batch: crate::store::MAX_BATCH,
            ca_admins: Vec::new(),
            ca_roots: None,
            metrics: crate::metrics::AuditMetrics::unregistered(),
        }
    }
}

pub use crate::receipt::{InclusionProof, Receipt};

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("{0}")]
    Chain(#[from] ChainError),
    #[error("job approval refused: {0}")]
    Approval(#[from] ApprovalError),
    #[error("refused by the audit trail's authority rules: {0}")]
    Unauthorized(AuthorityError),
    #[error("not the payload of its action: {0}")]
    Payload(AuthorityError),
    #[error("not stored: {0}")]
    Store(String),
    #[error("the audit log is shut down")]
    Closed,
    #[error(
        "the audit log is halted: {0}; restart the service (it will refuse the log until the row is quarantined: docs/runbooks/audit-forged-row.md)"
    )]
    Halted(String),
}

/// Why the log could not start, or a proof could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the stored log does not verify, refusing to append to it: {0}")]
    Corrupt(String),
    #[error(
        "the stored log holds an event its actor may not assert, refusing to open it (and to sign any checkpoint over it): {0}"
    )]
    Unauthorized(#[from] AuthorityViolation),
    #[error("{0}")]
    Rules(#[from] AuthorityConfigError),
    #[error("{0}")]
    Chain(#[from] ChainError),
    #[error("{0}")]
    Proof(#[from] ProofError),
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("no checkpoint of size {0} was signed")]
    NoCheckpoint(u64),
    #[error("event {seq} is not covered by checkpoint size {tree_size}")]
    NotCovered { seq: u64, tree_size: u64 },
    #[error("no checkpoint has been signed yet")]
    NoCheckpointYet,
    #[error(
        "the stored log holds {count} event(s) from seq {first_seq} on that no signed checkpoint \
         covers, though this log signs one with every commit (checkpoint_every = 1): they were \
         written into the database past the service and are not signed over. Inspect them \
         (`tutela audit log --database-url URL`); only an operator who \
         vouches for them may start the service once with checkpoint_every > 1 to sign them"
    )]
    Unanchored { first_seq: u64, count: u64 },
    #[error("cannot record the quarantine of seq {from_seq} on: {why}")]
    Quarantine { from_seq: u64, why: String },
}

struct Request {
    actor: String,
    action: Action,
    subject: String,
    payload: serde_json::Value,
    reply: oneshot::Sender<Result<Receipt, AppendError>>,
}

/// What readers share with the appender: the Merkle tree of committed events and the latest
/// checkpoint.
struct Shared {
    tree: MerkleTree,
    latest: Option<SignedCheckpoint>,
}

/// A handle to the running log (cheap to clone).
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Request>,
    shared: Arc<RwLock<Shared>>,
    store: AuditStore,
    public_key: Vec<u8>,
    log_id: String,
    metrics: crate::metrics::AuditMetrics,
}

impl AuditLog {
    /// Starts the appender over `store`. At start it re-verifies the stored log against its
    /// checkpoints (refusing to extend a tampered log), re-checks every event against the
    /// authority rules and officers' signatures (refusing to open a log holding an event that
    /// entered without passing them: any checkpoint signed from now on would cover it), and
    /// rebuilds the Merkle tree. `chain_check` is the live CA and CRL that officers' certificates
    /// are checked against at append.
    pub async fn start(
        store: AuditStore,
        key: Ed25519KeyPair,
        config: LogConfig,
        chain_check: Option<ChainCheck>,
    ) -> Result<AuditLog, LogError> {
        let public_key = key.public_key().as_ref().to_vec();
        let events = store.all_events().await?;
        let checkpoints = store.checkpoints().await?;
        let verified = verify_log(&events, &checkpoints, &public_key)
            .map_err(|e| LogError::Corrupt(e.to_string()))?;
        let rules = AuthorityRules::for_log(&config.log_id, &config.ca_admins)?;
        let stored_trust = match &config.ca_roots {
            Some(roots) => OfficerTrust::CaAt(roots.clone()),
            None => OfficerTrust::SignatureOnly,
        };
        let state = verify_authority(&events, &rules, &stored_trust)?;
        // A log that signs a checkpoint with every commit (in the commit's own transaction) has
        // no acknowledged event outside a signed root. Rows past the last one were written into
        // the database past the service: the chain's plain SHA-256 binds nothing to this log's
        // key, so a writer with the app role could have chained rows under any actor. They are
        // refused, never signed over.
        if config.checkpoint_every == 1 && verified.unanchored > 0 {
            return Err(LogError::Unanchored {
                first_seq: verified.events - verified.unanchored,
                count: verified.unanchored,
            });
        }
        // Orders applied by `tutela audit quarantine apply` while the service was stopped, not
        // yet on the record: appended first, as this service, before anything else.
        let pending = crate::quarantine::apply::pending(&store, &events)
            .await
            .map_err(|e| LogError::Quarantine {
                from_seq: verified.events,
                why: e.to_string(),
            })?;
        // Readers re-check quarantine signatures against the CA at the time of the event; at
        // start the stored trust is that check (the live one may not be wired to the CA yet).
        let quarantine_trust = stored_trust.clone();
        let trust = match chain_check {
            Some(check) => OfficerTrust::Live(check),
            None => stored_trust,
        };
        let mut tree = MerkleTree::new();
        for e in &events {
            tree.push_entry(&e.hash);
        }
        let (chain, last_ts) = match events.last() {
            Some(last) => (Chain::resume(last)?, Some(last.timestamp)),
            None => (Chain::new(), None),
        };
        drop(events);
        let latest = checkpoints.last().cloned();
        let checkpointed = latest.as_ref().map_or(0, |c| c.checkpoint.tree_size);
        let shared = Arc::new(RwLock::new(Shared { tree, latest }));
        let (tx, rx) = mpsc::channel(config.max_batch.max(1) * 8);
        let log = AuditLog {
            tx,
            shared: shared.clone(),
            store: store.clone(),
            public_key,
            log_id: config.log_id.clone(),
            metrics: config.metrics.clone(),
        };
        // The stored trail verified above (the log would not open otherwise).
        config.metrics.verified(true);
        config.metrics.chain_length(chain.next_seq());
        let appender = Appender {
            store,
            key,
            config,
            chain,
            last_ts,
            shared,
            checkpointed,
            rules,
            trust,
            state,
            halted: None,
        };
        tokio::spawn(appender.run(rx));
        for order in pending {
            let from_seq = order.terms.from_seq;
            crate::quarantine::verify_signatures(
                &order,
                quarantine_trust.chain_check(Timestamp::now()).as_ref(),
            )
            .map_err(|why| LogError::Quarantine { from_seq, why })?;
            let receipt = log
                .append(
                    log.log_id.clone(),
                    Action::AuditQuarantined,
                    format!("seq/{from_seq}"),
                    crate::payload::ActionPayload::to_value(&order),
                )
                .await
                .map_err(|e| LogError::Quarantine {
                    from_seq,
                    why: e.to_string(),
                })?;
            tracing::warn!(
                seq = receipt.seq,
                from_seq,
                rows = order.terms.rows.len(),
                reason = %order.terms.reason,
                "recorded the quarantine of forged audit rows"
            );
        }
        Ok(log)
    }

    /// Appends an event and returns once it is committed. `actor` is the caller's verified
    /// identity; the event is refused unless the actor may assert it ([`crate::authority`]:
    /// approvals and rejections also need a valid signature of an officer of a site the proposed
    /// job lists, and must not be recorded already).
    pub async fn append(
        &self,
        actor: impl Into<String>,
        action: Action,
        subject: impl Into<String>,
        payload: serde_json::Value,
    ) -> Result<Receipt, AppendError> {
        let subject = subject.into();
        let started = std::time::Instant::now();
        let (reply, rx) = oneshot::channel();
        let result = match self
            .tx
            .send(Request {
                actor: actor.into(),
                action,
                subject,
                payload,
                reply,
            })
            .await
        {
            Ok(()) => rx.await.unwrap_or(Err(AppendError::Closed)),
            Err(_) => Err(AppendError::Closed),
        };
        self.metrics
            .appended(crate::metrics::AppendResult::of(&result), started.elapsed());
        result
    }

    /// The log's metrics handle.
    pub fn metrics(&self) -> &crate::metrics::AuditMetrics {
        &self.metrics
    }

    pub fn store(&self) -> &AuditStore {
        &self.store
    }

    /// The log's 32-byte Ed25519 checkpoint key.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// Committed events so far.
    pub fn size(&self) -> u64 {
        self.read().tree.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Shared> {
        // A panic while holding the lock leaves data that is still consistent (pushes are
        // single operations), so a poisoned lock is read through.
        self.shared.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn latest_checkpoint(&self) -> Option<SignedCheckpoint> {
        self.read().latest.clone()
    }

    /// The checkpoint of `tree_size`, or the latest when `tree_size` is `None`.
    pub async fn checkpoint(&self, tree_size: Option<u64>) -> Result<SignedCheckpoint, LogError> {
        match tree_size {
            None => self.latest_checkpoint().ok_or(LogError::NoCheckpointYet),
            Some(n) => self
                .store
                .checkpoint_at(n)
                .await?
                .ok_or(LogError::NoCheckpoint(n)),
        }
    }

    /// An inclusion proof for event `seq` against the checkpoint of `tree_size` (latest if None).
    pub async fn inclusion_proof(
        &self,
        seq: u64,
        tree_size: Option<u64>,
    ) -> Result<InclusionProof, LogError> {
        let checkpoint = self.checkpoint(tree_size).await?;
        let n = checkpoint.checkpoint.tree_size;
        if seq >= n {
            return Err(LogError::NotCovered { seq, tree_size: n });
        }
        let event = self
            .store
            .event(seq)
            .await?
            .ok_or(LogError::NotCovered { seq, tree_size: n })?;
        let path = self.read().tree.audit_path(seq, n)?;
        Ok(InclusionProof {
            event,
            checkpoint,
            path,
        })
    }

    /// A consistency proof from the tree of `old_size` events to that of `new_size`.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, LogError> {
        if old_size == new_size {
            return Ok(Vec::new());
        }
        Ok(self.read().tree.consistency_proof(old_size, new_size)?)
    }
}

type Pending = (
    oneshot::Sender<Result<Receipt, AppendError>>,
    Result<Receipt, AppendError>,
);

struct Appender {
    store: AuditStore,
    key: Ed25519KeyPair,
    config: LogConfig,
    chain: Chain,
    last_ts: Option<Timestamp>,
    shared: Arc<RwLock<Shared>>,
    /// The tree size of the newest signed checkpoint.
    checkpointed: u64,
    rules: AuthorityRules,
    trust: OfficerTrust,
    /// What the committed events (and the batch being written) say the rules depend on.
    state: TrailState,
    /// Set when a row this appender did not write was found in the log: nothing more is
    /// appended or signed (a checkpoint now would sign over it).
    halted: Option<String>,
}

impl Appender {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let period = self
            .config
            .checkpoint_interval
            .max(Duration::from_millis(10));
        // The first tick one period from now (a plain `interval` fires at once).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<Request> = Vec::with_capacity(self.config.max_batch);
        loop {
            tokio::select! {
                got = rx.recv_many(&mut batch, self.config.max_batch.max(1)) => {
                    if got == 0 {
                        // Every handle is gone: sign what is unsigned and stop.
                        self.checkpoint_if(|size, done| size > done).await;
                        return;
                    }
                    let replies = self.commit(std::mem::take(&mut batch)).await;
                    // Checkpoint before acknowledging, so that a caller who saw its receipt
                    // also finds the checkpoint that became due with it.
                    let every = self.config.checkpoint_every.max(1);
                    self.checkpoint_if(|size, done| size - done >= every).await;
                    for (reply, result) in replies {
                        let _ = reply.send(result);
                    }
                }
                _ = tick.tick() => {
                    self.checkpoint_if(|size, done| size > done).await;
                }
            }
        }
    }

    fn size(&self) -> u64 {
        self.chain.next_seq()
    }

    /// Writes a batch; returns each request's reply channel and result, to be sent by the caller.
    async fn commit(&mut self, requests: Vec<Request>) -> Vec<Pending> {
        if let Some(why) = &self.halted {
            return requests
                .into_iter()
                .map(|r| (r.reply, Err(AppendError::Halted(why.clone()))))
                .collect();
        }
        let saved = (self.chain.clone(), self.last_ts);
        let first_seq = self.chain.next_seq();
        let mut events = Vec::with_capacity(requests.len());
        let mut replies = Vec::with_capacity(requests.len());
        for r in requests {
            // The log is in time order: a clock that steps back appends at the last timestamp.
            let ts = match self.last_ts {
                Some(last) => Timestamp::now().max(last),
                None => Timestamp::now(),
            };
            // Checked here, in order, so that the trail state (proposals, decisions recorded)
            // includes every event before this one, those of this batch too.
            let assertion = Assertion {
                actor: &r.actor,
                action: r.action,
                subject: &r.subject,
                payload: &r.payload,
                at: ts,
            };
            let effect = match self.state.check(&self.rules, &self.trust, &assertion) {
                Ok(effect) => effect,
                Err(e) => {
                    let error = match e {
                        AuthorityError::Signature { source, .. } => AppendError::Approval(source),
                        e @ AuthorityError::MalformedPayload { .. } => AppendError::Payload(e),
                        other => AppendError::Unauthorized(other),
                    };
                    let _ = r.reply.send(Err(error));
                    continue;
                }
            };
            match self
                .chain
                .append(ts, r.actor, r.action, r.subject, r.payload)
            {
                Ok(e) => {
                    self.state.apply(e.seq, effect);
                    self.last_ts = Some(ts);
                    replies.push((r.reply, e.seq, e.hash, e.timestamp));
                    events.push(e);
                }
                Err(e) => {
                    let _ = r.reply.send(Err(AppendError::Chain(e)));
                }
            }
        }
        if events.is_empty() {
            return Vec::new();
        }
        // A checkpoint due with this batch is signed over it and stored in the same commit, so
        // that no acknowledged event sits under the hash chain alone.
        let every = self.config.checkpoint_every.max(1);
        let checkpoint = if self.size() - self.checkpointed >= every {
            self.sign_batch(&events)
        } else {
            None
        };
        let stored = match &checkpoint {
            Some(cp) => self.store.insert_events_with_checkpoint(&events, cp).await,
            None => self.store.insert_events(&events).await,
        };
        match stored {
            Ok(()) => {
                {
                    let mut shared = self.shared.write().unwrap_or_else(|p| p.into_inner());
                    for e in &events {
                        shared.tree.push_entry(&e.hash);
                    }
                    if let Some(cp) = checkpoint {
                        self.checkpointed = cp.checkpoint.tree_size;
                        shared.latest = Some(cp);
                        self.config.metrics.checkpoint_signed();
                    }
                }
                self.config.metrics.chain_length(self.size());
                replies
                    .into_iter()
                    .map(|(reply, seq, hash, timestamp)| {
                        (
                            reply,
                            Ok(Receipt {
                                seq,
                                hash,
                                timestamp,
                            }),
                        )
                    })
                    .collect()
            }
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "audit batch not stored");
                let why = e.to_string();
                (self.chain, self.last_ts) = saved;
                self.state.rollback(first_seq);
                self.resync(&events).await;
                replies
                    .into_iter()
                    .map(|(reply, ..)| (reply, Err(AppendError::Store(why.clone()))))
                    .collect()
            }
        }
    }

    /// After a failed write: continue from what the store actually holds, if what landed is the
    /// batch this appender tried to write (a commit whose acknowledgement was lost). A row it did
    /// not write (written into the database past the service) halts the log: chaining onto it
    /// would have the next checkpoint sign over a forgery.
    async fn resync(&mut self, attempted: &[Event]) {
        let last = match self.store.last_event().await {
            Ok(last) => last,
            Err(e) => {
                tracing::error!(error = %e, "cannot re-read the audit log head; keeping the in-memory chain");
                return;
            }
        };
        let Some(last) = last else { return };
        if last.seq < self.chain.next_seq() {
            return; // nothing landed beyond what we know
        }
        match Chain::resume(&last) {
            Ok(chain) => {
                let known = self.chain.next_seq();
                let landed = crate::store::EventFilter {
                    from_seq: Some(known),
                    ..Default::default()
                };
                match self.store.events(&landed).await {
                    Ok(events) => {
                        if let Some(foreign) = events
                            .iter()
                            .find(|e| !attempted.iter().any(|a| a.seq == e.seq && a.hash == e.hash))
                        {
                            let why = format!(
                                "row seq {} ({} by {}) was written into the database past the service",
                                foreign.seq, foreign.action, foreign.actor
                            );
                            tracing::error!(seq = foreign.seq, "{why}: the audit log halts");
                            self.halted = Some(why);
                            return;
                        }
                        // Events that landed are this appender's own batch: they passed the
                        // checks when they were batched.
                        for e in &events {
                            if let Err(v) = self.state.check_and_apply(&self.rules, &self.trust, e)
                            {
                                tracing::error!(error = %v, "a landed event does not pass the authority rules");
                            }
                        }
                        let mut shared = self.shared.write().unwrap_or_else(|p| p.into_inner());
                        for e in events {
                            shared.tree.push_entry(&e.hash);
                        }
                        self.chain = chain;
                        self.last_ts = Some(last.timestamp);
                        tracing::warn!(
                            next_seq = self.chain.next_seq(),
                            "audit log resynchronised from the store"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "cannot re-read event hashes"),
                }
            }
            Err(e) => tracing::error!(error = %e, "the stored head does not verify"),
        }
    }

    /// A checkpoint over the committed tree plus `events` (not yet stored), or `None` (logged)
    /// when it cannot be signed.
    fn sign_batch(&self, events: &[Event]) -> Option<SignedCheckpoint> {
        let mut frontier = {
            let shared = self.shared.read().unwrap_or_else(|p| p.into_inner());
            shared.tree.frontier().clone()
        };
        for e in events {
            frontier.push(crate::merkle::leaf_hash(&e.hash));
        }
        let cp = Checkpoint {
            tree_size: frontier.size(),
            root: frontier.root(),
            timestamp: Timestamp::now().max(self.last_ts.unwrap_or(Timestamp::now())),
            log_id: self.config.log_id.clone(),
        };
        match cp.sign(&self.key) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign an audit checkpoint");
                None
            }
        }
    }

    async fn checkpoint_if(&mut self, due: impl Fn(u64, u64) -> bool) {
        let size = self.size();
        if size == 0 || !due(size, self.checkpointed) {
            return;
        }
        let root = {
            let shared = self.shared.read().unwrap_or_else(|p| p.into_inner());
            shared.tree.root()
        };
        let cp = Checkpoint {
            tree_size: size,
            root,
            timestamp: Timestamp::now().max(self.last_ts.unwrap_or(Timestamp::now())),
            log_id: self.config.log_id.clone(),
        };
        let signed = match cp.sign(&self.key) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign an audit checkpoint");
                return;
            }
        };
        match self.store.insert_checkpoint(&signed).await {
            Ok(()) => {
                self.checkpointed = size;
                let mut shared = self.shared.write().unwrap_or_else(|p| p.into_inner());
                shared.latest = Some(signed);
                self.config.metrics.checkpoint_signed();
                tracing::debug!(tree_size = size, "audit checkpoint signed");
            }
            Err(e) => tracing::error!(error = %e, tree_size = size, "audit checkpoint not stored"),
        }
    }
}
