//! Model watermarks: a keyed spread-spectrum mark embedded in a model's weights by arithmetic
//! alone, and its white-box detection with a p-value.
//!
//! # Why this scheme, and why here
//!
//! The coordinator publishes a job's final model and must watermark it, but it links no libtorch,
//! holds no data and never runs a model. A spread-spectrum mark needs none of that: it is an
//! addition to the weights, computed tensor by tensor from a secret key, so the coordinator
//! embeds it while copying the final model from one file to another, in memory bounded by the
//! largest tensor. The same code (this module, pure Rust) detects it in the CLI.
//!
//! # Embedding (scheme `spread_spectrum_v1`)
//!
//! The consortium holds one 32-byte secret key ([`WatermarkKey`], a file the coordinator's
//! configuration names; never in a job spec or the trail, which carry only its
//! [commitment](WatermarkKey::commitment)). Each published model gets its own *mark key*
//! `HMAC-SHA256(key, "tutela/watermark/v1/mark\0" ‖ mark id)`, the mark id being the job id, so
//! that two models of one consortium carry near-orthogonal patterns and a copy is matched to the
//! entry of the job that made it, not to every job under the key.
//!
//! Every floating tensor with at least [`MIN_MARKED_VALUES`] values and a non-zero spread is
//! marked: `w_i ← w_i + a·σ·p_i`, where `σ` is the tensor's standard deviation, `p_i ∈ {−1, +1}`
//! the `i`-th sign of a ChaCha20 stream seeded by `HMAC(mark key, shape)`, and `a` the relative
//! amplitude (below). The pattern depends on the tensor's *shape* and the element's position,
//! never on its name or on where it sits in the file, so renaming tensors, reordering them or
//! re-serializing (another dtype, another writer) does not move the pattern; tensors of one
//! shape share it, and detection adds them up before correlating (below).
//!
//! # Detection and its p-value
//!
//! For each shape, `c_i = Σ_t (w_ti − μ_t)/σ_t` over the file's tensors `t` of that shape (each
//! standardized by its own mean and spread), and over all shapes `S = Σ_i p_i c_i`,
//! `V = Σ_i c_i²`, `z = S/√V`. Under the null hypothesis (the weights were not made with this
//! mark key: an independently trained model, the same aggregate unmarked, another job's model)
//! the weights, hence every `c_i`, are independent of the key, so given the weights the `p_i` are
//! independent fair signs and `S` is a Rademacher sum with fixed coefficients. Hoeffding's
//! inequality for such a sum (Hoeffding 1963, Thm 2, each term in `[−|c_i|, |c_i|]`) gives,
//! exactly and for every `n`, `P(S ≥ s) ≤ exp(−s² / (2 Σ c_i²))`: the p-value reported is
//! `exp(−z²/2)` (1 for `z ≤ 0`). It assumes nothing about the weights' distribution (it is
//! conditional on them) and is conservative, unlike a normal approximation, whose tail at
//! `1e−9` is not justified for heavy-tailed weights. With `M` registry entries tried, the
//! verifier multiplies by `M` (Bonferroni).
//!
//! A marked model has `S ≈ a·N + (host noise ≈ ±√N)` and `V ≈ N(1 + a²)` for `N` marked values,
//! so `z ≈ a√N`. [`Strength`] therefore asks for a *target z*: the embedder chooses
//! `a = target_z / √N`, capped at `max_amplitude`. A large model reaches the target with an
//! amplitude far below its weights' own spread (a 10M-parameter model needs `a ≈ 0.004` for
//! the default `z = 12`, [`DEFAULT_STRENGTH`]); the breast-cancer MLP (about 1.5K marked
//! values) needs the cap. Attacks lower `z`: pruning removes a fraction of the signal,
//! quantization and added noise raise `V`, fine-tuning both; detection holds while `z ≥ 6.44`
//! (`p < 1e−9`).
//!
//! # Informed detection
//!
//! The consortium keeps the unmarked aggregate each mark was added to (the registry entry's
//! `source_digest`). A verifier holding it tests the *difference* suspect − reference
//! ([`Reference`], [`detect_file_marks_against`]): the host weights cancel, and a clean copy
//! shows the pattern alone, `z = S/√V` with no host term (`√N` for one tensor per shape; tensors
//! of one shape share the pattern and add up, so a shape shared by `n` tensors counts `n`-fold
//! in `V`: 41.5 rather than 90.5 for the demo's 8,192 adapter values), whatever the amplitude.
//! After an attack the difference is the mark plus the attack's change, so `z` falls only as
//! the change grows past the mark. The p-value is unchanged: under the null the suspect and the
//! reference (made before any mark) are both independent of the key, hence so is their
//! difference. This is what lets a small adapter carry a mark faint enough to cost under 1%
//! perplexity ([`LORA_DEFAULT_STRENGTH`]).
//!
//! # What it does not do
//!
//! There is no black-box (prediction-only) detection: that needs a keyed trigger set whose
//! labels the model has *learned*, i.e. training on the triggers, which the coordinator cannot
//! do (no libtorch, no data) and which the sites' DP-SGD training would have to take on as an
//! extra, non-private objective. A weight perturbation of this size leaves predictions
//! essentially unchanged, which is its point; it gives a prediction-only observer nothing to
//! test. The plain test needs the weights in the tensor layout they were published in; two
//! exceptions are built for it: a LoRA job's adapter merged into its base, whose `B` is
//! recovered against the job's base and seed, its modules found by name or, renamed, by content
//! ([`detect_merged_marks`], module `merged`); and a copy whose hidden units were permuted or
//! whose matrices were written transposed, laid back onto the registry's model before the
//! informed test ([`detect_aligned_marks`], module `align`).

use std::path::Path;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

mod align;
mod detect;
mod embed;
mod merged;

pub use align::{
    AlignmentReport, MAX_UNITS, NamedTensor, align_to_reference, detect_aligned_marks,
    detect_aligned_tensors, read_tensors,
};
pub use detect::{
    Detection, Reference, Verdict, detect_file, detect_file_marks, detect_file_marks_against,
    detect_tensors, detect_tensors_marks, verdict,
};
pub use embed::{EmbedReport, embed_stream, embed_tensor, plan_amplitude, unmark_tensor};
pub use merged::{
    MergedRecovery, RecoveredAdapter, detect_merged_marks, job_base_weights, recover_adapters,
    recover_b,
};

/// The scheme's name, as the job spec and the trail write it.
pub const SCHEME: &str = "spread_spectrum_v1";

/// Tensors with fewer values are left alone (biases of small layers, scalars): they carry little
/// signal, and their spread is a poor scale.
pub const MIN_MARKED_VALUES: usize = 256;

const KEY_COMMITMENT_DOMAIN: &[u8] = b"tutela/watermark/v1/key-commitment\0";
const MARK_DOMAIN: &[u8] = b"tutela/watermark/v1/mark\0";
const PATTERN_DOMAIN: &[u8] = b"tutela/watermark/v1/pattern\0";

/// Why a watermark could not be embedded or detected. Paths are the operator's own files.
#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    #[error("watermark key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    #[error("{0}")]
    Sink(#[from] crate::stream::SinkError),
    #[error("tensor {name:?}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("base checkpoint {dir}: {reason}")]
    Base { dir: String, reason: String },
}

/// The consortium's secret watermark key: 32 bytes, written as 64 hex digits in its file. Its
/// `Debug` does not show it.
#[derive(Clone)]
pub struct WatermarkKey([u8; 32]);

impl std::fmt::Debug for WatermarkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WatermarkKey(commitment {})", self.commitment())
    }
}

impl WatermarkKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        WatermarkKey(bytes)
    }

    /// A fresh key from the operating system's generator.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut b)?;
        Ok(WatermarkKey(b))
    }

    /// Parses the key file's text: 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let mut b = [0u8; 32];
        hex::decode_to_slice(text, &mut b).map_err(|_| {
            format!(
                "must hold the key as 64 hex digits (32 bytes), found {} characters that are not",
                text.len()
            )
        })?;
        Ok(WatermarkKey(b))
    }

    /// Reads a key file (its contents never appear in an error).
    pub fn read_file(path: &Path) -> Result<Self, WatermarkError> {
        let err = |reason: String| WatermarkError::Key {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_hex(&text).map_err(err)
    }

    /// The key as the file holds it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// `SHA-256(domain ‖ key)`, hex: what the trail records, so that a verifier shows which key
    /// an entry was made with without anyone learning the key.
    pub fn commitment(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(KEY_COMMITMENT_DOMAIN);
        ctx.update(&self.0);
        hex::encode(ctx.finish())
    }

    /// The mark key of one published model (module documentation).
    pub fn mark(&self, mark_id: &str) -> MarkKey {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(MARK_DOMAIN);
        ctx.update(mark_id.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        MarkKey(out)
    }
}

/// The key one model's pattern is drawn from.
#[derive(Clone)]
pub struct MarkKey([u8; 32]);

impl MarkKey {
    /// The ±1 pattern of a tensor of shape `shape`.
    pub fn pattern(&self, shape: &[usize]) -> Pattern {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(PATTERN_DOMAIN);
        ctx.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            ctx.update(&(d as u64).to_le_bytes());
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(ctx.sign().as_ref());
        Pattern {
            rng: ChaCha20Rng::from_seed(seed),
            word: 0,
            left: 0,
        }
    }
}

/// A stream of signs, one bit of ChaCha20 output each.
pub struct Pattern {
    rng: ChaCha20Rng,
    word: u64,
    left: u32,
}

impl Pattern {
    /// The next sign, as `+1.0` or `−1.0`.
    #[inline]
    pub fn next_sign(&mut self) -> f32 {
        if self.left == 0 {
            self.word = self.rng.next_u64();
            self.left = 64;
        }
        let bit = self.word & 1;
        self.word >>= 1;
        self.left -= 1;
        if bit == 1 { 1.0 } else { -1.0 }
    }
}

/// How strongly to mark (module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Strength {
    /// The detection z-score the clean marked model should reach.
    pub target_z: f64,
    /// The largest amplitude, relative to each tensor's standard deviation.
    pub max_amplitude: f64,
}

/// What a job's `[watermark]` asks for when it sets nothing (`protocol::job::WatermarkSpec`).
///
/// `target_z = 12` is the least z that keeps `p < 1e-9` (z ≥ 6.44) after the attacks measured
/// on the demo's models, with room for the host weights' own correlation with the pattern
/// (a standard normal: 3 of it): the worst attack kept 80% of z (Gaussian noise at a 2-point
/// accuracy drop on the MLP), so `(6.44 + 3) / 0.8 ≈ 12`. The cost grows as `z² / N`, so the
/// least sufficient z is the cheapest one, and the amplitude it needs, `12 / √N`, follows the
/// model: 0.25 σ (the cap) for the MLP's 1.5K values, 0.05 σ for the CNN's 52K, 0.13 σ of the
/// adapters for a LoRA job's 8K B values, 0.004 σ for 10M parameters (docs/architecture.md,
/// "Watermarks", for the measured costs).
pub const DEFAULT_STRENGTH: Strength = Strength {
    target_z: 12.0,
    max_amplitude: 0.25,
};

/// The default for a LoRA job, which publishes its adapters' `B`: the same z, the amplitude
/// capped at 0.05 of each `B`'s spread. A few thousand values of `B` carry the whole fine-tune
/// (on the demo's shape it halves the perplexity), so a relative change of them costs far more
/// than the same relative change of a full model: measured on the demo's `llama` shape with
/// 8,192 values of `B`, 0.13 σ (z = 12 blind) cost +2.7 to +2.9% perplexity, 0.05 σ costs
/// +0.36 to +0.47% (the cost goes as the amplitude squared). Below `(12 / 0.05)² = 57,600` values the cap binds and the blind z is under 12
/// (4.5 for 8,192 values); such an adapter is verified *informed*, against the job's unmarked
/// adapter ([`Reference`]), where a clean copy shows `z = √N` whatever the amplitude. From
/// 57,600 values (e.g. rank 8 on q and v of a 7B model: 2M) the blind z is 12 again.
pub const LORA_DEFAULT_STRENGTH: Strength = Strength {
    target_z: 12.0,
    max_amplitude: 0.05,
};

/// [`DEFAULT_STRENGTH`], or [`LORA_DEFAULT_STRENGTH`] for a job that publishes adapters.
pub fn default_strength(adapters: bool) -> Strength {
    if adapters {
        LORA_DEFAULT_STRENGTH
    } else {
        DEFAULT_STRENGTH
    }
}

/// Whether a tensor of this shape is marked (and counted by detection), given that it is a
/// floating tensor.
pub fn marks_shape(shape: &[usize]) -> bool {
    shape.iter().product::<usize>() >= MIN_MARKED_VALUES
}

/// A p-value given by its `log10`, rounded for people and never understated: `= 0.42` down to
/// 0.001, below that `< 1e-N` with `N` rounded down (a p-value of `3e-46` reads `< 1e-45`).
pub fn human_p_value(log10_p: f64) -> String {
    if !log10_p.is_finite() || log10_p >= 0.0 {
        return "= 1".into();
    }
    if log10_p >= -3.0 {
        return format!("= {:.3}", 10f64.powf(log10_p));
    }
    format!("< 1e{}", log10_p.ceil() as i64)
}

/// Mean and standard deviation (population), in f64.
pub(crate) fn mean_std(values: &[f32]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests;
