//! Reports a regulator reads, over a real trail: the console test's federated job (two sites,
//! officers' signed approvals, privacy spends, a refused update, a rejected job) appended through
//! the real client over mutual TLS to a real `tutela-audit` (SQLite), with checkpoints signed by
//! the service. The report is made from the service's newest checkpoint, written as HTML and
//! PDF, read back by a stock PDF reader (Python's pypdf), and checked by what `verify-report`
//! runs: against the service (its proofs) and against its database (proofs computed locally),
//! after the trail has grown past the report's checkpoint. Each kind of edit fails, naming what
//! differs.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tutela_audit::authority::{AuthorityCheck, AuthorityRules, OfficerTrust};
use tutela_audit::client::AuditClient;
use tutela_audit::report::check::{CheckError, check_against_trail, check_document};
use tutela_audit::report::trail::StoreTrail;
use tutela_audit::report::{
    ReportContext, ReportManifest, ReportScope, VerificationSummary, build_content, gather, html,
    pdf,
};
use tutela_audit::store::AuditStore;
use tutela_audit::{SignedCheckpoint, Timestamp};

use super::console::{Consortium, JOB, Service, fill_trail, https_get, spend, start_service};

fn artifacts() -> PathBuf {
    let dir = std::env::var_os("TUTELA_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/report")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn python() -> PathBuf {
    std::env::var_os("TUTELA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn check_of(c: &Consortium) -> AuthorityCheck {
    let pem = std::fs::read_to_string(c.certs().join("ca.crt")).unwrap();
    AuthorityCheck::new(
        AuthorityRules::for_log("spiffe://acme/audit", &[]).unwrap(),
        OfficerTrust::ca_from_pem(&pem).unwrap(),
    )
}

/// Waits until the service has signed a checkpoint covering its whole log.
async fn settled_head(client: &mut AuditClient) -> SignedCheckpoint {
    for _ in 0..100 {
        let info = client.log_info().await.unwrap();
        if let Ok(cp) = client.checkpoint(None).await
            && cp.checkpoint.tree_size == info.size
        {
            return cp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the service signed no checkpoint over its whole log within 10 s");
}

/// A report of `scope` made as `tutela audit report` makes it: from the service's newest
/// checkpoint and the events up to it.
async fn make(
    client: &mut AuditClient,
    check: &AuthorityCheck,
    scope: ReportScope,
) -> ReportManifest {
    let head = settled_head(client).await;
    let events = gather(&scope, head.checkpoint.tree_size, async |f| {
        client.query(&f).await
    })
    .await
    .unwrap();
    let content = build_content(
        &events,
        &scope,
        head.checkpoint.tree_size,
        check,
        &head.checkpoint.log_id,
    )
    .unwrap();
    ReportManifest::new(
        head.clone(),
        ReportContext {
            generated_at: Timestamp::now(),
            generated_by: "spiffe://acme/site/st-mary/user/alice".into(),
            verification: VerificationSummary {
                intact: Some(true),
                verified_at: Timestamp::now(),
                events: head.checkpoint.tree_size,
                checkpoints: 1,
                detail: "verified by the test".into(),
            },
            retention_min_days: Some(183),
        },
        content,
    )
    .unwrap()
}

/// `m` edited by `edit`, re-digested and re-rendered: what a forger who knows the format writes.
fn forged(m: &ReportManifest, edit: impl FnOnce(&mut ReportManifest)) -> Vec<u8> {
    let mut f = m.clone();
    edit(&mut f);
    f.content_digest = f.digest().unwrap();
    html::render(&f).unwrap().into_bytes()
}

/// Replaces the first `from` after `start` in `bytes` with `to` (same length keeps a PDF's
/// offsets valid).
fn replace_first(bytes: &[u8], start: usize, from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes[start..]
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(from)))
        + start;
    let mut out = bytes.to_vec();
    out.splice(at..at + from.len(), to.iter().copied());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_and_period_reports_verify_and_every_kind_of_edit_is_named() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = Consortium::new();
    let service: Service = start_service(&c).await;
    let started = Timestamp::now();
    fill_trail(&c, &service).await;
    let check = check_of(&c);
    let mut officer = service.client(&c, "alice").await;

    let m = make(&mut officer, &check, ReportScope::job(JOB).unwrap()).await;
    let text = serde_json::to_string(&m.content).unwrap();
    // The figures the trail holds, rounded for people; the sections and their evidence.
    assert!(text.contains("\"breast cancer MLP\""), "{text}");
    assert!(text.contains("2 of 2"), "rounds completed: {text}");
    assert!(text.contains("\"1.70\""), "st-mary's ε, rounded: {text}");
    assert!(text.contains("update norm 12.5 exceeds the bound 10"));
    let ids: Vec<&str> = m.content.sections.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "eu-ai-act-art-12",
            "eu-ai-act-art-19",
            "gdpr-art-30",
            "hipaa-164-312-b"
        ]
    );
    for s in &m.content.sections {
        assert!(!s.evidence.is_empty(), "{} cites no event", s.id);
        assert!(s.statements.iter().all(|st| !st.source.is_empty()));
    }
    let gdpr = &m.content.sections[2];
    assert!(
        gdpr.statements
            .iter()
            .any(|s| s.text.starts_with("(c)") && s.source.starts_with("not in the trail")),
        "categories of data subjects are said to come from outside the trail"
    );
    let budget = m
        .content
        .budgets
        .iter()
        .find(|b| b.site == "st-mary")
        .expect("st-mary's budget is charted");
    assert_eq!(
        budget.points.iter().map(|p| p.1).collect::<Vec<_>>(),
        [0.9, 1.7]
    );
    assert_eq!(budget.caps, [(format!("job {JOB} target"), 3.0)]);

    // Both documents, as written.
    let html_doc = html::render(&m).unwrap();
    assert!(html_doc.contains("<svg class=\"chart\""));
    assert!(html_doc.contains("EU AI Act Art. 12: Record-keeping"));
    let pdf_doc = pdf::render(&m).unwrap();
    let dir = artifacts();
    std::fs::write(dir.join("job-report.html"), &html_doc).unwrap();
    std::fs::write(dir.join("job-report.pdf"), &pdf_doc).unwrap();
    assert_eq!(
        check_document(html_doc.as_bytes()).unwrap().1,
        m,
        "the HTML's manifest reads back"
    );
    assert_eq!(
        check_document(&pdf_doc).unwrap().1,
        m,
        "the PDF's manifest reads back"
    );

    // A stock PDF reader opens it and finds the sections' text and the manifest attachment.
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/pdf_text.py"))
        .arg(dir.join("job-report.pdf"))
        .output()
        .expect("running the venv's python (scripts/setup.sh installs it with pypdf)");
    assert!(
        out.status.success(),
        "pypdf could not read the report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pdf_text = read["text"].as_str().unwrap();
    for needle in [
        "EU AI Act Art. 12: Record-keeping",
        "EU AI Act Art. 19",
        "GDPR Art. 30: Records of processing activities",
        "HIPAA §164.312(b): Audit controls",
        "Trail integrity",
        "INTACT",
        "breast cancer MLP",
        "update norm 12.5 exceeds the bound 10",
        &hex::encode(m.checkpoint.checkpoint.root),
    ] {
        assert!(
            pdf_text.contains(needle),
            "the PDF's text lacks {needle:?}:\n{pdf_text}"
        );
    }
    assert_eq!(read["manifest_digest"], m.content_digest.as_str());
    assert!(read["pages"].as_u64().unwrap() >= 2);

    // The trail grows past the report's checkpoint: the report still verifies, by a
    // consistency proof to the new head, against the service and against its database.
    let mut st_mary = service.client(&c, "node-st-mary").await;
    st_mary
        .append_payload("st-mary/breast_cancer", &spend("st-mary", 3, 2.4, 2.9))
        .await
        .unwrap();
    let head = settled_head(&mut officer).await;
    assert!(head.checkpoint.tree_size > m.checkpoint.checkpoint.tree_size);
    let key = officer.log_info().await.unwrap().public_key;
    for doc in [html_doc.as_bytes(), &pdf_doc[..]] {
        let (_, read) = check_document(doc).unwrap();
        let t = check_against_trail(&read, &key, &mut officer, &check)
            .await
            .unwrap();
        // The service may have signed a newer head since (its own policy.decision events).
        assert!(t.head_size >= head.checkpoint.tree_size);
        assert!(t.head_size > m.checkpoint.checkpoint.tree_size);
        assert!(t.cited > 5);
    }
    let store = AuditStore::open(&AuditStore::sqlite_url(&service.db).unwrap())
        .await
        .unwrap();
    check_against_trail(&m, &key, &mut StoreTrail::new(store), &check)
        .await
        .unwrap();

    // A period report over the whole run verifies too.
    let period = make(
        &mut officer,
        &check,
        ReportScope::period(started, Timestamp::now()).unwrap(),
    )
    .await;
    let period_pdf = pdf::render(&period).unwrap();
    std::fs::write(dir.join("period-report.pdf"), &period_pdf).unwrap();
    let (_, read) = check_document(&period_pdf).unwrap();
    check_against_trail(&read, &key, &mut officer, &check)
        .await
        .unwrap();
    assert!(
        period.content.tables[0]
            .rows
            .iter()
            .any(|r| r[0] == "job.rejected"),
        "the period counts the rejection: {:?}",
        period.content.tables[0]
    );

    // The console's download, as an officer: the same report, stating the service's retention;
    // a site node is refused by the policy; a bad date is named.
    for format in ["pdf", "html"] {
        let got = https_get(
            &c,
            service.console,
            Some("alice"),
            &format!("/reports?job={JOB}&format={format}"),
        )
        .await
        .unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
        let head = got.head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("attachment; filename=\"report-{JOB}.{format}\"")),
            "{head}"
        );
        let (_, served) = check_document(&got.bytes).unwrap();
        assert_eq!(served.context.retention_min_days, Some(183));
        assert!(served.context.generated_by.contains("user/alice"));
        check_against_trail(&served, &key, &mut officer, &check)
            .await
            .unwrap();
    }
    let got = https_get(
        &c,
        service.console,
        Some("node-st-mary"),
        &format!("/reports?job={JOB}"),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 403);
    let got = https_get(
        &c,
        service.console,
        Some("alice"),
        "/reports?from=yesterday&to=2026-01-01",
    )
    .await
    .unwrap();
    assert_eq!(got.status, 400);
    assert!(got.body.contains("yesterday"), "{}", got.body);

    // Edits. A number in the visible HTML.
    let body_end = html_doc.find("<script").unwrap();
    let at = html_doc[..body_end].find("<td>1.70</td>").unwrap();
    let mut edited = html_doc.clone();
    edited.replace_range(at..at + "<td>1.70</td>".len(), "<td>0.70</td>");
    let e = check_document(edited.as_bytes()).unwrap_err();
    assert!(
        matches!(&e, CheckError::Rendering { file, expected, .. } if file.contains("0.70") && expected.contains("1.70")),
        "{e}"
    );

    // A number in the manifest alone.
    let m_at = html_doc.find("\"1.70\"").unwrap();
    assert!(m_at > body_end);
    let mut edited = html_doc.clone();
    edited.replace_range(m_at..m_at + 6, "\"0.70\"");
    let e = check_document(edited.as_bytes()).unwrap_err();
    assert!(matches!(e, CheckError::Digest { .. }), "{e}");

    // A number in the manifest, re-digested and re-rendered: the trail says otherwise.
    let doc = forged(&m, |f| {
        for row in &mut f.content.tables[3].rows {
            if row[0] == "st-mary" {
                row[1] = "0.70".into();
            }
        }
    });
    let (_, f) = check_document(&doc).unwrap();
    let e = check_against_trail(&f, &key, &mut officer, &check)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CheckError::ContentDiffers { path, stated, trail } if path == "content.tables[3].rows[1][1]" && stated == "\"0.70\"" && trail == "\"1.70\""),
        "{e}"
    );

    // A cited event's actor.
    let doc = forged(&m, |f| {
        f.content.sections[0].evidence[0].actor = "spiffe://acme/operator/mallory".into();
    });
    let (_, f) = check_document(&doc).unwrap();
    let e = check_against_trail(&f, &key, &mut officer, &check)
        .await
        .unwrap_err();
    let seq = m.content.sections[0].evidence[0].seq;
    assert!(
        matches!(&e, CheckError::Cited { seq: s, why } if *s == seq && why.contains("mallory")),
        "{e}"
    );

    // The checkpoint: its root, then its size.
    let doc = forged(&m, |f| f.checkpoint.checkpoint.root[0] ^= 1);
    let (_, f) = check_document(&doc).unwrap();
    let e = check_against_trail(&f, &key, &mut officer, &check)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CheckError::Checkpoint(tutela_audit::CheckpointError::BadSignature { .. })
        ),
        "{e}"
    );

    // The PDF: a number on a page, and the embedded manifest.
    let stream_at = pdf_doc
        .windows(b"/Type /EmbeddedFile".len())
        .position(|w| w == b"/Type /EmbeddedFile")
        .unwrap();
    let page_text_start = pdf_doc
        .windows(b"(1.70) Tj".len())
        .position(|w| w == b"(1.70) Tj")
        .expect("st-mary's ε is shown on a page");
    assert!(page_text_start > stream_at);
    let edited = replace_first(&pdf_doc, page_text_start, b"(1.70) Tj", b"(0.70) Tj");
    let e = check_document(&edited).unwrap_err();
    assert!(
        matches!(&e, CheckError::Rendering { kind: tutela_audit::report::check::DocumentKind::Pdf, file, .. } if file.contains("(0.70) Tj")),
        "{e}"
    );
    let edited = replace_first(&pdf_doc, stream_at, b"\"1.70\"", b"\"0.70\"");
    let e = check_document(&edited).unwrap_err();
    assert!(matches!(e, CheckError::Digest { .. }), "{e}");

    service.stop().await;
}

/// `[retention] min_days` on SQLite and PostgreSQL: a prune before a date younger than it is
/// refused with the latest date allowed; an older one is planned over the right prefix and the
/// checkpoint inside it, and nothing is dropped (the trail still verifies).
#[tokio::test]
async fn prune_refuses_events_younger_than_the_retention_and_drops_nothing() {
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    use tutela_audit::retention::{PruneError, RetentionConfig, RetentionError, prune_plan};
    use tutela_audit::{Action, Chain, Checkpoint, MerkleTree, verify_log};

    const DAY: i64 = 86_400_000;
    let now = Timestamp::now();
    let ago = |days: i64| Timestamp::from_unix_millis(now.unix_millis() - days * DAY).unwrap();
    for db in super::store::databases("retention").await {
        let store = AuditStore::open(&db.url).await.unwrap();
        let mut chain = Chain::new();
        let events: Vec<_> = [400, 300, 10]
            .iter()
            .map(|d| {
                chain
                    .append(
                        ago(*d),
                        "spiffe://test/coordinator",
                        Action::JobStarted,
                        "job-1",
                        serde_json::json!({"day": d}),
                    )
                    .unwrap()
            })
            .collect();
        store.insert_events(&events).await.unwrap();
        let key = Ed25519KeyPair::from_pkcs8(&super::store::key_pkcs8()).unwrap();
        let mut tree = MerkleTree::new();
        for e in &events {
            tree.push_entry(&e.hash);
        }
        let cp = Checkpoint {
            tree_size: 2,
            root: tree.root_at(2).unwrap(),
            timestamp: ago(299),
            log_id: "spiffe://test/audit".into(),
        }
        .sign(&key)
        .unwrap();
        store.insert_checkpoint(&cp).await.unwrap();

        let retention = RetentionConfig::default();
        let plan = prune_plan(&store, ago(200), now, &retention).await.unwrap();
        assert_eq!(
            plan.events, 2,
            "{:?}: the two events older than 200 days",
            db.backend
        );
        assert_eq!(plan.covered_by_checkpoint, Some(2));
        let plan = prune_plan(&store, ago(350), now, &retention).await.unwrap();
        assert_eq!((plan.events, plan.covered_by_checkpoint), (1, None));

        let e = prune_plan(&store, ago(100), now, &retention)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PruneError::Retention(RetentionError::TooYoung { min_days: 183, earliest_kept, .. }) if *earliest_kept == ago(183)),
            "{:?}: {e}",
            db.backend
        );
        assert!(e.to_string().contains("must be kept"), "{e}");
        let longer = RetentionConfig { min_days: 365 };
        assert!(prune_plan(&store, ago(300), now, &longer).await.is_err());

        assert_eq!(store.count().await.unwrap(), 3, "nothing was dropped");
        let pk = key.public_key().as_ref().to_vec();
        verify_log(&store.all_events().await.unwrap(), &[cp], &pk).unwrap();
    }
}
