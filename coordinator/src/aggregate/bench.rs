//! The aggregation benchmark behind `tutela bench aggregate`: random updates, generated in memory
//! before the clock starts, are folded through [`UpdateSink`](super::UpdateSink)s in 4 MiB chunks
//! (as the stream decoder hands them over after the network) and the round is finished, two ways:
//!
//! - **one upload at a time**, on one thread: sites that finish training at different times;
//! - **concurrent uploads**: every update in flight at once, their chunks interleaved, folded by
//!   as many threads as the machine has cores — what the coordinator's runtime does when the
//!   sampled sites, having trained for about as long, upload together.
//!
//! In the same run, a plain memory copy of the same bytes gives the bandwidth ceiling (on one
//! thread, and on as many threads as the concurrent round uses), the bare fold loops of the
//! accumulation choices (f32, f64, i64 fixed point) show what the accumulator's width costs, and
//! spool writes alone show what exact undo costs.
//!
//! `bench/fedavg_numpy.py` at the repository root computes the same weighted mean the way
//! Flower's `aggregate` does, on the same sizes, and prints GB/s in the same unit: bytes of
//! updates (4 per parameter per update) folded per second, 10⁹ bytes to the GB.

use std::time::Instant;

use tutela_protocol::stream::{MAX_CHUNK_BYTES, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

use super::tiled::quantize;
use super::{AggregateError, AggregatorOptions, RoundAggregator, RoundResult};

/// Tensors the model is split into: a few large ones, like the big layers of a real model.
const TENSORS: usize = 4;

/// Timed rounds; the report gives the fastest.
pub const ROUNDS: usize = 3;

/// Elements sampled to check the result against an f64 reference.
const CHECKED: usize = 100_000;

/// The bare fold loop of one accumulation choice, without validation or spooling.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelRate {
    pub accumulator: String,
    /// Bytes of memory traffic per parameter: read the f32 input, read and write the sum.
    pub bytes_moved_per_param: u32,
    pub gb_per_s: f64,
}

/// What `bench_fedavg` measured. GB are 10⁹ bytes of updates (4 per parameter per update).
#[derive(Clone, Debug, serde::Serialize)]
pub struct AggregateBenchReport {
    pub params: usize,
    pub updates: usize,
    pub tensors: usize,
    pub chunk_bytes: usize,
    /// Bytes of updates folded: params × 4 × updates.
    pub update_bytes: u64,
    /// A whole round, the fastest of [`ROUNDS`]: creating the aggregator (which touches the
    /// running sum's pages), all updates through `UpdateSink`s (filters, spool, fold), `finish`.
    pub fold_seconds: f64,
    /// Every round's time, in order.
    pub round_seconds: Vec<f64>,
    pub fold_gb_per_s: f64,
    /// The same round without creating the aggregator, the first update (whose upload makes the
    /// spool file) and `finish`: the rate once the round is under way.
    pub steady_gb_per_s: Option<f64>,
    pub new_seconds: f64,
    pub finish_seconds: f64,
    /// `copy_from_slice` of every chunk into a preallocated model-sized buffer (fastest of
    /// [`ROUNDS`]).
    pub copy_seconds: f64,
    pub copy_gb_per_s: f64,
    /// fold_gb_per_s / copy_gb_per_s.
    pub fold_vs_copy: f64,
    /// Threads of the concurrent round and of the parallel copy (the machine's cores).
    pub threads: usize,
    /// Every update in flight at once, chunks interleaved, `threads` threads: the fastest of
    /// [`ROUNDS`] whole rounds (new, fold, finish).
    pub concurrent_seconds: f64,
    pub concurrent_round_seconds: Vec<f64>,
    pub concurrent_gb_per_s: f64,
    /// The same bytes copied by `threads` threads, each into a model-sized buffer of its own.
    pub parallel_copy_seconds: f64,
    pub parallel_copy_gb_per_s: f64,
    pub kernels: Vec<KernelRate>,
    /// Writing the same bytes, in the same blocks, to one reused spool file: the price of exact
    /// undo, paid by every update (see the aggregate module's docs).
    pub spool_write_gb_per_s: Option<f64>,
    /// One model: params × 4 bytes.
    pub model_bytes: u64,
    /// The generated updates, held in memory for the whole run (counted in the resident peak).
    pub inputs_bytes: u64,
    /// The aggregator's running sum: params × 8 bytes.
    pub accumulator_bytes: u64,
    /// Memory per upload in flight besides the sum: one block of decoded values.
    pub per_upload_bytes: u64,
    /// Disk (page cache) per upload in flight: the spool of what it folded, up to one model.
    pub spool_bytes_per_upload: u64,
    /// Resident memory before the first round (the inputs, mostly).
    pub rss_before_bytes: Option<u64>,
    /// `VmHWM` after the rounds: the process's resident peak, inputs included.
    pub peak_rss_bytes: Option<u64>,
    /// Peak minus the resident memory before: what aggregating added, measured.
    pub aggregation_peak_bytes: Option<u64>,
    /// Largest |result − f64 reference| over sampled elements, and the largest |reference| there.
    pub max_abs_error: f64,
    pub max_abs_mean: f64,
}

impl std::fmt::Display for AggregateBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let opt_mib =
            |b: Option<u64>| b.map_or("n/a".to_string(), |b| format!("{:.0} MiB", mib(b)));
        writeln!(
            f,
            "FedAvg of {} updates × {} parameters ({} tensors, {:.0} MiB per model, {} KiB chunks)",
            self.updates,
            self.params,
            self.tensors,
            mib(self.model_bytes),
            self.chunk_bytes / 1024
        )?;
        writeln!(
            f,
            "  one upload at a time, one thread, new + fold + finish: {:.3} s, {:.2} GB/s of updates ({:.0}% of the one-thread copy); rounds: {}",
            self.fold_seconds,
            self.fold_gb_per_s,
            self.fold_vs_copy * 100.0,
            self.round_seconds
                .iter()
                .map(|s| format!("{s:.3} s"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        if let Some(steady) = self.steady_gb_per_s {
            writeln!(
                f,
                "    steady state (updates after the first): {steady:.2} GB/s"
            )?;
        }
        writeln!(
            f,
            "    new: {:.3} s, finish: {:.3} s",
            self.new_seconds, self.finish_seconds
        )?;
        writeln!(
            f,
            "  memory copy of the same bytes on one thread: {:.3} s, {:.2} GB/s",
            self.copy_seconds, self.copy_gb_per_s
        )?;
        writeln!(
            f,
            "  concurrent uploads ({} in flight, chunks interleaved, {} threads), new + fold + finish: {:.3} s, {:.2} GB/s ({:.0}% of the one-thread copy, {:.0}% of the {}-thread copy); rounds: {}",
            self.updates,
            self.threads,
            self.concurrent_seconds,
            self.concurrent_gb_per_s,
            self.concurrent_gb_per_s / self.copy_gb_per_s * 100.0,
            self.concurrent_gb_per_s / self.parallel_copy_gb_per_s * 100.0,
            self.threads,
            self.concurrent_round_seconds
                .iter()
                .map(|s| format!("{s:.3} s"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "  memory copy of the same bytes on {} threads: {:.3} s, {:.2} GB/s",
            self.threads, self.parallel_copy_seconds, self.parallel_copy_gb_per_s
        )?;
        writeln!(f, "  bare fold loops (no validation, no spool):")?;
        for k in &self.kernels {
            writeln!(
                f,
                "    {:<22} {:>2} B/param moved  {:.2} GB/s",
                k.accumulator, k.bytes_moved_per_param, k.gb_per_s
            )?;
        }
        if let Some(rate) = self.spool_write_gb_per_s {
            writeln!(f, "  spool writes alone (page cache): {rate:.2} GB/s")?;
        }
        writeln!(
            f,
            "  memory: accumulator {:.0} MiB ({:.1}× one model) + {} KiB per upload in flight; spool {:.0} MiB of disk per upload in flight",
            mib(self.accumulator_bytes),
            self.accumulator_bytes as f64 / self.model_bytes as f64,
            self.per_upload_bytes / 1024,
            mib(self.spool_bytes_per_upload)
        )?;
        writeln!(
            f,
            "  resident: before {}, peak {} (inputs {:.0} MiB), aggregation added {}",
            opt_mib(self.rss_before_bytes),
            opt_mib(self.peak_rss_bytes),
            mib(self.inputs_bytes),
            opt_mib(self.aggregation_peak_bytes)
        )?;
        writeln!(
            f,
            "  accuracy: max |error| {:.3e} against an f64 reference (max |mean| {:.3e})",
            self.max_abs_error, self.max_abs_mean
        )
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("params and updates must both be at least 1")]
    Empty,
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    #[error("update {index} was refused: {source}")]
    Refused {
        index: usize,
        source: tutela_protocol::stream::SinkError,
    },
    #[error(transparent)]
    Manifest(#[from] tutela_protocol::tensor::ManifestError),
    #[error(
        "the concurrent round's mean is off by {0:e} from the f64 reference, more than the one-at-a-time round's"
    )]
    Mismatch(f64),
    #[error("a thread of the concurrent round panicked")]
    Panicked,
}

/// Folds `updates` random updates of `params` f32 parameters through the aggregator and reports
/// throughput against a memory copy, and memory. Every timing is the best of [`ROUNDS`] runs in
/// the same process (as in a coordinator that has been running for a while; the machine may be
/// shared). Spools to `/var/tmp` when it exists (as `tutela bench` does: `/tmp` is often a small
/// tmpfs), else the system's temporary directory.
pub fn bench_fedavg(
    params: usize,
    updates: usize,
    threads: usize,
) -> Result<AggregateBenchReport, BenchError> {
    if params == 0 || updates == 0 || threads == 0 {
        return Err(BenchError::Empty);
    }
    let sizes = split(params);
    let specs: Vec<TensorSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("layers.{i}.weight"), DType::F32, vec![n as u64]))
        .collect();
    let manifest = Manifest::new(specs, Default::default())?;

    // Uniform in (−a, a): the norm is below a·√params, which is the bound.
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
    let weights: Vec<f64> = (0..updates)
        .map(|u| (1000 + (u * 7919) % 9000) as f64)
        .collect();
    let update_bytes = (params as u64) * 4 * updates as u64;

    let mut options = AggregatorOptions::new(norm_bound);
    let var_tmp = std::path::Path::new("/var/tmp");
    if var_tmp.is_dir() {
        options.spool_dir = Some(var_tmp.to_path_buf());
    }
    // One pool for every round, as the coordinator keeps one for its lifetime.
    options.spool_pool = Some(super::SpoolPool::new(options.spool_dir.clone()));

    // Start the resident peak afresh (Linux: writing 5 to clear_refs resets VmHWM), so that it
    // reflects the aggregation, not a transient of input generation.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = proc_status_bytes("VmRSS:");
    let mut best: Option<RoundTiming> = None;
    let mut round_seconds = Vec::with_capacity(ROUNDS);
    let mut accuracy = (0.0, 0.0);
    for round in 0..ROUNDS {
        let (timing, result) = time_round(&manifest, options.clone(), &inputs, &weights)?;
        round_seconds.push(timing.total);
        if round == 0 {
            accuracy = check(&result.mean_delta, &inputs, &weights, params);
        }
        drop(result);
        if best.as_ref().is_none_or(|b| timing.total < b.total) {
            best = Some(timing);
        }
    }
    let best = best.ok_or(BenchError::Empty)?;
    let mut concurrent_round_seconds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let (seconds, result) =
            time_concurrent_round(&manifest, options.clone(), &inputs, &weights, threads)?;
        concurrent_round_seconds.push(seconds);
        // Integer sums do not depend on the order of arrival, so the concurrent round is exactly
        // as accurate as the one-at-a-time round (the integration tests compare their bits).
        let (err, _) = check(&result.mean_delta, &inputs, &weights, params);
        if err > accuracy.0 * 1.000_001 + f64::MIN_POSITIVE {
            return Err(BenchError::Mismatch(err));
        }
    }
    let concurrent_seconds = concurrent_round_seconds
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let peak = proc_status_bytes("VmHWM:");

    // The ceiling: the same bytes, the same chunks, copied into a buffer allocated and touched
    // beforehand, on one thread and on as many as the concurrent round used.
    let copy_seconds = parallel_copy(&inputs, &sizes, 1);
    let parallel_copy_seconds = parallel_copy(&inputs, &sizes, threads);

    let spool_write_gb_per_s = spool_rate(options.spool_dir.as_deref(), &inputs).ok();
    let kernels = vec![
        kernel_rate("f32", 12, &inputs, &sizes, &weights, 1f32, fold_f32),
        kernel_rate("f64", 20, &inputs, &sizes, &weights, 1f64, fold_f64),
        kernel_rate(
            "i64 fixed point (used)",
            20,
            &inputs,
            &sizes,
            &weights,
            1i64,
            fold_i64,
        ),
    ];

    let fold_gb_per_s = update_bytes as f64 / best.total / 1e9;
    let copy_gb_per_s = update_bytes as f64 / copy_seconds / 1e9;
    let steady_gb_per_s = (updates > 1).then(|| {
        let bytes = (params as u64) * 4 * (updates as u64 - 1);
        bytes as f64 / best.after_first_update / 1e9
    });
    Ok(AggregateBenchReport {
        params,
        updates,
        tensors: sizes.len(),
        chunk_bytes: MAX_CHUNK_BYTES,
        update_bytes,
        fold_seconds: best.total,
        round_seconds,
        fold_gb_per_s,
        steady_gb_per_s,
        new_seconds: best.new,
        finish_seconds: best.finish,
        copy_seconds,
        copy_gb_per_s,
        fold_vs_copy: fold_gb_per_s / copy_gb_per_s,
        threads,
        concurrent_seconds,
        concurrent_round_seconds,
        concurrent_gb_per_s: update_bytes as f64 / concurrent_seconds / 1e9,
        parallel_copy_seconds,
        parallel_copy_gb_per_s: update_bytes as f64 / parallel_copy_seconds / 1e9,
        kernels,
        spool_write_gb_per_s,
        model_bytes: params as u64 * 4,
        inputs_bytes: update_bytes,
        accumulator_bytes: params as u64 * 8,
        per_upload_bytes: (super::BLOCK * 4) as u64,
        spool_bytes_per_upload: params as u64 * 4,
        rss_before_bytes: rss_before,
        peak_rss_bytes: peak,
        aggregation_peak_bytes: peak.zip(rss_before).map(|(p, b)| p.saturating_sub(b)),
        max_abs_error: accuracy.0,
        max_abs_mean: accuracy.1,
    })
}

/// Seconds of one timed round.
struct RoundTiming {
    /// Creating the aggregator (allocating and touching the running sum).
    new: f64,
    /// Updates after the first one (whose upload also creates the spool file).
    after_first_update: f64,
    finish: f64,
    total: f64,
}

/// One round: a new aggregator, every update through a sink in 4 MiB chunks, `finish`.
fn time_round(
    manifest: &Manifest,
    options: AggregatorOptions,
    inputs: &[Vec<Vec<u8>>],
    weights: &[f64],
) -> Result<(RoundTiming, RoundResult), BenchError> {
    let start = Instant::now();
    let agg = RoundAggregator::with_options(manifest, options)?;
    let created = start.elapsed();
    let mut first_done = created;
    for (index, (update, &weight)) in inputs.iter().zip(weights).enumerate() {
        let mut sink = agg.update_sink(format!("site-{index}"), weight);
        let refused = |source| BenchError::Refused { index, source };
        sink.begin(manifest).map_err(refused)?;
        for (t, data) in update.iter().enumerate() {
            for (c, chunk) in data.chunks(MAX_CHUNK_BYTES).enumerate() {
                sink.write(t, (c * MAX_CHUNK_BYTES) as u64, chunk)
                    .map_err(refused)?;
            }
        }
        sink.commit(&[0u8; 32]).map_err(refused)?;
        if index == 0 {
            first_done = start.elapsed();
        }
    }
    let folded = start.elapsed();
    let result = agg.finish()?;
    let total = start.elapsed();
    Ok((
        RoundTiming {
            new: created.as_secs_f64(),
            after_first_update: (folded - first_done).as_secs_f64(),
            finish: (total - folded).as_secs_f64(),
            total: total.as_secs_f64(),
        },
        result,
    ))
}

/// One round with every update in flight at once: thread `k` of `threads` carries the uploads
/// `k, k + threads, …`, writing one 4 MiB chunk of each in turn, so that chunks of all uploads
/// interleave as they do when sites upload together. Returns the seconds of new + fold + finish.
fn time_concurrent_round(
    manifest: &Manifest,
    options: AggregatorOptions,
    inputs: &[Vec<Vec<u8>>],
    weights: &[f64],
    threads: usize,
) -> Result<(f64, RoundResult), BenchError> {
    // (tensor, offset) of every chunk, in stream order: the same for every update.
    let chunks: Vec<(usize, usize)> = inputs[0]
        .iter()
        .enumerate()
        .flat_map(|(t, data)| {
            (0..data.len())
                .step_by(MAX_CHUNK_BYTES)
                .map(move |offset| (t, offset))
        })
        .collect();
    let chunks = &chunks;
    let start = Instant::now();
    let agg = RoundAggregator::with_options(manifest, options)?;
    std::thread::scope(|s| -> Result<(), BenchError> {
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                let agg = &agg;
                s.spawn(move || -> Result<(), BenchError> {
                    let mine: Vec<usize> = (k..inputs.len()).step_by(threads).collect();
                    let mut sinks = Vec::with_capacity(mine.len());
                    for &index in &mine {
                        let mut sink = agg.update_sink(format!("site-{index}"), weights[index]);
                        sink.begin(manifest)
                            .map_err(|source| BenchError::Refused { index, source })?;
                        sinks.push(sink);
                    }
                    for &(t, offset) in chunks {
                        for (sink, &index) in sinks.iter_mut().zip(&mine) {
                            let data = &inputs[index][t];
                            let end = (offset + MAX_CHUNK_BYTES).min(data.len());
                            sink.write(t, offset as u64, &data[offset..end])
                                .map_err(|source| BenchError::Refused { index, source })?;
                        }
                    }
                    for (sink, &index) in sinks.into_iter().zip(&mine) {
                        sink.commit(&[0u8; 32])
                            .map_err(|source| BenchError::Refused { index, source })?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| BenchError::Panicked)??;
        }
        Ok(())
    })?;
    let result = agg.finish()?;
    Ok((start.elapsed().as_secs_f64(), result))
}

/// The copy ceiling on `threads` threads: each copies its share of the updates, chunk by chunk,
/// into a model-sized buffer of its own (allocated and touched beforehand). Fastest of
/// [`ROUNDS`], in seconds. With one thread: every update into the same buffer.
fn parallel_copy(inputs: &[Vec<Vec<u8>>], sizes: &[usize], threads: usize) -> f64 {
    let mut buffers: Vec<Vec<Vec<u8>>> = (0..threads)
        .map(|_| sizes.iter().map(|&n| vec![1u8; n * 4]).collect())
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        std::thread::scope(|s| {
            for (k, mine) in buffers.iter_mut().enumerate() {
                s.spawn(move || {
                    for update in inputs.iter().skip(k).step_by(threads) {
                        for (dst, src) in mine.iter_mut().zip(update) {
                            for (d, c) in dst
                                .chunks_mut(MAX_CHUNK_BYTES)
                                .zip(src.chunks(MAX_CHUNK_BYTES))
                            {
                                d.copy_from_slice(c);
                            }
                        }
                    }
                });
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(&buffers);
    }
    best
}

/// `params` split into a few tensors of nearly equal size.
pub(super) fn split(params: usize) -> Vec<usize> {
    let count = TENSORS.min(params);
    (0..count)
        .map(|i| params / count + usize::from(i < params % count))
        .collect()
}

/// `n` f32 values uniform in (−amplitude, amplitude), little-endian (xorshift64: cheap and
/// reproducible; the benchmark needs incompressible numbers, not statistical quality).
pub(super) fn random_f32_bytes(n: usize, amplitude: f32, state: &mut u64) -> Vec<u8> {
    let mut out = vec![0u8; n * 4];
    let (words, _) = out.as_chunks_mut::<4>();
    for w in words {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        // 24 random bits → [0, 1) exactly representable, then to (−a, a).
        let unit = (*state >> 40) as f32 / (1u32 << 24) as f32;
        *w = ((unit * 2.0 - 1.0) * amplitude).to_le_bytes();
    }
    out
}

fn f32_at(bytes: &[u8], i: usize) -> f32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[i * 4..i * 4 + 4]);
    f32::from_le_bytes(b)
}

/// Compares sampled elements of the result with the weighted mean computed in f64.
fn check(mean: &[Vec<f64>], inputs: &[Vec<Vec<u8>>], weights: &[f64], params: usize) -> (f64, f64) {
    let total: f64 = weights.iter().sum();
    let step = (params / CHECKED).max(1);
    let (mut max_err, mut max_mean) = (0f64, 0f64);
    for (t, tensor) in mean.iter().enumerate() {
        for i in (0..tensor.len()).step_by(step) {
            let reference: f64 = inputs
                .iter()
                .zip(weights)
                .map(|(u, w)| f64::from(f32_at(&u[t], i)) * w)
                .sum::<f64>()
                / total;
            max_err = max_err.max((tensor[i] - reference).abs());
            max_mean = max_mean.max(reference.abs());
        }
    }
    (max_err, max_mean)
}

/// Writes every update to one reused temporary file in blocks, as uploads spool what they fold.
fn spool_rate(dir: Option<&std::path::Path>, inputs: &[Vec<Vec<u8>>]) -> std::io::Result<f64> {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = match dir {
        Some(d) => tempfile::tempfile_in(d)?,
        None => tempfile::tempfile()?,
    };
    let write = |file: &mut std::fs::File, update: &[Vec<u8>]| -> std::io::Result<u64> {
        file.seek(SeekFrom::Start(0))?;
        let mut bytes = 0u64;
        for block in update.iter().flat_map(|t| t.chunks(super::BLOCK * 4)) {
            file.write_all(block)?;
            bytes += block.len() as u64;
        }
        Ok(bytes)
    };
    // The aggregator reuses its spool files; give this one its pages before the clock starts.
    if let Some(first) = inputs.first() {
        write(&mut file, first)?;
    }
    let start = Instant::now();
    let mut bytes = 0u64;
    for update in inputs {
        bytes += write(&mut file, update)?;
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Times one bare fold loop over every update, chunk by chunk, into a sum whose pages were
/// touched beforehand (a non-zero fill), so that page faults are not counted.
fn kernel_rate<T: Copy>(
    name: &str,
    bytes_moved_per_param: u32,
    inputs: &[Vec<Vec<u8>>],
    sizes: &[usize],
    weights: &[f64],
    fill: T,
    fold: fn(&mut [T], &[u8], f64),
) -> KernelRate {
    let mut sums: Vec<Vec<T>> = sizes.iter().map(|&n| vec![fill; n]).collect();
    let bytes: u64 = inputs.len() as u64 * sizes.iter().sum::<usize>() as u64 * 4;
    let start = Instant::now();
    for (update, &w) in inputs.iter().zip(weights) {
        for (sum, data) in sums.iter_mut().zip(update) {
            for (s, chunk) in sum
                .chunks_mut(MAX_CHUNK_BYTES / 4)
                .zip(data.chunks(MAX_CHUNK_BYTES))
            {
                fold(s, chunk, w);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(&sums);
    KernelRate {
        accumulator: name.to_string(),
        bytes_moved_per_param,
        gb_per_s: bytes as f64 / seconds / 1e9,
    }
}

fn fold_f32(sum: &mut [f32], chunk: &[u8], w: f64) {
    let w = w as f32;
    let (raw, _) = chunk.as_chunks::<4>();
    for (s, b) in sum.iter_mut().zip(raw) {
        *s += f32::from_le_bytes(*b) * w;
    }
}

fn fold_f64(sum: &mut [f64], chunk: &[u8], w: f64) {
    let (raw, _) = chunk.as_chunks::<4>();
    for (s, b) in sum.iter_mut().zip(raw) {
        *s += f64::from(f32::from_le_bytes(*b)) * w;
    }
}

fn fold_i64(sum: &mut [i64], chunk: &[u8], w: f64) {
    let ws = w * 2f64.powi(20);
    let (raw, _) = chunk.as_chunks::<4>();
    for (s, b) in sum.iter_mut().zip(raw) {
        *s = s.wrapping_add(quantize(f32::from_le_bytes(*b), ws));
    }
}

/// A line of `/proc/self/status` in bytes (its values are in kB).
pub(super) fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_benchmark_runs_and_is_accurate() {
        let r = bench_fedavg(10_001, 3, 2).unwrap();
        assert_eq!(r.update_bytes, 10_001 * 4 * 3);
        assert_eq!(r.tensors, 4);
        assert_eq!(r.accumulator_bytes, 10_001 * 8);
        assert!(r.fold_gb_per_s > 0.0 && r.copy_gb_per_s > 0.0);
        assert!(r.concurrent_gb_per_s > 0.0 && r.parallel_copy_gb_per_s > 0.0);
        assert_eq!(r.concurrent_round_seconds.len(), ROUNDS);
        assert!(r.max_abs_mean > 0.0);
        // f32 output of a mean below 1e-3: within a couple of f32 ulps of 1e-3 plus the
        // fixed-point resolution.
        assert!(r.max_abs_error < 1e-9, "{}", r.max_abs_error);
        assert!(r.to_string().contains("GB/s"));
    }

    #[test]
    fn split_covers_every_parameter() {
        assert_eq!(split(10), vec![3, 3, 2, 2]);
        assert_eq!(split(2), vec![1, 1]);
        assert_eq!(split(9).iter().sum::<usize>(), 9);
    }
}
