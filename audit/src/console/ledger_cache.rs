//! What the sites page is built from, derived once per event instead of once per request: the
//! privacy spends, de-identification reports and job targets, each read, decoded and checked
//! against the authority rules when it first enters the trail, then kept.
//!
//! # What is re-checked when
//! - An event is checked against the authority rules (a `privacy.spent` or de-identification
//!   report is believed only from its own site's node) once, when the cache first reads it. The
//!   answer cannot change later: for these actions the rules look at the event alone (its actor
//!   and the site its payload names), not at other events or at time.
//! - On every request the cache reads only the events appended since its head, and first checks
//!   that its head is still there: the stored event just below its head must have the hash it
//!   had when read (one row by primary key). If it does not (rows were quarantined and their
//!   seqs reused, or the database was replaced), the cache is rebuilt from the store.
//! - Whether the stored trail as a whole is intact is the overview's periodic verification, as
//!   before; the sites page never claimed more than "only believed events are drawn".

use std::collections::{BTreeMap, VecDeque};

use tokio::sync::Mutex;

use crate::Hash;
use crate::authority::AuthorityCheck;
use crate::event::{Action, Event, Timestamp};
use crate::payload::privacy::PrivacySpent;
use crate::payload::{ActionPayload, JobProposed};
use crate::store::{AuditStore, StoreError};

/// The most events of each kind kept (the newest): what one page draws.
pub const EVENTS_KEPT: usize = 20_000;

/// A believed privacy spend.
#[derive(Clone, Debug)]
pub struct Spend {
    pub seq: u64,
    pub timestamp: Timestamp,
    pub spent: PrivacySpent,
}

/// The derived ledger, as of `next_seq`.
#[derive(Default)]
pub struct Ledger {
    /// The first seq not read yet, and the hash of the event just below it.
    head: Option<(u64, Hash)>,
    /// Each job's target ε, from its proposal (its signed spec).
    pub targets: BTreeMap<String, f64>,
    /// Believed spends, oldest first.
    pub spends: VecDeque<Spend>,
    /// Believed `dataset.deidentified` events, oldest first.
    pub deidentified: VecDeque<Event>,
    /// Believed `dataset.text_deidentified` events, oldest first.
    pub text_deidentified: VecDeque<Event>,
}

/// The cache: one ledger behind a lock, so that concurrent requests extend it once.
#[derive(Default)]
pub struct LedgerCache(Mutex<Ledger>);

impl LedgerCache {
    /// The ledger brought up to the log's committed size `size`, for `f` to read.
    pub async fn with<R>(
        &self,
        store: &AuditStore,
        check: &AuthorityCheck,
        size: u64,
        f: impl FnOnce(&Ledger) -> R,
    ) -> Result<R, StoreError> {
        let mut ledger = self.0.lock().await;
        ledger.extend(store, check, size).await?;
        Ok(f(&ledger))
    }
}

fn push_trimmed<T>(q: &mut VecDeque<T>, items: impl IntoIterator<Item = T>) {
    q.extend(items);
    while q.len() > EVENTS_KEPT {
        q.pop_front();
    }
}

impl Ledger {
    async fn extend(
        &mut self,
        store: &AuditStore,
        check: &AuthorityCheck,
        size: u64,
    ) -> Result<(), StoreError> {
        match self.head {
            Some((next, below)) => {
                let still_there = next == 0
                    || store
                        .event(next - 1)
                        .await?
                        .is_some_and(|e| e.hash == below);
                if !still_there {
                    tracing::warn!(
                        seq = next.saturating_sub(1),
                        "console: the stored trail changed under the sites cache; rebuilding it"
                    );
                    *self = Ledger::default();
                } else if next >= size {
                    return Ok(());
                }
            }
            // Never built, or the last build found no head: start from nothing.
            None => *self = Ledger::default(),
        }
        let from = self.head.map_or(0, |(next, _)| next);
        if size <= from {
            return Ok(());
        }
        let limit = EVENTS_KEPT as u32;
        // Only events its site's node may assert count; the rules need no other event for them.
        let believed = |events: Vec<Event>| {
            let flagged: std::collections::BTreeSet<u64> = check
                .violations(&events)
                .into_iter()
                .map(|v| v.seq)
                .collect();
            events
                .into_iter()
                .filter(|e| !flagged.contains(&e.seq))
                .collect::<Vec<_>>()
        };
        for e in store
            .events_of_between(Action::JobProposed, from, size, limit)
            .await?
        {
            if let Ok(p) = JobProposed::from_event(&e)
                && let Ok(spec) =
                    serde_json::from_value::<tutela_protocol::job::PrivacySpec>(p.privacy)
                && let Some(t) = spec.target_epsilon
            {
                self.targets.insert(e.subject.clone(), t);
            }
        }
        let spends = believed(
            store
                .events_of_between(Action::PrivacySpent, from, size, limit)
                .await?,
        );
        push_trimmed(
            &mut self.spends,
            spends.into_iter().filter_map(|e| {
                let spent = PrivacySpent::from_event(&e).ok()?;
                Some(Spend {
                    seq: e.seq,
                    timestamp: e.timestamp,
                    spent,
                })
            }),
        );
        let deid = believed(
            store
                .events_of_between(Action::DatasetDeidentified, from, size, limit)
                .await?,
        );
        push_trimmed(&mut self.deidentified, deid);
        let text = believed(
            store
                .events_of_between(Action::TextDatasetDeidentified, from, size, limit)
                .await?,
        );
        push_trimmed(&mut self.text_deidentified, text);
        // The head: the event just below `size`, as stored now.
        self.head = match store.event(size - 1).await? {
            Some(e) => Some((size, e.hash)),
            None => None,
        };
        Ok(())
    }
}
