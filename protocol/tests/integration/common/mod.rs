//! A throwaway consortium and a real mutual-TLS server on loopback, for the transport tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pki::{
    CertificateAuthority, IssuedCertificate, KeyAlgorithm, LeafOptions, Revocation, Validity,
};
use tutela_protocol::services::{DirModelStore, identity_service};
use tutela_protocol::tls::{ReloadingServerConfig, TlsFiles, TlsMaterial};

pub const CONSORTIUM: &str = "acme";

pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn ca(consortium: &str) -> CertificateAuthority {
    CertificateAuthority::create(
        consortium,
        KeyAlgorithm::EcdsaP256,
        Validity::days_from_now(30),
    )
    .unwrap()
}

pub fn server_opts() -> LeafOptions {
    let mut o = LeafOptions::new(Validity::days_from_now(30));
    o.dns_names = vec!["localhost".into()];
    o.ip_addresses = vec!["127.0.0.1".parse().unwrap()];
    o
}

pub fn node(site: &str) -> Principal {
    Principal::Node { site: site.into() }
}

/// Writes a certificate set in the layout `TlsFiles::in_dir` expects.
pub fn write_set(
    dir: &Path,
    stem: &str,
    ca_pem: &str,
    issued: &IssuedCertificate,
    crl_pem: Option<&str>,
) -> TlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.crt"), ca_pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), &issued.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), &issued.key_pem).unwrap();
    if let Some(crl) = crl_pem {
        std::fs::write(dir.join("crl.pem"), crl).unwrap();
    }
    TlsFiles::in_dir(dir, stem)
}

pub fn empty_crl(ca: &CertificateAuthority) -> String {
    crl_with(ca, &[], 1)
}

pub fn crl_with(ca: &CertificateAuthority, serials: &[&str], number: u64) -> String {
    let now = OffsetDateTime::now_utc();
    let revoked: Vec<Revocation> = serials
        .iter()
        .map(|s| Revocation {
            serial_hex: s.to_string(),
            revoked_at: now - time::Duration::minutes(1),
            reason: None,
        })
        .collect();
    ca.crl_pem(
        &revoked,
        number,
        now - time::Duration::minutes(1),
        now + time::Duration::days(7),
    )
    .unwrap()
}

/// A running server: the identity and model-exchange services, health and reflection.
pub struct TestServer {
    pub addr: SocketAddr,
    pub tls: Arc<ReloadingServerConfig>,
    pub store_dir: PathBuf,
    pub files: TlsFiles,
    /// Where the server counts its handshakes (`tutela_tls_handshakes_*`).
    pub metrics: tutela_protocol::metrics::prometheus::Registry,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

pub async fn start_server(
    dir: &Path,
    ca: &CertificateAuthority,
    principal: Principal,
) -> TestServer {
    init_crypto();
    let issued = ca.issue(&principal, &server_opts()).unwrap();
    let files = write_set(
        &dir.join("server"),
        "server",
        &ca.cert_pem(),
        &issued,
        Some(&empty_crl(ca)),
    );
    let tls = ReloadingServerConfig::load(files.clone()).unwrap();
    let store_dir = dir.join("models");
    let store = DirModelStore::open(&store_dir).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (router, reporter) =
        tutela_protocol::server::router_with_standard_services(tutela_protocol::server::builder());
    reporter
        .set_serving::<tutela_protocol::pb::identity_server::IdentityServer<
            tutela_protocol::services::IdentityService,
        >>()
        .await;
    let router = router
        .add_service(identity_service())
        .add_service(store.into_service());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tls2 = tls.clone();
    let metrics = tutela_protocol::metrics::prometheus::Registry::new();
    let tls_metrics = tutela_protocol::metrics::TlsMetrics::register(&metrics).unwrap();
    let task = tokio::spawn(async move {
        tutela_protocol::server::serve_with_metrics(router, listener, tls2, tls_metrics, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    TestServer {
        addr,
        tls,
        store_dir,
        files,
        metrics,
        shutdown: Some(tx),
        task,
    }
}

impl TestServer {
    /// Waits (up to 2 s: the server counts in its accept task, which may lag the client's error)
    /// until `tutela_tls_handshakes_refused_total{reason}` is at least 1; returns it.
    pub async fn refused(&self, reason: &str) -> f64 {
        let series = format!("tutela_tls_handshakes_refused_total{{reason=\"{reason}\"}} ");
        let mut value = 0.0;
        for _ in 0..100 {
            let text = tutela_protocol::metrics::render(&self.metrics).unwrap();
            value = text
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{text}"));
            if value >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        value
    }
}

pub fn client_tls(
    dir: &Path,
    ca: &CertificateAuthority,
    issued: &IssuedCertificate,
    expect: Option<Identity>,
) -> ClientTls {
    let files = write_set(dir, "client", &ca.cert_pem(), issued, None);
    ClientTls::load(&files, expect).unwrap()
}

pub async fn channel(
    addr: SocketAddr,
    tls: ClientTls,
) -> Result<tonic::transport::Channel, client::ClientError> {
    client::connect(&format!("localhost:{}", addr.port()), tls).await
}

pub fn material(files: &TlsFiles) -> TlsMaterial {
    TlsMaterial::load(files).unwrap()
}
