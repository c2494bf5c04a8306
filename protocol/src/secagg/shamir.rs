//! Shamir secret sharing (t of k) of 32-byte seeds over the prime field `GF(p)`, `p = 2^61 − 1`.
//!
//! A seed is cut into five chunks (four of 7 bytes, one of 4), each below `2^56 < p` and so an
//! element of the field; each chunk is shared with its own random polynomial of degree `t − 1`
//! (coefficients uniform in `GF(p)`, from the ChaCha20 CSPRNG keyed by the operating system).
//! Holder `h` (a site index) gets the evaluations at `x = h + 1`, never 0. Any `t` shares give the
//! seed back by Lagrange interpolation at 0; `t − 1` are independent of it (perfect secrecy).
//!
//! Reconstruction uses the first `t` shares and checks every further one lies on the same
//! polynomials, so a corrupted or inconsistent share is refused when there are spare shares (with
//! exactly `t` it cannot be detected: that is the active-attack gap `docs/architecture.md` names).
//! Every chunk must also decode back into its width.

use tutela_privacy::noise::SecureRng;

use super::SecAggError;

/// The field's modulus, the Mersenne prime `2^61 − 1`.
pub const P: u64 = (1 << 61) - 1;

/// Field elements per 32-byte seed.
pub const CHUNKS: usize = 5;

/// Byte widths of the chunks a seed is cut into.
const WIDTHS: [usize; CHUNKS] = [7, 7, 7, 7, 4];

/// One holder's share of one seed: the evaluations of the five polynomials at `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub x: u64,
    pub ys: [u64; CHUNKS],
}

fn reduce(x: u128) -> u64 {
    // x = hi · 2^61 + lo ≡ hi + lo (mod 2^61 − 1); twice brings any product below 2p.
    let folded = (x & u128::from(P)) + (x >> 61);
    let folded = (folded & u128::from(P)) + (folded >> 61);
    let r = folded as u64;
    if r >= P { r - P } else { r }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// `a^-1` by Fermat (`a ≠ 0`).
fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

fn chunks(secret: &[u8; 32]) -> [u64; CHUNKS] {
    let mut out = [0u64; CHUNKS];
    let mut at = 0;
    for (slot, &w) in out.iter_mut().zip(&WIDTHS) {
        let mut buf = [0u8; 8];
        buf[..w].copy_from_slice(&secret[at..at + w]);
        *slot = u64::from_le_bytes(buf);
        at += w;
    }
    out
}

fn unchunk(values: &[u64; CHUNKS]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let mut at = 0;
    for (&v, &w) in values.iter().zip(&WIDTHS) {
        if v >> (8 * w) != 0 {
            return None;
        }
        out[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
        at += w;
    }
    Some(out)
}

/// The x-coordinate of holder `site`'s shares.
pub fn x_of(site: u32) -> u64 {
    u64::from(site) + 1
}

/// Shares `secret` among `holders` (distinct site indices), any `threshold` of which recover it.
pub fn split(
    secret: &[u8; 32],
    threshold: u32,
    holders: &[u32],
    rng: &mut SecureRng,
) -> Vec<Share> {
    let t = threshold.max(1) as usize;
    let secret = chunks(secret);
    // coefficients[c] = [secret chunk c, a_1, …, a_{t−1}]
    let coefficients: Vec<Vec<u64>> = secret
        .iter()
        .map(|&s| {
            let mut poly = Vec::with_capacity(t);
            poly.push(s);
            for _ in 1..t {
                poly.push(rng.below(u128::from(P)) as u64);
            }
            poly
        })
        .collect();
    holders
        .iter()
        .map(|&h| {
            let x = x_of(h);
            let mut ys = [0u64; CHUNKS];
            for (y, poly) in ys.iter_mut().zip(&coefficients) {
                // Horner.
                *y = poly.iter().rev().fold(0, |acc, &a| add(mul(acc, x), a));
            }
            Share { x, ys }
        })
        .collect()
}

/// Lagrange basis weights `λ_j(at)` for the points `xs` (distinct).
fn lagrange_at(xs: &[u64], at: u64) -> Vec<u64> {
    xs.iter()
        .enumerate()
        .map(|(j, &xj)| {
            let mut num = 1;
            let mut den = 1;
            for (m, &xm) in xs.iter().enumerate() {
                if m != j {
                    num = mul(num, sub(at, xm));
                    den = mul(den, sub(xj, xm));
                }
            }
            mul(num, inv(den))
        })
        .collect()
}

/// Recovers a seed from at least `threshold` shares; refuses too few, repeated or out-of-field
/// x-coordinates, shares that disagree, and a result that is not a seed's encoding. `what` names
/// the seed in the error.
pub fn reconstruct(shares: &[Share], threshold: u32, what: &str) -> Result<[u8; 32], SecAggError> {
    let t = threshold.max(1) as usize;
    let fail = |reason: String| SecAggError::Crypto(format!("cannot recover {what}: {reason}"));
    if shares.len() < t {
        return Err(fail(format!(
            "{} shares, the threshold is {t}",
            shares.len()
        )));
    }
    let mut xs: Vec<u64> = shares.iter().map(|s| s.x).collect();
    xs.sort_unstable();
    if xs.windows(2).any(|w| w[0] == w[1]) || xs.iter().any(|&x| x == 0 || x >= P) {
        return Err(fail("shares with repeated or invalid x-coordinates".into()));
    }
    if shares.iter().any(|s| s.ys.iter().any(|&y| y >= P)) {
        return Err(fail("a share value outside the field".into()));
    }
    let (base, extra) = shares.split_at(t);
    let base_xs: Vec<u64> = base.iter().map(|s| s.x).collect();
    let interpolate = |at: u64| -> [u64; CHUNKS] {
        let weights = lagrange_at(&base_xs, at);
        let mut out = [0u64; CHUNKS];
        for (c, slot) in out.iter_mut().enumerate() {
            *slot = base
                .iter()
                .zip(&weights)
                .fold(0, |acc, (s, &w)| add(acc, mul(s.ys[c], w)));
        }
        out
    };
    for s in extra {
        if interpolate(s.x) != s.ys {
            return Err(fail(format!(
                "the share at x = {} disagrees with the others (corrupted or forged)",
                s.x
            )));
        }
    }
    unchunk(&interpolate(0)).ok_or_else(|| fail("the shares do not encode a seed".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> SecureRng {
        SecureRng::insecure_from_seed([9; 32])
    }

    #[test]
    fn field_arithmetic_is_exact() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        for a in [1, 2, 3, 12345, P - 2, 1 << 60] {
            assert_eq!(mul(a, inv(a)), 1, "{a}");
        }
    }

    #[test]
    fn any_t_shares_recover_the_secret() {
        let secret: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
        let holders: Vec<u32> = (0..9).collect();
        let shares = split(&secret, 5, &holders, &mut rng());
        for start in 0..5 {
            let got = reconstruct(&shares[start..start + 5], 5, "s").unwrap();
            assert_eq!(got, secret);
        }
        // All nine: the four extra are checked for consistency.
        assert_eq!(reconstruct(&shares, 5, "s").unwrap(), secret);
        let all_ones = [0xff; 32];
        let shares = split(&all_ones, 3, &holders, &mut rng());
        assert_eq!(reconstruct(&shares[2..5], 3, "s").unwrap(), all_ones);
    }

    #[test]
    fn too_few_or_corrupted_shares_are_refused() {
        let secret = [42u8; 32];
        let holders: Vec<u32> = (10..17).collect();
        let shares = split(&secret, 4, &holders, &mut rng());
        let err = reconstruct(&shares[..3], 4, "site 2's self-mask seed").unwrap_err();
        assert!(
            err.to_string().contains("3 shares, the threshold is 4"),
            "{err}"
        );
        let mut bad = shares.clone();
        bad[5].ys[2] = add(bad[5].ys[2], 1);
        let err = reconstruct(&bad, 4, "s").unwrap_err();
        assert!(err.to_string().contains("disagrees"), "{err}");
        let mut dup = shares[..4].to_vec();
        dup[1].x = dup[0].x;
        assert!(reconstruct(&dup, 4, "s").is_err());
        let mut out_of_field = shares[..4].to_vec();
        out_of_field[0].ys[0] = P;
        assert!(reconstruct(&out_of_field, 4, "s").is_err());
    }

    #[test]
    fn fewer_than_t_shares_are_consistent_with_any_secret() {
        // With t = 2, one share y = s + a·x: for every candidate secret there is exactly one a.
        // So a single share's value is uniform whatever the secret: check over many draws that
        // its low bit is balanced for a fixed secret.
        let mut r = rng();
        let ones: u32 = (0..4000)
            .map(|_| (split(&[0u8; 32], 2, &[3], &mut r)[0].ys[0] & 1) as u32)
            .sum();
        assert!((1800..2200).contains(&ones), "{ones}");
    }
}
