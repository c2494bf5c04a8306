//! Checks a service's `/metrics` as Prometheus's own tools would read it: Python's
//! `prometheus_client` text parser (tests/python/metrics_exposition.py, which also requires a HELP
//! on every family) and `promtool check metrics` (Debian's `prometheus` package, installed by
//! scripts/setup-promtool.sh). Without promtool the promtool half is skipped with a message,
//! unless `TUTELA_REQUIRE_PROMTOOL=1` (set by scripts/test.sh), which makes it a failure.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::python;

/// One sample of an exposition, as the Python parser read it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a parsed exposition.
#[derive(Debug)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Exposition {
    /// The value of `name` with exactly `labels`; panics (showing the text) if it is absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{labels:?} in the exposition:\n{}",
                self.text
            )
        })
    }

    /// The value of `name` with exactly `labels`, if present.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }
}

/// Whether promtool is required (`TUTELA_REQUIRE_PROMTOOL=1`).
pub fn promtool_required() -> bool {
    std::env::var("TUTELA_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1")
}

/// `promtool`, or `None` (with a message) when it is not installed and not required.
pub fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("promtool");
    }
    assert!(
        !promtool_required(),
        "promtool is not installed and TUTELA_REQUIRE_PROMTOOL=1: run scripts/setup-promtool.sh"
    );
    eprintln!(
        "promtool is not installed: its checks are skipped (scripts/setup-promtool.sh installs it)"
    );
    None
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("writing to the checker");
    child.wait_with_output().expect("the checker ends")
}

/// Parses `text` with the Python client's parser and lints it with `promtool check metrics`;
/// panics naming `what` if either refuses it.
pub fn check_exposition(what: &str, text: &str) -> Exposition {
    let script = crate::repo_root().join("tests/python/metrics_exposition.py");
    let out = run_with_stdin(Command::new(python()).arg(&script), text);
    assert!(
        out.status.success(),
        "{what}: Python's prometheus_client parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("the checker prints JSON lines"))
        .collect();
    if let Some(promtool) = promtool() {
        let out = run_with_stdin(Command::new(promtool).args(["check", "metrics"]), text);
        assert!(
            out.status.success(),
            "{what}: promtool check metrics refused the exposition:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Exposition {
        samples,
        text: text.to_string(),
    }
}

/// Scrapes `http://ADDR/metrics` and checks it ([`check_exposition`]). The text is kept as a
/// test artifact, `$TUTELA_ARTIFACTS/metrics/<what>.prom` (default
/// `target/test-artifacts/metrics`), for a person to read what a service exposes.
pub async fn scrape_and_check(what: &str, addr: SocketAddr) -> Exposition {
    let text = tutela_protocol::metrics::scrape(addr)
        .await
        .unwrap_or_else(|e| panic!("{what}: scraping http://{addr}/metrics: {e}"));
    let dir = match std::env::var_os("TUTELA_ARTIFACTS") {
        Some(d) => std::path::PathBuf::from(d).join("metrics"),
        None => crate::repo_root().join("target/test-artifacts/metrics"),
    };
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{}.prom", what.replace(' ', "-"))), &text);
    }
    check_exposition(what, &text)
}

/// Runs `promtool check rules` and `promtool test rules` on the shipped alert rules and their
/// unit tests under `dir` (deploy/monitoring/); skipped without promtool unless required.
pub fn check_rules(dir: &Path) {
    let Some(promtool) = promtool() else { return };
    for (args, file) in [
        (["check", "rules"], "alerts.yml"),
        (["test", "rules"], "alerts.test.yml"),
    ] {
        let out = Command::new(promtool)
            .args(args)
            .arg(dir.join(file))
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {} {}:\n{}{}",
            args.join(" "),
            file,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
