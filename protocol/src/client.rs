//! Connecting to a Tutela server over mutual TLS.
//!
//! The connector does the TLS handshake itself with a [`rustls::ClientConfig`] from
//! [`crate::tls::client_config`], so the server is checked against the consortium CA and its CRL,
//! and, when an expected identity is given, the server's certificate must name exactly that
//! principal: a node talks to `spiffe://<consortium>/coordinator`, not to any server the CA signed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::identity::Identity;
use crate::pki;
use crate::tls::{self, TlsError, TlsFiles, TlsMaterial};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("invalid server address {addr:?}: {why}")]
    Address { addr: String, why: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// How to reach one server: its address, and the TLS it must pass.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// If set, the server's certificate must carry exactly this identity.
    pub expect_server: Option<Identity>,
}

impl ClientTls {
    pub fn from_material(
        m: &TlsMaterial,
        expect_server: Option<Identity>,
    ) -> Result<Self, TlsError> {
        Ok(ClientTls {
            config: Arc::new(tls::client_config(m)?),
            expect_server,
        })
    }

    pub fn load(files: &TlsFiles, expect_server: Option<Identity>) -> Result<Self, TlsError> {
        Self::from_material(&TlsMaterial::load(files)?, expect_server)
    }
}

/// Splits `host:port` (or `[v6]:port`) and checks the host can be a TLS server name.
fn parse_addr(addr: &str) -> Result<(String, ServerName<'static>), ClientError> {
    let bad = |why: &str| ClientError::Address {
        addr: addr.to_string(),
        why: why.to_string(),
    };
    let addr = addr
        .strip_prefix("https://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| bad("the host is not a DNS name or IP address"))?;
    Ok((addr.to_string(), name))
}

/// Makes TCP connections and runs the mutual-TLS handshake for tonic's channel.
#[derive(Clone)]
struct MtlsConnector {
    hostport: String,
    server_name: ServerName<'static>,
    tls: ClientTls,
}

type Connection = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for MtlsConnector {
    type Response = Connection;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Connection, std::io::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.hostport).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(this.tls.config.clone())
                .connect(this.server_name.clone(), tcp)
                .await?;
            if let Some(expected) = &this.tls.expect_server {
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .ok_or_else(|| std::io::Error::other("the server presented no certificate"))?;
                let got = pki::identity_of_cert_der(leaf).map_err(std::io::Error::other)?;
                if &got != expected {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "the server at {} is {got}, not the expected {expected}",
                            this.hostport
                        ),
                    ));
                }
            }
            Ok(TokioIo::new(stream))
        })
    }
}

/// An endpoint for `addr` (`host:port`) with Tutela's HTTP/2 settings, and a connector doing mutual
/// TLS. The host is the name the server certificate must carry (a DNS or IP SAN).
fn endpoint(addr: &str, tls: ClientTls) -> Result<(Endpoint, MtlsConnector), ClientError> {
    let (hostport, server_name) = parse_addr(addr)?;
    endpoint_for(addr, hostport, server_name, tls)
}

fn endpoint_for(
    addr: &str,
    hostport: String,
    server_name: ServerName<'static>,
    tls: ClientTls,
) -> Result<(Endpoint, MtlsConnector), ClientError> {
    // The scheme is http because TLS is done by our connector, not by tonic.
    let endpoint = Endpoint::from_shared(format!("http://{hostport}"))
        .map_err(|e| ClientError::Address {
            addr: addr.to_string(),
            why: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        // Large HTTP/2 frames for the server's tensor chunks (16 KiB by default).
        .max_frame_size(1u32 << 20)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .tcp_nodelay(true);
    Ok((
        endpoint,
        MtlsConnector {
            hostport,
            server_name,
            tls,
        },
    ))
}

/// Connects now; fails if the server cannot be reached or the handshake fails.
pub async fn connect(addr: &str, tls: ClientTls) -> Result<Channel, ClientError> {
    let (endpoint, connector) = endpoint(addr, tls)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })
}

/// Connects now to `dial` (an address to open the TCP connection to) while checking the server's
/// certificate for `server_name` (a DNS or IP SAN it carries): for a probe inside the server's
/// own pod, which dials loopback but must verify the name the certificate was issued for.
pub async fn connect_at(
    dial: SocketAddr,
    server_name: &str,
    tls: ClientTls,
) -> Result<Channel, ClientError> {
    let addr = format!("{server_name} via {dial}");
    let name = ServerName::try_from(server_name.to_string()).map_err(|_| ClientError::Address {
        addr: addr.clone(),
        why: "the server name is not a DNS name or IP address".to_string(),
    })?;
    let (endpoint, connector) = endpoint_for(&addr, dial.to_string(), name, tls)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| ClientError::Connect { addr, source })
}

/// A channel that connects on first use and reconnects after a failure: for long-lived agents.
pub fn connect_lazy(addr: &str, tls: ClientTls) -> Result<Channel, ClientError> {
    let (endpoint, connector) = endpoint(addr, tls)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}
