//! The runner of a consortium-statistics job (`kind = "statistics"`): one STATISTICS task to
//! each participating site that is connected with the schema, their releases and declines
//! collected ([`StatisticsCollection`]) until every site answered or `deadline_secs` passed,
//! then the checked finishing step (`crate::statistics::finish_plain`), the file stored under
//! its digest ([`StatisticsFiles`]), the `statistics.published` record kept in the store (the
//! outbox), appended to the trail durably, and only then the job marked completed.
//!
//! A coordinator that stops while the tasks are out loses the releases that arrived (they are
//! held in memory only): at resume such a job fails, saying why, rather than asking the sites
//! again — the sites that released are charged and refuse a second release of the same job.
//! One that stops after storing the result records it (once) at resume and completes the job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tutela_audit::payload;
use tutela_protocol::pb;

use super::{Engine, EngineError, TaskHeader, now_ms};
use crate::job::{JobId, JobState, StatisticsJobSpec};
use crate::statistics::{StatisticsCollection, StatisticsFiles};
use crate::store::JobRecord;
use crate::tasks::{Destination, Outcome, TaskGroup};

/// Where the coordinator keeps statistics files, under its model directory.
const STATISTICS_DIR: &str = "statistics";

/// Why a statistics job still running when the coordinator stopped fails at resume.
pub const RESTARTED_STATISTICS_REASON: &str = "the coordinator restarted while this statistics \
     job was collecting the sites' releases; the releases that had arrived were held in memory \
     and are lost, and each site that released was charged for this job and refuses to release \
     it again: submit a new statistics job";

impl Engine {
    /// The coordinator's statistics files (content-addressed by SHA-256).
    pub fn statistics_files(&self) -> StatisticsFiles {
        StatisticsFiles::new(self.model_dir.join(STATISTICS_DIR))
    }

    /// Runs `job` (a statistics job, `spec`) from its start to its result or failure.
    pub(super) async fn run_statistics(
        self: &Arc<Self>,
        job: &JobRecord,
        spec: &StatisticsJobSpec,
    ) -> Result<(), EngineError> {
        if let Some(record) = self.store.statistics_result(&job.id).await? {
            return self.publish_statistics(&job.id, &record).await;
        }
        let digest_hex = job.spec_digest.to_hex();
        let approvals = crate::approvals::SiteApprovals::new(&match self.standing(job).await? {
            Some(s) => s.counting,
            None => Vec::new(),
        });
        let submitted_by = self.store.submitter(&job.id).await?.unwrap_or_default();
        let header = TaskHeader {
            id: &job.id,
            spec_toml: &job.spec_toml,
            digest_hex: &digest_hex,
            approvals: &approvals,
            submitted_by: &submitted_by,
        };
        let window = Duration::from_secs(spec.deadline_secs);
        let deadline = Instant::now() + window;
        let deadline_ms = now_ms() + window.as_millis() as i64;
        let sites = self.statistics_sites(spec, deadline).await;
        if sites.len() < spec.min_sites as usize {
            let absent: Vec<&String> = spec.sites.iter().filter(|s| !sites.contains(s)).collect();
            return Err(EngineError::Failed(format!(
                "only {} site(s) with data of schema {:?} connected ({}); the job needs at \
                 least {}{}",
                sites.len(),
                spec.data.schema,
                sites.join(", "),
                spec.min_sites,
                if absent.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (not connected with the schema: {})",
                        absent
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            )));
        }
        let group = Arc::new(TaskGroup::default());
        let mut ids = Vec::new();
        for site in &sites {
            let task = header.task(
                site,
                pb::TaskKind::Statistics,
                (0, 1),
                "",
                "{}",
                deadline_ms,
            );
            self.tasks.register(
                &task.task_id,
                &task.job_id,
                site,
                "",
                deadline,
                Destination::Statistics,
                group.clone(),
            );
            ids.push(task.task_id.clone());
            if !self.nodes.send(site, task) {
                tracing::warn!(job = %job.id, %site, "could not hand the statistics task to the site's node; it may reconnect before the deadline");
            }
        }
        tracing::info!(job = %job.id, ?sites, "statistics job: tasks sent");
        self.wait_for_outcomes(&ids, &group, deadline).await;
        let mut collection = StatisticsCollection::new(sites.iter().cloned());
        let mut declined = Vec::new();
        for (_, site, outcome) in self.tasks.close(&ids) {
            let answered = match outcome {
                Some(Outcome::Released { release }) => collection.accept(release),
                Some(Outcome::Declined { reason }) | Some(Outcome::Refused { reason }) => {
                    declined.push((site.clone(), format!("declined: {reason}")));
                    collection.decline(&site, &reason)
                }
                Some(Outcome::Accepted { .. }) => {
                    collection.decline(&site, "sent a model update for a statistics task")
                }
                None => Ok(()),
            };
            if let Err(e) = answered {
                tracing::warn!(job = %job.id, %site, error = %e, "statistics answer refused");
            }
        }
        // Each decline is on the record, whether or not the job survives it.
        self.note_refusals(&job.id, (0, 1), &declined).await;
        let finished = collection
            .close(spec)
            .map_err(|e| EngineError::Failed(format!("statistics: {e}")))?;
        self.statistics_files()
            .store(&finished.published)
            .map_err(|e| EngineError::Failed(format!("statistics: {e}")))?;
        self.store
            .record_statistics_result(&job.id, &finished.record)
            .await?;
        self.publish_statistics(&job.id, &finished.record).await
    }

    /// The sites to ask: the connected ones with data of the schema among the spec's (any, when
    /// it lists none), waiting up to a quarter of the window for all of them (or `min_sites`,
    /// when the spec lists none), as a round waits for its sites.
    async fn statistics_sites(&self, spec: &StatisticsJobSpec, deadline: Instant) -> Vec<String> {
        let mut changes = self.nodes.subscribe();
        let grace_until = Instant::now() + Duration::from_secs(spec.deadline_secs) / 4;
        let want_all = if spec.sites.is_empty() {
            spec.min_sites as usize
        } else {
            spec.sites.len()
        };
        loop {
            let sites = self.nodes.eligible(&spec.data.schema, &spec.sites);
            let now = Instant::now();
            // Past the grace, whatever is connected is asked (too few: the job fails saying so).
            if sites.len() >= want_all || now >= grace_until.min(deadline) {
                return sites;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
    }

    /// `statistics.published` appended (once: looked for first, so a resume after the append
    /// does not repeat it), then the job marked completed.
    async fn publish_statistics(
        &self,
        job: &JobId,
        record: &payload::StatisticsPublished,
    ) -> Result<(), EngineError> {
        let sha = record.result_sha256.clone();
        self.trail()
            .record_payload_once(job.as_str(), record, true, move |e| {
                e.payload.get("result_sha256").and_then(|v| v.as_str()) == Some(sha.as_str())
            })
            .await;
        self.store
            .set_job_state(job, JobState::Running, JobState::Completed, None)
            .await?;
        tracing::info!(job = %job, result = %record.result_sha256, sites = ?record.sites, "statistics published");
        Ok(())
    }

    /// A statistics job the store says is running, at the coordinator's start: completed from
    /// its stored result, or failed ([`RESTARTED_STATISTICS_REASON`]) when it has none.
    pub(super) async fn resume_statistics(self: &Arc<Self>, job: JobId) {
        self.audit_started_once(&job, true).await;
        match self.store.statistics_result(&job).await {
            Ok(Some(_)) => self.spawn(job),
            Ok(None) => {
                self.fail_running(&job, RESTARTED_STATISTICS_REASON).await;
                self.changed(&job);
            }
            Err(e) => {
                tracing::error!(job = %job, error = %e, "cannot read the statistics job's result at resume")
            }
        }
    }
}
