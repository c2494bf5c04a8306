//! `tutela job ...`: submit, watch, inspect and cancel federated jobs at the coordinator, as a
//! consortium operator (or, read-only, as a site user).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tonic::transport::Channel;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::jobs_client::JobsClient;
use tutela_protocol::tls::TlsMaterial;

use crate::net_cmd::ClientTlsArgs;

#[derive(Debug, Args)]
pub struct Connection {
    /// Coordinator address, HOST:PORT.
    #[arg(long, env = "TUTELA_COORDINATOR", default_value = "localhost:7443")]
    pub coordinator: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl Connection {
    pub async fn jobs(&self) -> Result<JobsClient<Channel>> {
        let material = TlsMaterial::load(&self.tls.files())?;
        let coordinator = Identity::new(&material.identity.consortium, Principal::Coordinator)?;
        let tls = ClientTls::from_material(&material, Some(coordinator))?;
        let channel = client::connect(&self.coordinator, tls).await?;
        Ok(JobsClient::new(channel))
    }
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job spec (TOML; see deploy/jobs/ for every key) and print its id. With --watch,
    /// follow it round by round until it ends.
    Submit {
        spec: PathBuf,
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a job: its state, rounds, each site's metrics and refused updates.
    Status {
        job: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Follow a job round by round until it ends.
    Watch {
        job: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List every job the coordinator knows.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Cancel a running job.
    Cancel {
        job: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Connection,
    },
}

pub async fn run(cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::Submit { spec, watch, conn } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("cannot read {}", spec.display()))?;
            let mut jobs = conn.jobs().await?;
            let status = jobs
                .submit_job(pb::SubmitJobRequest { spec_toml: text })
                .await
                .with_context(|| format!("the coordinator refused {}", spec.display()))?
                .into_inner();
            println!(
                "job {} submitted ({}), spec digest {}",
                status.job_id, status.state, status.spec_digest
            );
            if watch {
                let mut printed = 0;
                let last = watch_job(&mut jobs, &status.job_id, |s| {
                    print_progress(s, &mut printed)
                })
                .await?;
                print_final(&last);
            }
            Ok(())
        }
        JobCommand::Status { job, json, conn } => {
            let status = conn
                .jobs()
                .await?
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            if json {
                println!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
            Ok(())
        }
        JobCommand::Watch { job, conn } => {
            let mut jobs = conn.jobs().await?;
            let mut printed = 0;
            let last = watch_job(&mut jobs, &job, |s| print_progress(s, &mut printed)).await?;
            print_final(&last);
            Ok(())
        }
        JobCommand::List { conn } => {
            let list = conn
                .jobs()
                .await?
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner();
            println!(
                "{:<34} {:<24} {:<10} {:>7}",
                "job", "name", "state", "rounds"
            );
            for j in list.jobs {
                println!(
                    "{:<34} {:<24} {:<10} {:>3}/{:<3}",
                    j.job_id, j.name, j.state, j.rounds_completed, j.rounds_total
                );
            }
            Ok(())
        }
        JobCommand::Cancel { job, reason, conn } => {
            let status = conn
                .jobs()
                .await?
                .cancel_job(pb::CancelJobRequest {
                    job_id: job,
                    reason,
                })
                .await?
                .into_inner();
            print_status(&status);
            Ok(())
        }
    }
}

/// Follows a job, calling `on_status` with every new status, until it ends. Returns the last.
pub async fn watch_job(
    jobs: &mut JobsClient<Channel>,
    job: &str,
    mut on_status: impl FnMut(&pb::JobStatus),
) -> Result<pb::JobStatus> {
    let mut stream = jobs
        .watch_job(pb::GetJobRequest {
            job_id: job.to_string(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(status) = stream.message().await? {
        on_status(&status);
        last = Some(status);
    }
    last.context("the coordinator ended the watch without a status")
}

/// Prints the rounds completed since the last call.
fn print_progress(s: &pb::JobStatus, printed: &mut u32) {
    let since = *printed;
    for r in s.rounds.iter().filter(|r| r.round > since) {
        *printed = r.round;
        println!(
            "round {:>3}/{:<3} accuracy {:.4} ({} sites, {:.1}s) state {}",
            r.round,
            s.rounds_total,
            r.eval_accuracy,
            r.participants.len(),
            r.seconds,
            s.state
        );
    }
}

fn print_final(s: &pb::JobStatus) {
    println!(
        "job {} {}{}",
        s.job_id,
        s.state,
        if s.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", s.reason)
        }
    );
    if !s.model_path.is_empty() {
        println!("final model {} at {}", s.model_id, s.model_path);
    }
}

pub fn print_status(s: &pb::JobStatus) {
    println!("job      {} ({})", s.job_id, s.name);
    println!(
        "state    {}{}",
        s.state,
        if s.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", s.reason)
        }
    );
    println!("rounds   {}/{}", s.rounds_completed, s.rounds_total);
    println!("spec     {}", s.spec_digest);
    println!(
        "model    {}",
        if s.model_id.is_empty() {
            "-"
        } else {
            &s.model_id
        }
    );
    println!("sites    {}", s.connected_sites.join(", "));
    for r in &s.rounds {
        println!(
            "  round {:>3} attempt {} accuracy {:.4} sites {} ({:.1}s)",
            r.round,
            r.attempt,
            r.eval_accuracy,
            r.participants.join(","),
            r.seconds
        );
        for m in &r.metrics {
            println!(
                "    {:<16} eval acc {:.4} loss {:.4} (n={})  train loss {:.4} on {} samples in {:.2}s",
                m.site,
                m.eval_accuracy,
                m.eval_loss,
                m.eval_samples,
                m.train_loss,
                m.train_samples,
                m.train_seconds
            );
        }
        for x in &r.refused {
            println!("    {:<16} REFUSED: {}", x.site, x.reason);
        }
    }
}

fn status_json(s: &pb::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": s.job_id,
        "name": s.name,
        "state": s.state,
        "reason": s.reason,
        "rounds_total": s.rounds_total,
        "rounds_completed": s.rounds_completed,
        "spec_digest": s.spec_digest,
        "model_id": s.model_id,
        "model_path": s.model_path,
        "connected_sites": s.connected_sites,
        "rounds": s.rounds.iter().map(|r| serde_json::json!({
            "round": r.round,
            "attempt": r.attempt,
            "participants": r.participants,
            "eval_accuracy": r.eval_accuracy,
            "model_id": r.model_id,
            "seconds": r.seconds,
            "metrics": r.metrics.iter().map(|m| serde_json::json!({
                "site": m.site, "eval_accuracy": m.eval_accuracy, "eval_loss": m.eval_loss,
                "eval_samples": m.eval_samples, "train_samples": m.train_samples,
                "train_loss": m.train_loss, "train_seconds": m.train_seconds,
            })).collect::<Vec<_>>(),
            "refused": r.refused.iter().map(|x| serde_json::json!({"site": x.site, "reason": x.reason})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
