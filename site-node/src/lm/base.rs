//! The base checkpoints a site holds, and the check that a job's is one of them.
//!
//! A language-model job names the checkpoint it starts from by digest (`[model] base_sha256`,
//! [`super::hf::checkpoint_digest`]: SHA-256 over the canonical `config.json` and every tensor),
//! inside the spec the compliance officers sign, so what they approve is that exact base. The
//! node's config lists the site's checkpoints (`base_models` in node.toml: a checkpoint
//! directory, or a directory of them); the node digests them once when it starts (a digest
//! reads every tensor, too slow to repeat per task for a large model) and declines a job whose
//! base none has. The reason carries digests, never a path.
//!
//! A base the site does not hold but fetched before is taken from the node's encrypted cache
//! ([`super::base_cache`], `[base_cache]` in node.toml): decrypted at admission into a private
//! directory that lives as long as the [`ApprovedBase`] (the round) and is removed after.
//!
//! Admission does not trust the index for what trains: the round loads the checkpoint with
//! [`super::hf::load_checkpoint_with_digest`], which digests it again as it reads and refuses a
//! checkpoint that changed since the node started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::base_cache::{BaseModelCache, DecryptedBase};
use super::error::LmError;
use super::hf::checkpoint_digest;

/// The file that makes a directory a checkpoint.
const CONFIG_FILE: &str = "config.json";

/// The site's base checkpoints by digest (node.toml `base_models`), digested at start.
#[derive(Clone, Debug, Default)]
pub struct SiteBaseModels {
    by_digest: Arc<BTreeMap<String, PathBuf>>,
    /// Bases fetched before, encrypted (`None`: fetching is off or the node has no KEK).
    cache: Option<BaseModelCache>,
}

/// The base checkpoint a job named, found among the site's or in its cache of fetched bases.
#[derive(Clone, Debug)]
pub struct ApprovedBase {
    sha256: String,
    dir: PathBuf,
    /// A cached base's decrypted directory, removed when the last clone is dropped.
    decrypted: Option<Arc<DecryptedBase>>,
}

impl PartialEq for ApprovedBase {
    fn eq(&self, other: &Self) -> bool {
        self.sha256 == other.sha256 && self.dir == other.dir
    }
}

impl Eq for ApprovedBase {}

impl ApprovedBase {
    /// The digest the job names, equal to the checkpoint's when the node started.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The checkpoint's directory at the site (never sent).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the base came from the cache of fetched bases (decrypted for this use).
    pub fn is_cached(&self) -> bool {
        self.decrypted.is_some()
    }
}

/// Why a job's base checkpoint is refused: what the coordinator and the trail are told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BaseModelRefusal {
    #[error(
        "the job's base model (sha256 {wanted}) is not one this site holds (it holds {}): the \
         site trains only from a base checkpoint whose digest the job names",
        if .held.is_empty() { "none; node.toml `base_models`".to_string() } else { format!("sha256 {}", .held.join(", sha256 ")) }
    )]
    NotHeld { wanted: String, held: Vec<String> },
    #[error(
        "the job names model {model:?}, a language model, but no base checkpoint \
         (`model.base_sha256`): this site trains a language model only from a base it holds"
    )]
    NoneNamed { model: String },
}

/// Why the site's `base_models` cannot be indexed (at start; names paths, stays at the site).
#[derive(Debug, thiserror::Error)]
pub enum BaseModelsError {
    #[error("`base_models[{index}]` {}: {source}", .path.display())]
    Unreadable {
        index: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`base_models[{index}]` {} holds no checkpoint (no config.json in it or its subdirectories)", .path.display())]
    Empty { index: usize, path: PathBuf },
    #[error("`base_models[{index}]`: {source}")]
    Checkpoint {
        index: usize,
        #[source]
        source: Box<LmError>,
    },
}

impl SiteBaseModels {
    /// Finds and digests every checkpoint under `entries` (each a checkpoint directory or a
    /// directory of them). The same checkpoint found twice is kept once.
    pub fn index(entries: &[PathBuf]) -> Result<SiteBaseModels, BaseModelsError> {
        let mut by_digest = BTreeMap::new();
        for (index, entry) in entries.iter().enumerate() {
            let unreadable = |source| BaseModelsError::Unreadable {
                index,
                path: entry.clone(),
                source,
            };
            let dirs = if entry.join(CONFIG_FILE).is_file() {
                vec![entry.clone()]
            } else {
                let mut dirs: Vec<PathBuf> = std::fs::read_dir(entry)
                    .map_err(unreadable)?
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.join(CONFIG_FILE).is_file())
                    .collect();
                dirs.sort();
                dirs
            };
            if dirs.is_empty() {
                return Err(BaseModelsError::Empty {
                    index,
                    path: entry.clone(),
                });
            }
            for dir in dirs {
                let digest = checkpoint_digest(&dir).map_err(|e| BaseModelsError::Checkpoint {
                    index,
                    source: Box::new(e),
                })?;
                by_digest.entry(digest).or_insert(dir);
            }
        }
        Ok(SiteBaseModels {
            by_digest: Arc::new(by_digest),
            cache: None,
        })
    }

    /// Also approves the bases in `cache` (fetched before), after the site's own.
    pub fn with_cache(mut self, cache: BaseModelCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The cache of fetched bases, if fetching is on.
    pub fn cache(&self) -> Option<&BaseModelCache> {
        self.cache.as_ref()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Each checkpoint's digest and directory, for the node's log at start.
    pub fn held(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.by_digest
            .iter()
            .map(|(d, p)| (d.as_str(), p.as_path()))
    }

    /// Whether the site holds base `wanted` or has it in its cache of fetched bases.
    pub fn holds(&self, wanted: &str) -> bool {
        self.by_digest.contains_key(wanted)
            || self.cache.as_ref().is_some_and(|c| c.contains(wanted))
    }

    /// Whether a job naming base `wanted` makes the node fetch it (into the attached cache)
    /// before admitting the job: fetching is on and neither the site's bases nor the cache
    /// hold it.
    pub fn would_fetch(&self, wanted: &str) -> bool {
        self.cache.is_some() && !self.holds(wanted)
    }

    /// The site's checkpoint whose digest is `wanted`, else the cached one decrypted for this
    /// use. A cached base that cannot be read (its error names the site's files: logged here,
    /// not sent) or no longer has its digest (dropped from the cache) is as good as not held.
    pub fn approve(&self, wanted: &str) -> Result<ApprovedBase, BaseModelRefusal> {
        if let Some(dir) = self.by_digest.get(wanted) {
            return Ok(ApprovedBase {
                sha256: wanted.to_string(),
                dir: dir.clone(),
                decrypted: None,
            });
        }
        let cached = match self.cache.as_ref().map(|c| c.open(wanted)) {
            Some(Ok(Some(decrypted))) => Some(decrypted),
            Some(Err(e)) => {
                tracing::warn!(sha256 = %wanted, error = %e, "a cached base model could not be used");
                None
            }
            Some(Ok(None)) | None => None,
        };
        match cached {
            Some(decrypted) => Ok(ApprovedBase {
                sha256: wanted.to_string(),
                dir: decrypted.dir().to_path_buf(),
                decrypted: Some(Arc::new(decrypted)),
            }),
            None => Err(BaseModelRefusal::NotHeld {
                wanted: wanted.to_string(),
                held: self.by_digest.keys().cloned().collect(),
            }),
        }
    }
}
