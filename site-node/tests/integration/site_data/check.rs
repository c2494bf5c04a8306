//! `data check`, the node's check at start, and the errors of the schema and of the config.

use super::*;

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

/// A Parquet column of a type the node does not read is refused, naming the column and its type
/// (and what to do), not a value.
#[test]
fn a_parquet_column_of_an_unread_type_is_named() {
    use arrow_array::TimestampMillisecondArray;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stamped.parquet");
    let batch = RecordBatch::try_from_iter([
        (
            "seen_at",
            Arc::new(TimestampMillisecondArray::from(vec![1_700_000_000_000i64])) as ArrayRef,
        ),
        (
            "outcome",
            Arc::new(StringArray::from(vec!["well"])) as ArrayRef,
        ),
    ])
    .unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let schema = DatasetSchema::from_toml_str(
        "name = \"s\"\n[label]\ncolumn = \"outcome\"\nclasses = [\"well\", \"ill\"]\n\
         [features]\nall_other_columns = true\n",
        "s.schema.toml",
    )
    .unwrap();
    let e = read_table(
        source::open("s", &file_config(&path, Path::new("s.schema.toml")))
            .unwrap()
            .as_mut(),
        &schema,
    )
    .unwrap_err();
    let message = e.to_string();
    assert!(
        message.contains("column \"seen_at\" has the type Timestamp(ms)")
            && message.contains("export it as text, a number, a boolean or a date"),
        "{message}"
    );
    assert!(!message.contains("1700000000000"), "{message}");

    // Attack (a new site engineer's export): nested columns, a struct and a list, holding
    // identifying text. Refused naming the column and its type, never a value inside.
    let street = Arc::new(StringArray::from(vec!["221B Baker Street"])) as ArrayRef;
    let nested: [(&str, ArrayRef); 2] = [
        (
            "address",
            Arc::new(arrow_array::StructArray::from(vec![(
                Arc::new(arrow_schema::Field::new(
                    "street",
                    arrow_schema::DataType::Utf8,
                    false,
                )),
                street.clone(),
            )])),
        ),
        (
            "streets",
            Arc::new(arrow_array::ListArray::from_iter_primitive::<
                arrow_array::types::Int32Type,
                _,
                _,
            >(vec![Some(vec![Some(987_654_321)])])),
        ),
    ];
    for (name, column) in nested {
        let path = dir.path().join(format!("{name}.parquet"));
        let batch = RecordBatch::try_from_iter([
            (name, column),
            (
                "outcome",
                Arc::new(StringArray::from(vec!["well"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let mut writer =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None)
                .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let message = read_table(
            source::open("s", &file_config(&path, Path::new("s.schema.toml")))
                .unwrap()
                .as_mut(),
            &schema,
        )
        .unwrap_err()
        .to_string();
        assert!(
            message.contains(&format!("column \"{name}\" has the type")),
            "{message}"
        );
        assert!(
            !message.contains("Baker") && !message.contains("987654321"),
            "{message}"
        );
    }
}
