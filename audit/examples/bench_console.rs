//! The console's pages over a large trail: fills an empty database with N events (default
//! 1,000,000: 1,000 jobs, each proposed, then rounds, five sites' privacy spends and some refused
//! updates; a signed checkpoint every 10,000), opens the log as the service does, and times each
//! page's build (store queries, view-model, template) R times, printing p50 and p95.
//!
//! ```text
//! source scripts/test-postgres.sh; psql "$TUTELA_TEST_POSTGRES_URL" -c "CREATE DATABASE console_bench"
//! cargo run --release -p tutela-audit --example bench_console -- \
//!     postgres://postgres@127.0.0.1:55432/console_bench 1000000 20
//! ```
//!
//! The HTTPS and policy layers in front of a page are not timed (a handshake per connection, a
//! casbin decision per request: microseconds to a millisecond).

use std::time::{Duration, Instant};

use ring::signature::Ed25519KeyPair;
use tutela_audit::authority::{AuthorityRules, OfficerTrust};
use tutela_audit::console::ConsoleState;
use tutela_audit::console::views::{self, Viewer};
use tutela_audit::log::{AuditLog, LogConfig};
use tutela_audit::merkle::MerkleTree;
use tutela_audit::store::AuditStore;
use tutela_audit::{Action, Chain, Checkpoint, Timestamp};

const LOG_ID: &str = "spiffe://bench/audit";
const COORDINATOR: &str = "spiffe://bench/coordinator";
const SITES: [&str; 5] = ["st-mary", "general", "riverside", "northside", "lakeside"];

fn event_of(i: u64, jobs: u64, per_job: u64) -> (String, Action, String, serde_json::Value) {
    let job = format!("job-{:06}", (i / per_job).min(jobs - 1));
    let k = i % per_job;
    if k == 0 {
        return (
            COORDINATOR.into(),
            Action::JobProposed,
            job,
            serde_json::json!({
                "spec_digest": format!("{:064x}", i), "code_version": "bench", "base_model": "mlp",
                "name": "bench job", "participants": SITES, "rounds": 100,
                "privacy": {"mode": "local", "target_epsilon": 8.0, "delta": 1e-5},
            }),
        );
    }
    let round = (k / 7) as u32;
    match k % 7 {
        0 => (
            COORDINATOR.into(),
            Action::RoundCompleted,
            job,
            serde_json::json!({"round": round, "participants": SITES,
                "update_digests": SITES.iter().map(|s| (s.to_string(), serde_json::Value::from(format!("{:064x}", i)))).collect::<serde_json::Map<_, _>>()}),
        ),
        6 if round % 10 == 3 => (
            COORDINATOR.into(),
            Action::UpdateRefused,
            job,
            serde_json::json!({"round": round, "site": "lakeside", "reason": "update norm exceeds the bound"}),
        ),
        s => {
            let site = SITES[(s as usize - 1) % SITES.len()];
            (
                format!("spiffe://bench/site/{site}/node"),
                Action::PrivacySpent,
                format!("{site}/records"),
                serde_json::json!({
                    "site": site, "dataset": "records", "job": job, "round": round, "attempt": 0,
                    "sample_rate": 0.01, "noise_multiplier": 1.1, "steps": 100, "rows": 10000,
                    "job_epsilon": 0.05 * f64::from(round), "dataset_epsilon": 0.0001 * i as f64,
                    "delta": 1e-5, "dataset_delta": 1e-5,
                }),
            )
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: bench_console DATABASE_URL [EVENTS] [REPEATS]")?;
    let n: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let repeats: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    // Opening migrates: on a database filled before migration 5, that fills the events-by-job
    // index for every stored event (timed here).
    let t = Instant::now();
    let store = AuditStore::open(&url).await?;
    println!("opened the store (and migrated it) in {:.1?}", t.elapsed());
    // A fixed key (a benchmark's, never a service's), so that a database filled by an earlier
    // run can be measured again without filling it again.
    let key = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).map_err(|_| "key")?;
    let stored = store.count().await?;
    let fill = match stored {
        0 => true,
        // Filled by an earlier run (which may have appended spends after the first n).
        s if s >= n => false,
        s => return Err(format!("the database holds {s} events: give an empty one, or one this benchmark filled with {n}").into()),
    };
    let t = Instant::now();
    let jobs = (n / 1000).max(1);
    let per_job = n.div_ceil(jobs);
    let base = match store.event(0).await? {
        Some(first) if !fill => first.timestamp.unix_millis(),
        _ => Timestamp::now().unix_millis() - n as i64,
    };
    let mut chain = Chain::new();
    let mut tree = MerkleTree::new();
    let mut batch = Vec::with_capacity(1000);
    for i in (0..n).filter(|_| fill) {
        let (actor, action, subject, payload) = event_of(i, jobs, per_job);
        let e = chain.append(
            Timestamp::from_unix_millis(base + i as i64)?,
            actor,
            action,
            subject,
            payload,
        )?;
        tree.push_entry(&e.hash);
        batch.push(e);
        if batch.len() == 1000 || i + 1 == n {
            if (i + 1) % 10_000 == 0 || i + 1 == n {
                let cp = Checkpoint {
                    tree_size: i + 1,
                    root: tree.root(),
                    timestamp: Timestamp::from_unix_millis(base + i as i64)?,
                    log_id: LOG_ID.into(),
                }
                .sign(&key)?;
                store.insert_events_with_checkpoint(&batch, &cp).await?;
            } else {
                store.insert_events(&batch).await?;
            }
            batch.clear();
        }
    }
    if fill {
        println!("filled {n} events ({jobs} jobs) in {:.1?}", t.elapsed());
    }

    let t = Instant::now();
    let mut config = LogConfig::new(LOG_ID);
    config.checkpoint_every = 10_000;
    config.checkpoint_interval = Duration::from_secs(3600);
    let log = AuditLog::start(store, key, config, None).await?;
    println!("opened and verified the log in {:.1?}", t.elapsed());
    let state = ConsoleState::new(
        log,
        AuthorityRules::for_log(LOG_ID, &[])?,
        OfficerTrust::SignatureOnly,
        None,
        50,
    );
    if std::env::var_os("BENCH_CONSOLE_SKIP_VERIFY").is_none() {
        let t = Instant::now();
        state.verify_now().await;
        println!(
            "the overview's verification of the stored trail took {:.1?}",
            t.elapsed()
        );
    }

    let viewer = Viewer {
        identity: "spiffe://bench/site/st-mary/user/alice".into(),
        rule: "bench".into(),
    };
    let mid_job = format!("job-{:06}", jobs / 2);
    // The sites page's measurement appends spends (to a job of its own, so that no page measured
    // on a later run sees more events than the first run did).
    let appended_job = "job-appended-by-the-sites-bench";
    // One job's page: a job of 1,000 events (databases filled before the line above hold 2,000
    // spends appended under mid_job).
    let one_job = format!("job-{:06}", jobs / 2 + 1);
    let old = Timestamp::from_unix_millis(base + (n / 10) as i64)?;
    let since: String = form_urlencoded::byte_serialize(old.to_string().as_bytes()).collect();
    let pages: Vec<(&str, String)> = vec![
        ("events (newest page)", String::new()),
        (
            "events page 100 deep (keyset)",
            format!("before={}", n.saturating_sub(5000)),
        ),
        (
            "events by actor (a node)",
            "actor=spiffe%3A%2F%2Fbench%2Fsite%2Flakeside%2Fnode".into(),
        ),
        (
            "events by action (update.refused)",
            "action=update.refused".into(),
        ),
        ("events by subject (a job)", format!("subject={mid_job}")),
        (
            "events by actor+action+time",
            format!("actor=spiffe%3A%2F%2Fbench%2Fcoordinator&action=job.proposed&since={since}"),
        ),
    ];
    println!("| page | p50 | p95 |\n|---|---|---|");
    let report = |name: &str, mut times: Vec<Duration>| {
        times.sort();
        println!(
            "| {name} | {:.1} ms | {:.1} ms |",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.95).as_secs_f64() * 1e3
        );
    };
    macro_rules! time_page {
        ($name:expr, $call:expr) => {{
            let mut times = Vec::with_capacity(repeats);
            for _ in 0..repeats {
                let t = Instant::now();
                let r = $call;
                times.push(t.elapsed());
                if let Err(e) = r {
                    return Err(format!("{}: {e}", $name).into());
                }
            }
            report($name, times);
        }};
    }
    time_page!("overview", views::overview::build(&state, &viewer).await);
    for (name, q) in &pages {
        time_page!(*name, views::events::build(&state, &viewer, q).await);
    }
    time_page!(
        "event proof",
        views::events::proof(&state, &(n / 2).to_string()).await
    );
    time_page!("jobs", views::jobs::list(&state, &viewer).await);
    time_page!(
        "one job",
        views::jobs::detail(&state, &viewer, &one_job).await
    );
    // The sites page's ledger is derived once (what the console does at start) and then only
    // extended: the cold build, the page with nothing new, and the page after 100 new spends.
    let t = Instant::now();
    state.warm_ledger().await?;
    println!(
        "| sites: deriving the ledger at start (once) | {:.1} ms | |",
        t.elapsed().as_secs_f64() * 1e3
    );
    time_page!("sites", views::sites::build(&state, &viewer).await);
    // New spends arrive between requests (appended through the log, not timed).
    let mut times = Vec::with_capacity(repeats);
    let mut round = 1_000_000u32;
    for _ in 0..repeats {
        for k in 0..100u64 {
            let site = SITES[(k % 5) as usize];
            round += 1;
            let payload = serde_json::json!({
                "site": site, "dataset": "records", "job": appended_job, "round": round, "attempt": 0,
                "sample_rate": 0.01, "noise_multiplier": 1.1, "steps": 100, "rows": 10000,
                "job_epsilon": 1.0, "dataset_epsilon": 100.0, "delta": 1e-5, "dataset_delta": 1e-5,
            });
            state
                .log()
                .append(
                    format!("spiffe://bench/site/{site}/node"),
                    Action::PrivacySpent,
                    format!("{site}/records"),
                    payload,
                )
                .await?;
        }
        let t = Instant::now();
        views::sites::build(&state, &viewer).await?;
        times.push(t.elapsed());
    }
    report("sites, 100 new spends since the previous request", times);
    // Issue 15 item 2: a job's report a regulator reads, as the console's download builds it
    // (events, authority check, content, rendering), and a period's of 10,000 events (the
    // fixture's events are a millisecond apart).
    time_page!(
        "job report (PDF)",
        tutela_audit::report::console::download(
            &state,
            &viewer,
            &format!("job={mid_job}&format=pdf")
        )
        .await
    );
    time_page!(
        "job report (HTML)",
        tutela_audit::report::console::download(
            &state,
            &viewer,
            &format!("job={mid_job}&format=html")
        )
        .await
    );
    let hour_from = Timestamp::from_unix_millis(base + (n / 2) as i64)?;
    let hour_to = Timestamp::from_unix_millis(base + (n / 2) as i64 + 10_000)?;
    let period = format!(
        "from={}&to={}&format=pdf",
        form_urlencoded::byte_serialize(hour_from.to_string().as_bytes()).collect::<String>(),
        form_urlencoded::byte_serialize(hour_to.to_string().as_bytes()).collect::<String>()
    );
    time_page!(
        "period report, 10,000 events (PDF)",
        tutela_audit::report::console::download(&state, &viewer, &period).await
    );
    time_page!("models", views::models::list(&state, &viewer).await);
    Ok(())
}
