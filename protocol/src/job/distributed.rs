//! `[privacy] mode = "distributed"`: record-level distributed DP-SGD over secure aggregation.
//! The job's plan is computed the same way by the coordinator (its release check) and by every
//! site (its noise share, its own release check, its ledger's charge) from the signed spec and
//! the model's size alone ([`plan`]).
//!
//! The privacy unit is the one local DP-SGD uses: a row of the site's table. Each round every
//! site takes ONE DP-SGD step's worth of work: it includes each training row with probability
//! q = `privacy.sample_rate` (Poisson; 1 when absent), clips each row's gradient to
//! `privacy.max_grad_norm` C, sums, and multiplies by s = `training.learning_rate /
//! training.batch_size`, where `batch_size` is the expected number of rows sampled across all
//! sites in a round; its update is `−s·Σ clip(∇ℓ_i)`, rounded onto the grid 2^-scale_bits with
//! its noise share N_ℤ(0, σ_s²). The coordinator applies the survivors' unmasked **sum** (not
//! their mean) as the round's step: exactly one central DP-SGD step over every site's rows,
//! `−lr/B · (Σ clipped gradients + N(0, (σ·C)²))` with m survivors. The accountant
//! (`tutela_privacy::accountant::distributed::RecordLevelPlan`) treats each round as a
//! Poisson-subsampled Gaussian of multiplier z(k) ≈ σ·√(k/m) at k survivors, charged to each
//! site's ledger at k = m before its masked input leaves.
//!
//! The analysis covers one step per round (several local steps would release a function of
//! steps that each carry only a share of the noise), on plain SGD (the sites' steps must add up
//! to the central one): `training.local_epochs` must be 1 and `training.optimizer` "sgd" without
//! momentum or weight decay; each is refused otherwise, with the reason.
//!
//! Every attempt spends: a round that is not released (too few survivors) and is retried costs
//! each site that sent its masked input one more step. `privacy.retry_reserve` R makes the plan
//! cover `rounds + R` steps (the noise calibrated for them, the sites' caps checked against
//! them), so that up to R retried attempts fit within the job's target.
//!
//! Site-level distributed DP (each site's whole update as the unit), which this replaced, is
//! gone: at five sites its noise swamped the sum (docs/architecture.md, "Distributed DP").

use tutela_privacy::accountant::distributed::{RecordLevelInputs, RecordLevelPlan};

use super::{JobSpec, Optimizer, PrivacyMode, SpecError};

fn is_distributed(job: &JobSpec) -> bool {
    job.privacy
        .as_ref()
        .is_some_and(|p| p.mode == PrivacyMode::Distributed)
}

/// Refuses `mode = "distributed"` without `[secure_aggregation]` (the sites' noise shares add up
/// to the job's noise only in a sum nobody sees unmasked), or with training the analysis does
/// not cover.
pub(super) fn validate(job: &JobSpec) -> Result<(), SpecError> {
    if !is_distributed(job) {
        return Ok(());
    }
    if job.secure_aggregation.is_none() {
        return Err(SpecError::invalid(
            "privacy.mode",
            "= \"distributed\" requires [secure_aggregation]: each site adds only its share of \
             the noise, which protects its rows only inside a masked sum",
        ));
    }
    let t = &job.training;
    if t.local_epochs != 1 {
        return Err(SpecError::invalid(
            "training.local_epochs",
            format!(
                "must be 1 with privacy.mode = \"distributed\" (got {}): each round is one \
                 Poisson-sampled DP-SGD step whose noise is the sum of the sites' shares; more \
                 local steps would release steps that each carry only a share of the noise",
                t.local_epochs
            ),
        ));
    }
    if t.optimizer != Optimizer::Sgd || t.momentum != 0.0 || t.weight_decay != 0.0 {
        return Err(SpecError::invalid(
            "training.optimizer",
            "must be \"sgd\" without momentum or weight_decay with privacy.mode = \
             \"distributed\": the sites' steps must add up to one central DP-SGD step (choose a \
             server-side [strategy] for momentum or adaptivity)",
        ));
    }
    Ok(())
}

/// The job's distributed-DP plan for a model of `dimension` parameters; `None` when the job's
/// privacy mode is not `distributed`. The error names what cannot be planned.
pub fn plan(job: &JobSpec, dimension: usize) -> Result<Option<RecordLevelPlan>, SpecError> {
    let Some(p) = job
        .privacy
        .as_ref()
        .filter(|p| p.mode == PrivacyMode::Distributed)
    else {
        return Ok(None);
    };
    validate(job)?;
    let Some(secure) = &job.secure_aggregation else {
        return Ok(None);
    };
    plan_parts(
        p,
        secure,
        (job.training.learning_rate, job.training.batch_size),
        (job.min_sites, job.rounds),
        dimension,
    )
    .map(Some)
}

/// [`plan`] from the parts of the spec it reads (what a site node's lenient view of the spec
/// holds): `[privacy]`, `[secure_aggregation]`, `(training.learning_rate,
/// training.batch_size)`, `(min_sites, rounds)`, and the model's size. The spec's other checks
/// ([`validate`]) are the caller's.
pub fn plan_parts(
    p: &super::PrivacySpec,
    secure: &crate::secagg::SecureAggregationSpec,
    (learning_rate, batch_size): (f64, u32),
    (min_sites, rounds): (u32, u32),
    dimension: usize,
) -> Result<RecordLevelPlan, SpecError> {
    // The plan is a pure function of these parts, asked for several times a round (the gate,
    // the round's check, the masked upload, the coordinator's aggregation) and each time
    // calibrating two noise multipliers: computed once per process. Debug formatting of the
    // parts is exact (f64 prints its shortest round-trip form).
    static PLANS: std::sync::Mutex<Vec<(String, RecordLevelPlan)>> =
        std::sync::Mutex::new(Vec::new());
    let key =
        format!("{p:?}|{secure:?}|{learning_rate:?}|{batch_size}|{min_sites}|{rounds}|{dimension}");
    let cached = |plans: &Vec<(String, RecordLevelPlan)>| {
        plans.iter().find(|(k, _)| *k == key).map(|(_, plan)| *plan)
    };
    if let Some(plan) = cached(
        &PLANS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    ) {
        return Ok(plan);
    }
    let plan = compute_plan(
        p,
        secure,
        (learning_rate, batch_size),
        (min_sites, rounds),
        dimension,
    )?;
    let mut plans = PLANS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if plans.len() >= 64 {
        plans.remove(0);
    }
    plans.push((key, plan));
    Ok(plan)
}

fn compute_plan(
    p: &super::PrivacySpec,
    secure: &crate::secagg::SecureAggregationSpec,
    (learning_rate, batch_size): (f64, u32),
    (min_sites, rounds): (u32, u32),
    dimension: usize,
) -> Result<RecordLevelPlan, SpecError> {
    if p.mode != PrivacyMode::Distributed {
        return Err(SpecError::invalid("privacy.mode", "is not \"distributed\""));
    }
    let clip = p.max_grad_norm.ok_or_else(|| {
        SpecError::invalid(
            "privacy.max_grad_norm",
            "is required with mode = \"distributed\"",
        )
    })?;
    // Every attempt of a round spends (its masked input left the site, released or not): the
    // plan covers the job's rounds and the retried attempts its spec reserves ε for.
    let rounds = u64::from(rounds) + u64::from(p.retry_reserve.unwrap_or(0));
    let accountant = p.accountant.accountant();
    // The round's metrics leave each site too: released under DP as with local DP-SGD, and
    // the steps calibrated beside them.
    let metrics = p
        .metrics_release(rounds)
        .and_then(|m| m.mechanism(rounds))
        .map_err(|e| SpecError::invalid("privacy", format!("the metrics release: {e}")))?;
    let granularity = 2f64.powi(-(secure.scale_bits as i32));
    let inputs = RecordLevelInputs {
        clip,
        step_scale: learning_rate / f64::from(batch_size.max(1)),
        granularity,
        dimension,
        min_survivors: min_sites as usize,
        sample_rate: p.sample_rate.unwrap_or(1.0),
        rounds,
        delta: p.delta,
        accountant,
        target_epsilon: p.target_epsilon,
        noise_multiplier: p.noise_multiplier,
        metrics: Some(metrics),
    };
    let plan = RecordLevelPlan::new(&inputs).map_err(|e| match e {
        // Under half a grid step: the grid is too coarse for the share.
        tutela_privacy::accountant::AccountantError::SiteNoise(steps) => SpecError::invalid(
            "secure_aggregation.scale_bits",
            format!(
                "with mode = \"distributed\" each site's noise must be 1 to 65536 grid steps of \
                 2^-{}, but is {steps:.3}: raise scale_bits",
                secure.scale_bits
            ),
        ),
        e => SpecError::invalid(
            "privacy",
            format!("mode = \"distributed\" cannot be planned: {e}"),
        ),
    })?;
    // Rounding adds up to √d grid steps to one row's s·C: on too coarse a grid that term, not
    // the row, sets the noise (the job would pay for noise that protects nothing more).
    let row_in_grid = inputs.clip * inputs.step_scale / granularity;
    if plan.sensitivity_grid > 1.1 * row_in_grid {
        return Err(SpecError::invalid(
            "secure_aggregation.scale_bits",
            format!(
                "with mode = \"distributed\" one row moves a site's update by {row_in_grid:.1} \
                 grid steps of 2^-{} (max_grad_norm x learning_rate / batch_size), and rounding \
                 {dimension} coordinates adds up to {:.1} more: raise scale_bits until the \
                 rounding adds at most 10 %",
                secure.scale_bits,
                plan.sensitivity_grid - row_in_grid
            ),
        ));
    }
    // The sites' sampler draws 1 to 2^16 grid steps (`tutela_privacy::noise::MAX_GRID_SCALE`).
    let in_grid = plan.site_noise_grid;
    if !(1.0..=tutela_privacy::noise::MAX_GRID_SCALE).contains(&in_grid) {
        return Err(SpecError::invalid(
            "secure_aggregation.scale_bits",
            format!(
                "with mode = \"distributed\" each site's noise (σ = {:.3e} on the update) must \
                 be 1 to 65536 grid steps of 2^-{}, but is {in_grid:.1}: choose scale_bits so \
                 that σ · 2^scale_bits lies in that range",
                plan.site_noise(),
                secure.scale_bits
            ),
        ));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(training: &str, extra: &str) -> Result<JobSpec, SpecError> {
        JobSpec::from_toml_str(&format!(
            r#"
name = "dist"
rounds = 20
min_sites = 4
round_deadline_secs = 60
update_norm_bound = 1.0
sites = ["a", "b", "c", "d", "e"]

[model]
name = "mlp"

[data]
schema = "breast_cancer"

[training]
{training}

{extra}
"#
        ))
    }

    const SGD: &str =
        "optimizer = \"sgd\"\nlearning_rate = 1.0\nlocal_epochs = 1\nbatch_size = 180\n";
    const PRIVACY: &str = "[privacy]\nmode = \"distributed\"\ntarget_epsilon = 1.0\nmax_grad_norm = 1.0\nsample_rate = 0.5\n";
    const SECURE: &str = "[secure_aggregation]\nscale_bits = 16\n";

    #[test]
    fn distributed_mode_needs_secure_aggregation_a_clip_and_one_sgd_step_and_is_in_the_digest() {
        let e = job(SGD, PRIVACY).unwrap_err();
        assert_eq!(e.key(), Some("privacy.mode"), "{e}");
        assert!(e.to_string().contains("[secure_aggregation]"), "{e}");

        let distributed = job(SGD, &format!("{PRIVACY}{SECURE}")).unwrap();
        assert!(distributed.canonical_json().contains("\"distributed\""));
        assert!(distributed.canonical_json().contains("\"sample_rate\""));
        let other_q = job(SGD, &format!("{}{SECURE}", PRIVACY.replace("0.5", "0.25"))).unwrap();
        assert_ne!(distributed.digest(), other_q.digest());

        let no_clip = PRIVACY.replace("max_grad_norm = 1.0\n", "");
        let e = job(SGD, &format!("{no_clip}{SECURE}")).unwrap_err();
        assert_eq!(e.key(), Some("privacy.max_grad_norm"), "{e}");
        let e = job(
            SGD,
            &format!("{}{SECURE}", PRIVACY.replace("target_epsilon = 1.0\n", "")),
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("privacy.target_epsilon"), "{e}");
        let e = job(SGD, &format!("{}{SECURE}", PRIVACY.replace("0.5", "1.5"))).unwrap_err();
        assert_eq!(e.key(), Some("privacy.sample_rate"), "{e}");

        // Several local steps: refused with the reason.
        let e = job(
            &SGD.replace("local_epochs = 1", "local_epochs = 3"),
            &format!("{PRIVACY}{SECURE}"),
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("training.local_epochs"), "{e}");
        assert!(e.to_string().contains("share of the noise"), "{e}");
        let e = job(
            &SGD.replace("\"sgd\"", "\"adam\""),
            &format!("{PRIVACY}{SECURE}"),
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("training.optimizer"), "{e}");
        // sample_rate belongs to the distributed mode only.
        let e = job(
            SGD,
            "[privacy]\nmode = \"local\"\ntarget_epsilon = 1.0\nmax_grad_norm = 1.0\nsample_rate = 0.5\n",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("privacy.sample_rate"), "{e}");
    }

    /// `retry_reserve`: in the digest, distributed mode only, bounded; the plan covers the
    /// reserved attempts as steps (more noise per step at the same target).
    #[test]
    fn the_retry_reserve_is_planned_as_steps_and_belongs_to_the_distributed_mode() {
        let plain = job(SGD, &format!("{PRIVACY}{SECURE}")).unwrap();
        let reserved = job(SGD, &format!("{PRIVACY}retry_reserve = 4\n{SECURE}")).unwrap();
        assert!(reserved.canonical_json().contains("\"retry_reserve\":4"));
        assert!(!plain.canonical_json().contains("retry_reserve"));
        assert_ne!(plain.digest(), reserved.digest());
        let (p0, p4) = (
            plan(&plain, 62).unwrap().unwrap(),
            plan(&reserved, 62).unwrap().unwrap(),
        );
        assert_eq!((p0.dp_sgd.total_steps, p4.dp_sgd.total_steps), (20, 24));
        assert!(p4.dp_sgd.noise_multiplier > p0.dp_sgd.noise_multiplier);
        assert!(p4.dp_sgd.planned_epsilon <= 1.0, "{p4:?}");
        let metrics_steps = |p: &RecordLevelPlan| p.dp_sgd.metrics.map(|m| m.steps());
        assert!(
            metrics_steps(&p4) > metrics_steps(&p0),
            "the reserved attempts' metrics too"
        );

        let e = job(
            SGD,
            "[privacy]\nmode = \"local\"\ntarget_epsilon = 1.0\nmax_grad_norm = 1.0\nretry_reserve = 1\n",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("privacy.retry_reserve"), "{e}");
        let e = job(SGD, &format!("{PRIVACY}retry_reserve = 1001\n{SECURE}")).unwrap_err();
        assert_eq!(e.key(), Some("privacy.retry_reserve"), "{e}");
    }

    #[test]
    fn the_shipped_example_plans() {
        const SHIPPED: &str = include_str!("../../../deploy/jobs/breast_cancer_distributed.toml");
        let spec = JobSpec::from_toml_str(SHIPPED).unwrap();
        let plan = plan(&spec, 62).unwrap().unwrap();
        assert!(plan.dp_sgd.planned_epsilon <= 1.0, "{plan:?}");
        assert_eq!(plan.min_survivors, 4);
    }

    #[test]
    fn the_plan_is_one_central_dp_sgd_step_per_round_and_refuses_fewer_survivors() {
        let spec = job(SGD, &format!("{PRIVACY}{SECURE}")).unwrap();
        let plan = plan(&spec, 62).unwrap().unwrap();
        assert_eq!(plan.min_survivors, 4);
        assert_eq!(plan.dp_sgd.sample_rate, 0.5);
        assert_eq!(plan.dp_sgd.steps_per_round, 1);
        assert_eq!(plan.dp_sgd.total_steps, 20);
        assert!((plan.step_scale - 1.0 / 180.0).abs() < 1e-15);
        // Steps and metrics together meet the target.
        assert!(
            plan.dp_sgd.planned_epsilon <= 1.0 && plan.dp_sgd.planned_epsilon > 0.99,
            "{plan:?}"
        );
        assert!(plan.dp_sgd.metrics.is_some());
        assert!(plan.check_release(3).is_err());
        let at_five = plan.check_release(5).unwrap();
        assert!(
            at_five > plan.dp_sgd.effective_noise_multiplier,
            "{at_five}"
        );
        // Too coarse a grid for the share: refused naming scale_bits.
        let coarse = job(
            SGD,
            &format!("{PRIVACY}[secure_aggregation]\nscale_bits = 2\n"),
        )
        .unwrap();
        let e = super::plan(&coarse, 62).unwrap_err();
        assert_eq!(e.key(), Some("secure_aggregation.scale_bits"), "{e}");
        let none = job(SGD, "[privacy]\nmode = \"none\"\n").unwrap();
        assert!(super::plan(&none, 62).unwrap().is_none());
    }
}
