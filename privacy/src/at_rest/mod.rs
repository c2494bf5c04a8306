//! Encryption at rest for everything a site node writes.
//!
//! - Format: AES-256-GCM in authenticated chunks (64 KiB by default) behind a small header; see
//!   [`format`] for the byte layout and why chunks can be neither reordered, truncated nor
//!   extended.
//! - Keys: a random data key per file, stored only wrapped by a key-encryption key that lives
//!   outside the data directory ([`LocalKek`]: a 0600 key file or an environment variable),
//!   behind [`KeyEncryptionKey`] so that a KMS or HSM can plug in.
//! - Streaming: [`EncryptedWriter`] (`io::Write`, atomic `finish`) and [`EncryptedReader`]
//!   (`io::Read`, hands out only authenticated chunks) hold one chunk in memory; nothing
//!   plaintext is written to disk, temporary files included.
//! - Rotation: [`rotate_file`] / [`rotate_dir`] re-wrap data keys under a new KEK without
//!   re-encrypting data.
//!
//! Crypto backend: `ring` 0.17 (`LessSafeKey` with `AES_256_GCM`) rather than `aes-gcm` 0.11.
//! ring runs BoringSSL's assembly (AES-NI/VAES with stitched CLMUL GHASH), which is the same code
//! family OpenSSL's figure comes from, so it can meet the throughput target; it is already in the
//! workspace for HKDF/HMAC/Ed25519 and provides the CSPRNG; and its in-place seal/open with a
//! separate tag fits the chunk buffer without copies. `aes-gcm` would add the RustCrypto stack
//! and its aead 0.6 API churn for a slower GHASH.
//!
//! Out of scope here: plaintext in swap or core dumps (use encrypted swap / `MADV_DONTDUMP` at the
//! service level), and hiding file sizes (the size of a file reveals the size of its plaintext).

mod error;
pub mod format;
mod kek;
mod rotate;
mod stream;

pub use error::{AtRestError, KekError};
pub use format::MAX_CHUNK_SIZE;
pub use kek::{
    DataKey, KEY_LEN, KeyEncryptionKey, LocalKek, read_secret_file, read_secret_file_outside,
};
pub use rotate::{RotateOutcome, RotationReport, rotate_dir, rotate_file};
pub use stream::{
    DEFAULT_CHUNK_SIZE, EncryptOptions, EncryptedReader, EncryptedWriter, TEMP_PREFIX,
    decrypt_to_vec, decrypt_to_writer, encrypt_bytes, encrypt_file, encrypt_reader,
};
