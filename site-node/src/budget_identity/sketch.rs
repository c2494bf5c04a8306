//! A dataset's records as a bottom-k sketch, so that two datasets that share most of their
//! records are found to, whatever their file format, row order, column order or spelling.
//!
//! A fingerprint of a file's bytes is reset by anything that rewrites the bytes: a re-export
//! that reorders rows, CSV quoting or line endings, a conversion to JSON Lines or Parquet,
//! a dropped row, a 90 % sample. What those keep is the *set of records*. So each record the
//! pipeline yields (after parsing: [`super::records`] turns each cell into a canonical key) is
//! hashed as the *multiset* of its cells' keys, independent of column order and names; the
//! sketch keeps the `k` smallest distinct record hashes (bottom-k, Cohen & Kaplan 2007), and,
//! per column, the `k` smallest hashes of the records *without* that column's cell, so that a
//! version with one column added or dropped still meets the other's records.
//!
//! [`shared_fraction`] estimates, from two sketches, the share of the smaller dataset's records
//! that the other holds: for hashes below both sketches' thresholds the sketches hold *every*
//! record of their sets, so membership there is exact and the estimate is a uniform sample of
//! the records. A dataset whose estimated share with a known budget's data is above
//! [`SHARED_FRACTION`] is charged to that budget.
//!
//! The hashes are of the site's records: kept only in the node's encrypted identity map, never
//! in the trail or an error (a low-entropy record could be guessed from its hash).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many record hashes a sketch keeps. A dataset is compared through the records of both
/// sketches' hash ranges: a subset smaller than about `MIN_SAMPLE / RECORDS_K` of a known
/// dataset (1.6 %) is too thin a sample to tell. 16 KiB in the map.
pub const RECORDS_K: usize = 1024;
/// How many hashes each column-dropped sketch keeps (one per column: kept smaller).
pub const COLUMN_K: usize = 128;
/// The widest table whose column-dropped sketches are kept: a wider one (an image as pixel
/// columns) would make the map megabytes per version; its column added or dropped is not
/// found (its whole records still are).
pub const MAX_SKETCHED_COLUMNS: usize = 32;
/// The fewest records a comparison must see before it says anything: fewer distinct records
/// (a tiny table) are matched by the file fingerprint only.
pub const MIN_SAMPLE: usize = 16;
/// A dataset whose records are, by more than this share (of the smaller of the two), records of
/// a known budget's data spends that budget. A quarter, not a half: to get a fresh budget for
/// reused records, they must be diluted in at least three times as many new ones (and a dataset
/// split in four quarters each so diluted is mostly other people's data). Unrelated tables
/// rarely share a quarter of their *whole* records; when they do (a table of two low-cardinality
/// columns), the error charges more, never less. A constant, not a setting: a knob the operator
/// could turn to 1 would reopen the reset.
pub const SHARED_FRACTION: f64 = 0.25;

/// How many of the smallest record hashes a new budget's key is derived from: few, so that a
/// row or two dropped or appended rarely changes it.
const KEY_HASHES: usize = 4;

const CELL_DOMAIN: &[u8] = b"tutela/budget-record-cell/v1";

/// The sketch of a dataset's records (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSketch {
    /// The smallest [`RECORDS_K`] distinct record hashes, ascending.
    pub records: Hashes,
    /// Per column of the source (in its order), the smallest [`COLUMN_K`] distinct hashes of the
    /// records without that column's cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub without_column: Vec<Hashes>,
}

/// Ascending distinct 64-bit hashes, stored as one hex string (16 digits each).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hashes(pub Vec<u64>);

impl Serialize for Hashes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(self.0.len() * 16);
        for h in &self.0 {
            text.push_str(&format!("{h:016x}"));
        }
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Hashes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if !text.len().is_multiple_of(16) || !text.is_ascii() {
            return Err(serde::de::Error::custom(
                "record hashes: not a sequence of 16 hex digits each",
            ));
        }
        let mut out = Vec::with_capacity(text.len() / 16);
        for i in (0..text.len()).step_by(16) {
            let h = u64::from_str_radix(&text[i..i + 16], 16).map_err(serde::de::Error::custom)?;
            if out.last().is_some_and(|last| *last >= h) {
                return Err(serde::de::Error::custom(
                    "record hashes: not strictly ascending",
                ));
            }
            out.push(h);
        }
        Ok(Hashes(out))
    }
}

impl RecordSketch {
    /// Whether the sketch saw no record at all.
    pub fn is_empty(&self) -> bool {
        self.records.0.is_empty()
    }

    /// A short digest of the record set (its smallest hashes): the same records in any order or
    /// format give the same digest, so a budget first opened for them gets the same key even
    /// without the identity map.
    pub fn digest_hex(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"tutela/budget-record-set/v1");
        for h in self.records.0.iter().take(KEY_HASHES) {
            ctx.update(&h.to_be_bytes());
        }
        hex::encode(ctx.finish())
    }
}

/// The 64-bit hash of one cell's canonical form ([`super::records`]): FNV-1a over a tag and the
/// form's bytes, spread by the finaliser. Not a cryptographic hash: the hashes never leave the
/// node's encrypted map, and what matters is speed (a table's every cell is hashed at start) and
/// that they are spread evenly, so that the smallest are a uniform sample. A fixed function, so
/// that sketches stored by one build compare with the next.
#[derive(Debug, Clone, Copy)]
pub struct CellHasher(u64);

impl CellHasher {
    /// A hasher for a cell of kind `tag` (a number's bits and a text's bytes never collide).
    pub fn new(tag: u8) -> Self {
        let mut h = CellHasher(0xcbf2_9ce4_8422_2325);
        h.write(CELL_DOMAIN);
        h.write(&[tag]);
        h
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        record_hash(self.0)
    }
}

/// Tags of [`CellHasher`]: a number by its value, anything else by its text.
pub const NUMBER_TAG: u8 = 1;
pub const TEXT_TAG: u8 = 2;

/// A text cell's hash, as written (tests and documents normalise first).
pub fn cell_hash(text: &str) -> u64 {
    let mut h = CellHasher::new(TEXT_TAG);
    h.write(text.as_bytes());
    h.finish()
}

/// A multiset's hash from the (wrapping) sum of its cells' hashes: independent of cell order,
/// and one cell is taken out by a subtraction. The finaliser spreads the sum over all 64 bits
/// (splitmix64's), so that the smallest hashes are a uniform sample of the records.
fn record_hash(sum: u64) -> u64 {
    let mut z = sum ^ 0x7475_7465_6c61_7262; // "tutelarb"
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `k` smallest distinct values inserted.
#[derive(Debug, Clone)]
struct BottomK {
    k: usize,
    set: std::collections::BTreeSet<u64>,
}

impl BottomK {
    fn new(k: usize) -> Self {
        BottomK {
            k,
            set: std::collections::BTreeSet::new(),
        }
    }

    fn insert(&mut self, h: u64) {
        if self.set.len() < self.k {
            self.set.insert(h);
        } else if self.set.last().is_some_and(|max| h < *max) && self.set.insert(h) {
            self.set.pop_last();
        }
    }

    fn finish(self) -> Hashes {
        Hashes(self.set.into_iter().collect())
    }
}

/// Builds a [`RecordSketch`] one record at a time.
#[derive(Debug, Clone)]
pub struct SketchBuilder {
    records: BottomK,
    without_column: Vec<BottomK>,
    cells: Vec<Option<u64>>,
}

impl Default for SketchBuilder {
    fn default() -> Self {
        SketchBuilder {
            records: BottomK::new(RECORDS_K),
            without_column: Vec::new(),
            cells: Vec::new(),
        }
    }
}

impl SketchBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one record: its cells' hashes ([`CellHasher`]) in column order (`None`: a missing
    /// cell, which is no part of the record, so a column of blanks added changes nothing).
    pub fn add_record(&mut self, cells: impl IntoIterator<Item = Option<u64>>) {
        self.cells.clear();
        self.cells.extend(cells);
        self.add_hashed();
    }

    /// Adds one record of a single cell (a document's text): dropping its one column leaves
    /// nothing to compare.
    pub fn add_single(&mut self, cell: u64) {
        self.records.insert(record_hash(cell));
    }

    fn add_hashed(&mut self) {
        let present = self.cells.iter().flatten().count();
        if present == 0 {
            return;
        }
        let sum = self
            .cells
            .iter()
            .flatten()
            .fold(0u64, |a, h| a.wrapping_add(*h));
        let full = record_hash(sum);
        self.records.insert(full);
        if self.cells.len() > MAX_SKETCHED_COLUMNS {
            return;
        }
        if self.without_column.len() < self.cells.len() {
            self.without_column
                .resize_with(self.cells.len(), || BottomK::new(COLUMN_K));
        }
        for (j, cell) in self.cells.iter().enumerate() {
            match cell {
                // The record without a missing cell is the record.
                None => self.without_column[j].insert(full),
                // A record of that one cell alone is nothing without it.
                Some(_) if present == 1 => {}
                Some(h) => self.without_column[j].insert(record_hash(sum.wrapping_sub(*h))),
            }
        }
    }

    pub fn finish(self) -> RecordSketch {
        RecordSketch {
            records: self.records.finish(),
            without_column: self
                .without_column
                .into_iter()
                .map(BottomK::finish)
                .collect(),
        }
    }
}

/// The distinct hashes a bottom-`k` sketch stands for: exact below `k`, else `(k − 1)` over the
/// `k`-th smallest hash as a fraction of the range (Cohen & Kaplan's estimator).
fn distinct_estimate(h: &Hashes, k: usize) -> f64 {
    match h.0.get(k.saturating_sub(1)) {
        Some(&kth) if h.0.len() >= k => (k as f64 - 1.0) / ((kth as f64 + 1.0) / 2f64.powi(64)),
        _ => h.0.len() as f64,
    }
}

/// Whether the records without one column (`column`, a [`COLUMN_K`] sketch) are still about as
/// many as the records (`records`): the other columns tell the records apart, so sharing
/// them says the records are shared.
fn identifying(column: &Hashes, records: &Hashes) -> bool {
    distinct_estimate(column, COLUMN_K) >= 0.75 * distinct_estimate(records, RECORDS_K)
}

/// The share of `a`'s records that `b` holds, estimated over the hash range both sketches hold
/// completely; `None` when that range holds fewer than [`MIN_SAMPLE`] of `a`'s records.
fn containment(a: &Hashes, a_k: usize, b: &Hashes, b_k: usize) -> Option<f64> {
    let threshold = |h: &Hashes, k: usize| {
        if h.0.len() < k {
            u64::MAX
        } else {
            h.0.last().copied().unwrap_or(u64::MAX)
        }
    };
    let cut = threshold(a, a_k).min(threshold(b, b_k));
    let mut sample = 0usize;
    let mut shared = 0usize;
    for h in a.0.iter().take_while(|h| **h <= cut) {
        sample += 1;
        if b.0.binary_search(h).is_ok() {
            shared += 1;
        }
    }
    (sample >= MIN_SAMPLE).then(|| shared as f64 / sample as f64)
}

/// The estimated share of the records of the smaller of `a` and `b` that the other holds, the
/// records compared whole, with one column dropped on either side (a column added or removed by
/// a re-export), and with one column dropped on both (one column's values perturbed or
/// re-coded: attack-s8). The last only where the records without that column are still
/// nearly as many as the records ([`identifying`]): a column whose removal leaves few distinct
/// records (two low-cardinality columns) would match unrelated tables. 0 when the sketches are
/// too thin to tell.
pub fn shared_fraction(a: &RecordSketch, b: &RecordSketch) -> f64 {
    let mut pairs: Vec<(&Hashes, usize, &Hashes, usize)> =
        vec![(&a.records, RECORDS_K, &b.records, RECORDS_K)];
    for column in &b.without_column {
        pairs.push((&a.records, RECORDS_K, column, COLUMN_K));
    }
    for column in &a.without_column {
        pairs.push((column, COLUMN_K, &b.records, RECORDS_K));
    }
    for x in a
        .without_column
        .iter()
        .filter(|c| identifying(c, &a.records))
    {
        for y in b
            .without_column
            .iter()
            .filter(|c| identifying(c, &b.records))
        {
            pairs.push((x, COLUMN_K, y, COLUMN_K));
        }
    }
    pairs
        .into_iter()
        .flat_map(|(x, xk, y, yk)| [containment(x, xk, y, yk), containment(y, yk, x, xk)])
        .flatten()
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch(rows: &[Vec<String>]) -> RecordSketch {
        let mut b = SketchBuilder::new();
        for r in rows {
            b.add_record(r.iter().map(|c| Some(cell_hash(c))));
        }
        b.finish()
    }

    fn rows(range: std::ops::Range<usize>) -> Vec<Vec<String>> {
        range
            .map(|i| {
                vec![
                    format!("{}", 30 + i % 40),
                    format!("{}", 1000 + 7 * i),
                    format!("{}", i % 2),
                ]
            })
            .collect()
    }

    #[test]
    fn order_and_column_order_do_not_change_the_sketch() {
        let a = rows(0..3000);
        let mut b = a.clone();
        b.reverse();
        for r in &mut b {
            r.rotate_left(1);
        }
        assert_eq!(sketch(&a).records, sketch(&b).records);
        assert!((shared_fraction(&sketch(&a), &sketch(&b)) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn subsets_supersets_and_a_column_added_or_dropped_share_their_records() {
        let all = rows(0..5000);
        let known = sketch(&all);
        // 90 % sample, one row dropped, rows appended (the known data is inside).
        let sample: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 10 != 3)
            .map(|(_, r)| r.clone())
            .collect();
        assert!(shared_fraction(&sketch(&sample), &known) > 0.95);
        assert!(shared_fraction(&sketch(&all[1..]), &known) > 0.99);
        assert!(shared_fraction(&sketch(&rows(0..20_000)), &known) > 0.95);
        // A column added, a column dropped.
        let added: Vec<_> = all
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut r = r.clone();
                r.push(format!("site-{}", i % 3));
                r
            })
            .collect();
        assert!(shared_fraction(&sketch(&added), &known) > 0.95);
        let dropped: Vec<_> = all.iter().map(|r| r[1..].to_vec()).collect();
        assert!(shared_fraction(&sketch(&dropped), &known) > 0.95);
        // A quarter reused in three quarters new: at the line; a tenth: below.
        let tenth: Vec<_> = all[..500]
            .iter()
            .cloned()
            .chain(rows(100_000..104_500))
            .collect();
        let f = shared_fraction(&sketch(&tenth), &known);
        assert!(f < SHARED_FRACTION, "{f}");
        // Other data: nothing shared.
        let other = rows(100_000..105_000);
        assert!(shared_fraction(&sketch(&other), &known) < 0.01);
    }

    #[test]
    fn tiny_tables_are_not_compared_and_hashes_round_trip() {
        let small = sketch(&rows(0..5));
        assert_eq!(shared_fraction(&small, &small), 0.0);
        let s = sketch(&rows(0..3000));
        let json = serde_json::to_string(&s).unwrap();
        let back: RecordSketch = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(
            serde_json::from_str::<RecordSketch>(
                r#"{"records":"00000000000000020000000000000001"}"#
            )
            .is_err()
        );
    }
}
