//! The coordinator's finishing step of a consortium-statistics job (`kind = "statistics"`,
//! `tutela_protocol::job::statistics`) once the sites' releases are in: every site's layout is
//! checked to be the same (the schema's, which the coordinator does not hold itself: the spec
//! binds it by `schema_sha256`), the noised vectors are summed (`sum_vectors`), the spec's
//! `finish` makes the data dictionary and its file, the file is kept content-addressed, and the
//! typed `statistics.published` record is made from the result. [`StatisticsCollection`] holds
//! the answers as they arrive (each asked site's release or decline, once) and closes to the
//! result or to the reason there is none.
//!
//! The engine's runner (`engine::statistics`) holds a [`StatisticsCollection`] while the job's
//! STATISTICS tasks are out and finishes it here. Only the plain aggregation is here: under
//! `[secure_aggregation]` the coordinator would see only the masked sum, which the masked round
//! does not produce for statistics yet, so such a spec is refused at submission (and here)
//! naming why.

use std::path::{Path, PathBuf};

use tutela_audit::payload::StatisticsPublished;
use tutela_privacy::stats::{ColumnLayout, StatsError, StatsLayout};
use tutela_protocol::job::statistics::{PublishedStatistics, StatisticsJobSpec, sum_vectors};

/// One site's release as the coordinator receives it: the layout the site computed from its
/// schema and its noised sufficient statistics in grid units (`SiteStatistics`' sums).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteRelease {
    pub site: String,
    pub layout: StatsLayout,
    pub sums: Vec<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatisticsRunError {
    #[error("no site's statistics arrived")]
    NoReleases,
    #[error("site {0} sent its statistics twice")]
    DuplicateSite(String),
    #[error("site {site} is not one of the job's sites ({listed})")]
    NotListed { site: String, listed: String },
    /// The sites' layouts differ: they read different schemas, so their vectors do not add up.
    #[error(
        "site {site}'s statistics layout differs from site {first}'s: {detail} (the sites' \
         schemas differ although the job names one schema digest)"
    )]
    LayoutDiffers {
        site: String,
        first: String,
        detail: String,
    },
    #[error("site {site}: {source}")]
    Site { site: String, source: StatsError },
    #[error("{0}")]
    Stats(#[from] StatsError),
    #[error(
        "[secure_aggregation]: the masked round does not carry a statistics job's vector yet, \
         so this coordinator finishes only plain statistics jobs"
    )]
    Masked,
    #[error("site {0} was sent no task of this job, so its statistics are refused")]
    NotAsked(String),
    #[error("site {0} has answered this job already")]
    AnsweredAlready(String),
    /// Too few releases at the deadline (or once every site answered): nothing is published.
    #[error(
        "{arrived} site(s)' statistics arrived, the job needs at least {needed}{}",
        missing_sites(declined, silent)
    )]
    TooFew {
        arrived: usize,
        needed: u32,
        /// Site -> the reason it gave (the node's public failure text).
        declined: std::collections::BTreeMap<String, String>,
        /// Sites that neither released nor declined.
        silent: Vec<String>,
    },
    #[error("statistics file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("statistics file {path} does not have the SHA-256 it is stored under ({found})")]
    Digest { path: PathBuf, found: String },
    /// A statistics file is named by its SHA-256 alone (64 lowercase hex digits): anything else
    /// (a path out of the store) is refused before the file system is asked.
    #[error("{0:?} is not a statistics file's SHA-256 (64 lowercase hex digits)")]
    NotADigest(String),
}

fn missing_sites(
    declined: &std::collections::BTreeMap<String, String>,
    silent: &[String],
) -> String {
    let mut parts: Vec<String> = declined
        .iter()
        .map(|(site, why)| format!("{site} declined: {why}"))
        .collect();
    if !silent.is_empty() {
        parts.push(format!("no answer from {}", silent.join(", ")));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}

/// A statistics job's answers as they arrive, from the sites it was sent to: each site's
/// release or decline, once. Closed when every site has answered or at the job's deadline
/// ([`StatisticsCollection::close`]): with at least `min_sites` releases the result is finished
/// ([`finish_plain`]), otherwise the job fails naming who declined (and why) and who did not
/// answer.
#[derive(Clone, Debug, Default)]
pub struct StatisticsCollection {
    asked: std::collections::BTreeSet<String>,
    releases: Vec<SiteRelease>,
    declined: std::collections::BTreeMap<String, String>,
}

impl StatisticsCollection {
    /// A collection of the answers of `sites` (those sent the job's task).
    pub fn new(sites: impl IntoIterator<Item = String>) -> Self {
        StatisticsCollection {
            asked: sites.into_iter().collect(),
            ..Default::default()
        }
    }

    fn answering(&self, site: &str) -> Result<(), StatisticsRunError> {
        if !self.asked.contains(site) {
            return Err(StatisticsRunError::NotAsked(site.to_string()));
        }
        if self.declined.contains_key(site) || self.releases.iter().any(|r| r.site == site) {
            return Err(StatisticsRunError::AnsweredAlready(site.to_string()));
        }
        Ok(())
    }

    /// A site's release; refused from a site not asked or that answered already.
    pub fn accept(&mut self, release: SiteRelease) -> Result<(), StatisticsRunError> {
        self.answering(&release.site)?;
        self.releases.push(release);
        Ok(())
    }

    /// A site's decline, with its public reason.
    pub fn decline(&mut self, site: &str, reason: &str) -> Result<(), StatisticsRunError> {
        self.answering(site)?;
        self.declined.insert(site.to_string(), reason.to_string());
        Ok(())
    }

    /// Whether every site asked has released or declined (the job need not wait longer).
    pub fn all_answered(&self) -> bool {
        self.releases.len() + self.declined.len() == self.asked.len()
    }

    /// The result from the releases in, or why there is none.
    pub fn close(self, spec: &StatisticsJobSpec) -> Result<FinishedStatistics, StatisticsRunError> {
        if self.releases.len() < spec.min_sites as usize {
            let silent = self
                .asked
                .iter()
                .filter(|s| {
                    !self.declined.contains_key(*s) && !self.releases.iter().any(|r| &r.site == *s)
                })
                .cloned()
                .collect();
            return Err(StatisticsRunError::TooFew {
                arrived: self.releases.len(),
                needed: spec.min_sites,
                declined: self.declined,
                silent,
            });
        }
        finish_plain(spec, &self.releases)
    }
}

/// The finished result: what to store and what to record.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedStatistics {
    pub published: PublishedStatistics,
    /// The `statistics.published` payload (subject: the job id).
    pub record: StatisticsPublished,
}

/// Checks the releases (each site once, a listed site, the same layout everywhere, the layout's
/// length), sums them and finishes the job's result. Plain aggregation only (see the module).
pub fn finish_plain(
    spec: &StatisticsJobSpec,
    releases: &[SiteRelease],
) -> Result<FinishedStatistics, StatisticsRunError> {
    if spec.secure_aggregation.is_some() {
        return Err(StatisticsRunError::Masked);
    }
    let Some(first) = releases.first() else {
        return Err(StatisticsRunError::NoReleases);
    };
    let mut seen = std::collections::BTreeSet::new();
    for r in releases {
        if !seen.insert(r.site.as_str()) {
            return Err(StatisticsRunError::DuplicateSite(r.site.clone()));
        }
        if !spec.sites.is_empty() && !spec.sites.contains(&r.site) {
            return Err(StatisticsRunError::NotListed {
                site: r.site.clone(),
                listed: spec.sites.join(", "),
            });
        }
        if let Some(detail) = layout_difference(&first.layout, &r.layout) {
            return Err(StatisticsRunError::LayoutDiffers {
                site: r.site.clone(),
                first: first.site.clone(),
                detail,
            });
        }
        // Checked per site here so that the error names the site (the sum checks it again).
        if r.sums.len() != first.layout.len() {
            return Err(StatisticsRunError::Site {
                site: r.site.clone(),
                source: StatsError::VectorLength {
                    expected: first.layout.len(),
                    found: r.sums.len(),
                },
            });
        }
    }
    let sum = sum_vectors(
        first.layout.len(),
        releases.iter().map(|r| r.sums.as_slice()),
    )?;
    let sites: Vec<String> = releases.iter().map(|r| r.site.clone()).collect();
    let published = spec.finish(&first.layout, &sum, &sites)?;
    let record = StatisticsPublished {
        spec_digest: spec.digest().to_hex(),
        schema: spec.data.schema.clone(),
        schema_sha256: spec.data.schema_sha256.clone().unwrap_or_default(),
        result_sha256: published.sha256.clone(),
        sites: published.sites.clone(),
        epsilon_per_site: published.epsilon_per_site.clone(),
        delta: spec.privacy.delta,
        accountant: published.accountant.clone(),
        secure_aggregation: false,
        confidence: spec.statistics.confidence,
        rows: published.dictionary.rows,
    };
    Ok(FinishedStatistics { published, record })
}

/// What differs between two layouts, for the error (column names and the schema's public
/// ranges, bins and categories only: nothing of a site's data); `None` when they are the same.
fn layout_difference(a: &StatsLayout, b: &StatsLayout) -> Option<String> {
    if a == b {
        return None;
    }
    for (i, (x, y)) in a.columns.iter().zip(&b.columns).enumerate() {
        if x != y {
            return Some(format!(
                "column {} is {} there and {} here",
                i + 1,
                describe(x),
                describe(y)
            ));
        }
    }
    Some(format!(
        "{} columns there, {} here",
        a.columns.len(),
        b.columns.len()
    ))
}

fn describe(c: &ColumnLayout) -> String {
    match c {
        ColumnLayout::Numeric {
            name,
            low,
            high,
            bins,
        } => format!("{name:?} numeric [{low}, {high}] in {bins} bins"),
        ColumnLayout::Categorical { name, categories } => {
            format!("{name:?} categorical ({} categories)", categories.len())
        }
    }
}

/// The coordinator's statistics files, content-addressed by their SHA-256 (`<sha256>.toml`):
/// what `statistics.published` names and a schema's `[standardize] sha256` accepts.
#[derive(Clone, Debug)]
pub struct StatisticsFiles {
    dir: PathBuf,
}

impl StatisticsFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StatisticsFiles { dir: dir.into() }
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.toml"))
    }

    /// Stores `published`'s file under its digest (written whole, then renamed into place, so a
    /// crash never leaves a partial file under a digest); storing it again changes nothing.
    pub fn store(&self, published: &PublishedStatistics) -> Result<PathBuf, StatisticsRunError> {
        let path = self.path(&published.sha256);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StatisticsRunError::File { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let partial = self.dir.join(format!("{}.toml.partial", published.sha256));
        std::fs::write(&partial, published.file_text.as_bytes()).map_err(io(&partial))?;
        std::fs::rename(&partial, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// The file stored under `sha256`, checked against it. A name that is not a digest is
    /// refused unread: the name may come from outside (a schema's `[standardize] sha256`), and
    /// a path in it would otherwise open any `.toml` file and report its digest.
    pub fn read(&self, sha256: &str) -> Result<String, StatisticsRunError> {
        let is_digest = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_digest {
            return Err(StatisticsRunError::NotADigest(
                sha256.chars().take(80).collect(),
            ));
        }
        let path = self.path(sha256);
        let text = std::fs::read_to_string(&path).map_err(|source| StatisticsRunError::File {
            path: path.clone(),
            source,
        })?;
        let found = hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()));
        if found != sha256 {
            return Err(StatisticsRunError::Digest { path, found });
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use tutela_privacy::noise::SecureRng;
    use tutela_privacy::stats::{
        ColumnDictionary, DataDictionary, SiteStatistics, StatsPlan, StatsValue,
    };

    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/jobs/breast_cancer_statistics.toml");

    fn spec() -> StatisticsJobSpec {
        StatisticsJobSpec::from_toml_str(EXAMPLE).expect("the documented example parses")
    }

    fn layout() -> StatsLayout {
        StatsLayout::new(vec![
            ColumnLayout::Categorical {
                name: "diagnosis".into(),
                categories: vec!["malignant".into(), "benign".into()],
            },
            ColumnLayout::Numeric {
                name: "radius".into(),
                low: 0.0,
                high: 40.0,
                bins: 8,
            },
        ])
        .expect("a valid layout")
    }

    /// Site `seed`'s release of `n` rows, radius 5 + (i mod 20), every seventh radius missing;
    /// returns the release and the site's radii.
    fn release(plan: &StatsPlan, site: &str, seed: u8, n: usize) -> (SiteRelease, Vec<f64>) {
        let mut stats = SiteStatistics::new(&layout(), plan.scale()).expect("statistics");
        let mut radii = Vec::new();
        for i in 0..n {
            let radius = (i % 7 != 0).then_some(5.0 + ((i + seed as usize) % 20) as f64);
            radii.extend(radius);
            stats
                .add_row(&[
                    StatsValue::Category(Some(i % 2)),
                    radius.map_or(StatsValue::Missing, StatsValue::Number),
                ])
                .expect("a row");
        }
        let mut sums = stats.into_sums();
        plan.noise_site_with(&mut sums, SecureRng::insecure_from_seed([seed; 32]))
            .expect("noise");
        (
            SiteRelease {
                site: site.into(),
                layout: layout(),
                sums,
            },
            radii,
        )
    }

    fn three_sites(spec: &StatisticsJobSpec) -> (Vec<SiteRelease>, Vec<f64>) {
        let plan = spec.plan(&layout()).expect("plan");
        let mut releases = Vec::new();
        let mut pooled = Vec::new();
        for (seed, site) in ["hospital-b", "hospital-a", "hospital-c"]
            .iter()
            .enumerate()
        {
            let (r, radii) = release(&plan, site, seed as u8 + 1, 3000);
            releases.push(r);
            pooled.extend(radii);
        }
        (releases, pooled)
    }

    #[test]
    fn three_sites_give_the_pooled_mean_within_its_bound_and_the_record_names_the_file() {
        let spec = spec();
        let (releases, pooled) = three_sites(&spec);
        let done = finish_plain(&spec, &releases).expect("finished");

        let Some(ColumnDictionary::Numeric {
            mean, mean_bound, ..
        }) = done.published.dictionary.column("radius")
        else {
            panic!("no radius column");
        };
        let truth = pooled.iter().sum::<f64>() / pooled.len() as f64;
        assert!(
            (mean - truth).abs() <= *mean_bound,
            "{mean} ± {mean_bound} vs {truth}"
        );

        let r = &done.record;
        assert_eq!(r.spec_digest, spec.digest().to_hex());
        assert_eq!(r.schema, "breast_cancer");
        assert_eq!(Some(&r.schema_sha256), spec.data.schema_sha256.as_ref());
        assert_eq!(r.result_sha256, done.published.sha256);
        assert_eq!(r.sites, ["hospital-a", "hospital-b", "hospital-c"]);
        assert_eq!(r.epsilon_per_site.len(), 3);
        assert!(!r.secure_aggregation);
        assert_eq!(r.rows, done.published.dictionary.rows);

        // Stored under its digest, read back checked; a changed file is refused on reading.
        let dir = tempfile::tempdir().expect("tempdir");
        let files = StatisticsFiles::new(dir.path().join("statistics"));
        let path = files.store(&done.published).expect("stored");
        assert_eq!(path, files.path(&r.result_sha256));
        files
            .store(&done.published)
            .expect("storing again is harmless");
        let text = files.read(&r.result_sha256).expect("read back");
        assert_eq!(
            DataDictionary::from_file_text(&text).expect("a statistics file"),
            done.published.dictionary
        );
        std::fs::write(&path, format!("{text}\n# edited\n")).expect("edit");
        let e = files.read(&r.result_sha256).unwrap_err();
        assert!(matches!(e, StatisticsRunError::Digest { .. }), "{e}");
    }

    #[test]
    fn mismatched_duplicate_unlisted_short_and_too_few_releases_are_refused_naming_the_site() {
        let spec = spec();
        let (releases, _) = three_sites(&spec);

        let mut other = releases.clone();
        other[2].layout = StatsLayout::new(vec![
            layout().columns[0].clone(),
            ColumnLayout::Numeric {
                name: "radius".into(),
                low: 0.0,
                high: 50.0,
                bins: 8,
            },
        ])
        .expect("layout");
        let e = finish_plain(&spec, &other).unwrap_err().to_string();
        assert!(e.contains("hospital-c") && e.contains("hospital-b"), "{e}");
        assert!(e.contains("[0, 40]") && e.contains("[0, 50]"), "{e}");

        let mut twice = releases.clone();
        twice[1].site = "hospital-b".into();
        let e = finish_plain(&spec, &twice).unwrap_err();
        assert!(
            matches!(&e, StatisticsRunError::DuplicateSite(s) if s == "hospital-b"),
            "{e}"
        );

        let mut stranger = releases.clone();
        stranger[0].site = "clinic-z".into();
        let e = finish_plain(&spec, &stranger).unwrap_err().to_string();
        assert!(e.contains("clinic-z"), "{e}");

        let mut short = releases.clone();
        short[1].sums.pop();
        let e = finish_plain(&spec, &short).unwrap_err().to_string();
        assert!(e.contains("hospital-a") && e.contains("coordinates"), "{e}");

        let e = finish_plain(&spec, &releases[..2]).unwrap_err().to_string();
        assert!(e.contains("at least 3"), "{e}");
        assert!(matches!(
            finish_plain(&spec, &[]),
            Err(StatisticsRunError::NoReleases)
        ));

        let secure = StatisticsJobSpec::from_toml_str(
            &EXAMPLE.replace("# [secure_aggregation]", "[secure_aggregation]"),
        )
        .expect("secure spec");
        assert!(matches!(
            finish_plain(&secure, &releases),
            Err(StatisticsRunError::Masked)
        ));
    }

    #[test]
    fn the_collection_takes_each_asked_site_once_and_fails_naming_declines_and_silence() {
        let spec = spec();
        let (releases, _) = three_sites(&spec);
        let asked = ["hospital-a", "hospital-b", "hospital-c"].map(String::from);

        // Every site released: all answered, finished over the three.
        let mut all = StatisticsCollection::new(asked.clone());
        for r in &releases {
            assert!(!all.all_answered());
            all.accept(r.clone()).expect("accepted");
        }
        assert!(all.all_answered());
        let e = all.accept(releases[0].clone()).unwrap_err();
        assert!(
            matches!(&e, StatisticsRunError::AnsweredAlready(s) if s == "hospital-b"),
            "{e}"
        );
        let mut stranger = releases[0].clone();
        stranger.site = "clinic-z".into();
        let e = all.accept(stranger).unwrap_err();
        assert!(
            matches!(&e, StatisticsRunError::NotAsked(s) if s == "clinic-z"),
            "{e}"
        );
        assert!(all.decline("hospital-a", "late").is_err());
        let done = all.close(&spec).expect("finished");
        assert_eq!(done.record.sites, asked);

        // One declined, one silent at the deadline: too few for min_sites = 3, both named.
        let mut short = StatisticsCollection::new(asked.clone());
        short.accept(releases[1].clone()).expect("accepted");
        short
            .decline("hospital-c", "privacy budget: over the per-job cap")
            .expect("declined");
        assert!(!short.all_answered());
        let e = short.close(&spec).unwrap_err().to_string();
        assert!(
            e.contains("1 site(s)' statistics arrived, the job needs at least 3")
                && e.contains("hospital-c declined: privacy budget")
                && e.contains("no answer from hospital-b"),
            "{e}"
        );

        // With min_sites = 2, the two that released are the result; the decline is not in it.
        let two =
            StatisticsJobSpec::from_toml_str(&EXAMPLE.replace("min_sites = 3", "min_sites = 2"))
                .expect("spec");
        let (releases, _) = three_sites(&two);
        let mut enough = StatisticsCollection::new(asked.clone());
        enough.accept(releases[0].clone()).expect("accepted");
        enough
            .decline("hospital-a", "not approved")
            .expect("declined");
        enough.accept(releases[2].clone()).expect("accepted");
        assert!(enough.all_answered());
        let done = enough.close(&two).expect("finished");
        assert_eq!(done.record.sites, ["hospital-b", "hospital-c"]);
    }
}
