//! Hole (d) of the security review: a forged row (written into the database past the service)
//! stops the log; it is proven unanchored, quarantined by a signed order that the policy allows
//! (never deleted), recorded as `audit.quarantined`, and the service starts again. On SQLite and
//! PostgreSQL (`source scripts/test-postgres.sh`).

use std::sync::Arc;
use std::time::Duration;

use ring::signature::Ed25519KeyPair;
use tutela_audit::authority::{AuthorityCheck, AuthorityRules, OfficerTrust};
use tutela_audit::log::{AppendError, AuditLog, LogConfig, LogError};
use tutela_audit::payload::{AuditQuarantined, QuarantineSignature, QuarantineTerms};
use tutela_audit::quarantine::apply::{self as ops, QuarantineError};
use tutela_audit::quarantine::terms_message;
use tutela_audit::store::AuditStore;
use tutela_audit::{Action, ActionPayload, verify_log};
use tutela_policy::Authorizer;
use tutela_protocol::identity::Principal;
use tutela_protocol::pki::{CaDir, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity};

use super::authority::{completed, insert_forged};
use super::store::{databases, key_pkcs8, proposal};

const LOG_ID: &str = "spiffe://test/audit";
const COORDINATOR: &str = "spiffe://test/coordinator";
const OPERATOR: &str = "spiffe://test/operator/op";
const OFFICER: &str = "spiffe://test/site/hospital-a/user/officer";

fn trust(ca: &CaDir) -> OfficerTrust {
    OfficerTrust::ca_from_pem(&ca.ca().cert_pem()).unwrap()
}

fn config(ca: &CaDir) -> LogConfig {
    let mut c = LogConfig::new(LOG_ID);
    c.checkpoint_every = 1;
    c.checkpoint_interval = Duration::from_secs(3600);
    c.ca_roots = match trust(ca) {
        OfficerTrust::CaAt(a) => Some(a),
        _ => None,
    };
    c
}

async fn start(url: &str, pkcs8: &[u8], ca: &CaDir) -> Result<AuditLog, LogError> {
    AuditLog::start(
        AuditStore::open(url).await.unwrap(),
        Ed25519KeyPair::from_pkcs8(pkcs8).unwrap(),
        config(ca),
        None,
    )
    .await
}

fn issue(ca: &CaDir, p: Principal) -> IssuedCertificate {
    ca.issue(&p, &LeafOptions::new(Validity::days_from_now(30)))
        .unwrap()
}

fn user(ca: &CaDir, name: &str) -> IssuedCertificate {
    issue(
        ca,
        Principal::User {
            site: "hospital-a".into(),
            name: name.into(),
        },
    )
}

fn operator(ca: &CaDir, name: &str) -> IssuedCertificate {
    issue(ca, Principal::Operator { name: name.into() })
}

/// The consortium's policy: `op` may order a quarantine, `officer` is hospital-a's compliance
/// officer, one of whom must approve (the policy's job quorum, reused).
async fn authorizer(dir: &std::path::Path) -> Arc<Authorizer> {
    let model = dir.join("model.conf");
    let policy = dir.join("policy.csv");
    std::fs::write(&model, include_str!("../../../deploy/policy/model.conf")).unwrap();
    std::fs::write(
        &policy,
        format!(
            "p, operator, consortium, audit, quarantine, allow\n\
             g, {OPERATOR}, operator, consortium\n\
             g, {OFFICER}, compliance_officer, site:hospital-a\n\
             p2, site:*, compliance_officer, 1\n"
        ),
    )
    .unwrap();
    Authorizer::load(&model, &policy).await.unwrap()
}

fn signed(terms: &QuarantineTerms, by: &IssuedCertificate) -> QuarantineSignature {
    let (_, sig) = tutela_policy::approval::sign_quarantine_terms(
        &by.key_pem,
        &by.cert_pem,
        &terms_message(terms),
    )
    .unwrap();
    QuarantineSignature {
        certificate: by.cert_pem.clone(),
        signature: hex::encode(sig),
    }
}

fn order(
    terms: &QuarantineTerms,
    op: &IssuedCertificate,
    officers: &[&IssuedCertificate],
) -> AuditQuarantined {
    AuditQuarantined {
        terms: terms.clone(),
        operator: Some(signed(terms, op)),
        approvals: officers.iter().map(|o| signed(terms, o)).collect(),
        quorum: Vec::new(),
        policy_digest: String::new(),
    }
}

#[tokio::test]
async fn a_forged_row_is_quarantined_by_the_quorum_only_and_the_service_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &dir.path().join("ca"),
        "test",
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    let authz = authorizer(dir.path()).await;
    let (op, officer) = (operator(&ca, "op"), user(&ca, "officer"));
    let (intruder, clerk) = (operator(&ca, "intruder"), user(&ca, "clerk"));
    for db in databases("quarantine_forged").await {
        let pkcs8 = key_pkcs8();
        {
            let log = start(&db.url, &pkcs8, &ca).await.unwrap();
            log.append(
                COORDINATOR,
                Action::JobProposed,
                "job-1",
                proposal([7; 32], &["hospital-a"]),
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let forged = insert_forged(
            &db.url,
            &[(COORDINATOR, Action::JobCompleted, "job-1", completed())],
        )
        .await;
        let seq = forged[0];

        // The service refuses to start, naming the first forged row.
        match start(&db.url, &pkcs8, &ca).await {
            Err(
                e @ LogError::Unanchored {
                    first_seq,
                    count: 1,
                },
            ) if first_seq == seq => {
                assert!(e.to_string().contains(&format!("from seq {seq}")), "{e}");
            }
            Err(other) => panic!("{:?}: refused for another reason: {other}", db.backend),
            Ok(_) => panic!("{:?}: the forged row was opened over", db.backend),
        }

        let store = AuditStore::open(&db.url).await.unwrap();
        // A signed row can never be quarantined.
        assert!(matches!(
            ops::plan(&store, None, Some(0), "x", &["hospital-a".into()]).await,
            Err(QuarantineError::Anchored { seq: 0, .. })
        ));
        let terms = ops::plan(
            &store,
            None,
            None,
            "forged job.completed, unanchored",
            &["hospital-a".into()],
        )
        .await
        .unwrap();
        assert_eq!((terms.from_seq, terms.rows.len()), (seq, 1));
        assert_eq!(terms.rows[0].action, "job.completed");

        // Refused: an operator the policy does not allow, no officer, an officer outside the
        // quorum's role, a signature over other terms; nothing moves.
        let refusals = [
            order(&terms, &intruder, &[&officer]),
            order(&terms, &op, &[]),
            order(&terms, &op, &[&clerk]),
            order(&terms, &officer, &[&officer]),
            {
                let mut other = terms.clone();
                other.reason = "something else".into();
                let mut o = order(&terms, &op, &[&officer]);
                o.approvals = vec![signed(&other, &officer)];
                o
            },
        ];
        for (i, bad) in refusals.iter().enumerate() {
            let e = ops::apply(&store, bad, &authz, &trust(&ca), 1)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    QuarantineError::OperatorNotAllowed { .. }
                        | QuarantineError::Signature(_)
                        | QuarantineError::QuorumNotMet { .. }
                ),
                "{:?} refusal {i}: {e}",
                db.backend
            );
            assert_eq!(
                store.count().await.unwrap(),
                seq + 1,
                "{:?} refusal {i} moved rows",
                db.backend
            );
        }
        // A certificate from outside the consortium CA is refused too.
        let other_dir = tempfile::tempdir().unwrap();
        let other_ca = CaDir::init(
            &other_dir.path().join("ca"),
            "test",
            KeyAlgorithm::EcdsaP256,
            30,
            false,
        )
        .unwrap();
        let fake_officer = issue(
            &other_ca,
            Principal::User {
                site: "hospital-a".into(),
                name: "officer".into(),
            },
        );
        let e = ops::apply(
            &store,
            &order(&terms, &op, &[&fake_officer]),
            &authz,
            &trust(&ca),
            1,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, QuarantineError::Signature(_)), "{e}");

        // Review 2026-12-07: the quorum's own order, against a log that signs a checkpoint only
        // every 10 events, is refused: there an unanchored row may be a genuine event the service
        // acknowledged before it stopped (this one is chained and authorized like one), and a
        // quorum must not be able to hide it. Nothing moves.
        let e = ops::apply(
            &store,
            &order(&terms, &op, &[&officer]),
            &authz,
            &trust(&ca),
            10,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                e,
                QuarantineError::MaySignLater {
                    checkpoint_every: 10
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("checkpoint_every = 1"), "{e}");
        assert_eq!(store.count().await.unwrap(), seq + 1);

        // The quorum's order moves the row.
        let recorded = ops::apply(
            &store,
            &order(&terms, &op, &[&officer]),
            &authz,
            &trust(&ca),
            1,
        )
        .await
        .unwrap();
        assert_eq!(
            recorded.quorum,
            vec![format!("{OFFICER} (compliance_officer of site:hospital-a)")]
        );
        assert_eq!(store.count().await.unwrap(), seq);
        // Applying it again finds nothing to move.
        assert!(
            ops::apply(
                &store,
                &order(&terms, &op, &[&officer]),
                &authz,
                &trust(&ca),
                1
            )
            .await
            .is_err()
        );

        // The service starts and records the quarantine, first, as itself.
        let log = start(&db.url, &pkcs8, &ca).await.unwrap();
        // …and takes genuine events after it.
        log.append(
            COORDINATOR,
            Action::JobProposed,
            "job-2",
            proposal([8; 32], &["hospital-a"]),
        )
        .await
        .unwrap();
        drop(log);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let events = store.all_events().await.unwrap();
        let q = &events[seq as usize];
        assert_eq!(
            (q.action, q.actor.as_str(), q.subject.clone()),
            (Action::AuditQuarantined, LOG_ID, format!("seq/{seq}"))
        );
        let p = AuditQuarantined::from_event(q).unwrap();
        assert_eq!(p.terms, terms);
        // The trail after the quarantine verifies, every row anchored, and every reader's
        // authority check re-checks the quarantine's signatures.
        let report = verify_log(
            &events,
            &store.checkpoints().await.unwrap(),
            log_key(&pkcs8).as_slice(),
        )
        .unwrap();
        assert_eq!(report.unanchored, 0, "{:?}", db.backend);
        AuthorityCheck::new(AuthorityRules::for_log(LOG_ID, &[]).unwrap(), trust(&ca))
            .verify(&events)
            .unwrap();
        // A tampered quarantine record is caught by readers.
        let mut tampered = events.clone();
        let mut bad = p.clone();
        bad.terms.reason = "nothing to see".into();
        tampered[seq as usize].payload = bad.to_value();
        assert!(
            AuthorityCheck::new(AuthorityRules::for_log(LOG_ID, &[]).unwrap(), trust(&ca))
                .verify(&tampered)
                .is_err()
        );

        // The forged row is still there for forensics, exactly as stored.
        let kept = ops::quarantined_rows(&store).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (kept[0].seq, kept[0].hash.clone()),
            (seq, terms.rows[0].hash.clone())
        );
        assert!(
            kept[0].payload.contains("model_digest"),
            "{}",
            kept[0].payload
        );
        // …and the database keeps it: the quarantine and the signed rows refuse deletion.
        assert!(
            sqlx::query("DELETE FROM audit_quarantine")
                .execute(store.pool())
                .await
                .is_err()
        );
        assert!(
            sqlx::query("DELETE FROM audit_events WHERE seq = 0")
                .execute(store.pool())
                .await
                .is_err()
        );

        // Opening again records nothing twice.
        drop(start(&db.url, &pkcs8, &ca).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = store.all_events().await.unwrap();
        assert_eq!(
            again
                .iter()
                .filter(|e| e.action == Action::AuditQuarantined)
                .count(),
            1
        );
    }
}

fn log_key(pkcs8: &[u8]) -> Vec<u8> {
    use ring::signature::KeyPair as _;
    Ed25519KeyPair::from_pkcs8(pkcs8)
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec()
}

/// A row forged while the service runs: its next batch collides with it and the log halts
/// instead of chaining onto it (which would have the next checkpoint sign over it). So no genuine
/// row is ever appended after a forged one.
#[tokio::test]
async fn a_running_log_halts_at_a_row_forged_under_it_and_never_signs_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &dir.path().join("ca"),
        "test",
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    for db in databases("quarantine_running").await {
        let pkcs8 = key_pkcs8();
        let log = start(&db.url, &pkcs8, &ca).await.unwrap();
        log.append(
            COORDINATOR,
            Action::JobProposed,
            "job-1",
            proposal([7; 32], &["hospital-a"]),
        )
        .await
        .unwrap();
        let forged = insert_forged(
            &db.url,
            &[(COORDINATOR, Action::JobCompleted, "job-1", completed())],
        )
        .await;
        let first = log
            .append(
                COORDINATOR,
                Action::JobProposed,
                "job-2",
                proposal([8; 32], &["hospital-a"]),
            )
            .await;
        assert!(
            matches!(first, Err(AppendError::Store(_))),
            "{:?}: {first:?}",
            db.backend
        );
        let second = log
            .append(
                COORDINATOR,
                Action::JobProposed,
                "job-3",
                proposal([9; 32], &["hospital-a"]),
            )
            .await;
        match second {
            Err(AppendError::Halted(why)) => {
                assert!(why.contains(&format!("seq {}", forged[0])), "{why}")
            }
            other => panic!("{:?}: not halted: {other:?}", db.backend),
        }
        // Both count as failed appends: what the TutelaAuditAppendFailing alert watches.
        let text = tutela_protocol::metrics::render(&log.metrics().registry()).unwrap();
        for series in [
            "tutela_audit_appends_failed_total 2\n",
            "tutela_audit_appends_total{result=\"failed\"} 2\n",
        ] {
            assert!(text.contains(series), "{:?}: {series}{text}", db.backend);
        }
        drop(log);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let store = AuditStore::open(&db.url).await.unwrap();
        assert_eq!(
            store.count().await.unwrap(),
            forged[0] + 1,
            "{:?}: a genuine row followed the forged one",
            db.backend
        );
        assert_eq!(
            store
                .latest_checkpoint()
                .await
                .unwrap()
                .unwrap()
                .checkpoint
                .tree_size,
            forged[0]
        );
        assert!(matches!(
            start(&db.url, &pkcs8, &ca).await,
            Err(LogError::Unanchored { first_seq, count: 1 }) if first_seq == forged[0]
        ));
    }
}
