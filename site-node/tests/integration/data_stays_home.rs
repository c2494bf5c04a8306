//! Nothing of the data in what leaves the site, and bounded memory on any input.
//!
//! Each planted fault (a malformed date, text in a numeric column, an unknown label, an
//! undeclared column, a missing file, a gigabyte line) goes through the real readers; the
//! failure's wire reason (what `DeclineTask` carries to the coordinator, which stores it and may
//! put it in the trail) must hold the code and column and nothing of the value or the path,
//! while the site's own log line keeps both.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tutela_privacy::anonymize::{RecordFormat, Schema, reader};
use tutela_site_node::data::{DataError, DatasetSchema, load_csv};
use tutela_site_node::failure::SiteFailure;

const SCHEMA: &str = r#"
name = "toy"
[label]
column = "outcome"
classes = ["no", "yes"]
[features]
columns = [{ name = "age" }, { name = "dose" }]
"#;

const COLUMNS: &str = r#"
[[column]]
name = "record"
role = "direct_identifier"
type = "text"
[[column]]
name = "date_of_birth"
role = "quasi_identifier"
type = "date"
[[column]]
name = "age"
role = "feature"
type = "int"
[[column]]
name = "dose"
role = "feature"
type = "float"
[[column]]
name = "outcome"
role = "label"
type = "text"
"#;

/// A plain CSV schema whose feature count comes from the file's header line.
const HEADER_SCHEMA: &str = r#"
name = "toy"
[label]
column = "outcome"
classes = ["no", "yes"]
[features]
all_other_columns = true
"#;

fn schema() -> DatasetSchema {
    DatasetSchema::from_toml_str(SCHEMA, "toy.schema.toml").unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The wire reason of `failure` is exactly `expected`, holds none of `secrets` (values and the
/// path), and the site's log line holds all of them.
fn check(failure: SiteFailure, expected: &str, secrets: &[&str]) {
    let wire = failure.wire_reason();
    assert_eq!(wire, expected, "log line: {failure}");
    let log = failure.to_string();
    for s in secrets {
        assert!(!wire.contains(s), "{s:?} leaks in {wire:?}");
        assert!(
            log.contains(s),
            "{s:?} missing from the site's log line {log:?}"
        );
    }
}

#[test]
fn no_cell_value_or_path_in_any_decline_reason() {
    let dir = tempfile::tempdir().unwrap();
    let dir_text = dir.path().display().to_string();

    // Plain CSV: text in a numeric column, an unknown label, a missing value, NaN.
    let cases: &[(&str, &str, &str)] = &[
        (
            "age,dose,outcome\n40,1.5,yes\n41,forty-two,no\n",
            "data.invalid_value column=dose",
            "forty-two",
        ),
        (
            "age,dose,outcome\n40,1.5,Jane Doe\n",
            "data.unknown_label column=outcome",
            "Jane Doe",
        ),
        (
            "age,dose,outcome\n40,NaN,yes\n",
            "data.invalid_value column=dose",
            "NaN",
        ),
        (
            "age,dose,outcome\n40,,yes\n",
            "data.missing_value column=dose",
            "line 2",
        ),
        (
            "age,dose,outcome\n40,1,yes,555-12-3456\n",
            "data.malformed",
            "line 2",
        ),
    ];
    for (i, (text, expected, value)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("patients-{i}.csv"), text);
        let err = load_csv(&path, &schema()).unwrap_err();
        check(SiteFailure::from(&err), expected, &[value, &dir_text]);
    }

    // A declared dataset read by the anonymization reader: the issue's malformed date, a text
    // in an integer column, a column the declaration lacks (its header cell is not a plain name).
    let columns = Schema::from_toml(COLUMNS).unwrap();
    let declared: &[(&str, &str, &str)] = &[
        (
            "record,date_of_birth,age,dose,outcome\nP-1,1990-01-02,40,1,yes\nP-2,1990-13-45,41,2,no\n",
            "data.invalid_value column=date_of_birth",
            "1990-13-45",
        ),
        (
            "record,date_of_birth,age,dose,outcome\nP-1,1990-01-02,forty,1,yes\n",
            "data.invalid_value column=age",
            "forty",
        ),
        (
            "record,date_of_birth,age,dose,outcome,Jane Doe 1990-01-02\nP-1,1990-01-02,40,1,yes,x\n",
            "data.unexpected_column",
            "Jane Doe",
        ),
    ];
    for (i, (text, expected, value)) in declared.iter().enumerate() {
        let path = write(dir.path(), &format!("raw-{i}.csv"), text);
        let err = DataError::from(reader::read_file(&path, None, &columns).unwrap_err());
        check(SiteFailure::from(&err), expected, &[value, &dir_text]);
    }
    let path = write(
        dir.path(),
        "raw.jsonl",
        "{\"record\":\"P-1\",\"date_of_birth\":\"1990-13-45\",\"age\":40,\"outcome\":\"yes\"}\n",
    );
    let err = DataError::from(reader::read_file(&path, None, &columns).unwrap_err());
    check(
        SiteFailure::from(&err),
        "data.invalid_value column=date_of_birth",
        &["1990-13-45", &dir_text],
    );

    // A missing file.
    let missing = dir.path().join("gone").join("patients.csv");
    let err = load_csv(&missing, &schema()).unwrap_err();
    check(SiteFailure::from(&err), "data.unreadable", &[&dir_text]);
}

/// Whether this process is the child of [`a_gigabyte_line_is_refused_fast_with_bounded_memory`].
const CHILD: &str = "TUTELA_TEST_HUGE_LINE_FILE";

/// The process's peak resident memory so far, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The header of [`HUGE_ROW`]: every column both the plain schema and the declaration name.
const HEADER: &[u8] = b"record,date_of_birth,age,dose,outcome\n";
/// A file whose second line is a gigabyte long, and one whose first line is.
const HUGE_ROW: &str = "huge-row.csv";
const HUGE_HEADER: &str = "huge-header.csv";

/// The readers the child runs on the sparse files in `dir`, each of which must refuse them as
/// too long.
fn read_huge(dir: &Path) -> Vec<(&'static str, String)> {
    let (row, header) = (dir.join(HUGE_ROW), dir.join(HUGE_HEADER));
    let columns = Schema::from_toml(COLUMNS).unwrap();
    let mut out = Vec::new();
    let e = load_csv(&row, &schema()).unwrap_err();
    assert!(matches!(e, DataError::TooLong { .. }), "{e}");
    out.push(("site-node csv", SiteFailure::from(&e).wire_reason()));
    for (path, format) in [(&row, RecordFormat::Csv), (&header, RecordFormat::Jsonl)] {
        let e = DataError::from(reader::read_file(path, Some(format), &columns).unwrap_err());
        out.push(("anonymize reader", SiteFailure::from(&e).wire_reason()));
    }
    // The start-time header read of a plain CSV dataset.
    let schema_path = dir.join("toy.schema.toml");
    std::fs::write(&schema_path, HEADER_SCHEMA).unwrap();
    let config: tutela_site_node::config::DatasetConfig = toml::from_str(&format!(
        "path = {:?}\nschema = {:?}\n",
        header.display().to_string(),
        schema_path.display().to_string()
    ))
    .unwrap();
    let e = tutela_site_node::dataset::SiteDataset::prepare("toy", &config, None).unwrap_err();
    out.push(("start-time header", SiteFailure::from(&e).wire_reason()));
    out
}

/// A 1 GiB file whose second line never ends (sparse: no disk used) is refused by every reader
/// within seconds, and the process's peak memory grows by a few MiB, not by the gigabyte (the
/// issue measured 8.2 GB and 103 s). Measured in a child process, so that other tests' memory
/// does not count.
#[test]
fn a_gigabyte_line_is_refused_fast_with_bounded_memory() {
    if let Ok(dir) = std::env::var(CHILD) {
        let before = peak_rss_kib();
        let started = Instant::now();
        let results = read_huge(Path::new(&dir));
        let seconds = started.elapsed().as_secs_f64();
        let grown = peak_rss_kib().saturating_sub(before);
        for (reader, reason) in results {
            println!("REFUSED {reader}: {reason}");
        }
        println!("RESULT grown_kib={grown} seconds={seconds}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, start) in [(HUGE_ROW, HEADER), (HUGE_HEADER, &b""[..])] {
        let mut file = std::fs::File::create(dir.path().join(name)).unwrap();
        file.write_all(start).unwrap();
        file.set_len(1 << 30).unwrap();
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "data_stays_home::a_gigabyte_line_is_refused_fast_with_bounded_memory",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The harness may print "test NAME ... " before the first line the child prints.
    let after =
        |l: &'static str| move |line: &str| line.find(l).map(|i| line[i + l.len()..].to_string());
    let refused: Vec<String> = stdout.lines().filter_map(after("REFUSED ")).collect();
    assert_eq!(refused.len(), 4, "{stdout}");
    for line in &refused {
        assert!(line.ends_with("data.too_long"), "{line}");
    }
    let result = stdout
        .lines()
        .find_map(after("RESULT "))
        .unwrap_or_else(|| panic!("no result in {stdout}"));
    let field = |name: &str| -> f64 {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let (grown_kib, seconds) = (field("grown_kib"), field("seconds"));
    eprintln!("4 reads of a 1 GiB line: peak RSS grew {grown_kib} KiB in {seconds:.2} s");
    // The limit is 1 MiB a line plus the readers' buffers: allow 32 MiB, far below 1 GiB.
    assert!(grown_kib < 32.0 * 1024.0, "{result}");
    assert!(seconds < Duration::from_secs(20).as_secs_f64(), "{result}");
}
