//! The model registry and staged release end to end, with real processes: a coordinator and an
//! audit service under the consortium's casbin policy (with `p3` stage rules), two site nodes,
//! over loopback mutual TLS with certificates made at test time. Two jobs publish two versions of
//! one registry name; `tutela model promote|rollback` move them through every stage with the
//! signatures the policy asks for; a principal the policy does not allow is refused and the
//! refusal is in the trail; a consumer fetching production gets the version a rollback restored;
//! `tutela audit verify` verifies the stage history, and a tampered stage row is named.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::Code;
use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::{bin, free_port, repo_root};
use tutela_policy::stage::SignedMove;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::registry_client::RegistryClient;
use tutela_protocol::pki::{IssuedCertificate, LeafOptions, Validity};
use tutela_protocol::release::{MoveKind, Stage, VersionMove};
use tutela_protocol::tls::TlsFiles;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Issues a certificate for `who` into the certs directory as `<stem>.crt`/`.key`.
fn issue(c: &Consortium, who: Principal, stem: &str) -> IssuedCertificate {
    let issued =
        c.ca.issue(&who, &LeafOptions::new(Validity::days_from_now(30)))
            .unwrap();
    std::fs::write(c.certs().join(format!("{stem}.crt")), &issued.cert_pem).unwrap();
    std::fs::write(c.certs().join(format!("{stem}.key")), &issued.key_pem).unwrap();
    issued
}

fn user(site: &str, name: &str) -> Principal {
    Principal::User {
        site: site.into(),
        name: name.into(),
    }
}

/// The consortium's policy: the operator runs jobs and moves models; each site's officer
/// approves jobs and signs moves into production; Mallory, a site admin, may call MoveStage but
/// holds no role a stage rule asks for; nodes fetch registered models.
const POLICY: &str = "\
p, operator, consortium, jobs, *, allow
p, operator, consortium, registry, *, allow
p, compliance_officer, *, jobs, read, allow
p, compliance_officer, *, jobs, approve, allow
p, compliance_officer, *, registry, read, allow
p, compliance_officer, *, registry, stage, allow
p, compliance_officer, *, audit, read, allow
p, site_admin, site:*, registry, read, allow
p, site_admin, site:*, registry, stage, allow
p, spiffe://e2e/site/*/node, site:*, federation, participate, allow
p, spiffe://e2e/site/*/node, site:*, registry, fetch, allow
p, spiffe://e2e/coordinator, consortium, audit, write, allow
p, spiffe://e2e/coordinator, consortium, audit, read_own, allow
g, spiffe://e2e/operator/op, operator, consortium
g, spiffe://e2e/site/a/user/alice, compliance_officer, site:a
g, spiffe://e2e/site/b/user/bob, compliance_officer, site:b
g, spiffe://e2e/site/a/user/mallory, site_admin, site:a
p2, site:*, compliance_officer, 1
p3, canary, consortium, operator, 1
p3, production, consortium, operator, 1
p3, production, site:*, compliance_officer, 1
p3, retired, consortium, operator, 1
";

/// Runs `tutela model ARGS` as `stem` (signing with its key where the command signs); returns
/// the output.
fn model_cli(c: &Consortium, stem: &str, args: &[&str], sign: bool) -> std::process::Output {
    let certs = c.certs();
    let mut cmd = Command::new(bin("tutela"));
    cmd.arg("model")
        .args(args)
        .args(["--coordinator", &format!("localhost:{}", c.port)])
        .arg("--tls-dir")
        .arg(&certs)
        .args(["--stem", stem]);
    if sign {
        cmd.arg("--key")
            .arg(certs.join(format!("{stem}.key")))
            .arg("--cert")
            .arg(certs.join(format!("{stem}.crt")));
    }
    cmd.output().unwrap()
}

fn model_ok(c: &Consortium, stem: &str, args: &[&str], sign: bool) -> String {
    let out = model_cli(c, stem, args, sign);
    assert!(
        out.status.success(),
        "tutela model {args:?} as {stem} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn registry_as(c: &Consortium, stem: &str) -> RegistryClient<tonic::transport::Channel> {
    let tls = ClientTls::load(
        &TlsFiles::in_dir(&c.certs(), stem),
        Some(Identity::new("e2e", Principal::Coordinator).unwrap()),
    )
    .unwrap();
    RegistryClient::new(
        client::connect(&format!("localhost:{}", c.port), tls)
            .await
            .unwrap(),
    )
}

/// Submits a one-round job publishing to `cancer` with `seed`, has both officers approve it and
/// waits for it to complete; returns its id.
async fn run_job(
    c: &Consortium,
    seed: u64,
    alice: &IssuedCertificate,
    bob: &IssuedCertificate,
) -> String {
    let spec = job_spec(1, 2, 60, &["a", "b"]).replace("seed = 3", &format!("seed = {seed}"))
        + "\n[publish]\nname = \"cancer\"\n";
    let s = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .unwrap()
        .into_inner();
    let digest = s.spec_digest.parse().unwrap();
    for (stem, who) in [("user-alice", alice), ("user-bob", bob)] {
        let t = now_ms();
        let approval = tutela_policy::Approval::sign(
            &who.key_pem,
            &who.cert_pem,
            &s.job_id,
            &digest,
            t,
            t + 3_600_000,
        )
        .unwrap();
        let tls = ClientTls::load(
            &TlsFiles::in_dir(&c.certs(), stem),
            Some(Identity::new("e2e", Principal::Coordinator).unwrap()),
        )
        .unwrap();
        pb::jobs_client::JobsClient::new(
            client::connect(&format!("localhost:{}", c.port), tls)
                .await
                .unwrap(),
        )
        .approve_job(pb::ApproveJobRequest {
            approval: Some(approval.to_pb()),
        })
        .await
        .unwrap();
    }
    let done = c
        .wait_for_job(&s.job_id, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(
        done.state,
        "completed",
        "{done:?}\n{}",
        c.log("coordinator.log")
    );
    s.job_id
}

fn stage_of(m: &pb::RegisteredModel, version: u64) -> String {
    m.versions
        .iter()
        .find(|v| v.version == version)
        .map(|v| v.stage.clone())
        .unwrap_or_default()
}

/// `tutela audit ARGS --database-url <the audit db> --ca <ca.crt>` (and, for `verify`, the log's
/// checkpoint key).
fn audit_cli(c: &Consortium, args: &[&str]) -> std::process::Output {
    let audit = c.dir.join("audit");
    let mut cmd = Command::new(bin("tutela"));
    cmd.arg("audit")
        .args(args)
        .args([
            "--database-url",
            &format!("sqlite://{}", audit.join("audit.db").display()),
        ])
        .arg("--ca")
        .arg(c.certs().join("ca.crt"));
    if args.first() == Some(&"verify") {
        cmd.arg("--public-key")
            .arg(audit.join("checkpoint.key.pub"));
    }
    cmd.output().unwrap()
}

fn sha256_file(path: &Path) -> String {
    let (manifest, data) = tutela_protocol::stream::load_model(path).unwrap();
    let mut d = tutela_protocol::stream::StreamDigest::new(&manifest);
    for t in &data {
        d.update(t);
    }
    hex::encode(d.finish())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_move_through_every_stage_by_signed_quorum_and_rollback_restores_production() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let alice = issue(&c, user("a", "alice"), "user-alice");
    let bob = issue(&c, user("b", "bob"), "user-bob");
    let mallory = issue(&c, user("a", "mallory"), "user-mallory");
    issue(&c, Principal::Node { site: "a".into() }, "node-a");

    let pol = d.join("policy");
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::copy(
        repo_root().join("deploy/policy/model.conf"),
        pol.join("model.conf"),
    )
    .unwrap();
    std::fs::write(pol.join("policy.csv"), POLICY).unwrap();
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Files(&pol));
    c.coordinator_extra = format!(
        "[policy]\nmodel = \"{}\"\npolicy = \"{}\"\nreload_secs = 1\n[audit]\nendpoint = \"localhost:{audit_port}\"\n",
        pol.join("model.conf").display(),
        pol.join("policy.csv").display()
    );
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(2);
    c.start_node("a", &header, &shares[0], "");
    c.start_node("b", &header, &shares[1], "");

    // Two jobs publish v1 and v2 of `cancer`, both candidates.
    let job1 = run_job(&c, 3, &alice, &bob).await;
    let job2 = run_job(&c, 4, &alice, &bob).await;
    let list = model_ok(&c, "operator-op", &["list"], false);
    assert!(
        list.contains("cancer") && list.contains("v1") && list.contains("v2"),
        "{list}"
    );
    let mut as_op = registry_as(&c, "operator-op").await;
    let m = as_op
        .get_model(pb::GetModelRequest {
            name: "cancer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.versions.len(), 2, "{m:?}");
    assert_eq!(
        (m.versions[0].job_id.as_str(), m.versions[1].job_id.as_str()),
        (job1.as_str(), job2.as_str())
    );
    assert!(m.versions.iter().all(|v| v.stage == "candidate"), "{m:?}");
    let (v1_digest, v2_digest) = (
        m.versions[0].model_digest.clone(),
        m.versions[1].model_digest.clone(),
    );
    assert_ne!(v1_digest, v2_digest);

    // Mallory may call MoveStage (site_admin) but holds no role a stage rule asks for: refused,
    // and the refusal is recorded.
    let out = model_cli(
        &c,
        "user-mallory",
        &[
            "promote", "cancer", "1", "--to", "canary", "--reason", "ship it",
        ],
        true,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds none of the roles"), "{err}");

    // An invalid transition, signed properly, is refused with the reason (typed stages).
    let skip = SignedMove::sign(
        &operator_key(&c),
        &operator_cert(&c),
        "cancer",
        MoveKind::Promote,
        vec![VersionMove {
            version: 1,
            model_digest: v1_digest.clone(),
            from: Stage::Candidate,
            to: Stage::Production,
        }],
        "skip the canary",
        now_ms(),
    )
    .unwrap();
    let e = as_op
        .move_stage(pb::MoveStageRequest {
            r#move: Some(skip.to_pb()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("canary before production"), "{e:?}");
    // Someone else's signature, sent by the operator: refused.
    let alices = SignedMove::sign(
        &alice.key_pem,
        &alice.cert_pem,
        "cancer",
        MoveKind::Promote,
        vec![VersionMove {
            version: 1,
            model_digest: v1_digest.clone(),
            from: Stage::Candidate,
            to: Stage::Canary,
        }],
        "relayed",
        now_ms(),
    )
    .unwrap();
    let e = as_op
        .move_stage(pb::MoveStageRequest {
            r#move: Some(alices.to_pb()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    drop(mallory);

    // v1: candidate -> canary (the operator alone), -> production (the operator and an officer
    // of each contributing site: applied at the third signature).
    let out = model_ok(
        &c,
        "operator-op",
        &[
            "promote",
            "cancer",
            "1",
            "--to",
            "canary",
            "--reason",
            "first candidate",
        ],
        true,
    );
    assert!(out.contains("applied"), "{out}");
    let into_prod = [
        "promote",
        "cancer",
        "1",
        "--to",
        "production",
        "--reason",
        "canary held",
    ];
    let out = model_ok(&c, "operator-op", &into_prod, true);
    assert!(
        out.contains("waiting") && out.contains("site:a") && out.contains("site:b"),
        "{out}"
    );
    let out = model_ok(&c, "user-alice", &into_prod, true);
    assert!(out.contains("waiting") && out.contains("site:b"), "{out}");
    let out = model_ok(&c, "user-bob", &into_prod, true);
    assert!(out.contains("applied"), "{out}");

    // v2 through canary into production: v1 is retired in the same move.
    model_ok(
        &c,
        "operator-op",
        &[
            "promote",
            "cancer",
            "2",
            "--to",
            "canary",
            "--reason",
            "second candidate",
        ],
        true,
    );
    let v2_prod = [
        "promote",
        "cancer",
        "2",
        "--to",
        "production",
        "--reason",
        "better on canary",
    ];
    for stem in ["operator-op", "user-alice", "user-bob"] {
        model_ok(&c, stem, &v2_prod, true);
    }
    let m = as_op
        .get_model(pb::GetModelRequest {
            name: "cancer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stage_of(&m, 1).as_str(), stage_of(&m, 2).as_str()),
        ("retired", "production"),
        "{m:?}"
    );

    // A consumer (a site node's certificate) fetches production: v2, its digest checked.
    let fetched = d.join("fetched");
    let out = model_ok(
        &c,
        "node-a",
        &["fetch", "cancer", "--out", fetched.to_str().unwrap()],
        false,
    );
    assert!(out.contains("cancer v2"), "{out}");
    assert_eq!(
        sha256_file(&fetched.join("cancer-v2.safetensors")),
        v2_digest
    );

    // Rollback in one command per signer: v1 back in production, v2 retired.
    let rollback = [
        "rollback",
        "cancer",
        "--reason",
        "v2 misbehaves in production",
    ];
    for stem in ["operator-op", "user-alice"] {
        let out = model_ok(&c, stem, &rollback, true);
        assert!(out.contains("waiting"), "{out}");
    }
    let out = model_ok(&c, "user-bob", &rollback, true);
    assert!(out.contains("applied"), "{out}");
    let out = model_ok(
        &c,
        "node-a",
        &["fetch", "cancer", "--out", fetched.to_str().unwrap()],
        false,
    );
    assert!(out.contains("cancer v1"), "{out}");
    assert_eq!(
        sha256_file(&fetched.join("cancer-v1.safetensors")),
        v1_digest
    );
    let show = model_ok(&c, "operator-op", &["show", "cancer"], false);
    assert!(
        show.contains("rollback") && show.contains("v2 misbehaves"),
        "{show}"
    );

    // A node may not move stages (nor read the registry to plan a move): the policy refuses, and
    // records it.
    let out = model_cli(&c, "node-a", &["rollback", "cancer", "--reason", "x"], true);
    assert!(!out.status.success());

    // The trail: every move with its signatures, the denials, and it all verifies.
    let start = Instant::now();
    loop {
        let out = audit_cli(&c, &["log", "--action", "policy.decision", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let denied = |who: &str, method: &str, rule: &str| {
            text.lines().any(|l| {
                let e: serde_json::Value = serde_json::from_str(l).unwrap();
                e["payload"]["allowed"] == false
                    && e["payload"]["who"] == who
                    && e["payload"]["method"] == format!("/tutela.v1.Registry/{method}")
                    && e["payload"]["rule"]
                        .as_str()
                        .is_some_and(|r| r.contains(rule))
            })
        };
        if denied(
            "spiffe://e2e/site/a/user/mallory",
            "MoveStage",
            "holds none of the roles",
        ) && denied("spiffe://e2e/site/a/node", "GetModel", "default deny")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "denials missing:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let moves = audit_cli(&c, &["log", "--action", "model.stage_changed", "--json"]);
    let moves: Vec<serde_json::Value> = String::from_utf8_lossy(&moves.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(moves.len(), 5, "{moves:#?}");
    assert_eq!(moves[4]["payload"]["kind"], "rollback");
    assert_eq!(
        moves[4]["payload"]["signatures"].as_array().unwrap().len(),
        3
    );
    // The policy every move was decided under is in the trail, as text, before the first move
    // (review 2026-12-07: readers re-check the signers' roles against it).
    let loaded = audit_cli(&c, &["log", "--action", "policy.loaded", "--json"]);
    let loaded: Vec<serde_json::Value> = String::from_utf8_lossy(&loaded.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for m in &moves {
        let digest = &m["payload"]["policy_digest"];
        let policy = loaded
            .iter()
            .find(|p| &p["subject"] == digest)
            .unwrap_or_else(|| panic!("no policy.loaded for {digest}: {loaded:#?}"));
        assert!(policy["seq"].as_u64() < m["seq"].as_u64());
        assert!(
            policy["payload"]["policy"]
                .as_str()
                .is_some_and(|t| t.contains("p3, production")),
            "{policy:#}"
        );
    }
    let ok = audit_cli(&c, &["verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let lineage = audit_cli(&c, &["lineage", "--model", &v1_digest]);
    let lineage: serde_json::Value = serde_json::from_slice(&lineage.stdout).unwrap();
    let entry = &lineage["registry"][0];
    assert_eq!(
        (entry["name"].as_str(), entry["version"].as_u64()),
        (Some("cancer"), Some(1))
    );
    let stages: Vec<&str> = entry["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["canary", "production", "retired", "production"],
        "{lineage:#}"
    );
    assert_eq!(entry["stage"], "production");

    // A tampered stage row (its reason rewritten in the database) is named by verify.
    let tampered = moves[1]["seq"].as_u64().unwrap();
    let db_url =
        tutela_audit::store::AuditStore::sqlite_url(&d.join("audit").join("audit.db")).unwrap();
    let attacker = tutela_audit::store::AuditStore::open(&db_url)
        .await
        .unwrap();
    let payload = moves[1]["payload"]
        .to_string()
        .replace("canary held", "nobody objected");
    for s in [
        "DROP TRIGGER audit_events_no_update".to_string(),
        format!("UPDATE audit_events SET payload = '{payload}' WHERE seq = {tampered}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(s))
            .execute(attacker.pool())
            .await
            .unwrap();
    }
    let bad = audit_cli(&c, &["verify"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "verify must fail after tampering");
    assert!(stderr.contains(&format!("at seq {tampered}")), "{stderr}");
}

fn operator_key(c: &Consortium) -> String {
    std::fs::read_to_string(c.certs().join("operator-op.key")).unwrap()
}

fn operator_cert(c: &Consortium) -> String {
    std::fs::read_to_string(c.certs().join("operator-op.crt")).unwrap()
}
