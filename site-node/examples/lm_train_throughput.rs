//! Training throughput (tokens/s) of the `llama` decoder on the CPU, for `bench/lm_train_throughput.py`,
//! which runs the same model in PyTorch eager beside it.
//!
//! ```text
//! . scripts/torch-env.sh
//! cargo run --release -p tutela-site-node --example lm_train_throughput -- \
//!     CONFIG_JSON THREADS BATCH SEQ_LEN WARMUP_STEPS TIMED_STEPS
//! ```
//! Prints one JSON line: tokens per second over the timed steps (AdamW, lr 1e-3, on random
//! token ids), and the first and last loss.

use std::error::Error;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::OptimizerConfig;
use tch::{Device, Tensor};
use tutela_site_node::lm::config::DecoderConfig;
use tutela_site_node::lm::llama::LanguageModel;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, threads, batch, seq, warmup, steps] = args.as_slice() else {
        return Err(
            "usage: lm_train_throughput CONFIG_JSON THREADS BATCH SEQ_LEN WARMUP STEPS".into(),
        );
    };
    let (threads, batch, seq): (i32, i64, i64) = (threads.parse()?, batch.parse()?, seq.parse()?);
    let (warmup, steps): (usize, usize) = (warmup.parse()?, steps.parse()?);
    tch::set_num_threads(threads);
    let config = DecoderConfig::load(config)?;
    let model = LanguageModel::new(&config, Device::Cpu, 0)?;
    let mut opt = tch::nn::AdamW::default().build(&model.vs, 1e-3)?;
    let mut rng = StdRng::seed_from_u64(1);
    let vocab = config.vocab_size as i64;
    let ids: Vec<i64> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let ids = Tensor::from_slice(&ids).view([batch, seq]);
    let mut step = || -> Result<f64, Box<dyn Error>> {
        let loss = model.decoder.loss(&ids, None)?;
        opt.backward_step(&loss);
        Ok(loss.double_value(&[]))
    };
    let mut first_loss = f64::NAN;
    for i in 0..warmup {
        let loss = step()?;
        if i == 0 {
            first_loss = loss;
        }
    }
    let start = Instant::now();
    let mut last_loss = f64::NAN;
    for _ in 0..steps {
        last_loss = step()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let tokens = (batch * seq) as f64 * steps as f64;
    println!(
        "{{\"impl\": \"tutela (tch)\", \"threads\": {}, \"parameters\": {}, \"tokens_per_s\": {:.1}, \
         \"seconds_per_step\": {:.4}, \"first_loss\": {first_loss:.4}, \"last_loss\": {last_loss:.4}}}",
        tch::get_num_threads(),
        model.parameter_count(),
        tokens / seconds,
        seconds / steps as f64
    );
    Ok(())
}
