//! A dataset read by a SQL query against the site's PostgreSQL.
//!
//! The query runs in a read-only transaction on a session whose default is read-only as well
//! (`default_transaction_read_only`), so a query that would write is refused by the server. The
//! session's role must not be able to write either ([`check_role`]): a superuser, a role that may
//! write server files or run server programs (which a read-only transaction does not stop), and
//! a role that may change any table of the database are refused before the query runs; so is a
//! statement that returns no columns (`COPY ... TO`, `TRUNCATE`): the node reads rows only. The URL
//! and the query are in node.toml, the password never is: it comes from an environment variable
//! or a file (`password_env`, `password_file`), and a URL with a password in it is refused when
//! the config is read. Errors name the dataset (`postgres:<name>`), never the URL.
//!
//! Columns become cells by their SQL type: text types as text, integers and floats as numbers
//! (`real` as its shortest decimal, [`super::f32_as_decimal`]), `numeric` as its decimal text (as
//! a Parquet decimal is, and as a CSV export writes it), `boolean`, `date`; NULL is a missing
//! cell. Other types are refused, naming the column and its type (cast them in the query), and so
//! are the dates `infinity` and `-infinity` and a text longer than CSV's field limit
//! ([`MAX_FIELD_BYTES`]), naming line and column (never a value).
//!
//! Rows are streamed from the server and decoded one at a time; a query that returns more than
//! `max_rows` rows is refused (the rows become one table in memory).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use futures::TryStreamExt;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow, PgValueFormat};
use sqlx::{Column, Connection, Executor, Row, SqlSafeStr, Statement, TypeInfo, ValueRef};
use tutela_privacy::anonymize::Date;
use tutela_privacy::anonymize::bounded::MAX_FIELD_BYTES;

use super::{CellsSource, f32_as_decimal, postgres_origin};
use crate::data::{DataError, OwnedCell};

/// `[datasets.<name>.postgres]` in node.toml.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://USER@HOST:PORT/DATABASE` (any libpq URL parameter but the password).
    pub url: String,
    /// The query whose rows are the dataset; its column names are the header.
    pub query: String,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the password (one line; a trailing newline is ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How long connecting and the query may take, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// The most rows the query may return; more is refused (the dataset is held in memory).
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
}

fn default_timeout_secs() -> u64 {
    300
}

fn default_max_rows() -> u64 {
    10_000_000
}

impl PostgresConfig {
    /// What serde cannot check: `(key, problem)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let Some(rest) = self
            .url
            .strip_prefix("postgres://")
            .or_else(|| self.url.strip_prefix("postgresql://"))
        else {
            return Err(("url", "must start with postgres:// or postgresql://".into()));
        };
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((user_info, _)) = authority.rsplit_once('@')
            && user_info.contains(':')
        {
            return Err((
                "url",
                "has a password in it: put the password in password_env or password_file, never in the config".into(),
            ));
        }
        if rest
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|p| p.starts_with("password=")))
        {
            return Err((
                "url",
                "has a password parameter: use password_env or password_file".into(),
            ));
        }
        PgConnectOptions::from_str(&self.url).map_err(|e| ("url", e.to_string()))?;
        if self.query.trim().is_empty() {
            return Err(("query", "must not be empty".into()));
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            return Err((
                "password_env",
                "give password_env or password_file, not both".into(),
            ));
        }
        if self.max_rows == 0 {
            return Err(("max_rows", "must be at least 1".into()));
        }
        if !(1..=86_400).contains(&self.timeout_secs) {
            return Err((
                "timeout_secs",
                format!("must be 1..=86400, found {}", self.timeout_secs),
            ));
        }
        Ok(())
    }

    fn password(&self, origin: &str) -> Result<Option<String>, DataError> {
        let error = |reason: String| DataError::Source {
            origin: origin.to_string(),
            reason,
        };
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(Some).map_err(|_| {
                error(format!(
                    "password_env: the environment variable {var} is not set"
                ))
            });
        }
        if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| error(format!("password_file {}: {e}", file.display())))?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
        }
        Ok(None)
    }
}

/// Runs the query and returns its rows as a source. Blocking: it runs on its own thread with its
/// own runtime, so it may be called from inside or outside an async context.
pub fn fetch(dataset: &str, config: &PostgresConfig) -> Result<CellsSource, DataError> {
    let origin = postgres_origin(dataset);
    let name = origin.display().to_string();
    let error = |reason: String| DataError::Source {
        origin: name.clone(),
        reason,
    };
    let mut options = PgConnectOptions::from_str(&config.url)
        .map_err(|e| error(format!("url: {e}")))?
        .options([("default_transaction_read_only", "on")]);
    if let Some(password) = config.password(&name)? {
        options = options.password(&password);
    }
    let timeout = Duration::from_secs(config.timeout_secs);
    let query = config.query.clone();
    let (header, rows) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| error(format!("cannot start a runtime: {e}")))?;
                runtime.block_on(async {
                    tokio::time::timeout(timeout, run_query(&options, &query, config.max_rows))
                        .await
                        .map_err(|_| {
                            error(format!(
                                "no answer within {} s (timeout_secs)",
                                timeout.as_secs()
                            ))
                        })?
                        .map_err(error)
                })
            })
            .join()
            .map_err(|_| error("the query's thread panicked".into()))?
    })?;
    Ok(CellsSource::new(origin, header, rows))
}

async fn run_query(
    options: &PgConnectOptions,
    query: &str,
    max_rows: u64,
) -> Result<(Vec<String>, Vec<Vec<OwnedCell>>), String> {
    let mut connection = PgConnection::connect_with(options)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut transaction = connection
        .begin_with("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(|e| format!("cannot begin a read-only transaction: {e}"))?;
    check_role(&mut transaction).await?;
    // Prepared first so that the header is known even when the query returns no row.
    // The query is the site's own, from its node.toml (no one else's text is in it).
    let statement = (&mut *transaction)
        .prepare(sqlx::AssertSqlSafe(query.to_string()).into_sql_str())
        .await
        .map_err(|e| format!("the query: {e}"))?;
    // A statement without a result (`COPY ... TO 'file'`, `TRUNCATE`, `CALL`) is no dataset: it
    // is refused before it runs.
    if statement.columns().is_empty() {
        return Err(
            "the query returns no columns: it must be a SELECT (or VALUES, TABLE) whose rows are \
             the dataset; it was not run"
                .into(),
        );
    }
    let header: Vec<String> = statement
        .columns()
        .iter()
        .map(|c| c.name().trim().to_string())
        .collect();
    // Streamed: each row is decoded as it arrives, so the server's rows and their cells are not
    // both held at once, and a query past `max_rows` stops there.
    let mut rows = Vec::new();
    {
        let mut stream = statement.query().fetch(&mut *transaction);
        while let Some(row) = stream
            .try_next()
            .await
            .map_err(|e| format!("the query: {e}"))?
        {
            if rows.len() as u64 >= max_rows {
                return Err(format!(
                    "the query returns more than {max_rows} rows (max_rows); raise max_rows or narrow the query"
                ));
            }
            // The header is line 1.
            let line = rows.len() as u64 + 2;
            let cells = (0..row.len())
                .map(|i| cell(&row, i).map_err(|reason| format!("line {line}, {reason}")))
                .collect::<Result<Vec<_>, _>>()?;
            rows.push(cells);
        }
    }
    let _ = transaction.rollback().await;
    Ok((header, rows))
}

/// Refuses a session role that could write, although the transaction is read-only: a superuser
/// or a member of `pg_write_server_files` / `pg_execute_server_program` writes files or runs
/// programs on the server from a read-only transaction (`COPY ... TO 'file'`, `TO PROGRAM`,
/// `lo_export`), and a role that may change a table is one `dblink` (a second session, not
/// read-only) away from doing so. The role and the table are named (local: the error stays at
/// the site).
async fn check_role(connection: &mut PgConnection) -> Result<(), String> {
    let row = sqlx::query(
        "SELECT current_user::text, r.rolsuper, \
         pg_has_role(current_user, 'pg_write_server_files', 'USAGE'), \
         pg_has_role(current_user, 'pg_execute_server_program', 'USAGE') \
         FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(&mut *connection)
    .await
    .map_err(|e| format!("cannot read the session role's privileges: {e}"))?;
    let field = |e: sqlx::Error| format!("cannot read the session role's privileges: {e}");
    let role: String = row.try_get(0).map_err(field)?;
    let superuser: bool = row.try_get(1).map_err(field)?;
    let server_files: bool = row.try_get(2).map_err(field)?;
    let server_programs: bool = row.try_get(3).map_err(field)?;
    let refuse = |what: &str| {
        format!(
            "the role {role:?} {what}: give the node a role that may only SELECT what the query \
             reads (the query runs read-only, but this role could write through it); nothing was \
             read"
        )
    };
    if superuser {
        return Err(refuse("is a superuser"));
    }
    if server_files || server_programs {
        return Err(refuse(
            "may write server files or run server programs (pg_write_server_files or \
             pg_execute_server_program)",
        ));
    }
    let writable: Option<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'f') \
         AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
         AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') \
         ORDER BY 1 LIMIT 1",
    )
    .fetch_optional(&mut *connection)
    .await
    .map_err(|e| format!("cannot read the session role's privileges: {e}"))?;
    match writable {
        Some(table) => Err(refuse(&format!("may change table {table}"))),
        None => Ok(()),
    }
}

/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;

fn cell(row: &PgRow, i: usize) -> Result<OwnedCell, String> {
    let column = row.column(i);
    let type_name = column.type_info().name().to_string();
    let unreadable = |e: sqlx::Error| format!("column {:?} ({type_name}): {e}", column.name());
    let value = row.try_get_raw(i).map_err(unreadable)?;
    if value.is_null() {
        return Ok(OwnedCell::Missing);
    }
    Ok(match type_name.as_str() {
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" => {
            let text = row.try_get::<&str, _>(i).map_err(unreadable)?.trim();
            if text.len() > MAX_FIELD_BYTES {
                return Err(format!(
                    "column {:?}: a field is longer than the limit of {MAX_FIELD_BYTES} bytes",
                    column.name()
                ));
            }
            OwnedCell::Text(text.to_string())
        }
        "INT2" => OwnedCell::Number(row.try_get::<i16, _>(i).map_err(unreadable)?.into()),
        "INT4" => OwnedCell::Number(row.try_get::<i32, _>(i).map_err(unreadable)?.into()),
        "INT8" => OwnedCell::Number(row.try_get::<i64, _>(i).map_err(unreadable)? as f64),
        "FLOAT4" => OwnedCell::Number(f32_as_decimal(
            row.try_get::<f32, _>(i).map_err(unreadable)?,
        )),
        "FLOAT8" => OwnedCell::Number(row.try_get::<f64, _>(i).map_err(unreadable)?),
        "BOOL" => OwnedCell::Bool(row.try_get::<bool, _>(i).map_err(unreadable)?),
        "DATE" | "NUMERIC" => {
            let bytes = value
                .as_bytes()
                .map_err(|e| format!("column {:?} ({type_name}): {e}", column.name()))?;
            let binary = value.format() == PgValueFormat::Binary;
            let infinite = || {
                format!(
                    "column {:?} (DATE): an infinite date (infinity or -infinity), which is no day; correct the value or map it in the query",
                    column.name()
                )
            };
            let decoded = match (type_name.as_str(), binary) {
                ("DATE", true) => match <[u8; 4]>::try_from(bytes).map(i32::from_be_bytes) {
                    // PostgreSQL's infinity and -infinity.
                    Ok(i32::MAX | i32::MIN) => return Err(infinite()),
                    Ok(days) => days
                        .checked_add(PG_EPOCH_DAYS)
                        .map(|d| OwnedCell::Date(Date(d))),
                    Err(_) => None,
                },
                ("DATE", false) => match std::str::from_utf8(bytes) {
                    Ok("infinity" | "-infinity") => return Err(infinite()),
                    Ok(text) => Date::parse_iso(text).map(OwnedCell::Date),
                    Err(_) => None,
                },
                (_, true) => numeric_text(bytes).map(OwnedCell::Text),
                (_, false) => std::str::from_utf8(bytes)
                    .ok()
                    .map(|t| OwnedCell::Text(t.to_string())),
            };
            decoded.ok_or_else(|| {
                format!(
                    "column {:?} ({type_name}): a value the node cannot decode",
                    column.name()
                )
            })?
        }
        other => {
            return Err(format!(
                "column {:?} has the SQL type {other}, which the node does not read; cast it in the query (to text, float8, boolean or date)",
                column.name()
            ));
        }
    })
}

/// A binary `numeric` as its decimal text (`NaN` and infinities as their names, which the
/// numeric encoding then refuses): base-10000 digits with a weight, a sign and a display scale.
fn numeric_text(bytes: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u16> {
        Some(u16::from_be_bytes([
            *bytes.get(2 * i)?,
            *bytes.get(2 * i + 1)?,
        ]))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => {}
    }
    let digits: Vec<u16> = (0..ndigits).map(|i| word(4 + i)).collect::<Option<_>>()?;
    let group = |position: i32| -> u16 {
        usize::try_from(weight - position)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    // Integer part: groups from `weight` down to 0.
    if weight < 0 {
        text.push('0');
    } else {
        for position in (0..=weight).rev() {
            let g = group(position);
            if position == weight {
                text.push_str(&g.to_string());
            } else {
                text.push_str(&format!("{g:04}"));
            }
        }
    }
    if dscale > 0 {
        text.push('.');
        let mut fraction = String::new();
        let mut position = -1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", group(position)));
            position -= 1;
        }
        fraction.truncate(dscale);
        text.push_str(&fraction);
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale].iter().chain(digits) {
            b.extend_from_slice(&w.to_be_bytes());
        }
        b
    }

    #[test]
    fn binary_numeric_as_its_decimal_text() {
        // 12345.678 = groups 1, 2345, 6780 with weight 1
        assert_eq!(
            numeric_text(&numeric(3, 1, 0, 3, &[1, 2345, 6780])).as_deref(),
            Some("12345.678")
        );
        // -0.05 = group 500 at weight -1
        assert_eq!(
            numeric_text(&numeric(1, -1, 0x4000, 2, &[500])).as_deref(),
            Some("-0.05")
        );
        assert_eq!(
            numeric_text(&numeric(0, 0, 0, 0, &[])).as_deref(),
            Some("0")
        );
        assert_eq!(
            numeric_text(&numeric(1, 1, 0, 0, &[7])).as_deref(),
            Some("70000")
        );
    }

    #[test]
    fn a_password_in_the_url_is_refused() {
        let config = |url: &str| PostgresConfig {
            url: url.into(),
            query: "select 1".into(),
            password_env: None,
            password_file: None,
            timeout_secs: 10,
            max_rows: 100,
        };
        assert!(config("postgres://reader@db:5432/clinic").check().is_ok());
        let (key, why) = config("postgres://reader:secret@db/clinic")
            .check()
            .unwrap_err();
        assert_eq!(key, "url");
        assert!(why.contains("password") && !why.contains("secret"), "{why}");
        assert!(config("postgres://db/clinic?password=x").check().is_err());
        assert!(config("mysql://db/clinic").check().is_err());
    }
}
