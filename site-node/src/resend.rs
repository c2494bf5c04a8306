//! A round's released update, kept so that the node can send it again instead of training again.
//!
//! A coordinator that resumes after a crash restarts the round it was in, and a failed attempt
//! is retried: each time the node is asked to train the same round on the same global model.
//! Training again would release a second DP-SGD update of the same data and charge ε twice. The
//! update already released is the same mechanism's output for that round; sending it again is
//! post-processing and costs nothing. So the node keeps its last update (before the update
//! filters, which run again on a re-send) with the (job, round, global model) it answers, and the
//! gate turns such a task into [`crate::agent::Work::Resend`].
//!
//! The update is kept in memory only: after a node restart it is gone, and a retrain is then
//! admitted only within the job's target ε ([`crate::ledger`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::weights::NamedTensors;

/// The metadata keys of an update that belong to one task and are written afresh on a re-send.
const PER_TASK_KEYS: [&str; 1] = [tutela_protocol::federation::meta::TASK];

/// What a round produced, as uploaded.
#[derive(Debug, Clone)]
pub struct ReleasedUpdate {
    pub job_id: String,
    pub round: u32,
    pub global_model_id: String,
    /// The update before the update filters.
    pub update: NamedTensors,
    /// Its metadata (samples, metrics, ε of the round), less the task id.
    pub metadata: BTreeMap<String, String>,
}

/// The node's last released update.
#[derive(Debug, Default)]
pub struct ResendCache {
    last: Mutex<Option<ReleasedUpdate>>,
}

impl ResendCache {
    /// Whether an update of `job`'s `round` on `global_model_id` was released already.
    pub fn holds(&self, job: &str, round: u32, global_model_id: &str) -> bool {
        self.lock().as_ref().is_some_and(|u| {
            u.job_id == job && u.round == round && u.global_model_id == global_model_id
        })
    }

    /// The released update of `job`'s `round` on `global_model_id`, if kept.
    pub fn get(&self, job: &str, round: u32, global_model_id: &str) -> Option<ReleasedUpdate> {
        self.lock()
            .as_ref()
            .filter(|u| u.job_id == job && u.round == round && u.global_model_id == global_model_id)
            .cloned()
    }

    /// Keeps `update` (replacing the previous one: a node answers one round at a time).
    pub fn keep(&self, mut update: ReleasedUpdate) {
        for k in PER_TASK_KEYS {
            update.metadata.remove(k);
        }
        *self.lock() = Some(update);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ReleasedUpdate>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_job_round_and_global_model_is_resent() {
        let cache = ResendCache::default();
        assert!(!cache.holds("j", 3, "m"));
        cache.keep(ReleasedUpdate {
            job_id: "j".into(),
            round: 3,
            global_model_id: "m".into(),
            update: Vec::new(),
            metadata: BTreeMap::from([
                (
                    tutela_protocol::federation::meta::TASK.to_string(),
                    "t1".to_string(),
                ),
                ("tutela.samples".to_string(), "10".to_string()),
            ]),
        });
        assert!(cache.holds("j", 3, "m"));
        assert!(!cache.holds("j", 4, "m"));
        assert!(!cache.holds("j", 3, "other-model"));
        assert!(!cache.holds("k", 3, "m"));
        let kept = cache.get("j", 3, "m").unwrap();
        assert_eq!(
            kept.metadata.len(),
            1,
            "the task id is written afresh on a re-send"
        );
    }
}
