//! Nothing happens off the record, and a site's privacy budget is anchored outside its disk, with
//! real processes: `tutela-audit` (SQLite), a coordinator and site nodes with `[audit]`, running
//! DP-SGD jobs.
//!
//! - The audit service SIGKILLed mid-job: no round completes while it is down, and after its
//!   restart the job completes with every round in the trail exactly once; `verify` passes.
//! - A node's ledger deleted: it refuses to train, naming why; its held checkpoint deleted: it
//!   refuses and does not pin the trail again; an officer's `tutela-node ledger restore`: it
//!   trains again with the ε spent before carried over; renamed in node.toml, the dataset spends
//!   the same budget (its key is its data's, not its name).
//! - The coordinator SIGKILLed mid-round: on resume the nodes send the round's update again
//!   rather than training it twice, and no site ends above the job's target ε (its ledger and the
//!   trail agree).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::{audit_events, bin, free_port, run_ok, wait_for_log};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::at_rest::{KeyEncryptionKey, LocalKek};
use tutela_privacy::ledger::Ledger;
use tutela_protocol::identity::Principal;
use tutela_protocol::pb;
use tutela_protocol::pki::{LeafOptions, Validity};

/// A DP-SGD job (σ calibrated to `target` over its rounds).
fn dp_job(rounds: u32, min_sites: u32, deadline_secs: u64, sites: &[&str], target: f64) -> String {
    format!(
        "{}\n[privacy]\nmode = \"local\"\ntarget_epsilon = {target}\ndelta = 1e-5\nmax_grad_norm = 1.0\n",
        job_spec(rounds, min_sites, deadline_secs, sites)
    )
}

/// `[audit]` for a node.toml: the test's service, its checkpoint key pinned.
fn audit_table(d: &Path, port: u16) -> String {
    format!(
        "[audit]\nendpoint = \"localhost:{port}\"\ncheckpoint_public_key = \"{}\"\n",
        d.join("audit/checkpoint.key.pub").display()
    )
}

async fn submit(c: &Consortium, spec: String) -> String {
    c.operator()
        .await
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .expect("the job is accepted")
        .into_inner()
        .job_id
}

/// The trail's events of `action` about `job`.
fn events_of_job(d: &Path, action: &str, job: &str) -> Vec<serde_json::Value> {
    audit_events(&d.join("audit/audit.db"), action)
        .into_iter()
        .filter(|e| e["subject"] == job || e["payload"]["job"] == job)
        .collect()
}

/// The file of a site's one dataset budget: its ledgers are named by the budget's key, which the
/// data determines (`site-node::budget_identity`), beside the identity map.
fn ledger_file(d: &Path, site: &str) -> std::path::PathBuf {
    let dir = d.join("sites").join(site).join("work/privacy-ledger");
    let ledgers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.ends_with(".json.enc") && !name.starts_with("identities.")
        })
        .collect();
    assert_eq!(ledgers.len(), 1, "{ledgers:?}");
    ledgers[0].clone()
}

/// A site's dataset ledger, read with its key-encryption key.
fn ledger_of(d: &Path, site: &str) -> Ledger {
    let site_dir = d.join("sites").join(site);
    let kek: Arc<dyn KeyEncryptionKey> =
        Arc::new(LocalKek::from_key_file(&site_dir.join("kek")).unwrap());
    let file = ledger_file(d, site);
    let key = file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".json.enc")
        .to_string();
    Ledger::open(file, &key, Some(kek)).unwrap()
}

fn verify_trail(c: &Consortium, audit_port: u16) {
    let mut verify = Command::new(bin("tutela"));
    verify
        .args(["audit", "verify", "--audit"])
        .arg(format!("localhost:{audit_port}"))
        .arg("--tls-dir")
        .arg(c.certs())
        .args(["--stem", "operator-op"]);
    let out = run_ok(&mut verify);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("OK: "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_service_killed_mid_job_leaves_no_round_off_the_record() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let audit = c.start_audit(audit_port, AuditPolicy::Open);
    c.coordinator_extra = format!("[audit]\nendpoint = \"localhost:{audit_port}\"\n");
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(2);
    let sites = ["a", "b"];
    for (site, rows) in sites.iter().zip(&shares) {
        c.start_node(site, &header, rows, &audit_table(d, audit_port));
    }
    let rounds = 5;
    let job = submit(&c, dp_job(rounds, 2, 30, &sites, 3.0)).await;
    let status = c
        .wait_for_job(&job, Duration::from_secs(180), |s| s.rounds_completed >= 1)
        .await;
    assert_eq!(status.state, "running", "{status:?}");

    audit.signal("KILL");
    drop(audit);
    let killed_at = c
        .wait_for_job(&job, Duration::from_secs(10), |_| true)
        .await
        .rounds_completed;
    // A round already aggregated may commit; then the coordinator waits for the trail, and no
    // further round starts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let frozen = c
        .wait_for_job(&job, Duration::from_secs(10), |_| true)
        .await;
    assert_eq!(frozen.state, "running", "{frozen:?}");
    assert!(
        frozen.rounds_completed <= killed_at + 1,
        "rounds went on without the trail: {killed_at} → {frozen:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = c
        .wait_for_job(&job, Duration::from_secs(10), |_| true)
        .await;
    assert_eq!(still.rounds_completed, frozen.rounds_completed);
    assert!(
        c.log("coordinator.log")
            .contains("the audit trail cannot record this event"),
        "{}",
        c.log("coordinator.log")
    );

    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    let last = c
        .wait_for_job(&job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    // Let a signed checkpoint cover the last events.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut recorded: Vec<u64> = events_of_job(d, "round.completed", &job)
        .iter()
        .map(|e| e["payload"]["round"].as_u64().unwrap())
        .collect();
    recorded.sort_unstable();
    assert_eq!(
        recorded,
        (1..=u64::from(rounds)).collect::<Vec<_>>(),
        "every round in the trail exactly once"
    );
    // Each node's spends: each (round, attempt) once, none above the job's target.
    for site in sites {
        let actor = format!("spiffe://e2e/site/{site}/node");
        let spends: Vec<serde_json::Value> = events_of_job(d, "privacy.spent", &job)
            .into_iter()
            .filter(|e| e["actor"] == actor.as_str())
            .collect();
        let mut keys: Vec<(u64, u64)> = spends
            .iter()
            .map(|e| {
                let p = &e["payload"];
                (p["round"].as_u64().unwrap(), p["attempt"].as_u64().unwrap())
            })
            .collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "{site}: a spend recorded twice: {spends:#?}");
        assert!(n >= rounds as usize, "{site}: {spends:#?}");
        let ledger = ledger_of(d, site);
        assert_eq!(
            ledger.job(&job).unwrap().charges.len(),
            n,
            "{site}: the ledger and the trail disagree"
        );
        assert!(ledger.unanchored().is_empty(), "{site}");
        let eps = ledger.spent_by_job(&job, 1e-5, Accountant::Rdp).unwrap();
        assert!(eps <= 3.0 + 1e-9, "{site}: ε {eps} over the target");
    }
    verify_trail(&c, audit_port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ledger_or_checkpoint_stops_training_until_an_officer_restores_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(1);
    c.start_node("a", &header, &shares[0], &audit_table(d, audit_port));
    let work = d.join("sites/a/work");
    let node_log = d.join("sites/a/node.log");
    let held_file = work.join("audit-checkpoint.json.enc");

    // Job 1 spends on the dataset; the trail holds its two spends.
    let job1 = submit(&c, dp_job(2, 1, 30, &["a"], 1.0)).await;
    let last = c
        .wait_for_job(&job1, Duration::from_secs(180), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    let spent_before = ledger_of(d, "a").spent(1e-5, Accountant::Rdp).unwrap();
    assert!(spent_before > 0.5, "{spent_before}");
    assert_eq!(events_of_job(d, "privacy.spent", &job1).len(), 2);
    let ledger_file = ledger_file(d, "a");
    // A checkpoint covering the spends, held by the node (it advances before each task).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The ledger file is deleted: the node refuses to train, naming why.
    c.kill_node("a");
    std::fs::remove_file(&ledger_file).unwrap();
    c.restart_node("a");
    let job2 = submit(&c, dp_job(1, 1, 10, &["a"], 1.0)).await;
    wait_for_log(
        &node_log,
        "lacks 2 spend(s) that the audit trail records",
        1,
        Duration::from_secs(60),
    );
    let last = c
        .wait_for_job(&job2, Duration::from_secs(120), |_| false)
        .await;
    assert_eq!(last.state, "failed", "{last:?}");
    assert!(
        !ledger_file.exists(),
        "nothing was charged to a fresh ledger"
    );

    // The held checkpoint is deleted too: refused, and not pinned again.
    assert!(held_file.exists());
    c.kill_node("a");
    std::fs::remove_file(&held_file).unwrap();
    c.restart_node("a");
    let job3 = submit(&c, dp_job(1, 1, 10, &["a"], 1.0)).await;
    wait_for_log(
        &node_log,
        "the held checkpoint was deleted",
        1,
        Duration::from_secs(60),
    );
    let last = c
        .wait_for_job(&job3, Duration::from_secs(120), |_| false)
        .await;
    assert_eq!(last.state, "failed", "{last:?}");
    assert!(
        !held_file.exists(),
        "the node pinned the trail again by itself"
    );

    // A compliance officer of the site restores both from the trail.
    c.kill_node("a");
    let officer =
        c.ca.issue(
            &Principal::User {
                site: "a".into(),
                name: "olivia".into(),
            },
            &LeafOptions::new(Validity::days_from_now(30)),
        )
        .unwrap();
    let (cert, key) = (d.join("olivia.crt"), d.join("olivia.key"));
    std::fs::write(&cert, &officer.cert_pem).unwrap();
    std::fs::write(&key, &officer.key_pem).unwrap();
    // Another site's user may not.
    let stranger =
        c.ca.issue(
            &Principal::User {
                site: "b".into(),
                name: "mallory".into(),
            },
            &LeafOptions::new(Validity::days_from_now(30)),
        )
        .unwrap();
    std::fs::write(d.join("mallory.crt"), &stranger.cert_pem).unwrap();
    std::fs::write(d.join("mallory.key"), &stranger.key_pem).unwrap();
    let restore = |who: &str| {
        Command::new(bin("tutela-node"))
            .args(["ledger", "restore", "--config"])
            .arg(d.join("sites/a/node.toml"))
            .arg("--officer-cert")
            .arg(d.join(format!("{who}.crt")))
            .arg("--officer-key")
            .arg(d.join(format!("{who}.key")))
            .output()
            .unwrap()
    };
    let refused = restore("mallory");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("not a compliance officer of site a"), "{err}");
    assert!(!ledger_file.exists());
    let out = restore("olivia");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("breast_cancer: 2 spend(s)"), "{text}");
    assert!(ledger_file.exists() && held_file.exists());
    let restored = audit_events(&d.join("audit/audit.db"), "ledger.restored");
    assert_eq!(restored.len(), 1, "{restored:#?}");
    assert_eq!(restored[0]["actor"], "spiffe://e2e/site/a/user/olivia");
    assert_eq!(restored[0]["payload"]["missing_spends"], 2);
    let spent_restored = ledger_of(d, "a").spent(1e-5, Accountant::Rdp).unwrap();
    assert!(
        (spent_restored - spent_before).abs() < 1e-9,
        "{spent_restored} vs {spent_before}"
    );

    // It trains again, and the dataset's ε carries on from what job 1 spent.
    c.restart_node("a");
    let job4 = submit(&c, dp_job(1, 1, 30, &["a"], 1.0)).await;
    let last = c
        .wait_for_job(&job4, Duration::from_secs(120), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    let spends = events_of_job(d, "privacy.spent", &job4);
    assert_eq!(spends.len(), 1, "{spends:#?}");
    let dataset_eps = spends[0]["payload"]["dataset_epsilon"].as_f64().unwrap();
    let job_eps = spends[0]["payload"]["job_epsilon"].as_f64().unwrap();
    assert!(
        dataset_eps > spent_before && dataset_eps > job_eps,
        "job 1's ε was not carried over: dataset {dataset_eps}, job {job_eps}, before {spent_before}"
    );

    // The dataset renamed in node.toml (hole (b)): the same data spends the same budget, under
    // the same key in the trail, and its ε carries on.
    let key = spends[0]["payload"]["dataset"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(key.starts_with("b-"), "{key}");
    c.kill_node("a");
    let node_toml = d.join("sites/a/node.toml");
    let toml = std::fs::read_to_string(&node_toml).unwrap();
    assert!(toml.contains("[datasets.breast_cancer]"));
    std::fs::write(
        &node_toml,
        toml.replace("[datasets.breast_cancer]", "[datasets.cohort_renamed]"),
    )
    .unwrap();
    c.restart_node("a");
    let renamed_job = dp_job(1, 1, 30, &["a"], 1.0)
        .replace("schema = \"breast_cancer\"", "schema = \"cohort_renamed\"");
    let job5 = submit(&c, renamed_job).await;
    let last = c
        .wait_for_job(&job5, Duration::from_secs(120), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    let spends = events_of_job(d, "privacy.spent", &job5);
    assert_eq!(spends.len(), 1, "{spends:#?}");
    assert_eq!(spends[0]["payload"]["dataset"], key.as_str());
    let renamed_eps = spends[0]["payload"]["dataset_epsilon"].as_f64().unwrap();
    assert!(
        renamed_eps > dataset_eps,
        "the rename reset the budget: {renamed_eps} after, {dataset_eps} before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_round_charges_no_site_above_the_jobs_target() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    c.coordinator_extra = format!("[audit]\nendpoint = \"localhost:{audit_port}\"\n");
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(3);
    let audit = audit_table(d, audit_port);
    c.start_node("a", &header, &shares[0], &audit);
    c.start_node("b", &header, &shares[1], &audit);
    // A listed site that never answers keeps each round open until its deadline, after a and b
    // have trained and been charged: the window in which the coordinator is killed.
    c.start_node(
        "slow",
        &header,
        &shares[2],
        &format!("{audit}[testing]\nstall_after_fetch = true\n"),
    );
    let sites = ["a", "b", "slow"];
    let target = 2.0;
    let rounds = 3;
    let job = submit(&c, dp_job(rounds, 2, 8, &sites, target)).await;
    let spent_line = "privacy spend recorded in the audit trail";
    for site in ["a", "b"] {
        wait_for_log(
            &d.join(format!("sites/{site}/node.log")),
            spent_line,
            2,
            Duration::from_secs(120),
        );
    }
    let status = c
        .wait_for_job(&job, Duration::from_secs(10), |_| true)
        .await;
    assert_eq!(status.rounds_completed, 1, "not mid-round 2: {status:?}");
    c.coordinator.take().unwrap().signal("KILL");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_coordinator();
    let last = c
        .wait_for_job(&job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());

    for site in ["a", "b"] {
        let log = std::fs::read_to_string(d.join(format!("sites/{site}/node.log"))).unwrap();
        assert!(
            log.contains("sending it again, without training or charging ε again"),
            "{site} did not resend round 2:\n{log}"
        );
        // The node's ledger: one charge per round, the job within its target.
        let ledger = ledger_of(d, site);
        let charges = &ledger.job(&job).unwrap().charges;
        let rounds_charged: Vec<u32> = charges.iter().map(|c| c.round).collect();
        assert_eq!(rounds_charged, [1, 2, 3], "{site}: {charges:?}");
        let eps = ledger.spent_by_job(&job, 1e-5, Accountant::Rdp).unwrap();
        assert!(
            eps <= target + 1e-9,
            "{site}: ε {eps} over the target {target}"
        );
        // The trail says the same.
        let actor = format!("spiffe://e2e/site/{site}/node");
        let spends: Vec<serde_json::Value> = events_of_job(d, "privacy.spent", &job)
            .into_iter()
            .filter(|e| e["actor"] == actor.as_str())
            .collect();
        assert_eq!(spends.len(), 3, "{site}: {spends:#?}");
        let last_eps = spends
            .iter()
            .map(|e| e["payload"]["job_epsilon"].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!(last_eps <= target + 1e-9, "{site}: trail says ε {last_eps}");
        assert!((last_eps - eps).abs() < 1e-9, "{site}: {last_eps} vs {eps}");
    }
}

/// A TCP relay the test can cut: every live connection is dropped and new ones are refused until
/// it is opened again. It stands between the coordinator and the audit service, so that only the
/// coordinator loses the trail (the nodes keep theirs).
struct Relay {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(to_port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let live: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (o, l) = (open.clone(), live.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", to_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().unwrap().push(task.abort_handle());
            }
        });
        Relay { port, open, live }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for t in self.live.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn reopen(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_committed_but_not_yet_in_the_trail_when_the_coordinator_dies_is_recorded_at_resume()
 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    let relay = Relay::start(audit_port).await;
    c.coordinator_extra = format!("[audit]\nendpoint = \"localhost:{}\"\n", relay.port);
    c.start_coordinator();
    let (header, shares, _) = breast_cancer_shares(2);
    let sites = ["a", "b"];
    for (site, rows) in sites.iter().zip(&shares) {
        c.start_node(site, &header, rows, &audit_table(d, audit_port));
    }
    let rounds = 4;
    let job = submit(&c, dp_job(rounds, 2, 30, &sites, 3.0)).await;
    c.wait_for_job(&job, Duration::from_secs(180), |s| s.rounds_completed >= 1)
        .await;
    // Round 1 in the trail: the coordinator's next event is round 2's, some time away.
    let start = Instant::now();
    while events_of_job(d, "round.completed", &job).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "round 1 not recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The coordinator loses the trail mid-job. Both nodes answer every round, so its next event
    // is the `round.completed` of a round it has just committed: it waits there.
    relay.cut();
    wait_for_log(
        &d.join("coordinator.log"),
        "the audit trail cannot record this event",
        1,
        Duration::from_secs(60),
    );
    let stuck = c
        .wait_for_job(&job, Duration::from_secs(10), |_| true)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = c
        .wait_for_job(&job, Duration::from_secs(10), |_| true)
        .await;
    assert_eq!(still.rounds_completed, stuck.rounds_completed, "{still:?}");
    let committed = stuck.rounds_completed;
    let recorded_before = events_of_job(d, "round.completed", &job).len() as u32;
    // Normally the last committed round waits for the trail. (Should the cut have fallen on an
    // append in flight, the service may have committed it with its answer lost: then the trail
    // has it already, and the resumed coordinator must find it rather than append it again.)
    assert!(
        recorded_before <= committed,
        "{recorded_before} > {committed}"
    );
    let drained = recorded_before < committed;
    // Killed in that state: the round is in the store, not in the trail.
    c.coordinator.take().unwrap().signal("KILL");
    relay.reopen();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.start_coordinator();
    let last = c
        .wait_for_job(&job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    assert_eq!(
        c.log("coordinator.log")
            .contains("round committed but not in the audit trail"),
        drained,
        "{}",
        c.log("coordinator.log")
    );
    let mut recorded: Vec<u64> = events_of_job(d, "round.completed", &job)
        .iter()
        .map(|e| e["payload"]["round"].as_u64().unwrap())
        .collect();
    recorded.sort_unstable();
    assert_eq!(
        recorded,
        (1..=u64::from(rounds)).collect::<Vec<_>>(),
        "every round in the trail exactly once"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    verify_trail(&c, audit_port);
}
