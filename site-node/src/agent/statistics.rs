//! A STATISTICS task's work: the site's one release of a consortium-statistics job. The gate
//! admits it ([`TaskGate::admit_statistics_at`]: approvals, policy, table, schema digest); the
//! trail is checked (its history the one this site saw, every spend of the dataset in the
//! ledger); `SiteLedgers::release_statistics` checks the budget, reads the records, adds the noise
//! and charges the ledger; the charge is appended to the trail as `privacy.spent`
//! ([`crate::spend_anchor::anchor_charge`]) — and only then does the vector leave the site
//! (`SubmitStatistics`). A refusal anywhere before is a decline with the gate's codes: no local
//! path, no cell value in any reason.
//!
//! A job is released once per dataset: a task sent again (the coordinator restarted, the node
//! lost the receipt) is declined by the ledger's "charged already" rather than noised again.
//!
//! [`TaskGate::admit_statistics_at`]: super::gate::TaskGate::admit_statistics_at

use std::sync::Arc;

use tutela_protocol::pb;

use super::gate::{AdmittedStatistics, Refusal};
use super::now_ms;
use super::worker::{Done, Failure, Shared, describe_status, internal, refused};
use crate::failure::{FailureCode, SiteFailure};
use crate::ledger::{StatisticsChargeError, StatisticsReleaseError};

pub(super) async fn release(shared: &Arc<Shared>, task: &pb::Task) -> Result<Done, Failure> {
    let AdmittedStatistics {
        job,
        dataset,
        ledgers,
    } = match shared.gate.admit_statistics_at(task, now_ms()) {
        Ok(a) => a,
        Err(refusal) => return refused(shared, task, refusal).await,
    };
    let name = dataset.name().to_string();
    // The trail's errors may name the node's files (its pinned checkpoint): code only.
    if let Some(audit) = &shared.audit {
        audit
            .watch()
            .await
            .map_err(|e| Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, e)))?;
        crate::spend_anchor::reconcile(audit, &ledgers, &shared.site, &name)
            .await
            .map_err(|why| {
                Failure::Decline(SiteFailure::new(FailureCode::PrivacyLedgerUnusable, why))
            })?;
    }
    let released = {
        let (job, dataset, ledgers) = (job.clone(), dataset.clone(), ledgers.clone());
        let (job_id, name) = (task.job_id.clone(), name.clone());
        tokio::task::spawn_blocking(move || {
            let site_schema_sha256 = dataset.schema_sha256().to_string();
            dataset.with_records(|source| {
                ledgers.release_statistics(
                    (&job_id, &name),
                    &job,
                    (dataset.schema(), &site_schema_sha256),
                    source,
                    None,
                    now_ms(),
                )
            })
        })
        .await
        .map_err(|e| internal(format!("internal error in the statistics release: {e}")))?
    };
    let charged = match released {
        Ok(c) => c,
        Err(e) => {
            let refusal = match e {
                StatisticsReleaseError::SchemaDigest(m) => Refusal::SchemaDigest(m),
                StatisticsReleaseError::Charge(StatisticsChargeError::Refused(why)) => {
                    Refusal::PrivacyBudget(why)
                }
                StatisticsReleaseError::Charge(StatisticsChargeError::Ledger(why)) => {
                    Refusal::Ledger(why)
                }
                StatisticsReleaseError::Data(e) => {
                    let failure = SiteFailure::from(&e);
                    // As for a training read: withdrawn until a re-check passes.
                    if failure.code() == FailureCode::DataUnreadable {
                        shared.gate.tables().mark_unreadable(&name);
                    }
                    return Err(Failure::Decline(failure));
                }
            };
            return refused(shared, task, refusal).await;
        }
    };
    let charge = charged.charge();
    tracing::info!(
        dataset = %name,
        rows = charged.release().rows,
        epsilon = charge.epsilon,
        dataset_epsilon = charge.dataset_epsilon,
        "statistics released and charged"
    );
    // The spend is in the trail before the vector leaves the site.
    if let Some(audit) = &shared.audit {
        crate::spend_anchor::anchor_charge(
            audit,
            &ledgers,
            (&shared.site, &name, &task.job_id),
            &charge.charge,
            (
                job.privacy.delta,
                crate::ledger::accountant(job.privacy.accountant),
            ),
        )
        .await
        .map_err(|why| Failure::Decline(SiteFailure::new(FailureCode::AuditUnavailable, why)))?;
    }
    if task.deadline_unix_ms > 0 && now_ms() > task.deadline_unix_ms {
        return Ok(Done::Skipped(
            "the statistics were released after the task's deadline; they would be refused as \
             late (their ε is charged: the job is not released again)"
                .into(),
        ));
    }
    let release = charged.release();
    let layout_json = serde_json::to_string(&release.layout).map_err(|e| {
        internal(format!(
            "internal error encoding the statistics layout: {e}"
        ))
    })?;
    let mut client = shared
        .client()
        .ok_or_else(|| Failure::Coordinator("sending the statistics: not connected".into()))?;
    client
        .submit_statistics(pb::StatisticsRelease {
            task_id: task.task_id.clone(),
            layout_json,
            sums: release.vector.clone(),
        })
        .await
        .map_err(|s| Failure::Coordinator(describe_status("SubmitStatistics", &s)))?;
    Ok(Done::StatisticsReleased)
}
