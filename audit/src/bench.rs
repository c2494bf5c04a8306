//! The audit benchmarks behind `tutela bench audit-append` and `tutela bench audit-verify`.

use std::sync::Arc;
use std::time::Instant;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sqlx::{AssertSqlSafe, Row};

use crate::event::{Action, Chain, Timestamp};
use crate::log::{AuditLog, LogConfig};
use crate::merkle::MerkleTree;
use crate::store::AuditStore;
use crate::{Checkpoint, verify_log};

fn payload(writer: usize, i: usize) -> serde_json::Value {
    let site = format!("site-{writer}");
    serde_json::json!({
        "round": i % 100,
        "participants": [site],
        "update_digests": {site.clone(): format!("{:064x}", writer * 1_000_000 + i)},
        "metrics": {site: {"epsilon": 0.125 + (i % 13) as f64 / 1000.0}},
    })
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rate {
    pub what: String,
    pub rows: u64,
    pub seconds: f64,
    pub per_second: f64,
}

fn rate(what: impl Into<String>, rows: u64, t: Instant) -> Rate {
    let seconds = t.elapsed().as_secs_f64();
    Rate {
        what: what.into(),
        rows,
        seconds,
        per_second: rows as f64 / seconds,
    }
}

/// Durable appends with `writers` concurrent writers, each with `in_flight` appends outstanding,
/// beside plain single-row and 100-row INSERTs of the same rows into an unchained table on the
/// same database. `url` should be an empty database (the audit tables are created in it).
/// `checkpoint_every`: the log's setting (1: a checkpoint signed and stored with every commit,
/// the service's default).
pub async fn append(
    url: &str,
    writers: usize,
    per_writer: usize,
    in_flight: &[usize],
    checkpoint_every: u64,
) -> anyhow::Result<(Vec<Rate>, Vec<(String, String)>)> {
    let store = AuditStore::open(url).await?;
    let pool = store.pool().clone();
    let mut settings = Vec::new();
    if store.backend() == crate::store::Backend::Postgres {
        for s in [
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "server_version",
        ] {
            let row = sqlx::query(AssertSqlSafe(format!("SHOW {s}")))
                .fetch_one(&pool)
                .await?;
            settings.push((s.to_string(), row.try_get::<String, _>(0)?));
        }
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_plain_events (seq BIGINT, timestamp_ms BIGINT, actor TEXT, action TEXT, subject TEXT, payload TEXT, prev_hash TEXT, hash TEXT)",
    )
    .execute(&pool)
    .await?;
    // The rows to insert: real events (hashes and all), made once.
    let mut chain = Chain::new();
    let mut rows = Vec::with_capacity(writers * per_writer);
    for w in 0..writers {
        for i in 0..per_writer {
            rows.push(chain.append(
                Timestamp::now(),
                format!("spiffe://bench/site/site-{w}/node"),
                Action::RoundCompleted,
                format!("job-{w}"),
                payload(w, i),
            )?);
        }
    }
    let rows = Arc::new(rows);
    let insert = "INSERT INTO bench_plain_events (seq, timestamp_ms, actor, action, subject, payload, prev_hash, hash) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)";
    let mut out = Vec::new();

    // Plain single-row INSERTs, autocommit (one commit each), `writers` at once.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (pool, rows) = (pool.clone(), rows.clone());
        tasks.push(tokio::spawn(async move {
            for e in &rows[w * per_writer..(w + 1) * per_writer] {
                sqlx::query(insert)
                    .bind(e.seq as i64)
                    .bind(e.timestamp.unix_millis())
                    .bind(e.actor.clone())
                    .bind(e.action.as_str())
                    .bind(e.subject.clone())
                    .bind(crate::canonical_json(&e.payload))
                    .bind(hex::encode(e.prev_hash))
                    .bind(hex::encode(e.hash))
                    .execute(&pool)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    out.push(rate(
        format!("plain single-row INSERT, {writers} writers"),
        rows.len() as u64,
        t,
    ));

    // Plain 100-row INSERTs (one transaction each), `writers` at once.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let rows = rows.clone();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in rows[w * per_writer..(w + 1) * per_writer].chunks(100) {
                store.insert_plain(chunk).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    out.push(rate(
        format!("plain 100-row INSERT, {writers} writers"),
        rows.len() as u64,
        t,
    ));

    // The audit log: authority checks, hashing, chaining, group commit, a checkpoint every
    // `checkpoint_every` events. The writers append round.completed as the coordinator (the only
    // one who may assert it).
    for &k in in_flight {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("keygen"))?;
        let key =
            Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("key: {e}"))?;
        let mut config = LogConfig::new("spiffe://bench/audit");
        config.checkpoint_every = checkpoint_every.max(1);
        let log = AuditLog::start(store.clone(), key, config, None).await?;
        let start = log.size();
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            for lane in 0..k {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    let mut i = lane;
                    while i < per_writer {
                        log.append(
                            "spiffe://bench/coordinator",
                            Action::RoundCompleted,
                            format!("job-{w}"),
                            payload(w, i),
                        )
                        .await?;
                        i += k;
                    }
                    anyhow::Ok(())
                }));
            }
        }
        for t in tasks {
            t.await??;
        }
        let n = log.size() - start;
        out.push(rate(
            format!(
                "audit append (durable, chained, checkpoint every {checkpoint_every}), {writers} writers x {k} in flight"
            ),
            n,
            t,
        ));
        drop(log);
        break_chain_for_next_run(&store).await?;
    }
    Ok((out, settings))
}

/// Between append runs each run signs with its own key, so the previous runs' checkpoints would
/// not verify at the next start: benchmark runs therefore need an empty log each. The tables are
/// append-only, so they are dropped and recreated (only ever on the benchmark's own database).
async fn break_chain_for_next_run(store: &AuditStore) -> anyhow::Result<()> {
    for s in [
        // Its triggers use audit_refuse_change(), dropped below.
        "DROP TABLE audit_quarantine",
        "DROP TABLE audit_event_jobs",
        "DROP TABLE audit_site_checkpoints",
        "DROP TABLE audit_events",
        "DROP TABLE audit_checkpoints",
        "DROP TABLE audit_schema_migrations",
    ] {
        sqlx::query(s).execute(store.pool()).await?;
    }
    if store.backend() == crate::store::Backend::Postgres {
        for f in [
            "DROP FUNCTION audit_refuse_change()",
            "DROP FUNCTION audit_release_quarantined()",
        ] {
            sqlx::query(f).execute(store.pool()).await?;
        }
    }
    store.migrate_again().await?;
    Ok(())
}

/// `verify` over `n` in-memory events with a checkpoint every 10,000; returns the built log's
/// mean hash-input size and the rate of each of `runs` runs.
pub fn verify(n: u64, runs: usize) -> anyhow::Result<(usize, Vec<Rate>)> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("keygen"))?;
    let key =
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("key: {e}"))?;
    let public = key.public_key().as_ref().to_vec();
    let mut chain = Chain::new();
    let mut tree = MerkleTree::new();
    let mut events = Vec::with_capacity(n as usize);
    let mut checkpoints = Vec::new();
    let base = Timestamp::now().unix_millis();
    for i in 0..n {
        let ev = chain.append(
            Timestamp::from_unix_millis(base + i as i64)?,
            "spiffe://bench/coordinator",
            Action::RoundCompleted,
            format!("job-{:032x}", i / 1000),
            payload((i % 7) as usize, i as usize),
        )?;
        tree.push_entry(&ev.hash);
        events.push(ev);
        if (i + 1) % 10_000 == 0 {
            checkpoints.push(
                Checkpoint {
                    tree_size: i + 1,
                    root: tree.root(),
                    timestamp: Timestamp::from_unix_millis(base + i as i64)?,
                    log_id: "spiffe://bench/audit".into(),
                }
                .sign(&key)?,
            );
        }
    }
    let mean = events.iter().map(|e| e.hash_input().len()).sum::<usize>() / (n.max(1) as usize);
    let mut out = Vec::new();
    for run in 0..runs {
        let t = Instant::now();
        let report = verify_log(&events, &checkpoints, &public)?;
        out.push(rate(
            format!("verify run {run} ({} checkpoints)", report.checkpoints),
            report.events,
            t,
        ));
    }
    Ok((mean, out))
}
