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
pub mod central_dp;
pub mod engine;
pub mod job;
pub mod nodes;
pub mod service;
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
    /// How often the TLS files are checked for a new CRL or certificate, in seconds.
    #[serde(default = "default_reload_secs")]
    pub tls_reload_secs: u64,
    pub tls: TlsFiles,
    /// The audit service to record events at (see `audit_trail`); absent: audit disabled.
    #[serde(default)]
    pub audit: Option<audit_trail::AuditConfig>,
    /// Authorization and approvals (casbin model and policy). Absent: the built-in role checks
    /// (operators manage jobs, site users read them) and jobs start without approval.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
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
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// A coordinator that has bound its port and loaded its TLS, ready to serve.
pub struct Coordinator {
    pub config: Config,
    pub tls: Arc<ReloadingServerConfig>,
    /// The consortium policy, when `[policy]` is configured (main reloads it on SIGHUP).
    pub authorizer: Option<Arc<tutela_policy::Authorizer>>,
    listener: tokio::net::TcpListener,
}

impl Coordinator {
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
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
            None => {
                tracing::warn!(
                    "no [policy]: built-in role checks only, and jobs start without approval"
                );
                None
            }
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        Ok(Coordinator {
            config,
            tls,
            authorizer,
            listener,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
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
        let model_dir = self.config.data_dir.join("models");
        let engine =
            engine::Engine::new(db, model_dir.clone(), self.config.data_dir.join("state"))?;
        // One audit trail for the whole coordinator: the engine's events, the services' (submit,
        // approve, reject, node registration) and the policy decisions all go through it.
        let trail = Arc::new(match &self.config.audit {
            Some(a) => audit_trail::AuditTrail::connect(a, &self.tls.material())?,
            None => audit_trail::AuditTrail::disabled(),
        });
        let _ = engine.audit.set(trail.clone());
        // Every Tutela service sits behind the enforcement layer; without a [policy] it is off.
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
        let resumed = engine.resume().await?;
        if resumed > 0 {
            tracing::info!(jobs = resumed, "resumed running jobs");
        }
        let store = DirModelStore::open(&model_dir)?;
        let (router, reporter) = tutela_protocol::server::router_with_standard_services(
            tutela_protocol::server::builder(),
        );
        reporter
            .set_serving::<pb::identity_server::IdentityServer<IdentityService>>()
            .await;
        reporter
            .set_serving::<pb::model_exchange_server::ModelExchangeServer<DirModelStore>>()
            .await;
        reporter
            .set_serving::<pb::federation_server::FederationServer<service::FederationService>>()
            .await;
        reporter
            .set_serving::<pb::jobs_server::JobsServer<service::JobsService>>()
            .await;
        let federation = pb::federation_server::FederationServer::new(service::FederationService {
            engine: engine.clone(),
        })
        .max_decoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES);
        let jobs = pb::jobs_server::JobsServer::new(service::JobsService { engine });
        let router = router
            .add_service(enforce.wrap(federation))
            .add_service(enforce.wrap(jobs))
            .add_service(enforce.wrap(services::identity_service()))
            .add_service(enforce.wrap(store.into_service()));
        let _watcher = self
            .tls
            .spawn_watcher(Duration::from_secs(self.config.tls_reload_secs.max(1)));
        tracing::info!(addr = %self.listener.local_addr()?, identity = %self.tls.identity(), "coordinator listening");
        tutela_protocol::server::serve(router, self.listener, self.tls, shutdown).await?;
        Ok(())
    }
}
