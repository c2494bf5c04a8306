/*
 * The keyed exact discrete Gaussian of `keyed.rs`, for the GPU: the same ChaCha20 keystream and
 * the same integer-only sampler (CKS20 Algorithms 1-3 as `discrete.rs` implements them), so that
 * for the same key every element is the same f32, bit for bit.
 *
 * One source, two compilers:
 *  - NVRTC (`tutela_site_node::gpu_noise`) compiles it as CUDA C++ at run time, with
 *    `--device-int128` for `unsigned __int128` (where the Rust sampler uses u128);
 *  - a C compiler compiles it as plain C11 in the test crate `privacy/kernel-check`, whose tests
 *    check, on the CPU, that these device functions give the Rust sampler's samples bit for bit.
 * Only the kernel entry point is CUDA-only; everything it calls is in both builds.
 *
 * Each function mirrors the Rust function of the same name (noted beside it). Keep them in step:
 * a change to `discrete.rs` or `rng.rs` that changes how bits are consumed must be made here too,
 * and the kernel-check tests fail until it is.
 *
 * Layout of a release (`keyed.rs`): element i belongs to chunk c = i / chunk_len, drawn from the
 * ChaCha20 keystream with the release's key, stream id c, block counter from 0, the chunk's
 * elements in order. One thread draws one chunk.
 */

#ifdef __CUDACC__
#define TUTELA_FN static __device__ __forceinline__
#else
#define TUTELA_FN static inline
#endif

/* No headers: NVRTC has no C library. These widths hold on every target either compiler is
 * used for (LP64 Linux and CUDA). */
typedef unsigned int tutela_u32;
typedef unsigned long long tutela_u64;
typedef long long tutela_i64;
typedef unsigned __int128 tutela_u128;

#define TUTELA_U64_MAX 0xffffffffffffffffULL
#define TUTELA_I64_MAX 0x7fffffffffffffffULL

/* ------------------------------------------------------------------ ChaCha20 (rng.rs) */

/* The generator of one chunk: rand_chacha's ChaCha20Rng (20 rounds, the original layout: words
 * 12-13 a 64-bit block counter, 14-15 the 64-bit stream id), read as a sequence of 32-bit words,
 * plus SecureRng's reservoir of fair bits. */
typedef struct {
    tutela_u32 key[8];
    tutela_u64 stream;
    tutela_u64 counter; /* the next block to compute */
    tutela_u32 block[16];
    tutela_u32 used; /* words of `block` handed out; 16: none left */
    tutela_u64 reservoir;
    tutela_u32 reservoir_bits;
} tutela_rng;

#define TUTELA_ROTL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))
#define TUTELA_QR(a, b, c, d)                                                                      \
    a += b; d ^= a; d = TUTELA_ROTL(d, 16);                                                         \
    c += d; b ^= c; b = TUTELA_ROTL(b, 12);                                                         \
    a += b; d ^= a; d = TUTELA_ROTL(d, 8);                                                          \
    c += d; b ^= c; b = TUTELA_ROTL(b, 7);

/* RFC 8439 §2.3, with rand_chacha's 64-bit counter and 64-bit stream id. */
TUTELA_FN void tutela_chacha20_block(tutela_rng *r) {
    tutela_u32 s[16];
    s[0] = 0x61707865u;
    s[1] = 0x3320646eu;
    s[2] = 0x79622d32u;
    s[3] = 0x6b206574u;
    for (int i = 0; i < 8; i++) s[4 + i] = r->key[i];
    s[12] = (tutela_u32)r->counter;
    s[13] = (tutela_u32)(r->counter >> 32);
    s[14] = (tutela_u32)r->stream;
    s[15] = (tutela_u32)(r->stream >> 32);
    tutela_u32 x0 = s[0], x1 = s[1], x2 = s[2], x3 = s[3], x4 = s[4], x5 = s[5], x6 = s[6],
               x7 = s[7], x8 = s[8], x9 = s[9], x10 = s[10], x11 = s[11], x12 = s[12],
               x13 = s[13], x14 = s[14], x15 = s[15];
    for (int i = 0; i < 10; i++) {
        TUTELA_QR(x0, x4, x8, x12)
        TUTELA_QR(x1, x5, x9, x13)
        TUTELA_QR(x2, x6, x10, x14)
        TUTELA_QR(x3, x7, x11, x15)
        TUTELA_QR(x0, x5, x10, x15)
        TUTELA_QR(x1, x6, x11, x12)
        TUTELA_QR(x2, x7, x8, x13)
        TUTELA_QR(x3, x4, x9, x14)
    }
    r->block[0] = x0 + s[0];
    r->block[1] = x1 + s[1];
    r->block[2] = x2 + s[2];
    r->block[3] = x3 + s[3];
    r->block[4] = x4 + s[4];
    r->block[5] = x5 + s[5];
    r->block[6] = x6 + s[6];
    r->block[7] = x7 + s[7];
    r->block[8] = x8 + s[8];
    r->block[9] = x9 + s[9];
    r->block[10] = x10 + s[10];
    r->block[11] = x11 + s[11];
    r->block[12] = x12 + s[12];
    r->block[13] = x13 + s[13];
    r->block[14] = x14 + s[14];
    r->block[15] = x15 + s[15];
    r->counter += 1;
    r->used = 0;
}

/* SecureRng::keyed_stream(key, stream): block 0, nothing buffered. */
TUTELA_FN void tutela_rng_init(tutela_rng *r, const tutela_u64 key[4], tutela_u64 stream) {
    for (int i = 0; i < 4; i++) {
        r->key[2 * i] = (tutela_u32)key[i];
        r->key[2 * i + 1] = (tutela_u32)(key[i] >> 32);
    }
    r->stream = stream;
    r->counter = 0;
    r->used = 16;
    r->reservoir = 0;
    r->reservoir_bits = 0;
}

/* ChaCha20Rng::next_u32: the next keystream word. */
TUTELA_FN tutela_u32 tutela_next_u32(tutela_rng *r) {
    if (r->used == 16) tutela_chacha20_block(r);
    return r->block[r->used++];
}

/* ChaCha20Rng::next_u64: two consecutive words, the first one low (also across blocks). */
TUTELA_FN tutela_u64 tutela_next_u64(tutela_rng *r) {
    tutela_u64 lo = tutela_next_u32(r);
    tutela_u64 hi = tutela_next_u32(r);
    return lo | (hi << 32);
}

/* RandomBits::bit for SecureRng: 64 bits at a time into the reservoir, lowest first. */
TUTELA_FN int tutela_bit(tutela_rng *r) {
    if (r->reservoir_bits == 0) {
        r->reservoir = tutela_next_u64(r);
        r->reservoir_bits = 64;
    }
    int bit = (int)(r->reservoir & 1);
    r->reservoir >>= 1;
    r->reservoir_bits -= 1;
    return bit;
}

/* RandomBits::below_u32: Lemire's multiply-and-reject on 32-bit words, 1 <= m <= 2^32. */
TUTELA_FN tutela_u64 tutela_below_u32(tutela_rng *r, tutela_u64 m) {
    tutela_u64 prod = (tutela_u64)tutela_next_u32(r) * m;
    tutela_u64 low = prod & 0xffffffffULL;
    if (low < m) {
        tutela_u64 threshold = (1ULL << 32) % m;
        while (low < threshold) {
            prod = (tutela_u64)tutela_next_u32(r) * m;
            low = prod & 0xffffffffULL;
        }
    }
    return prod >> 32;
}

/* ------------------------------------------------------------------ exact coins (discrete.rs) */

/* u128::checked_mul: 1 and *out = a * b when the product fits 128 bits, else 0. */
TUTELA_FN int tutela_mul_checked(tutela_u128 a, tutela_u128 b, tutela_u128 *out) {
    tutela_u64 a_hi = (tutela_u64)(a >> 64), a_lo = (tutela_u64)a;
    tutela_u64 b_hi = (tutela_u64)(b >> 64), b_lo = (tutela_u64)b;
    if (a_hi != 0 && b_hi != 0) return 0;
    tutela_u128 low = (tutela_u128)a_lo * b_lo;
    /* At most one of the cross products is non-zero; each is below 2^128. */
    tutela_u128 cross = (tutela_u128)a_hi * b_lo + (tutela_u128)a_lo * b_hi;
    if ((cross >> 64) != 0) return 0;
    tutela_u128 sum = low + (cross << 64);
    if (sum < low) return 0;
    *out = sum;
    return 1;
}

/* lazy_compare_u64: U < r / den, 0 < r < den <= 2^63. */
TUTELA_FN int tutela_lazy_compare_u64(tutela_rng *rng, tutela_u64 r, tutela_u64 den) {
    for (;;) {
        r <<= 1;
        int p_bit = r >= den;
        if (p_bit) r -= den;
        if (tutela_bit(rng) != p_bit) return p_bit;
        if (r == 0) return 0;
    }
}

/* lazy_compare_u128: U < r / den, 0 < r < den <= 2^127. */
TUTELA_FN int tutela_lazy_compare_u128(tutela_rng *rng, tutela_u128 r, tutela_u128 den) {
    for (;;) {
        r <<= 1;
        int p_bit = r >= den;
        if (p_bit) r -= den;
        if (tutela_bit(rng) != p_bit) return p_bit;
        if (r == 0) return 0;
    }
}

/* bernoulli_ratio: Bernoulli(num / den), 1 <= den <= 2^127. */
TUTELA_FN int tutela_bernoulli_ratio(tutela_rng *rng, tutela_u128 num, tutela_u128 den) {
    if (num >= den) return 1;
    if (num == 0) return 0;
    if (den <= ((tutela_u128)1 << 63)) {
        return tutela_lazy_compare_u64(rng, (tutela_u64)num, (tutela_u64)den);
    }
    return tutela_lazy_compare_u128(rng, num, den);
}

/* bernoulli_exp_minus_unit: Bernoulli(exp(-num/den)), num <= den. */
TUTELA_FN int tutela_bernoulli_exp_minus_unit(tutela_rng *rng, tutela_u128 num, tutela_u128 den) {
    tutela_u128 k = 1;
    for (;;) {
        tutela_u128 dk;
        int a;
        if (tutela_mul_checked(den, k, &dk) && dk <= ((tutela_u128)1 << 127)) {
            a = tutela_bernoulli_ratio(rng, num, dk);
        } else {
            a = tutela_bernoulli_ratio(rng, num, den) && tutela_bernoulli_ratio(rng, 1, k);
        }
        if (!a) break;
        k += 1;
    }
    return (int)(k & 1);
}

/* bernoulli_exp_minus_one: Bernoulli(exp(-1)). */
TUTELA_FN int tutela_bernoulli_exp_minus_one(tutela_rng *rng) {
    if (!tutela_bit(rng)) return 0;
    tutela_u128 k = 3;
    while (tutela_bernoulli_ratio(rng, 1, k)) k += 1;
    return (int)(k & 1);
}

/* bernoulli_exp_minus: Bernoulli(exp(-num/den)) for any num >= 0. */
TUTELA_FN int tutela_bernoulli_exp_minus(tutela_rng *rng, tutela_u128 num, tutela_u128 den) {
    tutela_u128 rem = num;
    while (rem >= den) {
        if (!tutela_bernoulli_exp_minus_one(rng)) return 0;
        rem -= den;
    }
    return tutela_bernoulli_exp_minus_unit(rng, rem, den);
}

/* discrete_laplace: scale t, 1 <= t <= 2^32; returns |x|, sets *negative. */
TUTELA_FN tutela_u64 tutela_discrete_laplace(tutela_rng *rng, tutela_u64 t, int *negative) {
    for (;;) {
        tutela_u64 u = tutela_below_u32(rng, t);
        if (!tutela_bernoulli_exp_minus_unit(rng, (tutela_u128)u, (tutela_u128)t)) continue;
        tutela_u64 v = 0;
        while (tutela_bernoulli_exp_minus_one(rng)) {
            if (v != TUTELA_U64_MAX) v += 1; /* saturating_add */
        }
        /* t.saturating_mul(v).saturating_add(u) */
        tutela_u128 tv = (tutela_u128)t * v;
        tutela_u64 x = (tv >> 64) != 0 ? TUTELA_U64_MAX : (tutela_u64)tv;
        x = x > TUTELA_U64_MAX - u ? TUTELA_U64_MAX : x + u;
        int neg = tutela_bit(rng);
        if (neg && x == 0) continue;
        *negative = neg;
        return x;
    }
}

/* The sampler's integers (DiscreteGaussian::integer_parameters): sigma^2 = a / b, t, b*t and
 * 2*a*b*t^2. */
typedef struct {
    tutela_u128 a;
    tutela_u128 bt;
    tutela_u128 den;
    tutela_u64 t;
} tutela_dg;

/* DiscreteGaussian::sample: one draw in grid units. */
TUTELA_FN tutela_i64 tutela_discrete_gaussian(const tutela_dg *dg, tutela_rng *rng) {
    for (;;) {
        int negative;
        tutela_u64 y = tutela_discrete_laplace(rng, dg->t, &negative);
        tutela_u128 ybt;
        if (!tutela_mul_checked((tutela_u128)y, dg->bt, &ybt)) continue;
        tutela_u128 diff = ybt > dg->a ? ybt - dg->a : dg->a - ybt;
        tutela_u128 num;
        if (!tutela_mul_checked(diff, diff, &num)) continue;
        if (!tutela_bernoulli_exp_minus(rng, num, dg->den)) continue;
        if (y > TUTELA_I64_MAX) continue;
        return negative ? -(tutela_i64)y : (tutela_i64)y;
    }
}

/* keyed.rs's fill for one chunk: `len` values, stream id `chunk`, each (f32)((f64)x * g), exact
 * while |x| < 2^24 (see noise/mod.rs). */
TUTELA_FN void tutela_fill_chunk(const tutela_dg *dg, const tutela_u64 key[4], double granularity,
                                 tutela_u64 chunk, float *out, tutela_u64 len) {
    tutela_rng rng;
    tutela_rng_init(&rng, key, chunk);
    for (tutela_u64 j = 0; j < len; j++) {
        tutela_i64 x = tutela_discrete_gaussian(dg, &rng);
        out[j] = (float)((double)x * granularity);
    }
}

#define TUTELA_U128(lo, hi) (((tutela_u128)(hi) << 64) | (tutela_u128)(lo))

#ifdef __CUDACC__
/* One thread per chunk of `chunk_len` elements: thread c writes out[c*chunk_len ..] (at most
 * `n` in all). The u128 parameters arrive as (low, high) 64-bit halves. */
extern "C" __global__ void tutela_discrete_gaussian_fill(
    float *out, tutela_u64 n, tutela_u64 chunk_len, tutela_u64 k0, tutela_u64 k1, tutela_u64 k2,
    tutela_u64 k3, tutela_u64 a_lo, tutela_u64 a_hi, tutela_u64 bt_lo, tutela_u64 bt_hi,
    tutela_u64 den_lo, tutela_u64 den_hi, tutela_u64 t, double granularity) {
    tutela_u64 chunk = (tutela_u64)blockIdx.x * blockDim.x + threadIdx.x;
    tutela_u64 start = chunk * chunk_len;
    if (start >= n) return;
    tutela_u64 len = n - start < chunk_len ? n - start : chunk_len;
    tutela_u64 key[4] = {k0, k1, k2, k3};
    tutela_dg dg;
    dg.a = TUTELA_U128(a_lo, a_hi);
    dg.bt = TUTELA_U128(bt_lo, bt_hi);
    dg.den = TUTELA_U128(den_lo, den_hi);
    dg.t = t;
    tutela_fill_chunk(&dg, key, granularity, chunk, out + start, len);
}
#else
/* The host build's entry point (kernel-check): the kernel's loop over chunks, on one thread,
 * with the same arguments. */
void tutela_discrete_gaussian_fill_host(float *out, tutela_u64 n, tutela_u64 chunk_len,
                                        const tutela_u64 key[4], tutela_u64 a_lo,
                                        tutela_u64 a_hi, tutela_u64 bt_lo, tutela_u64 bt_hi,
                                        tutela_u64 den_lo, tutela_u64 den_hi, tutela_u64 t,
                                        double granularity) {
    tutela_dg dg;
    dg.a = TUTELA_U128(a_lo, a_hi);
    dg.bt = TUTELA_U128(bt_lo, bt_hi);
    dg.den = TUTELA_U128(den_lo, den_hi);
    dg.t = t;
    for (tutela_u64 chunk = 0; chunk * chunk_len < n; chunk++) {
        tutela_u64 start = chunk * chunk_len;
        tutela_u64 len = n - start < chunk_len ? n - start : chunk_len;
        tutela_fill_chunk(&dg, key, granularity, chunk, out + start, len);
    }
}

/* One ChaCha20 block of (key, stream, counter), for the kernel-check's keystream test. */
void tutela_chacha20_block_host(const tutela_u64 key[4], tutela_u64 stream, tutela_u64 counter,
                                tutela_u32 out[16]) {
    tutela_rng r;
    tutela_rng_init(&r, key, stream);
    r.counter = counter;
    tutela_chacha20_block(&r);
    for (int i = 0; i < 16; i++) out[i] = r.block[i];
}
#endif
