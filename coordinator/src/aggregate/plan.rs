//! A job's aggregation, chosen in one place from its spec.
//!
//! [`JobAggregation::for_job`] reads `[aggregation]` and `[privacy]` once and decides, for all
//! the job's rounds: which [`RoundAggregation`] a round opens (the streaming weighted sum for
//! FedAvg, the buffered one for a robust rule), which filters every update passes (central DP's
//! [`ClipToNorm`]), and which [`ReleaseStep`]s act on the finished round before the strategy
//! sees it (central DP's noise). Nothing else in the coordinator names a concrete aggregation:
//! `[secure_aggregation]` chooses [`MaskedAggregation`] here, and the engine drives its extra
//! phases through [`RoundAggregation::masked`].

use std::path::PathBuf;
use std::sync::Arc;

use tutela_privacy::at_rest::KeyEncryptionKey;
use tutela_protocol::job::JobSpec;
use tutela_protocol::tensor::Manifest;

use tutela_protocol::secagg::SecureAggregationSpec;

use super::buffered::{BufferedAggregator, BufferedOptions};
use super::masked::{MaskedAggregation, MaskedOutput, ReleaseCheck, Signing};
use super::robust::{RobustReport, RobustRule};
use super::streaming::{AggregatorOptions, RoundAggregator, SpoolPool};
use super::{AggregateError, FinishedRound, RoundAggregation, RoundResult, UpdateFilter};
use crate::central_dp::{CentralDp, CentralDpRound, ClipToNorm};
use tutela_privacy::accountant::distributed::RecordLevelPlan;

/// The round record's key (in its `site_metrics`, beside the sites) for a robust rule's report.
/// Site names cannot contain parentheses, so it never collides with a site.
pub const ROUND_RECORD_KEY: &str = "(aggregation)";

/// Whether a key of a round record's `site_metrics` is a round-level report (central DP's, the
/// robust rule's) rather than a site.
pub fn is_report_key(key: &str) -> bool {
    key.starts_with('(')
}

/// What a round's aggregation and release steps report, for the round's record, the audit trail
/// and `tutela job status`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundReport {
    /// The robust rule's selection and trimming; `None` for the weighted sum.
    pub robust: Option<RobustReport>,
    /// Central DP's release: clip, noise, ε; `None` without central DP.
    pub central_dp: Option<CentralDpRound>,
}

/// A step between a finished aggregation and the strategy: central DP's noise (and, with secure
/// aggregation, the check that enough noise is in the sum).
pub trait ReleaseStep: Send {
    fn name(&self) -> &str;
    /// Acts on the round's result in place and adds its part to the report; an error fails the
    /// job (a release that cannot be made safely is not made).
    fn release(&mut self, result: &mut RoundResult, report: &mut RoundReport)
    -> Result<(), String>;
}

/// Where a round's aggregation keeps what it spools.
#[derive(Clone)]
pub struct Spools {
    /// The streaming sum's undo spools, kept between rounds.
    pub pool: Arc<SpoolPool>,
    /// The buffered aggregation's encrypted update spools.
    pub dir: PathBuf,
    /// The coordinator's key-encryption key for them.
    pub kek: Arc<dyn KeyEncryptionKey>,
}

/// How a job's rounds combine updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// FedAvg's streaming weighted sum.
    Streaming,
    /// Every update buffered, then combined by a robust rule.
    Buffered(RobustRule),
    /// Secure aggregation: only the masked sum is ever seen.
    Masked,
}

/// Who takes part in one round, for an aggregation that must know before the uploads (secure
/// aggregation: the participant list is the protocol's index space).
#[derive(Clone, Copy, Debug)]
pub struct RoundContext<'a> {
    /// The job spec's digest.
    pub job_digest: [u8; 32],
    pub round: u32,
    pub attempt: u32,
    /// Sorted site names.
    pub participants: &'a [String],
    /// The job's `min_sites`.
    pub min_sites: u32,
}

/// A job's aggregation across its rounds (the accountant of central DP lives here).
pub struct JobAggregation {
    method: Method,
    norm_bound: f64,
    central: Option<CentralDp>,
    secure: Option<SecureAggregationSpec>,
    /// `[privacy] mode = "distributed"`: the plan whose release check every masked round runs
    /// before it asks the sites to unmask.
    distributed: Option<Arc<RecordLevelPlan>>,
    spools: Spools,
}

impl std::fmt::Debug for JobAggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobAggregation")
            .field("method", &self.method)
            .field("norm_bound", &self.norm_bound)
            .field("central_dp", &self.central.is_some())
            .finish_non_exhaustive()
    }
}

impl JobAggregation {
    /// The job's aggregation for a model of `dimension` parameters; `completed_rounds` already
    /// released count against central DP's budget (a resumed job).
    pub fn for_job(
        spec: &JobSpec,
        dimension: usize,
        completed_rounds: u32,
        spools: Spools,
    ) -> Result<Self, String> {
        let method = match (
            RobustRule::from_spec(spec.aggregation.as_ref())?,
            &spec.secure_aggregation,
        ) {
            (Some(_), Some(_)) => {
                // The spec's validation refuses this at submission (a robust rule needs every
                // update, secure aggregation shows only the sum); a stored spec from before it
                // is refused here.
                return Err(
                    "aggregation.rule: a robust rule does not compose with [secure_aggregation]"
                        .into(),
                );
            }
            (Some(rule), None) => Method::Buffered(rule),
            (None, Some(_)) => Method::Masked,
            (None, None) => Method::Streaming,
        };
        let mut central = crate::central_dp::for_job(spec, dimension).map_err(|e| e.to_string())?;
        if let Some(dp) = central.as_mut() {
            dp.charge_completed_rounds(u64::from(completed_rounds));
        }
        if central.is_some() && method != Method::Streaming {
            // The spec's validation refuses this at submission; a stored spec from before it
            // is refused here rather than released with the wrong sensitivity.
            return Err(
                "aggregation.rule: a robust rule does not compose with privacy.mode = \"central\""
                    .into(),
            );
        }
        let distributed = tutela_protocol::job::distributed::plan(spec, dimension)
            .map_err(|e| e.to_string())?
            .map(Arc::new);
        if let Some(plan) = &distributed {
            tracing::info!(
                site_noise_grid_steps = plan.site_noise_grid,
                noise_multiplier = plan.dp_sgd.noise_multiplier,
                effective_noise_multiplier = plan.dp_sgd.effective_noise_multiplier,
                sample_rate = plan.dp_sgd.sample_rate,
                step_scale = plan.step_scale,
                min_survivors = plan.min_survivors,
                planned_epsilon = plan.dp_sgd.planned_epsilon,
                delta = plan.dp_sgd.delta,
                "distributed DP (record level): each site adds its share of the noise to one \
                 clipped DP-SGD step; a round is released only with at least the plan's \
                 survivors, and its unmasked sum is the round's step"
            );
        }
        Ok(JobAggregation {
            method,
            norm_bound: spec.update_norm_bound,
            central,
            secure: spec.secure_aggregation.clone(),
            distributed,
            spools,
        })
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// The aggregation of one round on the global model `global`.
    pub fn open_round(
        &self,
        global: &Manifest,
        round: &RoundContext<'_>,
    ) -> Result<Arc<dyn RoundAggregation>, AggregateError> {
        let mut filters: Vec<Arc<dyn UpdateFilter>> = Vec::new();
        if let Some(dp) = &self.central {
            filters.push(Arc::new(ClipToNorm { clip: dp.clip() }));
        }
        Ok(match self.method {
            Method::Streaming => {
                let mut options = AggregatorOptions::new(self.norm_bound);
                // Uploads spool what they fold (for an exact undo) on the coordinator's disk,
                // in files kept between rounds.
                options.spool_pool = Some(self.spools.pool.clone());
                if self.central.is_some() {
                    // DP-FedAvg: every update weighs 1, so one site moves the sum by at most C;
                    // and the finest fixed-point scale.
                    options.unit_weights = true;
                    options.max_weight = 1.0;
                }
                options.filters = filters;
                RoundAggregator::with_options(global, options)?
            }
            Method::Buffered(rule) => BufferedAggregator::new(
                global,
                BufferedOptions {
                    rule,
                    norm_bound: self.norm_bound,
                    spool_dir: self.spools.dir.clone(),
                    kek: self.spools.kek.clone(),
                    filters,
                },
            )?,
            Method::Masked => {
                let Some(secure) = &self.secure else {
                    return Err(AggregateError::SecureAggregation(
                        "the job has no [secure_aggregation]".into(),
                    ));
                };
                let vector_len = super::f32_tensor_lens(global)?
                    .iter()
                    .map(|&n| n as u64)
                    .sum();
                let config = tutela_protocol::secagg::wire::round_config(
                    secure,
                    round.job_digest,
                    (round.round, round.attempt),
                    round.participants.len(),
                    round.min_sites,
                    vector_len,
                );
                config
                    .validate()
                    .map_err(|e| AggregateError::SecureAggregation(e.to_string()))?;
                // The wired protocol always signs: every node holds its certificate's key, and
                // without signatures a coordinator could substitute keys or split the survivor
                // list (docs/architecture.md, "Threat model").
                let release_check = self.distributed.clone().map(|plan| -> ReleaseCheck {
                    Arc::new(move |survivors| {
                        plan.check_release(survivors)
                            .map(|_| ())
                            .map_err(|e| format!("distributed DP refuses the release: {e}"))
                    })
                });
                // Record-level distributed DP: the sum is the step (sites divided by B).
                let output = if self.distributed.is_some() {
                    MaskedOutput::Sum
                } else {
                    MaskedOutput::Mean
                };
                MaskedAggregation::with_output(
                    global,
                    round.participants.to_vec(),
                    config,
                    secure.scale_bits,
                    (Signing::Required, release_check),
                    output,
                )?
            }
        })
    }

    /// Runs the release steps on a finished round: the result the strategy gets, and the
    /// round's report.
    pub fn release(
        &mut self,
        finished: FinishedRound,
    ) -> Result<(RoundResult, RoundReport), String> {
        let FinishedRound { mut result, robust } = finished;
        let mut report = RoundReport {
            robust,
            central_dp: None,
        };
        let steps = self.central.iter_mut().map(|c| c as &mut dyn ReleaseStep);
        for step in steps {
            step.release(&mut result, &mut report)
                .map_err(|e| format!("{}: {e}", step.name()))?;
        }
        Ok((result, report))
    }
}
