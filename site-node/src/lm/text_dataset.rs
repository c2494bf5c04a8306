//! A text dataset of the site (`[text_datasets.<name>]` in node.toml): checked at start without
//! reading a record, read through the text protection pipeline the first time it is needed, and
//! kept in memory.
//!
//! [`TextDataset::prepare`] (node start): the configuration's keys, the data path's presence,
//! the name dictionary and the blocklist files, the pipeline's settings. No record is read, so a
//! task the node's checks refuse never causes one to be read.
//!
//! [`TextDataset::load`] (first admitted task): reads the documents ([`super::text_source`]),
//! runs [`tutela_privacy::anonymize::text::TextPipeline`] (content filter, redaction,
//! near-duplicates, split) and commits to the protected documents
//! ([`tutela_privacy::anonymize::text::commit_documents`], salted with the site secret). The
//! result stays in memory: nothing of the text is written under the node's work directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::digest::{SHA256, digest};
use serde::Deserialize;
use tutela_privacy::anonymize::AnonymizeError;
use tutela_privacy::anonymize::text::{
    Blocklist, ContentFilter, FilterScope, NearDuplicateConfig, ProtectedText, SplitUnit,
    TextDeidReport, TextPipeline, TextProtectionConfig, commit_documents,
};
use tutela_privacy::commitment::{DatasetCommitment, commitment_salt};

use super::text_source::{DocumentSplit, TextFormat, TextSource, TextSourceError};

fn default_text_field() -> String {
    "text".into()
}
fn default_max_document_bytes() -> usize {
    1 << 20
}
fn default_validation_fraction() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}

/// The largest `max_document_bytes` accepted (a document is held whole in memory).
pub const MAX_DOCUMENT_BYTES_LIMIT: usize = 64 << 20;

/// `[text_datasets.<name>.redaction]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TextRedactionConfig {
    /// A file of names to redact, one a line (`#` starts a comment line).
    #[serde(default)]
    pub names_file: Option<PathBuf>,
    /// Redact capitalized words with digits appended (`Larue605`) as names. Default true.
    #[serde(default = "default_true")]
    pub digit_suffixed_names: bool,
}

impl Default for TextRedactionConfig {
    fn default() -> Self {
        TextRedactionConfig {
            names_file: None,
            digit_suffixed_names: true,
        }
    }
}

/// `[text_datasets.<name>.content_filter]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContentFilterConfig {
    /// The blocklist: one term a line, `#` comment lines.
    pub blocklist_file: PathBuf,
    /// `document` (default) or `line`: what a term's match removes.
    #[serde(default)]
    pub scope: FilterScope,
}

/// `[text_datasets.<name>]`: one text dataset (every key documented in deploy/config/node.toml).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TextDatasetConfig {
    /// The data: a JSON Lines file, a plain text file, or a directory of text files.
    pub path: PathBuf,
    /// `jsonl` or `text`; by default from the file name (`.jsonl`/`.ndjson` is JSON Lines).
    #[serde(default)]
    pub format: Option<TextFormat>,
    /// JSON Lines: the field holding the document's text. Default `text`.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// JSON Lines: the document's id (orders and names documents locally).
    #[serde(default)]
    pub id_field: Option<String>,
    /// JSON Lines: the patient; with it the split (and the privacy unit) is by patient.
    #[serde(default)]
    pub patient_field: Option<String>,
    /// JSON Lines: the document's date (the oldest of near-duplicates is kept).
    #[serde(default)]
    pub date_field: Option<String>,
    /// Plain text: `line` (default), `delimited` or `file`.
    #[serde(default)]
    pub documents: Option<DocumentSplit>,
    /// Plain text with `documents = "delimited"`: the separator line ("" is a blank line).
    #[serde(default)]
    pub delimiter: Option<String>,
    /// The largest document accepted, in bytes. Default 1 MiB.
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: usize,
    /// Share of the documents kept for validation, in (0, 1). Default 0.1.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Seed of the split. Default 0.
    #[serde(default)]
    pub split_seed: u64,
    #[serde(default)]
    pub redaction: TextRedactionConfig,
    #[serde(default)]
    pub near_duplicates: NearDuplicateConfig,
    #[serde(default)]
    pub content_filter: Option<ContentFilterConfig>,
}

impl TextDatasetConfig {
    /// The format, given or from the file name.
    pub fn format(&self) -> TextFormat {
        self.format
            .unwrap_or_else(|| TextFormat::from_path(&self.path))
    }

    /// Checks the keys' values and combinations; the error is (key relative to the dataset's
    /// table, problem).
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        if !(self.validation_fraction > 0.0 && self.validation_fraction < 1.0) {
            return bad(
                "validation_fraction",
                format!(
                    "must lie strictly between 0 and 1, found {}",
                    self.validation_fraction
                ),
            );
        }
        if self.max_document_bytes == 0 || self.max_document_bytes > MAX_DOCUMENT_BYTES_LIMIT {
            return bad(
                "max_document_bytes",
                format!(
                    "must be between 1 and {MAX_DOCUMENT_BYTES_LIMIT}, found {}",
                    self.max_document_bytes
                ),
            );
        }
        if let Err(problem) = self.near_duplicates.check() {
            return bad("near_duplicates", problem);
        }
        match self.format() {
            TextFormat::Jsonl => {
                if self.documents.is_some() || self.delimiter.is_some() {
                    return bad(
                        "documents",
                        "and `delimiter` apply to plain text only; JSON Lines has one document a line"
                            .into(),
                    );
                }
                if self.text_field.is_empty() {
                    return bad("text_field", "must not be empty".into());
                }
            }
            TextFormat::Text => {
                for (key, v) in [
                    ("id_field", &self.id_field),
                    ("patient_field", &self.patient_field),
                    ("date_field", &self.date_field),
                ] {
                    if v.is_some() {
                        return bad(
                            key,
                            "applies to JSON Lines only (format = \"jsonl\")".into(),
                        );
                    }
                }
                let split = self.documents.unwrap_or_default();
                if (split == DocumentSplit::Delimited) != self.delimiter.is_some() {
                    return bad(
                        "delimiter",
                        "is needed by, and only by, documents = \"delimited\"".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Resolves relative paths against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.path);
        if let Some(p) = &mut self.redaction.names_file {
            fix(p);
        }
        if let Some(f) = &mut self.content_filter {
            fix(&mut f.blocklist_file);
        }
    }

    /// Where and how its documents are read.
    pub fn text_source(&self) -> TextSource {
        TextSource {
            path: self.path.clone(),
            format: self.format(),
            text_field: self.text_field.clone(),
            id_field: self.id_field.clone(),
            patient_field: self.patient_field.clone(),
            date_field: self.date_field.clone(),
            documents: self.documents.unwrap_or_default(),
            delimiter: self.delimiter.clone(),
            max_document_bytes: self.max_document_bytes,
        }
    }
}

/// Why a text dataset cannot be prepared or loaded. Display is for the site's own log (it names
/// files and lines); [`TextDatasetError::public_reason`] may leave the site.
#[derive(Debug, thiserror::Error)]
pub enum TextDatasetError {
    #[error("text dataset {name}: `{key}` {problem}")]
    Config {
        name: String,
        key: String,
        problem: String,
    },
    #[error("text dataset {name}: cannot read {}: {source}", .path.display())]
    File {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("text dataset {name}: {source}")]
    Source {
        name: String,
        #[source]
        source: TextSourceError,
    },
    #[error("text dataset {name}: {source}")]
    Protection {
        name: String,
        #[source]
        source: AnonymizeError,
    },
}

impl TextDatasetError {
    /// A code and, where there is one, the key or field name: never a value, a line or a path.
    pub fn public_reason(&self) -> String {
        match self {
            TextDatasetError::Config { key, .. } => format!("text dataset misconfigured: `{key}`"),
            TextDatasetError::File { .. } => "text dataset: a configured file is unreadable".into(),
            TextDatasetError::Source { source, .. } => source.public_reason(),
            TextDatasetError::Protection { source, .. } => match source {
                AnonymizeError::BadCell { column, .. }
                | AnonymizeError::InvalidConfig { column, .. } => {
                    format!("text protection refused the dataset (field `{column}`)")
                }
                _ => "text protection refused the dataset".into(),
            },
        }
    }
}

/// A loaded text dataset: the protected documents, the report, the commitment.
#[derive(Debug)]
pub struct LoadedText {
    pub documents: ProtectedText,
    pub report: TextDeidReport,
    pub commitment: DatasetCommitment,
}

/// One configured text dataset, checked and ready to load.
pub struct TextDataset {
    name: String,
    source: TextSource,
    pipeline: TextPipeline,
    salt: [u8; 32],
    loaded: Mutex<Option<Arc<LoadedText>>>,
}

impl std::fmt::Debug for TextDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextDataset")
            .field("name", &self.name)
            .field("path", &self.source.path)
            .finish_non_exhaustive()
    }
}

/// The non-comment, non-blank lines of a list file.
fn list_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

impl TextDataset {
    /// Checks a configured text dataset without reading a record. `site_secret` salts the
    /// dataset commitment; it is required.
    pub fn prepare(
        name: &str,
        config: &TextDatasetConfig,
        site_secret: &[u8; 32],
    ) -> Result<TextDataset, TextDatasetError> {
        config
            .check()
            .map_err(|(key, problem)| TextDatasetError::Config {
                name: name.into(),
                key,
                problem,
            })?;
        let source = config.text_source();
        source
            .check_present()
            .map_err(|source| TextDatasetError::Source {
                name: name.into(),
                source,
            })?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TextDatasetError::File {
                name: name.into(),
                path: path.to_path_buf(),
                source,
            })
        };
        let names = match &config.redaction.names_file {
            Some(p) => list_lines(&read(p)?).map(str::to_string).collect(),
            None => Vec::new(),
        };
        let protection = |source| TextDatasetError::Protection {
            name: name.into(),
            source,
        };
        let content_filter = match &config.content_filter {
            Some(f) => {
                let text = read(&f.blocklist_file)?;
                Some(ContentFilter {
                    blocklist: Blocklist::parse(&text, "content_filter.blocklist_file")
                        .map_err(protection)?,
                    scope: f.scope,
                    source_sha256: hex::encode(digest(&SHA256, text.as_bytes())),
                })
            }
            None => None,
        };
        let split_unit = if config.patient_field.is_some() {
            SplitUnit::Patient
        } else {
            SplitUnit::Document
        };
        let pipeline = TextPipeline::new(TextProtectionConfig {
            names,
            digit_suffixed_names: config.redaction.digit_suffixed_names,
            content_filter,
            near_duplicates: config.near_duplicates.clone(),
            split_unit,
            validation_fraction: config.validation_fraction,
            split_seed: config.split_seed,
        })
        .map_err(protection)?;
        Ok(TextDataset {
            name: name.to_string(),
            source,
            pipeline,
            salt: commitment_salt(site_secret, name),
            loaded: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The digest of the protection configuration (the report's `config_sha256`), known without
    /// reading a record.
    pub fn protection_digest(&self) -> String {
        self.pipeline.config().digest()
    }

    /// Reads, protects, splits and commits the documents the first time; the same in-memory
    /// result afterwards.
    pub fn load(&self) -> Result<Arc<LoadedText>, TextDatasetError> {
        // A poisoned lock only means an earlier load panicked; the slot is still consistent.
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let docs = self
            .source
            .read()
            .map_err(|source| TextDatasetError::Source {
                name: self.name.clone(),
                source,
            })?;
        let (documents, report) =
            self.pipeline
                .run(docs)
                .map_err(|source| TextDatasetError::Protection {
                    name: self.name.clone(),
                    source,
                })?;
        let commitment = commit_documents(&self.salt, &documents);
        tracing::info!(
            dataset = %self.name,
            train_documents = documents.train.len(),
            validation_documents = documents.validation.len(),
            commitment = %commitment.root_hex(),
            report = %serde_json::to_string(&report).unwrap_or_default(),
            "text dataset loaded"
        );
        let loaded = Arc::new(LoadedText {
            documents,
            report,
            commitment,
        });
        *slot = Some(loaded.clone());
        Ok(loaded)
    }
}
