//! `tutela bench ...`: reproducible benchmarks whose results go into BENCHMARKS.md.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Upload and download a model through the ModelExchange gRPC stream over loopback mutual
    /// TLS, beside a raw rustls TLS 1.3 copy of the same bytes, and report MB/s and the
    /// receiver's resident-memory growth. The server runs as a child process.
    Transport(TransportArgs),
    /// Internal: the server side of `bench transport` (started by it as a child process).
    #[command(hide = true)]
    TransportServer(TransportServerArgs),
}

#[derive(Debug, Args)]
pub struct TransportArgs {
    /// Model size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Working directory for the model files (about 3× the model size is written); a temporary
    /// directory under /var/tmp by default, removed afterwards.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct TransportServerArgs {
    #[arg(long)]
    dir: PathBuf,
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Transport(args) => {
            let tmp;
            let dir = match &args.work_dir {
                Some(d) => d.clone(),
                None => {
                    // Not /tmp: it is often a small tmpfs, and the benchmark writes GiBs.
                    tmp = tempfile::Builder::new()
                        .prefix("tutela-bench-")
                        .tempdir_in("/var/tmp")?;
                    tmp.path().to_path_buf()
                }
            };
            let exe = std::env::current_exe()?;
            let report =
                tutela_protocol::bench::run_transport_bench(&exe, &dir, args.size_mib << 20)
                    .await
                    .map_err(|e| anyhow!("transport benchmark failed: {e}"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
        BenchCommand::TransportServer(args) => {
            tutela_protocol::bench::run_transport_server(&args.dir)
                .await
                .map_err(|e| anyhow!("transport benchmark server failed: {e}"))
        }
    }
}
