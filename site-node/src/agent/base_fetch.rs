//! A language-model job's base the site does not hold, fetched once from the coordinator
//! (`Federation.FetchBaseModel`) into memory and put in the encrypted cache of fetched bases
//! (`crate::lm::base_cache`), which checks its digest before keeping anything. Runs between the
//! gate's two halves: after [`super::gate::TaskGate::approve`] (a job this site's officers did
//! not sign, or whose tokenizer the site does not hold, fetches nothing and leaves the cache as
//! it is) and before [`super::gate::TaskGate::admit`], which then finds the base in the cache.

use std::collections::BTreeSet;

use tutela_protocol::pb;

use super::worker::{Failure, Shared, describe_status};
use crate::failure::{FailureCode, SiteFailure};
use crate::jobspec::JobView;
use crate::lm::base_cache::{BaseCacheError, ReceivedBase};

/// Fetches the approved task's base when the job names one that neither the site's `base_models` nor the
/// cache holds and fetching is on. Nothing to fetch, or a coordinator that cannot serve it, is
/// not an error here: the gate then declines the task as it would without fetching. A base that
/// arrives with another digest (or unreadable, or too large) is declined here, naming digests
/// and sizes only.
pub(super) async fn fetch_missing_base(
    shared: &Shared,
    task: &pb::Task,
    job: &JobView,
) -> Result<(), Failure> {
    let Ok(Some(wanted)) = job.base_sha256() else {
        return Ok(());
    };
    let base_models = shared.gate.base_models();
    let Some(cache) = base_models.cache() else {
        return Ok(());
    };
    // The same test as the gate's, which weighed the budget of such a task before it came here.
    if !base_models.would_fetch(wanted) {
        return Ok(());
    }
    let Some(mut client) = shared.client() else {
        return Err(Failure::Coordinator("not connected".into()));
    };
    tracing::info!(job = %task.job_id, sha256 = %wanted, "fetching the job's base model from the coordinator");
    let frames = match client
        .fetch_base_model(pb::FetchBaseModelRequest {
            job_id: task.job_id.clone(),
            sha256: wanted.to_string(),
        })
        .await
    {
        Ok(frames) => frames.into_inner(),
        Err(status) => {
            tracing::warn!(sha256 = %wanted, error = %describe_status("FetchBaseModel", &status), "the coordinator did not serve the base model");
            return Ok(());
        }
    };
    let limits = cache.limits();
    let received = tutela_protocol::base_model::receive(frames, limits.max_bytes)
        .await
        .map_err(|e| {
            // Sizes and the coordinator's words only: nothing of the site.
            Failure::Decline(SiteFailure::with_public_note(
                FailureCode::BaseModelRefused,
                format!("fetching base model sha256 {wanted}: {e}"),
            ))
        })?;
    let received = ReceivedBase {
        config_json: received.config_json,
        weights: received.weights,
    };
    match cache.insert(wanted, &received, &BTreeSet::new()) {
        Ok(cached) => {
            tracing::info!(sha256 = %cached.sha256, bytes = cached.bytes, "base model fetched and cached (encrypted)");
            Ok(())
        }
        // Paths of the site's cache stay in its log.
        Err(e @ BaseCacheError::Io { .. }) => Err(Failure::Decline(SiteFailure::new(
            FailureCode::BaseModelRefused,
            format!("caching the fetched base model: {e}"),
        ))),
        // Digests, sizes and limits only.
        Err(e) => Err(Failure::Decline(SiteFailure::with_public_note(
            FailureCode::BaseModelRefused,
            e,
        ))),
    }
}
