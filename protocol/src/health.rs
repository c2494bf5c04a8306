//! The liveness and readiness probe of a Tutela server, run inside the server's own container.
//!
//! Every server mounts the standard `grpc.health.v1.Health` service
//! ([`crate::server::router_with_standard_services`]), but only behind mutual TLS: there is no
//! plaintext listener. Kubernetes' built-in gRPC probe speaks plaintext only, and an orchestrator
//! holds no consortium certificate, so the probe is a command instead
//! (`tutela-coordinator probe`, `tutela-audit probe`): it dials the server on loopback with the
//! server's *own* certificate (coordinator and audit certificates carry clientAuth), checks that
//! the answering server presents that same identity and a certificate valid for one of its own
//! names, and asks `Health/Check` for the whole server (service `""`). The health service sits
//! outside the policy layer, so a probe is neither a policy decision nor an audit event.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::client::{self, ClientError, ClientTls};
use crate::pki::{self, Description};
use crate::tls::{TlsError, TlsFiles, TlsMaterial};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Connect(#[from] ClientError),
    #[error(
        "the server certificate {path} names no DNS name or IP address to check the server against: \
         issue it with --dns HOST (the name clients dial)"
    )]
    NoServerName { path: String },
    #[error("cannot read the server certificate {path}: {why}")]
    Certificate { path: String, why: String },
    #[error("the health check at {addr} failed: {status}")]
    Rpc { addr: SocketAddr, status: String },
    #[error("the server at {addr} answers {status:?}, not SERVING")]
    NotServing { addr: SocketAddr, status: String },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Where a probe inside the server's own network namespace dials: loopback when the server listens
/// on every address (`0.0.0.0`, `::`), the listen address itself otherwise.
pub fn dial_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The name the probe checks the server's certificate against: `127.0.0.1` or `::1` when the
/// certificate carries it, else its first DNS name, else its first IP address.
fn server_name_of(cert_path: &std::path::Path) -> Result<String, ProbeError> {
    let path = cert_path.display().to_string();
    let pem = std::fs::read_to_string(cert_path).map_err(|e| ProbeError::Certificate {
        path: path.clone(),
        why: e.to_string(),
    })?;
    let cert = match pki::describe(&pem) {
        Ok(Description::Certificate(c)) => c,
        Ok(_) => {
            return Err(ProbeError::Certificate {
                path,
                why: "the first PEM block is not a certificate".to_string(),
            });
        }
        Err(e) => {
            return Err(ProbeError::Certificate {
                path,
                why: e.to_string(),
            });
        }
    };
    if let Some(lo) = cert.ip_addresses.iter().find(|ip| ip.is_loopback()) {
        return Ok(lo.to_string());
    }
    cert.dns_names
        .first()
        .cloned()
        .or_else(|| cert.ip_addresses.first().map(|ip| ip.to_string()))
        .ok_or(ProbeError::NoServerName { path })
}

/// Probes the server listening on `listen` with its own TLS files: `Ok` when it answers SERVING
/// for the whole server within `timeout`.
pub async fn probe_own_server(
    files: &TlsFiles,
    listen: SocketAddr,
    timeout: Duration,
) -> Result<(), ProbeError> {
    probe_own_service(files, listen, "", timeout).await
}

/// [`probe_own_server`] for one gRPC service (`package.Service`; empty: the whole server), e.g.
/// a service only a leading coordinator serves.
pub async fn probe_own_service(
    files: &TlsFiles,
    listen: SocketAddr,
    service: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let material = TlsMaterial::load(files)?;
    let server_name = server_name_of(&files.cert)?;
    // The server must be this very principal, not any server the CA signed.
    let tls = ClientTls::from_material(&material, Some(material.identity.clone()))?;
    let addr = dial_address(listen);
    let check = async {
        let channel = client::connect_at(addr, &server_name, tls).await?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|s| ProbeError::Rpc {
                addr,
                status: format!("{:?}: {}", s.code(), s.message()),
            })?
            .into_inner();
        match ServingStatus::try_from(answer.status) {
            Ok(ServingStatus::Serving) => Ok(()),
            other => Err(ProbeError::NotServing {
                addr,
                status: other.map_or_else(
                    |_| format!("status {}", answer.status),
                    |s| s.as_str_name().to_string(),
                ),
            }),
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| ProbeError::Timeout { addr, timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_probed_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:7443".parse().unwrap();
        assert_eq!(dial_address(v4), "127.0.0.1:7443".parse().unwrap());
        let v6: SocketAddr = "[::]:7444".parse().unwrap();
        assert_eq!(dial_address(v6), "[::1]:7444".parse().unwrap());
        let fixed: SocketAddr = "10.1.2.3:7443".parse().unwrap();
        assert_eq!(dial_address(fixed), fixed);
    }
}
