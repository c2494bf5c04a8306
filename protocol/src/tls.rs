//! rustls configurations for every Tutela endpoint: TLS 1.3 only, mutual authentication against
//! the consortium CA, certificate revocation lists, and reload from disk without a restart.
//!
//! There is deliberately no way to build a server without client authentication, nor a client
//! that skips server verification: every constructor here takes the CA bundle.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::Deserialize;

use crate::identity::Identity;
use crate::pki;

/// The files an endpoint's TLS is built from: the `[tls]` section of every Tutela config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM bundle of the consortium CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// PEM certificate (chain) of this endpoint.
    pub cert: PathBuf,
    /// PEM private key of this endpoint (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM certificate revocation list(s) signed by the CA. Peers whose certificates are listed are
    /// refused. Optional, but every deployment made by `tutela pki` has one.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The conventional layout written by `tutela pki issue --out DIR`: `DIR/ca.crt`,
    /// `DIR/<stem>.crt`, `DIR/<stem>.key`, and `DIR/crl.pem` if present.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        let crl = dir.join("crl.pem");
        TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            crl: crl.exists().then_some(crl),
        }
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .chain(self.crl.as_ref())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{path}: no {what} found in the file")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: {why}")]
    Certificate { path: PathBuf, why: String },
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the certificate verifier: {0}")]
    Verifier(String),
}

/// The parsed contents of a [`TlsFiles`] set.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// The identity in this endpoint's own certificate.
    pub identity: Identity,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn pem_err(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: format!("not valid PEM: {e}"),
    }
}

impl TlsMaterial {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca_pem = read(&files.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| pem_err(&files.ca, e))?;
            roots.add(cert).map_err(|e| TlsError::Certificate {
                path: files.ca.clone(),
                why: format!("not a usable CA certificate: {e}"),
            })?;
        }
        if roots.is_empty() {
            return Err(TlsError::Empty {
                path: files.ca.clone(),
                what: "CA certificate",
            });
        }

        let cert_pem = read(&files.cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(&files.cert, e))?;
        let leaf = chain.first().ok_or_else(|| TlsError::Empty {
            path: files.cert.clone(),
            what: "certificate",
        })?;
        let identity = pki::identity_of_cert_der(leaf).map_err(|e| TlsError::Certificate {
            path: files.cert.clone(),
            why: e.to_string(),
        })?;

        let key_pem = read(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
            path: files.key.clone(),
            why: format!("no usable private key: {e}"),
        })?;

        let mut crls = Vec::new();
        if let Some(crl_path) = &files.crl {
            let crl_pem = read(crl_path)?;
            for crl in CertificateRevocationListDer::pem_slice_iter(&crl_pem) {
                crls.push(crl.map_err(|e| pem_err(crl_path, e))?);
            }
            if crls.is_empty() {
                return Err(TlsError::Empty {
                    path: crl_path.clone(),
                    what: "certificate revocation list",
                });
            }
        }

        Ok(TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            crls,
            identity,
        })
    }
}

/// The one crypto provider Tutela uses (ring), passed explicitly so that no configuration depends
/// on which provider happens to be installed process-wide.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration that requires and verifies a client certificate chaining to the CA,
/// refuses revoked ones, and speaks only TLS 1.3 with ALPN `h2`.
pub fn server_config(m: &TlsMaterial) -> Result<ServerConfig, TlsError> {
    server_config_with_verifier(m).map(|(config, _)| config)
}

/// The verifier a server checks client certificates with: chain to the CA roots, validity at the
/// current time, client-auth usage, and the CRLs.
pub fn client_verifier(m: &TlsMaterial) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let webpki = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
        .with_crls(m.crls.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(Arc::new(ConsortiumClientVerifier {
        webpki,
        consortium: m.identity.consortium.clone(),
    }))
}

/// webpki's checks, then Tutela's own: the client certificate must name exactly one well-formed
/// principal of this server's consortium. A CA bundle may hold several consortia's CAs (a site in
/// two consortia); a certificate of the other consortium is still refused, inside the handshake.
#[derive(Debug)]
struct ConsortiumClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    consortium: String,
}

impl ClientCertVerifier for ConsortiumClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |why: String| {
            tracing::warn!(reason = %why, "client certificate refused");
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        };
        let identity = pki::identity_of_cert_der(end_entity).map_err(|e| refuse(e.to_string()))?;
        if identity.consortium != self.consortium {
            return Err(refuse(format!(
                "{identity} is not a principal of consortium {}",
                self.consortium
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn server_config_with_verifier(
    m: &TlsMaterial,
) -> Result<(ServerConfig, Arc<dyn ClientCertVerifier>), TlsError> {
    let provider = provider();
    let verifier = client_verifier(m)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, verifier))
}

/// A client configuration that verifies the server against the CA (and the CRL) and presents
/// this endpoint's certificate; TLS 1.3 with ALPN `h2` only.
pub fn client_config(m: &TlsMaterial) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider.clone())
        .with_crls(m.crls.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What changed on disk since the last load: the files' full contents, hashed. Contents rather
/// than modification times, because a rename-into-place can keep the old mtime.
fn fingerprint(files: &TlsFiles) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in files.paths() {
        match fs::read(p) {
            Ok(bytes) => {
                ctx.update(&(bytes.len() as u64).to_le_bytes());
                ctx.update(&bytes);
            }
            Err(e) => ctx.update(e.to_string().as_bytes()),
        }
    }
    ctx.finish().as_ref().to_vec()
}

/// A server configuration that can be swapped while the server runs: a new CRL or a renewed
/// certificate takes effect for every connection accepted after the reload, and live connections
/// whose client certificate no longer verifies are closed (see [`crate::server`]).
pub struct ReloadingServerConfig {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
    verifier: ArcSwap<Arc<dyn ClientCertVerifier>>,
    material: ArcSwap<TlsMaterial>,
    stamp: Mutex<Vec<u8>>,
    /// Bumped on every successful reload; connections re-check their peer when it changes.
    generation: tokio::sync::watch::Sender<u64>,
}

impl ReloadingServerConfig {
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamp = fingerprint(&files);
        let material = TlsMaterial::load(&files)?;
        let (config, verifier) = server_config_with_verifier(&material)?;
        Ok(Arc::new(ReloadingServerConfig {
            files,
            current: ArcSwap::from_pointee(config),
            verifier: ArcSwap::from_pointee(verifier),
            material: ArcSwap::from_pointee(material),
            stamp: Mutex::new(stamp),
            generation: tokio::sync::watch::channel(0).0,
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration new connections are accepted with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// The material the current configuration was built from.
    pub fn material(&self) -> Arc<TlsMaterial> {
        self.material.load_full()
    }

    /// The identity in the server's own certificate.
    pub fn identity(&self) -> Identity {
        self.material.load().identity.clone()
    }

    /// Re-checks a client chain accepted earlier against the current CA, CRLs and clock.
    pub fn reverify_client(&self, chain: &[CertificateDer<'static>]) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verifier
            .load()
            .verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now())
            .map(|_| ())
    }

    pub fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the files if they changed. Returns whether a new configuration is in force. On
    /// error the running configuration stays as it was (a half-written file never takes a server
    /// down), and the error says which file is wrong.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let stamp = fingerprint(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == stamp {
            return Ok(false);
        }
        let material = TlsMaterial::load(&self.files)?;
        let (config, verifier) = server_config_with_verifier(&material)?;
        self.current.store(Arc::new(config));
        self.verifier.store(Arc::new(verifier));
        self.material.store(Arc::new(material));
        *last = stamp;
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(cert = %self.files.cert.display(), "TLS configuration reloaded");
        Ok(true)
    }

    /// Polls the files every `interval` and reloads on change, until the returned task is
    /// aborted. Errors are logged and retried at the next tick.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                if let Err(e) = this.reload() {
                    tracing::error!(error = %e, "TLS reload failed; keeping the previous configuration");
                }
            }
        })
    }
}
