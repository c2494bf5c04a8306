//! `tutela-loadgen`: N light site agents in one process against a real `tutela-coordinator` and
//! `tutela-audit` (started from the same target directory), one job, and per round the
//! coordinator's round time, CPU, memory, sockets and the audit events per second. The logic is
//! `tutela_e2e::loadgen`; this is its command line and progress bar.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tutela_e2e::loadgen::{self, LoadConfig, Observer, RoundReport};

/// Runs N site agents, each with its own certificate and mutual-TLS connection, against one
/// coordinator with approvals and the audit trail on, and reports what each round cost it.
///
/// Build first: `cargo build -p tutela-coordinator -p tutela-audit -p tutela-e2e --bins`.
#[derive(Debug, Parser)]
#[command(name = "tutela-loadgen", version)]
struct Args {
    /// Site agents (each a site of the job, each its own node and officer certificate).
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// Rounds of the job.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The MLP's hidden widths, comma-separated: "1000,1000" is about 1.03 M parameters (4 MiB
    /// updates), "16" about 500.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    hidden: Vec<u64>,
    /// The job's round window (`round_deadline_secs`).
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
    /// Simulated local training per round, in milliseconds.
    #[arg(long, default_value_t = 0)]
    train_ms: u64,
    /// The consortium's directory (certificates, policy, the services' data and logs); a
    /// temporary directory, removed afterwards, by default.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The coordinator's database (postgres://...); SQLite in the work directory by default.
    #[arg(long)]
    database_url: Option<String>,
    /// Officers approving the job at once.
    #[arg(long, default_value_t = 8)]
    approve_concurrency: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

struct Bar(ProgressBar);

impl Observer for Bar {
    fn phase(&self, name: &str, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
        self.0.set_message(name.to_string());
    }
    fn progress(&self, done: u64) {
        self.0.set_position(done);
    }
    fn round(&self, r: &RoundReport) {
        self.0.println(describe_round(r));
    }
}

fn describe_round(r: &RoundReport) -> String {
    format!(
        "round {:>3}: {:>7.2} s ({:.2} s wall), {}/{} accepted, CPU {:>5.1} s ({:>4.0} %), RSS peak {:>6.1} MiB, sockets {:>5}, audit {:>6.1} events/s; generator CPU {:.1} s",
        r.round,
        r.seconds,
        r.wall_seconds,
        r.accepted,
        r.participants,
        r.coordinator_cpu_seconds,
        r.coordinator_cpu_percent,
        r.coordinator_rss_peak_bytes as f64 / (1 << 20) as f64,
        r.coordinator_sockets_peak,
        r.audit_events_per_second,
        r.generator_cpu_seconds,
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let tmp;
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("tutela-loadgen-")
                .tempdir_in("/var/tmp")?;
            tmp.path().to_path_buf()
        }
    };
    let mut config = LoadConfig::new(args.sites, &work_dir);
    config.rounds = args.rounds;
    config.hidden = args.hidden.clone();
    config.round_deadline_secs = args.deadline_secs;
    config.train_time = Duration::from_millis(args.train_ms);
    config.database_url = args.database_url.clone();
    config.approve_concurrency = args.approve_concurrency;
    let params = config.parameters()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>14} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .context("the progress bar's template")?,
    );
    bar.println(format!(
        "{} sites, {} rounds, MLP {:?}: {} parameters ({:.1} MiB per update); work dir {}",
        args.sites,
        args.rounds,
        args.hidden,
        params,
        params as f64 * 4.0 / (1 << 20) as f64,
        work_dir.display()
    ));
    let observer = Bar(bar);
    let run = loadgen::run(&config, &observer).await;
    observer.0.finish_and_clear();
    let run = run.with_context(|| format!("the load run (logs in {})", work_dir.display()))?;
    let r = &run.report;
    if args.json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "{} sites connected in {:.1} s, approved in {:.1} s; job {} {}",
            r.sites, r.connect_seconds, r.approve_seconds, r.job_id, r.state
        );
        println!(
            "coordinator: RSS {:.1} MiB before the sites, {:.1} MiB with all connected ({:.1} KiB per connected site), high-water {:.1} MiB; {} sockets, {} threads",
            mib(r.coordinator_rss_start_bytes),
            mib(r.coordinator_rss_connected_bytes),
            r.coordinator_bytes_per_connected_site / 1024.0,
            mib(r.coordinator_rss_hwm_bytes),
            r.coordinator_sockets_connected,
            r.coordinator_threads
        );
        println!(
            "audit events: {} in all; agents: {} connect failures, {} failures (last: {:?}); open-files limit {}",
            r.audit_events_total,
            r.agent_connect_failures,
            r.agent_failures,
            r.agent_last_failure,
            r.open_files_limit
        );
        for round in &r.rounds {
            println!("{}", describe_round(round));
        }
    }
    Ok(())
}
