//! The events-by-job index (migration 5) on SQLite and PostgreSQL: written with each batch in
//! its statement, filled for events stored before the migration, and what a job query finds is
//! exactly the events whose subject is the job or whose payload names it at the top level.

use ring::signature::Ed25519KeyPair;
use serde_json::json;
use sqlx::AssertSqlSafe;
use tutela_audit::store::{AuditStore, EventFilter, expected_event_job_rows};
use tutela_audit::{Action, Chain, Checkpoint, Event, MerkleTree, Timestamp};

use super::store::{databases, key_pkcs8};

const LOG_ID: &str = "spiffe://test/audit";

/// 30 events: subjects job-0..2, some payloads naming a job (one with a LIKE wildcard in its
/// name, one naming it only in a nested object, one naming a non-string).
fn events() -> Vec<Event> {
    let mut chain = Chain::new();
    (0..30u64)
        .map(|i| {
            let payload = match i % 5 {
                0 => json!({"job": format!("job-{}", i % 3), "round": i}),
                1 => json!({"job": "job_1", "note": "an underscore is a LIKE wildcard"}),
                2 => json!({"nested": {"job": "job-1"}}),
                3 => json!({"job": 7}),
                _ => json!({"round": i}),
            };
            chain
                .append(
                    Timestamp::from_unix_millis(1_700_000_000_000 + i as i64).unwrap(),
                    "spiffe://test/coordinator",
                    Action::RoundCompleted,
                    format!("job-{}", (i / 10) % 3),
                    payload,
                )
                .unwrap()
        })
        .collect()
}

fn expected(events: &[Event], job: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.subject == job || e.payload.get("job").and_then(|j| j.as_str()) == Some(job))
        .map(|e| e.seq)
        .collect()
}

async fn found(store: &AuditStore, job: &str) -> Vec<u64> {
    store
        .events(&EventFilter {
            job: Some(job.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[tokio::test]
async fn job_queries_use_the_index_written_at_append_and_filled_by_the_migration() {
    for db in databases("event_jobs").await {
        let all = events();
        let store = AuditStore::open(&db.url).await.unwrap();
        // A batch on its own, then a batch with its checkpoint (one statement on PostgreSQL).
        store.insert_events(&all[..12]).await.unwrap();
        let mut tree = MerkleTree::new();
        for e in &all {
            tree.push_entry(&e.hash);
        }
        let key = Ed25519KeyPair::from_pkcs8(&key_pkcs8()).unwrap();
        let cp = Checkpoint {
            tree_size: 30,
            root: tree.root(),
            timestamp: all[29].timestamp,
            log_id: LOG_ID.into(),
        }
        .sign(&key)
        .unwrap();
        store
            .insert_events_with_checkpoint(&all[12..], &cp)
            .await
            .unwrap();
        assert_eq!(
            store.event_job_rows().await.unwrap(),
            expected_event_job_rows(&all),
            "{:?}",
            db.backend
        );
        for job in ["job-0", "job-1", "job-2", "job_1", "job-9"] {
            assert_eq!(
                found(&store, job).await,
                expected(&all, job),
                "{job} {:?}",
                db.backend
            );
        }
        // "job-1" by payload: seqs 10 (subject), 25 (payload) ... and never "job_1"'s.
        assert!(found(&store, "job-1").await.contains(&25));
        assert!(!found(&store, "job-1").await.contains(&1));
        // Limits and the other filters still apply.
        let limited = store
            .events(&EventFilter {
                job: Some("job_1".into()),
                from_seq: Some(10),
                limit: Some(2),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            limited.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![11, 16],
            "{:?}",
            db.backend
        );

        // A store from before migration 5: the index is gone, the migration fills it again.
        for s in [
            "DROP TABLE audit_event_jobs",
            "DROP TABLE audit_site_checkpoints",
            "DELETE FROM audit_schema_migrations WHERE version >= 5",
        ] {
            sqlx::query(AssertSqlSafe(s))
                .execute(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        store.pool().close().await;
        let reopened = AuditStore::open(&db.url).await.unwrap();
        assert_eq!(
            reopened.event_job_rows().await.unwrap(),
            expected_event_job_rows(&all),
            "backfill {:?}",
            db.backend
        );
        for job in ["job-0", "job-1", "job_1"] {
            assert_eq!(
                found(&reopened, job).await,
                expected(&all, job),
                "{job} {:?}",
                db.backend
            );
        }
        // The index is append-only like the log.
        let refused = sqlx::query("DELETE FROM audit_event_jobs WHERE seq = 0")
            .execute(reopened.pool())
            .await;
        assert!(refused.is_err(), "{:?}: a row left the index", db.backend);
        assert_eq!(reopened.missing_event_job_row(&all).await.unwrap(), None);
        // An owner who drops the trigger and deletes rows hides events from a job's page: the
        // check the console's verification runs names the first one missing.
        let drop_trigger = match db.backend {
            tutela_audit::store::Backend::Postgres => {
                "DROP TRIGGER audit_event_jobs_append_only ON audit_event_jobs"
            }
            tutela_audit::store::Backend::Sqlite => "DROP TRIGGER audit_event_jobs_no_delete",
        };
        for s in [
            drop_trigger,
            "DELETE FROM audit_event_jobs WHERE seq IN (21, 25)",
        ] {
            sqlx::query(AssertSqlSafe(s))
                .execute(reopened.pool())
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        assert_eq!(
            reopened.missing_event_job_row(&all).await.unwrap(),
            Some(("job_1".to_string(), 21)),
            "{:?}",
            db.backend
        );
        assert!(!found(&reopened, "job-1").await.contains(&25));
    }
}
