//! Paths inside configuration files, resolved in one way for every config (audit.toml,
//! coordinator.toml, node.toml, policy files): a relative path starts at the directory of the
//! file that names it, never at the working directory the binary happens to run in; a file that
//! must exist is checked when the config is read, and the error names the config file, the key,
//! the value as written and where it resolved to.

use std::path::{Path, PathBuf};

/// A path a config names that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key} = {:?}: {problem} (resolved to {})", .file.display(), .written.display(), .resolved.display())]
pub struct ConfigPathError {
    /// The config file, as it was given.
    pub file: PathBuf,
    /// The key, with its table: `tls.ca`.
    pub key: String,
    /// The value as written in the file.
    pub written: PathBuf,
    /// Where it points, absolute where the working directory is known.
    pub resolved: PathBuf,
    /// `no such file`, `permission denied`, `is a directory, not a file`...
    pub problem: String,
}

/// The config file a set of paths is read from.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    file: PathBuf,
    base: PathBuf,
}

impl ConfigFile {
    /// `file` as given on the command line; its directory is where relative paths start.
    pub fn new(file: impl AsRef<Path>) -> ConfigFile {
        let file = file.as_ref().to_path_buf();
        let base = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        ConfigFile { file, base }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// `path` resolved against the file's directory and made absolute (so that what is
    /// printed later, such as a model's path, is usable from any directory).
    pub fn resolve(&self, path: &mut PathBuf) {
        if path.is_relative() {
            *path = absolute(&self.base.join(&*path));
        }
    }

    /// Resolves `path` (the value of `key`) and checks that it is a readable file.
    pub fn existing_file(&self, key: &str, path: &mut PathBuf) -> Result<(), ConfigPathError> {
        let written = path.clone();
        self.resolve(path);
        let problem = match std::fs::metadata(&*path) {
            Ok(m) if m.is_file() => match std::fs::File::open(&*path) {
                Ok(_) => return Ok(()),
                Err(e) => io_problem(&e),
            },
            Ok(_) => "is a directory, not a file".to_string(),
            Err(e) => io_problem(&e),
        };
        Err(ConfigPathError {
            file: self.file.clone(),
            key: key.to_string(),
            written,
            resolved: absolute(path),
            problem,
        })
    }

    /// Resolves and checks the four files of a `[tls]` table (`crl` when set).
    pub fn tls_files(
        &self,
        table: &str,
        tls: &mut crate::tls::TlsFiles,
    ) -> Result<(), ConfigPathError> {
        self.existing_file(&format!("{table}.ca"), &mut tls.ca)?;
        self.existing_file(&format!("{table}.cert"), &mut tls.cert)?;
        self.existing_file(&format!("{table}.key"), &mut tls.key)?;
        if let Some(crl) = &mut tls.crl {
            self.existing_file(&format!("{table}.crl"), crl)?;
        }
        Ok(())
    }
}

fn io_problem(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// `path` made absolute against the working directory (as it is, when that is unknown).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_start_at_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/certs")).unwrap();
        std::fs::write(dir.path().join("etc/certs/ca.crt"), "x").unwrap();
        let config = ConfigFile::new(dir.path().join("etc/audit.toml"));
        let mut p = PathBuf::from("certs/ca.crt");
        config.existing_file("tls.ca", &mut p).unwrap();
        assert_eq!(p, dir.path().join("etc/certs/ca.crt"));
        let mut abs = dir.path().join("etc/certs/ca.crt");
        config.existing_file("tls.ca", &mut abs).unwrap();
        assert_eq!(abs, dir.path().join("etc/certs/ca.crt"));
    }

    #[test]
    fn a_missing_file_names_the_config_the_key_the_value_and_where_it_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let config = ConfigFile::new(dir.path().join("audit.toml"));
        let mut p = PathBuf::from("../certs/audit/ca.crt");
        let err = config.existing_file("tls.ca", &mut p).unwrap_err();
        let text = err.to_string();
        let expect = format!(
            "{}: tls.ca = \"../certs/audit/ca.crt\": no such file (resolved to {})",
            dir.path().join("audit.toml").display(),
            dir.path().join("../certs/audit/ca.crt").display()
        );
        assert_eq!(text, expect);
        let mut d = PathBuf::from(".");
        let err = config.existing_file("tls.cert", &mut d).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }
}
