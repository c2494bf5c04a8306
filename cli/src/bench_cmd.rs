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
    /// FedAvg of UPDATES updates of PARAMS float32 parameters through the coordinator's streaming
    /// aggregator (validation, exact-undo spool and fold, in 4 MiB chunks), beside a plain memory
    /// copy of the same bytes and, in the same run, NumPy computing the weighted average the way
    /// Flower's `aggregate` does (bench/fedavg_numpy.py).
    Aggregate(AggregateArgs),
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
    /// Runs of each transfer (interleaved); the best time of each is reported.
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct AggregateArgs {
    /// Parameters per update.
    #[arg(long, default_value_t = 50_000_000)]
    params: usize,
    /// Number of updates.
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// Python with NumPy for the reference (default: .venv/bin/python, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The NumPy reference script.
    #[arg(long, default_value = "bench/fedavg_numpy.py")]
    numpy_script: PathBuf,
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
            let report = tutela_protocol::bench::run_transport_bench(
                &exe,
                &dir,
                args.size_mib << 20,
                args.repeats,
            )
            .await
            .map_err(|e| anyhow!("transport benchmark failed: {e}"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
        BenchCommand::Aggregate(args) => {
            let report =
                tutela_coordinator::aggregate::bench::bench_fedavg(args.params, args.updates)
                    .map_err(|e| anyhow!("aggregation benchmark failed: {e}"))?;
            print!("{report}");
            let python = args.python.clone().unwrap_or_else(|| {
                let venv = PathBuf::from(".venv/bin/python");
                if venv.exists() {
                    venv
                } else {
                    PathBuf::from("python3")
                }
            });
            println!("\nNumPy reference (Flower's aggregate), same sizes, same run:");
            let status = std::process::Command::new(&python)
                .arg(&args.numpy_script)
                .arg("--params")
                .arg(args.params.to_string())
                .arg("--updates")
                .arg(args.updates.to_string())
                .status()
                .map_err(|e| anyhow!("cannot run {}: {e}", python.display()))?;
            if !status.success() {
                return Err(anyhow!("the NumPy reference failed with {status}"));
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
