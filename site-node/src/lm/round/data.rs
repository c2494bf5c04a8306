//! Protected documents → token windows grouped by privacy unit, and the token-weighted loss of a
//! decoder over them.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use tutela_privacy::anonymize::text::ProtectedDocument;

use crate::lm::lora::dp::{AdapterModel, IGNORE_INDEX, SequenceBatch};
use crate::lm::tokenizer::{TextTokenizer, TokenizerError};
use crate::train::TrainError;

/// One side of a dataset, tokenized: `units[u]` holds the token windows of privacy unit `u`
/// (the shape [`SequenceBatch::from_units`] and [`crate::dp::PoissonBatchSampler`] work on).
#[derive(Debug, Clone, Default)]
pub struct UnitWindows {
    pub units: Vec<Vec<Vec<i64>>>,
    /// Documents read.
    pub documents: usize,
    /// Next-token targets over all windows (each window of `n` tokens has `n - 1`).
    pub targets: usize,
}

impl UnitWindows {
    pub fn windows(&self) -> usize {
        self.units.iter().map(Vec::len).sum()
    }
}

/// Cuts `ids` into windows of at most `window + 1` tokens, each starting where the previous
/// one's last target was, so every next-token pair of the document is in exactly one window and
/// every window trains on at most `window` positions.
pub fn cut_windows(ids: &[i64], window: usize) -> Vec<Vec<i64>> {
    let window = window.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let end = (start + window + 1).min(ids.len());
        out.push(ids[start..end].to_vec());
        start = end - 1;
    }
    out
}

/// Tokenizes `documents` (bos, text, eos each) into windows of `window` positions, grouped by
/// privacy unit: the documents' own `unit` index (a patient) with `by_unit`, one unit per
/// document otherwise. Units are renumbered densely in order of first appearance.
pub fn tokenize_units(
    documents: &[ProtectedDocument],
    tokenizer: &TextTokenizer,
    window: usize,
    by_unit: bool,
) -> Result<UnitWindows, TokenizerError> {
    let mut index: BTreeMap<u32, usize> = BTreeMap::new();
    let mut out = UnitWindows {
        documents: documents.len(),
        ..UnitWindows::default()
    };
    for (d, doc) in documents.iter().enumerate() {
        let ids: Vec<i64> = tokenizer
            .encode_document(&doc.text)?
            .into_iter()
            .map(i64::from)
            .collect();
        let slot = if by_unit {
            let next = index.len();
            *index.entry(doc.unit).or_insert(next)
        } else {
            d
        };
        if slot == out.units.len() {
            out.units.push(Vec::new());
        }
        for w in cut_windows(&ids, window) {
            out.targets += w.len() - 1;
            out.units[slot].push(w);
        }
    }
    Ok(out)
}

/// A model's loss over one side of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct LmEval {
    /// Mean next-token cross-entropy per target token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens scored.
    pub tokens: usize,
    /// Each privacy unit's mean loss per target token (accuracy 0: not a classifier), what a DP
    /// job releases its metrics from (`tutela_privacy::metrics`); never leaves the site as is.
    pub units: Vec<tutela_privacy::metrics::UnitMetric>,
}

/// Windows per forward pass when evaluating.
const EVAL_WINDOWS_PER_BATCH: usize = 16;

/// The token-weighted next-token loss of `model` over every window of `data` (no gradient).
pub fn evaluate(
    model: &dyn AdapterModel,
    data: &UnitWindows,
    pad_id: i64,
    device: Device,
) -> Result<LmEval, TrainError> {
    // One batch "unit" per window here (each window its own sequence); `owner` keeps the
    // privacy unit of each window, for the per-unit losses DP metrics are released from.
    let (windows, owner): (Vec<Vec<Vec<i64>>>, Vec<usize>) = data
        .units
        .iter()
        .enumerate()
        .flat_map(|(u, ws)| ws.iter().map(move |w| (u, w)))
        .filter(|(_, w)| w.len() >= 2)
        .map(|(u, w)| (vec![w.clone()], u))
        .unzip();
    let mut unit_loss = vec![0.0f64; data.units.len()];
    let mut unit_tokens = vec![0usize; data.units.len()];
    let mut loss_sum = 0.0;
    let mut tokens = 0usize;
    for start in (0..windows.len()).step_by(EVAL_WINDOWS_PER_BATCH) {
        let end = (start + EVAL_WINDOWS_PER_BATCH).min(windows.len());
        let picked: Vec<usize> = (start..end).collect();
        let batch = SequenceBatch::from_units(&windows, &picked, pad_id, Kind::Float, device)?;
        let losses = tch::no_grad(|| model.sequence_losses(&batch, false))?;
        let per_window = losses
            .f_to_kind(Kind::Double)
            .and_then(|l| Vec::<f64>::try_from(&l))
            .map_err(|source| TrainError::Torch {
                context: "validation loss per window".into(),
                source,
            })?;
        for (i, l) in (start..end).zip(per_window) {
            unit_loss[owner[i]] += l;
            unit_tokens[owner[i]] += windows[i][0].len() - 1;
        }
        loss_sum += losses
            .f_sum(Kind::Double)
            .and_then(|l| l.f_double_value(&[]))
            .map_err(|source| TrainError::Torch {
                context: "validation loss".into(),
                source,
            })?;
        tokens += count_targets(&batch.targets)?;
    }
    if tokens == 0 {
        return Err(TrainError::InvalidConfig {
            field: "validation",
            reason: "the validation side has no window of 2 tokens or more".into(),
        });
    }
    let loss = loss_sum / tokens as f64;
    let units = unit_loss
        .iter()
        .zip(&unit_tokens)
        .filter(|(_, t)| **t > 0)
        .map(|(l, t)| tutela_privacy::metrics::UnitMetric {
            loss: l / *t as f64,
            correct: 0.0,
        })
        .collect();
    Ok(LmEval {
        loss,
        perplexity: loss.exp(),
        tokens,
        units,
    })
}

/// Positions of a batch that take a loss.
pub fn count_targets(targets: &Tensor) -> Result<usize, TrainError> {
    targets
        .f_ne(IGNORE_INDEX)
        .and_then(|t| t.f_sum(Kind::Int64))
        .and_then(|t| t.f_int64_value(&[]))
        .map(|n| n.max(0) as usize)
        .map_err(|source| TrainError::Torch {
            context: "counting targets".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_next_token_pair_once() {
        let ids: Vec<i64> = (0..10).collect();
        let w = cut_windows(&ids, 4);
        assert_eq!(
            w,
            vec![vec![0, 1, 2, 3, 4], vec![4, 5, 6, 7, 8], vec![8, 9]]
        );
        let pairs: usize = w.iter().map(|w| w.len() - 1).sum();
        assert_eq!(pairs, 9);
        assert!(cut_windows(&[7], 4).is_empty());
        assert_eq!(cut_windows(&[1, 2], 4), vec![vec![1, 2]]);
        assert_eq!(cut_windows(&ids, 9), vec![ids.clone()]);
    }
}
