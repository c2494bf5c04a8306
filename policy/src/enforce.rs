//! Enforcement on every RPC: a tower layer in front of a tonic service.
//!
//! For each request, [`rpc_permission`] maps the gRPC method path to an `(object, action)`; the
//! caller's verified identity (the `Caller` that `tutela_protocol::server::serve` puts in the
//! request's extensions) is checked by the [`Authorizer`] in its home domain before the handler
//! runs. A denial is answered with PERMISSION_DENIED naming the rule and the policy digest, and
//! every decision, allowed or not, goes to the [`DecisionSink`] (the coordinator forwards them to
//! the audit trail).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tutela_protocol::identity::Identity;
use tutela_protocol::server::Caller;

use crate::authz::{Authorizer, Decision};

/// Where decisions go: the audit trail, a log, a test's list.
pub trait DecisionSink: Send + Sync + 'static {
    /// Called for every decision, before the handler runs (or instead of it, for a denial).
    /// Must not block: a sink that writes somewhere slow queues the decision.
    fn record(&self, decision: &Decision, caller: &Identity, method: &str);
}

/// Records decisions as tracing events: denials at WARN, allows at DEBUG.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingSink;

impl DecisionSink for TracingSink {
    fn record(&self, d: &Decision, caller: &Identity, method: &str) {
        if d.allowed {
            tracing::debug!(target: "tutela::authz", caller = %caller, %method, domain = %d.domain, object = %d.object, action = %d.action, rule = %d.rule, policy = %d.policy_digest, "allowed");
        } else {
            tracing::warn!(target: "tutela::authz", caller = %caller, %method, domain = %d.domain, object = %d.object, action = %d.action, rule = %d.rule, policy = %d.policy_digest, "denied");
        }
    }
}

/// The `(object, action)` a gRPC method path asks for. Tutela's services are listed; any other
/// service maps to its lower-cased short name and method name, so that a policy can still name
/// it (`/tutela.v1.Audit/Query` → `audit`, `query`).
pub fn rpc_permission(path: &str) -> (String, String) {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let fixed = |o: &str, a: &str| (o.to_string(), a.to_string());
    match (service, method) {
        ("tutela.v1.Jobs", "SubmitJob" | "AmendJob") => fixed("jobs", "submit"),
        ("tutela.v1.Jobs", "GetJob" | "ListJobs" | "WatchJob") => fixed("jobs", "read"),
        ("tutela.v1.Jobs", "CancelJob") => fixed("jobs", "cancel"),
        ("tutela.v1.Jobs", "ApproveJob" | "RejectJob" | "WithdrawApproval") => {
            fixed("jobs", "approve")
        }
        ("tutela.v1.Federation", _) => fixed("federation", "participate"),
        ("tutela.v1.Identity", _) => fixed("identity", "read"),
        ("tutela.v1.ModelExchange", "Upload") => fixed("models", "write"),
        ("tutela.v1.ModelExchange", _) => fixed("models", "read"),
        (s, m) => (
            s.rsplit('.').next().unwrap_or(s).to_ascii_lowercase(),
            m.to_ascii_lowercase(),
        ),
    }
}

/// The layer. `authorizer = None` turns enforcement off (for benchmarks that measure its cost).
#[derive(Clone)]
pub struct EnforceLayer {
    authorizer: Option<Arc<Authorizer>>,
    sink: Arc<dyn DecisionSink>,
}

impl EnforceLayer {
    pub fn new(authorizer: Arc<Authorizer>, sink: Arc<dyn DecisionSink>) -> Self {
        EnforceLayer {
            authorizer: Some(authorizer),
            sink,
        }
    }

    /// A layer that lets everything through without a decision.
    pub fn off() -> Self {
        EnforceLayer {
            authorizer: None,
            sink: Arc::new(TracingSink),
        }
    }

    /// Wraps one service.
    pub fn wrap<S>(&self, inner: S) -> Enforced<S> {
        Enforced {
            inner,
            layer: self.clone(),
        }
    }
}

impl<S> tower::Layer<S> for EnforceLayer {
    type Service = Enforced<S>;
    fn layer(&self, inner: S) -> Enforced<S> {
        self.wrap(inner)
    }
}

/// A service behind the [`EnforceLayer`].
#[derive(Clone)]
pub struct Enforced<S> {
    inner: S,
    layer: EnforceLayer,
}

impl<S: NamedService> NamedService for Enforced<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Enforced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(authz) = &self.layer.authorizer {
            let path = req.uri().path().to_string();
            let Some(caller) = req.extensions().get::<Caller>() else {
                let status =
                    Status::unauthenticated("no verified client certificate on this connection");
                return Box::pin(async move { Ok(status.into_http()) });
            };
            let (object, action) = rpc_permission(&path);
            let decision = authz.decide_for(&caller.identity, &object, &action);
            self.layer.sink.record(&decision, &caller.identity, &path);
            if !decision.allowed {
                let status = Status::permission_denied(format!(
                    "{} may not {} {} (in {}): {} [policy {}]",
                    caller.identity,
                    decision.action,
                    decision.object,
                    decision.domain,
                    decision.rule,
                    decision.policy_digest
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        // The clone that was polled ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_objects_and_actions() {
        let p = |s: &str| rpc_permission(s);
        assert_eq!(
            p("/tutela.v1.Jobs/SubmitJob"),
            ("jobs".into(), "submit".into())
        );
        assert_eq!(
            p("/tutela.v1.Jobs/WatchJob"),
            ("jobs".into(), "read".into())
        );
        assert_eq!(
            p("/tutela.v1.Jobs/ApproveJob"),
            ("jobs".into(), "approve".into())
        );
        assert_eq!(
            p("/tutela.v1.Jobs/WithdrawApproval"),
            ("jobs".into(), "approve".into())
        );
        assert_eq!(
            p("/tutela.v1.Federation/Connect"),
            ("federation".into(), "participate".into())
        );
        assert_eq!(
            p("/tutela.v1.ModelExchange/Upload"),
            ("models".into(), "write".into())
        );
        assert_eq!(
            p("/tutela.v1.Audit/Query"),
            ("audit".into(), "query".into())
        );
    }
}
