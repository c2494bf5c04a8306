//! Sites: each dataset's privacy ledger over time (the `privacy.spent` events its node appended
//! before each update left the site) as a chart with the caps the trail records (each job's
//! target ε, from its signed spec), the de-identification reports, and the dataset commitments.

use std::collections::BTreeMap;

use askama::Template;
use axum::response::Response;
use http::StatusCode;
use serde::Deserialize;

use super::{ConsoleError, Digest, Viewer, html};
use crate::console::ConsoleState;
use crate::console::format::{epsilon, utc};
use crate::console::ledger_cache::{Ledger, Spend};
use crate::console::svg::{Chart, ledger_chart};
use crate::payload::privacy::PrivacySpent;
use crate::payload::{ActionPayload, DatasetDeidentified, TextDatasetDeidentified};

/// Spends listed under each chart (the newest).
const SPENDS_LISTED: usize = 20;

#[derive(Template)]
#[template(path = "console/sites.html")]
pub struct SitesPage {
    pub who: String,
    pub nav: &'static str,
    pub datasets: Vec<DatasetView>,
    pub deidentified: Vec<DeidView>,
    pub text_deidentified: Vec<TextDeidView>,
}

/// One budget (`<site>/<key>`): its spends and its chart.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetView {
    pub site: String,
    pub dataset: String,
    pub spends: usize,
    pub epsilon_now: String,
    pub delta: String,
    pub chart: Chart,
    /// The caps drawn, as text.
    pub caps: Vec<String>,
    pub rows: Vec<SpendRow>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendRow {
    pub seq: u64,
    pub time: String,
    pub job: String,
    pub round: u32,
    pub rows: u64,
    pub job_epsilon: String,
    pub dataset_epsilon: String,
}

/// One tabular de-identification report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeidView {
    pub seq: u64,
    pub time: String,
    pub site: String,
    pub dataset: String,
    pub job: String,
    pub rows_in: String,
    pub rows_out: String,
    pub rows_changed: String,
    pub k: String,
    pub l: String,
    pub suppressed: String,
    pub commitment: Option<Digest>,
}

/// One text de-identification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextDeidView {
    pub seq: u64,
    pub time: String,
    pub site: String,
    pub dataset: String,
    pub job: String,
    pub split_unit: String,
    pub documents_in: u64,
    pub documents_out: u64,
    pub commitment: Digest,
}

/// The part of the privacy crate's de-identification report (`DeidReport`) the page shows; the
/// audit crate does not depend on the privacy crate, so it reads these fields by their types.
#[derive(Deserialize)]
struct DeidSummary {
    rows_in: u64,
    rows_out: u64,
    #[serde(default)]
    rows_changed: Option<u64>,
    #[serde(default)]
    k_anonymity: Option<KAnonSummary>,
}

#[derive(Deserialize)]
struct KAnonSummary {
    k_required: u64,
    k_achieved: u64,
    #[serde(default)]
    l_required: Option<u64>,
    #[serde(default)]
    l_achieved: Option<u64>,
    suppressed_rows: u64,
}

pub async fn build(state: &ConsoleState, viewer: &Viewer) -> Result<Response, ConsoleError> {
    // Derived once per event, kept, and extended with what was appended since (see
    // crate::console::ledger_cache for what is re-checked when).
    let page = state
        .ledger
        .with(
            state.log.store(),
            &state.check,
            state.log.size(),
            |ledger| page_of(ledger, viewer),
        )
        .await?;
    html(StatusCode::OK, &page)
}

/// The page from the derived ledger: the spends (believed: from their own site's node) by
/// budget with the caps the trail records, and the de-identification reports.
fn page_of(ledger: &Ledger, viewer: &Viewer) -> SitesPage {
    let targets = &ledger.targets;
    let mut by_budget: BTreeMap<(String, String), Vec<(&Spend, &PrivacySpent)>> = BTreeMap::new();
    for s in &ledger.spends {
        by_budget
            .entry((s.spent.site.clone(), s.spent.dataset.clone()))
            .or_default()
            .push((s, &s.spent));
    }
    let datasets = by_budget
        .into_iter()
        .map(|((site, dataset), spends)| {
            let points: Vec<(i64, f64)> = spends
                .iter()
                .map(|(s, p)| (s.timestamp.unix_millis(), p.dataset_epsilon))
                .collect();
            let mut jobs: Vec<&str> = spends.iter().map(|(_, p)| p.job.as_str()).collect();
            jobs.sort();
            jobs.dedup();
            let caps: Vec<(String, f64)> = jobs
                .iter()
                .filter_map(|j| targets.get(*j).map(|t| (format!("job {j} target"), *t)))
                .collect();
            let last = spends.last().map(|(_, p)| p);
            DatasetView {
                site,
                dataset,
                spends: spends.len(),
                epsilon_now: last.map_or_else(String::new, |p| epsilon(p.dataset_epsilon)),
                delta: last.map_or_else(String::new, |p| format!("{:e}", p.dataset_delta)),
                chart: ledger_chart(&points, &caps),
                caps: caps
                    .iter()
                    .map(|(l, v)| format!("{l}: ε {}", epsilon(*v)))
                    .collect(),
                rows: spends
                    .iter()
                    .rev()
                    .take(SPENDS_LISTED)
                    .map(|(s, p)| SpendRow {
                        seq: s.seq,
                        time: utc(s.timestamp),
                        job: p.job.clone(),
                        round: p.round,
                        rows: p.rows,
                        job_epsilon: epsilon(p.job_epsilon),
                        dataset_epsilon: epsilon(p.dataset_epsilon),
                    })
                    .collect(),
            }
        })
        .collect();

    let deidentified = ledger
        .deidentified
        .iter()
        .rev()
        .filter_map(|e| {
            let p = DatasetDeidentified::from_event(e).ok()?;
            let summary = serde_json::from_value::<DeidSummary>(p.report).ok();
            let k = summary.as_ref().and_then(|s| s.k_anonymity.as_ref());
            let opt = |v: Option<u64>| v.map_or_else(|| "—".to_string(), |v| v.to_string());
            Some(DeidView {
                seq: e.seq,
                time: utc(e.timestamp),
                site: p.site,
                dataset: p.dataset,
                job: p.job,
                rows_in: opt(summary.as_ref().map(|s| s.rows_in)),
                rows_out: opt(summary.as_ref().map(|s| s.rows_out)),
                rows_changed: opt(summary.as_ref().and_then(|s| s.rows_changed)),
                k: k.map_or_else(
                    || "—".into(),
                    |k| format!("{} (required {})", k.k_achieved, k.k_required),
                ),
                l: k.and_then(|k| k.l_achieved.map(|l| (l, k.l_required)))
                    .map_or_else(
                        || "—".into(),
                        |(l, req)| match req {
                            Some(r) => format!("{l} (required {r})"),
                            None => l.to_string(),
                        },
                    ),
                suppressed: opt(k.map(|k| k.suppressed_rows)),
                commitment: p.dataset_commitment.as_deref().map(Digest::new),
            })
        })
        .collect();

    let text_deidentified = ledger
        .text_deidentified
        .iter()
        .rev()
        .filter_map(|e| {
            let p = TextDatasetDeidentified::from_event(e).ok()?;
            Some(TextDeidView {
                seq: e.seq,
                time: utc(e.timestamp),
                site: p.site,
                dataset: p.dataset,
                job: p.job,
                split_unit: p.split_unit,
                documents_in: p.documents_in,
                documents_out: p.documents_out,
                commitment: Digest::new(&p.dataset_commitment),
            })
        })
        .collect();

    SitesPage {
        who: viewer.identity.clone(),
        nav: "sites",
        datasets,
        deidentified,
        text_deidentified,
    }
}
