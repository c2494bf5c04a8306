//! Signed rejections at the coordinator: a real coordinator (in process, over loopback mutual TLS
//! with certificates made at test time by a `tutela pki` CA directory, running a casbin policy
//! with a quorum rule) takes a participating site officer's signed rejection, stores it with the
//! job's end, and refuses forged ones (wrong key, another CA, not an officer, an officer of a site
//! outside the job, another job's digest, an approval's signature, someone else's rejection,
//! unsigned) naming what is wrong. A rejected job can neither be approved nor start. The store's
//! rejection record is tested on SQLite and, with `TUTELA_TEST_POSTGRES_URL`, PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Code;
use tutela_coordinator::job::{JobId, JobSpec, JobState, SpecDigest};
use tutela_coordinator::store::{Store, StoreError};
use tutela_policy::{Approval, ApprovalVerifier, Rejection};
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::jobs_client::JobsClient;
use tutela_protocol::pki::{CaDir, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::tls::{TlsFiles, TlsMaterial};

const CONSORTIUM: &str = "rej";

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn spec(name: &str, sites: &[&str]) -> String {
    format!(
        r#"name = "{name}"
rounds = 2
min_sites = 2
round_deadline_secs = 60
update_norm_bound = 50.0
sites = [{sites}]

[model]
name = "mlp"
hidden = [8]

[data]
schema = "breast_cancer"

[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 16
"#,
        sites = sites
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Each participating site's compliance officer must approve; alice officers site a, bob site
/// b, carol site c; mallory is a user of site a without a role.
const POLICY: &str = "p, operator, consortium, jobs, *, allow\n\
p, compliance_officer, *, jobs, read, allow\n\
p, compliance_officer, *, jobs, approve, allow\n\
p, user, *, jobs, approve, allow\n\
g, spiffe://rej/operator/op, operator, consortium\n\
g, spiffe://rej/site/a/user/alice, compliance_officer, site:a\n\
g, spiffe://rej/site/b/user/bob, compliance_officer, site:b\n\
g, spiffe://rej/site/c/user/carol, compliance_officer, site:c\n\
g, spiffe://rej/site/a/user/mallory, user, site:a\n\
p2, site:*, compliance_officer, 1\n";

/// A coordinator serving in this process, the CA that issued its certificates, and the people.
pub(crate) struct Running {
    _dir: tempfile::TempDir,
    ca_dir: PathBuf,
    addr: String,
    db_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub(crate) alice: IssuedCertificate,
    pub(crate) bob: IssuedCertificate,
    mallory: IssuedCertificate,
    /// A certificate for "alice" from another CA of the same consortium name.
    fake_alice: IssuedCertificate,
}

impl Running {
    pub(crate) async fn as_(&self, stem: &str) -> JobsClient<tonic::transport::Channel> {
        let tls = ClientTls::load(
            &TlsFiles::in_dir(&self.ca_dir, stem),
            Some(Identity::new(CONSORTIUM, Principal::Coordinator).unwrap()),
        )
        .unwrap();
        JobsClient::new(client::connect(&self.addr, tls).await.unwrap())
    }

    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(10), h)
                .await
                .expect("the coordinator stops")
                .expect("the serve task does not panic")
                .expect("the coordinator served without error");
        }
    }
}

fn issue(ca: &CaDir, principal: &Principal, stem: &str) -> IssuedCertificate {
    let mut o = LeafOptions::new(Validity::days_from_now(10));
    if *principal == Principal::Coordinator {
        o.dns_names = vec!["localhost".into()];
    }
    let issued = ca.issue(principal, &o).unwrap();
    std::fs::write(ca.dir().join(format!("{stem}.crt")), &issued.cert_pem).unwrap();
    std::fs::write(ca.dir().join(format!("{stem}.key")), &issued.key_pem).unwrap();
    issued
}

fn user(site: &str, name: &str) -> Principal {
    Principal::User {
        site: site.into(),
        name: name.into(),
    }
}

pub(crate) async fn start() -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &dir.path().join("ca"),
        CONSORTIUM,
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    issue(&ca, &Principal::Coordinator, "coordinator");
    issue(&ca, &Principal::Operator { name: "op".into() }, "op");
    let alice = issue(&ca, &user("a", "alice"), "alice");
    let bob = issue(&ca, &user("b", "bob"), "bob");
    issue(&ca, &user("c", "carol"), "carol");
    let mallory = issue(&ca, &user("a", "mallory"), "mallory");
    let other = CaDir::init(
        &dir.path().join("other-ca"),
        CONSORTIUM,
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    let fake_alice = other
        .issue(
            &user("a", "alice"),
            &LeafOptions::new(Validity::days_from_now(10)),
        )
        .unwrap();

    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy/model.conf");
    let policy = dir.path().join("policy.csv");
    std::fs::write(&policy, POLICY).unwrap();
    let data_dir = dir.path().join("coordinator");
    let c = ca.dir();
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\ntls_reload_secs = 3600\ninsecure_no_audit = true\n\
         [tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/coordinator.crt\"\nkey = \"{c}/coordinator.key\"\ncrl = \"{c}/crl.pem\"\n\
         [policy]\nmodel = \"{model}\"\npolicy = \"{policy}\"\nreload_secs = 3600\n",
        data = data_dir.display(),
        c = c.display(),
        model = model.display(),
        policy = policy.display(),
    );
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, config).unwrap();
    let config = tutela_coordinator::Config::from_file(&path).unwrap();
    let coordinator = tutela_coordinator::Coordinator::bind(config).await.unwrap();
    let port = coordinator.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(coordinator.serve(async move {
        let _ = rx.await;
    }));
    Running {
        ca_dir: c.to_path_buf(),
        addr: format!("localhost:{port}"),
        db_url: Store::sqlite_url(&data_dir.join("coordinator.db")).unwrap(),
        _dir: dir,
        shutdown: Some(tx),
        served: Some(served),
        alice,
        bob,
        mallory,
        fake_alice,
    }
}

fn reject_request(r: &Rejection) -> pb::RejectJobRequest {
    pb::RejectJobRequest {
        job_id: r.job_id.clone(),
        reason: r.reason.clone(),
        rejection: Some(r.to_pb()),
    }
}

fn sign_rejection(
    key_of: &IssuedCertificate,
    cert_of: &IssuedCertificate,
    job: &str,
    digest: &SpecDigest,
    reason: &str,
) -> Rejection {
    Rejection::sign(
        &key_of.key_pem,
        &cert_of.cert_pem,
        job,
        digest,
        reason,
        now_ms(),
    )
    .unwrap()
}

async fn reject(
    client: &mut JobsClient<tonic::transport::Channel>,
    request: pb::RejectJobRequest,
) -> Result<pb::JobStatus, tonic::Status> {
    client.reject_job(request).await.map(|r| r.into_inner())
}

pub(crate) fn refused(
    r: Result<pb::JobStatus, tonic::Status>,
    what: &str,
    code: Code,
    expect: &str,
) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {e:?}");
    assert!(
        e.message().contains(expect),
        "{what}: expected {expect:?} in {:?}",
        e.message()
    );
}

pub(crate) async fn submit(
    op: &mut JobsClient<tonic::transport::Channel>,
    name: &str,
) -> (String, SpecDigest) {
    let text = spec(name, &["a", "b"]);
    let s = op
        .submit_job(pb::SubmitJobRequest {
            spec_toml: text.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "proposed", "{s:?}");
    let digest: SpecDigest = s.spec_digest.parse().unwrap();
    assert_eq!(digest, JobSpec::from_toml_str(&text).unwrap().digest());
    (s.job_id, digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_rejection_ends_the_job_and_is_stored_and_forgeries_are_refused() {
    let c = start().await;
    let mut op = c.as_("op").await;
    let mut as_alice = c.as_("alice").await;
    let mut as_bob = c.as_("bob").await;
    let mut as_mallory = c.as_("mallory").await;
    let mut as_carol = c.as_("carol").await;
    let (job, digest) = submit(&mut op, "rejected-job").await;
    let (other_job, other_digest) = submit(&mut op, "other-job").await;
    let reason = "the DP budget is too high for our registry";

    // Forgeries and malformed requests, each refused with its reason; none changes the job.
    refused(
        reject(
            &mut as_alice,
            reject_request(&sign_rejection(&c.mallory, &c.alice, &job, &digest, reason)),
        )
        .await,
        "wrong key",
        Code::PermissionDenied,
        "does not verify with the key",
    );
    refused(
        reject(
            &mut as_alice,
            reject_request(&sign_rejection(
                &c.fake_alice,
                &c.fake_alice,
                &job,
                &digest,
                reason,
            )),
        )
        .await,
        "another CA",
        Code::PermissionDenied,
        "does not verify against the consortium CA",
    );
    refused(
        reject(
            &mut as_mallory,
            reject_request(&sign_rejection(
                &c.mallory, &c.mallory, &job, &digest, reason,
            )),
        )
        .await,
        "not an officer",
        Code::PermissionDenied,
        "holds none of the roles",
    );
    let carol = Rejection::sign(
        &std::fs::read_to_string(c.ca_dir.join("carol.key")).unwrap(),
        &std::fs::read_to_string(c.ca_dir.join("carol.crt")).unwrap(),
        &job,
        &digest,
        reason,
        now_ms(),
    )
    .unwrap();
    refused(
        reject(&mut as_carol, reject_request(&carol)).await,
        "officer of a site outside the job",
        Code::PermissionDenied,
        "does not take part in job",
    );
    refused(
        reject(
            &mut as_alice,
            reject_request(&sign_rejection(
                &c.alice,
                &c.alice,
                &job,
                &other_digest,
                reason,
            )),
        )
        .await,
        "another job's digest",
        Code::PermissionDenied,
        "signs spec digest",
    );
    // An approval's signature (same job, digest and time) carried as a rejection.
    let t = now_ms();
    let approval = Approval::sign(
        &c.alice.key_pem,
        &c.alice.cert_pem,
        &job,
        &digest,
        t,
        t + 3_600_000,
    )
    .unwrap();
    let mut replayed = Rejection::sign(
        &c.alice.key_pem,
        &c.alice.cert_pem,
        &job,
        &digest,
        reason,
        t,
    )
    .unwrap();
    replayed.signature = approval.signature.clone();
    refused(
        reject(&mut as_alice, reject_request(&replayed)).await,
        "an approval's signature",
        Code::PermissionDenied,
        "does not verify with the key",
    );
    refused(
        reject(
            &mut as_bob,
            reject_request(&sign_rejection(&c.alice, &c.alice, &job, &digest, reason)),
        )
        .await,
        "someone else's rejection",
        Code::PermissionDenied,
        "officers submit their own",
    );
    refused(
        reject(
            &mut as_alice,
            pb::RejectJobRequest {
                job_id: job.clone(),
                reason: reason.into(),
                rejection: None,
            },
        )
        .await,
        "unsigned",
        Code::InvalidArgument,
        "carries no signed rejection",
    );
    let mut other_reason =
        reject_request(&sign_rejection(&c.alice, &c.alice, &job, &digest, reason));
    other_reason.reason = "something else".into();
    refused(
        reject(&mut as_alice, other_reason).await,
        "reason not the signed one",
        Code::InvalidArgument,
        "differs from the reason",
    );
    let mut other_id = reject_request(&sign_rejection(&c.alice, &c.alice, &job, &digest, reason));
    other_id.job_id = other_job.clone();
    refused(
        reject(&mut as_alice, other_id).await,
        "job id not the signed one",
        Code::InvalidArgument,
        "its signed rejection is of job",
    );
    let store = Store::open(&c.db_url).await.unwrap();
    let id: JobId = job.parse().unwrap();
    assert_eq!(
        store.get_job(&id).await.unwrap().unwrap().state,
        JobState::Proposed
    );
    assert_eq!(store.rejection(&id).await.unwrap(), None);

    // The genuine rejection: the job ends, and the status says who rejected it and why.
    let genuine = sign_rejection(&c.alice, &c.alice, &job, &digest, reason);
    let s = reject(&mut as_alice, reject_request(&genuine))
        .await
        .unwrap();
    assert_eq!(s.state, "cancelled", "{s:?}");
    assert!(
        s.reason
            .starts_with("rejected by spiffe://rej/site/a/user/alice (signed at ")
            && s.reason.ends_with(reason),
        "{s:?}"
    );
    // Stored with its signature and certificate, which still verify.
    let stored = store.rejection(&id).await.unwrap().expect("stored");
    assert_eq!(stored.signer, "spiffe://rej/site/a/user/alice");
    assert_eq!(stored.rejection, genuine);
    let material = TlsMaterial::load(&TlsFiles::in_dir(&c.ca_dir, "op")).unwrap();
    ApprovalVerifier::from_tls(&material)
        .unwrap()
        .verify_rejection(&stored.rejection, &job, &digest, now_ms())
        .unwrap();

    // Rejected, the job can be neither rejected again, approved, nor amended, and never starts.
    refused(
        reject(
            &mut as_bob,
            reject_request(&sign_rejection(&c.bob, &c.bob, &job, &digest, "also no")),
        )
        .await,
        "a second rejection",
        Code::FailedPrecondition,
        "is cancelled",
    );
    for (client, who) in [(&mut as_alice, &c.alice), (&mut as_bob, &c.bob)] {
        let t = now_ms();
        let a =
            Approval::sign(&who.key_pem, &who.cert_pem, &job, &digest, t, t + 3_600_000).unwrap();
        let r = client
            .approve_job(pb::ApproveJobRequest {
                approval: Some(a.to_pb()),
            })
            .await
            .map(|r| r.into_inner());
        refused(
            r,
            "approval after rejection",
            Code::FailedPrecondition,
            "is cancelled",
        );
    }
    let r = op
        .amend_job(pb::AmendJobRequest {
            job_id: job.clone(),
            spec_toml: spec("rejected-job-v2", &["a", "b"]),
        })
        .await
        .map(|r| r.into_inner());
    assert!(r.is_err(), "amending a rejected job: {r:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = op
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "cancelled", "{s:?}");
    assert!(s.reason.ends_with(reason), "{s:?}");

    // The other job was untouched by the rejections aimed at it: both officers approve it and it
    // starts, after which it can no longer be rejected.
    for (client, who) in [(&mut as_alice, &c.alice), (&mut as_bob, &c.bob)] {
        let t = now_ms();
        let a = Approval::sign(
            &who.key_pem,
            &who.cert_pem,
            &other_job,
            &other_digest,
            t,
            t + 3_600_000,
        )
        .unwrap();
        client
            .approve_job(pb::ApproveJobRequest {
                approval: Some(a.to_pb()),
            })
            .await
            .unwrap();
    }
    let s = op
        .get_job(pb::GetJobRequest {
            job_id: other_job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "running", "{s:?}");
    // After the start, `job status` still shows who approved it and that their approvals count.
    let signers: Vec<&str> = s.approvals.iter().map(|a| a.signer.as_str()).collect();
    assert_eq!(s.approvals.len(), 2, "{s:?}");
    assert!(
        s.approvals.iter().all(|a| a.standing == "counts"),
        "{:?}",
        s.approvals
    );
    for who in [&c.alice, &c.bob] {
        assert!(
            signers.contains(&who.identity.uri().as_str()),
            "{signers:?}"
        );
    }
    assert!(s.approvals_missing.is_empty(), "{s:?}");
    refused(
        reject(
            &mut as_alice,
            reject_request(&sign_rejection(
                &c.alice,
                &c.alice,
                &other_job,
                &other_digest,
                reason,
            )),
        )
        .await,
        "rejecting a running job",
        Code::FailedPrecondition,
        "is running",
    );
    let other_id: JobId = other_job.parse().unwrap();
    assert_eq!(store.rejection(&other_id).await.unwrap(), None);
    store.close().await;
    c.stop().await;
}

// ------------------------------------------------------------------------------------------------
// The store's rejection record, on SQLite and PostgreSQL.

const PG_ENV: &str = "TUTELA_TEST_POSTGRES_URL";

async fn admin_exec(admin_url: &str, sql: String) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {PG_ENV}: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

/// `url` with its database (the path) replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host}/{db}?{q}"),
        None => format!("{host}/{db}"),
    }
}

/// Runs `body` with the URL of a fresh SQLite database, then of a fresh PostgreSQL database when
/// `TUTELA_TEST_POSTGRES_URL` is set.
async fn for_each_backend(test: &str, body: impl AsyncFn(&str, &str)) {
    let dir = tempfile::tempdir().unwrap();
    body(
        "sqlite",
        &Store::sqlite_url(&dir.path().join("coordinator.db")).unwrap(),
    )
    .await;
    match std::env::var(PG_ENV) {
        Ok(admin) if !admin.is_empty() => {
            let name = format!(
                "tutela_test_{test}_{}",
                &JobId::generate().unwrap().to_string()[..8]
            );
            admin_exec(&admin, format!("CREATE DATABASE {name}")).await;
            body("postgres", &with_database(&admin, &name)).await;
            admin_exec(
                &admin,
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
            .await;
        }
        _ => eprintln!("{test}: the PostgreSQL variant was not run: {PG_ENV} is not set"),
    }
}

#[tokio::test]
async fn a_rejection_is_stored_with_the_jobs_end_or_not_at_all() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &dir.path().join("ca"),
        CONSORTIUM,
        KeyAlgorithm::Ed25519,
        30,
        false,
    )
    .unwrap();
    let alice = issue(&ca, &user("a", "alice"), "alice");
    for_each_backend("rejections", async |label: &str, url: &str| {
        let store = Store::open(url).await.unwrap();
        let create = async |name: &str| {
            let text = spec(name, &["a", "b"]);
            let parsed = JobSpec::from_toml_str(&text).unwrap();
            let digest = parsed.digest();
            let id = store.create_job(&text, &parsed, &digest).await.unwrap();
            (id, digest)
        };
        let sign = |id: &JobId, digest: &SpecDigest| {
            sign_rejection(&alice, &alice, id.as_str(), digest, "not in our protocol")
        };
        let signer = "spiffe://rej/site/a/user/alice";

        // Recorded: the job is cancelled with the reason, the rejection reads back whole.
        let (id, digest) = create("a").await;
        let r = sign(&id, &digest);
        store
            .record_rejection(&id, signer, &r, "rejected by alice: not in our protocol")
            .await
            .unwrap_or_else(|e| panic!("[{label}] record: {e}"));
        let job = store.get_job(&id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Cancelled, "[{label}]");
        assert_eq!(
            job.state_reason.as_deref(),
            Some("rejected by alice: not in our protocol")
        );
        let back = store.rejection(&id).await.unwrap().expect("stored");
        assert_eq!(back.rejection, r, "[{label}]");
        assert_eq!(back.signer, signer);
        back.rejection.check_own_signature().unwrap();

        // A second rejection of the ended job: refused, the first stays.
        let again = sign(&id, &digest);
        let e = store
            .record_rejection(&id, signer, &again, "again")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::StaleState {
                    actual: JobState::Cancelled,
                    ..
                }
            ),
            "[{label}] {e}"
        );
        assert_eq!(store.rejection(&id).await.unwrap().unwrap().rejection, r);

        // A rejection of a spec since amended: refused, nothing written.
        let (id, digest) = create("b").await;
        let stale = sign(&id, &digest);
        let amended = spec("b-amended", &["a", "b"]);
        let parsed = JobSpec::from_toml_str(&amended).unwrap();
        store
            .amend_job(&id, &amended, &parsed, &parsed.digest())
            .await
            .unwrap();
        let e = store
            .record_rejection(&id, signer, &stale, "stale")
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::SpecChanged { .. }), "[{label}] {e}");
        assert!(e.to_string().contains("amended"), "{e}");
        assert_eq!(
            store.get_job(&id).await.unwrap().unwrap().state,
            JobState::Proposed
        );
        assert_eq!(store.rejection(&id).await.unwrap(), None, "[{label}]");

        // A running job is not rejected.
        let (id, digest) = create("c").await;
        store
            .set_job_state(&id, JobState::Proposed, JobState::Running, None)
            .await
            .unwrap();
        let e = store
            .record_rejection(&id, signer, &sign(&id, &digest), "late")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::StaleState {
                    actual: JobState::Running,
                    ..
                }
            ),
            "[{label}] {e}"
        );
        assert_eq!(store.rejection(&id).await.unwrap(), None);

        // A rejection of another job handed in for this one.
        let (id, _) = create("d").await;
        let (other, other_digest) = create("e").await;
        let e = store
            .record_rejection(&id, signer, &sign(&other, &other_digest), "mixed up")
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidInput { .. }),
            "[{label}] {e}"
        );
        store.close().await;
    })
    .await;
}

/// A job naming a model no site's registry has is refused at submission (and at amendment),
/// before any officer is asked to sign it; the answer lists the models the sites have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_naming_a_model_no_site_has_is_refused_at_submission() {
    let c = start().await;
    let mut op = c.as_("op").await;
    let unknown = spec("unknown-model", &["a", "b"])
        .replace("name = \"mlp\"\nhidden = [8]", "name = \"transformer\"");
    assert!(unknown.contains("\"transformer\""), "{unknown}");
    refused(
        op.submit_job(pb::SubmitJobRequest {
            spec_toml: unknown.clone(),
        })
        .await
        .map(|r| r.into_inner()),
        "unknown model",
        Code::InvalidArgument,
        "model.name = \"transformer\": unknown model; no site's model registry has it (known models: mlp, cnn, llama)",
    );
    let (job, _) = submit(&mut op, "known-model").await;
    refused(
        op.amend_job(pb::AmendJobRequest {
            job_id: job,
            spec_toml: unknown,
        })
        .await
        .map(|r| r.into_inner()),
        "unknown model in an amendment",
        Code::InvalidArgument,
        "unknown model",
    );
    c.stop().await;
}
