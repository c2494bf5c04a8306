//! Jobs: every proposed job, and one job's record: its spec digest, each approval and rejection
//! with the officer's certificate, the rounds, the accepted updates and the refused ones with
//! their reasons. Built from [`job_record`], which believes only events that pass the authority
//! rules and lists the others as flagged.

use std::collections::BTreeMap;

use askama::Template;
use axum::response::Response;
use http::StatusCode;

use super::{ConsoleError, Digest, Viewer, encode, html};
use crate::console::ConsoleState;
use crate::console::format::{epsilon, utc, utc_millis};
use crate::event::{Action, Event};
use crate::filter::EventFilter;
use crate::lineage::{FlaggedEvent, job_record};
use crate::payload::{ActionPayload, JobApproved, JobProposed, JobRejected};

/// How many of the newest jobs the list shows.
const JOBS_LISTED: u32 = 500;

#[derive(Template)]
#[template(path = "console/jobs.html")]
pub struct JobsPage {
    pub who: String,
    pub nav: &'static str,
    pub jobs: Vec<JobRow>,
}

/// One proposed job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRow {
    pub job: String,
    pub href: String,
    pub name: String,
    pub proposed_at: String,
    pub proposed_by: String,
    pub spec_digest: Digest,
    pub participants: String,
    /// `completed`, `failed`, or `running` when no end is recorded.
    pub outcome: String,
}

#[derive(Template)]
#[template(path = "console/job.html")]
pub struct JobPage {
    pub who: String,
    pub nav: &'static str,
    pub job: JobView,
}

/// One job, as the trail records it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub job: String,
    pub spec_digest: Option<Digest>,
    pub proposed_by: String,
    pub code_version: String,
    pub base_model: String,
    pub outcome: String,
    pub outcome_reason: String,
    pub model: Option<Digest>,
    pub approvals: Vec<ApprovalView>,
    pub rounds: Vec<RoundView>,
    pub refusals: Vec<RefusalView>,
    /// Site, ε over the job (two decimals).
    pub epsilon: Vec<(String, String)>,
    pub commitments: Vec<(String, Digest)>,
    pub flagged: Vec<FlaggedEvent>,
}

/// An approval or a rejection, with the certificate that signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalView {
    pub seq: u64,
    pub time: String,
    pub decision: String,
    pub site: String,
    pub officer: String,
    pub signed_at: String,
    pub reason: String,
    pub certificate: CertificateView,
}

/// What an officer's certificate says (as recorded in the approval, whose signature the trail's
/// readers re-check against it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateView {
    pub subject: String,
    pub serial: String,
    pub issuer: String,
    pub not_after: String,
    pub fingerprint: String,
}

impl CertificateView {
    fn of_pem(pem: &str) -> CertificateView {
        match tutela_protocol::pki::describe(pem) {
            Ok(tutela_protocol::pki::Description::Certificate(c)) => CertificateView {
                subject: c
                    .identity
                    .map(|i| i.uri())
                    .unwrap_or_else(|| c.subject.clone()),
                serial: c.serial_hex,
                issuer: c.issuer,
                not_after: utc_millis((c.not_after.unix_timestamp_nanos() / 1_000_000) as i64),
                fingerprint: c.sha256_fingerprint,
            },
            Ok(_) => CertificateView {
                subject: "(not a certificate)".into(),
                ..Default::default()
            },
            Err(e) => CertificateView {
                subject: format!("(unreadable: {e})"),
                ..Default::default()
            },
        }
    }
}

/// One completed round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundView {
    pub seq: u64,
    pub round: String,
    pub time: String,
    /// Site, update digest, ε of the round.
    pub updates: Vec<(String, Digest, String)>,
    pub metrics: String,
}

/// One refused update (or a task that closed without one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalView {
    pub seq: u64,
    pub time: String,
    pub round: String,
    pub site: String,
    pub actor: String,
    pub reason: String,
}

pub async fn list(state: &ConsoleState, viewer: &Viewer) -> Result<Response, ConsoleError> {
    let store = state.log.store();
    let mut outcomes: BTreeMap<String, String> = BTreeMap::new();
    for (action, outcome) in [
        (Action::JobCompleted, "completed"),
        (Action::JobFailed, "failed"),
    ] {
        for e in store.events_of(action, JOBS_LISTED * 2).await? {
            outcomes.insert(e.subject.clone(), outcome.to_string());
        }
    }
    let mut jobs: Vec<JobRow> = store
        .events_of(Action::JobProposed, JOBS_LISTED)
        .await?
        .iter()
        .filter_map(|e| {
            // A payload that does not decode is not a job the console can describe; the
            // overview's verification and the job page's flagged list say why.
            let p = JobProposed::from_event(e).ok()?;
            Some(JobRow {
                job: e.subject.clone(),
                href: format!("/jobs/{}", encode(&e.subject)),
                name: p.name,
                proposed_at: utc(e.timestamp),
                proposed_by: p.operator.unwrap_or_else(|| e.actor.clone()),
                spec_digest: Digest::new(&p.spec_digest),
                participants: p.participants.join(", "),
                outcome: outcomes
                    .get(&e.subject)
                    .cloned()
                    .unwrap_or_else(|| "running".into()),
            })
        })
        .collect();
    // An amendment proposes the same job again: list it once, as last proposed, newest first.
    jobs.reverse();
    let mut seen = std::collections::BTreeSet::new();
    jobs.retain(|j| seen.insert(j.job.clone()));
    html(
        StatusCode::OK,
        &JobsPage {
            who: viewer.identity.clone(),
            nav: "jobs",
            jobs,
        },
    )
}

/// The certificate of the approval or rejection recorded at `seq`.
fn certificate_of(events: &[Event], seq: u64) -> (CertificateView, String) {
    let Some(e) = events.iter().find(|e| e.seq == seq) else {
        return (CertificateView::default(), String::new());
    };
    match e.action {
        Action::JobApproved => JobApproved::from_event(e).map_or_else(
            |_| (CertificateView::default(), String::new()),
            |p| {
                (
                    CertificateView::of_pem(&p.certificate),
                    p.signed_at_ms.map(utc_millis).unwrap_or_default(),
                )
            },
        ),
        Action::JobRejected => JobRejected::from_event(e).map_or_else(
            |_| (CertificateView::default(), String::new()),
            |p| {
                (
                    CertificateView::of_pem(&p.certificate),
                    utc_millis(p.signed_at_ms),
                )
            },
        ),
        _ => (CertificateView::default(), String::new()),
    }
}

/// The view of `job` from its events.
pub fn job_view(events: &[Event], job: &str, state: &ConsoleState) -> JobView {
    let r = job_record(events, job, &state.check);
    let opt = |o: &Option<u64>| o.map_or_else(String::new, |v| v.to_string());
    // The records carry RFC 3339 text; the page writes every time the same way.
    let at = |seq: u64| {
        events
            .binary_search_by_key(&seq, |e| e.seq)
            .map_or_else(|_| String::new(), |i| utc(events[i].timestamp))
    };
    JobView {
        job: r.job.clone(),
        spec_digest: r.spec_digest.as_deref().map(Digest::new),
        proposed_by: r.proposed_by.clone().unwrap_or_default(),
        code_version: r.code_version.clone().unwrap_or_default(),
        base_model: r.base_model.clone().unwrap_or_default(),
        outcome: r.outcome.clone(),
        outcome_reason: r.outcome_reason.clone().unwrap_or_default(),
        model: r.model_digest.as_deref().map(Digest::new),
        approvals: r
            .approvals
            .iter()
            .map(|a| {
                let (certificate, signed_at) = certificate_of(events, a.seq);
                ApprovalView {
                    seq: a.seq,
                    time: at(a.seq),
                    decision: a.decision.clone(),
                    site: a.site.clone().unwrap_or_default(),
                    officer: a.officer.clone().unwrap_or_default(),
                    signed_at,
                    reason: a.reason.clone().unwrap_or_default(),
                    certificate,
                }
            })
            .collect(),
        rounds: r
            .rounds
            .iter()
            .map(|round| RoundView {
                seq: round.seq,
                round: opt(&round.round),
                time: at(round.seq),
                updates: round
                    .participants
                    .iter()
                    .map(|site| {
                        (
                            site.clone(),
                            round
                                .update_digests
                                .get(site)
                                .map_or_else(|| Digest::new(""), |d| Digest::new(d)),
                            round
                                .epsilon
                                .get(site)
                                .map_or_else(String::new, |e| epsilon(*e)),
                        )
                    })
                    .collect(),
                metrics: if round.metrics.is_null() {
                    String::new()
                } else {
                    crate::canonical_json(&round.metrics)
                },
            })
            .collect(),
        refusals: r
            .refused_updates
            .iter()
            .map(|f| RefusalView {
                seq: f.seq,
                time: at(f.seq),
                round: opt(&f.round),
                site: f.site.clone().unwrap_or_default(),
                actor: f.actor.clone(),
                reason: f.reason.clone().unwrap_or_default(),
            })
            .collect(),
        epsilon: r
            .epsilon_per_site
            .iter()
            .map(|(s, e)| (s.clone(), epsilon(*e)))
            .collect(),
        commitments: r
            .dataset_commitments
            .iter()
            .map(|(s, c)| (s.clone(), Digest::new(c)))
            .collect(),
        flagged: r.flagged,
    }
}

pub async fn detail(
    state: &ConsoleState,
    viewer: &Viewer,
    job: &str,
) -> Result<Response, ConsoleError> {
    let events = state
        .log
        .store()
        .events(&EventFilter {
            job: Some(job.to_string()),
            ..Default::default()
        })
        .await?;
    if events.is_empty() {
        return Err(ConsoleError::NotFound(format!(
            "the trail has no event about job {job:?}"
        )));
    }
    html(
        StatusCode::OK,
        &JobPage {
            who: viewer.identity.clone(),
            nav: "jobs",
            job: job_view(&events, job, state),
        },
    )
}
