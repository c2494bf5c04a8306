//! Prometheus metrics, shared by every Tutela service: the `[metrics]` config table, the
//! registration helpers each service's metrics handle is built with, the classic text exposition
//! (`text/plain; version=0.0.4`) and a plain-HTTP listener that serves it on `GET /metrics`.
//!
//! **Why a separate plain listener, on loopback by default.** The services' own ports require a
//! client certificate of the consortium, which a Prometheus server does not have; a second
//! listener without TLS keeps the scrape simple, and binding it to loopback keeps it on the
//! machine (a sidecar or node-local Prometheus scrapes it, or a tunnel). Metrics name sites, jobs
//! and budget keys and show how much privacy budget each dataset has spent: a listener on another
//! address is refused unless `allow_remote = true` says so on purpose
//! ([`MetricsConfig::validate`]). Nothing of a site's data (no value, no path) is ever a label:
//! every label here is an identity, a job id or a bounded enum.
//!
//! **Off unless configured.** Without a `[metrics]` table a service opens no metrics port (a
//! port is an exposure an operator should choose); it still counts, so turning the listener on
//! later needs no other change.
//!
//! Each service owns one [`Registry`] inside its metrics handle (`coordinator::metrics`,
//! `site-node::metrics_export`, `audit::metrics`), built once and passed to where events happen;
//! there is no process-global registry.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
pub use prometheus;
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use serde::Deserialize;

/// The content type of the classic text exposition format, which Prometheus scrapes and
/// `promtool check metrics` reads.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// `[metrics]` of coordinator.toml, node.toml and audit.toml.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where the plain-HTTP `/metrics` listener binds, e.g. `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// Lets `listen` be an address other machines can reach. Off by default: the metrics name
    /// sites, jobs and budget keys, and the listener has no TLS and no authentication.
    #[serde(default)]
    pub allow_remote: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "[metrics] listen = \"{listen}\" is not a loopback address: the metrics listener is plain \
         HTTP without authentication and its metrics name sites, jobs and budget keys. Listen on \
         127.0.0.1 (or ::1) and scrape through the machine, or set `allow_remote = true` in \
         [metrics] if the network in front of it is trusted"
    )]
    RemoteNotAllowed { listen: SocketAddr },
    #[error("cannot listen for metrics on {listen}: {source}")]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
}

impl MetricsConfig {
    /// Refuses a listener other machines could reach unless `allow_remote` is set.
    pub fn validate(&self) -> Result<(), MetricsError> {
        if !self.listen.ip().is_loopback() && !self.allow_remote {
            return Err(MetricsError::RemoteNotAllowed {
                listen: self.listen,
            });
        }
        Ok(())
    }
}

/// Latency buckets (seconds) for operations of milliseconds to seconds: an audit append, an
/// aggregation's finish.
pub const FAST_SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets (seconds) for what takes seconds to days: local training, an approval's wait for its
/// quorum.
pub const SLOW_SECONDS_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0,
];

/// Registers and returns a counter.
pub fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Registers and returns a labelled counter.
pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Registers and returns a labelled counter whose one label takes the values of a bounded enum,
/// each series created at 0 so that `rate()` and alerts see it before the first event.
pub fn counter_by_reason<R: MetricLabel>(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<IntCounterVec, MetricsError> {
    counter_by_reason_named::<R>(registry, name, help, "reason")
}

/// [`counter_by_reason`] with another label name (`outcome`, `result`).
pub fn counter_by_reason_named<R: MetricLabel>(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntCounterVec, MetricsError> {
    let c = counter_vec(registry, name, help, &[label])?;
    for r in R::ALL {
        c.with_label_values(&[r.label()]);
    }
    Ok(c)
}

/// Registers and returns a gauge.
pub fn int_gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let g = IntGauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Registers and returns a floating-point gauge.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> Result<Gauge, MetricsError> {
    let g = Gauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Registers and returns a labelled gauge.
pub fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<GaugeVec, MetricsError> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Registers and returns a labelled integer gauge.
pub fn int_gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Registers and returns a histogram (labels may be empty).
pub fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, MetricsError> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    // Without labels, exposed (at zero) from the start, like the other unlabelled metrics.
    if labels.is_empty() {
        h.with_label_values(&[] as &[&str]);
    }
    Ok(h)
}

/// A bounded set of label values (a refusal reason, an outcome): a label is never free text.
pub trait MetricLabel: Copy + 'static {
    const ALL: &'static [Self];
    fn label(self) -> &'static str;
}

/// Why a TLS connection to a service was refused, as a bounded label
/// (`tutela_tls_handshakes_refused_total{reason}`); see `server::HandshakeRefused`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The client presented no certificate.
    NoClientCert,
    /// The certificate does not chain to the consortium CA (another CA, self-signed).
    UnknownCa,
    /// The certificate is on the CA's revocation list.
    Revoked,
    /// The certificate has expired or is not valid yet.
    Expired,
    /// The revocation status could not be decided (no or an expired CRL for the issuer).
    RevocationUnknown,
    /// The certificate verified but names no identity of this consortium (another
    /// consortium, no or a malformed SPIFFE URI).
    WrongIdentity,
    /// Any other certificate problem (bad signature, wrong key usage, malformed).
    BadCertificate,
    /// A TLS protocol failure (no common version or cipher suite, a plain-HTTP client).
    Protocol,
    /// The handshake did not finish within the server's timeout.
    Timeout,
    /// The connection closed or failed during the handshake.
    ConnectionClosed,
}

impl MetricLabel for HandshakeRefusal {
    const ALL: &'static [Self] = &[
        HandshakeRefusal::NoClientCert,
        HandshakeRefusal::UnknownCa,
        HandshakeRefusal::Revoked,
        HandshakeRefusal::Expired,
        HandshakeRefusal::RevocationUnknown,
        HandshakeRefusal::WrongIdentity,
        HandshakeRefusal::BadCertificate,
        HandshakeRefusal::Protocol,
        HandshakeRefusal::Timeout,
        HandshakeRefusal::ConnectionClosed,
    ];
    fn label(self) -> &'static str {
        match self {
            HandshakeRefusal::NoClientCert => "no_client_cert",
            HandshakeRefusal::UnknownCa => "unknown_ca",
            HandshakeRefusal::Revoked => "revoked",
            HandshakeRefusal::Expired => "expired",
            HandshakeRefusal::RevocationUnknown => "revocation_unknown",
            HandshakeRefusal::WrongIdentity => "wrong_identity",
            HandshakeRefusal::BadCertificate => "bad_certificate",
            HandshakeRefusal::Protocol => "protocol",
            HandshakeRefusal::Timeout => "timeout",
            HandshakeRefusal::ConnectionClosed => "connection_closed",
        }
    }
}

/// The TLS listener's metrics, registered in the service's registry and handed to
/// `server::serve_with_metrics` (and the audit console's listener).
#[derive(Clone)]
pub struct TlsMetrics {
    handshakes_refused: IntCounterVec,
    handshakes_accepted: IntCounter,
}

impl TlsMetrics {
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        Ok(TlsMetrics {
            handshakes_refused: counter_by_reason::<HandshakeRefusal>(
                registry,
                "tutela_tls_handshakes_refused_total",
                "TLS connections refused before any request was served, by reason.",
            )?,
            handshakes_accepted: counter(
                registry,
                "tutela_tls_handshakes_accepted_total",
                "TLS connections whose client certificate verified.",
            )?,
        })
    }

    /// Counts nowhere a registry sees: for servers started without metrics (tests, tools).
    pub fn unregistered() -> Self {
        // Registering into a registry nobody reads cannot fail for these fixed names.
        let scratch = Registry::new();
        match TlsMetrics::register(&scratch) {
            Ok(m) => m,
            Err(_) => unreachable!("fixed metric names and labels are valid"),
        }
    }

    pub fn refused(&self, reason: HandshakeRefusal) {
        self.handshakes_refused
            .with_label_values(&[reason.label()])
            .inc();
    }

    pub fn accepted(&self) {
        self.handshakes_accepted.inc();
    }
}

/// The registry's metrics in the text exposition format.
pub fn render(registry: &Registry) -> Result<String, MetricsError> {
    let mut text = String::new();
    prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut text)?;
    Ok(text)
}

/// A bound `/metrics` listener, not yet serving: binding first lets a service fail at start (a
/// taken port, a refused address) and lets tests read the port.
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
}

impl MetricsServer {
    /// Validates `config` ([`MetricsConfig::validate`]) and binds its address.
    pub async fn bind(config: &MetricsConfig) -> Result<Self, MetricsError> {
        config.validate()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| MetricsError::Bind {
                listen: config.listen,
                source,
            })?;
        Ok(MetricsServer { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `registry` on `GET /metrics` (HTTP/1.1) until the task is dropped or aborted.
    pub async fn serve(self, registry: Registry) {
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, "metrics listening (plain HTTP, GET /metrics)");
        }
        loop {
            let (tcp, addr) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let registry = registry.clone();
                        async move { Ok::<_, Infallible>(answer(&registry, &req)) }
                    });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await
                {
                    tracing::debug!(%addr, error = %e, "metrics: connection ended");
                }
            });
        }
    }

    /// Serves on a task of its own, until the returned handle is dropped (or the runtime ends):
    /// the listener goes with the server that started it, on every path out.
    pub fn spawn(self, registry: Registry) -> MetricsTask {
        MetricsTask(tokio::spawn(self.serve(registry)))
    }
}

/// A running `/metrics` listener; dropping it stops the listener.
pub struct MetricsTask(tokio::task::JoinHandle<()>);

impl Drop for MetricsTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn answer<B>(registry: &Registry, req: &Request<B>) -> Response<String> {
    let plain = |status: StatusCode, body: &str| {
        let mut r = Response::new(body.to_string());
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match render(registry) {
        Ok(text) => {
            let mut r = Response::new(text);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: encoding failed");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics could not be encoded\n",
            )
        }
    }
}

/// Reads `http://ADDR/metrics` with a bare HTTP/1.1 GET: for the services' tests and probes,
/// which need no HTTP client crate for it.
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers in the metrics response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "metrics answered {}",
            head.lines().next().unwrap_or_default()
        )));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_listener_is_refused_without_allow_remote() {
        for addr in ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464"] {
            let c = MetricsConfig {
                listen: addr.parse().unwrap(),
                allow_remote: false,
            };
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("not a loopback address"), "{addr}: {err}");
            assert!(err.contains("allow_remote = true"), "{err}");
            assert!(
                MetricsConfig {
                    allow_remote: true,
                    ..c
                }
                .validate()
                .is_ok()
            );
        }
        for addr in ["127.0.0.1:9464", "127.0.0.2:0", "[::1]:9464"] {
            let c = MetricsConfig {
                listen: addr.parse().unwrap(),
                allow_remote: false,
            };
            assert!(c.validate().is_ok(), "{addr}");
        }
    }

    #[test]
    fn the_table_refuses_unknown_keys() {
        let err = toml::from_str::<MetricsConfig>("listen = \"127.0.0.1:1\"\nallow_remot = true")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_remot"), "{err}");
    }

    #[tokio::test]
    async fn the_listener_serves_the_registry_and_nothing_else() {
        let registry = Registry::new();
        let tls = TlsMetrics::register(&registry).unwrap();
        tls.refused(HandshakeRefusal::Revoked);
        tls.refused(HandshakeRefusal::Revoked);
        let server = MetricsServer::bind(&MetricsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            allow_remote: false,
        })
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        let task = server.spawn(registry);
        let text = scrape(addr).await.unwrap();
        assert!(
            text.contains("tutela_tls_handshakes_refused_total{reason=\"revoked\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tutela_tls_handshakes_refused_total{reason=\"unknown_ca\"} 0"),
            "{text}"
        );
        // Another path is 404.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
        drop(task);
    }
}
