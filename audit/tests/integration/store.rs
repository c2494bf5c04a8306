//! The audit store and live log, run against both SQLite and PostgreSQL: each tampering is
//! detected and named, the database refuses changes, concurrent writers get a dense chain,
//! approvals with bad signatures are refused, proofs verify.
//!
//! PostgreSQL runs when `TUTELA_TEST_POSTGRES_URL` is set (`source scripts/test-postgres.sh`, which
//! the test command runs); without it each test says so and runs SQLite only.

use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use serde_json::json;
use sqlx::AssertSqlSafe;
use tutela_audit::log::{AppendError, AuditLog, LogConfig};
use tutela_audit::merkle::{leaf_hash, verify_consistency, verify_inclusion};
use tutela_audit::store::{AuditStore, Backend, EventFilter};
use tutela_audit::{Action, Chain, CheckpointVerifier, SignedCheckpoint, VerifyError, verify_log};
use tutela_protocol::identity::Principal;
use tutela_protocol::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity};

const LOG_ID: &str = "spiffe://test/audit";
const ACTOR: &str = "spiffe://test/coordinator";

pub(crate) fn key_pkcs8() -> Vec<u8> {
    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// One database per test: a fresh SQLite file, and a fresh PostgreSQL database when configured.
pub(crate) struct Db {
    pub(crate) url: String,
    pub(crate) backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) async fn databases(test: &str) -> Vec<Db> {
    let dir = tempfile::tempdir().unwrap();
    let mut out = vec![Db {
        url: AuditStore::sqlite_url(&dir.path().join("audit.db")).unwrap(),
        backend: Backend::Sqlite,
        _dir: Some(dir),
    }];
    match std::env::var("TUTELA_TEST_POSTGRES_URL") {
        Ok(base) => out.push(Db {
            url: fresh_pg_database(&base, test).await,
            backend: Backend::Postgres,
            _dir: None,
        }),
        Err(_) => eprintln!(
            "{test}: TUTELA_TEST_POSTGRES_URL is unset, so PostgreSQL is skipped (source scripts/test-postgres.sh to run it)"
        ),
    }
    out
}

async fn fresh_pg_database(base: &str, test: &str) -> String {
    sqlx::any::install_default_drivers();
    let name = format!(
        "audit_{test}_{}_{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let pool = sqlx::AnyPool::connect(base).await.unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{name}")
}

fn config(every: u64) -> LogConfig {
    let mut c = LogConfig::new(LOG_ID);
    c.checkpoint_every = every;
    c.checkpoint_interval = Duration::from_secs(3600);
    c
}

/// A log of `n` events with a checkpoint every `every`; returns the log and its public key.
async fn filled_log(url: &str, n: u64, every: u64) -> (AuditLog, Vec<u8>) {
    filled_log_with_key(url, n, every, &key_pkcs8()).await
}

async fn filled_log_with_key(url: &str, n: u64, every: u64, pkcs8: &[u8]) -> (AuditLog, Vec<u8>) {
    let store = AuditStore::open(url).await.unwrap();
    let key = Ed25519KeyPair::from_pkcs8(pkcs8).unwrap();
    let log = AuditLog::start(store, key, config(every), None)
        .await
        .unwrap();
    for i in 0..n {
        log.append(
            ACTOR,
            Action::RoundCompleted,
            format!("job-{}", i % 3),
            json!({"round": i, "participants": ["ünïcode ✓"], "metrics": {"ünïcode ✓": {"epsilon": 1.0 / (i as f64 + 3.0)}}}),
        )
        .await
        .unwrap();
    }
    let pk = log.public_key().to_vec();
    (log, pk)
}

/// The attacker with superuser rights: drops the append-only triggers first.
pub(crate) async fn drop_triggers(store: &AuditStore) {
    let statements: &[&str] = match store.backend() {
        Backend::Postgres => &[
            "DROP TRIGGER audit_events_append_only ON audit_events",
            "DROP TRIGGER audit_events_release_quarantined ON audit_events",
            "DROP TRIGGER audit_events_no_truncate ON audit_events",
            "DROP TRIGGER audit_checkpoints_append_only ON audit_checkpoints",
        ],
        Backend::Sqlite => &[
            "DROP TRIGGER audit_events_no_update",
            "DROP TRIGGER audit_events_no_delete",
            "DROP TRIGGER audit_checkpoints_no_delete",
        ],
    };
    for s in statements {
        sqlx::query(*s).execute(store.pool()).await.unwrap();
    }
}

async fn exec(store: &AuditStore, sql: &str) {
    sqlx::query(AssertSqlSafe(sql.to_string()))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn verify_store(
    store: &AuditStore,
    pk: &[u8],
    extra: &[SignedCheckpoint],
) -> Result<u64, VerifyError> {
    let events = store.all_events().await.unwrap();
    let mut cps = store.checkpoints().await.unwrap();
    cps.extend(extra.iter().cloned());
    verify_log(&events, &cps, pk).map(|r| r.events)
}

#[tokio::test]
async fn an_intact_log_verifies_and_is_checkpointed() {
    for db in databases("intact").await {
        let (log, pk) = filled_log(&db.url, 25, 10).await;
        let store = log.store().clone();
        assert_eq!(
            verify_store(&store, &pk, &[]).await,
            Ok(25),
            "{:?}",
            db.backend
        );
        let sizes: Vec<u64> = store
            .checkpoints()
            .await
            .unwrap()
            .iter()
            .map(|c| c.checkpoint.tree_size)
            .collect();
        assert_eq!(sizes, vec![10, 20], "{:?}", db.backend);
        drop(log);
        // A different key cannot take over: the stored checkpoints do not verify with it.
        let store = AuditStore::open(&db.url).await.unwrap();
        let other = Ed25519KeyPair::from_pkcs8(&key_pkcs8()).unwrap();
        let refused = AuditLog::start(store, other, config(10), None).await;
        assert!(
            refused.is_err(),
            "{:?}: a log restarted with another key must refuse",
            db.backend
        );
    }
}

#[tokio::test]
async fn a_restarted_log_continues_the_chain() {
    for db in databases("restart").await {
        let pkcs8 = key_pkcs8();
        let (log, _) = filled_log_with_key(&db.url, 12, 10, &pkcs8).await;
        drop(log);
        let (log, pk) = filled_log_with_key(&db.url, 3, 10, &pkcs8).await;
        assert_eq!(log.size(), 15);
        assert_eq!(
            verify_store(log.store(), &pk, &[]).await,
            Ok(15),
            "{:?}",
            db.backend
        );
    }
}

#[tokio::test]
async fn a_payload_edited_in_sql_is_named() {
    for db in databases("edit").await {
        let (log, pk) = filled_log(&db.url, 20, 5).await;
        let store = log.store();
        drop_triggers(store).await;
        exec(store, r#"UPDATE audit_events SET payload = '{"loss":0.01,"note":"better","round":7}' WHERE seq = 7"#).await;
        match verify_store(store, &pk, &[]).await {
            Err(VerifyError::HashMismatch { seq: 7, .. }) => {}
            other => panic!(
                "{:?}: expected a hash mismatch at seq 7, got {other:?}",
                db.backend
            ),
        }
    }
}

#[tokio::test]
async fn a_deleted_row_is_named() {
    for db in databases("delete").await {
        let (log, pk) = filled_log(&db.url, 20, 5).await;
        let store = log.store();
        drop_triggers(store).await;
        exec(store, "DELETE FROM audit_events WHERE seq = 11").await;
        assert_eq!(
            verify_store(store, &pk, &[]).await,
            Err(VerifyError::Gap {
                expected: 11,
                found: 12
            }),
            "{:?}",
            db.backend
        );
    }
}

#[tokio::test]
async fn two_swapped_rows_are_named() {
    for db in databases("swap").await {
        let (log, pk) = filled_log(&db.url, 20, 5).await;
        let store = log.store();
        drop_triggers(store).await;
        // Swap the rows' places in the order: seq 5 becomes 6 and 6 becomes 5.
        exec(store, "UPDATE audit_events SET seq = 1000000 WHERE seq = 5").await;
        exec(store, "UPDATE audit_events SET seq = 5 WHERE seq = 6").await;
        exec(store, "UPDATE audit_events SET seq = 6 WHERE seq = 1000000").await;
        match verify_store(store, &pk, &[]).await {
            Err(VerifyError::HashMismatch { seq: 5, .. }) => {}
            other => panic!("{:?}: expected seq 5 named, got {other:?}", db.backend),
        }
    }
}

#[tokio::test]
async fn a_truncated_tail_is_caught_by_the_checkpoint_a_node_holds() {
    for db in databases("truncate").await {
        let (log, pk) = filled_log(&db.url, 20, 5).await;
        // A site node saw the checkpoint of size 20 and kept it.
        let mut node = CheckpointVerifier::new(&pk, LOG_ID);
        let held = log.latest_checkpoint().unwrap();
        node.update(&held, &[]).unwrap();
        assert_eq!(held.checkpoint.tree_size, 20);
        let store = log.store();
        drop_triggers(store).await;
        // The attacker cuts the last 6 events and every checkpoint that covered them.
        exec(store, "DELETE FROM audit_events WHERE seq >= 14").await;
        exec(store, "DELETE FROM audit_checkpoints WHERE tree_size > 14").await;
        // The store alone now looks consistent...
        assert_eq!(
            verify_store(store, &pk, &[]).await,
            Ok(14),
            "{:?}",
            db.backend
        );
        // ...but not against the node's checkpoint.
        let node_cp = node.latest().unwrap().clone();
        assert_eq!(
            verify_store(store, &pk, &[node_cp]).await,
            Err(VerifyError::Truncated {
                checkpoint_size: 20,
                log_len: 14
            }),
            "{:?}",
            db.backend
        );
    }
}

#[tokio::test]
async fn a_rewritten_table_with_a_recomputed_chain_is_caught_by_the_signature() {
    for db in databases("rewrite").await {
        let (log, pk) = filled_log(&db.url, 20, 5).await;
        let store = log.store().clone();
        let original = store.all_events().await.unwrap();
        drop_triggers(&store).await;
        exec(&store, "DELETE FROM audit_events").await;
        // A fresh, internally valid chain with one payload changed at seq 8.
        let mut chain = Chain::new();
        let mut forged = Vec::new();
        for e in &original {
            let payload = if e.seq == 8 {
                json!({"round": 8, "participants": []})
            } else {
                e.payload.clone()
            };
            forged.push(
                chain
                    .append(
                        e.timestamp,
                        e.actor.clone(),
                        e.action,
                        e.subject.clone(),
                        payload,
                    )
                    .unwrap(),
            );
        }
        store.insert_events(&forged).await.unwrap();
        // The chain checks pass; the signed roots do not (size 10 is the first covering seq 8).
        match verify_store(&store, &pk, &[]).await {
            Err(VerifyError::CheckpointRootMismatch {
                tree_size: 10,
                last_good_size: Some(5),
            }) => {}
            other => panic!(
                "{:?}: expected the checkpoint of size 10 to fail, got {other:?}",
                db.backend
            ),
        }
        // Replacing the checkpoints too needs the log's key: re-signed with another, they fail.
        exec(&store, "DELETE FROM audit_checkpoints").await;
        let other_key = Ed25519KeyPair::from_pkcs8(&key_pkcs8()).unwrap();
        let mut tree = tutela_audit::MerkleTree::new();
        for e in &forged {
            tree.push_entry(&e.hash);
        }
        let fake = tutela_audit::Checkpoint {
            tree_size: 20,
            root: tree.root(),
            timestamp: forged[19].timestamp,
            log_id: LOG_ID.into(),
        }
        .sign(&other_key)
        .unwrap();
        store.insert_checkpoint(&fake).await.unwrap();
        match verify_store(&store, &pk, &[]).await {
            Err(VerifyError::CheckpointInvalid { tree_size: 20, .. }) => {}
            other => panic!("{:?}: expected a bad signature, got {other:?}", db.backend),
        }
    }
}

#[tokio::test]
async fn the_database_refuses_update_and_delete() {
    for db in databases("refuse").await {
        let pkcs8 = key_pkcs8();
        let (log, _) = filled_log_with_key(&db.url, 3, 2, &pkcs8).await;
        let store = log.store();
        // Even the owner is refused by the triggers.
        for sql in [
            "UPDATE audit_events SET subject = 'x' WHERE seq = 1",
            "DELETE FROM audit_events WHERE seq = 2",
            "UPDATE audit_checkpoints SET root = 'x'",
        ] {
            let err = sqlx::query(sql).execute(store.pool()).await;
            let msg = format!("{:?}", err.expect_err(sql));
            assert!(
                msg.contains("append-only"),
                "{:?}: {sql}: {msg}",
                db.backend
            );
        }
        if db.backend == Backend::Postgres {
            let err = sqlx::query("TRUNCATE audit_events")
                .execute(store.pool())
                .await;
            assert!(format!("{err:?}").contains("append-only"), "{err:?}");
            // The application role may INSERT and SELECT only, even with the triggers gone.
            let role = format!("audit_app_{}", rand::random::<u32>());
            exec(store, &format!("CREATE ROLE {role} LOGIN")).await;
            store.grant_append_only(&role).await.unwrap();
            drop_triggers(store).await;
            let app_url = db.url.replacen("postgres@", &format!("{role}@"), 1);
            let app = AuditStore::open(&app_url).await.unwrap();
            assert_eq!(app.count().await.unwrap(), 3);
            for sql in [
                "UPDATE audit_events SET subject = 'x' WHERE seq = 1",
                "DELETE FROM audit_events WHERE seq = 2",
                "TRUNCATE audit_events",
                "DELETE FROM audit_checkpoints",
                "DROP TABLE audit_events",
            ] {
                let err = sqlx::query(sql).execute(app.pool()).await;
                let msg = format!("{:?}", err.expect_err(sql));
                assert!(
                    msg.contains("permission denied") || msg.contains("must be owner"),
                    "{sql}: {msg}"
                );
            }
            // ...and can still append and checkpoint, through the log.
            drop(log);
            let key = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
            // With the log's own cadence (every 2): with 1, the third event, which no
            // checkpoint covers yet, would be refused as written past the service.
            let app_log = AuditLog::start(app.clone(), key, config(2), None)
                .await
                .unwrap();
            let r = app_log
                .append(
                    ACTOR,
                    Action::JobStarted,
                    "job-1",
                    json!({"spec_digest": "ab", "approvals": 0, "participants": []}),
                )
                .await
                .unwrap();
            assert_eq!(r.seq, 3);
            assert_eq!(app.count().await.unwrap(), 4);
        }
    }
}

#[tokio::test]
async fn eight_concurrent_writers_get_a_dense_valid_chain() {
    for db in databases("concurrent").await {
        let (log, pk) = filled_log(&db.url, 0, 1000).await;
        let mut tasks = Vec::new();
        for w in 0..8u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..1000u32 {
                    let r = log
                        .append(
                            format!("spiffe://test/site/s{w}/node"),
                            Action::UpdateRefused,
                            format!("job-{w}"),
                            json!({"round": i, "site": format!("s{w}"), "reason": "declined"}),
                        )
                        .await
                        .unwrap();
                    seqs.push(r.seq);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "a writer's events keep its order"
            );
            all.extend(seqs);
        }
        all.sort();
        assert_eq!(
            all,
            (0..8000).collect::<Vec<u64>>(),
            "{:?}: dense seqs",
            db.backend
        );
        let store = log.store();
        assert_eq!(
            verify_store(store, &pk, &[]).await,
            Ok(8000),
            "{:?}",
            db.backend
        );
        assert!(!store.checkpoints().await.unwrap().is_empty());
    }
}

/// A `job.proposed` payload of `digest` listing `sites`.
/// A proposal of a job listing `sites`, naming each site's `officer` the one approver.
pub(crate) fn proposal(digest: [u8; 32], sites: &[&str]) -> serde_json::Value {
    let approvers: serde_json::Map<String, serde_json::Value> = sites
        .iter()
        .map(|s| {
            (
                s.to_string(),
                json!([format!("spiffe://test/site/{s}/user/officer")]),
            )
        })
        .collect();
    json!({
        "spec_digest": hex::encode(digest),
        "code_version": "test",
        "base_model": "mlp",
        "name": "test job",
        "participants": sites,
        "approvers": approvers,
        "rounds": 3,
    })
}

/// A site officer's certificate and a signing function with its key.
pub(crate) fn officer(dir: &std::path::Path) -> (String, EcdsaKeyPair, CaDir) {
    let ca = CaDir::init(&dir.join("ca"), "test", KeyAlgorithm::EcdsaP256, 30, false).unwrap();
    let issued = ca
        .issue(
            &Principal::User {
                site: "hospital-a".into(),
                name: "officer".into(),
            },
            &LeafOptions::new(Validity::days_from_now(30)),
        )
        .unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(issued.key_pem.as_bytes()).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pem.contents,
        &SystemRandom::new(),
    )
    .unwrap();
    (issued.cert_pem, key, ca)
}

#[tokio::test]
async fn an_approval_whose_signature_does_not_verify_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _ca) = officer(dir.path());
    let digest = [7u8; 32];
    let (from, until) = (1_700_000_000_000i64, 4_000_000_000_000i64);
    let message = |job: &str, d: [u8; 32]| {
        tutela_audit::approval::policy_signed_message(job, &hex::encode(d), from, until)
    };
    let good_sig = key
        .sign(&SystemRandom::new(), &message("job-1", digest))
        .unwrap();
    let other_sig = key
        .sign(&SystemRandom::new(), &message("job-1", [8u8; 32]))
        .unwrap();
    // The legacy form: the bare 32 digest bytes, bound to no job.
    let bare_sig = key.sign(&SystemRandom::new(), &digest).unwrap();
    // The same spec's approval for another job (an identical spec resubmitted).
    let other_job_sig = key
        .sign(&SystemRandom::new(), &message("job-0", digest))
        .unwrap();
    for db in databases("approval").await {
        let (log, pk) = filled_log(&db.url, 1, 100).await;
        // The job, proposed by the coordinator with the digest the officer signs.
        log.append(
            ACTOR,
            Action::JobProposed,
            "job-1",
            proposal(digest, &["hospital-a"]),
        )
        .await
        .unwrap();
        let payload = |sig: &[u8]| {
            json!({
                "spec_digest": hex::encode(digest),
                "signature": hex::encode(sig),
                "certificate": cert,
                "site": "hospital-a",
                "signed_at_ms": from,
                "expires_at_ms": until,
            })
        };
        // The legacy bare-digest approval: without a window it is refused as such, and with
        // one its signature does not verify over the job-bound message.
        let mut legacy = payload(bare_sig.as_ref());
        legacy.as_object_mut().unwrap().remove("signed_at_ms");
        legacy.as_object_mut().unwrap().remove("expires_at_ms");
        let err = log
            .append(ACTOR, Action::JobApproved, "job-1", legacy)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("bare digest"), "{err}");
        for (what, sig) in [
            ("bare digest", &bare_sig),
            ("another job's", &other_job_sig),
        ] {
            let err = log
                .append(ACTOR, Action::JobApproved, "job-1", payload(sig.as_ref()))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("does not verify"), "{what}: {err}");
        }
        // A signature over another digest.
        let err = log
            .append(
                ACTOR,
                Action::JobApproved,
                "job-1",
                payload(other_sig.as_ref()),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, AppendError::Approval(_)), "{err}");
        assert!(err.to_string().contains("does not verify"), "{err}");
        // Right signature, wrong site claimed.
        let mut wrong_site = payload(good_sig.as_ref());
        wrong_site["site"] = json!("hospital-b");
        assert!(
            log.append(ACTOR, Action::JobApproved, "job-1", wrong_site)
                .await
                .is_err()
        );
        // No signature at all.
        assert!(
            log.append(
                ACTOR,
                Action::JobRejected,
                "job-1",
                json!({"spec_digest": hex::encode(digest)})
            )
            .await
            .is_err()
        );
        assert_eq!(
            log.store().count().await.unwrap(),
            2,
            "{:?}: nothing stored",
            db.backend
        );
        // The genuine approval is stored.
        let r = log
            .append(
                ACTOR,
                Action::JobApproved,
                "job-1",
                payload(good_sig.as_ref()),
            )
            .await
            .unwrap();
        assert_eq!(r.seq, 2);
        let approvals = log
            .store()
            .events(&EventFilter {
                action: Some(Action::JobApproved),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(approvals.len(), 1);
        assert_eq!(verify_store(log.store(), &pk, &[]).await, Ok(3));
    }
}

#[tokio::test]
async fn inclusion_and_consistency_proofs_verify_and_fail_for_a_forged_event() {
    for db in databases("proofs").await {
        let (log, pk) = filled_log(&db.url, 23, 7).await;
        let cp14 = log.checkpoint(Some(14)).await.unwrap();
        let latest = log.checkpoint(None).await.unwrap();
        assert_eq!(latest.checkpoint.tree_size, 21);
        for seq in [0u64, 6, 13] {
            let p = log.inclusion_proof(seq, Some(14)).await.unwrap();
            p.checkpoint.verify(&pk).unwrap();
            assert_eq!(p.event.compute_hash(), p.event.hash);
            verify_inclusion(
                seq,
                14,
                &leaf_hash(&p.event.hash),
                &p.path,
                &cp14.checkpoint.root,
            )
            .unwrap();
            // A forged event (edited payload, hash recomputed) is not in the signed tree.
            let mut forged = p.event.clone();
            forged.payload = json!({"round": 999});
            forged.hash = forged.compute_hash();
            assert!(
                verify_inclusion(
                    seq,
                    14,
                    &leaf_hash(&forged.hash),
                    &p.path,
                    &cp14.checkpoint.root
                )
                .is_err(),
                "{:?}: a forged event must not prove",
                db.backend
            );
        }
        assert!(
            log.inclusion_proof(20, Some(14)).await.is_err(),
            "seq 20 is not in the tree of 14"
        );
        let proof = log.consistency_proof(14, 21).unwrap();
        verify_consistency(
            14,
            21,
            &cp14.checkpoint.root,
            &latest.checkpoint.root,
            &proof,
        )
        .unwrap();
        // A node holding 14 accepts 21 through the proof, and refuses a forged root.
        let mut node = CheckpointVerifier::new(&pk, LOG_ID);
        node.update(&cp14, &[]).unwrap();
        let mut bad_root = proof.clone();
        bad_root[0][0] ^= 1;
        assert!(node.update(&latest, &bad_root).is_err());
        node.update(&latest, &proof).unwrap();
    }
}

/// The console's event search pages by keyset (`seq < cursor`, newest first) on both backends:
/// every matching event exactly once, across pages, with the filters and time bounds applied in
/// SQL.
#[tokio::test]
async fn keyset_pages_cover_every_match_once_newest_first() {
    use tutela_audit::store::PageQuery;
    for db in databases("keyset_pages").await {
        let (log, _) = filled_log(&db.url, 25, 10).await;
        let store = log.store().clone();
        // job-1's events are seqs 1, 4, ..., 22.
        let mut seen = Vec::new();
        let mut query = PageQuery {
            subject: Some("job-1".into()),
            action: Some(Action::RoundCompleted),
            actor: Some(ACTOR.into()),
            limit: 3,
            ..Default::default()
        };
        let mut pages = 0;
        loop {
            let page = store.page(&query).await.unwrap();
            pages += 1;
            assert!(page.events.len() <= 3);
            seen.extend(page.events.iter().map(|e| e.seq));
            match page.next_before_seq {
                Some(s) => query.before_seq = Some(s),
                None => break,
            }
        }
        assert_eq!(seen, vec![22, 19, 16, 13, 10, 7, 4, 1], "{:?}", db.backend);
        assert_eq!(pages, 3, "{:?}", db.backend);

        // A time range is a seq range: from seq 10's time, before seq 20's.
        let all = store.all_events().await.unwrap();
        let page = store
            .page(&PageQuery {
                since: Some(all[10].timestamp),
                until: Some(all[20].timestamp),
                limit: 500,
                ..Default::default()
            })
            .await
            .unwrap();
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        // Events sharing a millisecond with seq 10 or 20 are in or out with it.
        let expected: Vec<u64> = all
            .iter()
            .filter(|e| e.timestamp >= all[10].timestamp && e.timestamp < all[20].timestamp)
            .map(|e| e.seq)
            .rev()
            .collect();
        assert_eq!(seqs, expected, "{:?}", db.backend);
        assert!(
            seqs.contains(&10) && !seqs.contains(&20),
            "{:?}",
            db.backend
        );
        // Nothing matches: an empty page, no cursor.
        let none = store
            .page(&PageQuery {
                actor: Some("spiffe://test/nobody".into()),
                limit: 5,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(none.events.is_empty() && none.next_before_seq.is_none());
    }
}
