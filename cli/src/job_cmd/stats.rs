//! `tutela job stats JOB [--output FILE]`: a completed consortium-statistics job's result. The
//! file is fetched by the digest the job's status (and its `statistics.published`) names, checked
//! against it here, printed for people as `tutela privacy stats` prints one, and written as it
//! is: the file a schema's `[standardize] statistics = "FILE", sha256 = "..."` accepts.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tutela_protocol::pb;

use super::Connection;

pub async fn run(job: String, output: Option<&Path>, conn: Connection) -> Result<()> {
    let mut jobs = conn.jobs().await?;
    let status = jobs
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await?
        .into_inner();
    let Some(summary) = status.statistics else {
        bail!(
            "job {job} has no statistics result: it is {} ({} job){}",
            status.state,
            if status.kind.is_empty() {
                "unknown kind of"
            } else {
                status.kind.as_str()
            },
            if status.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", status.reason)
            }
        );
    };
    let file = jobs
        .get_statistics(pb::GetStatisticsRequest {
            job_id: job.clone(),
            sha256: summary.sha256.clone(),
        })
        .await
        .with_context(|| format!("fetching job {job}'s statistics file {}", summary.sha256))?
        .into_inner();
    let found = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        file.file_text.as_bytes(),
    ));
    if found != summary.sha256 {
        bail!(
            "the coordinator sent a statistics file whose SHA-256 is {found}, not {} as job \
             {job}'s result names: not written",
            summary.sha256
        );
    }
    let dictionary = tutela_privacy::stats::DataDictionary::from_file_text(&file.file_text)
        .with_context(|| format!("job {job}'s statistics file {}", summary.sha256))?;
    print!("{}", crate::privacy_cmd::render_dictionary(&dictionary));
    println!("{}", summary_line(&summary));
    if let Some(path) = output {
        std::fs::write(path, file.file_text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!(
            "wrote {} (sha256 {}); a schema uses it as\n  [standardize]\n  statistics = \"{}\"\n  \
             sha256 = \"{}\"",
            path.display(),
            summary.sha256,
            path.display(),
            summary.sha256
        );
    }
    Ok(())
}

/// Who is in the result and what each site spent, in one line.
pub(super) fn summary_line(s: &pb::StatisticsSummary) -> String {
    let spent: Vec<String> = s
        .sites
        .iter()
        .map(|site| {
            let e = s.epsilon_per_site.get(site).copied().unwrap_or(f64::NAN);
            format!("{site} ε {e:.3}")
        })
        .collect();
    format!(
        "sites {} ({}; δ = {:e}, {} accountant); every figure within its bound at confidence {}",
        s.sites.len(),
        spent.join(", "),
        s.delta,
        s.accountant,
        s.confidence
    )
}
