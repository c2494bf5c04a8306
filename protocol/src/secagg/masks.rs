//! Masks: a 32-byte seed expanded with ChaCha20 into a vector of `Z_2^64`, added to or
//! subtracted from a vector with wrapping arithmetic.
//!
//! Element `i` of the mask of seed `s` is the little-endian `u64` at 32-bit word `2i` of the
//! ChaCha20 keystream keyed by `s` (stream 0): any range of elements can be computed on its own
//! (the keystream is seekable), so the work splits over threads and blocks with bit-identical
//! results, and one pass over the vector applies all of a site's masks block by block while the
//! block stays in cache. The server removes every survivor's self mask (and any dropped site's
//! pairwise masks) in that same single pass over its one `Z_2^64` sum, on every core.
//!
//! The keystream is RustCrypto's `chacha20` RNG (64-bit block counter, stream 0: the original
//! ChaCha20, which `rand_chacha` also implements, word for word): its AVX2 backend is chosen at
//! run time, and it makes about 3x the keystream per CPU-second of `rand_chacha` on the
//! project's machines (BENCHMARKS.md, "Secure aggregation"). The tests hold it to
//! `rand_chacha`'s words.

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};

use super::keys::Seed;

/// Whether a mask is added to or subtracted from the vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    Add,
    Subtract,
}

/// Elements per block: 64 KiB of `u64`, with a 64 KiB keystream buffer, fits a core's L2.
const BLOCK: usize = 8 * 1024;

/// Applies every `(seed, sign)` mask to `acc` (wrapping), over `threads` threads.
pub fn apply(acc: &mut [u64], masks: &[(Seed, Sign)], threads: usize) {
    if masks.is_empty() || acc.is_empty() {
        return;
    }
    let threads = threads.clamp(1, acc.len().div_ceil(BLOCK));
    if threads == 1 {
        apply_range(acc, 0, masks);
        return;
    }
    // Contiguous parts, each a whole number of blocks (but the last).
    let part = acc.len().div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    std::thread::scope(|s| {
        for (i, chunk) in acc.chunks_mut(part).enumerate() {
            s.spawn(move || apply_range(chunk, i * part, masks));
        }
    });
}

/// Applies the masks to `acc`, whose first element is element `start` of the vector.
fn apply_range(acc: &mut [u64], start: usize, masks: &[(Seed, Sign)]) {
    let mut buf = vec![0u8; BLOCK * 8];
    let mut rngs: Vec<(ChaCha20Rng, Sign)> = masks
        .iter()
        .map(|(seed, sign)| {
            let mut rng = ChaCha20Rng::from_seed(*seed);
            rng.set_word_pos(2 * start as u128);
            (rng, *sign)
        })
        .collect();
    for block in acc.chunks_mut(BLOCK) {
        for (rng, sign) in &mut rngs {
            let bytes = &mut buf[..block.len() * 8];
            rng.fill_bytes(bytes);
            let words = bytes.chunks_exact(8);
            match sign {
                Sign::Add => {
                    for (a, w) in block.iter_mut().zip(words) {
                        *a = a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
                    }
                }
                Sign::Subtract => {
                    for (a, w) in block.iter_mut().zip(words) {
                        *a = a.wrapping_sub(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
                    }
                }
            }
        }
    }
}

/// The mask of `seed` alone, `len` elements (tests and the uniformity check).
pub fn expand(seed: &Seed, len: usize) -> Vec<u64> {
    let mut v = vec![0u64; len];
    apply(&mut v, &[(*seed, Sign::Add)], 1);
    v
}

/// The threads a mask expansion may use: the machine's parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_and_blocks_give_the_same_bits() {
        let len = 3 * BLOCK + 17;
        let masks = [([1u8; 32], Sign::Add), ([2u8; 32], Sign::Subtract)];
        let mut one = vec![5u64; len];
        apply(&mut one, &masks, 1);
        for threads in [2, 3, 7] {
            let mut many = vec![5u64; len];
            apply(&mut many, &masks, threads);
            assert_eq!(one, many, "{threads} threads");
        }
        // Subtracting the same masks restores the vector exactly.
        let undo = [([1u8; 32], Sign::Subtract), ([2u8; 32], Sign::Add)];
        apply(&mut one, &undo, 2);
        assert!(one.iter().all(|&x| x == 5));
    }

    #[test]
    fn element_i_is_keystream_word_2i() {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let seed = [7u8; 32];
        let v = expand(&seed, 4);
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
        for x in v {
            let lo = u64::from(rng.next_u32());
            let hi = u64::from(rng.next_u32());
            assert_eq!(x, lo | hi << 32);
        }
    }

    /// The expansion before the switch to the `chacha20` crate, kept as the reference: element
    /// `i` from `rand_chacha`'s ChaCha20 at word `2i`, one element at a time.
    fn reference_mask(seed: &Seed, start: usize, len: usize) -> Vec<u64> {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(*seed);
        rng.set_word_pos(2 * start as u128);
        (0..len).map(|_| rng.next_u64()).collect()
    }

    #[test]
    fn the_keystream_is_bit_identical_to_rand_chacha_at_any_offset_and_thread_count() {
        // Lengths and thread counts that cut the vector mid-block and mid-ChaCha-block (8
        // elements), and seeds unlike each other.
        let seeds: [Seed; 3] = [
            [0; 32],
            [0xA5; 32],
            core::array::from_fn(|i| (i as u8).wrapping_mul(37)),
        ];
        for seed in &seeds {
            let len = 2 * BLOCK + 8 * 3 + 5;
            let want = reference_mask(seed, 0, len);
            for threads in [1, 2, 3, 5] {
                let mut got = vec![0u64; len];
                apply(&mut got, &[(*seed, Sign::Add)], threads);
                assert_eq!(got, want, "{threads} threads");
            }
            // A range that starts inside a ChaCha block, as a thread's part can.
            for start in [1usize, 7, 9, BLOCK + 3] {
                let mut got = vec![0u64; 100];
                apply_range(&mut got, start, &[(*seed, Sign::Add)]);
                assert_eq!(got, reference_mask(seed, start, 100), "start {start}");
            }
        }
        // The first words of ChaCha20 with an all-zero key and nonce (RFC 7539's test vector
        // 2.3.2's keystream for block 0: 76 b8 e0 ad a0 f1 3d 90 ...).
        assert_eq!(
            expand(&[0; 32], 1)[0],
            u64::from_le_bytes([0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90])
        );
    }
}
