//! One table from CSV, Parquet and PostgreSQL: the same features, splits, commitment and model.

use super::*;

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
