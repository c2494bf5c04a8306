//! The train/validation split of a text dataset, by privacy unit: the document, or the patient
//! when the dataset declares a patient field, so that no patient has notes on both sides (a
//! model validated on notes of patients it trained on would look better than it is).
//!
//! Deterministic from the seed alone: units are ordered by SHA-256 of
//! (`tutela/text-split/v1`, seed, unit key), which does not depend on the order of the file, and
//! then taken into validation greedily while the validation side stays within
//! `validation_fraction` of all documents (but never all of them: the last unit then trains). By document this gives exactly
//! round(fraction × documents) validation documents. By patient, skewed sizes (one patient with
//! half the notes) can leave validation short of its share; if no patient fits at all, the
//! smallest one (earliest in the seeded order among equals) goes to validation, so each side
//! has at least one patient.

use std::collections::BTreeMap;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::anonymize::AnonymizeError;

/// What a split keeps together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitUnit {
    Document,
    Patient,
}

/// Which side each document went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// One per document, in input order: true for validation.
    pub validation: Vec<bool>,
    pub train_units: usize,
    pub validation_units: usize,
}

fn order_key(seed: u64, unit: &str) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(b"tutela/text-split/v1\0");
    c.update(&seed.to_le_bytes());
    c.update(unit.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// Splits documents whose privacy units are `units` (one key per document: its patient, or its
/// own id). Needs at least two distinct units.
pub fn split_by_unit(
    units: &[&str],
    validation_fraction: f64,
    seed: u64,
) -> Result<Split, AnonymizeError> {
    if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
        return Err(AnonymizeError::InvalidConfig {
            column: "validation_fraction".into(),
            reason: format!("must lie strictly between 0 and 1, found {validation_fraction}"),
        });
    }
    let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
    for u in units {
        *sizes.entry(u).or_insert(0) += 1;
    }
    if sizes.len() < 2 {
        return Err(AnonymizeError::InvalidConfig {
            column: "split".into(),
            reason: format!(
                "needs at least two privacy units (documents or patients) to split, found {}",
                sizes.len()
            ),
        });
    }
    let mut order: Vec<(&str, usize, [u8; 32])> = sizes
        .iter()
        .map(|(u, n)| (*u, *n, order_key(seed, u)))
        .collect();
    order.sort_by_key(|u| u.2);
    let target = (validation_fraction * units.len() as f64).round() as usize;
    let mut in_validation: BTreeMap<&str, bool> = BTreeMap::new();
    let mut taken = 0usize;
    for (u, n, _) in &order {
        let take = taken + n <= target;
        if take {
            taken += n;
        }
        in_validation.insert(u, take);
    }
    if taken == 0 {
        // Nothing fitted: the smallest unit, first in seeded order among equals.
        if let Some((u, _, _)) = order.iter().min_by_key(|(_, n, _)| *n) {
            in_validation.insert(u, true);
        }
    } else if in_validation.values().all(|v| *v) {
        // Everything fitted (a fraction close to 1): the last unit in seeded order trains.
        if let Some((u, _, _)) = order.last() {
            in_validation.insert(u, false);
        }
    }
    let validation_units = in_validation.values().filter(|v| **v).count();
    Ok(Split {
        validation: units.iter().map(|u| in_validation[u]).collect(),
        train_units: sizes.len() - validation_units,
        validation_units,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_document_takes_the_share_exactly_and_follows_the_seed() {
        let ids: Vec<String> = (0..100).map(|i| format!("doc{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let a = split_by_unit(&refs, 0.2, 7).unwrap();
        assert_eq!(a.validation.iter().filter(|v| **v).count(), 20);
        assert_eq!(a, split_by_unit(&refs, 0.2, 7).unwrap());
        assert_ne!(
            a.validation,
            split_by_unit(&refs, 0.2, 8).unwrap().validation
        );
        // Independent of the input order.
        let mut rev = refs.clone();
        rev.reverse();
        let b = split_by_unit(&rev, 0.2, 7).unwrap();
        let mut back = b.validation.clone();
        back.reverse();
        assert_eq!(a.validation, back);
    }

    #[test]
    fn a_dominant_unit_still_leaves_both_sides() {
        let mut units = vec!["big"; 90];
        units.extend(["s1"; 5]);
        units.extend(["s2"; 5]);
        let s = split_by_unit(&units, 0.01, 0).unwrap();
        assert!(!s.validation[0], "the big patient trains");
        assert_eq!(s.validation_units, 1);
        assert_eq!(s.train_units, 2);
        assert!(split_by_unit(&["only"; 4], 0.5, 0).is_err());
        assert!(split_by_unit(&["a", "b"], 1.0, 0).is_err());
    }
}
