//! Watermark embedding and detection on synthetic models of PARAMS float32 parameters, streamed
//! from and to files: wall time, CPU time and the process's resident peak for each, beside a plain
//! copy of the same file (BENCHMARKS.md, "Watermarks").
//!
//! ```text
//! cargo run --release -p tutela-protocol --example bench_watermark -- \
//!     [--params 10000000,100000000,1000000000] [--dir /var/tmp]
//! ```
//!
//! The model is Llama-shaped: an embedding `[32000, d]`, then blocks of `[d, d]` ×4 and
//! `[4d, d]` ×2 (d = 2048, or smaller for small models), until PARAMS is reached; every tensor
//! is marked. The input is written first (not timed), then embedded into a second file, then
//! the marked file is detected. Files are deleted afterwards.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use safetensors::Dtype;
use tutela_protocol::checkpoint::SafetensorsWriter;
use tutela_protocol::stream::SafetensorsFileSink;
use tutela_protocol::watermark::{Strength, WatermarkKey, detect_file, embed_stream};

fn list(args: &[String], flag: &str, default: &[u64]) -> Vec<u64> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the stat line, 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

fn shapes(params: u64) -> Vec<Vec<usize>> {
    let d: usize = if params >= 500_000_000 {
        2048
    } else if params >= 50_000_000 {
        1024
    } else {
        512
    };
    let mut out = vec![vec![32000usize.min(params as usize / d / 4).max(1), d]];
    let mut total = (out[0][0] * d) as u64;
    'blocks: loop {
        for shape in [[d, d], [d, d], [d, d], [d, d], [4 * d, d], [d, 4 * d]] {
            let n = (shape[0] * shape[1]) as u64;
            if total + n > params {
                break 'blocks;
            }
            out.push(shape.to_vec());
            total += n;
        }
    }
    out
}

fn write_model(path: &Path, shapes: &[Vec<usize>]) -> u64 {
    let declared: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("t{i}.weight"), Dtype::F32, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &declared, None).expect("create the input");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut total = 0u64;
    for (name, _, shape) in &declared {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| ((rng.random::<f32>() - 0.5) * 0.04).to_le_bytes())
            .collect();
        w.write_next(name, &bytes).expect("write the input");
        total += n as u64;
    }
    w.finish().expect("finish the input");
    total
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let params = list(&args, "--params", &[10_000_000, 100_000_000]);
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let work = tempfile::tempdir_in(&dir).expect("a working directory");
    let key = WatermarkKey::from_bytes([7; 32]);
    let mark = key.mark("bench");
    let strength = Strength {
        target_z: 16.0,
        max_amplitude: 0.25,
    };
    println!(
        "| parameters | file | largest tensor | copy (I/O floor) | embed: wall / CPU | embed peak RSS | detect: wall / CPU | detect peak RSS | z |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in params {
        let shapes = shapes(p);
        let largest = shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .max()
            .unwrap_or(0);
        let input = work.path().join("input.safetensors");
        let n = write_model(&input, &shapes);
        let bytes = std::fs::metadata(&input).map(|m| m.len()).unwrap_or(0);

        let copy = work.path().join("copy.safetensors");
        let t = Instant::now();
        std::fs::copy(&input, &copy).expect("copy");
        let copy_s = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&copy);

        let output = work.path().join("marked.safetensors");
        reset_peak();
        let (t, c) = (Instant::now(), cpu_seconds());
        let (_, _, report) =
            embed_stream(&input, SafetensorsFileSink::at(&output), &mark, strength).expect("embed");
        let (embed_s, embed_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        let embed_peak = status_mib("VmHWM:");
        let _ = std::fs::remove_file(&input);

        reset_peak();
        let (t, c) = (Instant::now(), cpu_seconds());
        let d = detect_file(&output, &mark).expect("detect");
        let (detect_s, detect_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        let detect_peak = status_mib("VmHWM:");
        let _ = std::fs::remove_file(&output);
        println!(
            "| {n} | {:.0} MiB | {:.0} MiB | {copy_s:.2} s | {embed_s:.2} s / {embed_cpu:.2} s | {embed_peak:.0} MiB | {detect_s:.2} s / {detect_cpu:.2} s | {detect_peak:.0} MiB | {:.1} (expected {:.1}) |",
            bytes as f64 / 1048576.0,
            largest as f64 * 4.0 / 1048576.0,
            d.z,
            report.expected_z
        );
    }
}
