//! Policy and signed approvals end to end, with real processes: a coordinator and an audit
//! service running the consortium's casbin policy and two site nodes with their own site
//! policies, over loopback mutual TLS with certificates made at test time. Every denial the test
//! provokes (the policy's, the coordinator's refusals of forged approvals, a node's refusal of a
//! task its own officer did not approve) is then found in the audit trail.
//!
//! A site node refusing forged approvals and site-policy breaches when the coordinator is bypassed
//! is tested in-process against real certificates and real job specs in
//! `site-node/src/approvals.rs` (the node's `TaskGate` check).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::Code;
use tutela_audit::client::AuditClient;
use tutela_audit::store::EventFilter;
use tutela_audit::{Action, Event};
use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::{ChildGuard, free_port, repo_root};
use tutela_policy::{Approval, Rejection};
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::job::{JobSpec, SpecDigest};
use tutela_protocol::pb;
use tutela_protocol::pb::jobs_client::JobsClient;
use tutela_protocol::pki::{
    CertificateAuthority, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity,
};
use tutela_protocol::tls::TlsFiles;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// Issues a user certificate from the consortium CA into the certs directory as user-<name>.
fn issue_user(c: &Consortium, site: &str, name: &str) -> IssuedCertificate {
    let issued =
        c.ca.issue(
            &user(site, name),
            &LeafOptions::new(Validity::days_from_now(30)),
        )
        .unwrap();
    std::fs::write(c.certs().join(format!("user-{name}.crt")), &issued.cert_pem).unwrap();
    std::fs::write(c.certs().join(format!("user-{name}.key")), &issued.key_pem).unwrap();
    issued
}

async fn client_as(c: &Consortium, stem: &str) -> JobsClient<tonic::transport::Channel> {
    let tls = ClientTls::load(
        &TlsFiles::in_dir(&c.certs(), stem),
        Some(Identity::new("e2e", Principal::Coordinator).unwrap()),
    )
    .unwrap();
    JobsClient::new(
        client::connect(&format!("localhost:{}", c.port), tls)
            .await
            .unwrap(),
    )
}

/// Runs `tutela job ARGS... FILE --key --cert --coordinator --tls-dir --stem` as the officer whose
/// certificate and key are `<stem>.crt`/`.key` in the consortium's certs; returns its stdout.
fn officer_cli(c: &Consortium, stem: &str, args: &[&str], file: &std::path::Path) -> String {
    let certs = c.certs();
    let out = tutela_e2e::run_ok(
        std::process::Command::new(tutela_e2e::bin("tutela"))
            .arg("job")
            .args(args)
            .arg(file)
            .arg("--key")
            .arg(certs.join(format!("{stem}.key")))
            .arg("--cert")
            .arg(certs.join(format!("{stem}.crt")))
            .args(["--coordinator", &format!("localhost:{}", c.port)])
            .arg("--tls-dir")
            .arg(&certs)
            .args(["--stem", stem]),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The consortium's policy, for the coordinator and the audit service alike. Carol is a
/// compliance officer of site a for the consortium, but site a's own policy does not list her.
fn policy_csv(with_operator: bool) -> String {
    let mut p = String::from(
        "p, operator, consortium, jobs, *, allow\n\
         p, compliance_officer, *, jobs, read, allow\n\
         p, compliance_officer, *, jobs, approve, allow\n\
         p, spiffe://e2e/site/*/node, site:*, federation, participate, allow\n\
         p, spiffe://e2e/coordinator, consortium, audit, write, allow\n\
         p, spiffe://e2e/site/*/node, site:*, audit, write, allow\n\
         p, compliance_officer, *, audit, read, allow\n\
         g, spiffe://e2e/site/a/user/alice, compliance_officer, site:a\n\
         g, spiffe://e2e/site/a/user/carol, compliance_officer, site:a\n\
         g, spiffe://e2e/site/b/user/bob, compliance_officer, site:b\n\
         p2, site:*, compliance_officer, 1\n",
    );
    if with_operator {
        p.push_str("g, spiffe://e2e/operator/op, operator, consortium\n");
    }
    p
}

fn site_policy(site: &str, officer: &str) -> String {
    format!(
        "site = \"{site}\"\ncompliance_officers = [\"spiffe://e2e/site/{site}/user/{officer}\"]\n\
         allowed_operators = [\"spiffe://e2e/operator/op\"]\nallowed_models = [\"mlp\"]\n"
    )
}

fn sign(who: &IssuedCertificate, job: &str, digest: &SpecDigest) -> pb::SignedApproval {
    let t = now_ms();
    Approval::sign(&who.key_pem, &who.cert_pem, job, digest, t, t + 3_600_000)
        .unwrap()
        .to_pb()
}

async fn approve(
    client: &mut JobsClient<tonic::transport::Channel>,
    approval: pb::SignedApproval,
) -> Result<pb::JobStatus, tonic::Status> {
    client
        .approve_job(pb::ApproveJobRequest {
            approval: Some(approval),
        })
        .await
        .map(|r| r.into_inner())
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str, expect: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    assert!(
        e.message().contains(expect),
        "{what}: expected {expect:?} in {:?}",
        e.message()
    );
}

/// Starts `tutela-audit` on a free port with the consortium's policy files in `pol` (reloaded
/// every second); returns the process and its port.
fn start_audit(c: &Consortium, pol: &std::path::Path) -> (ChildGuard, u16) {
    let port = free_port();
    (c.start_audit(port, AuditPolicy::Files(pol)), port)
}

/// One denial the trail must hold: a `policy.decision` refusing `who` the call `method`, whose
/// rule contains `rule`.
struct ExpectedDenial {
    who: &'static str,
    method: &'static str,
    rule: &'static str,
}

fn is_denial(e: &Event, d: &ExpectedDenial) -> bool {
    e.payload["allowed"] == false
        && e.payload["who"] == d.who
        && e.payload["method"] == d.method
        && e.payload["rule"]
            .as_str()
            .is_some_and(|r| r.contains(d.rule))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_only_with_its_sites_approvals_and_forgeries_are_refused() {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let alice = issue_user(&c, "a", "alice");
    let bob = issue_user(&c, "b", "bob");
    let carol = issue_user(&c, "a", "carol");
    let mallory = issue_user(&c, "a", "mallory");

    let pol = d.join("policy");
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::copy(
        repo_root().join("deploy/policy/model.conf"),
        pol.join("model.conf"),
    )
    .unwrap();
    std::fs::write(pol.join("policy.csv"), policy_csv(true)).unwrap();
    // The audit service runs the same policy; the coordinator records everything there.
    let (_audit, audit_port) = start_audit(&c, &pol);
    c.coordinator_extra = format!(
        "[policy]\nmodel = \"{}\"\npolicy = \"{}\"\nreload_secs = 1\n[audit]\nendpoint = \"localhost:{audit_port}\"\n",
        pol.join("model.conf").display(),
        pol.join("policy.csv").display()
    );
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(2);
    for (site, officer, rows) in [("a", "alice", &shares[0]), ("b", "bob", &shares[1])] {
        let path = pol.join(format!("site-{site}.toml"));
        std::fs::write(&path, site_policy(site, officer)).unwrap();
        c.node_top_level
            .insert(site.into(), format!("site_policy = \"{}\"", path.display()));
        c.start_node(site, &header, rows, "");
    }

    let mut op = c.operator().await;
    let spec = job_spec(2, 2, 60, &["a", "b"]);
    let status = op
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let job = status.job_id.clone();
    assert_eq!(status.state, "proposed");
    assert_eq!(status.submitted_by, "spiffe://e2e/operator/op");
    assert!(
        status.waiting_reason.contains("site:a") && status.waiting_reason.contains("site:b"),
        "{status:?}"
    );
    let digest: SpecDigest = status.spec_digest.parse().unwrap();
    assert_eq!(digest, JobSpec::from_toml_str(&spec).unwrap().digest());

    // Without its sites' approvals the job never starts, nodes connected or not.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = c.wait_for_job(&job, Duration::from_secs(5), |_| true).await;
    assert_eq!(s.state, "proposed", "{s:?}");

    // Forged approvals, each refused by the coordinator with its reason.
    let mut as_alice = client_as(&c, "user-alice").await;
    // Wrong key: Mallory's key under Alice's certificate.
    let t = now_ms();
    let wrong_key = Approval::sign(
        &mallory.key_pem,
        &alice.cert_pem,
        &job,
        &digest,
        t,
        t + 3_600_000,
    )
    .unwrap()
    .to_pb();
    denied(
        approve(&mut as_alice, wrong_key).await,
        "wrong key",
        "does not verify",
    );
    // A certificate of another CA naming the same officer.
    let other_ca =
        CertificateAuthority::create("e2e", KeyAlgorithm::EcdsaP256, Validity::days_from_now(30))
            .unwrap();
    let fake_alice = other_ca
        .issue(
            &user("a", "alice"),
            &LeafOptions::new(Validity::days_from_now(30)),
        )
        .unwrap();
    denied(
        approve(&mut as_alice, sign(&fake_alice, &job, &digest)).await,
        "another CA",
        "consortium CA",
    );
    // Another job's digest.
    let other = JobSpec::from_toml_str(&job_spec(3, 2, 60, &["a", "b"]))
        .unwrap()
        .digest();
    denied(
        approve(&mut as_alice, sign(&alice, &job, &other)).await,
        "another job's digest",
        "spec digest",
    );
    // A user of the site without the officer role: the policy refuses before the handler runs.
    let mut as_mallory = client_as(&c, "user-mallory").await;
    denied(
        approve(&mut as_mallory, sign(&mallory, &job, &digest)).await,
        "no officer role",
        "default deny",
    );
    // Alice's signature, sent by Bob: officers submit their own approvals.
    let mut as_bob = client_as(&c, "user-bob").await;
    denied(
        approve(&mut as_bob, sign(&alice, &job, &digest)).await,
        "someone else's approval",
        "officers submit their own",
    );

    // A valid approval counts; an amended spec voids it.
    let s = approve(&mut as_alice, sign(&alice, &job, &digest))
        .await
        .unwrap();
    assert_eq!(s.state, "proposed");
    assert_eq!(s.approvals_gathered.len(), 1, "{s:?}");
    assert!(s.waiting_reason.contains("site:b") && !s.waiting_reason.contains("site:a"));
    let amended = job_spec(2, 2, 90, &["a", "b"]);
    let s = op
        .amend_job(pb::AmendJobRequest {
            job_id: job.clone(),
            spec_toml: amended.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(s.spec_digest, digest.to_hex());
    assert!(s.approvals_gathered.is_empty(), "{s:?}");
    assert!(s.approvals[0].standing.starts_with("superseded"), "{s:?}");
    assert!(s.waiting_reason.contains("site:a"), "{s:?}");
    // The old approval, sent again, no longer matches the job.
    denied(
        approve(&mut as_alice, sign(&alice, &job, &digest)).await,
        "approval of the old spec",
        "spec digest",
    );

    // Withdrawn before the start, it stops counting.
    let new_digest: SpecDigest = s.spec_digest.parse().unwrap();
    approve(&mut as_alice, sign(&alice, &job, &new_digest))
        .await
        .unwrap();
    let s = as_alice
        .withdraw_approval(pb::WithdrawApprovalRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.approvals_gathered.is_empty(), "{s:?}");

    // Both sites' officers approve the current spec: the job starts and completes, each node
    // having checked its own officer's approval itself.
    approve(&mut as_alice, sign(&alice, &job, &new_digest))
        .await
        .unwrap();
    // Bob signs with the CLI, as an officer would, against his own copy of the spec.
    let bob_spec = d.join("bob-reviewed.toml");
    std::fs::write(&bob_spec, &amended).unwrap();
    let out = officer_cli(&c, "user-bob", &["approve", &job, "--spec"], &bob_spec);
    assert!(out.contains("approved job"), "{out}");
    let s = as_bob
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.approvals_missing.is_empty(), "{s:?}");
    let s = c
        .wait_for_job(&job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(s.state, "completed", "{s:?}\n{}", c.log("coordinator.log"));
    for site in ["a", "b"] {
        let log = std::fs::read_to_string(d.join("sites").join(site).join("node.log")).unwrap();
        assert!(
            log.contains("approved by this site's compliance officer"),
            "node {site} did not check the approval:\n{log}"
        );
    }

    // The consortium's quorum met by an officer site a's own policy does not list: the job
    // starts, and site a's node refuses its task before reading any data. The coordinator
    // records the refusal in the trail; the job fails for want of site a.
    let refused_spec = job_spec(1, 2, 60, &["a", "b"]);
    let s = op
        .submit_job(pb::SubmitJobRequest {
            spec_toml: refused_spec,
        })
        .await
        .unwrap()
        .into_inner();
    let refused_job = s.job_id.clone();
    let refused_digest: SpecDigest = s.spec_digest.parse().unwrap();
    let mut as_carol = client_as(&c, "user-carol").await;
    approve(&mut as_carol, sign(&carol, &refused_job, &refused_digest))
        .await
        .unwrap();
    approve(&mut as_bob, sign(&bob, &refused_job, &refused_digest))
        .await
        .unwrap();
    let s = c
        .wait_for_job(&refused_job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(s.state, "failed", "{s:?}\n{}", c.log("coordinator.log"));

    // A rejection cancels a proposed job, with the officer's signed reason.
    let s = op
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .unwrap()
        .into_inner();
    let reason = "not in our protocol";
    let rejection = Rejection::sign(
        &bob.key_pem,
        &bob.cert_pem,
        &s.job_id,
        &s.spec_digest.parse().unwrap(),
        reason,
        now_ms(),
    )
    .unwrap();
    let s = as_bob
        .reject_job(pb::RejectJobRequest {
            job_id: s.job_id,
            reason: reason.into(),
            rejection: Some(rejection.to_pb()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "cancelled");
    assert!(
        s.reason
            .contains("rejected by spiffe://e2e/site/b/user/bob"),
        "{s:?}"
    );

    // The same with the CLI: `tutela job reject` signs the reason with the officer's key.
    let s = op
        .submit_job(pb::SubmitJobRequest {
            spec_toml: job_spec(1, 2, 60, &["a", "b"]),
        })
        .await
        .unwrap()
        .into_inner();
    let out = officer_cli(
        &c,
        "user-bob",
        &[
            "reject",
            &s.job_id,
            "--reason",
            "the cohort is too small",
            "--spec",
        ],
        &{
            let p = d.join("bob-rejected.toml");
            std::fs::write(&p, job_spec(1, 2, 60, &["a", "b"])).unwrap();
            p
        },
    );
    assert!(out.contains("cancelled"), "{out}");
    assert!(out.contains("the cohort is too small"), "{out}");

    // Policy reload: the operator's role removed from the file takes effect without a restart.
    std::fs::write(pol.join("policy.csv"), policy_csv(false)).unwrap();
    let start = std::time::Instant::now();
    let refusal = loop {
        match op.list_jobs(pb::ListJobsRequest {}).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "the policy was not reloaded"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(refusal.code(), Code::PermissionDenied);
    assert!(refusal.message().contains("default deny"), "{refusal:?}");

    // Every denial above is in the audit trail, read as a compliance officer would: the
    // coordinator's policy decisions and its refusals of forged approvals (`policy.decision`,
    // with the rule and the digest of the policy in force), and site a's refusal of its task.
    let tls = ClientTls::load(
        &TlsFiles::in_dir(&c.certs(), "user-alice"),
        Some(Identity::new("e2e", Principal::Audit).unwrap()),
    )
    .unwrap();
    let mut trail = AuditClient::connect(&format!("localhost:{audit_port}"), tls)
        .await
        .unwrap();
    const APPROVE: &str = "/tutela.v1.Jobs/ApproveJob";
    let expected = [
        ExpectedDenial {
            who: "spiffe://e2e/site/a/user/alice",
            method: APPROVE,
            rule: "does not verify with the key",
        },
        ExpectedDenial {
            who: "spiffe://e2e/site/a/user/alice",
            method: APPROVE,
            rule: "does not verify against the consortium CA",
        },
        ExpectedDenial {
            who: "spiffe://e2e/site/a/user/alice",
            method: APPROVE,
            rule: "spec digest",
        },
        ExpectedDenial {
            who: "spiffe://e2e/site/a/user/mallory",
            method: APPROVE,
            rule: "default deny",
        },
        ExpectedDenial {
            who: "spiffe://e2e/site/b/user/bob",
            method: APPROVE,
            rule: "officers submit their own",
        },
        ExpectedDenial {
            who: "spiffe://e2e/operator/op",
            method: "/tutela.v1.Jobs/ListJobs",
            rule: "default deny",
        },
    ];
    let decisions = EventFilter {
        action: Some(Action::PolicyDecision),
        ..Default::default()
    };
    let start = Instant::now();
    let events = loop {
        let events = trail.query(&decisions).await.unwrap();
        if expected
            .iter()
            .all(|d| events.iter().any(|e| is_denial(e, d)))
        {
            break events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "denials missing from the audit trail: {:?}\n{events:#?}",
            expected
                .iter()
                .filter(|d| !events.iter().any(|e| is_denial(e, d)))
                .map(|d| (d.who, d.method, d.rule))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The digest is the one the refusal named.
    let op_denial = events.iter().rfind(|e| is_denial(e, &expected[5])).unwrap();
    assert_eq!(op_denial.actor, "spiffe://e2e/coordinator");
    assert!(
        refusal
            .message()
            .contains(op_denial.payload["policy_digest"].as_str().unwrap()),
        "{refusal:?} vs {op_denial:#?}"
    );
    // Forged approvals were sent twice with another digest: before and after the amendment.
    assert!(
        events.iter().filter(|e| is_denial(e, &expected[2])).count() >= 2,
        "{events:#?}"
    );
    // Site a's refusal, with the node's typed reason (the coordinator keeps the code only, never
    // a site's free text).
    let refusals = trail
        .query(&EventFilter {
            action: Some(Action::UpdateRefused),
            subject: Some(refused_job.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        refusals.iter().any(|e| e.payload["site"] == "a"
            && e.payload["reason"]
                .as_str()
                .is_some_and(|r| { r == "declined: policy.refused" })),
        "site a's refusal is not in the trail: {refusals:#?}"
    );
    assert!(
        !refusals.iter().any(|e| e.payload["site"] == "b"),
        "site b trained: {refusals:#?}"
    );
}
