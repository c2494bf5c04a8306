//! Attacks on the officers' console (2026-12-07, branch `attack-s8`), over the real service and
//! real mutual TLS ([`super::console`]'s harness): who gets in (a certificate of another CA that
//! claims an officer's identity, an officer's revoked or expired certificate, the coordinator's
//! own certificate), and what an appender can make a page do (HTML and script in a job's name, a
//! base model, a de-identification report, a dataset's name; the same in the event search's
//! filters and in a path, reflected back into the page; SQL in a filter; a cursor past `i64`).

use std::time::Duration;

use serde_json::json;
use tutela_audit::payload::{DatasetDeidentified, JobProposed};
use tutela_protocol::identity::Principal;
use tutela_protocol::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity};

use super::console::{Consortium, Fetched, https_get, start_service};

const ALICE: &str = "spiffe://acme/site/st-mary/user/alice";
const SCRIPT: &str = "<script>alert(1)</script>";
const IMG: &str = "\"><img src=x onerror=alert(2)>";

/// Writes `issued` as `certs/<stem>.crt` and `.key`, where [`https_get`] reads a client's files.
fn keep(c: &Consortium, stem: &str, cert_pem: &str, key_pem: &str) {
    std::fs::write(c.certs().join(format!("{stem}.crt")), cert_pem).unwrap();
    std::fs::write(c.certs().join(format!("{stem}.key")), key_pem).unwrap();
}

/// Whether `body` holds `markup` escaped (askama writes `<` and `>` as `&#60;` and `&#62;`).
fn shown_as_text(body: &str, markup: &str) -> bool {
    let numeric = markup.replace('<', "&#60;").replace('>', "&#62;");
    let named = markup.replace('<', "&lt;").replace('>', "&gt;");
    body.contains(&numeric) || body.contains(&named)
}

/// Neither attacker markup nor a way out of an attribute in `page`: what an appender wrote is
/// shown as text.
fn inert(what: &str, page: &Fetched) {
    for raw in ["<script", "<img", "<svg onload", "</table><"] {
        assert!(
            !page.body.contains(raw),
            "{what}: the page carries {raw:?} unescaped: {}",
            page.body
        );
    }
    assert!(
        page.head
            .to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{what}: {}",
        page.head
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_revoked_expired_and_service_certificates_get_no_page_and_markup_stays_text() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = Consortium::new();
    let officer = Principal::User {
        site: "st-mary".into(),
        name: "alice".into(),
    };
    // An outsider's own CA, of the same consortium name, issuing alice's identity.
    let rogue = CaDir::init(
        &c.dir.path().join("rogue-ca"),
        "acme",
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    let forged = rogue
        .issue(&officer, &LeafOptions::new(Validity::days_from_now(30)))
        .unwrap();
    keep(&c, "forged-alice", &forged.cert_pem, &forged.key_pem);
    // Alice's second certificate, revoked (a stolen laptop) before the service starts.
    let stolen =
        c.ca.issue(&officer, &LeafOptions::new(Validity::days_from_now(30)))
            .unwrap();
    keep(&c, "revoked-alice", &stolen.cert_pem, &stolen.key_pem);
    c.ca.revoke(&stolen.serial_hex, Some("key-compromise"))
        .unwrap();
    // Alice's third, expired yesterday.
    let now = time::OffsetDateTime::now_utc();
    let expired =
        c.ca.issue(
            &officer,
            &LeafOptions::new(Validity {
                not_before: now - time::Duration::days(10),
                not_after: now - time::Duration::days(1),
            }),
        )
        .unwrap();
    keep(&c, "expired-alice", &expired.cert_pem, &expired.key_pem);

    let s = start_service(&c).await;

    // Who gets in: none of these reads a page.
    for (stem, why) in [
        ("forged-alice", "another CA's certificate naming an officer"),
        ("revoked-alice", "an officer's revoked certificate"),
        ("expired-alice", "an officer's expired certificate"),
    ] {
        match https_get(&c, s.console, Some(stem), "/events").await {
            Err(_) => {}
            Ok(r) => panic!("{why}: answered {} {}", r.status, r.body),
        }
    }
    // The coordinator's certificate (a curious operator holding it) and an operator's are
    // consortium members, but not readers of the trail: 403 naming them.
    for (stem, identity) in [
        ("coordinator", "spiffe://acme/coordinator"),
        ("op", "spiffe://acme/operator/op"),
    ] {
        let r = https_get(&c, s.console, Some(stem), "/events")
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{stem}: {}", r.body);
        assert!(r.body.contains(identity), "{stem}: {}", r.body);
        assert!(!r.body.contains("<tr id=\"event-"), "{stem}: {}", r.body);
    }
    // The real alice still reads.
    let r = https_get(&c, s.console, Some("alice"), "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // Stored markup: a coordinator operator names a job and its base with markup, a site's node
    // puts markup in its dataset's name and its de-identification report.
    let job = "job-x55";
    let mut coordinator = s.client(&c, "coordinator").await;
    coordinator
        .append_payload(
            job,
            &JobProposed {
                spec_digest: "4a".repeat(32),
                code_version: format!("tutela {SCRIPT}"),
                base_model: IMG.into(),
                name: SCRIPT.into(),
                operator: Some(format!("spiffe://acme/operator/{IMG}")),
                participants: vec!["st-mary".into()],
                approvers: Some([("st-mary".to_string(), vec![ALICE.to_string()])].into()),
                rounds: 2,
                privacy: json!({"mode": "local", "target_epsilon": 3.0, "delta": 1e-5}),
                tokenizer_sha256: None,
                base_sha256: None,
                lora: None,
            },
        )
        .await
        .unwrap();
    let mut node = s.client(&c, "node-st-mary").await;
    let stored = node
        .append_payload(
            "st-mary/breast_cancer",
            &DatasetDeidentified {
                site: "st-mary".into(),
                dataset: IMG.into(),
                job: job.into(),
                report: json!({"transforms": [SCRIPT, IMG], "note": "</td></tr></table><script>x</script>"}),
                dataset_commitment: None,
            },
        )
        .await;
    // Refusing the markup at append would hold too; what is stored must render inert.
    let node_appended = stored.is_ok();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pages = vec![
        "/".to_string(),
        "/events".to_string(),
        "/jobs".to_string(),
        format!("/jobs/{job}"),
        "/sites".to_string(),
        "/models".to_string(),
    ];
    // Reflected: markup in the search's filters and in a path's parameters.
    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    pages.push(format!(
        "/events?actor={}&subject={}",
        enc(SCRIPT),
        enc(IMG)
    ));
    pages.push(format!("/events?since={}", enc(IMG)));
    pages.push(format!("/events?{}=1", enc(SCRIPT)));
    pages.push(format!("/jobs/{}", enc(SCRIPT)));
    // A job id that is a LIKE wildcard: answered as a job with no events (the store's job filter
    // is an exact match on the events-by-job index, not a payload LIKE that would load every
    // event naming a job).
    pages.push("/jobs/%25".to_string());
    pages.push("/jobs/_".to_string());
    pages.push(format!("/models/{}", enc(IMG)));
    pages.push(format!("/events/{}/proof", enc(SCRIPT)));
    for path in &pages {
        let r = https_get(&c, s.console, Some("alice"), path).await.unwrap();
        assert!(r.status < 500, "{path}: {} {}", r.status, r.body);
        inert(path, &r);
    }
    // The stored markup is there, as text.
    let events = https_get(&c, s.console, Some("alice"), "/events")
        .await
        .unwrap();
    assert!(shown_as_text(&events.body, "<script>"), "{}", events.body);
    let detail = https_get(&c, s.console, Some("alice"), &format!("/jobs/{job}"))
        .await
        .unwrap();
    assert_eq!(detail.status, 200, "{}", detail.body);
    assert!(shown_as_text(&detail.body, "<script>"), "{}", detail.body);
    if node_appended {
        assert!(shown_as_text(&events.body, "<img src=x"), "{}", events.body);
    }

    // SQL in a filter is a value compared, not SQL: no row, no error.
    for q in [
        "actor=x%27%20OR%20%271%27%3D%271",
        "subject=%27%3B%20DROP%20TABLE%20audit_events%3B%20--",
    ] {
        let r = https_get(&c, s.console, Some("alice"), &format!("/events?{q}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{q}: {}", r.body);
        assert_eq!(r.body.matches("<tr id=\"event-").count(), 0, "{q}");
    }
    // A cursor past i64 and a proof seq past the trail: answered, not a crash or a scan error.
    let r = https_get(
        &c,
        s.console,
        Some("alice"),
        "/events?before=18446744073709551615",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let newest = https_get(&c, s.console, Some("alice"), "/events")
        .await
        .unwrap();
    let rows = |b: &str| b.matches("<tr id=\"event-").count();
    assert!(rows(&r.body) > 0, "{}", r.body);
    assert_eq!(
        rows(&r.body),
        rows(&newest.body),
        "the newest page, as without a cursor"
    );
    let r = https_get(
        &c,
        s.console,
        Some("alice"),
        "/events/18446744073709551615/proof",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    // The trail still holds every event (the DROP above was a string).
    let r = https_get(&c, s.console, Some("alice"), "/events")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    s.stop().await;
}

/// The job filter behind `/jobs/JOB` (and the `Query` service's `job`) on SQLite and PostgreSQL:
/// a job id that is a `LIKE` wildcard (`%`, `_`) finds only the events of a job of that very id
/// (the events-by-job index is matched exactly, so the database never hands over every event
/// that names a job).
#[tokio::test]
async fn a_wildcard_job_id_finds_only_its_own_events_on_every_database() {
    use ring::signature::Ed25519KeyPair;
    use tutela_audit::Action;
    use tutela_audit::log::{AuditLog, LogConfig};
    use tutela_audit::store::{AuditStore, EventFilter};
    for db in super::store::databases("console_wildcard_job").await {
        let store = AuditStore::open(&db.url).await.unwrap();
        let key = Ed25519KeyPair::from_pkcs8(&super::store::key_pkcs8()).unwrap();
        let log = AuditLog::start(store, key, LogConfig::new("spiffe://test/audit"), None)
            .await
            .unwrap();
        for job in ["job-1", "a_b", "axb", "%", "50%"] {
            let payload = DatasetDeidentified {
                site: "a".into(),
                dataset: "ds".into(),
                job: job.into(),
                report: json!({}),
                dataset_commitment: None,
            };
            log.append(
                "spiffe://test/site/a/node",
                Action::DatasetDeidentified,
                "a/ds".to_string(),
                tutela_audit::payload::ActionPayload::to_value(&payload),
            )
            .await
            .unwrap();
        }
        for (job, expected) in [("%", 1), ("_", 0), ("a_b", 1), ("50%", 1), ("job-1", 1)] {
            let found = log
                .store()
                .events(&EventFilter {
                    job: Some(job.into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(
                found.len(),
                expected,
                "{:?} job {job:?}: {found:?}",
                db.backend
            );
        }
    }
}
