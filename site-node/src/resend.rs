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
//!
//! A re-send is free only because the round's spend was charged when it was trained, so it is
//! sent only while that charge is durable ([`check_spend_durable`]): in the ledger and, on a node
//! with an audit trail, recorded there. A ledger deleted while the trail was down (the charge
//! neither anchored nor on disk any more) would otherwise let the update out with its spend
//! recorded nowhere; instead the kept update is dropped and the round is trained again, charged
//! afresh (the dropped update never left the site, so it cost nothing).

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
    /// The ledger charge `(round, attempt)` the training made, when it charged one.
    pub charge: Option<(u32, u32)>,
}

/// Whether `released` may be sent again: its round's charge must still be in the dataset's
/// `ledger` and, when the node keeps an audit trail (`trail`), recorded there (anchored). The
/// error says which is missing; the caller drops the update and the round is trained afresh.
pub fn check_spend_durable(
    released: &ReleasedUpdate,
    ledger: &tutela_privacy::ledger::Ledger,
    trail: bool,
) -> Result<(), String> {
    let Some((round, attempt)) = released.charge else {
        return Ok(());
    };
    match ledger.charge(&released.job_id, round, attempt) {
        None => Err(format!(
            "the privacy ledger no longer holds the charge of job {} round {round} attempt \
             {attempt} (deleted or rolled back before it was recorded in the audit trail): the \
             update kept for a re-send is dropped and the round is trained again, charged afresh",
            released.job_id
        )),
        Some(c) if trail && c.anchored_seq.is_none() => Err(format!(
            "the charge of job {} round {round} attempt {attempt} is not yet recorded in the audit \
             trail: the update is not sent again until it is",
            released.job_id
        )),
        Some(_) => Ok(()),
    }
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

    /// Drops the update of `job`'s `round` on `global_model_id`, if it is the one kept.
    pub fn forget(&self, job: &str, round: u32, global_model_id: &str) {
        let mut last = self.lock();
        if last.as_ref().is_some_and(|u| {
            u.job_id == job && u.round == round && u.global_model_id == global_model_id
        }) {
            *last = None;
        }
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
            charge: None,
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

    fn released(charge: Option<(u32, u32)>) -> ReleasedUpdate {
        ReleasedUpdate {
            job_id: "j".into(),
            round: 2,
            global_model_id: "m".into(),
            update: Vec::new(),
            metadata: BTreeMap::new(),
            charge,
        }
    }

    /// The hole of the 2026-11 review, (c): a round trained while the trail was down (its charge
    /// in the ledger, not anchored), the ledger then deleted. The re-send must not go out: the
    /// charge is in neither the ledger nor the trail. With the charge in the ledger but not yet
    /// anchored it waits for the trail; anchored, it is sent; a node without a trail needs the
    /// ledger's charge only.
    #[test]
    fn a_resend_goes_out_only_while_its_charge_is_in_the_ledger_and_the_trail() {
        use tutela_privacy::accountant::SampledGaussian;
        use tutela_privacy::ledger::Ledger;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let mechanism = SampledGaussian::new(0.1, 1.1, 10).unwrap();
        let mut ledger = Ledger::open(&path, "d", None).unwrap();
        ledger
            .record_round("j", (2, 1), mechanism, Some(100), 1)
            .unwrap();
        let update = released(Some((2, 1)));
        let why = check_spend_durable(&update, &ledger, true).unwrap_err();
        assert!(why.contains("not yet recorded in the audit trail"), "{why}");
        check_spend_durable(&update, &ledger, false)
            .expect("no trail: the ledger's charge is enough");
        ledger.mark_anchored("j", (2, 1), 7).unwrap();
        check_spend_durable(&update, &ledger, true).expect("charged and anchored");
        // Another attempt's charge does not stand for this one.
        assert!(check_spend_durable(&released(Some((2, 2))), &ledger, true).is_err());
        // The ledger deleted: an empty ledger holds no charge, whatever the trail says.
        std::fs::remove_file(&path).unwrap();
        let empty = Ledger::open(&path, "d", None).unwrap();
        for trail in [true, false] {
            let why = check_spend_durable(&update, &empty, trail).unwrap_err();
            assert!(why.contains("no longer holds the charge"), "{why}");
        }
        // A round that charged nothing has nothing to lose.
        check_spend_durable(&released(None), &empty, true).unwrap();
    }

    #[test]
    fn a_dropped_update_is_no_longer_resent() {
        let cache = ResendCache::default();
        cache.keep(released(Some((2, 1))));
        cache.forget("j", 2, "other");
        assert!(cache.holds("j", 2, "m"));
        cache.forget("j", 2, "m");
        assert!(!cache.holds("j", 2, "m"));
    }
}
