//! A statistics job's two RPCs: a node's release (`Federation.SubmitStatistics`) and the
//! result file by digest (`Jobs.GetStatistics`). Thin: the task table checks who may answer
//! which task, the runner's collection checks the releases, the store and the file store hold
//! the result.

use tonic::Status;
use tutela_privacy::stats::StatsLayout;
use tutela_protocol::pb;

use crate::engine::Engine;
use crate::job::{JobId, JobState};
use crate::statistics::SiteRelease;

/// The longest layout a release may carry (a schema's columns, ranges and categories).
const MAX_LAYOUT_JSON_BYTES: usize = 1 << 20;

/// `site`'s release for its open statistics task. Its layout must parse and its vector have
/// the layout's length; the runner then checks it against the other sites' at the close.
pub fn receive_release(
    engine: &Engine,
    site: &str,
    req: pb::StatisticsRelease,
) -> Result<pb::StatisticsReceipt, Status> {
    if req.layout_json.len() > MAX_LAYOUT_JSON_BYTES {
        return Err(Status::invalid_argument(format!(
            "a statistics release's layout is at most {MAX_LAYOUT_JSON_BYTES} bytes; this one is {}",
            req.layout_json.len()
        )));
    }
    let layout: StatsLayout = serde_json::from_str(&req.layout_json).map_err(|e| {
        Status::invalid_argument(format!(
            "the statistics release's layout does not parse: {e}"
        ))
    })?;
    layout
        .validate()
        .map_err(|e| Status::invalid_argument(format!("the statistics release's layout: {e}")))?;
    if req.sums.len() != layout.len() {
        return Err(Status::invalid_argument(format!(
            "the statistics release has {} values; its layout has {}",
            req.sums.len(),
            layout.len()
        )));
    }
    let release = SiteRelease {
        site: site.to_string(),
        layout,
        sums: req.sums,
    };
    match engine.tasks.site_of(&req.task_id) {
        Some(owner) if owner != site => {
            return Err(Status::permission_denied(format!(
                "task {} belongs to another site",
                req.task_id
            )));
        }
        Some(_) => {}
        None => {
            return Err(Status::failed_precondition(format!(
                "task {} is not open: its job closed its collection, or it never existed",
                req.task_id
            )));
        }
    }
    engine
        .tasks
        .release_statistics(&req.task_id, site, release)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    tracing::info!(%site, task = %req.task_id, "statistics release received");
    Ok(pb::StatisticsReceipt {
        task_id: req.task_id,
    })
}

/// The result file of statistics job `id`, if `sha256` is its result's digest (as its status
/// and its `statistics.published` name it), read back checked against the digest.
pub async fn result_file(
    engine: &Engine,
    id: &JobId,
    sha256: &str,
) -> Result<pb::StatisticsFile, Status> {
    let job = engine.get_job(id).await?;
    let Some(record) = engine
        .store
        .statistics_result(id)
        .await
        .map_err(crate::engine::EngineError::from)?
    else {
        return Err(Status::failed_precondition(format!(
            "job {id} has no statistics result (it is {}{})",
            job.state,
            match job.state {
                JobState::Failed | JobState::Cancelled => format!(
                    ": {}",
                    job.state_reason.as_deref().unwrap_or("no reason recorded")
                ),
                _ => String::new(),
            }
        )));
    };
    if sha256 != record.result_sha256 {
        return Err(Status::not_found(format!(
            "job {id}'s statistics file is {}, not {sha256:?} (`tutela job status` shows it)",
            record.result_sha256
        )));
    }
    let file_text = engine
        .statistics_files()
        .read(&record.result_sha256)
        .map_err(|e| {
            tracing::error!(job = %id, error = %e, "statistics file unreadable");
            Status::internal(format!(
                "the coordinator cannot read job {id}'s statistics file {} (see its log)",
                record.result_sha256
            ))
        })?;
    Ok(pb::StatisticsFile {
        job_id: id.to_string(),
        sha256: record.result_sha256,
        file_text,
    })
}
