//! `tutela bench aggregate-rules`: one round of each aggregation rule against FedAvg, through
//! the real sinks (`RoundAggregation::open`, as the task router uses them), on the same random
//! updates generated in memory before the clock starts.
//!
//! Per rule: the round's wall time (open, every update streamed in 4 MiB chunks one after the
//! other, finish), and the resident peak it added (`VmHWM` reset before each round, minus the
//! resident memory then, which holds the inputs). The buffered rules also write every update to
//! an encrypted spool and read it back (twice for Multi-Krum), so their disk traffic is
//! params × 4 bytes × updates each way.

use std::sync::Arc;
use std::time::Instant;

use tutela_privacy::at_rest::LocalKek;
use tutela_protocol::stream::{MAX_CHUNK_BYTES, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

use super::bench::{BenchError, proc_status_bytes, random_f32_bytes, split};
use super::buffered::{BufferedAggregator, BufferedOptions};
use super::{AggregatorOptions, RobustRule, RoundAggregation, RoundAggregator, SpoolPool};

/// One rule's round.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RuleTiming {
    pub rule: String,
    /// Open + every update through its sink + finish.
    pub round_seconds: f64,
    /// Of which: `finish` (the combination, for the buffered rules).
    pub finish_seconds: f64,
    /// CPU time (user + system) the process spent in the round: on a shared machine, the
    /// figure that does not depend on what else runs.
    pub cpu_seconds: Option<f64>,
    /// Resident peak during the round minus resident memory before it.
    pub peak_added_bytes: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RulesBenchReport {
    pub params: usize,
    pub updates: usize,
    /// The generated updates, resident for the whole run.
    pub inputs_bytes: u64,
    pub rules: Vec<RuleTiming>,
}

impl std::fmt::Display for RulesBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "One round of {} updates × {} parameters ({:.0} MiB per update; inputs {:.0} MiB resident), updates one after the other in {} KiB chunks:",
            self.updates,
            self.params,
            mib(self.params as u64 * 4),
            mib(self.inputs_bytes),
            MAX_CHUNK_BYTES / 1024
        )?;
        let fedavg = self.rules.first().map_or(f64::NAN, |r| r.round_seconds);
        let fedavg_cpu = self
            .rules
            .first()
            .and_then(|r| r.cpu_seconds)
            .unwrap_or(f64::NAN);
        for r in &self.rules {
            writeln!(
                f,
                "  {:<26} round {:>7.3} s ({:>5.1}× FedAvg), finish {:>7.3} s, CPU {}, resident peak added {}",
                r.rule,
                r.round_seconds,
                r.round_seconds / fedavg,
                r.finish_seconds,
                r.cpu_seconds.map_or("n/a".to_string(), |c| format!(
                    "{c:.2} s ({:.1}× FedAvg)",
                    c / fedavg_cpu
                )),
                r.peak_added_bytes
                    .map_or("n/a".to_string(), |b| format!("{:.0} MiB", mib(b)))
            )?;
        }
        Ok(())
    }
}

/// Runs one round of FedAvg, median, trimmed mean (β = 0.2) and Multi-Krum (f = ⌊(n − 3)/2⌋)
/// on `updates` random updates of `params` parameters, spooling under `spool_dir`.
pub fn bench_rules(
    params: usize,
    updates: usize,
    spool_dir: &std::path::Path,
) -> Result<RulesBenchReport, BenchError> {
    if params == 0 || updates < 3 {
        return Err(BenchError::Empty);
    }
    let sizes = split(params);
    let specs: Vec<TensorSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("layers.{i}.weight"), DType::F32, vec![n as u64]))
        .collect();
    let manifest = Manifest::new(specs, Default::default())?;
    let amplitude = 1e-3f32;
    let norm_bound = f64::from(amplitude) * (params as f64).sqrt();
    let inputs: Vec<Vec<Vec<u8>>> = (0..updates)
        .map(|u| {
            let mut state =
                0x9E37_79B9_7F4A_7C15u64 ^ (u as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            sizes
                .iter()
                .map(|&n| random_f32_bytes(n, amplitude, &mut state))
                .collect()
        })
        .collect();
    let pool = SpoolPool::new(Some(spool_dir.to_path_buf()));
    let kek: Arc<LocalKek> = Arc::new(LocalKek::from_bytes(&[0x5a; 32]));
    let buffered = |rule| -> Result<Arc<dyn RoundAggregation>, BenchError> {
        Ok(BufferedAggregator::new(
            &manifest,
            BufferedOptions {
                rule,
                norm_bound,
                spool_dir: spool_dir.join("update-spools"),
                kek: kek.clone(),
                filters: Vec::new(),
            },
        )?)
    };
    let f = (updates - 3) / 2;
    let rules: Vec<(
        String,
        Box<dyn Fn() -> Result<Arc<dyn RoundAggregation>, BenchError>>,
    )> = vec![
        (
            "fedavg (streaming sum)".into(),
            Box::new(|| {
                let mut options = AggregatorOptions::new(norm_bound);
                options.spool_pool = Some(pool.clone());
                Ok(RoundAggregator::with_options(&manifest, options)? as Arc<dyn RoundAggregation>)
            }),
        ),
        ("median".into(), Box::new(|| buffered(RobustRule::Median))),
        (
            "trimmed_mean(beta=0.2)".into(),
            Box::new(|| buffered(RobustRule::TrimmedMean { beta: 0.2 })),
        ),
        (
            format!("multi_krum(f={f}, m=n-f)"),
            Box::new(move || buffered(RobustRule::MultiKrum { f, m: None })),
        ),
    ];
    let mut timings = Vec::new();
    for (name, open) in &rules {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = proc_status_bytes("VmRSS:");
        let cpu_before = cpu_seconds();
        let start = Instant::now();
        let agg = open()?;
        for (index, update) in inputs.iter().enumerate() {
            let refused = |source| BenchError::Refused { index, source };
            let mut sink = agg.clone().open(format!("site-{index:02}"), 1000.0);
            sink.begin(&manifest).map_err(refused)?;
            for (t, data) in update.iter().enumerate() {
                for (c, chunk) in data.chunks(MAX_CHUNK_BYTES).enumerate() {
                    sink.write(t, (c * MAX_CHUNK_BYTES) as u64, chunk)
                        .map_err(refused)?;
                }
            }
            sink.commit(&[0u8; 32]).map_err(refused)?;
        }
        let folded = start.elapsed();
        let finished = agg.finish()?;
        let total = start.elapsed();
        let peak = proc_status_bytes("VmHWM:");
        let cpu = cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
        drop(finished);
        timings.push(RuleTiming {
            rule: name.clone(),
            round_seconds: total.as_secs_f64(),
            finish_seconds: (total - folded).as_secs_f64(),
            cpu_seconds: cpu,
            peak_added_bytes: peak.zip(before).map(|(p, b)| p.saturating_sub(b)),
        });
    }
    Ok(RulesBenchReport {
        params,
        updates,
        inputs_bytes: params as u64 * 4 * updates as u64,
        rules: timings,
    })
}

/// User + system CPU time of this process so far (Linux: `/proc/self/stat`, in clock ticks of
/// 1/100 s, the kernel's USER_HZ on every Linux architecture that matters here).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_times_every_rule() {
        let dir = tempfile::tempdir().unwrap();
        let report = bench_rules(200_000, 5, dir.path()).unwrap();
        let names: Vec<&str> = report.rules.iter().map(|r| r.rule.as_str()).collect();
        assert_eq!(
            names,
            [
                "fedavg (streaming sum)",
                "median",
                "trimmed_mean(beta=0.2)",
                "multi_krum(f=1, m=n-f)"
            ]
        );
        assert!(report.rules.iter().all(|r| r.round_seconds > 0.0));
        assert!(report.to_string().contains("median"));
    }
}
