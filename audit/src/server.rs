//! The `tutela-audit` server: its configuration file, its checkpoint key, and serving the
//! `Audit` service over mutual TLS. Every key is documented in `deploy/config/audit.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Deserialize;
use tutela_protocol::pb;
use tutela_protocol::tls::{ReloadingServerConfig, TlsFiles};

use crate::approval::ChainCheck;
use crate::log::{AuditLog, LogConfig};
use crate::service::AuditService;
use crate::store::AuditStore;

/// `audit.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, `HOST:PORT`.
    pub listen: SocketAddr,
    /// The service's directory: the default SQLite database `audit.db` and checkpoint key.
    pub data_dir: PathBuf,
    /// `sqlite://PATH?mode=rwc` or `postgres://...`; default SQLite `data_dir/audit.db`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Ed25519 PKCS#8 checkpoint signing key; default `data_dir/checkpoint.key`, made (mode
    /// 0600) at first start if missing.
    #[serde(default)]
    pub checkpoint_key: Option<PathBuf>,
    /// Sign a checkpoint every this many events…
    #[serde(default = "default_every")]
    pub checkpoint_every: u64,
    /// …or this many seconds, whichever comes first (only when there are new events).
    #[serde(default = "default_interval")]
    pub checkpoint_interval_secs: u64,
    /// The most events committed in one transaction.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// How often the TLS files are checked for a new CRL or certificate, in seconds.
    #[serde(default = "default_reload")]
    pub tls_reload_secs: u64,
    pub tls: TlsFiles,
}

fn default_every() -> u64 {
    1000
}
fn default_interval() -> u64 {
    10
}
fn default_batch() -> usize {
    crate::store::MAX_BATCH
}
fn default_reload() -> u64 {
    10
}

impl Config {
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn key_path(&self) -> PathBuf {
        self.checkpoint_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("checkpoint.key"))
    }

    pub fn database_url(&self) -> anyhow::Result<String> {
        match &self.database_url {
            Some(u) => Ok(u.clone()),
            None => {
                std::fs::create_dir_all(&self.data_dir)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", self.data_dir.display()))?;
                Ok(AuditStore::sqlite_url(&self.data_dir.join("audit.db"))?)
            }
        }
    }
}

/// Writes a new Ed25519 PKCS#8 key to `path` (mode 0600, refusing to overwrite) and its public
/// key, as hex, to `path.pub`. Returns the public key.
pub fn keygen(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| anyhow::anyhow!("generated key does not parse: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    f.write_all(pkcs8.as_ref())
        .and_then(|_| f.sync_all())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let public = key.public_key().as_ref().to_vec();
    let pub_path = public_key_path(path);
    std::fs::write(&pub_path, format!("{}\n", hex::encode(&public)))
        .map_err(|e| anyhow::anyhow!("{}: {e}", pub_path.display()))?;
    Ok(public)
}

/// `KEY.pub` beside the key.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Loads the checkpoint key, refusing one that others can read.
pub fn load_key(path: &Path) -> anyhow::Result<Ed25519KeyPair> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "{}: the checkpoint key is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ed25519KeyPair::from_pkcs8(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 PKCS#8 key: {e}", path.display()))
}

/// Opens the store, starts the log and serves until `shutdown` completes.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let tls = ReloadingServerConfig::load(config.tls.clone())?;
    let identity = tls.identity();
    if identity.principal != tutela_protocol::Principal::Audit {
        anyhow::bail!(
            "{}: this certificate is {identity}, not an audit service certificate",
            config.tls.cert.display()
        );
    }
    let key_path = config.key_path();
    if !key_path.exists() {
        let public = keygen(&key_path)?;
        tracing::warn!(key = %key_path.display(), public_key = %hex::encode(public), "made a new checkpoint key; give its public key to every site");
    }
    let key = load_key(&key_path)?;
    let store = AuditStore::open(&config.database_url()?).await?;
    let mut log_config = LogConfig::new(identity.uri());
    log_config.checkpoint_every = config.checkpoint_every.max(1);
    log_config.checkpoint_interval = Duration::from_secs(config.checkpoint_interval_secs.max(1));
    log_config.max_batch = config.max_batch.clamp(1, crate::store::MAX_BATCH);
    // Officers' certificates in approvals must chain to the consortium CA and not be revoked:
    // checked with the same (reloaded) CA and CRL that the TLS listener uses.
    let tls_for_check = Arc::downgrade(&tls);
    let chain_check: ChainCheck = Arc::new(move |chain| match tls_for_check.upgrade() {
        Some(tls) => tls.reverify_client(chain).map_err(|e| e.to_string()),
        None => Err("the service is shutting down".to_string()),
    });
    let log = AuditLog::start(store, key, log_config, Some(chain_check)).await?;
    tracing::info!(events = log.size(), public_key = %hex::encode(log.public_key()), "audit log opened and verified");

    let (router, reporter) =
        tutela_protocol::server::router_with_standard_services(tutela_protocol::server::builder());
    reporter
        .set_serving::<pb::audit_server::AuditServer<AuditService>>()
        .await;
    let router = router.add_service(pb::audit_server::AuditServer::new(AuditService { log }));
    let _watcher = tls.spawn_watcher(Duration::from_secs(config.tls_reload_secs.max(1)));
    tracing::info!(addr = %listener.local_addr()?, %identity, "audit service listening");
    tutela_protocol::server::serve(router, listener, tls, shutdown).await?;
    Ok(())
}
