//! Masks: a 32-byte seed expanded with ChaCha20 into a vector of `Z_2^64`, added to or
//! subtracted from a vector with wrapping arithmetic.
//!
//! Element `i` of the mask of seed `s` is the little-endian `u64` at 32-bit word `2i` of the
//! ChaCha20 keystream keyed by `s` (stream 0): any range of elements can be computed on its own
//! (the keystream is seekable), so the work splits over threads and blocks with bit-identical
//! results, and one pass over the vector applies all of a site's masks block by block while the
//! block stays in cache.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

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
        let seed = [7u8; 32];
        let v = expand(&seed, 4);
        let mut rng = ChaCha20Rng::from_seed(seed);
        for x in v {
            let lo = u64::from(rng.next_u32());
            let hi = u64::from(rng.next_u32());
            assert_eq!(x, lo | hi << 32);
        }
    }
}
