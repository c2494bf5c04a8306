//! The compliance officers' console, served by a real `tutela-audit` server (in process) over
//! real mutual TLS, with a trail appended through the real client by the coordinator's, the
//! sites' nodes' and the officers' own certificates, under the shipped policy
//! (deploy/policy/). Headless Chromium (Debian's `chromium`) opens every page as an officer whose
//! PKCS#12 is imported into an NSS database under a temporary HOME, and writes screenshots under
//! `$TUTELA_ARTIFACTS` (default `target/test-artifacts/console`). A plain rustls client checks
//! what a browser cannot show exactly: the headers, the 403 for a site node, the handshake
//! refused without a certificate, and the proof file.
//!
//! Without Chromium the browser part says so on stderr and is skipped, unless
//! `TUTELA_REQUIRE_CHROMIUM=1` (set by scripts/test.sh, which installs it), where it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tutela_audit::client::AuditClient;
use tutela_audit::payload::privacy::PrivacySpent;
use tutela_audit::payload::{
    DatasetDeidentified, JobApproved, JobCompleted, JobProposed, JobRejected, JobStarted,
    ModelPublished, RoundCompleted, SiteRoundMetrics, UpdateRefused,
};
use tutela_audit::proof_file::ProofFile;
use tutela_audit::store::AuditStore;
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::tls::{TlsFiles, TlsMaterial};

pub(super) const JOB: &str = "job-7f3a";
const REJECTED_JOB: &str = "job-9c01";
const MODEL: &str = "5e1d0c2b9a8f7e6d5c4b3a291807f6e5d4c3b2a1908f7e6d5c4b3a2918070605";
const SPEC: [u8; 32] = [0x4a; 32];
const ALICE: &str = "spiffe://acme/site/st-mary/user/alice";
const BOB: &str = "spiffe://acme/site/general/user/bob";

/// The consortium of the shipped policy: its CA, and a certificate for everyone the test acts as.
pub(super) struct Consortium {
    pub(super) dir: tempfile::TempDir,
    pub(super) ca: CaDir,
}

impl Consortium {
    pub(super) fn new() -> Consortium {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(
            &dir.path().join("ca"),
            "acme",
            KeyAlgorithm::EcdsaP256,
            30,
            false,
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("certs/ca.crt"), ca.ca().cert_pem()).unwrap();
        let c = Consortium { dir, ca };
        let mut server = LeafOptions::new(Validity::days_from_now(30));
        server.dns_names = vec!["localhost".into()];
        server.ip_addresses = vec!["127.0.0.1".parse().unwrap()];
        c.issue("audit", &Principal::Audit, &server);
        let client = LeafOptions::new(Validity::days_from_now(30));
        c.issue("coordinator", &Principal::Coordinator, &client);
        for site in ["st-mary", "general"] {
            c.issue(
                &format!("node-{site}"),
                &Principal::Node { site: site.into() },
                &client,
            );
        }
        for (site, name) in [
            ("st-mary", "alice"),
            ("general", "bob"),
            ("general", "dana"),
        ] {
            let p = Principal::User {
                site: site.into(),
                name: name.into(),
            };
            c.issue(name, &p, &client);
        }
        c.issue("op", &Principal::Operator { name: "op".into() }, &client);
        c
    }

    pub(super) fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub(super) fn issue(&self, stem: &str, p: &Principal, o: &LeafOptions) {
        let issued = self.ca.issue(p, o).unwrap();
        std::fs::write(self.certs().join(format!("{stem}.crt")), &issued.cert_pem).unwrap();
        std::fs::write(self.certs().join(format!("{stem}.key")), &issued.key_pem).unwrap();
    }

    fn files(&self, stem: &str) -> TlsFiles {
        let mut f = TlsFiles::in_dir(&self.certs(), stem);
        f.crl = Some(self.ca.crl_path());
        f
    }

    fn material(&self, stem: &str) -> TlsMaterial {
        TlsMaterial::load(&self.files(stem)).unwrap()
    }

    /// `stem`'s certificate, key and the CA as the PKCS#12 file `tutela pki issue --pkcs12`
    /// writes, as an officer imports it into a browser.
    fn pkcs12(&self, stem: &str, out: &Path) {
        let read = |ext: &str| {
            std::fs::read_to_string(self.certs().join(format!("{stem}.{ext}"))).unwrap()
        };
        let p12 = tutela_protocol::pki::pkcs12::to_pkcs12(
            &read("crt"),
            &read("key"),
            &self.ca.ca().cert_pem(),
            stem,
            "console-test",
        )
        .unwrap();
        std::fs::write(out, p12).unwrap();
    }

    fn signing_key(&self, stem: &str) -> EcdsaKeyPair {
        let pem = std::fs::read_to_string(self.certs().join(format!("{stem}.key"))).unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &block.contents,
            &SystemRandom::new(),
        )
        .unwrap()
    }
}

/// A running audit service with its console.
pub(super) struct Service {
    pub(super) grpc: SocketAddr,
    pub(super) console: SocketAddr,
    pub(super) db: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(super) async fn start_service(c: &Consortium) -> Service {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = c.dir.path().join("audit");
    let console_port = free_port();
    let text = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{data}"
checkpoint_interval_secs = 1
[tls]
ca = "{certs}/ca.crt"
cert = "{certs}/audit.crt"
key = "{certs}/audit.key"
crl = "{crl}"
[policy]
model = "{repo}/deploy/policy/model.conf"
policy = "{repo}/deploy/policy/policy.csv"
[console]
listen = "127.0.0.1:{console_port}"
verify_interval_secs = 1
page_size = 5
"#,
        data = data.display(),
        certs = c.certs().display(),
        crl = c.ca.crl_path().display(),
        repo = repo.display(),
    );
    let path = c.dir.path().join("audit.toml");
    std::fs::write(&path, text).unwrap();
    let config = tutela_audit::server::Config::from_file(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tutela_audit::server::Server::load(config).await.unwrap();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let console: SocketAddr = format!("127.0.0.1:{console_port}").parse().unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(console).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Service {
        grpc,
        console,
        db: data.join("audit.db"),
        stop: Some(stop),
        task,
    }
}

impl Service {
    pub(super) async fn client(&self, c: &Consortium, stem: &str) -> AuditClient {
        let expect = Identity::new("acme", Principal::Audit).unwrap();
        let tls = ClientTls::from_material(&c.material(stem), Some(expect)).unwrap();
        AuditClient::connect(&format!("localhost:{}", self.grpc.port()), tls)
            .await
            .unwrap()
    }

    pub(super) async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn approval(c: &Consortium, stem: &str, site: &str, job: &str) -> JobApproved {
    let (from, until) = (1_700_000_000_000, 4_000_000_000_000);
    let message =
        tutela_audit::approval::policy_signed_message(job, &hex::encode(SPEC), from, until);
    let sig = c
        .signing_key(stem)
        .sign(&SystemRandom::new(), &message)
        .unwrap();
    JobApproved {
        spec_digest: hex::encode(SPEC),
        signature: hex::encode(sig.as_ref()),
        certificate: std::fs::read_to_string(c.certs().join(format!("{stem}.crt"))).unwrap(),
        site: Some(site.into()),
        officer: None,
        signed_at_ms: Some(from),
        expires_at_ms: Some(until),
    }
}

fn proposal(name: &str) -> JobProposed {
    let privacy = json!({"mode": "local", "target_epsilon": 3.0, "delta": 1e-5});
    // The caps the sites page draws come from this, read as the typed spec.
    serde_json::from_value::<tutela_protocol::job::PrivacySpec>(privacy.clone())
        .expect("the test's privacy section is a valid PrivacySpec");
    JobProposed {
        spec_digest: hex::encode(SPEC),
        code_version: "tutela 0.1.0".into(),
        base_model: "mlp-breast-cancer-v1".into(),
        name: name.into(),
        operator: Some("spiffe://acme/operator/op".into()),
        participants: vec!["general".into(), "st-mary".into()],
        approvers: Some(
            [
                ("st-mary".to_string(), vec![ALICE.to_string()]),
                ("general".to_string(), vec![BOB.to_string()]),
            ]
            .into(),
        ),
        rounds: 2,
        privacy,
        tokenizer_sha256: None,
        base_sha256: None,
        lora: None,
    }
}

pub(super) fn spend(site: &str, round: u32, job_eps: f64, dataset_eps: f64) -> PrivacySpent {
    PrivacySpent {
        site: site.into(),
        dataset: "breast_cancer".into(),
        job: JOB.into(),
        round,
        attempt: 0,
        sample_rate: 0.05,
        noise_multiplier: 1.1,
        steps: 40,
        rows: 180,
        job_epsilon: job_eps,
        dataset_epsilon: dataset_eps,
        delta: 1e-5,
        dataset_delta: 1e-5,
        source: None,
        metrics_noise_multiplier: None,
        metrics_releases: None,
        mechanism: None,
    }
}

fn round(n: u32, sites: &[(&str, f64)]) -> RoundCompleted {
    RoundCompleted {
        round: n,
        attempt: 0,
        participants: sites.iter().map(|(s, _)| s.to_string()).collect(),
        update_digests: sites
            .iter()
            .map(|(s, _)| (s.to_string(), format!("{:0>64}", format!("{n}{}", s.len()))))
            .collect(),
        metrics: sites
            .iter()
            .map(|(s, e)| {
                (
                    s.to_string(),
                    SiteRoundMetrics {
                        epsilon: Some(*e),
                        round_epsilon: Some(*e / f64::from(n)),
                        delta: Some(1e-5),
                        dataset_commitment: Some(format!("c0ffee{:0>58}", s.len())),
                        train_samples: Some(180),
                        eval_accuracy: Some(0.93),
                    },
                )
            })
            .collect(),
        model_id: None,
        aggregation: None,
    }
}

/// The seqs of events the test looks at again.
pub(super) struct Seqs {
    proposed: u64,
    st_mary_first_spend: u64,
}

/// A federated job's trail, appended by whoever asserts each event, through the real client.
/// (The service adds its own `policy.decision` events between them.)
pub(super) async fn fill_trail(c: &Consortium, s: &Service) -> Seqs {
    let mut coordinator = s.client(c, "coordinator").await;
    let mut alice = s.client(c, "alice").await;
    let mut bob = s.client(c, "bob").await;
    let mut st_mary = s.client(c, "node-st-mary").await;
    let mut general = s.client(c, "node-general").await;

    let proposed = coordinator
        .append_payload(JOB, &proposal("breast cancer MLP"))
        .await
        .unwrap()
        .seq;
    alice
        .append_payload(JOB, &approval(c, "alice", "st-mary", JOB))
        .await
        .unwrap();
    bob.append_payload(JOB, &approval(c, "bob", "general", JOB))
        .await
        .unwrap();
    coordinator
        .append_payload(
            JOB,
            &JobStarted {
                spec_digest: hex::encode(SPEC),
                approvals: 2,
                participants: vec!["general".into(), "st-mary".into()],
            },
        )
        .await
        .unwrap();
    for (node, site) in [(&mut st_mary, "st-mary"), (&mut general, "general")] {
        let report = json!({
            "config_sha256": "ab".repeat(32), "rows_in": 200, "rows_out": 190,
            "columns_in": ["age"], "columns_out": ["age"], "transforms": [],
            "rows_changed": 200, "cells_changed": 400,
            "k_anonymity": {"k_required": 5, "l_required": null, "k_achieved": 7, "l_achieved": null,
                "rows_in": 200, "suppressed_rows": 10, "suppression_budget": 20,
                "equivalence_classes": 12, "levels": [], "loss_ncp": 0.2, "discernibility": 1,
                "lattice_size": 4, "nodes_evaluated": 4, "search": "exhaustive"}
        });
        node.append_payload(
            &format!("{site}/breast_cancer"),
            &DatasetDeidentified {
                site: site.into(),
                dataset: "breast_cancer".into(),
                job: JOB.into(),
                report,
                dataset_commitment: Some(format!("c0ffee{:0>58}", site.len())),
            },
        )
        .await
        .unwrap();
    }
    let st_mary_first_spend = st_mary
        .append_payload("st-mary/breast_cancer", &spend("st-mary", 1, 0.9, 1.4))
        .await
        .unwrap()
        .seq;
    general
        .append_payload("general/breast_cancer", &spend("general", 1, 0.8, 0.8))
        .await
        .unwrap();
    coordinator
        .append_payload(JOB, &round(1, &[("general", 0.8), ("st-mary", 0.9)]))
        .await
        .unwrap();
    st_mary
        .append_payload("st-mary/breast_cancer", &spend("st-mary", 2, 1.7, 2.2))
        .await
        .unwrap();
    coordinator
        .append_payload(
            JOB,
            &UpdateRefused {
                round: 2,
                attempt: 0,
                site: "general".into(),
                reason: "update norm 12.5 exceeds the bound 10".into(),
            },
        )
        .await
        .unwrap();
    coordinator
        .append_payload(JOB, &round(2, &[("st-mary", 1.7)]))
        .await
        .unwrap();
    coordinator
        .append_payload(
            JOB,
            &JobCompleted {
                model_digest: MODEL.into(),
                rounds: 2,
                epsilon: [("general".to_string(), 0.8), ("st-mary".to_string(), 1.7)].into(),
            },
        )
        .await
        .unwrap();
    coordinator
        .append_payload(
            MODEL,
            &ModelPublished {
                job: JOB.into(),
                model_digest: MODEL.into(),
                spec_digest: hex::encode(SPEC),
                rounds: 2,
                code_version: "tutela 0.1.0".into(),
                base_model: Some("mlp-breast-cancer-v1".into()),
            },
        )
        .await
        .unwrap();
    // A second job, rejected by general's officer.
    coordinator
        .append_payload(REJECTED_JOB, &proposal("too greedy"))
        .await
        .unwrap();
    let signed_at = 1_765_000_000_000;
    let message = tutela_protocol::job::rejection_message(
        REJECTED_JOB,
        &hex::encode(SPEC),
        "ε 3 per job exceeds what our board allows",
        signed_at,
    );
    let sig = c
        .signing_key("bob")
        .sign(&SystemRandom::new(), &message)
        .unwrap();
    bob.append_payload(
        REJECTED_JOB,
        &JobRejected {
            spec_digest: hex::encode(SPEC),
            signature: hex::encode(sig.as_ref()),
            certificate: std::fs::read_to_string(c.certs().join("bob.crt")).unwrap(),
            site: Some("general".into()),
            officer: None,
            reason: "ε 3 per job exceeds what our board allows".into(),
            signed_at_ms: signed_at,
        },
    )
    .await
    .unwrap();
    Seqs {
        proposed,
        st_mary_first_spend,
    }
}

/// An HTTP/1.1 response read by [`https_get`].
pub(super) struct Fetched {
    pub(super) status: u16,
    pub(super) head: String,
    pub(super) body: String,
    /// The body as bytes (a PDF is not UTF-8).
    pub(super) bytes: Vec<u8>,
}

/// GET `path` from the console over TLS as `stem` (no client certificate when `None`), with a
/// plain rustls client; `Err` carries the TLS or I/O failure.
pub(super) async fn https_get(
    c: &Consortium,
    addr: SocketAddr,
    stem: Option<&str>,
    path: &str,
) -> Result<Fetched, String> {
    https_request(c, addr, stem, "GET", path).await
}

async fn https_request(
    c: &Consortium,
    addr: SocketAddr,
    stem: Option<&str>,
    method: &str,
    path: &str,
) -> Result<Fetched, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(c.certs().join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let config = match stem {
        Some(stem) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(
                c.certs().join(format!("{stem}.crt")),
            )
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(
                c.certs().join(format!("{stem}.key")),
            )
            .unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let raw_body = raw.get(at + 4..).unwrap_or_default();
    let bytes = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk_bytes(raw_body)
    } else {
        raw_body.to_vec()
    };
    Ok(Fetched {
        status,
        head: head.to_string(),
        body,
        bytes,
    })
}

fn dechunk_bytes(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&s[..eol]).unwrap_or("0");
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        let rest = &s[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Headless Chromium with its own HOME (an NSS database holding the CA and, for an officer, the
/// imported PKCS#12) and its own empty profile.
struct Browser {
    home: tempfile::TempDir,
    binary: PathBuf,
}

/// Chromium, or `None` (said loudly) when it is not installed and the run does not require it.
fn chromium() -> Option<PathBuf> {
    let binary = std::env::var_os("TUTELA_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if binary.exists() && Path::new("/usr/bin/pk12util").exists() {
        let policy = Path::new("/etc/chromium/policies/managed/tutela-console-tests.json");
        assert!(
            policy.exists(),
            "Chromium is installed but {} is missing: run scripts/setup.sh (it installs the policy that lets headless Chromium present the test officer's certificate to https://127.0.0.1)",
            policy.display()
        );
        return Some(binary);
    }
    let why = format!(
        "Chromium ({}) or pk12util (libnss3-tools) is not installed: the console's browser tests are SKIPPED. Install them with scripts/setup.sh (apt: chromium chromium-driver libnss3-tools).",
        binary.display()
    );
    if std::env::var("TUTELA_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
        panic!("{why} (TUTELA_REQUIRE_CHROMIUM=1)");
    }
    eprintln!("\n*** {why} ***\n");
    None
}

impl Browser {
    fn new(binary: &Path, c: &Consortium, identity: Option<&str>) -> Browser {
        let home = tempfile::tempdir().unwrap();
        let db = home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&db).unwrap();
        let nss = format!("sql:{}", db.display());
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("certutil").args(["-N", "--empty-password", "-d", &nss]));
        run(Command::new("certutil")
            .args([
                "-A",
                "-n",
                "tutela-consortium-ca",
                "-t",
                "C,,",
                "-d",
                &nss,
                "-i",
            ])
            .arg(c.certs().join("ca.crt")));
        if let Some(stem) = identity {
            let p12 = home.path().join(format!("{stem}.p12"));
            c.pkcs12(stem, &p12);
            run(Command::new("pk12util")
                .args(["-d", &nss, "-W", "console-test", "-i"])
                .arg(&p12));
        }
        Browser {
            home,
            binary: binary.to_path_buf(),
        }
    }

    fn command(&self, profile: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.env("HOME", self.home.path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1400,1800",
            ])
            .arg(format!(
                "--user-data-dir={}",
                self.home.path().join(profile).display()
            ));
        cmd
    }

    /// The page's DOM after it loaded.
    fn dom(&self, url: &str) -> String {
        let out = self
            .command("profile-dom")
            .arg("--dump-dom")
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A screenshot of the page, written to `path`.
    fn screenshot(&self, url: &str, path: &Path) {
        let out = self
            .command("profile-shot")
            .arg(format!("--screenshot={}", path.display()))
            .arg(url)
            .output()
            .unwrap();
        assert!(
            path.exists(),
            "no screenshot of {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn artifacts() -> PathBuf {
    let dir = match std::env::var_os("TUTELA_ARTIFACTS") {
        Some(d) => PathBuf::from(d).join("console"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/console"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The text of the element with `id` in `dom` (its first 400 characters), for messages.
fn around<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or(0);
    let end = (at + 400).min(dom.len());
    dom.get(at..end).unwrap_or(dom)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn officers_read_every_page_others_are_refused_and_a_tampered_trail_shows_broken() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = Consortium::new();
    let s = start_service(&c).await;
    let seqs = fill_trail(&c, &s).await;
    let mut client = s.client(&c, "alice").await;
    // The service's own policy.decision events land asynchronously: wait for the log to settle.
    let mut info = client.log_info().await.unwrap();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = client.log_info().await.unwrap();
        if now.size == info.size {
            break;
        }
        info = now;
    }
    let n = info.size;
    let base = format!("https://127.0.0.1:{}", s.console.port());

    // Without a client certificate the handshake is refused (TLS 1.3: at the first read).
    let refused = https_get(&c, s.console, None, "/").await;
    assert!(
        refused.is_err(),
        "a request without a certificate was answered"
    );
    // A site node's certificate: 403, naming the identity and the rule.
    let node = https_get(&c, s.console, Some("node-st-mary"), "/")
        .await
        .unwrap();
    assert_eq!(node.status, 403, "{}", node.body);
    assert!(
        node.body.contains("spiffe://acme/site/st-mary/node"),
        "{}",
        node.body
    );
    assert!(node.body.contains("default deny"), "{}", node.body);
    // An operator: 403 too (the shipped policy gives operators audit write, not read).
    let op = https_get(&c, s.console, Some("op"), "/events")
        .await
        .unwrap();
    assert_eq!(op.status, 403);
    // An officer and an auditor read; every response carries the strict CSP and no script.
    for who in ["alice", "dana"] {
        let r = https_get(&c, s.console, Some(who), "/").await.unwrap();
        assert_eq!(r.status, 200, "{who}: {}", r.body);
        let head = r.head.to_ascii_lowercase();
        assert!(
            head.contains("content-security-policy: default-src 'none'"),
            "{head}"
        );
        assert!(!r.body.contains("<script"), "a page carries a script");
    }

    // Read-only: an officer's POST is answered 405, and nothing is appended.
    let post = https_request(&c, s.console, Some("alice"), "POST", "/events")
        .await
        .unwrap();
    assert_eq!(post.status, 405, "{}", post.body);
    assert!(
        post.head.contains("allow: GET, HEAD") || post.head.contains("Allow: GET, HEAD"),
        "{}",
        post.head
    );

    // Let a checkpoint cover the whole trail and the verifier run.
    let mut intact = String::new();
    for _ in 0..100 {
        intact = https_get(&c, s.console, Some("alice"), "/")
            .await
            .unwrap()
            .body;
        if intact.contains("The trail is intact") && intact.contains(&format!(">{n} events")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(intact.contains("The trail is intact"), "{intact}");
    assert!(
        intact.contains(&format!("id=\"event-count\">{n}<")),
        "{intact}"
    );

    // The event search: keyset pages of 5, filters, and a proof file that verifies offline.
    let page1 = https_get(&c, s.console, Some("alice"), "/events")
        .await
        .unwrap()
        .body;
    let row = |seq: u64| format!("id=\"event-{seq}\"");
    assert!(
        page1.contains(&row(n - 1)) && page1.contains(&row(n - 5)),
        "{page1}"
    );
    assert!(!page1.contains(&row(n - 6)));
    assert!(
        page1.contains(&format!("href=\"/events?before={}\"", n - 5)),
        "{page1}"
    );
    let page2 = https_get(
        &c,
        s.console,
        Some("alice"),
        &format!("/events?before={}", n - 5),
    )
    .await
    .unwrap()
    .body;
    assert!(
        page2.contains(&row(n - 6)) && page2.contains(&row(n - 10)),
        "{page2}"
    );
    assert!(!page2.contains(&row(n - 5)));
    let spends = https_get(
        &c,
        s.console,
        Some("alice"),
        "/events?action=privacy.spent&actor=spiffe%3A%2F%2Facme%2Fsite%2Fst-mary%2Fnode",
    )
    .await
    .unwrap()
    .body;
    assert_eq!(spends.matches("<tr id=\"event-").count(), 2, "{spends}");
    let bad = https_get(&c, s.console, Some("alice"), "/events?action=job.exploded")
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    assert!(
        bad.body
            .contains("action: &#34;job.exploded&#34; is not an action"),
        "{}",
        bad.body
    );
    let proof = https_get(
        &c,
        s.console,
        Some("alice"),
        &format!("/events/{}/proof", seqs.proposed),
    )
    .await
    .unwrap();
    assert_eq!(proof.status, 200);
    assert!(
        proof
            .head
            .to_ascii_lowercase()
            .contains("content-disposition: attachment")
    );
    let file: ProofFile = serde_json::from_str(&proof.body).unwrap();
    let key = info.public_key.clone();
    file.verify(&key)
        .expect("the downloaded proof verifies offline");
    assert_eq!(file.event.seq, seqs.proposed);
    let mut edited = file.clone();
    edited.event.subject = "another-job".into();
    assert!(
        edited.verify(&key).is_err(),
        "an edited proof file verified"
    );
    std::fs::write(artifacts().join("event-proof.json"), &proof.body).unwrap();

    // The browser, as alice with her imported PKCS#12.
    if let Some(chromium) = chromium() {
        let officer = Browser::new(&chromium, &c, Some("alice"));
        let out = artifacts();
        let pages: &[(&str, &str, &[&str])] = &[
            (
                "overview",
                "/",
                &[
                    "The trail is intact",
                    "spiffe://acme/audit",
                    "Newest signed checkpoints",
                ],
            ),
            (
                "events",
                "/events",
                &["model.published", "job.rejected", "Older events"],
            ),
            (
                "jobs",
                "/jobs",
                &[JOB, REJECTED_JOB, "breast cancer MLP", "completed"],
            ),
            (
                "job",
                &format!("/jobs/{JOB}"),
                &[
                    &hex::encode(SPEC),
                    ALICE,
                    BOB,
                    "update norm 12.5 exceeds the bound 10",
                    "0.90",
                    "c0ffee",
                ],
            ),
            (
                "job-rejected",
                &format!("/jobs/{REJECTED_JOB}"),
                &["rejected", "exceeds what our board allows"],
            ),
            (
                "sites",
                "/sites",
                &[
                    "st-mary / breast_cancer: ε 2.20",
                    "general / breast_cancer: ε 0.80",
                    "job job-7f3a target: ε 3.00",
                    "7 (required 5)",
                ],
            ),
            ("models", "/models", &[&MODEL[..12], JOB]),
            (
                "model",
                &format!("/models/{MODEL}"),
                &[
                    "lineage-graph",
                    "base model",
                    "round 2",
                    "approved (st-mary)",
                    "published model",
                ],
            ),
        ];
        for (name, path, expected) in pages {
            let url = format!("{base}{path}");
            let dom = officer.dom(&url);
            assert!(
                dom.contains(ALICE),
                "{name}: the page is not served to alice: {dom}"
            );
            for text in *expected {
                assert!(dom.contains(text), "{name} ({path}) lacks {text:?}: {dom}");
            }
            officer.screenshot(&url, &out.join(format!("{name}.png")));
        }
        // A site node's certificate in a browser: the 403 page says why.
        let nodes_browser = Browser::new(&chromium, &c, Some("node-general"));
        let dom = nodes_browser.dom(&format!("{base}/"));
        assert!(dom.contains("Not allowed to read the audit trail"), "{dom}");
        assert!(dom.contains("spiffe://acme/site/general/node"), "{dom}");
        nodes_browser.screenshot(&format!("{base}/"), &out.join("forbidden-node.png"));
        // No certificate at all: the browser gets no page from the console.
        let anonymous = Browser::new(&chromium, &c, None);
        let dom = anonymous.dom(&format!("{base}/"));
        assert!(
            !dom.contains("Tutela audit console"),
            "served without a certificate: {dom}"
        );
    }

    // Tamper with a stored row under the running service: the overview names it.
    let store = AuditStore::open(&AuditStore::sqlite_url(&s.db).unwrap())
        .await
        .unwrap();
    super::store::drop_triggers(&store).await;
    let bad = seqs.st_mary_first_spend;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE audit_events SET subject = 'st-mary/another_dataset' WHERE seq = {bad}"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let mut broken = String::new();
    for _ in 0..100 {
        broken = https_get(&c, s.console, Some("alice"), "/")
            .await
            .unwrap()
            .body;
        if broken.contains("BROKEN") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        broken.contains(&format!(
            "The trail is BROKEN: the first bad row is seq {bad}"
        )),
        "{}",
        around(&broken, "verification")
    );
    assert!(
        broken.contains(&format!("hash mismatch at seq {bad}")),
        "{}",
        around(&broken, "verification")
    );
    if let Some(chromium) = chromium() {
        let officer = Browser::new(&chromium, &c, Some("alice"));
        let dom = officer.dom(&format!("{base}/"));
        assert!(
            dom.contains(&format!("first bad row is seq {bad}")),
            "{dom}"
        );
        officer.screenshot(
            &format!("{base}/"),
            &artifacts().join("overview-tampered.png"),
        );
    }
    s.stop().await;
}

/// The `<tr data-site="SITE">` row of the overview's held-checkpoint table.
fn site_row<'a>(body: &'a str, site: &str) -> Option<&'a str> {
    let start = body.find(&format!("<tr data-site=\"{site}\">"))?;
    let rest = &body[start..];
    Some(&rest[..rest.find("</tr>")?])
}

fn rpc_code(e: tutela_audit::client::AuditClientError) -> tonic::Code {
    match e {
        tutela_audit::client::AuditClientError::Rpc(s) => s.code(),
        other => panic!("not an RPC error: {other}"),
    }
}

/// Each site's node reports the checkpoint it verified and now holds; the overview shows it, how
/// far behind the log it is and when. Only a node reports, only for the site of its certificate,
/// and only a checkpoint this log signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sites_report_their_held_checkpoints_for_themselves_only_and_the_overview_shows_them() {
    use tutela_audit::CheckpointVerifier;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = Consortium::new();
    let s = start_service(&c).await;
    let mut st_mary = s.client(&c, "node-st-mary").await;
    let mut general = s.client(&c, "node-general").await;
    let mut alice = s.client(&c, "alice").await;
    st_mary
        .append_payload("st-mary/breast_cancer", &spend("st-mary", 1, 0.9, 1.4))
        .await
        .unwrap();
    let info = st_mary.log_info().await.unwrap();
    // What a node does: advance its verifier to the latest checkpoint, then report it.
    let mut verifier = CheckpointVerifier::new(&info.public_key, info.log_id.clone());
    st_mary.advance(&mut verifier).await.unwrap();
    let held = verifier.latest().unwrap().clone();
    st_mary.report_held_checkpoint(&held).await.unwrap();

    // An officer may call `verify` methods but is no site node: refused.
    let e = alice.report_held_checkpoint(&held).await.unwrap_err();
    assert_eq!(rpc_code(e), tonic::Code::PermissionDenied);
    // A checkpoint this log did not sign (its root edited): refused, nothing recorded.
    let mut forged = held.clone();
    forged.checkpoint.root = [7; 32];
    let e = general.report_held_checkpoint(&forged).await.unwrap_err();
    assert_eq!(rpc_code(e), tonic::Code::InvalidArgument);

    // The sites page derives its ledger once, then adds only what is new.
    let sites = https_get(&c, s.console, Some("alice"), "/sites")
        .await
        .unwrap()
        .body;
    assert!(sites.contains("st-mary / breast_cancer: ε 1.40"), "{sites}");
    assert!(!sites.contains("general / breast_cancer"), "{sites}");

    // The trail grows; general holds a newer checkpoint and reports it.
    general
        .append_payload("general/breast_cancer", &spend("general", 1, 0.8, 0.8))
        .await
        .unwrap();
    let sites = https_get(&c, s.console, Some("alice"), "/sites")
        .await
        .unwrap()
        .body;
    assert!(sites.contains("st-mary / breast_cancer: ε 1.40"), "{sites}");
    assert!(sites.contains("general / breast_cancer: ε 0.80"), "{sites}");
    let mut general_verifier = CheckpointVerifier::new(&info.public_key, info.log_id.clone());
    general.advance(&mut general_verifier).await.unwrap();
    let general_held = general_verifier.latest().unwrap().clone();
    assert!(general_held.checkpoint.tree_size > held.checkpoint.tree_size);
    general.report_held_checkpoint(&general_held).await.unwrap();

    let store = AuditStore::open(&AuditStore::sqlite_url(&s.db).unwrap())
        .await
        .unwrap();
    let recorded = store.site_checkpoints().await.unwrap();
    let sites: Vec<(&str, &str, u64)> = recorded
        .iter()
        .map(|r| (r.site.as_str(), r.node.as_str(), r.tree_size))
        .collect();
    assert_eq!(
        sites,
        vec![
            (
                "general",
                "spiffe://acme/site/general/node",
                general_held.checkpoint.tree_size
            ),
            (
                "st-mary",
                "spiffe://acme/site/st-mary/node",
                held.checkpoint.tree_size
            ),
        ]
    );
    // A node reporting another site's checkpoint records it as its own site's, never the other's:
    // the request has no site; the site is its certificate's.
    general.report_held_checkpoint(&held).await.unwrap();
    let after = store.site_checkpoints().await.unwrap();
    assert_eq!(after[1], recorded[1], "st-mary's row changed");
    assert_eq!(after[0].site, "general");
    assert_eq!(after[0].tree_size, held.checkpoint.tree_size);
    general.report_held_checkpoint(&general_held).await.unwrap();

    // The overview: each site's held size, events behind the log's committed size, when, and who.
    let mut body = String::new();
    let mut n = 0;
    for _ in 0..50 {
        body = https_get(&c, s.console, Some("alice"), "/")
            .await
            .unwrap()
            .body;
        let count = around(&body, "event-count");
        n = count
            .split('>')
            .nth(1)
            .and_then(|t| t.split('<').next())
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if site_row(&body, "general").is_some() && n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (site, cp) in [("st-mary", &held), ("general", &general_held)] {
        let row = site_row(&body, site).unwrap_or_else(|| panic!("no row for {site}: {body}"));
        let size = cp.checkpoint.tree_size;
        assert!(row.contains(&format!(">{size}<")), "{row}");
        assert!(
            row.contains(&format!(">{}<", n - size)),
            "behind: {row} (log {n})"
        );
        assert!(
            row.contains(&format!("spiffe://acme/site/{site}/node")),
            "{row}"
        );
        assert!(row.contains(&hex::encode(cp.checkpoint.root)), "{row}");
        assert!(row.contains(" UTC") || row.contains('Z'), "no time: {row}");
    }
    s.stop().await;
}
