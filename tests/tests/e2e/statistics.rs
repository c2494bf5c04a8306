//! Consortium statistics (`kind = "statistics"`) through the running services.
//!
//! `tutela job check` (the RPC and the CLI) asks each site's node whether it would release the
//! job's statistics, and each gate judges it as a statistics job — its table and schema digest,
//! the site-policy clauses (not `allowed_models`: it trains no model), its one release against
//! the site's ε caps —, reading no record and spending nothing.
//!
//! A statistics job runs end to end: three nodes on breast cancer, each with its site policy and
//! an officer who signs the job, an audit service: the job is proposed, approved, each node
//! releases its noised vector after its `privacy.spent` is in the trail, the coordinator's result
//! holds the pooled statistics within its stated bounds, `statistics.published` names the file
//! `tutela job stats` writes, and a second job past the sites' budget is declined by each site
//! (the clause and its numbers in the site's log), failing with every site named.

use std::time::Duration;

use tutela_e2e::consortium::{Consortium, breast_cancer_shares};
use tutela_e2e::repo_root;
use tutela_protocol::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statistics_job_check_asks_each_site_and_its_gate_judges_the_release() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Consortium::new(dir.path());
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(2);
    // a: an ε cap per job below the job's; b: only a model list, which does not apply.
    let policies = [
        ("a", "[privacy]\nmax_epsilon_per_job = 0.5\n"),
        ("b", "allowed_models = [\"logreg\"]\n"),
    ];
    for ((site, clauses), rows) in policies.iter().zip(&shares) {
        let path = dir.path().join(format!("site-{site}.toml"));
        std::fs::write(
            &path,
            format!(
                "site = \"{site}\"\ncompliance_officers = \
                 [\"spiffe://e2e/site/{site}/user/officer\"]\n{clauses}"
            ),
        )
        .unwrap();
        c.node_top_level.insert(
            site.to_string(),
            format!("site_policy = \"{}\"", path.display()),
        );
        c.start_node(site, &header, rows, "");
    }
    let schema = std::fs::read(repo_root().join("data/breast_cancer.schema.toml")).unwrap();
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &schema));
    let spec = include_str!("../../../deploy/jobs/breast_cancer_statistics.toml")
        .replace(
            "sites = [\"hospital-a\", \"hospital-b\", \"hospital-c\"]",
            "sites = [\"a\", \"b\"]",
        )
        .replace("min_sites = 3", "min_sites = 2");
    let spec = replace_schema_digest(&spec, &digest);
    let mut op = c.operator().await;
    let sites = c.check_until_answered(&mut op, &spec, 2).await;
    let names: Vec<&str> = sites.iter().map(|s| s.site.as_str()).collect();
    assert_eq!(names, ["a", "b"], "{sites:#?}");
    let codes: Vec<&str> = sites[0].refusals.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(codes, ["policy.refused", "privacy.budget"], "{sites:#?}");
    assert!(
        sites[0].refusals[0]
            .reason
            .starts_with("site policy `privacy.max_epsilon_per_job`"),
        "{sites:#?}"
    );
    assert!(sites[1].refusals.is_empty(), "{sites:#?}");
    for s in &sites {
        for r in &s.refusals {
            assert!(!r.reason.contains(&*dir.path().to_string_lossy()), "{r:?}");
        }
    }

    // The CLI prints each refusal and the site that would release it, and exits non-zero.
    let spec_path = dir.path().join("statistics.toml");
    std::fs::write(&spec_path, &spec).unwrap();
    let out = std::process::Command::new(tutela_e2e::bin("tutela"))
        .args(["job", "check"])
        .arg(&spec_path)
        .arg("--coordinator")
        .arg(format!("localhost:{}", c.port))
        .arg("--tls-dir")
        .arg(c.certs())
        .args(["--stem", "operator-op"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    for line in [
        "a\tpolicy.refused\tsite policy `privacy.max_epsilon_per_job`",
        "a\tprivacy.budget\t",
        "b\twould run the job",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(line)),
            "{line:?} missing:\n{stdout}\n{stderr}"
        );
    }

    // Another schema file than the sites': each names the two digests' prefixes.
    let other = replace_schema_digest(&spec, &"0".repeat(64));
    let sites = op
        .check_job(pb::CheckJobRequest { spec_toml: other })
        .await
        .unwrap()
        .into_inner()
        .sites;
    for s in &sites {
        assert!(s.answered, "{sites:#?}");
        assert_eq!(s.refusals[0].code, "data.schema_mismatch", "{sites:#?}");
        assert!(s.refusals[0].reason.contains("000000000000"), "{sites:#?}");
    }

    // A check proposes nothing.
    let jobs = op
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "{jobs:#?}");
}

/// The consortium's policy for the run: the operator submits, each site's officer approves, and
/// every site's officer must (`p2, site:*`).
const POLICY: &str = "p, operator, consortium, jobs, *, allow\n\
p, compliance_officer, *, jobs, read, allow\n\
p, compliance_officer, *, jobs, approve, allow\n\
p, spiffe://e2e/site/*/node, site:*, federation, participate, allow\n\
g, spiffe://e2e/operator/op, operator, consortium\n\
g, spiffe://e2e/site/a/user/officer, compliance_officer, site:a\n\
g, spiffe://e2e/site/b/user/officer, compliance_officer, site:b\n\
g, spiffe://e2e/site/c/user/officer, compliance_officer, site:c\n\
p2, site:*, compliance_officer, 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statistics_job_runs_across_three_sites_within_its_bound_and_on_the_record() {
    use tutela_e2e::consortium::AuditPolicy;
    use tutela_privacy::stats::reference::Pooled;
    use tutela_privacy::stats::{
        ColumnDictionary, ColumnLayout, DataDictionary, StatsLayout, StatsValue,
    };
    use tutela_protocol::pki::{LeafOptions, Validity};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = tutela_e2e::free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    let pol = d.join("policy");
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::write(pol.join("policy.csv"), POLICY).unwrap();
    c.coordinator_extra = format!(
        "[policy]\nmodel = \"{}\"\npolicy = \"{}\"\nreload_secs = 1\n[audit]\nendpoint = \"localhost:{audit_port}\"\n",
        repo_root().join("deploy/policy/model.conf").display(),
        pol.join("policy.csv").display()
    );
    c.start_coordinator();
    let audit_table = format!(
        "[audit]\nendpoint = \"localhost:{audit_port}\"\ncheckpoint_public_key = \"{}\"\n",
        d.join("audit/checkpoint.key.pub").display()
    );
    let (header, shares, _) = breast_cancer_shares(3);
    let mut officers = Vec::new();
    for (site, rows) in ["a", "b", "c"].iter().zip(&shares) {
        let officer = tutela_protocol::identity::Principal::User {
            site: site.to_string(),
            name: "officer".into(),
        };
        officers.push(
            c.ca.issue(&officer, &LeafOptions::new(Validity::days_from_now(30)))
                .unwrap(),
        );
        // ε 2 per job against a budget of 3 on the schema: one job fits, a second does not.
        let path = pol.join(format!("site-{site}.toml"));
        std::fs::write(
            &path,
            format!(
                "site = \"{site}\"\ncompliance_officers = \
                 [\"spiffe://e2e/site/{site}/user/officer\"]\n\
                 allowed_operators = [\"spiffe://e2e/operator/op\"]\n\
                 [privacy.budget]\nbreast_cancer = 3.0\n"
            ),
        )
        .unwrap();
        c.node_top_level.insert(
            site.to_string(),
            format!("site_policy = \"{}\"", path.display()),
        );
        c.start_node(site, &header, rows, &audit_table);
    }
    let schema = std::fs::read(repo_root().join("data/breast_cancer.schema.toml")).unwrap();
    let schema_digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &schema));
    let spec = replace_schema_digest(
        &include_str!("../../../deploy/jobs/breast_cancer_statistics.toml")
            .replace(
                "sites = [\"hospital-a\", \"hospital-b\", \"hospital-c\"]",
                "sites = [\"a\", \"b\", \"c\"]",
            )
            .replace("target_epsilon = 1.0", "target_epsilon = 2.0")
            .replace("deadline_secs = 120", "deadline_secs = 60"),
        &schema_digest,
    );

    // Proposed, approved by each site's officer, run.
    let job = propose_and_approve(&c, &officers, &spec).await;
    let done = c
        .wait_for_job(&job, Duration::from_secs(90), |_| false)
        .await;
    assert_eq!(
        done.state,
        "completed",
        "{done:#?}; site a's node:\n{}",
        std::fs::read_to_string(d.join("sites/a/node.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let job = done.job_id.clone();
    let summary = done
        .statistics
        .clone()
        .expect("a completed statistics job shows its result");
    assert_eq!(summary.sites, ["a", "b", "c"]);

    // The trail: each site's spend, then the result naming the file and each site's ε.
    let spends: Vec<serde_json::Value> =
        tutela_e2e::audit_events(&d.join("audit/audit.db"), "privacy.spent")
            .into_iter()
            .filter(|e| e["payload"]["job"] == job.as_str())
            .collect();
    let mut spent_sites: Vec<&str> = spends
        .iter()
        .map(|e| e["payload"]["site"].as_str().unwrap())
        .collect();
    spent_sites.sort();
    assert_eq!(spent_sites, ["a", "b", "c"], "{spends:#?}");
    let published: Vec<serde_json::Value> =
        tutela_e2e::audit_events(&d.join("audit/audit.db"), "statistics.published")
            .into_iter()
            .filter(|e| e["subject"] == job.as_str())
            .collect();
    assert_eq!(published.len(), 1, "{published:#?}");
    let record = &published[0]["payload"];
    assert_eq!(record["result_sha256"], summary.sha256.as_str());
    assert_eq!(record["schema_sha256"], schema_digest.as_str());
    assert_eq!(record["sites"], serde_json::json!(["a", "b", "c"]));

    // `tutela job stats` prints it and writes the file the record names.
    let out_file = d.join("breast_cancer.stats.toml");
    let out = tutela_e2e::run_ok(
        std::process::Command::new(tutela_e2e::bin("tutela"))
            .args(["job", "stats", &job, "--output"])
            .arg(&out_file)
            .arg("--coordinator")
            .arg(format!("localhost:{}", c.port))
            .arg("--tls-dir")
            .arg(c.certs())
            .args(["--stem", "operator-op"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("consortium statistics over 3 sites") && stdout.contains("mean_radius"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(
        hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes())),
        summary.sha256
    );

    // Within the stated bound of the pooled statistics of the three sites' rows.
    let dictionary = DataDictionary::from_file_text(&text).unwrap();
    let layout = StatsLayout::new(
        dictionary
            .columns
            .iter()
            .map(|col| match col {
                ColumnDictionary::Numeric {
                    name,
                    low,
                    high,
                    histogram,
                    ..
                } => ColumnLayout::Numeric {
                    name: name.clone(),
                    low: *low,
                    high: *high,
                    bins: histogram.len() as u32,
                },
                ColumnDictionary::Categorical {
                    name, categories, ..
                } => ColumnLayout::Categorical {
                    name: name.clone(),
                    categories: categories.clone(),
                },
            })
            .collect(),
    )
    .unwrap();
    let names: Vec<&str> = header.split(',').collect();
    let rows: Vec<Vec<StatsValue>> = shares
        .iter()
        .flatten()
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            layout
                .columns
                .iter()
                .map(|col| {
                    let at = names.iter().position(|n| *n == col.name()).unwrap();
                    match col {
                        ColumnLayout::Numeric { .. } => {
                            StatsValue::Number(cells[at].parse().unwrap())
                        }
                        ColumnLayout::Categorical { categories, .. } => {
                            StatsValue::Category(categories.iter().position(|k| k == cells[at]))
                        }
                    }
                })
                .collect()
        })
        .collect();
    let pooled = Pooled::of_rows(&layout, rows.iter().map(Vec::as_slice));
    assert_eq!(
        pooled.rows as usize,
        shares.iter().map(Vec::len).sum::<usize>()
    );
    let bad = dictionary.violations(&pooled);
    assert!(bad.is_empty(), "{bad:#?}");

    // A second job: ε 2 more on a budget of 3 with 2 spent. Each site declines it (its site
    // policy's budget clause); the job fails naming every site, and nothing more is spent.
    let second = spec.replace(
        "name = \"breast-cancer-dictionary\"",
        "name = \"breast-cancer-dictionary-2\"",
    );
    let second = propose_and_approve(&c, &officers, &second).await;
    let failed = c
        .wait_for_job(&second, Duration::from_secs(90), |_| false)
        .await;
    assert_eq!(failed.state, "failed", "{failed:#?}");
    // The coordinator keeps a decline's code only (`tutela_protocol::refusal`); the clause
    // and its numbers are in the site's log.
    for site in ["a", "b", "c"] {
        assert!(
            failed
                .reason
                .contains(&format!("{site} declined: policy.refused")),
            "{}",
            failed.reason
        );
        let log = std::fs::read_to_string(d.join(format!("sites/{site}/node.log"))).unwrap();
        assert!(
            log.contains("privacy.budget.breast_cancer") && log.contains("exceeds what is left"),
            "site {site}'s log does not say which clause refused the job"
        );
    }
    assert!(
        !failed.reason.contains(&*d.to_string_lossy()),
        "{}",
        failed.reason
    );
    let spends_after = tutela_e2e::audit_events(&d.join("audit/audit.db"), "privacy.spent")
        .into_iter()
        .filter(|e| e["payload"]["job"] == failed.job_id.as_str())
        .count();
    assert_eq!(spends_after, 0);

    // A coordinator that stops while a statistics job is out: at its restart the job fails
    // saying why (the releases held in memory are lost, and sites refuse to release a job
    // twice), instead of asking the sites again. Site c's node is down, so the job waits for it.
    c.kill_node("c");
    let third = spec.replace(
        "name = \"breast-cancer-dictionary\"",
        "name = \"breast-cancer-dictionary-3\"",
    );
    let third = propose_and_approve(&c, &officers, &third).await;
    let running = c
        .wait_for_job(&third, Duration::from_secs(10), |s| s.state == "running")
        .await;
    assert_eq!(running.state, "running", "{running:#?}");
    c.coordinator.take().unwrap().signal("KILL");
    c.start_coordinator();
    let after = c
        .wait_for_job(&third, Duration::from_secs(30), |_| false)
        .await;
    assert_eq!(after.state, "failed", "{after:#?}");
    assert!(
        after
            .reason
            .contains("the coordinator restarted while this statistics job"),
        "{}",
        after.reason
    );
}

/// Submits the statistics job `spec` as the operator and has each of `officers` approve it;
/// returns its id.
async fn propose_and_approve(
    c: &Consortium,
    officers: &[tutela_protocol::pki::IssuedCertificate],
    spec: &str,
) -> String {
    let s = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.state.as_str(), s.kind.as_str()),
        ("proposed", "statistics"),
        "{s:?}"
    );
    let digest: tutela_protocol::job::SpecDigest = s.spec_digest.parse().unwrap();
    for officer in officers {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let approval = tutela_policy::Approval::sign(
            &officer.key_pem,
            &officer.cert_pem,
            &s.job_id,
            &digest,
            t,
            t + 3_600_000,
        )
        .unwrap();
        officer_client(c, officer)
            .await
            .approve_job(pb::ApproveJobRequest {
                approval: Some(approval.to_pb()),
            })
            .await
            .unwrap();
    }
    s.job_id
}

/// A Jobs client with `officer`'s certificate (written beside the consortium's certificates).
async fn officer_client(
    c: &Consortium,
    officer: &tutela_protocol::pki::IssuedCertificate,
) -> tutela_protocol::pb::jobs_client::JobsClient<tonic::transport::Channel> {
    use tutela_protocol::identity::{Identity, Principal};
    let stem = format!(
        "officer-{}",
        &hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            officer.cert_pem.as_bytes(),
        ))[..8]
    );
    std::fs::write(c.certs().join(format!("{stem}.crt")), &officer.cert_pem).unwrap();
    std::fs::write(c.certs().join(format!("{stem}.key")), &officer.key_pem).unwrap();
    let tls = tutela_protocol::client::ClientTls::load(
        &tutela_protocol::tls::TlsFiles::in_dir(&c.certs(), &stem),
        Some(Identity::new("e2e", Principal::Coordinator).unwrap()),
    )
    .unwrap();
    tutela_protocol::pb::jobs_client::JobsClient::new(
        tutela_protocol::client::connect(&format!("localhost:{}", c.port), tls)
            .await
            .unwrap(),
    )
}

/// `spec` with its `[data] schema_sha256` set to `digest`.
fn replace_schema_digest(spec: &str, digest: &str) -> String {
    spec.lines()
        .map(|l| {
            if l.starts_with("schema_sha256 = ") {
                format!("schema_sha256 = \"{digest}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
