//! The console's HTTPS listener: the gRPC side's handshake and identity, one policy decision per
//! request before routing, GET and HEAD only, and the same security headers on every response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, Method, Request, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tutela_protocol::server::{Caller, authenticate};
use tutela_protocol::tls::ReloadingServerConfig;

use super::ConsoleState;
use super::views::{self, ConsoleError, Viewer};

/// The stylesheet, compiled into the binary: sites are offline, and the CSP allows only 'self'.
const CSS: &str = include_str!("static/console.css");

/// Every response's Content-Security-Policy: nothing but this origin's stylesheet and inline SVG
/// (which is markup, not script); no script at all, no frames, forms only to this origin.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Serves the console on `listener` until `shutdown` completes. A failed handshake (no
/// certificate, one of another CA, a revoked one) is logged with the peer and never reaches a
/// handler.
pub async fn serve(
    state: Arc<ConsoleState>,
    listener: tokio::net::TcpListener,
    tls: Arc<ReloadingServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = routes(state.clone());
    tracing::info!(addr = %listener.local_addr()?, "compliance console listening (HTTPS, client certificates required)");
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "console: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let tls = tls.clone();
        let state = state.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let stream = match authenticate(tcp, addr, tls).await {
                Ok(s) => {
                    state.log.metrics().tls.accepted();
                    s
                }
                Err(why) => {
                    state.log.metrics().tls.refused(why.reason);
                    tracing::warn!(%addr, reason = %why, "console: connection refused");
                    return;
                }
            };
            let caller = stream.caller().clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                handle(state.clone(), router.clone(), caller.clone(), req)
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%addr, error = %e, "console: connection ended");
            }
        });
    }
}

/// One request: method, then the policy's decision, then the route; headers on whatever comes
/// back.
async fn handle(
    state: Arc<ConsoleState>,
    router: Router,
    caller: Caller,
    req: Request<hyper::body::Incoming>,
) -> Result<Response, Infallible> {
    let mut response = if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = views::error_page(
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "The console is read-only",
            &format!(
                "{} is not answered here: the console only reads the trail.",
                req.method()
            ),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        r
    } else {
        match authorize(&state, &caller) {
            Err(page) => page,
            Ok(viewer) => {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(viewer);
                let mut router = router;
                match tower::Service::call(&mut router, req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
        }
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    Ok(response)
}

/// The policy's decision for the caller: `audit, read` in its home domain, as the `Audit`
/// service's `Query` asks. A refusal is the 403 page naming the identity and the rule.
fn authorize(state: &ConsoleState, caller: &Caller) -> Result<Viewer, Response> {
    let identity = caller.identity.uri();
    let Some(authz) = &state.authorizer else {
        return Ok(Viewer {
            identity,
            rule: "insecure_no_policy = true: every consortium certificate may read".into(),
        });
    };
    let d = authz.decide_for(&caller.identity, "audit", "read");
    if d.allowed {
        tracing::debug!(caller = %identity, rule = %d.rule, "console: read allowed");
        Ok(Viewer {
            identity,
            rule: d.rule,
        })
    } else {
        tracing::warn!(caller = %identity, rule = %d.rule, policy = %d.policy_digest, "console: read denied");
        Err(views::forbidden_page(
            &identity,
            &d.rule,
            &d.policy_digest.to_hex(),
        ))
    }
}

fn routes(state: Arc<ConsoleState>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/events", get(events))
        .route("/events/{seq}/proof", get(proof))
        .route("/jobs", get(jobs))
        .route("/jobs/{job}", get(job))
        .route("/sites", get(sites))
        .route("/models", get(models))
        .route("/models/{digest}", get(model))
        .route("/reports", get(report))
        .route("/static/console.css", get(css))
        .fallback(not_found)
        .with_state(state)
}

type St = State<Arc<ConsoleState>>;
type Who = axum::Extension<Viewer>;

fn page(viewer: &Viewer, r: Result<Response, ConsoleError>) -> Response {
    r.unwrap_or_else(|e| e.into_page(viewer))
}

async fn overview(State(s): St, axum::Extension(v): Who) -> Response {
    let r = views::overview::build(&s, &v).await;
    page(&v, r)
}

async fn events(State(s): St, axum::Extension(v): Who, RawQuery(q): RawQuery) -> Response {
    let r = views::events::build(&s, &v, q.as_deref().unwrap_or("")).await;
    page(&v, r)
}

async fn proof(State(s): St, axum::Extension(v): Who, Path(seq): Path<String>) -> Response {
    let r = views::events::proof(&s, &seq).await;
    page(&v, r)
}

async fn jobs(State(s): St, axum::Extension(v): Who) -> Response {
    let r = views::jobs::list(&s, &v).await;
    page(&v, r)
}

async fn job(State(s): St, axum::Extension(v): Who, Path(job): Path<String>) -> Response {
    let r = views::jobs::detail(&s, &v, &job).await;
    page(&v, r)
}

async fn sites(State(s): St, axum::Extension(v): Who) -> Response {
    let r = views::sites::build(&s, &v).await;
    page(&v, r)
}

async fn models(State(s): St, axum::Extension(v): Who) -> Response {
    let r = views::models::list(&s, &v).await;
    page(&v, r)
}

async fn model(State(s): St, axum::Extension(v): Who, Path(digest): Path<String>) -> Response {
    let r = views::models::detail(&s, &v, &digest).await;
    page(&v, r)
}

async fn report(State(s): St, axum::Extension(v): Who, RawQuery(q): RawQuery) -> Response {
    let r = crate::report::console::download(&s, &v, q.as_deref().unwrap_or("")).await;
    page(&v, r)
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

async fn not_found(axum::Extension(v): Who, req: Request<Body>) -> Response {
    ConsoleError::NotFound(format!("no page at {}", req.uri().path())).into_page(&v)
}
