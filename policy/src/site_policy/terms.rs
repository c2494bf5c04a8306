//! What a site's policy judges of a job, whatever its kind: one view ([`JobTerms`]) made from a
//! training [`JobSpec`] or a consortium-statistics [`StatisticsJobSpec`], so that
//! [`SitePolicy::evaluate_terms`](super::SitePolicy::evaluate_terms) holds every clause once and
//! a new kind of job is a new constructor here, not a second evaluator.

use tutela_protocol::job::{JobSpec, PrivacyMode, StatisticsJobSpec, SubmittedSpec};

/// The terms of a job a site policy's clauses are about.
#[derive(Clone, Debug, PartialEq)]
pub struct JobTerms<'a> {
    /// The model the job trains; `None` for a job that trains none (statistics), which
    /// `allowed_models` does not restrict: no model of the site's data leaves it.
    pub model: Option<&'a str>,
    /// Whether the job releases anything under DP at all.
    pub dp: bool,
    /// The ε the job states it spends at this site (its whole spend on the dataset).
    pub epsilon: Option<f64>,
    /// The noise multiplier the job states, when it states one (a calibrated one is derived
    /// from ε at the site, and the ε clauses cover it).
    pub noise_multiplier: Option<f64>,
    /// The dataset schema, which names the site's budget.
    pub schema: &'a str,
}

impl<'a> JobTerms<'a> {
    /// A training job's terms.
    pub fn of_training(spec: &'a JobSpec) -> Self {
        let dp = spec
            .privacy
            .as_ref()
            .filter(|p| p.mode != PrivacyMode::None);
        JobTerms {
            model: Some(&spec.model.name),
            dp: dp.is_some(),
            epsilon: dp.and_then(|p| p.target_epsilon),
            noise_multiplier: dp.and_then(|p| match p.mode {
                PrivacyMode::Central => p.central.as_ref().and_then(|c| c.noise_multiplier),
                _ => p.noise_multiplier,
            }),
            schema: &spec.data.schema,
        }
    }

    /// The terms of a job of either kind (what a site's gate holds a task's spec to).
    pub fn of_submitted(spec: &'a SubmittedSpec) -> Self {
        match spec {
            SubmittedSpec::Training(s) => JobTerms::of_training(s),
            SubmittedSpec::Statistics(s) => JobTerms::of_statistics(s),
        }
    }

    /// A consortium-statistics job's terms: always DP, its ε is its one release's (the masked
    /// sum's under secure aggregation, which is what each site's data spends), its noise is
    /// calibrated from that ε at the site.
    pub fn of_statistics(spec: &'a StatisticsJobSpec) -> Self {
        JobTerms {
            model: None,
            dp: true,
            epsilon: Some(spec.privacy.target_epsilon),
            noise_multiplier: None,
            schema: &spec.data.schema,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::SitePolicy;
    use super::*;

    const STATISTICS: &str = include_str!("../../../deploy/jobs/breast_cancer_statistics.toml");

    fn policy(extra: &str) -> SitePolicy {
        SitePolicy::from_toml_str(&format!(
            "site = \"hospital-a\"\ncompliance_officers = []\nallowed_models = [\"cnn\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn a_statistics_job_is_held_to_the_site_s_epsilon_clauses_and_not_to_allowed_models() {
        let spec = StatisticsJobSpec::from_toml_str(STATISTICS).unwrap();
        let terms = JobTerms::of_statistics(&spec);
        let now = time::OffsetDateTime::UNIX_EPOCH + time::Duration::hours(12);
        // Within every cap: allowed, although the site allows only a model it does not train.
        let p = policy("[privacy]\nmax_epsilon_per_job = 2.0\nbudget = { breast_cancer = 5.0 }\n");
        assert_eq!(p.evaluate_terms(&terms, None, now, 0.0), Ok(()));
        // Over the per-job cap and over what is left of the dataset's budget: both named.
        let p = policy("[privacy]\nmax_epsilon_per_job = 0.5\nbudget = { breast_cancer = 5.0 }\n");
        let breaches = p.evaluate_terms(&terms, None, now, 4.5).unwrap_err();
        assert_eq!(
            breaches.clauses(),
            [
                "privacy.max_epsilon_per_job",
                "privacy.budget.breast_cancer"
            ],
            "{breaches:?}"
        );
        // The training view of a training spec is what evaluate() has always judged.
        let training = JobSpec::from_toml_str(include_str!(
            "../../../deploy/jobs/breast_cancer_fedavg.toml"
        ))
        .unwrap();
        let t = JobTerms::of_training(&training);
        assert_eq!(t.model, Some("mlp"));
        assert_eq!(t.epsilon, Some(3.0));
        let breaches = policy("").evaluate(&training, None, now, 0.0).unwrap_err();
        assert_eq!(breaches.clauses(), ["allowed_models"], "{breaches:?}");
    }
}
