//! A site's own policy (`site-policy.toml`, on the site node): the site's last word on what runs
//! on its data, whatever the consortium's policy says.
//!
//! Every key is documented in `deploy/policy/site-policy.toml`. [`SitePolicy::evaluate`] checks a
//! job against it and names every clause a job breaks, at once.

use std::path::Path;

use serde::Deserialize;
use time::OffsetDateTime;
use tutela_protocol::human::number;
use tutela_protocol::identity::Identity;
use tutela_protocol::job::JobSpec;

mod terms;
pub use terms::JobTerms;

/// `site-policy.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SitePolicy {
    /// The site this policy is for; must be the node's own site.
    pub site: String,
    /// The identities whose signed approval this site accepts (its compliance officers). At least
    /// one must have approved a job before the node reads any data for it.
    pub compliance_officers: Vec<String>,
    /// Operators whose jobs this site runs. Absent: any consortium operator.
    #[serde(default)]
    pub allowed_operators: Option<Vec<String>>,
    /// Model registry names this site trains. Absent: any. A job that trains no model (a
    /// consortium-statistics job) is not restricted by it ([`JobTerms::model`]).
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    #[serde(default)]
    pub privacy: PrivacyClauses,
    /// When training may run (UTC). Absent: any time.
    #[serde(default)]
    pub hours: Option<Hours>,
}

/// `[privacy]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacyClauses {
    /// The largest ε one job may spend on this site's data. Set: a job without DP (or without a
    /// stated `privacy.target_epsilon`) is refused.
    #[serde(default)]
    pub max_epsilon_per_job: Option<f64>,
    /// The smallest noise multiplier a job may state (DP-SGD's `privacy.noise_multiplier`, or
    /// DP-FedAvg's `privacy.central.noise_multiplier`).
    #[serde(default)]
    pub min_noise_multiplier: Option<f64>,
    /// The site's total ε per dataset schema over all jobs; a job whose ε exceeds what is left
    /// (total minus what the privacy ledger has recorded as spent) is refused.
    #[serde(default)]
    pub budget: std::collections::BTreeMap<String, f64>,
}

/// `[hours]`: a daily window in UTC, `start` inclusive, `end` exclusive; it may wrap midnight.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    /// `HH:MM`.
    pub start: String,
    /// `HH:MM`.
    pub end: String,
}

/// A job that breaks the site policy, with the clause it breaks.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("site policy `{clause}`: {detail}")]
pub struct Breach {
    /// The key of `site-policy.toml`, e.g. `allowed_models` or `privacy.budget.breast_cancer`.
    pub clause: String,
    pub detail: String,
}

/// Every clause a job breaks (never empty), in the order of `site-policy.toml`.
#[derive(Clone, Debug, PartialEq)]
pub struct Breaches(pub Vec<Breach>);

impl Breaches {
    /// The clauses broken, e.g. `["allowed_models", "privacy.max_epsilon_per_job"]`.
    pub fn clauses(&self) -> Vec<&str> {
        self.0.iter().map(|b| b.clause.as_str()).collect()
    }
}

impl std::fmt::Display for Breaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() > 1 {
            write!(f, "{} site-policy clauses broken: ", self.0.len())?;
        }
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{b}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Breaches {}

fn breach(clause: impl Into<String>, detail: impl Into<String>) -> Breach {
    Breach {
        clause: clause.into(),
        detail: detail.into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SitePolicyError {
    #[error("{}: {cause}", path.display())]
    Io {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: {cause}", path.display())]
    Toml {
        path: std::path::PathBuf,
        cause: toml::de::Error,
    },
    #[error("site policy: `{key}` {problem}")]
    Invalid { key: String, problem: String },
    #[error("{}: it is the policy of site {found:?}, but this node is site {site:?}", .path.display())]
    OtherSite {
        path: std::path::PathBuf,
        found: String,
        site: String,
    },
}

/// A site's policy as the node holds it while it runs: read from its file, re-read in place on
/// SIGHUP and when the file changes ([`crate::reload::Reloadable`]), so that a site engineer's
/// edit takes effect at the next task without a restart. A file that does not load (or is some
/// other site's) leaves the policy in force as it was.
#[derive(Debug)]
pub struct ReloadingSitePolicy {
    /// `None` for a policy built in code (never reloaded).
    path: Option<std::path::PathBuf>,
    site: String,
    current: arc_swap::ArcSwap<SitePolicy>,
}

impl ReloadingSitePolicy {
    /// Loads `path`, which must be the policy of `site`.
    pub fn load(site: &str, path: &Path) -> Result<Self, SitePolicyError> {
        let policy = Self::read(site, path)?;
        Ok(ReloadingSitePolicy {
            path: Some(path.to_path_buf()),
            site: site.to_string(),
            current: arc_swap::ArcSwap::from_pointee(policy),
        })
    }

    /// A policy built in code: fixed, never reloaded.
    pub fn fixed(policy: SitePolicy) -> Self {
        ReloadingSitePolicy {
            path: None,
            site: policy.site.clone(),
            current: arc_swap::ArcSwap::from_pointee(policy),
        }
    }

    fn read(site: &str, path: &Path) -> Result<SitePolicy, SitePolicyError> {
        let policy = SitePolicy::load(path)?;
        if policy.site != site {
            return Err(SitePolicyError::OtherSite {
                path: path.to_path_buf(),
                found: policy.site,
                site: site.to_string(),
            });
        }
        Ok(policy)
    }

    /// The policy in force now.
    pub fn current(&self) -> std::sync::Arc<SitePolicy> {
        self.current.load_full()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the file; swaps the new policy in if it differs. Returns whether it did.
    pub fn reload_now(&self) -> Result<bool, SitePolicyError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let next = Self::read(&self.site, path)?;
        if *self.current.load_full() == next {
            return Ok(false);
        }
        self.current.store(std::sync::Arc::new(next));
        tracing::info!(path = %path.display(), "site policy reloaded");
        Ok(true)
    }
}

impl crate::reload::Reloadable for ReloadingSitePolicy {
    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("site policy {}", p.display()),
            None => "site policy (built in code)".into(),
        }
    }
    fn reload(&self) -> crate::reload::ReloadFuture<'_> {
        Box::pin(async move { self.reload_now().map_err(|e| e.to_string()) })
    }
}

fn minutes_of(key: &str, hhmm: &str) -> Result<u32, SitePolicyError> {
    let bad = || SitePolicyError::Invalid {
        key: key.to_string(),
        problem: format!("{hhmm:?} is not a time of day HH:MM"),
    };
    let (h, m) = hhmm.split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl SitePolicy {
    pub fn from_toml_str(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn load(path: &Path) -> Result<Self, SitePolicyError> {
        let text = std::fs::read_to_string(path).map_err(|cause| SitePolicyError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        let p = Self::from_toml_str(&text).map_err(|cause| SitePolicyError::Toml {
            path: path.to_path_buf(),
            cause,
        })?;
        p.validate()?;
        Ok(p)
    }

    /// Checks the values: officers are identities of this site's users, numbers are positive,
    /// hours are times of day.
    pub fn validate(&self) -> Result<(), SitePolicyError> {
        let invalid = |key: &str, problem: String| SitePolicyError::Invalid {
            key: key.to_string(),
            problem,
        };
        if self.compliance_officers.is_empty() {
            return Err(invalid(
                "compliance_officers",
                "is empty: no job could ever be approved for this site".into(),
            ));
        }
        for (i, o) in self.compliance_officers.iter().enumerate() {
            let id: Identity = o
                .parse()
                .map_err(|e| invalid(&format!("compliance_officers[{i}]"), format!("{e}")))?;
            if id.principal.site() != Some(self.site.as_str()) || id.principal.name().is_none() {
                return Err(invalid(
                    &format!("compliance_officers[{i}]"),
                    format!("{o} is not a user of site {:?}", self.site),
                ));
            }
        }
        for (i, o) in self.allowed_operators.iter().flatten().enumerate() {
            o.parse::<Identity>()
                .map_err(|e| invalid(&format!("allowed_operators[{i}]"), format!("{e}")))?;
        }
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("must be a finite number > 0, got {v}"),
                ))
            }
        };
        if let Some(e) = self.privacy.max_epsilon_per_job {
            positive("privacy.max_epsilon_per_job", e)?;
        }
        if let Some(z) = self.privacy.min_noise_multiplier {
            positive("privacy.min_noise_multiplier", z)?;
        }
        for (k, v) in &self.privacy.budget {
            positive(&format!("privacy.budget.{k}"), *v)?;
        }
        if let Some(h) = &self.hours {
            minutes_of("hours.start", &h.start)?;
            minutes_of("hours.end", &h.end)?;
        }
        Ok(())
    }

    /// Whether `signer` is one of this site's compliance officers.
    pub fn is_officer(&self, signer: &str) -> bool {
        self.compliance_officers.iter().any(|o| o == signer)
    }

    /// Checks `spec`, submitted by `submitter`, at `now`, with `spent_epsilon` already spent on
    /// the job's dataset (from the site's privacy ledger). Every clause the job breaks is
    /// returned, in the file's order, so that one refusal tells the operator all there is to
    /// change (not one clause per failed job and round of approvals).
    pub fn evaluate(
        &self,
        spec: &JobSpec,
        submitter: Option<&str>,
        now: OffsetDateTime,
        spent_epsilon: f64,
    ) -> Result<(), Breaches> {
        self.evaluate_terms(&JobTerms::of_training(spec), submitter, now, spent_epsilon)
    }

    /// [`SitePolicy::evaluate`] of a job of any kind, through its [`JobTerms`] (a statistics
    /// job: `JobTerms::of_statistics`).
    pub fn evaluate_terms(
        &self,
        spec: &JobTerms<'_>,
        submitter: Option<&str>,
        now: OffsetDateTime,
        spent_epsilon: f64,
    ) -> Result<(), Breaches> {
        let mut found = Vec::new();
        if let Some(allowed) = &self.allowed_operators {
            match submitter {
                Some(s) if allowed.iter().any(|a| a == s) => {}
                Some(s) => found.push(breach(
                    "allowed_operators",
                    format!("{s} is not an operator this site runs jobs for"),
                )),
                None => found.push(breach(
                    "allowed_operators",
                    "the task does not say who submitted the job",
                )),
            }
        }
        if let Some(models) = &self.allowed_models
            && let Some(model) = spec.model
            && !models.iter().any(|m| m == model)
        {
            found.push(breach(
                "allowed_models",
                format!(
                    "model {:?} is not allowed here (allowed: {})",
                    model,
                    models.join(", ")
                ),
            ));
        }

        let epsilon = spec.epsilon;
        if let Some(max) = self.privacy.max_epsilon_per_job {
            match epsilon {
                None => found.push(breach(
                    "privacy.max_epsilon_per_job",
                    format!(
                        "the job states no privacy.target_epsilon (or has no DP), and this site allows at most ε = {} per job",
                        number(max)
                    ),
                )),
                Some(e) if e > max => found.push(breach(
                    "privacy.max_epsilon_per_job",
                    format!(
                        "the job's ε = {} exceeds this site's {} per job",
                        number(e),
                        number(max)
                    ),
                )),
                Some(_) => {}
            }
        }
        if let Some(min) = self.privacy.min_noise_multiplier {
            if !spec.dp {
                found.push(breach(
                    "privacy.min_noise_multiplier",
                    format!(
                        "the job has no DP noise, and this site requires σ ≥ {}",
                        number(min)
                    ),
                ));
            } else if let Some(z) = spec.noise_multiplier
                && z < min
            {
                found.push(breach(
                    "privacy.min_noise_multiplier",
                    format!(
                        "the job's noise multiplier {} is below this site's minimum {}",
                        number(z),
                        number(min)
                    ),
                ));
            }
        }
        if let Some(total) = self.privacy.budget.get(spec.schema) {
            let clause = format!("privacy.budget.{}", spec.schema);
            let left = (total - spent_epsilon).max(0.0);
            match epsilon {
                None => found.push(breach(
                    clause,
                    "the job states no privacy.target_epsilon, so it cannot be charged to this site's budget",
                )),
                Some(e) if e > left => found.push(breach(
                    clause,
                    format!(
                        "the job's ε = {} exceeds what is left of this dataset's budget: {} of {}",
                        number(e),
                        number(left),
                        number(*total)
                    ),
                )),
                Some(_) => {}
            }
        }
        if let Some(h) = &self.hours {
            // Validated at load; a policy built in code that skipped validation fails closed.
            match (
                minutes_of("hours.start", &h.start),
                minutes_of("hours.end", &h.end),
            ) {
                (Ok(start), Ok(end)) => {
                    let now_min = u32::from(now.hour()) * 60 + u32::from(now.minute());
                    let inside = if start <= end {
                        (start..end).contains(&now_min)
                    } else {
                        now_min >= start || now_min < end
                    };
                    if !inside {
                        found.push(breach(
                            "hours",
                            format!(
                                "training runs here only between {} and {} UTC; it is {:02}:{:02} UTC",
                                h.start,
                                h.end,
                                now.hour(),
                                now.minute()
                            ),
                        ));
                    }
                }
                _ => found.push(breach("hours", "the training hours are not times of day")),
            }
        }
        if found.is_empty() {
            Ok(())
        } else {
            Err(Breaches(found))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = include_str!("../../deploy/policy/site-policy.toml");

    /// Every range deploy/policy/site-policy.toml documents, one value just outside it each:
    /// the shipped file with that one change is refused, naming the key.
    #[test]
    fn every_documented_range_of_the_site_policy_is_enforced() {
        use toml::Value::{Float, String as Text};
        let shipped: toml::Table = toml::from_str(POLICY).unwrap();
        SitePolicy::from_toml_str(POLICY)
            .unwrap()
            .validate()
            .expect("the shipped site policy is valid");
        let cases: &[(&[&str], toml::Value, &str)] = &[
            (
                &["privacy", "max_epsilon_per_job"],
                Float(0.0),
                "privacy.max_epsilon_per_job",
            ),
            (
                &["privacy", "max_epsilon_per_job"],
                Float(f64::INFINITY),
                "privacy.max_epsilon_per_job",
            ),
            (
                &["privacy", "min_noise_multiplier"],
                Float(-0.5),
                "privacy.min_noise_multiplier",
            ),
            (
                &["privacy", "budget", "breast_cancer"],
                Float(0.0),
                "privacy.budget.breast_cancer",
            ),
            (&["hours", "start"], Text("24:00".into()), "hours"),
            (&["hours", "end"], Text("06:60".into()), "hours"),
        ];
        for (path, value, key) in cases {
            let mut table = shipped.clone();
            let (last, parents) = path.split_last().unwrap();
            let mut t = &mut table;
            for p in parents {
                t = t[*p].as_table_mut().unwrap();
            }
            t.insert(last.to_string(), value.clone());
            let text = toml::to_string(&table).unwrap();
            let err = SitePolicy::from_toml_str(&text)
                .map_err(|e| e.to_string())
                .and_then(|p| p.validate().map_err(|e| e.to_string()))
                .expect_err(&format!("{key} = {value} must be refused"));
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
    }

    fn spec(model: &str, privacy: &str) -> JobSpec {
        JobSpec::from_toml_str(&format!(
            r#"name = "j"
rounds = 2
min_sites = 1
round_deadline_secs = 30
update_norm_bound = 10.0
sites = ["st-mary"]
[model]
name = "{model}"
[data]
schema = "breast_cancer"
[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 16
{privacy}
"#
        ))
        .unwrap()
    }

    const DP: &str = "[privacy]\nmode = \"local\"\ntarget_epsilon = 2.0\nmax_grad_norm = 1.0\nnoise_multiplier = 1.1\n";
    const OP: &str = "spiffe://acme/operator/op";

    fn policy() -> SitePolicy {
        let p = SitePolicy::from_toml_str(POLICY).unwrap();
        p.validate().unwrap();
        p
    }

    fn at(h: u8) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH.replace_hour(h).unwrap()
    }

    #[test]
    fn the_example_policy_admits_a_conforming_job() {
        policy()
            .evaluate(&spec("mlp", DP), Some(OP), at(23), 0.0)
            .unwrap();
    }

    #[test]
    fn each_breach_names_its_clause() {
        let p = policy();
        let clause = |r: Result<(), Breaches>| r.unwrap_err().0[0].clause.clone();
        assert_eq!(
            clause(p.evaluate(
                &spec("mlp", DP),
                Some("spiffe://acme/operator/eve"),
                at(23),
                0.0
            )),
            "allowed_operators"
        );
        assert_eq!(
            clause(p.evaluate(&spec("mlp", DP), None, at(23), 0.0)),
            "allowed_operators"
        );
        assert_eq!(
            clause(p.evaluate(&spec("transformer", DP), Some(OP), at(23), 0.0)),
            "allowed_models"
        );
        let greedy = DP.replace("target_epsilon = 2.0", "target_epsilon = 9.0");
        assert_eq!(
            clause(p.evaluate(&spec("mlp", &greedy), Some(OP), at(23), 0.0)),
            "privacy.max_epsilon_per_job"
        );
        assert_eq!(
            clause(p.evaluate(&spec("mlp", ""), Some(OP), at(23), 0.0)),
            "privacy.max_epsilon_per_job"
        );
        let quiet = DP.replace("noise_multiplier = 1.1", "noise_multiplier = 0.3");
        assert_eq!(
            clause(p.evaluate(&spec("mlp", &quiet), Some(OP), at(23), 0.0)),
            "privacy.min_noise_multiplier"
        );
        // 2.0 fits in a budget of 10 with 7 spent, not with 8.5 spent.
        p.evaluate(&spec("mlp", DP), Some(OP), at(23), 7.0).unwrap();
        assert_eq!(
            clause(p.evaluate(&spec("mlp", DP), Some(OP), at(23), 8.5)),
            "privacy.budget.breast_cancer"
        );
        // The window 20:00-06:00 wraps midnight.
        p.evaluate(&spec("mlp", DP), Some(OP), at(3), 0.0).unwrap();
        assert_eq!(
            clause(p.evaluate(&spec("mlp", DP), Some(OP), at(12), 0.0)),
            "hours"
        );
    }

    #[test]
    fn bad_policies_are_refused_with_the_key() {
        let cases = [
            (
                "compliance_officers = [\"spiffe://acme/site/other/user/x\"]",
                "compliance_officers[0]",
            ),
            ("compliance_officers = []", "compliance_officers"),
            (
                "compliance_officers = [\"spiffe://acme/site/st-mary/node\"]",
                "compliance_officers[0]",
            ),
        ];
        for (line, key) in cases {
            let text = format!("site = \"st-mary\"\n{line}\n");
            let err = SitePolicy::from_toml_str(&text)
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
        }
        let text = "site = \"st-mary\"\ncompliance_officers = [\"spiffe://acme/site/st-mary/user/a\"]\n[hours]\nstart = \"25:00\"\nend = \"01:00\"\n";
        assert!(SitePolicy::from_toml_str(text).unwrap().validate().is_err());
        assert!(
            SitePolicy::from_toml_str("site = \"x\"\ncompliance_officers = []\nbogus = 1\n")
                .is_err()
        );
    }

    /// A job breaking five clauses is refused once, naming all five with plain numbers: the
    /// operator fixes everything in one edit, not one failed job per clause.
    #[test]
    fn every_broken_clause_is_reported_at_once_with_plain_numbers() {
        let p = policy();
        let greedy = DP
            .replace("target_epsilon = 2.0", "target_epsilon = 9.0")
            .replace("noise_multiplier = 1.1", "noise_multiplier = 0.3");
        let all = p
            .evaluate(
                &spec("transformer", &greedy),
                Some("spiffe://acme/operator/eve"),
                at(12),
                8.5,
            )
            .unwrap_err();
        assert_eq!(
            all.clauses(),
            [
                "allowed_operators",
                "allowed_models",
                "privacy.max_epsilon_per_job",
                "privacy.min_noise_multiplier",
                "privacy.budget.breast_cancer",
                "hours",
            ]
        );
        let text = all.to_string();
        assert!(text.starts_with("6 site-policy clauses broken: "), "{text}");
        for clause in all.clauses() {
            assert!(text.contains(&format!("`{clause}`")), "{clause}: {text}");
        }
        assert!(
            text.contains("ε = 9 exceeds this site's 3 per job"),
            "{text}"
        );
        assert!(text.contains("1.5 of 10"), "{text}");
        assert!(!text.contains("Some("), "{text}");
        // Without DP, both ε clauses and the noise floor say so, with the cap as a number.
        let none = p
            .evaluate(&spec("mlp", ""), Some(OP), at(23), 0.0)
            .unwrap_err()
            .to_string();
        assert!(none.contains("at most ε = 3 per job"), "{none}");
        assert!(!none.contains("Some(") && !none.contains(".0 "), "{none}");
    }

    /// An edit of site-policy.toml takes effect in place: on the next poll of a watcher, or at
    /// once on reload; a broken edit or another site's file leaves the policy in force.
    #[tokio::test]
    async fn the_site_policy_is_reloaded_on_change_and_a_bad_edit_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site-policy.toml");
        std::fs::write(&path, POLICY).unwrap();
        let held = std::sync::Arc::new(ReloadingSitePolicy::load("st-mary", &path).unwrap());
        assert_eq!(held.current().privacy.max_epsilon_per_job, Some(3.0));
        assert!(
            !held.reload_now().unwrap(),
            "unchanged file, nothing swapped"
        );

        let watcher = crate::reload::spawn_watcher(&held, std::time::Duration::from_millis(20));
        std::fs::write(
            &path,
            POLICY.replace("max_epsilon_per_job = 3.0", "max_epsilon_per_job = 5.0"),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while held.current().privacy.max_epsilon_per_job != Some(5.0) {
            assert!(
                std::time::Instant::now() < deadline,
                "the watcher never reloaded"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A job the old policy refused is now admitted.
        let greedy = DP.replace("target_epsilon = 2.0", "target_epsilon = 4.0");
        held.current()
            .evaluate(&spec("mlp", &greedy), Some(OP), at(23), 0.0)
            .unwrap();
        // The rest is driven by hand, with no watcher racing it.
        watcher.abort();

        // A broken edit and another site's policy are refused; 5.0 stays in force.
        std::fs::write(&path, "site = \"st-mary\"\nthis is not toml").unwrap();
        let err = held.reload_now().unwrap_err().to_string();
        assert!(err.contains("site-policy.toml"), "{err}");
        std::fs::write(&path, POLICY.replace("st-mary", "other")).unwrap();
        assert!(matches!(
            held.reload_now(),
            Err(SitePolicyError::OtherSite { .. })
        ));
        assert_eq!(held.current().privacy.max_epsilon_per_job, Some(5.0));
        // Through the seam SIGHUP uses.
        std::fs::write(&path, POLICY).unwrap();
        assert!(crate::reload::reload_logged(held.as_ref(), "SIGHUP").await);
        assert_eq!(held.current().privacy.max_epsilon_per_job, Some(3.0));
    }
}
