//! `[privacy] mode = "distributed"`: the job's distributed-DP plan, computed the same way by the
//! coordinator (its release check) and by every site (its noise share, its own release check,
//! what it reports as spent) from the signed spec and the model's size alone.
//!
//! The privacy unit is a site's whole update in a round (its L2 norm clipped to the job's
//! `update_norm_bound` C): neighbouring jobs differ in one site's contribution, which covers every
//! record of that site at once. The plan (`tutela_privacy::accountant::distributed`, KLS21) is
//! for `rounds` rounds, every one released with at least `min_sites` survivors (m), each site
//! adding N_ℤ(0, σ²/m) on the grid 2^-scale_bits so that m survivors carry the total noise σ:
//! `privacy.noise_multiplier · C` when given, otherwise calibrated to `privacy.target_epsilon`.
//! Every site takes part in every round it is sent (sampling rate 1: the coordinator picks the
//! sites, so no amplification by sampling is claimed).

use tutela_privacy::accountant::distributed::{DistributedInputs, DistributedPlan};

use super::{JobSpec, PrivacyMode, SpecError};

/// Refuses `mode = "distributed"` without `[secure_aggregation]`: the sites' noise shares add up
/// to the job's noise only in a sum nobody sees unmasked.
pub(super) fn validate(job: &JobSpec) -> Result<(), SpecError> {
    let distributed = job
        .privacy
        .as_ref()
        .is_some_and(|p| p.mode == PrivacyMode::Distributed);
    if distributed && job.secure_aggregation.is_none() {
        return Err(SpecError::invalid(
            "privacy.mode",
            "= \"distributed\" requires [secure_aggregation]: each site adds only its share of \
             the noise, which protects its update only inside a masked sum",
        ));
    }
    Ok(())
}

/// The job's distributed-DP plan for a model of `dimension` parameters; `None` when the job's
/// privacy mode is not `distributed`. The error names what cannot be planned.
pub fn plan(job: &JobSpec, dimension: usize) -> Result<Option<DistributedPlan>, SpecError> {
    let Some(p) = job
        .privacy
        .as_ref()
        .filter(|p| p.mode == PrivacyMode::Distributed)
    else {
        return Ok(None);
    };
    let Some(secure) = &job.secure_aggregation else {
        validate(job)?;
        return Ok(None);
    };
    let clip = job.update_norm_bound;
    let min_survivors = job.min_sites as usize;
    let inputs = DistributedInputs {
        clip,
        granularity: 2f64.powi(-(secure.scale_bits as i32)),
        dimension,
        beta: secure.rounding_beta,
        expected_sites: job.sites.len().max(min_survivors),
        min_survivors,
        sample_rate: 1.0,
        rounds: u64::from(job.rounds),
        delta: p.delta,
        target_epsilon: p.target_epsilon,
        total_noise: p.noise_multiplier.map(|z| z * clip),
    };
    let plan = DistributedPlan::new(&inputs).map_err(|e| {
        SpecError::invalid(
            "privacy",
            format!("mode = \"distributed\" cannot be planned: {e}"),
        )
    })?;
    // The sites' sampler draws 1 to 2^16 grid steps (`tutela_privacy::noise::MAX_GRID_SCALE`).
    let in_grid = plan.site_noise() / inputs.granularity;
    if !(1.0..=tutela_privacy::noise::MAX_GRID_SCALE).contains(&in_grid) {
        return Err(SpecError::invalid(
            "secure_aggregation.scale_bits",
            format!(
                "with mode = \"distributed\" each site's noise (σ = {:.4}) must be 1 to 65536 \
                 grid steps of 2^-{}, but is {in_grid:.1}: choose scale_bits so that σ · \
                 2^scale_bits lies in that range",
                plan.site_noise(),
                secure.scale_bits
            ),
        ));
    }
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> Result<JobSpec, SpecError> {
        JobSpec::from_toml_str(&format!(
            r#"
name = "dist"
rounds = 10
min_sites = 4
round_deadline_secs = 60
update_norm_bound = 1.0
sites = ["a", "b", "c", "d", "e"]

[model]
name = "mlp"

[data]
schema = "breast_cancer"

[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 32

{extra}
"#
        ))
    }

    #[test]
    fn distributed_mode_needs_secure_aggregation_and_is_in_the_digest() {
        let privacy = "[privacy]\nmode = \"distributed\"\ntarget_epsilon = 1.0\n";
        let e = job(privacy).unwrap_err();
        assert_eq!(e.key(), Some("privacy.mode"), "{e}");
        assert!(e.to_string().contains("[secure_aggregation]"), "{e}");

        let secure = "[secure_aggregation]\nscale_bits = 16\n";
        let distributed = job(&format!("{privacy}{secure}")).unwrap();
        let local = job(&format!(
            "[privacy]\nmode = \"local\"\ntarget_epsilon = 1.0\nmax_grad_norm = 1.0\n{secure}"
        ))
        .unwrap();
        assert_ne!(distributed.digest(), local.digest());
        assert!(distributed.canonical_json().contains("\"distributed\""));

        let e = job(&format!("{privacy}max_grad_norm = 1.0\n{secure}")).unwrap_err();
        assert_eq!(e.key(), Some("privacy.max_grad_norm"), "{e}");
        let e = job(&format!("[privacy]\nmode = \"distributed\"\n{secure}")).unwrap_err();
        assert_eq!(e.key(), Some("privacy.target_epsilon"), "{e}");
    }

    #[test]
    fn the_plan_meets_the_target_with_the_minimum_of_survivors_and_refuses_fewer() {
        let privacy = "[privacy]\nmode = \"distributed\"\ntarget_epsilon = 1.0\n";
        // σ/√4 ≈ 6.4: 419,200 steps of 2^-16, beyond the sampler's 2^16: refused, naming why.
        let fine = job(&format!("{privacy}[secure_aggregation]\nscale_bits = 16\n")).unwrap();
        let e = plan(&fine, 62).unwrap_err();
        assert_eq!(e.key(), Some("secure_aggregation.scale_bits"), "{e}");
        let spec = job(&format!("{privacy}[secure_aggregation]\nscale_bits = 12\n")).unwrap();
        let plan = plan(&spec, 62).unwrap().unwrap();
        assert_eq!(plan.min_survivors, 4);
        assert!(
            plan.planned_epsilon <= 1.0 && plan.planned_epsilon > 0.99,
            "{plan:?}"
        );
        // Each site's share: σ/√m.
        assert!((plan.site_noise() - plan.total_noise / 2.0).abs() < 1e-12);
        assert!(plan.check_release(3).is_err());
        let at_five = plan.check_release(5).unwrap();
        assert!(at_five < plan.planned_epsilon, "{at_five}");
        let none = job("[privacy]\nmode = \"none\"\n").unwrap();
        assert!(super::plan(&none, 62).unwrap().is_none());
    }
}
