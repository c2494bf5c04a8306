//! Consortium statistics (`kind = "statistics"`) through the running services, as far as they
//! are wired: `tutela job check` (the RPC and the CLI) asks each site's node whether it would release the job's
//! statistics, and each gate judges it as a statistics job — its table and schema digest, the
//! site-policy clauses (not `allowed_models`: it trains no model), its one release against the
//! site's ε caps —, reading no record and spending nothing. Submitting the job is still refused
//! (the coordinator does not run the kind yet), so nothing is proposed.

use std::time::{Duration, Instant};

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
    let start = Instant::now();
    let sites = loop {
        let sites = op
            .check_job(pb::CheckJobRequest {
                spec_toml: spec.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .sites;
        if sites.iter().filter(|s| s.answered).count() == 2 {
            break sites;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the nodes did not both answer: {sites:#?}; logs in {}",
            dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
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

    // Submission is still refused, and nothing was proposed.
    let refused = op
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let jobs = op
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "{jobs:#?}");
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
