//! `tutela-coordinator --config coordinator.toml`; `... probe` checks a running one's health.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The Tutela coordinator: the consortium's server that site nodes connect out to, over mutual
/// TLS. See deploy/config/coordinator.toml for every configuration key. It refuses to start
/// without a [policy] (the casbin policy whose approval quorum every job must meet), unless the
/// config sets `insecure_no_policy = true` for a lab or a test. With a [metrics] table it serves
/// Prometheus metrics on a plain-HTTP loopback port (docs/monitoring.md).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, env = "TUTELA_COORDINATOR_CONFIG")]
    config: PathBuf,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check that the coordinator of --config is serving: grpc.health.v1 over mutual TLS on
    /// loopback, with the coordinator's own certificate (a container's liveness and readiness
    /// probe: Kubernetes' own gRPC probe has no TLS). Exits 0 when it answers SERVING.
    Probe {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
        /// Exit 0 only if this coordinator is the leader ([ha]: it serves nodes); a follower is
        /// alive (the plain probe passes) but not ready for nodes. Without [ha], the same as
        /// the plain probe.
        #[arg(long)]
        leader: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    tutela_protocol::logging::init(args.log_json);
    let config = tutela_coordinator::Config::from_file(&args.config)?;
    if let Some(Command::Probe {
        timeout_secs,
        leader,
    }) = args.command
    {
        let service = if leader {
            tutela_coordinator::LEADER_HEALTH_SERVICE
        } else {
            ""
        };
        tutela_protocol::health::probe_own_service(
            &config.tls,
            config.listen,
            service,
            Duration::from_secs(timeout_secs),
        )
        .await?;
        println!("serving");
        return Ok(());
    }
    let coordinator = tutela_coordinator::Coordinator::bind(config).await?;
    // SIGHUP reloads the TLS files and the policy at once, in addition to the periodic checks.
    tutela_policy::reload_on_sighup(coordinator.tls.clone(), coordinator.authorizer.clone())?;
    coordinator
        .serve(tutela_protocol::logging::shutdown_signal())
        .await
}
