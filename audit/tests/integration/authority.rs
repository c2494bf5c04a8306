//! Who may assert what, on SQLite and PostgreSQL: a node's or an operator's forged actions are
//! refused at append and nothing is stored; approvals need a proposal with their digest, an
//! officer of a site the job lists, and are never recorded twice; the same forgeries written
//! straight into the database (with the hash chain recomputed, as the application's role can)
//! are named by seq by the readers, the report does not believe them, and the log refuses to
//! reopen over them rather than sign a checkpoint covering them. The typed payloads round-trip
//! and refuse unknown fields.

use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::json;
use tutela_audit::authority::{
    Authority, AuthorityCheck, AuthorityError, AuthorityRules, OfficerTrust,
};
use tutela_audit::lineage::{ReportFormat, job_record, render_report};
use tutela_audit::log::{AppendError, AuditLog, LogConfig, LogError};
use tutela_audit::payload::{
    ActionPayload, CertificateRevoked, JobApproved, JobCompleted, JobProposed, PayloadError,
    RoundCompleted, SiteRoundMetrics, TextDatasetDeidentified, UpdateRefused,
};
use tutela_audit::store::AuditStore;
use tutela_audit::{Action, Chain, Event, Timestamp, verify_log};
use tutela_protocol::pki::CaDir;

use super::store::{databases, key_pkcs8, officer, proposal};

const LOG_ID: &str = "spiffe://test/audit";
const COORDINATOR: &str = "spiffe://test/coordinator";
const NODE: &str = "spiffe://test/site/hospital-a/node";
const OPERATOR: &str = "spiffe://test/operator/op";
const CA_ADMIN: &str = "spiffe://test/operator/ca-admin";
const OFFICER: &str = "spiffe://test/site/hospital-a/user/officer";
const JOB: &str = "job-1";
const DIGEST: [u8; 32] = [7u8; 32];
const MODEL: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn anchors(ca: &CaDir) -> Arc<Vec<rustls_pki_types::TrustAnchor<'static>>> {
    match OfficerTrust::ca_from_pem(&ca.ca().cert_pem()).unwrap() {
        OfficerTrust::CaAt(a) => a,
        _ => unreachable!(),
    }
}

fn config(ca: &CaDir) -> LogConfig {
    let mut c = LogConfig::new(LOG_ID);
    c.checkpoint_every = 1;
    c.checkpoint_interval = Duration::from_secs(3600);
    c.ca_admins = vec![CA_ADMIN.to_string()];
    c.ca_roots = Some(anchors(ca));
    c
}

fn check(ca: &CaDir) -> AuthorityCheck {
    AuthorityCheck::new(
        AuthorityRules::for_log(LOG_ID, &[CA_ADMIN.to_string()]).unwrap(),
        OfficerTrust::CaAt(anchors(ca)),
    )
}

async fn start(url: &str, pkcs8: &[u8], ca: &CaDir) -> Result<AuditLog, LogError> {
    let store = AuditStore::open(url).await.unwrap();
    AuditLog::start(
        store,
        Ed25519KeyPair::from_pkcs8(pkcs8).unwrap(),
        config(ca),
        None,
    )
    .await
}

/// The officer's approval of `job` at `digest`, signed over the job-bound approval message.
fn approval(cert: &str, key: &EcdsaKeyPair, job: &str, digest: [u8; 32]) -> serde_json::Value {
    let (from, until) = (1_700_000_000_000, 4_000_000_000_000);
    let message =
        tutela_audit::approval::policy_signed_message(job, &hex::encode(digest), from, until);
    let sig = key.sign(&SystemRandom::new(), &message).unwrap();
    JobApproved {
        spec_digest: hex::encode(digest),
        signature: hex::encode(sig.as_ref()),
        certificate: cert.to_string(),
        site: Some("hospital-a".into()),
        officer: Some(OFFICER.into()),
        signed_at_ms: Some(from),
        expires_at_ms: Some(until),
    }
    .to_value()
}

pub(crate) fn completed() -> serde_json::Value {
    JobCompleted {
        model_digest: MODEL.into(),
        rounds: 1,
        epsilon: [("hospital-a".to_string(), 1.0)].into(),
    }
    .to_value()
}

fn round() -> serde_json::Value {
    json!({"round": 1, "participants": ["hospital-a"], "update_digests": {"hospital-a": "ab"}})
}

fn published() -> serde_json::Value {
    json!({"job": JOB, "model_digest": MODEL, "spec_digest": hex::encode(DIGEST), "rounds": 1, "code_version": "x"})
}

fn revoked() -> serde_json::Value {
    CertificateRevoked {
        serial: "01".into(),
        reason: "keyCompromise".into(),
        crl_number: 2,
    }
    .to_value()
}

fn registered() -> serde_json::Value {
    json!({"site": "hospital-a", "node_version": "forged"})
}

/// What a node's certificate tried in the field: its job's end, a round, a published model, a
/// revocation and a registration, for a job still proposed.
fn node_forgeries() -> Vec<(Action, &'static str, serde_json::Value)> {
    vec![
        (Action::JobCompleted, JOB, completed()),
        (Action::RoundCompleted, JOB, round()),
        (Action::ModelPublished, MODEL, published()),
        (
            Action::CertificateRevoked,
            "spiffe://test/site/hospital-b/node",
            revoked(),
        ),
        (
            Action::NodeRegistered,
            "spiffe://test/site/hospital-b/node",
            registered(),
        ),
    ]
}

fn unauthorized(r: Result<tutela_audit::log::Receipt, AppendError>) -> AuthorityError {
    match r {
        Err(AppendError::Unauthorized(e)) => e,
        other => panic!("expected a refusal by the authority rules, got {other:?}"),
    }
}

#[tokio::test]
async fn forged_actions_are_refused_at_append_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ca) = officer(dir.path());
    for db in databases("authority_append").await {
        let log = start(&db.url, &key_pkcs8(), &ca).await.unwrap();
        log.append(
            COORDINATOR,
            Action::JobProposed,
            JOB,
            proposal(DIGEST, &["hospital-a"]),
        )
        .await
        .unwrap();
        for (action, subject, payload) in node_forgeries() {
            let e = unauthorized(log.append(NODE, action, subject, payload).await);
            let text = e.to_string();
            assert!(
                matches!(e, AuthorityError::NotAllowed { .. }),
                "{action}: {text}"
            );
            let rule = Authority::of(action).rule();
            assert!(
                text.contains(NODE) && text.contains(action.as_str()) && text.contains(rule),
                "the refusal names the actor, the action and the rule: {text}"
            );
        }
        // The operator may not revoke either; the CA administrator may.
        unauthorized(
            log.append(OPERATOR, Action::CertificateRevoked, NODE, revoked())
                .await,
        );
        log.append(CA_ADMIN, Action::CertificateRevoked, NODE, revoked())
            .await
            .unwrap();
        // A node reports on its own site only.
        let other_site = json!({"site": "hospital-b", "dataset": "d", "job": JOB, "report": {}});
        let e = unauthorized(
            log.append(
                NODE,
                Action::DatasetDeidentified,
                "hospital-b/d",
                other_site,
            )
            .await,
        );
        assert!(matches!(e, AuthorityError::NotItsSite { .. }), "{e}");
        let own = json!({"site": "hospital-a", "dataset": "d", "job": JOB, "report": {}});
        log.append(NODE, Action::DatasetDeidentified, "hospital-a/d", own)
            .await
            .unwrap();
        // The same for a text dataset's report, by its typed payload.
        let text = |site: &str| {
            TextDatasetDeidentified {
                site: site.into(),
                dataset: "notes".into(),
                job: JOB.into(),
                config_sha256: "a".repeat(64),
                split_unit: "patient".into(),
                documents_in: 10,
                documents_out: 8,
                report: json!({}),
                dataset_commitment: "b".repeat(64),
            }
            .to_value()
        };
        let e = unauthorized(
            log.append(
                NODE,
                Action::TextDatasetDeidentified,
                "hospital-b/notes",
                text("hospital-b"),
            )
            .await,
        );
        assert!(matches!(e, AuthorityError::NotItsSite { .. }), "{e}");
        unauthorized(
            log.append(
                COORDINATOR,
                Action::TextDatasetDeidentified,
                "hospital-a/notes",
                text("hospital-a"),
            )
            .await,
        );
        log.append(
            NODE,
            Action::TextDatasetDeidentified,
            "hospital-a/notes",
            text("hospital-a"),
        )
        .await
        .unwrap();
        let refusal = |site: &str| {
            UpdateRefused {
                round: 1,
                attempt: 0,
                site: site.into(),
                reason: "declined: budget".into(),
            }
            .to_value()
        };
        unauthorized(
            log.append(NODE, Action::UpdateRefused, JOB, refusal("hospital-b"))
                .await,
        );
        log.append(NODE, Action::UpdateRefused, JOB, refusal("hospital-a"))
            .await
            .unwrap();
        // Even the coordinator appends only its action's typed payload.
        let mut extra = completed();
        extra["injected"] = json!("x");
        match log
            .append(COORDINATOR, Action::JobCompleted, JOB, extra)
            .await
        {
            Err(AppendError::Payload(e)) => {
                assert!(e.to_string().contains("unknown field `injected`"), "{e}")
            }
            other => panic!("a payload with an unknown field was not refused: {other:?}"),
        }
        // Another consortium's coordinator.
        let e = unauthorized(
            log.append(
                "spiffe://other/coordinator",
                Action::JobCompleted,
                JOB,
                completed(),
            )
            .await,
        );
        assert!(matches!(e, AuthorityError::OtherConsortium { .. }), "{e}");
        // The proposal, the revocation, the report and the refusal: nothing forged is stored.
        let events = log.store().all_events().await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.action).collect::<Vec<_>>(),
            [
                Action::JobProposed,
                Action::CertificateRevoked,
                Action::DatasetDeidentified,
                Action::TextDatasetDeidentified,
                Action::UpdateRefused
            ],
            "{:?}",
            db.backend
        );
        // The log's metrics: each refusal counted as refused (the trail working), not failed; the
        // chain and its checkpoints as stored (one commit, one checkpoint, each append).
        let text = tutela_protocol::metrics::render(&log.metrics().registry()).unwrap();
        let refused = node_forgeries().len() + 7;
        for (series, value) in [
            ("tutela_audit_appends_total{result=\"ok\"}".to_string(), 5),
            (
                "tutela_audit_appends_total{result=\"refused\"}".to_string(),
                refused,
            ),
            (
                "tutela_audit_appends_total{result=\"failed\"}".to_string(),
                0,
            ),
            ("tutela_audit_appends_failed_total".to_string(), 0),
            ("tutela_audit_chain_length".to_string(), 5),
            ("tutela_audit_checkpoints_signed_total".to_string(), 5),
            ("tutela_audit_last_verification_ok".to_string(), 1),
            (
                "tutela_audit_append_duration_seconds_count".to_string(),
                5 + refused,
            ),
        ] {
            assert!(
                text.contains(&format!("\n{series} {value}\n")),
                "{:?}: {series} is not {value}:\n{text}",
                db.backend
            );
        }
    }
}

#[tokio::test]
async fn approvals_need_a_proposal_and_an_officer_of_a_listed_site_and_are_never_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = officer(dir.path());
    for db in databases("authority_approval").await {
        let log = start(&db.url, &key_pkcs8(), &ca).await.unwrap();
        let genuine = approval(&cert, &key, JOB, DIGEST);
        // No proposal of the job yet.
        let e = unauthorized(
            log.append(COORDINATOR, Action::JobApproved, JOB, genuine.clone())
                .await,
        );
        assert!(matches!(e, AuthorityError::NotProposed { .. }), "{e}");
        // A job that does not list the officer's site.
        log.append(
            COORDINATOR,
            Action::JobProposed,
            "job-2",
            proposal(DIGEST, &["hospital-b"]),
        )
        .await
        .unwrap();
        let e = unauthorized(
            log.append(
                COORDINATOR,
                Action::JobApproved,
                "job-2",
                approval(&cert, &key, "job-2", DIGEST),
            )
            .await,
        );
        assert!(matches!(e, AuthorityError::SiteNotInJob { .. }), "{e}");
        // A job that lists the officer's site but names another approver for it (the officer is
        // a user of the site without the policy's officer role), or names none at all.
        let mut other_approver = proposal(DIGEST, &["hospital-a"]);
        other_approver["approvers"] =
            json!({"hospital-a": ["spiffe://test/site/hospital-a/user/someone-else"]});
        let mut no_approvers = proposal(DIGEST, &["hospital-a"]);
        no_approvers.as_object_mut().unwrap().remove("approvers");
        for (job, p) in [("job-4", other_approver), ("job-5", no_approvers)] {
            log.append(COORDINATOR, Action::JobProposed, job, p)
                .await
                .unwrap();
            let e = unauthorized(
                log.append(
                    COORDINATOR,
                    Action::JobApproved,
                    job,
                    approval(&cert, &key, job, DIGEST),
                )
                .await,
            );
            assert!(
                matches!(e, AuthorityError::NotAnApprover { .. }),
                "{job}: {e}"
            );
            assert!(e.to_string().contains("officer role"), "{e}");
        }
        // Proposed with another digest than the one signed.
        log.append(
            COORDINATOR,
            Action::JobProposed,
            JOB,
            proposal([8u8; 32], &["hospital-a"]),
        )
        .await
        .unwrap();
        let e = unauthorized(
            log.append(COORDINATOR, Action::JobApproved, JOB, genuine.clone())
                .await,
        );
        assert!(matches!(e, AuthorityError::NotProposed { .. }), "{e}");
        // Amended to the signed digest: the coordinator relays the approval.
        log.append(
            COORDINATOR,
            Action::JobProposed,
            JOB,
            proposal(DIGEST, &["hospital-a"]),
        )
        .await
        .unwrap();
        let first = log
            .append(COORDINATOR, Action::JobApproved, JOB, genuine.clone())
            .await
            .unwrap();
        // The operator re-appends the officer's genuine payload: refused.
        let e = unauthorized(
            log.append(OPERATOR, Action::JobApproved, JOB, genuine.clone())
                .await,
        );
        assert!(matches!(e, AuthorityError::NotTheSigner { .. }), "{e}");
        // Nor may the coordinator or the officer record it a second time.
        for actor in [COORDINATOR, OFFICER] {
            let e = unauthorized(
                log.append(actor, Action::JobApproved, JOB, genuine.clone())
                    .await,
            );
            assert!(
                matches!(e, AuthorityError::Replay { first_seq, .. } if first_seq == first.seq),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("seq {}", first.seq)), "{e}");
        }
        // Two concurrent copies of one decision (one batch, or two): exactly one is stored.
        log.append(
            COORDINATOR,
            Action::JobProposed,
            "job-3",
            proposal([3u8; 32], &["hospital-a"]),
        )
        .await
        .unwrap();
        let p = approval(&cert, &key, "job-3", [3u8; 32]);
        let (x, y) = tokio::join!(
            log.append(OFFICER, Action::JobApproved, "job-3", p.clone()),
            log.append(COORDINATOR, Action::JobApproved, "job-3", p)
        );
        assert!(x.is_ok() != y.is_ok(), "{x:?} {y:?}");
        let approvals = log
            .store()
            .all_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == Action::JobApproved)
            .count();
        assert_eq!(approvals, 2, "{:?}", db.backend);
    }
}

/// Writes `forged` after the stored log's head with a recomputed hash chain, as the
/// application's database role can (INSERT), bypassing the service.
pub(crate) async fn insert_forged(
    url: &str,
    forged: &[(&str, Action, &str, serde_json::Value)],
) -> Vec<u64> {
    let store = AuditStore::open(url).await.unwrap();
    let last = store.last_event().await.unwrap().unwrap();
    let mut chain = Chain::resume(&last).unwrap();
    let events: Vec<Event> = forged
        .iter()
        .map(|(actor, action, subject, payload)| {
            chain
                .append(
                    Timestamp::now().max(last.timestamp),
                    *actor,
                    *action,
                    *subject,
                    payload.clone(),
                )
                .unwrap()
        })
        .collect();
    store.insert_events(&events).await.unwrap();
    events.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn rows_written_into_the_database_are_named_by_verify_not_believed_by_the_report_and_block_reopening()
 {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = officer(dir.path());
    for db in databases("authority_inserted").await {
        let pkcs8 = key_pkcs8();
        let genuine = approval(&cert, &key, JOB, DIGEST);
        {
            let log = start(&db.url, &pkcs8, &ca).await.unwrap();
            log.append(
                COORDINATOR,
                Action::JobProposed,
                JOB,
                proposal(DIGEST, &["hospital-a"]),
            )
            .await
            .unwrap();
            log.append(COORDINATOR, Action::JobApproved, JOB, genuine.clone())
                .await
                .unwrap();
        }
        // Let the appender finish (it signs what is unsigned when its last handle goes).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut forged: Vec<(&str, Action, &str, serde_json::Value)> = node_forgeries()
            .into_iter()
            .map(|(a, s, p)| (NODE, a, s, p))
            .collect();
        forged.push((OPERATOR, Action::JobApproved, JOB, genuine.clone()));
        forged.push((COORDINATOR, Action::JobApproved, JOB, genuine.clone()));
        let seqs = insert_forged(&db.url, &forged).await;

        let store = AuditStore::open(&db.url).await.unwrap();
        let events = store.all_events().await.unwrap();
        let checkpoints = store.checkpoints().await.unwrap();
        let pk = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        // The hash chain and the checkpoints alone are satisfied...
        let report = verify_log(&events, &checkpoints, &pk).unwrap();
        assert_eq!(report.unanchored, seqs.len() as u64, "{:?}", db.backend);
        // ...the authority check names the first forged row and why.
        let check = check(&ca);
        let v = check.verify(&events).unwrap_err();
        assert_eq!(v.seq, seqs[0], "{v}");
        let text = v.to_string();
        assert!(
            text.contains(&format!("seq {}", seqs[0]))
                && text.contains("job.completed")
                && text.contains("only the coordinator asserts it"),
            "{text}"
        );
        // Every forged row is flagged, nothing else.
        assert_eq!(
            check
                .violations(&events)
                .iter()
                .map(|v| v.seq)
                .collect::<Vec<_>>(),
            seqs
        );

        // The report believes none of it: the job is not completed, has no round, no model, and
        // one approval (the genuine one).
        let job_events: Vec<Event> = events
            .iter()
            .filter(|e| {
                e.subject == JOB || e.payload.get("job").and_then(|j| j.as_str()) == Some(JOB)
            })
            .cloned()
            .collect();
        let record = job_record(&job_events, JOB, &check);
        assert_eq!(record.outcome, "running");
        assert!(record.rounds.is_empty() && record.model_digest.is_none());
        assert_eq!(record.approvals.len(), 1, "{:?}", record.approvals);
        assert_eq!(record.approvals[0].seq, 1);
        assert_eq!(record.approvals[0].officer.as_deref(), Some(OFFICER));
        let flagged: Vec<u64> = record.flagged.iter().map(|f| f.seq).collect();
        assert!(
            flagged.contains(&seqs[0]) && flagged.contains(&seqs[5]) && flagged.contains(&seqs[6]),
            "{flagged:?}"
        );
        let csv = render_report(&record, ReportFormat::Csv);
        assert!(csv.contains(",running model_digest="), "{csv}");
        assert!(csv.contains(&format!("flagged,{},", seqs[0])), "{csv}");

        // The service does not reopen the log over them: it would sign a checkpoint covering
        // them. The error names the row; no checkpoint is added.
        let before = store.checkpoints().await.unwrap().len();
        let err = match start(&db.url, &pkcs8, &ca).await {
            Err(e) => e,
            Ok(_) => panic!("{:?}: the log reopened over forged rows", db.backend),
        };
        assert!(matches!(err, LogError::Unauthorized(_)), "{err}");
        assert!(
            err.to_string().contains(&format!("seq {}", seqs[0])),
            "{err}"
        );
        assert_eq!(store.checkpoints().await.unwrap().len(), before);
    }
}

#[tokio::test]
async fn the_log_refuses_to_reopen_over_an_approval_with_a_bogus_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = officer(dir.path());
    for db in databases("authority_bogus").await {
        let pkcs8 = key_pkcs8();
        {
            let log = start(&db.url, &pkcs8, &ca).await.unwrap();
            log.append(
                COORDINATOR,
                Action::JobProposed,
                JOB,
                proposal(DIGEST, &["hospital-a"]),
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Signed over another digest than the one it claims.
        let mut bogus = approval(&cert, &key, JOB, [9u8; 32]);
        bogus["spec_digest"] = json!(hex::encode(DIGEST));
        let seqs = insert_forged(&db.url, &[(COORDINATOR, Action::JobApproved, JOB, bogus)]).await;
        let err = match start(&db.url, &pkcs8, &ca).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{:?}: the log reopened over a bogus approval", db.backend),
        };
        assert!(
            err.contains(&format!("seq {}", seqs[0])) && err.contains("does not verify"),
            "{err}"
        );
        let store = AuditStore::open(&db.url).await.unwrap();
        let covered = store
            .checkpoints()
            .await
            .unwrap()
            .iter()
            .map(|c| c.checkpoint.tree_size)
            .max()
            .unwrap_or(0);
        assert!(covered <= seqs[0], "a checkpoint covers the bogus row");
    }
}

#[test]
fn every_action_declares_who_may_assert_it() {
    for action in Action::ALL {
        let a = Authority::of(action);
        assert!(!a.rule().is_empty(), "{action}");
    }
    assert_eq!(Authority::of(Action::JobCompleted), Authority::Coordinator);
    assert_eq!(
        Authority::of(Action::CertificateRevoked),
        Authority::CaAdministrator
    );
    assert_eq!(
        Authority::of(Action::DatasetDeidentified),
        Authority::OwnSiteNode
    );
    assert_eq!(
        Authority::of(Action::TextDatasetDeidentified),
        Authority::OwnSiteNode
    );
    assert_eq!(
        Authority::of(Action::JobApproved),
        Authority::SignedByOfficer
    );
    assert_eq!(
        Authority::of(Action::ModelRegistered),
        Authority::Coordinator
    );
    assert_eq!(
        Authority::of(Action::ModelStageChanged),
        Authority::SignedStageMove
    );
    // A CA administrator must be a person of the log's consortium.
    assert!(AuthorityRules::for_log(LOG_ID, &["spiffe://test/coordinator".into()]).is_err());
    assert!(AuthorityRules::for_log(LOG_ID, &["spiffe://other/operator/a".into()]).is_err());
    assert!(AuthorityRules::for_log("spiffe://test/coordinator", &[]).is_err());
}

fn event(action: Action, payload: serde_json::Value) -> Event {
    Chain::new()
        .append(Timestamp::now(), COORDINATOR, action, JOB, payload)
        .unwrap()
}

#[test]
fn typed_payloads_round_trip_and_refuse_unknown_fields() {
    let round = RoundCompleted {
        round: 3,
        attempt: 1,
        participants: vec!["hospital-a".into()],
        update_digests: [("hospital-a".to_string(), "ab".to_string())].into(),
        metrics: [(
            "hospital-a".to_string(),
            SiteRoundMetrics {
                epsilon: Some(0.5),
                round_epsilon: Some(0.1),
                delta: Some(1e-5),
                dataset_commitment: Some("cd".into()),
                train_samples: Some(100),
                eval_accuracy: Some(0.9),
            },
        )]
        .into(),
        model_id: Some("m".into()),
        aggregation: Some(tutela_audit::payload::RobustAggregation {
            rule: "multi_krum(f=1, m=n-f)".into(),
            excluded: vec!["hospital-b".into()],
            trimmed: [
                ("hospital-a".to_string(), 0.0),
                ("hospital-b".to_string(), 1.0),
            ]
            .into(),
        }),
    };
    let e = event(Action::RoundCompleted, round.to_value());
    assert_eq!(RoundCompleted::from_event(&e).unwrap(), round);
    let p: JobProposed = serde_json::from_value(proposal(DIGEST, &["a"])).unwrap();
    assert_eq!(
        JobProposed::from_event(&event(Action::JobProposed, p.to_value())).unwrap(),
        p
    );

    // An unknown field, named with the event's seq.
    let mut extra = round.to_value();
    extra["injected"] = json!(1);
    let err = RoundCompleted::from_event(&event(Action::RoundCompleted, extra)).unwrap_err();
    assert!(
        matches!(&err, PayloadError::Malformed { seq: 0, action: Action::RoundCompleted, problem } if problem.contains("injected")),
        "{err}"
    );
    // Another action's payload.
    let err = JobCompleted::from_event(&e).unwrap_err();
    assert!(matches!(err, PayloadError::WrongAction { .. }), "{err}");
    // A field of the wrong type.
    let err = CertificateRevoked::from_value(
        4,
        &json!({"serial": "01", "reason": "x", "crl_number": "two"}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("event 4"), "{err}");
}

#[tokio::test]
async fn with_a_checkpoint_on_every_commit_no_acknowledged_event_is_unanchored() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ca) = officer(dir.path());
    for db in databases("authority_every_commit").await {
        let pkcs8 = key_pkcs8();
        let log = start(&db.url, &pkcs8, &ca).await.unwrap();
        let appends = (0..16u32).map(|i| {
            let log = log.clone();
            async move {
                let r = log
                    .append(
                        COORDINATOR,
                        Action::JobFailed,
                        format!("job-{i}"),
                        json!({"state": "failed", "reason": "test"}),
                    )
                    .await
                    .unwrap();
                // The receipt comes after the commit that stored a checkpoint covering it.
                let covered = log.latest_checkpoint().unwrap().checkpoint.tree_size;
                assert!(
                    covered > r.seq,
                    "seq {} acknowledged, checkpoint covers {covered}",
                    r.seq
                );
            }
        });
        futures::future::join_all(appends).await;
        let store = log.store();
        let events = store.all_events().await.unwrap();
        let pk = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        let report = verify_log(&events, &store.checkpoints().await.unwrap(), &pk).unwrap();
        assert_eq!(
            (report.events, report.unanchored),
            (16, 0),
            "{:?}",
            db.backend
        );
    }
}

/// A row chained under the coordinator's own identity passes every authority rule (the `actor`
/// column is only what the writer typed), so what refuses it is the checkpoint: a log that signs
/// with every commit has no genuine row outside a signed root, and will not sign over one.
#[tokio::test]
async fn a_row_forged_as_the_coordinator_past_the_last_checkpoint_blocks_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (_cert, _key, ca) = officer(dir.path());
    for db in databases("authority_unanchored").await {
        let pkcs8 = key_pkcs8();
        {
            let log = start(&db.url, &pkcs8, &ca).await.unwrap();
            log.append(
                COORDINATOR,
                Action::JobProposed,
                JOB,
                proposal(DIGEST, &["hospital-a"]),
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = AuditStore::open(&db.url)
            .await
            .unwrap()
            .checkpoints()
            .await
            .unwrap()
            .len();
        let seqs = insert_forged(
            &db.url,
            &[(COORDINATOR, Action::JobCompleted, JOB, completed())],
        )
        .await;
        // The authority rules alone believe it: the coordinator may assert a completion.
        let events = AuditStore::open(&db.url)
            .await
            .unwrap()
            .all_events()
            .await
            .unwrap();
        check(&ca).verify(&events).unwrap();
        match start(&db.url, &pkcs8, &ca).await {
            Err(LogError::Unanchored { first_seq, count }) => {
                assert_eq!((first_seq, count), (seqs[0], 1), "{:?}", db.backend);
            }
            Err(other) => panic!("{:?}: refused for another reason: {other}", db.backend),
            Ok(_) => panic!("{:?}: the forged completion was opened over", db.backend),
        }
        let after = AuditStore::open(&db.url)
            .await
            .unwrap()
            .checkpoints()
            .await
            .unwrap()
            .len();
        assert_eq!(before, after, "{:?}: a checkpoint was signed", db.backend);
    }
}

#[tokio::test]
async fn lineage_shows_a_language_model_job_s_tokenizer_base_adapters_and_text_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (_cert, _key, ca) = officer(dir.path());
    for db in databases("lineage_lm").await {
        let log = start(&db.url, &key_pkcs8(), &ca).await.unwrap();
        let mut proposed = proposal(DIGEST, &["hospital-a"]);
        proposed["base_model"] = json!("llama");
        proposed["tokenizer_sha256"] = json!("c".repeat(64));
        proposed["base_sha256"] = json!("d".repeat(64));
        proposed["lora"] = json!({"rank": 8, "alpha": 16.0, "target_modules": ["q_proj"],
                                  "dropout": 0.0, "aggregation": "ffa"});
        log.append(COORDINATOR, Action::JobProposed, JOB, proposed)
            .await
            .unwrap();
        let text = TextDatasetDeidentified {
            site: "hospital-a".into(),
            dataset: "notes".into(),
            job: JOB.into(),
            config_sha256: "e".repeat(64),
            split_unit: "patient".into(),
            documents_in: 1215,
            documents_out: 347,
            report: json!({"documents_in": 1215}),
            dataset_commitment: "f".repeat(64),
        };
        log.append(
            NODE,
            Action::TextDatasetDeidentified,
            "hospital-a/notes",
            text.to_value(),
        )
        .await
        .unwrap();
        log.append(COORDINATOR, Action::JobCompleted, JOB, completed())
            .await
            .unwrap();
        let events = log.store().all_events().await.unwrap();
        let record = job_record(&events, JOB, &check(&ca));
        assert!(record.flagged.is_empty(), "{:?}", record.flagged);
        let lm = record.language_model.clone().expect("a language-model job");
        assert_eq!(lm.tokenizer_sha256, Some("c".repeat(64)));
        assert_eq!(lm.base_sha256, Some("d".repeat(64)));
        assert_eq!(lm.lora.as_ref().unwrap()["rank"], json!(8));
        // A LoRA job publishes adapters: the model digest is the adapters'.
        assert_eq!(lm.adapter_digest.as_deref(), Some(MODEL));
        let reports = &record.text_deidentified["hospital-a"];
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].split_unit, "patient");
        assert_eq!(reports[0].documents_out, 347);
        assert_eq!(reports[0].dataset_commitment, "f".repeat(64));
        // `tutela audit lineage` prints the record as JSON: the digests are in it.
        let json = serde_json::to_string(&record).unwrap();
        for digest in ["c".repeat(64), "d".repeat(64), MODEL.to_string()] {
            assert!(json.contains(&digest), "{json}");
        }
    }
}

#[test]
fn the_watermark_registry_believes_the_coordinator_only_and_the_lineage_shows_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ca) = officer(dir.path());
    let entry = tutela_audit::payload::WatermarkRegistered {
        job: JOB.into(),
        model_digest: MODEL.into(),
        source_digest: "e".repeat(64),
        scheme: "spread_spectrum_v1".into(),
        key_commitment: "c".repeat(64),
        mark_id: JOB.into(),
        amplitude: 0.01,
        expected_z: 16.0,
        threshold: 1e-6,
    };
    let mut chain = Chain::new();
    let mut append = |actor: &str, subject: &str, payload: serde_json::Value| {
        chain
            .append(
                Timestamp::now(),
                actor,
                Action::WatermarkRegistered,
                subject,
                payload,
            )
            .unwrap()
    };
    let genuine = append(COORDINATOR, MODEL, entry.to_value());
    // A node asserting a watermark, and one filed under another model's digest.
    let forged = append(NODE, MODEL, entry.to_value());
    let misfiled = append(COORDINATOR, &"f".repeat(64), entry.to_value());
    let events = vec![genuine.clone(), forged.clone(), misfiled];
    let registry = tutela_audit::lineage::watermark_registry(&events, &check(&ca));
    assert_eq!(registry.len(), 1, "{registry:?}");
    assert_eq!(registry[0].seq, genuine.seq);
    assert_eq!(registry[0].registered, entry);

    let record = job_record(&events, JOB, &check(&ca));
    assert_eq!(record.watermark.as_ref().map(|w| w.seq), Some(genuine.seq));
    assert!(
        record
            .flagged
            .iter()
            .any(|f| f.reason.contains("filed under"))
    );
    assert!(
        record.flagged.iter().any(|f| f.seq == forged.seq),
        "{:?}",
        record.flagged
    );
    let lineage = tutela_audit::lineage::Lineage {
        model_digest: MODEL.into(),
        job: Some(record.clone()),
        registry: Vec::new(),
    };
    let prov = lineage.to_prov_json().to_string();
    assert!(
        prov.contains("tutela:Watermark") && prov.contains(&"e".repeat(64)),
        "{prov}"
    );
    let csv = render_report(&record, ReportFormat::Csv);
    assert!(
        csv.contains("watermark") && csv.contains(&"c".repeat(64)),
        "{csv}"
    );
    // An extra field is refused like any typed payload's.
    let mut extra = entry.to_value();
    extra["key"] = json!("00");
    assert!(tutela_audit::payload::WatermarkRegistered::from_value(1, &extra).is_err());
}

#[test]
fn statistics_published_is_the_coordinator_s_and_the_job_record_shows_the_result_and_spends() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ca) = officer(dir.path());
    assert_eq!(
        Authority::of(Action::StatisticsPublished),
        Authority::Coordinator
    );
    let result = tutela_audit::payload::StatisticsPublished {
        spec_digest: hex::encode(DIGEST),
        schema: "breast_cancer".into(),
        schema_sha256: "5".repeat(64),
        result_sha256: "6".repeat(64),
        sites: vec!["hospital-a".into(), "hospital-b".into()],
        epsilon_per_site: [
            ("hospital-a".to_string(), 1.0),
            ("hospital-b".to_string(), 1.0),
        ]
        .into(),
        delta: 1e-6,
        accountant: "rdp".into(),
        secure_aggregation: false,
        confidence: 1.0 - 1e-6,
        rows: 412.3,
    };
    let mut chain = Chain::new();
    let genuine = chain
        .append(
            Timestamp::now(),
            COORDINATOR,
            Action::StatisticsPublished,
            JOB,
            result.to_value(),
        )
        .unwrap();
    // A site's node cannot publish the consortium's statistics (nor its own ε in them).
    let mut forged_result = result.clone();
    forged_result
        .epsilon_per_site
        .insert("hospital-a".into(), 0.0);
    let forged = chain
        .append(
            Timestamp::now(),
            NODE,
            Action::StatisticsPublished,
            JOB,
            forged_result.to_value(),
        )
        .unwrap();
    let events = vec![genuine.clone(), forged.clone()];
    let record = job_record(&events, JOB, &check(&ca));
    let stats = record
        .statistics
        .as_ref()
        .expect("the coordinator's result");
    assert_eq!(stats.seq, genuine.seq);
    assert_eq!(stats.published, result);
    assert_eq!(record.epsilon_per_site, result.epsilon_per_site);
    assert_eq!(record.participants, result.sites);
    assert!(
        record.flagged.iter().any(|f| f.seq == forged.seq),
        "{:?}",
        record.flagged
    );
    // Typed: the shape check refuses an extra field and another action's payload.
    let mut extra = result.to_value();
    extra["means"] = json!([1.0]);
    assert!(tutela_audit::payload::check_shape(Action::StatisticsPublished, &extra).is_err());
    assert!(tutela_audit::payload::check_shape(Action::StatisticsPublished, &round()).is_err());
    assert!(
        tutela_audit::payload::check_shape(Action::StatisticsPublished, &result.to_value()).is_ok()
    );
}
