//! The audit service end to end: the real `tutela-audit` binary over loopback mutual TLS with
//! certificates made here and the consortium's shipped casbin policy, a node appending as its
//! certificate identity, approvals refused unless signed, proofs checked by a site's verifier,
//! `tutela audit verify` naming the row an attacker edited in the database, and the policy in
//! front of every RPC: an auditor reads but never appends, every denial is in the trail with its
//! rule and policy digest, and a rule removed from the file takes effect without a restart.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::json;
use tonic::Code;
use tutela_audit::client::{AuditClient, AuditClientError};
use tutela_audit::merkle::{leaf_hash, verify_inclusion};
use tutela_audit::store::EventFilter;
use tutela_audit::{Action, CheckpointVerifier, Event, Update};
use tutela_e2e::{ChildGuard, bin, free_port, repo_root, wait_for_port};
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity, file_stem};
use tutela_protocol::tls::TlsFiles;

const NODE: &str = "spiffe://e2e/site/st-mary/node";
const COORDINATOR: &str = "spiffe://e2e/coordinator";
const OPERATOR: &str = "spiffe://e2e/operator/op";
const AUDITOR: &str = "spiffe://e2e/site/general/user/dana";
const AUDITOR_DENY: &str = "p, auditor, *, audit, write, deny";
const NODE_WRITE: &str = "p, spiffe://e2e/site/*/node, site:*, audit, write, allow";

/// A CA, certificates for the audit service, a node of st-mary, st-mary's compliance officer
/// alice and the auditor dana, the shipped model and policy (consortium `acme` renamed `e2e`),
/// and a `tutela-audit` process once started.
struct AuditService {
    dir: PathBuf,
    ca: CaDir,
    certs: PathBuf,
    port: u16,
    process: Option<ChildGuard>,
    /// alice's certificate and key (PEM), for signing approvals.
    officer_pem: (String, String),
}

fn user(site: &str, name: &str) -> Principal {
    Principal::User {
        site: site.into(),
        name: name.into(),
    }
}

fn node() -> Principal {
    Principal::Node {
        site: "st-mary".into(),
    }
}

impl AuditService {
    fn new(dir: &Path) -> AuditService {
        let ca = CaDir::init(&dir.join("ca"), "e2e", KeyAlgorithm::EcdsaP256, 30, false).unwrap();
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca.crt"), ca.ca().cert_pem()).unwrap();
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        std::fs::copy(
            repo_root().join("deploy/policy/model.conf"),
            policy.join("model.conf"),
        )
        .unwrap();
        let shipped = std::fs::read_to_string(repo_root().join("deploy/policy/policy.csv"))
            .unwrap()
            .replace("spiffe://acme/", "spiffe://e2e/");
        std::fs::write(policy.join("policy.csv"), shipped).unwrap();
        let mut service = AuditService {
            dir: dir.to_path_buf(),
            ca,
            certs,
            port: free_port(),
            process: None,
            officer_pem: Default::default(),
        };
        service.issue(&Principal::Audit, true);
        service.issue(&Principal::Coordinator, false);
        service.issue(&Principal::Operator { name: "op".into() }, false);
        service.issue(&node(), false);
        service.issue(&user("general", "dana"), false);
        service.officer_pem = service.issue(&user("st-mary", "alice"), false);
        service
    }

    /// Issues a certificate into the certs directory as `<stem>.crt`/`.key`; returns (cert, key).
    fn issue(&self, p: &Principal, dns: bool) -> (String, String) {
        let mut opts = LeafOptions::new(Validity::days_from_now(30));
        if dns {
            opts.dns_names = vec!["localhost".into()];
        }
        let issued = self.ca.issue(p, &opts).unwrap();
        let stem = file_stem(p);
        std::fs::write(self.certs.join(format!("{stem}.crt")), &issued.cert_pem).unwrap();
        std::fs::write(self.certs.join(format!("{stem}.key")), &issued.key_pem).unwrap();
        (issued.cert_pem, issued.key_pem)
    }

    fn policy_csv(&self) -> PathBuf {
        self.dir.join("policy/policy.csv")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("audit")
    }

    /// audit.toml: the listener, data directory and TLS, then `authorization` (a `[policy]`
    /// table, `insecure_no_policy = true`, or nothing).
    fn config(&self, authorization: &str) -> PathBuf {
        let config = self.dir.join("audit.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\ncheckpoint_every = 5\ncheckpoint_interval_secs = 3600\n{authorization}\n[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/{a}.crt\"\nkey = \"{c}/{a}.key\"\ncrl = \"{crl}\"\n",
                port = self.port,
                data = self.data().display(),
                crl = self.ca.crl_path().display(),
                c = self.certs.display(),
                a = file_stem(&Principal::Audit),
            ),
        )
        .unwrap();
        config
    }

    /// The `[policy]` table over the consortium's files, checked every second.
    fn policy_table(&self) -> String {
        format!(
            "[policy]\nmodel = \"{}\"\npolicy = \"{}\"\nreload_secs = 1\n",
            self.dir.join("policy/model.conf").display(),
            self.policy_csv().display()
        )
    }

    fn start(&mut self) {
        let config = self.config(&self.policy_table());
        let log_file = std::fs::File::create(self.dir.join("audit.log")).unwrap();
        self.process = Some(ChildGuard::spawn(
            Command::new(bin("tutela-audit"))
                .arg("--config")
                .arg(&config)
                .stdout(Stdio::from(log_file.try_clone().unwrap()))
                .stderr(Stdio::from(log_file)),
        ));
        wait_for_port(
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
            Duration::from_secs(30),
        );
    }

    fn addr(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// A client holding the certificate of `who`.
    async fn client(&self, who: &Principal) -> AuditClient {
        let tls = ClientTls::load(
            &TlsFiles::in_dir(&self.certs, &file_stem(who)),
            Some(Identity::new("e2e", Principal::Audit).unwrap()),
        )
        .unwrap();
        AuditClient::connect(&self.addr(), tls).await.unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default()
    }
}

/// A `job.proposed` payload of `digest` listing st-mary.
/// The validity window of the approvals these tests sign (unix ms).
const WINDOW: (i64, i64) = (1_700_000_000_000, 4_000_000_000_000);

/// The job-bound message an officer signs to approve `job` at `digest` within [`WINDOW`] (the
/// bare digest is refused).
fn approval_message(job: &str, digest: [u8; 32]) -> Vec<u8> {
    tutela_audit::approval::policy_signed_message(job, &hex::encode(digest), WINDOW.0, WINDOW.1)
}

fn proposal(digest: [u8; 32]) -> serde_json::Value {
    json!({
        "spec_digest": hex::encode(digest),
        "code_version": "e2e",
        "base_model": "mlp",
        "name": "e2e job",
        "participants": ["st-mary"],
        "approvers": {"st-mary": ["spiffe://e2e/site/st-mary/user/alice"]},
        "rounds": 1,
    })
}

/// The PERMISSION_DENIED status of a refused call; panics on anything else.
fn denied<T: std::fmt::Debug>(r: Result<T, AuditClientError>, what: &str) -> tonic::Status {
    match r {
        Err(AuditClientError::Rpc(status)) if status.code() == Code::PermissionDenied => status,
        other => panic!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

/// The policy digest a denial names: `... [policy <hex>]`.
fn digest_in(status: &tonic::Status) -> String {
    let (_, rest) = status
        .message()
        .rsplit_once("[policy ")
        .unwrap_or_else(|| panic!("no policy digest in {:?}", status.message()));
    rest.trim_end_matches(']').to_string()
}

/// The service's `policy.decision` events, read as `reader`, once `until` holds for them (the
/// service records decisions without making the RPC wait, so they land a moment later).
async fn decisions_until(
    reader: &mut AuditClient,
    until: impl Fn(&[Event]) -> bool,
    log: impl Fn() -> String,
) -> Vec<Event> {
    let filter = EventFilter {
        action: Some(Action::PolicyDecision),
        ..Default::default()
    };
    let start = Instant::now();
    loop {
        let events = reader.query(&filter).await.unwrap();
        if until(&events) {
            return events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the expected policy decisions are not in the trail: {events:#?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_service_over_mtls_and_cli_verify_names_the_tampered_row() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut service = AuditService::new(dir.path());
    service.start();
    let mut node_client = service.client(&node()).await;
    let mut coordinator = service.client(&Principal::Coordinator).await;
    let mut officer = service.client(&user("st-mary", "alice")).await;
    let digest = [9u8; 32];
    coordinator
        .append(Action::JobProposed, "job-1", &proposal(digest))
        .await
        .unwrap();

    // Events are recorded as the caller's certificate identity. The service's own record of
    // each allowed append (a `policy.decision`) shares the sequence, so seqs only increase.
    let mut round_seqs = Vec::new();
    for round in 1..=11u64 {
        let r = coordinator
            .append(
                Action::RoundCompleted,
                "job-1",
                &json!({"round": round, "participants": ["st-mary"]}),
            )
            .await
            .unwrap();
        assert!(round_seqs.last().is_none_or(|&last| r.seq > last));
        round_seqs.push(r.seq);
    }
    let rounds = officer
        .query(&EventFilter {
            action: Some(Action::RoundCompleted),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rounds.iter().map(|e| e.seq).collect::<Vec<_>>(), round_seqs);
    assert!(rounds.iter().all(|e| e.actor == COORDINATOR));

    // An approval signed over another digest is refused and not stored; a genuine one is stored.
    let (officer_cert, officer_key) = service.officer_pem.clone();
    let (_, pem) = x509_parser::pem::parse_x509_pem(officer_key.as_bytes()).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pem.contents,
        &SystemRandom::new(),
    )
    .unwrap();
    let approval = |sig: &[u8]| json!({"spec_digest": hex::encode(digest), "signature": hex::encode(sig), "certificate": officer_cert, "site": "st-mary", "signed_at_ms": WINDOW.0, "expires_at_ms": WINDOW.1});
    let approvals = EventFilter {
        action: Some(Action::JobApproved),
        ..Default::default()
    };
    let forged = key.sign(&SystemRandom::new(), &[1u8; 32]).unwrap();
    let err = node_client
        .append(Action::JobApproved, "job-1", &approval(forged.as_ref()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    assert!(officer.query(&approvals).await.unwrap().is_empty());
    let good = key
        .sign(&SystemRandom::new(), &approval_message("job-1", digest))
        .unwrap();
    let stored = coordinator
        .append(Action::JobApproved, "job-1", &approval(good.as_ref()))
        .await
        .unwrap();
    assert_eq!(officer.query(&approvals).await.unwrap()[0].seq, stored.seq);

    // Every append the policy allowed (the forged approval included: the policy allowed the
    // call, the service refused its content, which adds a denial) is recorded by the service
    // itself: 15 decisions, so 1 + 11 + 1 + 15 events in all.
    decisions_until(&mut officer, |d| d.len() == 15, || service.log()).await;
    let total = 28u64;

    // A site pins a checkpoint and advances it with consistency proofs (nodes may verify the
    // log without reading its events).
    let info = node_client.log_info().await.unwrap();
    assert_eq!(info.log_id, "spiffe://e2e/audit");
    assert_eq!(info.size, total);
    let checkpoints = node_client.checkpoints().await.unwrap();
    let (first, latest) = (
        checkpoints.first().unwrap().clone(),
        checkpoints.last().unwrap().checkpoint.tree_size,
    );
    assert!(latest > first.checkpoint.tree_size, "{checkpoints:?}");
    let mut site = CheckpointVerifier::new(&info.public_key, &info.log_id);
    site.update(&first, &[]).unwrap();
    assert_eq!(
        node_client.advance(&mut site).await.unwrap(),
        Update::Advanced {
            from: first.checkpoint.tree_size,
            to: latest
        }
    );
    // Inclusion of the third round in the latest checkpoint (an event: read by the officer).
    let seq = round_seqs[2];
    let p = officer.inclusion_proof(seq, None).await.unwrap();
    p.checkpoint.verify(&info.public_key).unwrap();
    verify_inclusion(
        seq,
        p.checkpoint.checkpoint.tree_size,
        &leaf_hash(&p.event.hash),
        &p.path,
        &p.checkpoint.checkpoint.root,
    )
    .unwrap();

    // The CLI verifies the intact log, as the compliance officer...
    let pubkey = service.data().join("checkpoint.key.pub");
    let officer_stem = file_stem(&user("st-mary", "alice"));
    let cli = |extra: &[&str]| {
        let mut cmd = Command::new(bin("tutela"));
        cmd.args([
            "audit",
            "verify",
            "--audit",
            &service.addr(),
            "--stem",
            &officer_stem,
        ])
        .arg("--tls-dir")
        .arg(&service.certs)
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
        String::from_utf8_lossy(&ok.stdout).starts_with(&format!("OK: {total} events")),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // ...and names the row an attacker with write access to the database edited.
    let tampered = round_seqs[4];
    let db_url =
        tutela_audit::store::AuditStore::sqlite_url(&service.data().join("audit.db")).unwrap();
    let attacker = tutela_audit::store::AuditStore::open(&db_url)
        .await
        .unwrap();
    for s in [
        "DROP TRIGGER audit_events_no_update".to_string(),
        format!(
            r#"UPDATE audit_events SET payload = '{{"participants":["general"],"round":5}}' WHERE seq = {tampered}"#
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(s))
            .execute(attacker.pool())
            .await
            .unwrap();
    }
    let bad = cli(&[]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "verify must fail after tampering");
    assert!(
        stderr.contains(&format!("hash mismatch at seq {tampered}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_read_but_never_append_and_every_denial_is_in_the_trail() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut service = AuditService::new(dir.path());

    // Without a policy the service refuses to start unless told to run without one, and it
    // refuses both at once.
    for (authorization, expect) in [
        (String::new(), "no [policy] table"),
        (
            format!("insecure_no_policy = true\n{}", service.policy_table()),
            "both [policy] and insecure_no_policy",
        ),
    ] {
        let config = service.config(&authorization);
        let out = Command::new(bin("tutela-audit"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {authorization:?}");
        assert!(stderr.contains(expect), "{stderr}");
    }

    service.start();
    let mut auditor = service.client(&user("general", "dana")).await;
    let mut node_client = service.client(&node()).await;
    let mut officer = service.client(&user("st-mary", "alice")).await;

    // A node appends; the auditor reads and verifies.
    let appended = node_client
        .append(
            Action::DatasetDeidentified,
            "st-mary/patients",
            &json!({"site": "st-mary", "dataset": "patients", "job": "job-1", "report": {}}),
        )
        .await
        .unwrap();
    let events = auditor.query(&Default::default()).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.seq == appended.seq && e.actor == NODE)
    );
    auditor.log_info().await.unwrap();
    auditor.checkpoints().await.unwrap();

    // The auditor may not append: refused before the handler runs, naming the explicit deny.
    let refusal = denied(
        auditor
            .append(Action::JobStarted, "job-1", &json!({"sites": ["st-mary"]}))
            .await,
        "the auditor's append",
    );
    assert!(
        refusal.message().contains(AUDITOR_DENY) && refusal.message().contains(AUDITOR),
        "{refusal:?}"
    );
    let digest = digest_in(&refusal);
    assert_eq!(digest.len(), 64, "{refusal:?}");
    // A node holds checkpoints and reads back its own events (`audit, read_own`: its spends, to
    // check its privacy ledger), never other parties'.
    let own = node_client.query(&Default::default()).await.unwrap();
    assert!(own.iter().any(|e| e.seq == appended.seq), "{own:#?}");
    assert!(own.iter().all(|e| e.actor == NODE), "{own:#?}");
    let node_read = denied(
        node_client
            .query(&EventFilter {
                actor: Some(AUDITOR.to_string()),
                ..Default::default()
            })
            .await,
        "the node's query of another's events",
    );
    assert!(
        node_read.message().contains("may read only its own events"),
        "{node_read:?}"
    );
    // Nothing the auditor tried to append is there.
    assert!(
        auditor
            .query(&EventFilter {
                action: Some(Action::JobStarted),
                ..Default::default()
            })
            .await
            .unwrap()
            .is_empty()
    );

    // Both denials are in the trail, recorded by the service itself with the rule and the digest
    // of the policy that decided; so is the node's allowed append; the reads that were allowed
    // are not.
    let is = |e: &Event, who: &str, method: &str, allowed: bool| {
        e.payload["who"] == who && e.payload["method"] == method && e.payload["allowed"] == allowed
    };
    let decisions = decisions_until(
        &mut auditor,
        |d| {
            d.iter()
                .any(|e| is(e, AUDITOR, "/tutela.v1.Audit/Append", false))
                && d.iter()
                    .any(|e| is(e, NODE, "/tutela.v1.Audit/Query", false))
        },
        || service.log(),
    )
    .await;
    let denial = decisions
        .iter()
        .find(|e| is(e, AUDITOR, "/tutela.v1.Audit/Append", false))
        .unwrap();
    assert_eq!(denial.actor, "spiffe://e2e/audit");
    assert_eq!(denial.subject, "audit/write");
    assert_eq!(denial.payload["rule"], AUDITOR_DENY);
    assert_eq!(denial.payload["policy_digest"], digest.as_str());
    assert_eq!(denial.payload["domain"], "site:general");
    assert_eq!(
        (&denial.payload["object"], &denial.payload["action"]),
        (&json!("audit"), &json!("write"))
    );
    let node_denial = decisions
        .iter()
        .find(|e| is(e, NODE, "/tutela.v1.Audit/Query", false))
        .unwrap();
    assert!(
        node_denial.payload["rule"]
            .as_str()
            .unwrap()
            .contains("may read only its own events"),
        "{node_denial:?}"
    );
    let allowed_append = decisions
        .iter()
        .find(|e| is(e, NODE, "/tutela.v1.Audit/Append", true))
        .unwrap_or_else(|| panic!("the node's allowed append is not recorded: {decisions:#?}"));
    assert_eq!(allowed_append.payload["rule"], NODE_WRITE);
    assert!(
        !decisions
            .iter()
            .any(|e| e.payload["allowed"] == true && e.payload["who"] == AUDITOR),
        "allowed reads are not audit events: {decisions:#?}"
    );

    // A rule removed from the file takes effect without a restart: nodes may no longer append.
    let text = std::fs::read_to_string(service.policy_csv()).unwrap();
    assert!(text.contains(NODE_WRITE));
    let without: String = text
        .lines()
        .filter(|l| l.trim() != NODE_WRITE)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(service.policy_csv(), without).unwrap();
    let start = Instant::now();
    let refusal = loop {
        match node_client
            .append(
                Action::UpdateRefused,
                "job-1",
                &json!({"round": 1, "site": "st-mary", "reason": "declined"}),
            )
            .await
        {
            Ok(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "the policy was not reloaded:\n{}",
                    service.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => break denied(Err::<(), _>(e), "the node's append after the reload"),
        }
    };
    assert!(refusal.message().contains("default deny"), "{refusal:?}");
    let reloaded = digest_in(&refusal);
    assert_ne!(reloaded, digest, "the reloaded policy has its own digest");
    // The officer still reads, and finds that denial under the new policy's digest.
    decisions_until(
        &mut officer,
        |d| {
            d.iter().any(|e| {
                is(e, NODE, "/tutela.v1.Audit/Append", false)
                    && e.payload["policy_digest"] == reloaded.as_str()
            })
        },
        || service.log(),
    )
    .await;
}

/// Runs `tutela` with `args`; (success, stdout, stderr).
fn tutela(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("tutela")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_actions_are_refused_as_denials_and_rows_written_into_the_database_are_not_believed()
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut service = AuditService::new(dir.path());
    service.start();
    let mut coordinator = service.client(&Principal::Coordinator).await;
    let mut node_client = service.client(&node()).await;
    let mut operator = service
        .client(&Principal::Operator { name: "op".into() })
        .await;
    let mut officer = service.client(&user("st-mary", "alice")).await;

    // A proposed job and an officer's genuine approval, relayed by the coordinator.
    let digest = [5u8; 32];
    coordinator
        .append(Action::JobProposed, "job-1", &proposal(digest))
        .await
        .unwrap();
    let (officer_cert, officer_key) = service.officer_pem.clone();
    let (_, pem) = x509_parser::pem::parse_x509_pem(officer_key.as_bytes()).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pem.contents,
        &SystemRandom::new(),
    )
    .unwrap();
    let sig = key
        .sign(&SystemRandom::new(), &approval_message("job-1", digest))
        .unwrap();
    let genuine = json!({"spec_digest": hex::encode(digest), "signature": hex::encode(sig.as_ref()), "certificate": officer_cert, "site": "st-mary", "signed_at_ms": WINDOW.0, "expires_at_ms": WINDOW.1});
    let approved = coordinator
        .append(Action::JobApproved, "job-1", &genuine)
        .await
        .unwrap();

    // What a node's certificate did in the field, for a job still proposed: each refused,
    // naming the rule, and nothing stored.
    let model = "ab".repeat(32);
    let forgeries = [
        (
            Action::JobCompleted,
            "job-1".to_string(),
            json!({"model_digest": model, "rounds": 1}),
        ),
        (
            Action::RoundCompleted,
            "job-1".to_string(),
            json!({"round": 1, "participants": ["st-mary"]}),
        ),
        (
            Action::ModelPublished,
            model.clone(),
            json!({"job": "job-1", "model_digest": model, "spec_digest": hex::encode(digest), "rounds": 1, "code_version": "x"}),
        ),
        (
            Action::CertificateRevoked,
            NODE.to_string(),
            json!({"serial": "01", "reason": "unspecified", "crl_number": 1}),
        ),
        (
            Action::NodeRegistered,
            NODE.to_string(),
            json!({"site": "st-mary", "node_version": "x"}),
        ),
    ];
    for (action, subject, payload) in &forgeries {
        let status = denied(
            node_client.append(*action, subject, payload).await,
            action.as_str(),
        );
        assert!(
            status.message().contains(NODE) && status.message().contains(action.as_str()),
            "{status:?}"
        );
        assert!(
            status.message().contains("only the coordinator asserts it")
                || status.message().contains("only a CA administrator"),
            "{status:?}"
        );
    }
    // The operator re-appends the officer's genuine approval: refused.
    let replay = denied(
        operator
            .append(Action::JobApproved, "job-1", &genuine)
            .await,
        "the operator's replay",
    );
    assert!(replay.message().contains("job.approved"), "{replay:?}");
    // Nor does the coordinator get to record it twice.
    let replay = denied(
        coordinator
            .append(Action::JobApproved, "job-1", &genuine)
            .await,
        "the coordinator's replay",
    );
    assert!(
        replay.message().contains("replay")
            && replay.message().contains(&format!("seq {}", approved.seq)),
        "{replay:?}"
    );
    // Each refusal is in the trail as a denial naming the rule.
    let refused = |e: &Event, who: &str| {
        e.payload["who"] == who
            && e.payload["allowed"] == false
            && e.payload["rule"].as_str().is_some_and(|r| {
                r.starts_with(
                    "refused by the service: refused by the audit trail's authority rules",
                )
            })
    };
    decisions_until(
        &mut officer,
        |d| {
            d.iter().filter(|e| refused(e, NODE)).count() == forgeries.len()
                && d.iter().filter(|e| refused(e, OPERATOR)).count() == 1
                && d.iter().filter(|e| refused(e, COORDINATOR)).count() == 1
        },
        || service.log(),
    )
    .await;
    for action in [
        Action::JobCompleted,
        Action::RoundCompleted,
        Action::ModelPublished,
    ] {
        let stored = officer
            .query(&EventFilter {
                action: Some(action),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(stored.is_empty(), "{action}: {stored:?}");
    }

    // The service stops; someone with the application's database role INSERTs the forgeries
    // with a recomputed hash chain.
    drop(service.process.take());
    let db_url =
        tutela_audit::store::AuditStore::sqlite_url(&service.data().join("audit.db")).unwrap();
    let attacker = tutela_audit::store::AuditStore::open(&db_url)
        .await
        .unwrap();
    let last = attacker.last_event().await.unwrap().unwrap();
    let mut chain = tutela_audit::Chain::resume(&last).unwrap();
    let mut rows = Vec::new();
    for (action, subject, payload) in forgeries.iter().take(3) {
        rows.push(
            chain
                .append(
                    last.timestamp,
                    NODE,
                    *action,
                    subject.as_str(),
                    payload.clone(),
                )
                .unwrap(),
        );
    }
    rows.push(
        chain
            .append(
                last.timestamp,
                OPERATOR,
                Action::JobApproved,
                "job-1",
                genuine.clone(),
            )
            .unwrap(),
    );
    attacker.insert_events(&rows).await.unwrap();
    let first_forged = rows[0].seq;

    // `tutela audit verify` names the first forged row and exits non-zero.
    let pubkey = service.data().join("checkpoint.key.pub");
    let ca = service.certs.join("ca.crt");
    let db_args = |cmd: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--database-url".to_string(),
            db_url.clone(),
            "--ca".to_string(),
            ca.display().to_string(),
        ]);
        v
    };
    let mut verify = db_args(&["audit", "verify"]);
    verify.extend(["--public-key".to_string(), pubkey.display().to_string()]);
    let (ok, _, stderr) = tutela(&verify.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "verify must fail over forged rows");
    assert!(
        stderr.contains(&format!("seq {first_forged}")) && stderr.contains("job.completed"),
        "{stderr}"
    );
    // The report shows neither the completion nor the replayed approval as real.
    let report = db_args(&["audit", "report", "--job", "job-1", "--format", "json"]);
    let (ok, stdout, stderr) = tutela(&report.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{stderr}");
    let record: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(record["outcome"], "running", "{record:#}");
    assert!(
        record["rounds"].as_array().unwrap().is_empty(),
        "{record:#}"
    );
    let approvals = record["approvals"].as_array().unwrap();
    assert_eq!(approvals.len(), 1, "{record:#}");
    assert_eq!(approvals[0]["seq"], approved.seq);
    let flagged: Vec<u64> = record["flagged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert!(
        flagged.contains(&first_forged) && flagged.contains(&rows[3].seq),
        "{record:#}"
    );

    // The service, restarted, refuses to open the log (it would sign a checkpoint over the
    // forged rows), naming the first.
    let config = service.config(&service.policy_table());
    let mut child = Command::new(bin("tutela-audit"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the audit service started over forged rows");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "{text}");
    assert!(text.contains(&format!("seq {first_forged}")), "{text}");
}
