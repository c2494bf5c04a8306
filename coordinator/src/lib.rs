//! The coordinator: the consortium operator's server that sites connect out to.
//!
//! Today it serves, over mutual TLS, the `Identity` service, the content-addressed
//! `ModelExchange` store (global models and updates travel through it as chunked tensor streams),
//! gRPC health and reflection. Jobs, rounds and aggregation arrive with the issue "Federated
//! training end to end".

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
    /// Directory of the content-addressed model store.
    pub model_dir: PathBuf,
    /// How often the TLS files are checked for a new CRL or certificate, in seconds.
    #[serde(default = "default_reload_secs")]
    pub tls_reload_secs: u64,
    pub tls: TlsFiles,
}

fn default_reload_secs() -> u64 {
    10
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
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        Ok(Coordinator {
            config,
            tls,
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
        let store = DirModelStore::open(&self.config.model_dir)?;
        let (router, reporter) =
            tutela_protocol::server::router_with_standard_services(tutela_protocol::server::builder());
        reporter
            .set_serving::<pb::identity_server::IdentityServer<IdentityService>>()
            .await;
        reporter
            .set_serving::<pb::model_exchange_server::ModelExchangeServer<DirModelStore>>()
            .await;
        let router = router
            .add_service(services::identity_service())
            .add_service(store.into_service());
        let _watcher = self
            .tls
            .spawn_watcher(Duration::from_secs(self.config.tls_reload_secs.max(1)));
        tracing::info!(addr = %self.listener.local_addr()?, identity = %self.tls.identity(), "coordinator listening");
        tutela_protocol::server::serve(router, self.listener, self.tls, shutdown).await?;
        Ok(())
    }
}
