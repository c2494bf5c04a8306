//! A round of a job, phase by phase (see [`Engine::run_round`]), with the waits, tasks and
//! records around it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::IndexedRandom;
use tutela_audit::payload;
use tutela_protocol::initial_model::InitialModel;
use tutela_protocol::pb;
use tutela_protocol::stream;
use tutela_protocol::tensor::Manifest;

use super::{Engine, EngineError, JobCtx, ms_to_time, now_ms};
use crate::aggregate::masked::PhasedRound;
use crate::aggregate::plan::{JobAggregation, RoundContext};
use crate::aggregate::{AggregateError, FinishedRound, RoundAggregation};
use crate::job::{JobId, JobSpec};
use crate::store::{AcceptedUpdate, RefusedUpdate, RoundRecord};
use crate::strategy::Strategy;
use crate::tasks::{Destination, Outcome, SiteMetrics, TaskGroup};
use tutela_protocol::secagg::Phase;

/// How long a round waits between checks while it has too few sites.
const SITE_WAIT_POLL: Duration = Duration::from_millis(250);

/// Phase 1's result: the tasks are out and the round's aggregation is open.
struct Dispatched {
    round: (u32, u32),
    started: i64,
    started_instant: Instant,
    deadline: Instant,
    participants: Vec<String>,
    ids: Vec<String>,
    group: Arc<TaskGroup>,
    aggregator: Arc<dyn RoundAggregation>,
    min: usize,
    manifest: Manifest,
    global: Vec<Vec<u8>>,
}

/// Phase 2's result: every task ended (or was cut off) and the aggregation finished.
struct Collected {
    round: (u32, u32),
    started: i64,
    participants: Vec<String>,
    metrics: Vec<SiteMetrics>,
    refused: Vec<(String, String)>,
    min: usize,
    finished: Result<FinishedRound, AggregateError>,
    manifest: Manifest,
    global: Vec<Vec<u8>>,
}

/// Phase 3's result: the new global model is stored; the round's record is ready to commit.
struct Released {
    round: (u32, u32),
    accepted: usize,
    record: RoundRecord,
    new_model: String,
}

impl Engine {
    /// Waits for sites: until every site the job lists is connected, or — once at least `need` are
    /// — until a grace period (a quarter of the round's window) has passed, or until `deadline`.
    /// The grace period keeps a round from starting with the first `need` sites when the others
    /// are seconds away (nodes reconnecting after a coordinator restart, say).
    pub(super) async fn wait_for_sites(
        &self,
        spec: &JobSpec,
        need: usize,
        deadline: Instant,
    ) -> Vec<String> {
        let mut changes = self.nodes.subscribe();
        let window = Duration::from_secs(spec.round_deadline_secs);
        let grace_until = Instant::now() + window / 4;
        let want_all = if spec.sites.is_empty() {
            need
        } else {
            spec.sites.len()
        };
        loop {
            let sites = self.nodes.eligible(&spec.data.schema, &spec.sites);
            let now = Instant::now();
            if sites.len() >= want_all
                || (sites.len() >= need && now >= grace_until)
                || now >= deadline
            {
                return sites;
            }
            let _ = tokio::time::timeout(SITE_WAIT_POLL, changes.changed()).await;
        }
    }

    /// Asks one site for the job's initial weights, retrying with another site on failure.
    pub(super) async fn initial_model(&self, job: &JobCtx<'_>) -> Result<String, EngineError> {
        let (job_id, spec) = (job.id, job.spec);
        let window = Duration::from_secs(spec.round_deadline_secs);
        // What the answer must be: the job's model as the registry describes it. A spec whose
        // model the registry cannot describe never gets an initial model.
        let expected =
            Arc::new(InitialModel::for_job(spec).map_err(|e| {
                EngineError::Failed(format!("no initial model: the job's model: {e}"))
            })?);
        let mut last_reason = String::new();
        for attempt in 1..=spec.max_round_retries + 1 {
            let deadline = Instant::now() + window;
            let sites = self.wait_for_sites(spec, 1, deadline).await;
            let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed ^ u64::from(attempt));
            let Some(site) = sites.choose(&mut rng).cloned() else {
                last_reason = format!(
                    "no site with data of schema {:?} connected within {}s",
                    spec.data.schema, spec.round_deadline_secs
                );
                continue;
            };
            let deadline_ms = now_ms() + window.as_millis() as i64;
            let task = job.header().task(
                &site,
                pb::TaskKind::Initialize,
                (0, attempt),
                "",
                "{}",
                deadline_ms,
            );
            let group = Arc::new(TaskGroup::default());
            self.tasks.register(
                &task.task_id,
                &task.job_id,
                &site,
                "",
                deadline,
                Destination::InitialModel {
                    model_dir: self.model_dir.clone(),
                    expected: expected.clone(),
                },
                group.clone(),
            );
            let ids = vec![task.task_id.clone()];
            self.nodes.send(&site, task);
            self.wait_for_outcomes(&ids, &group, deadline).await;
            for (_, site, outcome) in self.tasks.close(&ids) {
                let reason = match outcome {
                    Some(Outcome::Accepted {
                        model_id: Some(m), ..
                    }) => {
                        tracing::info!(job = %job_id, %site, model = %m, "initial model received");
                        // Who supplied the model every round starts from is on the record
                        // before any round does.
                        self.trail()
                            .note_payload_durably(
                                job_id.as_str(),
                                &payload::ModelInitialized {
                                    model_digest: m.clone(),
                                    site: site.clone(),
                                    attempt,
                                },
                            )
                            .await;
                        return Ok(m);
                    }
                    Some(Outcome::Refused { reason }) => reason,
                    Some(Outcome::Declined { reason }) => format!("declined: {reason}"),
                    _ => "sent no initial model by the deadline".to_string(),
                };
                last_reason = format!("site {site}: {reason}");
                self.note_refusals(job_id, (0, attempt), &[(site, reason)])
                    .await;
            }
        }
        Err(EngineError::Failed(format!(
            "no initial model: {last_reason}"
        )))
    }

    pub(super) async fn wait_for_outcomes(
        &self,
        ids: &[String],
        group: &TaskGroup,
        deadline: Instant,
    ) {
        loop {
            let notified = group.notify.notified();
            if self.tasks.all_finished(ids) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    /// One attempt at a round, phase by phase: [`Engine::dispatch`] (sample the sites, open the
    /// round's aggregation, send the tasks), [`Engine::collect`] (wait for the answers, close the
    /// tasks), [`Engine::release`] (finish the aggregation, run the release steps, apply the
    /// strategy, store the model) and [`Engine::record`] (the round and its audit event). Each
    /// phase hands the next a typed state; a protocol with round trips of its own (secure
    /// aggregation's key exchange and unmasking) adds states between them.
    ///
    /// `Ok(Ok(model))`: completed and recorded. `Ok(Err(reason))`: the attempt failed (too few
    /// sites or updates); the caller records it and retries.
    pub(super) async fn run_round(
        &self,
        job: &JobCtx<'_>,
        (round, attempt): (u32, u32),
        model_id: &str,
        strategy: &mut dyn Strategy,
        aggregation: &mut Option<JobAggregation>,
    ) -> Result<Result<String, String>, EngineError> {
        let dispatched = match self
            .dispatch(job, (round, attempt), model_id, strategy, aggregation)
            .await?
        {
            Ok(d) => d,
            Err(reason) => return Ok(Err(reason)),
        };
        self.key_exchange(job.spec, &dispatched).await;
        let collected = self.collect(job.id, dispatched).await;
        let Some(aggregation) = aggregation.as_mut() else {
            return Err(EngineError::Failed(format!(
                "round {round}: the job's aggregation was not set up"
            )));
        };
        let released = match self.release(job.id, collected, strategy, aggregation)? {
            Ok(r) => r,
            Err(reason) => return Ok(Err(reason)),
        };
        self.record(job.id, released).await.map(Ok)
    }

    /// Phase 1: waits for sites, samples the round's participants, opens the round's
    /// aggregation (the job's, set up on its first round, when the model's size is known) and
    /// sends each participant its task.
    async fn dispatch(
        &self,
        job: &JobCtx<'_>,
        (round, attempt): (u32, u32),
        model_id: &str,
        strategy: &mut dyn Strategy,
        aggregation: &mut Option<JobAggregation>,
    ) -> Result<Result<Dispatched, String>, EngineError> {
        let (job_id, spec) = (job.id, job.spec);
        let started = now_ms();
        let started_instant = Instant::now();
        let window = Duration::from_secs(spec.round_deadline_secs);
        let deadline = started_instant + window;
        let min = spec.min_sites as usize;
        let eligible = self.wait_for_sites(spec, min, deadline).await;
        if eligible.len() < min {
            return Ok(Err(format!(
                "only {} of the {} sites needed were connected with data of schema {:?}",
                eligible.len(),
                min,
                spec.data.schema
            )));
        }
        // Sample ceil(fraction × eligible) sites, at least min_sites, reproducibly.
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            spec.seed ^ (u64::from(round) << 32) ^ u64::from(attempt),
        );
        let k =
            ((spec.fraction * eligible.len() as f64).ceil() as usize).clamp(min, eligible.len());
        let mut participants: Vec<String> =
            eligible.choose_multiple(&mut rng, k).cloned().collect();
        participants.sort();

        let (manifest, global) = stream::load_model(&self.model_path(model_id))?;
        if aggregation.is_none() {
            let dimension = manifest
                .tensors()
                .iter()
                .map(|t| t.numel().unwrap_or(0) as usize)
                .sum();
            // A resumed job: the rounds already released count against central DP's budget.
            *aggregation = Some(
                JobAggregation::for_job(spec, dimension, round - 1, self.spools())
                    .map_err(EngineError::Failed)?,
            );
        }
        let Some(plan) = aggregation.as_ref() else {
            return Err(EngineError::Failed(
                "the job's aggregation is missing".into(),
            ));
        };
        let mut job_digest = [0u8; 32];
        hex::decode_to_slice(job.digest_hex, &mut job_digest).map_err(|e| {
            EngineError::Failed(format!(
                "round {round}: the job digest is not hex SHA-256: {e}"
            ))
        })?;
        let context = RoundContext {
            job_digest,
            round,
            attempt,
            participants: &participants,
            min_sites: spec.min_sites,
        };
        let aggregator = plan
            .open_round(&manifest, &context)
            .map_err(|e| EngineError::Failed(format!("round {round}: {e}")))?;
        let secure = aggregator.masked().is_some();
        let strategy_json = strategy.configure_round(round);
        let deadline_ms = started + window.as_millis() as i64;
        let group = Arc::new(TaskGroup::default());
        let mut ids = Vec::new();
        for site in &participants {
            let mut task = job.header().task(
                site,
                pb::TaskKind::Train,
                (round, attempt),
                model_id,
                &strategy_json,
                deadline_ms,
            );
            if secure {
                // The node rebuilds the round's configuration from these and the signed spec.
                task.secagg_participants = participants.clone();
                self.secagg.insert(&task.task_id, site, aggregator.clone());
            }
            self.tasks.register(
                &task.task_id,
                &task.job_id,
                site,
                model_id,
                deadline,
                Destination::Round {
                    aggregator: aggregator.clone(),
                },
                group.clone(),
            );
            ids.push(task.task_id.clone());
            if !self.nodes.send(site, task) {
                tracing::warn!(%site, round, "could not hand the task to the site's node; it may reconnect before the deadline");
            }
        }
        tracing::info!(job = %job_id, round, attempt, sites = ?participants, aggregation = aggregator.name(), "round started");
        Ok(Ok(Dispatched {
            round: (round, attempt),
            started,
            started_instant,
            deadline,
            participants,
            ids,
            group,
            aggregator,
            min,
            manifest,
            global,
        }))
    }

    /// Secure aggregation's phases before the uploads (advertise keys, share keys), each closed
    /// once every expected node answered or a quarter of the round's window passed; nothing for
    /// other aggregations. A failure is kept in the round's aggregation, whose `finish` reports it.
    async fn key_exchange(&self, spec: &JobSpec, d: &Dispatched) {
        let Some(phases) = d.aggregator.masked() else {
            return;
        };
        let window = Duration::from_secs(spec.round_deadline_secs) / 4;
        run_phases(phases, Some(Phase::MaskedInput), window, d.deadline).await;
    }

    /// Secure aggregation's phases after the uploads: the masked inputs' phase is closed (the
    /// survivors are those whose upload committed) and the unmasking runs to its end.
    async fn unmasking(&self, d: &Dispatched) {
        let Some(phases) = d.aggregator.masked() else {
            return;
        };
        let (round, attempt) = d.round;
        if phases.phase() == Some(Phase::MaskedInput)
            && let Err(e) = phases.close_phase()
        {
            tracing::warn!(round, attempt, error = %e, "secure aggregation failed");
        }
        // The window's quarter again, from now: the nodes answer at once.
        let window = d
            .deadline
            .saturating_duration_since(d.started_instant)
            .max(Duration::from_secs(4))
            / 4;
        run_phases(phases, None, window, Instant::now() + window).await;
        self.secagg.remove(&d.ids);
    }

    /// Phase 2: waits until every task has ended or the deadline passed, closes the tasks, waits
    /// for uploads cut off by the close to let go of the aggregation, and records the refusals.
    async fn collect(&self, job_id: &JobId, d: Dispatched) -> Collected {
        let (round, attempt) = d.round;
        self.wait_for_outcomes(&d.ids, &d.group, d.deadline).await;
        // Streams still in progress at the deadline are cut off by closing their tasks; wait for
        // their sinks to be dropped so nothing touches the aggregate after this point.
        let outcomes = self.tasks.close(&d.ids);
        // Uploads cut off by the close notice it at their next chunk and drop their sinks, which
        // undoes what they folded in; the aggregate is final once no sink holds it.
        // A secure round's task routes (`Engine::secagg`, one per task, removed after the
        // unmasking) hold it too: counting them as sinks cost every secure round this wait's 10 s.
        let routes = if d.aggregator.masked().is_some() {
            d.ids.len()
        } else {
            0
        };
        let mut waited = 0;
        while Arc::strong_count(&d.aggregator) > 1 + routes && waited < 500 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 1;
        }
        let mut metrics = Vec::new();
        let mut refused = Vec::new();
        for (_, site, outcome) in outcomes {
            match outcome {
                Some(Outcome::Accepted { metrics: m, .. }) => metrics.push(m),
                Some(Outcome::Refused { reason }) => refused.push((site, reason)),
                Some(Outcome::Declined { reason }) => {
                    refused.push((site, format!("declined: {reason}")))
                }
                // Only a statistics task is answered so; a round's tasks are update streams.
                Some(Outcome::Released { .. }) => {
                    refused.push((site, "sent statistics for a training task".to_string()))
                }
                None => {
                    self.metrics
                        .update_refused(crate::metrics::UpdateRefusal::Deadline);
                    refused.push((site, "no update by the round's deadline".to_string()))
                }
            }
        }
        // Recorded now, whatever becomes of the attempt: a refusal that makes the round fail
        // matters to a regulator as much as one the round survives.
        self.note_refusals(job_id, (round, attempt), &refused).await;
        self.unmasking(&d).await;
        let finishing = Instant::now();
        let finished = d.aggregator.finish();
        self.metrics.aggregation_finished(finishing.elapsed());
        Collected {
            round: d.round,
            started: d.started,
            participants: d.participants,
            metrics,
            refused,
            min: d.min,
            finished,
            manifest: d.manifest,
            global: d.global,
        }
    }

    /// Phase 3: the aggregation's result (or why the attempt failed), the release steps (central
    /// DP's noise), the strategy's new global model, stored with the strategy's state.
    fn release(
        &self,
        job_id: &JobId,
        c: Collected,
        strategy: &mut dyn Strategy,
        aggregation: &mut JobAggregation,
    ) -> Result<Result<Released, String>, EngineError> {
        let (round, _) = c.round;
        let finished = match c.finished {
            Ok(f) if f.result.accepted.len() >= c.min => f,
            Ok(f) => {
                return Ok(Err(format!(
                    "{} of the {} updates needed were accepted by the deadline ({})",
                    f.result.accepted.len(),
                    c.min,
                    describe_refusals(&c.refused)
                )));
            }
            // Every site said no at once (the collect phase ends as soon as all have answered):
            // their reasons, not a deadline that was never waited for.
            Err(AggregateError::NothingAccepted) => {
                return Ok(Err(match every_site_declined(&c.refused) {
                    Some(reasons) => format!("every site declined: {reasons}"),
                    None => format!(
                        "no update was accepted by the deadline ({})",
                        describe_refusals(&c.refused)
                    ),
                }));
            }
            // A robust rule short of the updates it needs: the attempt is retried like one short
            // of min_sites.
            Err(e @ AggregateError::TooFewForRule { .. }) => return Ok(Err(e.to_string())),
            // An upload that could not be taken back out, or one still holding the aggregate
            // after the wait: this attempt's aggregate cannot be trusted, so it is retried.
            Err(e) => return Ok(Err(format!("the round's aggregate is unusable: {e}"))),
        };
        let (result, report) = aggregation
            .release(finished)
            .map_err(|e| EngineError::Failed(format!("round {round}: {e}")))?;
        // The strategy turns the mean update into the next global model.
        let mut weights = decode_f32(&c.manifest, &c.global)?;
        strategy
            .apply(&mut weights, &result)
            .map_err(|e| EngineError::Strategy(e.to_string()))?;
        let bytes: Vec<Vec<u8>> = weights
            .iter()
            .map(|t| t.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let slices: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
        let (digest, _) = stream::store_model(&self.model_dir, &c.manifest, &slices)?;
        let new_model = hex::encode(digest);
        self.save_strategy_state(job_id, round, strategy)?;

        let accepted_sites: Vec<&str> = result.accepted.iter().map(|a| a.site.as_str()).collect();
        let mut record = RoundRecord {
            participants: c.participants,
            accepted: result
                .accepted
                .iter()
                .map(|a| AcceptedUpdate {
                    site: a.site.clone(),
                    digest: a.digest.clone(),
                    weight: a.weight,
                    norm: a.l2_norm,
                })
                .collect(),
            refused: c
                .refused
                .iter()
                .filter(|(s, _)| !accepted_sites.contains(&s.as_str()))
                .map(|(s, r)| RefusedUpdate {
                    site: s.clone(),
                    digest: None,
                    norm: None,
                    reason: r.clone(),
                })
                .collect(),
            site_metrics: c
                .metrics
                .iter()
                .map(|m| (m.site.clone(), serde_json::to_value(m).unwrap_or_default()))
                .collect(),
            global_model_digest: new_model.clone(),
            started_at: ms_to_time(c.started),
            completed_at: ms_to_time(now_ms()),
        };
        if let Some(dp) = &report.central_dp {
            tracing::info!(job = %job_id, round, epsilon = dp.job_epsilon, round_epsilon = dp.round_epsilon, clip = dp.clip, "central DP round released");
            record.site_metrics.insert(
                crate::central_dp::ROUND_RECORD_KEY.to_string(),
                serde_json::to_value(dp).unwrap_or_default(),
            );
        }
        if let Some(robust) = &report.robust {
            tracing::info!(job = %job_id, round, rule = %robust.rule, excluded = ?robust.excluded, most_trimmed = ?robust.most_trimmed(), "robust aggregation");
            record.site_metrics.insert(
                crate::aggregate::plan::ROUND_RECORD_KEY.to_string(),
                serde_json::to_value(robust).unwrap_or_default(),
            );
        }
        Ok(Ok(Released {
            round: c.round,
            accepted: result.accepted.len(),
            record,
            new_model,
        }))
    }

    /// Phase 4: the round, its updates and the new model in one transaction, then
    /// `round.completed` in the audit trail (waiting while it is down).
    async fn record(&self, job_id: &JobId, r: Released) -> Result<String, EngineError> {
        let (round, attempt) = r.round;
        // A leader on another machine goes on from these (before the round names them).
        self.replicate_model(&r.new_model).await?;
        self.replicate_strategy_state(job_id, round).await?;
        self.store
            .complete_round(job_id, round, attempt, &r.record)
            .await?;
        self.metrics.round_completed(job_id.as_str());
        tracing::info!(job = %job_id, round, accepted = r.accepted, model = %r.new_model, "round completed");
        self.trail()
            .note_payload_durably(
                job_id.as_str(),
                &round_completed_payload(round, attempt, &r.record),
            )
            .await;
        Ok(r.new_model)
    }

    /// Appends `round.completed` for every round the store has committed that the trail lacks (a
    /// coordinator stopped between a round's commit and its append), in order, each once; waits
    /// while the trail is down. Runs at resume, before the next round starts.
    pub(super) async fn record_committed_rounds(&self, job_id: &JobId) -> Result<(), EngineError> {
        let trail = self.trail();
        let recorded = loop {
            match trail.recorded_rounds(job_id.as_str()).await {
                Ok(r) => break r,
                Err(crate::audit_trail::AuditTrailError::Client(e))
                    if !crate::audit_trail::is_outage(&e) =>
                {
                    tracing::error!(job = %job_id, error = %e, "the coordinator may not read its own events back (the policy must allow it `audit, read_own`): a round committed before the stop may be missing from the audit trail");
                    return Ok(());
                }
                Err(e) => {
                    tracing::error!(job = %job_id, error = %e, "the audit trail cannot be read: the job waits before resuming");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let Some(recorded) = recorded else {
            return Ok(());
        };
        for c in self.store.rounds(job_id).await? {
            if recorded.contains(&c.round) {
                continue;
            }
            tracing::warn!(job = %job_id, round = c.round, "round committed but not in the audit trail: recording it before the job goes on");
            let round = c.round;
            trail
                .record_payload_once(
                    job_id.as_str(),
                    &round_completed_payload(c.round, c.attempt, &c.record),
                    true,
                    move |e| crate::audit_trail::round_of(e) == Some(round),
                )
                .await;
        }
        Ok(())
    }

    /// Records each task that brought nothing to the job as `update.refused` (subject: the job):
    /// a node's refusal to train (`declined: ` and the node's reason: an approval missing, a site
    /// policy clause, the privacy budget), an update the coordinator refused, or no answer by the
    /// deadline. `round` 0 is the initial-model task. Noted, not recorded: the trail's outage
    /// must not stop a round (a failed append is logged at ERROR with the event).
    pub(super) async fn note_refusals(
        &self,
        job_id: &JobId,
        (round, attempt): (u32, u32),
        refused: &[(String, String)],
    ) {
        if refused.is_empty() {
            return;
        }
        let trail = self.trail();
        for (site, reason) in refused {
            tracing::warn!(job = %job_id, round, attempt, %site, %reason, "task refused");
            trail
                .note_payload_durably(
                    job_id.as_str(),
                    &payload::UpdateRefused {
                        round,
                        attempt,
                        site: site.clone(),
                        reason: reason.clone(),
                    },
                )
                .await;
        }
    }

    pub(super) fn state_path(&self, job: &JobId, round: u32) -> PathBuf {
        self.state_dir
            .join(format!("{job}-round-{round}.safetensors"))
    }

    pub(super) fn save_strategy_state(
        &self,
        job: &JobId,
        round: u32,
        strategy: &dyn Strategy,
    ) -> Result<(), EngineError> {
        let state = strategy.state();
        if state.is_empty() {
            return Ok(());
        }
        let (specs, data): (Vec<_>, Vec<Vec<u8>>) = state.into_iter().unzip();
        let manifest = tutela_protocol::tensor::Manifest::new(specs, Default::default())
            .map_err(|e| EngineError::Strategy(e.to_string()))?;
        let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let (_, path) = stream::store_model(&self.state_dir, &manifest, &slices)?;
        std::fs::rename(&path, self.state_path(job, round))
            .map_err(|e| EngineError::Failed(format!("saving the strategy state: {e}")))?;
        Ok(())
    }

    pub(super) fn load_strategy_state(
        &self,
        job: &JobId,
        round: u32,
        strategy: &mut dyn Strategy,
    ) -> Result<(), EngineError> {
        let path = self.state_path(job, round);
        if !path.exists() {
            return Ok(());
        }
        let (manifest, data) = stream::load_model(&path)?;
        let tensors = manifest.tensors().iter().cloned().zip(data).collect();
        strategy
            .load_state(tensors)
            .map_err(|e| EngineError::Strategy(e.to_string()))
    }
}

/// Closes secure aggregation's phases one after another until the phase `stop` is reached (or,
/// with `None`, the protocol ends): each when every expected node answered, or after `window`,
/// never later than `deadline`. A failed close ends the protocol (the aggregation keeps why).
async fn run_phases(
    phases: &dyn PhasedRound,
    stop: Option<Phase>,
    window: Duration,
    deadline: Instant,
) {
    while let Some(phase) = phases.phase() {
        if Some(phase) == stop {
            return;
        }
        let until = (Instant::now() + window).min(deadline);
        loop {
            // Registered before the check, so an answer between the two is not missed.
            let changed = phases.changed();
            let now = Instant::now();
            if phases.pending() == 0 || now >= until {
                break;
            }
            let _ = tokio::time::timeout((until - now).min(SITE_WAIT_POLL), changed).await;
        }
        if let Err(e) = phases.close_phase() {
            tracing::warn!(%phase, error = %e, "secure aggregation failed");
            return;
        }
    }
}

fn describe_refusals(refused: &[(String, String)]) -> String {
    if refused.is_empty() {
        return "no site reported".to_string();
    }
    refused
        .iter()
        .map(|(s, r)| format!("{s}: {r}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `site: reason; ...` when every refusal of a round is a node's decline (`declined: ` and its
/// reason, as [`Engine::collect`] writes them); `None` when any site failed otherwise or none
/// answered.
fn every_site_declined(refused: &[(String, String)]) -> Option<String> {
    let reasons = refused
        .iter()
        .map(|(s, r)| r.strip_prefix("declined: ").map(|r| format!("{s}: {r}")))
        .collect::<Option<Vec<_>>>()?;
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// The global model's tensors as f32 values (Tutela's models are float32).
fn decode_f32(
    manifest: &tutela_protocol::tensor::Manifest,
    data: &[Vec<u8>],
) -> Result<Vec<Vec<f32>>, EngineError> {
    manifest
        .tensors()
        .iter()
        .zip(data)
        .map(|(t, d)| {
            if t.dtype != tutela_protocol::tensor::DType::F32 {
                return Err(EngineError::Failed(format!(
                    "global model tensor {:?} is {}, only F32 models are aggregated",
                    t.name, t.dtype
                )));
            }
            Ok(d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        })
        .collect()
}

/// The `round.completed` payload of a committed round, from its stored record alone, so that a
/// round committed before a crash is recorded at resume exactly as it would have been.
fn round_completed_payload(
    round: u32,
    attempt: u32,
    record: &RoundRecord,
) -> payload::RoundCompleted {
    let update_digests = record
        .accepted
        .iter()
        .map(|a| (a.site.clone(), a.digest.to_string()))
        .collect();
    let participants = record.accepted.iter().map(|a| a.site.clone()).collect();
    let metrics = record
        .site_metrics
        .iter()
        .filter(|(site, _)| !crate::aggregate::plan::is_report_key(site))
        .filter_map(|(site, m)| {
            let m: SiteMetrics = serde_json::from_value(m.clone()).ok()?;
            let v = payload::SiteRoundMetrics {
                epsilon: Some(m.dp_job_epsilon),
                round_epsilon: Some(m.dp_round_epsilon),
                delta: Some(m.dp_delta),
                dataset_commitment: Some(m.dataset_commitment),
                train_samples: Some(m.train_samples),
                eval_accuracy: Some(m.eval_accuracy),
            };
            Some((site.clone(), v))
        })
        .collect();
    // The robust rule's report, as the round record stored it (one source for the live round
    // and for a round recorded at resume).
    let aggregation = record
        .site_metrics
        .get(crate::aggregate::plan::ROUND_RECORD_KEY)
        .and_then(|v| serde_json::from_value::<crate::aggregate::RobustReport>(v.clone()).ok())
        .map(|r| payload::RobustAggregation {
            rule: r.rule,
            excluded: r.excluded,
            trimmed: r.trimmed,
        });
    payload::RoundCompleted {
        round,
        attempt,
        participants,
        update_digests,
        metrics,
        model_id: Some(record.global_model_digest.clone()),
        aggregation,
    }
}

#[cfg(test)]
mod tests {
    use super::every_site_declined;

    fn refused(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(s, r)| (s.to_string(), r.to_string()))
            .collect()
    }

    #[test]
    fn a_round_every_site_declined_names_each_site_and_reason() {
        let r = refused(&[
            ("a", "declined: data.missing: no dataset"),
            ("b", "declined: not approved for site b"),
        ]);
        assert_eq!(
            every_site_declined(&r).as_deref(),
            Some("a: data.missing: no dataset; b: not approved for site b")
        );
    }

    #[test]
    fn a_site_that_timed_out_or_was_refused_is_not_a_decline() {
        let timed_out = refused(&[
            ("a", "declined: not approved for site a"),
            ("b", "no update by the round's deadline"),
        ]);
        assert_eq!(every_site_declined(&timed_out), None);
        assert_eq!(every_site_declined(&[]), None);
    }
}
