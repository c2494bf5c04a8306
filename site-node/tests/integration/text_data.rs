//! Text datasets at the site: `[text_datasets.<name>]` checked at start without reading a record,
//! the Synthea notes loaded through the protection pipeline (no name left, split by patient,
//! report, commitment), plain-text sources, and refusals of malformed or oversize input with
//! local errors that name file and line and public reasons that name neither.

use crate::common::data_dir;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tutela_site_node::config::NodeConfig;
use tutela_site_node::lm::text_dataset::{TextDataset, TextDatasetConfig, TextDatasetError};
use tutela_site_node::lm::text_source::TextSourceError;

const SECRET: [u8; 32] = [7u8; 32];

fn config(toml_text: &str) -> TextDatasetConfig {
    toml::from_str(toml_text).unwrap()
}

fn notes_config(extra: &str) -> TextDatasetConfig {
    config(&format!(
        r#"
path = "{}"
text_field = "text"
id_field = "note_id"
patient_field = "patient_id"
date_field = "date"
validation_fraction = 0.2
{extra}
"#,
        data_dir().join("synthea_clinical_notes.jsonl").display()
    ))
}

/// The patients' names, from the line after the notes' `# History of Present Illness` heading.
fn names_in_notes() -> HashSet<String> {
    let text = std::fs::read_to_string(data_dir().join("synthea_clinical_notes.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let t = v["text"].as_str()?.to_string();
            let at = t.find("# History of Present Illness\n")? + 29;
            t[at..].lines().next().map(|n| n.trim().to_string())
        })
        .flat_map(|n| n.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

#[test]
fn the_synthea_notes_load_protected_split_by_patient_and_committed() {
    let dir = tempfile::tempdir().unwrap();
    let blocklist = dir.path().join("blocklist.txt");
    std::fs::write(&blocklist, "# terms we never train on\nsocial isolation\n").unwrap();
    let c = notes_config(&format!(
        "[content_filter]\nblocklist_file = \"{}\"\nscope = \"line\"\n",
        blocklist.display()
    ));
    let dataset = TextDataset::prepare("clinical_notes", &c, &SECRET).unwrap();
    let loaded = dataset.load().unwrap();
    let docs = &loaded.documents;
    let report = &loaded.report;
    assert!(!docs.train.is_empty() && !docs.validation.is_empty());
    // No patient name survives, and no line with the blocked term.
    let names = names_in_notes();
    assert!(names.len() >= 19, "{names:?}");
    for d in docs.train.iter().chain(&docs.validation) {
        for n in &names {
            assert!(!d.text.contains(n.as_str()), "{n} survives");
        }
        assert!(!d.text.to_lowercase().contains("social isolation"));
    }
    // No patient on both sides.
    let train: HashSet<u32> = docs.train.iter().map(|d| d.unit).collect();
    let validation: HashSet<u32> = docs.validation.iter().map(|d| d.unit).collect();
    assert!(train.is_disjoint(&validation));
    // The report's counts add up.
    let f = report.content_filter.as_ref().unwrap();
    let nd = report.near_duplicates.as_ref().unwrap();
    assert_eq!(report.documents_in, 1215);
    assert!(f.lines_dropped > 0);
    assert_eq!(
        report.documents_in,
        report.empty_documents
            + f.documents_dropped
            + f.documents_emptied
            + nd.documents_dropped
            + report.documents_out
    );
    assert_eq!(loaded.commitment.rows as usize, report.documents_out);
    assert_eq!(report.config_sha256, dataset.protection_digest());
    // Loaded once: the same result, without reading again.
    assert!(std::sync::Arc::ptr_eq(&loaded, &dataset.load().unwrap()));
    // Another node process with the same files and secret commits to the same documents.
    let again = TextDataset::prepare("clinical_notes", &c, &SECRET).unwrap();
    assert_eq!(again.load().unwrap().commitment, loaded.commitment);
    // Another site secret: another salt, another root.
    let other = TextDataset::prepare("clinical_notes", &c, &[8u8; 32]).unwrap();
    assert_ne!(
        other.load().unwrap().commitment.root,
        loaded.commitment.root
    );
    println!(
        "notes: {} in, {} near-duplicates dropped, {} lines filtered, {} train / {} validation documents",
        report.documents_in,
        nd.documents_dropped,
        f.lines_dropped,
        docs.train.len(),
        docs.validation.len()
    );
}

/// Writes `text` as a dataset file and returns a config reading it as JSON Lines.
fn jsonl_dataset(dir: &Path, text: &str, extra: &str) -> (PathBuf, TextDatasetConfig) {
    let path = dir.join("notes.jsonl");
    std::fs::write(&path, text).unwrap();
    let c = config(&format!(
        "path = \"{}\"\npatient_field = \"patient\"\n{extra}",
        path.display()
    ));
    (path, c)
}

fn load_error(name: &str, c: &TextDatasetConfig) -> TextDatasetError {
    TextDataset::prepare(name, c, &SECRET)
        .expect("prepare reads no record")
        .load()
        .unwrap_err()
}

#[test]
fn malformed_lines_and_oversize_documents_are_refused_locally_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"patient": "p1", "text": "Alice123 has a cough."}"#;
    let cases: Vec<(String, &str, &str, Option<&str>)> = vec![
        // (file text, code, what the local message says, field)
        (
            format!("{good}\n{{\"patient\": \"p2\", \"text\": \"Secret412 value\"\n"),
            "bad_json",
            ":2:",
            None,
        ),
        (
            format!("{good}\n{good}\n[\"Secret412\"]\n"),
            "bad_json",
            ":3:",
            None,
        ),
        (
            format!("{good}\n{{\"patient\": \"p2\", \"body\": \"Secret412\"}}\n"),
            "missing_field",
            ":2: field `text`",
            Some("text"),
        ),
        (
            format!("{{\"patient\": \"p2\", \"text\": 412}}\n{good}\n"),
            "field_type",
            ":1: field `text`",
            Some("text"),
        ),
        (
            format!("{good}\n{{\"text\": \"Secret412 has no patient\"}}\n"),
            "missing_field",
            ":2: field `patient`",
            Some("patient"),
        ),
        // Attack: a key given twice. serde_json would keep the last value, a review tool the
        // first: the node would train on (and group by) a value nobody looked at.
        (
            format!(
                "{good}\n{{\"patient\": \"p2\", \"text\": \"ok\", \"patient\": \"Secret412\"}}\n"
            ),
            "duplicate_field",
            ":2: the key `patient` is given twice",
            None,
        ),
        (
            format!("{good}\n{{\"patient\": \"p2\", \"text\": \"Secret412\", \"text\": \"ok\"}}\n"),
            "duplicate_field",
            ":2: the key `text` is given twice",
            None,
        ),
        (
            format!(
                "{good}\n{{\"patient\": \"p2\", \"text\": \"{}\"}}\n",
                "Secret412 ".repeat(20)
            ),
            "document_too_large",
            ":2: the document is larger than max_document_bytes = 64",
            None,
        ),
        (
            format!(
                "{good}\n{{\"patient\": \"p2\", \"text\": \"{}\"}}\n",
                "x".repeat(200_000)
            ),
            "line_too_long",
            ":2: the line is longer than",
            None,
        ),
    ];
    for (text, code, local, field) in cases {
        let (path, c) = jsonl_dataset(dir.path(), &text, "max_document_bytes = 64\n");
        let err = load_error("notes", &c);
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains(local),
            "{code}: {message}"
        );
        let TextDatasetError::Source { source, .. } = &err else {
            panic!("{code}: {err:?}");
        };
        assert_eq!(source.code(), code, "{message}");
        assert_eq!(source.field(), field);
        // What may leave the site: the code and the field's name, no value, path or line.
        let public = err.public_reason();
        assert!(public.contains(code), "{public}");
        assert!(
            !public.contains("Secret412")
                && !public.contains("notes.jsonl")
                && !public.contains(":2")
        );
    }
    // Invalid UTF-8 in a plain-text file.
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"first note\nsecond \xff note\n").unwrap();
    let c = config(&format!("path = \"{}\"\n", path.display()));
    let err = load_error("notes", &c);
    assert!(
        matches!(
            &err,
            TextDatasetError::Source {
                source: TextSourceError::NotUtf8 { line: 2, .. },
                ..
            }
        ),
        "{err}"
    );
}

/// Attack (a new site engineer's exports): one patient's serial written as `7` by one tool, `7.0`
/// and `" 7"` by others. Three spellings must not be three privacy units (each clipped and
/// sampled on its own, the patient's weight in the model tripled).
#[test]
fn a_patient_serial_spelt_as_integer_float_or_padded_text_is_one_unit() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = vec![
        r#"{"patient": 7, "text": "first note of patient seven: cough"}"#.to_string(),
        r#"{"patient": 7.0, "text": "second note of patient seven: fever"}"#.to_string(),
        r#"{"patient": " 7", "text": "third note of patient seven: rash"}"#.to_string(),
        r#"{"patient": 7e0, "text": "fourth note of patient seven: better"}"#.to_string(),
    ];
    for k in 0..8 {
        lines.push(format!(
            r#"{{"patient": {}, "text": "a note of patient {k}: a broken wrist"}}"#,
            100 + k
        ));
    }
    let (_, c) = jsonl_dataset(dir.path(), &(lines.join("\n") + "\n"), "");
    let loaded = TextDataset::prepare("notes", &c, &SECRET)
        .unwrap()
        .load()
        .unwrap();
    let docs: Vec<_> = loaded
        .documents
        .train
        .iter()
        .chain(&loaded.documents.validation)
        .collect();
    let seven: HashSet<u32> = docs
        .iter()
        .filter(|d| d.text.contains("patient seven"))
        .map(|d| d.unit)
        .collect();
    assert_eq!(seven.len(), 1, "patient 7 is {} units", seven.len());
    let split = &loaded.report.split;
    assert_eq!(split.train_units + split.validation_units, 9);
}

#[test]
fn prepare_checks_configuration_and_files_but_reads_no_record() {
    let dir = tempfile::tempdir().unwrap();
    // A file that is nothing but garbage prepares fine (no record is read at start)...
    let (_, c) = jsonl_dataset(dir.path(), "not json at all\n", "");
    let prepared = TextDataset::prepare("notes", &c, &SECRET).unwrap();
    // ...and is refused when loaded.
    assert!(matches!(
        prepared.load(),
        Err(TextDatasetError::Source { .. })
    ));
    // A missing file, a missing blocklist, bad values: refused at start, naming what.
    let missing = config("path = \"/nonexistent/notes.jsonl\"\n");
    assert!(matches!(
        TextDataset::prepare("notes", &missing, &SECRET),
        Err(TextDatasetError::Source { .. })
    ));
    let (_, c) = jsonl_dataset(
        dir.path(),
        "{}\n",
        "[content_filter]\nblocklist_file = \"/nonexistent/blocklist.txt\"\n",
    );
    let err = TextDataset::prepare("notes", &c, &SECRET).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/blocklist.txt"),
        "{err}"
    );
    for (extra, key) in [
        ("validation_fraction = 1.5\n", "validation_fraction"),
        ("max_document_bytes = 0\n", "max_document_bytes"),
        ("[near_duplicates]\nmax_hamming = 40\n", "near_duplicates"),
        ("documents = \"line\"\n", "documents"),
    ] {
        let (_, c) = jsonl_dataset(dir.path(), "{}\n", extra);
        match TextDataset::prepare("notes", &c, &SECRET) {
            Err(TextDatasetError::Config { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{extra}: {other:?}"),
        }
    }
    // An unknown key is a syntax error, never ignored.
    assert!(toml::from_str::<TextDatasetConfig>("path = \"x\"\nmax_hamming = 3\n").is_err());
}

#[test]
fn plain_text_sources_one_per_line_delimited_or_one_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let notes: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "Note {i}: patient Person{i} was seen on 2021-03-{:02} for a cough number {i}.",
                i + 1
            )
        })
        .collect();
    // One per line (blank lines skipped).
    let lines = dir.path().join("lines.txt");
    std::fs::write(&lines, format!("{}\n\n", notes.join("\n"))).unwrap();
    // Delimited by "---" lines, documents spanning two lines.
    let delimited = dir.path().join("delimited.txt");
    let blocks: Vec<String> = notes.iter().map(|n| format!("{n}\nSecond line.")).collect();
    std::fs::write(&delimited, blocks.join("\n---\n")).unwrap();
    // One per file.
    let files = dir.path().join("notes");
    std::fs::create_dir(&files).unwrap();
    for (i, n) in notes.iter().enumerate() {
        std::fs::write(files.join(format!("{i:02}.txt")), n).unwrap();
    }
    std::fs::write(files.join(".hidden"), "ignored").unwrap();
    for (path, extra) in [
        (&lines, ""),
        (
            &delimited,
            "documents = \"delimited\"\ndelimiter = \"---\"\n",
        ),
        (&files, "documents = \"file\"\n"),
    ] {
        // Near-duplicate removal off: these notes differ in a few words only.
        let c = config(&format!(
            "path = \"{}\"\nformat = \"text\"\nvalidation_fraction = 0.25\n{extra}[near_duplicates]\nenabled = false\n",
            path.display()
        ));
        let loaded = TextDataset::prepare("notes", &c, &SECRET)
            .unwrap()
            .load()
            .unwrap();
        let docs: Vec<&str> = loaded
            .documents
            .train
            .iter()
            .chain(&loaded.documents.validation)
            .map(|d| d.text.as_str())
            .collect();
        assert_eq!(docs.len(), 12, "{extra}");
        assert_eq!(loaded.documents.validation.len(), 3, "{extra}");
        for d in &docs {
            assert!(d.contains("[NAME]") && d.contains("[DATE]"), "{extra}: {d}");
            assert!(!d.contains("Person") && !d.contains("2021"), "{extra}: {d}");
        }
        if extra.contains("delimited") {
            assert!(docs.iter().all(|d| d.contains("Second line.")));
        }
    }
    // With deduplication on (the default), these twelve near-identical notes collapse.
    let c = config(&format!("path = \"{}\"\n", lines.display()));
    let loaded = TextDataset::prepare("notes", &c, &SECRET)
        .unwrap()
        .load()
        .unwrap();
    assert!(
        loaded
            .report
            .near_duplicates
            .as_ref()
            .unwrap()
            .documents_dropped
            > 0
    );
}

#[test]
fn node_config_declares_text_datasets_and_checks_them() {
    let base = r#"
site = "hospital-a"
coordinator = "coord.example:7443"
work_dir = "work"
insecure_no_approvals = true
site_secret_file = "secret"
[tls]
ca = "ca.crt"
cert = "node.crt"
key = "node.key"
[datasets.breast_cancer]
path = "bc.csv"
schema = "bc.schema.toml"
"#;
    let with =
        |table: &str| NodeConfig::from_toml_str(&format!("{base}{table}"), "/etc/tutela/node.toml");
    let c = with("[text_datasets.notes]\npath = \"notes.jsonl\"\npatient_field = \"patient_id\"\n[text_datasets.notes.redaction]\nnames_file = \"names.txt\"\n").unwrap();
    let notes = &c.text_datasets["notes"];
    // Relative paths are resolved against the config's directory.
    assert_eq!(notes.path, Path::new("/etc/tutela/notes.jsonl"));
    assert_eq!(
        notes.redaction.names_file.as_deref(),
        Some(Path::new("/etc/tutela/names.txt"))
    );
    let err =
        with("[text_datasets.notes]\npath = \"n.jsonl\"\nvalidation_fraction = 0\n").unwrap_err();
    assert_eq!(err.key(), Some("text_datasets.notes.validation_fraction"));
    let err = with("[text_datasets.breast_cancer]\npath = \"n.jsonl\"\n").unwrap_err();
    assert_eq!(err.key(), Some("text_datasets.breast_cancer"));
    let err = with("[text_datasets.notes]\npath = \"n.txt\"\npatient_field = \"p\"\n").unwrap_err();
    assert_eq!(err.key(), Some("text_datasets.notes.patient_field"));
    // The documented example declares one, with every key.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node.toml");
    let example = NodeConfig::load(&path).unwrap();
    let notes = example
        .text_datasets
        .get("clinical_notes")
        .expect("documented");
    assert!(notes.content_filter.is_some() && notes.patient_field.is_some());
}
