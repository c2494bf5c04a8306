//! A job's base model is fetched only after the site's gate approved the job: a task no officer
//! of the site signed (or naming a tokenizer the site does not hold) makes the node ask the
//! coordinator for nothing and leaves its cache of fetched bases as it was; the same job signed
//! by the site's officer does fetch (so the fetch path is live in this setup).

use std::path::Path;

use tokio::sync::mpsc;
use tutela_protocol::pb;
use tutela_site_node::agent::Agent;
use tutela_site_node::config::NodeConfig;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_site_did_not_approve_fetches_no_base_and_leaves_the_cache_unchanged() {
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
    // A site that fetches bases it lacks into its encrypted cache, with a site policy.
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
    let cache_before = tree(&cache_dir);

    let spec = approvable_job_spec().replace(
        "hidden = [8]",
        &format!("hidden = [8]\nbase_sha256 = \"{BASE_SHA256}\""),
    );
    let digest = spec_digest(&spec);
    let send = |id: &str, spec: &str, approvals: Vec<pb::SignedApproval>| {
        let mut t = task(id, pb::TaskKind::Initialize, spec, "", "{}");
        t.job_digest = digest.to_hex();
        t.approvals = approvals;
        t.submitted_by = format!("spiffe://{CONSORTIUM}/operator/op");
        let shared = shared.clone();
        async move {
            let tx = shared.node.lock().unwrap().clone().expect("no node");
            tx.send(Ok(t)).await.unwrap();
        }
    };

    // No officer of the site signed it: declined as not approved, nothing asked of the
    // coordinator, the cache as it was.
    send("unsigned", &spec, vec![]).await;
    match next(&mut events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "unsigned");
            assert!(reason.contains("not approved"), "{reason}");
        }
        Event::BaseFetched { sha256 } => {
            panic!("the node fetched base {sha256} for a job no officer of the site signed")
        }
        other => panic!("expected a decline, got {other:?}"),
    }
    assert_eq!(tree(&cache_dir), cache_before);

    // Signed, but naming a tokenizer the site does not hold: declined as well, before any fetch.
    let other_tokenizer = spec.replace(
        "hidden = [8]",
        &format!("hidden = [8]\ntokenizer_sha256 = \"{}\"", "cd".repeat(32)),
    );
    let other_digest = spec_digest(&other_tokenizer);
    let mut t = task(
        "other-tokenizer",
        pb::TaskKind::Initialize,
        &other_tokenizer,
        "",
        "{}",
    );
    t.job_digest = other_digest.to_hex();
    t.approvals = vec![approval(&alice, &alice, "job-1", &other_digest)];
    t.submitted_by = format!("spiffe://{CONSORTIUM}/operator/op");
    let tx = shared.node.lock().unwrap().clone().unwrap();
    tx.send(Ok(t)).await.unwrap();
    match next(&mut events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "other-tokenizer");
            assert!(reason.contains(&"cd".repeat(32)), "{reason}");
        }
        other => panic!("expected a decline for the tokenizer, got {other:?}"),
    }
    assert_eq!(tree(&cache_dir), cache_before);

    // The same job signed by the site's officer: now the node asks for the base (the fake
    // holds none, so the task is then declined for want of it).
    send(
        "signed",
        &spec,
        vec![approval(&alice, &alice, "job-1", &digest)],
    )
    .await;
    match next(&mut events).await {
        Event::BaseFetched { sha256 } => assert_eq!(sha256, BASE_SHA256),
        other => panic!("expected the approved job to fetch its base, got {other:?}"),
    }
    match next(&mut events).await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "signed");
            assert!(reason.contains(BASE_SHA256), "{reason}");
        }
        other => panic!("expected a decline for the missing base, got {other:?}"),
    }

    let _ = stop_node.send(());
    let _ = tokio::time::timeout(PATIENCE, node).await;
    coordinator.stop().await;
}
