//! The `tutela-audit` server: its configuration file, its checkpoint key, and serving the
//! `Audit` service over mutual TLS behind the consortium's policy. Every key is documented in
//! `deploy/config/audit.toml`.
//!
//! Every `Audit` RPC passes `tutela_policy::EnforceLayer` before its handler runs: the caller's
//! certificate identity must be allowed the method's `(audit, write | read | verify)` by the
//! casbin model and policy of `[policy]` (the files the coordinator loads, reloaded when they
//! change). The service's own decisions are recorded in its own log by
//! [`LogDecisionSink`](crate::service::LogDecisionSink). Without `[policy]` the service refuses
//! to start, unless `insecure_no_policy = true` says that any consortium certificate may append
//! and read (tests of other things, never a deployment).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Deserialize;
use tutela_policy::{Authorizer, EnforceLayer};
use tutela_protocol::pb;
use tutela_protocol::tls::{ReloadingServerConfig, TlsFiles};

use crate::approval::ChainCheck;
use crate::log::{AuditLog, LogConfig};
use crate::service::{AuditService, LogDecisionSink};
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
    /// A file holding the database URL instead (a mounted Secret): read at load into
    /// `database_url`, so that a password is in neither the config file nor the environment.
    #[serde(default)]
    pub database_url_file: Option<PathBuf>,
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
    /// Who may append and read: the consortium's casbin model and policy. Required unless
    /// `insecure_no_policy` is set.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// Serve without `[policy]`: every caller with a consortium certificate may append and read.
    /// For tests of other things only; logged at WARN at every start. Setting it together with
    /// `[policy]` is a configuration error.
    #[serde(default)]
    pub insecure_no_policy: bool,
    /// The CA administrators: the only identities (SPIFFE URIs of operators or site users of
    /// this consortium) that may append `certificate.issued` and `certificate.revoked`
    /// (`tutela pki issue|sign|revoke --audit`). Empty: nobody may. Readers are told the same
    /// list (`tutela audit verify --ca-admin`).
    #[serde(default)]
    pub ca_admins: Vec<String>,
    /// The compliance officers' web console (HTTPS, its own port). Absent: not served.
    #[serde(default)]
    pub console: Option<crate::console::ConsoleConfig>,
    /// `[metrics]`: the plain-HTTP Prometheus listener (`tutela_protocol::metrics`). Absent: no
    /// metrics port.
    #[serde(default)]
    pub metrics: Option<tutela_protocol::metrics::MetricsConfig>,
    /// `[retention]`: events younger than `min_days` (at least 183) are never pruned.
    #[serde(default)]
    pub retention: crate::retention::RetentionConfig,
}

/// `[policy]` of audit.toml: the same files as the coordinator's `[policy]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The casbin model (deploy/policy/model.conf).
    pub model: PathBuf,
    /// The consortium's policy (deploy/policy/policy.csv); the audit service uses its `p` and
    /// `g` lines for the `audit` object.
    pub policy: PathBuf,
    /// How often, in seconds, the two files are checked for changes (and reloaded on SIGHUP).
    #[serde(default = "default_policy_reload")]
    pub reload_secs: u64,
}

fn default_policy_reload() -> u64 {
    5
}

/// The most events between two signed checkpoints `checkpoint_every` may ask for.
pub const MAX_CHECKPOINT_EVERY: u64 = 1_000_000;

fn default_every() -> u64 {
    // A checkpoint with every commit (stored in the same transaction): nothing acknowledged sits
    // under the hash chain alone. Measured in BENCHMARKS.md.
    1
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
    /// Reads and checks `audit.toml`; every error names the file. Relative paths start at the
    /// file's directory (as in every Tutela config), and the files it names must exist: an error
    /// names the key, the value and where it resolved.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config
            .check_authorization()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config
            .check_ranges()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if let Some(m) = &config.metrics {
            m.validate()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        config.resolve_paths(&tutela_protocol::config_path::ConfigFile::new(path))?;
        config.database_url = tutela_protocol::database::url_from_config(
            config.database_url.as_deref(),
            config.database_url_file.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Resolves every path against the config file's directory and checks the files that must
    /// exist (TLS, policy); `data_dir` and `checkpoint_key` are made at first start.
    pub fn resolve_paths(
        &mut self,
        file: &tutela_protocol::config_path::ConfigFile,
    ) -> Result<(), tutela_protocol::config_path::ConfigPathError> {
        file.resolve(&mut self.data_dir);
        if let Some(key) = &mut self.checkpoint_key {
            file.resolve(key);
        }
        if let Some(url_file) = &mut self.database_url_file {
            file.resolve(url_file);
        }
        file.tls_files("tls", &mut self.tls)?;
        if let Some(p) = &mut self.policy {
            file.existing_file("policy.model", &mut p.model)?;
            file.existing_file("policy.policy", &mut p.policy)?;
        }
        Ok(())
    }

    /// Every value against the range deploy/config/audit.toml documents: out of range is an
    /// error naming the key, never clamped into range behind the operator's back.
    pub fn check_ranges(&self) -> Result<(), tutela_protocol::config_range::OutOfRange> {
        use tutela_protocol::config_range::{MAX_PERIOD_SECS, in_range};
        in_range(
            "checkpoint_every",
            self.checkpoint_every,
            1,
            MAX_CHECKPOINT_EVERY,
        )?;
        in_range(
            "checkpoint_interval_secs",
            self.checkpoint_interval_secs,
            1,
            MAX_PERIOD_SECS,
        )?;
        in_range("max_batch", self.max_batch, 1, crate::store::MAX_BATCH)?;
        in_range("tls_reload_secs", self.tls_reload_secs, 1, MAX_PERIOD_SECS)?;
        if let Some(p) = &self.policy {
            in_range("policy.reload_secs", p.reload_secs, 1, MAX_PERIOD_SECS)?;
        }
        if let Some(c) = &self.console {
            c.check_ranges()?;
        }
        self.retention.check_ranges()?;
        Ok(())
    }

    /// The policy to enforce, `None` when `insecure_no_policy` turns enforcement off; an error
    /// when neither or both are configured.
    pub fn check_authorization(&self) -> anyhow::Result<Option<&PolicyConfig>> {
        match (&self.policy, self.insecure_no_policy) {
            (Some(p), false) => Ok(Some(p)),
            (None, true) => Ok(None),
            (Some(_), true) => anyhow::bail!(
                "both [policy] and insecure_no_policy = true are set: remove insecure_no_policy to enforce the policy, or [policy] to run without one"
            ),
            (None, false) => anyhow::bail!(
                "no [policy] table: the audit service does not serve without authorization; give [policy] model and policy (deploy/policy/), or set insecure_no_policy = true for a test deployment"
            ),
        }
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

/// The audit service with its TLS configuration and policy loaded, before the log is opened.
/// `main` keeps handles on both to reload them on SIGHUP.
pub struct Server {
    config: Config,
    tls: Arc<ReloadingServerConfig>,
    authorizer: Option<Arc<Authorizer>>,
    metrics: crate::metrics::AuditMetrics,
    /// The `/metrics` listener of `[metrics]`, bound at load.
    metrics_listener: Option<tutela_protocol::metrics::MetricsServer>,
}

impl Server {
    /// Loads the TLS files (the certificate must be an audit service's) and the policy.
    pub async fn load(config: Config) -> anyhow::Result<Server> {
        let policy = config.check_authorization()?.cloned();
        let tls = ReloadingServerConfig::load(config.tls.clone())?;
        let identity = tls.identity();
        if identity.principal != tutela_protocol::Principal::Audit {
            anyhow::bail!(
                "{}: this certificate is {identity}, not an audit service certificate",
                config.tls.cert.display()
            );
        }
        let authorizer = match &policy {
            Some(p) => Some(Authorizer::load(&p.model, &p.policy).await?),
            None => {
                tracing::warn!(
                    "insecure_no_policy = true: no authorization; every caller with a consortium certificate may append to and read the audit log"
                );
                None
            }
        };
        let metrics_listener = match &config.metrics {
            Some(m) => Some(tutela_protocol::metrics::MetricsServer::bind(m).await?),
            None => None,
        };
        Ok(Server {
            config,
            tls,
            authorizer,
            metrics: crate::metrics::AuditMetrics::new()?,
            metrics_listener,
        })
    }

    /// Where `/metrics` is served, when `[metrics]` is configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|m| m.local_addr().ok())
    }

    /// The TLS configuration in force (reloadable).
    pub fn tls(&self) -> &Arc<ReloadingServerConfig> {
        &self.tls
    }

    /// The policy in force, unless `insecure_no_policy` is set.
    pub fn authorizer(&self) -> Option<&Arc<Authorizer>> {
        self.authorizer.as_ref()
    }

    /// Opens the store, starts the log and serves until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Server {
            config,
            tls,
            authorizer,
            metrics,
            metrics_listener,
        } = self;
        // Served from before the log opens, so a scrape sees a service that is starting.
        let metrics_task = metrics_listener.map(|m| m.spawn(metrics.registry()));
        let identity = tls.identity();
        let key_path = config.key_path();
        if !key_path.exists() {
            let public = keygen(&key_path)?;
            tracing::warn!(key = %key_path.display(), public_key = %hex::encode(public), "made a new checkpoint key; give its public key to every site");
        }
        let key = load_key(&key_path)?;
        let store = AuditStore::open(&config.database_url()?).await?;
        let mut log_config = LogConfig::new(identity.uri());
        log_config.checkpoint_every = config.checkpoint_every.max(1);
        log_config.checkpoint_interval =
            Duration::from_secs(config.checkpoint_interval_secs.max(1));
        log_config.max_batch = config.max_batch.clamp(1, crate::store::MAX_BATCH);
        log_config.ca_admins = config.ca_admins.clone();
        log_config.metrics = metrics.clone();
        // Officers' certificates in the stored trail are re-checked against the consortium CA
        // (as of each event's time) when the log is opened.
        let material = tutela_protocol::tls::TlsMaterial::load(&config.tls)?;
        let ca_roots = Arc::new(material.roots.roots.clone());
        log_config.ca_roots = Some(ca_roots.clone());
        // Officers' certificates in approvals must chain to the consortium CA and not be revoked:
        // checked with the same (reloaded) CA and CRL that the TLS listener uses.
        let tls_for_check = Arc::downgrade(&tls);
        let chain_check: ChainCheck = Arc::new(move |chain| match tls_for_check.upgrade() {
            Some(tls) => tls.reverify_client(chain).map_err(|e| e.to_string()),
            None => Err("the service is shutting down".to_string()),
        });
        let log = AuditLog::start(store, key, log_config, Some(chain_check)).await?;
        tracing::info!(events = log.size(), public_key = %hex::encode(log.public_key()), "audit log opened and verified");

        // The policy decides before any handler runs; its decisions are appended to this log
        // directly (not over gRPC, so recording a decision is never itself a decided request).
        let enforce = match &authorizer {
            Some(authz) => {
                let reload = config.policy.as_ref().map_or(5, |p| p.reload_secs);
                authz.spawn_watcher(Duration::from_secs(reload.max(1)));
                EnforceLayer::new(authz.clone(), Arc::new(LogDecisionSink::start(log.clone())))
            }
            None => EnforceLayer::off(),
        };
        let (router, reporter) = tutela_protocol::server::router_with_standard_services(
            tutela_protocol::server::builder(),
        );
        reporter
            .set_serving::<pb::audit_server::AuditServer<AuditService>>()
            .await;
        let router = router.add_service(enforce.wrap(pb::audit_server::AuditServer::new(
            AuditService { log: log.clone() },
        )));
        let _watcher = tls.spawn_watcher(Duration::from_secs(config.tls_reload_secs.max(1)));
        // The console: its own port, the same TLS configuration (CA, CRL, reloads), the same
        // policy, the same log; ended with the gRPC server.
        let console = match &config.console {
            Some(c) => {
                let listener = tokio::net::TcpListener::bind(c.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("console: cannot listen on {}: {e}", c.listen))?;
                let state = crate::console::ConsoleState::new(
                    log.clone(),
                    crate::authority::AuthorityRules::for_log(&identity.uri(), &config.ca_admins)?,
                    crate::authority::OfficerTrust::CaAt(ca_roots),
                    authorizer.clone(),
                    c.page_size,
                );
                let _ = state.retention_min_days.set(config.retention.min_days);
                Some(tokio::spawn(crate::console::run(
                    state,
                    Duration::from_secs(c.verify_interval_secs.max(1)),
                    listener,
                    tls.clone(),
                    std::future::pending(),
                )))
            }
            None => None,
        };
        tracing::info!(addr = %listener.local_addr()?, %identity, policy = %authorizer.as_ref().map_or("none (insecure_no_policy)".to_string(), |a| a.digest().to_hex()), "audit service listening");
        let served = tutela_protocol::server::serve_with_metrics(
            router,
            listener,
            tls,
            metrics.tls,
            shutdown,
        )
        .await;
        if let Some(console) = console {
            console.abort();
        }
        drop(metrics_task);
        served?;
        Ok(())
    }
}

/// [`Server::load`] then [`Server::serve`].
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    Server::load(config).await?.serve(listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen = \"127.0.0.1:7444\"\ndata_dir = \"/tmp/a\"\n";
    const TLS: &str = "[tls]\nca = \"ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n";
    const POLICY: &str = "[policy]\nmodel = \"m.conf\"\npolicy = \"p.csv\"\n";

    fn parse(dir: &Path, text: &str) -> anyhow::Result<Config> {
        for f in ["ca.crt", "a.crt", "a.key", "m.conf", "p.csv"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let path = dir.join("audit.toml");
        std::fs::write(&path, text).unwrap();
        Config::from_file(&path)
    }

    #[test]
    fn the_database_url_file_is_read_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("db-url"), "postgres://a:s3cret@db/audit\n").unwrap();
        let c = parse(
            d,
            &format!("{BASE}database_url_file = \"db-url\"\n{TLS}{POLICY}"),
        )
        .unwrap();
        assert_eq!(
            c.database_url.as_deref(),
            Some("postgres://a:s3cret@db/audit")
        );
        assert_eq!(c.database_url().unwrap(), "postgres://a:s3cret@db/audit");
        let both = format!(
            "{BASE}database_url = \"sqlite://x.db\"\ndatabase_url_file = \"db-url\"\n{TLS}{POLICY}"
        );
        let err = parse(d, &both).unwrap_err().to_string();
        assert!(
            err.contains("both set") && err.contains("audit.toml"),
            "{err}"
        );
    }

    #[test]
    fn the_service_needs_a_policy_or_an_explicit_insecure_flag_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        let c = parse(d, &format!("{BASE}{TLS}{POLICY}")).unwrap();
        let p = c.check_authorization().unwrap().unwrap();
        // Relative paths start at audit.toml's directory, not the working directory.
        assert_eq!(p.policy, d.join("p.csv"));
        assert_eq!(c.tls.ca, d.join("ca.crt"));
        assert_eq!(p.reload_secs, 5);

        let c = parse(d, &format!("{BASE}insecure_no_policy = true\n{TLS}")).unwrap();
        assert!(c.check_authorization().unwrap().is_none());

        let e = parse(d, &format!("{BASE}{TLS}")).unwrap_err().to_string();
        assert!(
            e.contains("audit.toml") && e.contains("no [policy] table"),
            "{e}"
        );

        let e = parse(
            d,
            &format!("{BASE}insecure_no_policy = true\n{TLS}{POLICY}"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("audit.toml") && e.contains("both [policy]"),
            "{e}"
        );

        let e = parse(d, &format!("{BASE}{TLS}{POLICY}reload = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `reload`"), "{e}");
    }

    /// Every range deploy/config/audit.toml documents, one value just outside it each: the
    /// shipped file with that one change is refused, naming the key and the file.
    #[test]
    fn every_documented_range_of_audit_toml_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = include_str!("../../deploy/config/audit.toml");
        let config: Config = toml::from_str(shipped).expect("the shipped audit.toml parses");
        config.check_authorization().unwrap();
        config
            .check_ranges()
            .expect("the shipped audit.toml's values are in range");
        let cases: &[(&str, &str, i64)] = &[
            ("", "checkpoint_every", 0),
            ("", "checkpoint_every", MAX_CHECKPOINT_EVERY as i64 + 1),
            ("", "checkpoint_interval_secs", 0),
            ("", "checkpoint_interval_secs", 86_401),
            ("", "max_batch", 0),
            ("", "max_batch", 5000),
            ("", "tls_reload_secs", 0),
            ("policy", "reload_secs", 0),
            ("policy", "reload_secs", 86_401),
            ("console", "verify_interval_secs", 0),
            ("console", "verify_interval_secs", 86_401),
            ("console", "page_size", 0),
            ("console", "page_size", 501),
            ("retention", "min_days", 182),
            ("retention", "min_days", 36_526),
        ];
        for &(table, key, value) in cases {
            let mut config: toml::Table = toml::from_str(shipped).unwrap();
            let target = if table.is_empty() {
                &mut config
            } else {
                config[table].as_table_mut().unwrap()
            };
            target.insert(key.to_string(), toml::Value::Integer(value));
            let e = parse(dir.path(), &toml::to_string(&config).unwrap())
                .expect_err(&format!("{key} = {value} must be refused"))
                .to_string();
            let dotted = if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            };
            assert!(
                e.contains("audit.toml") && e.contains(&format!("`{dotted}` = {value}")),
                "{dotted} = {value}: {e}"
            );
        }
    }

    /// A TLS or policy file that is not there is named by the config file, the key, the value as
    /// written and where it resolved, before anything is loaded.
    #[test]
    fn a_missing_file_names_audit_toml_the_key_and_the_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let text = format!(
            "{BASE}[tls]\nca = \"../certs/audit/ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n{POLICY}"
        );
        let e = parse(&etc, &text).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: tls.ca = \"../certs/audit/ca.crt\": no such file (resolved to {})",
                etc.join("audit.toml").display(),
                etc.join("../certs/audit/ca.crt").display()
            )
        );
        // The same file, where the relative path says, is found from any working directory.
        std::fs::create_dir_all(dir.path().join("certs/audit")).unwrap();
        std::fs::write(dir.path().join("certs/audit/ca.crt"), "").unwrap();
        let c = parse(&etc, &text).unwrap();
        assert_eq!(c.tls.ca, etc.join("../certs/audit/ca.crt"));
        let e = parse(&etc, &text.replace("\"m.conf\"", "\"nope.conf\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policy.model = \"nope.conf\": no such file"),
            "{e}"
        );
    }
}
