//! How long the trail keeps its events: `[retention] min_days` of audit.toml (default 183, and
//! never less: EU AI Act Art. 19 asks for logs kept at least six months), and the guard every
//! pruning of the store goes through.
//!
//! No code path of this build drops an event: the store is append-only (its database triggers
//! refuse UPDATE and DELETE on `audit_events`, but for the quarantine of forged rows). The
//! operator's `tutela-audit prune --before DATE` asks [`prune_plan`] first: a date younger than
//! `min_days` is refused with the earliest date allowed; an older one gets the plan (how many
//! events, which seqs, up to which checkpoint), and the command says that this build keeps them
//! (see docs/reports.md, "Retention", for what dropping a prefix would need to keep the trail
//! verifiable).

use serde::Deserialize;

use crate::event::Timestamp;

/// Six months, in days, rounded up (EU AI Act Art. 19(1): "at least six months").
pub const MIN_RETENTION_DAYS: u32 = 183;

/// The longest retention accepted: 100 years.
pub const MAX_RETENTION_DAYS: u32 = 36_525;

const DAY_MS: i64 = 86_400_000;

/// `[retention]` of audit.toml.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Events younger than this many days are never dropped. At least 183.
    #[serde(default = "default_min_days")]
    pub min_days: u32,
}

fn default_min_days() -> u32 {
    MIN_RETENTION_DAYS
}

impl Default for RetentionConfig {
    fn default() -> RetentionConfig {
        RetentionConfig {
            min_days: MIN_RETENTION_DAYS,
        }
    }
}

impl RetentionConfig {
    /// `min_days` against the range deploy/config/audit.toml documents.
    pub fn check_ranges(&self) -> Result<(), tutela_protocol::config_range::OutOfRange> {
        tutela_protocol::config_range::in_range(
            "retention.min_days",
            self.min_days,
            MIN_RETENTION_DAYS,
            MAX_RETENTION_DAYS,
        )
    }

    /// The youngest instant events may be dropped before, at `now`.
    pub fn earliest_kept(&self, now: Timestamp) -> Timestamp {
        let ms = now
            .unix_millis()
            .saturating_sub(i64::from(self.min_days) * DAY_MS);
        Timestamp::from_unix_millis(ms).unwrap_or(now)
    }
}

/// Why a prune is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error(
        "refusing to prune before {before}: events younger than [retention] min_days = {min_days} days must be kept (EU AI Act Art. 19: at least six months); the latest --before allowed now is {earliest_kept}"
    )]
    TooYoung {
        before: Timestamp,
        min_days: u32,
        earliest_kept: Timestamp,
    },
}

/// What pruning before a date would drop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunePlan {
    pub before: Timestamp,
    /// Events older than `before`: seqs `0..events` (the trail's timestamps never go back, so
    /// they are a prefix).
    pub events: u64,
    /// The largest signed checkpoint whose tree lies inside the prefix, if any.
    pub covered_by_checkpoint: Option<u64>,
}

/// Refuses `before` when it is younger than `retention` allows at `now`.
pub fn check_before(
    before: Timestamp,
    now: Timestamp,
    retention: &RetentionConfig,
) -> Result<(), RetentionError> {
    let earliest_kept = retention.earliest_kept(now);
    if before > earliest_kept {
        return Err(RetentionError::TooYoung {
            before,
            min_days: retention.min_days,
            earliest_kept,
        });
    }
    Ok(())
}

/// The plan of pruning `store` before `before` at `now`, or why not.
#[cfg(feature = "server")]
pub async fn prune_plan(
    store: &crate::store::AuditStore,
    before: Timestamp,
    now: Timestamp,
    retention: &RetentionConfig,
) -> Result<PrunePlan, PruneError> {
    check_before(before, now, retention)?;
    let events = match store.first_seq_at_or_after(before).await? {
        Some(seq) => seq,
        None => store.count().await?,
    };
    let covered_by_checkpoint = store
        .checkpoints()
        .await?
        .iter()
        .map(|c| c.checkpoint.tree_size)
        .filter(|n| *n <= events)
        .max();
    Ok(PrunePlan {
        before,
        events,
        covered_by_checkpoint,
    })
}

/// Why a prune plan could not be made.
#[cfg(feature = "server")]
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("{0}")]
    Retention(#[from] RetentionError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(d: i64) -> Timestamp {
        Timestamp::from_unix_millis(1_800_000_000_000 + d * DAY_MS).unwrap()
    }

    #[test]
    fn younger_than_min_days_is_refused_with_the_latest_date_allowed() {
        let r = RetentionConfig::default();
        let now = day(1000);
        assert!(check_before(day(1000 - 183), now, &r).is_ok());
        assert!(check_before(day(0), now, &r).is_ok());
        let e = check_before(day(1000 - 182), now, &r).unwrap_err();
        assert_eq!(
            e,
            RetentionError::TooYoung {
                before: day(1000 - 182),
                min_days: 183,
                earliest_kept: day(1000 - 183),
            }
        );
        assert!(e.to_string().contains("min_days = 183"), "{e}");
    }

    #[test]
    fn less_than_six_months_is_not_a_valid_setting() {
        let short = RetentionConfig { min_days: 90 };
        let e = short.check_ranges().unwrap_err().to_string();
        assert!(e.contains("retention.min_days"), "{e}");
        assert!(RetentionConfig { min_days: 365 }.check_ranges().is_ok());
        let parsed: RetentionConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, RetentionConfig::default());
    }
}
