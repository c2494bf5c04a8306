//! One upload into the streaming sum: [`UpdateSink`], the stream decoder's sink that filters,
//! spools and folds each chunk as it arrives (see the parent module's docs).

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use tutela_protocol::stream::{SinkError, TensorSink};
use tutela_protocol::tensor::Manifest;

use super::super::AcceptedUpdate;
use super::super::filter::{
    ElementCursor, FilterPass, NormPass, UpdateInfo, ValuesAt, WeightFrom, check_update_manifest,
    update_weight,
};
use super::super::tiled::{TILE, fold_le};
use super::RoundAggregator;

/// Folds one site's update into the round as it streams in. See the [module](self) docs.
pub struct UpdateSink {
    agg: Arc<RoundAggregator>,
    site: String,
    weight_from: WeightFrom,
    /// Set by `begin`; while set, the site and its weight are reserved in the ledger and the
    /// values folded so far are in the spool.
    active: Option<Active>,
}

struct Active {
    weight: f64,
    /// weight × scale: what a value is multiplied by before rounding.
    ws: f64,
    passes: Vec<Box<dyn FilterPass>>,
    /// The last filter, held by type: its running norm is the accepted update's `l2_norm`.
    norm: NormPass,
    spool: File,
    /// Position of the next byte expected, and an element split across chunks.
    cursor: ElementCursor,
    /// Values folded so far, counted over all tensors in order (the spool's length / 4).
    folded: u64,
    /// Decoded values for the filters, and the filtered values re-encoded for spool and fold
    /// (used only when filters are configured).
    scratch: Vec<f32>,
    encoded: Vec<[u8; 4]>,
}

impl UpdateSink {
    pub(super) fn new(agg: Arc<RoundAggregator>, site: String, weight_from: WeightFrom) -> Self {
        UpdateSink {
            agg,
            site,
            weight_from,
            active: None,
        }
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    fn weight(&self, manifest: &Manifest) -> Result<f64, SinkError> {
        let from = if self.agg.unit_weights {
            WeightFrom::Unit
        } else {
            self.weight_from
        };
        update_weight(from, manifest, self.agg.max_weight).map_err(SinkError::Rejected)
    }

    /// Validates, spools and folds `bytes` (whole little-endian f32 values of tensor `tensor`
    /// from element `first` on, at most one stream chunk).
    ///
    /// Without filters the values are folded as they came: the norm is checked over the whole
    /// run first, the run is spooled in one write (fewer, larger writes are cheaper), then folded
    /// tile by tile while it is still in the cache. With filters, which may rewrite values, each
    /// tile-aligned run is decoded, filtered, checked, spooled and folded in turn.
    fn process(&mut self, tensor: usize, first: usize, bytes: &[u8]) -> Result<(), SinkError> {
        let agg = &*self.agg;
        let a = self
            .active
            .as_mut()
            .ok_or_else(|| io::Error::other("write before begin"))?;
        let spec = &agg.tensors[tensor];
        let (elements, _) = bytes.as_chunks::<4>();
        let at = |element: usize| ValuesAt {
            tensor_index: tensor,
            tensor: spec,
            first_element: element as u64,
        };
        let unfiltered = !agg.filters_read_values;
        if unfiltered && !elements.is_empty() {
            a.norm
                .values_le(&at(first), elements)
                .map_err(|r| SinkError::Rejected(r.0))?;
            // Spool before folding: a value is never in the sum without a way to take it out.
            a.spool.write_all(elements.as_flattened())?;
        }
        let mut done = 0;
        while done < elements.len() {
            let element = first + done;
            let tile = element / TILE;
            let n = (elements.len() - done).min((tile + 1) * TILE - element);
            let raw = &elements[done..done + n];
            let folded: &[[u8; 4]] = if unfiltered {
                raw
            } else {
                a.scratch.clear();
                a.scratch.extend(raw.iter().map(|b| f32::from_le_bytes(*b)));
                for pass in &mut a.passes {
                    pass.values(&at(element), &mut a.scratch)
                        .map_err(|r| SinkError::Rejected(r.0))?;
                }
                a.norm
                    .values(&at(element), &mut a.scratch)
                    .map_err(|r| SinkError::Rejected(r.0))?;
                a.encoded.clear();
                a.encoded.extend(a.scratch.iter().map(|v| v.to_le_bytes()));
                a.spool.write_all(a.encoded.as_flattened())?;
                &a.encoded
            };
            let mut guard = agg.lock_tile(tensor, tile)?;
            let offset = element - tile * TILE;
            let target = guard.get_mut(offset..offset + n).ok_or_else(|| {
                io::Error::other(format!("write past the end of tensor {:?}", spec.name))
            })?;
            fold_le(target, folded, a.ws);
            drop(guard);
            a.folded += n as u64;
            done += n;
        }
        Ok(())
    }
}

impl TensorSink for UpdateSink {
    type Output = AcceptedUpdate;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        if self.active.is_some() {
            return Err(io::Error::other("begin called twice").into());
        }
        check_update_manifest(&self.agg.tensors, manifest).map_err(SinkError::Rejected)?;
        let weight = self.weight(manifest)?;
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
        let spool = self.agg.spools.take()?;
        {
            let mut ledger = self.agg.ledger();
            let refusal = if let Some(why) = &ledger.poisoned {
                Some(format!("the round's aggregate is unusable: {why}"))
            } else if ledger.contributed.contains(&self.site) {
                Some(format!(
                    "site {:?} already contributed an update to this round",
                    self.site
                ))
            } else if ledger.in_flight.contains(&self.site) {
                Some(format!(
                    "site {:?} already has an upload in progress for this round",
                    self.site
                ))
            } else if ledger.accepted_weight + ledger.reserved_weight + weight
                > self.agg.weight_capacity
            {
                Some(format!(
                    "the round's total weight would exceed {} (the fixed-point range for max_weight {})",
                    self.agg.weight_capacity, self.agg.max_weight
                ))
            } else {
                None
            };
            if let Some(why) = refusal {
                drop(ledger);
                self.agg.spools.give_back(spool);
                return Err(SinkError::Rejected(why));
            }
            ledger.in_flight.insert(self.site.clone());
            ledger.reserved_weight += weight;
        }
        self.active = Some(Active {
            weight,
            ws: weight * self.agg.scale,
            passes,
            norm: NormPass::new(self.agg.norm_bound),
            spool,
            cursor: ElementCursor::default(),
            folded: 0,
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
        let a = self
            .active
            .as_mut()
            .ok_or_else(|| io::Error::other("commit before begin"))?;
        if a.folded != agg.total_elements || a.cursor.has_partial_element() {
            return Err(io::Error::other(format!(
                "commit after {} of the model's {} values",
                a.folded, agg.total_elements
            ))
            .into());
        }
        for pass in &mut a.passes {
            pass.end().map_err(|r| SinkError::Rejected(r.0))?;
        }
        a.norm.end().map_err(|r| SinkError::Rejected(r.0))?;
        let Some(mut a) = self.active.take() else {
            return Err(io::Error::other("commit before begin").into());
        };
        let l2_norm = a.norm.norm();
        // A filter's last word on the whole update (central DP's clip), now that its norm is
        // known.
        let clip_factor = a
            .passes
            .iter_mut()
            .map(|p| p.fold_factor(l2_norm))
            .fold(1.0, |f, g| f * g);
        if clip_factor != 1.0 {
            // The norm is known only now: read what was folded back from the spool and leave
            // it folded at clip_factor × its weight instead (one more pass over the disk).
            if let Err(e) = agg.rescale(&mut a.spool, a.folded, a.ws, a.ws * clip_factor) {
                // Whatever was rescaled before the failure is neither the update nor its clipped
                // version: the round cannot be trusted.
                let mut ledger = agg.ledger();
                ledger.in_flight.remove(&self.site);
                ledger.reserved_weight -= a.weight;
                ledger.poisoned.get_or_insert(format!(
                    "site {:?}'s update could not be clipped in the round's sum: {e}",
                    self.site
                ));
                return Err(e);
            }
        }
        let accepted = AcceptedUpdate {
            site: self.site.clone(),
            weight: a.weight,
            digest: hex::encode(digest),
            l2_norm,
            clip_factor,
        };
        let mut ledger = agg.ledger();
        ledger.in_flight.remove(&self.site);
        ledger.contributed.insert(self.site.clone());
        ledger.reserved_weight -= a.weight;
        ledger.accepted_weight += a.weight;
        ledger.accepted.push(accepted.clone());
        drop(ledger);
        agg.spools.give_back(a.spool);
        Ok(accepted)
    }
}

impl Drop for UpdateSink {
    /// An upload that ends without a commit takes back everything it folded.
    fn drop(&mut self) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let undone = if a.folded > 0 {
            self.agg.take_back(&mut a.spool, a.folded, a.ws)
        } else {
            Ok(())
        };
        let mut ledger = self.agg.ledger();
        ledger.in_flight.remove(&self.site);
        ledger.reserved_weight -= a.weight;
        match undone {
            Ok(()) => {
                drop(ledger);
                self.agg.spools.give_back(a.spool);
            }
            Err(e) => {
                tracing::error!(site = %self.site, error = %e, "could not take a refused update back out of the round's sum");
                ledger.poisoned.get_or_insert(format!(
                    "site {:?}'s refused update could not be taken back out of the sum: {e}",
                    self.site
                ));
            }
        }
    }
}
