//! The base checkpoints a site fetched from the coordinator, cached by digest, encrypted at rest
//! (issue 17: "the base is fetched once, cached by digest, encrypted at rest").
//!
//! A language-model job names its base by [`super::hf::checkpoint_digest`]. A site that does not
//! hold it among its own `base_models` may fetch it once from the coordinator; what it received
//! (`config.json`'s text and one safetensors file, in memory) is digested with
//! [`super::hf::checkpoint_digest_of_bytes`] **before** anything of it is written: a base whose
//! digest is not the one the job names is refused with both digests and nothing is cached.
//!
//! On disk, under the node's work dir, an entry is a directory named by the digest holding
//! `config.json.enc` and `model.safetensors.enc` (each `tutela_privacy::at_rest` ciphertext
//! under the node's KEK, as fetched global models are kept) and a `last-used` marker whose
//! modification time orders eviction. An entry is written under a temporary name and renamed into
//! place, so a crash leaves either a whole entry or none (temporary ones are swept at open).
//!
//! At use ([`BaseModelCache::open`]) the entry is decrypted into a private (0700) temporary
//! directory, by default under `/dev/shm` (memory) where it exists, which is removed when the
//! returned [`DecryptedBase`] is dropped, i.e. when the round ends. A directory rather than
//! memory because the decoder's loader ([`super::hf::load_checkpoint_with_digest`]) reads a
//! checkpoint directory one tensor at a time (and digests it again as it reads); a second,
//! in-memory loader would duplicate it.
//!
//! The cache is bounded by bytes and by entries (node.toml `[base_cache]`); inserting evicts the
//! least recently used entries that no admitted job uses (the caller names those in use) until
//! the new entry fits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tutela_privacy::at_rest::{
    AtRestError, EncryptOptions, KeyEncryptionKey, decrypt_to_vec, encrypt_bytes,
};

use super::error::LmError;
use super::hf::{CONFIG_FILE, WEIGHTS_FILE, checkpoint_digest_of_bytes};

const ENCRYPTED_SUFFIX: &str = ".enc";
const LAST_USED_FILE: &str = "last-used";
const PARTIAL_PREFIX: &str = ".partial-";

/// How large the cache may grow (node.toml `[base_cache]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseCacheLimits {
    /// Most plaintext bytes (config.json + weights) over all entries.
    pub max_bytes: u64,
    /// Most entries.
    pub max_entries: usize,
}

impl Default for BaseCacheLimits {
    fn default() -> Self {
        BaseCacheLimits {
            max_bytes: 8 << 30,
            max_entries: 4,
        }
    }
}

/// A base checkpoint as received from the coordinator, not yet verified.
pub struct ReceivedBase {
    /// `config.json`'s text.
    pub config_json: Vec<u8>,
    /// One safetensors file holding every tensor.
    pub weights: Vec<u8>,
}

impl ReceivedBase {
    fn plaintext_len(&self) -> u64 {
        (self.config_json.len() + self.weights.len()) as u64
    }
}

/// Why the cache refused or failed. Digests only in what may be sent; paths are the site's own
/// and stay in its log ([`BaseCacheError::is_local`]).
#[derive(Debug, thiserror::Error)]
pub enum BaseCacheError {
    #[error(
        "the base model received has digest {found}, but the job names {expected}: nothing of it \
         was kept"
    )]
    DigestMismatch { expected: String, found: String },
    #[error("the base model received (sha256 {expected}) is not a readable checkpoint: {reason}")]
    Malformed { expected: String, reason: String },
    #[error(
        "the base model (sha256 {digest}) is {bytes} bytes, more than the cache's `max_bytes` \
         ({max_bytes})"
    )]
    TooLarge {
        digest: String,
        bytes: u64,
        max_bytes: u64,
    },
    #[error(
        "the base model cache is full: the {in_use} base(s) in use by admitted jobs leave no room \
         for sha256 {digest} (`max_entries` {max_entries}, `max_bytes` {max_bytes})"
    )]
    Full {
        digest: String,
        in_use: usize,
        max_entries: usize,
        max_bytes: u64,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    AtRest(#[from] AtRestError),
    #[error(
        "the cached base model (sha256 {digest}) no longer has that digest (found {found}): it was removed"
    )]
    Corrupted { digest: String, found: String },
}

impl BaseCacheError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BaseCacheError {
        let path = path.into();
        move |source| BaseCacheError::Io { path, source }
    }

    /// Whether the error names the site's own paths or files (to be logged, not sent).
    pub fn is_local(&self) -> bool {
        matches!(self, BaseCacheError::Io { .. } | BaseCacheError::AtRest(_))
    }
}

/// One cached base, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedBase {
    pub sha256: String,
    /// Plaintext bytes (config.json + weights).
    pub bytes: u64,
    last_used: SystemTime,
}

/// A cached base decrypted for one use: a private directory removed when this is dropped.
pub struct DecryptedBase {
    sha256: String,
    dir: tempfile::TempDir,
}

impl DecryptedBase {
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The checkpoint directory (`config.json`, `model.safetensors`), valid while `self` lives.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl std::fmt::Debug for DecryptedBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptedBase")
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// The site's encrypted cache of fetched base checkpoints, keyed by digest.
#[derive(Clone)]
pub struct BaseModelCache {
    dir: PathBuf,
    scratch: PathBuf,
    kek: Arc<dyn KeyEncryptionKey>,
    limits: BaseCacheLimits,
}

impl std::fmt::Debug for BaseModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseModelCache")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn is_digest(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl BaseModelCache {
    /// Opens (creating) the cache in `dir` (the node's `work_dir/base-models`), sweeping entries
    /// a crash left half-written. Decrypted bases go under `/dev/shm` where it exists, else the
    /// system's temporary directory ([`Self::with_scratch`] to choose).
    pub fn open_dir(
        dir: impl Into<PathBuf>,
        kek: Arc<dyn KeyEncryptionKey>,
        limits: BaseCacheLimits,
    ) -> Result<BaseModelCache, BaseCacheError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(BaseCacheError::io(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(BaseCacheError::io(&dir))? {
            let entry = entry.map_err(BaseCacheError::io(&dir))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(PARTIAL_PREFIX)
            {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(BaseCacheError::io(&path))?;
            }
        }
        let shm = Path::new("/dev/shm");
        let scratch = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        Ok(BaseModelCache {
            dir,
            scratch,
            kek,
            limits,
        })
    }

    /// Decrypts bases into `scratch` instead (a directory private to the node).
    pub fn with_scratch(mut self, scratch: impl Into<PathBuf>) -> Self {
        self.scratch = scratch.into();
        self
    }

    pub fn limits(&self) -> BaseCacheLimits {
        self.limits
    }

    fn entry_dir(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Whether the base `sha256` is cached (nothing is decrypted).
    pub fn contains(&self, sha256: &str) -> bool {
        is_digest(sha256) && self.entry_dir(sha256).join(LAST_USED_FILE).is_file()
    }

    /// The cached bases, least recently used first.
    pub fn entries(&self) -> Result<Vec<CachedBase>, BaseCacheError> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(BaseCacheError::io(&self.dir))? {
            let entry = entry.map_err(BaseCacheError::io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_digest(&name) {
                continue;
            }
            let marker = entry.path().join(LAST_USED_FILE);
            let Ok(meta) = std::fs::metadata(&marker) else {
                continue;
            };
            let text = std::fs::read_to_string(&marker).map_err(BaseCacheError::io(&marker))?;
            entries.push(CachedBase {
                sha256: name,
                bytes: text.trim().parse().unwrap_or(0),
                last_used: meta.modified().map_err(BaseCacheError::io(&marker))?,
            });
        }
        entries.sort_by(|a, b| (a.last_used, &a.sha256).cmp(&(b.last_used, &b.sha256)));
        Ok(entries)
    }

    /// Verifies `received` against `expected` (the job's `model.base_sha256`) before anything of
    /// it is written, evicts least recently used bases not in `in_use` until it fits, and stores
    /// it encrypted. A base already cached is not written again.
    pub fn insert(
        &self,
        expected: &str,
        received: &ReceivedBase,
        in_use: &BTreeSet<String>,
    ) -> Result<CachedBase, BaseCacheError> {
        let found = checkpoint_digest_of_bytes(
            &received.config_json,
            &received.weights,
            "the base received from the coordinator",
        )
        .map_err(|e| BaseCacheError::Malformed {
            expected: expected.to_string(),
            reason: e.to_string(),
        })?;
        if !found.eq_ignore_ascii_case(expected) || !is_digest(&found) {
            return Err(BaseCacheError::DigestMismatch {
                expected: expected.to_string(),
                found,
            });
        }
        let bytes = received.plaintext_len();
        if self.contains(&found) {
            self.touch(&found, bytes)?;
            return Ok(CachedBase {
                sha256: found,
                bytes,
                last_used: SystemTime::now(),
            });
        }
        if bytes > self.limits.max_bytes {
            return Err(BaseCacheError::TooLarge {
                digest: found,
                bytes,
                max_bytes: self.limits.max_bytes,
            });
        }
        self.make_room(&found, bytes, in_use)?;
        let partial = self.dir.join(format!("{PARTIAL_PREFIX}{found}"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(BaseCacheError::io(&partial))?;
        }
        std::fs::create_dir(&partial).map_err(BaseCacheError::io(&partial))?;
        let options = EncryptOptions::default();
        encrypt_bytes(
            &received.config_json,
            partial.join(format!("{CONFIG_FILE}{ENCRYPTED_SUFFIX}")),
            self.kek.as_ref(),
            options,
        )?;
        encrypt_bytes(
            &received.weights,
            partial.join(format!("{WEIGHTS_FILE}{ENCRYPTED_SUFFIX}")),
            self.kek.as_ref(),
            options,
        )?;
        let marker = partial.join(LAST_USED_FILE);
        std::fs::write(&marker, bytes.to_string()).map_err(BaseCacheError::io(&marker))?;
        let entry = self.entry_dir(&found);
        std::fs::rename(&partial, &entry).map_err(BaseCacheError::io(&entry))?;
        Ok(CachedBase {
            sha256: found,
            bytes,
            last_used: SystemTime::now(),
        })
    }

    /// Evicts least recently used entries not in `in_use` until one of `bytes` fits.
    fn make_room(
        &self,
        digest: &str,
        bytes: u64,
        in_use: &BTreeSet<String>,
    ) -> Result<(), BaseCacheError> {
        let entries = self.entries()?;
        let mut count = entries.len();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        let fits = |count: usize, total: u64| {
            count < self.limits.max_entries && total + bytes <= self.limits.max_bytes
        };
        for victim in entries.iter().filter(|e| !in_use.contains(&e.sha256)) {
            if fits(count, total) {
                break;
            }
            self.remove(&victim.sha256)?;
            tracing::info!(sha256 = %victim.sha256, "evicted a cached base model");
            count -= 1;
            total = total.saturating_sub(victim.bytes);
        }
        if fits(count, total) {
            Ok(())
        } else {
            Err(BaseCacheError::Full {
                digest: digest.to_string(),
                in_use: count,
                max_entries: self.limits.max_entries,
                max_bytes: self.limits.max_bytes,
            })
        }
    }

    /// Removes the entry `sha256` (nothing if absent).
    pub fn remove(&self, sha256: &str) -> Result<(), BaseCacheError> {
        if !is_digest(sha256) {
            return Ok(());
        }
        let entry = self.entry_dir(sha256);
        match std::fs::remove_dir_all(&entry) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BaseCacheError::Io {
                path: entry,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn touch(&self, sha256: &str, bytes: u64) -> Result<(), BaseCacheError> {
        let marker = self.entry_dir(sha256).join(LAST_USED_FILE);
        std::fs::write(&marker, bytes.to_string()).map_err(BaseCacheError::io(&marker))
    }

    /// Decrypts the cached base `sha256` into a private temporary directory (removed when the
    /// result is dropped) after checking, in memory, that it still has that digest; `None` if
    /// it is not cached. An entry that fails authentication or whose digest changed is removed.
    pub fn open(&self, sha256: &str) -> Result<Option<DecryptedBase>, BaseCacheError> {
        if !self.contains(sha256) {
            return Ok(None);
        }
        let entry = self.entry_dir(sha256);
        let read = |name: &str| -> Result<Vec<u8>, BaseCacheError> {
            let path = entry.join(format!("{name}{ENCRYPTED_SUFFIX}"));
            decrypt_to_vec(&path, self.kek.as_ref()).map_err(BaseCacheError::from)
        };
        let (config_json, weights) =
            match read(CONFIG_FILE).and_then(|c| Ok((c, read(WEIGHTS_FILE)?))) {
                Ok(pair) => pair,
                Err(e) => {
                    // Ciphertext that does not authenticate is of no use: drop it so that the next
                    // admission fetches the base again. Not so for another KEK, a KEK backend or
                    // an I/O failure: the entry may be sound, and the operator's to fix.
                    let sound = matches!(
                        e,
                        BaseCacheError::AtRest(
                            AtRestError::WrongKek { .. }
                                | AtRestError::Kek { .. }
                                | AtRestError::Io { .. }
                        )
                    );
                    if !sound {
                        self.remove(sha256)?;
                    }
                    return Err(e);
                }
            };
        let found = checkpoint_digest_of_bytes(&config_json, &weights, "a cached base model")
            .unwrap_or_else(|e: LmError| format!("unreadable ({e})"));
        if found != sha256 {
            self.remove(sha256)?;
            return Err(BaseCacheError::Corrupted {
                digest: sha256.to_string(),
                found,
            });
        }
        self.touch(sha256, (config_json.len() + weights.len()) as u64)?;
        let dir = tempfile::Builder::new()
            .prefix("tutela-base-")
            .tempdir_in(&self.scratch)
            .map_err(BaseCacheError::io(&self.scratch))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
                .map_err(BaseCacheError::io(dir.path()))?;
        }
        for (name, bytes) in [(CONFIG_FILE, &config_json), (WEIGHTS_FILE, &weights)] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).map_err(BaseCacheError::io(&path))?;
        }
        Ok(Some(DecryptedBase {
            sha256: sha256.to_string(),
            dir,
        }))
    }
}
