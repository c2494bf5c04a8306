//! The base checkpoints of language-model jobs (`model.base_sha256`), as operators uploaded them
//! (`tutela job submit --base-model DIR`): files under the coordinator's state directory, not in
//! the SQL store, named by the checkpoint digest the coordinator computed itself over what it
//! received (`state_dir/base-models/<sha256>/config.json` and `model.safetensors`). A site that
//! does not hold a job's base fetches it from here once and checks the digest again itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tutela_protocol::base_model::ReceivedBaseModel;
use tutela_protocol::checkpoint_digest::{CONFIG_FILE, WEIGHTS_FILE, checkpoint_digest_of_bytes};
use tutela_protocol::job::is_hex_digest;

/// Bases served since the process started (the e2e test and the operator's log count fetches).
static SERVED: AtomicU64 = AtomicU64::new(0);

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
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

    /// Checks `received` against the digest it claims and keeps it (atomically: a partial
    /// directory renamed into place). Returns the digest and the bytes stored. A base already
    /// stored is not written again.
    pub fn store(
        &self,
        received: &ReceivedBaseModel,
    ) -> Result<(String, u64), BaseModelStoreError> {
        let found = checkpoint_digest_of_bytes(
            &received.config_json,
            &received.weights,
            "the uploaded base model",
        )
        .map_err(|e| BaseModelStoreError::Malformed(e.to_string()))?;
        if found != received.claimed_sha256 {
            return Err(BaseModelStoreError::DigestMismatch {
                claimed: received.claimed_sha256.chars().take(80).collect(),
                found,
            });
        }
        let bytes = (received.config_json.len() + received.weights.len()) as u64;
        let entry = self.entry(&found)?;
        if entry.is_dir() {
            return Ok((found, bytes));
        }
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let partial = self
            .dir
            .join(format!(".partial-{found}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        for (name, data) in [
            (CONFIG_FILE, &received.config_json),
            (WEIGHTS_FILE, &received.weights),
        ] {
            let path = partial.join(name);
            std::fs::write(&path, data).map_err(io(&path))?;
        }
        std::fs::rename(&partial, &entry).map_err(io(&entry))?;
        Ok((found, bytes))
    }

    /// The stored base `sha256` (`config.json`'s text and the weights file's bytes), as they are
    /// on disk: the fetching site checks the digest, so a file damaged here is refused there.
    pub fn read(&self, sha256: &str) -> Result<(Vec<u8>, Vec<u8>), BaseModelStoreError> {
        let entry = self.entry(sha256)?;
        if !entry.is_dir() {
            return Err(BaseModelStoreError::NotFound {
                sha256: sha256.to_string(),
            });
        }
        let config_path = entry.join(CONFIG_FILE);
        let weights_path = entry.join(WEIGHTS_FILE);
        let config = std::fs::read(&config_path).map_err(io(&config_path))?;
        let weights = std::fs::read(&weights_path).map_err(io(&weights_path))?;
        Ok((config, weights))
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

    #[test]
    fn stores_by_recomputed_digest_and_refuses_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = BaseModelStore::in_state_dir(dir.path());
        let good = base();
        let (sha, _) = store.store(&good).unwrap();
        assert_eq!(sha, good.claimed_sha256);
        assert!(store.contains(&sha));
        assert_eq!(
            store.read(&sha).unwrap(),
            (good.config_json.clone(), good.weights.clone())
        );
        // Idempotent.
        store.store(&good).unwrap();

        let mut lying = good.clone();
        let last = lying.weights.len() - 1;
        lying.weights[last] ^= 1;
        let e = store.store(&lying).unwrap_err();
        assert!(
            matches!(e, BaseModelStoreError::DigestMismatch { .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&good.claimed_sha256), "{e}");

        assert!(matches!(
            store.read(&"0".repeat(64)),
            Err(BaseModelStoreError::NotFound { .. })
        ));
        assert!(matches!(
            store.read("../../etc"),
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
}
