//! Data keys and key-encryption keys (KEKs).
//!
//! Every file gets its own random 256-bit data key; only the data key wrapped by a KEK is stored
//! in the file. The KEK lives outside the data directory (a 0600 key file or an environment
//! variable) behind the [`KeyEncryptionKey`] trait, so that a KMS or an HSM can replace
//! [`LocalKek`] without any change to the file format or the streaming code.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use super::error::{AtRestError, KekError};

/// Length in bytes of data keys and of [`LocalKek`] keys (AES-256).
pub const KEY_LEN: usize = 32;

const TAG_LEN: usize = 16;
/// A key file is a few dozen bytes; anything much bigger is not a key file, and we do not want
/// to read an arbitrary large file into memory because someone pointed us at it.
const MAX_KEY_FILE_LEN: u64 = 4096;

/// A per-file 256-bit data key. Zeroed on drop, never printed.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, AtRestError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| AtRestError::Random {
                what: "generating a data key",
            })?;
        Ok(Self(bytes))
    }

    /// Wraps raw key bytes, for [`KeyEncryptionKey`] implementations that unwrap keys themselves.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw key bytes, for [`KeyEncryptionKey`] implementations that wrap keys themselves.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A key-encryption key: wraps and unwraps per-file data keys.
///
/// Implementations must authenticate `context` (AES-GCM AAD, a KMS encryption context, ...):
/// the format passes the file's fixed header and KEK id there, so that a wrapped key cannot be
/// moved to another file or relabelled with another KEK id.
pub trait KeyEncryptionKey: Send + Sync {
    /// A stable identifier stored in every file header (1 to 255 bytes of UTF-8). Reading a file
    /// compares it with the header before trying to unwrap, so that "wrong KEK" can be told apart
    /// from "tampered header".
    fn id(&self) -> &str;

    /// Encrypts and authenticates `key` bound to `context`.
    fn wrap(&self, key: &DataKey, context: &[u8]) -> Result<Vec<u8>, KekError>;

    /// Reverses [`wrap`](Self::wrap); fails with [`KekError::Unwrap`] when `wrapped` or `context`
    /// do not authenticate.
    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<DataKey, KekError>;
}

/// A KEK held in this process: AES-256-GCM key wrapping with a random 96-bit nonce per wrap.
///
/// Wrapped form: `nonce (12) || encrypted data key (32) || tag (16)` = 60 bytes. Random nonces
/// are safe here because a KEK wraps one key per file: the birthday bound (2^32 wraps per KEK at
/// a 2^-32 collision risk) is far beyond what a site writes between rotations.
///
/// Its id is `local:` followed by 16 hex digits of HMAC-SHA256(key, "tutela/at-rest/kek-id/v1"),
/// a key check value: two different keys get different ids, so a wrong key is reported as such
/// before any unwrap is tried, and the id reveals nothing usable about the key.
pub struct LocalKek {
    key: LessSafeKey,
    id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKek")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl LocalKek {
    /// A KEK from raw key bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let check = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, bytes),
            b"tutela/at-rest/kek-id/v1",
        );
        let id = format!("local:{}", hex::encode(&check.as_ref()[..8]));
        // `UnboundKey::new` only fails on a wrong key length, which the array type rules out;
        // keep the error path anyway rather than panic.
        let key = match UnboundKey::new(&AES_256_GCM, bytes) {
            Ok(k) => LessSafeKey::new(k),
            Err(_) => unreachable_key_len(),
        };
        Self {
            key,
            id,
            rng: SystemRandom::new(),
        }
    }

    /// Generates a new random KEK and writes it (base64, one line) to `path`, created with mode
    /// 0600. Refuses to overwrite an existing file: overwriting a KEK would orphan every file
    /// wrapped under it.
    pub fn generate_key_file(path: &Path) -> Result<Self, AtRestError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| AtRestError::Random {
                what: "generating a key-encryption key",
            })?;
        let mut text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*bytes));
        text.push('\n');
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| AtRestError::io(path, "creating key file", e))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| AtRestError::io(path, "writing key file", e))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Loads a KEK from a key file holding 32 raw bytes, 64 hex digits or base64 of 32 bytes.
    ///
    /// Refuses a file that group or others may read or write (mode & 0o077 != 0), and anything
    /// that is not a regular file. The mode is checked on the opened file descriptor, so the
    /// file cannot be swapped between the check and the read.
    pub fn from_key_file(path: &Path) -> Result<Self, AtRestError> {
        let key = read_secret_file(path)?;
        Ok(Self::from_bytes(&key))
    }

    /// Like [`from_key_file`](Self::from_key_file), and also refuses a key file that lies inside
    /// `data_dir` (after resolving symlinks): a key stored next to the data it protects is lost
    /// together with it on a stolen disk.
    pub fn from_key_file_outside(path: &Path, data_dir: &Path) -> Result<Self, AtRestError> {
        let key = read_secret_file_outside(path, data_dir)?;
        Ok(Self::from_bytes(&key))
    }

    /// Loads a KEK from environment variable `var` (64 hex digits or base64 of 32 bytes).
    pub fn from_env(var: &str) -> Result<Self, AtRestError> {
        let value = Zeroizing::new(std::env::var(var).map_err(|e| AtRestError::KeyEnv {
            var: var.to_owned(),
            reason: e.to_string(),
        })?);
        let key = parse_key(value.as_bytes()).map_err(|reason| AtRestError::KeyEnv {
            var: var.to_owned(),
            reason,
        })?;
        Ok(Self::from_bytes(&key))
    }
}

/// Reads a 32-byte secret from a key file (32 raw bytes, 64 hex digits or base64 of 32 bytes),
/// as the key-encryption key and the site secret are stored.
///
/// Refuses a file that group or others may read or write (mode & 0o077 != 0), and anything
/// that is not a regular file. The mode is checked on the opened file descriptor, so the
/// file cannot be swapped between the check and the read.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, AtRestError> {
    let file = File::open(path).map_err(|e| AtRestError::io(path, "opening key file", e))?;
    let meta = file
        .metadata()
        .map_err(|e| AtRestError::io(path, "reading key file metadata", e))?;
    if !meta.is_file() {
        return Err(AtRestError::KeyFileFormat {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(AtRestError::KeyFilePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut content = Zeroizing::new(Vec::new());
    file.take(MAX_KEY_FILE_LEN + 1)
        .read_to_end(&mut content)
        .map_err(|e| AtRestError::io(path, "reading key file", e))?;
    if content.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(AtRestError::KeyFileFormat {
            path: path.to_owned(),
            reason: format!("larger than {MAX_KEY_FILE_LEN} bytes; not a key file"),
        });
    }
    let key = parse_key(&content).map_err(|reason| AtRestError::KeyFileFormat {
        path: path.to_owned(),
        reason,
    })?;
    Ok(key)
}

/// Like [`read_secret_file`], and also refuses a file that lies inside `data_dir` (after
/// resolving symlinks): a key stored next to the data it protects is lost together with it on a
/// stolen disk.
pub fn read_secret_file_outside(
    path: &Path,
    data_dir: &Path,
) -> Result<Zeroizing<[u8; KEY_LEN]>, AtRestError> {
    let key_real = path
        .canonicalize()
        .map_err(|e| AtRestError::io(path, "resolving key file path", e))?;
    let dir_real = data_dir
        .canonicalize()
        .map_err(|e| AtRestError::io(data_dir, "resolving data directory", e))?;
    if key_real.starts_with(&dir_real) {
        return Err(AtRestError::KeyInsideDataDir {
            key: path.to_owned(),
            data_dir: data_dir.to_owned(),
        });
    }
    read_secret_file(path)
}

#[cold]
fn unreachable_key_len() -> ! {
    // A `[u8; 32]` is always a valid AES-256 key length.
    panic!("AES-256 key of 32 bytes rejected by ring")
}

/// Accepts 32 raw bytes, 64 hex digits, or standard/URL-safe base64 of 32 bytes (surrounding
/// whitespace ignored). Error messages never echo the content: it is key material.
fn parse_key(content: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if content.len() == KEY_LEN {
        key.copy_from_slice(content);
        return Ok(key);
    }
    let text = content.trim_ascii();
    if text.len() == 2 * KEY_LEN && hex::decode_to_slice(text, key.as_mut()).is_ok() {
        return Ok(key);
    }
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE,
    ] {
        if let Ok(mut decoded) = engine.decode(text) {
            let ok = decoded.len() == KEY_LEN;
            if ok {
                key.copy_from_slice(&decoded);
            }
            decoded.zeroize();
            if ok {
                return Ok(key);
            }
        }
    }
    Err(format!(
        "expected a 256-bit key as 32 raw bytes, 64 hex digits or base64 of 32 bytes, found {} \
         bytes of something else",
        content.len()
    ))
}

impl KeyEncryptionKey for LocalKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, key: &DataKey, context: &[u8]) -> Result<Vec<u8>, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| KekError::Backend("system random generator failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + KEY_LEN + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key.as_bytes());
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| KekError::Backend("AES-GCM seal failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<DataKey, KekError> {
        if wrapped.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
            return Err(KekError::Unwrap);
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KekError::Unwrap)?;
        let mut buf = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
        buf.copy_from_slice(rest);
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context), buf.as_mut())
            .map_err(|_| KekError::Unwrap)?;
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(plain);
        let key = DataKey::from_bytes(bytes);
        bytes.zeroize();
        Ok(key)
    }
}
