//! The round's running sum, split into tiles that uploads lock one at a time, and the loops that
//! read an update's little-endian bytes straight from the stream's chunk.
//!
//! # Why tiles
//!
//! Uploads arrive concurrently (every sampled site trains for about as long, then uploads), and
//! the coordinator's runtime folds them on as many threads as there are cores. With one lock per
//! tensor, two uploads of a model whose bulk is one big tensor fold one after the other; with one
//! lock per [`TILE`] elements they fold side by side, and an upload holds a lock only while it
//! adds one tile's worth of values.
//!
//! The tiles live in one allocation per tensor (so that [`TiledSum::into_vec`] hands the sum to
//! `finish` without a copy) and are reached only through [`TiledSum::lock`], whose guard is the
//! one way to a tile's elements: that is the invariant the `unsafe` below relies on. No crate
//! offers "a slice behind one lock per fixed-size piece" with an owned buffer to take back; this
//! is a few lines over `Mutex<()>`.

use std::sync::{Mutex, MutexGuard};

/// Elements per tile: 512 KiB of `i64`, which with the 256 KiB of f32 input being folded stays in
/// a core's L2 cache.
pub const TILE: usize = 64 * 1024;

/// One tensor's running sum in `i64` fixed point, lockable tile by tile.
pub struct TiledSum {
    /// The sum's buffer, taken apart from its `Vec` (rebuilt by `into_vec` and `drop`).
    ptr: *mut i64,
    len: usize,
    capacity: usize,
    tiles: Box<[Mutex<()>]>,
}

// SAFETY: the buffer is owned by the `TiledSum` (like a `Vec<i64>`, which is Send and Sync), and
// its elements are reached only through `lock`, which holds the tile's mutex for as long as the
// returned slice lives, so no two threads ever reach the same element at once.
unsafe impl Send for TiledSum {}
unsafe impl Sync for TiledSum {}

impl TiledSum {
    /// A sum of `len` zeros, its pages touched now (see `prefault`) rather than by the first
    /// upload.
    pub fn zeroed(len: usize) -> Self {
        let mut v = vec![0i64; len];
        prefault(&mut v);
        let mut v = std::mem::ManuallyDrop::new(v);
        let tiles = (0..len.div_ceil(TILE)).map(|_| Mutex::new(())).collect();
        TiledSum {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            capacity: v.capacity(),
            tiles,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tile `t`'s elements (`TILE` of them, fewer in the last tile), locked; `None` if there is
    /// no such tile or a thread panicked while holding it (its values may be half-folded).
    pub fn lock(&self, t: usize) -> Option<TileGuard<'_>> {
        let guard = self.tiles.get(t)?.lock().ok()?;
        let start = t * TILE;
        let len = TILE.min(self.len - start);
        Some(TileGuard {
            _guard: guard,
            // SAFETY: `start + len <= self.len`: inside the live buffer.
            ptr: unsafe { self.ptr.add(start) },
            len,
        })
    }

    /// Whether a thread panicked while holding one of the tiles.
    pub fn is_poisoned(&self) -> bool {
        self.tiles.iter().any(Mutex::is_poisoned)
    }

    /// The whole sum, back as the `Vec` it was built from.
    pub fn into_vec(self) -> Vec<i64> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the parts are those of the `Vec` taken apart in `zeroed`, and `this` is never
        // dropped, so the buffer is owned by exactly one `Vec` again. The tiles' mutexes are
        // dropped below without being locked (we own `self`: no guard can be alive).
        let v = unsafe { Vec::from_raw_parts(this.ptr, this.len, this.capacity) };
        drop(unsafe { std::ptr::read(&this.tiles) });
        v
    }
}

impl Drop for TiledSum {
    fn drop(&mut self) {
        // SAFETY: as in `into_vec`; `drop` runs only when `into_vec` did not.
        drop(unsafe { Vec::from_raw_parts(self.ptr, self.len, self.capacity) });
    }
}

/// A locked tile: its elements, reachable only through the guard (so no slice outlives the
/// lock).
pub struct TileGuard<'a> {
    _guard: MutexGuard<'a, ()>,
    ptr: *mut i64,
    len: usize,
}

impl std::ops::Deref for TileGuard<'_> {
    type Target = [i64];
    fn deref(&self) -> &[i64] {
        // SAFETY: `len` elements of the tile, disjoint from every other tile's; the tile's mutex
        // is held for as long as `self` lives, and the returned borrow cannot outlive `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for TileGuard<'_> {
    fn deref_mut(&mut self) -> &mut [i64] {
        // SAFETY: as in `deref`; `&mut self` makes this the only borrow of the tile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Touches every page of a fresh accumulator so that the page faults (the kernel zeroing them)
/// happen when the round starts, not inside the first upload; asks for transparent huge pages
/// first, which turns some 100,000 faults for a 50M-parameter model (about 0.16 s here) into a
/// couple of hundred (about 0.04 s).
fn prefault(v: &mut [i64]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(v);
        let aligned = start.next_multiple_of(HUGE);
        if end > aligned + HUGE {
            // SAFETY: madvise only advises the kernel about pages inside this live allocation
            // (rounded inwards to whole huge pages); it changes no contents. An error (THP
            // disabled, an old kernel) leaves ordinary pages, which is fine.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    (end - aligned) / HUGE * HUGE,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    for word in v.iter_mut().step_by(4096 / size_of::<i64>()) {
        // black_box: the compiler knows the allocation is zeroed and would drop a plain store.
        *word = std::hint::black_box(0);
    }
}

/// Adding 1.5 · 2⁵² to an f64 of magnitude below 2⁵¹ gives a number whose last mantissa bit is
/// worth exactly 1: the addition itself rounds to the nearest integer (ties to even), and that
/// integer is the difference of the bit patterns. This converts without a per-element branch, so
/// the compiler vectorises it on any x86-64 (there is no packed f64→i64 conversion before
/// AVX-512).
const MAGIC: f64 = 6_755_399_441_055_744.0;

/// `round(x · ws)` as an integer, ties to even; exact for `|x · ws| < 2⁵¹`.
#[inline(always)]
pub fn quantize(x: f32, ws: f64) -> i64 {
    ((f64::from(x) * ws + MAGIC).to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64)
}

/// Runs `$body` (an `#[inline(always)]` loop) through a copy compiled for AVX-512 or AVX2 when
/// the CPU has it: the same source, so the same arithmetic in the same order and the same bits,
/// only wider vectors. (The workspace builds for baseline x86-64, whose SSE2 does two f64 lanes.)
macro_rules! dispatch {
    (fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports these features, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(fn fold_le(sum: &mut [i64], x: &[[u8; 4]], ws: f64) => fold_le_body);
dispatch!(fn unfold_le(sum: &mut [i64], x: &[[u8; 4]], ws: f64) => unfold_le_body);
dispatch!(fn sum_of_squares_le(x: &[[u8; 4]]) -> f64 => sum_of_squares_le_body);
dispatch!(fn sum_of_squares(values: &[f32]) -> f64 => sum_of_squares_body);

/// `sum[i] += round(x[i] · ws)`, `x` little-endian f32.
#[inline(always)]
fn fold_le_body(sum: &mut [i64], x: &[[u8; 4]], ws: f64) {
    for (s, b) in sum.iter_mut().zip(x) {
        *s = s.wrapping_add(quantize(f32::from_le_bytes(*b), ws));
    }
}

/// `sum[i] -= round(x[i] · ws)`: exactly undoes [`fold_le`].
#[inline(always)]
fn unfold_le_body(sum: &mut [i64], x: &[[u8; 4]], ws: f64) {
    for (s, b) in sum.iter_mut().zip(x) {
        *s = s.wrapping_sub(quantize(f32::from_le_bytes(*b), ws));
    }
}

/// Σ x² in f64 over little-endian f32 (the stream's bytes).
#[inline(always)]
fn sum_of_squares_le_body(x: &[[u8; 4]]) -> f64 {
    sum_of_squares_lanes(x, f32::from_le_bytes)
}

/// Σ x² in f64 over decoded values (the filters' path).
#[inline(always)]
fn sum_of_squares_body(values: &[f32]) -> f64 {
    sum_of_squares_lanes(values, |v| v)
}

/// Σ value(x)² in f64. Sixteen independent lanes, so the loop vectorises and its additions
/// overlap; every path adds the same numbers in the same order (no fused multiply-add: Rust does
/// not contract), so bytes and decoded values, and every dispatch path, give the same bits.
#[inline(always)]
fn sum_of_squares_lanes<T: Copy>(x: &[T], value: impl Fn(T) -> f32) -> f64 {
    let (chunks, rest) = x.as_chunks::<16>();
    let mut lanes = [0f64; 16];
    for c in chunks {
        for j in 0..16 {
            let v = f64::from(value(c[j]));
            lanes[j] += v * v;
        }
    }
    for (j, x) in rest.iter().enumerate() {
        let v = f64::from(value(*x));
        lanes[j] += v * v;
    }
    lanes.iter().sum()
}

/// Decodes little-endian f32.
pub fn decode_le(x: &[[u8; 4]]) -> Vec<f32> {
    x.iter().map(|b| f32::from_le_bytes(*b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(values: &[f32]) -> Vec<[u8; 4]> {
        values.iter().map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn every_dispatch_path_gives_the_same_bits() {
        let v: Vec<f32> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) % 10_007) as f32 * 1.37e-3 - 6.1)
            .collect();
        let bytes = le(&v);
        for n in [0, 1, 15, 16, 17, 999, 1000] {
            let want = sum_of_squares_le_body(&bytes[..n]).to_bits();
            assert_eq!(sum_of_squares_le(&bytes[..n]).to_bits(), want);
            assert_eq!(sum_of_squares(&v[..n]).to_bits(), want);
            let mut a = vec![7i64; n];
            let mut b = a.clone();
            fold_le(&mut a, &bytes[..n], 3.0 * 2f64.powi(40));
            fold_le_body(&mut b, &bytes[..n], 3.0 * 2f64.powi(40));
            assert_eq!(a, b);
        }
    }

    #[test]
    fn fold_then_unfold_restores_the_sum_bit_for_bit() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.123_457).collect();
        let bytes = le(&x);
        let original: Vec<i64> = (0..37).map(|i| i * 1_000_003 - 5).collect();
        let mut sum = original.clone();
        let ws = 3.0 * 2f64.powi(40);
        fold_le(&mut sum, &bytes, ws);
        assert_ne!(sum, original);
        assert_eq!(sum[0] - original[0], quantize(x[0], ws));
        unfold_le(&mut sum, &bytes, ws);
        assert_eq!(sum, original);
    }

    #[test]
    fn quantize_rounds_to_nearest_even_across_the_range() {
        assert_eq!(quantize(1.5, 1.0), 2);
        assert_eq!(quantize(2.5, 1.0), 2);
        assert_eq!(quantize(-2.5, 1.0), -2);
        assert_eq!(quantize(-0.4, 1.0), 0);
        assert_eq!(quantize(-1.0, 3.0), -3);
        let big = (1u64 << 50) as f64;
        assert_eq!(quantize(1.0, big), 1i64 << 50);
        assert_eq!(quantize(-1.0, big), -(1i64 << 50));
        assert_eq!(quantize(0.75, big), 3i64 << 48);
    }

    #[test]
    fn tiles_cover_the_sum_once_and_give_it_back() {
        let len = 2 * TILE + 5;
        let sum = TiledSum::zeroed(len);
        assert_eq!(sum.len(), len);
        let mut seen = 0;
        for t in 0.. {
            let Some(mut tile) = sum.lock(t) else { break };
            assert_eq!(tile.len(), if t < 2 { TILE } else { 5 });
            assert!(tile.iter().all(|&v| v == 0));
            for (i, v) in tile.iter_mut().enumerate() {
                *v = (t * TILE + i) as i64;
            }
            seen += tile.len();
        }
        assert_eq!(seen, len);
        assert!(!sum.is_poisoned());
        let v = sum.into_vec();
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as i64));
    }

    #[test]
    fn two_threads_fold_into_the_same_tiles_without_losing_a_value() {
        let len = 3 * TILE + 11;
        let sum = TiledSum::zeroed(len);
        let ones = le(&vec![1.0f32; len]);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..50 {
                        for t in 0..len.div_ceil(TILE) {
                            let mut tile = sum.lock(t).unwrap();
                            let n = tile.len();
                            fold_le(&mut tile, &ones[t * TILE..t * TILE + n], 1.0);
                        }
                    }
                });
            }
        });
        assert!(sum.into_vec().iter().all(|&v| v == 100));
    }
}
