//! `tutela`: the command-line tool of a Tutela consortium.
//!
//! This file parses arguments and dispatches; each command family lives in its own module
//! (`pki_cmd`, ...) and calls library code that is tested on its own.

mod audit_cmd;
mod bench_cmd;
mod demo;
mod demo_policy;
mod job_cmd;
mod model_cmd;
mod net_cmd;
mod pki_cmd;
mod privacy_cmd;
mod quarantine_cmd;
mod registry_cmd;
mod report_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The command-line tool of a Tutela federated-learning consortium.
#[derive(Debug, Parser)]
#[command(name = "tutela", version, propagate_version = true)]
struct Cli {
    /// Write logs to standard error as JSON lines instead of text. The level comes from
    /// RUST_LOG (default info).
    #[arg(long, global = true)]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The consortium PKI: create the CA, issue and sign certificates, revoke them, publish
    /// CRLs, and inspect any of them.
    #[command(subcommand)]
    Pki(pki_cmd::PkiCommand),
    /// Call a Tutela server over mutual TLS and print the identity it sees: checks a deployment's
    /// certificates, CA bundle and CRL end to end.
    Ping(net_cmd::PingArgs),
    /// Submit, follow, inspect and cancel federated jobs at the coordinator.
    #[command(subcommand)]
    Job(job_cmd::JobCommand),
    /// Run a whole consortium on this machine: a throwaway CA, a coordinator and one site node
    /// per hospital as separate processes over loopback mutual TLS, a federated job on a public
    /// dataset split non-IID across the sites, and the final model scored on held-out data.
    Demo(demo::DemoArgs),
    /// Reproducible benchmarks (results are recorded in BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Privacy accounting for DP-SGD: the ε a training run spends, or the noise it needs.
    #[command(subcommand)]
    Privacy(privacy_cmd::PrivacyCommand),
    /// Models on disk: merge a LoRA adapter into its base, export INT8 weights, verify a
    /// watermark against the audit trail's registry; the coordinator's model registry: list,
    /// show, promote, rollback, fetch.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// The audit log, for compliance officers: list events, verify the whole log, prove an
    /// event, a model's lineage, a job's report.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tutela_protocol::logging::init(cli.log_json);
    let result = match cli.command {
        Command::Pki(cmd) => pki_cmd::run(cmd),
        Command::Privacy(cmd) => privacy_cmd::run(cmd),
        Command::Model(cmd) => block_on(model_cmd::run(cmd)),
        Command::Audit(cmd) => block_on(audit_cmd::run(cmd)),
        Command::Ping(args) => block_on(net_cmd::ping(args)),
        Command::Bench(cmd) => block_on(bench_cmd::run(cmd)),
        Command::Job(cmd) => block_on(job_cmd::run(cmd)),
        Command::Demo(args) => block_on(demo::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an async command on a multi-threaded runtime (the transfers use both cores).
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
