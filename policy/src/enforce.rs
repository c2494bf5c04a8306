//! Enforcement on every RPC: a tower layer in front of a tonic service.
//!
//! For each request, [`rpc_permission`] maps the gRPC method path to an `(object, action)`; the
//! caller's verified identity (the `Caller` that `tutela_protocol::server::serve` puts in the
//! request's extensions) is checked by the [`Authorizer`] in its home domain before the handler
//! runs. A denial is answered with PERMISSION_DENIED naming the rule and the policy digest, and
//! every decision, allowed or not, goes to the [`DecisionSink`] (the coordinator and the audit
//! service forward them to the audit trail).
//!
//! A handler can still refuse what the policy allowed (an approval whose signature does not
//! verify, an update for another site's task). Such a refusal, answered with PERMISSION_DENIED
//! before any response message, is a denial too: the layer reports it to the sink as a second,
//! denying decision whose rule is the handler's message, so that every denial a caller sees is
//! recorded, not only those the policy file decided.

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
/// service (and a method a listed service does not have yet) maps to its lower-cased short name
/// and method name, so that a policy can still name it (`/tutela.v1.Reports/Export` →
/// `reports`, `export`) and no rule written for a known action allows it by accident.
pub fn rpc_permission(path: &str) -> (String, String) {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let fixed = |o: &str, a: &str| (o.to_string(), a.to_string());
    match (service, method) {
        // Checking a job asks the sites what submitting it would: whoever may submit may check.
        ("tutela.v1.Jobs", "SubmitJob" | "AmendJob" | "UploadBaseModel" | "CheckJob") => {
            fixed("jobs", "submit")
        }
        // A statistics job's result file is read as its status is.
        ("tutela.v1.Jobs", "GetJob" | "ListJobs" | "WatchJob" | "GetStatistics") => {
            fixed("jobs", "read")
        }
        ("tutela.v1.Jobs", "CancelJob") => fixed("jobs", "cancel"),
        ("tutela.v1.Jobs", "ApproveJob" | "RejectJob" | "WithdrawApproval") => {
            fixed("jobs", "approve")
        }
        ("tutela.v1.Federation", _) => fixed("federation", "participate"),
        ("tutela.v1.Identity", _) => fixed("identity", "read"),
        ("tutela.v1.ModelExchange", "Upload") => fixed("models", "write"),
        ("tutela.v1.ModelExchange", _) => fixed("models", "read"),
        // The model registry: reading names, versions and stage histories; signing a stage move
        // (who must sign is the policy's `p3` stage rules, checked by the handler); fetching a
        // version's file (consumers: site nodes, serving processes).
        ("tutela.v1.Registry", "ListModels" | "GetModel") => fixed("registry", "read"),
        ("tutela.v1.Registry", "MoveStage") => fixed("registry", "stage"),
        ("tutela.v1.Registry", "FetchModel") => fixed("registry", "fetch"),
        // The audit service. `read` returns events (their actors, subjects and payloads);
        // `verify` returns only signed tree heads and hash proofs, which is what a site needs to
        // hold a checkpoint and check that history was not rewritten, without seeing the events.
        ("tutela.v1.Audit", "Append") => fixed("audit", "write"),
        ("tutela.v1.Audit", "Query" | "InclusionProof") => fixed("audit", "read"),
        // Reporting the checkpoint a site now holds is part of holding one (the handler also
        // requires the caller to be a site's node).
        (
            "tutela.v1.Audit",
            "ListCheckpoints"
            | "GetCheckpoint"
            | "ConsistencyProof"
            | "LogInfo"
            | "ReportHeldCheckpoint",
        ) => fixed("audit", "verify"),
        (s, m) => (
            s.rsplit('.').next().unwrap_or(s).to_ascii_lowercase(),
            m.to_ascii_lowercase(),
        ),
    }
}

/// The narrower `(object, action)` a method falls back to when the policy denies its own: an
/// audit `Query` by a principal allowed only `audit, read_own` (a site node, the coordinator) is
/// let through marked [`OwnEventsOnly`], and the audit service then answers with the caller's own
/// events and nothing else. Inclusion proofs have no narrower form.
pub fn narrower_permission(path: &str) -> Option<(String, String)> {
    match path.trim_start_matches('/').split_once('/') {
        Some(("tutela.v1.Audit", "Query")) => Some(("audit".into(), "read_own".into())),
        _ => None,
    }
}

/// Put in a request's extensions when the policy allowed it only through its
/// [`narrower_permission`]: the handler must answer with the caller's own records only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnEventsOnly;

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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(authz) = &self.layer.authorizer else {
            return Box::pin(inner.call(req));
        };
        let path = req.uri().path().to_string();
        let Some(caller) = req.extensions().get::<Caller>() else {
            let status =
                Status::unauthenticated("no verified client certificate on this connection");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let caller = caller.identity.clone();
        let (object, action) = rpc_permission(&path);
        let mut decision = authz.decide_for(&caller, &object, &action);
        if !decision.allowed
            && let Some((object, action)) = narrower_permission(&path)
        {
            // Only the narrower decision is recorded: a node reading its own spends is not a
            // denied read of the whole trail.
            let narrow = authz.decide_for(&caller, &object, &action);
            if narrow.allowed {
                req.extensions_mut().insert(OwnEventsOnly);
                decision = narrow;
            }
        }
        self.layer.sink.record(&decision, &caller, &path);
        if !decision.allowed {
            let status = Status::permission_denied(denial_message(&caller, &decision));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let sink = self.layer.sink.clone();
        let response = inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            if let Some(refusal) = handler_refusal(&response, decision) {
                sink.record(&refusal, &caller, &path);
            }
            Ok(response)
        })
    }
}

/// The PERMISSION_DENIED message of a policy denial: who, what, where, the rule and the digest of
/// the policy that decided.
fn denial_message(caller: &Identity, d: &Decision) -> String {
    format!(
        "{caller} may not {} {} (in {}): {} [policy {}]",
        d.action, d.object, d.domain, d.rule, d.policy_digest
    )
}

/// The denial a handler answered, if it refused with PERMISSION_DENIED at once (a status in the
/// response headers: tonic's trailers-only answer to a handler's `Err`). `allowed` is the
/// policy's decision that let the request through; the refusal keeps its request and digest and
/// names the handler's reason as its rule.
fn handler_refusal(response: &http::Response<Body>, allowed: Decision) -> Option<Decision> {
    let status = Status::from_header_map(response.headers())?;
    (status.code() == tonic::Code::PermissionDenied).then(|| Decision {
        allowed: false,
        rule: format!("refused by the service: {}", status.message()),
        ..allowed
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tower::Service as _;

    use super::*;

    /// Keeps every decision it is given, in order.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(Decision, String, String)>>);

    impl DecisionSink for Recorded {
        fn record(&self, d: &Decision, caller: &Identity, method: &str) {
            self.0
                .lock()
                .unwrap()
                .push((d.clone(), caller.uri(), method.to_string()));
        }
    }

    /// A handler that answers every request with `answer` (OK: an empty 200 response).
    #[derive(Clone)]
    struct Handler {
        answer: Option<Status>,
        calls: Arc<Mutex<u32>>,
        /// Whether each call came marked [`OwnEventsOnly`].
        own_only: Arc<Mutex<Vec<bool>>>,
    }

    impl tower::Service<http::Request<()>> for Handler {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            *self.calls.lock().unwrap() += 1;
            self.own_only
                .lock()
                .unwrap()
                .push(req.extensions().get::<OwnEventsOnly>().is_some());
            let response = match &self.answer {
                Some(status) => status.clone().into_http(),
                None => http::Response::new(Body::empty()),
            };
            Box::pin(async move { Ok(response) })
        }
    }

    const POLICY: &str = "p, spiffe://t/site/*/node, site:*, audit, write, allow\n\
                          p, spiffe://t/site/*/node, site:*, audit, read_own, allow\n\
                          p, auditor, *, audit, read, allow\n\
                          p, auditor, *, audit, write, deny\n\
                          g, spiffe://t/site/a/user/aud, auditor, site:a\n";

    async fn enforced(
        dir: &std::path::Path,
        answer: Option<Status>,
    ) -> (Enforced<Handler>, Arc<Recorded>, Arc<Mutex<u32>>) {
        std::fs::write(
            dir.join("model.conf"),
            include_str!("../../deploy/policy/model.conf"),
        )
        .unwrap();
        std::fs::write(dir.join("policy.csv"), POLICY).unwrap();
        let authz = Authorizer::load(&dir.join("model.conf"), &dir.join("policy.csv"))
            .await
            .unwrap();
        let sink = Arc::new(Recorded::default());
        let calls = Arc::new(Mutex::new(0));
        let layer = EnforceLayer::new(authz, sink.clone());
        let handler = Handler {
            answer,
            calls: calls.clone(),
            own_only: Arc::default(),
        };
        (layer.wrap(handler), sink, calls)
    }

    fn request(path: &str, identity: &str) -> http::Request<()> {
        let mut req = http::Request::builder().uri(path).body(()).unwrap();
        req.extensions_mut().insert(Caller {
            identity: identity.parse().unwrap(),
            serial: "01".into(),
            remote_addr: "127.0.0.1:1".parse().unwrap(),
        });
        req
    }

    #[tokio::test]
    async fn a_query_allowed_only_as_read_own_is_marked_and_other_reads_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (mut svc, sink, calls) = enforced(dir.path(), None).await;
        let own_only = svc.inner.own_only.clone();
        let node = "spiffe://t/site/a/node";
        // A node may Query (its own events: the mark tells the handler so) ...
        let response = svc
            .call(request("/tutela.v1.Audit/Query", node))
            .await
            .unwrap();
        assert!(Status::from_header_map(response.headers()).is_none());
        // ... but has no narrower form of an inclusion proof, which stays denied.
        let response = svc
            .call(request("/tutela.v1.Audit/InclusionProof", node))
            .await
            .unwrap();
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        // An auditor's Query is a full read, unmarked.
        svc.call(request(
            "/tutela.v1.Audit/Query",
            "spiffe://t/site/a/user/aud",
        ))
        .await
        .unwrap();
        assert_eq!(*calls.lock().unwrap(), 2);
        assert_eq!(*own_only.lock().unwrap(), [true, false]);
        let recorded = sink.0.lock().unwrap();
        // The node's Query is recorded once, as the read_own that allowed it.
        assert_eq!(recorded[0].0.action, "read_own");
        assert!(recorded[0].0.allowed);
        assert_eq!(recorded[1].0.action, "read");
        assert!(!recorded[1].0.allowed);
    }

    #[tokio::test]
    async fn a_policy_denial_never_reaches_the_handler_and_names_its_rule() {
        let dir = tempfile::tempdir().unwrap();
        let (mut svc, sink, calls) = enforced(dir.path(), None).await;
        let response = svc
            .call(request(
                "/tutela.v1.Audit/Append",
                "spiffe://t/site/a/user/aud",
            ))
            .await
            .unwrap();
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status
                .message()
                .contains("p, auditor, *, audit, write, deny"),
            "{status:?}"
        );
        assert_eq!(*calls.lock().unwrap(), 0, "the handler must not run");
        let recorded = sink.0.lock().unwrap();
        assert_eq!(recorded.len(), 1);
        let (d, who, method) = &recorded[0];
        assert!(!d.allowed);
        assert_eq!(d.rule, "p, auditor, *, audit, write, deny");
        assert_eq!(who, "spiffe://t/site/a/user/aud");
        assert_eq!(method, "/tutela.v1.Audit/Append");
        assert!(status.message().contains(&d.policy_digest.to_hex()));
    }

    #[tokio::test]
    async fn a_handler_refusal_after_an_allow_is_recorded_as_a_denial() {
        let dir = tempfile::tempdir().unwrap();
        let refusal = Status::permission_denied("approval refused: the signature does not verify");
        let (mut svc, sink, calls) = enforced(dir.path(), Some(refusal)).await;
        let response = svc
            .call(request("/tutela.v1.Audit/Append", "spiffe://t/site/a/node"))
            .await
            .unwrap();
        assert_eq!(*calls.lock().unwrap(), 1);
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let recorded = sink.0.lock().unwrap();
        assert_eq!(recorded.len(), 2, "{recorded:?}");
        assert!(recorded[0].0.allowed);
        let (d, who, _) = &recorded[1];
        assert!(!d.allowed);
        assert_eq!(
            d.rule,
            "refused by the service: approval refused: the signature does not verify"
        );
        assert_eq!((d.object.as_str(), d.action.as_str()), ("audit", "write"));
        assert_eq!(d.policy_digest, recorded[0].0.policy_digest);
        assert_eq!(who, "spiffe://t/site/a/node");
    }

    #[tokio::test]
    async fn an_answer_or_another_error_adds_no_decision() {
        let dir = tempfile::tempdir().unwrap();
        for answer in [
            None,
            Some(Status::invalid_argument("payload_json is not JSON")),
        ] {
            let (mut svc, sink, calls) = enforced(dir.path(), answer).await;
            svc.call(request("/tutela.v1.Audit/Append", "spiffe://t/site/a/node"))
                .await
                .unwrap();
            assert_eq!(*calls.lock().unwrap(), 1);
            let recorded = sink.0.lock().unwrap();
            assert_eq!(recorded.len(), 1, "{recorded:?}");
            assert!(recorded[0].0.allowed);
        }
    }

    #[test]
    fn methods_map_to_objects_and_actions() {
        let p = |s: &str| rpc_permission(s);
        assert_eq!(
            p("/tutela.v1.Jobs/SubmitJob"),
            ("jobs".into(), "submit".into())
        );
        // Uploading a job's base model is part of submitting it.
        assert_eq!(
            p("/tutela.v1.Jobs/UploadBaseModel"),
            ("jobs".into(), "submit".into())
        );
        assert_eq!(
            p("/tutela.v1.Federation/FetchBaseModel"),
            ("federation".into(), "participate".into())
        );
        assert_eq!(
            p("/tutela.v1.Jobs/CheckJob"),
            ("jobs".into(), "submit".into())
        );
        assert_eq!(
            p("/tutela.v1.Jobs/WatchJob"),
            ("jobs".into(), "read".into())
        );
        assert_eq!(
            p("/tutela.v1.Jobs/GetStatistics"),
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
            p("/tutela.v1.Audit/Append"),
            ("audit".into(), "write".into())
        );
        for (method, action) in [
            ("ListModels", "read"),
            ("GetModel", "read"),
            ("MoveStage", "stage"),
            ("FetchModel", "fetch"),
        ] {
            assert_eq!(
                p(&format!("/tutela.v1.Registry/{method}")),
                ("registry".into(), action.into())
            );
        }
        for read in ["Query", "InclusionProof"] {
            assert_eq!(
                p(&format!("/tutela.v1.Audit/{read}")),
                ("audit".into(), "read".into())
            );
        }
        for verify in [
            "ListCheckpoints",
            "GetCheckpoint",
            "ConsistencyProof",
            "LogInfo",
            "ReportHeldCheckpoint",
        ] {
            assert_eq!(
                p(&format!("/tutela.v1.Audit/{verify}")),
                ("audit".into(), "verify".into())
            );
        }
        // A method the map does not know yet is its own action: no rule for `write` or `read`
        // covers it by accident.
        assert_eq!(
            p("/tutela.v1.Audit/Export"),
            ("audit".into(), "export".into())
        );
        assert_eq!(
            p("/tutela.v1.Reports/Export"),
            ("reports".into(), "export".into())
        );
    }
}
