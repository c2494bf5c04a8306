//! The base checkpoints of language-model jobs (`model.base_sha256`), as operators uploaded them
//! (`tutela job submit --base-model DIR`): files under the coordinator's state directory, not in
//! the SQL store, named by the checkpoint digest the coordinator computed itself over what it
//! received (`state_dir/base-models/<sha256>/config.json` and `model.safetensors`). A site that
//! does not hold a job's base fetches it from here once and checks the digest again itself.
//!
//! A base is never whole in memory here, whatever its size (gigabytes for a real model): an
//! upload is written to a spool file chunk by chunk as it arrives
//! ([`BaseModelStore::store_stream`], the file's SHA-256 computed on the way), its checkpoint
//! digest is then computed from the spool file one bounded read at a time
//! ([`checkpoint_digest_of_files`]: the digest's order is the tensors' names, not the file's,
//! so it cannot always be hashed in arrival order), and the spool becomes the entry by a rename.
//! A fetch is served from the file a chunk at a time ([`BaseModelStore::open`],
//! `tutela_protocol::base_model::file_chunk_stream`). Memory per transfer: one chunk
//! (`CHUNK_BYTES`) and one read buffer (`DIGEST_READ_BYTES`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::Stream;
use tutela_protocol::base_model::{BaseTransferError, WeightsSink, receive_into};
use tutela_protocol::checkpoint_digest::{CONFIG_FILE, WEIGHTS_FILE, checkpoint_digest_of_files};
use tutela_protocol::job::is_hex_digest;
use tutela_protocol::pb;

/// Bases served since the process started (the e2e test and the operator's log count fetches).
static SERVED: AtomicU64 = AtomicU64::new(0);
/// Uploads started since the process started: each spools into its own directory.
static UPLOADS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum BaseModelStoreError {
    #[error("the uploaded base model is not a checkpoint: {0}")]
    Malformed(String),
    #[error(
        "the uploaded base model's checkpoint digest is {found}, but the upload names {claimed}"
    )]
    DigestMismatch { claimed: String, found: String },
    #[error("{sha256:?} is not a SHA-256 digest (64 lowercase hex digits)")]
    BadDigest { sha256: String },
    #[error("no base model {sha256} was uploaded to this coordinator")]
    NotFound { sha256: String },
    /// The upload's stream: too large, malformed, cut short, or broken.
    #[error(transparent)]
    Transfer(BaseTransferError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BaseModelStoreError {
    /// Whether the coordinator's side failed (its disk), not the upload.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            BaseModelStoreError::Io { .. }
                | BaseModelStoreError::Transfer(BaseTransferError::Sink(_))
        )
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BaseModelStoreError + '_ {
    move |source| BaseModelStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The uploaded bases, content-addressed by checkpoint digest.
#[derive(Clone, Debug)]
pub struct BaseModelStore {
    dir: PathBuf,
}

/// An upload's weights on their way to disk: written as they arrive, hashed on the way.
struct SpoolFile {
    file: std::fs::File,
    sha256: ring::digest::Context,
    bytes: u64,
}

impl WeightsSink for SpoolFile {
    fn write_chunk(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.sha256.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

/// A stored base opened for serving: `config.json`'s text (small, bounded at upload) and the
/// weights file, not read yet.
#[derive(Debug)]
pub struct StoredBase {
    pub config_json: Vec<u8>,
    pub weights: std::fs::File,
    pub weights_len: u64,
}

/// Removes an upload's spool directory unless it was renamed into place.
struct SpoolDir(Option<PathBuf>);

impl Drop for SpoolDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl BaseModelStore {
    /// The store in `state_dir/base-models`.
    pub fn in_state_dir(state_dir: &Path) -> BaseModelStore {
        BaseModelStore {
            dir: state_dir.join("base-models"),
        }
    }

    fn entry(&self, sha256: &str) -> Result<PathBuf, BaseModelStoreError> {
        // The digest becomes a directory name: nothing but hex gets there.
        if !is_hex_digest(sha256) {
            return Err(BaseModelStoreError::BadDigest {
                sha256: sha256.chars().take(80).collect(),
            });
        }
        Ok(self.dir.join(sha256))
    }

    /// Receives an upload (refusing more than `max_bytes`), spools its weights to disk as they
    /// arrive, checks the checkpoint digest it claims against the one computed here over the
    /// spool file, and keeps it (atomically: the spool directory renamed into place; nothing is
    /// kept otherwise). Returns the digest and the bytes stored. A base already stored is not
    /// replaced.
    pub async fn store_stream<S>(
        &self,
        stream: S,
        max_bytes: u64,
    ) -> Result<(String, u64), BaseModelStoreError>
    where
        S: Stream<Item = Result<pb::BaseModelChunk, tonic::Status>> + Unpin,
    {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let partial = self.dir.join(format!(
            ".partial-{}-{}",
            std::process::id(),
            UPLOADS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut spool_dir = SpoolDir(Some(partial.clone()));
        let weights_path = partial.join(WEIGHTS_FILE);
        let mut spool = SpoolFile {
            file: std::fs::File::create(&weights_path).map_err(io(&weights_path))?,
            sha256: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        };
        let announced = receive_into(stream, max_bytes, &mut spool)
            .await
            .map_err(BaseModelStoreError::Transfer)?;
        spool.file.sync_all().map_err(io(&weights_path))?;
        let file_sha256 = hex::encode(spool.sha256.finish().as_ref());
        drop(spool.file);
        let config_path = partial.join(CONFIG_FILE);
        std::fs::write(&config_path, &announced.config_json).map_err(io(&config_path))?;
        // The checkpoint digest, over the spooled file in bounded reads, off the async runtime.
        let config_json = announced.config_json.clone();
        let found = tokio::task::spawn_blocking(move || {
            checkpoint_digest_of_files(&config_json, &weights_path, "the uploaded base model")
        })
        .await
        .map_err(|e| BaseModelStoreError::Malformed(format!("digesting was interrupted: {e}")))?
        .map_err(|e| BaseModelStoreError::Malformed(e.to_string()))?;
        if found != announced.claimed_sha256 {
            return Err(BaseModelStoreError::DigestMismatch {
                claimed: announced.claimed_sha256.chars().take(80).collect(),
                found,
            });
        }
        let bytes = announced.config_json.len() as u64 + announced.weights_len;
        let entry = self.entry(&found)?;
        if !entry.is_dir() {
            std::fs::rename(&partial, &entry).map_err(io(&entry))?;
            spool_dir.0 = None;
        }
        tracing::debug!(sha256 = %found, %file_sha256, bytes, "base model spooled and checked");
        Ok((found, bytes))
    }

    /// The stored base `sha256`, opened for serving as it is on disk: the fetching site checks
    /// the digest, so a file damaged here is refused there.
    pub fn open(&self, sha256: &str) -> Result<StoredBase, BaseModelStoreError> {
        let entry = self.entry(sha256)?;
        if !entry.is_dir() {
            return Err(BaseModelStoreError::NotFound {
                sha256: sha256.to_string(),
            });
        }
        let config_path = entry.join(CONFIG_FILE);
        let weights_path = entry.join(WEIGHTS_FILE);
        let config_json = std::fs::read(&config_path).map_err(io(&config_path))?;
        let weights = std::fs::File::open(&weights_path).map_err(io(&weights_path))?;
        let weights_len = weights.metadata().map_err(io(&weights_path))?.len();
        Ok(StoredBase {
            config_json,
            weights,
            weights_len,
        })
    }

    /// Whether base `sha256` was uploaded.
    pub fn contains(&self, sha256: &str) -> bool {
        self.entry(sha256).is_ok_and(|e| e.is_dir())
    }

    /// Counts one base served to a site; returns the count so far.
    pub fn count_served() -> u64 {
        SERVED.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Bases served since the process started.
    pub fn served() -> u64 {
        SERVED.load(Ordering::Relaxed)
    }
}

/// Why a site is not served a job's base model (`Federation.FetchBaseModel`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseFetchRefusal {
    #[error("job {job} is not running")]
    NotRunning { job: String },
    #[error("site {site} does not take part in job {job}")]
    NotAParticipant { site: String, job: String },
    #[error("job {job} does not name base model {sha256}")]
    NotTheJobsBase { job: String, sha256: String },
    #[error(
        "site {site} holds no open task of job {job}: a base is served to a site for the task \
         it was sent, while that task is open"
    )]
    NoOpenTask { site: String, job: String },
}

/// Whether `site` may be served base `sha256` for job `job_id` (its spec `spec`, `running` or
/// not): the job runs, names that base, lists the site (or lists none), and the site holds an
/// open task of the job now (`holds_open_task`). A node fetches a base only when a task of the
/// job reaches it, so a site never sampled for the job, or whose task closed, gets nothing,
/// even from a job open to every site (`sites = []`).
pub fn may_serve(
    job_id: &str,
    running: bool,
    spec: &crate::job::JobSpec,
    site: &str,
    sha256: &str,
    holds_open_task: bool,
) -> Result<(), BaseFetchRefusal> {
    let job = job_id.to_string();
    if !running {
        return Err(BaseFetchRefusal::NotRunning { job });
    }
    if !spec.sites.is_empty() && !spec.sites.iter().any(|s| s == site) {
        return Err(BaseFetchRefusal::NotAParticipant {
            site: site.to_string(),
            job,
        });
    }
    if spec.model.base_sha256.as_deref() != Some(sha256) {
        return Err(BaseFetchRefusal::NotTheJobsBase {
            job,
            // The caller's text, bounded.
            sha256: sha256.chars().take(80).collect(),
        });
    }
    if !holds_open_task {
        return Err(BaseFetchRefusal::NoOpenTask {
            site: site.to_string(),
            job,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tutela_protocol::base_model::{CHUNK_BYTES, ReceivedBaseModel, chunks, file_chunk_stream};
    use tutela_protocol::checkpoint_digest::{CheckpointHasher, checkpoint_digest_of_bytes};

    use super::*;

    fn base() -> ReceivedBaseModel {
        let bytes = 1.5f32.to_le_bytes().repeat(4);
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &bytes)
                .unwrap();
        let weights = safetensors::serialize([("w".to_string(), view)], None).unwrap();
        let config_json = br#"{"model_type": "llama"}"#.to_vec();
        let claimed_sha256 = checkpoint_digest_of_bytes(&config_json, &weights, "t").unwrap();
        ReceivedBaseModel {
            claimed_sha256,
            config_json,
            weights,
        }
    }

    fn upload(
        base: &ReceivedBaseModel,
    ) -> impl Stream<Item = Result<pb::BaseModelChunk, tonic::Status>> + Unpin {
        futures::stream::iter(
            chunks(
                &base.claimed_sha256,
                base.config_json.clone(),
                &base.weights,
            )
            .into_iter()
            .map(Ok),
        )
    }

    /// What [`BaseModelStore::open`] serves, collected.
    async fn served(store: &BaseModelStore, sha256: &str) -> (Vec<u8>, Vec<u8>) {
        let stored = store.open(sha256).unwrap();
        let mut frames = Box::pin(file_chunk_stream(
            sha256,
            stored.config_json,
            stored.weights,
            stored.weights_len,
        ));
        let first = frames.next().await.unwrap().unwrap();
        assert_eq!(first.sha256, sha256);
        let mut weights = Vec::new();
        while let Some(chunk) = frames.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.weights.len() <= CHUNK_BYTES);
            weights.extend_from_slice(&chunk.weights);
        }
        assert_eq!(weights.len() as u64, first.weights_len);
        (first.config_json, weights)
    }

    fn entries(store: &BaseModelStore) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&store.dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test]
    async fn stores_by_recomputed_digest_and_refuses_a_mismatch_keeping_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BaseModelStore::in_state_dir(dir.path());
        let good = base();
        let (sha, bytes) = store.store_stream(upload(&good), u64::MAX).await.unwrap();
        assert_eq!(sha, good.claimed_sha256);
        assert_eq!(bytes, (good.config_json.len() + good.weights.len()) as u64);
        assert!(store.contains(&sha));
        assert_eq!(
            served(&store, &sha).await,
            (good.config_json.clone(), good.weights.clone())
        );
        // Idempotent, and no spool directory left behind.
        store.store_stream(upload(&good), u64::MAX).await.unwrap();
        assert_eq!(entries(&store), vec![sha.clone()]);

        let mut lying = good.clone();
        let last = lying.weights.len() - 1;
        lying.weights[last] ^= 1;
        let e = store
            .store_stream(upload(&lying), u64::MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(e, BaseModelStoreError::DigestMismatch { .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&good.claimed_sha256), "{e}");
        // Too large for the bound: refused before any weights are spooled; not a checkpoint.
        let e = store.store_stream(upload(&good), 10).await.unwrap_err();
        assert!(
            matches!(
                e,
                BaseModelStoreError::Transfer(BaseTransferError::TooLarge { .. })
            ),
            "{e}"
        );
        assert!(!e.is_internal());
        let mut garbage = good.clone();
        garbage.weights = vec![7u8; 100];
        let e = store
            .store_stream(upload(&garbage), u64::MAX)
            .await
            .unwrap_err();
        assert!(matches!(e, BaseModelStoreError::Malformed(_)), "{e}");
        assert_eq!(entries(&store), vec![sha], "refused uploads leave nothing");

        assert!(matches!(
            store.open(&"0".repeat(64)),
            Err(BaseModelStoreError::NotFound { .. })
        ));
        assert!(matches!(
            store.open("../../etc"),
            Err(BaseModelStoreError::BadDigest { .. })
        ));
    }

    /// Attacks on `FetchBaseModel`: a site asks for the base of a job it is not part of, of a
    /// job open to every site while it holds no task of it (never sampled, or its task closed),
    /// for another base than the job's, or after the job ended.
    #[test]
    fn a_base_is_served_only_to_a_site_holding_an_open_task_of_the_running_job() {
        let sha = "a".repeat(64);
        let spec = |sites: &str| -> crate::job::JobSpec {
            toml::from_str(&format!(
                "name = \"j\"\nrounds = 1\nmin_sites = 1\nround_deadline_secs = 60\n\
                 update_norm_bound = 10.0\nsites = {sites}\n\
                 [model]\nname = \"llama\"\nbase_sha256 = \"{sha}\"\n\
                 [data]\nschema = \"notes\"\n\
                 [training]\noptimizer = \"sgd\"\nlearning_rate = 0.1\nlocal_epochs = 1\nbatch_size = 4\n"
            ))
            .unwrap()
        };
        let listed = spec("[\"a\", \"b\"]");
        let open_to_all = spec("[]");
        assert_eq!(may_serve("j1", true, &listed, "a", &sha, true), Ok(()));
        assert_eq!(may_serve("j1", true, &open_to_all, "c", &sha, true), Ok(()));
        assert!(matches!(
            may_serve("j1", true, &listed, "c", &sha, true),
            Err(BaseFetchRefusal::NotAParticipant { .. })
        ));
        // Open to every site, but this one holds no task of the job.
        let e = may_serve("j1", true, &open_to_all, "c", &sha, false).unwrap_err();
        assert!(matches!(e, BaseFetchRefusal::NoOpenTask { .. }), "{e}");
        assert!(matches!(
            may_serve("j1", true, &listed, "a", &sha, false),
            Err(BaseFetchRefusal::NoOpenTask { .. })
        ));
        assert!(matches!(
            may_serve("j1", true, &listed, "a", &"b".repeat(64), true),
            Err(BaseFetchRefusal::NotTheJobsBase { .. })
        ));
        assert!(matches!(
            may_serve("j1", false, &listed, "a", &sha, true),
            Err(BaseFetchRefusal::NotRunning { .. })
        ));
    }

    /// A base of `BIG_TENSOR_BYTES + 64` weight bytes, generated a chunk at a time (never whole
    /// in memory, not even in the test): two F32 tensors, `b.big` (file order first) and
    /// `a.small`, so the digest's name order is not the file's.
    const BIG_TENSOR_BYTES: usize = 96 << 20;

    fn big_header() -> Vec<u8> {
        let header = format!(
            r#"{{"b.big":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{BIG_TENSOR_BYTES}]}},"a.small":{{"dtype":"F32","shape":[16],"data_offsets":[{BIG_TENSOR_BYTES},{}]}}}}"#,
            BIG_TENSOR_BYTES / 4,
            BIG_TENSOR_BYTES + 64
        );
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out
    }

    /// Bytes `[at, at + len)` of the big base's data section.
    fn big_data(at: usize, len: usize) -> Vec<u8> {
        (at..at + len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    const BIG_CONFIG: &[u8] = br#"{"model_type": "llama", "hidden_size": 8}"#;

    /// The big base's checkpoint digest, computed as a reader would, a piece at a time.
    fn big_digest() -> String {
        let mut h = CheckpointHasher::new(BIG_CONFIG).unwrap();
        h.tensor_count(2);
        h.tensor_header("a.small", safetensors::Dtype::F32, &[16], 64);
        h.bytes(&big_data(BIG_TENSOR_BYTES, 64));
        h.tensor_header(
            "b.big",
            safetensors::Dtype::F32,
            &[BIG_TENSOR_BYTES / 4],
            BIG_TENSOR_BYTES,
        );
        for at in (0..BIG_TENSOR_BYTES).step_by(CHUNK_BYTES) {
            h.bytes(&big_data(at, CHUNK_BYTES.min(BIG_TENSOR_BYTES - at)));
        }
        h.finish()
    }

    /// The big base's upload, produced lazily chunk by chunk.
    fn big_upload(
        sha256: String,
    ) -> std::pin::Pin<Box<dyn Stream<Item = Result<pb::BaseModelChunk, tonic::Status>> + Send>>
    {
        let header = big_header();
        let data_len = BIG_TENSOR_BYTES + 64;
        let total = header.len() + data_len;
        let first = pb::BaseModelChunk {
            sha256,
            config_json: BIG_CONFIG.to_vec(),
            weights_len: total as u64,
            weights: header.clone(),
        };
        let rest = futures::stream::iter((0..data_len).step_by(CHUNK_BYTES)).map(move |at| {
            Ok(pb::BaseModelChunk {
                weights: big_data(at, CHUNK_BYTES.min(data_len - at)),
                ..Default::default()
            })
        });
        Box::pin(futures::stream::once(async move { Ok(first) }).chain(rest))
    }

    fn status_kib(key: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/self/status"))
    }

    /// Peak memory of this process above its start must stay below this, for a base of 96 MiB
    /// uploaded and then served: a few chunks, never the base.
    const MEMORY_BOUND_BYTES: u64 = 24 << 20;
    const CHILD_ENV: &str = "TUTELA_TEST_BASE_STREAM_CHILD";

    /// The measurement, in a process of its own (see the test below): uploads the big base into
    /// a store and serves it back, checking every byte, and prints the peak RSS growth.
    #[tokio::test]
    #[ignore = "run by a_base_larger_than_the_memory_bound_is_stored_and_served_in_bounded_memory"]
    async fn big_base_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = BaseModelStore::in_state_dir(dir.path());
        let sha = big_digest();
        let start = status_kib("VmRSS:");
        let (stored, bytes) = store
            .store_stream(big_upload(sha.clone()), u64::MAX)
            .await
            .unwrap();
        assert_eq!(stored, sha);
        assert_eq!(
            bytes as usize,
            BIG_CONFIG.len() + big_header().len() + BIG_TENSOR_BYTES + 64
        );
        // Served back chunk by chunk, compared with the generator as it goes.
        let opened = store.open(&sha).unwrap();
        let mut frames = Box::pin(file_chunk_stream(
            &sha,
            opened.config_json,
            opened.weights,
            opened.weights_len,
        ));
        let first = frames.next().await.unwrap().unwrap();
        assert_eq!(first.config_json, BIG_CONFIG);
        let header = big_header();
        let mut at = 0usize;
        let mut largest = 0;
        while let Some(chunk) = frames.next().await {
            let chunk = chunk.unwrap();
            largest = largest.max(chunk.weights.len());
            let n = chunk.weights.len();
            let mut want: Vec<u8> = header.iter().copied().skip(at).take(n).collect();
            let from = (at + want.len()).saturating_sub(header.len());
            want.extend(big_data(from, n - want.len()));
            assert!(
                chunk.weights == want,
                "the bytes served at {at} are not the upload's"
            );
            at += n;
        }
        assert_eq!(at as u64, first.weights_len);
        assert_eq!(largest, CHUNK_BYTES);
        let peak = status_kib("VmHWM:");
        println!("\nPEAK_GROWTH_BYTES={}", peak.saturating_sub(start) * 1024);
    }

    /// Upload and fetch of a base four times the memory bound (96 MiB against 24 MiB): the peak
    /// RSS growth of a process doing both stays under the bound (measured in a child process
    /// running only that, so other tests' allocations do not count). Holding the base whole, as
    /// the store did before, would need at least its 96 MiB.
    #[test]
    fn a_base_larger_than_the_memory_bound_is_stored_and_served_in_bounded_memory() {
        if std::env::var_os(CHILD_ENV).is_some() {
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "base_models::tests::big_base_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let growth: u64 = stdout
            .lines()
            .find_map(|l| l.split("PEAK_GROWTH_BYTES=").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("the child printed no measurement:\n{stdout}"));
        println!("peak RSS growth {growth} bytes for a {BIG_TENSOR_BYTES}-byte base");
        assert!(
            growth < MEMORY_BOUND_BYTES,
            "peak RSS grew {growth} bytes storing and serving a {BIG_TENSOR_BYTES}-byte base \
             (bound {MEMORY_BOUND_BYTES})"
        );
    }
}
