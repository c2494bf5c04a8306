//! The tokenizers a site holds, and the check that a job's is one of them.
//!
//! A job names its tokenizer by the SHA-256 of its `tokenizer.json` (`[model] tokenizer_sha256`),
//! inside the spec the compliance officers sign, so what they approve is that exact file. The
//! node's config lists the tokenizer files the site holds (`tokenizers` in node.toml); before it
//! reads any data for a task, the node digests them again (a file replaced since the node started
//! counts as what it is now) and declines a job whose digest none of them has. The reason carries
//! the digests, never a path: paths are the site's own business and stay in its log.
//!
//! The bytes that matched are kept ([`ApprovedTokenizer`]) and are what training loads, so the
//! tokenizer used is the one checked even if the file changes afterwards.

use std::path::PathBuf;
use std::sync::Arc;

use super::{SpecialTokens, TextTokenizer, TokenizerError, check_tokenizer_json, sha256_hex};

/// The tokenizer files of node.toml's `tokenizers`.
#[derive(Clone, Debug, Default)]
pub struct SiteTokenizers {
    files: Vec<PathBuf>,
}

/// The `tokenizer.json` a job named, as read and digested when its task was admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovedTokenizer {
    sha256: String,
    json: Arc<[u8]>,
}

impl ApprovedTokenizer {
    /// SHA-256 of [`json`](Self::json), equal to the job's `tokenizer_sha256`.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The `tokenizer.json` bytes that were digested.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// Loads the tokenizer from the approved bytes.
    pub fn load(&self, special: &SpecialTokens) -> Result<TextTokenizer, TokenizerError> {
        TextTokenizer::from_bytes(&self.json, special)
    }
}

/// Why a task's tokenizer is refused: what the coordinator and the trail are told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerRefusal {
    #[error(
        "the job's tokenizer (sha256 {wanted}) differs from this site's tokenizer{} (sha256 {}): \
         the site trains only with a tokenizer file whose digest the job names",
        if .held.len() > 1 { "s" } else { "" },
        .held.join(", sha256 ")
    )]
    Differs { wanted: String, held: Vec<String> },
    #[error(
        "the job names a tokenizer (sha256 {wanted}), but this site holds none (node.toml \
         `tokenizers`)"
    )]
    NoneHeld { wanted: String },
    #[error(
        "the job's tokenizer (sha256 {wanted}) is not among this site's readable tokenizers, and \
         its tokenizer number {number} in node.toml `tokenizers` cannot be read (the node's log \
         says why)"
    )]
    Unreadable { wanted: String, number: usize },
}

impl SiteTokenizers {
    pub fn new(files: Vec<PathBuf>) -> Self {
        SiteTokenizers { files }
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Checks at start that every file loads as a byte-level tokenizer; returns each file's digest, for the log. The error names the file (it stays at
    /// the site).
    pub fn check(&self) -> Result<Vec<(PathBuf, String)>, TokenizerError> {
        self.files
            .iter()
            .map(|path| {
                let json = std::fs::read(path).map_err(|source| TokenizerError::Io {
                    path: path.clone(),
                    source,
                })?;
                check_tokenizer_json(&json)
                    .map_err(|e| TokenizerError::Options(format!("{}: {e}", path.display())))?;
                Ok((path.clone(), sha256_hex(&json)))
            })
            .collect()
    }

    /// The tokenizer whose `tokenizer.json` digests to `wanted` (64 lowercase hex digits), read
    /// now.
    pub fn approve(&self, wanted: &str) -> Result<ApprovedTokenizer, TokenizerRefusal> {
        if self.files.is_empty() {
            return Err(TokenizerRefusal::NoneHeld {
                wanted: wanted.to_string(),
            });
        }
        let mut held = Vec::with_capacity(self.files.len());
        let mut unreadable = None;
        for (i, path) in self.files.iter().enumerate() {
            match std::fs::read(path) {
                Ok(json) => {
                    let sha256 = sha256_hex(&json);
                    if sha256 == wanted {
                        return Ok(ApprovedTokenizer {
                            sha256,
                            json: json.into(),
                        });
                    }
                    held.push(sha256);
                }
                Err(e) => {
                    tracing::warn!(
                        tokenizer = %path.display(),
                        error = %e,
                        "a tokenizer of node.toml `tokenizers` cannot be read"
                    );
                    unreadable.get_or_insert(i + 1);
                }
            }
        }
        match unreadable {
            Some(number) => Err(TokenizerRefusal::Unreadable {
                wanted: wanted.to_string(),
                number,
            }),
            None => Err(TokenizerRefusal::Differs {
                wanted: wanted.to_string(),
                held,
            }),
        }
    }
}
