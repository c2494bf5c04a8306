//! The encrypted cache of base checkpoints fetched from the coordinator: verified by digest
//! before anything is kept, only ciphertext on disk, decrypted to a private directory removed
//! after use, bounded with LRU eviction of bases no admitted job uses.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind};
use tutela_privacy::at_rest::{KeyEncryptionKey, LocalKek};
use tutela_site_node::config::NodeConfig;
use tutela_site_node::lm::base::{BaseModelRefusal, SiteBaseModels};
use tutela_site_node::lm::base_cache::{
    BaseCacheError, BaseCacheLimits, BaseModelCache, ReceivedBase,
};
use tutela_site_node::lm::config::DecoderConfig;
use tutela_site_node::lm::hf::{
    CONFIG_FILE, WEIGHTS_FILE, checkpoint_digest, checkpoint_digest_of_bytes,
    load_checkpoint_with_digest, save_checkpoint,
};

/// A tiny random Llama checkpoint saved in `dir`, read back as the coordinator would send it,
/// with its digest.
fn received_base(dir: &Path, seed: u64) -> (ReceivedBase, String) {
    let mut config = DecoderConfig::llama(300, 16, 32, 1, 2, 1);
    config.max_position_embeddings = 32;
    let model = tutela_site_node::lm::registry::build("llama", &config, Device::Cpu, seed).unwrap();
    save_checkpoint(&model, dir).unwrap();
    let received = ReceivedBase {
        config_json: std::fs::read(dir.join(CONFIG_FILE)).unwrap(),
        weights: std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(),
    };
    (received, checkpoint_digest(dir).unwrap())
}

fn kek(seed: u8) -> Arc<dyn KeyEncryptionKey> {
    Arc::new(LocalKek::from_bytes(&[seed; 32]))
}

/// Every file under `dir`, recursively, concatenated.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn digest_of_bytes_is_the_checkpoint_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let (received, digest) = received_base(tmp.path(), 1);
    assert_eq!(
        checkpoint_digest_of_bytes(&received.config_json, &received.weights, "received").unwrap(),
        digest
    );
    // One weight byte changed changes it.
    let mut weights = received.weights.clone();
    let last = weights.len() - 1;
    weights[last] ^= 1;
    assert_ne!(
        checkpoint_digest_of_bytes(&received.config_json, &weights, "received").unwrap(),
        digest
    );
}

#[test]
fn a_cached_base_is_only_ciphertext_on_disk_and_loads_by_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let (received, digest) = received_base(&tmp.path().join("sent"), 2);
    let cache_dir = tmp.path().join("work/base-models");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let cache = BaseModelCache::open_dir(&cache_dir, kek(3), BaseCacheLimits::default())
        .unwrap()
        .with_scratch(&scratch);
    assert!(!cache.contains(&digest));
    assert!(cache.open(&digest).unwrap().is_none());
    cache.insert(&digest, &received, &BTreeSet::new()).unwrap();
    assert!(cache.contains(&digest));

    // Neither the config's text nor a tensor's bytes are on disk in the clear.
    let on_disk = all_bytes(&cache_dir);
    assert!(!on_disk.is_empty());
    assert!(!contains(&on_disk, b"num_attention_heads"));
    let tensor_bytes = &received.weights[received.weights.len() - 64..];
    assert!(contains(&received.weights, tensor_bytes));
    assert!(!contains(&on_disk, tensor_bytes));

    // Decrypted for one use into a private directory, removed when dropped.
    let decrypted = cache.open(&digest).unwrap().unwrap();
    assert_eq!(decrypted.sha256(), digest);
    let dir = decrypted.dir().to_path_buf();
    assert!(dir.starts_with(&scratch));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the decrypted base is private to the node");
    }
    load_checkpoint_with_digest(&dir, &digest, Device::Cpu, Kind::Float).unwrap();
    drop(decrypted);
    assert!(!dir.exists());
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);

    // Another KEK cannot read it.
    let other = BaseModelCache::open_dir(&cache_dir, kek(4), BaseCacheLimits::default())
        .unwrap()
        .with_scratch(&scratch);
    assert!(other.open(&digest).is_err());
    // ...and a KEK mistake does not cost the entry.
    assert!(cache.contains(&digest));
    drop(cache.open(&digest).unwrap().unwrap());
}

#[test]
fn a_base_whose_digest_differs_is_refused_with_both_and_nothing_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut received, digest) = received_base(&tmp.path().join("sent"), 5);
    let last = received.weights.len() - 1;
    received.weights[last] ^= 0x40;
    let cache_dir = tmp.path().join("cache");
    let cache = BaseModelCache::open_dir(&cache_dir, kek(3), BaseCacheLimits::default()).unwrap();
    let err = cache
        .insert(&digest, &received, &BTreeSet::new())
        .unwrap_err();
    let BaseCacheError::DigestMismatch { expected, found } = &err else {
        panic!("expected a digest mismatch, got {err}");
    };
    assert_eq!(expected, &digest);
    assert_ne!(found, &digest);
    let message = err.to_string();
    assert!(
        message.contains(&digest) && message.contains(found.as_str()),
        "{message}"
    );
    assert!(!err.is_local());
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 0);

    // Bytes that are not a checkpoint at all: refused, nothing kept.
    received.weights.truncate(10);
    assert!(matches!(
        cache.insert(&digest, &received, &BTreeSet::new()),
        Err(BaseCacheError::Malformed { .. })
    ));
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 0);
}

#[test]
fn a_cached_base_tampered_on_disk_is_refused_and_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (received, digest) = received_base(&tmp.path().join("sent"), 6);
    let cache_dir = tmp.path().join("cache");
    let cache = BaseModelCache::open_dir(&cache_dir, kek(3), BaseCacheLimits::default())
        .unwrap()
        .with_scratch(tmp.path());
    cache.insert(&digest, &received, &BTreeSet::new()).unwrap();
    let weights = cache_dir.join(&digest).join(format!("{WEIGHTS_FILE}.enc"));
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    assert!(cache.open(&digest).is_err());
    // Removed, so that the next admission fetches it again.
    assert!(!cache.contains(&digest));
}

/// Attack with write access to the node's disk but not its KEK: put one cached base's
/// ciphertext (valid, under the same KEK) in another's entry, its weights or all of it, so that a
/// job naming the second trains on the first. Each file authenticates, but the entry's digest
/// is checked again over the plaintext before use: refused and dropped.
#[test]
fn a_cached_base_swapped_into_another_s_entry_is_refused_and_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, first_sha) = received_base(&tmp.path().join("first"), 8);
    let (second, second_sha) = received_base(&tmp.path().join("second"), 9);
    assert_ne!(first_sha, second_sha);
    let cache_dir = tmp.path().join("cache");
    let cache = BaseModelCache::open_dir(&cache_dir, kek(3), BaseCacheLimits::default())
        .unwrap()
        .with_scratch(tmp.path());
    // The two bases share their config.json: the weights are what a swap changes.
    cache.insert(&first_sha, &first, &BTreeSet::new()).unwrap();
    cache.insert(&second_sha, &second, &BTreeSet::new()).unwrap();
    let name = format!("{WEIGHTS_FILE}.enc");
    std::fs::copy(
        cache_dir.join(&first_sha).join(&name),
        cache_dir.join(&second_sha).join(&name),
    )
    .unwrap();
    let e = cache.open(&second_sha).unwrap_err();
    assert!(
        matches!(e, BaseCacheError::Corrupted { ref digest, .. } if *digest == second_sha),
        "{e}"
    );
    assert!(!cache.contains(&second_sha));
    // The other entry is untouched and still opens.
    assert!(cache.open(&first_sha).unwrap().is_some());
    // The whole entry renamed to the other digest: refused as well.
    cache.remove(&second_sha).unwrap();
    std::fs::rename(cache_dir.join(&first_sha), cache_dir.join(&second_sha)).unwrap();
    assert!(cache.open(&second_sha).is_err());
    assert!(!cache.contains(&second_sha));
}

#[test]
fn the_cache_evicts_the_least_recently_used_base_no_job_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let bases: Vec<(ReceivedBase, String)> = (0..3)
        .map(|i| received_base(&tmp.path().join(format!("sent{i}")), 10 + i))
        .collect();
    let limits = BaseCacheLimits {
        max_bytes: u64::MAX,
        max_entries: 2,
    };
    let cache = BaseModelCache::open_dir(tmp.path().join("cache"), kek(3), limits)
        .unwrap()
        .with_scratch(tmp.path());
    let none = BTreeSet::new();
    cache.insert(&bases[0].1, &bases[0].0, &none).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    cache.insert(&bases[1].1, &bases[1].0, &none).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Using base 0 makes base 1 the least recently used.
    drop(cache.open(&bases[0].1).unwrap().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(20));
    cache.insert(&bases[2].1, &bases[2].0, &none).unwrap();
    assert!(cache.contains(&bases[0].1));
    assert!(!cache.contains(&bases[1].1));
    assert!(cache.contains(&bases[2].1));

    // Both remaining bases in use by admitted jobs: no room, and nothing evicted.
    let in_use: BTreeSet<String> = [bases[0].1.clone(), bases[2].1.clone()].into();
    let err = cache.insert(&bases[1].1, &bases[1].0, &in_use).unwrap_err();
    assert!(matches!(err, BaseCacheError::Full { .. }), "{err}");
    assert!(cache.contains(&bases[0].1) && cache.contains(&bases[2].1));

    // Inserting a base already cached writes nothing and evicts nothing.
    let entries = cache.entries().unwrap();
    cache.insert(&bases[0].1, &bases[0].0, &in_use).unwrap();
    assert_eq!(cache.entries().unwrap().len(), entries.len());

    // A byte bound: room for one base only.
    let one = bases[0].0.config_json.len() as u64 + bases[0].0.weights.len() as u64;
    let small = BaseModelCache::open_dir(
        tmp.path().join("small"),
        kek(3),
        BaseCacheLimits {
            max_bytes: one + one / 2,
            max_entries: 10,
        },
    )
    .unwrap();
    small.insert(&bases[0].1, &bases[0].0, &none).unwrap();
    small.insert(&bases[1].1, &bases[1].0, &none).unwrap();
    assert_eq!(small.entries().unwrap().len(), 1);
    assert!(small.contains(&bases[1].1));
    let tiny = BaseModelCache::open_dir(
        tmp.path().join("tiny"),
        kek(3),
        BaseCacheLimits {
            max_bytes: one - 1,
            max_entries: 10,
        },
    )
    .unwrap();
    assert!(matches!(
        tiny.insert(&bases[0].1, &bases[0].0, &none),
        Err(BaseCacheError::TooLarge { .. })
    ));
}

#[test]
fn a_half_written_entry_is_swept_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    std::fs::create_dir_all(cache_dir.join(".partial-abc")).unwrap();
    BaseModelCache::open_dir(&cache_dir, kek(3), BaseCacheLimits::default()).unwrap();
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 0);
}

#[test]
fn base_cache_config_defaults_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "site = \"hospital-a\"\ncoordinator = \"localhost:1\"\nwork_dir = {:?}\n\
         insecure_no_approvals = true\nsite_secret_file = \"secret\"\n[tls]\nca = \"ca.crt\"\ncert = \"node.crt\"\nkey = \"node.key\"\n\
         [text_datasets.notes]\npath = \"notes.jsonl\"\n",
        dir.path().join("work")
    );
    let parse = |extra: &str| -> Result<NodeConfig, String> {
        NodeConfig::from_toml_str(&format!("{base}{extra}"), dir.path().join("node.toml"))
            .map_err(|e| e.to_string())
    };
    let config = parse("").unwrap();
    assert!(config.base_cache.fetch);
    assert_eq!(config.base_cache.limits(), BaseCacheLimits::default());
    let config = parse("[base_cache]\nfetch = false\nmax_entries = 2\nmax_bytes = 1000\n").unwrap();
    assert!(!config.base_cache.fetch);
    assert_eq!(config.base_cache.limits().max_entries, 2);
    let err = parse("[base_cache]\nmax_entries = 0\n").unwrap_err();
    assert!(err.contains("base_cache.max_entries"), "{err}");
    let err = parse("[base_cache]\nmax_bytes = 0\n").unwrap_err();
    assert!(err.contains("base_cache.max_bytes"), "{err}");
    let err = parse("[base_cache]\nmax_entrys = 3\n").unwrap_err();
    assert!(err.contains("max_entrys"), "{err}");
}

#[test]
fn admission_takes_a_base_the_site_lacks_from_the_cache_for_as_long_as_the_round() {
    let tmp = tempfile::tempdir().unwrap();
    let (received, digest) = received_base(&tmp.path().join("sent"), 20);
    let held_dir = tmp.path().join("held");
    let (_, held_digest) = received_base(&held_dir, 21);
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let cache =
        BaseModelCache::open_dir(tmp.path().join("cache"), kek(3), BaseCacheLimits::default())
            .unwrap()
            .with_scratch(&scratch);
    let bases = SiteBaseModels::index(std::slice::from_ref(&held_dir))
        .unwrap()
        .with_cache(cache.clone());

    // Not held and not cached: declined with digests only.
    let refusal = bases.approve(&digest).unwrap_err();
    assert_eq!(
        refusal,
        BaseModelRefusal::NotHeld {
            wanted: digest.clone(),
            held: vec![held_digest.clone()],
        }
    );
    // The site's own base is used in place, not from the cache.
    let own = bases.approve(&held_digest).unwrap();
    assert!(!own.is_cached());
    assert_eq!(own.dir(), held_dir);

    cache.insert(&digest, &received, &BTreeSet::new()).unwrap();
    let approved = bases.approve(&digest).unwrap();
    assert!(approved.is_cached());
    let dir = approved.dir().to_path_buf();
    assert!(dir.starts_with(&scratch));
    // A clone (the round's) keeps the directory alive; the last drop removes it.
    let round = approved.clone();
    drop(approved);
    load_checkpoint_with_digest(round.dir(), &digest, Device::Cpu, Kind::Float).unwrap();
    drop(round);
    assert!(!dir.exists());

    // A base cached while fetching is off is not used.
    let without = SiteBaseModels::index(&[held_dir]).unwrap();
    assert!(without.approve(&digest).is_err());
}
