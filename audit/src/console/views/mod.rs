//! The console's pages: one typed view-model per page, built from the store and the log by that
//! page's module, rendered by its askama template (`audit/templates/console/`). The view-models
//! hold what a person reads (times in UTC, ε rounded, digests shortened with the whole one kept)
//! and nothing the template has to look up by key; a later report (issue 15 item 2) can render
//! the same structs.

pub mod events;
pub mod jobs;
pub mod models;
pub mod overview;
pub mod sites;

use askama::Template;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::log::LogError;
use crate::store::StoreError;

/// Who is reading, and the policy line that let them.
#[derive(Clone, Debug)]
pub struct Viewer {
    pub identity: String,
    pub rule: String,
}

/// Why a page could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("{field}: {problem}")]
    BadInput { field: String, problem: String },
    #[error("{0}")]
    NotFound(String),
    #[error("reading the trail: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("rendering the page: {0}")]
    Render(#[from] askama::Error),
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            ConsoleError::BadInput { .. } => StatusCode::BAD_REQUEST,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Store(_) | ConsoleError::Log(_) | ConsoleError::Render(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The error as a page.
    pub fn into_page(self, viewer: &Viewer) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "console: page failed");
        }
        let title = match status {
            StatusCode::BAD_REQUEST => "That request cannot be answered",
            StatusCode::NOT_FOUND => "Not found",
            _ => "The page could not be built",
        };
        error_page(Some(viewer), status, title, &self.to_string())
    }
}

/// A rendered page with `status`, as HTML.
pub fn html(status: StatusCode, t: &impl Template) -> Result<Response, ConsoleError> {
    let body = t.render()?;
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Ok(r)
}

#[derive(Template)]
#[template(path = "console/error.html")]
pub struct ErrorPage {
    pub who: String,
    pub nav: &'static str,
    pub status: u16,
    pub title: String,
    pub message: String,
    /// The policy's refusal, on a 403.
    pub refusal: Option<Refusal>,
}

/// Why the policy refused a reader.
pub struct Refusal {
    pub identity: String,
    pub rule: String,
    pub policy_digest: String,
}

/// An error page (no template can fail to render here: it holds strings only, but if it did the
/// status alone is answered).
pub fn error_page(
    viewer: Option<&Viewer>,
    status: StatusCode,
    title: &str,
    message: &str,
) -> Response {
    let page = ErrorPage {
        who: viewer.map(|v| v.identity.clone()).unwrap_or_default(),
        nav: "",
        status: status.as_u16(),
        title: title.to_string(),
        message: message.to_string(),
        refusal: None,
    };
    html(status, &page).unwrap_or_else(|_| status.into_response())
}

/// The 403 page: who the certificate says the caller is, and the rule that refused them.
pub fn forbidden_page(identity: &str, rule: &str, policy_digest: &str) -> Response {
    let page = ErrorPage {
        who: identity.to_string(),
        nav: "",
        status: 403,
        title: "Not allowed to read the audit trail".to_string(),
        message: format!(
            "Your certificate identifies you as {identity}. The console shows the audit trail to those the consortium's policy allows to read it (audit, read: compliance officers and auditors); the policy does not allow you."
        ),
        refusal: Some(Refusal {
            identity: identity.to_string(),
            rule: rule.to_string(),
            policy_digest: policy_digest.to_string(),
        }),
    };
    html(StatusCode::FORBIDDEN, &page).unwrap_or_else(|_| StatusCode::FORBIDDEN.into_response())
}

/// A digest as a table shows it: shortened, with the whole one for a tooltip and copying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub short: String,
    pub full: String,
}

impl Digest {
    pub fn new(full: &str) -> Digest {
        Digest {
            short: super::format::short(full),
            full: full.to_string(),
        }
    }
}

/// Reads `key=value` pairs of a query string (percent-decoded); empty values count as absent.
pub(crate) fn query_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.trim().to_string()))
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

/// `s` percent-encoded as one path segment or query value.
pub(crate) fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
