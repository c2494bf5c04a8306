//! `tutela-node bench tokenizer`: training time and encoding speed on a corpus (BENCHMARKS.md,
//! beside Python's `tokenizers` from tests/python/tokenizer_reference.py in the same run).

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::train::{TrainOptions, read_sequences, train};
use super::{TextTokenizer, TokenizerError};

/// One measurement: the best of `repeats` for each part.
#[derive(Clone, Debug, Serialize)]
pub struct TokenizerBench {
    pub vocab_size: usize,
    pub sequences: usize,
    pub bytes: u64,
    pub ids: usize,
    /// Training from the files (reading included).
    pub train_seconds: f64,
    /// Every sequence encoded in one parallel batch (`encode_batch`, as Python's
    /// `Tokenizer.encode_batch`).
    pub encode_batch_seconds: f64,
    pub batch_ids_per_second: f64,
    /// The sequences encoded one by one on this thread.
    pub encode_serial_seconds: f64,
    pub serial_ids_per_second: f64,
    /// SHA-256 of the trained tokenizer.json.
    pub sha256: String,
}

pub fn measure(
    inputs: &[PathBuf],
    options: &TrainOptions,
    repeats: usize,
) -> Result<TokenizerBench, TokenizerError> {
    let repeats = repeats.max(1);
    let mut train_seconds = f64::INFINITY;
    let mut trained = None;
    for _ in 0..repeats {
        let started = Instant::now();
        let t = train(inputs, options, &|_| {})?;
        train_seconds = train_seconds.min(started.elapsed().as_secs_f64());
        trained = Some(t);
    }
    let trained = trained.ok_or_else(|| TokenizerError::Options("no repeat ran".into()))?;
    let tokenizer = TextTokenizer::from_bytes(trained.json.as_bytes(), &options.special)?;
    let sequences = read_sequences(inputs, &options.text_field)?;
    let texts: Vec<&str> = sequences.iter().map(String::as_str).collect();

    let (mut batch_seconds, mut serial_seconds, mut ids) = (f64::INFINITY, f64::INFINITY, 0);
    for _ in 0..repeats {
        let started = Instant::now();
        let encoded = tokenizer.encode_many(&texts)?;
        batch_seconds = batch_seconds.min(started.elapsed().as_secs_f64());
        ids = encoded.iter().map(Vec::len).sum();

        let started = Instant::now();
        let mut serial = 0;
        for t in &texts {
            serial += tokenizer.encode(t)?.len();
        }
        serial_seconds = serial_seconds.min(started.elapsed().as_secs_f64());
        if serial != ids {
            return Err(TokenizerError::Options(format!(
                "internal: {serial} ids one by one but {ids} in a batch"
            )));
        }
    }
    Ok(TokenizerBench {
        vocab_size: trained.vocab_size,
        sequences: texts.len(),
        bytes: trained.bytes,
        ids,
        train_seconds,
        encode_batch_seconds: batch_seconds,
        batch_ids_per_second: ids as f64 / batch_seconds,
        encode_serial_seconds: serial_seconds,
        serial_ids_per_second: ids as f64 / serial_seconds,
        sha256: trained.sha256(),
    })
}
