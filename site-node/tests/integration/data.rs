//! Dataset schemas, CSV loading and its errors, splits, shards and standardisation.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{breast_cancer, data_dir, mnist, numbered_table, row_ids};
use tutela_site_node::data::{
    DataError, DatasetSchema, ShardConfig, Standardizer, load_csv, site_shards, stratified_split,
};

const SCHEMA: &str = r#"
name = "toy"
[label]
column = "outcome"
classes = ["no", "yes"]
[features]
columns = [{ name = "age" }, { name = "dose", type = "numeric" }]
"#;

fn schema() -> DatasetSchema {
    DatasetSchema::from_toml_str(SCHEMA, "toy.schema.toml").unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Loads `text` as a CSV named `name` and returns the error's message, checking it names the
/// file.
fn load_error(text: &str) -> (DataError, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "patients.csv", text);
    let err = load_csv(&path, &schema()).expect_err("the file should be refused");
    let message = err.to_string();
    assert!(
        message.contains("patients.csv"),
        "error does not name the file: {message}"
    );
    (err, message)
}

#[test]
fn well_formed_csv_loads_with_schema_column_order() {
    let dir = tempfile::tempdir().unwrap();
    // Columns in a different order from the schema, an unused column, spaces around values.
    let path = write(
        dir.path(),
        "ok.csv",
        "dose,outcome,site,age\n1.5, yes ,a,40\n-2,no,b,61.25\n",
    );
    let table = load_csv(&path, &schema()).unwrap();
    assert_eq!(table.n_rows, 2);
    assert_eq!(table.n_features, 2);
    assert_eq!(table.feature_names, ["age", "dose"]);
    assert_eq!(table.features, [40.0, 1.5, 61.25, -2.0]);
    assert_eq!(table.labels, [1, 0]);
    assert_eq!(table.class_names, ["no", "yes"]);
}

#[test]
fn missing_header_column_is_named_on_line_1() {
    let (err, message) = load_error("age,outcome\n40,yes\n");
    assert!(matches!(err, DataError::MissingColumn { ref column, .. } if column == "dose"));
    assert!(message.contains("line 1"), "{message}");
    assert!(message.contains("\"dose\""), "{message}");
}

#[test]
fn wrong_field_count_names_the_line() {
    let (err, message) = load_error("age,dose,outcome\n40,1,yes\n41,2\n42,3,no\n");
    assert!(matches!(
        err,
        DataError::FieldCount {
            line: 3,
            expected: 3,
            found: 2,
            ..
        }
    ));
    assert!(message.contains("line 3"), "{message}");
}

#[test]
fn non_numeric_value_names_line_and_column() {
    let (err, message) = load_error("age,dose,outcome\n40,1,yes\n41,lots,no\n");
    assert!(matches!(err, DataError::NotNumeric { line: 3, .. }));
    assert!(message.contains("line 3"), "{message}");
    assert!(message.contains("\"dose\""), "{message}");
    assert!(message.contains("\"lots\""), "{message}");
}

#[test]
fn unknown_label_names_line_column_and_known_classes() {
    let (err, message) = load_error("age,dose,outcome\n40,1,yes\n41,2,no\n42,3,maybe\n");
    assert!(matches!(err, DataError::UnknownLabel { line: 4, .. }));
    assert!(message.contains("line 4"), "{message}");
    assert!(message.contains("\"outcome\""), "{message}");
    assert!(message.contains("\"maybe\""), "{message}");
    assert!(message.contains("no, yes"), "{message}");
}

#[test]
fn nan_infinity_and_overflow_are_refused() {
    for (value, kind) in [
        ("NaN", "NaN"),
        ("inf", "inf"),
        ("-infinity", "-inf"),
        ("1e39", "overflow"),
    ] {
        let (err, message) = load_error(&format!("age,dose,outcome\n40,1,yes\n{value},2,no\n"));
        assert!(
            matches!(err, DataError::NotFinite { line: 3, .. }),
            "{kind}: {message}"
        );
        assert!(
            message.contains("line 3") && message.contains("\"age\""),
            "{message}"
        );
    }
}

#[test]
fn missing_value_is_named() {
    let (err, message) = load_error("age,dose,outcome\n40,,yes\n");
    assert!(matches!(err, DataError::MissingValue { line: 2, .. }));
    assert!(
        message.contains("line 2") && message.contains("\"dose\""),
        "{message}"
    );
}

#[test]
fn empty_file_and_header_only_file_are_refused() {
    let (err, message) = load_error("");
    assert!(matches!(err, DataError::EmptyFile { .. }), "{message}");
    let (err, message) = load_error("age,dose,outcome\n");
    assert!(matches!(err, DataError::NoRows { .. }), "{message}");
}

#[test]
fn duplicate_header_column_is_refused() {
    let (err, message) = load_error("age,dose,age,outcome\n1,2,3,yes\n");
    assert!(
        matches!(err, DataError::DuplicateColumn { .. }),
        "{message}"
    );
    assert!(message.contains("\"age\""), "{message}");
}

#[test]
fn line_numbers_count_quoted_newlines() {
    // The second record spans lines 3 and 4; the bad value is on the record starting at line 5.
    let (err, message) =
        load_error("age,dose,outcome,note\n1,2,yes,x\n2,3,no,\"two\nlines\"\n3,x,no,y\n");
    assert!(
        matches!(err, DataError::NotNumeric { line: 5, .. }),
        "{message}"
    );
}

#[test]
fn gzip_files_load_like_plain_ones() {
    let dir = tempfile::tempdir().unwrap();
    let text = "age,dose,outcome\n40,1,yes\n41,2,no\n";
    let plain = write(dir.path(), "a.csv", text);
    let gz = dir.path().join("a.csv.gz");
    let mut encoder =
        flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap();
    assert_eq!(
        load_csv(&plain, &schema()).unwrap(),
        load_csv(&gz, &schema()).unwrap()
    );
}

#[test]
fn corrupt_gzip_and_invalid_utf8_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let fake_gz = write(dir.path(), "fake.csv.gz", "age,dose,outcome\n1,2,yes\n");
    let err = load_csv(&fake_gz, &schema()).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert!(err.to_string().contains("fake.csv.gz"), "{err}");

    let path = dir.path().join("latin1.csv");
    std::fs::write(&path, b"age,dose,outcome\n1,2,yes\n3,4,n\xe9\n").unwrap();
    let err = load_csv(&path, &schema()).unwrap_err();
    assert!(matches!(err, DataError::Csv { line: 3, .. }), "{err}");
    assert!(err.to_string().contains("latin1.csv, line 3"), "{err}");
}

#[test]
fn invalid_schemas_are_refused_with_a_reason() {
    let cases = [
        (
            SCHEMA.replace("[features]", "[features]\nall_other_columns = true"),
            "not both",
        ),
        (
            SCHEMA.replace(r#"["no", "yes"]"#, r#"["no", "no"]"#),
            "twice",
        ),
        (
            SCHEMA.replace(r#"{ name = "age" }"#, r#"{ name = "outcome" }"#),
            "label column",
        ),
        (
            SCHEMA.replace("name = \"toy\"", "name = \"toy\"\ncolour = 1"),
            "colour",
        ),
        (
            SCHEMA.replace(r#"type = "numeric""#, r#"type = "categorical""#),
            "categorical",
        ),
    ];
    for (text, expected) in cases {
        let err = DatasetSchema::from_toml_str(&text, "bad.schema.toml").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("bad.schema.toml"), "{message}");
        assert!(
            message.contains(expected),
            "expected {expected:?} in: {message}"
        );
    }
}

#[test]
fn all_other_columns_with_a_count_refuses_a_file_with_other_columns() {
    let dir = tempfile::tempdir().unwrap();
    let schema = DatasetSchema::load(data_dir().join("breast_cancer.schema.toml")).unwrap();
    assert_eq!(schema.features.count, Some(30));
    let path = write(dir.path(), "other.csv", "x,diagnosis\n1,benign\n");
    let err = load_csv(&path, &schema).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::FeatureColumnCount {
                expected: 30,
                found: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("other.csv, line 1"), "{err}");
}

#[test]
fn image_shape_must_match_the_feature_count() {
    let text = format!("{SCHEMA}\n[image]\nshape = [1, 2, 2]\n");
    let schema = DatasetSchema::from_toml_str(&text, "img.schema.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "img.csv", "age,dose,outcome\n1,2,yes\n");
    let err = load_csv(&path, &schema).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::ImageShape {
                expected: 4,
                found: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn project_datasets_load_with_their_schemas() {
    let (schema, table) = breast_cancer();
    assert_eq!(schema.input_shape(table.n_features), [30]);
    assert_eq!((table.n_rows, table.n_features), (569, 30));
    assert_eq!(table.class_counts(), [212, 357]);
    assert_eq!(table.feature_names[0], "mean_radius");
    assert!(!table.feature_names.contains(&"diagnosis".to_string()));

    let (schema, table) = mnist();
    assert_eq!(schema.input_shape(table.n_features), [1, 28, 28]);
    assert_eq!((table.n_rows, table.n_features), (5000, 784));
    assert_eq!(table.class_counts(), [500; 10]);
    let max = table.features.iter().copied().fold(f32::MIN, f32::max);
    assert!(
        max > 0.99 && max <= 1.0,
        "pixels scaled by 1/255: max {max}"
    );
    assert!(data_dir().join("README.md").exists());
}

#[test]
fn stratified_split_keeps_class_ratios_and_partitions_rows() {
    let (_, table) = breast_cancer();
    let split = stratified_split(&table, 0.2, 7).unwrap();
    // round(212 × 0.2) = 42, round(357 × 0.2) = 71.
    assert_eq!(split.validation.class_counts(), [42, 71]);
    assert_eq!(split.train.class_counts(), [170, 286]);
    let share = |counts: Vec<usize>| counts[0] as f64 / counts.iter().sum::<usize>() as f64;
    let overall = share(table.class_counts());
    assert!((share(split.train.class_counts()) - overall).abs() < 0.01);
    assert!((share(split.validation.class_counts()) - overall).abs() < 0.01);

    // Same seed, same split; another seed, other rows.
    assert_eq!(stratified_split(&table, 0.2, 7).unwrap(), split);
    assert_ne!(
        stratified_split(&table, 0.2, 8).unwrap().validation,
        split.validation
    );

    // Every row lands in exactly one part.
    let labels: Vec<i64> = (0..300).map(|i| (i % 3 == 0) as i64).collect();
    let numbered = numbered_table(&labels, 2);
    let split = stratified_split(&numbered, 0.25, 1).unwrap();
    let mut ids = [row_ids(&split.train), row_ids(&split.validation)].concat();
    ids.sort_unstable();
    assert_eq!(ids, (0..300).collect::<Vec<_>>());
    for part in [&split.train, &split.validation] {
        for (id, &label) in row_ids(part).iter().zip(&part.labels) {
            assert_eq!(labels[*id], label, "row {id} kept its label");
        }
    }

    assert!(matches!(
        stratified_split(&table, 1.0, 7),
        Err(DataError::Split { .. })
    ));
}

#[test]
fn shards_are_non_iid_but_cover_every_class() {
    let (_, table) = mnist();
    let config = ShardConfig {
        n_sites: 3,
        test_fraction: 0.2,
        dirichlet_alpha: 0.5,
        min_per_class: 5,
        seed: 42,
    };
    let shards = site_shards(&table, &config).unwrap();
    assert_eq!(shards.sites.len(), 3);
    assert_eq!(shards.test.class_counts(), [100; 10]);
    let total: usize = shards.sites.iter().map(|s| s.n_rows).sum::<usize>() + shards.test.n_rows;
    assert_eq!(total, table.n_rows);

    let shares: Vec<Vec<f64>> = shards
        .sites
        .iter()
        .map(|site| {
            let counts = site.class_counts();
            assert!(
                counts.iter().all(|&c| c >= config.min_per_class),
                "every site has every class: {counts:?}"
            );
            counts
                .iter()
                .map(|&c| c as f64 / site.n_rows as f64)
                .collect()
        })
        .collect();
    // Label skew: for some class the sites' shares differ a lot (IID shards would differ by a
    // few points at most).
    let spread = (0..10)
        .map(|class| {
            let column: Vec<f64> = shares.iter().map(|s| s[class]).collect();
            column.iter().copied().fold(0.0, f64::max) - column.iter().copied().fold(1.0, f64::min)
        })
        .fold(0.0, f64::max);
    assert!(
        spread > 0.15,
        "class shares differ across sites by {spread}"
    );

    assert_eq!(
        site_shards(&table, &config).unwrap(),
        shards,
        "deterministic"
    );

    // Sites and test partition the rows.
    let labels: Vec<i64> = (0..400).map(|i| i % 4).collect();
    let numbered = numbered_table(&labels, 4);
    let shards = site_shards(
        &numbered,
        &ShardConfig {
            n_sites: 4,
            ..config.clone()
        },
    )
    .unwrap();
    let mut ids: Vec<usize> = shards.sites.iter().flat_map(row_ids).collect();
    ids.extend(row_ids(&shards.test));
    ids.sort_unstable();
    assert_eq!(ids, (0..400).collect::<Vec<_>>());

    // Too few rows to give every site its minimum.
    let err = site_shards(
        &numbered,
        &ShardConfig {
            n_sites: 4,
            min_per_class: 30,
            ..config
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("class0"), "{err}");
}

#[test]
fn standardizer_fits_applies_and_checks_external_statistics() {
    let (_, table) = breast_cancer();
    let split = stratified_split(&table, 0.2, 3).unwrap();
    let standardizer = Standardizer::fit(&split.train).unwrap();
    let train = standardizer.applied(&split.train).unwrap();
    let refit = Standardizer::fit(&train).unwrap();
    for (&m, &s) in refit.mean.iter().zip(&refit.std) {
        assert!(m.abs() < 1e-4, "mean {m}");
        assert!((s - 1.0).abs() < 1e-4, "std {s}");
    }
    // Validation rows use the training statistics, so they are only roughly standard.
    let validation = standardizer.applied(&split.validation).unwrap();
    assert_ne!(Standardizer::fit(&validation).unwrap(), refit);

    // Constant columns map to 0 instead of dividing by zero.
    let (_, digits) = mnist();
    let pixels = Standardizer::fit(&digits).unwrap();
    assert_eq!(pixels.std[0], 1.0, "pixel 0 is always blank");
    let standardised = pixels.applied(&digits).unwrap();
    assert!(standardised.features.iter().all(|x| x.is_finite()));

    // Consortium-wide statistics from outside are checked.
    assert!(Standardizer::new(vec![0.0; 2], vec![1.0]).is_err());
    assert!(Standardizer::new(vec![0.0], vec![0.0]).is_err());
    assert!(Standardizer::new(vec![f32::NAN], vec![1.0]).is_err());
    let external = Standardizer::new(vec![0.0; 3], vec![1.0; 3]).unwrap();
    let err = external.applied(&table).unwrap_err();
    assert!(err.to_string().contains("3 features"), "{err}");
}
