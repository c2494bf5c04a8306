//! A round's aggregation: the one seam every way of combining updates plugs into.
//!
//! A round opens one [`RoundAggregation`] (chosen once per job, from its spec, by
//! [`plan::JobAggregation`] — nowhere else names a concrete aggregation). The task router asks it
//! for a [`SiteSink`] per upload ([`RoundAggregation::open`]): the stream decoder's `TensorSink`,
//! which runs every value through the [`filter`] chain (finite values, the job's filters such as
//! central DP's clip, the round's norm bound) and hands the result to the implementation. At the
//! round's end, [`RoundAggregation::finish`] turns what was accepted into the round's mean delta
//! ([`RoundResult`]) and its report (which sites a robust rule excluded or trimmed); the job's
//! release steps ([`plan::ReleaseStep`], central DP's noise) then act on it before the strategy
//! makes the next global model.
//!
//! The implementations:
//! - [`streaming::RoundAggregator`]: FedAvg's weighted sum, folded in exact fixed-point integers
//!   as the chunks arrive (memory: one sum for the round, never an update);
//! - [`buffered::BufferedAggregator`]: each update spooled to disk, encrypted at rest, then
//!   combined tensor by tensor by a [`robust`] rule (coordinate-wise median, trimmed mean,
//!   Multi-Krum), streaming from the spools (memory: one tensor × sites).
//!
//! - [`masked::MaskedAggregation`]: secure aggregation (SecAgg+): the sites' masked inputs summed
//!   in `Z_2^64`, unmasked after the protocol's last phase (memory: the masked sum, and one
//!   upload's masked input while it streams). Its extra round trips (key exchange, unmasking)
//!   are further states of the engine's round (`engine::round`), driven through
//!   [`RoundAggregation::masked`], not branches inside the others.

use std::sync::Arc;

use tutela_protocol::stream::{SinkError, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

pub mod bench;
pub mod bench_rules;
pub mod buffered;
pub mod filter;
pub mod masked;
pub mod plan;
pub mod robust;
pub mod streaming;
pub mod tiled;

pub use buffered::BufferedAggregator;
pub use filter::{
    FilterPass, FiniteValues, NormBound, NormPass, Refusal, UpdateFilter, UpdateInfo, ValuesAt,
};
pub use robust::{RobustReport, RobustRule};
pub use streaming::{
    AggregatorOptions, BLOCK, DEFAULT_MAX_WEIGHT, RoundAggregator, SpoolPool, UpdateSink,
};

/// The manifest metadata key carrying a site's training sample count (its FedAvg weight).
pub const SAMPLES_KEY: &str = tutela_protocol::federation::meta::SAMPLES;

/// One round's aggregation: opens a sink per site's update, and finishes the round.
///
/// Shared by the round's uploads behind an [`Arc`]; every [`SiteSink`] holds a reference, so
/// [`finish`](RoundAggregation::finish) refuses while an upload is still in flight.
pub trait RoundAggregation: Send + Sync + 'static {
    /// A short name for logs and the round's report: `"fedavg"`, `"median"`, ...
    fn name(&self) -> &'static str;
    /// A sink for `site`'s update, weighted by `weight` (its sample count) where the
    /// aggregation weighs updates. An unacceptable weight is refused when the stream begins.
    fn open(self: Arc<Self>, site: String, weight: f64) -> SiteSink;
    /// Updates committed so far, in arrival order.
    fn accepted(&self) -> Vec<AcceptedUpdate>;
    /// Uploads that began and have neither committed nor been dropped.
    fn in_flight(&self) -> usize;
    /// The protocol phases of a secure aggregation round, which the engine runs around the
    /// uploads; `None` (the default) for an aggregation that only takes uploads.
    fn masked(&self) -> Option<&dyn masked::PhasedRound> {
        None
    }
    /// The round's mean delta and report. Every upload must be over.
    fn finish(self: Arc<Self>) -> Result<FinishedRound, AggregateError>;
}

/// One upload's side of an aggregation: [`TensorSink`] in a form that can be boxed (its
/// `commit` takes the box).
pub trait UpdateReceiver: Send + 'static {
    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError>;
    fn write(&mut self, tensor_index: usize, offset: u64, data: &[u8]) -> Result<(), SinkError>;
    fn commit(self: Box<Self>, digest: &[u8; 32]) -> Result<AcceptedUpdate, SinkError>;
}

impl<T: TensorSink<Output = AcceptedUpdate>> UpdateReceiver for T {
    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        TensorSink::begin(self, manifest)
    }
    fn write(&mut self, tensor_index: usize, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        TensorSink::write(self, tensor_index, offset, data)
    }
    fn commit(self: Box<Self>, digest: &[u8; 32]) -> Result<AcceptedUpdate, SinkError> {
        TensorSink::commit(*self, digest)
    }
}

/// The sink of one site's update into a round's aggregation, whichever it is. Dropped without a
/// commit, it takes back everything of the update.
pub struct SiteSink(Box<dyn UpdateReceiver>);

impl SiteSink {
    pub fn new(receiver: impl UpdateReceiver) -> Self {
        SiteSink(Box::new(receiver))
    }
}

impl TensorSink for SiteSink {
    type Output = AcceptedUpdate;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        self.0.begin(manifest)
    }
    fn write(&mut self, tensor_index: usize, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        self.0.write(tensor_index, offset, data)
    }
    fn commit(self, digest: &[u8; 32]) -> Result<AcceptedUpdate, SinkError> {
        self.0.commit(digest)
    }
}

/// A finished round: its mean delta, and what a robust rule reports of it.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedRound {
    pub result: RoundResult,
    /// Which sites a robust rule excluded or trimmed most; `None` for the weighted sum.
    pub robust: Option<RobustReport>,
}

/// Why an aggregator could not be built or could not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("the global model has no tensors: there is nothing to aggregate")]
    EmptyModel,
    #[error(
        "global tensor {name:?} is {dtype}; updates are F32 deltas, so every tensor of the global model must be F32"
    )]
    NotF32 { name: String, dtype: DType },
    #[error("global tensor {name:?} has {elements} elements, more than this machine can address")]
    TooLarge { name: String, elements: u64 },
    #[error("the norm bound must be a positive finite number, not {0}")]
    InvalidNormBound(f64),
    #[error("max_weight must be a positive finite number, not {0}")]
    InvalidMaxWeight(f64),
    #[error(
        "norm bound {norm_bound} × max_weight {max_weight} is outside the range fixed-point aggregation can represent"
    )]
    ScaleOutOfRange { norm_bound: f64, max_weight: f64 },
    #[error("no update was accepted in this round")]
    NothingAccepted,
    #[error("{0} upload(s) still hold the round's aggregator: finish them or drop them first")]
    InFlight(usize),
    #[error("the round's aggregate is unusable: {0}")]
    Poisoned(String),
    #[error(
        "{rule} needs at least {need} accepted updates to tolerate a Byzantine site (with fewer, one site moves the result at will), the round has {have}"
    )]
    TooFewForRule {
        rule: String,
        need: usize,
        have: usize,
    },
    #[error(
        "{rule} trims nothing at any number of updates: it is the plain mean, which one site moves at will"
    )]
    NeverRobust { rule: String },
    #[error("the round's update spool: {0}")]
    Spool(String),
    #[error("secure aggregation: {0}")]
    SecureAggregation(String),
}

/// The element count of each tensor of the global model, which must all be F32 (updates are F32
/// deltas) and addressable.
pub(crate) fn f32_tensor_lens(global: &Manifest) -> Result<Vec<usize>, AggregateError> {
    if global.is_empty() {
        return Err(AggregateError::EmptyModel);
    }
    global
        .tensors()
        .iter()
        .map(|t| {
            if t.dtype != DType::F32 {
                return Err(AggregateError::NotF32 {
                    name: t.name.clone(),
                    dtype: t.dtype,
                });
            }
            let elements = t.numel().unwrap_or(u64::MAX);
            usize::try_from(elements).map_err(|_| AggregateError::TooLarge {
                name: t.name.clone(),
                elements,
            })
        })
        .collect()
}

/// An update that was folded into the round and committed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AcceptedUpdate {
    pub site: String,
    pub weight: f64,
    /// The tensor stream's SHA-256 digest, hex.
    pub digest: String,
    /// L2 norm of the update after the filters.
    pub l2_norm: f64,
    /// The factor it was folded with under central DP's clipping, `min(1, C / l2_norm)`; 1
    /// without central DP.
    #[serde(default = "one")]
    pub clip_factor: f64,
}

fn one() -> f64 {
    1.0
}

/// The outcome of a round: the weighted mean of the accepted deltas.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundResult {
    /// The global model's tensors, in order; `mean_delta[i]` belongs to `tensors[i]`.
    pub tensors: Vec<TensorSpec>,
    /// Σ wᵢ·Δᵢ / Σ wᵢ per tensor, flat (row-major). f64: the strategy adds it to the f32 model
    /// (or feeds it to its optimiser) with one rounding, not two.
    pub mean_delta: Vec<Vec<f64>>,
    /// Sorted by site, then digest, so the result does not depend on arrival order.
    pub accepted: Vec<AcceptedUpdate>,
    pub total_weight: f64,
}
