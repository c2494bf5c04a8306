//! `tutela job check` end to end: a coordinator and three site nodes with their own site
//! policies, over loopback mutual TLS. Before the job is submitted or anyone signs, the check
//! lists every clause each site would refuse it for (two sites breaking different clauses, two
//! each), the site whose node is not connected, and the site that would run it; the CLI prints
//! them all and exits non-zero. Nothing is proposed: the coordinator lists no job afterwards.
//! And the other side of a refusal: a round every site declines fails at once, with each site's
//! reason, not at its deadline.

use std::time::{Duration, Instant};

use tutela_e2e::bin;
use tutela_e2e::consortium::{Consortium, breast_cancer_shares, job_spec};
use tutela_protocol::pb;

fn site_policy(site: &str, clauses: &str) -> String {
    format!(
        "site = \"{site}\"\ncompliance_officers = [\"spiffe://e2e/site/{site}/user/officer\"]\n{clauses}"
    )
}

fn codes_and_clauses(check: &pb::SiteCheck) -> Vec<(String, String)> {
    check
        .refusals
        .iter()
        .map(|r| {
            let clause = r
                .reason
                .strip_prefix("site policy `")
                .and_then(|r| r.split_once('`'))
                .map(|(c, _)| c.to_string())
                .unwrap_or_default();
            (r.code.clone(), clause)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_check_lists_every_clause_every_site_would_refuse_before_anyone_signs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Consortium::new(dir.path());
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(3);
    // a: the model and the ε cap; b: the operator and the noise floor; d: nothing.
    let policies = [
        (
            "a",
            "allowed_models = [\"logreg\"]\n[privacy]\nmax_epsilon_per_job = 1.0\n",
        ),
        (
            "b",
            "allowed_operators = [\"spiffe://e2e/operator/someone-else\"]\n[privacy]\nmin_noise_multiplier = 1.0\n",
        ),
        ("d", "allowed_models = [\"mlp\"]\n"),
    ];
    for ((site, clauses), rows) in policies.iter().zip(&shares) {
        let path = dir.path().join(format!("site-{site}.toml"));
        std::fs::write(&path, site_policy(site, clauses)).unwrap();
        c.node_top_level.insert(
            site.to_string(),
            format!("site_policy = \"{}\"", path.display()),
        );
        c.start_node(site, &header, rows, "");
    }
    // c is named by the job and never started.
    let spec = job_spec(1, 1, 30, &["a", "b", "c", "d"]);
    let mut op = c.operator().await;
    let sites = c.check_until_answered(&mut op, &spec, 3).await;
    let names: Vec<&str> = sites.iter().map(|s| s.site.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"], "{sites:#?}");
    let policy = |clause: &str| ("policy.refused".to_string(), clause.to_string());
    // a's cap is the site policy's, which is also its privacy ledger's (the one home of the ε
    // caps): a capped dataset requires DP-SGD there too, so the ledger refuses the job without
    // DP as well.
    assert_eq!(
        codes_and_clauses(&sites[0]),
        [
            policy("allowed_models"),
            policy("privacy.max_epsilon_per_job"),
            ("privacy.budget".to_string(), String::new()),
        ],
        "{sites:#?}"
    );
    assert!(
        sites[0].refusals[2]
            .reason
            .contains("requires DP-SGD (privacy.mode = \"local\")"),
        "{sites:#?}"
    );
    assert_eq!(
        codes_and_clauses(&sites[1]),
        [
            policy("allowed_operators"),
            policy("privacy.min_noise_multiplier")
        ],
        "{sites:#?}"
    );
    assert!(!sites[2].answered);
    assert_eq!(sites[2].refusals[0].code, "site.not_connected");
    assert!(
        sites[3].answered && sites[3].refusals.is_empty(),
        "{sites:#?}"
    );
    // What a decline would say, and nothing of the site: no path of its files.
    for s in &sites {
        for r in &s.refusals {
            assert!(!r.reason.contains(&*dir.path().to_string_lossy()), "{r:?}");
        }
    }

    // The CLI: every refusal on its own line, exit non-zero.
    let spec_path = dir.path().join("job.toml");
    std::fs::write(&spec_path, &spec).unwrap();
    let out = std::process::Command::new(bin("tutela"))
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
        "a\tpolicy.refused\tsite policy `allowed_models`",
        "a\tpolicy.refused\tsite policy `privacy.max_epsilon_per_job`",
        "a\tprivacy.budget\tthis site requires DP-SGD",
        "b\tpolicy.refused\tsite policy `allowed_operators`",
        "b\tpolicy.refused\tsite policy `privacy.min_noise_multiplier`",
        "c\tsite.not_connected\t",
        "d\twould run the job",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(line)),
            "{line:?} missing:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        stderr.contains("6 refusal(s) at 3 of 4 site(s)"),
        "{stderr}"
    );

    // Nothing was proposed.
    let jobs = op
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "{jobs:#?}");
}

/// Two sites whose node.toml requires DP-SGD (`require_local_dp`; the ε caps themselves live in
/// the site policy): both build the initial model (INITIALIZE spends nothing), then decline the
/// job's TRAIN task at once (it has no local DP). The round ends
/// as soon as both have answered, and fails with every site's reason, not at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_every_site_declined_fails_at_once_with_each_site_s_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Consortium::new(dir.path());
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(2);
    for (site, rows) in ["a", "b"].iter().zip(&shares) {
        c.start_node(site, &header, rows, "[privacy]\nrequire_local_dp = true\n");
    }
    // A long deadline: the job must fail long before it.
    let spec =
        job_spec(1, 2, 120, &["a", "b"]).replace("max_round_retries = 2", "max_round_retries = 0");
    let mut op = c.operator().await;
    let job = op
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let started = Instant::now();
    let status = c
        .wait_for_job(&job, Duration::from_secs(90), |_| false)
        .await;
    assert_eq!(status.state, "failed", "{status:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the round waited for its deadline: {:?}",
        started.elapsed()
    );
    let reason = &status.reason;
    assert!(
        reason.contains("every site declined: a: privacy.budget"),
        "{reason}"
    );
    assert!(reason.contains("; b: privacy.budget"), "{reason}");
    assert!(!reason.contains("deadline"), "{reason}");
}
