//! The overview: is the trail intact (the last verification, when, and the first bad row if it
//! is broken), how large it is, its signed checkpoints, and the checkpoint each site's node last
//! reported holding ([`crate::held_checkpoint`]).

use askama::Template;
use axum::response::Response;
use http::StatusCode;

use super::{ConsoleError, Digest, Viewer, html};
use crate::console::ConsoleState;
use crate::console::format::utc;
use crate::console::verification::{Verification, VerificationOutcome};

/// How many of the newest checkpoints the overview lists.
const CHECKPOINTS_SHOWN: usize = 20;

#[derive(Template)]
#[template(path = "console/overview.html")]
pub struct OverviewPage {
    pub who: String,
    pub nav: &'static str,
    pub log_id: String,
    pub public_key: String,
    pub events: u64,
    pub verification: VerificationView,
    pub checkpoints: Vec<CheckpointRow>,
    pub checkpoints_total: u64,
    pub sites: Vec<SiteHeldRow>,
}

/// The checkpoint a site's node last reported holding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteHeldRow {
    pub site: String,
    pub node: String,
    pub tree_size: u64,
    /// Events the log has committed past it.
    pub behind: u64,
    pub root: Digest,
    pub reported_at: String,
}

/// The verification as the page states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerificationView {
    /// `intact`, `broken`, `unreadable` or `pending` (none has finished yet).
    pub state: &'static str,
    pub headline: String,
    pub detail: String,
    pub first_bad_seq: Option<u64>,
    pub finished_at: String,
    pub took_ms: u128,
}

impl VerificationView {
    pub fn of(v: Option<&Verification>) -> VerificationView {
        let Some(v) = v else {
            return VerificationView {
                state: "pending",
                headline: "The first verification of the stored trail is running".into(),
                detail: "Reload this page in a moment.".into(),
                first_bad_seq: None,
                finished_at: String::new(),
                took_ms: 0,
            };
        };
        let (state, headline, detail, first_bad_seq) = match &v.outcome {
            VerificationOutcome::Intact {
                events,
                checkpoints,
                unanchored,
            } => (
                "intact",
                "The trail is intact".to_string(),
                format!(
                    "{events} events: every hash, link and sequence number, {checkpoints} signed checkpoints (signature and root), and who asserted each event checked; {unanchored} events after the newest checkpoint."
                ),
                None,
            ),
            VerificationOutcome::Broken {
                first_bad_seq,
                what,
            } => (
                "broken",
                match first_bad_seq {
                    Some(s) => format!("The trail is BROKEN: the first bad row is seq {s}"),
                    None => "The trail is BROKEN".to_string(),
                },
                what.clone(),
                *first_bad_seq,
            ),
            VerificationOutcome::Unreadable { what } => (
                "unreadable",
                "The stored trail could not be read".to_string(),
                what.clone(),
                None,
            ),
        };
        VerificationView {
            state,
            headline,
            detail,
            first_bad_seq,
            finished_at: utc(v.finished_at),
            took_ms: v.took.as_millis(),
        }
    }
}

/// One signed checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRow {
    pub tree_size: u64,
    /// The seqs it covers, `0 … n-1`.
    pub covers: String,
    pub time: String,
    pub root: Digest,
}

pub async fn build(state: &ConsoleState, viewer: &Viewer) -> Result<Response, ConsoleError> {
    let store = state.log.store();
    let (newest, total) = store.newest_checkpoints(CHECKPOINTS_SHOWN as u32).await?;
    let rows = newest
        .iter()
        .map(|c| CheckpointRow {
            tree_size: c.checkpoint.tree_size,
            covers: match c.checkpoint.tree_size {
                0 => "none".to_string(),
                n => format!("0 … {}", n - 1),
            },
            time: utc(c.checkpoint.timestamp),
            root: Digest::new(&hex::encode(c.checkpoint.root)),
        })
        .collect();
    let size = state.log.size();
    let sites = store
        .site_checkpoints()
        .await?
        .into_iter()
        .map(|c| SiteHeldRow {
            behind: size.saturating_sub(c.tree_size),
            site: c.site,
            node: c.node,
            tree_size: c.tree_size,
            root: Digest::new(&hex::encode(c.root)),
            reported_at: utc(c.reported_at),
        })
        .collect();
    let page = OverviewPage {
        who: viewer.identity.clone(),
        nav: "overview",
        log_id: state.log.log_id().to_string(),
        public_key: hex::encode(state.log.public_key()),
        // The log's committed size, from memory: a COUNT(*) scans millions of rows on
        // PostgreSQL. What the database holds is what the verification above reads.
        events: size,
        verification: VerificationView::of(state.last_verification().as_ref()),
        checkpoints: rows,
        checkpoints_total: total,
        sites,
    };
    html(StatusCode::OK, &page)
}
