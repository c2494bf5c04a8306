//! A job's base model is fetched only after the site's gate approved the job: a task no officer
//! of the site signed (or naming a tokenizer the site does not hold, or whose planned privacy
//! spend the site's budget cannot take) makes the node ask the coordinator for nothing and
//! leaves its cache of fetched bases as it was; the same job signed by the site's officer, within
//! its budget, does fetch (so the fetch path is live in this setup).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use tutela_protocol::pb;
use tutela_site_node::agent::Agent;
use tutela_site_node::config::NodeConfig;
use tutela_site_node::ledger::SiteLedgers;

use crate::agent::{
    CONSORTIUM, Coordinator, Event, PATIENCE, SITE, Shared, approvable_job_spec, approval,
    init_crypto, issue_user, node_config_text, pki_with_ca, spec_digest, task,
};

/// A base no site holds: every job below names it.
const BASE_SHA256: &str = "ab00000000000000000000000000000000000000000000000000000000000000";

/// Every file under `dir` (relative path, size), sorted: the cache's state.
fn tree(dir: &Path) -> Vec<(String, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The next thing the node did that is not a (re)connection.
async fn next(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    loop {
        let event = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("the node did nothing in time")
            .expect("events channel closed");
        if !matches!(event, Event::Connected { .. }) {
            return event;
        }
    }
}

/// A node that fetches the bases it lacks into its encrypted cache, with a site policy naming
/// `alice` its officer, connected to the fake coordinator.
struct FetchingSite {
    _dir: tempfile::TempDir,
    shared: Shared,
    events: mpsc::UnboundedReceiver<Event>,
    coordinator: Coordinator,
    alice: tutela_protocol::pki::IssuedCertificate,
    cache_dir: PathBuf,
    stop_node: tokio::sync::oneshot::Sender<()>,
    node: tokio::task::JoinHandle<()>,
}

impl FetchingSite {
    /// Starts the node after `before_start` has seen its config (to seed its ledger).
    async fn start(before_start: impl FnOnce(&NodeConfig)) -> Self {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (pki, ca) = pki_with_ca(d, SITE);
        let alice = issue_user(&ca, SITE, "alice");
        let policy = d.join("site-policy.toml");
        std::fs::write(
            &policy,
            format!(
                "site = \"{SITE}\"\ncompliance_officers = [\"spiffe://{CONSORTIUM}/site/{SITE}/user/alice\"]\n"
            ),
        )
        .unwrap();
        let kek = d.join("kek");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&kek).unwrap();

        let (events_tx, mut events) = mpsc::unbounded_channel();
        let shared = Shared {
            events: events_tx,
            node: Default::default(),
            models: Default::default(),
        };
        let (coordinator, _) = Coordinator::start(
            "127.0.0.1:0".parse().unwrap(),
            &pki.coordinator,
            shared.clone(),
        )
        .await;
        let text = node_config_text(
            SITE,
            &coordinator.addr.to_string(),
            &pki.node,
            &format!("site_policy = \"{}\"\ntorch_threads = 1", policy.display()),
            &format!(
                "[at_rest]\nkek_file = \"{}\"\n[base_cache]\nfetch = true\n",
                kek.display()
            ),
        );
        let config = NodeConfig::from_toml_str(&text, d.join("node.toml")).unwrap();
        before_start(&config);
        let cache_dir = config.work_dir.join("base-models");
        let agent = Agent::new(config).unwrap();
        let (stop_node, stopped) = tokio::sync::oneshot::channel::<()>();
        let node = tokio::spawn(async move {
            agent
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Some(Event::Connected { .. })) => {}
            other => panic!("expected the node to connect, got {other:?}"),
        }
        FetchingSite {
            _dir: dir,
            shared,
            events,
            coordinator,
            alice,
            cache_dir,
            stop_node,
            node,
        }
    }

    /// Sends `t` to the node, as the operator's task of job `job_id`, signed by `approvals`.
    async fn send(&self, mut t: pb::Task, job_id: &str, approvals: Vec<pb::SignedApproval>) {
        t.job_id = job_id.to_string();
        t.job_digest = spec_digest(&t.job_spec_toml).to_hex();
        t.approvals = approvals;
        t.submitted_by = format!("spiffe://{CONSORTIUM}/operator/op");
        let tx = self.shared.node.lock().unwrap().clone().expect("no node");
        tx.send(Ok(t)).await.unwrap();
    }

    async fn stop(self) {
        let _ = self.stop_node.send(());
        let _ = tokio::time::timeout(PATIENCE, self.node).await;
        self.coordinator.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_site_did_not_approve_fetches_no_base_and_leaves_the_cache_unchanged() {
    let mut site = FetchingSite::start(|_| {}).await;
    let cache_before = tree(&site.cache_dir);

    let spec = approvable_job_spec().replace(
        "hidden = [8]",
        &format!("hidden = [8]\nbase_sha256 = \"{BASE_SHA256}\""),
    );
    let digest = spec_digest(&spec);
    let initialize = |id: &str, spec: &str| task(id, pb::TaskKind::Initialize, spec, "", "{}");

    // No officer of the site signed it: declined as not approved, nothing asked of the
    // coordinator, the cache as it was.
    site.send(initialize("unsigned", &spec), "job-1", vec![])
        .await;
    match next(&mut site.events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "unsigned");
            assert!(reason.contains("not approved"), "{reason}");
        }
        Event::BaseFetched { sha256 } => {
            panic!("the node fetched base {sha256} for a job no officer of the site signed")
        }
        other => panic!("expected a decline, got {other:?}"),
    }
    assert_eq!(tree(&site.cache_dir), cache_before);

    // Signed, but naming a tokenizer the site does not hold: declined as well, before any fetch.
    let other_tokenizer = spec.replace(
        "hidden = [8]",
        &format!("hidden = [8]\ntokenizer_sha256 = \"{}\"", "cd".repeat(32)),
    );
    let other_digest = spec_digest(&other_tokenizer);
    let signed = vec![approval(&site.alice, &site.alice, "job-1", &other_digest)];
    site.send(
        initialize("other-tokenizer", &other_tokenizer),
        "job-1",
        signed,
    )
    .await;
    match next(&mut site.events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "other-tokenizer");
            assert!(reason.contains(&"cd".repeat(32)), "{reason}");
        }
        other => panic!("expected a decline for the tokenizer, got {other:?}"),
    }
    assert_eq!(tree(&site.cache_dir), cache_before);

    // The same job signed by the site's officer: now the node asks for the base (the fake
    // holds none, so the task is then declined for want of it).
    let signed = vec![approval(&site.alice, &site.alice, "job-1", &digest)];
    site.send(initialize("signed", &spec), "job-1", signed)
        .await;
    match next(&mut site.events).await {
        Event::BaseFetched { sha256 } => assert_eq!(sha256, BASE_SHA256),
        other => panic!("expected the approved job to fetch its base, got {other:?}"),
    }
    match next(&mut site.events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "signed");
            assert!(reason.contains(BASE_SHA256), "{reason}");
        }
        other => panic!("expected a decline for the missing base, got {other:?}"),
    }
    site.stop().await;
}

/// A TRAIN task of a job that has spent its privacy budget on the site's data already (its
/// ledger holds a spend over the job's target ε): declined with the budget code before the
/// node asks the coordinator for the base, the cache unchanged; so is its INITIALIZE task. Another job of the same spec,
/// which has spent nothing, does fetch: the budget, not the setup, stopped the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_privacy_budget_fetches_no_base_and_is_declined_with_the_budget_code() {
    use tutela_privacy::accountant::{self, Accountant, SampledGaussian};
    // What job-1 spent on the dataset in an earlier round, as the node's own ledger holds it
    // (encrypted under the node's KEK, keyed by the dataset's data).
    let earlier = SampledGaussian::new(32.0 / 455.0, 0.8, 60).unwrap();
    let earlier_epsilon = accountant::epsilon(&[earlier], 1e-5, Accountant::Rdp)
        .unwrap()
        .epsilon;
    assert!(earlier_epsilon > 2.0, "{earlier_epsilon}");
    let mut site = FetchingSite::start(|config| {
        // The KEK is refused inside the work directory, which is resolved, so made, first.
        std::fs::create_dir_all(&config.work_dir).unwrap();
        let kek = config.key_encryption_key().unwrap().unwrap();
        SiteLedgers::new(
            config.work_dir.join("privacy-ledger"),
            Some(Arc::new(kek)),
            config.privacy.clone(),
        )
        .with_budget_sources(SiteLedgers::sources_of(config))
        .open("breast_cancer")
        .unwrap()
        .record("job-1", earlier, Some(455), 1)
        .unwrap();
    })
    .await;
    let cache_before = tree(&site.cache_dir);

    // DP-SGD to ε = 1 over the job: job-1 is past it already.
    let spec = format!(
        "{}\n[privacy]\nmode = \"local\"\ntarget_epsilon = 1.0\ndelta = 1e-5\nmax_grad_norm = 1.0\n",
        approvable_job_spec().replace(
            "hidden = [8]",
            &format!("hidden = [8]\nbase_sha256 = \"{BASE_SHA256}\""),
        )
    );
    let digest = spec_digest(&spec);
    let train = |id: &str| task(id, pb::TaskKind::Train, &spec, &"ab".repeat(32), "{}");

    let signed = vec![approval(&site.alice, &site.alice, "job-1", &digest)];
    site.send(train("exhausted"), "job-1", signed).await;
    match next(&mut site.events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "exhausted");
            assert!(reason.starts_with("privacy.budget: "), "{reason}");
            assert!(
                reason.contains("job-1") && reason.contains("target"),
                "{reason}"
            );
        }
        Event::BaseFetched { sha256 } => {
            panic!("the node fetched base {sha256} for a job over its privacy budget")
        }
        other => panic!("expected a budget decline, got {other:?}"),
    }
    assert_eq!(tree(&site.cache_dir), cache_before);
    // Nor does it initialize the job (which would fetch the base too): an INITIALIZE spends
    // nothing, but a site that would decline every TRAIN task of the job does not download for it.
    let signed = vec![approval(&site.alice, &site.alice, "job-1", &digest)];
    let initialize = task("exhausted-init", pb::TaskKind::Initialize, &spec, "", "{}");
    site.send(initialize, "job-1", signed).await;
    match next(&mut site.events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "exhausted-init");
            assert!(reason.starts_with("privacy.budget: "), "{reason}");
        }
        other => panic!("expected a budget decline, got {other:?}"),
    }
    assert_eq!(tree(&site.cache_dir), cache_before);

    // job-2, the same spec, has spent nothing: within budget, it asks for the base.
    let signed = vec![approval(&site.alice, &site.alice, "job-2", &digest)];
    site.send(train("within"), "job-2", signed).await;
    match next(&mut site.events).await {
        Event::BaseFetched { sha256 } => assert_eq!(sha256, BASE_SHA256),
        other => panic!("expected the job within budget to fetch its base, got {other:?}"),
    }
    match next(&mut site.events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "within");
            assert!(reason.contains(BASE_SHA256), "{reason}");
        }
        other => panic!("expected a decline for the missing base, got {other:?}"),
    }
    site.stop().await;
}
