//! Site data as hospitals have it: a schema with categorical, ordinal, boolean and date columns
//! and missing-value rules; the same table as CSV, Parquet and a PostgreSQL query yields the same
//! encoded features and trains the same model; `data check` lists every planted problem at once,
//! and a dataset that fails it is not offered.
//!
//! The PostgreSQL part runs when `TUTELA_TEST_POSTGRES_URL` is set (`source
//! scripts/test-postgres.sh`; `scripts/test.sh` sets it), in a database of its own.
//!
//! `sources`: the same data from every source; `check`: the data check, the schema's and the
//! config's errors, and the documented examples.

mod check;
mod read_only;
mod sources;
mod spellings;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, BooleanArray, Date32Array, DictionaryArray, Float64Array, Int64Array, RecordBatch,
    StringArray,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tutela_privacy::anonymize::Date;
use tutela_site_node::config::{DatasetConfig, NodeConfig};
use tutela_site_node::data::source::postgres::PostgresConfig;
use tutela_site_node::data::{DataError, DatasetSchema, Table, read_table, source};
use tutela_site_node::data_check::{self, Outcome};
use tutela_site_node::dataset::SiteDataset;
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::train::{OptimizerKind, TrainConfig, train_local};
use tutela_site_node::weights::export_weights;

/// Every feature type and missing-value rule; `ward` refuses unseen categories, `sex` maps them
/// to `(other)`.
const SCHEMA: &str = r#"
name = "clinic"

[label]
column = "outcome"
classes = ["well", "ill"]

[[features.columns]]
name = "age"
type = "numeric"
missing = "impute_with_indicator"
impute = { statistic = "median", value = 61.5 }

[[features.columns]]
name = "sex"
type = "categorical"
categories = ["F", "M", "X"]
unseen = "other"
missing = "impute"
impute = { statistic = "mode", value = "F" }

[[features.columns]]
name = "ward"
type = "categorical"
categories = ["a", "b"]

[[features.columns]]
name = "stage"
type = "ordinal"
levels = ["I", "II", "III"]

[[features.columns]]
name = "smoker"
type = "boolean"
true_values = ["true", "yes"]
false_values = ["false", "no"]

[[features.columns]]
name = "admitted"
type = "date"
format = "%Y-%m-%d"
epoch = "2020-01-01"

[[features.columns]]
name = "hb"
type = "numeric"
missing = "impute"
impute = { statistic = "mean", value = 13.2 }
"#;

const COLUMNS: [&str; 8] = [
    "age", "sex", "ward", "stage", "smoker", "admitted", "hb", "outcome",
];

/// One record of the clinic table, typed as a database would hold it.
#[derive(Clone)]
pub(crate) struct Visit {
    age: Option<i64>,
    sex: Option<&'static str>,
    ward: &'static str,
    stage: &'static str,
    smoker: bool,
    admitted: Date,
    /// One decimal, as text (a `numeric(4,1)` in the database).
    hb: Option<String>,
    outcome: &'static str,
}

/// A site's table; `lacks_x` leaves out the category `X` of `sex` (a site that has none).
pub(crate) fn visits(n: usize, lacks_x: bool) -> Vec<Visit> {
    let epoch = Date::from_ymd(2020, 1, 1).unwrap();
    (0..n)
        .map(|i| {
            let sexes: &[&'static str] = if lacks_x {
                &["F", "M"]
            } else {
                &["F", "M", "X"]
            };
            let stage = ["I", "II", "III"][i % 3];
            let age = 30 + (i * 7) % 50;
            Visit {
                age: (i % 7 != 3).then_some(age as i64),
                sex: (i % 11 != 5).then(|| sexes[i % sexes.len()]),
                ward: ["a", "b"][(i / 2) % 2],
                stage,
                smoker: i % 4 == 0,
                admitted: epoch.add_days(((i * 13) % 400) as i32 - 30),
                hb: (i % 13 != 2).then(|| format!("{:.1}", 10.0 + (i % 9) as f64 * 0.7)),
                outcome: if age > 55 || (stage == "III" && i % 4 == 0) {
                    "ill"
                } else {
                    "well"
                },
            }
        })
        .collect()
}

pub(crate) fn write_csv(path: &Path, rows: &[Visit]) {
    let mut text = COLUMNS.join(",") + "\n";
    for v in rows {
        text.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            v.age.map(|a| a.to_string()).unwrap_or_default(),
            v.sex.unwrap_or(""),
            v.ward,
            v.stage,
            v.smoker,
            v.admitted,
            v.hb.clone().unwrap_or_default(),
            v.outcome
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// Snappy-compressed, `sex` dictionary-encoded (as pandas writes a categorical), dates as Date32.
pub(crate) fn write_parquet(path: &Path, rows: &[Visit]) {
    let column = |a: ArrayRef| a;
    let batch = RecordBatch::try_from_iter([
        (
            "age",
            column(Arc::new(Int64Array::from(
                rows.iter().map(|v| v.age).collect::<Vec<_>>(),
            ))),
        ),
        (
            "sex",
            column(Arc::new(
                rows.iter()
                    .map(|v| v.sex)
                    .collect::<DictionaryArray<Int32Type>>(),
            )),
        ),
        (
            "ward",
            column(Arc::new(StringArray::from(
                rows.iter().map(|v| v.ward).collect::<Vec<_>>(),
            ))),
        ),
        (
            "stage",
            column(Arc::new(StringArray::from(
                rows.iter().map(|v| v.stage).collect::<Vec<_>>(),
            ))),
        ),
        (
            "smoker",
            column(Arc::new(BooleanArray::from(
                rows.iter().map(|v| v.smoker).collect::<Vec<_>>(),
            ))),
        ),
        (
            "admitted",
            column(Arc::new(Date32Array::from(
                rows.iter().map(|v| v.admitted.0).collect::<Vec<_>>(),
            ))),
        ),
        (
            "hb",
            column(Arc::new(Float64Array::from(
                rows.iter()
                    .map(|v| v.hb.as_ref().map(|h| h.parse::<f64>().unwrap()))
                    .collect::<Vec<_>>(),
            ))),
        ),
        (
            "outcome",
            column(Arc::new(StringArray::from(
                rows.iter().map(|v| v.outcome).collect::<Vec<_>>(),
            ))),
        ),
    ])
    .unwrap();
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(16))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn file_config(data: &Path, schema: &Path) -> DatasetConfig {
    DatasetConfig {
        path: data.to_path_buf(),
        schema: schema.to_path_buf(),
        validation_fraction: 0.25,
        split_seed: 7,
        ..DatasetConfig::default()
    }
}

/// A database of the test's own, with a read-only role that may only select the visits.
pub(crate) struct TestDatabase {
    admin_url: String,
    name: String,
    role: String,
}

pub(crate) fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host}/{db}?{q}"),
        None => format!("{host}/{db}"),
    }
}

/// `url` with its user replaced by `user` (no password: it goes in a file).
pub(crate) fn with_user(url: &str, user: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let host_and_path = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{}{user}@{host_and_path}", &url[..scheme_end])
}

pub(crate) async fn execute(url: &str, statements: &[String]) {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"));
    for sql in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let _ = connection.close().await;
}

impl TestDatabase {
    pub(crate) async fn create(admin_url: &str, rows: &[Visit]) -> TestDatabase {
        let mut statements = vec![
            "CREATE TABLE visits (id serial PRIMARY KEY, age int8, sex text, ward varchar(8), \
             stage text, smoker boolean, admitted date, hb numeric(4,1), outcome text)"
                .to_string(),
        ];
        for v in rows {
            let text = |t: Option<&str>| t.map_or("NULL".to_string(), |t| format!("'{t}'"));
            statements.push(format!(
                "INSERT INTO visits (age, sex, ward, stage, smoker, admitted, hb, outcome) \
                 VALUES ({}, {}, '{}', '{}', {}, '{}', {}, '{}')",
                v.age.map_or("NULL".to_string(), |a| a.to_string()),
                text(v.sex),
                v.ward,
                v.stage,
                v.smoker,
                v.admitted,
                v.hb.clone().unwrap_or_else(|| "NULL".into()),
                v.outcome
            ));
        }
        TestDatabase::with_table(admin_url, "visits", &statements).await
    }

    /// A database of its own in which `statements` make `table`, which the reader may select.
    async fn with_table(admin_url: &str, table: &str, statements: &[String]) -> TestDatabase {
        let unique = format!(
            "{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 1_000_000_000
        );
        let db = TestDatabase {
            admin_url: admin_url.to_string(),
            name: format!("site_data_{unique}"),
            role: format!("site_reader_{unique}"),
        };
        execute(
            admin_url,
            &[
                format!("CREATE DATABASE {}", db.name),
                format!("CREATE ROLE {} LOGIN PASSWORD 'reader-secret'", db.role),
            ],
        )
        .await;
        let mut statements = statements.to_vec();
        statements.push(format!("GRANT SELECT ON {table} TO {}", db.role));
        execute(&with_database(admin_url, &db.name), &statements).await;
        db
    }

    pub(crate) fn config(&self, query: &str, password_file: &Path) -> PostgresConfig {
        PostgresConfig {
            url: with_user(&with_database(&self.admin_url, &self.name), &self.role),
            query: query.to_string(),
            password_env: None,
            password_file: Some(password_file.to_path_buf()),
            timeout_secs: 60,
            max_rows: 10_000,
        }
    }

    pub(crate) async fn drop(self) {
        execute(
            &self.admin_url,
            &[
                format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
                format!("DROP ROLE IF EXISTS {}", self.role),
            ],
        )
        .await;
    }
}

pub(crate) const QUERY: &str =
    "SELECT age, sex, ward, stage, smoker, admitted, hb, outcome FROM visits ORDER BY id";
