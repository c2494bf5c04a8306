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
    let tls = coordinator.tls.clone();
    let authorizer = coordinator.authorizer.clone();
    // SIGHUP reloads the TLS files and the policy at once, in addition to the periodic checks.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(changed) => tracing::info!(changed, "SIGHUP: TLS files checked"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed"),
            }
            if let Some(a) = &authorizer {
                match a.reload().await {
                    Ok(changed) => {
                        tracing::info!(changed, digest = %a.digest(), "SIGHUP: policy checked")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: policy reload failed; the policy in force stays")
                    }
                }
            }
        }
    });
    coordinator
        .serve(tutela_protocol::logging::shutdown_signal())
        .await
}
