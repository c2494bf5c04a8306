//! A SecAgg+ round in process against a plain sum of the same integer vectors: server CPU time
//! and peak memory, per-site CPU time and bytes sent (BENCHMARKS.md, "Secure aggregation").
//!
//! ```text
//! cargo run --release -p tutela-protocol --example bench_secagg -- [--sites 5,20,50,100]
//!     [--params 1000000,10000000] [--max-cells 500000000] [--threads N] [--keystream-mib 256]
//! ```
//!
//! The sites and the server take turns in one process; each party's masking and unmasking runs
//! on `--threads` threads (default: the machine's parallelism), the plain fold on one (as the
//! coordinator's streaming sum does). Every cost is given as CPU time (the process's CPU clock
//! over the party's steps, all threads: what the issue's targets are stated in, and what stays
//! comparable on a shared machine) and as wall time. `--max-cells` skips configurations with
//! more than that many `sites × params`. First, the ChaCha20 keystream alone on one thread, per
//! implementation, and the masks' expansion on one and on `--threads` threads.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tutela_protocol::secagg::encode::{self, EncodeParams};
use tutela_protocol::secagg::masks::{self, Sign};
use tutela_protocol::secagg::simulate::{Dropouts, run_round_measured};
use tutela_protocol::secagg::{RoundConfig, default_degree, threshold_for};

/// The process's CPU time, every thread.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call writes; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// GB/s of `bytes` in `d`.
fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Each ChaCha20 at hand, filling `mib` MiB of keystream on one thread in 64 KiB blocks (the
/// masks' block), beside AES-128-GCM (the fastest cipher ring has, for scale); then the masks'
/// expansion itself (`masks::apply`, one mask) on one thread and on `threads`.
fn keystream(mib: usize, threads: usize) {
    const BUF: usize = 64 * 1024;
    let total = mib * 1024 * 1024;
    let mut buf = vec![0u8; BUF];
    let seed = [9u8; 32];
    let mut rows: Vec<(String, Duration, Duration)> = Vec::new();
    let mut time = |name: &str, f: &mut dyn FnMut(&mut [u8])| {
        f(&mut buf); // warm up (runtime CPU detection, page faults)
        let (w, c) = (Instant::now(), cpu_now());
        for _ in 0..total / BUF {
            f(&mut buf);
        }
        rows.push((name.to_string(), w.elapsed(), cpu_now().saturating_sub(c)));
    };
    {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
        time("rand_chacha 0.9 ChaCha20Rng (ppv-lite86)", &mut |b| {
            rng.fill_bytes(b)
        });
    }
    {
        use chacha20::rand_core::{Rng, SeedableRng};
        let mut rng = chacha20::ChaCha20Rng::from_seed(seed);
        time(
            "chacha20 0.10 ChaCha20Rng (the masks': AVX2 chosen at run time)",
            &mut |b| rng.fill_bytes(b),
        );
    }
    {
        use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
        if let Ok(key) = UnboundKey::new(&CHACHA20_POLY1305, &seed) {
            let key = LessSafeKey::new(key);
            time(
                "ring ChaCha20-Poly1305 sealing zeros (keystream + MAC)",
                &mut |b| {
                    b.fill(0);
                    let _ = key.seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key([0; 12]),
                        Aad::empty(),
                        b,
                    );
                },
            );
        }
    }
    {
        use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        if let Ok(key) = UnboundKey::new(&AES_128_GCM, &seed[..16]) {
            let key = LessSafeKey::new(key);
            time(
                "ring AES-128-GCM sealing zeros (not ChaCha20: for scale)",
                &mut |b| {
                    b.fill(0);
                    let _ = key.seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key([0; 12]),
                        Aad::empty(),
                        b,
                    );
                },
            );
        }
    }
    let elements = total / 8;
    // Touched before timing, so that page faults are not counted as keystream.
    let mut v = vec![1u64; elements];
    for t in [1, threads] {
        masks::apply(&mut v[..BUF / 8], &[(seed, Sign::Add)], t); // warm up
        let (w, c) = (Instant::now(), cpu_now());
        masks::apply(&mut v, &[(seed, Sign::Add)], t);
        rows.push((
            format!("masks::apply, one mask, {t} thread(s)"),
            w.elapsed(),
            cpu_now().saturating_sub(c),
        ));
    }
    println!("| keystream, {mib} MiB | GB/s of wall time | GB/s per CPU-second |");
    println!("|---|---:|---:|");
    for (name, wall, cpu) in rows {
        println!(
            "| {name} | {:.2} | {:.2} |",
            gbps(total, wall),
            gbps(total, cpu)
        );
    }
    println!();
}

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
    let threads = list(&args, "--threads", &[masks::default_threads() as u64])[0].max(1) as usize;
    let keystream_mib = list(&args, "--keystream-mib", &[256])[0] as usize;

    if keystream_mib > 0 {
        keystream(keystream_mib, threads);
    }

    println!(
        "| sites | params | k | t | plain server CPU s | secagg server CPU s | ratio (CPU) | secagg server wall s, {threads} threads (plain wall) | server peak MiB (plain / secagg) | site CPU s, median (max) | site wall s, median | site bytes sent (plain f32 upload) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
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
            let mut plain_wall = Duration::ZERO;
            let (w, c) = (Instant::now(), cpu_now());
            let mut sum = vec![0i64; len];
            plain += cpu_now().saturating_sub(c);
            plain_wall += w.elapsed();
            for s in 0..n32 {
                let x = input(s, len);
                let (w, c) = (Instant::now(), cpu_now());
                for (a, v) in sum.iter_mut().zip(&x) {
                    *a = a.wrapping_add(*v);
                }
                plain += cpu_now().saturating_sub(c);
                plain_wall += w.elapsed();
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
            let (out, costs) = match run_round_measured(
                &cfg,
                |s| input(s, len),
                &Dropouts::none(),
                threads,
                threads,
                None,
                Some(cpu_now),
            ) {
                Ok(r) => r,
                Err(e) => {
                    println!("| {n} | {d} | {k} | {t_} | round failed: {e} |");
                    continue;
                }
            };
            let secagg_peak = peak_rss_mib() - base;
            drop(out);
            let sorted = |m: &std::collections::BTreeMap<u32, Duration>| {
                let mut v: Vec<f64> = m.values().map(|d| secs(*d)).collect();
                v.sort_by(f64::total_cmp);
                v
            };
            let site_cpu = sorted(&costs.site_cpu);
            let site_wall = sorted(&costs.site_time);
            let median = site_cpu[site_cpu.len() / 2];
            let max = site_cpu.last().copied().unwrap_or(0.0);
            let bytes = costs.site_bytes.values().max().copied().unwrap_or(0);
            println!(
                "| {n} | {d} | {k} | {t_} | {:.3} | {:.3} | {:.1}× | {:.3} ({:.3}) | {:.0} / {:.0} | {:.3} ({:.3}) | {:.3} | {:.1} MB ({:.1} MB) |",
                secs(plain),
                secs(costs.server_cpu),
                secs(costs.server_cpu) / secs(plain),
                secs(costs.server_time),
                secs(plain_wall),
                plain_peak,
                secagg_peak,
                median,
                max,
                site_wall[site_wall.len() / 2],
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
