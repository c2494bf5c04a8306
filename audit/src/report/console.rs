//! The console's report download: `GET /reports?job=ID&format=pdf|html`, or
//! `/reports?from=DATE&to=DATE&format=...`. Made from the live log's newest signed checkpoint,
//! its store, the console's authority check and its last verification; served as an attachment
//! (the HTML report carries its own inline style, which the console's CSP would refuse inline).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::console::views::{ConsoleError, Viewer};
use crate::console::{ConsoleState, VerificationOutcome};
use crate::event::Timestamp;

use super::{
    ReportContext, ReportError, ReportManifest, ReportScope, VerificationSummary, build_content,
    filters, merge,
};

fn bad(field: &str, problem: impl Into<String>) -> ConsoleError {
    ConsoleError::BadInput {
        field: field.into(),
        problem: problem.into(),
    }
}

fn report_error(e: ReportError) -> ConsoleError {
    match e {
        ReportError::Empty { .. } | ReportError::NoCheckpoint => {
            ConsoleError::NotFound(e.to_string())
        }
        other => bad("report", other.to_string()),
    }
}

/// The console's verification as a report states it.
fn summary_of(v: crate::console::Verification) -> VerificationSummary {
    match v.outcome {
        VerificationOutcome::Intact {
            events,
            checkpoints,
            unanchored,
        } => VerificationSummary {
            intact: Some(true),
            verified_at: v.finished_at,
            events,
            checkpoints: checkpoints as u64,
            detail: format!(
                "{events} events and {checkpoints} checkpoint(s) verified (hashes, links, signatures, roots), every actor's authority and officer's signature checked; {unanchored} event(s) after the newest checkpoint"
            ),
        },
        VerificationOutcome::Broken {
            first_bad_seq,
            what,
        } => VerificationSummary {
            intact: Some(false),
            verified_at: v.finished_at,
            events: 0,
            checkpoints: 0,
            detail: match first_bad_seq {
                Some(seq) => format!("first bad row: seq {seq}: {what}"),
                None => what,
            },
        },
        VerificationOutcome::Unreadable { what } => VerificationSummary {
            intact: Some(false),
            verified_at: v.finished_at,
            events: 0,
            checkpoints: 0,
            detail: format!("the store could not be read: {what}"),
        },
    }
}

/// The report the query asks for, as a download.
pub async fn download(
    state: &ConsoleState,
    viewer: &Viewer,
    query: &str,
) -> Result<Response, ConsoleError> {
    let (mut job, mut from, mut to, mut format) = (None, None, None, "pdf".to_string());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "job" if !v.is_empty() => job = Some(v.into_owned()),
            "from" if !v.is_empty() => from = Some(v.into_owned()),
            "to" if !v.is_empty() => to = Some(v.into_owned()),
            "format" => format = v.into_owned(),
            _ => {}
        }
    }
    let time =
        |field: &str, t: &str| crate::console::parse_time(t).map_err(|problem| bad(field, problem));
    let scope = match (job, from, to) {
        (Some(job), None, None) => ReportScope::job(&job).map_err(report_error)?,
        (None, Some(f), Some(t)) => {
            ReportScope::period(time("from", &f)?, time("to", &t)?).map_err(report_error)?
        }
        _ => {
            return Err(bad(
                "job",
                "give job=ID, or from=DATE and to=DATE (e.g. /reports?job=job-1&format=pdf)",
            ));
        }
    };
    if format != "pdf" && format != "html" {
        return Err(bad("format", format!("{format:?} is neither pdf nor html")));
    }
    let head = state
        .log
        .latest_checkpoint()
        .ok_or_else(|| report_error(ReportError::NoCheckpoint))?;
    let n = head.checkpoint.tree_size;
    let store = state.log.store();
    // A plain loop, not `gather`'s async closure: the handler's future must be `Send`.
    // A period ends at a seq too (the trail's times never go back): the first event at or after
    // its end bounds the queries, instead of reading to the head and dropping the rest.
    let bound = match &scope {
        ReportScope::Period { to, .. } => {
            store.first_seq_at_or_after(*to).await?.unwrap_or(n).min(n)
        }
        ReportScope::Job { .. } => n,
    };
    let mut events = Vec::new();
    for f in filters(&scope, bound) {
        events.extend(store.events(&f).await?);
    }
    let events = merge(&scope, n, events);
    let content = build_content(&events, &scope, n, &state.check, &head.checkpoint.log_id)
        .map_err(report_error)?;
    // The console's last verification; a request never runs one itself (over a large trail it
    // takes minutes): before the first has finished, the report says so.
    let summary = match state.last_verification() {
        None => VerificationSummary {
            intact: None,
            verified_at: Timestamp::now(),
            events: 0,
            checkpoints: 0,
            detail: "the console's first verification of the trail had not finished when this report was made: run tutela audit verify".into(),
        },
        Some(v) => summary_of(v),
    };
    let manifest = ReportManifest::new(
        head,
        ReportContext {
            generated_at: Timestamp::now(),
            generated_by: format!("{} (compliance console)", viewer.identity),
            verification: summary,
            retention_min_days: state.retention_min_days.get().copied(),
        },
        content,
    )
    .map_err(report_error)?;
    let name = match &scope {
        ReportScope::Job { job } => format!("report-{job}"),
        ReportScope::Period { from, to } => format!(
            "report-{}-{}",
            from.unix_millis() / 1000,
            to.unix_millis() / 1000
        ),
    };
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (body, mime) = if format == "pdf" {
        (
            super::pdf::render(&manifest).map_err(report_error)?,
            "application/pdf",
        )
    } else {
        (
            super::html::render(&manifest)
                .map_err(report_error)?
                .into_bytes(),
            "text/html; charset=utf-8",
        )
    };
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.{format}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}
