//! A CHECK task (`tutela job check`): would this site run the job? The gate's own checks, each
//! run whatever the others found, so that the answer lists everything at once: the dataset and
//! its schema digest, every site-policy clause, the tokenizer and base checkpoint, the privacy
//! budget against the job's planned spend (for a consortium-statistics job: its table and
//! schema digest, the policy, its one release against the caps). No approval is needed (a
//! check comes before officers sign); no data is read, nothing is trained, spent, or recorded
//! as approved.

use tutela_protocol::job::{JobKind, StatisticsJobSpec};
use tutela_protocol::pb;

use super::{JobData, Refusal, TaskGate, sizing_refusal};
use crate::failure::SiteFailure;
use crate::jobspec::JobView;
use crate::ledger::StatisticsChargeError;

impl TaskGate {
    /// Everything the node would refuse `task`'s job for, at `now_ms`; empty: it would run it.
    /// Each site-policy clause broken is its own refusal.
    pub fn check_job_at(&self, task: &pb::Task, now_ms: i64) -> Vec<Refusal> {
        if let Ok(JobKind::Statistics) = JobKind::of_toml(&task.job_spec_toml) {
            return self.check_statistics_job_at(task, now_ms);
        }
        let job = match JobView::from_toml_str(&task.job_spec_toml) {
            Ok(job) => job,
            Err(e) => return vec![Refusal::JobSpec(e.to_string())],
        };
        let mut found = Vec::new();
        let data = self.job_data(&job).map_err(|r| found.push(r)).ok();
        if let Some(JobData::Table(dataset)) = &data
            && let Err(e) = dataset.check_job_schema(job.data.schema_sha256.as_deref())
        {
            found.push(e.into());
        }
        self.policy_refusals(task, now_ms, data.as_ref().map(JobData::name), &mut found);
        let tokenizer = match job.tokenizer_sha256() {
            Ok(Some(wanted)) => self
                .tokenizers
                .approve(wanted)
                .map_err(|e| found.push(e.into()))
                .ok(),
            Ok(None) => None,
            Err(e) => {
                found.push(Refusal::JobSpec(e.to_string()));
                None
            }
        };
        let base = match job.base_sha256() {
            Ok(Some(wanted)) => self
                .base_models
                .approve(wanted)
                .map_err(|e| found.push(e.into()))
                .ok(),
            Ok(None) => None,
            Err(e) => {
                found.push(Refusal::JobSpec(e.to_string()));
                None
            }
        };
        // The budget, as a TRAIN task's first round would weigh it: the job's whole planned
        // spend against the ledger's caps (read, never charged).
        if let (Some(ledgers), Some(data)) = (&self.ledgers, data) {
            let dataset = data.name().to_string();
            let budget = Self::round_for(&job, data, tokenizer.as_ref(), base.as_ref())
                .and_then(|round| round.trained_parameters(&job).map_err(sizing_refusal))
                .and_then(|dimension| {
                    ledgers
                        .open(&dataset)
                        .map_err(|e| super::budget_refusal(&dataset, e))?;
                    ledgers
                        .check(&task.job_id, 1, &dataset, &job, dimension)
                        .map_err(Refusal::PrivacyBudget)
                });
            // A round that cannot be built for a reason found above already is not repeated.
            if let Err(r) = budget
                && !found.contains(&r)
            {
                found.push(r);
            }
        }
        found
    }

    /// The site policy's refusals of `task`'s job (each clause its own), weighing what the
    /// ledger of `dataset` has spent; nothing without a site policy.
    fn policy_refusals(
        &self,
        task: &pb::Task,
        now_ms: i64,
        dataset: Option<&str>,
        found: &mut Vec<Refusal>,
    ) {
        let Some(approvals) = &self.approvals else {
            return;
        };
        let spent = match (&self.ledgers, dataset) {
            (Some(ledgers), Some(dataset)) => ledgers.spent_known(dataset).unwrap_or_else(|e| {
                found.push(super::budget_refusal(dataset, e));
                0.0
            }),
            _ => 0.0,
        };
        match approvals.check_policy(task, now_ms, spent) {
            Ok(()) => {}
            Err(crate::approvals::ApprovalRefusal::Breach(breaches)) => found.extend(
                breaches
                    .0
                    .into_iter()
                    .map(|b| Refusal::Policy(tutela_policy::Breaches(vec![b]).into())),
            ),
            Err(other) => found.push(other.into()),
        }
    }

    /// A consortium-statistics job's check (`kind = "statistics"`): its table and schema digest,
    /// the site policy, and its one release against the ledger's caps
    /// (`SiteLedgers::check_statistics`, from the schema's layout alone: no record is read).
    fn check_statistics_job_at(&self, task: &pb::Task, now_ms: i64) -> Vec<Refusal> {
        let job = match StatisticsJobSpec::from_toml_str(&task.job_spec_toml) {
            Ok(job) => job,
            Err(e) => return vec![Refusal::JobSpec(e.to_string())],
        };
        let mut found = Vec::new();
        let dataset = self
            .table_for(&job.data.schema)
            .map_err(|r| found.push(r))
            .ok();
        if let Some(d) = &dataset
            && let Err(e) = d.check_job_schema(job.data.schema_sha256.as_deref())
        {
            found.push(e.into());
        }
        self.policy_refusals(task, now_ms, dataset.as_ref().map(|d| d.name()), &mut found);
        if let (Some(ledgers), Some(d)) = (&self.ledgers, &dataset) {
            // Errors name the schema by its name, not the site's file (they may leave the site).
            let budget =
                crate::data::stats::layout_of(d.schema(), std::path::Path::new(&job.data.schema))
                    .map_err(|e| Refusal::JobSpec(format!("the schema's statistics layout: {e}")))
                    .and_then(|layout| {
                        job.plan(&layout).map_err(|e| {
                            Refusal::JobSpec(format!("the job's statistics plan: {e}"))
                        })
                    })
                    .and_then(|plan| {
                        ledgers
                            .check_statistics(&task.job_id, d.name(), &plan)
                            .map_err(|e| match e {
                                StatisticsChargeError::Refused(why) => Refusal::PrivacyBudget(why),
                                StatisticsChargeError::Ledger(why) => Refusal::Ledger(why),
                            })
                    });
            // A ledger already reported unreadable (by the policy's spent figure) is not
            // repeated.
            if let Err(r) = budget
                && !found.contains(&r)
            {
                found.push(r);
            }
        }
        found
    }

    /// [`check_job_at`](Self::check_job_at) now, as the coordinator is told: a code and what
    /// a decline would say, never a path or a value of the site's data.
    pub fn check_job(&self, task: &pb::Task) -> Vec<pb::CheckRefusal> {
        self.check_job_at(task, super::now_ms())
            .iter()
            .map(|r| {
                let failure = SiteFailure::from(r);
                let code = failure.code().as_str();
                let wire = failure.wire_reason();
                let reason = wire
                    .strip_prefix(code)
                    .unwrap_or(&wire)
                    .trim_start_matches(':')
                    .trim_start()
                    .to_string();
                pb::CheckRefusal {
                    code: code.to_string(),
                    reason,
                }
            })
            .collect()
    }
}
