//! Using a decoder on token ids: generation (greedy or top-p, with a KV cache) and perplexity
//! over a long token sequence.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use super::error::LmError;
use super::llama::Decoder;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among ties).
    Greedy,
    /// Nucleus sampling: among the most likely tokens whose probabilities (at `temperature`)
    /// first reach `top_p` together, draw one from a generator seeded with `seed`.
    TopP {
        top_p: f64,
        temperature: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after this token.
    pub eos_token_id: Option<i64>,
    /// Keep keys and values between steps (the normal way); without it every step recomputes
    /// the whole sequence, which only tests want.
    pub use_kv_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            sampling: Sampling::Greedy,
            eos_token_id: None,
            use_kv_cache: true,
        }
    }
}

fn ids_tensor(ids: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(ids).to_device(device).unsqueeze(0)
}

/// Picks the next token from one position's logits `[vocab]`.
fn choose(logits: &Tensor, sampling: Sampling, rng: &mut Option<StdRng>) -> Result<i64, LmError> {
    match sampling {
        Sampling::Greedy => Ok(logits.argmax(-1, false).int64_value(&[])),
        Sampling::TopP {
            top_p, temperature, ..
        } => {
            let probs = (logits.to_kind(Kind::Double) / temperature)
                .softmax(-1, Kind::Double)
                .to_device(Device::Cpu);
            let probs: Vec<f64> = Vec::<f64>::try_from(&probs)
                .map_err(LmError::torch("reading the next-token distribution"))?;
            let mut order: Vec<usize> = (0..probs.len()).collect();
            // Most likely first; ties by id, so the order is deterministic.
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let mut kept = Vec::new();
            let mut mass = 0.0;
            for &id in &order {
                kept.push(id);
                mass += probs[id];
                if mass >= top_p {
                    break;
                }
            }
            let rng = rng.as_mut().ok_or_else(|| {
                LmError::InvalidInput("top-p sampling without a generator".into())
            })?;
            let mut draw = rng.random::<f64>() * mass;
            for &id in &kept {
                draw -= probs[id];
                if draw < 0.0 {
                    return Ok(id as i64);
                }
            }
            Ok(kept.last().copied().unwrap_or(0) as i64)
        }
    }
}

/// Continues `prompt` by up to `max_new_tokens` tokens; returns the new tokens only.
pub fn generate(
    model: &Decoder,
    prompt: &[i64],
    device: Device,
    options: &GenerateOptions,
) -> Result<Vec<i64>, LmError> {
    if prompt.is_empty() {
        return Err(LmError::InvalidInput("the prompt has no tokens".into()));
    }
    let limit = model.config().max_position_embeddings;
    if prompt.len() + options.max_new_tokens > limit {
        return Err(LmError::InvalidInput(format!(
            "prompt ({} tokens) plus max_new_tokens ({}) exceeds max_position_embeddings ({limit})",
            prompt.len(),
            options.max_new_tokens
        )));
    }
    let mut rng = match options.sampling {
        Sampling::Greedy => None,
        Sampling::TopP {
            top_p,
            temperature,
            seed,
        } => {
            if !(top_p > 0.0 && top_p <= 1.0) || !(temperature > 0.0 && temperature.is_finite()) {
                return Err(LmError::InvalidInput(format!(
                    "top_p must lie in (0, 1] and temperature be positive, found top_p {top_p}, \
                     temperature {temperature}"
                )));
            }
            Some(StdRng::seed_from_u64(seed))
        }
    };
    tch::no_grad(|| {
        let mut sequence = prompt.to_vec();
        let mut new_tokens = Vec::with_capacity(options.max_new_tokens);
        let mut cache = options.use_kv_cache.then(|| model.new_cache());
        let mut pending: Vec<i64> = prompt.to_vec();
        for _ in 0..options.max_new_tokens {
            let input = if cache.is_some() { &pending } else { &sequence };
            let output = model.forward(&ids_tensor(input, device), None, cache.as_mut())?;
            let last = output.logits.get(0).get(-1);
            let next = choose(&last, options.sampling, &mut rng)?;
            sequence.push(next);
            new_tokens.push(next);
            pending = vec![next];
            if options.eos_token_id == Some(next) {
                break;
            }
        }
        Ok(new_tokens)
    })
}

/// A perplexity evaluation's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Tokens whose probability was scored.
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
}

/// Perplexity of `ids` under the model, in windows of at most `window` tokens advancing by
/// `stride` (`stride == window`: disjoint chunks; smaller: sliding windows, each token scored
/// once, with up to `window - stride` tokens of context carried over). Token `i` is scored in
/// the first window that holds it and a token before it, so with chunks the first token of
/// each chunk goes unscored, as with transformers' recipe.
pub fn perplexity(
    model: &Decoder,
    ids: &[i64],
    window: usize,
    stride: usize,
    device: Device,
) -> Result<Perplexity, LmError> {
    perplexity_with_progress(model, ids, window, stride, device, &mut |_, _| {})
}

/// [`perplexity`], calling `progress(scored, to_score)` after each window (tokens scored so
/// far, of `ids.len() - 1`): a long text takes minutes on a CPU.
pub fn perplexity_with_progress(
    model: &Decoder,
    ids: &[i64],
    window: usize,
    stride: usize,
    device: Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity, LmError> {
    if window < 2 || stride == 0 || stride > window {
        return Err(LmError::InvalidInput(format!(
            "need window >= 2 and 1 <= stride <= window, found window {window}, stride {stride}"
        )));
    }
    if ids.len() < 2 {
        return Err(LmError::InvalidInput(format!(
            "perplexity needs at least 2 tokens, found {}",
            ids.len()
        )));
    }
    tch::no_grad(|| {
        let mut total_nll = 0.0;
        let mut scored = 0usize;
        // Tokens before `scored_until` have been scored already.
        let mut scored_until = 1usize;
        let mut begin = 0usize;
        loop {
            let end = (begin + window).min(ids.len());
            let first_target = scored_until.max(begin + 1);
            if first_target < end {
                let output = model.forward(&ids_tensor(&ids[begin..end], device), None, None)?;
                let log_probs = output
                    .logits
                    .get(0)
                    .to_kind(Kind::Double)
                    .log_softmax(-1, Kind::Double);
                // Position p predicts token p + 1.
                let from = (first_target - 1 - begin) as i64;
                let count = (end - first_target) as i64;
                let predictions = log_probs.narrow(0, from, count);
                let targets = Tensor::from_slice(&ids[first_target..end])
                    .to_device(device)
                    .unsqueeze(-1);
                let nll = -predictions.gather(-1, &targets, false).sum(Kind::Double);
                total_nll += nll.double_value(&[]);
                scored += count as usize;
                scored_until = end;
                progress(scored, ids.len() - 1);
            }
            if end == ids.len() {
                break;
            }
            begin += stride;
        }
        let mean_nll = total_nll / scored as f64;
        Ok(Perplexity {
            tokens: scored,
            mean_nll,
            perplexity: mean_nll.exp(),
        })
    })
}
