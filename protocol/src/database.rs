//! Database URLs, shared by the coordinator's job store and the audit service's event store: which
//! backend a URL names, the SQLite URL of a file path, and a URL safe to print.
//!
//! The URL handling is pure string work; with the `database-pool` feature, [`open_pool`] opens the
//! connection pool both stores use, with the SQLite settings they share.

use std::path::Path;

/// Which database a store is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL names: `sqlite:...`, or `postgres://` / `postgresql://`.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// `sqlite://PATH?mode=rwc` for a file path, with the characters SQLite's URL parser would
/// misread (`%`, `?`, `#`) percent-encoded; `None` for a path that is not valid UTF-8.
pub fn sqlite_url(path: &Path) -> Option<String> {
    let s = path.to_str()?;
    let mut enc = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => enc.push_str("%25"),
            '?' => enc.push_str("%3F"),
            '#' => enc.push_str("%23"),
            c => enc.push(c),
        }
    }
    Some(format!("sqlite://{enc}?mode=rwc"))
}

/// The URL for messages and logs, with a PostgreSQL password and query string left out.
pub fn redact_url(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return url.to_string();
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL we know; its shape is unknown, so show only its scheme-ish prefix.
        return url.chars().take_while(|c| *c != ':').collect::<String>() + ":…";
    };
    let (rest, had_query) = match rest.split_once('?') {
        Some((r, _)) => (r, true),
        None => (rest, false),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{user}:***@{host}")
            } else {
                format!("{user}@{host}")
            }
        }
        None => authority.to_string(),
    };
    format!(
        "{scheme}://{authority}{path}{}",
        if had_query { "?…" } else { "" }
    )
}

/// Why a config's database URL cannot be used. Never shows the URL itself: it may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("database_url and database_url_file are both set: keep one")]
    Both,
    #[error("database_url_file = {path:?}: {why}")]
    File {
        path: std::path::PathBuf,
        why: String,
    },
}

/// The URL a config names, written in the file (`database_url`) or kept in a file of its own
/// (`database_url_file`: a Kubernetes Secret mounted read-only, a file of mode 0600), so that a
/// password never sits in a config map or a process's environment. The file holds the URL alone;
/// surrounding whitespace (a final newline) is ignored. `None` when neither is set (the store's
/// SQLite default).
pub fn url_from_config(
    url: Option<&str>,
    url_file: Option<&Path>,
) -> Result<Option<String>, DatabaseUrlError> {
    match (url, url_file) {
        (Some(_), Some(_)) => Err(DatabaseUrlError::Both),
        (Some(u), None) => Ok(Some(u.to_string())),
        (None, None) => Ok(None),
        (None, Some(path)) => {
            let bad = |why: String| DatabaseUrlError::File {
                path: path.to_path_buf(),
                why,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let u = text.trim();
            if u.is_empty() {
                return Err(bad("the file is empty".to_string()));
            }
            // Nothing of the contents in the message: a password pasted alone would be shown.
            if Backend::of_url(u).is_none() {
                return Err(bad(
                    "the file does not hold a sqlite: or postgres:// URL".to_string()
                ));
            }
            Ok(Some(u.to_string()))
        }
    }
}

/// Opens an sqlx `Any` pool on `url` (whose backend is `backend`) for the store `store` (a name for
/// the log): at most `max_postgres` connections on PostgreSQL and 4 on SQLite (whose writers are
/// serialised by its lock anyway), a 30 s acquire timeout. On SQLite every new connection gets WAL
/// journaling (warned about when the database refuses it, e.g. in memory: durability is then the
/// rollback journal's, still crash-safe, but readers block writers), `synchronous = FULL` (a
/// committed row survives power loss, not only a crash), then `sqlite_pragmas`. The Any driver
/// takes SQLite's options from the URL only, which has no key for these, hence per connection.
#[cfg(feature = "database-pool")]
pub async fn open_pool(
    url: &str,
    backend: Backend,
    max_postgres: u32,
    store: &'static str,
    sqlite_pragmas: &'static [&'static str],
) -> Result<sqlx::AnyPool, sqlx::Error> {
    // Idempotent (a `Once` inside); it panics only if other code installed a different driver
    // set first, which nothing in Tutela does.
    sqlx::any::install_default_drivers();
    let mut options = sqlx::any::AnyPoolOptions::new()
        .max_connections(match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => max_postgres,
        })
        .acquire_timeout(std::time::Duration::from_secs(30));
    if backend == Backend::Sqlite {
        options = options.after_connect(move |conn, _meta| {
            Box::pin(async move {
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
                    .fetch_one(&mut *conn)
                    .await?;
                if !mode.eq_ignore_ascii_case("wal") {
                    tracing::warn!(journal_mode = %mode, "SQLite {store} is not in WAL mode");
                }
                sqlx::query("PRAGMA synchronous = FULL")
                    .execute(&mut *conn)
                    .await?;
                for pragma in sqlite_pragmas {
                    sqlx::query(*pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        });
    }
    options.connect(url).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_url_file_is_read_trimmed_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("database-url");
        std::fs::write(&f, "postgres://tutela:s3cret@db:5432/tutela\n").unwrap();
        assert_eq!(
            url_from_config(None, Some(&f)).unwrap().as_deref(),
            Some("postgres://tutela:s3cret@db:5432/tutela")
        );
        assert_eq!(
            url_from_config(Some("sqlite://x.db"), None)
                .unwrap()
                .as_deref(),
            Some("sqlite://x.db")
        );
        assert_eq!(url_from_config(None, None).unwrap(), None);
        assert_eq!(
            url_from_config(Some("sqlite://x.db"), Some(&f)).unwrap_err(),
            DatabaseUrlError::Both
        );

        std::fs::write(&f, "  \n").unwrap();
        let err = url_from_config(None, Some(&f)).unwrap_err().to_string();
        assert!(
            err.contains("empty") && err.contains("database-url"),
            "{err}"
        );
        // Not a URL of ours (another database's, a password pasted alone): refused without
        // showing any of it.
        for text in ["mysql://u:s3cret@h/db", "s3cret"] {
            std::fs::write(&f, text).unwrap();
            let err = url_from_config(None, Some(&f)).unwrap_err().to_string();
            assert!(
                !err.contains("s3cret") && err.contains("postgres://"),
                "{err}"
            );
        }
        let err = url_from_config(None, Some(&dir.path().join("absent")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent"), "{err}");
    }

    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://tutela:s3cret@db:5432/coord?sslmode=require"),
            "postgres://tutela:***@db:5432/coord?…"
        );
        assert_eq!(redact_url("postgres://db/coord"), "postgres://db/coord");
        assert_eq!(
            redact_url("sqlite:///var/lib/x.db?mode=rwc"),
            "sqlite:///var/lib/x.db?mode=rwc"
        );
    }

    #[test]
    fn sqlite_url_escapes_what_sqlite_decodes() {
        assert_eq!(
            sqlite_url(Path::new("/tmp/a?b#c%d.db")).as_deref(),
            Some("sqlite:///tmp/a%3Fb%23c%25d.db?mode=rwc")
        );
    }

    #[test]
    fn backends_of_urls() {
        assert_eq!(Backend::of_url("sqlite://x.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("postgresql://h/d"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("mysql://h/d"), None);
    }
}
