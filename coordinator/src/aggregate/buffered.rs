//! The buffered aggregation: every update kept (spooled, encrypted), then combined at the
//! round's end by a rule that needs them all at once ([`super::robust`]).
//!
//! Each upload runs the same filter chain as the streaming sum (finite values, the job's
//! filters, the round's norm bound), a block at a time, and writes the filtered values to its
//! own spool file in the round's directory, encrypted at rest with `tutela_privacy::at_rest`
//! under the coordinator's key-encryption key (AES-256-GCM chunks, a data key per file): the
//! coordinator's disk never holds a site's update in clear. An upload that does not commit
//! leaves nothing (the encrypted writer deletes its temporary file); a committed spool is deleted
//! when the round's aggregator is dropped. The key lives in the coordinator's memory only: a
//! spool never outlives the process, since a round interrupted by a crash is run again.
//!
//! At [`RoundAggregation::finish`], the spools are read back in lockstep, [`BLOCK`] values of
//! each at a time, so memory holds one block per site (never a whole update, let alone all of
//! them), besides the round's result. Multi-Krum reads them twice: once for the pairwise
//! distances, once for the mean of the selected updates.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tutela_privacy::at_rest::{EncryptedReader, EncryptedWriter, KeyEncryptionKey};
use tutela_protocol::stream::{SinkError, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

use super::filter::{
    ElementCursor, FilterPass, FiniteValues, NormPass, UpdateFilter, UpdateInfo, ValuesAt,
    WeightFrom, check_update_manifest, update_weight,
};
use super::robust::{self, RobustReport, RobustRule};
use super::{
    AcceptedUpdate, AggregateError, BLOCK, FinishedRound, RoundAggregation, RoundResult, SiteSink,
};

/// How a round's buffered aggregation is set up.
#[derive(Clone)]
pub struct BufferedOptions {
    pub rule: RobustRule,
    /// Largest L2 norm an update may have (after the filters).
    pub norm_bound: f64,
    /// Where the round's encrypted spools go (one model's size per site; created if missing).
    pub spool_dir: PathBuf,
    /// The coordinator's key-encryption key for the spools.
    pub kek: Arc<dyn KeyEncryptionKey>,
    /// Filters run after [`FiniteValues`] and before the norm bound, in order.
    pub filters: Vec<Arc<dyn UpdateFilter>>,
}

/// A committed update's spool: deleted when dropped.
struct Spooled {
    accepted: AcceptedUpdate,
    path: PathBuf,
    /// The filters' fold factor (a clip): the values are combined multiplied by it.
    factor: f64,
}

impl Drop for Spooled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not delete an update spool");
        }
    }
}

#[derive(Default)]
struct Ledger {
    spooled: Vec<Spooled>,
    contributed: HashSet<String>,
    in_flight: HashSet<String>,
}

/// Keeps every update of a round (encrypted on disk) and combines them with a robust rule.
pub struct BufferedAggregator {
    tensors: Vec<TensorSpec>,
    lens: Vec<usize>,
    total_elements: u64,
    rule: RobustRule,
    /// [`FiniteValues`], then the options' filters; the norm bound runs after them.
    filters: Vec<Arc<dyn UpdateFilter>>,
    norm_bound: f64,
    dir: PathBuf,
    kek: Arc<dyn KeyEncryptionKey>,
    ledger: Mutex<Ledger>,
}

impl std::fmt::Debug for BufferedAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferedAggregator")
            .field("rule", &self.rule)
            .field("tensors", &self.tensors.len())
            .field("elements", &self.total_elements)
            .finish_non_exhaustive()
    }
}

impl BufferedAggregator {
    pub fn new(global: &Manifest, options: BufferedOptions) -> Result<Arc<Self>, AggregateError> {
        if global.is_empty() {
            return Err(AggregateError::EmptyModel);
        }
        let b = options.norm_bound;
        if !(b.is_finite() && b > 0.0) {
            return Err(AggregateError::InvalidNormBound(b));
        }
        let mut lens = Vec::with_capacity(global.len());
        for t in global.tensors() {
            if t.dtype != DType::F32 {
                return Err(AggregateError::NotF32 {
                    name: t.name.clone(),
                    dtype: t.dtype,
                });
            }
            let elements = t.numel().unwrap_or(u64::MAX);
            let n = usize::try_from(elements).map_err(|_| AggregateError::TooLarge {
                name: t.name.clone(),
                elements,
            })?;
            lens.push(n);
        }
        std::fs::create_dir_all(&options.spool_dir)
            .map_err(|e| AggregateError::Spool(format!("{}: {e}", options.spool_dir.display())))?;
        // The rules compare values across sites: every one must be finite, whatever the filters.
        let mut filters: Vec<Arc<dyn UpdateFilter>> = vec![Arc::new(FiniteValues)];
        filters.extend(options.filters);
        Ok(Arc::new(BufferedAggregator {
            tensors: global.tensors().to_vec(),
            total_elements: lens.iter().map(|&n| n as u64).sum(),
            lens,
            rule: options.rule,
            filters,
            norm_bound: b,
            dir: options.spool_dir,
            kek: options.kek,
            ledger: Mutex::new(Ledger::default()),
        }))
    }

    pub fn rule(&self) -> RobustRule {
        self.rule
    }

    /// A sink for `site`'s update. The robust rules weigh every site equally: its accepted
    /// weight is 1.
    pub fn update_sink(self: &Arc<Self>, site: String) -> BufferedSink {
        BufferedSink {
            agg: self.clone(),
            site,
            active: None,
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spool_path(&self) -> Result<PathBuf, SinkError> {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| io::Error::other("the system's random generator failed"))?;
        Ok(self.dir.join(format!("update-{}.spool", hex::encode(id))))
    }

    /// Combines the spooled updates with the rule.
    fn combine(
        &self,
        spooled: &[Spooled],
    ) -> Result<(Vec<Vec<f64>>, RobustReport), AggregateError> {
        let n = spooled.len();
        self.rule.check_count(n)?;
        let sites: Vec<&str> = spooled.iter().map(|s| s.accepted.site.as_str()).collect();
        let mut report = RobustReport {
            rule: self.rule.describe(),
            ..Default::default()
        };
        let mut tally = vec![0u64; n];
        let mut mean_delta: Vec<Vec<f64>> = self.lens.iter().map(|&len| vec![0.0; len]).collect();
        match self.rule {
            RobustRule::Median => self.each_block(spooled, |t, at, block| {
                robust::median_into(
                    block,
                    &mut mean_delta[t][at..at + block[0].len()],
                    &mut tally,
                )
            })?,
            RobustRule::TrimmedMean { beta } => {
                let k = robust::trim_count(beta, n);
                self.each_block(spooled, |t, at, block| {
                    robust::trimmed_mean_into(
                        block,
                        k,
                        &mut mean_delta[t][at..at + block[0].len()],
                        &mut tally,
                    )
                })?
            }
            RobustRule::MultiKrum { f, m } => {
                let mut d2 = vec![0.0; n * n];
                self.each_block(spooled, |_, _, block| {
                    robust::add_squared_distances(block, &mut d2)
                })?;
                let (selected, scores) = robust::krum_select(&d2, n, f, m)?;
                self.each_block(spooled, |t, at, block| {
                    robust::mean_of_into(
                        block,
                        &selected,
                        &mut mean_delta[t][at..at + block[0].len()],
                    )
                })?;
                for (i, site) in sites.iter().enumerate() {
                    let out = !selected.contains(&i);
                    if out {
                        report.excluded.push(site.to_string());
                    }
                    report
                        .trimmed
                        .insert(site.to_string(), if out { 1.0 } else { 0.0 });
                    report.scores.insert(site.to_string(), scores[i]);
                }
                report.excluded.sort();
                return Ok((mean_delta, report));
            }
        }
        let total = self.total_elements.max(1) as f64;
        for (i, site) in sites.iter().enumerate() {
            report
                .trimmed
                .insert(site.to_string(), tally[i] as f64 / total);
        }
        Ok((mean_delta, report))
    }

    /// Reads the spools in lockstep and calls `f(tensor, first element, block)` for every run of
    /// at most [`BLOCK`] values of one tensor, `block[i]` being spool i's values (times its fold
    /// factor).
    fn each_block(
        &self,
        spooled: &[Spooled],
        mut f: impl FnMut(usize, usize, &[&[f32]]),
    ) -> Result<(), AggregateError> {
        let spool_err = |path: &Path, e: &dyn std::fmt::Display| {
            AggregateError::Spool(format!("{}: {e}", path.display()))
        };
        let mut readers = spooled
            .iter()
            .map(|s| {
                EncryptedReader::open(&s.path, self.kek.as_ref())
                    .map_err(|e| spool_err(&s.path, &e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut bytes = vec![0u8; BLOCK * 4];
        let mut values: Vec<Vec<f32>> = vec![Vec::with_capacity(BLOCK); spooled.len()];
        for (t, &len) in self.lens.iter().enumerate() {
            let mut at = 0;
            while at < len {
                let run = (len - at).min(BLOCK);
                for ((reader, s), v) in readers.iter_mut().zip(spooled).zip(values.iter_mut()) {
                    reader
                        .read_exact(&mut bytes[..run * 4])
                        .map_err(|e| spool_err(&s.path, &e))?;
                    v.clear();
                    let factor = s.factor as f32;
                    v.extend(bytes[..run * 4].chunks_exact(4).map(|c| {
                        let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        if s.factor == 1.0 { x } else { x * factor }
                    }));
                }
                let block: Vec<&[f32]> = values.iter().map(|v| v.as_slice()).collect();
                f(t, at, &block);
                at += run;
            }
        }
        Ok(())
    }
}

impl RoundAggregation for BufferedAggregator {
    fn name(&self) -> &'static str {
        self.rule.name()
    }

    fn open(self: Arc<Self>, site: String, _weight: f64) -> SiteSink {
        SiteSink::new(self.update_sink(site))
    }

    fn accepted(&self) -> Vec<AcceptedUpdate> {
        self.ledger()
            .spooled
            .iter()
            .map(|s| s.accepted.clone())
            .collect()
    }

    fn in_flight(&self) -> usize {
        self.ledger().in_flight.len()
    }

    fn finish(self: Arc<Self>) -> Result<FinishedRound, AggregateError> {
        let this = Arc::try_unwrap(self)
            .map_err(|shared| AggregateError::InFlight(Arc::strong_count(&shared) - 1))?;
        let mut spooled = std::mem::take(&mut this.ledger().spooled);
        if spooled.is_empty() {
            return Err(AggregateError::NothingAccepted);
        }
        spooled.sort_by(|a, b| {
            (&a.accepted.site, &a.accepted.digest).cmp(&(&b.accepted.site, &b.accepted.digest))
        });
        let (mean_delta, report) = this.combine(&spooled)?;
        let accepted: Vec<AcceptedUpdate> = spooled.iter().map(|s| s.accepted.clone()).collect();
        Ok(FinishedRound {
            result: RoundResult {
                tensors: this.tensors.clone(),
                mean_delta,
                total_weight: accepted.len() as f64,
                accepted,
            },
            robust: Some(report),
        })
    }
}

/// One site's upload into a [`BufferedAggregator`]: filtered, then written to its encrypted
/// spool.
pub struct BufferedSink {
    agg: Arc<BufferedAggregator>,
    site: String,
    active: Option<Active>,
}

struct Active {
    passes: Vec<Box<dyn FilterPass>>,
    norm: NormPass,
    writer: EncryptedWriter,
    /// Position of the next byte expected, and an element split across chunks.
    cursor: ElementCursor,
    written: u64,
    scratch: Vec<f32>,
    encoded: Vec<u8>,
}

impl BufferedSink {
    /// Filters and spools whole little-endian f32 values of `tensor` from element `first` on.
    fn process(&mut self, tensor: usize, first: usize, bytes: &[u8]) -> Result<(), SinkError> {
        let agg = &*self.agg;
        let a = self
            .active
            .as_mut()
            .ok_or_else(|| io::Error::other("write before begin"))?;
        let spec = &agg.tensors[tensor];
        for (i, run) in bytes.chunks(BLOCK * 4).enumerate() {
            let at = ValuesAt {
                tensor_index: tensor,
                tensor: spec,
                first_element: (first + i * BLOCK) as u64,
            };
            a.scratch.clear();
            a.scratch.extend(
                run.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            for pass in &mut a.passes {
                pass.values(&at, &mut a.scratch)
                    .map_err(|r| SinkError::Rejected(r.0))?;
            }
            a.norm
                .values(&at, &mut a.scratch)
                .map_err(|r| SinkError::Rejected(r.0))?;
            a.encoded.clear();
            a.encoded
                .extend(a.scratch.iter().flat_map(|v| v.to_le_bytes()));
            a.writer.write_all(&a.encoded)?;
            a.written += a.scratch.len() as u64;
        }
        Ok(())
    }
}

impl TensorSink for BufferedSink {
    type Output = AcceptedUpdate;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        if self.active.is_some() {
            return Err(io::Error::other("begin called twice").into());
        }
        check_update_manifest(&self.agg.tensors, manifest).map_err(SinkError::Rejected)?;
        let weight = update_weight(WeightFrom::Unit, manifest, 1.0).map_err(SinkError::Rejected)?;
        let info = UpdateInfo {
            site: &self.site,
            weight,
            manifest,
        };
        let passes = self
            .agg
            .filters
            .iter()
            .map(|f| f.start(&info))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|r| SinkError::Rejected(r.0))?;
        {
            let mut ledger = self.agg.ledger();
            if ledger.contributed.contains(&self.site) {
                return Err(SinkError::Rejected(format!(
                    "site {:?} already contributed an update to this round",
                    self.site
                )));
            }
            if !ledger.in_flight.insert(self.site.clone()) {
                return Err(SinkError::Rejected(format!(
                    "site {:?} already has an upload in progress for this round",
                    self.site
                )));
            }
        }
        let writer = self.agg.spool_path().and_then(|p| {
            EncryptedWriter::create(&p, self.agg.kek.as_ref())
                .map_err(|e| io::Error::other(e.to_string()).into())
        });
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                self.agg.ledger().in_flight.remove(&self.site);
                return Err(e);
            }
        };
        self.active = Some(Active {
            passes,
            norm: NormPass::new(self.agg.norm_bound),
            writer,
            cursor: ElementCursor::default(),
            written: 0,
            scratch: Vec::new(),
            encoded: Vec::new(),
        });
        Ok(())
    }

    fn write(&mut self, tensor_index: usize, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        let agg = self.agg.clone();
        let mut cursor = self
            .active
            .as_ref()
            .ok_or_else(|| io::Error::other("write before begin"))?
            .cursor;
        let walked = cursor.feed(
            (&agg.tensors, &agg.lens),
            (tensor_index, offset, data),
            |tensor, first, bytes| self.process(tensor, first, bytes),
        );
        if let Some(a) = self.active.as_mut() {
            a.cursor = cursor;
        }
        walked
    }

    fn commit(mut self, digest: &[u8; 32]) -> Result<AcceptedUpdate, SinkError> {
        let agg = self.agg.clone();
        let Some(mut a) = self.active.take() else {
            return Err(io::Error::other("commit before begin").into());
        };
        // From here on, an early return drops the writer (deleting its temporary file); the
        // ledger is released below whatever happens.
        let outcome = (|| {
            if a.written != agg.total_elements || a.cursor.has_partial_element() {
                return Err(SinkError::from(io::Error::other(format!(
                    "commit after {} of the model's {} values",
                    a.written, agg.total_elements
                ))));
            }
            for pass in &mut a.passes {
                pass.end().map_err(|r| SinkError::Rejected(r.0))?;
            }
            a.norm.end().map_err(|r| SinkError::Rejected(r.0))?;
            let l2_norm = a.norm.norm();
            let factor = a
                .passes
                .iter_mut()
                .map(|p| p.fold_factor(l2_norm))
                .fold(1.0, |f, g| f * g);
            let path = a
                .writer
                .finish()
                .map_err(|e| SinkError::from(io::Error::other(e.to_string())))?;
            Ok(Spooled {
                accepted: AcceptedUpdate {
                    site: self.site.clone(),
                    weight: 1.0,
                    digest: hex::encode(digest),
                    l2_norm,
                    clip_factor: factor,
                },
                path,
                factor,
            })
        })();
        let mut ledger = agg.ledger();
        ledger.in_flight.remove(&self.site);
        let spooled = outcome?;
        let accepted = spooled.accepted.clone();
        ledger.contributed.insert(self.site.clone());
        ledger.spooled.push(spooled);
        Ok(accepted)
    }
}

impl Drop for BufferedSink {
    /// An upload that ends without a commit leaves nothing: its writer deletes the temporary
    /// file, and the site may try again.
    fn drop(&mut self) {
        if self.active.take().is_some() {
            self.agg.ledger().in_flight.remove(&self.site);
        }
    }
}
