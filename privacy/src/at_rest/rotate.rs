//! KEK rotation: re-wrap data keys under a new KEK without re-encrypting any data.
//!
//! Only the header changes (KEK id and wrapped key; the fixed header, and so every chunk's AAD,
//! stays). The new file is written as a temporary file in the same directory (new header, then
//! the chunks copied byte for byte, never decrypted), fsynced, and renamed over the old one.
//!
//! Why not rewrite the header in place? The header's length depends on the KEK id and on the
//! KEK's wrapped-key size (a KMS blob is not 60 bytes), and even with a fixed length an in-place
//! write of the first bytes of a file is not atomic across a crash: a torn header would make the
//! whole file unreadable, which is worse than a slow rotation. Temp + rename is atomic on POSIX
//! file systems. The copy costs I/O only, no crypto, and `std::io::copy` between files uses
//! `copy_file_range` on Linux, which reflink-capable file systems (XFS, btrfs) serve by sharing
//! extents instead of copying.
//!
//! Run rotation while nothing else writes the directory: a file replaced by a writer between the
//! moment rotation reads it and the moment it renames its copy would be reverted to the copy.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::error::AtRestError;
use super::format::{FIXED_LEN, Header, MAGIC};
use super::kek::KeyEncryptionKey;
use super::stream::{TEMP_PREFIX, sync_parent_dir, temp_beside};

/// What [`rotate_file`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The data key was re-wrapped under the new KEK.
    Rotated,
    /// The file was already under the new KEK (its key unwraps under it); nothing written.
    AlreadyCurrent,
}

/// What [`rotate_dir`] did, file by file.
#[derive(Debug, Default)]
pub struct RotationReport {
    /// Files re-wrapped under the new KEK.
    pub rotated: usize,
    /// Files already under the new KEK.
    pub already_current: usize,
    /// Regular files that are not encrypted files (no magic bytes): every file a node writes
    /// should be encrypted, so these deserve a look.
    pub not_encrypted: Vec<PathBuf>,
    /// Files that could not be rotated, with the reason (wrong KEK, tampered header, I/O).
    pub failed: Vec<(PathBuf, AtRestError)>,
}

impl RotationReport {
    /// True when every encrypted file is now under the new KEK.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Re-wraps the data key of `path` from `old` to `new`, atomically.
pub fn rotate_file(
    path: impl AsRef<Path>,
    old: &dyn KeyEncryptionKey,
    new: &dyn KeyEncryptionKey,
) -> Result<RotateOutcome, AtRestError> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(|e| AtRestError::io(path, "opening", e))?;
    let header = Header::read(&mut file, path)?;
    if header.kek_id == new.id() {
        // Verify rather than trust the id: a header naming the new KEK that does not unwrap
        // under it is a problem to report, not a file to count as done.
        header.unwrap_key(path, new)?;
        return Ok(RotateOutcome::AlreadyCurrent);
    }
    let data_key = header.unwrap_key(path, old)?;
    let new_header = Header::wrap(path, header.fixed, header.chunk_size, &data_key, new)?;
    drop(data_key);

    let body_start = (FIXED_LEN + 3 + header.kek_id.len() + header.wrapped.len()) as u64;
    file.seek(SeekFrom::Start(body_start))
        .map_err(|e| AtRestError::io(path, "seeking past header", e))?;

    let mut temp = temp_beside(path)?;
    let perms = file
        .metadata()
        .map_err(|e| AtRestError::io(path, "reading metadata", e))?
        .permissions();
    io::Write::write_all(&mut temp, &new_header.encode())
        .map_err(|e| AtRestError::io(temp.path(), "writing header", e))?;
    io::copy(&mut file, temp.as_file_mut())
        .map_err(|e| AtRestError::io(path, "copying chunks", e))?;
    temp.as_file()
        .set_permissions(perms)
        .map_err(|e| AtRestError::io(temp.path(), "copying permissions", e))?;
    temp.as_file()
        .sync_all()
        .map_err(|e| AtRestError::io(temp.path(), "fsync", e))?;
    temp.persist(path)
        .map_err(|e| AtRestError::io(path, "renaming temporary file over", e.error))?;
    sync_parent_dir(path)?;
    Ok(RotateOutcome::Rotated)
}

/// Rotates every encrypted file under `dir`, recursively, from `old` to `new`.
///
/// Symlinks are not followed (a link could lead out of the data directory) and the writer's
/// temporary files are skipped. A file that fails is recorded in the report and the walk goes
/// on, so that one bad file does not leave the rest under a KEK being retired; an unreadable
/// directory aborts with an error.
pub fn rotate_dir(
    dir: impl AsRef<Path>,
    old: &dyn KeyEncryptionKey,
    new: &dyn KeyEncryptionKey,
) -> Result<RotationReport, AtRestError> {
    let mut report = RotationReport::default();
    let mut stack = vec![dir.as_ref().to_owned()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|e| AtRestError::io(&d, "listing directory", e))?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| AtRestError::io(&d, "listing directory", e))?;
            paths.push(entry);
        }
        paths.sort_by_key(|e| e.file_name());
        for entry in paths {
            let path = entry.path();
            let ft = entry
                .file_type()
                .map_err(|e| AtRestError::io(&path, "reading file type", e))?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            if !ft.is_file() || entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                continue;
            }
            match has_magic(&path) {
                Ok(false) => {
                    report.not_encrypted.push(path);
                    continue;
                }
                Ok(true) => {}
                Err(e) => {
                    report.failed.push((path, e));
                    continue;
                }
            }
            match rotate_file(&path, old, new) {
                Ok(RotateOutcome::Rotated) => report.rotated += 1,
                Ok(RotateOutcome::AlreadyCurrent) => report.already_current += 1,
                Err(e) => report.failed.push((path, e)),
            }
        }
    }
    Ok(report)
}

fn has_magic(path: &Path) -> Result<bool, AtRestError> {
    let mut f = File::open(path).map_err(|e| AtRestError::io(path, "opening", e))?;
    let mut m = [0u8; 8];
    let mut got = 0;
    while got < m.len() {
        match f.read(&mut m[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(AtRestError::io(path, "reading", e)),
        }
    }
    Ok(m == MAGIC)
}
