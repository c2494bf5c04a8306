//! What an officer does with the CLI around the audit console: take their identity into a
//! browser as a PKCS#12 file (`tutela pki issue --pkcs12`), and check an event's inclusion proof
//! downloaded from the console offline (`tutela audit verify-proof`).

use ring::signature::Ed25519KeyPair;
use tutela_audit::merkle::MerkleTree;
use tutela_audit::proof_file::ProofFile;
use tutela_audit::receipt::InclusionProof;
use tutela_audit::{Action, Chain, Checkpoint, Timestamp};

use super::{Scratch, fails, init, mode, ok};

#[test]
fn an_officer_gets_a_pkcs12_file_that_openssl_reads_with_the_passphrase() {
    let s = Scratch::new("pkcs12");
    init(&s);
    std::fs::write(s.path("pass"), "correct horse battery\n").unwrap();
    let out = ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "user",
        "--site",
        "st-mary",
        "--name",
        "alice",
        "--out",
        &s.arg("alice"),
        "--pkcs12",
        &s.arg("alice/alice.p12"),
        "--pkcs12-passphrase-file",
        &s.arg("pass"),
    ]);
    assert!(
        out.contains("PKCS#12:") && out.contains("alice.p12"),
        "{out}"
    );
    assert_eq!(mode(&s.path("alice/alice.p12")), 0o600);
    match std::process::Command::new("openssl")
        .args([
            "pkcs12",
            "-info",
            "-noout",
            "-passin",
            "pass:correct horse battery",
            "-in",
        ])
        .arg(s.path("alice/alice.p12"))
        .output()
    {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "openssl pkcs12 -info: {text}");
            assert!(
                text.contains("PBES2") && text.contains("AES-256-CBC"),
                "{text}"
            );
            let wrong = std::process::Command::new("openssl")
                .args(["pkcs12", "-info", "-noout", "-passin", "pass:wrong", "-in"])
                .arg(s.path("alice/alice.p12"))
                .output()
                .unwrap();
            assert!(
                !wrong.status.success(),
                "openssl read it with a wrong passphrase"
            );
        }
        Err(e) => eprintln!("openssl is not installed ({e}): its check is skipped"),
    }

    // A short passphrase is refused before anything is issued.
    std::fs::write(s.path("short"), "abc\n").unwrap();
    let err = fails(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "user",
        "--site",
        "st-mary",
        "--name",
        "bob",
        "--out",
        &s.arg("bob"),
        "--pkcs12",
        &s.arg("bob/bob.p12"),
        "--pkcs12-passphrase-file",
        &s.arg("short"),
    ]);
    assert!(err.contains("at least 8"), "{err}");
    // Without a terminal and without a file, it says how to give one.
    let err = fails(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "user",
        "--site",
        "st-mary",
        "--name",
        "carol",
        "--out",
        &s.arg("carol"),
        "--pkcs12",
        &s.arg("carol/carol.p12"),
    ]);
    assert!(err.contains("--pkcs12-passphrase-file"), "{err}");
    assert!(!s.path("carol/carol.p12").exists());
}

#[test]
fn a_proof_file_verifies_offline_and_an_edited_one_does_not() {
    let s = Scratch::new("proof");
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = ring::signature::KeyPair::public_key(&key).as_ref().to_vec();
    let mut chain = Chain::new();
    let mut tree = MerkleTree::new();
    let mut events = Vec::new();
    for i in 0..7 {
        let e = chain
            .append(
                Timestamp::from_unix_millis(1_765_000_000_000 + i).unwrap(),
                "spiffe://acme/coordinator",
                Action::JobStarted,
                format!("job-{i}"),
                serde_json::json!({"spec_digest": "ab", "approvals": 1, "participants": ["st-mary"]}),
            )
            .unwrap();
        tree.push_entry(&e.hash);
        events.push(e);
    }
    let checkpoint = Checkpoint {
        tree_size: 7,
        root: tree.root(),
        timestamp: Timestamp::from_unix_millis(1_765_000_000_010).unwrap(),
        log_id: "spiffe://acme/audit".into(),
    }
    .sign(&key)
    .unwrap();
    let proof = InclusionProof {
        event: events[4].clone(),
        checkpoint,
        path: tree.audit_path(4, 7).unwrap(),
    };
    let file = ProofFile::new(proof, &public);
    std::fs::write(
        s.path("proof.json"),
        serde_json::to_string_pretty(&file).unwrap(),
    )
    .unwrap();
    std::fs::write(s.path("key.pub"), format!("{}\n", hex::encode(&public))).unwrap();

    let out = ok(&[
        "audit",
        "verify-proof",
        &s.arg("proof.json"),
        "--public-key",
        &s.arg("key.pub"),
    ]);
    assert!(out.contains("verified: event 4 (job.started"), "{out}");

    let mut edited = file.clone();
    edited.event.subject = "job-forged".into();
    std::fs::write(
        s.path("edited.json"),
        serde_json::to_string(&edited).unwrap(),
    )
    .unwrap();
    let err = fails(&[
        "audit",
        "verify-proof",
        &s.arg("edited.json"),
        "--public-key",
        &hex::encode(&public),
    ]);
    assert!(
        err.contains("FAILED") && err.contains("event 4's contents do not hash"),
        "{err}"
    );

    // Another key (the file's own copy is never trusted).
    let other = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let other = Ed25519KeyPair::from_pkcs8(other.as_ref()).unwrap();
    let other = hex::encode(ring::signature::KeyPair::public_key(&other).as_ref());
    let err = fails(&[
        "audit",
        "verify-proof",
        &s.arg("proof.json"),
        "--public-key",
        &other,
    ]);
    assert!(
        err.contains("checkpoint does not verify with the given key"),
        "{err}"
    );
}
