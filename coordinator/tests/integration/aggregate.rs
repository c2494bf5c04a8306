//! Streaming aggregation and strategies, through the public API and, where the stream matters
//! (digest mismatch, truncation), through the protocol's `StreamDecoder`.
//!
//! The aggregate is exact integer arithmetic on values fixed by the inputs, so "the aggregate
//! without the refused update" is compared bit for bit, not within a tolerance.

use std::sync::Arc;

use tutela_coordinator::aggregate::{
    AggregateError, AggregatorOptions, FilterPass, Refusal, RoundAggregator, RoundResult,
    SAMPLES_KEY, UpdateFilter, UpdateInfo, UpdateSink, ValuesAt,
};
use tutela_coordinator::strategy::{AdaptiveParams, FedOpt, Strategy, StrategyConfig};
use tutela_protocol::pb::{self, tensor_frame::Frame};
use tutela_protocol::stream::{SinkError, StreamDecoder, StreamDigest, StreamError, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

/// A two-tensor model: "w" of shape [2, 3] and "b" of shape [2].
fn model() -> Manifest {
    manifest(&[("w", DType::F32, &[2, 3]), ("b", DType::F32, &[2])])
}

fn manifest(tensors: &[(&str, DType, &[u64])]) -> Manifest {
    Manifest::new(
        tensors
            .iter()
            .map(|(n, d, s)| TensorSpec::new(*n, *d, s.to_vec()))
            .collect(),
        Default::default(),
    )
    .unwrap()
}

fn le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Streams `tensors` into `sink` in chunks of `chunk` bytes (any size: chunks may split an
/// element) and commits.
fn upload(
    mut sink: UpdateSink,
    m: &Manifest,
    tensors: &[Vec<f32>],
    chunk: usize,
) -> Result<(), SinkError> {
    sink.begin(m)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = le(t);
        for (c, piece) in bytes.chunks(chunk).enumerate() {
            sink.write(i, (c * chunk) as u64, piece)?;
        }
    }
    sink.commit(&[7u8; 32]).map(|_| ())
}

fn finish(agg: Arc<RoundAggregator>) -> RoundResult {
    agg.finish().unwrap()
}

fn update(seed: u32) -> Vec<Vec<f32>> {
    let v = |i: u32| ((seed * 31 + i * 17) % 23) as f32 * 0.01 - 0.11;
    vec![(0..6).map(v).collect(), (6..8).map(v).collect()]
}

/// The aggregate of `updates` (each with its weight), uploaded one after another.
fn aggregate_of(updates: &[(&str, f64, Vec<Vec<f32>>)]) -> RoundResult {
    let m = model();
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    for (site, w, u) in updates {
        upload(agg.update_sink(site.to_string(), *w), &m, u, 8).unwrap();
    }
    finish(agg)
}

fn rejected(r: Result<(), SinkError>) -> String {
    match r {
        Err(SinkError::Rejected(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn fedavg_of_three_updates_is_the_hand_computed_weighted_mean() {
    let m = model();
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    let a = vec![vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![0.5, -0.5]];
    let b = vec![vec![-1.0, 0.0, 1.0, 0.25, 0.0, 0.0], vec![1.0, 1.0]];
    let c = vec![vec![0.0, 0.0, 0.0, 0.0, 0.0, 3.0], vec![-2.0, 0.0]];
    upload(agg.update_sink("a".into(), 1.0), &m, &a, 12).unwrap();
    upload(agg.update_sink("b".into(), 2.0), &m, &b, 12).unwrap();
    upload(agg.update_sink("c".into(), 5.0), &m, &c, 12).unwrap();
    let r = finish(agg);
    // (1·a + 2·b + 5·c) / 8, by hand:
    //   w: (1−2+0)/8, (2+0+0)/8, (3+2+0)/8, (4+0.5+0)/8, (5+0+0)/8, (6+0+15)/8
    //   b: (0.5+2−10)/8, (−0.5+2+0)/8
    let w = [-0.125, 0.25, 0.625, 0.5625, 0.625, 2.625];
    let bias = [-0.9375, 0.1875];
    assert_eq!(r.mean_delta, vec![w.to_vec(), bias.to_vec()]);
    assert_eq!(r.total_weight, 8.0);
    let sites: Vec<_> = r
        .accepted
        .iter()
        .map(|u| (u.site.as_str(), u.weight))
        .collect();
    assert_eq!(sites, [("a", 1.0), ("b", 2.0), ("c", 5.0)]);
    assert_eq!(r.accepted[0].digest, "07".repeat(32));
    let norm_a = (1.0f64 + 4.0 + 9.0 + 16.0 + 25.0 + 36.0 + 0.25 + 0.25).sqrt();
    assert!((r.accepted[0].l2_norm - norm_a).abs() < 1e-12);
    assert_eq!(r.tensors, m.tensors());
}

#[test]
fn weight_can_come_from_the_manifests_sample_count() {
    let m = model();
    let mut with_samples = m.clone();
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    let (a, b) = (update(1), update(2));
    with_samples.metadata.insert(SAMPLES_KEY.into(), "3".into());
    upload(agg.update_sink_by_samples("a".into()), &with_samples, &a, 8).unwrap();
    with_samples.metadata.insert(SAMPLES_KEY.into(), "1".into());
    upload(agg.update_sink_by_samples("b".into()), &with_samples, &b, 8).unwrap();
    assert_eq!(finish(agg), aggregate_of(&[("a", 3.0, a), ("b", 1.0, b)]));

    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    let why = rejected(upload(
        agg.update_sink_by_samples("c".into()),
        &m,
        &update(3),
        8,
    ));
    assert!(why.contains(SAMPLES_KEY), "{why}");
    with_samples
        .metadata
        .insert(SAMPLES_KEY.into(), "many".into());
    let why = rejected(upload(
        agg.update_sink_by_samples("c".into()),
        &with_samples,
        &update(3),
        8,
    ));
    assert!(why.contains("\"many\""), "{why}");
}

#[test]
fn concurrent_uploads_from_threads_give_the_sequential_result_bit_for_bit() {
    // Large enough that chunks of different sites interleave, with odd chunk sizes.
    let m = manifest(&[("w", DType::F32, &[300, 100]), ("b", DType::F32, &[1000])]);
    let updates: Vec<Vec<Vec<f32>>> = (0..8u32)
        .map(|s| {
            let v = |i: u32| {
                ((i.wrapping_mul(2_654_435_761) ^ s.wrapping_mul(40_503)) % 2001) as f32 * 1e-4
                    - 0.1
            };
            vec![
                (0..30_000).map(v).collect(),
                (30_000..31_000).map(v).collect(),
            ]
        })
        .collect();
    let weight = |s: usize| 100.0 + 37.0 * s as f64;

    let sequential = RoundAggregator::new(&m, 100.0).unwrap();
    for (s, u) in updates.iter().enumerate() {
        upload(
            sequential.update_sink(format!("site-{s}"), weight(s)),
            &m,
            u,
            4096,
        )
        .unwrap();
    }
    let scale = sequential.scale();
    let sequential = finish(sequential);

    let concurrent = RoundAggregator::new(&m, 100.0).unwrap();
    std::thread::scope(|scope| {
        for (s, u) in updates.iter().enumerate().rev() {
            let sink = concurrent.update_sink(format!("site-{s}"), weight(s));
            let m = &m;
            scope.spawn(move || upload(sink, m, u, 1000 + 3 * s).unwrap());
        }
    });
    let concurrent = finish(concurrent);
    // Bit for bit: the sums are integers, added in whatever order the chunks came.
    assert!(
        concurrent.mean_delta == sequential.mean_delta,
        "the means differ"
    );
    assert_eq!(concurrent.total_weight, sequential.total_weight);
    assert_eq!(concurrent.accepted.len(), 8);
    for (c, s) in concurrent.accepted.iter().zip(&sequential.accepted) {
        assert_eq!(
            (&c.site, c.weight, &c.digest),
            (&s.site, s.weight, &s.digest)
        );
        // The norm is an f64 sum whose grouping follows the chunk boundaries.
        assert!(
            (c.l2_norm - s.l2_norm).abs() <= 1e-12 * s.l2_norm,
            "{} vs {}",
            c.l2_norm,
            s.l2_norm
        );
    }
    // And it is the weighted mean: each of the 8 updates rounds to the nearest unit 1/S of the
    // sum (error ≤ 8 · 0.5 / (S · W) in the mean), then the mean is rounded to f32 (half an ulp).
    let total: f64 = (0..8).map(weight).sum();
    let fixed_point = 8.0 * 0.5 / (scale * total);
    for (i, got) in sequential.mean_delta[0].iter().enumerate().step_by(97) {
        let want: f64 = updates
            .iter()
            .enumerate()
            .map(|(s, u)| f64::from(u[0][i]) * weight(s))
            .sum::<f64>()
            / total;
        let tolerance = fixed_point + want.abs() * f64::from(f32::EPSILON) / 2.0;
        assert!(
            (*got - want).abs() <= tolerance,
            "element {i}: {got} vs {want}"
        );
    }
}

/// Tensors spanning several tiles of the running sum (each locked on its own): uploads on
/// threads, with chunks that straddle tile boundaries, and uploads dropped part-way (one after
/// crossing several tiles, one refused over the norm bound late in the second tensor), give
/// bit for bit the sum of the accepted updates uploaded one at a time.
#[test]
fn multi_tile_uploads_on_threads_with_late_refusals_leave_only_the_accepted_sum() {
    use tutela_coordinator::aggregate::tiled::TILE;
    let w = 3 * TILE + 123;
    let b = TILE + 7;
    let m = manifest(&[
        ("w", DType::F32, &[w as u64]),
        ("b", DType::F32, &[b as u64]),
    ]);
    let update = |s: u32| -> Vec<Vec<f32>> {
        let v = |i: u32| {
            ((i.wrapping_mul(2_654_435_761) ^ s.wrapping_mul(40_503)) % 2001) as f32 * 1e-5 - 0.01
        };
        vec![
            (0..w as u32).map(v).collect(),
            (w as u32..(w + b) as u32).map(v).collect(),
        ]
    };
    let bound = 100.0;
    let weight = |s: usize| 10.0 + 3.0 * s as f64;

    let sequential = RoundAggregator::new(&m, bound).unwrap();
    for s in 0..4 {
        let sink = sequential.update_sink(format!("site-{s}"), weight(s));
        upload(sink, &m, &update(s as u32), 1 << 20).unwrap();
    }
    let sequential = finish(sequential);

    let concurrent = RoundAggregator::new(&m, bound).unwrap();
    std::thread::scope(|scope| {
        for s in 0..4usize {
            let sink = concurrent.update_sink(format!("site-{s}"), weight(s));
            let (m, u) = (&m, update(s as u32));
            // Odd chunk sizes: chunks split elements and straddle tiles.
            scope.spawn(move || upload(sink, m, &u, 300_001 + 4099 * s).unwrap());
        }
        // A site whose connection drops after two and a half tiles of "w".
        let concurrent = &concurrent;
        let m = &m;
        scope.spawn(move || {
            let mut sink = concurrent.update_sink("dropped".into(), 5.0);
            sink.begin(m).unwrap();
            let bytes = le(&update(99)[0]);
            let cut = (TILE * 5 / 2) * 4 + 2;
            for (c, piece) in bytes[..cut].chunks(77_777).enumerate() {
                sink.write(0, (c * 77_777) as u64, piece).unwrap();
            }
            drop(sink);
        });
        // A site over the norm bound only near the end of "b": refused after everything else
        // was folded.
        scope.spawn(move || {
            let mut big = update(7);
            let last = big[1].len() - 1;
            big[1][last] = 1000.0;
            let sink = concurrent.update_sink("too-big".into(), 5.0);
            let why = rejected(upload(sink, m, &big, 250_000));
            assert!(why.contains("bound of 100"), "{why}");
            assert!(
                why.contains(&format!("tensor \"b\" element {last}")),
                "{why}"
            );
        });
    });
    assert_eq!(concurrent.in_flight(), 0);
    let concurrent = finish(concurrent);
    assert!(
        concurrent.mean_delta == sequential.mean_delta,
        "the means differ"
    );
    assert_eq!(concurrent.accepted.len(), 4);
    assert_eq!(concurrent.total_weight, sequential.total_weight);
}

#[test]
fn nan_and_infinite_updates_are_refused_naming_tensor_and_element_and_leave_no_trace() {
    let m = model();
    for (bad_value, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let agg = RoundAggregator::new(&m, 10.0).unwrap();
        upload(agg.update_sink("a".into(), 2.0), &m, &update(1), 8).unwrap();
        let mut bad = update(2);
        bad[0][4] = bad_value;
        // 8-byte chunks: elements 0..4 of "w" are folded before the bad one arrives.
        let why = rejected(upload(agg.update_sink("bad".into(), 3.0), &m, &bad, 8));
        assert!(
            why.contains("tensor \"w\" element 4") && why.contains(shown),
            "{why}"
        );
        upload(agg.update_sink("c".into(), 1.0), &m, &update(3), 8).unwrap();
        assert_eq!(
            finish(agg),
            aggregate_of(&[("a", 2.0, update(1)), ("c", 1.0, update(3))])
        );
    }
}

#[test]
fn wrong_name_shape_dtype_or_tensor_count_is_refused_before_any_value() {
    let m = model();
    let cases: [(Manifest, &str); 5] = [
        (
            manifest(&[("w", DType::F32, &[2, 3]), ("bias", DType::F32, &[2])]),
            "tensor #1 is \"bias\" but the global model's tensor #1 is \"b\"",
        ),
        (
            manifest(&[("w", DType::F32, &[3, 2]), ("b", DType::F32, &[2])]),
            "tensor \"w\" has shape [3, 2] but the global model's has shape [2, 3]",
        ),
        (
            manifest(&[("w", DType::F64, &[2, 3]), ("b", DType::F32, &[2])]),
            "tensor \"w\" is F64 but the global model's is F32",
        ),
        (manifest(&[("w", DType::F32, &[2, 3])]), "\"b\" is missing"),
        (
            manifest(&[
                ("w", DType::F32, &[2, 3]),
                ("b", DType::F32, &[2]),
                ("c", DType::F32, &[1]),
            ]),
            "\"c\" is not in the global model",
        ),
    ];
    for (wrong, reason) in cases {
        let agg = RoundAggregator::new(&m, 10.0).unwrap();
        upload(agg.update_sink("a".into(), 1.0), &m, &update(1), 8).unwrap();
        let mut sink = agg.update_sink("bad".into(), 1.0);
        let why = rejected(sink.begin(&wrong));
        assert!(why.contains(reason), "{why}\n  should contain: {reason}");
        drop(sink);
        assert_eq!(agg.in_flight(), 0);
        assert_eq!(finish(agg), aggregate_of(&[("a", 1.0, update(1))]));
    }
}

#[test]
fn over_norm_update_is_refused_midstream_with_both_numbers_and_is_taken_back_out() {
    let m = model();
    let agg = RoundAggregator::new(&m, 2.0).unwrap();
    upload(agg.update_sink("a".into(), 1.0), &m, &update(1), 8).unwrap();
    // ‖·‖ reaches √(1+1+1+1+1) ≈ 2.236 > 2 at "w" element 4, after four values were folded.
    let big = vec![vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0], vec![0.0, 0.0]];
    let why = rejected(upload(agg.update_sink("big".into(), 1.0), &m, &big, 8));
    assert!(why.contains("bound of 2"), "{why}");
    assert!(why.contains("2.236"), "{why}");
    assert!(why.contains("tensor \"w\" element 4"), "{why}");
    assert_eq!(agg.in_flight(), 0);
    // The refused site may try again with an acceptable update.
    upload(agg.update_sink("big".into(), 1.0), &m, &update(2), 8).unwrap();
    let r = finish(agg);
    let agg = RoundAggregator::new(&m, 2.0).unwrap();
    upload(agg.update_sink("a".into(), 1.0), &m, &update(1), 8).unwrap();
    upload(agg.update_sink("big".into(), 1.0), &m, &update(2), 8).unwrap();
    assert_eq!(r, finish(agg));
}

#[test]
fn an_update_dropped_midstream_leaves_no_trace() {
    let m = model();
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    upload(agg.update_sink("a".into(), 4.0), &m, &update(1), 8).unwrap();
    {
        let mut sink = agg.update_sink("gone".into(), 3.0);
        sink.begin(&m).unwrap();
        let u = update(9);
        sink.write(0, 0, &le(&u[0])).unwrap();
        sink.write(1, 0, &le(&u[1])[..5]).unwrap(); // ends mid-element
        assert_eq!(agg.in_flight(), 1);
        // The connection breaks: the sink is dropped without a commit.
    }
    assert_eq!(agg.in_flight(), 0);
    upload(agg.update_sink("c".into(), 1.0), &m, &update(3), 8).unwrap();
    assert_eq!(
        finish(agg),
        aggregate_of(&[("a", 4.0, update(1)), ("c", 1.0, update(3))])
    );
}

/// The frames a site would send for `tensors`, with a correct trailer.
fn frames(m: &Manifest, tensors: &[Vec<f32>], chunk: usize) -> Vec<pb::TensorFrame> {
    let mut out = vec![pb::TensorFrame {
        frame: Some(Frame::Manifest(m.to_pb())),
    }];
    let mut digest = StreamDigest::new(m);
    let mut total = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = le(t);
        for (c, piece) in bytes.chunks(chunk).enumerate() {
            digest.update(piece);
            total += piece.len() as u64;
            out.push(pb::TensorFrame {
                frame: Some(Frame::Chunk(pb::TensorChunk {
                    tensor_index: i as u32,
                    offset: (c * chunk) as u64,
                    data: piece.to_vec().into(),
                })),
            });
        }
    }
    out.push(pb::TensorFrame {
        frame: Some(Frame::Trailer(pb::StreamTrailer {
            sha256: digest.finish().to_vec(),
            total_bytes: total,
        })),
    });
    out
}

fn decode(sink: UpdateSink, frames: Vec<pb::TensorFrame>) -> Result<[u8; 32], StreamError> {
    let mut decoder = StreamDecoder::new(sink);
    for f in frames {
        decoder.push(f)?;
    }
    decoder.finish().map(|r| r.digest)
}

#[test]
fn digest_mismatch_and_truncation_after_every_value_was_folded_leave_no_trace() {
    let m = model();
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    let digest_a = decode(agg.update_sink("a".into(), 2.0), frames(&m, &update(1), 8)).unwrap();

    // Every chunk arrives and is folded; the trailer's digest is wrong.
    let mut tampered = frames(&m, &update(5), 8);
    if let Some(Frame::Trailer(t)) = tampered.last_mut().and_then(|f| f.frame.as_mut()) {
        t.sha256[0] ^= 1;
    }
    let e = decode(agg.update_sink("tampered".into(), 3.0), tampered).unwrap_err();
    assert!(matches!(e, StreamError::DigestMismatch { .. }), "{e}");

    // Every chunk arrives; the stream ends without its trailer.
    let mut truncated = frames(&m, &update(6), 8);
    truncated.pop();
    let e = decode(agg.update_sink("truncated".into(), 3.0), truncated).unwrap_err();
    assert!(matches!(e, StreamError::Truncated { .. }), "{e}");

    decode(agg.update_sink("c".into(), 1.0), frames(&m, &update(3), 8)).unwrap();
    let r = finish(agg);
    assert_eq!(r.accepted[0].digest, hex::encode(digest_a));
    assert_eq!(r, {
        let agg = RoundAggregator::new(&m, 10.0).unwrap();
        decode(agg.update_sink("a".into(), 2.0), frames(&m, &update(1), 8)).unwrap();
        decode(agg.update_sink("c".into(), 1.0), frames(&m, &update(3), 8)).unwrap();
        finish(agg)
    });
}

#[test]
fn a_site_contributes_at_most_once_per_round() {
    let m = model();
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    let mut first = agg.update_sink("a".into(), 1.0);
    first.begin(&m).unwrap();
    let why = rejected(upload(agg.update_sink("a".into(), 1.0), &m, &update(2), 8));
    assert!(why.contains("already has an upload in progress"), "{why}");
    let u = update(1);
    first.write(0, 0, &le(&u[0])).unwrap();
    first.write(1, 0, &le(&u[1])).unwrap();
    first.commit(&[7; 32]).unwrap();
    let why = rejected(upload(agg.update_sink("a".into(), 1.0), &m, &update(2), 8));
    assert!(why.contains("already contributed"), "{why}");
    assert_eq!(finish(agg), aggregate_of(&[("a", 1.0, update(1))]));
}

#[test]
fn weights_outside_the_range_are_refused() {
    let m = model();
    let mut options = AggregatorOptions::new(10.0);
    options.max_weight = 100.0;
    let agg = RoundAggregator::with_options(&m, options).unwrap();
    for (w, reason) in [
        (0.0, "not a positive"),
        (-1.0, "not a positive"),
        (f64::NAN, "not a positive"),
        (101.0, "max_weight of 100"),
    ] {
        let why = rejected(upload(agg.update_sink("a".into(), w), &m, &update(1), 8));
        assert!(why.contains(reason), "{w}: {why}");
    }
    upload(agg.update_sink("a".into(), 100.0), &m, &update(1), 8).unwrap();
}

#[test]
fn finishing_needs_an_accepted_update_and_no_upload_in_flight() {
    let m = model();
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    assert!(matches!(
        agg.clone().finish(),
        Err(AggregateError::InFlight(1))
    ));
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    let sink = agg.update_sink("a".into(), 1.0);
    let e = agg.finish().unwrap_err();
    assert!(matches!(e, AggregateError::InFlight(1)), "{e}");
    drop(sink);
    let agg = RoundAggregator::new(&m, 10.0).unwrap();
    assert!(matches!(agg.finish(), Err(AggregateError::NothingAccepted)));
}

#[test]
fn the_global_model_and_the_bound_are_checked() {
    let m = manifest(&[("w", DType::F32, &[2]), ("steps", DType::I64, &[])]);
    let e = RoundAggregator::new(&m, 1.0).unwrap_err();
    assert!(e.to_string().contains("\"steps\" is I64"), "{e}");
    for bound in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        assert!(matches!(
            RoundAggregator::new(&model(), bound),
            Err(AggregateError::InvalidNormBound(_))
        ));
    }
    assert!(matches!(
        RoundAggregator::new(&manifest(&[]), 1.0),
        Err(AggregateError::EmptyModel)
    ));
}

/// A filter that flips the sign of every value (a stand-in for noise or masking) and refuses
/// updates from one site: what is folded is what the filters leave.
struct Negate;
struct NegatePass;

impl UpdateFilter for Negate {
    fn name(&self) -> &str {
        "negate"
    }
    fn start(&self, update: &UpdateInfo<'_>) -> Result<Box<dyn FilterPass>, Refusal> {
        if update.site == "blocked" {
            return Err(Refusal::new("site \"blocked\" is not allowed"));
        }
        Ok(Box::new(NegatePass))
    }
}

impl FilterPass for NegatePass {
    fn values(&mut self, _: &ValuesAt<'_>, values: &mut [f32]) -> Result<(), Refusal> {
        values.iter_mut().for_each(|v| *v = -*v);
        Ok(())
    }
}

#[test]
fn custom_filters_rewrite_values_before_folding_and_undo_takes_back_what_they_left() {
    let m = model();
    let mut options = AggregatorOptions::new(10.0);
    options.filters.push(Arc::new(Negate));
    // Weights up to 8 only: a fine fixed-point scale, so the mean of one update is that update
    // exactly (with the default max_weight, a weight of 1 rounds at ~1e-7).
    options.max_weight = 8.0;
    let agg = RoundAggregator::with_options(&m, options).unwrap();
    upload(agg.update_sink("a".into(), 1.0), &m, &update(1), 8).unwrap();
    let why = rejected(upload(
        agg.update_sink("blocked".into(), 1.0),
        &m,
        &update(2),
        8,
    ));
    assert!(why.contains("not allowed"), "{why}");
    {
        let mut sink = agg.update_sink("dropped".into(), 5.0);
        sink.begin(&m).unwrap();
        sink.write(0, 0, &le(&update(4)[0])).unwrap();
    }
    let r = finish(agg);
    let negated: Vec<Vec<f64>> = update(1)
        .iter()
        .map(|t| t.iter().map(|v| -f64::from(*v)).collect())
        .collect();
    assert_eq!(r.mean_delta, negated);
}

fn result_of(mean_delta: Vec<Vec<f64>>, tensors: &[(&str, &[u64])]) -> RoundResult {
    RoundResult {
        tensors: tensors
            .iter()
            .map(|(n, s)| TensorSpec::new(*n, DType::F32, s.to_vec()))
            .collect(),
        mean_delta,
        accepted: Vec::new(),
        total_weight: 1.0,
    }
}

/// The strategies compute each step in f64 and store x, m and v as f32, so a result is within a
/// few f32 ulps (2.4e-7 at |x| = 2) of the exact value: the tolerances below are two ulps.
fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((f64::from(*g) - w).abs() <= tol, "element {i}: {g} vs {w}");
    }
}

#[test]
fn fedavg_and_fedprox_add_the_mean_delta() {
    let result = result_of(vec![vec![0.5, -1.0]], &[("w", &[2])]);
    for config in [
        StrategyConfig::FedAvg,
        StrategyConfig::from_name("fedprox").unwrap(),
    ] {
        let mut s = config.build();
        let mut global = vec![vec![1.0f32, 1.0]];
        s.apply(&mut global, &result).unwrap();
        assert_eq!(global, vec![vec![1.5, 0.0]]);
        assert!(s.state().is_empty());
    }
    let mut s = StrategyConfig::FedAvg.build();
    let e = s.apply(&mut [vec![1.0f32; 3]], &result).unwrap_err();
    assert!(e.to_string().contains("tensor \"w\" has 3 values"), "{e}");
}

// Hand-computed with η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 0.01 (v starts at τ² = 1e-4),
// x = [1, −2, 0], Δ₁ = [0.1, −0.2, 0], then Δ₂ = [0.01, 0.3, −0.005]:
//
// step 1: Δ₁² = [0.01, 0.04, 0]
//   m = 0.1·Δ₁ = [0.01, −0.02, 0]
//   Adam v = 0.99·1e-4 + 0.01·Δ₁² = [1.99e-4, 4.99e-4, 0.99e-4]
//   Yogi: v − Δ₁² = [< 0, < 0, > 0], so v = 1e-4 + 0.01·Δ₁²·[1, 1, −1] = [2e-4, 5e-4, 1e-4]
//   x += 0.1·m/(√v + 0.01)
// step 2: Δ₂² = [1e-4, 0.09, 2.5e-5]
//   m = 0.9·m + 0.1·Δ₂ = [0.01, 0.012, −0.0005]
//   Adam v = 0.99·v + 0.01·Δ₂² = [1.9801e-4, 13.9401e-4, 0.9826e-4]
//   Yogi: v − Δ₂² = [1e-4 > 0, < 0, 0.75e-4 > 0], so
//     v = [2e-4 − 1e-6, 5e-4 + 9e-4, 1e-4 − 2.5e-7] = [1.99e-4, 14e-4, 0.9975e-4]
const ETA: f64 = 0.1;
const TAU: f64 = 0.01;

fn adaptive_params() -> AdaptiveParams {
    AdaptiveParams {
        server_learning_rate: ETA,
        beta_1: 0.9,
        beta_2: 0.99,
        tau: TAU,
    }
}

fn step(x: f64, m: f64, v: f64) -> f64 {
    x + ETA * m / (v.sqrt() + TAU)
}

fn two_steps(mut s: FedOpt) -> (Vec<f32>, Vec<f32>) {
    let tensors: &[(&str, &[u64])] = &[("w", &[3])];
    let mut global = vec![vec![1.0f32, -2.0, 0.0]];
    s.apply(&mut global, &result_of(vec![vec![0.1, -0.2, 0.0]], tensors))
        .unwrap();
    let after_one = global[0].clone();
    s.apply(
        &mut global,
        &result_of(vec![vec![0.01, 0.3, -0.005]], tensors),
    )
    .unwrap();
    (after_one, global[0].clone())
}

#[test]
fn fedadam_two_steps_match_the_hand_computed_example() {
    let (one, two) = two_steps(FedOpt::adam(adaptive_params()));
    let x1 = [step(1.0, 0.01, 1.99e-4), step(-2.0, -0.02, 4.99e-4), 0.0];
    assert_close(&one, &x1, 5e-7);
    let x2 = [
        step(x1[0], 0.01, 1.9801e-4),
        step(x1[1], 0.012, 13.9401e-4),
        step(x1[2], -0.0005, 0.9826e-4),
    ];
    assert_close(&two, &x2, 5e-7);
    // The same numbers, evaluated: 1 + 0.1·0.01/(√1.99e-4 + 0.01) = 1.0414822, and so on.
    assert_close(&one, &[1.041_482_2, -2.061_846_2, 0.0], 5e-7);
    assert_close(&two, &[1.083_024_9, -2.036_495_7, -0.002_510_97], 5e-7);
}

#[test]
fn fedyogi_two_steps_match_the_hand_computed_example() {
    let (one, two) = two_steps(FedOpt::yogi(adaptive_params()));
    let x1 = [step(1.0, 0.01, 2e-4), step(-2.0, -0.02, 5e-4), 0.0];
    assert_close(&one, &x1, 5e-7);
    let x2 = [
        step(x1[0], 0.01, 1.99e-4),
        step(x1[1], 0.012, 14e-4),
        step(x1[2], -0.0005, 0.9975e-4),
    ];
    assert_close(&two, &x2, 5e-7);
    assert_close(&one, &[1.041_421_4, -2.061_803_4, 0.0], 5e-7);
    assert_close(&two, &[1.082_903_5, -2.036_495_8, -0.002_501_56], 5e-7);
    // Yogi and Adam differ in both steps.
    let adam = two_steps(FedOpt::adam(adaptive_params()));
    assert_ne!(one, adam.0);
    assert_ne!(two, adam.1);
}

#[test]
fn exported_and_imported_optimizer_state_gives_identical_next_steps() {
    for config in [
        StrategyConfig::FedAdam(adaptive_params()),
        StrategyConfig::FedYogi(adaptive_params()),
    ] {
        let tensors: &[(&str, &[u64])] = &[("w", &[2, 2]), ("b", &[1])];
        let rounds: Vec<RoundResult> = (0..4)
            .map(|r| {
                let d = |i: usize| ((r * 7 + i * 3) % 5) as f64 * 0.03 - 0.06;
                result_of(vec![(0..4).map(d).collect(), vec![d(9)]], tensors)
            })
            .collect();
        let start = || vec![vec![0.5f32, -0.5, 1.0, 0.0], vec![0.25]];

        let mut uninterrupted = config.build();
        let mut a = start();
        for r in &rounds {
            uninterrupted.apply(&mut a, r).unwrap();
        }

        let mut before = config.build();
        let mut b = start();
        for r in &rounds[..2] {
            before.apply(&mut b, r).unwrap();
        }
        let midway = b.clone();
        let saved = before.state();
        assert_eq!(saved.len(), 4, "m and v of two tensors");
        assert!(
            saved
                .iter()
                .all(|(t, d)| t.dtype == DType::F32 && d.len() as u64 == t.numel().unwrap() * 4)
        );
        drop(before);
        let mut resumed = config.build();
        resumed.load_state(saved.clone()).unwrap();
        assert_eq!(resumed.state(), saved);
        for r in &rounds[2..] {
            resumed.apply(&mut b, r).unwrap();
        }
        assert_eq!(a, b, "{}", config.name());
        assert_eq!(resumed.state(), uninterrupted.state());

        // A fresh strategy (no state loaded) takes a different path: the test can fail.
        let mut fresh = config.build();
        let mut c = midway;
        for r in &rounds[2..] {
            fresh.apply(&mut c, r).unwrap();
        }
        assert_ne!(a, c);
    }
}

#[test]
fn optimizer_state_must_fit_the_model() {
    let mut s = FedOpt::adam(adaptive_params());
    let mut x = vec![vec![0.0f32; 2]];
    s.apply(&mut x, &result_of(vec![vec![0.1, 0.1]], &[("w", &[2])]))
        .unwrap();
    let e = s
        .apply(
            &mut [vec![0.0f32; 3]],
            &result_of(vec![vec![0.1; 3]], &[("w", &[3])]),
        )
        .unwrap_err();
    assert!(e.to_string().contains("shape [2]"), "{e}");
    let e = s
        .apply(
            &mut [vec![0.0f32; 2]],
            &result_of(vec![vec![0.1; 2]], &[("v", &[2])]),
        )
        .unwrap_err();
    assert!(e.to_string().contains("no moments for tensor \"v\""), "{e}");
}
