//! The consortium CA's certificate operations in the audit trail, with the real binaries: a CA
//! made with `tutela pki init`, `tutela-audit` over loopback mutual TLS behind the shipped casbin
//! policy (consortium `acme` renamed `e2e`), and `tutela pki issue|revoke --audit` run as the
//! consortium operator's own client certificate.
//!
//! - An issue and a revocation are recorded once each, as the operator, with the serial, the
//!   SHA-256 fingerprint of the certificate's DER and its validity, and the reason and number of
//!   the CRL that carries the revocation.
//! - With nothing listening at --audit, or as an auditor whom the policy forbids to write, the
//!   certificate is still issued, and the command fails saying it was not recorded, printing the
//!   event to record by hand.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tutela_e2e::{ChildGuard, audit_events, bin, free_port, repo_root, wait_for_port};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

const OPERATOR: &str = "spiffe://e2e/operator/op";
const AUDITOR: &str = "spiffe://e2e/site/general/user/dana";

/// Runs `tutela` with none of the environment variables that would point it elsewhere.
fn tutela(args: &[&str]) -> Output {
    Command::new(bin("tutela"))
        .args(args)
        .env_remove("TUTELA_AUDIT")
        .env_remove("TUTELA_AUDIT_TLS_DIR")
        .env_remove("TUTELA_AUDIT_STEM")
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run tutela {args:?}: {e}"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let out = tutela(args);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "tutela {args:?} failed with {}:\n{stdout}{stderr}",
        out.status
    );
    stdout
}

fn fails(args: &[&str]) -> String {
    let out = tutela(args);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "tutela {args:?} should have failed:\n{stdout}{stderr}"
    );
    stderr
}

/// The DER of the first PEM block of `path`.
fn der_of(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem)
        .unwrap_or_else(|e| panic!("{}: not PEM: {e:?}", path.display()));
    block.contents
}

/// A serial number's bytes as the CLI writes them: lowercase hex without leading zero bytes.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    hex::encode(&raw[start..])
}

/// Serial and SHA-256 fingerprint (hex) of the certificate in `path`, read with x509-parser and
/// ring, not with the CLI.
fn serial_and_fingerprint(path: &Path) -> (String, String) {
    let der = der_of(path);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let fingerprint = ring::digest::digest(&ring::digest::SHA256, &der);
    (
        serial_hex(cert.raw_serial()),
        hex::encode(fingerprint.as_ref()),
    )
}

/// The value of a `label: value` line of `tutela pki show` output.
fn shown(show: &str, label: &str) -> String {
    show.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{label}:")))
        .unwrap_or_else(|| panic!("no {label:?} line in\n{show}"))
        .trim()
        .to_string()
}

/// The `seq` of the "recorded <action> as event <seq>" line a command printed.
fn recorded_seq(stdout: &str, action: &str) -> u64 {
    let needle = format!("recorded {action} as event ");
    let line = stdout
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no {needle:?} line in\n{stdout}"));
    let rest = &line[line.find(&needle).unwrap() + needle.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// The service's `policy.decision` events once `until` holds for them (the service records
/// decisions off the RPC path, so they land a moment later).
fn decisions_until(
    db: &Path,
    until: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let events = audit_events(db, "policy.decision");
        if until(&events) {
            return events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the expected policy decisions are not in the trail: {events:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pki_issue_and_revoke_are_recorded_as_the_operator_or_fail_saying_they_were_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let arg = |rel: &str| d.join(rel).display().to_string();
    let ca = arg("ca");

    // The CA, and without --audit a line saying that nothing is recorded.
    ok(&["pki", "init", "--consortium", "e2e", "--out", &ca]);
    let out = ok(&[
        "pki",
        "issue",
        "--ca",
        &ca,
        "--role",
        "audit",
        "--out",
        &arg("audit-tls"),
    ]);
    assert!(
        out.contains("not recorded in an audit trail (no --audit given)"),
        "{out}"
    );
    ok(&[
        "pki",
        "issue",
        "--ca",
        &ca,
        "--role",
        "operator",
        "--name",
        "op",
        "--out",
        &arg("op"),
    ]);
    let dana = ["--role", "user", "--site", "general", "--name", "dana"];
    ok(&[
        &["pki", "issue", "--ca", &ca, "--out", &arg("dana")][..],
        &dana,
    ]
    .concat());

    // The audit service behind the shipped policy.
    let policy = d.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::copy(
        repo_root().join("deploy/policy/model.conf"),
        policy.join("model.conf"),
    )
    .unwrap();
    let shipped = std::fs::read_to_string(repo_root().join("deploy/policy/policy.csv"))
        .unwrap()
        .replace("spiffe://acme/", "spiffe://e2e/");
    assert!(shipped.contains(&format!("g, {OPERATOR}, operator, consortium")));
    std::fs::write(policy.join("policy.csv"), shipped).unwrap();
    let port = free_port();
    let data = d.join("audit");
    let config = d.join("audit.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\ncheckpoint_interval_secs = 1\n\
             ca_admins = [\"{OPERATOR}\"]\n\
             [tls]\nca = \"{t}/ca.crt\"\ncert = \"{t}/audit.crt\"\nkey = \"{t}/audit.key\"\ncrl = \"{ca}/crl.pem\"\n\
             [policy]\nmodel = \"{p}/model.conf\"\npolicy = \"{p}/policy.csv\"\nreload_secs = 1\n",
            data = data.display(),
            t = arg("audit-tls"),
            p = policy.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("audit.log")).unwrap();
    let _service = ChildGuard::spawn(
        Command::new(bin("tutela-audit"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log)),
    );
    wait_for_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(30),
    );
    let audit = format!("localhost:{port}");
    let as_operator = [
        "--audit",
        &audit,
        "--audit-tls-dir",
        &arg("op"),
        "--audit-stem",
        "operator-op",
    ];
    let db = data.join("audit.db");

    // Issue a node's certificate, recorded as the operator.
    let node = ["--role", "node", "--site", "st-mary", "--days", "30"];
    let out = ok(&[
        &["pki", "issue", "--ca", &ca, "--out", &arg("st-mary")][..],
        &node,
        &as_operator,
    ]
    .concat());
    let issued_seq = recorded_seq(&out, "certificate.issued");
    assert!(out.contains(&format!("(actor {OPERATOR})")), "{out}");
    let cert = d.join("st-mary/node.crt");
    let (serial, fingerprint) = serial_and_fingerprint(&cert);
    let show = ok(&["pki", "show", &cert.display().to_string()]);
    assert_eq!(shown(&show, "serial"), serial);
    assert_eq!(
        shown(&show, "SHA-256 fingerprint").replace(':', ""),
        fingerprint
    );

    let events = audit_events(&db, "certificate.issued");
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e["seq"], issued_seq, "{e}");
    assert_eq!(e["actor"], OPERATOR, "{e}");
    assert_eq!(e["subject"], "spiffe://e2e/site/st-mary/node", "{e}");
    let p = &e["payload"];
    assert_eq!(p["serial"], serial.as_str(), "{e}");
    assert_eq!(p["sha256_fingerprint"], fingerprint.as_str(), "{e}");
    assert_eq!(p["not_before"], shown(&show, "not before").as_str(), "{e}");
    assert_eq!(p["not_after"], shown(&show, "not after").as_str(), "{e}");
    assert_eq!(p.as_object().unwrap().len(), 4, "nothing else in {e}");
    // The validity is the certificate's own, as x509-parser reads it: --days 30.
    let der = der_of(&cert);
    let (_, parsed) = X509Certificate::from_der(&der).unwrap();
    let validity = parsed.validity();
    let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
    assert_eq!(days, 30, "{e}");

    // Revoke it, recorded as the operator with the reason and the number of the new CRL.
    let out = ok(&[
        &[
            "pki",
            "revoke",
            "--ca",
            &ca,
            "--serial",
            &serial,
            "--reason",
            "superseded",
        ][..],
        &as_operator,
    ]
    .concat());
    let revoked_seq = recorded_seq(&out, "certificate.revoked");
    assert!(revoked_seq > issued_seq, "{out}");
    let crl_der = der_of(&d.join("ca/crl.pem"));
    let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
    let crl_number = crl
        .crl_number()
        .expect("the CA's CRLs are numbered")
        .to_string();
    assert!(
        crl.iter_revoked_certificates()
            .any(|r| serial_hex(r.raw_serial()) == serial),
        "the CRL lists {serial}"
    );
    let events = audit_events(&db, "certificate.revoked");
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e["seq"], revoked_seq, "{e}");
    assert_eq!(e["actor"], OPERATOR, "{e}");
    assert_eq!(e["subject"], "spiffe://e2e/site/st-mary/node", "{e}");
    let p = &e["payload"];
    assert_eq!(p["serial"], serial.as_str(), "{e}");
    assert_eq!(p["reason"], "superseded", "{e}");
    assert_eq!(p["crl_number"].to_string(), crl_number, "{e}");
    assert_eq!(p.as_object().unwrap().len(), 3, "nothing else in {e}");

    // The shipped rule let the operator write; the service recorded its decisions.
    let is_append = |e: &serde_json::Value, who: &str, allowed: bool| {
        e["payload"]["who"] == who
            && e["payload"]["method"] == "/tutela.v1.Audit/Append"
            && e["payload"]["allowed"] == allowed
    };
    let decisions = decisions_until(&db, |d| {
        d.iter().filter(|e| is_append(e, OPERATOR, true)).count() == 2
    });
    for e in decisions.iter().filter(|e| is_append(e, OPERATOR, true)) {
        assert_eq!(
            e["payload"]["rule"], "p, operator, consortium, audit, write, allow",
            "{e}"
        );
    }

    // Nothing listens at --audit: the certificate is issued, the command fails and says so.
    let dead = format!("localhost:{}", free_port());
    let general = ["--role", "node", "--site", "general"];
    let err = fails(
        &[
            &["pki", "issue", "--ca", &ca, "--out", &arg("general")][..],
            &general,
            &[
                "--audit",
                &dead,
                "--audit-tls-dir",
                &arg("op"),
                "--audit-stem",
                "operator-op",
            ],
        ]
        .concat(),
    );
    let cert = d.join("general/node.crt");
    assert!(
        cert.is_file() && d.join("general/node.key").is_file(),
        "{err}"
    );
    let (serial, fingerprint) = serial_and_fingerprint(&cert);
    for needle in [
        "spiffe://e2e/site/general/node",
        "WAS issued",
        "NOT recorded in the audit trail",
        &dead,
        "cannot connect",
        "action:  certificate.issued",
        "subject: spiffe://e2e/site/general/node",
        &format!("\"serial\":\"{serial}\""),
        &format!("\"sha256_fingerprint\":\"{fingerprint}\""),
        "\"not_before\":",
        "\"not_after\":",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from\n{err}");
    }
    // The CA recorded it in its index all the same.
    let index = std::fs::read_to_string(d.join("ca/index.json")).unwrap();
    assert!(index.contains(&serial), "{index}");

    // An auditor may not write: issued, not recorded, and the refusal names the deny rule.
    let riverside = ["--role", "node", "--site", "riverside"];
    let err = fails(
        &[
            &["pki", "issue", "--ca", &ca, "--out", &arg("riverside")][..],
            &riverside,
            &[
                "--audit",
                &audit,
                "--audit-tls-dir",
                &arg("dana"),
                "--audit-stem",
                "user-dana",
            ],
        ]
        .concat(),
    );
    assert!(d.join("riverside/node.crt").is_file(), "{err}");
    for needle in [
        "WAS issued",
        "NOT recorded in the audit trail",
        "p, auditor, *, audit, write, deny",
        &format!("as {AUDITOR}"),
        "subject: spiffe://e2e/site/riverside/node",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from\n{err}");
    }
    decisions_until(&db, |d| d.iter().any(|e| is_append(e, AUDITOR, false)));

    // Options that cannot record change nothing: no certificate, no index entry.
    let err = fails(
        &[
            &["pki", "issue", "--ca", &ca, "--out", &arg("north")][..],
            &["--role", "node", "--site", "north", "--audit", &audit],
        ]
        .concat(),
    );
    assert!(
        err.contains("--audit-tls-dir") && err.contains("nothing was done"),
        "{err}"
    );
    assert!(!d.join("north").exists());
    assert!(
        !std::fs::read_to_string(d.join("ca/index.json"))
            .unwrap()
            .contains("north")
    );

    // Still one event of each: the failed attempts left nothing behind, and the trail verifies.
    assert_eq!(audit_events(&db, "certificate.issued").len(), 1);
    assert_eq!(audit_events(&db, "certificate.revoked").len(), 1);
    let out = ok(&[
        "audit",
        "verify",
        "--database-url",
        &format!("sqlite://{}", db.display()),
        "--public-key",
        &data.join("checkpoint.key.pub").display().to_string(),
        "--ca",
        &arg("ca/ca.crt"),
        "--ca-admin",
        OPERATOR,
    ]);
    assert!(out.starts_with("OK: "), "{out}");
    // Told no CA administrator, the reader does not believe the certificate events.
    let err = fails(&[
        "audit",
        "verify",
        "--database-url",
        &format!("sqlite://{}", db.display()),
        "--public-key",
        &data.join("checkpoint.key.pub").display().to_string(),
    ]);
    assert!(
        err.contains("certificate.issued") && err.contains("only a CA administrator"),
        "{err}"
    );
}
