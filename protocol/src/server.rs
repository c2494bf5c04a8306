//! Serving tonic services over mutual TLS, with the caller's verified identity in every request.
//!
//! The accept loop terminates TLS itself (tokio-rustls with a [`ReloadingServerConfig`]) so that it
//! can use CRLs, pick up reloaded certificates per connection, and read the peer's identity once,
//! at the handshake. Each connection reaches tonic as an [`AuthenticatedStream`] whose connect
//! info is a [`Caller`]; tonic puts it in every request's extensions, and handlers get it with
//! [`caller`]. A handler never parses a certificate.
//!
//! After a reload (a new CRL, say) every live connection re-verifies its client's certificate, and
//! one that no longer passes is closed: revocation does not wait for the client to reconnect.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, Router};
use tonic::{Request, Status};

use crate::identity::Identity;
use crate::metrics::{HandshakeRefusal, TlsMetrics};
use crate::pki;
use crate::stream::MAX_FRAME_BYTES;
use crate::tls::ReloadingServerConfig;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The verified caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The identity from the client certificate's URI SAN, after chain and revocation checks.
    pub identity: Identity,
    /// The client certificate's serial, lowercase hex.
    pub serial: String,
    pub remote_addr: SocketAddr,
}

/// The caller of a request, or UNAUTHENTICATED if the request did not come through
/// [`serve`] (which cannot happen in a Tutela server, but a handler must not assume).
pub fn caller<T>(request: &Request<T>) -> Result<&Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate on this connection"))
}

/// The caller, required to be a node or user of `site`; PERMISSION_DENIED otherwise, naming both.
pub fn caller_for_site<'a, T>(request: &'a Request<T>, site: &str) -> Result<&'a Caller, Status> {
    let c = caller(request)?;
    c.identity
        .require_site(site)
        .map_err(|e| Status::permission_denied(e.to_string()))?;
    Ok(c)
}

/// A TLS connection whose client certificate verified, carrying the caller's identity.
pub struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    caller: Caller,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    closed: CancellationToken,
}

impl Drop for AuthenticatedStream {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl Connected for AuthenticatedStream {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AuthenticatedStream {
    fn check_revoked(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.revoked.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client certificate no longer verifies (revoked or expired)",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AuthenticatedStream {
    /// The verified caller of this connection.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }
}

/// Why [`authenticate`] refused a connection: a bounded reason for the
/// `tutela_tls_handshakes_refused_total` metric, and the detail for the log.
#[derive(Debug)]
pub struct HandshakeRefused {
    pub reason: HandshakeRefusal,
    pub detail: String,
}

impl std::fmt::Display for HandshakeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl HandshakeRefused {
    fn new(reason: HandshakeRefusal, detail: String) -> Self {
        HandshakeRefused { reason, detail }
    }

    /// The refusal of a failed tokio-rustls accept: the rustls error inside the I/O error
    /// names what the client did wrong; anything else is the connection failing.
    fn of_accept(e: &io::Error) -> Self {
        let detail = format!("TLS handshake refused: {e}");
        let reason = match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => refusal_of_rustls(tls),
            None => HandshakeRefusal::ConnectionClosed,
        };
        HandshakeRefused::new(reason, detail)
    }
}

/// Maps what rustls (with webpki's and `ConsortiumClientVerifier`'s checks) refused to a
/// bounded reason.
pub fn refusal_of_rustls(e: &rustls::Error) -> HandshakeRefusal {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::NoCertificatesPresented => HandshakeRefusal::NoClientCert,
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => HandshakeRefusal::UnknownCa,
            C::Revoked => HandshakeRefusal::Revoked,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => HandshakeRefusal::Expired,
            C::UnknownRevocationStatus
            | C::ExpiredRevocationList
            | C::ExpiredRevocationListContext { .. } => HandshakeRefusal::RevocationUnknown,
            // ConsortiumClientVerifier: no identity, or one of another consortium.
            C::ApplicationVerificationFailure => HandshakeRefusal::WrongIdentity,
            _ => HandshakeRefusal::BadCertificate,
        },
        rustls::Error::InvalidCertRevocationList(_) => HandshakeRefusal::RevocationUnknown,
        _ => HandshakeRefusal::Protocol,
    }
}

/// Completes the handshake of one accepted TCP connection and reads the caller's identity: the
/// gRPC accept loop's and the audit service's HTTPS console's, so both take the principal from a
/// certificate the same way and both cut a connection whose certificate is revoked.
pub async fn authenticate(
    tcp: TcpStream,
    remote_addr: SocketAddr,
    tls: Arc<ReloadingServerConfig>,
) -> Result<AuthenticatedStream, HandshakeRefused> {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| {
            HandshakeRefused::new(HandshakeRefusal::Timeout, "TLS handshake timed out".into())
        })?
        .map_err(|e| HandshakeRefused::of_accept(&e))?;
    let chain: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    // The verifier required a client certificate, so an empty chain cannot pass the handshake.
    let leaf = chain.first().ok_or_else(|| {
        HandshakeRefused::new(
            HandshakeRefusal::NoClientCert,
            "no client certificate".into(),
        )
    })?;
    let bad_identity = |e: pki::PkiError| {
        HandshakeRefused::new(
            HandshakeRefusal::WrongIdentity,
            format!("client certificate: {e}"),
        )
    };
    let identity = pki::identity_of_cert_der(leaf).map_err(bad_identity)?;
    // The verifier (tls::client_verifier) already refused certificates of other consortia.
    let serial = pki::serial_of_cert_der(leaf).map_err(bad_identity)?;

    let revoked = CancellationToken::new();
    let closed = CancellationToken::new();
    spawn_reverifier(tls, chain, revoked.clone(), closed.clone());
    Ok(AuthenticatedStream {
        inner: stream,
        caller: Caller {
            identity,
            serial,
            remote_addr,
        },
        revoked: Box::pin(revoked.cancelled_owned()),
        closed,
    })
}

/// Re-verifies a live connection's client chain after every reload of the TLS files, and cuts
/// the connection if it no longer passes.
fn spawn_reverifier(
    tls: Arc<ReloadingServerConfig>,
    chain: Vec<CertificateDer<'static>>,
    revoked: CancellationToken,
    closed: CancellationToken,
) {
    let mut generation = tls.generation();
    let weak = Arc::downgrade(&tls);
    drop(tls);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = closed.cancelled() => return,
                changed = generation.changed() => {
                    if changed.is_err() { return; }
                    let Some(tls) = weak.upgrade() else { return };
                    if let Err(e) = tls.reverify_client(&chain) {
                        tracing::warn!(error = %e, "closing a live connection whose client certificate no longer verifies");
                        revoked.cancel();
                        return;
                    }
                }
            }
        }
    });
}

/// A tonic server builder with the HTTP/2 settings Tutela's tensor streams need: windows large
/// enough to keep a 4 MiB chunk in flight, and keepalives that notice a vanished peer.
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
}

/// The gRPC message size limit every Tutela service is built with.
pub const MAX_MESSAGE_BYTES: usize = MAX_FRAME_BYTES;

/// Serves `router` on `listener` over mutual TLS until `shutdown` completes. A failed handshake
/// is logged with the peer's address and the reason, and never reaches a handler.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_with_metrics(router, listener, tls, TlsMetrics::unregistered(), shutdown).await
}

/// [`serve`], counting handshakes accepted and refused (by reason) in `metrics`.
pub async fn serve_with_metrics(
    router: Router,
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
    metrics: TlsMetrics,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<AuthenticatedStream, io::Error>>(64);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            let tls = tls.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match authenticate(tcp, addr, tls).await {
                    Ok(conn) => {
                        metrics.accepted();
                        tracing::debug!(peer = %conn.caller.identity, %addr, "client authenticated");
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(why) => {
                        metrics.refused(why.reason);
                        tracing::warn!(%addr, reason = %why, "connection refused")
                    }
                }
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    accept_loop.abort();
    result
}

/// Starts a router on `builder` with health (grpc.health.v1) and reflection (grpc.reflection.v1
/// and v1alpha, for older stock tools), so Kubernetes probes, grpcurl and grpc_health_probe work
/// against any Tutela endpoint. Add the server's own services to the returned router and mark them
/// serving through the returned reporter.
pub fn router_with_standard_services(
    mut builder: tonic::transport::Server,
) -> (Router, tonic_health::server::HealthReporter) {
    let (reporter, health) = tonic_health::server::health_reporter();
    // The descriptor sets are compiled into the binary, so building reflection cannot fail at
    // run time unless the build itself is broken.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection()
        .build_v1()
        .expect("embedded descriptor sets are valid");
    let v1alpha = reflection()
        .build_v1alpha()
        .expect("embedded descriptor sets are valid");
    let router = builder
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha);
    (router, reporter)
}
