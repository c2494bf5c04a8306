//! Which privacy budget a dataset spends: a key its *data* determines, not the operator's label.
//!
//! A budget keyed by `[datasets.X]`'s name was reset by renaming the dataset, declaring the same
//! file under a second name, or copying the file elsewhere under a new one (hole (b) of the
//! 2026-11 review). Here each budget is an entry of the node's identity map
//! (`privacy-ledger/identities.json`, encrypted with `[at_rest]` like the ledgers): its key (the
//! name of its ledger file and of its `privacy.spent` subject), the names it was declared under,
//! and the fingerprints ([`DatasetSource`]) of every version of its data the node has seen. A
//! dataset's source file is matched against the fingerprints: a file that *extends* one (the same
//! bytes, or the same bytes with rows appended) spends that budget, so a rename, a second name, a
//! copy and an append all share one budget. A file that matches nothing opens a new budget whose
//! key is derived from its own fingerprint (`b-<16 hex>`), so that the same data gets the same key
//! even when the map is lost.
//!
//! # Migration
//!
//! A ledger written before budget keys is a file named after the dataset. A dataset whose data
//! matches no entry but whose name has such a ledger adopts it: the entry's key is the name, so
//! the ledger file and the trail's earlier spends (subject `<site>/<name>`) keep their meaning.
//!
//! # Anchored in the trail
//!
//! Each `privacy.spent` carries the fingerprint of the data it charged, so the trail knows which
//! data each budget key belongs to. Before training, the node checks that no spend of the trail
//! whose data its source extends is under another key than the one it resolved
//! ([`IdentityBehindTrail`]: the map was deleted, then the data changed); an officer's restore
//! rebinds the data to the trail's key ([`BudgetIdentities::bind`]).
//!
//! # Records, not bytes
//!
//! A fingerprint of bytes misses what rewrites the bytes but keeps the records: a re-export that
//! reorders rows or columns, CSV quoting, line endings or whitespace, a conversion between CSV,
//! JSON Lines and Parquet, a dropped row, deduplication, a sample, a column added or dropped.
//! So each version of a budget's data also keeps a sketch of its *records* ([`sketch`], read by
//! [`records`] through the same sources the pipeline reads, after parsing and normalisation): a
//! dataset sharing more than [`sketch::SHARED_FRACTION`] of its records with a budget's data
//! spends that budget. The same covers PostgreSQL sources and directories of documents, which
//! have no one file to fingerprint. The sketches stay in the encrypted map (never in the trail):
//! a budget found only by its records after the map was deleted is found by its key, which for
//! data with no file is derived from its records.
//!
//! # What it does not cover
//!
//! The same people's records so changed that fewer than a quarter of them are equal after
//! normalisation (two or more columns re-coded or perturbed, or the one column that tells the
//! records apart; another table of the same patients; one column changed is found while the
//! others tell the records apart, [`sketch::shared_fraction`]); a subset smaller
//! than about 1.6 % of a known dataset (see [`sketch::RECORDS_K`]); and, when the map is
//! deleted *and* the file rewritten, data whose new bytes extend no fingerprint in the trail.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tutela_audit::payload::privacy::DatasetSource;
use tutela_privacy::at_rest::{self, EncryptOptions, KeyEncryptionKey};

pub mod records;
pub mod sketch;

pub use records::BudgetSource;
use sketch::RecordSketch;

/// The most record sketches an entry keeps (the newest): each version of the data seen adds one.
const SKETCHES_KEPT: usize = 4;

/// The longest prefix a fingerprint hashes: long enough that two unrelated files do not share
/// it, short enough to read at every check.
pub const PREFIX_BYTES: u64 = 64 * 1024;

const DOMAIN: &[u8] = b"tutela/dataset-source/v1";
const FORMAT_VERSION: u32 = 1;

/// Why a dataset's budget could not be told. Names the dataset and the map's file, never the
/// data's path (a refusal's reason may leave the site).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the source of dataset {dataset:?} could not be read to find its privacy budget ({kind})"
    )]
    Source {
        dataset: String,
        kind: std::io::ErrorKind,
    },
    /// The records could not be parsed (the details, naming file and line, are in the site's
    /// log only).
    #[error("the records of dataset {dataset:?} could not be read to find its privacy budget")]
    Records { dataset: String },
    #[error("privacy budget identity map {}: {why}", .path.display())]
    Map { path: PathBuf, why: String },
}

/// The fingerprint of the file at `path` now, and its length.
pub fn fingerprint(path: &Path) -> std::io::Result<DatasetSource> {
    let len = std::fs::metadata(path)?.len().min(PREFIX_BYTES);
    Ok(DatasetSource {
        prefix_len: len,
        prefix_sha256: prefix_hash(path, len)?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?,
    })
}

/// The hex hash of the first `len` bytes of the file, or `None` when it is shorter.
fn prefix_hash(path: &Path, len: u64) -> std::io::Result<Option<String>> {
    let mut prefix = Vec::with_capacity(len as usize);
    std::fs::File::open(path)?
        .take(len)
        .read_to_end(&mut prefix)?;
    if (prefix.len() as u64) < len {
        return Ok(None);
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(DOMAIN);
    ctx.update(&prefix);
    Ok(Some(hex::encode(ctx.finish())))
}

/// Whether the file at `path` extends `source`: its first `prefix_len` bytes are the ones
/// fingerprinted (the same data, or the same data with rows appended).
pub fn extends(path: &Path, source: &DatasetSource) -> std::io::Result<bool> {
    // An empty file's fingerprint would be extended by every file: it identifies nothing.
    if source.prefix_len == 0 {
        return Ok(false);
    }
    Ok(prefix_hash(path, source.prefix_len)?.as_deref() == Some(source.prefix_sha256.as_str()))
}

/// The key of a new budget for data first seen with `source`.
pub fn new_key(source: &DatasetSource) -> String {
    format!("b-{}", &source.prefix_sha256[..16])
}

/// One budget: its key, the names it was declared under, the versions of its data seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetEntry {
    pub key: String,
    pub names: BTreeSet<String>,
    pub sources: Vec<DatasetSource>,
    /// Set when the entry adopted a ledger written before budget keys (keyed by `key`, a name).
    #[serde(default)]
    pub migrated_from_name: bool,
    /// Sketches of the records of the versions seen, newest last ([`SKETCHES_KEPT`] at most).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<RecordSketch>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    version: u32,
    budgets: Vec<BudgetEntry>,
}

/// The node's identity map (see the module documentation).
pub struct BudgetIdentities {
    path: PathBuf,
    kek: Option<Arc<dyn KeyEncryptionKey>>,
    file: MapFile,
}

/// What [`BudgetIdentities::resolve`] found for a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub key: String,
    /// The data's file fingerprint now (none for data that is not one file).
    pub source: Option<DatasetSource>,
}

/// What the node knows of a dataset's data now, to find its budget: the fingerprint of its file
/// (if it is one file) and the sketch of its records.
#[derive(Debug, Clone, Copy)]
pub struct DataSeen<'a> {
    /// The data file and its fingerprint now.
    pub file: Option<(&'a Path, &'a DatasetSource)>,
    pub records: Option<&'a RecordSketch>,
}

impl BudgetIdentities {
    /// The map under `dir` (a missing file is an empty map).
    pub fn open(dir: &Path, kek: Option<Arc<dyn KeyEncryptionKey>>) -> Result<Self, IdentityError> {
        let path = dir.join(if kek.is_some() {
            "identities.json.enc"
        } else {
            "identities.json"
        });
        let err = |why: String| IdentityError::Map {
            path: path.clone(),
            why,
        };
        let file = if !path.exists() {
            MapFile {
                version: FORMAT_VERSION,
                budgets: Vec::new(),
            }
        } else {
            let bytes = match &kek {
                Some(k) => {
                    at_rest::decrypt_to_vec(&path, k.as_ref()).map_err(|e| err(e.to_string()))?
                }
                None => std::fs::read(&path).map_err(|e| err(e.to_string()))?,
            };
            let file: MapFile = serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
            if file.version != FORMAT_VERSION {
                return Err(err(format!(
                    "format version {} is not {FORMAT_VERSION}",
                    file.version
                )));
            }
            file
        };
        Ok(BudgetIdentities { path, kek, file })
    }

    pub fn budgets(&self) -> &[BudgetEntry] {
        &self.file.budgets
    }

    /// The budget of dataset `name` whose data is `seen`, recording what was learned (a new
    /// name, a new version of the data, a new budget, a migrated ledger).
    /// `legacy_ledger_exists` says whether a ledger named after the dataset exists.
    ///
    /// Found, in this order: an entry whose file fingerprint the file extends (the same bytes,
    /// or rows appended); the entry whose records the data's share most, when more than
    /// [`sketch::SHARED_FRACTION`]; a ledger named after the dataset (migration); else a new
    /// budget keyed by the file's fingerprint, or by the records' digest when there is no file.
    pub fn resolve(
        &mut self,
        name: &str,
        seen: DataSeen<'_>,
        legacy_ledger_exists: bool,
    ) -> Result<Resolved, IdentityError> {
        let (key, adopt) = self.find(name, seen, legacy_ledger_exists)?;
        if adopt {
            tracing::warn!(
                dataset = %name,
                "adopting the privacy ledger keyed by the dataset's name as this data's \
                 budget (migration to budget keys)"
            );
            self.file.budgets.push(BudgetEntry {
                key: name.to_string(),
                names: BTreeSet::new(),
                sources: Vec::new(),
                migrated_from_name: true,
                records: Vec::new(),
            });
        }
        self.bind(name, &key, seen.file.map(|(_, s)| s), seen.records)?;
        Ok(Resolved {
            key,
            source: seen.file.map(|(_, s)| s.clone()),
        })
    }

    /// The budget [`resolve`](Self::resolve) would find, learning and saving nothing (before a
    /// task's approvals: the gate weighs the site policy's budget clause against it).
    pub fn lookup(
        &self,
        name: &str,
        seen: DataSeen<'_>,
        legacy_ledger_exists: bool,
    ) -> Result<String, IdentityError> {
        self.find(name, seen, legacy_ledger_exists)
            .map(|(key, _)| key)
    }

    /// The key of `seen`'s budget, and whether it is a ledger named after the dataset to adopt.
    fn find(
        &self,
        name: &str,
        seen: DataSeen<'_>,
        legacy_ledger_exists: bool,
    ) -> Result<(String, bool), IdentityError> {
        let read_err = |e: std::io::Error| IdentityError::Source {
            dataset: name.to_string(),
            kind: e.kind(),
        };
        let mut found = None;
        if let Some((path, _)) = seen.file {
            'entries: for (i, entry) in self.file.budgets.iter().enumerate() {
                for s in &entry.sources {
                    if extends(path, s).map_err(read_err)? {
                        found = Some(i);
                        break 'entries;
                    }
                }
            }
        }
        if found.is_none()
            && let Some(records) = seen.records
        {
            let mut best = (sketch::SHARED_FRACTION, None);
            for (i, entry) in self.file.budgets.iter().enumerate() {
                for known in &entry.records {
                    let shared = sketch::shared_fraction(records, known);
                    if shared > best.0 {
                        best = (shared, Some(i));
                    }
                }
            }
            if let (shared, Some(i)) = best {
                tracing::debug!(
                    dataset = %name,
                    budget = %self.file.budgets[i].key,
                    shared = format!("{:.0} %", shared * 100.0),
                    "the dataset's records are largely a known budget's: it spends that budget"
                );
                found = Some(i);
            }
        }
        let key = match found {
            Some(i) => self.file.budgets[i].key.clone(),
            None => {
                let claimed = self.file.budgets.iter().any(|b| b.key == name);
                if legacy_ledger_exists && !claimed {
                    return Ok((name.to_string(), true));
                } else {
                    // Keyed by the records when there are enough to tell (the same records in
                    // any order or format, found again without the map), else by the file.
                    let records = seen
                        .records
                        .filter(|r| r.records.0.len() >= sketch::MIN_SAMPLE);
                    match (records, seen.file) {
                        (Some(records), _) => format!("b-{}", &records.digest_hex()[..16]),
                        (None, Some((_, source))) => new_key(source),
                        // Nothing read to key by: the name, as before budget keys.
                        (None, None) => name.to_string(),
                    }
                }
            }
        };
        Ok((key, false))
    }

    /// Binds dataset `name` and the data version seen (`source`, `records`) to the budget `key`
    /// (creating its entry), taking them from any other entry; saves when anything changed.
    pub fn bind(
        &mut self,
        name: &str,
        key: &str,
        source: Option<&DatasetSource>,
        records: Option<&RecordSketch>,
    ) -> Result<(), IdentityError> {
        let before = self.file.budgets.clone();
        for other in self.file.budgets.iter_mut().filter(|b| b.key != key) {
            other.names.remove(name);
            if let Some(source) = source {
                other.sources.retain(|s| s != source);
            }
            if let Some(records) = records {
                other.records.retain(|r| r != records);
            }
        }
        // An entry left with no data and no ledger of its own says nothing: dropped.
        self.file.budgets.retain(|b| {
            b.key == key || !b.sources.is_empty() || !b.records.is_empty() || b.migrated_from_name
        });
        let entry = match self.file.budgets.iter().position(|b| b.key == key) {
            Some(i) => &mut self.file.budgets[i],
            None => {
                self.file.budgets.push(BudgetEntry {
                    key: key.to_string(),
                    names: BTreeSet::new(),
                    sources: Vec::new(),
                    migrated_from_name: false,
                    records: Vec::new(),
                });
                let last = self.file.budgets.len() - 1;
                &mut self.file.budgets[last]
            }
        };
        entry.names.insert(name.to_string());
        if let Some(source) = source
            && !entry.sources.contains(source)
        {
            entry.sources.push(source.clone());
        }
        if let Some(records) = records.filter(|r| !r.is_empty())
            && !entry.records.contains(records)
        {
            entry.records.push(records.clone());
            let extra = entry.records.len().saturating_sub(SKETCHES_KEPT);
            entry.records.drain(..extra);
        }
        if self.file.budgets != before {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), IdentityError> {
        let err = |why: String| IdentityError::Map {
            path: self.path.clone(),
            why,
        };
        let bytes = serde_json::to_vec_pretty(&self.file).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        match &self.kek {
            Some(k) => {
                at_rest::encrypt_bytes(&bytes, &self.path, k.as_ref(), EncryptOptions::default())
                    .map_err(|e| err(e.to_string()))?;
            }
            None => {
                use std::io::Write;
                let dir = self.path.parent().unwrap_or(Path::new("."));
                let mut tmp =
                    tempfile::NamedTempFile::new_in(dir).map_err(|e| err(e.to_string()))?;
                tmp.write_all(&bytes).map_err(|e| err(e.to_string()))?;
                tmp.as_file().sync_all().map_err(|e| err(e.to_string()))?;
                tmp.persist(&self.path)
                    .map_err(|e| err(e.error.to_string()))?;
            }
        }
        Ok(())
    }
}

/// Why a node does not train on a dataset whose identity map disagrees with the trail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the audit trail records spends of this node on the data of dataset {dataset:?} under the \
     privacy budget {trail_key:?}, but the node's identity map puts that data under {resolved:?} \
     (first: seq {first_seq}): the map was deleted or rolled back, so the dataset's ε would be \
     understated. This node does not train on {dataset:?} until a compliance officer of the site \
     restores the ledgers from the trail (`tutela-node ledger restore --config node.toml \
     --officer-cert CERT --officer-key KEY`)"
)]
pub struct IdentityBehindTrail {
    pub dataset: String,
    pub resolved: String,
    pub trail_key: String,
    pub first_seq: u64,
}

/// The budget key the trail puts the data at `source_path` under, with the first such spend's
/// seq: the key of the first spend whose recorded data the file extends. `spends` are
/// (seq, key, data) of this node's `privacy.spent` events.
pub fn key_in_trail<'a>(
    dataset: &str,
    source_path: &Path,
    spends: impl IntoIterator<Item = (u64, &'a str, Option<&'a DatasetSource>)>,
) -> Result<Option<(String, u64)>, IdentityError> {
    for (seq, key, source) in spends {
        let Some(source) = source else { continue };
        let matches = extends(source_path, source).map_err(|e| IdentityError::Source {
            dataset: dataset.to_string(),
            kind: e.kind(),
        })?;
        if matches {
            return Ok(Some((key.to_string(), seq)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        map: &mut BudgetIdentities,
        name: &str,
        path: &Path,
        legacy: bool,
    ) -> Result<Resolved, IdentityError> {
        let fp = fingerprint(path).unwrap();
        let records = BudgetSource::table_file(path).sketch(name).unwrap();
        map.resolve(
            name,
            DataSeen {
                file: Some((path, &fp)),
                records: Some(&records),
            },
            legacy,
        )
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn renamed_redeclared_copied_and_appended_data_resolve_to_one_budget() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a.csv");
        write(&data, "x,y\n1,2\n3,4\n");
        let mut map = BudgetIdentities::open(&dir.path().join("l"), None).unwrap();
        let first = resolve(&mut map, "cohort", &data, false).unwrap();
        assert!(first.key.starts_with("b-"), "{first:?}");
        // Renamed, and declared twice.
        assert_eq!(
            resolve(&mut map, "renamed", &data, false).unwrap().key,
            first.key
        );
        assert_eq!(
            resolve(&mut map, "cohort", &data, false).unwrap().key,
            first.key
        );
        // Copied elsewhere.
        let copy = dir.path().join("elsewhere.csv");
        std::fs::copy(&data, &copy).unwrap();
        assert_eq!(
            resolve(&mut map, "copy", &copy, false).unwrap().key,
            first.key
        );
        // Rows appended, then appended again.
        write(&data, "x,y\n1,2\n3,4\n5,6\n");
        assert_eq!(
            resolve(&mut map, "cohort", &data, false).unwrap().key,
            first.key
        );
        write(&data, "x,y\n1,2\n3,4\n5,6\n7,8\n");
        // The map survives a reopen.
        let mut map = BudgetIdentities::open(&dir.path().join("l"), None).unwrap();
        assert_eq!(
            resolve(&mut map, "cohort", &data, false).unwrap().key,
            first.key
        );
        // Other data: another budget.
        let other = dir.path().join("other.csv");
        write(&other, "x,y\n9,9\n");
        assert_ne!(
            resolve(&mut map, "other", &other, false).unwrap().key,
            first.key
        );
    }

    #[test]
    fn a_ledger_keyed_by_name_is_adopted_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a.csv");
        write(&data, "x\n1\n");
        let mut map = BudgetIdentities::open(dir.path(), None).unwrap();
        assert_eq!(resolve(&mut map, "old", &data, true).unwrap().key, "old");
        assert!(map.budgets()[0].migrated_from_name);
        // Renamed after the migration: still the adopted ledger.
        assert_eq!(resolve(&mut map, "new", &data, false).unwrap().key, "old");
    }

    #[test]
    fn the_trail_names_the_key_of_data_it_has_seen() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a.csv");
        write(&data, "x\n1\n");
        let seen = fingerprint(&data).unwrap();
        write(&data, "x\n1\n2\n");
        let found = key_in_trail("d", &data, [(3, "b-old", Some(&seen)), (4, "x", None)]).unwrap();
        assert_eq!(found, Some(("b-old".to_string(), 3)));
        let other = dir.path().join("b.csv");
        write(&other, "y\n1\n");
        assert_eq!(
            key_in_trail("d", &other, [(3, "b-old", Some(&seen))]).unwrap(),
            None
        );
    }
}
