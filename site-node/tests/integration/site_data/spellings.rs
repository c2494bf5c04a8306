//! The review's defects in the tabular path: the same values spelt differently by each source
//! (pandas CSV, Parquet float32 and decimals, PostgreSQL `numeric`, `real` and `boolean`) encode
//! the same; infinite and out-of-range dates are refused naming line and column; text past CSV's
//! field limit and a query past `max_rows` are refused.

use arrow_array::{
    ArrayRef, BooleanArray, Date32Array, Date64Array, Decimal128Array, Float32Array, Float64Array,
    RecordBatch, StringArray,
};
use tutela_privacy::anonymize::bounded::MAX_FIELD_BYTES;

use super::*;

/// Levels and categories spelt as numbers, booleans with the sources' own spellings.
const SPELLING_SCHEMA: &str = r#"
name = "spellings"

[label]
column = "outcome"
classes = ["well", "ill"]

[[features.columns]]
name = "grade"
type = "categorical"
categories = ["1", "2"]

[[features.columns]]
name = "dose"
type = "ordinal"
levels = ["0.1", "0.2", "0.5"]

[[features.columns]]
name = "price"
type = "categorical"
categories = ["1.5", "2.25"]

[[features.columns]]
name = "smoker"
type = "boolean"
true_values = ["True", "t"]
false_values = ["False", "f"]

[[features.columns]]
name = "flag"
type = "boolean"
"#;

/// (grade, dose, price, smoker, flag, outcome) per row.
const ROWS: [(f64, f32, i128, bool, bool, &str); 4] = [
    (1.0, 0.1, 150, true, false, "well"),
    (2.0, 0.5, 225, false, true, "ill"),
    (1.0, 0.2, 225, true, true, "ill"),
    (2.0, 0.1, 150, false, false, "well"),
];

fn write_batch(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn read(config: &DatasetConfig, schema: &DatasetSchema) -> Result<Table, DataError> {
    tokio::task::block_in_place(|| read_table(source::open("site", config)?.as_mut(), schema))
}

fn postgres_config(db: &TestDatabase, query: &str, dir: &Path) -> DatasetConfig {
    let password = dir.join("reader.password");
    std::fs::write(&password, "reader-secret").unwrap();
    DatasetConfig {
        path: PathBuf::new(),
        postgres: Some(db.config(query, &password)),
        ..file_config(Path::new(""), &dir.join("s.schema.toml"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_as_pandas_csv_parquet_and_postgres_encodes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("s.schema.toml");
    std::fs::write(&schema_path, SPELLING_SCHEMA).unwrap();
    let schema = DatasetSchema::load(&schema_path).unwrap();

    // As pandas writes it: integers of a float column as `1.0`, booleans as `True`, a boolean
    // column with a gap as floats `1.0`/`0.0`, decimals as `1.5`.
    let csv = dir.path().join("t.csv");
    let mut text = String::from("grade,dose,price,smoker,flag,outcome\n");
    for (grade, dose, price, smoker, flag, outcome) in ROWS {
        text.push_str(&format!(
            "{grade:.1},{dose},{},{},{},{outcome}\n",
            price as f64 / 100.0,
            if smoker { "True" } else { "False" },
            if flag { "1.0" } else { "0.0" },
        ));
    }
    std::fs::write(&csv, text).unwrap();

    // Parquet: float64 grades, float32 doses, Decimal128(5, 2) prices, typed booleans.
    let parquet = dir.path().join("t.parquet");
    write_batch(
        &parquet,
        vec![
            (
                "grade",
                Arc::new(Float64Array::from_iter_values(ROWS.map(|r| r.0))) as ArrayRef,
            ),
            (
                "dose",
                Arc::new(Float32Array::from_iter_values(ROWS.map(|r| r.1))),
            ),
            (
                "price",
                Arc::new(
                    Decimal128Array::from_iter_values(ROWS.map(|r| r.2))
                        .with_precision_and_scale(5, 2)
                        .unwrap(),
                ),
            ),
            (
                "smoker",
                Arc::new(BooleanArray::from(ROWS.map(|r| r.3).to_vec())),
            ),
            (
                "flag",
                Arc::new(BooleanArray::from(ROWS.map(|r| r.4).to_vec())),
            ),
            (
                "outcome",
                Arc::new(StringArray::from(ROWS.map(|r| r.5).to_vec())),
            ),
        ],
    );

    let mut configs = vec![
        ("csv", file_config(&csv, &schema_path)),
        ("parquet", file_config(&parquet, &schema_path)),
    ];
    let database = match std::env::var("TUTELA_TEST_POSTGRES_URL") {
        Ok(url) => {
            // numeric(3,1) grades (`1.0`), real doses, numeric(5,2) prices (`1.50`), and the
            // smoker as psql exports it (`t`/`f`) next to a typed boolean.
            let mut statements = vec![
                "CREATE TABLE t (id serial PRIMARY KEY, grade numeric(3,1), dose real, \
                 price numeric(5,2), smoker text, flag boolean, outcome text)"
                    .to_string(),
            ];
            for (grade, dose, price, smoker, flag, outcome) in ROWS {
                statements.push(format!(
                    "INSERT INTO t (grade, dose, price, smoker, flag, outcome) \
                     VALUES ({grade}, {dose}, {}, '{}', {flag}, '{outcome}')",
                    price as f64 / 100.0,
                    if smoker { "t" } else { "f" },
                ));
            }
            Some(TestDatabase::with_table(&url, "t", &statements).await)
        }
        Err(_) => {
            eprintln!("TUTELA_TEST_POSTGRES_URL is not set: the PostgreSQL source is not tested");
            None
        }
    };
    if let Some(db) = &database {
        configs.push((
            "postgres",
            postgres_config(
                db,
                "SELECT grade, dose, price, smoker, flag, outcome FROM t ORDER BY id",
                dir.path(),
            ),
        ));
    }
    let tables: Vec<(&str, Table)> = configs
        .iter()
        .map(|(kind, config)| {
            (
                *kind,
                read(config, &schema).unwrap_or_else(|e| panic!("{kind}: {e}")),
            )
        })
        .collect();
    let (_, reference) = &tables[0];
    assert_eq!(reference.n_rows, 4);
    // grade=1, grade=2, dose, price=1.5, price=2.25, smoker, flag
    assert_eq!(
        reference.row(1).unwrap(),
        [0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 1.0]
    );
    assert_eq!(
        reference.row(2).unwrap(),
        [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    );
    for (kind, table) in &tables[1..] {
        assert_eq!(table, reference, "{kind} encodes differently from csv");
    }
    if let Some(db) = database {
        db.drop().await;
    }
}

/// A level listed twice by value is refused when the schema is read.
#[test]
fn a_level_listed_twice_by_value_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.schema.toml");
    std::fs::write(
        &path,
        SPELLING_SCHEMA.replace(r#"categories = ["1", "2"]"#, r#"categories = ["1", "1.0"]"#),
    )
    .unwrap();
    let e = DatasetSchema::load(&path).unwrap_err().to_string();
    assert!(e.contains("twice"), "{e}");
}

const DATE_SCHEMA: &str = r#"
name = "dates"

[label]
column = "outcome"
classes = ["well", "ill"]

[[features.columns]]
name = "admitted"
type = "date"
format = "%Y-%m-%d"
epoch = "2020-01-01"
missing = "impute"
impute = { statistic = "median", value = "2020-06-01" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_and_out_of_range_dates_are_refused_naming_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("s.schema.toml");
    std::fs::write(&schema_path, DATE_SCHEMA).unwrap();
    let schema = DatasetSchema::load(&schema_path).unwrap();

    // A date64 past what a day count holds is refused, not read as missing (and imputed).
    let parquet = dir.path().join("d.parquet");
    write_batch(
        &parquet,
        vec![
            (
                "admitted",
                Arc::new(Date64Array::from(vec![0, i64::MAX])) as ArrayRef,
            ),
            ("outcome", Arc::new(StringArray::from(vec!["well", "ill"]))),
        ],
    );
    let e = read(&file_config(&parquet, &schema_path), &schema)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 3") && e.contains("\"admitted\"") && e.contains("date64"),
        "{e}"
    );

    // A date32 at the end of the i32 range encodes (the days since the epoch in i64).
    let far = dir.path().join("far.parquet");
    write_batch(
        &far,
        vec![
            (
                "admitted",
                Arc::new(Date32Array::from(vec![i32::MIN, i32::MAX])) as ArrayRef,
            ),
            ("outcome", Arc::new(StringArray::from(vec!["well", "ill"]))),
        ],
    );
    let table = read(&file_config(&far, &schema_path), &schema).unwrap();
    let epoch = i64::from(Date::parse_iso("2020-01-01").unwrap().0);
    assert_eq!(
        table.row(0).unwrap(),
        [(i64::from(i32::MIN) - epoch) as f32]
    );
    assert_eq!(
        table.row(1).unwrap(),
        [(i64::from(i32::MAX) - epoch) as f32]
    );

    let Ok(url) = std::env::var("TUTELA_TEST_POSTGRES_URL") else {
        eprintln!("TUTELA_TEST_POSTGRES_URL is not set: the PostgreSQL source is not tested");
        return;
    };
    let db = TestDatabase::with_table(
        &url,
        "t",
        &[
            "CREATE TABLE t (id serial PRIMARY KEY, admitted date, outcome text)".to_string(),
            "INSERT INTO t (admitted, outcome) VALUES ('2021-03-04', 'well'), \
             ('infinity', 'ill'), ('-infinity', 'well')"
                .to_string(),
        ],
    )
    .await;
    for infinity in ["infinity", "-infinity"] {
        let config = postgres_config(
            &db,
            &format!(
                "SELECT admitted, outcome FROM t WHERE id = 1 OR admitted = '{infinity}' ORDER BY id"
            ),
            dir.path(),
        );
        let e = read(&config, &schema).unwrap_err().to_string();
        assert!(
            // The infinite date is the query's second row.
            e.contains("line 3") && e.contains("\"admitted\"") && e.contains("infinite date"),
            "{infinity}: {e}"
        );
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_text_and_too_many_rows_are_refused_as_in_csv() {
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("s.schema.toml");
    std::fs::write(&schema_path, SPELLING_SCHEMA).unwrap();
    let schema = DatasetSchema::load(&schema_path).unwrap();
    let long = "x".repeat(MAX_FIELD_BYTES + 1);

    let parquet = dir.path().join("long.parquet");
    let row_of = |outcome: &str| {
        vec![
            ("grade", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
            ("dose", Arc::new(Float64Array::from(vec![0.1]))),
            ("price", Arc::new(StringArray::from(vec!["1.5"]))),
            ("smoker", Arc::new(BooleanArray::from(vec![true]))),
            ("flag", Arc::new(BooleanArray::from(vec![true]))),
            (
                "outcome",
                Arc::new(StringArray::from(vec![outcome.to_string()])),
            ),
        ]
    };
    write_batch(&parquet, row_of(&long));
    match read(&file_config(&parquet, &schema_path), &schema) {
        Err(DataError::TooLong { line: 2, max, .. }) => assert_eq!(max, MAX_FIELD_BYTES as u64),
        other => panic!("expected a field too long on line 2, got {other:?}"),
    }
    // At the limit it is read (and refused only as a label that is not a class).
    write_batch(&parquet, row_of(&long[1..]));
    assert!(matches!(
        read(&file_config(&parquet, &schema_path), &schema),
        Err(e) if !matches!(e, DataError::TooLong { .. })
    ));

    let Ok(url) = std::env::var("TUTELA_TEST_POSTGRES_URL") else {
        eprintln!("TUTELA_TEST_POSTGRES_URL is not set: the PostgreSQL source is not tested");
        return;
    };
    let db = TestDatabase::with_table(
        &url,
        "t",
        &[
            "CREATE TABLE t (id serial PRIMARY KEY, note text)".to_string(),
            format!("INSERT INTO t (note) VALUES ('a'), ('b'), ('c'), ('{long}')"),
        ],
    )
    .await;
    let e = read(
        &postgres_config(&db, "SELECT note AS outcome FROM t ORDER BY id", dir.path()),
        &schema,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("line 5") && e.contains("\"outcome\"") && e.contains("longer than the limit"),
        "{e}"
    );
    assert!(!e.contains("xxxx"), "{e}");
    let mut bounded = postgres_config(
        &db,
        "SELECT note AS outcome FROM t WHERE id < 4",
        dir.path(),
    );
    if let Some(p) = bounded.postgres.as_mut() {
        p.max_rows = 2;
    }
    let e = read(&bounded, &schema).unwrap_err().to_string();
    assert!(
        e.contains("more than 2 rows") && e.contains("max_rows"),
        "{e}"
    );
    db.drop().await;
}

/// A label is matched as a category is: pandas' `1.0` is the class `1`.
#[test]
fn a_numeric_label_matches_its_class_by_value() {
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("s.schema.toml");
    std::fs::write(
        &schema_path,
        "name = \"n\"\n[label]\ncolumn = \"y\"\nclasses = [\"0\", \"1\"]\n\
         [[features.columns]]\nname = \"x\"\n",
    )
    .unwrap();
    let schema = DatasetSchema::load(&schema_path).unwrap();
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "x,y\n0.5,1.0\n1.5,0.0\n2.5,1\n").unwrap();
    let table = tutela_site_node::data::load_csv(&csv, &schema).unwrap();
    assert_eq!(table.labels, [1, 0, 1]);
}
