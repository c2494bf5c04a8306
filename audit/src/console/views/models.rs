//! Models: every published model, and one model's lineage drawn as a graph (base model → rounds
//! → sites and their dataset commitments → approvals → published model), with its registry
//! versions and stage history and its watermark registration. Built from [`lineage`], which
//! believes only events that pass the authority rules.

use askama::Template;
use axum::response::Response;
use http::StatusCode;

use super::jobs::{JobView, job_view};
use super::{ConsoleError, Digest, Viewer, encode, html};
use crate::console::ConsoleState;
use crate::console::format::utc;
use crate::console::svg::{Graph, NodeSpec, layered_graph};
use crate::event::{Action, Event};
use crate::filter::EventFilter;
use crate::lineage::{RegistryEntry, WatermarkRecord, job_of_model, lineage};
use crate::payload::{ActionPayload, ModelPublished};

/// How many of the newest published models the list shows.
const MODELS_LISTED: u32 = 500;

#[derive(Template)]
#[template(path = "console/models.html")]
pub struct ModelsPage {
    pub who: String,
    pub nav: &'static str,
    pub models: Vec<ModelRow>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRow {
    pub digest: Digest,
    pub href: String,
    pub job: String,
    pub published_at: String,
    pub rounds: u32,
}

#[derive(Template)]
#[template(path = "console/model.html")]
pub struct ModelPage {
    pub who: String,
    pub nav: &'static str,
    pub digest: String,
    pub graph: Graph,
    pub job: Option<JobView>,
    pub registry: Vec<RegistryEntry>,
    pub watermark: Option<WatermarkRecord>,
}

pub async fn list(state: &ConsoleState, viewer: &Viewer) -> Result<Response, ConsoleError> {
    let events = state
        .log
        .store()
        .events_of(Action::ModelPublished, MODELS_LISTED)
        .await?;
    let models = events
        .iter()
        .rev()
        .filter_map(|e| {
            let p = ModelPublished::from_event(e).ok()?;
            Some(ModelRow {
                href: format!("/models/{}", encode(&p.model_digest)),
                digest: Digest::new(&p.model_digest),
                job: p.job,
                published_at: utc(e.timestamp),
                rounds: p.rounds,
            })
        })
        .collect();
    html(
        StatusCode::OK,
        &ModelsPage {
            who: viewer.identity.clone(),
            nav: "models",
            models,
        },
    )
}

/// The events a model's lineage is computed from: those about the model, the job that produced
/// it, and the registry's whole history (a stage move is believed only against the history of
/// every version it moves). The same set `tutela audit lineage` reads.
async fn lineage_events(state: &ConsoleState, digest: &str) -> Result<Vec<Event>, ConsoleError> {
    let store = state.log.store();
    let mut events = store
        .events(&EventFilter {
            subject: Some(digest.to_string()),
            ..Default::default()
        })
        .await?;
    events.extend(store.events_of(Action::JobCompleted, u32::MAX >> 1).await?);
    events.sort_by_key(|e| e.seq);
    events.dedup_by_key(|e| e.seq);
    let Some(job) = job_of_model(&events, digest, &state.check) else {
        return Err(ConsoleError::NotFound(format!(
            "no model.published or job.completed event names model {digest}"
        )));
    };
    let mut all = store
        .events(&EventFilter {
            job: Some(job),
            ..Default::default()
        })
        .await?;
    all.extend(
        events
            .into_iter()
            .filter(|e| e.action == Action::ModelPublished),
    );
    for action in [Action::ModelRegistered, Action::ModelStageChanged] {
        all.extend(store.events_of(action, u32::MAX >> 1).await?);
    }
    all.sort_by_key(|e| e.seq);
    all.dedup_by_key(|e| e.seq);
    Ok(all)
}

/// The lineage graph of a job's record.
fn graph_of(job: &JobView, base_model: &str, digest: &str) -> Graph {
    let mut specs = vec![NodeSpec {
        id: "base".into(),
        column: 0,
        kind: "base",
        label: "base model".into(),
        detail: crate::console::format::short(base_model),
        from: vec![],
    }];
    let mut previous = "base".to_string();
    for r in &job.rounds {
        let id = format!("round-{}", r.seq);
        specs.push(NodeSpec {
            id: id.clone(),
            column: 1,
            kind: "round",
            label: format!("round {}", r.round),
            detail: format!("{} sites, {}", r.updates.len(), r.time),
            from: vec![previous.clone()],
        });
        previous = id;
    }
    let mut sites: Vec<&str> = job
        .rounds
        .iter()
        .flat_map(|r| r.updates.iter().map(|u| u.0.as_str()))
        .collect();
    sites.sort();
    sites.dedup();
    for site in &sites {
        let commitment = job.commitments.iter().find(|(s, _)| s == site).map_or_else(
            || "no commitment recorded".to_string(),
            |(_, c)| format!("data {}", c.short),
        );
        specs.push(NodeSpec {
            id: format!("site-{site}"),
            column: 2,
            kind: "site",
            label: site.to_string(),
            detail: commitment,
            from: job
                .rounds
                .iter()
                .filter(|r| r.updates.iter().any(|u| u.0 == *site))
                .map(|r| format!("round-{}", r.seq))
                .collect(),
        });
    }
    let mut approvals = Vec::new();
    for a in &job.approvals {
        let id = format!("approval-{}", a.seq);
        specs.push(NodeSpec {
            id: id.clone(),
            column: 3,
            kind: if a.decision == "approved" {
                "approval"
            } else {
                "rejection"
            },
            label: format!("{} ({})", a.decision, a.site),
            detail: a.officer.clone(),
            from: vec![format!("site-{}", a.site)],
        });
        approvals.push(id);
    }
    let mut into_model = approvals;
    into_model.push(previous);
    specs.push(NodeSpec {
        id: "model".into(),
        column: 4,
        kind: "model",
        label: "published model".into(),
        detail: crate::console::format::short(digest),
        from: into_model,
    });
    layered_graph(&specs)
}

pub async fn detail(
    state: &ConsoleState,
    viewer: &Viewer,
    digest: &str,
) -> Result<Response, ConsoleError> {
    let events = lineage_events(state, digest).await?;
    let l = lineage(&events, digest, &state.check);
    let (job, graph, watermark) = match &l.job {
        Some(record) => {
            let view = job_view(&events, &record.job, state);
            let graph = graph_of(&view, record.base_model.as_deref().unwrap_or(""), digest);
            (Some(view), graph, record.watermark.clone())
        }
        None => (None, layered_graph(&[]), None),
    };
    html(
        StatusCode::OK,
        &ModelPage {
            who: viewer.identity.clone(),
            nav: "models",
            digest: digest.to_string(),
            graph,
            job,
            registry: l.registry,
            watermark,
        },
    )
}
