//! `tutela-audit --config audit.toml` serves the audit log behind the consortium's policy, and
//! with `[console]` the officers' web console (SIGHUP reloads the TLS files and the policy); `tutela-audit keygen` makes a checkpoint key;
//! `tutela-audit init-db` installs the schema and the append-only grants; `tutela-audit probe`
//! checks a running service's health.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The Tutela audit service: an append-only, hash-chained, signed event log over mutual TLS.
/// With a [console] table it also serves the compliance officers' read-only web console over
/// HTTPS on its own port (client certificates required; docs/console.md). With a [metrics] table
/// it serves Prometheus metrics on a plain-HTTP loopback port (docs/monitoring.md).
/// See deploy/config/audit.toml for every configuration key.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML configuration file (needed to serve).
    #[arg(long, env = "TUTELA_AUDIT_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Make an Ed25519 checkpoint signing key (PKCS#8, mode 0600) and KEY.pub (hex public key).
    Keygen {
        /// Where to write the key; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
    /// As the database owner: install the schema and triggers, and limit the application role to
    /// INSERT and SELECT (PostgreSQL).
    InitDb {
        /// The owner's database URL (postgres://OWNER@HOST/DB, or sqlite://PATH?mode=rwc).
        #[arg(
            long,
            env = "TUTELA_AUDIT_OWNER_URL",
            required_unless_present = "database_url_file",
            conflicts_with = "database_url_file"
        )]
        database_url: Option<String>,
        /// ...or a file holding that URL alone (a mounted Secret), so that the owner's password
        /// is neither on the command line nor in the environment.
        #[arg(long)]
        database_url_file: Option<PathBuf>,
        /// The login role the service connects as (PostgreSQL only).
        #[arg(long)]
        app_role: Option<String>,
    },
    /// Check that the service of --config is serving: grpc.health.v1 over mutual TLS on loopback,
    /// with the service's own certificate (a container's liveness and readiness probe:
    /// Kubernetes' own gRPC probe has no TLS). Exits 0 when it answers SERVING.
    Probe {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Prune events older than DATE from the store of --config, within `[retention] min_days`
    /// (default 183, at least six months: EU AI Act Art. 19). A DATE younger than that is
    /// refused, naming the latest DATE allowed. This build never drops an event (the store is
    /// append-only): for an older DATE it prints what pruning would remove and keeps it
    /// (docs/reports.md, "Retention").
    Prune {
        /// Drop events recorded before this instant (2026-06-01, 2026-06-01T09:00 or RFC 3339;
        /// UTC).
        #[arg(long, value_name = "DATE")]
        before: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    tutela_protocol::logging::init(args.log_json);
    match args.command {
        Some(Command::Keygen { out }) => {
            let public = tutela_audit::server::keygen(&out)?;
            println!("{}", hex::encode(public));
            Ok(())
        }
        Some(Command::InitDb {
            database_url,
            database_url_file,
            app_role,
        }) => {
            let database_url = tutela_protocol::database::url_from_config(
                database_url.as_deref(),
                database_url_file.as_deref(),
            )?
            .ok_or_else(|| anyhow::anyhow!("give --database-url or --database-url-file"))?;
            let store = tutela_audit::store::AuditStore::open(&database_url).await?;
            if let Some(role) = app_role {
                store.grant_append_only(&role).await?;
                println!(
                    "{}: schema current; {role} may INSERT and SELECT only",
                    store.location()
                );
            } else {
                println!("{}: schema current", store.location());
            }
            Ok(())
        }
        Some(Command::Probe { timeout_secs }) => {
            let path = args
                .config
                .ok_or_else(|| anyhow::anyhow!("--config audit.toml is required to probe"))?;
            let config = tutela_audit::server::Config::from_file(&path)?;
            tutela_protocol::health::probe_own_server(
                &config.tls,
                config.listen,
                Duration::from_secs(timeout_secs),
            )
            .await?;
            println!("serving");
            Ok(())
        }
        Some(Command::Prune { before }) => {
            let path = args
                .config
                .ok_or_else(|| anyhow::anyhow!("--config audit.toml is required to prune"))?;
            let config = tutela_audit::server::Config::from_file(&path)?;
            let before = tutela_audit::console::parse_time(&before)
                .map_err(|e| anyhow::anyhow!("--before: {e}"))?;
            let store = tutela_audit::store::AuditStore::open(&config.database_url()?).await?;
            let plan = tutela_audit::retention::prune_plan(
                &store,
                before,
                tutela_audit::Timestamp::now(),
                &config.retention,
            )
            .await?;
            println!(
                "{} event(s) (seq 0..{}) were recorded before {}, older than [retention] min_days = {}; the newest signed checkpoint inside them covers {}",
                plan.events,
                plan.events,
                plan.before,
                config.retention.min_days,
                plan.covered_by_checkpoint
                    .map_or_else(|| "none".to_string(), |n| format!("{n} event(s)"))
            );
            println!(
                "kept: this build does not drop events (the store is append-only; docs/reports.md, Retention)"
            );
            Ok(())
        }
        None => {
            let path = args
                .config
                .ok_or_else(|| anyhow::anyhow!("--config audit.toml is required to serve"))?;
            let config = tutela_audit::server::Config::from_file(&path)?;
            let listen = config.listen;
            let server = tutela_audit::server::Server::load(config).await?;
            // SIGHUP reloads the TLS files and the policy at once, besides the periodic checks.
            tutela_policy::reload_on_sighup(server.tls().clone(), server.authorizer().cloned())?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            server
                .serve(listener, tutela_protocol::logging::shutdown_signal())
                .await
        }
    }
}
