//! Site data as hospitals have it: a schema with categorical, ordinal, boolean and date columns
//! and missing-value rules; the same table as CSV, Parquet and a PostgreSQL query yields the same
//! encoded features and trains the same model; `data check` lists every planted problem at once,
//! and a dataset that fails it is not offered.
//!
//! The PostgreSQL part runs when `TUTELA_TEST_POSTGRES_URL` is set (`source
//! scripts/test-postgres.sh`; `scripts/test.sh` sets it), in a database of its own.

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
struct Visit {
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
fn visits(n: usize, lacks_x: bool) -> Vec<Visit> {
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

fn write_csv(path: &Path, rows: &[Visit]) {
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
fn write_parquet(path: &Path, rows: &[Visit]) {
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

/// The same weights after the same training from the same seed.
fn trained_weights(table: &Table) -> Vec<(String, Vec<u8>)> {
    tch::set_num_threads(1);
    let spec = ModelSpec::new(vec![table.n_features], 2).with_hidden(vec![8]);
    let model = Model::new("mlp", spec, tch::Device::Cpu, 11).unwrap();
    let config = TrainConfig {
        optimizer: OptimizerKind::Adam,
        learning_rate: 1e-2,
        epochs: 3,
        batch_size: 8,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 5,
    };
    train_local(&model, table, &config).unwrap();
    export_weights(model.var_store())
        .unwrap()
        .into_iter()
        .map(|(spec, bytes)| (spec.name, bytes))
        .collect()
}

/// A database of the test's own, with a read-only role that may only select the visits.
struct TestDatabase {
    admin_url: String,
    name: String,
    role: String,
}

fn with_database(url: &str, db: &str) -> String {
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
fn with_user(url: &str, user: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let host_and_path = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{}{user}@{host_and_path}", &url[..scheme_end])
}

async fn execute(url: &str, statements: &[String]) {
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
    async fn create(admin_url: &str, rows: &[Visit]) -> TestDatabase {
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
        let mut inserts = vec![
            "CREATE TABLE visits (id serial PRIMARY KEY, age int8, sex text, ward varchar(8), \
             stage text, smoker boolean, admitted date, hb numeric(4,1), outcome text)"
                .to_string(),
            format!("GRANT SELECT ON visits TO {}", db.role),
        ];
        for v in rows {
            let text = |t: Option<&str>| t.map_or("NULL".to_string(), |t| format!("'{t}'"));
            inserts.push(format!(
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
        execute(&with_database(admin_url, &db.name), &inserts).await;
        db
    }

    fn config(&self, query: &str, password_file: &Path) -> PostgresConfig {
        PostgresConfig {
            url: with_user(&with_database(&self.admin_url, &self.name), &self.role),
            query: query.to_string(),
            password_env: None,
            password_file: Some(password_file.to_path_buf()),
            timeout_secs: 60,
        }
    }

    async fn drop(self) {
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

const QUERY: &str =
    "SELECT age, sex, ward, stage, smoker, admitted, hb, outcome FROM visits ORDER BY id";

/// The issue's test: one table as CSV, Parquet and a PostgreSQL table, with missing values and
/// categories, at a site that lacks a category, gives identical encoded feature matrices and
/// trains the same model from the same seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_as_csv_parquet_and_postgres_encodes_and_trains_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("clinic.schema.toml");
    std::fs::write(&schema_path, SCHEMA).unwrap();
    let schema = DatasetSchema::load(&schema_path).unwrap();
    // Age and its indicator, 4 for sex (with `(other)`), 2 for ward, stage, smoker, admitted, hb.
    assert_eq!(schema.declared_feature_count(), Some(12));
    let postgres_url = std::env::var("TUTELA_TEST_POSTGRES_URL").ok();
    if postgres_url.is_none() {
        eprintln!("TUTELA_TEST_POSTGRES_URL is not set: the PostgreSQL source is not tested");
    }
    let password = dir.path().join("reader.password");
    std::fs::write(&password, "reader-secret\n").unwrap();

    let mut encoded = Vec::new();
    for (site, lacks_x) in [("north", false), ("south", true)] {
        let rows = visits(48, lacks_x);
        let csv = dir.path().join(format!("{site}.csv"));
        let parquet = dir.path().join(format!("{site}.parquet"));
        write_csv(&csv, &rows);
        write_parquet(&parquet, &rows);
        let mut configs = vec![
            ("csv", file_config(&csv, &schema_path)),
            ("parquet", file_config(&parquet, &schema_path)),
        ];
        let database = match &postgres_url {
            Some(url) => Some(TestDatabase::create(url, &rows).await),
            None => None,
        };
        if let Some(db) = &database {
            configs.push((
                "postgres",
                DatasetConfig {
                    path: PathBuf::new(),
                    postgres: Some(db.config(QUERY, &password)),
                    ..file_config(Path::new(""), &schema_path)
                },
            ));
        }
        let mut tables = Vec::new();
        for (kind, config) in &configs {
            let table = tokio::task::block_in_place(|| {
                read_table(source::open(site, config).unwrap().as_mut(), &schema)
            })
            .unwrap_or_else(|e| panic!("{site} {kind}: {e}"));
            let loaded = tokio::task::block_in_place(|| {
                SiteDataset::prepare(site, config, None)
                    .and_then(|d| d.load())
                    .unwrap_or_else(|e| panic!("{site} {kind}: {e}"))
            });
            tables.push((*kind, table, loaded));
        }
        let (_, reference, reference_loaded) = &tables[0];
        assert_eq!(reference.n_rows, 48);
        assert_eq!(reference.n_features, 12);
        assert_eq!(
            reference.feature_names,
            [
                "age",
                "age(missing)",
                "sex=F",
                "sex=M",
                "sex=X",
                "sex=(other)",
                "ward=a",
                "ward=b",
                "stage",
                "smoker",
                "admitted",
                "hb"
            ]
        );
        for (kind, table, loaded) in &tables[1..] {
            assert_eq!(
                table, reference,
                "{site}: {kind} encodes differently from csv"
            );
            assert_eq!(loaded.train, reference_loaded.train, "{site} {kind}");
            assert_eq!(
                loaded.validation, reference_loaded.validation,
                "{site} {kind}"
            );
        }
        let weights = trained_weights(&reference_loaded.train);
        for (kind, _, loaded) in &tables[1..] {
            assert!(
                trained_weights(&loaded.train) == weights,
                "{site}: the model trained from {kind} differs from the one from csv"
            );
        }
        encoded.push(reference.clone());
        if let Some(db) = database {
            // The transaction is read-only: a query that writes is refused by the server.
            let writes = DatasetConfig {
                path: PathBuf::new(),
                postgres: Some(db.config(
                    "WITH gone AS (DELETE FROM visits RETURNING *) SELECT * FROM gone",
                    &password,
                )),
                ..file_config(Path::new(""), &schema_path)
            };
            let e = tokio::task::block_in_place(|| source::open(site, &writes))
                .err()
                .expect("a writing query is refused");
            let message = e.to_string();
            assert!(message.contains("read-only"), "{message}");
            assert!(
                message.starts_with(&format!("postgres:{site}")),
                "{message}"
            );
            assert!(!message.contains("reader-secret"), "{message}");
            db.drop().await;
        }
    }
    // The site without `X` encodes to the same columns, its `sex=X` feature always 0.
    let (north, south) = (&encoded[0], &encoded[1]);
    assert_eq!(north.feature_names, south.feature_names);
    let x = south
        .feature_names
        .iter()
        .position(|n| n == "sex=X")
        .unwrap();
    assert!((0..south.n_rows).all(|r| south.row(r).unwrap()[x] == 0.0));
    assert!((0..north.n_rows).any(|r| north.row(r).unwrap()[x] == 1.0));
    // Missing values: imputed, with the indicator where the schema asks for one.
    let row = north.row(3).unwrap(); // age missing on rows 3, 10, 17, ...
    assert_eq!(&row[..2], &[61.5, 1.0]);
    let row = north.row(5).unwrap(); // sex missing: the mode, F
    assert_eq!(&row[2..6], &[1.0, 0.0, 0.0, 0.0]);
    let row = north.row(2).unwrap(); // hb missing: the mean
    assert_eq!(row[11], 13.2);
}

/// The clinic table's column declaration: every column a feature or the label, no identifiers.
const DECLARATION: &str = r#"
[[column]]
name = "age"
role = "feature"
type = "int"
[[column]]
name = "sex"
role = "feature"
type = "text"
[[column]]
name = "ward"
role = "feature"
type = "text"
[[column]]
name = "stage"
role = "feature"
type = "text"
[[column]]
name = "smoker"
role = "feature"
type = "text"
[[column]]
name = "admitted"
role = "feature"
type = "date"
[[column]]
name = "hb"
role = "feature"
type = "float"
[[column]]
name = "outcome"
role = "label"
type = "text"
"#;

/// A dataset that declares its columns goes through the anonymization pipeline from every
/// source alike: the same training table, and the same commitment over the anonymized rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_dataset_reads_the_same_through_the_pipeline_from_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("clinic.schema.toml");
    std::fs::write(&schema_path, SCHEMA).unwrap();
    let columns = dir.path().join("clinic.columns.toml");
    std::fs::write(&columns, DECLARATION).unwrap();
    let password = dir.path().join("reader.password");
    std::fs::write(&password, "reader-secret").unwrap();
    let rows = visits(30, false);
    let (csv, parquet) = (dir.path().join("c.csv"), dir.path().join("c.parquet"));
    write_csv(&csv, &rows);
    write_parquet(&parquet, &rows);
    let declared = |config: DatasetConfig| DatasetConfig {
        columns: Some(columns.clone()),
        ..config
    };
    let mut configs = vec![
        ("csv", declared(file_config(&csv, &schema_path))),
        ("parquet", declared(file_config(&parquet, &schema_path))),
    ];
    let database = match std::env::var("TUTELA_TEST_POSTGRES_URL") {
        Ok(url) => Some(TestDatabase::create(&url, &rows).await),
        Err(_) => None,
    };
    if let Some(db) = &database {
        configs.push((
            "postgres",
            declared(DatasetConfig {
                path: PathBuf::new(),
                postgres: Some(db.config(QUERY, &password)),
                ..file_config(Path::new(""), &schema_path)
            }),
        ));
    }
    let secret = [7u8; 32];
    let loaded: Vec<_> = configs
        .iter()
        .map(|(kind, config)| {
            let dataset = tokio::task::block_in_place(|| {
                SiteDataset::prepare("clinic", config, Some(&secret)).and_then(|d| d.load())
            })
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
            (*kind, dataset)
        })
        .collect();
    let (_, reference) = &loaded[0];
    assert!(reference.deid.is_some());
    assert_eq!(reference.train.n_features, 12);
    for (kind, dataset) in &loaded[1..] {
        assert_eq!(dataset.train, reference.train, "{kind}");
        assert_eq!(dataset.validation, reference.validation, "{kind}");
        assert_eq!(
            dataset.commitment.map(|c| c.root_hex()),
            reference.commitment.map(|c| c.root_hex()),
            "{kind}: the anonymized rows differ"
        );
    }
    if let Some(db) = database {
        db.drop().await;
    }
}

/// A file with every kind of problem the check knows, one or more per line.
const PLANTED: &str = "\
age,sex,ward,stage,smoker,admitted,hb,outcome
sixty,F,a,I,true,2020-01-02,12.5,well
40,F,a,IV,true,2020-01-02,12.5,well
41,M,b,II,maybe,2020-01-02,12.5,ill
42,F,a,II,false,2020-02-30,12.5,well
43,F,a,,false,2020-01-02,12.5,well
44,F,a,I,false,2020-01-02,12.5,dead
45,F,a,I,false,2020-01-02
1e999,F,c,I,false,2020-01-02,12.5,well
46,F,b,III,true,2020-03-01,13.0,ill
";

fn node_config(dir: &Path, datasets: &str) -> NodeConfig {
    let text = format!(
        "site = \"hospital-a\"\ncoordinator = \"localhost:1\"\nwork_dir = \"{}\"\n\
         insecure_no_approvals = true\n[tls]\nca = \"ca.crt\"\ncert = \"node.crt\"\nkey = \"node.key\"\n{datasets}",
        dir.join("work").display()
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, &text).unwrap();
    NodeConfig::from_toml_str(&text, &path).unwrap()
}

#[test]
fn data_check_lists_every_planted_problem_in_one_run_and_the_node_does_not_offer_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("clinic.schema.toml"), SCHEMA).unwrap();
    std::fs::write(dir.path().join("planted.csv"), PLANTED).unwrap();
    write_csv(&dir.path().join("good.csv"), &visits(20, false));
    let config = node_config(
        dir.path(),
        "[datasets.planted]\npath = \"planted.csv\"\nschema = \"clinic.schema.toml\"\n\
         [datasets.good]\npath = \"good.csv\"\nschema = \"clinic.schema.toml\"\n",
    );
    let checks = data_check::check_all(&config);
    assert_eq!(checks.len(), 2);
    let good = checks.iter().find(|c| c.name == "good").unwrap();
    assert!(
        matches!(
            good.outcome,
            Outcome::TableReady {
                rows: 20,
                features: 12,
                ..
            }
        ),
        "{good}"
    );
    let planted = checks.iter().find(|c| c.name == "planted").unwrap();
    let Outcome::TableProblems(report) = &planted.outcome else {
        panic!("{planted}");
    };
    let found: Vec<(u64, &str)> = report
        .problems
        .iter()
        .map(|p| match p {
            DataError::NotNumeric { line, column, .. } => (*line, column.as_str()),
            DataError::InvalidValue { line, column, .. } => (*line, column.as_str()),
            DataError::MissingValue { line, column, .. } => (*line, column.as_str()),
            DataError::UnknownLabel { line, column, .. } => (*line, column.as_str()),
            DataError::FieldCount { line, .. } => (*line, "(fields)"),
            DataError::NotFinite { line, column, .. } => (*line, column.as_str()),
            DataError::UnknownCategory { line, column, .. } => (*line, column.as_str()),
            other => panic!("unexpected problem {other}"),
        })
        .collect();
    assert_eq!(
        found,
        [
            (2, "age"),      // not a number
            (3, "stage"),    // not a level
            (4, "smoker"),   // not a boolean spelling
            (5, "admitted"), // not a date
            (6, "stage"),    // missing, and the rule is to refuse
            (7, "outcome"),  // not a class
            (8, "(fields)"), // a short line
            (9, "age"),      // not finite
            (9, "ward"),     // a category the schema does not list
        ],
        "{planted}"
    );
    let text = planted.to_string();
    for expected in [
        "planted.csv, line 2, column \"age\": \"sixty\" is not a number",
        "\"IV\" is not one of the schema's levels",
        "\"maybe\" is not a boolean the schema spells",
        "\"2020-02-30\" is not a date in the format \"%Y-%m-%d\"",
        "line 6, column \"stage\": the value is missing; fill it in, or ask the consortium",
        "unknown label \"dead\"",
        "line 8: 6 fields, but the header has 8",
        "\"c\" is not one of the schema's categories (\"a\", \"b\")",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    // What leaves the site about such a dataset is a code and a column, never a value or a path.
    for problem in &report.problems {
        let reason = tutela_site_node::failure::SiteFailure::from(problem).wire_reason();
        for secret in [
            "sixty",
            "IV",
            "maybe",
            "2020-02-30",
            "dead",
            "planted.csv",
            "1e999",
        ] {
            assert!(!reason.contains(secret), "{secret:?} in {reason:?}");
        }
    }

    // The node's own check at start: the planted dataset is not offered, the good one is.
    let prepare = |name: &str| SiteDataset::prepare(name, &config.datasets[name], None).unwrap();
    assert!(data_check::offered(prepare("planted")).is_none());
    assert!(data_check::offered(prepare("good")).is_some());

    // The command: every problem, and a failing exit status.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .args(["data", "check", "--config"])
        .arg(dir.path().join("node.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("table dataset good: ready, 20 rows, 12 features"),
        "{stdout}"
    );
    assert!(
        stdout.contains("table dataset planted: 9 problem(s)"),
        "{stdout}"
    );
    for line in 2..=9 {
        assert!(
            stdout.contains(&format!("planted.csv, line {line}")),
            "line {line} missing from:\n{stdout}"
        );
    }
    assert!(
        stderr.contains("1 of 2 dataset(s) failed the check: planted"),
        "{stderr}"
    );
}

#[test]
fn a_header_that_does_not_match_the_schema_names_every_missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let schema = DatasetSchema::from_toml_str(SCHEMA, "clinic.schema.toml").unwrap();
    let csv = dir.path().join("short.csv");
    std::fs::write(&csv, "age,sex,stage,smoker,outcome\n40,F,I,true,well\n").unwrap();
    let config = file_config(&csv, Path::new("clinic.schema.toml"));
    let report = tutela_site_node::data::check_source(
        source::open("clinic", &config).unwrap().as_mut(),
        &schema,
    );
    let missing: Vec<&str> = report
        .problems
        .iter()
        .map(|p| match p {
            DataError::MissingColumn { column, .. } => column.as_str(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(missing, ["ward", "admitted", "hb"]);
}

/// The documented example in deploy/ is this test's schema, so every key it shows is tested.
#[test]
fn the_deploy_example_schema_is_the_one_tested_here() {
    let example = crate::common::data_dir().join("../deploy/data/clinic.schema.toml");
    assert_eq!(
        DatasetSchema::load(&example).unwrap(),
        DatasetSchema::from_toml_str(SCHEMA, "clinic.schema.toml").unwrap()
    );
}

/// The example of docs/schema.md encodes the row it shows into the features it shows.
#[test]
fn the_reference_page_example_encodes_as_documented() {
    let page =
        std::fs::read_to_string(crate::common::data_dir().join("../docs/schema.md")).unwrap();
    let example = page
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block in docs/schema.md");
    let schema = DatasetSchema::from_toml_str(example, "docs/schema.md").unwrap();
    let table = tutela_site_node::data::read_csv(
        "age,sex,stage,admitted,outcome\n,M,II,2020-01-11,well\n".as_bytes(),
        "example.csv",
        &schema,
    )
    .unwrap();
    assert_eq!(
        table.feature_names,
        [
            "age",
            "age(missing)",
            "sex=F",
            "sex=M",
            "sex=X",
            "sex=(other)",
            "stage",
            "admitted"
        ]
    );
    assert_eq!(table.features, [61.5, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 10.0]);
    assert!(page.contains("`61.5, 1, 0, 1, 0, 0, 1, 10`"));
}

#[test]
fn schema_errors_name_the_column_and_the_key() {
    let bad = |replace: &str, with: &str| {
        let text = SCHEMA.replace(replace, with);
        assert_ne!(text, SCHEMA);
        DatasetSchema::from_toml_str(&text, "clinic.schema.toml")
            .unwrap_err()
            .to_string()
    };
    let e = bad("categories = [\"a\", \"b\"]", "categories = []");
    assert!(
        e.contains("\"ward\"") && e.contains("`categories` is empty"),
        "{e}"
    );
    let e = bad("value = 61.5", "value = \"old\"");
    assert!(e.contains("\"age\"") && e.contains("impute.value"), "{e}");
    let e = bad("epoch = \"2020-01-01\"", "epoch = \"2020-13-01\"");
    assert!(e.contains("\"admitted\"") && e.contains("epoch"), "{e}");
    let e = bad("type = \"ordinal\"", "type = \"numeric\"");
    assert!(
        e.contains("\"stage\"") && e.contains("`levels` is for type = \"ordinal\""),
        "{e}"
    );
    let e = bad("unseen = \"other\"", "unseen = \"sometimes\"");
    assert!(e.contains("unseen") || e.contains("sometimes"), "{e}");
}

/// The node.toml keys of a query source: a password in the URL, or a query next to a file, is
/// refused at start, naming the key (and not quoting the password).
#[test]
fn a_postgres_source_is_configured_without_a_password_in_node_toml() {
    let dir = tempfile::tempdir().unwrap();
    let config = |dataset: &str| {
        let text = format!(
            "site = \"hospital-a\"\ncoordinator = \"localhost:1\"\nwork_dir = \"work\"\n\
             insecure_no_approvals = true\n[tls]\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n\
             [datasets.clinic]\nschema = \"clinic.schema.toml\"\n{dataset}"
        );
        NodeConfig::from_toml_str(&text, dir.path().join("node.toml"))
    };
    let ok = config(
        "[datasets.clinic.postgres]\nurl = \"postgres://reader@db:5432/registry\"\n\
         query = \"SELECT * FROM visits\"\npassword_file = \"db.password\"\n",
    )
    .unwrap();
    let postgres = ok.datasets["clinic"].postgres.as_ref().unwrap();
    assert_eq!(
        postgres.password_file.as_deref(),
        Some(dir.path().join("db.password").as_path())
    );
    let e = config(
        "[datasets.clinic.postgres]\nurl = \"postgres://reader:hunter2@db/registry\"\nquery = \"SELECT 1\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key(), Some("datasets.clinic.postgres.url"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = config(
        "path = \"visits.csv\"\n[datasets.clinic.postgres]\nurl = \"postgres://reader@db/registry\"\nquery = \"SELECT 1\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key(), Some("datasets.clinic.postgres"), "{e}");
    let e = config("").unwrap_err();
    assert_eq!(e.key(), Some("datasets.clinic.path"), "{e}");
}
