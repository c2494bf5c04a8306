//! `tutela-coordinator --config coordinator.toml`
use std::path::PathBuf;

use clap::Parser;

/// The Tutela coordinator: the consortium's server that site nodes connect out to, over mutual
/// TLS. See deploy/config/coordinator.toml for every configuration key. It refuses to start
/// without a [policy] (the casbin policy whose approval quorum every job must meet), unless the
/// config sets `insecure_no_policy = true` for a lab or a test.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, env = "TUTELA_COORDINATOR_CONFIG")]
    config: PathBuf,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    tutela_protocol::logging::init(args.log_json);
    let config = tutela_coordinator::Config::from_file(&args.config)?;
    let coordinator = tutela_coordinator::Coordinator::bind(config).await?;
    // SIGHUP reloads the TLS files and the policy at once, in addition to the periodic checks.
    tutela_policy::reload_on_sighup(coordinator.tls.clone(), coordinator.authorizer.clone())?;
    coordinator
        .serve(tutela_protocol::logging::shutdown_signal())
        .await
}
