//! The leader lease of coordinators sharing one PostgreSQL database (`store::lease`): one holder
//! among contenders, renewal only by the holder, takeover of an expired lease at the next epoch,
//! and fencing: a write of a leader whose lease was taken over writes nothing. On SQLite the
//! lease is refused, saying why. The PostgreSQL cases need `TUTELA_TEST_POSTGRES_URL`.

use std::time::Duration;

use tutela_coordinator::job::JobState;
use tutela_coordinator::store::{Fence, LeaseOutcome, Store, StoreError};

use crate::store::{TestDb, for_each_backend, open, record, running_job};

const TTL: Duration = Duration::from_secs(30);

/// Whether the case runs here: on SQLite it checks the refusal instead and returns false.
async fn postgres_only(db: &TestDb, store: &Store) -> bool {
    if db.label == "postgres" {
        return true;
    }
    let err = store
        .acquire_lease("a", None, TTL, None)
        .await
        .expect_err("no lease on SQLite");
    assert!(
        matches!(err, StoreError::LeaseNeedsPostgres { .. })
            && err.to_string().contains("needs PostgreSQL"),
        "{err}"
    );
    false
}

#[tokio::test]
async fn one_of_two_contenders_gets_the_lease_and_only_it_renews() {
    for_each_backend("lease_contenders", async |db: &TestDb| {
        let store = open(db).await;
        if !postgres_only(db, &store).await {
            return;
        }
        // Two coordinators trying at the same instant, on their own pools.
        let other = open(db).await;
        let (a, b) = tokio::join!(
            store.acquire_lease("a", Some("c1:7443"), TTL, None),
            other.acquire_lease("b", Some("c2:7443"), TTL, None),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let (winner, loser, loser_outcome) = match (&a, &b) {
            (
                LeaseOutcome::Leader {
                    epoch: 1,
                    taken: true,
                },
                LeaseOutcome::Follower { .. },
            ) => ("a", "b", b.clone()),
            (
                LeaseOutcome::Follower { .. },
                LeaseOutcome::Leader {
                    epoch: 1,
                    taken: true,
                },
            ) => ("b", "a", a.clone()),
            other => panic!("exactly one leader at epoch 1: {other:?}"),
        };
        let LeaseOutcome::Follower { leader } = loser_outcome else {
            unreachable!()
        };
        assert_eq!(leader.instance_id, winner);
        assert_eq!(leader.epoch, 1);
        assert!(leader.address.is_some());
        // The holder renews at its epoch; the other stays a follower while it is valid, even
        // claiming to hold epoch 1.
        assert_eq!(
            store
                .acquire_lease(winner, None, TTL, Some(1))
                .await
                .unwrap(),
            LeaseOutcome::Leader {
                epoch: 1,
                taken: false
            }
        );
        assert!(matches!(
            store
                .acquire_lease(loser, None, TTL, Some(1))
                .await
                .unwrap(),
            LeaseOutcome::Follower { .. }
        ));
        // The holder restarted (it no longer knows its epoch) waits its old lease out too.
        assert!(matches!(
            store.acquire_lease(winner, None, TTL, None).await.unwrap(),
            LeaseOutcome::Follower { .. }
        ));
    })
    .await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_at_the_next_epoch_and_the_old_holder_becomes_a_follower() {
    for_each_backend("lease_expiry", async |db: &TestDb| {
        let store = open(db).await;
        if !postgres_only(db, &store).await {
            return;
        }
        let short = Duration::from_millis(400);
        assert_eq!(
            store.acquire_lease("a", None, short, None).await.unwrap(),
            LeaseOutcome::Leader {
                epoch: 1,
                taken: true
            }
        );
        assert!(matches!(
            store.acquire_lease("b", None, short, None).await.unwrap(),
            LeaseOutcome::Follower { .. }
        ));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            store.acquire_lease("b", None, TTL, None).await.unwrap(),
            LeaseOutcome::Leader {
                epoch: 2,
                taken: true
            }
        );
        // The old holder, waking up: its epoch is gone.
        let LeaseOutcome::Follower { leader } =
            store.acquire_lease("a", None, TTL, Some(1)).await.unwrap()
        else {
            panic!("the old holder must not renew a lease taken over");
        };
        assert_eq!((leader.instance_id.as_str(), leader.epoch), ("b", 2));
        // A clean stop hands the lease over at once.
        store.release_lease("b", 2).await.unwrap();
        assert_eq!(
            store.acquire_lease("a", None, TTL, None).await.unwrap(),
            LeaseOutcome::Leader {
                epoch: 3,
                taken: true
            }
        );
    })
    .await;
}

/// A leader paused past its lease wakes up after another coordinator took it: its round, its
/// job state change and its attempt are refused and nothing of them is written; the new leader's
/// writes go through.
#[tokio::test]
async fn a_paused_old_leader_that_wakes_up_cannot_write_a_round() {
    for_each_backend("lease_fencing", async |db: &TestDb| {
        let plain = open(db).await;
        if !postgres_only(db, &plain).await {
            return;
        }
        let job = running_job(&plain).await;
        let short = Duration::from_millis(300);
        let (fence_a, fence_b) = (Fence::default(), Fence::default());
        let (old, new) = (plain.fenced(fence_a.clone()), plain.fenced(fence_b.clone()));

        // A follower (no epoch) writes nothing.
        let err = old
            .complete_round(&job, 1, 1, &record(1))
            .await
            .expect_err("a follower writes nothing");
        assert!(
            matches!(err, StoreError::NotLeader { .. }) && err.is_fenced(),
            "{err}"
        );

        let LeaseOutcome::Leader { epoch, .. } =
            plain.acquire_lease("a", None, short, None).await.unwrap()
        else {
            panic!("a takes the lease")
        };
        fence_a.set(epoch);
        old.complete_round(&job, 1, 1, &record(1)).await.unwrap();
        assert!(old.still_leader().await.unwrap());

        // a pauses; its lease expires; b takes it over.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let LeaseOutcome::Leader { epoch: b_epoch, .. } =
            plain.acquire_lease("b", None, TTL, None).await.unwrap()
        else {
            panic!("b takes the expired lease")
        };
        assert_eq!(b_epoch, epoch + 1);
        fence_b.set(b_epoch);

        // a wakes up, still believing it leads.
        assert!(!old.still_leader().await.unwrap());
        let err = old
            .complete_round(&job, 2, 1, &record(2))
            .await
            .expect_err("the old leader's round is fenced");
        assert!(
            matches!(err, StoreError::Fenced { epoch: e, current, ref holder, .. }
                if e == epoch && current == b_epoch && holder == "b"),
            "{err}"
        );
        assert!(err.to_string().contains("nothing was written"), "{err}");
        let err = old
            .record_failed_attempt(&job, 2, 1, "late")
            .await
            .expect_err("fenced");
        assert!(err.is_fenced(), "{err}");
        let err = old
            .set_job_state(&job, JobState::Running, JobState::Failed, Some("stale"))
            .await
            .expect_err("fenced");
        assert!(err.is_fenced(), "{err}");
        let err = old
            .replicate_file("model:x", b"stale")
            .await
            .expect_err("fenced");
        assert!(err.is_fenced(), "{err}");

        // Nothing of it is there: the job is running at round 1 with one attempt recorded.
        let j = plain.get_job(&job).await.unwrap().unwrap();
        assert_eq!((j.state, j.current_round), (JobState::Running, 1));
        assert_eq!(plain.failed_attempts(&job, 2).await.unwrap(), 0);
        assert_eq!(plain.replicated_file("model:x").await.unwrap(), None);

        // The new leader goes on from there.
        new.complete_round(&job, 2, 1, &record(2)).await.unwrap();
        new.replicate_file("model:y", b"bytes").await.unwrap();
        assert_eq!(
            plain.replicated_file("model:y").await.unwrap().as_deref(),
            Some(&b"bytes"[..])
        );
        let rounds: Vec<u32> = plain
            .rounds(&job)
            .await
            .unwrap()
            .iter()
            .map(|r| r.round)
            .collect();
        assert_eq!(rounds, [1, 2]);
    })
    .await;
}
