//! Near-duplicate detection by SimHash (Charikar 2002), as used for web-scale deduplication by
//! Manku, Jain and Das Sarma (WWW 2007).
//!
//! **Fingerprint.** A document's words (maximal runs of alphanumeric characters, lower-cased, so
//! whitespace, punctuation and case do not matter) form overlapping shingles of
//! [`NearDuplicateConfig::shingle_words`] words. Each shingle is hashed to 64 bits (each word by
//! FNV-1a, chained through the MurmurHash3 finaliser, so every output bit depends on every input
//! byte and on word order; fixed constants, so a fingerprint is the same on every machine and
//! Rust version). Bit *i* of the fingerprint is 1
//! when more shingle occurrences have bit *i* set than not. Similar shingle sets give fingerprints
//! at a small Hamming distance; unrelated ones differ in about 32 bits.
//!
//! **Index.** Finding every kept fingerprint within Hamming distance *k* of a new one uses the
//! block ("band") index of Manku et al.: the 64 bits are cut into *k* + 1 contiguous blocks, and
//! a table per block maps the block's value to the fingerprints that have it. Two fingerprints at
//! distance ≤ *k* differ in at most *k* blocks, so by the pigeonhole principle they agree exactly
//! on at least one: looking up each of the new fingerprint's *k* + 1 blocks finds every candidate,
//! and only candidates are compared bit by bit. With the default *k* = 6 the blocks are 9 or 10
//! bits wide and a lookup touches, for random fingerprints, about 7n/600 candidates instead of n
//! (thousands to a few hundred thousand documents; for millions, use a smaller *k* or longer
//! blocks with permuted copies as in the paper). (The paper's
//! permuted tables are the same idea with the blocks moved to the front of a sorted array; hash
//! maps do it without sorting.)
//!
//! **Which copy stays.** Documents are taken in the order given (the text pipeline orders them
//! by date when a date is declared, then by position in the file); a document is dropped when it
//! is within *k* of a document already kept. Comparing against kept documents only means a chain
//! of small edits (A ≈ B ≈ C, A far from C) keeps A and C.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The largest Hamming threshold accepted: beyond it the blocks are narrower than 4 bits and the
/// index degenerates into comparing (almost) all pairs, and unrelated documents start to match.
pub const MAX_HAMMING: u32 = 15;

fn default_enabled() -> bool {
    true
}
/// Measured on the Synthea notes with 3-word shingles (see the privacy crate's integration test
/// `text::simhash_on_the_real_notes_timing_and_false_positives`): at 6, no dropped note shares
/// less than half its shingles with the note it matched and no pair with Jaccard < 0.5 is within
/// the threshold, while 99% of pairs with Jaccard >= 0.9 are; at 3 (the web-page setting of Manku
/// et al.) only half of those were, since a 1,300-character note has few shingles.
fn default_max_hamming() -> u32 {
    6
}
fn default_shingle_words() -> usize {
    3
}

/// `near_duplicates` settings of a text dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearDuplicateConfig {
    /// Off: no document is dropped as a near-duplicate. Default on.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Two documents whose fingerprints differ in at most this many of 64 bits are
    /// near-duplicates. 0..=[`MAX_HAMMING`]; default 6.
    #[serde(default = "default_max_hamming")]
    pub max_hamming: u32,
    /// Words per shingle; default 3.
    #[serde(default = "default_shingle_words")]
    pub shingle_words: usize,
}

impl Default for NearDuplicateConfig {
    fn default() -> Self {
        NearDuplicateConfig {
            enabled: default_enabled(),
            max_hamming: default_max_hamming(),
            shingle_words: default_shingle_words(),
        }
    }
}

impl NearDuplicateConfig {
    /// The settings' problem, if any, as a sentence naming the key.
    pub fn check(&self) -> Result<(), String> {
        if self.max_hamming > MAX_HAMMING {
            return Err(format!(
                "near_duplicates.max_hamming must be at most {MAX_HAMMING}, found {}",
                self.max_hamming
            ));
        }
        if !(1..=16).contains(&self.shingle_words) {
            return Err(format!(
                "near_duplicates.shingle_words must be between 1 and 16, found {}",
                self.shingle_words
            ));
        }
        Ok(())
    }
}

/// 64-bit FNV-1a over `bytes`, continuing from `state`.
fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state
}

/// MurmurHash3's 64-bit finaliser: an invertible mix that spreads every bit over the word.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The lower-cased alphanumeric words of `text`.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The hash of each lower-cased alphanumeric word of `text`, without building the words.
fn word_hashes(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut h = FNV_OFFSET;
    let mut in_word = false;
    let mut buf = [0u8; 4];
    for c in text.chars() {
        if c.is_alphanumeric() {
            in_word = true;
            for lc in c.to_lowercase() {
                h = fnv1a(h, lc.encode_utf8(&mut buf).as_bytes());
            }
        } else if in_word {
            out.push(h);
            h = FNV_OFFSET;
            in_word = false;
        }
    }
    if in_word {
        out.push(h);
    }
    out
}

/// The 64-bit SimHash of `text` over shingles of `shingle_words` words (a text shorter than one
/// shingle is one shingle of all its words; a text without words has fingerprint 0). A shingle's
/// hash chains its words' FNV-1a hashes through the finaliser, so word order matters.
pub fn simhash(text: &str, shingle_words: usize) -> u64 {
    let words = word_hashes(text);
    if words.is_empty() {
        return 0;
    }
    let n = shingle_words.max(1).min(words.len());
    let mut counts = [0i64; 64];
    for shingle in words.windows(n) {
        let h = shingle.iter().fold(FNV_OFFSET, |acc, w| {
            fmix64(acc ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15)
        });
        let h = fmix64(h);
        for (bit, count) in counts.iter_mut().enumerate() {
            *count += if (h >> bit) & 1 == 1 { 1 } else { -1 };
        }
    }
    counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .fold(0u64, |acc, (bit, _)| acc | 1 << bit)
}

/// The Hamming distance of two fingerprints.
pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// The block index of kept fingerprints (see the module docs).
pub struct SimHashIndex {
    max_hamming: u32,
    /// (shift, mask) of each of the `max_hamming + 1` blocks.
    blocks: Vec<(u32, u64)>,
    tables: Vec<HashMap<u64, Vec<u32>>>,
    fingerprints: Vec<u64>,
    /// Candidates compared bit by bit so far (the cost the index saves is all pairs minus this).
    comparisons: u64,
}

impl SimHashIndex {
    /// An empty index for threshold `max_hamming` (at most [`MAX_HAMMING`]; larger is clamped).
    pub fn new(max_hamming: u32) -> SimHashIndex {
        let max_hamming = max_hamming.min(MAX_HAMMING);
        let n_blocks = max_hamming + 1;
        let mut blocks = Vec::with_capacity(n_blocks as usize);
        let mut shift = 0u32;
        for b in 0..n_blocks {
            // Spread 64 bits as evenly as possible: the first 64 % n blocks get one bit more.
            let width = 64 / n_blocks + u32::from(b < 64 % n_blocks);
            let mask = if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            };
            blocks.push((shift, mask));
            shift += width;
        }
        SimHashIndex {
            max_hamming,
            tables: vec![HashMap::new(); blocks.len()],
            blocks,
            fingerprints: Vec::new(),
            comparisons: 0,
        }
    }

    /// The index (in insertion order) of a kept fingerprint within the threshold of `fp`, if any.
    pub fn find_near(&mut self, fp: u64) -> Option<usize> {
        for (b, &(shift, mask)) in self.blocks.iter().enumerate() {
            if let Some(ids) = self.tables[b].get(&((fp >> shift) & mask)) {
                for &id in ids {
                    self.comparisons += 1;
                    if hamming(self.fingerprints[id as usize], fp) <= self.max_hamming {
                        return Some(id as usize);
                    }
                }
            }
        }
        None
    }

    /// Keeps `fp`; returns its index.
    pub fn insert(&mut self, fp: u64) -> usize {
        let id = self.fingerprints.len();
        for (b, &(shift, mask)) in self.blocks.iter().enumerate() {
            self.tables[b]
                .entry((fp >> shift) & mask)
                .or_default()
                .push(id as u32);
        }
        self.fingerprints.push(fp);
        id
    }

    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    /// Candidate pairs compared bit by bit so far.
    pub fn comparisons(&self) -> u64 {
        self.comparisons
    }
}

/// For each fingerprint in order, `None` when it is kept, or `Some(j)` when it is dropped as a
/// near-duplicate of the kept fingerprint at position `j` of the input.
pub fn dedup(fingerprints: &[u64], max_hamming: u32) -> Vec<Option<usize>> {
    let mut index = SimHashIndex::new(max_hamming);
    let mut kept_at: Vec<usize> = Vec::new();
    fingerprints
        .iter()
        .enumerate()
        .map(|(i, &fp)| match index.find_near(fp) {
            Some(k) => Some(kept_at[k]),
            None => {
                index.insert(fp);
                kept_at.push(i);
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_all_64_bits_once() {
        for k in 0..=MAX_HAMMING {
            let idx = SimHashIndex::new(k);
            assert_eq!(idx.blocks.len() as u32, k + 1);
            let mut covered = 0u64;
            for &(shift, mask) in &idx.blocks {
                let m = mask << shift;
                assert_eq!(covered & m, 0, "k = {k}: blocks overlap");
                covered |= m;
            }
            assert_eq!(covered, u64::MAX, "k = {k}");
        }
    }

    /// The index finds exactly what comparing all pairs finds, on fingerprints built to sit at
    /// every distance around the threshold.
    #[test]
    fn index_agrees_with_all_pairs() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state = fmix64(state.wrapping_add(0x9e37_79b9_7f4a_7c15));
            state
        };
        for k in [0u32, 1, 3, 6, 10] {
            let mut fps = Vec::new();
            for _ in 0..200 {
                let base = next();
                fps.push(base);
                // Variants at distance 1..=k+2 from the base, flipping distinct random bits.
                let d = (next() % u64::from(k + 3)) as u32;
                let mut v = base;
                let mut flipped = 0;
                while flipped < d {
                    let bit = next() % 64;
                    if ((v ^ base) >> bit) & 1 == 0 {
                        v ^= 1 << bit;
                        flipped += 1;
                    }
                }
                fps.push(v);
            }
            let got = dedup(&fps, k);
            // All pairs against kept fingerprints, in order.
            let mut kept: Vec<usize> = Vec::new();
            for (i, &fp) in fps.iter().enumerate() {
                let near = kept.iter().any(|&j| hamming(fps[j], fp) <= k);
                assert_eq!(got[i].is_some(), near, "k = {k}, i = {i}");
                if let Some(j) = got[i] {
                    assert!(hamming(fps[j], fp) <= k);
                } else {
                    kept.push(i);
                }
            }
        }
    }

    #[test]
    fn fingerprint_ignores_whitespace_case_and_punctuation() {
        let a = simhash(
            "The patient is a 16 year-old female.\nNo known allergies.",
            3,
        );
        let b = simhash(
            "the  patient is a 16\tyear old female   no known ALLERGIES",
            3,
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            simhash("An entirely different sentence about the weather.", 3)
        );
        assert_eq!(simhash("", 3), 0);
    }
}
