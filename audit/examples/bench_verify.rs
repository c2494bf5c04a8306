//! Verification throughput over 1,000,000 synthetic events with a checkpoint every 10,000.
//!
//! `cargo run --release -p tutela-audit --example bench_verify [N]`

use ring::signature::Ed25519KeyPair;
use std::time::Instant;
use tutela_audit::{Action, Chain, Checkpoint, MerkleTree, Timestamp, verify_log};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "keygen")?;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| "key")?;
    let public = ring::signature::KeyPair::public_key(&key).as_ref().to_vec();

    let t = Instant::now();
    let mut chain = Chain::new();
    let mut tree = MerkleTree::new();
    let mut events = Vec::with_capacity(n as usize);
    let mut checkpoints = Vec::new();
    let base = Timestamp::now().unix_millis();
    for i in 0..n {
        let payload = serde_json::json!({
            "round": i % 100,
            "site": format!("site-{}", i % 7),
            "update_digest": format!("{:064x}", i),
            "epsilon_spent": 0.125 + (i % 13) as f64 / 1000.0,
        });
        let ev = chain.append(
            Timestamp::from_unix_millis(base + i as i64)?,
            "spiffe://consortium/coordinator",
            Action::RoundCompleted,
            format!("job-{:032x}", i / 1000),
            payload,
        )?;
        tree.push_entry(&ev.hash);
        events.push(ev);
        if (i + 1) % 10_000 == 0 {
            let cp = Checkpoint {
                tree_size: i + 1,
                root: tree.root(),
                timestamp: Timestamp::from_unix_millis(base + i as i64)?,
                log_id: "spiffe://consortium/audit".into(),
            };
            checkpoints.push(cp.sign(&key)?);
        }
    }
    let bytes: usize = events.iter().map(|e| e.hash_input().len()).sum();
    println!(
        "built {n} events ({} checkpoints, mean hash input {} bytes) in {:.2?}",
        checkpoints.len(),
        bytes as u64 / n.max(1),
        t.elapsed()
    );

    for run in 0..3 {
        let t = Instant::now();
        let report = verify_log(&events, &checkpoints, &public)?;
        let dt = t.elapsed();
        println!(
            "run {run}: verified {} events, {} checkpoints in {:.3?}: {:.0} events/s",
            report.events,
            report.checkpoints,
            dt,
            report.events as f64 / dt.as_secs_f64()
        );
    }
    Ok(())
}
