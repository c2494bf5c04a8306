//! Attacks on the coordinator's finishing step of a statistics job (2026-12-07, branch
//! `attack-s8`; `tutela_coordinator::statistics`): a malicious site's vector of extreme or
//! negative counts, and a statistics file asked for by a name that is not a digest (a path out
//! of the store).

use tutela_coordinator::statistics::{
    SiteRelease, StatisticsFiles, StatisticsRunError, finish_plain,
};
use tutela_privacy::noise::SecureRng;
use tutela_privacy::stats::{ColumnLayout, SiteStatistics, StatsLayout, StatsValue};
use tutela_protocol::job::statistics::StatisticsJobSpec;

const EXAMPLE: &str = include_str!("../../../deploy/jobs/breast_cancer_statistics.toml");

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

/// An honest site's noised release of `n` rows.
fn honest(spec: &StatisticsJobSpec, site: &str, seed: u8, n: usize) -> SiteRelease {
    let plan = spec.plan(&layout()).expect("plan");
    let mut stats = SiteStatistics::new(&layout(), plan.scale()).expect("statistics");
    for i in 0..n {
        stats
            .add_row(&[
                StatsValue::Category(Some(i % 2)),
                StatsValue::Number(5.0 + (i % 20) as f64),
            ])
            .expect("a row");
    }
    let mut sums = stats.into_sums();
    plan.noise_site_with(&mut sums, SecureRng::insecure_from_seed([seed; 32]))
        .expect("noise");
    SiteRelease {
        site: site.into(),
        layout: layout(),
        sums,
    }
}

/// A site that sends what it likes of the right length: every published figure stays a
/// number (no NaN or infinity in the file a schema's `[standardize]` later reads), and nothing
/// panics; a sum past 64 bits is refused.
#[test]
fn a_site_s_extreme_or_negative_counts_give_finite_figures_or_a_refusal_never_a_panic() {
    let spec = StatisticsJobSpec::from_toml_str(EXAMPLE).expect("the documented example");
    let n = layout().len();
    let vectors: Vec<(&str, Vec<i64>)> = vec![
        ("all negative", vec![-(1 << 40); n]),
        ("huge", vec![i64::MAX / 8; n]),
        ("negative rows, huge sums", {
            let mut v = vec![i64::MAX / 8; n];
            v[0] = -(1 << 50);
            v
        }),
        ("zero rows, huge sums", {
            let mut v = vec![i64::MAX / 8; n];
            v[0] = 0;
            v
        }),
        (
            "alternating extremes",
            (0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        i64::MAX / 8
                    } else {
                        -(i64::MAX / 8)
                    }
                })
                .collect(),
        ),
        ("most negative", vec![i64::MIN; n]),
    ];
    for (what, sums) in vectors {
        let mut releases = vec![
            honest(&spec, "hospital-a", 1, 500),
            honest(&spec, "hospital-b", 2, 500),
        ];
        releases.push(SiteRelease {
            site: "hospital-c".into(),
            layout: layout(),
            sums,
        });
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            finish_plain(&spec, &releases)
        }))
        .unwrap_or_else(|_| panic!("{what}: finishing the job panicked"));
        match finished {
            Err(StatisticsRunError::Stats(e)) => {
                assert!(
                    e.to_string().contains("overflow") || e.to_string().contains("64"),
                    "{what}: {e}"
                );
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(done) => {
                let file: toml::Value = toml::from_str(&done.published.file_text)
                    .unwrap_or_else(|e| panic!("{what}: the published file does not parse: {e}"));
                let mut bad = Vec::new();
                non_finite(&file, "", &mut bad);
                assert!(
                    bad.is_empty(),
                    "{what}: the published file holds non-numbers at {bad:?}:\n{}",
                    done.published.file_text
                );
                assert!(
                    done.record.rows.is_finite(),
                    "{what}: rows {}",
                    done.record.rows
                );
            }
        }
    }
}

/// The paths of `value`'s floats that are NaN or infinite.
fn non_finite(value: &toml::Value, at: &str, bad: &mut Vec<String>) {
    match value {
        toml::Value::Float(f) if !f.is_finite() => bad.push(at.to_string()),
        toml::Value::Table(t) => {
            for (k, v) in t {
                non_finite(v, &format!("{at}.{k}"), bad);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                non_finite(v, &format!("{at}[{i}]"), bad);
            }
        }
        _ => {}
    }
}

/// The store is content-addressed: a name that is not a SHA-256 in hex (a path out of the
/// directory) is refused before the file system is touched, so the error neither says whether
/// such a file exists nor gives its digest.
#[test]
fn a_statistics_file_asked_for_by_a_path_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("statistics");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(dir.path().join("secret.toml"), "password = \"hunter2\"\n").unwrap();
    let files = StatisticsFiles::new(&store);
    for name in [
        "../secret",
        "/etc/hostname",
        "..%2fsecret",
        "",
        &"A".repeat(64),
        &format!("{}/../../secret", "0".repeat(64)),
    ] {
        let e = files.read(name).expect_err(name);
        let text = e.to_string();
        assert!(
            matches!(e, StatisticsRunError::NotADigest(_)),
            "{name:?}: {text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
    // A well-formed digest that is not stored is simply absent.
    let e = files.read(&"0".repeat(64)).unwrap_err();
    assert!(matches!(e, StatisticsRunError::File { .. }), "{e}");
}
