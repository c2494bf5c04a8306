//! `[aggregation]`: how the coordinator combines a round's updates.
//!
//! Absent, or `rule = "fedavg"`: the streaming weighted sum (each update folded into the round's
//! sum as it arrives, weighted by its sample count). The robust rules — coordinate-wise
//! `median`, `trimmed_mean` and `multi_krum` — need every update at once, so the coordinator
//! buffers them (spooled to disk, encrypted) and combines them at the round's end; they weigh
//! every site equally (a sample count is the site's own claim, and a robust rule that let one
//! site claim a large weight would not be robust).
//!
//! They do not compose with central DP: DP-FedAvg's noise is calibrated to the sensitivity of a
//! *sum* of clipped updates, which a median or a Krum selection does not have. A job asking for
//! both is refused at submission, naming both keys. Secure aggregation shows the coordinator only
//! the masked sum, so robust rules are refused with `[secure_aggregation]` too.

use serde::{Deserialize, Serialize};

use super::{JobSpec, PrivacyMode, SpecError};

/// The `[aggregation]` table of a job spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationSpec {
    pub rule: AggregationRuleName,
    /// `trimmed_mean`: the fraction of the values trimmed at *each* end of every coordinate,
    /// in [0, 0.5); ⌊β·n⌋ values of the n updates are dropped on each side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// `multi_krum`: the number of Byzantine sites tolerated; a round needs n ≥ 2f + 3 updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<u32>,
    /// `multi_krum`: how many of the best-scored updates are averaged, in [1, n − f]. Absent:
    /// n − f (every update but the f worst).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<u32>,
}

/// The rule's name as the job spec writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationRuleName {
    #[default]
    Fedavg,
    Median,
    TrimmedMean,
    MultiKrum,
}

impl AggregationRuleName {
    pub fn as_str(self) -> &'static str {
        match self {
            AggregationRuleName::Fedavg => "fedavg",
            AggregationRuleName::Median => "median",
            AggregationRuleName::TrimmedMean => "trimmed_mean",
            AggregationRuleName::MultiKrum => "multi_krum",
        }
    }

    /// Whether the rule needs every update at once (not a running sum).
    pub fn is_robust(self) -> bool {
        self != AggregationRuleName::Fedavg
    }
}

impl AggregationSpec {
    /// Checks the parameters against the rule and the job; errors name the key.
    pub(super) fn validate(&self, job: &JobSpec) -> Result<(), SpecError> {
        use AggregationRuleName::*;
        let only_for = |key: &str, rule: &str| {
            SpecError::invalid(
                format!("aggregation.{key}"),
                format!(
                    "applies only to rule = \"{rule}\", not to rule = \"{}\"; remove it",
                    self.rule.as_str()
                ),
            )
        };
        if self.beta.is_some() && self.rule != TrimmedMean {
            return Err(only_for("beta", "trimmed_mean"));
        }
        if self.f.is_some() && self.rule != MultiKrum {
            return Err(only_for("f", "multi_krum"));
        }
        if self.m.is_some() && self.rule != MultiKrum {
            return Err(only_for("m", "multi_krum"));
        }
        match self.rule {
            Fedavg => {}
            // A median of one or two values is their mean, which one site moves at will.
            Median if job.min_sites < 3 => {
                return Err(SpecError::invalid(
                    "aggregation.rule",
                    format!(
                        "\"median\" needs at least 3 updates a round to tolerate one Byzantine \
                         site (a median of two is their mean), but min_sites is {}",
                        job.min_sites
                    ),
                ));
            }
            Median => {}
            TrimmedMean => {
                let beta = self.beta.ok_or_else(|| {
                    SpecError::invalid(
                        "aggregation.beta",
                        "is required with rule = \"trimmed_mean\": the fraction trimmed at each end, in [0, 0.5)",
                    )
                })?;
                if !(beta.is_finite() && (0.0..0.5).contains(&beta)) {
                    return Err(SpecError::invalid(
                        "aggregation.beta",
                        format!("must be in [0, 0.5), got {beta}"),
                    ));
                }
                // ⌊β·n⌋ = 0 trims nothing: the plain mean, which one site moves at will. Every
                // round has at least min_sites updates, so ⌊β·min_sites⌋ ≥ 1 holds in each.
                if (beta * f64::from(job.min_sites)).floor() < 1.0 || job.min_sites < 3 {
                    return Err(SpecError::invalid(
                        "aggregation.beta",
                        format!(
                            "is {beta}, which trims ⌊{beta} × min_sites {}⌋ = {} values at each \
                             end: a trimmed mean that trims nothing is the plain mean, which one \
                             site moves at will; raise beta or min_sites so that \
                             beta × min_sites ≥ 1 (and min_sites ≥ 3)",
                            job.min_sites,
                            (beta * f64::from(job.min_sites)).floor()
                        ),
                    ));
                }
            }
            MultiKrum => {
                let f = self.f.ok_or_else(|| {
                    SpecError::invalid(
                        "aggregation.f",
                        "is required with rule = \"multi_krum\": the number of Byzantine sites tolerated",
                    )
                })?;
                // Krum scores each update by its n − f − 2 nearest neighbours: with fewer than
                // 2f + 3 updates the f Byzantine ones could make up a majority of that set.
                let need = 2 * u64::from(f) + 3;
                if u64::from(job.min_sites) < need {
                    return Err(SpecError::invalid(
                        "aggregation.f",
                        format!(
                            "is {f}, which needs at least 2f + 3 = {need} updates a round, but min_sites is {}",
                            job.min_sites
                        ),
                    ));
                }
                if let Some(m) = self.m {
                    let most = u64::from(job.min_sites) - u64::from(f);
                    if m == 0 || u64::from(m) > most {
                        return Err(SpecError::invalid(
                            "aggregation.m",
                            format!("must be in [1, min_sites − f] = [1, {most}], got {m}"),
                        ));
                    }
                }
            }
        }
        if self.rule.is_robust() && job.dp().is_some_and(|p| p.mode == PrivacyMode::Central) {
            return Err(SpecError::invalid(
                "aggregation.rule",
                format!(
                    "\"{}\" does not compose with privacy.mode = \"central\": central DP's noise is \
                     calibrated to a sum of clipped updates, which a robust rule is not; use \
                     rule = \"fedavg\" or another privacy.mode",
                    self.rule.as_str()
                ),
            ));
        }
        if self.rule.is_robust() && job.secure_aggregation.is_some() {
            return Err(SpecError::invalid(
                "aggregation.rule",
                format!(
                    "\"{}\" does not compose with [secure_aggregation]: under secure aggregation \
                     the coordinator sees only the masked sum, never the updates a robust rule \
                     compares; use rule = \"fedavg\" or remove [secure_aggregation]",
                    self.rule.as_str()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "robust"
rounds = 2
min_sites = 5
round_deadline_secs = 60
update_norm_bound = 10.0
[model]
name = "mlp"
[data]
schema = "breast_cancer"
[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 16
"#;

    fn with(extra: &str) -> Result<JobSpec, SpecError> {
        JobSpec::from_toml_str(&format!("{BASE}{extra}"))
    }

    #[test]
    fn each_rule_parses_with_its_parameters_and_enters_the_digest() {
        let plain = with("").unwrap();
        assert_eq!(plain.aggregation, None);
        // Absent: jobs written before the table keep their digest.
        assert!(!plain.canonical_json().contains("aggregation"));
        let cases = [
            "[aggregation]\nrule = \"fedavg\"\n",
            "[aggregation]\nrule = \"median\"\n",
            "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.2\n",
            "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.25\n",
            "[aggregation]\nrule = \"multi_krum\"\nf = 1\n",
            "[aggregation]\nrule = \"multi_krum\"\nf = 1\nm = 3\n",
        ];
        let mut digests = vec![plain.digest()];
        for c in cases {
            let spec = with(c).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert!(spec.aggregation.is_some());
            digests.push(spec.digest());
        }
        let distinct: std::collections::HashSet<_> = digests.iter().collect();
        assert_eq!(
            distinct.len(),
            digests.len(),
            "every setting changes the digest"
        );
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_key() {
        let cases = [
            (
                "[aggregation]\nrule = \"trimmed_mean\"\n",
                "aggregation.beta",
            ),
            (
                "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.5\n",
                "aggregation.beta",
            ),
            (
                "[aggregation]\nrule = \"trimmed_mean\"\nbeta = -0.1\n",
                "aggregation.beta",
            ),
            (
                "[aggregation]\nrule = \"trimmed_mean\"\nbeta = nan\n",
                "aggregation.beta",
            ),
            (
                "[aggregation]\nrule = \"median\"\nbeta = 0.1\n",
                "aggregation.beta",
            ),
            ("[aggregation]\nrule = \"median\"\nf = 1\n", "aggregation.f"),
            ("[aggregation]\nrule = \"multi_krum\"\n", "aggregation.f"),
            // min_sites = 5 allows f = 1 (2f + 3 = 5) but not f = 2.
            (
                "[aggregation]\nrule = \"multi_krum\"\nf = 2\n",
                "aggregation.f",
            ),
            (
                "[aggregation]\nrule = \"multi_krum\"\nf = 1\nm = 0\n",
                "aggregation.m",
            ),
            (
                "[aggregation]\nrule = \"multi_krum\"\nf = 1\nm = 5\n",
                "aggregation.m",
            ),
            ("[aggregation]\nrule = \"fedavg\"\nm = 2\n", "aggregation.m"),
            // ⌊0.1 × 5⌋ = 0 and β = 0 trim nothing: the plain mean, robust to nobody.
            (
                "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.1\n",
                "aggregation.beta",
            ),
            (
                "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.0\n",
                "aggregation.beta",
            ),
        ];
        for (extra, key) in cases {
            let e = with(extra).expect_err(extra);
            assert_eq!(e.key(), Some(key), "{extra}: {e}");
        }
        let unknown = with("[aggregation]\nrule = \"mean\"\n").unwrap_err();
        assert!(unknown.to_string().contains("mean"), "{unknown}");
        let typo = with("[aggregation]\nrule = \"median\"\nbetta = 0.1\n").unwrap_err();
        assert!(typo.to_string().contains("betta"), "{typo}");
    }

    /// A rule configured so that it tolerates no Byzantine site is refused at submission, with
    /// the reason: it would aggregate as the plain mean while the job says it is robust.
    #[test]
    fn a_rule_that_tolerates_no_byzantine_site_is_refused_with_the_reason() {
        let at = |min_sites: u32, extra: &str| {
            JobSpec::from_toml_str(
                &format!("{BASE}{extra}")
                    .replace("min_sites = 5", &format!("min_sites = {min_sites}")),
            )
        };
        let median = "[aggregation]\nrule = \"median\"\n";
        for n in [1, 2] {
            let e = at(n, median).expect_err("a median of two is their mean");
            assert_eq!(e.key(), Some("aggregation.rule"), "{e}");
            assert!(e.to_string().contains("min_sites is"), "{e}");
        }
        at(3, median).expect("three values have a middle one");
        let trimmed = "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.2\n";
        let e = at(4, trimmed).expect_err("⌊0.2 × 4⌋ = 0 trims nothing");
        assert_eq!(e.key(), Some("aggregation.beta"), "{e}");
        assert!(
            e.to_string().contains("trims nothing") || e.to_string().contains("= 0 values"),
            "{e}"
        );
        at(5, trimmed).expect("⌊0.2 × 5⌋ = 1");
        let e = at(2, "[aggregation]\nrule = \"trimmed_mean\"\nbeta = 0.49\n")
            .expect_err("two sites cannot trim one at each end and keep one");
        assert_eq!(e.key(), Some("aggregation.beta"), "{e}");
    }

    /// The shipped example: valid, and each documented range enforced on it.
    #[test]
    fn the_shipped_robust_example_is_valid_and_its_ranges_are_enforced() {
        const SHIPPED: &str = include_str!("../../../deploy/jobs/breast_cancer_robust.toml");
        let spec = JobSpec::from_toml_str(SHIPPED).expect("the shipped robust job is valid");
        assert_eq!(
            spec.aggregation.as_ref().map(|a| (a.rule, a.beta)),
            Some((AggregationRuleName::TrimmedMean, Some(0.2)))
        );
        let krum = |f_m: &str| {
            SHIPPED
                .replace("rule = \"trimmed_mean\"", "rule = \"multi_krum\"")
                .replace("beta = 0.2", f_m)
        };
        let cases = [
            (
                SHIPPED.replace("beta = 0.2", "beta = 0.5"),
                "aggregation.beta",
            ),
            (
                SHIPPED.replace("beta = 0.2", "beta = -0.01"),
                "aggregation.beta",
            ),
            (krum("f = 2"), "aggregation.f"),
            (krum("f = 1\nm = 5"), "aggregation.m"),
            (krum("f = 1\nm = 0"), "aggregation.m"),
        ];
        for (text, key) in cases {
            assert_ne!(text, SHIPPED);
            let e = JobSpec::from_toml_str(&text).expect_err(key);
            assert_eq!(e.key(), Some(key), "{e}");
        }
        JobSpec::from_toml_str(&krum("f = 1\nm = 3")).expect("the documented Multi-Krum settings");
    }

    #[test]
    fn robust_rules_are_refused_with_central_dp_naming_both_keys() {
        let central = "[privacy]\nmode = \"central\"\ntarget_epsilon = 3.0\n[privacy.central]\nclip_norm = 1.0\n";
        for rule in [
            "rule = \"median\"",
            "rule = \"trimmed_mean\"\nbeta = 0.2",
            "rule = \"multi_krum\"\nf = 1",
        ] {
            let e = with(&format!("[aggregation]\n{rule}\n{central}")).unwrap_err();
            assert_eq!(e.key(), Some("aggregation.rule"), "{e}");
            assert!(e.to_string().contains("privacy.mode"), "{e}");
        }
        with(&format!("[aggregation]\nrule = \"fedavg\"\n{central}")).expect("fedavg composes");
        let local = "[privacy]\nmode = \"local\"\ntarget_epsilon = 3.0\nmax_grad_norm = 1.0\n";
        with(&format!("[aggregation]\nrule = \"median\"\n{local}"))
            .expect("local DP-SGD composes with a robust rule (post-processing)");
    }

    #[test]
    fn robust_rules_are_refused_with_secure_aggregation_naming_both_keys() {
        let secagg = "[secure_aggregation]\nscale_bits = 20\n";
        let e = with(&format!("[aggregation]\nrule = \"median\"\n{secagg}")).unwrap_err();
        assert_eq!(e.key(), Some("aggregation.rule"), "{e}");
        assert!(e.to_string().contains("[secure_aggregation]"), "{e}");
        with(&format!("[aggregation]\nrule = \"fedavg\"\n{secagg}"))
            .expect("fedavg composes with secure aggregation");
    }
}
