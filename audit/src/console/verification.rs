//! The overview's answer to "is the trail intact": the whole stored log re-verified (hashes,
//! links, sequence numbers, every checkpoint's signature and root: [`verify_log`]) and re-checked
//! against the authority rules and officers' signatures ([`AuthorityCheck`]), periodically and
//! from the store, not from the appender's memory, so that a row edited in the database under the
//! running service shows as broken at the next run, naming the first bad row.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::event::Timestamp;
use crate::verify::{VerifyError, verify_log};

use super::ConsoleState;

/// What a verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerificationOutcome {
    /// Every event and checkpoint verified and every event passed the authority rules.
    Intact {
        events: u64,
        checkpoints: usize,
        /// Events after the newest checkpoint.
        unanchored: u64,
    },
    /// The first thing wrong, with the first bad row's seq when one is named.
    Broken {
        first_bad_seq: Option<u64>,
        what: String,
    },
    /// The store could not be read.
    Unreadable { what: String },
}

/// One run of the verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    pub finished_at: Timestamp,
    pub took: Duration,
    pub outcome: VerificationOutcome,
}

/// The newest verification, shared by the verifier task and the pages.
#[derive(Default)]
pub(crate) struct Latest(RwLock<Option<Verification>>);

impl Latest {
    pub(crate) fn get(&self) -> Option<Verification> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, v: Verification) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }
}

/// The seq a [`VerifyError`] names as the first bad row, when it names one.
pub fn first_bad_seq(e: &VerifyError) -> Option<u64> {
    match e {
        VerifyError::Gap { expected, .. } => Some(*expected),
        VerifyError::OutOfOrder { expected, .. } => Some(*expected),
        VerifyError::HashMismatch { seq, .. }
        | VerifyError::LinkBroken { seq, .. }
        | VerifyError::TimestampWentBack { seq, .. } => Some(*seq),
        VerifyError::Truncated { log_len, .. } => Some(*log_len),
        VerifyError::CheckpointRootMismatch { last_good_size, .. } => {
            Some(last_good_size.unwrap_or(0))
        }
        VerifyError::CheckpointInvalid { .. } | VerifyError::MixedLogs { .. } => None,
    }
}

/// Verifies the stored trail now and keeps the result.
pub(crate) async fn run(state: &ConsoleState) -> Verification {
    let started = Instant::now();
    let outcome = check(state).await;
    let v = Verification {
        finished_at: Timestamp::now(),
        took: started.elapsed(),
        outcome,
    };
    match &v.outcome {
        VerificationOutcome::Intact { .. } => state.log.metrics().verified(true),
        VerificationOutcome::Broken { .. } => state.log.metrics().verified(false),
        // Not a verdict on the trail: the gauge keeps the last one.
        VerificationOutcome::Unreadable { .. } => {}
    }
    match &v.outcome {
        VerificationOutcome::Intact { events, .. } => {
            tracing::debug!(
                events,
                took_ms = v.took.as_millis() as u64,
                "console: trail verified"
            )
        }
        VerificationOutcome::Broken { what, .. } => {
            tracing::error!(%what, "console: the stored trail does not verify")
        }
        VerificationOutcome::Unreadable { what } => {
            tracing::error!(%what, "console: the stored trail could not be read")
        }
    }
    state.verification.set(v.clone());
    v
}

async fn check(state: &ConsoleState) -> VerificationOutcome {
    let store = state.log.store();
    let read = async {
        Ok::<_, crate::store::StoreError>((store.all_events().await?, store.checkpoints().await?))
    };
    let (events, checkpoints) = match read.await {
        Ok(x) => x,
        // A row that cannot even be parsed is a broken trail at that row.
        Err(crate::store::StoreError::BadRow { seq, problem }) => {
            return VerificationOutcome::Broken {
                first_bad_seq: u64::try_from(seq).ok(),
                what: format!("row seq {seq} is unreadable: {problem}"),
            };
        }
        Err(e) => {
            return VerificationOutcome::Unreadable {
                what: e.to_string(),
            };
        }
    };
    let report = match verify_log(&events, &checkpoints, state.log.public_key()) {
        Ok(r) => r,
        Err(e) => {
            return VerificationOutcome::Broken {
                first_bad_seq: first_bad_seq(&e),
                what: e.to_string(),
            };
        }
    };
    if let Err(v) = state.check.verify(&events) {
        return VerificationOutcome::Broken {
            first_bad_seq: Some(v.seq),
            what: format!(
                "seq {} ({} by {}) breaks the authority rules: {}",
                v.seq, v.action, v.actor, v.error
            ),
        };
    }
    // The events-by-job index is not evidence, but a row missing from it would hide an event
    // from a job's page. (A row too many only proposes a candidate that readers then reject:
    // e.g. one left by a forged row that was quarantined.)
    match store.missing_event_job_row(&events).await {
        Ok(None) => {}
        Ok(Some((job, seq))) => {
            return VerificationOutcome::Broken {
                first_bad_seq: Some(seq),
                what: format!(
                    "the events-by-job index lacks seq {seq} of job {job:?}: the job's page would not show it"
                ),
            };
        }
        Err(e) => {
            return VerificationOutcome::Unreadable {
                what: e.to_string(),
            };
        }
    }
    VerificationOutcome::Intact {
        events: report.events,
        checkpoints: report.checkpoints,
        unanchored: report.unanchored,
    }
}

/// Re-verifies every `every`, starting now.
pub(crate) fn spawn(state: Arc<ConsoleState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            run(&state).await;
        }
    })
}
