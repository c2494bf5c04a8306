//! Policy and signed approvals end to end, with real processes: a coordinator running the
//! consortium's casbin policy and two site nodes with their own site policies, over loopback
//! mutual TLS with certificates made at test time.
//!
//! A site node refusing forged approvals and site-policy breaches when the coordinator is bypassed
//! is tested in-process against real certificates and real job specs in
//! `site-node/src/approvals.rs` (the node's `TaskGate` check).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Code;
use tutela_e2e::consortium::{Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::repo_root;
use tutela_policy::Approval;
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

fn policy_csv(with_operator: bool) -> String {
    let mut p = String::from(
        "p, operator, consortium, jobs, *, allow\n\
         p, compliance_officer, *, jobs, read, allow\n\
         p, compliance_officer, *, jobs, approve, allow\n\
         p, spiffe://e2e/site/*/node, site:*, federation, participate, allow\n\
         g, spiffe://e2e/site/a/user/alice, compliance_officer, site:a\n\
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

fn denied(r: Result<pb::JobStatus, tonic::Status>, what: &str, expect: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    assert!(
        e.message().contains(expect),
        "{what}: expected {expect:?} in {:?}",
        e.message()
    );
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
    let mallory = issue_user(&c, "a", "mallory");

    let pol = d.join("policy");
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::copy(
        repo_root().join("deploy/policy/model.conf"),
        pol.join("model.conf"),
    )
    .unwrap();
    std::fs::write(pol.join("policy.csv"), policy_csv(true)).unwrap();
    c.coordinator_extra = format!(
        "[policy]\nmodel = \"{}\"\npolicy = \"{}\"\nreload_secs = 1\n",
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
    let s = approve(&mut as_bob, sign(&bob, &job, &new_digest))
        .await
        .unwrap();
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

    // A rejection cancels a proposed job, with the officer's reason.
    let s = op
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .unwrap()
        .into_inner();
    let s = as_bob
        .reject_job(pb::RejectJobRequest {
            job_id: s.job_id,
            reason: "not in our protocol".into(),
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

    // Every denial is in the trail the coordinator keeps (its decision log).
    let log = c.log("coordinator.log");
    for expect in [
        "approval refused",
        "does not verify with the key",
        "does not verify against the consortium CA",
        "spiffe://e2e/site/a/user/mallory",
        "spiffe://e2e/operator/op",
    ] {
        assert!(
            log.contains(expect),
            "{expect:?} missing from the coordinator log:\n{log}"
        );
    }
    assert!(log.matches("denied").count() >= 2, "{log}");
}
