//! Data protection at the site: a dataset with identity columns is anonymized before training,
//! committed to, refused when its declaration leaves identifiers in the clear, and read as CSV or
//! JSON Lines alike.

use crate::common;

use std::path::{Path, PathBuf};

use common::data_dir;
use tutela_privacy::anonymize::synthetic::{
    DEMO_ANONYMIZE_TOML, declaration_toml, identity_header_prefix, synthetic_identities,
};
use tutela_site_node::config::DatasetConfig;
use tutela_site_node::dataset::SiteDataset;

const SECRET: [u8; 32] = [42u8; 32];

/// The breast-cancer file with the demo's synthetic identity columns in front, plus the files
/// that declare and anonymize it. Returns (data, declaration, pipeline, feature names).
fn raw_dataset(dir: &Path) -> (PathBuf, PathBuf, PathBuf, Vec<String>) {
    let text = std::fs::read_to_string(data_dir().join("breast_cancer_wisconsin.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    let people = synthetic_identities(5, rows.len());
    let mut out = format!("{}{header}\n", identity_header_prefix());
    for (p, r) in people.iter().zip(&rows) {
        out.push_str(&format!("{}{r}\n", p.csv_prefix()));
    }
    let data = dir.join("patients.csv");
    std::fs::write(&data, out).unwrap();
    let features: Vec<String> = header
        .split(',')
        .filter(|c| *c != "diagnosis")
        .map(String::from)
        .collect();
    let names: Vec<&str> = features.iter().map(String::as_str).collect();
    let columns = dir.join("patients.columns.toml");
    std::fs::write(&columns, declaration_toml(&names, "diagnosis")).unwrap();
    let anonymize = dir.join("patients.anonymize.toml");
    std::fs::write(&anonymize, DEMO_ANONYMIZE_TOML).unwrap();
    (data, columns, anonymize, features)
}

fn config(data: &Path, columns: &Path, anonymize: Option<&Path>) -> DatasetConfig {
    DatasetConfig {
        path: data.to_path_buf(),
        schema: data_dir().join("breast_cancer.schema.toml"),
        columns: Some(columns.to_path_buf()),
        anonymize: anonymize.map(Path::to_path_buf),
        validation_fraction: 0.2,
        split_seed: 1,
        ..Default::default()
    }
}

#[test]
fn identity_columns_are_anonymized_before_training_and_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (data, columns, anonymize, _) = raw_dataset(dir.path());
    let site = SiteDataset::prepare(
        "breast_cancer",
        &config(&data, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap();
    assert!(site.is_anonymized());
    assert_eq!(site.n_features(), 30);
    let d = site.load().unwrap();
    // Training sees the 30 features and the label, nothing of the identity columns.
    assert_eq!(d.train.n_features, 30);
    assert!(
        d.train
            .feature_names
            .iter()
            .all(|f| !f.contains("name") && f != "note")
    );
    let report = d.deid.as_ref().unwrap();
    assert_eq!(report.rows_in, 569);
    let k = report.k_anonymity.as_ref().unwrap();
    assert!(k.k_achieved >= 5, "{k:?}");
    assert_eq!(d.train.n_rows + d.validation.n_rows, report.rows_out);
    assert!(!report.columns_out.contains(&"name".to_string()));
    assert!(!report.columns_out.contains(&"national_id".to_string()));
    let note = report
        .transforms
        .iter()
        .find(|t| t.column == "note")
        .unwrap();
    assert!(note.redactions.values().sum::<usize>() >= 569, "{note:?}");

    // The same data and secret give the same commitment; another secret another one.
    let root = d.commitment.unwrap();
    assert_eq!(root.rows as usize, report.rows_out);
    let again = SiteDataset::prepare(
        "breast_cancer",
        &config(&data, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap()
    .load()
    .unwrap();
    assert_eq!(again.commitment, Some(root));
    let other = SiteDataset::prepare(
        "breast_cancer",
        &config(&data, &columns, Some(&anonymize)),
        Some(&[7u8; 32]),
    )
    .unwrap()
    .load()
    .unwrap();
    assert_ne!(other.commitment.unwrap().root, root.root);
}

#[test]
fn a_declaration_that_leaves_identifiers_in_the_clear_is_refused_before_any_record_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_, columns, _, _) = raw_dataset(dir.path());
    // The data file does not exist: a refusal that reads it would be an I/O error instead.
    let missing = dir.path().join("not-there.csv");
    // No pipeline: the names, national ids and notes would reach training as they are.
    let err = SiteDataset::prepare(
        "breast_cancer",
        &config(&missing, &columns, None),
        Some(&SECRET),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("refusing to train: column `record_number`"),
        "{err}"
    );
    // A pipeline that keeps the note unredacted.
    let lax = dir.path().join("lax.toml");
    std::fs::write(
        &lax,
        DEMO_ANONYMIZE_TOML.replace(
            "[columns.note]\naction = \"redact\"",
            "[columns.note]\naction = \"keep\"",
        ),
    )
    .unwrap();
    let err = SiteDataset::prepare(
        "breast_cancer",
        &config(&missing, &columns, Some(&lax)),
        Some(&SECRET),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("column `note` is free text left as `keep`"),
        "{err}"
    );
    // A training schema that uses an identifier as a feature.
    let schema = dir.path().join("bad.schema.toml");
    std::fs::write(&schema, "name = \"x\"\n[label]\ncolumn = \"diagnosis\"\nclasses = [\"malignant\", \"benign\"]\n[features]\ncolumns = [{ name = \"national_id\" }]\n").unwrap();
    let mut c = config(
        &missing,
        &columns,
        Some(&dir.path().join("patients.anonymize.toml")),
    );
    c.schema = schema;
    let err = SiteDataset::prepare("breast_cancer", &c, Some(&SECRET))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"national_id\" is a direct identifier"),
        "{err}"
    );
    // Without the site secret.
    let err = SiteDataset::prepare(
        "breast_cancer",
        &config(
            &missing,
            &columns,
            Some(&dir.path().join("patients.anonymize.toml")),
        ),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("site_secret_file"), "{err}");
}

#[test]
fn json_lines_read_like_csv() {
    let dir = tempfile::tempdir().unwrap();
    let (data, columns, anonymize, features) = raw_dataset(dir.path());
    // The same rows as JSON Lines.
    let text = std::fs::read_to_string(&data).unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let mut jsonl = String::new();
    for record in reader.records() {
        let record = record.unwrap();
        let mut object = serde_json::Map::new();
        for (name, cell) in header.iter().zip(record.iter()) {
            let value = if features.contains(name) {
                serde_json::Value::from(cell.parse::<f64>().unwrap())
            } else {
                serde_json::Value::from(cell)
            };
            object.insert(name.clone(), value);
        }
        jsonl.push_str(&serde_json::Value::Object(object).to_string());
        jsonl.push('\n');
    }
    let json_path = dir.path().join("patients.jsonl");
    std::fs::write(&json_path, jsonl).unwrap();
    let from_csv = SiteDataset::prepare(
        "bc",
        &config(&data, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap()
    .load()
    .unwrap();
    let from_json = SiteDataset::prepare(
        "bc",
        &config(&json_path, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap()
    .load()
    .unwrap();
    assert_eq!(from_csv.train, from_json.train);
    assert_eq!(from_csv.commitment, from_json.commitment);

    // A malformed line names file, line and column.
    let broken = dir.path().join("broken.jsonl");
    let text = std::fs::read_to_string(&json_path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[6] = lines[6].replacen("\"mean_radius\":", "\"mean_radius\":\"big\",\"x_\":", 1);
    std::fs::write(&broken, lines.join("\n")).unwrap();
    let err = SiteDataset::prepare(
        "bc",
        &config(&broken, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap()
    .load()
    .unwrap_err()
    .to_string();
    assert!(err.contains("broken.jsonl:7"), "{err}");
}

#[test]
fn a_malformed_raw_csv_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let (data, columns, anonymize, _) = raw_dataset(dir.path());
    let text = std::fs::read_to_string(&data).unwrap();
    let text = text.replacen("1954-", "1954/", 1);
    let line = text.lines().position(|l| l.contains("1954/")).unwrap() + 1;
    std::fs::write(&data, text).unwrap();
    let err = SiteDataset::prepare(
        "bc",
        &config(&data, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap()
    .load()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("patients.csv:{line}, column `date_of_birth`")),
        "{err}"
    );
}

#[test]
fn a_plain_dataset_is_committed_too() {
    let c = DatasetConfig {
        path: data_dir().join("breast_cancer_wisconsin.csv"),
        schema: data_dir().join("breast_cancer.schema.toml"),
        validation_fraction: 0.2,
        ..Default::default()
    };
    let a = SiteDataset::prepare("bc", &c, Some(&SECRET))
        .unwrap()
        .load()
        .unwrap();
    let b = SiteDataset::prepare("bc", &c, Some(&SECRET))
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(a.commitment.unwrap().rows, 569);
    assert_eq!(a.commitment, b.commitment);
    assert!(a.deid.is_none());
    let none = SiteDataset::prepare("bc", &c, None)
        .unwrap()
        .load()
        .unwrap();
    assert!(none.commitment.is_none());
}

/// The documented examples under deploy/data/ parse, and the example pipeline is the demo's.
#[test]
fn the_deploy_examples_are_valid_and_the_pipeline_is_the_demos() {
    use tutela_privacy::anonymize::{AnonymizeConfig, Schema};
    let deploy = data_dir().join("../deploy/data");
    let example = std::fs::read_to_string(deploy.join("patients.anonymize.toml")).unwrap();
    assert_eq!(
        AnonymizeConfig::from_toml(&example).unwrap(),
        AnonymizeConfig::from_toml(DEMO_ANONYMIZE_TOML).unwrap()
    );
    let columns =
        Schema::from_toml(&std::fs::read_to_string(deploy.join("patients.columns.toml")).unwrap())
            .unwrap();
    tutela_privacy::anonymize::Pipeline::new(
        columns,
        AnonymizeConfig::from_toml(&example).unwrap(),
    )
    .unwrap();
}

/// The case: a malformed date in a declared dataset. The failure a task would be
/// declined with says what and which column (`data.invalid_value column=date_of_birth`); the
/// value, the file and the line stay in the site's log.
#[test]
fn a_malformed_date_leaves_the_site_as_a_code_and_a_column() {
    let dir = tempfile::tempdir().unwrap();
    let (data, columns, anonymize, _) = raw_dataset(dir.path());
    let people = synthetic_identities(5, 1);
    let dob = &people[0].date_of_birth;
    let text = std::fs::read_to_string(&data).unwrap();
    let planted = text.replacen(dob.as_str(), "1990-13-45", 1);
    assert_ne!(
        planted, text,
        "the first person's date of birth is in the file"
    );
    std::fs::write(&data, planted).unwrap();
    let site = SiteDataset::prepare(
        "breast_cancer",
        &config(&data, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap();
    let err = site.load().unwrap_err();
    let failure = tutela_site_node::failure::SiteFailure::from(&err);
    assert_eq!(
        failure.wire_reason(),
        "data.invalid_value column=date_of_birth"
    );
    let log = failure.to_string();
    assert!(
        log.contains("1990-13-45") && log.contains("patients.csv"),
        "{log}"
    );
}

/// A declared dataset's file was first opened at the first task; now at start.
#[test]
fn a_missing_declared_data_file_is_refused_at_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let (data, columns, anonymize, _) = raw_dataset(dir.path());
    std::fs::remove_file(&data).unwrap();
    let err = SiteDataset::prepare(
        "breast_cancer",
        &config(&data, &columns, Some(&anonymize)),
        Some(&SECRET),
    )
    .unwrap_err();
    assert!(
        matches!(err, tutela_site_node::data::DataError::Io { ref path, .. } if *path == data),
        "{err}"
    );
}
