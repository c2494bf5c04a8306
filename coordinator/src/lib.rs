//! The coordinator: the consortium operator's server that site nodes connect out to.
//!
//! It serves, over mutual TLS: `Federation` (nodes receive tasks, fetch global models, submit
//! updates), `Jobs` (operators submit and follow jobs), `Identity`, the content-addressed
//! `ModelExchange` store, gRPC health and reflection. Jobs and rounds are persisted with sqlx
//! (SQLite file by default, Postgres with a URL) so that a coordinator killed mid-job resumes at the
//! last completed round.

pub mod aggregate;
pub mod approvals;
pub mod audit_trail;
pub mod base_models;
pub mod central_dp;
pub mod engine;
pub mod job;
pub mod leadership;
pub mod metrics;
pub mod nodes;
pub mod registry;
pub mod service;
pub mod statistics;
pub mod store;
pub mod strategy;
pub mod tasks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tutela_protocol::pb;
use tutela_protocol::services::{self, DirModelStore, IdentityService};
use tutela_protocol::tls::{ReloadingServerConfig, TlsFiles};

/// `coordinator.toml`. Every key is documented in `deploy/config/coordinator.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, `HOST:PORT`.
    pub listen: SocketAddr,
    /// The coordinator's directory: `models/` (content-addressed model store), `state/`
    /// (strategy state per round) and, by default, the SQLite database `coordinator.db`.
    pub data_dir: PathBuf,
    /// Database URL: `sqlite://PATH` or `postgres://...`. Default: SQLite in `data_dir`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// A file holding the database URL instead (a mounted Secret): read at load into
    /// `database_url`, so that a password is in neither the config file nor the environment.
    #[serde(default)]
    pub database_url_file: Option<PathBuf>,
    /// How often the TLS files are checked for a new CRL or certificate, in seconds.
    #[serde(default = "default_reload_secs")]
    pub tls_reload_secs: u64,
    pub tls: TlsFiles,
    /// The audit service to record events at (see `audit_trail`). Required: a coordinator
    /// without it refuses to start (see [`Config::validate`]), unless `insecure_no_audit`
    /// waives it for a development setup on one machine.
    #[serde(default)]
    pub audit: Option<audit_trail::AuditConfig>,
    /// Runs without `[audit]`: nothing the coordinator does is in the tamper-evident trail
    /// (events are only in its tracing log). For a development setup on one machine only: it
    /// is refused unless `listen` is a loopback address, and together with an `[audit]` table;
    /// the coordinator warns at start. An absent `[audit]` never means this by itself.
    #[serde(default)]
    pub insecure_no_audit: bool,
    /// Authorization and approvals (casbin model and policy). Required: a coordinator without it
    /// refuses to start (see [`Config::validate`]), unless `insecure_no_policy` waives it.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// Runs without `[policy]`: the built-in role checks only (operators manage jobs, site users
    /// read them), and every job starts the moment it is submitted, with no approval at all. For
    /// labs and tests; the coordinator warns at start. An absent `[policy]` never means this by
    /// itself: it has to be asked for by name, and it cannot be combined with a `[policy]`.
    #[serde(default)]
    pub insecure_no_policy: bool,
    /// `[watermark]`: the consortium's watermark key, for jobs whose spec has a `[watermark]`
    /// section. Absent: such jobs are refused at submission.
    #[serde(default)]
    pub watermark: Option<WatermarkConfig>,
    /// `[ha]`: several coordinators on one PostgreSQL database, one leader at a time (a lease in
    /// the database; see `leadership`). Absent: this coordinator is the only one.
    #[serde(default)]
    pub ha: Option<leadership::HaConfig>,
    /// `[metrics]`: the plain-HTTP Prometheus listener (`tutela_protocol::metrics`); none
    /// without the table.
    #[serde(default)]
    pub metrics: Option<tutela_protocol::metrics::MetricsConfig>,
}

/// `[watermark]` of coordinator.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkConfig {
    /// The key file: 32 bytes as 64 hex digits (`tutela model watermark-key`).
    pub key_file: PathBuf,
}

/// Why a coordinator.toml cannot be used, beyond what its TOML shape says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no [policy] table: the coordinator refuses to start without one, since its jobs would start \
         with no compliance officer's approval. Add a [policy] table naming the casbin model and the \
         consortium's policy with its approval quorum rules (examples: deploy/policy/model.conf and \
         deploy/policy/policy.csv; every key: the [policy] table of deploy/config/coordinator.toml). \
         Only for a lab or a test, `insecure_no_policy = true` runs every job without approval"
    )]
    NoPolicy,
    #[error(
        "`insecure_no_policy = true` and a [policy] table are both set: remove \
         `insecure_no_policy`, which would waive the approvals that [policy] requires"
    )]
    PolicyAndInsecure,
    #[error(
        "no [audit] table: the coordinator refuses to start without one, since nothing it does \
         (proposals, approvals, rounds, published models, stage moves) would be in the \
         tamper-evident audit trail. Add an [audit] table naming the audit service (`endpoint`, \
         and `server_identity` if it is not spiffe://<consortium>/audit; every key: the [audit] \
         table of deploy/config/coordinator.toml). Only for a development setup on this machine \
         (listen on a loopback address), `insecure_no_audit = true` runs without a trail"
    )]
    NoAudit,
    #[error(
        "`insecure_no_audit = true` and an [audit] table are both set: remove \
         `insecure_no_audit`"
    )]
    AuditAndInsecure,
    #[error(
        "`insecure_no_audit = true` is only for a development setup on one machine, but listen = \
         \"{listen}\" is reachable from other machines: a coordinator that sites can reach keeps \
         an audit trail. Add an [audit] table and remove `insecure_no_audit` (or listen on \
         127.0.0.1 for a development setup)"
    )]
    NoAuditNotLocal { listen: SocketAddr },
    /// A value outside the range deploy/config/coordinator.toml documents.
    #[error(transparent)]
    OutOfRange(#[from] tutela_protocol::config_range::OutOfRange),
    #[error(
        "[ha] needs PostgreSQL: coordinators share their jobs and the leader lease in one \
         postgres:// database_url (or database_url_file), but this one uses {backend}. Remove \
         [ha] to run a single coordinator on SQLite"
    )]
    HaNeedsPostgres { backend: &'static str },
    #[error(
        "[ha] renew_every_secs = {renew} must be at most half of lease_ttl_secs = {ttl}, or the \
         lease would lapse between two renewals of a live leader"
    )]
    HaRenewTooSlow { renew: u64, ttl: u64 },
    #[error(
        "[ha] instance_id is empty: name this coordinator, or leave the key out for the host name"
    )]
    HaEmptyInstance,
    /// `[metrics]` refused (`tutela_protocol::metrics::MetricsConfig::validate`), as its message.
    #[error("{0}")]
    Metrics(String),
}

fn default_reload_secs() -> u64 {
    10
}

/// `[policy]` of coordinator.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The casbin model (deploy/policy/model.conf).
    pub model: PathBuf,
    /// The consortium's policy: roles, grants and approval quorum rules (deploy/policy/policy.csv).
    pub policy: PathBuf,
    /// How often, in seconds, the two files are checked for changes. Default 5.
    #[serde(default = "default_policy_reload_secs")]
    pub reload_secs: u64,
}

fn default_policy_reload_secs() -> u64 {
    5
}

impl Config {
    /// Reads, parses and checks ([`Config::validate`]) a coordinator.toml; errors name the file.
    /// Relative paths start at the file's directory (as in every Tutela config), and the files
    /// it names must exist: an error names the key, the value and where it resolved.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let file = tutela_protocol::config_path::ConfigFile::new(path);
        file.resolve(&mut config.data_dir);
        if let Some(url_file) = &mut config.database_url_file {
            file.resolve(url_file);
        }
        config.database_url = tutela_protocol::database::url_from_config(
            config.database_url.as_deref(),
            config.database_url_file.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config
            .check_ha_database()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        file.tls_files("tls", &mut config.tls)?;
        if let Some(p) = &mut config.policy {
            file.existing_file("policy.model", &mut p.model)?;
            file.existing_file("policy.policy", &mut p.policy)?;
        }
        if let Some(w) = &mut config.watermark {
            file.existing_file("watermark.key_file", &mut w.key_file)?;
        }
        Ok(config)
    }

    /// Checks what serde cannot: approvals are configured (`[policy]`) or waived by name
    /// (`insecure_no_policy = true`), never both and never neither. Fail closed: a setting left
    /// out must not open the coordinator to unapproved jobs. The audit trail likewise
    /// (`[audit]`, or `insecure_no_audit = true` on a loopback listener only).
    /// Also checks every value against the range the example file documents.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use tutela_protocol::config_range::{MAX_PERIOD_SECS, in_range};
        match (&self.policy, self.insecure_no_policy) {
            (Some(_), false) | (None, true) => {}
            (None, false) => return Err(ConfigError::NoPolicy),
            (Some(_), true) => return Err(ConfigError::PolicyAndInsecure),
        }
        // The trail, likewise: required, or waived by name for a development setup that no
        // other machine can reach (a listener on loopback: no site, no operator elsewhere).
        match (&self.audit, self.insecure_no_audit) {
            (Some(_), false) => {}
            (None, false) => return Err(ConfigError::NoAudit),
            (Some(_), true) => return Err(ConfigError::AuditAndInsecure),
            (None, true) if !self.listen.ip().is_loopback() => {
                return Err(ConfigError::NoAuditNotLocal {
                    listen: self.listen,
                });
            }
            (None, true) => {}
        }
        in_range("tls_reload_secs", self.tls_reload_secs, 1, MAX_PERIOD_SECS)?;
        if let Some(m) = &self.metrics {
            m.validate()
                .map_err(|e| ConfigError::Metrics(e.to_string()))?;
        }
        if let Some(p) = &self.policy {
            in_range("policy.reload_secs", p.reload_secs, 1, MAX_PERIOD_SECS)?;
        }
        if let Some(ha) = &self.ha {
            in_range("ha.lease_ttl_secs", ha.lease_ttl_secs, 2, 300)?;
            in_range("ha.renew_every_secs", ha.renew_every_secs, 1, 150)?;
            if ha.renew_every_secs * 2 > ha.lease_ttl_secs {
                return Err(ConfigError::HaRenewTooSlow {
                    renew: ha.renew_every_secs,
                    ttl: ha.lease_ttl_secs,
                });
            }
            if ha
                .instance_id
                .as_deref()
                .is_some_and(|i| i.trim().is_empty())
            {
                return Err(ConfigError::HaEmptyInstance);
            }
            // The URL is known here when given inline; from a file, after `from_file` read it.
            self.check_ha_database()?;
        }
        Ok(())
    }

    /// `[ha]` with a database other than PostgreSQL (SQLite, the default, included).
    fn check_ha_database(&self) -> Result<(), ConfigError> {
        if self.ha.is_none() || (self.database_url_file.is_some() && self.database_url.is_none()) {
            return Ok(());
        }
        match self
            .database_url
            .as_deref()
            .and_then(tutela_protocol::database::Backend::of_url)
        {
            Some(tutela_protocol::database::Backend::Postgres) => Ok(()),
            _ => Err(ConfigError::HaNeedsPostgres { backend: "SQLite" }),
        }
    }
}

/// A coordinator that has bound its port and loaded its TLS, ready to serve.
pub struct Coordinator {
    pub config: Config,
    pub tls: Arc<ReloadingServerConfig>,
    /// The consortium policy, when `[policy]` is configured (main reloads it on SIGHUP).
    pub authorizer: Option<Arc<tutela_policy::Authorizer>>,
    listener: tokio::net::TcpListener,
    /// The `/metrics` listener of `[metrics]`, bound at start.
    metrics_listener: Option<tutela_protocol::metrics::MetricsServer>,
}

impl Coordinator {
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        // Again here, for configs built in code rather than read by `Config::from_file`.
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("coordinator config: {e}"))?;
        let tls = ReloadingServerConfig::load(config.tls.clone())?;
        let identity = tls.identity();
        if identity.principal != tutela_protocol::Principal::Coordinator {
            anyhow::bail!(
                "{}: this certificate is {identity}, not a coordinator certificate",
                config.tls.cert.display()
            );
        }
        let authorizer = match &config.policy {
            Some(p) => Some(tutela_policy::Authorizer::load(&p.model, &p.policy).await?),
            // `validate` let this through only with `insecure_no_policy = true`.
            None => {
                tracing::warn!(
                    "insecure_no_policy = true: NO APPROVALS. Every job starts as soon as it is \
                     submitted, without any compliance officer's approval, and only the built-in \
                     role checks apply. Never run a consortium like this; configure [policy]"
                );
                None
            }
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let metrics_listener = match &config.metrics {
            Some(m) => Some(tutela_protocol::metrics::MetricsServer::bind(m).await?),
            None => None,
        };
        Ok(Coordinator {
            config,
            tls,
            authorizer,
            listener,
            metrics_listener,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics` is served, when `[metrics]` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|m| m.local_addr().ok())
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let db_url = match &self.config.database_url {
            Some(u) => u.clone(),
            None => {
                std::fs::create_dir_all(&self.config.data_dir)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", self.config.data_dir.display()))?;
                store::Store::sqlite_url(&self.config.data_dir.join("coordinator.db"))?
            }
        };
        let db = store::Store::open(&db_url).await?;
        // With [ha], every write of this coordinator is fenced by the lease epoch it holds (none
        // until it takes the lease: a follower writes nothing).
        let fence = store::Fence::default();
        let leadership = match &self.config.ha {
            Some(ha) => {
                if db.backend() != store::Backend::Postgres {
                    anyhow::bail!(
                        "{}",
                        store::StoreError::LeaseNeedsPostgres {
                            backend: db.backend(),
                            location: tutela_protocol::database::redact_url(&db_url),
                        }
                    );
                }
                Some((leadership::Leadership::new(ha.instance_id()), ha.clone()))
            }
            None => None,
        };
        let unfenced = db.clone();
        let db = if leadership.is_some() {
            db.fenced(fence.clone())
        } else {
            db
        };
        let model_dir = self.config.data_dir.join("models");
        let engine =
            engine::Engine::new(db, model_dir.clone(), self.config.data_dir.join("state"))?;
        if leadership.is_some() {
            engine.set_replicate_files();
        }
        // One audit trail for the whole coordinator: the engine's events, the services' (submit,
        // approve, reject, node registration) and the policy decisions all go through it.
        let trail = Arc::new(match &self.config.audit {
            Some(a) => audit_trail::AuditTrail::connect(a, &self.tls.material())?,
            // `validate` let this through only with `insecure_no_audit = true` on loopback.
            None => {
                tracing::warn!(
                    listen = %self.config.listen,
                    "insecure_no_audit = true: NO AUDIT TRAIL. Nothing this coordinator does is \
                     recorded where it can be verified; its events are only in this log. For a \
                     development setup on this machine only; configure [audit]"
                );
                audit_trail::AuditTrail::disabled()
            }
        });
        if leadership.is_some() {
            trail.only_while_leader(engine.store.clone());
        }
        let _ = engine.audit.set(trail.clone());
        let tls_metrics = engine.metrics.tls.clone();
        let _metrics_task = self
            .metrics_listener
            .map(|m| m.spawn(engine.metrics.registry()));
        if let Some(w) = &self.config.watermark {
            // Read at start: a key file that cannot be used stops the coordinator here, not at
            // the end of a job. Its contents never appear in an error.
            let key = tutela_protocol::watermark::WatermarkKey::read_file(&w.key_file)?;
            tracing::info!(key_commitment = %key.commitment(), "watermark key loaded");
            let _ = engine.watermark_key.set(Arc::new(key));
        }
        // Every Tutela service sits behind the enforcement layer; it is off only under
        // `insecure_no_policy = true` (the only way to have no [policy]).
        let enforce = match &self.authorizer {
            Some(authz) => {
                let gate = approvals::ApprovalGate::new(authz.clone(), self.tls.clone());
                let _ = engine.approvals.set(Arc::new(gate));
                let reload = self.config.policy.as_ref().map_or(5, |p| p.reload_secs);
                authz.spawn_watcher(Duration::from_secs(reload.max(1)));
                // Decisions go to the audit trail of `[audit]` (logged only without one).
                tutela_policy::EnforceLayer::new(
                    authz.clone(),
                    Arc::new(approvals::AuditDecisionSink {
                        trail: trail.clone(),
                    }),
                )
            }
            None => tutela_policy::EnforceLayer::off(),
        };
        // With [ha] the lease decides when this coordinator resumes (takes over) the jobs.
        let resumed = match &leadership {
            Some(_) => 0,
            None => engine.resume().await?,
        };
        if resumed > 0 {
            tracing::info!(jobs = resumed, "resumed running jobs");
            if self.authorizer.is_none() {
                tracing::warn!(
                    jobs = resumed,
                    "insecure_no_policy = true: the resumed jobs run without any approval"
                );
            }
        }
        let store = DirModelStore::open(&model_dir)?;
        let (router, reporter) = tutela_protocol::server::router_with_standard_services(
            tutela_protocol::server::builder(),
        );
        reporter
            .set_serving::<pb::identity_server::IdentityServer<IdentityService>>()
            .await;
        reporter
            .set_serving::<pb::model_exchange_server::ModelExchangeServer<service::ModelStoreService>>()
            .await;
        reporter
            .set_serving::<pb::federation_server::FederationServer<service::FederationService>>()
            .await;
        reporter
            .set_serving::<pb::jobs_server::JobsServer<service::JobsService>>()
            .await;
        reporter
            .set_serving::<pb::registry_server::RegistryServer<service::RegistryService>>()
            .await;
        let federation = pb::federation_server::FederationServer::new(service::FederationService {
            engine: engine.clone(),
        })
        .max_decoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES);
        let registry = pb::registry_server::RegistryServer::new(service::RegistryService {
            engine: engine.clone(),
        });
        // The model store, less the unmarked sources of watermarked publications.
        let models = service::ModelStoreService {
            store,
            engine: engine.clone(),
        };
        let jobs = pb::jobs_server::JobsServer::new(service::JobsService {
            engine: engine.clone(),
        });
        // A follower serves only health, reflection and Identity; the rest is the leader's.
        let gate = match &leadership {
            Some((l, ha)) => {
                let (l, ha) = (l.clone(), ha.clone());
                tracing::info!(
                    instance = l.instance_id(),
                    ttl_secs = ha.lease_ttl_secs,
                    "[ha]: trying the leader lease"
                );
                tokio::spawn(leadership::run(
                    l.clone(),
                    engine.clone(),
                    unfenced.clone(),
                    fence.clone(),
                    ha,
                ));
                let mut roles = l.subscribe();
                let reporter = reporter.clone();
                tokio::spawn(async move {
                    loop {
                        let leader =
                            matches!(*roles.borrow_and_update(), leadership::Role::Leader { .. });
                        set_leader_services_serving(&reporter, leader).await;
                        if roles.changed().await.is_err() {
                            return;
                        }
                    }
                });
                l
            }
            // Without [ha] this coordinator is always the leader.
            None => {
                let l = leadership::Leadership::new("single".into());
                l.force_leader();
                l
            }
        };
        let router = router
            .add_service(gate.gate(enforce.wrap(federation)))
            .add_service(gate.gate(enforce.wrap(jobs)))
            .add_service(gate.gate(enforce.wrap(registry)))
            .add_service(enforce.wrap(services::identity_service()))
            .add_service(gate.gate(enforce.wrap(models.into_service())));
        let _watcher = self
            .tls
            .spawn_watcher(Duration::from_secs(self.config.tls_reload_secs.max(1)));
        tracing::info!(addr = %self.listener.local_addr()?, identity = %self.tls.identity(), "coordinator listening");
        tutela_protocol::server::serve_with_metrics(
            router,
            self.listener,
            self.tls,
            tls_metrics,
            shutdown,
        )
        .await?;
        // A clean stop hands the lease over at once rather than after its TTL.
        if let (Some((l, _)), Some(epoch)) = (&leadership, fence.epoch()) {
            fence.clear();
            engine.stand_down("the leader is stopping");
            if let Err(e) = unfenced.release_lease(l.instance_id(), epoch).await {
                tracing::warn!(error = %e, "could not release the leader lease; it expires by itself");
            }
        }
        Ok(())
    }
}

/// The gRPC health service name `probe --leader` asks for: SERVING only on the leader (`[ha]`;
/// always, without it).
pub const LEADER_HEALTH_SERVICE: &str = <pb::federation_server::FederationServer<
    service::FederationService,
> as tonic::server::NamedService>::NAME;

/// The services only a leader serves, SERVING or NOT_SERVING in gRPC health.
async fn set_leader_services_serving(
    reporter: &tonic_health::server::HealthReporter,
    leader: bool,
) {
    use pb::federation_server::FederationServer;
    use pb::jobs_server::JobsServer;
    use pb::model_exchange_server::ModelExchangeServer;
    use pb::registry_server::RegistryServer;
    if leader {
        reporter
            .set_serving::<FederationServer<service::FederationService>>()
            .await;
        reporter
            .set_serving::<JobsServer<service::JobsService>>()
            .await;
        reporter
            .set_serving::<RegistryServer<service::RegistryService>>()
            .await;
        reporter
            .set_serving::<ModelExchangeServer<service::ModelStoreService>>()
            .await;
    } else {
        reporter
            .set_not_serving::<FederationServer<service::FederationService>>()
            .await;
        reporter
            .set_not_serving::<JobsServer<service::JobsService>>()
            .await;
        reporter
            .set_not_serving::<RegistryServer<service::RegistryService>>()
            .await;
        reporter
            .set_not_serving::<ModelExchangeServer<service::ModelStoreService>>()
            .await;
    }
}

#[cfg(test)]
mod tests {
    //! Approvals are not optional: a coordinator.toml must configure `[policy]` or waive it by
    //! name. Tests go through `Config::from_file` and `Coordinator::bind`, as `main` does, with
    //! real certificates made at test time.

    use std::path::{Path, PathBuf};

    use tutela_protocol::identity::Principal;
    use tutela_protocol::pki::{CertificateAuthority, KeyAlgorithm, LeafOptions, Validity};

    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// A consortium CA and a coordinator certificate in `dir`; the `[tls]` table naming them.
    fn tls_table(dir: &Path) -> String {
        let ca = CertificateAuthority::create(
            "acme",
            KeyAlgorithm::EcdsaP256,
            Validity::days_from_now(30),
        )
        .unwrap();
        let mut options = LeafOptions::new(Validity::days_from_now(30));
        options.dns_names = vec!["localhost".into()];
        let issued = ca.issue(&Principal::Coordinator, &options).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("coordinator.crt"), &issued.cert_pem).unwrap();
        std::fs::write(dir.join("coordinator.key"), &issued.key_pem).unwrap();
        format!(
            "[tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/coordinator.crt\"\nkey = \"{d}/coordinator.key\"\n",
            d = dir.display()
        )
    }

    fn policy_table() -> String {
        format!(
            "[policy]\nmodel = \"{}\"\npolicy = \"{}\"\n",
            repo().join("deploy/policy/model.conf").display(),
            repo().join("deploy/policy/policy.csv").display()
        )
    }

    /// Writes coordinator.toml with `top` (top-level keys) and `tables` after the base keys.
    /// Without an `[audit]` or an `insecure_no_audit` of its own, the trail is waived (on
    /// loopback) so that each test is about what it names.
    fn write_config(dir: &Path, top: &str, tables: &str) -> PathBuf {
        let waiver = if top.contains("insecure_no_audit") || tables.contains("[audit]") {
            ""
        } else {
            "insecure_no_audit = true\n"
        };
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{waiver}{top}\n{}{tables}",
            dir.join("data").display(),
            tls_table(dir)
        );
        let path = dir.join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn init_crypto() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    #[test]
    fn the_database_url_file_is_read_beside_the_config_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        // Relative to coordinator.toml's directory, as every path of the file.
        std::fs::write(dir.path().join("db-url"), "postgres://c:s3cret@db/t\n").unwrap();
        let path = write_config(
            dir.path(),
            "database_url_file = \"db-url\"",
            &policy_table(),
        );
        let config = Config::from_file(&path).unwrap();
        assert_eq!(
            config.database_url.as_deref(),
            Some("postgres://c:s3cret@db/t")
        );

        let path = write_config(
            dir.path(),
            "database_url = \"sqlite://x.db\"\ndatabase_url_file = \"db-url\"",
            &policy_table(),
        );
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("both set") && err.contains("coordinator.toml"),
            "{err}"
        );

        std::fs::write(dir.path().join("db-url"), "s3cret").unwrap();
        let path = write_config(
            dir.path(),
            "database_url_file = \"db-url\"",
            &policy_table(),
        );
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("db-url") && !err.contains("s3cret"), "{err}");
    }

    #[tokio::test]
    async fn without_policy_the_coordinator_refuses_to_start_and_says_what_to_add() {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "", "");
        let err = Config::from_file(&path).unwrap_err().to_string();
        for needle in [
            path.to_str().unwrap(),
            "no [policy] table",
            "refuses to start",
            "deploy/policy/",
            "deploy/config/coordinator.toml",
            "insecure_no_policy = true",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
        // A config built in code (not read through `from_file`) is refused by `bind` as well,
        // before it listens.
        let config: Config = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let err = Coordinator::bind(config).await.err().expect("refused");
        assert!(err.to_string().contains("no [policy] table"), "{err}");
        // `insecure_no_policy = false` is the same as leaving it out.
        let path = write_config(dir.path(), "insecure_no_policy = false", "");
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("no [policy] table"), "{err}");
    }

    #[tokio::test]
    async fn policy_and_the_insecure_opt_out_together_are_refused() {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "insecure_no_policy = true", &policy_table());
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(path.to_str().unwrap())
                && err.contains("`insecure_no_policy = true` and a [policy] table are both set")
                && err.contains("remove `insecure_no_policy`"),
            "{err}"
        );
        let config: Config = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let err = Coordinator::bind(config).await.err().expect("refused");
        assert!(err.to_string().contains("both set"), "{err}");
    }

    #[tokio::test]
    async fn the_coordinator_starts_with_a_policy_or_with_the_named_opt_out() {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "", &policy_table());
        let c = Coordinator::bind(Config::from_file(&path).unwrap())
            .await
            .unwrap();
        assert!(c.authorizer.is_some());
        drop(c);

        let path = write_config(dir.path(), "insecure_no_policy = true", "");
        let c = Coordinator::bind(Config::from_file(&path).unwrap())
            .await
            .unwrap();
        assert!(c.authorizer.is_none());
        assert!(c.config.insecure_no_policy);
    }

    #[test]
    fn the_documented_example_config_is_valid_and_documents_the_opt_out() {
        let path = repo().join("deploy/config/coordinator.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config: Config = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        assert!(config.policy.is_some() && !config.insecure_no_policy);
        // The opt-out is documented there, commented out; uncommented next to the example's
        // [policy] it is the documented conflict.
        let line = text
            .lines()
            .find(|l| {
                l.trim_start_matches("# ")
                    .starts_with("insecure_no_policy = true")
            })
            .expect("deploy/config/coordinator.toml documents insecure_no_policy");
        let uncommented = format!("{}\n{text}", line.trim_start_matches("# "));
        let config: Config = toml::from_str(&uncommented).unwrap();
        assert_eq!(config.validate(), Err(ConfigError::PolicyAndInsecure));
    }

    /// Every range deploy/config/coordinator.toml documents, one value just outside it each:
    /// the shipped file with that one change is refused, naming the key and the file.
    #[test]
    fn every_documented_range_of_coordinator_toml_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let shipped =
            std::fs::read_to_string(repo().join("deploy/config/coordinator.toml")).unwrap();
        let cases: &[(&str, &str, i64)] = &[
            ("", "tls_reload_secs", 0),
            ("", "tls_reload_secs", 86_401),
            ("policy", "reload_secs", 0),
            ("policy", "reload_secs", 86_401),
        ];
        for &(table, key, value) in cases {
            let mut config: toml::Table = toml::from_str(&shipped).unwrap();
            let target = if table.is_empty() {
                &mut config
            } else {
                config[table].as_table_mut().unwrap()
            };
            target.insert(key.to_string(), toml::Value::Integer(value));
            let path = dir.path().join("coordinator.toml");
            std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
            let e = Config::from_file(&path)
                .expect_err(&format!("{key} = {value} must be refused"))
                .to_string();
            let dotted = if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            };
            assert!(
                e.contains(path.to_str().unwrap()) && e.contains(&format!("`{dotted}` = {value}")),
                "{dotted} = {value}: {e}"
            );
        }
    }

    /// coordinator.toml's relative paths start at its own directory; a missing file is named by
    /// the config, the key, the value and where it resolved.
    #[test]
    fn relative_paths_start_at_coordinator_toml_and_missing_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "insecure_no_policy = true", "");
        let d = dir.path().display().to_string();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(&format!("\"{d}/"), "\"")
            .replace(&format!("\"{d}\""), "\".\"");
        assert!(text.contains("ca = \"ca.crt\""), "{text}");
        std::fs::write(&path, &text).unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.tls.ca, dir.path().join("ca.crt"));
        assert_eq!(c.data_dir, dir.path().join("data"));
        std::fs::write(&path, text.replace("\"coordinator.key\"", "\"gone.key\"")).unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: tls.key = \"gone.key\": no such file (resolved to {})",
                path.display(),
                dir.path().join("gone.key").display()
            )
        );
    }

    /// `[ha]` needs PostgreSQL (refused with the SQLite default, naming the table), a renewal
    /// within half the TTL and documented ranges; the shipped example documents the table.
    #[test]
    fn ha_needs_postgres_and_a_renewal_well_within_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let ha = "[ha]\ninstance_id = \"c1\"\nlease_ttl_secs = 4\nrenew_every_secs = 2\n";
        let path = write_config(dir.path(), "insecure_no_policy = true", ha);
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains(path.to_str().unwrap())
                && e.contains("[ha] needs PostgreSQL")
                && e.contains("SQLite"),
            "{e}"
        );
        let pg = "insecure_no_policy = true\ndatabase_url = \"postgres://c@db/t\"";
        let path = write_config(dir.path(), pg, ha);
        let c = Config::from_file(&path).unwrap();
        let got = c.ha.as_ref().map(|h| (h.instance_id(), h.lease_ttl_secs));
        assert_eq!(got, Some(("c1".to_string(), 4)));
        // A database URL from a file is checked once read.
        std::fs::write(dir.path().join("db-url"), "sqlite://x.db").unwrap();
        let from_file = "insecure_no_policy = true\ndatabase_url_file = \"db-url\"";
        let path = write_config(dir.path(), from_file, ha);
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("[ha] needs PostgreSQL"), "{e}");
        for (table, want) in [
            (
                "[ha]\nlease_ttl_secs = 4\nrenew_every_secs = 3\n",
                "at most half",
            ),
            ("[ha]\nlease_ttl_secs = 1\n", "ha.lease_ttl_secs"),
            ("[ha]\nrenew_every_secs = 0\n", "ha.renew_every_secs"),
            ("[ha]\ninstance_id = \" \"\n", "instance_id is empty"),
            ("[ha]\nlease_ttl = 4\n", "unknown field"),
        ] {
            let path = write_config(dir.path(), pg, table);
            let e = Config::from_file(&path).unwrap_err().to_string();
            assert!(e.contains(want), "{table}: {e}");
        }
        let shipped =
            std::fs::read_to_string(repo().join("deploy/config/coordinator.toml")).unwrap();
        for key in [
            "#[ha]",
            "#instance_id",
            "#lease_ttl_secs",
            "#renew_every_secs",
            "#advertise_address",
        ] {
            assert!(
                shipped.contains(key),
                "deploy/config/coordinator.toml documents {key}"
            );
        }
    }

    /// Hole (a) of the 2026-11 review: a coordinator ran with no trail at all when `[audit]` was
    /// left out (the shipped example had it commented out). Now it refuses to start, naming the
    /// table and the file; the waiver is by name, and only on a loopback listener.
    #[tokio::test]
    async fn without_audit_the_coordinator_refuses_to_start_unless_waived_on_loopback() {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "insecure_no_audit = false", &policy_table());
        let err = Config::from_file(&path).unwrap_err().to_string();
        for needle in [
            path.to_str().unwrap(),
            "no [audit] table",
            "refuses to start",
            "deploy/config/coordinator.toml",
            "insecure_no_audit = true",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
        let config: Config = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let err = Coordinator::bind(config).await.err().expect("refused");
        assert!(err.to_string().contains("no [audit] table"), "{err}");

        // The waiver next to an [audit] table; the waiver on a listener other machines reach.
        let audit = "[audit]\nendpoint = \"localhost:7444\"\n";
        let path = write_config(
            dir.path(),
            "insecure_no_audit = true",
            &format!("{}{audit}", policy_table()),
        );
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("remove `insecure_no_audit`"), "{err}");
        let path = write_config(dir.path(), "insecure_no_audit = true", &policy_table());
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("127.0.0.1:0", "0.0.0.0:0");
        std::fs::write(&path, text).unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(path.to_str().unwrap())
                && err.contains("only for a development setup")
                && err.contains("0.0.0.0:0"),
            "{err}"
        );

        // With [audit], or the waiver on loopback, it starts.
        let path = write_config(dir.path(), "", &format!("{}{audit}", policy_table()));
        Coordinator::bind(Config::from_file(&path).unwrap())
            .await
            .unwrap();
        let path = write_config(dir.path(), "insecure_no_audit = true", &policy_table());
        let c = Coordinator::bind(Config::from_file(&path).unwrap())
            .await
            .unwrap();
        assert!(c.config.insecure_no_audit && c.config.audit.is_none());

        // The shipped example configures [audit] and documents the waiver, commented out.
        let shipped =
            std::fs::read_to_string(repo().join("deploy/config/coordinator.toml")).unwrap();
        let config: Config = toml::from_str(&shipped).unwrap();
        assert!(config.audit.is_some() && !config.insecure_no_audit);
        assert!(
            shipped.lines().any(|l| l == "# insecure_no_audit = true"),
            "deploy/config/coordinator.toml documents insecure_no_audit"
        );
    }
}
