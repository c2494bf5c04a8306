//! Checking a site's datasets before anyone signs: `tutela-node data check --config node.toml`
//! and the node's own check at start.
//!
//! [`check_all`] prepares and reads every configured dataset, tabular and text, the way a task
//! would, and lists every problem it finds in each (file, line, column and what to do, for the
//! site engineer's eyes: it may quote values). At start the node runs the same check on each
//! tabular dataset ([`passes_at_start`]) and does not offer the coordinator a dataset that fails:
//! its log says which, and why; nothing of it leaves the site.

use std::fmt;

use crate::config::NodeConfig;
use crate::data::CheckReport;
use crate::dataset::SiteDataset;
use crate::lm::text_dataset::TextDataset;

/// What one dataset's check found.
#[derive(Debug)]
pub enum Outcome {
    /// A tabular dataset that read without a problem.
    TableReady {
        rows: usize,
        features: usize,
        schema_sha256: String,
    },
    /// A text dataset that read without a problem.
    TextReady { documents: usize },
    /// The problems of a tabular dataset (at least one).
    TableProblems(CheckReport),
    /// Why a dataset could not be prepared or read at all.
    Unusable(String),
}

/// One configured dataset and its check.
#[derive(Debug)]
pub struct DatasetCheck {
    pub name: String,
    /// `table` or `text`.
    pub kind: &'static str,
    pub outcome: Outcome,
}

impl DatasetCheck {
    pub fn is_ok(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::TableReady { .. } | Outcome::TextReady { .. }
        )
    }

    /// How many problems it found (one for an unusable dataset).
    pub fn problem_count(&self) -> usize {
        match &self.outcome {
            Outcome::TableReady { .. } | Outcome::TextReady { .. } => 0,
            Outcome::TableProblems(report) => report.problems.len() + report.more,
            Outcome::Unusable(_) => 1,
        }
    }
}

impl fmt::Display for DatasetCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, kind) = (&self.name, self.kind);
        match &self.outcome {
            Outcome::TableReady {
                rows,
                features,
                schema_sha256,
            } => writeln!(
                f,
                "{kind} dataset {name}: ready, {rows} rows, {features} features, schema sha256 {schema_sha256}\n  a job on it names, in its [data] table: schema_sha256 = \"{schema_sha256}\""
            ),
            Outcome::TextReady { documents } => {
                writeln!(f, "{kind} dataset {name}: ready, {documents} documents")
            }
            Outcome::TableProblems(report) => {
                writeln!(
                    f,
                    "{kind} dataset {name}: {} problem(s), not offered to jobs until fixed:",
                    report.problems.len() + report.more
                )?;
                write!(f, "{report}")
            }
            Outcome::Unusable(why) => {
                writeln!(f, "{kind} dataset {name}: cannot be used:\n  {why}")
            }
        }
    }
}

/// The check of one prepared tabular dataset.
pub fn check_table(dataset: &SiteDataset) -> Outcome {
    let report = dataset.check();
    if report.is_ok() {
        Outcome::TableReady {
            rows: report.good_rows,
            features: report.n_features.unwrap_or_else(|| dataset.n_features()),
            schema_sha256: dataset.schema_sha256().to_string(),
        }
    } else {
        Outcome::TableProblems(report)
    }
}

/// Prepares and reads every dataset of the config; one entry per dataset, tables first.
pub fn check_all(config: &NodeConfig) -> Vec<DatasetCheck> {
    let secret = config.site_secret_file.as_ref().map(|path| {
        tutela_privacy::at_rest::read_secret_file_outside(path, &config.work_dir)
            .map_err(|e| format!("site_secret_file: {e}"))
    });
    let secret_bytes = match &secret {
        Some(Ok(s)) => Some(&**s),
        _ => None,
    };
    let secret_problem = match &secret {
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    };
    let mut checks = Vec::new();
    for (name, d) in &config.datasets {
        let outcome = match (&secret_problem, d.columns.is_some()) {
            (Some(problem), true) => Outcome::Unusable(problem.clone()),
            _ => match SiteDataset::prepare(name, d, secret_bytes) {
                Ok(dataset) => check_table(&dataset),
                Err(e) => Outcome::Unusable(e.to_string()),
            },
        };
        checks.push(DatasetCheck {
            name: name.clone(),
            kind: "table",
            outcome,
        });
    }
    for (name, d) in &config.text_datasets {
        let outcome = match (&secret_problem, secret_bytes) {
            (Some(problem), _) => Outcome::Unusable(problem.clone()),
            (None, None) => Outcome::Unusable("needs the top-level site_secret_file".into()),
            (None, Some(secret)) => {
                match TextDataset::prepare(name, d, secret).and_then(|text| text.load()) {
                    Ok(loaded) => Outcome::TextReady {
                        documents: loaded.documents.train.len() + loaded.documents.validation.len(),
                    },
                    Err(e) => Outcome::Unusable(e.to_string()),
                }
            }
        };
        checks.push(DatasetCheck {
            name: name.clone(),
            kind: "text",
            outcome,
        });
    }
    checks
}

/// The dataset, if it passes the check at start ([`passes_at_start`]); the agent offers only
/// these.
pub fn offered(dataset: SiteDataset) -> Option<SiteDataset> {
    passes_at_start(&dataset).then_some(dataset)
}

/// The node's check at start of one prepared tabular dataset: `true` if it may be offered. A
/// dataset that fails is logged (here, at the site) with every problem, and not offered.
pub fn passes_at_start(dataset: &SiteDataset) -> bool {
    let check = DatasetCheck {
        name: dataset.name().to_string(),
        kind: "table",
        outcome: check_table(dataset),
    };
    if check.is_ok() {
        return true;
    }
    tracing::error!(
        dataset = %check.name,
        problems = check.problem_count(),
        "dataset NOT offered to jobs: it fails the data check (`tutela-node data check` lists the same):\n{check}"
    );
    false
}
