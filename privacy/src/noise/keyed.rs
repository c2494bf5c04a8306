//! Keyed, per-element-addressable noise: the exact discrete Gaussian of [`super::SecureGaussian`]
//! laid out so that any element of a release can be drawn on its own, by any processor, from
//! the release's key alone. This is the form the GPU draws (`discrete_gaussian.cu`); the CPU
//! form here is its reference, bit for bit.
//!
//! # Layout
//!
//! A release of `n` values has one [`NoiseKey`] (32 bytes from the operating system, never
//! reused). Element `i` belongs to chunk `c = i / KEYED_CHUNK`; chunk `c` is drawn from the
//! ChaCha20 keystream with that key, stream id `c` and block counter from 0 (the generator of
//! [`super::SecureRng`], with a fresh bit reservoir), its elements in order, each by the same
//! sampler as [`super::SecureGaussian::fill`] (`discrete.rs`). So element `i` is a pure
//! function of `(key, i)`: it does not depend on `n`, on how the release is split over threads
//! or GPU threads, or on any other release.
//!
//! # Why it is the same distribution, and as private
//!
//! Within a chunk the values are successive draws of the exact sampler from one ChaCha20 stream,
//! exactly as `SecureGaussian::fill` draws them: i.i.d. discrete Gaussians, given a uniform
//! keystream. Chunks use distinct stream ids of one key, i.e. disjoint parts of the keystream
//! (ChaCha20's 64-bit stream ids and 64-bit block counter: the keystream of `(key, stream,
//! block)` never repeats for distinct `(stream, block)`), so chunks are independent too. The
//! key is drawn fresh per release, so releases are independent. Each chunk wastes the unused
//! rest of its last keystream block; that costs time, not privacy.
//!
//! # Chunk size
//!
//! [`KEYED_CHUNK`] = 256 values: enough that a chunk's keystream start-up (and, on the CPU,
//! `rand_chacha`'s four-block buffer left over at its end) is a few per cent of its work, and
//! small enough that a 10^6-value tensor is 4096 GPU threads and a 10^8-value model 390 625.

use std::num::NonZeroUsize;

use super::discrete::DiscreteGaussian;
use super::rng::SecureRng;
use super::{NoiseError, SecureGaussian, fill_with};

/// Values per chunk of a keyed release (one ChaCha20 stream each). Part of the layout: the GPU
/// kernel receives it from [`DeviceSampler::chunk`], never a value of its own.
pub const KEYED_CHUNK: usize = 256;

/// The CUDA C source of the device sampler (compiled at run time with NVRTC by the site node,
/// and as plain C by the `tutela-noise-kernel-check` tests). Needs `--device-int128`.
pub const DEVICE_KERNEL_SOURCE: &str = include_str!("discrete_gaussian.cu");

/// The kernel's entry point in [`DEVICE_KERNEL_SOURCE`].
pub const DEVICE_KERNEL_NAME: &str = "tutela_discrete_gaussian_fill";

/// The 32-byte ChaCha20 key of one release. Drawn from the operating system per release; zeroed
/// when dropped; never printed.
pub struct NoiseKey([u8; 32]);

impl NoiseKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn from_os() -> Result<Self, NoiseError> {
        let mut rng = SecureRng::from_os()?;
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Ok(NoiseKey(key))
    }

    /// A chosen key. **Tests only**: noise from a known key gives no privacy.
    #[doc(hidden)]
    pub fn insecure_from_bytes(key: [u8; 32]) -> Self {
        NoiseKey(key)
    }

    /// The key as four little-endian 64-bit words (ChaCha20's key words 4–11 in pairs, low
    /// first): how the device kernel receives it.
    pub fn words(&self) -> [u64; 4] {
        std::array::from_fn(|i| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&self.0[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        })
    }
}

impl Drop for NoiseKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseKey(hidden)")
    }
}

/// What the device kernel needs to draw exactly what [`KeyedGaussian::fill`] draws: the
/// sampler's integers (σ_g² = a / b, t = ⌊σ_g⌋ + 1, `bt = b·t`, `den = 2·a·b·t²`), the grid step
/// and the chunk size. Pass each `u128` as its (low, high) 64-bit halves ([`split_u128`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceSampler {
    pub a: u128,
    pub bt: u128,
    pub den: u128,
    pub t: u64,
    pub granularity: f64,
    pub chunk: u64,
}

/// `(low, high)` 64-bit halves of `x`, the kernel's argument order.
pub fn split_u128(x: u128) -> (u64, u64) {
    (x as u64, (x >> 64) as u64)
}

/// The exact discrete Gaussian on the grid `granularity · ℤ`, drawn keyed and per element (see
/// the [module documentation](self)). Holds no generator: each release brings its own
/// [`NoiseKey`].
#[derive(Clone, Debug)]
pub struct KeyedGaussian {
    sigma: f64,
    granularity: f64,
    dg: DiscreteGaussian,
}

impl KeyedGaussian {
    /// Noise of standard deviation `sigma` on the grid `granularity · ℤ`: the parameters and
    /// errors of [`SecureGaussian::new`].
    pub fn new(sigma: f64, granularity: f64) -> Result<Self, NoiseError> {
        Ok(Self {
            sigma,
            granularity,
            dg: SecureGaussian::params(sigma, granularity)?,
        })
    }

    /// The requested standard deviation, in real units.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// The grid step: every output is an integer multiple of it.
    pub fn granularity(&self) -> f64 {
        self.granularity
    }

    /// The exact variance parameter σ_g² = a / b, in grid units.
    pub fn grid_variance(&self) -> f64 {
        self.dg.variance_f64()
    }

    /// The parameters the device kernel is launched with.
    pub fn device_sampler(&self) -> DeviceSampler {
        let (a, bt, den, t) = self.dg.integer_parameters();
        DeviceSampler {
            a,
            bt,
            den,
            t,
            granularity: self.granularity,
            chunk: KEYED_CHUNK as u64,
        }
    }

    /// Fills `out` with release `key`'s elements `0 .. out.len()` (overwrites; add them to the
    /// gradient). Element `i` is a function of `(key, i)` alone.
    pub fn fill(&self, key: &NoiseKey, out: &mut [f32]) {
        self.fill_chunks(key, 0, out);
    }

    /// As [`KeyedGaussian::fill`], over `threads` scoped threads: the same values, bit for bit.
    pub fn fill_parallel(&self, key: &NoiseKey, out: &mut [f32], threads: NonZeroUsize) {
        let chunks = out.len().div_ceil(KEYED_CHUNK);
        let threads = threads.get().min(chunks);
        if threads <= 1 {
            self.fill(key, out);
            return;
        }
        // Whole chunks per thread, so that each part starts at a chunk boundary.
        let per_part = chunks.div_ceil(threads) * KEYED_CHUNK;
        std::thread::scope(|s| {
            for (p, part) in out.chunks_mut(per_part).enumerate() {
                let first_chunk = (p * per_part / KEYED_CHUNK) as u64;
                s.spawn(move || self.fill_chunks(key, first_chunk, part));
            }
        });
    }

    /// Draws the chunks `first_chunk, first_chunk + 1, …` into `out` (which starts at a chunk
    /// boundary).
    fn fill_chunks(&self, key: &NoiseKey, first_chunk: u64, out: &mut [f32]) {
        for (c, chunk) in (first_chunk..).zip(out.chunks_mut(KEYED_CHUNK)) {
            let mut rng = SecureRng::keyed_stream(&key.0, c);
            fill_with(&self.dg, self.granularity, &mut rng, chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_words_are_little_endian_pairs_of_chacha_key_words() {
        let key = NoiseKey::insecure_from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(key.words()[0], 0x0706_0504_0302_0100);
        assert_eq!(key.words()[3], 0x1f1e_1d1c_1b1a_1918);
        assert_eq!(format!("{key:?}"), "NoiseKey(hidden)");
    }

    #[test]
    fn device_parameters_are_the_samplers() {
        let k = KeyedGaussian::new(4.0, 1.0).unwrap();
        let d = k.device_sampler();
        // σ_g² = 16 = a / b, t = 5, den = 2·a·b·t².
        assert_eq!(d.a, 16 * (d.bt / 5));
        assert_eq!(d.t, 5);
        assert_eq!(d.den, 2 * d.a * d.bt * 5);
        assert_eq!(d.chunk, 256);
        assert_eq!(split_u128((7u128 << 64) | 9), (9, 7));
    }
}
