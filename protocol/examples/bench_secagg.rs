//! A SecAgg+ round in process against a plain sum of the same integer vectors: server CPU time
//! and peak memory, per-site CPU time and bytes sent (BENCHMARKS.md, "Secure aggregation").
//!
//! ```text
//! cargo run --release -p tutela-protocol --example bench_secagg -- [--sites 5,20,50,100]
//!     [--params 1000000,10000000] [--max-cells 500000000]
//! ```
//!
//! Everything runs on one thread (masks, unmasking, folding), so elapsed time is CPU time.
//! `--max-cells` skips configurations with more than that many `sites × params` (the in-process
//! round masks every site's input one after another: 100 × 10M is 1,000M elements to mask with
//! about 20 masks each).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tutela_protocol::secagg::encode::{self, EncodeParams};
use tutela_protocol::secagg::simulate::{Dropouts, run_round};
use tutela_protocol::secagg::{RoundConfig, default_degree, threshold_for};

fn list(args: &[String], flag: &str, default: &[u64]) -> Vec<u64> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Peak resident memory of this process (VmHWM), and resetting it (`/proc/self/clear_refs`).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn input(site: u32, len: usize) -> Vec<i64> {
    // Values like a quantized update: |x| < 2^20.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(u64::from(site));
    (0..len)
        .map(|_| rng.random_range(-(1 << 20)..(1 << 20)))
        .collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sites = list(&args, "--sites", &[5, 20, 50, 100]);
    let params = list(&args, "--params", &[1_000_000, 10_000_000]);
    let max_cells = list(&args, "--max-cells", &[u64::MAX])[0];

    println!(
        "| sites | params | k | t | plain server s | secagg server s | ratio | server peak MiB (plain / secagg) | site s, median (max) | site bytes sent (plain f32 upload) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &d in &params {
        for &n in &sites {
            if n * d > max_cells {
                println!("| {n} | {d} | | | skipped (--max-cells) | | | | | |");
                continue;
            }
            let len = d as usize;
            let n32 = n as u32;

            // Plain: the server folds every input into an i64 sum (the coordinator's exact sum).
            reset_peak();
            let base = peak_rss_mib();
            let mut plain = Duration::ZERO;
            let t = Instant::now();
            let mut sum = vec![0i64; len];
            plain += t.elapsed();
            for s in 0..n32 {
                let x = input(s, len);
                let t = Instant::now();
                for (a, v) in sum.iter_mut().zip(&x) {
                    *a = a.wrapping_add(*v);
                }
                plain += t.elapsed();
            }
            let plain_peak = peak_rss_mib() - base;

            let k = default_degree(n32);
            let t_ = threshold_for(k, 0.5);
            let cfg = RoundConfig {
                job_digest: [1; 32],
                round: 1,
                sites: n32,
                degree: k,
                threshold: t_,
                min_survivors: t_,
                graph_seed: [n as u8; 32],
                vector_len: d,
            };
            drop(sum);
            reset_peak();
            let base = peak_rss_mib();
            let (out, costs) =
                match run_round(&cfg, |s| input(s, len), &Dropouts::none(), 1, 1, None) {
                    Ok(r) => r,
                    Err(e) => {
                        println!("| {n} | {d} | {k} | {t_} | round failed: {e} |");
                        continue;
                    }
                };
            let secagg_peak = peak_rss_mib() - base;
            drop(out);
            let mut site_times: Vec<f64> = costs.site_time.values().map(|d| secs(*d)).collect();
            site_times.sort_by(f64::total_cmp);
            let median = site_times[site_times.len() / 2];
            let max = site_times.last().copied().unwrap_or(0.0);
            let bytes = costs.site_bytes.values().max().copied().unwrap_or(0);
            println!(
                "| {n} | {d} | {k} | {t_} | {:.3} | {:.3} | {:.1}× | {:.0} / {:.0} | {:.3} ({:.3}) | {:.1} MB ({:.1} MB) |",
                secs(plain),
                secs(costs.server_time),
                secs(costs.server_time) / secs(plain),
                plain_peak,
                secagg_peak,
                median,
                max,
                bytes as f64 / 1e6,
                d as f64 * 4.0 / 1e6,
            );
        }
    }

    // A site's encoding (clip, conditional randomized rounding, distributed noise), one thread.
    println!();
    println!("| params | encode without noise s | encode with σ = 64 grid steps s |");
    println!("|---:|---:|---:|");
    for &d in &params {
        let update: Vec<f32> = (0..d).map(|i| ((i % 13) as f32 - 6.0) * 1e-4).collect();
        let mut p = EncodeParams {
            clip_norm: 1.0,
            scale_bits: 20,
            rounding_beta: encode::DEFAULT_ROUNDING_BETA,
            noise_sigma_grid: None,
        };
        let t = Instant::now();
        let plain = encode::encode(&update, &p, 1);
        let without = t.elapsed();
        p.noise_sigma_grid = Some(64.0);
        let t = Instant::now();
        let noised = encode::encode(&update, &p, 1);
        let with = t.elapsed();
        if plain.is_err() || noised.is_err() {
            println!("| {d} | encoding failed | |");
            continue;
        }
        println!("| {d} | {:.3} | {:.3} |", secs(without), secs(with));
    }
}
