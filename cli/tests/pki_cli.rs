//! `tutela pki ...` end to end: the real binary, real files in a scratch directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use tutela_protocol::pki::{Description, describe, describe_all, serial_of_cert_der};

/// A scratch directory under cargo's per-target temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "pki_cli-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn arg(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tutela(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tutela"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TUTELA_AUDIT")
        .env_remove("TUTELA_AUDIT_TLS_DIR")
        .env_remove("TUTELA_AUDIT_STEM")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = tutela(args);
    assert!(
        out.status.success(),
        "tutela {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = tutela(args);
    assert!(
        !out.status.success(),
        "tutela {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn cert_serial(path: &Path) -> String {
    let Description::Certificate(d) = describe(&read(path)).unwrap() else {
        panic!("{} is not a certificate", path.display())
    };
    d.serial_hex
}

fn init(s: &Scratch) {
    ok(&["pki", "init", "--consortium", "acme", "--out", &s.arg("ca")]);
}

#[test]
fn init_issue_show_revoke_crl_show() {
    let s = Scratch::new("flow");
    let out = ok(&["pki", "init", "--consortium", "acme", "--out", &s.arg("ca")]);
    assert!(out.contains("acme"), "{out}");
    for f in ["ca.crt", "ca.key", "index.json", "crl.pem"] {
        assert!(s.path("ca").join(f).is_file(), "{f}");
    }
    assert_eq!(mode(&s.path("ca/ca.key")), 0o600);

    let out = ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "node",
        "--site",
        "st-mary",
        "--out",
        &s.arg("node"),
    ]);
    assert!(out.contains("spiffe://acme/site/st-mary/node"), "{out}");
    let serial = cert_serial(&s.path("node/node.crt"));
    assert!(out.contains(&serial), "the serial is printed:\n{out}");
    assert_eq!(mode(&s.path("node/node.key")), 0o600);
    assert_eq!(read(&s.path("node/ca.crt")), read(&s.path("ca/ca.crt")));
    assert!(read(&s.path("node/node.key")).contains("BEGIN PRIVATE KEY"));
    assert!(read(&s.path("ca/index.json")).contains(&serial));

    let shown = ok(&["pki", "show", &s.arg("node/node.crt")]);
    for needle in [
        "spiffe://acme/site/st-mary/node",
        &serial,
        "clientAuth",
        "digitalSignature",
    ] {
        assert!(shown.contains(needle), "{needle} missing from\n{shown}");
    }
    assert!(!shown.contains("serverAuth"), "{shown}");

    // Revoke with the serial as another tool would print it.
    let typed = format!("0x{}", serial.to_uppercase());
    let out = ok(&[
        "pki",
        "revoke",
        "--ca",
        &s.arg("ca"),
        "--serial",
        &typed,
        "--reason",
        "key-compromise",
    ]);
    assert!(out.contains(&serial) && out.contains("crl.pem"), "{out}");
    let crl_in_ca = ok(&["pki", "show", &s.arg("ca/crl.pem")]);
    assert!(
        crl_in_ca.contains(&serial),
        "crl.pem is refreshed on revoke:\n{crl_in_ca}"
    );

    ok(&[
        "pki",
        "crl",
        "--ca",
        &s.arg("ca"),
        "--out",
        &s.arg("published/crl.pem"),
        "--next-update-days",
        "2",
    ]);
    let shown = ok(&["pki", "show", &s.arg("published/crl.pem")]);
    assert!(shown.contains("certificate revocation list"), "{shown}");
    assert!(shown.contains(&serial), "{shown}");
    assert!(shown.contains("key-compromise"), "{shown}");
    let Description::Crl(crl) = describe(&read(&s.path("published/crl.pem"))).unwrap() else {
        panic!("not a CRL")
    };
    assert_eq!(crl.revoked.len(), 1);
    assert_eq!(
        crl.crl_number.as_deref(),
        Some("3"),
        "init wrote 1, revoke 2"
    );
    let days = (crl.next_update.unwrap() - crl.this_update).whole_hours();
    assert_eq!(days, 48);

    // The published CRL is not overwritten without --force.
    let err = fails(&[
        "pki",
        "crl",
        "--ca",
        &s.arg("ca"),
        "--out",
        &s.arg("published/crl.pem"),
    ]);
    assert!(
        err.contains("already exists; pass --force to overwrite"),
        "{err}"
    );
    ok(&[
        "pki",
        "crl",
        "--ca",
        &s.arg("ca"),
        "--out",
        &s.arg("published/crl.pem"),
        "--force",
    ]);

    // Revoking twice, or an unknown serial, says so.
    let err = fails(&["pki", "revoke", "--ca", &s.arg("ca"), "--serial", &serial]);
    assert!(err.contains("already revoked"), "{err}");
    let err = fails(&["pki", "revoke", "--ca", &s.arg("ca"), "--serial", "3f:a1"]);
    assert!(
        err.contains(&format!(
            "serial 3fa1 is not in the CA index {}",
            s.path("ca/index.json").display()
        )),
        "{err}"
    );
}

#[test]
fn a_second_init_refuses_without_force_and_changes_nothing() {
    let s = Scratch::new("reinit");
    init(&s);
    let key = std::fs::read(s.path("ca/ca.key")).unwrap();
    let cert = std::fs::read(s.path("ca/ca.crt")).unwrap();
    let err = fails(&["pki", "init", "--consortium", "acme", "--out", &s.arg("ca")]);
    assert!(
        err.contains(&format!(
            "{} already exists; pass --force to overwrite",
            s.path("ca/ca.key").display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(s.path("ca/ca.key")).unwrap(), key);
    assert_eq!(std::fs::read(s.path("ca/ca.crt")).unwrap(), cert);

    ok(&[
        "pki",
        "init",
        "--consortium",
        "acme",
        "--out",
        &s.arg("ca"),
        "--force",
        "--algorithm",
        "ed25519",
    ]);
    assert_ne!(std::fs::read(s.path("ca/ca.key")).unwrap(), key);
    assert_eq!(mode(&s.path("ca/ca.key")), 0o600);
    let shown = ok(&["pki", "show", &s.arg("ca/ca.crt")]);
    assert!(
        shown.contains("Ed25519") && shown.contains("CA certificate"),
        "{shown}"
    );
}

#[test]
fn issue_checks_the_principal_and_its_outputs_before_issuing() {
    let s = Scratch::new("issue");
    init(&s);
    let err = fails(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "node",
        "--out",
        &s.arg("n"),
    ]);
    assert!(err.contains("--site"), "{err}");
    assert!(err.contains("a node identity needs a site"), "{err}");
    let err = fails(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "operator",
        "--site",
        "x",
        "--name",
        "bob",
        "--out",
        &s.arg("n"),
    ]);
    assert!(err.contains("takes no site"), "{err}");
    assert!(
        !s.path("n").exists(),
        "nothing is written for a refused command"
    );

    let args = [
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
        &s.arg("u"),
    ];
    ok(&args);
    let first = read(&s.path("u/user-alice.crt"));
    let shown = ok(&["pki", "show", &s.arg("u/user-alice.crt")]);
    assert!(
        shown.contains("spiffe://acme/site/st-mary/user/alice"),
        "{shown}"
    );
    assert!(shown.contains("contentCommitment"), "{shown}");

    // Again into the same directory: refused before anything is issued or written.
    let err = fails(&args);
    assert!(
        err.contains("user-alice.crt already exists; pass --force"),
        "{err}"
    );
    assert_eq!(read(&s.path("u/user-alice.crt")), first);
    assert_eq!(
        read(&s.path("ca/index.json")).matches("\"serial\"").count(),
        1
    );

    let mut forced = args.to_vec();
    forced.push("--force");
    ok(&forced);
    assert_ne!(read(&s.path("u/user-alice.crt")), first);
    assert_eq!(mode(&s.path("u/user-alice.key")), 0o600);
    assert_eq!(
        read(&s.path("ca/index.json")).matches("\"serial\"").count(),
        2
    );

    // An identical ca.crt is no conflict: a second principal can share the directory.
    ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "operator",
        "--name",
        "bob",
        "--out",
        &s.arg("u"),
    ]);
    assert!(s.path("u/operator-bob.crt").is_file());
}

#[test]
fn servers_default_to_localhost_and_loopback() {
    let s = Scratch::new("server");
    init(&s);
    ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "coordinator",
        "--out",
        &s.arg("c"),
    ]);
    let Description::Certificate(d) = describe(&read(&s.path("c/coordinator.crt"))).unwrap() else {
        panic!("not a certificate")
    };
    assert_eq!(d.dns_names, vec!["localhost"]);
    let ips: Vec<String> = d.ip_addresses.iter().map(|i| i.to_string()).collect();
    assert_eq!(ips, vec!["127.0.0.1", "::1"]);
    assert_eq!(d.extended_key_usages, vec!["serverAuth", "clientAuth"]);

    ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "audit",
        "--dns",
        "audit.example.org",
        "--days",
        "30",
        "--out",
        &s.arg("a"),
    ]);
    let Description::Certificate(d) = describe(&read(&s.path("a/audit.crt"))).unwrap() else {
        panic!("not a certificate")
    };
    assert_eq!(d.dns_names, vec!["audit.example.org"]);
    assert!(d.ip_addresses.is_empty());
    assert_eq!((d.not_after - d.not_before).whole_days(), 30);

    // A node gets no names unless asked.
    ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "node",
        "--site",
        "a",
        "--out",
        &s.arg("n"),
    ]);
    let Description::Certificate(d) = describe(&read(&s.path("n/node.crt"))).unwrap() else {
        panic!("not a certificate")
    };
    assert!(d.dns_names.is_empty() && d.ip_addresses.is_empty());
}

#[test]
fn csr_then_sign_and_a_mismatching_site_is_refused() {
    let s = Scratch::new("csr");
    init(&s);
    let out = ok(&[
        "pki",
        "csr",
        "--consortium",
        "acme",
        "--role",
        "node",
        "--site",
        "st-mary",
        "--out",
        &s.arg("site"),
    ]);
    assert!(out.contains("spiffe://acme/site/st-mary/node"), "{out}");
    assert_eq!(mode(&s.path("site/node.key")), 0o600);
    let shown = ok(&["pki", "show", &s.arg("site/node.csr")]);
    assert!(shown.contains("certificate signing request"), "{shown}");
    assert!(shown.contains("spiffe://acme/site/st-mary/node"), "{shown}");

    let err = fails(&[
        "pki",
        "sign",
        "--ca",
        &s.arg("ca"),
        "--csr",
        &s.arg("site/node.csr"),
        "--role",
        "node",
        "--site",
        "general",
        "--out",
        &s.arg("site/node.crt"),
    ]);
    assert!(
        err.contains("CSR carries identity spiffe://acme/site/st-mary/node but the CA was asked to sign for spiffe://acme/site/general/node"),
        "{err}"
    );
    assert!(!s.path("site/node.crt").exists());
    assert!(!read(&s.path("ca/index.json")).contains("general"));

    let out = ok(&[
        "pki",
        "sign",
        "--ca",
        &s.arg("ca"),
        "--csr",
        &s.arg("site/node.csr"),
        "--role",
        "node",
        "--site",
        "st-mary",
        "--days",
        "10",
        "--out",
        &s.arg("site/node.crt"),
    ]);
    let cert = read(&s.path("site/node.crt"));
    let der = rustls_pki_types_der(&cert);
    let serial = serial_of_cert_der(&der).unwrap();
    assert!(out.contains(&serial), "{out}");
    assert!(read(&s.path("ca/index.json")).contains(&serial));
    let shown = ok(&["pki", "show", &s.arg("site/node.crt")]);
    assert!(shown.contains("spiffe://acme/site/st-mary/node"), "{shown}");

    // The signed certificate is revocable like an issued one.
    ok(&[
        "pki",
        "revoke",
        "--ca",
        &s.arg("ca"),
        "--serial",
        &serial,
        "--reason",
        "superseded",
    ]);

    // Signing again over the same output needs --force.
    let err = fails(&[
        "pki",
        "sign",
        "--ca",
        &s.arg("ca"),
        "--csr",
        &s.arg("site/node.csr"),
        "--role",
        "node",
        "--site",
        "st-mary",
        "--out",
        &s.arg("site/node.crt"),
    ]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn show_describes_every_block_of_a_chain_and_refuses_keys() {
    let s = Scratch::new("show");
    init(&s);
    ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "audit",
        "--out",
        &s.arg("a"),
    ]);
    let chain = format!(
        "{}{}",
        read(&s.path("a/audit.crt")),
        read(&s.path("a/ca.crt"))
    );
    std::fs::write(s.path("chain.pem"), &chain).unwrap();
    let shown = ok(&["pki", "show", &s.arg("chain.pem")]);
    assert_eq!(describe_all(&chain).unwrap().len(), 2);
    assert!(shown.contains("spiffe://acme/audit"), "{shown}");
    assert!(shown.contains("CA certificate"), "{shown}");
    assert!(shown.contains("path length 0"), "{shown}");

    let err = fails(&["pki", "show", &s.arg("a/audit.key")]);
    assert!(err.contains("PRIVATE KEY"), "{err}");
    let err = fails(&["pki", "show", &s.arg("missing.pem")]);
    assert!(err.contains("missing.pem"), "{err}");
}

#[test]
fn help_explains_every_command() {
    let help = ok(&["pki", "--help"]);
    for cmd in ["init", "issue", "csr", "sign", "revoke", "crl", "show"] {
        assert!(help.contains(cmd), "{cmd} missing from\n{help}");
    }
    let issue = ok(&["pki", "issue", "--help"]);
    for needle in [
        "--role",
        "--site",
        "--name",
        "--dns",
        "--ip",
        "localhost",
        "0600",
        "--force",
    ] {
        assert!(issue.contains(needle), "{needle} missing from\n{issue}");
    }
    let revoke = ok(&["pki", "revoke", "--help"]);
    assert!(
        revoke.contains("key-compromise") && revoke.contains("cessation-of-operation"),
        "{revoke}"
    );
    // issue, sign and revoke explain how they record their event in the audit trail.
    for (cmd, event) in [
        ("issue", "certificate.issued"),
        ("sign", "certificate.issued"),
        ("revoke", "certificate.revoked"),
    ] {
        // Words only: the help is wrapped to the terminal's width.
        let help = ok(&["pki", cmd, "--help"])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for needle in [
            "--audit <HOST:PORT>",
            "--audit-tls-dir <DIR>",
            "--audit-stem <STEM>",
            "TUTELA_AUDIT",
            "not recorded",
            "record by hand",
            "audit, write",
            event,
        ] {
            assert!(
                help.contains(needle),
                "{needle} missing from {cmd} --help:\n{help}"
            );
        }
    }
    let err = fails(&[
        "pki", "revoke", "--ca", "x", "--serial", "01", "--reason", "stolen",
    ]);
    assert!(err.contains("invalid value 'stolen'"), "{err}");
}

/// A loopback address where nothing listens (a port bound, then released).
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

fn certificate(path: &Path) -> tutela_protocol::pki::CertificateDescription {
    let Description::Certificate(d) = describe(&read(path)).unwrap() else {
        panic!("{} is not a certificate", path.display())
    };
    d
}

#[test]
fn audit_options_are_checked_before_anything_is_done() {
    let s = Scratch::new("audit-opts");
    init(&s);
    let out = ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "operator",
        "--name",
        "op",
        "--out",
        &s.arg("op"),
    ]);
    assert!(
        out.contains("audit:        not recorded in an audit trail (no --audit given)"),
        "{out}"
    );
    let index = read(&s.path("ca/index.json"));
    let node = [
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "node",
        "--site",
        "st-mary",
        "--out",
        &s.arg("node"),
    ];
    let dead = dead_address();
    let op_dir = s.arg("op");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--audit", &dead],
            "--audit-tls-dir DIR and --audit-stem STEM",
        ),
        (
            &["--audit-tls-dir", &op_dir, "--audit-stem", "operator-op"],
            "no --audit HOST:PORT",
        ),
        // No such certificate.
        (
            &[
                "--audit",
                &dead,
                "--audit-tls-dir",
                &op_dir,
                "--audit-stem",
                "operator-ed",
            ],
            "cannot load the client certificate",
        ),
        // The CA's own certificate and key: it names no identity to act as.
        (
            &[
                "--audit",
                &dead,
                "--audit-tls-dir",
                &op_dir,
                "--audit-stem",
                "../ca/ca",
            ],
            "cannot load the client certificate",
        ),
    ];
    for (flags, needle) in cases {
        let err = fails(&[&node[..], flags].concat());
        assert!(
            err.contains(needle) && err.contains("nothing was done"),
            "{flags:?}: {err}"
        );
        assert!(!s.path("node").exists(), "{flags:?}");
        assert_eq!(read(&s.path("ca/index.json")), index, "{flags:?}");
    }

    // A client certificate of another consortium is refused before issuing.
    ok(&[
        "pki",
        "init",
        "--consortium",
        "other",
        "--out",
        &s.arg("other-ca"),
    ]);
    ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("other-ca"),
        "--role",
        "operator",
        "--name",
        "op",
        "--out",
        &s.arg("other-op"),
    ]);
    let other_dir = s.arg("other-op");
    let err = fails(
        &[
            &node[..],
            &[
                "--audit",
                &dead,
                "--audit-tls-dir",
                &other_dir,
                "--audit-stem",
                "operator-op",
            ],
        ]
        .concat(),
    );
    assert!(
        err.contains("of consortium \"other\"") && err.contains("nothing was done"),
        "{err}"
    );
    assert!(!s.path("node").exists());
    assert_eq!(read(&s.path("ca/index.json")), index);
}

#[test]
fn an_unrecorded_sign_or_revoke_fails_after_the_fact_and_prints_the_event() {
    let s = Scratch::new("audit-down");
    init(&s);
    ok(&[
        "pki",
        "issue",
        "--ca",
        &s.arg("ca"),
        "--role",
        "operator",
        "--name",
        "op",
        "--out",
        &s.arg("op"),
    ]);
    ok(&[
        "pki",
        "csr",
        "--consortium",
        "acme",
        "--role",
        "node",
        "--site",
        "st-mary",
        "--out",
        &s.arg("site"),
    ]);
    let dead = dead_address();
    let op_dir = s.arg("op");
    let audit = [
        "--audit",
        &dead,
        "--audit-tls-dir",
        &op_dir,
        "--audit-stem",
        "operator-op",
    ];

    // The CSR is signed and the certificate written; the event is not recorded, and printed.
    let err = fails(
        &[
            &[
                "pki",
                "sign",
                "--ca",
                &s.arg("ca"),
                "--csr",
                &s.arg("site/node.csr"),
                "--role",
                "node",
                "--site",
                "st-mary",
                "--out",
                &s.arg("site/node.crt"),
            ][..],
            &audit,
        ]
        .concat(),
    );
    let cert = certificate(&s.path("site/node.crt"));
    assert!(read(&s.path("ca/index.json")).contains(&cert.serial_hex));
    for needle in [
        format!(
            "the certificate for spiffe://acme/site/st-mary/node (serial {}) WAS issued",
            cert.serial_hex
        ),
        format!("NOT recorded in the audit trail at {dead}: cannot connect to {dead}"),
        "record this event by hand (tutela.v1.Audit/Append, as spiffe://acme/operator/op)"
            .to_string(),
        "action:  certificate.issued".to_string(),
        "subject: spiffe://acme/site/st-mary/node".to_string(),
        format!(
            "payload: {{\"not_after\":\"{}\",\"not_before\":\"{}\",\"serial\":\"{}\",\"sha256_fingerprint\":\"{}\"}}",
            rfc3339(cert.not_after),
            rfc3339(cert.not_before),
            cert.serial_hex,
            cert.sha256_fingerprint.replace(':', "")
        ),
    ] {
        assert!(err.contains(&needle), "{needle:?} missing from\n{err}");
    }

    // The revocation is done and crl.pem lists it; the event names that CRL's number.
    let err = fails(
        &[
            &[
                "pki",
                "revoke",
                "--ca",
                &s.arg("ca"),
                "--serial",
                &cert.serial_hex,
                "--reason",
                "key-compromise",
            ][..],
            &audit,
        ]
        .concat(),
    );
    let Description::Crl(crl) = describe(&read(&s.path("ca/crl.pem"))).unwrap() else {
        panic!("crl.pem holds no CRL")
    };
    assert!(crl.revoked.iter().any(|r| r.serial_hex == cert.serial_hex));
    let number = u64::from_str_radix(crl.crl_number.as_deref().unwrap(), 16).unwrap();
    for needle in [
        format!(
            "the certificate of spiffe://acme/site/st-mary/node (serial {}) WAS revoked and {} refreshed",
            cert.serial_hex,
            s.path("ca/crl.pem").display()
        ),
        format!("NOT recorded in the audit trail at {dead}"),
        "action:  certificate.revoked".to_string(),
        format!(
            "payload: {{\"crl_number\":{number},\"reason\":\"key-compromise\",\"serial\":\"{}\"}}",
            cert.serial_hex
        ),
    ] {
        assert!(err.contains(&needle), "{needle:?} missing from\n{err}");
    }
    let err = fails(&[
        "pki",
        "revoke",
        "--ca",
        &s.arg("ca"),
        "--serial",
        &cert.serial_hex,
    ]);
    assert!(err.contains("already revoked"), "{err}");
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn rustls_pki_types_der(pem: &str) -> Vec<u8> {
    let Some(block) = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END CERTIFICATE-----").next())
    else {
        panic!("no certificate in {pem}")
    };
    decode_base64(&block.split_whitespace().collect::<String>())
}

fn decode_base64(text: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

// `tutela model ...` lives in a module of this, the CLI's one integration-test binary.
#[path = "pki_cli/model_cli.rs"]
mod model_cli;

// `tutela privacy ...`, likewise.
#[path = "pki_cli/privacy_cli.rs"]
mod privacy_cli;
#[path = "pki_cli/watermark_cli.rs"]
mod watermark_cli;

// `tutela pki issue --pkcs12` and `tutela audit verify-proof`, the console's two CLI parts.
#[path = "pki_cli/console_cli.rs"]
mod console_cli;

// `tutela audit report --format html|pdf` and `tutela audit verify-report`.
#[path = "pki_cli/report_cli.rs"]
mod report_cli;
