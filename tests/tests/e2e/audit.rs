//! The audit service end to end: the real `tutela-audit` binary over loopback mutual TLS with
//! certificates made here, a node appending as its certificate identity, approvals refused
//! unless signed, proofs checked by a site's verifier, and `tutela audit verify` naming the row
//! an attacker edited in the database.

use std::process::{Command, Stdio};
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::json;
use tutela_audit::client::AuditClient;
use tutela_audit::merkle::{leaf_hash, verify_inclusion};
use tutela_audit::{Action, CheckpointVerifier, Update};
use tutela_e2e::{ChildGuard, bin, free_port, wait_for_port};
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity, file_stem};
use tutela_protocol::tls::TlsFiles;

fn issue(ca: &CaDir, certs: &std::path::Path, p: &Principal, dns: bool) -> (String, String) {
    let mut opts = LeafOptions::new(Validity::days_from_now(30));
    if dns {
        opts.dns_names = vec!["localhost".into()];
    }
    let issued = ca.issue(p, &opts).unwrap();
    let stem = file_stem(p);
    std::fs::write(certs.join(format!("{stem}.crt")), &issued.cert_pem).unwrap();
    std::fs::write(certs.join(format!("{stem}.key")), &issued.key_pem).unwrap();
    (issued.cert_pem, issued.key_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_service_over_mtls_and_cli_verify_names_the_tampered_row() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &dir.path().join("ca"),
        "e2e",
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), ca.ca().cert_pem()).unwrap();
    issue(&ca, &certs, &Principal::Audit, true);
    issue(
        &ca,
        &certs,
        &Principal::Node {
            site: "hospital-a".into(),
        },
        false,
    );
    let officer = Principal::User {
        site: "hospital-a".into(),
        name: "olga".into(),
    };
    let (officer_cert, officer_key) = issue(&ca, &certs, &officer, false);

    let port = free_port();
    let data = dir.path().join("audit");
    let config = dir.path().join("audit.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ncheckpoint_every = 5\ncheckpoint_interval_secs = 3600\n[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/{a}.crt\"\nkey = \"{c}/{a}.key\"\ncrl = \"{}\"\n",
            data.display(),
            ca.crl_path().display(),
            c = certs.display(),
            a = file_stem(&Principal::Audit),
        ),
    )
    .unwrap();
    let log_file = std::fs::File::create(dir.path().join("audit.log")).unwrap();
    let _service = ChildGuard::spawn(
        Command::new(bin("tutela-audit"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file)),
    );
    wait_for_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(30),
    );
    let addr = format!("localhost:{port}");
    let node_stem = file_stem(&Principal::Node {
        site: "hospital-a".into(),
    });
    let tls = ClientTls::load(
        &TlsFiles::in_dir(&certs, &node_stem),
        Some(Identity::new("e2e", Principal::Audit).unwrap()),
    )
    .unwrap();
    let mut client = AuditClient::connect(&addr, tls).await.unwrap();

    // Events are recorded as the caller's certificate identity.
    for round in 1..=11u64 {
        let r = client
            .append(
                Action::RoundCompleted,
                "job-1",
                &json!({"round": round, "participants": ["hospital-a"]}),
            )
            .await
            .unwrap();
        assert_eq!(r.seq, round - 1);
    }
    let events = client.query(&Default::default()).await.unwrap();
    assert_eq!(events.len(), 11);
    assert!(
        events
            .iter()
            .all(|e| e.actor == "spiffe://e2e/site/hospital-a/node")
    );

    // An approval signed over another digest is refused and not stored; a genuine one is stored.
    let (_, pem) = x509_parser::pem::parse_x509_pem(officer_key.as_bytes()).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pem.contents,
        &SystemRandom::new(),
    )
    .unwrap();
    let digest = [9u8; 32];
    let approval = |sig: &[u8]| json!({"spec_digest": hex::encode(digest), "signature": hex::encode(sig), "certificate": officer_cert, "site": "hospital-a"});
    let forged = key.sign(&SystemRandom::new(), &[1u8; 32]).unwrap();
    let err = client
        .append(Action::JobApproved, "job-1", &approval(forged.as_ref()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    assert_eq!(client.log_info().await.unwrap().size, 11);
    let good = key.sign(&SystemRandom::new(), &digest).unwrap();
    assert_eq!(
        client
            .append(Action::JobApproved, "job-1", &approval(good.as_ref()))
            .await
            .unwrap()
            .seq,
        11
    );

    // A site pins a checkpoint and advances it with consistency proofs.
    let info = client.log_info().await.unwrap();
    assert_eq!(info.log_id, "spiffe://e2e/audit");
    let first = client.checkpoint(Some(5)).await.unwrap();
    let mut site = CheckpointVerifier::new(&info.public_key, &info.log_id);
    site.update(&first, &[]).unwrap();
    assert_eq!(
        client.advance(&mut site).await.unwrap(),
        Update::Advanced { from: 5, to: 10 }
    );
    // Inclusion of seq 3 in the latest checkpoint.
    let p = client.inclusion_proof(3, None).await.unwrap();
    p.checkpoint.verify(&info.public_key).unwrap();
    verify_inclusion(
        3,
        p.checkpoint.checkpoint.tree_size,
        &leaf_hash(&p.event.hash),
        &p.path,
        &p.checkpoint.checkpoint.root,
    )
    .unwrap();

    // The CLI verifies the intact log...
    let pubkey = data.join("checkpoint.key.pub");
    let cli = |extra: &[&str]| {
        let mut cmd = Command::new(bin("tutela"));
        cmd.args(["audit", "verify", "--audit", &addr, "--stem", &node_stem])
            .arg("--tls-dir")
            .arg(&certs)
            .arg("--public-key")
            .arg(&pubkey)
            .args(extra);
        cmd.output().unwrap()
    };
    let ok = cli(&[]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).starts_with("OK: 12 events"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // ...and names the row an attacker with write access to the database edited.
    let db_url = tutela_audit::store::AuditStore::sqlite_url(&data.join("audit.db")).unwrap();
    let attacker = tutela_audit::store::AuditStore::open(&db_url)
        .await
        .unwrap();
    for s in [
        "DROP TRIGGER audit_events_no_update",
        r#"UPDATE audit_events SET payload = '{"participants":["hospital-b"],"round":5}' WHERE seq = 4"#,
    ] {
        sqlx::query(s).execute(attacker.pool()).await.unwrap();
    }
    let bad = cli(&[]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "verify must fail after tampering");
    assert!(stderr.contains("hash mismatch at seq 4"), "{stderr}");
}
