//! The protection pipeline for text datasets (clinical notes, tickets, contracts) before a
//! language model trains on them. Pure logic: the site node reads the files and hands over
//! [`TextDocument`]s; what comes back is protected text, in memory, and a [`TextDeidReport`] of
//! counts.
//!
//! Steps, in this order, and why:
//! 1. **Empty documents** (nothing but whitespace) are dropped: nothing to learn, and an empty
//!    document would make every other empty one its "near-duplicate".
//! 2. **Content filter** ([`blocklist`]): documents (or only lines) containing a blocked term are
//!    dropped. It runs on the text *as written*, before redaction, so that a blocklist of names
//!    (a list of VIP patients) drops the whole note about them rather than a note with the name
//!    replaced by `[NAME]` and every other detail still there. A document whose every line was
//!    dropped is counted as emptied.
//! 3. **PII redaction**: the project's [`PiiRedactor`] (URLs, e-mails, IBANs, cards, SSNs, IPs,
//!    phone numbers, dates with a day, dictionary names) plus, when configured, names written as
//!    a capitalized word with digits appended (Synthea's `Sumiko254 Larue605`).
//! 4. **Near-duplicate removal** ([`simhash`]) on the *redacted* text, so that two copies of a
//!    note that differ only in a name or a date are duplicates. Documents are considered oldest
//!    first when a date is declared (the copy that stays is the original, not the copy-forward),
//!    then in file order.
//! 5. **Split** ([`split`]) into train and validation by privacy unit: the patient when the
//!    dataset declares a patient field, the document otherwise. Deduplication runs first so that
//!    two copies of a note cannot land on both sides.
//!
//! Every step is counted in the report; `documents_in` = `empty_documents` + the filter's
//! `documents_dropped` + `documents_emptied` + the near-duplicates' `documents_dropped` +
//! `documents_out`. The report holds counts and settings only, never text, a term, a name or a
//! path: it is meant to leave the site for the audit trail.

pub mod blocklist;
pub mod simhash;
pub mod split;

use std::collections::{BTreeMap, HashMap};

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

pub use blocklist::{Blocklist, FilterScope};
pub use simhash::NearDuplicateConfig;
pub use split::SplitUnit;

use super::AnonymizeError;
use super::pii::PiiRedactor;

/// One document as the site read it. Only `text` can reach training; `patient` decides the split
/// and the privacy unit; `date` orders near-duplicates; `line` names where it came from in local
/// errors (a line of a JSON Lines file, or the first line of a delimited document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDocument {
    pub line: u64,
    pub id: Option<String>,
    pub patient: Option<String>,
    pub date: Option<String>,
    pub text: String,
}

/// The privacy unit a patient id names: the id trimmed and case-folded, so that one patient
/// spelt two ways by two exports (`"MRN-0042"`, `" mrn-0042"`) is one unit, clipped and sampled
/// once and on one side of the split. Merging two ids into one unit only makes a unit larger,
/// which the guarantee allows; splitting one patient into two would weaken it.
pub fn patient_key(patient: &str) -> String {
    patient.trim().to_lowercase()
}

/// A document after the pipeline: redacted text and its privacy unit (a dense index: the n-th
/// distinct patient, or document, among the documents kept), never the raw id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedDocument {
    pub unit: u32,
    pub text: String,
}

/// The protected dataset, train and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedText {
    pub train: Vec<ProtectedDocument>,
    pub validation: Vec<ProtectedDocument>,
}

/// The content filter's settings: the compiled blocklist and what a match removes.
#[derive(Debug, Clone)]
pub struct ContentFilter {
    pub blocklist: Blocklist,
    pub scope: FilterScope,
    /// SHA-256 (hex) of the blocklist file as read, for the configuration digest.
    pub source_sha256: String,
}

/// Everything the text pipeline is configured with.
#[derive(Debug, Clone)]
pub struct TextProtectionConfig {
    /// The name dictionary of the redactor (each capitalized word of each entry is a name).
    pub names: Vec<String>,
    /// Also redact capitalized words with digits appended (`Larue605`) as names.
    pub digit_suffixed_names: bool,
    pub content_filter: Option<ContentFilter>,
    pub near_duplicates: NearDuplicateConfig,
    /// The split's unit: `Patient` needs every document to carry a patient.
    pub split_unit: SplitUnit,
    pub validation_fraction: f64,
    pub split_seed: u64,
}

impl TextProtectionConfig {
    /// SHA-256 (hex) of the configuration: the settings, the sorted name dictionary and the
    /// blocklist file's digest. The same configuration gives the same digest on every site.
    pub fn digest(&self) -> String {
        let mut names = self.names.clone();
        names.sort();
        names.dedup();
        let canonical = serde_json::json!({
            "version": "tutela/text-protection/v1",
            "names": names,
            "digit_suffixed_names": self.digit_suffixed_names,
            "content_filter": self.content_filter.as_ref().map(|f| serde_json::json!({
                "blocklist_sha256": f.source_sha256,
                "scope": f.scope,
            })),
            "near_duplicates": self.near_duplicates,
            "split_unit": self.split_unit,
            "validation_fraction": self.validation_fraction,
            "split_seed": self.split_seed,
        });
        let mut c = Context::new(&SHA256);
        c.update(canonical.to_string().as_bytes());
        hex::encode(c.finish().as_ref())
    }
}

/// What the content filter removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentFilterReport {
    pub scope: FilterScope,
    pub terms: usize,
    /// Documents dropped because they contain a term (scope `document`).
    pub documents_dropped: usize,
    /// Lines dropped (scope `line`).
    pub lines_dropped: usize,
    /// Documents left with no text once their lines were dropped (scope `line`).
    pub documents_emptied: usize,
}

/// What the redactor replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedactionReport {
    /// Documents in which at least one span was replaced.
    pub documents_changed: usize,
    /// Spans replaced, per PII type (`NAME`, `DATE`, ...).
    pub spans: BTreeMap<String, usize>,
}

/// What near-duplicate removal dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NearDuplicateReport {
    pub max_hamming: u32,
    pub shingle_words: usize,
    pub documents_dropped: usize,
    /// Fingerprint pairs the block index compared bit by bit (all pairs would be n(n-1)/2).
    pub candidate_comparisons: u64,
}

/// The split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitReport {
    pub unit: SplitUnit,
    pub seed: u64,
    pub validation_fraction: f64,
    pub train_documents: usize,
    pub validation_documents: usize,
    pub train_units: usize,
    pub validation_units: usize,
}

/// The de-identification report of one run of the text pipeline (see the module docs for how
/// the counts add up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextDeidReport {
    /// [`TextProtectionConfig::digest`].
    pub config_sha256: String,
    pub documents_in: usize,
    pub empty_documents: usize,
    pub content_filter: Option<ContentFilterReport>,
    pub redaction: RedactionReport,
    pub near_duplicates: Option<NearDuplicateReport>,
    pub split: SplitReport,
    pub documents_out: usize,
}

/// A checked configuration with its compiled redactor, ready to run.
pub struct TextPipeline {
    config: TextProtectionConfig,
    redactor: PiiRedactor,
}

impl std::fmt::Debug for TextPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextPipeline")
            .field("config_sha256", &self.config.digest())
            .finish_non_exhaustive()
    }
}

impl TextPipeline {
    /// Checks the settings and compiles the redactor.
    pub fn new(config: TextProtectionConfig) -> Result<TextPipeline, AnonymizeError> {
        config
            .near_duplicates
            .check()
            .map_err(|reason| AnonymizeError::InvalidConfig {
                column: "near_duplicates".into(),
                reason,
            })?;
        if !(config.validation_fraction > 0.0 && config.validation_fraction < 1.0) {
            return Err(AnonymizeError::InvalidConfig {
                column: "validation_fraction".into(),
                reason: format!(
                    "must lie strictly between 0 and 1, found {}",
                    config.validation_fraction
                ),
            });
        }
        let redactor =
            PiiRedactor::new(&config.names)?.with_digit_suffixed_names(config.digit_suffixed_names);
        Ok(TextPipeline { config, redactor })
    }

    pub fn config(&self) -> &TextProtectionConfig {
        &self.config
    }

    /// Runs every step over `documents` (see the module docs). Errors name the document's line
    /// and the field, never a value.
    pub fn run(
        &self,
        documents: Vec<TextDocument>,
    ) -> Result<(ProtectedText, TextDeidReport), AnonymizeError> {
        let documents_in = documents.len();
        let config = &self.config;

        // 1. Empty documents.
        let mut docs: Vec<TextDocument> = documents
            .into_iter()
            .filter(|d| !d.text.trim().is_empty())
            .collect();
        let empty_documents = documents_in - docs.len();

        // 2. Content filter, on the text as written.
        let content_filter = config.content_filter.as_ref().map(|filter| {
            let mut report = ContentFilterReport {
                scope: filter.scope,
                terms: filter.blocklist.len(),
                documents_dropped: 0,
                lines_dropped: 0,
                documents_emptied: 0,
            };
            match filter.scope {
                FilterScope::Document => {
                    let before = docs.len();
                    docs.retain(|d| !filter.blocklist.matches(&d.text));
                    report.documents_dropped = before - docs.len();
                }
                FilterScope::Line => {
                    for d in &mut docs {
                        if filter.blocklist.matches(&d.text) {
                            let (kept, dropped) = filter.blocklist.drop_lines(&d.text);
                            d.text = kept;
                            report.lines_dropped += dropped;
                        }
                    }
                    let before = docs.len();
                    docs.retain(|d| !d.text.trim().is_empty());
                    report.documents_emptied = before - docs.len();
                }
            }
            report
        });

        // The split unit is checked before any text is transformed, so a missing patient is
        // reported against the line the site can look up.
        if config.split_unit == SplitUnit::Patient
            && let Some(d) = docs
                .iter()
                .find(|d| d.patient.as_deref().is_none_or(|p| p.trim().is_empty()))
        {
            return Err(AnonymizeError::BadCell {
                column: "patient".into(),
                row: d.line as usize,
                reason: "the split is by patient, and this document has no patient".into(),
            });
        }

        // 3. Redaction.
        let mut redaction = RedactionReport {
            documents_changed: 0,
            spans: BTreeMap::new(),
        };
        for d in &mut docs {
            let (text, spans) = self.redactor.redact(&d.text);
            if !spans.is_empty() {
                redaction.documents_changed += 1;
                for s in &spans {
                    *redaction.spans.entry(s.kind.to_string()).or_insert(0) += 1;
                }
                d.text = text;
            }
        }

        // 4. Near-duplicates, oldest first (undated after dated), then in file order.
        let near_duplicates = if config.near_duplicates.enabled {
            let mut order: Vec<usize> = (0..docs.len()).collect();
            order.sort_by(|&a, &b| {
                let key = |i: usize| (docs[i].date.is_none(), docs[i].date.as_deref(), i);
                key(a).cmp(&key(b))
            });
            let nd = &config.near_duplicates;
            let mut index = simhash::SimHashIndex::new(nd.max_hamming);
            let mut keep = vec![false; docs.len()];
            for &i in &order {
                let fp = simhash::simhash(&docs[i].text, nd.shingle_words);
                if index.find_near(fp).is_none() {
                    index.insert(fp);
                    keep[i] = true;
                }
            }
            let before = docs.len();
            let mut k = keep.iter();
            docs.retain(|_| k.next().copied().unwrap_or(false));
            Some(NearDuplicateReport {
                max_hamming: nd.max_hamming,
                shingle_words: nd.shingle_words,
                documents_dropped: before - docs.len(),
                candidate_comparisons: index.comparisons(),
            })
        } else {
            None
        };

        // 5. Split by privacy unit.
        let unit_keys: Vec<String> = docs
            .iter()
            .map(|d| match config.split_unit {
                SplitUnit::Patient => patient_key(d.patient.as_deref().unwrap_or_default()),
                // A declared id names the document; without one, its line does.
                SplitUnit::Document => d.id.clone().unwrap_or_else(|| format!("line:{}", d.line)),
            })
            .collect();
        let refs: Vec<&str> = unit_keys.iter().map(String::as_str).collect();
        let split = split::split_by_unit(&refs, config.validation_fraction, config.split_seed)?;
        let mut dense: HashMap<&str, u32> = HashMap::new();
        let mut protected = ProtectedText {
            train: Vec::new(),
            validation: Vec::new(),
        };
        for ((d, key), is_validation) in docs.into_iter().zip(&refs).zip(&split.validation) {
            let next = dense.len() as u32;
            let unit = *dense.entry(key).or_insert(next);
            let doc = ProtectedDocument { unit, text: d.text };
            if *is_validation {
                protected.validation.push(doc);
            } else {
                protected.train.push(doc);
            }
        }
        let report = TextDeidReport {
            config_sha256: config.digest(),
            documents_in,
            empty_documents,
            content_filter,
            redaction,
            near_duplicates,
            split: SplitReport {
                unit: config.split_unit,
                seed: config.split_seed,
                validation_fraction: config.validation_fraction,
                train_documents: protected.train.len(),
                validation_documents: protected.validation.len(),
                train_units: split.train_units,
                validation_units: split.validation_units,
            },
            documents_out: protected.train.len() + protected.validation.len(),
        };
        Ok((protected, report))
    }
}

/// The dataset commitment over protected documents (see [`crate::commitment`]): one row per
/// document, train first then validation, each row its side (as a label) and its text.
pub fn commit_documents(
    salt: &[u8; 32],
    protected: &ProtectedText,
) -> crate::commitment::DatasetCommitment {
    use crate::commitment::{CommitmentBuilder, tag};
    let mut builder = CommitmentBuilder::new(salt);
    for (side, docs) in [
        ("train", &protected.train),
        ("validation", &protected.validation),
    ] {
        for d in docs {
            builder.push_row([(tag::LABEL, side), (tag::TEXT, d.text.as_str())]);
        }
    }
    builder.finish()
}
