//! The streaming weighted sum: FedAvg's aggregation, folded as updates arrive.
//!
//! A site's update (local weights − global weights, F32 tensors named and shaped like the global
//! model) arrives as a chunked tensor stream. [`RoundAggregator::update_sink`] gives the stream
//! decoder an [`UpdateSink`] that folds every chunk into the round's running weighted sum *as it
//! arrives*: memory holds one accumulator for the round and one [`BLOCK`] of values per upload in
//! flight, never a whole update, so it does not grow with the number of sites.
//!
//! # Every value passes the filters before it is folded
//!
//! An update goes through a chain of [`UpdateFilter`]s, block by block, before any of its values
//! reach the sum: first [`FiniteValues`], then the filters given in [`AggregatorOptions::filters`]
//! (central DP's clip), last [`NormBound`](super::NormBound), so the bound holds for
//! exactly what is folded. (Without other filters, [`FiniteValues`] is left out: the norm bound
//! refuses a NaN or an infinity too, naming it the same way, and one pass over the values is
//! saved.) The norm bound is always last and not optional: the fixed-point range
//! below relies on it, and its running norm is the one recorded in [`AcceptedUpdate::l2_norm`].
//! The global model's names, dtypes and shapes are checked in [`TensorSink::begin`](tutela_protocol::stream::TensorSink::begin), before the
//! first chunk.
//!
//! # Accumulation: fixed-point integers
//!
//! The running sum is kept in `i64` fixed point: a value `x` of an update with weight `w` adds
//! `round(x · w · S)`, where the scale `S` is a power of two chosen per round from the norm bound
//! `B` and the largest weight allowed ([`AggregatorOptions::max_weight`]) so that one
//! contribution stays under 2⁵⁰ and the sum of all accepted ones under 2⁶². We chose this over
//! `f64` (same 8 bytes per parameter, so the same memory traffic) and `f32` because:
//!
//! - **Undo is exact.** A refusal can come after part of an update was folded: the norm bound is
//!   crossed in a later chunk, or the decoder finds the digest wrong or the stream truncated at the
//!   end. Subtracting the same integers again restores the sum bit for bit; in floating point,
//!   `(a + c) − c` is not `a`.
//! - **The sum does not depend on arrival order.** Integer addition is associative, so concurrent
//!   uploads give the same bits as sequential ones, and anyone holding the accepted updates can
//!   recompute the round's model — and its digest in the lineage — exactly.
//! - **It is the ring secure aggregation works in.** Additive masks cancel exactly only in integer
//!   arithmetic modulo 2ⁿ; the sum already uses wrapping `i64` arithmetic, so masked updates can be
//!   folded by this same accumulator.
//!
//! The price is resolution: one unit of the sum is `1/S`, so the mean's rounding error per
//! element is at most `n / (2 · S · W)` for `n` updates of total weight `W`. With the default
//! `max_weight` of 2²⁴ samples and a norm bound of 1 that is 7.5 · 10⁻⁹ when every weight is 1 and
//! below 10⁻¹¹ for sample counts in the thousands — under the f32 rounding of the model weights the
//! delta is later added to. A round that weighs every site equally should set `max_weight = 1`.
//!
//! `f32` accumulation would move 12 instead of 20 bytes per parameter. Alone, its fold loop is
//! about 1.6× faster ([`bench`](mod@bench) measures both in the same run), but in an upload the
//! fold is about a sixth of the time (the spool below is a third), so it would gain some 6%, and
//! lose all three properties above.
//!
//! # Undo: a spool of what was folded
//!
//! Each upload in flight writes the values it folded to an anonymous temporary file (on disk, in
//! [`AggregatorOptions::spool_dir`]; the coordinator holds updates, never site data). An upload
//! dropped without a commit reads its spool back and subtracts it. If that fails (an I/O error),
//! the round is marked unusable and [`RoundAggregator::finish`] refuses to produce a model from
//! it. Spool files are reused by later uploads and rounds ([`SpoolPool`]), so their pages in the
//! page cache are not allocated anew for every update. Writing the spool is the largest single
//! cost of an upload (`tutela bench aggregate` measures it on its own); it is the price of exact
//! undo without holding updates in memory.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tutela_protocol::stream::SinkError;
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

use super::filter::{FiniteValues, UpdateFilter, WeightFrom};
use super::tiled::{self, TILE, TiledSum, fold_le, unfold_le};
use super::{AcceptedUpdate, AggregateError, RoundResult};

mod sink;
pub use sink::UpdateSink;

/// Default for [`AggregatorOptions::max_weight`]: 2²⁴ ≈ 16.8 million samples per update.
pub const DEFAULT_MAX_WEIGHT: f64 = 16_777_216.0;

/// Elements an upload validates, spools and folds at a time: one tile of the running sum
/// ([`tiled::TILE`]), 256 KiB of f32 input, which stays in the L2 cache from the norm check to the
/// fold, so only the input and the running sum travel to and from memory. It is also at most the
/// memory each upload in flight holds besides the sum (and only when filters rewrite values).
pub const BLOCK: usize = TILE;

/// Largest magnitude of one contribution `x · w · S` (below the 2⁵¹ the conversion allows).
const CONTRIBUTION_LIMIT: f64 = (1u64 << 50) as f64;

/// Largest magnitude of the sum of accepted contributions (half the `i64` range, leaving room for
/// each update's rounding and for the float error in the weight bookkeeping).
const SUM_LIMIT: f64 = (1u64 << 62) as f64;

/// Spool files kept between uploads and between rounds.
///
/// A fresh file's pages have to be allocated in the page cache as it is written and freed again
/// when it is deleted, which costs about as much as the writes themselves; a reused file's pages
/// are already there. A file is created only when none is idle, so the pool never holds more
/// files than were in use at once: the disk it keeps (a model's size per file) is what the
/// busiest moment of a round needed anyway. The coordinator keeps one pool for its lifetime.
#[derive(Debug, Default)]
pub struct SpoolPool {
    dir: Option<PathBuf>,
    idle: Mutex<Vec<File>>,
}

impl SpoolPool {
    /// Spool files go to anonymous temporary files in `dir` (the system's temporary directory if
    /// `None`): deleted from the start, so nothing is left behind by a crash.
    pub fn new(dir: Option<PathBuf>) -> Arc<Self> {
        Arc::new(SpoolPool {
            dir,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle file, or a new one, positioned at its start.
    fn take(&self) -> io::Result<File> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut file = match idle {
            Some(f) => f,
            None => match &self.dir {
                Some(dir) => tempfile::tempfile_in(dir)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?,
                None => tempfile::tempfile()?,
            },
        };
        file.seek(SeekFrom::Start(0))?;
        Ok(file)
    }

    fn give_back(&self, file: File) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(file);
    }
}

/// How a round's aggregator is set up.
#[derive(Clone)]
pub struct AggregatorOptions {
    /// Largest L2 norm an update may have.
    pub norm_bound: f64,
    /// Largest weight (sample count) one update may carry. Together with the norm bound it fixes
    /// the fixed-point scale: a lower value gives finer resolution (see the module comment).
    pub max_weight: f64,
    /// Where uploads in flight spool what they folded; the system's temporary directory if
    /// `None`. Needs up to one model's size of disk per upload in flight. Ignored when
    /// `spool_pool` is given.
    pub spool_dir: Option<PathBuf>,
    /// Spool files shared with other rounds (the coordinator's); without one, the round keeps
    /// its own for its uploads.
    pub spool_pool: Option<Arc<SpoolPool>>,
    /// Filters run after [`FiniteValues`] and before the norm bound, in order.
    pub filters: Vec<Arc<dyn UpdateFilter>>,
    /// Every update is folded with weight 1, whatever its sink was given (central DP's
    /// DP-FedAvg: one site moves the sum by at most its clipped norm).
    pub unit_weights: bool,
}

impl AggregatorOptions {
    pub fn new(norm_bound: f64) -> Self {
        AggregatorOptions {
            norm_bound,
            max_weight: DEFAULT_MAX_WEIGHT,
            spool_dir: None,
            spool_pool: None,
            filters: Vec::new(),
            unit_weights: false,
        }
    }
}

impl std::fmt::Debug for AggregatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregatorOptions")
            .field("norm_bound", &self.norm_bound)
            .field("max_weight", &self.max_weight)
            .field("spool_dir", &self.spool_dir)
            .field(
                "filters",
                &self.filters.iter().map(|f| f.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(Default)]
struct Ledger {
    accepted: Vec<AcceptedUpdate>,
    contributed: HashSet<String>,
    in_flight: HashSet<String>,
    accepted_weight: f64,
    reserved_weight: f64,
    poisoned: Option<String>,
}

/// The running weighted sum of one round, shared by all its uploads (wrap it in an [`Arc`]).
pub struct RoundAggregator {
    tensors: Vec<TensorSpec>,
    /// Elements per tensor.
    lens: Vec<usize>,
    total_elements: u64,
    /// One running sum per tensor, one lock per tile of it: uploads folding different tiles do
    /// not wait for each other.
    acc: Vec<TiledSum>,
    /// [`FiniteValues`] and the options' filters (none if the options have none); the norm
    /// bound runs after them.
    filters: Vec<Arc<dyn UpdateFilter>>,
    /// Whether any filter looks at the values: if none does, uploads take the fast path (the
    /// norm checked on the little-endian bytes, no decoding).
    filters_read_values: bool,
    norm_bound: f64,
    max_weight: f64,
    /// The fixed-point scale `S`, a power of two.
    scale: f64,
    /// Largest total accepted weight for which the sum cannot overflow.
    weight_capacity: f64,
    spools: Arc<SpoolPool>,
    /// [`AggregatorOptions::unit_weights`].
    unit_weights: bool,
    ledger: Mutex<Ledger>,
}

impl std::fmt::Debug for RoundAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundAggregator")
            .field("tensors", &self.tensors.len())
            .field("elements", &self.total_elements)
            .field("scale", &self.scale)
            .field("max_weight", &self.max_weight)
            .finish_non_exhaustive()
    }
}

impl RoundAggregator {
    /// An aggregator for updates of `global`, refusing any whose L2 norm exceeds `norm_bound`,
    /// with the default options otherwise.
    pub fn new(global: &Manifest, norm_bound: f64) -> Result<Arc<Self>, AggregateError> {
        Self::with_options(global, AggregatorOptions::new(norm_bound))
    }

    pub fn with_options(
        global: &Manifest,
        options: AggregatorOptions,
    ) -> Result<Arc<Self>, AggregateError> {
        if global.is_empty() {
            return Err(AggregateError::EmptyModel);
        }
        let b = options.norm_bound;
        if !(b.is_finite() && b > 0.0) {
            return Err(AggregateError::InvalidNormBound(b));
        }
        let w = options.max_weight;
        if !(w.is_finite() && w > 0.0) {
            return Err(AggregateError::InvalidMaxWeight(w));
        }
        let scale = fixed_point_scale(b, w).ok_or(AggregateError::ScaleOutOfRange {
            norm_bound: b,
            max_weight: w,
        })?;
        let mut lens = Vec::with_capacity(global.len());
        let mut acc = Vec::with_capacity(global.len());
        for t in global.tensors() {
            if t.dtype != DType::F32 {
                return Err(AggregateError::NotF32 {
                    name: t.name.clone(),
                    dtype: t.dtype,
                });
            }
            let elements = t.numel().unwrap_or(u64::MAX);
            let too_large = || AggregateError::TooLarge {
                name: t.name.clone(),
                elements,
            };
            let n = usize::try_from(elements).map_err(|_| too_large())?;
            n.checked_mul(8).ok_or_else(too_large)?;
            lens.push(n);
            acc.push(TiledSum::zeroed(n));
        }
        // FiniteValues guarantees the other filters finite input. With none that reads values,
        // it would only repeat what the norm bound already refuses (a NaN or infinity makes the
        // norm non-finite) at the cost of another pass over every value.
        let filters_read_values = options.filters.iter().any(|f| f.reads_values());
        let mut filters: Vec<Arc<dyn UpdateFilter>> = Vec::with_capacity(options.filters.len() + 1);
        if filters_read_values {
            filters.push(Arc::new(FiniteValues));
        }
        filters.extend(options.filters);
        Ok(Arc::new(RoundAggregator {
            tensors: global.tensors().to_vec(),
            total_elements: lens.iter().map(|&n| n as u64).sum(),
            lens,
            acc,
            filters,
            filters_read_values,
            norm_bound: b,
            max_weight: w,
            scale,
            weight_capacity: SUM_LIMIT / (b * scale),
            spools: options
                .spool_pool
                .unwrap_or_else(|| SpoolPool::new(options.spool_dir)),
            unit_weights: options.unit_weights,
            ledger: Mutex::new(Ledger::default()),
        }))
    }

    /// A sink for `site`'s update, folded with `weight` (its sample count for FedAvg). An
    /// unacceptable weight is refused, with the reason, when the stream begins.
    pub fn update_sink(self: &Arc<Self>, site: String, weight: f64) -> UpdateSink {
        UpdateSink::new(self.clone(), site, WeightFrom::Fixed(weight))
    }

    /// A sink for `site`'s update weighted by the sample count its manifest declares under
    /// [`SAMPLES_KEY`]: for an upload handler that learns the weight from the stream itself.
    pub fn update_sink_by_samples(self: &Arc<Self>, site: String) -> UpdateSink {
        UpdateSink::new(self.clone(), site, WeightFrom::Samples)
    }

    /// The global model's tensors, in order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The fixed-point scale `S`: one unit of the running sum is worth `1/S`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Bytes of the running sum (8 per parameter): the aggregator's own memory besides one
    /// [`BLOCK`] per upload in flight.
    pub fn accumulator_bytes(&self) -> u64 {
        self.total_elements * 8
    }

    /// Updates committed so far, in arrival order.
    pub fn accepted(&self) -> Vec<AcceptedUpdate> {
        self.ledger().accepted.clone()
    }

    /// Uploads that began and have neither committed nor been dropped.
    pub fn in_flight(&self) -> usize {
        self.ledger().in_flight.len()
    }

    /// The weighted mean of the accepted updates. Every upload must be over (committed or
    /// dropped): an [`UpdateSink`] still alive holds the aggregator, and finishing refuses.
    pub fn finish(self: Arc<Self>) -> Result<RoundResult, AggregateError> {
        let this = Arc::try_unwrap(self)
            .map_err(|shared| AggregateError::InFlight(Arc::strong_count(&shared) - 1))?;
        let ledger = this
            .ledger
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = ledger.poisoned {
            return Err(AggregateError::Poisoned(why));
        }
        if ledger.accepted.is_empty() {
            return Err(AggregateError::NothingAccepted);
        }
        let mut accepted = ledger.accepted;
        accepted.sort_by(|a, b| (&a.site, &a.digest).cmp(&(&b.site, &b.digest)));
        // Summed in a fixed order so that the float total, too, ignores arrival order.
        let mut weights: Vec<f64> = accepted.iter().map(|u| u.weight).collect();
        weights.sort_by(f64::total_cmp);
        let total_weight: f64 = weights.iter().sum();
        let unit = 1.0 / (this.scale * total_weight);
        let mut mean_delta = Vec::with_capacity(this.acc.len());
        for (t, sum) in this.tensors.iter().zip(this.acc) {
            if sum.is_poisoned() {
                return Err(AggregateError::Poisoned(format!(
                    "a thread panicked while folding into tensor {:?}",
                    t.name
                )));
            }
            // i64 → f64 in place (same size and alignment: the collect reuses the buffer).
            mean_delta.push(
                sum.into_vec()
                    .into_iter()
                    .map(|s| s as f64 * unit)
                    .collect(),
            );
        }
        Ok(RoundResult {
            tensors: this.tensors,
            mean_delta,
            accepted,
            total_weight,
        })
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The ledger's invariants hold between statements that cannot panic; a poisoned lock
        // still holds a consistent ledger.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tile `tile` of tensor `tensor`'s running sum, locked.
    fn lock_tile(&self, tensor: usize, tile: usize) -> Result<tiled::TileGuard<'_>, SinkError> {
        let sum = self
            .acc
            .get(tensor)
            .ok_or_else(|| io::Error::other(format!("no tensor #{tensor} in the global model")))?;
        sum.lock(tile).ok_or_else(|| {
            SinkError::Io(io::Error::other(format!(
                "tile {tile} of the running sum of tensor {:?} is missing or was left inconsistent by a panic",
                self.tensors[tensor].name
            )))
        })
    }

    /// Subtracts the first `folded` values of an update, read back from its spool.
    fn take_back(&self, spool: &mut File, folded: u64, ws: f64) -> Result<(), SinkError> {
        self.rescale(spool, folded, ws, 0.0)
    }

    /// Replaces the first `folded` values of an update, folded with `ws`, by the same values
    /// folded with `new_ws`, read back from its spool. Exact in the fixed-point sum: the
    /// subtraction ([`tiled::unfold_le`]) is [`tiled::fold_le`]'s inverse bit for bit, and
    /// `new_ws = 0` folds nothing.
    fn rescale(
        &self,
        spool: &mut File,
        folded: u64,
        ws: f64,
        new_ws: f64,
    ) -> Result<(), SinkError> {
        spool.seek(SeekFrom::Start(0))?;
        let mut bytes = vec![[0u8; 4]; BLOCK];
        let mut left = folded;
        for (tensor, &len) in self.lens.iter().enumerate() {
            let mut element = 0usize;
            while left > 0 && element < len {
                // The spool was written in the same tile-aligned runs, in the same order.
                let tile = element / TILE;
                let n = (len - element)
                    .min((tile + 1) * TILE - element)
                    .min(usize::try_from(left).unwrap_or(BLOCK));
                let run = &mut bytes[..n];
                spool.read_exact(run.as_flattened_mut())?;
                let mut guard = self.lock_tile(tensor, tile)?;
                let offset = element - tile * TILE;
                let target = guard
                    .get_mut(offset..offset + n)
                    .ok_or_else(|| io::Error::other("spool longer than the tensor"))?;
                unfold_le(target, run, ws);
                if new_ws != 0.0 {
                    fold_le(target, run, new_ws);
                }
                element += n;
                left -= n as u64;
            }
        }
        Ok(())
    }
}

/// The largest power of two `S` with `norm_bound · max_weight · S ≤ 2⁵⁰`.
fn fixed_point_scale(norm_bound: f64, max_weight: f64) -> Option<f64> {
    let span = norm_bound * max_weight;
    if !(span.is_finite() && span > 0.0) {
        return None;
    }
    let mut exp = (CONTRIBUTION_LIMIT / span).log2().floor() as i32;
    // log2 can be off by one ulp at exact powers of two: settle the exponent by checking.
    while span * 2f64.powi(exp) > CONTRIBUTION_LIMIT {
        exp -= 1;
    }
    while span * 2f64.powi(exp + 1) <= CONTRIBUTION_LIMIT {
        exp += 1;
    }
    let scale = 2f64.powi(exp);
    (scale.is_normal() && (SUM_LIMIT / (norm_bound * scale)).is_finite()).then_some(scale)
}

impl super::RoundAggregation for RoundAggregator {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn open(self: Arc<Self>, site: String, weight: f64) -> super::SiteSink {
        super::SiteSink::new(self.update_sink(site, weight))
    }

    fn accepted(&self) -> Vec<AcceptedUpdate> {
        RoundAggregator::accepted(self)
    }

    fn in_flight(&self) -> usize {
        RoundAggregator::in_flight(self)
    }

    fn finish(self: Arc<Self>) -> Result<super::FinishedRound, AggregateError> {
        Ok(super::FinishedRound {
            result: RoundAggregator::finish(self)?,
            robust: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tiled::sum_of_squares;

    #[test]
    fn scale_keeps_the_largest_contribution_under_two_to_the_fifty() {
        for (b, w) in [
            (1.0, 1.0),
            (10.0, DEFAULT_MAX_WEIGHT),
            (0.3, 7.0),
            (1e-3, 1e6),
        ] {
            let s = fixed_point_scale(b, w).unwrap();
            assert!(b * w * s <= CONTRIBUTION_LIMIT, "{b} {w} {s}");
            assert!(
                b * w * s * 2.0 > CONTRIBUTION_LIMIT,
                "{b} {w} {s} not the largest"
            );
            assert_eq!(s.log2().fract(), 0.0, "not a power of two");
        }
        assert_eq!(fixed_point_scale(1.0, 1.0), Some(2f64.powi(50)));
        assert!(fixed_point_scale(f64::MAX, 1e300).is_none());
    }

    #[test]
    fn sum_of_squares_covers_the_remainder() {
        let v: Vec<f32> = (1..=11).map(|i| i as f32).collect();
        assert_eq!(
            sum_of_squares(&v),
            (1..=11).map(|i| (i * i) as f64).sum::<f64>()
        );
    }
}
