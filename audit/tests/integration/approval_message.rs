//! The approval and rejection messages the audit service verifies are exactly the ones the policy
//! crate signs, and the service's check of a `job.rejected` payload: a genuine signed rejection
//! verifies; a forged one (wrong key, another CA, a revoked or non-officer certificate, another
//! job, another digest, an edited reason, an approval's signature) is refused, and nothing of it
//! is stored.
//!
//! Certificates are made at test time by a real CA directory (`tutela pki`'s `CaDir`), and trust
//! is checked as the service checks it: `ReloadingServerConfig::reverify_client` over the
//! service's own CA bundle and CRL.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::signature::Ed25519KeyPair;
use serde_json::{Value, json};
use tutela_audit::Action;
use tutela_audit::approval::{
    ApprovalError, ChainCheck, policy_rejection_message, policy_signed_message,
    verify_officer_payload,
};
use tutela_audit::log::{AppendError, AuditLog, LogConfig};
use tutela_audit::store::{AuditStore, EventFilter};
use tutela_policy::{Approval, Rejection};
use tutela_protocol::identity::Principal;
use tutela_protocol::job::SpecDigest;
use tutela_protocol::pki::{CaDir, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::tls::{ReloadingServerConfig, TlsFiles};

#[test]
fn the_approval_message_is_the_policy_crates() {
    let digest = SpecDigest([0xa5; 32]);
    assert_eq!(
        policy_signed_message(
            "job-7",
            &digest.to_hex(),
            1_700_000_000_000,
            1_700_086_400_000
        ),
        tutela_policy::approval::signed_message(
            "job-7",
            &digest,
            1_700_000_000_000,
            1_700_086_400_000
        )
    );
}

#[test]
fn the_rejection_message_is_the_policy_crates() {
    let digest = SpecDigest([0xa5; 32]);
    assert_eq!(
        policy_rejection_message("job-7", &digest.to_hex(), "ε too high", 1_700_000_000_000),
        tutela_policy::approval::rejection_signed_message(
            "job-7",
            &digest,
            "ε too high",
            1_700_000_000_000
        )
    );
}

const JOB: &str = "0123456789abcdef0123456789abcdef";
const DIGEST: SpecDigest = SpecDigest([7; 32]);
const REASON: &str = "the DP budget is too high for our registry";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn user(site: &str, name: &str) -> Principal {
    Principal::User {
        site: site.into(),
        name: name.into(),
    }
}

/// A consortium CA in a temporary directory, the audit service's TLS over it (whose trust check
/// the service applies to officers' certificates), and the certificates the tests sign with.
struct Consortium {
    _dir: tempfile::TempDir,
    chain_check: ChainCheck,
    alice: IssuedCertificate,
    mallory: IssuedCertificate,
    revoked_officer: IssuedCertificate,
    node: IssuedCertificate,
    other_ca_alice: IssuedCertificate,
}

fn consortium() -> Consortium {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &dir.path().join("ca"),
        "test",
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    let leaf = || LeafOptions::new(Validity::days_from_now(10));
    let alice = ca.issue(&user("a", "alice"), &leaf()).unwrap();
    let mallory = ca.issue(&user("a", "mallory"), &leaf()).unwrap();
    let revoked_officer = ca.issue(&user("a", "bob"), &leaf()).unwrap();
    ca.revoke(&revoked_officer.serial_hex, Some("key-compromise"))
        .unwrap();
    let node = ca
        .issue(&Principal::Node { site: "a".into() }, &leaf())
        .unwrap();
    let mut server = leaf();
    server.dns_names = vec!["localhost".into()];
    let audit = ca.issue(&Principal::Audit, &server).unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("audit.crt"), &audit.cert_pem).unwrap();
    std::fs::write(certs.join("audit.key"), &audit.key_pem).unwrap();
    let tls = ReloadingServerConfig::load(TlsFiles {
        ca: ca.cert_path(),
        cert: certs.join("audit.crt"),
        key: certs.join("audit.key"),
        crl: Some(ca.crl_path()),
    })
    .unwrap();
    // The service's own check (audit/src/server.rs): the chain against its CA bundle and CRL.
    let chain_check: ChainCheck =
        Arc::new(move |chain| tls.reverify_client(chain).map_err(|e| e.to_string()));
    // Another CA of the same consortium name, issuing a certificate for the same officer.
    let other = CaDir::init(
        &dir.path().join("other-ca"),
        "test",
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    let other_ca_alice = other.issue(&user("a", "alice"), &leaf()).unwrap();
    Consortium {
        _dir: dir,
        chain_check,
        alice,
        mallory,
        revoked_officer,
        node,
        other_ca_alice,
    }
}

/// The `job.rejected` payload the coordinator records for `rejection`.
fn rejection_payload(rejection: &Rejection, cert_pem: &str) -> Value {
    json!({
        "spec_digest": rejection.spec_digest.to_hex(),
        "signature": hex::encode(&rejection.signature),
        "certificate": cert_pem,
        "site": "a",
        "reason": rejection.reason,
        "signed_at_ms": rejection.signed_at_ms,
    })
}

/// The `job.approved` payload the coordinator records for `approval`.
fn approval_payload(approval: &Approval, cert_pem: &str) -> Value {
    json!({
        "spec_digest": approval.spec_digest.to_hex(),
        "signature": hex::encode(&approval.signature),
        "certificate": cert_pem,
        "site": "a",
        "signed_at_ms": approval.signed_at_ms,
        "expires_at_ms": approval.expires_at_ms,
    })
}

fn sign_rejection(key_of: &IssuedCertificate, cert_of: &IssuedCertificate, t: i64) -> Value {
    let r = Rejection::sign(&key_of.key_pem, &cert_of.cert_pem, JOB, &DIGEST, REASON, t).unwrap();
    rejection_payload(&r, &cert_of.cert_pem)
}

#[test]
fn a_signed_rejection_verifies_and_each_forgery_is_refused_for_its_reason() {
    let c = consortium();
    let check = Some(&c.chain_check);
    let t = now_ms();
    let verify = |subject: &str, payload: &Value| {
        verify_officer_payload(Action::JobRejected, subject, payload, check)
    };

    // Genuine: Alice's key, Alice's certificate from the consortium CA.
    let genuine = sign_rejection(&c.alice, &c.alice, t);
    let v = verify(JOB, &genuine).unwrap();
    assert_eq!(v.officer.uri(), "spiffe://test/site/a/user/alice");
    assert_eq!(v.spec_digest, DIGEST.0);

    // Wrong key: Mallory's key under Alice's certificate.
    let err = verify(JOB, &sign_rejection(&c.mallory, &c.alice, t)).unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains("user/alice"), "{err}");

    // Another CA's certificate naming the same officer.
    let err = verify(
        JOB,
        &sign_rejection(&c.other_ca_alice, &c.other_ca_alice, t),
    )
    .unwrap_err();
    assert!(matches!(err, ApprovalError::Untrusted(_)), "{err}");

    // A revoked officer.
    let err = verify(
        JOB,
        &sign_rejection(&c.revoked_officer, &c.revoked_officer, t),
    )
    .unwrap_err();
    assert!(matches!(err, ApprovalError::Untrusted(_)), "{err}");
    assert!(err.to_string().to_lowercase().contains("revoked"), "{err}");

    // Not an officer: a site node's certificate signs.
    let err = verify(JOB, &sign_rejection(&c.node, &c.node, t)).unwrap_err();
    assert!(matches!(err, ApprovalError::NotAnOfficer(_)), "{err}");

    // Recorded for another job, or with another digest, or with the reason or time edited.
    let err = verify("ffffffffffffffffffffffffffffffff", &genuine).unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature { .. }), "{err}");
    for (field, value) in [
        ("spec_digest", json!(SpecDigest([8; 32]).to_hex())),
        ("reason", json!("approved after all")),
        ("signed_at_ms", json!(t + 1)),
    ] {
        let mut edited = genuine.clone();
        edited[field] = value;
        let err = verify(JOB, &edited).unwrap_err();
        assert!(
            matches!(err, ApprovalError::BadSignature { .. }),
            "{field}: {err}"
        );
    }

    // Unsigned, or without the reason and time the signature covers.
    for field in ["signature", "reason", "signed_at_ms", "certificate"] {
        let mut partial = genuine.clone();
        partial.as_object_mut().unwrap().remove(field);
        assert!(verify(JOB, &partial).is_err(), "without {field}");
    }
    let mut unexplained = genuine.clone();
    unexplained["reason"] = json!("   ");
    let err = verify(JOB, &unexplained).unwrap_err();
    assert!(
        matches!(
            err,
            ApprovalError::Malformed {
                field: "reason",
                ..
            }
        ),
        "{err}"
    );

    // Only job.approved and job.rejected carry an officer's signature.
    assert!(matches!(
        verify_officer_payload(Action::JobFailed, JOB, &genuine, check),
        Err(ApprovalError::NotADecision(Action::JobFailed))
    ));
}

#[test]
fn an_approval_signature_is_never_a_rejection_nor_a_rejection_an_approval() {
    let c = consortium();
    let check = Some(&c.chain_check);
    let t = now_ms();
    let approval = Approval::sign(
        &c.alice.key_pem,
        &c.alice.cert_pem,
        JOB,
        &DIGEST,
        t,
        t + 3_600_000,
    )
    .unwrap();
    let rejection =
        Rejection::sign(&c.alice.key_pem, &c.alice.cert_pem, JOB, &DIGEST, REASON, t).unwrap();
    let approved = approval_payload(&approval, &c.alice.cert_pem);
    let rejected = rejection_payload(&rejection, &c.alice.cert_pem);
    verify_officer_payload(Action::JobApproved, JOB, &approved, check).unwrap();
    verify_officer_payload(Action::JobRejected, JOB, &rejected, check).unwrap();

    // The approval's signature in a rejection payload, and the approval's whole payload given a
    // reason, recorded as job.rejected.
    let mut replayed = rejected.clone();
    replayed["signature"] = approved["signature"].clone();
    let err = verify_officer_payload(Action::JobRejected, JOB, &replayed, check).unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature { .. }), "{err}");
    let mut approval_as_rejection = approved.clone();
    approval_as_rejection["reason"] = json!(REASON);
    let err = verify_officer_payload(Action::JobRejected, JOB, &approval_as_rejection, check)
        .unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature { .. }), "{err}");

    // The rejection's payload recorded as job.approved, with and without a window (without
    // one it is refused before any signature check: there is no bare-digest approval).
    let err = verify_officer_payload(Action::JobApproved, JOB, &rejected, check).unwrap_err();
    assert!(
        matches!(
            err,
            ApprovalError::Malformed {
                field: "expires_at_ms",
                ..
            }
        ),
        "{err}"
    );
    let mut rejection_as_approval = rejected.clone();
    rejection_as_approval["expires_at_ms"] = json!(t + 3_600_000);
    let err = verify_officer_payload(Action::JobApproved, JOB, &rejection_as_approval, check)
        .unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature { .. }), "{err}");
}

#[tokio::test]
async fn the_audit_log_stores_no_forged_or_unsigned_rejection() {
    let c = consortium();
    let dir = tempfile::tempdir().unwrap();
    let store = AuditStore::open(&AuditStore::sqlite_url(&dir.path().join("audit.db")).unwrap())
        .await
        .unwrap();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let mut config = LogConfig::new("spiffe://test/audit");
    config.checkpoint_interval = Duration::from_secs(3600);
    let log = AuditLog::start(store, key, config, Some(c.chain_check.clone()))
        .await
        .unwrap();
    let t = now_ms();
    let forgeries = [
        ("wrong key", sign_rejection(&c.mallory, &c.alice, t)),
        (
            "another CA",
            sign_rejection(&c.other_ca_alice, &c.other_ca_alice, t),
        ),
        (
            "revoked",
            sign_rejection(&c.revoked_officer, &c.revoked_officer, t),
        ),
        ("not an officer", sign_rejection(&c.node, &c.node, t)),
        (
            "unsigned",
            json!({"spec_digest": DIGEST.to_hex(), "reason": REASON, "site": "a"}),
        ),
    ];
    for (what, payload) in forgeries {
        let err = log
            .append(
                "spiffe://test/coordinator",
                Action::JobRejected,
                JOB,
                payload,
            )
            .await
            .unwrap_err();
        // The unsigned one is not even a rejection's payload; the others fail their signature.
        assert!(
            matches!(err, AppendError::Approval(_) | AppendError::Payload(_)),
            "{what}: {err}"
        );
    }
    let stored = log
        .store()
        .events(&EventFilter {
            action: Some(Action::JobRejected),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        stored.is_empty(),
        "forged rejections were stored: {stored:?}"
    );
    assert_eq!(log.store().count().await.unwrap(), 0);
}
