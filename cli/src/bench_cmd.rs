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
    /// One round of each aggregation rule (FedAvg's streaming sum, then the buffered median,
    /// trimmed mean and Multi-Krum) on UPDATES random updates of PARAMS float32 parameters,
    /// through the coordinator's real sinks: round time and the resident peak each added.
    AggregateRules(AggregateRulesArgs),
    /// Durable audit appends to a database with concurrent writers (group commit), beside plain
    /// single-row and 100-row INSERTs of the same rows into an unchained table in the same run.
    AuditAppend(AuditAppendArgs),
    /// `verify` over N hash-chained, checkpointed audit events in memory: events per second.
    AuditVerify(AuditVerifyArgs),
    /// Authorization: casbin decisions per second in-process, and the p50/p99 latency of an RPC
    /// over loopback mutual TLS with the enforcement layer on and off (deploy/policy/model.conf).
    Authz(AuthzArgs),
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
pub struct AuthzArgs {
    /// In-process decisions.
    #[arg(long, default_value_t = 200_000)]
    decisions: u64,
    /// RPCs per server (enforcement on, off).
    #[arg(long, default_value_t = 5_000)]
    rpcs: u64,
    /// Sites in the generated policy (one officer grant each).
    #[arg(long, default_value_t = 50)]
    sites: usize,
}

#[derive(Debug, Args)]
pub struct AggregateRulesArgs {
    /// Parameters per update.
    #[arg(long, default_value_t = 10_000_000)]
    params: usize,
    /// Number of updates (at least 3).
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// Where the spools go (about params × 4 bytes × updates of disk); a temporary directory
    /// under /var/tmp by default, removed afterwards.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AggregateArgs {
    /// Parameters per update.
    #[arg(long, default_value_t = 50_000_000)]
    params: usize,
    /// Number of updates.
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// Threads of the concurrent round and of the parallel copy (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Python with NumPy for the reference (default: .venv/bin/python, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The NumPy reference script.
    #[arg(long, default_value = "bench/fedavg_numpy.py")]
    numpy_script: PathBuf,
}

#[derive(Debug, Args)]
pub struct AuditAppendArgs {
    /// An empty database to write to (postgres://... or sqlite://PATH?mode=rwc); its audit tables
    /// are created, and dropped between runs.
    #[arg(long, env = "TUTELA_BENCH_DATABASE_URL")]
    database_url: String,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Events per writer.
    #[arg(long, default_value_t = 5000)]
    per_writer: usize,
    /// Appends each writer keeps outstanding, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    in_flight: Vec<usize>,
    /// Sign a checkpoint every this many events (1: with every commit, the service's default).
    #[arg(long, default_value_t = 1)]
    checkpoint_every: u64,
}

#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// Number of events.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Runs (each reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
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
        BenchCommand::AggregateRules(args) => {
            let temp = match &args.work_dir {
                Some(_) => None,
                None => Some(
                    tempfile::Builder::new()
                        .prefix("tutela-bench-rules-")
                        .tempdir_in(if std::path::Path::new("/var/tmp").is_dir() {
                            "/var/tmp"
                        } else {
                            "."
                        })?,
                ),
            };
            let dir = match (&args.work_dir, &temp) {
                (Some(d), _) => d.clone(),
                (None, Some(t)) => t.path().to_path_buf(),
                (None, None) => return Err(anyhow!("no working directory")),
            };
            let report = tutela_coordinator::aggregate::bench_rules::bench_rules(
                args.params,
                args.updates,
                &dir,
            )
            .map_err(|e| anyhow!("aggregation rules benchmark failed: {e}"))?;
            print!("{report}");
            Ok(())
        }
        BenchCommand::Aggregate(args) => {
            let report = tutela_coordinator::aggregate::bench::bench_fedavg(
                args.params,
                args.updates,
                args.threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            )
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
        BenchCommand::AuditAppend(args) => {
            let (rates, settings) = tutela_audit::bench::append(
                &args.database_url,
                args.writers,
                args.per_writer,
                &args.in_flight,
                args.checkpoint_every,
            )
            .await
            .map_err(|e| anyhow!("audit append benchmark failed: {e:#}"))?;
            for (k, v) in settings {
                println!("{k} = {v}");
            }
            for r in rates {
                println!(
                    "{:<70} {:>9} rows in {:>7.3} s: {:>9.0} rows/s",
                    r.what, r.rows, r.seconds, r.per_second
                );
            }
            Ok(())
        }
        BenchCommand::AuditVerify(args) => {
            let (mean, rates) = tutela_audit::bench::verify(args.events, args.runs)
                .map_err(|e| anyhow!("audit verify benchmark failed: {e:#}"))?;
            println!("{} events, mean hash input {mean} bytes", args.events);
            for r in rates {
                println!(
                    "{:<40} {:>9} events in {:>7.3} s: {:>9.0} events/s",
                    r.what, r.rows, r.seconds, r.per_second
                );
            }
            Ok(())
        }
        BenchCommand::Authz(args) => {
            let r = tutela_policy::bench::run(
                include_str!("../../deploy/policy/model.conf"),
                args.sites,
                args.decisions,
                args.rpcs,
            )
            .await
            .map_err(|e| anyhow!("authorization benchmark failed: {e}"))?;
            println!(
                "policy: {} lines (deploy/policy/model.conf)",
                r.policy_lines
            );
            println!(
                "in-process decisions: {} in total, {:.0} decisions/s",
                r.decisions, r.decisions_per_sec
            );
            println!(
                "WhoAmI over loopback mTLS, {} calls each: enforcement off p50 {:.0} us p99 {:.0} us; on p50 {:.0} us p99 {:.0} us; added p50 {:.0} us p99 {:.0} us",
                r.rpcs,
                r.off_p50_us,
                r.off_p99_us,
                r.on_p50_us,
                r.on_p99_us,
                r.on_p50_us - r.off_p50_us,
                r.on_p99_us - r.off_p99_us
            );
            Ok(())
        }
        BenchCommand::TransportServer(args) => {
            tutela_protocol::bench::run_transport_server(&args.dir)
                .await
                .map_err(|e| anyhow!("transport benchmark server failed: {e}"))
        }
    }
}
