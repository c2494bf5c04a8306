//! The event search: filter by actor, action, subject and time range, newest first, a page at a
//! time by keyset ([`PageQuery`]), each event's inclusion proof downloadable as a
//! [`ProofFile`] that `tutela audit verify-proof` checks offline.

use askama::Template;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::{ConsoleError, Digest, Viewer, encode, html, query_pairs};
use crate::console::ConsoleState;
use crate::console::format::{parse_time, utc};
use crate::event::{Action, Event};
use crate::proof_file::ProofFile;
use crate::store::PageQuery;

/// How much of a payload the table shows.
const SUMMARY_CHARS: usize = 160;

#[derive(Template)]
#[template(path = "console/events.html")]
pub struct EventsPage {
    pub who: String,
    pub nav: &'static str,
    pub filter: FilterForm,
    /// Every action of the vocabulary, for the filter's list.
    pub actions: Vec<&'static str>,
    pub rows: Vec<EventRow>,
    /// The next (older) page's link, when there is one.
    pub older: Option<String>,
    /// What was wrong with the filter, if anything (the page is answered with 400).
    pub problem: Option<String>,
}

/// The filter as typed, to show it back in the form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterForm {
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub since: String,
    pub until: String,
}

/// One event of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub summary: String,
    pub hash: Digest,
    /// Whether a signed checkpoint covers it yet (a proof exists).
    pub provable: bool,
}

impl EventRow {
    pub fn of(e: &Event, covered: u64) -> EventRow {
        let payload = crate::canonical_json(&e.payload);
        let summary = if payload.chars().count() > SUMMARY_CHARS {
            let cut: String = payload.chars().take(SUMMARY_CHARS).collect();
            format!("{cut}…")
        } else {
            payload
        };
        EventRow {
            seq: e.seq,
            time: utc(e.timestamp),
            actor: e.actor.clone(),
            action: e.action.to_string(),
            subject: e.subject.clone(),
            summary,
            hash: Digest::new(&hex::encode(e.hash)),
            provable: e.seq < covered,
        }
    }
}

/// Reads the filter from the query string; an error names the field and what is wrong.
fn parse_filter(q: &str, page_size: u32) -> (FilterForm, Result<PageQuery, ConsoleError>) {
    let mut form = FilterForm::default();
    let mut query = PageQuery {
        limit: page_size,
        ..Default::default()
    };
    let mut problem = None;
    let bad = |field: &str, problem: String| ConsoleError::BadInput {
        field: field.to_string(),
        problem,
    };
    for (k, v) in query_pairs(q) {
        match k.as_str() {
            "actor" => {
                query.actor = Some(v.clone());
                form.actor = v;
            }
            "subject" => {
                query.subject = Some(v.clone());
                form.subject = v;
            }
            "action" => {
                match v.parse::<Action>() {
                    Ok(a) => query.action = Some(a),
                    Err(_) => {
                        problem.get_or_insert(bad(
                            "action",
                            format!("{v:?} is not an action of the trail's vocabulary"),
                        ));
                    }
                }
                form.action = v;
            }
            "since" | "until" => {
                match parse_time(&v) {
                    Ok(t) if k == "since" => query.since = Some(t),
                    Ok(t) => query.until = Some(t),
                    Err(e) => {
                        problem.get_or_insert(bad(&k, e));
                    }
                }
                if k == "since" {
                    form.since = v;
                } else {
                    form.until = v;
                }
            }
            "before" => match v.parse::<u64>() {
                Ok(s) => query.before_seq = Some(s),
                Err(_) => {
                    problem.get_or_insert(bad("before", format!("{v:?} is not a sequence number")));
                }
            },
            other => {
                problem.get_or_insert(bad(other, "is not a filter of the event search (actor, action, subject, since, until, before)".to_string()));
            }
        }
    }
    (form, problem.map_or(Ok(query), Err))
}

/// The link to the page of `filter` before seq `before`.
fn page_link(filter: &FilterForm, before: u64) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("actor", &filter.actor),
        ("action", &filter.action),
        ("subject", &filter.subject),
        ("since", &filter.since),
        ("until", &filter.until),
    ] {
        if !v.is_empty() {
            parts.push(format!("{k}={}", encode(v)));
        }
    }
    parts.push(format!("before={before}"));
    format!("/events?{}", parts.join("&"))
}

pub async fn build(
    state: &ConsoleState,
    viewer: &Viewer,
    q: &str,
) -> Result<Response, ConsoleError> {
    let (filter, query) = parse_filter(q, state.page_size);
    let mut page = EventsPage {
        who: viewer.identity.clone(),
        nav: "events",
        filter,
        actions: Action::ALL.iter().map(|a| a.as_str()).collect(),
        rows: Vec::new(),
        older: None,
        problem: None,
    };
    let query = match query {
        Ok(q) => q,
        Err(e) => {
            page.problem = Some(e.to_string());
            return html(StatusCode::BAD_REQUEST, &page);
        }
    };
    let found = state.log.store().page(&query).await?;
    let covered = state
        .log
        .latest_checkpoint()
        .map_or(0, |c| c.checkpoint.tree_size);
    page.rows = found
        .events
        .iter()
        .map(|e| EventRow::of(e, covered))
        .collect();
    page.older = found
        .next_before_seq
        .map(|before| page_link(&page.filter, before));
    html(StatusCode::OK, &page)
}

/// `GET /events/SEQ/proof`: the event's inclusion proof against the newest checkpoint, as a file.
pub async fn proof(state: &ConsoleState, seq: &str) -> Result<Response, ConsoleError> {
    let seq: u64 = seq.parse().map_err(|_| ConsoleError::BadInput {
        field: "seq".into(),
        problem: format!("{seq:?} is not a sequence number"),
    })?;
    let proof = state.log.inclusion_proof(seq, None).await.map_err(|e| match e {
        crate::log::LogError::NotCovered { .. } | crate::log::LogError::NoCheckpointYet => {
            ConsoleError::NotFound(format!(
                "no inclusion proof for seq {seq}: {e} (a checkpoint covers an event shortly after it is appended)"
            ))
        }
        other => ConsoleError::Log(other),
    })?;
    let file = ProofFile::new(proof, state.log.public_key());
    let body =
        serde_json::to_string_pretty(&file).map_err(|e| ConsoleError::NotFound(e.to_string()))?;
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"tutela-event-{seq}-proof.json\""
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_is_read_and_a_bad_one_names_its_field() {
        let (form, q) = parse_filter(
            "actor=spiffe%3A%2F%2Facme%2Fcoordinator&action=job.proposed&since=2026-12-01&before=40",
            25,
        );
        let q = q.unwrap();
        assert_eq!(q.actor.as_deref(), Some("spiffe://acme/coordinator"));
        assert_eq!(q.action, Some(Action::JobProposed));
        assert_eq!(q.before_seq, Some(40));
        assert_eq!(q.limit, 25);
        assert!(q.since.is_some() && q.until.is_none());
        assert_eq!(
            page_link(&form, 12),
            "/events?actor=spiffe%3A%2F%2Facme%2Fcoordinator&action=job.proposed&since=2026-12-01&before=12"
        );

        let (_, q) = parse_filter("action=job.exploded", 25);
        let e = q.unwrap_err().to_string();
        assert!(
            e.starts_with("action: \"job.exploded\" is not an action"),
            "{e}"
        );
        let (_, q) = parse_filter("until=tomorrow", 25);
        assert!(
            q.unwrap_err()
                .to_string()
                .starts_with("until: \"tomorrow\" is not a time")
        );
        let (_, q) = parse_filter("offset=100", 25);
        assert!(
            q.unwrap_err()
                .to_string()
                .starts_with("offset: is not a filter")
        );
        // Empty fields (an unfilled form) are no filter.
        let (_, q) = parse_filter("actor=&action=&subject=", 25);
        assert_eq!(
            q.unwrap(),
            PageQuery {
                limit: 25,
                ..Default::default()
            }
        );
    }
}
