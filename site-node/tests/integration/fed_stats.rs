//! Consortium statistics from site data (`data::stats` over `tutela_privacy::stats`): three
//! sites read their own files through the schema's encoders, noise their clipped sufficient
//! statistics and the sum (plain, or through the SecAgg+ state machines) equals the pooled
//! statistics within the dictionary's stated bound at confidence 1 − 10⁻⁶. Also: the breast
//! cancer data split over three sites gives the schema's own `[standardize]` (computed over the
//! pooled public data) within the bound, and the `[statistics]` section's mistakes are named.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::noise::SecureRng;
use tutela_privacy::stats::reference::Pooled;
use tutela_privacy::stats::{
    ColumnDictionary, DataDictionary, StatsAggregation, StatsPlan, StatsPrivacy, StatsValue,
};
use tutela_protocol::secagg::simulate::{Dropouts, run_round};
use tutela_protocol::secagg::{RoundConfig, threshold_for};
use tutela_site_node::data::source::csv::CsvSource;
use tutela_site_node::data::stats::{layout_of, site_statistics, standardize_from};
use tutela_site_node::data::{DataError, DatasetSchema};

/// Every feature type, missing-value rules, an unseen-category rule, and the ranges.
const SCHEMA: &str = r#"
name = "clinic"

[label]
column = "outcome"
classes = ["well", "ill"]

[[features.columns]]
name = "age"
missing = "impute_with_indicator"
impute = { statistic = "median", value = 61.5 }

[[features.columns]]
name = "sex"
type = "categorical"
categories = ["F", "M", "X"]
unseen = "other"
missing = "impute"
impute = { statistic = "mode", value = "F" }

[[features.columns]]
name = "stage"
type = "ordinal"
levels = ["I", "II", "III"]

[[features.columns]]
name = "smoker"
type = "boolean"
true_values = ["yes"]
false_values = ["no"]

[[features.columns]]
name = "admitted"
type = "date"
format = "%Y-%m-%d"
epoch = "2020-01-01"

[statistics]
bins = 16
ranges = [
  { column = "age", low = 0, high = 110 },
  { column = "admitted", low = 0, high = 1461, bins = 48 },
]
"#;

fn schema() -> DatasetSchema {
    DatasetSchema::from_toml_str(SCHEMA, "clinic.schema.toml").unwrap()
}

/// Writes site `site`'s `n` rows as CSV and returns the values the statistics should see,
/// in the layout's order (label, age, sex, stage, smoker, admitted), computed here, not read
/// back. Site 1 has no sex "X" and some unseen values; ages above 110 are clipped.
fn write_site(dir: &Path, site: u64, n: usize) -> (PathBuf, Vec<Vec<StatsValue>>) {
    let mut r = rand::rngs::StdRng::seed_from_u64(500 + site);
    let mut csv = String::from("id,outcome,age,sex,stage,smoker,admitted\n");
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        let ill = r.random_range(0..4) == 0;
        let age: Option<f64> = match r.random_range(0..100) {
            0..=11 => None,
            12 => Some(130.0),
            _ => Some(f64::from(r.random_range(20..90)) + 10.0 * site as f64 * 0.5),
        };
        let sex = match (r.random_range(0..20), site) {
            (0, 1) => ("U", StatsValue::Category(None)),
            (1, _) => ("", StatsValue::Missing),
            (2, 0) | (2, 2) => ("X", StatsValue::Category(Some(2))),
            (k, _) if k < 11 => ("F", StatsValue::Category(Some(0))),
            _ => ("M", StatsValue::Category(Some(1))),
        };
        let stage = r.random_range(0..3usize);
        let smoker = r.random_range(0..3) == 0;
        let day = r.random_range(0..1461i64);
        let date = tutela_privacy::anonymize::Date(
            tutela_privacy::anonymize::Date::from_ymd(2020, 1, 1)
                .unwrap()
                .0
                + day as i32,
        );
        let _ = writeln!(
            csv,
            "{i},{},{},{},{},{},{date}",
            if ill { "ill" } else { "well" },
            age.map_or(String::new(), |a| a.to_string()),
            sex.0,
            ["I", "II", "III"][stage],
            if smoker { "yes" } else { "no" },
        );
        values.push(vec![
            StatsValue::Category(Some(usize::from(ill))),
            age.map_or(StatsValue::Missing, StatsValue::Number),
            sex.1,
            StatsValue::Number(stage as f64),
            StatsValue::Category(Some(usize::from(smoker))),
            StatsValue::Number(day as f64),
        ]);
    }
    let path = dir.join(format!("site{site}.csv"));
    std::fs::write(&path, csv).unwrap();
    (path, values)
}

fn privacy() -> StatsPrivacy {
    StatsPrivacy {
        target_epsilon: 1.0,
        delta: 1e-6,
        accountant: Accountant::Rdp,
    }
}

/// Each site's noised statistics of its own file.
fn site_vectors(schema: &DatasetSchema, plan: &StatsPlan, files: &[PathBuf]) -> Vec<Vec<i64>> {
    files
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let mut source = CsvSource::open(path).unwrap();
            let stats = site_statistics(&mut source, schema, plan.scale()).unwrap();
            let mut v = stats.into_sums();
            plan.noise_site_with(&mut v, SecureRng::insecure_from_seed([i as u8 + 9; 32]))
                .unwrap();
            v
        })
        .collect()
}

#[test]
fn three_sites_files_give_the_pooled_statistics_within_the_bound_plain_and_secure() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let layout = layout_of(&schema, Path::new("clinic.schema.toml")).unwrap();
    let (files, rows): (Vec<_>, Vec<_>) = (0..3).map(|s| write_site(dir.path(), s, 12_000)).unzip();
    let pooled = Pooled::of_rows(&layout, rows.iter().flatten().map(Vec::as_slice));

    // Plain: each site's noised vector is released and the coordinator adds them.
    let plan = StatsPlan::new(&layout, &privacy(), StatsAggregation::Plain).unwrap();
    let mut sum = vec![0i64; layout.len()];
    for v in site_vectors(&schema, &plan, &files) {
        sum.iter_mut().zip(v).for_each(|(a, x)| *a += x);
    }
    let plain = DataDictionary::from_sum(&layout, &plan, &sum, 3, 1.0 - 1e-6).unwrap();
    let bad = plain.violations(&pooled);
    assert!(bad.is_empty(), "plain: {bad:#?}");

    // Secure: the same through SecAgg+; each site adds a third of the noise variance.
    let plan = StatsPlan::new(
        &layout,
        &privacy(),
        StatsAggregation::Secure { min_survivors: 3 },
    )
    .unwrap();
    let vectors = site_vectors(&schema, &plan, &files);
    let config = RoundConfig {
        job_digest: [3; 32],
        round: 1,
        sites: 3,
        degree: 2,
        threshold: threshold_for(2, 0.5),
        min_survivors: 2,
        graph_seed: [4; 32],
        vector_len: layout.len() as u64,
    };
    let (out, _) = run_round(
        &config,
        |s| vectors[s as usize].clone(),
        &Dropouts::none(),
        1,
        1,
        None,
    )
    .unwrap();
    let secure = DataDictionary::from_sum(&layout, &plan, &out.sum, 3, 1.0 - 1e-6).unwrap();
    let bad = secure.violations(&pooled);
    assert!(bad.is_empty(), "secure: {bad:#?}");
    assert!(secure.epsilon <= 1.0 + 1e-9 && plain.epsilon <= 1.0 + 1e-9);

    // The figures are useful at this size: age's mean within 1 year, the stage's within 0.05.
    let Some(ColumnDictionary::Numeric { mean_bound, .. }) = secure.column("age") else {
        panic!("no age")
    };
    assert!(*mean_bound < 1.0, "{mean_bound}");
    let Some(ColumnDictionary::Numeric {
        mean, mean_bound, ..
    }) = secure.column("stage")
    else {
        panic!("no stage")
    };
    assert!(
        *mean_bound < 0.05 && (*mean - 1.0).abs() < 0.1,
        "{mean} ± {mean_bound}"
    );

    // The schema's [standardize] from the dictionary: one mean and std per encoded feature.
    let spec = standardize_from(&schema, &secure, Path::new("clinic.schema.toml")).unwrap();
    assert_eq!(spec.mean.len(), schema.declared_feature_count().unwrap());
    // age(missing) is the missing share (12%), sex=F about half, smoker a third.
    assert!((spec.mean[1] - 0.12).abs() < 0.02, "{:?}", spec.mean);
    assert!((spec.mean[2] - 0.5).abs() < 0.1, "{:?}", spec.mean);
    assert!((spec.mean[7] - 1.0 / 3.0).abs() < 0.02, "{:?}", spec.mean);

    // Written as a statistics file, named by a schema with its digest: the schema standardizes
    // with it, and a file with another digest is refused naming both.
    let text = secure.to_file_text().unwrap();
    std::fs::write(dir.path().join("clinic.stats.toml"), &text).unwrap();
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()));
    let naming = |digest: &str| {
        format!(
            "{SCHEMA}\n[standardize]\nstatistics = \"clinic.stats.toml\"\nsha256 = \"{digest}\"\n"
        )
    };
    let schema_path = dir.path().join("clinic.schema.toml");
    std::fs::write(&schema_path, naming(&digest)).unwrap();
    let bound = DatasetSchema::load(&schema_path).unwrap();
    let standardize = bound.standardize.as_ref().unwrap();
    assert_eq!(standardize.mean, spec.mean);
    assert_eq!(standardize.std, spec.std);
    assert!(bound.standardizer().unwrap().is_some());
    let other = "0".repeat(64);
    std::fs::write(&schema_path, naming(&other)).unwrap();
    let e = DatasetSchema::load(&schema_path).unwrap_err().to_string();
    assert!(
        e.contains(&digest) && e.contains(&other) && e.contains("clinic.schema.toml"),
        "{e}"
    );
}

#[test]
fn breast_cancer_over_three_sites_gives_the_schemas_pooled_standardization_within_the_bound() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let schema_path = root.join("data/breast_cancer.schema.toml");
    let schema = DatasetSchema::load(&schema_path).unwrap();
    let layout = layout_of(&schema, &schema_path).unwrap();
    let text = std::fs::read_to_string(root.join("data/breast_cancer_wisconsin.csv")).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let lines: Vec<&str> = body.lines().collect();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..3)
        .map(|s| {
            let path = dir.path().join(format!("site{s}.csv"));
            let part: Vec<&str> = lines.iter().skip(s).step_by(3).copied().collect();
            std::fs::write(&path, format!("{header}\n{}\n", part.join("\n"))).unwrap();
            path
        })
        .collect();
    // A generous ε: 569 rows over 31 columns are few; the bound says how few.
    let privacy = StatsPrivacy {
        target_epsilon: 8.0,
        ..privacy()
    };
    let plan = StatsPlan::new(&layout, &privacy, StatsAggregation::Plain).unwrap();
    let mut sum = vec![0i64; layout.len()];
    for v in site_vectors(&schema, &plan, &files) {
        sum.iter_mut().zip(v).for_each(|(a, x)| *a += x);
    }
    let dict = DataDictionary::from_sum(&layout, &plan, &sum, 3, 1.0 - 1e-6).unwrap();
    assert!(
        (dict.rows - 569.0).abs() <= dict.rows_bound,
        "{} ± {}",
        dict.rows,
        dict.rows_bound
    );
    // The schema's [standardize] was computed over the same 569 rows (all inside the ranges).
    let reference = schema.standardize.as_ref().unwrap();
    let mut within = 0;
    for (i, column) in dict.columns.iter().skip(1).enumerate() {
        let ColumnDictionary::Numeric {
            name,
            mean,
            mean_bound,
            std,
            std_bound,
            low,
            high,
            ..
        } = column
        else {
            panic!("{column:?}")
        };
        // The schema rounds to 6 significant digits.
        let (m, s) = (f64::from(reference.mean[i]), f64::from(reference.std[i]));
        let slack = 1e-5 * m.abs().max(s);
        assert!(
            (mean - m).abs() <= mean_bound + slack,
            "{name}: mean {mean} ± {mean_bound}, pooled {m}"
        );
        assert!(
            (std - s).abs() <= std_bound + slack,
            "{name}: std {std} ± {std_bound}, pooled {s}"
        );
        // Better than knowing nothing (the mean is somewhere in the range: a bound of half of
        // it at best): at this size and ε the bounds are 0.2 to 0.4 of the range.
        eprintln!(
            "{name}: mean bound {:.3} of the range",
            mean_bound / (high - low)
        );
        within += usize::from(*mean_bound < 0.4 * (high - low));
    }
    assert!(
        within >= 27,
        "only {within} of 30 mean bounds under 0.4 of their range"
    );
}

#[test]
fn the_statistics_section_names_its_mistakes() {
    let refused = |from: &str, to: &str| -> String {
        let text = SCHEMA.replace(from, to);
        assert_ne!(text, SCHEMA, "{from:?} not in the schema");
        match DatasetSchema::from_toml_str(&text, "clinic.schema.toml") {
            Err(e @ DataError::SchemaInvalid { .. }) => e.to_string(),
            other => panic!("{other:?}"),
        }
    };
    let e = refused("  { column = \"age\", low = 0, high = 110 },\n", "");
    assert!(
        e.contains("clinic.schema.toml") && e.contains("no range for \"numeric\" column \"age\""),
        "{e}"
    );
    let e = refused("column = \"admitted\"", "column = \"discharged\"");
    assert!(e.contains("\"discharged\""), "{e}");
    let e = refused("low = 0, high = 110", "low = 110, high = 0");
    assert!(e.contains("\"age\"") && e.contains("low < high"), "{e}");
    let e = refused(
        "  { column = \"age\", low = 0, high = 110 },\n",
        "  { column = \"age\", low = 0, high = 110 },\n  { column = \"stage\", low = 0, high = 2 },\n",
    );
    assert!(e.contains("\"stage\"") && e.contains("not numeric"), "{e}");

    // A site whose file holds text in a numeric column: the read's error names file, line, column.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.csv");
    std::fs::write(
        &path,
        "outcome,age,sex,stage,smoker,admitted\nwell,40,F,I,no,2020-01-02\nill,forty,M,II,yes,2020-01-03\n",
    )
    .unwrap();
    let e = site_statistics(&mut CsvSource::open(&path).unwrap(), &schema(), 1024).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("bad.csv") && e.contains("line 3") && e.contains("\"age\""),
        "{e}"
    );
}

/// A statistics *job* end to end through the libraries its services call: the job spec (the
/// documented example's keys, on the clinic schema by its digest) gives each of three sites its
/// release (`release_for_job`) and the coordinator its finishing step
/// (`StatisticsJobSpec::finish`, after `sum_vectors`); the result is the pooled statistics within
/// the bound, each site's ε is the spec's target, and the file it produces, named by a schema's
/// `[standardize]` with the digest `finish` reported, standardizes that schema.
#[test]
fn a_statistics_job_spec_drives_the_sites_releases_and_the_coordinators_result() {
    use tutela_protocol::job::StatisticsJobSpec;
    use tutela_protocol::job::statistics::sum_vectors;
    use tutela_site_node::data::stats::release_for_job_with;

    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let layout = layout_of(&schema, Path::new("clinic.schema.toml")).unwrap();
    let (files, rows): (Vec<_>, Vec<_>) = (0..3).map(|s| write_site(dir.path(), s, 4_000)).unzip();
    let pooled = Pooled::of_rows(&layout, rows.iter().flatten().map(Vec::as_slice));
    let schema_digest = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        SCHEMA.as_bytes(),
    ));
    let job = StatisticsJobSpec::from_toml_str(&format!(
        "kind = \"statistics\"\nname = \"clinic-dictionary\"\nmin_sites = 3\ndeadline_secs = 60\n\
         [data]\nschema = \"clinic\"\nschema_sha256 = \"{schema_digest}\"\n\
         [privacy]\ntarget_epsilon = 2.0\n"
    ))
    .unwrap();

    let releases: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let mut source = CsvSource::open(path).unwrap();
            release_for_job_with(
                &mut source,
                &schema,
                &job,
                Some(SecureRng::insecure_from_seed([i as u8 + 21; 32])),
            )
            .unwrap()
        })
        .collect();
    for r in &releases {
        // Every site derived the same query and noise from the spec and the schema.
        assert_eq!(r.layout, layout);
        assert_eq!(r.plan, releases[0].plan);
        assert_eq!(r.rows, 4_000);
        assert!(
            r.plan.epsilon <= 2.0 + 1e-9 && r.plan.epsilon > 1.9,
            "{}",
            r.plan.epsilon
        );
    }
    let sum = sum_vectors(layout.len(), releases.iter().map(|r| r.vector.as_slice())).unwrap();
    let sites: Vec<String> = ["c", "a", "b"].map(String::from).to_vec();
    let result = job.finish(&layout, &sum, &sites).unwrap();
    let bad = result.dictionary.violations(&pooled);
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(result.sites, ["a", "b", "c"]);
    assert!(
        result
            .epsilon_per_site
            .values()
            .all(|e| (*e - releases[0].plan.epsilon).abs() < 1e-12)
    );

    // The file, named by a schema with the digest `finish` reported, standardizes it.
    std::fs::write(dir.path().join("clinic.stats.toml"), &result.file_text).unwrap();
    let schema_path = dir.path().join("clinic.schema.toml");
    std::fs::write(
        &schema_path,
        format!(
            "{SCHEMA}\n[standardize]\nstatistics = \"clinic.stats.toml\"\nsha256 = \"{}\"\n",
            result.sha256
        ),
    )
    .unwrap();
    let named = DatasetSchema::load(&schema_path).unwrap();
    let expected = standardize_from(&schema, &result.dictionary, &schema_path).unwrap();
    let standardize = named.standardize.as_ref().unwrap();
    assert_eq!(standardize.mean, expected.mean);
    assert_eq!(standardize.std, expected.std);
}

/// The site's ledger charges a statistics job's release as one unsampled Gaussian step (round
/// 1), within the site's caps, once: the `privacy.spent` record it anchors states q = 1, one
/// step and the plan's ε; a per-job or total cap the release would pass refuses it with nothing
/// recorded; the same job is not charged (so not released) twice; a masked (SecAgg) release is
/// refused, since the ledger cannot state its ε yet.
#[test]
fn a_statistics_release_is_charged_once_as_one_unsampled_step_within_the_sites_caps() {
    use std::sync::Arc;
    use tutela_protocol::job::StatisticsJobSpec;
    use tutela_site_node::ledger::{
        FixedCaps, PrivacyBudgetConfig, SiteLedgers, StatisticsChargeError,
    };

    // A refusal of the budget, which may be the decline's reason (no path in it).
    let refused = |r: Result<_, StatisticsChargeError>| match r {
        Err(StatisticsChargeError::Refused(why)) => why,
        other => panic!("expected a budget refusal, got {other:?}"),
    };

    let dir = tempfile::tempdir().unwrap();
    let layout = layout_of(&schema(), Path::new("clinic.schema.toml")).unwrap();
    let spec_text = "kind = \"statistics\"\nname = \"clinic-dictionary\"\nmin_sites = 2\n\
                     deadline_secs = 60\n[data]\nschema = \"clinic\"\nschema_sha256 = \
                     \"0000000000000000000000000000000000000000000000000000000000000000\"\n\
                     [privacy]\ntarget_epsilon = 2.0\n";
    let job = StatisticsJobSpec::from_toml_str(spec_text).unwrap();
    let plan = job.plan(&layout).unwrap();
    let ledgers = |name: &str, per_job: Option<f64>, total: Option<f64>| {
        SiteLedgers::new(dir.path().join(name), None, PrivacyBudgetConfig::default())
            .with_caps(Arc::new(FixedCaps { per_job, total }))
    };

    // Uncapped: one step at q = 1 with the plan's noise multiplier, the plan's ε.
    let open = ledgers("uncapped", None, None);
    let charged = open
        .charge_statistics("job-1", "clinic", &plan, 4_000, 1_000)
        .unwrap();
    let g = &charged.charge.group;
    assert_eq!((g.sample_rate, g.steps), (1.0, 1));
    assert!((g.noise_multiplier - plan.site_noise / plan.sensitivity.l2).abs() < 1e-12);
    assert_eq!((charged.charge.round, charged.charge.attempt), (1, 1));
    assert_eq!(charged.epsilon, plan.epsilon);
    let single = charged.dataset_epsilon;
    assert!(single > 0.0 && single <= plan.epsilon, "{single}");
    // What `spend_anchor::anchor_charge` appends before the vector leaves.
    let spent = open
        .spend_payload(
            "hospital-a",
            "clinic",
            "job-1",
            &charged.charge,
            plan.delta,
            Accountant::Rdp,
        )
        .unwrap();
    assert_eq!(
        (spent.sample_rate, spent.steps, spent.rows),
        (1.0, 1, 4_000)
    );
    assert!(
        (spent.job_epsilon - plan.epsilon).abs() < 1e-6 * plan.epsilon,
        "{} vs {}",
        spent.job_epsilon,
        plan.epsilon
    );
    // Once: the same job again is refused, and the ledger still holds one step.
    let e = refused(open.charge_statistics("job-1", "clinic", &plan, 4_000, 2_000));
    assert!(e.contains("released once"), "{e}");
    assert_eq!(
        open.open("clinic").unwrap().job("job-1").unwrap().steps(),
        1
    );

    // A per-job cap below the release's ε: refused, nothing recorded.
    let tight = ledgers("per-job", Some(0.5 * single), None);
    let e = refused(tight.charge_statistics("job-1", "clinic", &plan, 4_000, 1_000));
    assert!(e.contains("per-job") || e.contains("per job"), "{e}");
    assert!(tight.open("clinic").unwrap().job("job-1").is_none());

    // A total cap that holds one release and not two: the second job is refused.
    let total = ledgers("total", None, Some(1.2 * single));
    total
        .charge_statistics("job-1", "clinic", &plan, 4_000, 1_000)
        .unwrap();
    let e = refused(total.charge_statistics("job-2", "clinic", &plan, 4_000, 2_000));
    assert!(e.contains("total"), "{e}");
    assert!(total.open("clinic").unwrap().job("job-2").is_none());

    // Secure aggregation: not charged (the ledger cannot state the masked sum's ε yet).
    let secure =
        StatisticsJobSpec::from_toml_str(&format!("{spec_text}[secure_aggregation]\n")).unwrap();
    let e = refused(open.charge_statistics(
        "job-3",
        "clinic",
        &secure.plan(&layout).unwrap(),
        4_000,
        3_000,
    ));
    assert!(e.contains("secure_aggregation"), "{e}");

    // A ledger that cannot be read is the ledger's error (it names the file: the site's log).
    let broken = ledgers("broken", None, None);
    std::fs::create_dir_all(dir.path().join("broken")).unwrap();
    std::fs::write(dir.path().join("broken/clinic.json"), "not a ledger").unwrap();
    assert!(matches!(
        broken.charge_statistics("job-1", "clinic", &plan, 4_000, 1_000),
        Err(StatisticsChargeError::Ledger(_))
    ));
}

/// The site's whole release in its private order (`SiteLedgers::release_statistics`): a job
/// naming another schema file is refused with both digests' prefixes and nothing charged; a
/// release over the budget is refused before any record is read (a file with an unreadable
/// cell gives the budget's refusal, not the read's error); a readable dataset gives a release
/// charged as one step, whose vector is the site's noised statistics; the job is not released
/// twice; an unreadable cell within the budget is the data's error (for the site's log) and
/// nothing is charged.
#[test]
fn the_sites_statistics_release_checks_the_schema_and_the_budget_before_the_read_and_is_charged() {
    use std::sync::Arc;
    use tutela_protocol::job::StatisticsJobSpec;
    use tutela_site_node::ledger::{
        FixedCaps, PrivacyBudgetConfig, SiteLedgers, StatisticsChargeError, StatisticsReleaseError,
    };

    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let site_digest = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        SCHEMA.as_bytes(),
    ));
    let job_of = |digest: &str| {
        StatisticsJobSpec::from_toml_str(&format!(
            "kind = \"statistics\"\nname = \"clinic-dictionary\"\nmin_sites = 1\n\
             deadline_secs = 60\n[data]\nschema = \"clinic\"\nschema_sha256 = \"{digest}\"\n\
             [privacy]\ntarget_epsilon = 2.0\n"
        ))
        .unwrap()
    };
    let job = job_of(&site_digest);
    let ledgers = |name: &str, per_job: Option<f64>| {
        SiteLedgers::new(dir.path().join(name), None, PrivacyBudgetConfig::default()).with_caps(
            Arc::new(FixedCaps {
                per_job,
                total: None,
            }),
        )
    };
    let (good, _) = write_site(dir.path(), 0, 2_000);
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "outcome,age,sex,stage,smoker,admitted\nwell,40,F,I,no,2020-01-02\nill,forty,M,II,yes,2020-01-03\n",
    )
    .unwrap();
    let open = |path: &Path| CsvSource::open(path).unwrap();
    let rng = || Some(SecureRng::insecure_from_seed([9; 32]));

    // Another schema file: refused naming both prefixes, nothing charged.
    let site = ledgers("site", None);
    let other = "ab".repeat(32);
    let e = site
        .release_statistics(
            ("job-1", "clinic"),
            &job_of(&other),
            (&schema, &site_digest),
            &mut open(&good),
            rng(),
            1_000,
        )
        .unwrap_err();
    assert!(
        matches!(&e, StatisticsReleaseError::SchemaDigest(m) if m.job == other[..12] && m.site == site_digest[..12]),
        "{e}"
    );
    assert!(site.open("clinic").unwrap().job("job-1").is_none());

    // Over the per-job cap: refused by the budget before the unreadable file is read.
    let tight = ledgers("tight", Some(0.01));
    let e = tight
        .release_statistics(
            ("job-1", "clinic"),
            &job,
            (&schema, &site_digest),
            &mut open(&bad),
            rng(),
            1_000,
        )
        .unwrap_err();
    assert!(
        matches!(&e, StatisticsReleaseError::Charge(StatisticsChargeError::Refused(why)) if why.contains("per-job") || why.contains("per job")),
        "{e}"
    );

    // Within the budget, an unreadable cell: the read's error, nothing charged.
    let e = site
        .release_statistics(
            ("job-1", "clinic"),
            &job,
            (&schema, &site_digest),
            &mut open(&bad),
            rng(),
            1_000,
        )
        .unwrap_err();
    assert!(matches!(&e, StatisticsReleaseError::Data(_)), "{e}");
    assert!(e.to_string().contains("line 3"), "{e}");
    assert!(site.open("clinic").unwrap().job("job-1").is_none());

    // The release: charged once, one step, the site's own noised vector.
    let charged = site
        .release_statistics(
            ("job-1", "clinic"),
            &job,
            (&schema, &site_digest),
            &mut open(&good),
            rng(),
            1_000,
        )
        .unwrap();
    let expected =
        tutela_site_node::data::stats::release_for_job_with(&mut open(&good), &schema, &job, rng())
            .unwrap();
    assert_eq!(charged.release().vector, expected.vector);
    assert_eq!(charged.release().rows, 2_000);
    assert_eq!(charged.charge().charge.group.steps, 1);
    assert_eq!(
        site.open("clinic").unwrap().job("job-1").unwrap().steps(),
        1
    );
    let e = site
        .release_statistics(
            ("job-1", "clinic"),
            &job,
            (&schema, &site_digest),
            &mut open(&good),
            rng(),
            2_000,
        )
        .unwrap_err();
    assert!(e.to_string().contains("released once"), "{e}");
}

/// A statistics release's spend is anchored like a round's: the `privacy.spent` made from its
/// charge is one the ledger holds; a ledger lost since (a fresh file) is behind the trail and
/// refused, and restored from the trail it holds the release's ε again and will not release
/// the job a second time — losing the ledger does not reset the site's budget.
#[test]
fn a_statistics_spend_in_the_trail_survives_the_ledger_being_lost() {
    use std::sync::Arc;
    use tutela_protocol::job::StatisticsJobSpec;
    use tutela_site_node::ledger::{
        AnchoredSpend, FixedCaps, PrivacyBudgetConfig, SiteLedgers, StatisticsChargeError,
    };

    let dir = tempfile::tempdir().unwrap();
    let layout = layout_of(&schema(), Path::new("clinic.schema.toml")).unwrap();
    let job = StatisticsJobSpec::from_toml_str(
        "kind = \"statistics\"\nname = \"clinic-dictionary\"\nmin_sites = 1\n\
         deadline_secs = 60\n[data]\nschema = \"clinic\"\nschema_sha256 = \
         \"0000000000000000000000000000000000000000000000000000000000000000\"\n\
         [privacy]\ntarget_epsilon = 1.0\n",
    )
    .unwrap();
    let plan = job.plan(&layout).unwrap();
    let ledgers = |name: &str| {
        SiteLedgers::new(dir.path().join(name), None, PrivacyBudgetConfig::default()).with_caps(
            Arc::new(FixedCaps {
                per_job: None,
                total: Some(10.0),
            }),
        )
    };

    let site = ledgers("site");
    let charged = site
        .charge_statistics("job-1", "clinic", &plan, 500, 1_000)
        .unwrap();
    assert_eq!(site.unanchored("clinic").unwrap().len(), 1);
    let payload = site
        .spend_payload(
            "hospital-a",
            "clinic",
            "job-1",
            &charged.charge,
            plan.delta,
            Accountant::Rdp,
        )
        .unwrap();
    let anchored = AnchoredSpend {
        seq: 7,
        timestamp_unix_ms: 1_000,
        payload,
    };
    site.mark_anchored("clinic", "job-1", (1, 1), 7).unwrap();
    assert!(site.unanchored("clinic").unwrap().is_empty());
    site.check_against_trail("clinic", std::slice::from_ref(&anchored))
        .unwrap();

    // The ledger lost: behind the trail, refused; restored, the spend and the "once" are back.
    let lost = ledgers("lost");
    assert!(
        lost.check_against_trail("clinic", std::slice::from_ref(&anchored))
            .is_err()
    );
    let restored = lost
        .restore_from_trail("clinic", std::slice::from_ref(&anchored))
        .unwrap();
    assert!(
        (restored - charged.dataset_epsilon).abs() < 1e-9,
        "{restored} vs {}",
        charged.dataset_epsilon
    );
    lost.check_against_trail("clinic", &[anchored]).unwrap();
    match lost.charge_statistics("job-1", "clinic", &plan, 500, 2_000) {
        Err(StatisticsChargeError::Refused(why)) => assert!(why.contains("released once"), "{why}"),
        other => panic!("expected the job refused, got {other:?}"),
    }
}
