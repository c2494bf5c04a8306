//! **Test-only.** The GPU noise kernel's device functions (`privacy/src/noise/discrete_gaussian.cu`),
//! compiled as C by this crate's build script, and checked here against the privacy crate's
//! keyed sampler ([`tutela_privacy::noise::KeyedGaussian`]) bit for bit: the ChaCha20 block
//! function, then millions of noise values over the sampler's whole parameter range.
//!
//! CI has no GPU. What it can check is that the kernel's *source* computes exactly what the
//! Rust sampler computes; on a GPU, `scripts/gpu-check.sh` checks that the *device* computes
//! what this source says (NVRTC build, same values for the same key over ≥ 10^7 elements).

use tutela_privacy::noise::{DeviceSampler, NoiseKey, split_u128};

unsafe extern "C" {
    fn tutela_discrete_gaussian_fill_host(
        out: *mut f32,
        n: u64,
        chunk_len: u64,
        key: *const u64,
        a_lo: u64,
        a_hi: u64,
        bt_lo: u64,
        bt_hi: u64,
        den_lo: u64,
        den_hi: u64,
        t: u64,
        granularity: f64,
    );
    fn tutela_chacha20_block_host(key: *const u64, stream: u64, counter: u64, out: *mut u32);
}

/// The kernel's fill (its loop over chunks, on this thread) from the C build of its source.
pub fn fill_with_kernel_source(sampler: &DeviceSampler, key: &NoiseKey, out: &mut [f32]) {
    let words = key.words();
    let (a_lo, a_hi) = split_u128(sampler.a);
    let (bt_lo, bt_hi) = split_u128(sampler.bt);
    let (den_lo, den_hi) = split_u128(sampler.den);
    // SAFETY: `out` is valid for `out.len()` writes and `words` for 4 reads; the C function
    // writes exactly `n` floats and reads nothing else.
    unsafe {
        tutela_discrete_gaussian_fill_host(
            out.as_mut_ptr(),
            out.len() as u64,
            sampler.chunk,
            words.as_ptr(),
            a_lo,
            a_hi,
            bt_lo,
            bt_hi,
            den_lo,
            den_hi,
            sampler.t,
            sampler.granularity,
        );
    }
}

/// One ChaCha20 block (16 keystream words) of `(key, stream, counter)` by the kernel's source.
pub fn chacha20_block_with_kernel_source(key: &NoiseKey, stream: u64, counter: u64) -> [u32; 16] {
    let words = key.words();
    let mut out = [0u32; 16];
    // SAFETY: 4 key words are read, 16 output words written.
    unsafe { tutela_chacha20_block_host(words.as_ptr(), stream, counter, out.as_mut_ptr()) };
    out
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use tutela_privacy::noise::{KEYED_CHUNK, KeyedGaussian, SecureRng};

    use super::*;

    fn key(byte: u8) -> NoiseKey {
        NoiseKey::insecure_from_bytes(std::array::from_fn(|i| byte.wrapping_mul(31) ^ i as u8))
    }

    #[test]
    fn kernel_chacha20_is_the_rust_keystream() {
        // RFC 8439 §2.3.2's block (key 00..1f, counter 1, nonce 0x09000000:0x4a000000:0), then
        // other keys, streams and counters (the 64-bit counter's high word included).
        let rfc: [u8; 32] = std::array::from_fn(|i| i as u8);
        let rfc_words = chacha20_block_with_kernel_source(
            &NoiseKey::insecure_from_bytes(rfc),
            0x4a00_0000,
            1 | (0x0900_0000 << 32),
        );
        assert_eq!(rfc_words[0], 0xe4e7_f110);
        for (k, stream, counter) in [
            (rfc, 0x4a00_0000u64, 1 | (0x0900_0000u64 << 32)),
            ([0u8; 32], 0, 0),
            ([0xffu8; 32], u64::MAX, (1 << 32) + 5),
            ([7u8; 32], 12_345, 3),
        ] {
            let mut rng = SecureRng::insecure_chacha20_keystream(k, stream, counter);
            let mut bytes = [0u8; 64];
            rng.fill_bytes(&mut bytes);
            let expected: Vec<u32> = bytes
                .chunks(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect();
            let got = chacha20_block_with_kernel_source(
                &NoiseKey::insecure_from_bytes(k),
                stream,
                counter,
            );
            assert_eq!(got[..], expected[..], "stream {stream}, counter {counter}");
        }
    }

    /// The kernel's values against the Rust keyed sampler's, compared as bits; returns how many
    /// were compared.
    fn assert_bit_identical(sigma: f64, granularity: f64, key_byte: u8, n: usize) -> usize {
        let noise = KeyedGaussian::new(sigma, granularity).unwrap();
        let k = key(key_byte);
        let mut rust = vec![0f32; n];
        noise.fill_parallel(&k, &mut rust, NonZeroUsize::new(2).unwrap());
        let mut kernel = vec![f32::NAN; n];
        fill_with_kernel_source(&noise.device_sampler(), &k, &mut kernel);
        if let Some(i) = (0..n).find(|&i| rust[i].to_bits() != kernel[i].to_bits()) {
            panic!(
                "σ {sigma}, grid {granularity:e}: element {i} (chunk {}) is {} in Rust, {} by \
                 the kernel source",
                i / KEYED_CHUNK,
                rust[i],
                kernel[i]
            );
        }
        // Guards against comparing two constant buffers.
        let distinct: std::collections::HashSet<u32> =
            rust.iter().take(10_000).map(|x| x.to_bits()).collect();
        assert!(
            distinct.len() > 3,
            "σ {sigma}: {} distinct values",
            distinct.len()
        );
        n
    }

    #[test]
    fn kernel_source_draws_the_rust_samplers_values_bit_for_bit() {
        // The sampler's parameter range: σ_g = 1 (smallest), non-integer scales, a 2^-20 grid,
        // and σ_g = 2^16 (largest: the Gaussian coin's denominator passes 2^63, so the 128-bit
        // comparison runs), with lengths that end inside a chunk.
        let cases: [(f64, f64, usize); 7] = [
            (1.0, 1.0, 1_000_003),
            (1.5, 1.0, 500_000),
            (7.3, 2f64.powi(-3), 500_000),
            (1e-3, 2f64.powi(-20), 1_000_000),
            (1.0, 2f64.powi(-16), 1_000_000),
            (65535.9, 1.0, 300_001),
            (0.37, 2f64.powi(-12), 1_700_000),
        ];
        let mut compared = 0;
        for (i, (sigma, g, n)) in cases.into_iter().enumerate() {
            compared += assert_bit_identical(sigma, g, i as u8, n);
        }
        assert!(compared >= 6_000_000, "{compared}");
    }

    #[test]
    fn kernel_source_follows_the_per_element_layout() {
        // A release's prefix is the same whatever its length (element i depends on (key, i)).
        let noise = KeyedGaussian::new(2.0, 1.0).unwrap();
        let sampler = noise.device_sampler();
        let mut long = vec![0f32; 10 * KEYED_CHUNK + 3];
        fill_with_kernel_source(&sampler, &key(99), &mut long);
        let mut short = vec![0f32; 4 * KEYED_CHUNK + 17];
        fill_with_kernel_source(&sampler, &key(99), &mut short);
        assert_eq!(short[..], long[..short.len()]);
    }
}
