//! `tutela job ...`: submit, watch, inspect and cancel federated jobs at the coordinator, as a
//! consortium operator (or, read-only, as a site user); approve, reject or withdraw an approval,
//! as a compliance officer.

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

mod stats;
mod status;

pub use status::print_status;
use status::*;

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
    ///
    /// With --base-model DIR (a Hugging Face checkpoint: config.json and model.safetensors), the
    /// job's base for sites that do not hold it: its checkpoint digest is computed here and must
    /// be the spec's model.base_sha256 (a mismatch is refused, naming both), then it is uploaded
    /// to the coordinator, which checks it again and keeps it by digest for the sites to fetch
    /// once ([base_cache] in node.toml).
    Submit {
        spec: PathBuf,
        #[arg(long)]
        watch: bool,
        /// The job's base checkpoint directory, uploaded before the job is submitted.
        #[arg(long, value_name = "DIR")]
        base_model: Option<PathBuf>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Ask every site the job would run at whether it would (dataset, schema digest, each
    /// site-policy clause, tokenizer and base model, remaining privacy budget), before it is
    /// submitted and signed. Prints every refusal of every site; exits non-zero if there is any.
    /// Nothing is stored, proposed, spent or approved. A consortium-statistics spec
    /// (`kind = "statistics"`) is checked as one: its table, schema digest, policy clauses and
    /// its one release against each site's ε caps.
    Check {
        spec: PathBuf,
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
    /// Print a completed consortium-statistics job's data dictionary (`kind = "statistics"`):
    /// per column the counts, mean, standard deviation and quantiles, each rounded for people
    /// with its ± bound, which all hold together at the job's confidence. The file is fetched by
    /// the SHA-256 its `statistics.published` names and checked against it.
    Stats {
        job: String,
        /// Also write the statistics file here, byte for byte: what a schema's `[standardize]
        /// statistics = "FILE"` names, with `sha256` the digest printed.
        #[arg(long)]
        output: Option<PathBuf>,
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
    /// Approve a proposed job, as a compliance officer: sign the digest of its spec with the
    /// private key of your certificate. The signature and your certificate are stored by the
    /// coordinator and carried to every site node, which checks them itself. Connect with the same
    /// certificate (--tls-dir/--stem): officers submit their own approvals.
    Approve {
        job: String,
        /// Your private key (PKCS#8 PEM, as `tutela pki issue` writes it).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Your certificate (PEM), issued by the consortium CA.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The job spec you reviewed: the approval is refused here unless its digest is the one
        /// the coordinator holds for the job.
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
        /// Days until the approval expires (it must hold until the job has run).
        #[arg(long, default_value_t = 30)]
        expires_in_days: u32,
        #[command(flatten)]
        conn: Connection,
    },
    /// Reject a proposed job, as a compliance officer: sign the digest of its spec and your reason
    /// with the private key of your certificate. The job is cancelled; the coordinator stores the
    /// signed rejection with your certificate and records it in the audit trail (`job.rejected`),
    /// and `tutela job status` shows who rejected it and why. A rejection is signed under its own
    /// domain-separation context, so it can never be taken for an approval. Connect with the same
    /// certificate (--tls-dir/--stem): officers submit their own rejections.
    Reject {
        job: String,
        /// Why the job must not run (at most 2048 bytes; signed, stored and shown to everyone
        /// who reads the job).
        #[arg(long)]
        reason: String,
        /// Your private key (PKCS#8 PEM, as `tutela pki issue` writes it).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Your certificate (PEM), issued by the consortium CA.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The job spec you reviewed: the rejection is refused here unless its digest is the one
        /// the coordinator holds for the job.
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Withdraw your approval of a job that has not started yet.
    Withdraw {
        job: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Replace the spec of a proposed job. Its digest changes, so every approval so far stops
    /// counting and the officers must approve again.
    Amend {
        job: String,
        spec: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
}

/// A job check's answers: one line per site that would run the job, one per refusal otherwise
/// (site, code, reason).
pub fn format_check(sites: &[pb::SiteCheck]) -> String {
    if sites.is_empty() {
        return "no site would take part: the job names no site and no connected node offers \
                its dataset\n"
            .to_string();
    }
    let mut out = String::new();
    for site in sites {
        if site.refusals.is_empty() {
            out.push_str(&format!("{}\twould run the job\n", site.site));
        }
        for r in &site.refusals {
            out.push_str(&format!("{}\t{}\t{}\n", site.site, r.code, r.reason));
        }
    }
    out
}

/// One site's round report as `job status --json` prints it.
fn site_metrics_json(m: &pb::SiteMetrics) -> serde_json::Value {
    let mut v = serde_json::json!({
        "site": m.site, "eval_accuracy": m.eval_accuracy, "eval_loss": m.eval_loss,
        "eval_samples": m.eval_samples, "train_samples": m.train_samples,
        "train_loss": m.train_loss, "train_seconds": m.train_seconds,
        "dp_round_epsilon": m.dp_round_epsilon, "dp_job_epsilon": m.dp_job_epsilon,
        "dp_delta": m.dp_delta, "dataset_commitment": m.dataset_commitment,
        "deid_config_sha256": m.deid_config_sha256,
        "eval_perplexity": m.eval_perplexity,
    });
    v["dp_noise_multiplier"] = m.dp_noise_multiplier.into();
    v["dp_expected_batch"] = m.dp_expected_batch.into();
    v["single_class_predicted"] = m.single_class_predicted.into();
    v["warnings"] = site_warnings(m).into();
    v
}

/// What a site's round report says is wrong: DP noise that swamps the signal (σ / B above
/// `tutela_privacy::planning::SWAMPED`), a trained model that predicts one class for every row.
pub fn site_warnings(m: &pb::SiteMetrics) -> Vec<String> {
    use tutela_privacy::planning::{SWAMPED, noise_to_signal};
    let mut out = Vec::new();
    if m.dp_noise_multiplier > 0.0 && m.dp_expected_batch > 0.0 {
        let ratio = noise_to_signal(m.dp_noise_multiplier, m.dp_expected_batch);
        if ratio > SWAMPED {
            out.push(format!(
                "DP noise swamps the signal: σ = {:.3} over an expected batch of {:.1} rows is \
                 σ/B = {ratio:.3} > {SWAMPED}; see `tutela privacy plan` for a larger batch, \
                 fewer steps or a larger ε",
                m.dp_noise_multiplier, m.dp_expected_batch
            ));
        }
    }
    if let Some(class) = m.single_class_predicted {
        out.push(format!(
            "the trained model predicts class {class} for every validation row: it has learnt \
             the majority class only"
        ));
    }
    out
}

pub async fn run(cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::Submit {
            spec,
            watch,
            base_model,
            conn,
        } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("cannot read {}", spec.display()))?;
            let mut jobs = conn.jobs().await?;
            if let Some(dir) = &base_model {
                let parsed = tutela_protocol::job::JobSpec::from_toml_str(&text)
                    .with_context(|| format!("{} is not a valid job spec", spec.display()))?;
                let (sha256, config_json, weights) = tutela_protocol::base_model::read_for_upload(
                    dir,
                    parsed.model.base_sha256.as_deref(),
                )?;
                let receipt = jobs
                    .upload_base_model(tutela_protocol::base_model::chunk_stream(
                        &sha256,
                        config_json,
                        &weights,
                    ))
                    .await
                    .with_context(|| {
                        format!("the coordinator refused the base model {}", dir.display())
                    })?
                    .into_inner();
                println!(
                    "base model {} uploaded ({} bytes)",
                    receipt.sha256, receipt.bytes
                );
            }
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
        JobCommand::Check { spec, conn } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("cannot read {}", spec.display()))?;
            let reply = conn
                .jobs()
                .await?
                .check_job(pb::CheckJobRequest { spec_toml: text })
                .await
                .with_context(|| format!("the coordinator refused to check {}", spec.display()))?
                .into_inner();
            print!("{}", format_check(&reply.sites));
            let refusals: usize = reply.sites.iter().map(|s| s.refusals.len()).sum();
            if refusals > 0 {
                anyhow::bail!(
                    "{} would not run as written: {refusals} refusal(s) at {} of {} site(s)",
                    spec.display(),
                    reply
                        .sites
                        .iter()
                        .filter(|s| !s.refusals.is_empty())
                        .count(),
                    reply.sites.len()
                );
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
        JobCommand::Stats { job, output, conn } => stats::run(job, output.as_deref(), conn).await,
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
        JobCommand::Approve {
            job,
            key,
            cert,
            spec,
            expires_in_days,
            conn,
        } => {
            let mut jobs = conn.jobs().await?;
            let OfficerSigning {
                digest,
                key_pem,
                cert_pem,
            } = officer_signing(&mut jobs, &job, spec.as_deref(), &key, &cert, "approving").await?;
            let now = time::OffsetDateTime::now_utc();
            let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
            let expires_ms = now_ms + i64::from(expires_in_days) * 86_400_000;
            let approval = tutela_policy::Approval::sign(
                &key_pem, &cert_pem, &job, &digest, now_ms, expires_ms,
            )?;
            approval.check_own_signature().with_context(|| {
                format!("{} is not the key of {}", key.display(), cert.display())
            })?;
            let status = jobs
                .approve_job(pb::ApproveJobRequest {
                    approval: Some(approval.to_pb()),
                })
                .await
                .context("the coordinator refused the approval")?
                .into_inner();
            println!(
                "approved job {} at spec digest {} (expires in {expires_in_days} days)",
                status.job_id, status.spec_digest
            );
            print_status(&status);
            Ok(())
        }
        JobCommand::Reject {
            job,
            reason,
            key,
            cert,
            spec,
            conn,
        } => {
            let mut jobs = conn.jobs().await?;
            let OfficerSigning {
                digest,
                key_pem,
                cert_pem,
            } = officer_signing(&mut jobs, &job, spec.as_deref(), &key, &cert, "rejecting").await?;
            let now_ms =
                (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            let rejection = tutela_policy::Rejection::sign(
                &key_pem, &cert_pem, &job, &digest, &reason, now_ms,
            )?;
            rejection.check_own_signature().with_context(|| {
                format!("{} is not the key of {}", key.display(), cert.display())
            })?;
            let status = jobs
                .reject_job(pb::RejectJobRequest {
                    job_id: job,
                    reason,
                    rejection: Some(rejection.to_pb()),
                })
                .await
                .context("the coordinator refused the rejection")?
                .into_inner();
            println!(
                "rejected job {} at spec digest {}",
                status.job_id, status.spec_digest
            );
            print_status(&status);
            Ok(())
        }
        JobCommand::Withdraw { job, conn } => {
            let status = conn
                .jobs()
                .await?
                .withdraw_approval(pb::WithdrawApprovalRequest { job_id: job })
                .await?
                .into_inner();
            print_status(&status);
            Ok(())
        }
        JobCommand::Amend { job, spec, conn } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("cannot read {}", spec.display()))?;
            let status = conn
                .jobs()
                .await?
                .amend_job(pb::AmendJobRequest {
                    job_id: job,
                    spec_toml: text,
                })
                .await?
                .into_inner();
            print_status(&status);
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
            "round {:>3}/{:<3} {} ({} sites, {:.1}s) state {}",
            r.round,
            s.rounds_total,
            round_quality(r),
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

/// What an officer signs with, for `approve` and `reject`: the job's current spec digest at the
/// coordinator (checked against the officer's own copy of the spec when `spec` is given, so that
/// an officer signs only a spec they have read), and their key and certificate.
struct OfficerSigning {
    digest: tutela_protocol::job::SpecDigest,
    key_pem: String,
    cert_pem: String,
}

async fn officer_signing(
    jobs: &mut JobsClient<Channel>,
    job: &str,
    spec: Option<&std::path::Path>,
    key: &std::path::Path,
    cert: &std::path::Path,
    verb: &str,
) -> Result<OfficerSigning> {
    let status = jobs
        .get_job(pb::GetJobRequest {
            job_id: job.to_string(),
        })
        .await?
        .into_inner();
    let digest: tutela_protocol::job::SpecDigest = status
        .spec_digest
        .parse()
        .context("the coordinator sent a malformed spec digest")?;
    if let Some(path) = spec {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // Either kind of job: officers sign a statistics job's digest the same way.
        let local = tutela_protocol::job::SubmittedSpec::from_toml_str(&text)
            .with_context(|| format!("{}", path.display()))?
            .digest();
        anyhow::ensure!(
            local == digest,
            "{} digests to {local}, but job {job} at the coordinator is {digest}: not {verb}",
            path.display()
        );
    }
    let key_pem =
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    let cert_pem =
        std::fs::read_to_string(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    Ok(OfficerSigning {
        digest,
        key_pem,
        cert_pem,
    })
}
