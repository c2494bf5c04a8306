//! The on-disk layout (format version 1). All integers are big-endian.
//!
//! ```text
//! offset   size  field
//! 0        8     magic  89 54 55 54 41 52 0D 0A  ("\x89TUTAR\r\n": the high byte and CR LF
//!                       catch 7-bit and newline-mangling transfers, as PNG's magic does)
//! 8        2     format version = 1
//! 10       2     algorithm = 1 (AES-256-GCM, 96-bit nonce, 128-bit tag)
//! 12       4     chunk size C: plaintext bytes per chunk, 1 ..= 16 MiB
//! 16       16    file id: random, unique per file
//! ---- the 32 bytes above are the "fixed header": the AAD of every chunk, and part of the
//!      context the data key is wrapped under. Rotation never changes them.
//! 32       1     k = length of the KEK id (1 ..= 255)
//! 33       k     KEK id, UTF-8
//! 33+k     2     w = length of the wrapped data key (1 ..= 1024)
//! 35+k     w     wrapped data key = KEK.wrap(data key, context = fixed header || k || KEK id)
//! 35+k+w   ...   chunks
//! ```
//!
//! Chunk i (counting from 0) is `AES-256-GCM(data key, nonce_i, aad = fixed header, plaintext_i)`
//! stored as `ciphertext || tag (16)`. Every chunk but the last holds exactly C plaintext bytes;
//! the last holds 0 ..= C bytes (0 only for an empty file, which is a single empty final chunk).
//! `nonce_i = i as u64 (8 bytes) || 00 00 00 || final flag (00 or 01)`.
//!
//! Why this is enough:
//! - the index in the nonce stops reordering; the final flag stops truncation at a chunk
//!   boundary (the new last chunk was sealed as non-final) and extension (the old last chunk was
//!   sealed as final and no longer is); a partial chunk fails its tag;
//! - the fixed header as AAD binds every chunk to this file's parameters and id; the KEK id and
//!   wrapped key are authenticated by the wrap itself (their context includes the fixed header),
//!   which is what lets rotation re-wrap the key without touching a single chunk;
//! - a header taken from another file carries another data key, so chunk 0 fails;
//! - nonces are deterministic but never repeat under a key: each file has a fresh random data
//!   key, and within a file each (index, final) pair is used once.

use std::io::{self, Read};
use std::path::Path;

use super::error::AtRestError;
use super::kek::{DataKey, KeyEncryptionKey};

pub(crate) const MAGIC: [u8; 8] = *b"\x89TUTAR\r\n";
pub(crate) const VERSION: u16 = 1;
pub(crate) const ALG_AES_256_GCM: u16 = 1;
pub(crate) const FIXED_LEN: usize = 32;
pub(crate) const FILE_ID_LEN: usize = 16;
pub(crate) const TAG_LEN: usize = 16;
/// Largest chunk size accepted, written or read: it bounds the memory a reader allocates for a
/// file it has not yet authenticated.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
pub(crate) const MAX_WRAPPED_LEN: usize = 1024;

/// The parsed header of an encrypted file.
pub(crate) struct Header {
    pub fixed: [u8; FIXED_LEN],
    pub chunk_size: u32,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
}

impl Header {
    pub fn new_fixed(chunk_size: u32, file_id: &[u8; FILE_ID_LEN]) -> [u8; FIXED_LEN] {
        let mut fixed = [0u8; FIXED_LEN];
        fixed[0..8].copy_from_slice(&MAGIC);
        fixed[8..10].copy_from_slice(&VERSION.to_be_bytes());
        fixed[10..12].copy_from_slice(&ALG_AES_256_GCM.to_be_bytes());
        fixed[12..16].copy_from_slice(&chunk_size.to_be_bytes());
        fixed[16..32].copy_from_slice(file_id);
        fixed
    }

    /// Wraps `key` under `kek` for a file with this fixed header.
    pub fn wrap(
        path: &Path,
        fixed: [u8; FIXED_LEN],
        chunk_size: u32,
        key: &DataKey,
        kek: &dyn KeyEncryptionKey,
    ) -> Result<Self, AtRestError> {
        let kek_id = kek.id().to_owned();
        if kek_id.is_empty() || kek_id.len() > 255 {
            return Err(AtRestError::HeaderCorrupt {
                path: path.to_owned(),
                reason: format!("KEK id {kek_id:?} must be 1 to 255 bytes long"),
            });
        }
        let wrapped = kek
            .wrap(key, &wrap_context(&fixed, &kek_id))
            .map_err(|source| AtRestError::Kek {
                path: path.to_owned(),
                kek: kek_id.clone(),
                source,
            })?;
        if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED_LEN {
            return Err(AtRestError::HeaderCorrupt {
                path: path.to_owned(),
                reason: format!(
                    "KEK {kek_id} produced a wrapped key of {} bytes; 1 to {MAX_WRAPPED_LEN} fit \
                     the format",
                    wrapped.len()
                ),
            });
        }
        Ok(Self {
            fixed,
            chunk_size,
            kek_id,
            wrapped,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + 3 + self.kek_id.len() + self.wrapped.len());
        out.extend_from_slice(&self.fixed);
        // Lengths were range-checked when the header was built or parsed.
        out.push(self.kek_id.len() as u8);
        out.extend_from_slice(self.kek_id.as_bytes());
        out.extend_from_slice(&(self.wrapped.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.wrapped);
        out
    }

    /// Reads and checks the header's structure (not yet its authenticity: that needs the KEK).
    pub fn read(r: &mut impl Read, path: &Path) -> Result<Self, AtRestError> {
        let mut fixed = [0u8; FIXED_LEN];
        read_exact_or(r, &mut fixed, path, "the fixed header")?;
        if fixed[0..8] != MAGIC {
            return Err(AtRestError::NotEncrypted {
                path: path.to_owned(),
            });
        }
        let version = u16::from_be_bytes([fixed[8], fixed[9]]);
        if version != VERSION {
            return Err(AtRestError::UnsupportedVersion {
                path: path.to_owned(),
                version,
            });
        }
        let algorithm = u16::from_be_bytes([fixed[10], fixed[11]]);
        if algorithm != ALG_AES_256_GCM {
            return Err(AtRestError::UnsupportedAlgorithm {
                path: path.to_owned(),
                algorithm,
            });
        }
        let chunk_size = u32::from_be_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(AtRestError::HeaderCorrupt {
                path: path.to_owned(),
                reason: format!("chunk size {chunk_size} outside 1 ..= {MAX_CHUNK_SIZE}"),
            });
        }
        let mut k = [0u8; 1];
        read_exact_or(r, &mut k, path, "the KEK id length")?;
        if k[0] == 0 {
            return Err(AtRestError::HeaderCorrupt {
                path: path.to_owned(),
                reason: "empty KEK id".into(),
            });
        }
        let mut id = vec![0u8; usize::from(k[0])];
        read_exact_or(r, &mut id, path, "the KEK id")?;
        let kek_id = String::from_utf8(id).map_err(|_| AtRestError::HeaderCorrupt {
            path: path.to_owned(),
            reason: "KEK id is not UTF-8".into(),
        })?;
        let mut w = [0u8; 2];
        read_exact_or(r, &mut w, path, "the wrapped key length")?;
        let w = usize::from(u16::from_be_bytes(w));
        if w == 0 || w > MAX_WRAPPED_LEN {
            return Err(AtRestError::HeaderCorrupt {
                path: path.to_owned(),
                reason: format!("wrapped key length {w} outside 1 ..= {MAX_WRAPPED_LEN}"),
            });
        }
        let mut wrapped = vec![0u8; w];
        read_exact_or(r, &mut wrapped, path, "the wrapped key")?;
        Ok(Self {
            fixed,
            chunk_size,
            kek_id,
            wrapped,
        })
    }

    /// Unwraps the data key, telling "this file is under another KEK" apart from "the header
    /// does not authenticate under the KEK it names".
    pub fn unwrap_key(
        &self,
        path: &Path,
        kek: &dyn KeyEncryptionKey,
    ) -> Result<DataKey, AtRestError> {
        if self.kek_id != kek.id() {
            return Err(AtRestError::WrongKek {
                path: path.to_owned(),
                file_kek: self.kek_id.clone(),
                offered: kek.id().to_owned(),
            });
        }
        kek.unwrap(&self.wrapped, &wrap_context(&self.fixed, &self.kek_id))
            .map_err(|e| match e {
                super::error::KekError::Unwrap => AtRestError::HeaderAuthentication {
                    path: path.to_owned(),
                    kek: self.kek_id.clone(),
                },
                source => AtRestError::Kek {
                    path: path.to_owned(),
                    kek: self.kek_id.clone(),
                    source,
                },
            })
    }
}

/// The context a data key is wrapped under: binds it to this file's fixed header and to the
/// KEK id written next to it.
fn wrap_context(fixed: &[u8; FIXED_LEN], kek_id: &str) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(FIXED_LEN + 1 + kek_id.len());
    ctx.extend_from_slice(fixed);
    ctx.push(kek_id.len() as u8);
    ctx.extend_from_slice(kek_id.as_bytes());
    ctx
}

/// The nonce of chunk `index`; see the module documentation.
pub(crate) fn chunk_nonce(index: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    n
}

fn read_exact_or(
    r: &mut impl Read,
    buf: &mut [u8],
    path: &Path,
    what: &str,
) -> Result<(), AtRestError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            AtRestError::Truncated {
                path: path.to_owned(),
                reason: format!("the file ends inside {what}"),
            }
        } else {
            AtRestError::io(path, "reading header", e)
        }
    })
}
