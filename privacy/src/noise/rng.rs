//! The one random-number generator behind Tutela's DP noise and Poisson sampling: ChaCha20
//! (RFC 8439's block function, 20 rounds, via `rand_chacha`) keyed with 32 bytes from the
//! operating system (`ring::rand::SystemRandom`, i.e. `getrandom(2)` on Linux).
//!
//! Why not torch's generator (or any Mersenne Twister / Philox stream a training framework
//! exposes): its state is small and recoverable from outputs, and it is seeded by user code
//! (`torch.manual_seed`), so an adversary who sees noised updates could predict — and subtract —
//! the noise. ChaCha20 is a stream cipher: its output is computationally indistinguishable from
//! uniform without the key, and the key never leaves this process.
//!
//! Seeded constructors exist only so that tests are reproducible; they are named `insecure_*`,
//! hidden from the docs, and must never be used for a release of data.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use ring::rand::{SecureRandom, SystemRandom};

use super::NoiseError;

/// A ChaCha20 keystream used as a cryptographically secure generator.
///
/// Construct with [`SecureRng::from_os`]. Every draw the samplers make goes through
/// [`SecureRng::next_u64`], [`SecureRng::below`] or the crate's fair-bit and 32-bit-word
/// methods, which are exact (no modulo bias; each keystream bit is used at most once).
pub struct SecureRng {
    inner: ChaCha20Rng,
    /// Keystream bits taken from `inner` and not yet handed out as fair bits, lowest first:
    /// one 64-bit word serves 64 fair coins instead of one.
    reservoir: u64,
    /// How many of `reservoir`'s low bits are still unused.
    reservoir_bits: u32,
}

/// The randomness the exact samplers consume: independent fair bits and uniform 32-bit words.
/// [`SecureRng`] provides it from ChaCha20; the unit tests drive the samplers with chosen bit
/// strings through it, to check their decisions exhaustively.
pub(crate) trait RandomBits {
    /// One fair bit.
    fn bit(&mut self) -> bool;
    /// 32 uniform bits.
    fn word32(&mut self) -> u32;

    /// A uniform draw from `{0, …, m − 1}`, `1 ≤ m ≤ 2^32`, exact: Lemire's multiply-and-reject
    /// on 32-bit words. `x·m < 2^32 · 2^32 = 2^64`, so the product fits a `u64`; the rejected
    /// low halves `< 2^32 mod m` make every result equally likely (Lemire, ACM TOMS 2019).
    #[inline]
    fn below_u32(&mut self, m: u64) -> u64 {
        debug_assert!((1..=1u64 << 32).contains(&m));
        let mut prod = u64::from(self.word32()) * m;
        let mut low = prod & 0xffff_ffff;
        if low < m {
            // 2^32 mod m.
            let threshold = (1u64 << 32) % m;
            while low < threshold {
                prod = u64::from(self.word32()) * m;
                low = prod & 0xffff_ffff;
            }
        }
        prod >> 32
    }
}

impl RandomBits for SecureRng {
    #[inline]
    fn bit(&mut self) -> bool {
        if self.reservoir_bits == 0 {
            self.reservoir = self.inner.next_u64();
            self.reservoir_bits = 64;
        }
        let bit = self.reservoir & 1 == 1;
        self.reservoir >>= 1;
        self.reservoir_bits -= 1;
        bit
    }

    #[inline]
    fn word32(&mut self) -> u32 {
        self.inner.next_u32()
    }
}

impl std::fmt::Debug for SecureRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key or the position in the stream.
        f.write_str("SecureRng(ChaCha20, key hidden)")
    }
}

impl SecureRng {
    /// A generator keyed with 32 fresh bytes from the operating system's CSPRNG.
    pub fn from_os() -> Result<Self, NoiseError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| NoiseError::OsRandomUnavailable)?;
        let inner = ChaCha20Rng::from_seed(seed);
        // Do not leave the key on the stack longer than needed.
        seed.fill(0);
        Ok(Self::from_chacha(inner))
    }

    /// A generator keyed with `seed`. **Tests only**: noise from a known seed gives no privacy.
    #[doc(hidden)]
    pub fn insecure_from_seed(seed: [u8; 32]) -> Self {
        Self::from_chacha(ChaCha20Rng::from_seed(seed))
    }

    /// The raw ChaCha20 keystream for `key`, with `rand_chacha`'s 64-bit block counter set to
    /// `block` and its 64-bit stream id to `stream`. **Tests only**: used to check, against
    /// RFC 8439 §2.3.2, that this wrapper really is ChaCha20.
    ///
    /// `rand_chacha` lays the state out as the original (Bernstein) variant: words 12–13 are a
    /// 64-bit block counter, words 14–15 the stream id. RFC 8439's 32-bit counter and 96-bit
    /// nonce `n0 n1 n2` map to `block = counter | n0 << 32` and `stream = n1 | n2 << 32`.
    #[doc(hidden)]
    pub fn insecure_chacha20_keystream(key: [u8; 32], stream: u64, block: u64) -> Self {
        let mut inner = ChaCha20Rng::from_seed(key);
        inner.set_stream(stream);
        inner.set_word_pos(u128::from(block) * 16);
        Self::from_chacha(inner)
    }

    /// The ChaCha20 keystream of `key` on stream `stream` from block 0: one chunk of a keyed
    /// release (`noise/keyed.rs`). The caller owns the key (drawn from the OS per release).
    pub(crate) fn keyed_stream(key: &[u8; 32], stream: u64) -> Self {
        let mut inner = ChaCha20Rng::from_seed(*key);
        inner.set_stream(stream);
        Self::from_chacha(inner)
    }

    /// A generator for an independent sub-stream: same key, a different ChaCha20 stream id.
    /// Used to hand each worker thread its own stream without reseeding from the OS.
    pub(crate) fn fork_stream(&self, stream: u64) -> Self {
        let mut inner = self.inner.clone();
        inner.set_stream(stream);
        inner.set_word_pos(0);
        Self::from_chacha(inner)
    }

    fn from_chacha(inner: ChaCha20Rng) -> Self {
        Self {
            inner,
            reservoir: 0,
            reservoir_bits: 0,
        }
    }

    /// Fills `dest` with keystream bytes.
    pub fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.inner.fill_bytes(dest);
    }

    /// 64 uniform bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// A uniform draw from `{0, …, m − 1}` (`m ≥ 1`), exact: Lemire's multiply-and-reject
    /// ("Fast random integer generation in an interval", ACM TOMS 2019) for `m ≤ 2^64`,
    /// masked rejection for larger `m`. Returns 0 for `m ≤ 1`.
    #[inline]
    pub fn below(&mut self, m: u128) -> u128 {
        if m <= 1 {
            return 0;
        }
        if let Ok(m64) = u64::try_from(m) {
            return u128::from(self.below_u64(m64));
        }
        // m > 2^64: draw ⌈log2 m⌉ bits and reject values ≥ m (expected < 2 tries).
        let bits = 128 - (m - 1).leading_zeros();
        let mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        loop {
            let x = ((u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())) & mask;
            if x < m {
                return x;
            }
        }
    }

    /// Lemire's nearly divisionless exact uniform draw from `{0, …, m − 1}`, `m ≥ 1`.
    #[inline]
    fn below_u64(&mut self, m: u64) -> u64 {
        let mut prod = u128::from(self.next_u64()) * u128::from(m);
        let mut low = prod as u64;
        if low < m {
            // 2^64 mod m, computed without overflow.
            let threshold = m.wrapping_neg() % m;
            while low < threshold {
                prod = u128::from(self.next_u64()) * u128::from(m);
                low = prod as u64;
            }
        }
        (prod >> 64) as u64
    }

    /// Exact Bernoulli(num / den), `0 ≤ num ≤ den`, `den ≥ 1`.
    #[inline]
    pub fn bernoulli_ratio(&mut self, num: u128, den: u128) -> bool {
        num >= den || (num > 0 && self.below(den) < num)
    }

    /// A uniform `f64` in `(0, 1]` on the grid `2^-53`: `(k + 1) · 2^-53`, `k` uniform in
    /// `{0, …, 2^53 − 1}`. Never 0, so `ln` of it is finite.
    #[inline]
    pub fn open_closed_unit(&mut self) -> f64 {
        let k = self.next_u64() >> 11;
        (k + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}
