//! Reports a regulator reads: one job, or one period of the trail, as HTML (inline SVG charts) or
//! PDF (drawn vector charts), with the trail's verification result and sections mapped to the EU
//! AI Act (Art. 12 and 19), GDPR Art. 30 and HIPAA §164.312(b), each citing the events that
//! evidence it. What the trail cannot evidence is said, with where the statement comes from.
//!
//! Every report carries a machine-readable [`ReportManifest`]: the signed checkpoint it was made
//! from, the typed [`ReportContent`] every visible word is rendered from, and a SHA-256 digest
//! over both. HTML embeds it as `<script type="application/json" id="tutela-report-manifest">`,
//! PDF as the embedded file `tutela-report-manifest.json`. `tutela audit verify-report` then
//! checks, in order ([`check`]): the digest; that the document is exactly what the manifest
//! renders to (an edited number in the visible text is named); the checkpoint's signature; that
//! the live trail's head is consistent with it; that every cited event is included in it with
//! the content stated; and that the content is what the trail up to the checkpoint says (the
//! report is rebuilt from the trail and compared field by field), so a manifest edited and
//! re-digested is caught too.
//!
//! Modules: [`build`] (events to content), [`compliance`] (the regulatory sections), [`html`],
//! [`pdf`], [`check`].

pub mod build;
pub mod check;
pub mod compliance;
pub mod console;
pub mod html;
pub mod pdf;
pub mod trail;

use serde::{Deserialize, Serialize};

use crate::checkpoint::SignedCheckpoint;
use crate::event::{Action, Event, Timestamp};
use crate::filter::EventFilter;

pub use build::build_content;
pub use check::{CheckError, check_document};

/// The manifest's format name and version.
pub const REPORT_FORMAT: &str = "tutela-audit-report/v1";

/// The id of the HTML `<script>` block holding the manifest.
pub const HTML_MANIFEST_ID: &str = "tutela-report-manifest";

/// The name of the PDF's embedded file holding the manifest.
pub const PDF_MANIFEST_NAME: &str = "tutela-report-manifest.json";

/// At most this many events are cited under each section (the oldest first); the section says
/// how many more of the same kinds the scope holds.
pub const MAX_CITED_PER_SECTION: usize = 40;

/// At most this many points are drawn per budget chart (evenly chosen, the last always kept).
pub const MAX_CHART_POINTS: usize = 240;

/// What a report covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReportScope {
    /// Every event about one job (its subject, or its payload's `job`).
    Job { job: String },
    /// Every event with `from <= time < to`.
    Period { from: Timestamp, to: Timestamp },
}

impl ReportScope {
    /// A period, refusing an empty or reversed one.
    pub fn period(from: Timestamp, to: Timestamp) -> Result<ReportScope, ReportError> {
        if from >= to {
            return Err(ReportError::BadScope(format!(
                "the period's start {from} is not before its end {to}"
            )));
        }
        Ok(ReportScope::Period { from, to })
    }

    /// A job, refusing an empty id.
    pub fn job(job: &str) -> Result<ReportScope, ReportError> {
        if job.trim().is_empty() {
            return Err(ReportError::BadScope("the job id is empty".into()));
        }
        Ok(ReportScope::Job {
            job: job.to_string(),
        })
    }

    /// Whether `event` is inside the scope (by its job, or its time).
    pub fn contains(&self, event: &Event) -> bool {
        match self {
            ReportScope::Job { job } => EventFilter {
                job: Some(job.clone()),
                ..EventFilter::default()
            }
            .matches(event),
            ReportScope::Period { from, to } => event.timestamp >= *from && event.timestamp < *to,
        }
    }
}

/// The trail's verification, as it stood when the report was made (not re-derived by
/// `verify-report`, which verifies afresh).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationSummary {
    /// Every hash, link and checkpoint verified, and every event passed the authority rules
    /// (`Some(true)`), or not (`Some(false)`); `None`: no verification had finished when the
    /// report was made (the console's first run over a large trail takes minutes, and a request
    /// does not wait for it).
    pub intact: Option<bool>,
    /// When the verification finished.
    pub verified_at: Timestamp,
    /// Events verified.
    pub events: u64,
    /// Checkpoints whose signature and root were verified.
    pub checkpoints: u64,
    /// What was found, in words (the first bad row when broken).
    pub detail: String,
}

/// A line of text and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    pub text: String,
    /// `trail: ...` (with the events' seqs), `checkpoint`, `audit service configuration`, or
    /// `not in the trail: ...` saying where the fact is kept instead.
    pub source: String,
}

/// One labelled figure, rounded for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fact {
    pub label: String,
    pub value: String,
}

/// A table: a title, column names, rows of text (already rounded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Where the rows come from.
    pub source: String,
}

/// One event a section cites, as the report states it; `verify-report` proves each against the
/// checkpoint and compares these fields with the trail's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CitedEvent {
    pub seq: u64,
    pub action: Action,
    pub time: Timestamp,
    pub actor: String,
    pub subject: String,
    /// The event's SHA-256 (hex): binds everything else it holds.
    pub hash: String,
}

impl CitedEvent {
    pub fn of(e: &Event) -> CitedEvent {
        CitedEvent {
            seq: e.seq,
            action: e.action,
            time: e.timestamp,
            actor: e.actor.clone(),
            subject: e.subject.clone(),
            hash: hex::encode(e.hash),
        }
    }

    /// The row both renderings (HTML and PDF) print for it: seq, action, time (UTC), actor,
    /// subject. One place, so that the two documents cite an event alike.
    pub fn table_row(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            self.action.to_string(),
            crate::console::format::utc(self.time),
            self.actor.clone(),
            self.subject.clone(),
        ]
    }
}

/// A section mapped to a rule: what the rule asks, what the trail says, and the evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComplianceSection {
    /// Stable id (`eu-ai-act-art-12`, ...).
    pub id: String,
    /// E.g. `EU AI Act Art. 12: Record-keeping`.
    pub title: String,
    /// What the rule asks, paraphrased.
    pub requirement: String,
    pub statements: Vec<Statement>,
    /// The events cited, oldest first, at most [`MAX_CITED_PER_SECTION`].
    pub evidence: Vec<CitedEvent>,
    /// How many events in scope this section cites (before the cap).
    pub evidence_total: u64,
    /// What it cites, in words (`events of kinds job.proposed, ...`).
    pub evidence_kinds: String,
}

/// One privacy budget's ε over time (`privacy.spent`), with the caps the trail records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSeries {
    pub site: String,
    pub dataset: String,
    /// What the values are: the job's ε on the dataset (job reports) or every job's (periods).
    pub measure: String,
    /// (unix ms, ε) after each spend, oldest first, at most [`MAX_CHART_POINTS`].
    pub points: Vec<(i64, f64)>,
    /// (label, ε): each job's target ε from its signed spec.
    pub caps: Vec<(String, f64)>,
    /// How many spends the scope holds.
    pub spends: u64,
    /// The last value, rounded.
    pub epsilon_now: String,
}

/// Everything a report says that the trail determines: rebuilt by `verify-report` from the trail
/// up to [`ReportContent::tree_size`] and compared with what the report states.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportContent {
    pub scope: ReportScope,
    /// The report reads events `0..tree_size` (its checkpoint's).
    pub tree_size: u64,
    pub title: String,
    pub facts: Vec<Fact>,
    pub budgets: Vec<BudgetSeries>,
    pub tables: Vec<Table>,
    pub sections: Vec<ComplianceSection>,
}

/// What made the report and when: bound by the digest, not re-derived from the trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportContext {
    pub generated_at: Timestamp,
    /// Who asked for it (their certificate identity), or the tool that wrote it.
    pub generated_by: String,
    pub verification: VerificationSummary,
    /// The audit service's `[retention] min_days`, when the maker knows it (the console does;
    /// the CLI reading a database does not).
    pub retention_min_days: Option<u32>,
}

/// The machine-readable report embedded in both formats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportManifest {
    /// [`REPORT_FORMAT`].
    pub format: String,
    /// The signed tree head the report was made from.
    pub checkpoint: SignedCheckpoint,
    pub context: ReportContext,
    pub content: ReportContent,
    /// SHA-256 (hex) of the canonical JSON of every other field ([`ReportManifest::digest`]).
    pub content_digest: String,
}

/// Why a report could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report scope: {0}")]
    BadScope(String),
    #[error("the manifest cannot be written as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "the trail has no signed checkpoint yet: a report must carry one (wait for the service to sign its first)"
    )]
    NoCheckpoint,
    #[error("no event of the trail up to its checkpoint (size {tree_size}) is in scope ({scope})")]
    Empty { scope: String, tree_size: u64 },
}

impl ReportManifest {
    /// The manifest of `content`, made from `checkpoint`, with its digest.
    pub fn new(
        checkpoint: SignedCheckpoint,
        context: ReportContext,
        content: ReportContent,
    ) -> Result<ReportManifest, ReportError> {
        let mut m = ReportManifest {
            format: REPORT_FORMAT.to_string(),
            checkpoint,
            context,
            content,
            content_digest: String::new(),
        };
        m.content_digest = m.digest()?;
        Ok(m)
    }

    /// SHA-256 (hex) of the canonical JSON of every field but `content_digest`.
    pub fn digest(&self) -> Result<String, ReportError> {
        let mut v = serde_json::to_value(self)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("content_digest");
        }
        Ok(hex::encode(crate::sha256(
            crate::canonical_json(&v).as_bytes(),
        )))
    }

    /// The manifest as the documents embed it: JSON with `<`, `>` and `&` escaped, so it can sit
    /// in an HTML `<script>` block unchanged and parse back to the same value.
    pub fn embedded_json(&self) -> Result<String, ReportError> {
        let json = serde_json::to_string_pretty(self)?;
        Ok(json
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026"))
    }
}

impl std::fmt::Display for ReportScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReportScope::Job { job } => write!(f, "job {job}"),
            ReportScope::Period { from, to } => write!(f, "events from {from} to {to}"),
        }
    }
}

/// The queries whose events a report of `scope` is built from, up to `tree_size`: one place that
/// says which events a scope needs, shared by the maker and `verify-report` ([`gather`], or a
/// caller's own loop where the future must be `Send`, then [`merge`]).
///
/// A job: its events. A period: the events in it, and every `job.proposed` before its end (the
/// caps of budgets spent in the period, and the approvers its approvals are checked against).
pub fn filters(scope: &ReportScope, tree_size: u64) -> Vec<EventFilter> {
    match scope {
        ReportScope::Job { job } => vec![EventFilter {
            job: Some(job.clone()),
            to_seq: Some(tree_size),
            ..EventFilter::default()
        }],
        ReportScope::Period { from, .. } => vec![
            EventFilter {
                since: Some(*from),
                to_seq: Some(tree_size),
                ..EventFilter::default()
            },
            EventFilter {
                action: Some(Action::JobProposed),
                to_seq: Some(tree_size),
                ..EventFilter::default()
            },
        ],
    }
}

/// The answers to [`filters`], as a report reads them: below `tree_size`, before a period's end,
/// in seq order, without duplicates.
pub fn merge(scope: &ReportScope, tree_size: u64, mut events: Vec<Event>) -> Vec<Event> {
    events.retain(|e| {
        e.seq < tree_size
            && match scope {
                ReportScope::Job { .. } => true,
                ReportScope::Period { to, .. } => e.timestamp < *to,
            }
    });
    events.sort_by_key(|e| e.seq);
    events.dedup_by_key(|e| e.seq);
    events
}

/// [`filters`] run through `query` (the store, the service's client, a CLI reader), then
/// [`merge`]d.
pub async fn gather<E, Q>(
    scope: &ReportScope,
    tree_size: u64,
    mut query: Q,
) -> Result<Vec<Event>, E>
where
    Q: AsyncFnMut(EventFilter) -> Result<Vec<Event>, E>,
{
    let mut events = Vec::new();
    for f in filters(scope, tree_size) {
        events.extend(query(f).await?);
    }
    Ok(merge(scope, tree_size, events))
}
