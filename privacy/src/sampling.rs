//! Poisson subsampling for DP-SGD: every record of a dataset of `n` is in a step's batch
//! independently with probability `q`, so batch sizes vary (Binomial(n, q)).
//!
//! **The privacy accountant ([`crate::accountant`]) assumes exactly this sampling**: its
//! amplification-by-subsampling bounds are for the Poisson-subsampled Gaussian mechanism
//! (Abadi et al., CCS 2016; Mironov, Talwar & Zhang, 2019). Shuffling and cutting fixed-size
//! batches gives a different — and in general weaker — guarantee, so this crate offers no
//! shuffled batcher at all: [`PoissonBatches`] is the only batch type it produces, and the DP-SGD
//! step should take a `PoissonBatches`, not an arbitrary iterator of index lists.
//!
//! Two samplers draw the same distribution:
//! * [`PoissonSampler::next_batch`] skips geometrically: the gap before the next included record
//!   is `G ~ Geometric(q)` on `{0, 1, …}`, `P(G = k) = (1 − q)^k · q`, so a step costs
//!   `O(q·n + 1)` draws instead of `n`.
//! * [`PoissonSampler::next_batch_bernoulli`] is the reference: `n` exact Bernoulli(q) coins.
//!
//! # Exactness of the geometric gap
//!
//! `G = ⌊ln U / ln(1 − q)⌋` with `U` uniform on `(0, 1]` (inverse transform: P(G ≥ k) =
//! P(U ≤ (1 − q)^k) = (1 − q)^k). Care taken, and what remains:
//! * `U = (j + 1)·2^-53`, `j` uniform in `{0, …, 2^53 − 1}` ([`SecureRng::open_closed_unit`]):
//!   never 0, so `ln U` is finite; 53 bits, not 24 or 32.
//! * `ln(1 − q)` is computed as `ln_1p(−q)`, accurate for small `q` (`1 − q` would lose the low
//!   bits of `q` before the logarithm).
//! * What remains is the discreteness of `U` and the rounding of `ln` and the division: each
//!   `P(G ≥ k)` is off by at most about `2^-50` absolutely, and the largest gap drawn is
//!   `≈ 36.7 / q` (the tail beyond has mass `≈ 2^-53`). So the per-record inclusion
//!   probability is `q` up to an error of order `2^-50`, far below any slack the accountant
//!   keeps; when that is not acceptable, [`PoissonSampler::next_batch_bernoulli`] is exact
//!   (`q` is taken as the dyadic rational the `f64` denotes, compared against 64 uniform bits
//!   extended as needed).
//!
//! Batch membership is never released (only the noised sum is), so these floating-point
//! operations carry none of the least-significant-bit risk of a float noise sampler.

use crate::noise::{NoiseError, SecureRng};

/// What is wrong with a sampling request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("sampling probability q must be a number in [0, 1], got {0}")]
    InvalidProbability(f64),
    #[error(transparent)]
    Rng(#[from] NoiseError),
}

/// Draws Poisson-subsampled batches of record indices `0..n`.
#[derive(Debug)]
pub struct PoissonSampler {
    n: usize,
    q: f64,
    /// ln(1 − q), for the geometric skip; −∞ when q = 1, 0 when q = 0.
    ln_1m_q: f64,
    /// q as the exact dyadic rational `q_num / 2^q_shift` (the f64's own value), for the
    /// exact Bernoulli reference.
    q_num: u64,
    q_shift: u32,
    rng: SecureRng,
}

impl PoissonSampler {
    /// A sampler over `n` records with inclusion probability `q`, keyed from the OS.
    pub fn new(n: usize, q: f64) -> Result<Self, SamplingError> {
        check_q(q)?;
        Self::with_rng(n, q, SecureRng::from_os()?)
    }

    /// As [`PoissonSampler::new`] with a caller-supplied generator (tests:
    /// [`SecureRng::insecure_from_seed`]).
    pub fn with_rng(n: usize, q: f64, rng: SecureRng) -> Result<Self, SamplingError> {
        check_q(q)?;
        let (q_num, q_shift) = dyadic(q);
        Ok(Self {
            n,
            q,
            ln_1m_q: (-q).ln_1p(),
            q_num,
            q_shift,
            rng,
        })
    }

    /// The dataset size.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the dataset is empty (every batch is then empty).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The inclusion probability.
    pub fn q(&self) -> f64 {
        self.q
    }

    /// The batches of `steps` consecutive DP-SGD steps.
    pub fn batches(self, steps: usize) -> PoissonBatches {
        PoissonBatches {
            sampler: self,
            remaining: steps,
        }
    }

    /// One step's batch, by geometric skipping; indices ascending.
    pub fn next_batch(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        self.next_batch_into(&mut out);
        out
    }

    /// As [`PoissonSampler::next_batch`], reusing `out`'s allocation (cleared first).
    pub fn next_batch_into(&mut self, out: &mut Vec<usize>) {
        out.clear();
        if self.q <= 0.0 || self.n == 0 {
            return;
        }
        if self.q >= 1.0 {
            out.extend(0..self.n);
            return;
        }
        let mut i: usize = 0;
        loop {
            let u = self.rng.open_closed_unit();
            // G = ⌊ln U / ln(1 − q)⌋ ≥ 0; both logs ≤ 0. `as usize` saturates (and maps NaN,
            // impossible here, to 0); a gap past the end simply ends the batch.
            let gap = (u.ln() / self.ln_1m_q).floor();
            let gap = if gap >= self.n as f64 {
                self.n
            } else {
                gap as usize
            };
            i = match i.checked_add(gap) {
                Some(j) if j < self.n => j,
                _ => return,
            };
            out.push(i);
            i += 1;
        }
    }

    /// The exact reference: one Bernoulli(q) coin per record, `q` taken as the exact value of
    /// the `f64` (a dyadic rational). O(n); used by tests to check [`Self::next_batch`].
    pub fn next_batch_bernoulli(&mut self) -> Vec<usize> {
        (0..self.n).filter(|_| self.coin()).collect()
    }

    /// Bernoulli(q_num / 2^q_shift), exact: draw a uniform `q_shift`-bit integer `U`, 64 bits
    /// at a time from the most significant end, and return `U < q_num`; a further word is drawn
    /// only while the prefixes tie (probability 2^-64 per word).
    fn coin(&mut self) -> bool {
        if self.q_num == 0 {
            return false;
        }
        if self.q_shift == 0 {
            return true;
        }
        let mut shift = self.q_shift;
        let mut num = self.q_num;
        loop {
            if shift <= 64 {
                let r = self.rng.next_u64() >> (64 - shift);
                return r < num;
            }
            let rest = shift - 64;
            let top = if rest >= 64 { 0 } else { num >> rest };
            let r = self.rng.next_u64();
            if r != top {
                return r < top;
            }
            if rest < 64 {
                num &= (1u64 << rest) - 1;
            }
            shift = rest;
        }
    }
}

/// The batches of a fixed number of DP-SGD steps under Poisson sampling: the only batch
/// iterator this crate provides, and the one the accountant's guarantee is stated for.
#[derive(Debug)]
pub struct PoissonBatches {
    sampler: PoissonSampler,
    remaining: usize,
}

impl PoissonBatches {
    /// The sampler's inclusion probability, as the accountant should be told.
    pub fn q(&self) -> f64 {
        self.sampler.q
    }

    /// The dataset size.
    pub fn dataset_len(&self) -> usize {
        self.sampler.n
    }
}

impl Iterator for PoissonBatches {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        Some(self.sampler.next_batch())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for PoissonBatches {}

fn check_q(q: f64) -> Result<(), SamplingError> {
    if (0.0..=1.0).contains(&q) {
        Ok(())
    } else {
        Err(SamplingError::InvalidProbability(q))
    }
}

/// `q ∈ [0, 1]` as `num / 2^shift` exactly (num < 2^53).
fn dyadic(q: f64) -> (u64, u32) {
    if q == 0.0 {
        return (0, 0);
    }
    if q >= 1.0 {
        return (1, 0);
    }
    let bits = q.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1u64 << 52) - 1);
    let (mut m, mut e) = if biased == 0 {
        (frac, -1074i64)
    } else {
        (frac | (1u64 << 52), biased - 1075)
    };
    // q = m · 2^e, e < 0; strip trailing zeros to keep the shift small.
    while m & 1 == 0 && e < 0 {
        m >>= 1;
        e += 1;
    }
    (m, (-e) as u32)
}
