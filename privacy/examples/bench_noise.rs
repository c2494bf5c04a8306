//! Throughput of the secure discrete Gaussian sampler (and of the reference implementation it
//! replaced, on the same parameters), of its keyed per-element form (what the GPU kernel draws;
//! `noise/keyed.rs`), and of Poisson sampling.
//!
//! `cargo run --release -p tutela-privacy --example bench_noise [N] [THREADS]`
//! (N defaults to 10^7 samples, THREADS to the number of available cores).

use std::num::NonZeroUsize;
use std::time::Instant;

use tutela_privacy::noise::{KeyedGaussian, NoiseError, NoiseKey, SecureGaussian};
use tutela_privacy::sampling::{PoissonSampler, SamplingError};

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("bad argument {0:?}: expected a positive integer")]
    Arg(String),
}

fn arg(i: usize, default: usize) -> Result<usize, BenchError> {
    match std::env::args().nth(i) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| BenchError::Arg(s)),
    }
}

fn main() -> Result<(), BenchError> {
    let n = arg(1, 10_000_000)?;
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let threads = NonZeroUsize::new(arg(2, cores)?).ok_or(BenchError::Arg("0".into()))?;
    let mut buf = vec![0f32; n];

    // (sigma, granularity): sigma/granularity = 1, 2^10, 2^16 grid steps.
    for (sigma, g) in [
        (1.0, 1.0),
        (1.0, 2f64.powi(-10)),
        (1e-3, 2f64.powi(-25)),
        (1.0, 2f64.powi(-16)),
    ] {
        let mut noise = SecureGaussian::new(sigma, g)?;
        let t = Instant::now();
        noise.fill_reference(&mut buf);
        let reference = t.elapsed().as_secs_f64();
        let t = Instant::now();
        noise.fill(&mut buf);
        let one = t.elapsed().as_secs_f64();
        let t = Instant::now();
        noise.fill_parallel(&mut buf, threads);
        let par = t.elapsed().as_secs_f64();
        let keyed = KeyedGaussian::new(sigma, g)?;
        let key = NoiseKey::from_os()?;
        let t = Instant::now();
        keyed.fill(&key, &mut buf);
        let keyed_one = t.elapsed().as_secs_f64();
        let t = Instant::now();
        keyed.fill_parallel(&key, &mut buf, threads);
        let keyed_par = t.elapsed().as_secs_f64();
        println!(
            "keyed (per-element streams, the GPU's layout) sigma={sigma:e} granularity=2^{:.0}: \
             1 thread {:.3e} samples/s, {} threads {:.3e} samples/s",
            g.log2(),
            n as f64 / keyed_one,
            threads,
            n as f64 / keyed_par
        );
        let mean = buf.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = buf
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        println!(
            "discrete Gaussian sigma={sigma:e} granularity=2^{:.0} (scale {:.0} steps): \
             reference 1 thread {:.3e} samples/s ({reference:.2} s), \
             1 thread {:.3e} samples/s ({one:.2} s), {} threads {:.3e} samples/s ({par:.2} s); \
             sample sd {:.4e}",
            g.log2(),
            sigma / g,
            n as f64 / reference,
            n as f64 / one,
            threads,
            n as f64 / par,
            var.sqrt()
        );
    }

    let mut sampler = PoissonSampler::new(1_000_000, 0.001)?;
    let steps = 1000;
    let t = Instant::now();
    let total: usize = (0..steps).map(|_| sampler.next_batch().len()).sum();
    let el = t.elapsed().as_secs_f64();
    println!(
        "Poisson sampling n=10^6 q=1e-3: {steps} batches ({total} indices) in {el:.3} s, \
         {:.3e} batches/s",
        steps as f64 / el
    );
    Ok(())
}
