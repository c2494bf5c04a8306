//! A consortium-statistics job (`kind = "statistics"`, issue 13 item 4): the schema's data
//! dictionary computed across sites under differential privacy (`tutela_privacy::stats`), as a
//! job that officers approve like any other.
//!
//! A training job's spec has no `kind` key (its [`JobSpec`](super::JobSpec) refuses one), so the
//! key alone tells the two apart ([`JobKind::of_toml`], [`SubmittedSpec`]): a statistics spec can
//! never be read as a training spec nor the other way round, and the digest covers `kind`, so no
//! statistics job shares a digest with a training job. A statistics job trains nothing: it has no
//! `[model]`, `[training]`, rounds or update bound; what it releases is one vector of clipped,
//! noised sufficient statistics per site (or their masked sum), once.
//!
//! What the officers approve, all inside the digest:
//! * `[data] schema` and **`schema_sha256` (required)**: the schema's `[statistics]` section
//!   fixes the columns, their public ranges and bins, and so the query's sensitivity; approving
//!   the digest approves those;
//! * `[privacy] target_epsilon`, `delta`, `accountant`: what each site's one release spends
//!   (`tutela_privacy::stats::StatsPlan`);
//! * `[statistics] confidence`: at which confidence every figure's stated bound holds;
//! * `[secure_aggregation]` (optional): the coordinator sees only the masked sum of at least
//!   `min_sites` sites, each adding its share of the noise (`neighbours`, `share_threshold` as
//!   for a training job; a statistics vector is already integer, so there is no grid to choose).
//!
//! Every key is documented in `deploy/jobs/breast_cancer_statistics.toml`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tutela_privacy::stats::{
    DataDictionary, StatsAggregation, StatsError, StatsLayout, StatsPlan, StatsPrivacy,
};

use super::{AccountantName, DataSpec, JobSpec, SpecDigest, SpecError, check_name, is_hex_digest};

/// The confidence of the bounds when the spec does not say: one chance in a million that any
/// figure of the dictionary is outside its bound.
pub const DEFAULT_CONFIDENCE: f64 = 1.0 - 1e-6;

/// The one value of a statistics spec's `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatisticsKind {
    Statistics,
}

/// A consortium-statistics job spec, as written in its TOML file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsJobSpec {
    /// Always `statistics`: what makes this a statistics job.
    pub kind: StatisticsKind,
    /// The job's human-readable name.
    pub name: String,
    /// The statistics are released only when at least this many sites' vectors are in the sum.
    pub min_sites: u32,
    /// The participating sites; empty means every connected site offering the schema.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Seconds the coordinator waits for the sites' statistics once the job starts.
    pub deadline_secs: u64,
    pub data: DataSpec,
    pub privacy: StatisticsPrivacySpec,
    #[serde(default)]
    pub statistics: StatisticsOptions,
    /// `[secure_aggregation]`: the coordinator sees only the masked sum. Absent: each site
    /// releases its own noised vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<StatisticsSecureAggregation>,
}

/// `[privacy]` of a statistics job: each site's one release.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsPrivacySpec {
    /// ε each site's release spends (without secure aggregation), or the masked sum of
    /// `min_sites` sites spends (with it), at `delta`.
    pub target_epsilon: f64,
    #[serde(default = "default_delta")]
    pub delta: f64,
    #[serde(default)]
    pub accountant: AccountantName,
}

fn default_delta() -> f64 {
    1e-6
}

/// `[statistics]`: how the result is stated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsOptions {
    /// 1 − β: the probability that every figure is within its stated bound, in (0, 1).
    #[serde(default = "default_confidence")]
    pub confidence: f64,
}

impl Default for StatisticsOptions {
    fn default() -> Self {
        StatisticsOptions {
            confidence: DEFAULT_CONFIDENCE,
        }
    }
}

fn default_confidence() -> f64 {
    DEFAULT_CONFIDENCE
}

/// `[secure_aggregation]` of a statistics job: SecAgg+'s graph settings (see
/// `crate::secagg::SecureAggregationSpec`); the vector is integer already (grid units of the
/// statistics' own noise grid), so there is no `scale_bits` or rounding to set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsSecureAggregation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<u32>,
    #[serde(default = "default_share_threshold")]
    pub share_threshold: f64,
}

fn default_share_threshold() -> f64 {
    0.5
}

impl StatisticsJobSpec {
    /// Parses and validates a statistics job spec.
    pub fn from_toml_str(text: &str) -> Result<Self, SpecError> {
        let spec: StatisticsJobSpec = toml::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every value's range; the error names the first bad key.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("name", &self.name, 64)?;
        check_name("data.schema", &self.data.schema, 64)?;
        match &self.data.schema_sha256 {
            Some(d) if is_hex_digest(d) => {}
            Some(d) => {
                return Err(SpecError::invalid(
                    "data.schema_sha256",
                    format!(
                        "must be the SHA-256 of the dataset schema file as 64 lowercase hex \
                         digits (`tutela-node data check` prints it), got {d:?}"
                    ),
                ));
            }
            None => {
                return Err(SpecError::invalid(
                    "data.schema_sha256",
                    "is required for a statistics job: the schema's [statistics] ranges bound \
                     each row's influence, so the officers must approve that exact schema \
                     (`tutela-node data check` prints its SHA-256)",
                ));
            }
        }
        if self.min_sites == 0 {
            return Err(SpecError::invalid("min_sites", "must be at least 1"));
        }
        if self.deadline_secs == 0 {
            return Err(SpecError::invalid("deadline_secs", "must be at least 1"));
        }
        super::check_sites(&self.sites, self.min_sites)?;
        let p = &self.privacy;
        if !(p.target_epsilon.is_finite() && p.target_epsilon > 0.0) {
            return Err(SpecError::invalid(
                "privacy.target_epsilon",
                format!("must be a finite number > 0, got {}", p.target_epsilon),
            ));
        }
        if !(p.delta.is_finite() && p.delta > 0.0 && p.delta < 1.0) {
            return Err(SpecError::invalid(
                "privacy.delta",
                format!("must be in (0, 1), got {}", p.delta),
            ));
        }
        let c = self.statistics.confidence;
        if !(c > 0.0 && c < 1.0) {
            return Err(SpecError::invalid(
                "statistics.confidence",
                format!("must be in (0, 1), got {c}"),
            ));
        }
        if let Some(s) = &self.secure_aggregation {
            if let Some(k) = s.neighbours
                && !(2..crate::secagg::MAX_SITES).contains(&k)
            {
                return Err(SpecError::invalid(
                    "secure_aggregation.neighbours",
                    format!(
                        "must be in 2..={} (a round has at most {} sites), got {k}",
                        crate::secagg::MAX_SITES - 1,
                        crate::secagg::MAX_SITES
                    ),
                ));
            }
            if !(s.share_threshold >= 0.5 && s.share_threshold < 1.0) {
                return Err(SpecError::invalid(
                    "secure_aggregation.share_threshold",
                    format!(
                        "must be in [0.5, 1) (more than half of a site's neighbours must be \
                         needed to recover its seeds), got {}",
                        s.share_threshold
                    ),
                ));
            }
            if self.min_sites < 2 {
                return Err(SpecError::invalid(
                    "min_sites",
                    "must be at least 2 with [secure_aggregation]: a masked sum of one site is \
                     that site's vector",
                ));
            }
        }
        Ok(())
    }

    /// SHA-256 of the canonical JSON of this spec (defaults filled in): what officers sign.
    pub fn digest(&self) -> SpecDigest {
        super::digest_of_value(&serde_json::to_value(self).unwrap_or(serde_json::Value::Null))
    }

    /// The privacy settings of the statistics library.
    pub fn stats_privacy(&self) -> StatsPrivacy {
        StatsPrivacy {
            target_epsilon: self.privacy.target_epsilon,
            delta: self.privacy.delta,
            accountant: self.privacy.accountant.accountant(),
        }
    }

    /// How the sites' vectors are summed: plainly, or masked with at least `min_sites`
    /// survivors (the fewest a release needs, so each site's share of the noise is σ/√min_sites).
    pub fn aggregation(&self) -> StatsAggregation {
        match self.secure_aggregation {
            None => StatsAggregation::Plain,
            Some(_) => StatsAggregation::Secure {
                min_survivors: self.min_sites as usize,
            },
        }
    }

    /// The query's noise and cost over `layout` (the schema's, the same at every site and at
    /// the coordinator): the one place sites and coordinator derive it from the spec.
    pub fn plan(&self, layout: &StatsLayout) -> Result<StatsPlan, StatsError> {
        StatsPlan::new(layout, &self.stats_privacy(), self.aggregation())
    }

    /// The consortium's result from the sum of `sites`' noised vectors (grid units of
    /// [`StatisticsJobSpec::plan`]'s scale): the dictionary, its file text, the file's SHA-256
    /// and the ε each site spent. Refuses a release with fewer than `min_sites` sites.
    pub fn finish(
        &self,
        layout: &StatsLayout,
        sum: &[i64],
        sites: &[String],
    ) -> Result<PublishedStatistics, StatsError> {
        if sites.len() < self.min_sites as usize {
            return Err(StatsError::Privacy(format!(
                "only {} sites' statistics are in the sum; the job needs at least {}",
                sites.len(),
                self.min_sites
            )));
        }
        let plan = self.plan(layout)?;
        let dictionary =
            DataDictionary::from_sum(layout, &plan, sum, sites.len(), self.statistics.confidence)?;
        let file_text = dictionary.to_file_text()?;
        let sha256 = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            file_text.as_bytes(),
        ));
        let mut sorted = sites.to_vec();
        sorted.sort();
        let epsilon_per_site = sorted
            .iter()
            .map(|s| (s.clone(), dictionary.epsilon))
            .collect();
        Ok(PublishedStatistics {
            accountant: match self.aggregation() {
                StatsAggregation::Plain => plan.by.to_string(),
                StatsAggregation::Secure { .. } => "distributed".to_string(),
            },
            dictionary,
            file_text,
            sha256,
            sites: sorted,
            epsilon_per_site,
        })
    }
}

/// Adds sites' vectors coordinate by coordinate (the plain aggregation), refusing vectors of
/// the wrong length and a sum that overflows 64 bits.
pub fn sum_vectors<'a>(
    dimension: usize,
    vectors: impl IntoIterator<Item = &'a [i64]>,
) -> Result<Vec<i64>, StatsError> {
    let mut sum = vec![0i64; dimension];
    for v in vectors {
        if v.len() != dimension {
            return Err(StatsError::VectorLength {
                expected: dimension,
                found: v.len(),
            });
        }
        for (s, x) in sum.iter_mut().zip(v) {
            *s = s.checked_add(*x).ok_or(StatsError::Overflow)?;
        }
    }
    Ok(sum)
}

/// A statistics job's result, as the coordinator stores and records it.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedStatistics {
    pub dictionary: DataDictionary,
    /// The statistics file (`DataDictionary::to_file_text`): what `tutela job stats --output`
    /// writes and a schema's `[standardize] statistics` names.
    pub file_text: String,
    /// SHA-256 (hex) of `file_text`: the `[standardize] sha256` that names it.
    pub sha256: String,
    /// The sites in the sum, sorted.
    pub sites: Vec<String>,
    pub epsilon_per_site: BTreeMap<String, f64>,
    /// The accountant that gave the ε (`distributed` under secure aggregation).
    pub accountant: String,
}

/// What kind of job a spec's text describes, from its top-level `kind` key alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// No `kind` key: a training job ([`JobSpec`]).
    Training,
    /// `kind = "statistics"`: [`StatisticsJobSpec`].
    Statistics,
}

impl JobKind {
    /// The kind of the spec in `text` (not yet validated); an unknown `kind` is an error naming it.
    pub fn of_toml(text: &str) -> Result<JobKind, SpecError> {
        let table: toml::Table = toml::from_str(text)?;
        match table.get("kind") {
            None => Ok(JobKind::Training),
            Some(toml::Value::String(k)) if k == "statistics" => Ok(JobKind::Statistics),
            Some(other) => Err(SpecError::invalid(
                "kind",
                format!(
                    "must be \"statistics\" (a consortium-statistics job) or absent (a training \
                     job), got {other}"
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Training => "training",
            JobKind::Statistics => "statistics",
        }
    }
}

/// A submitted job spec of either kind.
#[derive(Clone, Debug, PartialEq)]
pub enum SubmittedSpec {
    Training(Box<JobSpec>),
    Statistics(StatisticsJobSpec),
}

impl From<&JobSpec> for SubmittedSpec {
    fn from(spec: &JobSpec) -> Self {
        SubmittedSpec::Training(Box::new(spec.clone()))
    }
}

impl From<&StatisticsJobSpec> for SubmittedSpec {
    fn from(spec: &StatisticsJobSpec) -> Self {
        SubmittedSpec::Statistics(spec.clone())
    }
}

impl From<&SubmittedSpec> for SubmittedSpec {
    fn from(spec: &SubmittedSpec) -> Self {
        spec.clone()
    }
}

impl SubmittedSpec {
    /// Parses and validates the spec of whichever kind `text` says it is.
    pub fn from_toml_str(text: &str) -> Result<Self, SpecError> {
        Ok(match JobKind::of_toml(text)? {
            JobKind::Training => SubmittedSpec::Training(Box::new(JobSpec::from_toml_str(text)?)),
            JobKind::Statistics => {
                SubmittedSpec::Statistics(StatisticsJobSpec::from_toml_str(text)?)
            }
        })
    }

    pub fn kind(&self) -> JobKind {
        match self {
            SubmittedSpec::Training(_) => JobKind::Training,
            SubmittedSpec::Statistics(_) => JobKind::Statistics,
        }
    }

    pub fn digest(&self) -> SpecDigest {
        match self {
            SubmittedSpec::Training(s) => s.digest(),
            SubmittedSpec::Statistics(s) => s.digest(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            SubmittedSpec::Training(s) => &s.name,
            SubmittedSpec::Statistics(s) => &s.name,
        }
    }

    /// The sites the spec lists (empty: any).
    pub fn sites(&self) -> &[String] {
        match self {
            SubmittedSpec::Training(s) => &s.sites,
            SubmittedSpec::Statistics(s) => &s.sites,
        }
    }

    pub fn data(&self) -> &DataSpec {
        match self {
            SubmittedSpec::Training(s) => &s.data,
            SubmittedSpec::Statistics(s) => &s.data,
        }
    }

    /// The rounds the job runs: a training job's `rounds`; a statistics job's one release (its
    /// sites each answer one task, and the job completes once the result is recorded).
    pub fn rounds(&self) -> u32 {
        match self {
            SubmittedSpec::Training(s) => s.rounds,
            SubmittedSpec::Statistics(_) => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use tutela_privacy::noise::SecureRng;
    use tutela_privacy::stats::{ColumnDictionary, ColumnLayout, SiteStatistics, StatsValue};

    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/jobs/breast_cancer_statistics.toml");
    const TRAINING: &str = include_str!("../../../deploy/jobs/breast_cancer_fedavg.toml");

    fn example() -> StatisticsJobSpec {
        StatisticsJobSpec::from_toml_str(EXAMPLE).unwrap()
    }

    fn refused(text: &str) -> SpecError {
        match SubmittedSpec::from_toml_str(text) {
            Err(e) => e,
            Ok(s) => panic!("accepted: {s:?}"),
        }
    }

    #[test]
    fn the_documented_example_is_a_statistics_job_and_kind_tells_the_two_apart() {
        let spec = example();
        assert_eq!(spec.min_sites, 3);
        assert_eq!(spec.statistics.confidence, DEFAULT_CONFIDENCE);
        assert_eq!(spec.aggregation(), StatsAggregation::Plain);
        assert_eq!(JobKind::of_toml(EXAMPLE).unwrap(), JobKind::Statistics);
        assert_eq!(JobKind::of_toml(TRAINING).unwrap(), JobKind::Training);
        let submitted = SubmittedSpec::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(submitted.kind(), JobKind::Statistics);
        assert_eq!(submitted.digest(), spec.digest());
        assert_eq!(submitted.data().schema, "breast_cancer");
        assert_eq!(
            SubmittedSpec::from_toml_str(TRAINING).unwrap().kind(),
            JobKind::Training
        );
        // A training spec never takes `kind`, and a statistics spec never takes a model.
        let e = JobSpec::from_toml_str(&format!("kind = \"statistics\"\n{TRAINING}")).unwrap_err();
        assert!(e.to_string().contains("kind"), "{e}");
        let e = refused(&format!("{EXAMPLE}\n[model]\nname = \"mlp\"\n"));
        assert!(e.to_string().contains("model"), "{e}");
        let e = refused(&EXAMPLE.replace("kind = \"statistics\"", "kind = \"training\""));
        assert_eq!(e.key(), Some("kind"), "{e}");
    }

    #[test]
    fn the_digest_covers_every_setting_and_ignores_formatting() {
        let spec = example();
        let reformatted = format!("# another comment\n{}", EXAMPLE.replace(" = ", "="));
        assert_eq!(
            StatisticsJobSpec::from_toml_str(&reformatted)
                .unwrap()
                .digest(),
            spec.digest()
        );
        // Defaults are in it: writing the default confidence out changes nothing, another does.
        let no_section = EXAMPLE.replace("confidence = 0.999999", "");
        assert_eq!(
            StatisticsJobSpec::from_toml_str(&no_section)
                .unwrap()
                .digest(),
            spec.digest()
        );
        for (from, to) in [
            ("target_epsilon = 1.0", "target_epsilon = 2.0"),
            ("confidence = 0.999999", "confidence = 0.99"),
            ("delta = 1e-6", "delta = 1e-7"),
            ("min_sites = 3", "min_sites = 2"),
            ("# [secure_aggregation]", "[secure_aggregation]"),
        ] {
            let changed = StatisticsJobSpec::from_toml_str(&EXAMPLE.replace(from, to)).unwrap();
            assert_ne!(changed.digest(), spec.digest(), "{to}");
        }
    }

    #[test]
    fn each_bad_value_is_refused_naming_its_key() {
        for (from, to, key) in [
            (
                "schema_sha256 = \"",
                "# schema_sha256 = \"",
                "data.schema_sha256",
            ),
            (
                "schema_sha256 = \"52672ab8",
                "schema_sha256 = \"52672AB8",
                "data.schema_sha256",
            ),
            (
                "target_epsilon = 1.0",
                "target_epsilon = 0.0",
                "privacy.target_epsilon",
            ),
            ("delta = 1e-6", "delta = 1.0", "privacy.delta"),
            (
                "confidence = 0.999999",
                "confidence = 1.0",
                "statistics.confidence",
            ),
            ("min_sites = 3", "min_sites = 0", "min_sites"),
            ("min_sites = 3", "min_sites = 4", "min_sites"),
            ("deadline_secs = 120", "deadline_secs = 0", "deadline_secs"),
            ("\"hospital-c\"]", "\"hospital-a\"]", "sites[2]"),
        ] {
            let text = EXAMPLE.replace(from, to);
            assert_ne!(text, EXAMPLE, "{from}");
            let e = refused(&text);
            assert_eq!(e.key(), Some(key), "{to}: {e}");
        }
        // Secure aggregation: a masked sum of one site is no mask; bad graph settings.
        let secure = EXAMPLE.replace("# [secure_aggregation]", "[secure_aggregation]");
        let e = refused(
            &secure
                .replace("min_sites = 3", "min_sites = 1")
                .replace("sites = [", "# sites = ["),
        );
        assert_eq!(e.key(), Some("min_sites"), "{e}");
        let e = refused(&secure.replace("# share_threshold = 0.5", "share_threshold = 0.4"));
        assert_eq!(e.key(), Some("secure_aggregation.share_threshold"), "{e}");
        let e = refused(&secure.replace("# neighbours = 4", "neighbours = 1"));
        assert_eq!(e.key(), Some("secure_aggregation.neighbours"), "{e}");
        // A training job's secure-aggregation key has no meaning here.
        let e = refused(&format!("{secure}\nscale_bits = 12\n"));
        assert!(e.to_string().contains("scale_bits"), "{e}");
    }

    fn layout() -> StatsLayout {
        StatsLayout::new(vec![
            ColumnLayout::Categorical {
                name: "diagnosis".into(),
                categories: vec!["malignant".into(), "benign".into()],
            },
            ColumnLayout::Numeric {
                name: "age".into(),
                low: 0.0,
                high: 100.0,
                bins: 10,
            },
        ])
        .unwrap()
    }

    /// Site `s`'s noised vector: `n` rows, ages 20 + (i mod 60), every fifth age missing.
    fn site_vector(plan: &StatsPlan, s: u8, n: usize) -> (Vec<i64>, Vec<Option<f64>>) {
        let mut stats = SiteStatistics::new(&layout(), plan.scale()).unwrap();
        let mut ages = Vec::new();
        for i in 0..n {
            let age = (i % 5 != 0).then_some(20.0 + ((i + s as usize) % 60) as f64);
            ages.push(age);
            stats
                .add_row(&[
                    StatsValue::Category(Some(i % 3 / 2)),
                    age.map_or(StatsValue::Missing, StatsValue::Number),
                ])
                .unwrap();
        }
        let mut v = stats.into_sums();
        plan.noise_site_with(&mut v, SecureRng::insecure_from_seed([s; 32]))
            .unwrap();
        (v, ages)
    }

    #[test]
    fn finish_states_the_pooled_figures_within_their_bounds_and_digests_the_file() {
        let spec = example();
        let layout = layout();
        let plan = spec.plan(&layout).unwrap();
        let sites: Vec<String> = ["hospital-c", "hospital-a", "hospital-b"]
            .map(String::from)
            .to_vec();
        let mut vectors = Vec::new();
        let mut pooled: Vec<f64> = Vec::new();
        let mut missing = 0usize;
        for seed in 1..=sites.len() as u8 {
            let (v, ages) = site_vector(&plan, seed, 4000);
            missing += ages.iter().filter(|a| a.is_none()).count();
            pooled.extend(ages.into_iter().flatten());
            vectors.push(v);
        }
        let sum = sum_vectors(layout.len(), vectors.iter().map(Vec::as_slice)).unwrap();
        let out = spec.finish(&layout, &sum, &sites).unwrap();

        let d = &out.dictionary;
        assert!(
            (d.rows - 12_000.0).abs() <= d.rows_bound,
            "{} ± {}",
            d.rows,
            d.rows_bound
        );
        let mean = pooled.iter().sum::<f64>() / pooled.len() as f64;
        let Some(ColumnDictionary::Numeric {
            mean: m,
            mean_bound,
            missing: miss,
            missing_bound,
            ..
        }) = d.column("age")
        else {
            panic!("no age column: {d:?}");
        };
        assert!(
            (m - mean).abs() <= *mean_bound,
            "{m} ± {mean_bound} vs {mean}"
        );
        // Useful at this size and ε = 1: within 5 % of the 100-year range.
        assert!(*mean_bound < 5.0, "{mean_bound}");
        assert!((miss - missing as f64).abs() <= *missing_bound);

        // The file is what the digest names, and reads back as the same dictionary.
        let digest = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            out.file_text.as_bytes(),
        ));
        assert_eq!(out.sha256, digest);
        assert_eq!(&DataDictionary::from_file_text(&out.file_text).unwrap(), d);
        assert_eq!(out.sites, ["hospital-a", "hospital-b", "hospital-c"]);
        assert_eq!(out.epsilon_per_site.len(), 3);
        for eps in out.epsilon_per_site.values() {
            assert!(*eps <= spec.privacy.target_epsilon * (1.0 + 1e-6), "{eps}");
            assert!(*eps > 0.9 * spec.privacy.target_epsilon, "{eps}");
        }
        assert_eq!(out.accountant, "rdp");

        // Too few sites for a release, a vector of the wrong length, an overflowing sum.
        let e = spec.finish(&layout, &sum, &sites[..2]).unwrap_err();
        assert!(e.to_string().contains("at least 3"), "{e}");
        assert!(sum_vectors(layout.len(), [&sum[1..]]).is_err());
        let big = vec![i64::MAX; layout.len()];
        assert_eq!(
            sum_vectors(layout.len(), [&big[..], &big[..]]),
            Err(StatsError::Overflow)
        );
    }
}
