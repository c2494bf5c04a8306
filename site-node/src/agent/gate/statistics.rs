//! A STATISTICS task (a consortium-statistics job, `kind = "statistics"`): the gate's half of
//! the site's release, before any record is read — the deadline, the job spec, the ready table
//! of its schema and that table's schema digest, the signed approvals by this site's officers and
//! every site-policy clause (`SiteApprovals::check`, kind-aware). The budget and the release
//! itself are `SiteLedgers::release_statistics`'s, in the worker (`agent::statistics`).

use std::sync::Arc;

use tutela_protocol::job::StatisticsJobSpec;
use tutela_protocol::pb;

use super::{Refusal, TaskGate, budget_refusal};
use crate::dataset::SiteDataset;
use crate::ledger::SiteLedgers;

/// A STATISTICS task the gate admitted: its spec, the table it reads and the ledgers that
/// charge its release.
#[derive(Debug, Clone)]
pub struct AdmittedStatistics {
    pub job: StatisticsJobSpec,
    pub dataset: Arc<SiteDataset>,
    pub ledgers: Arc<SiteLedgers>,
}

impl TaskGate {
    /// Whether the node releases `task`'s statistics at `now_ms`, as far as can be told without
    /// reading a record (see the module).
    pub fn admit_statistics_at(
        &self,
        task: &pb::Task,
        now_ms: i64,
    ) -> Result<AdmittedStatistics, Refusal> {
        if task.deadline_unix_ms > 0 && now_ms > task.deadline_unix_ms {
            return Err(Refusal::DeadlinePassed {
                late_ms: now_ms - task.deadline_unix_ms,
            });
        }
        let job = StatisticsJobSpec::from_toml_str(&task.job_spec_toml)
            .map_err(|e| Refusal::JobSpec(e.to_string()))?;
        let dataset = self.table_for(&job.data.schema)?;
        // A release is charged before it leaves: a site without a ledger cannot release one.
        let ledgers = self.ledgers.clone().ok_or_else(|| {
            Refusal::PrivacyBudget(
                "privacy budget: this site keeps no privacy ledger, so it cannot charge a \
                 statistics release"
                    .into(),
            )
        })?;
        ledgers
            .known_key(dataset.name())
            .map_err(|e| budget_refusal(dataset.name(), e))?;
        dataset.check_job_schema(job.data.schema_sha256.as_deref())?;
        match &self.approvals {
            Some(approvals) => {
                let spent = ledgers
                    .spent_known(dataset.name())
                    .map_err(|e| budget_refusal(dataset.name(), e))?;
                approvals.check(task, now_ms, spent)?;
            }
            None => tracing::warn!(
                job = %task.job_id,
                task = %task.task_id,
                "insecure_no_approvals = true: releasing statistics WITHOUT any approval check"
            ),
        }
        Ok(AdmittedStatistics {
            job,
            dataset,
            ledgers,
        })
    }
}
