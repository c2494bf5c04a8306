//! The operator's view of a job (`GetJob`, `ListJobs`, `WatchJob`): its state, rounds and
//! approvals, or a statistics job's result, from the store and the node registry.

use tutela_protocol::pb;

use crate::engine::{Engine, EngineError, mean_eval_accuracy};
use crate::job::{JobId, JobState};
use crate::tasks::SiteMetrics;

/// The operator's view of a job, from the store and the node registry.
pub async fn job_status(engine: &Engine, id: &JobId) -> Result<pb::JobStatus, EngineError> {
    let job = engine.get_job(id).await?;
    let rounds = engine.store.rounds(id).await?;
    // A completed job shows the model it published (watermarked, when it asked for that).
    let model_id = match engine.published_model(id) {
        Some(published) if job.state == JobState::Completed => published,
        _ => engine
            .store
            .global_model(id, job.current_round)
            .await?
            .unwrap_or_default(),
    };
    let state = job.state;
    let standing = engine.standing(&job).await?;
    let submitted_by = engine.store.submitter(id).await?.unwrap_or_default();
    let (approvals, approvals_gathered, approvals_missing) = match &standing {
        Some(s) => (s.approvals.clone(), s.quorum.gathered(), s.quorum.missing()),
        None => Default::default(),
    };
    let kind = match job.submitted() {
        Ok(spec) => spec.kind().as_str().to_string(),
        Err(_) => String::new(),
    };
    // A statistics job's result, once stored (the job completes right after it is recorded).
    let statistics = engine
        .store
        .statistics_result(id)
        .await?
        .map(|r| pb::StatisticsSummary {
            sha256: r.result_sha256,
            sites: r.sites,
            epsilon_per_site: r.epsilon_per_site.into_iter().collect(),
            delta: r.delta,
            accountant: r.accountant,
            confidence: r.confidence,
            rows: r.rows,
        });
    let waiting_reason = if state == JobState::Proposed && !approvals_missing.is_empty() {
        format!("waiting for approvals: {}", approvals_missing.join("; "))
    } else {
        String::new()
    };
    Ok(pb::JobStatus {
        kind,
        statistics,
        approvals,
        approvals_gathered,
        approvals_missing,
        waiting_reason,
        submitted_by,
        job_id: id.to_string(),
        name: job.name.clone(),
        state: state.as_str().to_string(),
        reason: job.state_reason.clone().unwrap_or_default(),
        rounds_total: job.total_rounds,
        rounds_completed: job.current_round,
        spec_digest: job.spec_digest.to_hex(),
        model_path: if state == JobState::Completed && !model_id.is_empty() {
            // Absolute, whatever directory the coordinator was started in: the operator copies
            // it from `job status` to wherever they are.
            tutela_protocol::config_path::absolute(&engine.model_path(&model_id))
                .display()
                .to_string()
        } else {
            String::new()
        },
        model_id,
        rounds: rounds
            .iter()
            .map(|c| {
                let r = &c.record;
                // The central-DP entry shares the map with the sites' metrics under a key no
                // site can have; it is reported on its own, never as a site.
                let metrics: Vec<SiteMetrics> = r
                    .site_metrics
                    .iter()
                    .filter(|(key, _)| !crate::aggregate::plan::is_report_key(key))
                    .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
                    .collect();
                let central_dp = central_dp_summary(id, c.round, &r.site_metrics);
                pb::RoundSummary {
                    round: c.round,
                    attempt: c.attempt,
                    participants: r.participants.clone(),
                    eval_accuracy: mean_eval_accuracy(&metrics),
                    metrics: metrics
                        .iter()
                        .map(|m| pb::SiteMetrics {
                            site: m.site.clone(),
                            eval_loss: m.eval_loss,
                            eval_accuracy: m.eval_accuracy,
                            eval_samples: m.eval_samples,
                            train_samples: m.train_samples,
                            train_loss: m.train_loss,
                            train_seconds: m.train_seconds,
                            dataset_commitment: m.dataset_commitment.clone(),
                            deid_config_sha256: m.deid_config_sha256.clone(),
                            dp_round_epsilon: m.dp_round_epsilon,
                            dp_job_epsilon: m.dp_job_epsilon,
                            dp_delta: m.dp_delta,
                            eval_perplexity: m.eval_perplexity,
                            eval_loss_stddev: m.eval_loss_stddev,
                            eval_accuracy_stddev: m.eval_accuracy_stddev,
                            dp_noise_multiplier: m.dp_noise_multiplier,
                            dp_expected_batch: m.dp_expected_batch,
                            single_class_predicted: m.single_class_predicted,
                        })
                        .collect(),
                    refused: r
                        .refused
                        .iter()
                        .map(|x| pb::RefusedUpdate {
                            site: x.site.clone(),
                            reason: x.reason.clone(),
                        })
                        .collect(),
                    model_id: r.global_model_digest.clone(),
                    seconds: (r.completed_at - r.started_at).as_seconds_f64(),
                    central_dp,
                    robust_aggregation: robust_summary(id, c.round, &r.site_metrics),
                }
            })
            .collect(),
        connected_sites: engine.nodes.list().into_iter().map(|n| n.site).collect(),
    })
}

/// The round's central-DP figures for the operator, from the [`CentralDpRound`] the engine
/// stored in the round record (`None` for a round without central DP).
///
/// A stored entry that does not parse is a corrupt record; it is logged and left out rather
/// than failing the whole status call, so the operator still sees the job.
///
/// [`CentralDpRound`]: crate::central_dp::CentralDpRound
fn central_dp_summary(
    job: &JobId,
    round: u32,
    site_metrics: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Option<pb::CentralDpSummary> {
    let stored = site_metrics.get(crate::central_dp::ROUND_RECORD_KEY)?;
    let dp: crate::central_dp::CentralDpRound = match serde_json::from_value(stored.clone()) {
        Ok(dp) => dp,
        Err(e) => {
            tracing::warn!(job = %job, round, error = %e, "the round record's central DP entry does not parse; not reported");
            return None;
        }
    };
    Some(pb::CentralDpSummary {
        noise_multiplier: dp.noise_multiplier,
        clip: dp.clip,
        next_clip: dp.next_clip,
        round_epsilon: dp.round_epsilon,
        job_epsilon: dp.job_epsilon,
        delta: dp.delta,
        sites: u32::try_from(dp.sites).unwrap_or(u32::MAX),
        unclipped: u32::try_from(dp.unclipped).unwrap_or(u32::MAX),
    })
}

/// The round's robust-rule report for the operator (`None` for FedAvg's weighted sum); a
/// stored entry that does not parse is logged and left out, like central DP's.
fn robust_summary(
    job: &JobId,
    round: u32,
    site_metrics: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Option<pb::RobustAggregationSummary> {
    let stored = site_metrics.get(crate::aggregate::plan::ROUND_RECORD_KEY)?;
    let report: crate::aggregate::RobustReport = match serde_json::from_value(stored.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(job = %job, round, error = %e, "the round record's aggregation entry does not parse; not reported");
            return None;
        }
    };
    let mut trimmed: Vec<pb::SiteTrimmed> = report
        .trimmed
        .iter()
        .map(|(site, fraction)| pb::SiteTrimmed {
            site: site.clone(),
            fraction: *fraction,
        })
        .collect();
    // Most trimmed first; the sort is stable, so ties keep the sites' order.
    trimmed.sort_by(|a, b| b.fraction.total_cmp(&a.fraction));
    Some(pb::RobustAggregationSummary {
        rule: report.rule,
        excluded: report.excluded,
        trimmed,
    })
}
