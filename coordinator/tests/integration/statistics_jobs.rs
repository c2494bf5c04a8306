//! Consortium-statistics jobs (`kind = "statistics"`) at a real coordinator (in process, over
//! loopback mutual TLS, with the casbin policy and quorum rule of `rejections`): validated as
//! one at submission, `[secure_aggregation]` refused with the reason, otherwise proposed and
//! approved exactly as a training job — each participating site's officer must approve before it
//! starts (the quorum is read from the spec of either kind, not from the training-only
//! `JobRecord::spec`) —, shown by `job status` as a statistics job, and, with no site connected,
//! failed by its runner naming why.

use std::time::{Duration, Instant};

use tonic::Code;
use tutela_coordinator::job::{StatisticsJobSpec, SubmittedSpec};
use tutela_policy::Approval;
use tutela_protocol::pb;

use super::rejections::{now_ms, refused, start};

fn statistics_spec() -> String {
    include_str!("../../../deploy/jobs/breast_cancer_statistics.toml")
        .replace(
            "sites = [\"hospital-a\", \"hospital-b\", \"hospital-c\"]",
            "sites = [\"a\", \"b\"]",
        )
        .replace("min_sites = 3", "min_sites = 2")
        .replace("deadline_secs = 120", "deadline_secs = 2")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statistics_job_is_proposed_and_starts_only_with_every_sites_approval() {
    let c = start().await;
    let mut op = c.as_("op").await;
    let text = statistics_spec();
    refused(
        op.submit_job(pb::SubmitJobRequest {
            spec_toml: text.replace("target_epsilon = 1.0", "target_epsilon = -1.0"),
        })
        .await
        .map(|r| r.into_inner()),
        "a bad statistics spec",
        Code::InvalidArgument,
        "privacy.target_epsilon",
    );
    refused(
        op.submit_job(pb::SubmitJobRequest {
            spec_toml: text.replace("# [secure_aggregation]", "[secure_aggregation]"),
        })
        .await
        .map(|r| r.into_inner()),
        "a masked statistics job",
        Code::FailedPrecondition,
        "[secure_aggregation]: this coordinator does not run a consortium-statistics job's \
         masked sum yet",
    );
    let listed = op
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "nothing proposed: {listed:?}");

    let s = op
        .submit_job(pb::SubmitJobRequest {
            spec_toml: text.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "proposed", "{s:?}");
    assert_eq!(s.kind, "statistics", "{s:?}");
    assert_eq!(s.rounds_total, 1, "one release: {s:?}");
    let digest = StatisticsJobSpec::from_toml_str(&text).unwrap().digest();
    assert_eq!(s.spec_digest, digest.to_hex());
    assert_eq!(
        SubmittedSpec::from_toml_str(&text).unwrap().digest(),
        digest
    );
    // Both sites' officers are wanted, by name of their domain.
    let missing = s.approvals_missing.join("; ");
    assert!(
        missing.contains("site:a") && missing.contains("site:b"),
        "{missing}"
    );
    let job = s.job_id.clone();
    let approve = |who: &tutela_protocol::pki::IssuedCertificate| {
        let t = now_ms();
        Approval::sign(&who.key_pem, &who.cert_pem, &job, &digest, t, t + 3_600_000).unwrap()
    };

    // Site a's officer alone: the job waits for site b's.
    let mut as_alice = c.as_("alice").await;
    let s = as_alice
        .approve_job(pb::ApproveJobRequest {
            approval: Some(approve(&c.alice).to_pb()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "proposed", "{s:?}");
    assert!(
        s.waiting_reason.contains("site:b"),
        "waiting for site b: {s:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = op
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.state, "proposed",
        "one approval of two does not start it: {s:?}"
    );

    // Site b's officer too: it starts; with no node connected, its runner fails it after the
    // quarter of the window it waits for sites, naming the schema and the sites absent.
    let mut as_bob = c.as_("bob").await;
    let s = as_bob
        .approve_job(pb::ApproveJobRequest {
            approval: Some(approve(&c.bob).to_pb()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(s.state, "proposed", "both approvals start it: {s:?}");
    let t0 = Instant::now();
    let s = loop {
        let s = op
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.state == "failed" {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        s.reason
            .contains("only 0 site(s) with data of schema \"breast_cancer\" connected")
            && s.reason.contains("not connected with the schema: a, b"),
        "{}",
        s.reason
    );
    assert!(s.statistics.is_none(), "{s:?}");
    // No result to fetch, and the refusal says why.
    let e = op
        .get_statistics(pb::GetStatisticsRequest {
            job_id: job.clone(),
            sha256: "00".repeat(32),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("has no statistics result"), "{e:?}");
    c.stop().await;
}

/// A statistics job's result in the store: kept only for a running statistics job still at its
/// round 0, with the job's one round marked done in the same transaction; the same record again
/// is accepted (a runner resumed after storing it), another one refused, and the job can then
/// be completed.
#[tokio::test]
async fn a_statistics_result_is_stored_once_with_the_jobs_round() {
    use tutela_audit::payload::StatisticsPublished;
    use tutela_coordinator::job::JobState;
    use tutela_coordinator::store::Store;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::sqlite_url(&dir.path().join("c.db")).unwrap())
        .await
        .unwrap();
    let text = statistics_spec();
    let spec = SubmittedSpec::from_toml_str(&text).unwrap();
    let job = store
        .create_job(&text, &spec, &spec.digest())
        .await
        .unwrap();
    let stored = store.get_job(&job).await.unwrap().unwrap();
    assert_eq!((stored.current_round, stored.total_rounds), (0, 1));
    assert_eq!(stored.sites().unwrap(), ["a", "b"]);
    assert!(stored.spec().is_err(), "not a training spec");
    let record = StatisticsPublished {
        spec_digest: spec.digest().to_hex(),
        schema: "breast_cancer".into(),
        schema_sha256: "ab".repeat(32),
        result_sha256: "cd".repeat(32),
        sites: vec!["a".into(), "b".into()],
        epsilon_per_site: [("a".to_string(), 1.0), ("b".to_string(), 1.0)].into(),
        delta: 1e-6,
        accountant: "rdp".into(),
        secure_aggregation: false,
        confidence: 0.999999,
        rows: 455.0,
    };
    // Not running yet: refused, nothing kept.
    let e = store
        .record_statistics_result(&job, &record)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("not a running statistics job"),
        "{e}"
    );
    assert!(store.statistics_result(&job).await.unwrap().is_none());
    store
        .set_job_state(&job, JobState::Proposed, JobState::Running, None)
        .await
        .unwrap();
    store.record_statistics_result(&job, &record).await.unwrap();
    assert_eq!(
        store.statistics_result(&job).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(store.get_job(&job).await.unwrap().unwrap().current_round, 1);
    store.record_statistics_result(&job, &record).await.unwrap();
    let other = StatisticsPublished {
        result_sha256: "ef".repeat(32),
        ..record.clone()
    };
    let e = store
        .record_statistics_result(&job, &other)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("has a result already"), "{e}");
    store
        .set_job_state(&job, JobState::Running, JobState::Completed, None)
        .await
        .unwrap();
}
