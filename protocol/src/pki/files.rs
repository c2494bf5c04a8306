//! Writing keys, certificates and CA state without clobbering anything by accident.
//!
//! - A file that does not exist yet is created with `O_CREAT|O_EXCL` (never through a symlink)
//!   and the right mode from the start: `0600` for private keys and CA state.
//! - An existing file is only ever replaced when the caller says so (`--force`), and then
//!   atomically: a temporary file in the same directory, synced, renamed over the old one.
//! - Callers check every target with [`refuse_existing`] before they write the first one, so a
//!   refusal leaves no half-written set of outputs behind.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::PkiError;

/// Who may read a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileMode {
    /// `0600`: private keys.
    Private,
    /// `0644` (less whatever the umask removes): certificates, CSRs, CRLs.
    Public,
}

impl FileMode {
    pub fn bits(self) -> u32 {
        match self {
            FileMode::Private => 0o600,
            FileMode::Public => 0o644,
        }
    }
}

/// Fails, naming the first one, if any of `paths` exists (even as a dangling symlink), unless
/// `force` is set.
pub fn refuse_existing<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    force: bool,
) -> Result<(), PkiError> {
    if force {
        return Ok(());
    }
    for path in paths {
        match fs::symlink_metadata(path) {
            Ok(_) => {
                return Err(PkiError::Exists {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(PkiError::io(path, e)),
        }
    }
    Ok(())
}

/// Whether `path` is a regular file holding exactly `contents`.
pub fn holds(path: &Path, contents: &[u8]) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
        && fs::read(path).is_ok_and(|existing| existing == contents)
}

/// Writes `contents` to `path`: creates it if absent; if it exists, replaces it atomically
/// when `force` is set and fails with [`PkiError::Exists`] otherwise.
pub fn write_file(
    path: &Path,
    contents: &[u8],
    mode: FileMode,
    force: bool,
) -> Result<(), PkiError> {
    if force {
        replace_atomically(path, contents, mode)
    } else {
        write_new(path, contents, mode)
    }
}

/// Creates `path` (which must not exist) with `mode` and writes `contents` to it.
pub fn write_new(path: &Path, contents: &[u8], mode: FileMode) -> Result<(), PkiError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.bits())
        .open(path)
        .map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                PkiError::io(path, e)
            }
        })?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(PkiError::io(path, e));
    }
    sync_dir(path);
    Ok(())
}

/// Replaces (or creates) `path` atomically: a temporary file with `mode` in the same directory,
/// synced, then renamed over `path`. Readers see the old contents or the new, never a mix.
pub fn replace_atomically(path: &Path, contents: &[u8], mode: FileMode) -> Result<(), PkiError> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tutela-")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(mode.bits()))
        .tempfile_in(&dir)
        .map_err(|e| PkiError::io(&dir, e))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| PkiError::io(tmp.path().to_path_buf(), e))?;
    tmp.persist(path).map_err(|e| PkiError::io(path, e.error))?;
    sync_dir(path);
    Ok(())
}

/// Creates `dir` (and its parents) if missing; a directory created here for private material
/// gets mode `0700`.
pub fn ensure_dir(dir: &Path, private: bool) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| PkiError::io(dir, e))?;
    if private {
        fs::set_permissions(dir, Permissions::from_mode(0o700))
            .map_err(|e| PkiError::io(dir, e))?;
    }
    Ok(())
}

/// Creates the directory `path` is to be written in, if missing.
pub fn ensure_parent(path: &Path) -> Result<(), PkiError> {
    ensure_dir(&parent_dir(path), false)
}

/// Reads a text file, naming it in the error.
pub fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|e| PkiError::io(path, e))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes a new directory entry durable; best effort (not every file system supports it).
fn sync_dir(path: &Path) {
    if let Ok(dir) = File::open(parent_dir(path)) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_get_their_mode_and_are_never_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_file(&key, b"secret", FileMode::Private, false).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = write_file(&key, b"other", FileMode::Private, false).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&key).unwrap(), b"secret");
        assert!(refuse_existing([key.as_path()], false).is_err());
        assert!(refuse_existing([key.as_path()], true).is_ok());
        write_file(&key, b"other", FileMode::Private, true).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"other");
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(holds(&key, b"other"));
        assert!(!holds(&key, b"secret"));
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_new(&link, b"x", FileMode::Private).is_err());
        assert!(!target.exists());
        assert!(refuse_existing([link.as_path()], false).is_err());
    }
}
