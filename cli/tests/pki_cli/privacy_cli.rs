//! `tutela privacy epsilon|noise`: the real binary; the answer names the accountant whose bound
//! it is.

use super::{fails, ok};

fn epsilon_of(line: &str) -> f64 {
    line.split("epsilon = ")
        .nth(1)
        .and_then(|rest| rest.split([' ', ',']).next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no epsilon in {line:?}"))
}

const MNIST: [&str; 8] = [
    "--sample-rate",
    "0.0042666667",
    "--noise-multiplier",
    "1.1",
    "--steps",
    "14062",
    "--delta",
    "1e-5",
];

#[test]
fn epsilon_names_the_accountant_that_gave_it() {
    let with = |accountant: &str| {
        let mut args = vec!["privacy", "epsilon"];
        args.extend(MNIST);
        args.extend(["--accountant", accountant]);
        ok(&args)
    };
    let pld = with("pld");
    assert!(pld.contains("by pld"), "{pld}");
    // dp-accounting gives 2.38169 here; ours is above it, within 1%.
    let eps = epsilon_of(&pld);
    assert!((2.3816..2.39).contains(&eps), "{pld}");
    let rdp = with("rdp");
    assert!(
        rdp.contains("by rdp") && rdp.contains("optimal order"),
        "{rdp}"
    );
    assert!(epsilon_of(&rdp) > eps);
    // The pessimistic PLD is looser than RDP over 14,062 steps: RDP's bound is reported.
    let loose = with("pld-pessimistic");
    assert!(loose.contains("by rdp"), "{loose}");
    assert_eq!(epsilon_of(&loose), epsilon_of(&rdp));
    // Where the PLD grid would be too large, RDP's finite bound, named.
    let tiny = ok(&[
        "privacy",
        "epsilon",
        "--sample-rate",
        "1",
        "--noise-multiplier",
        "0.01",
        "--steps",
        "3",
        "--delta",
        "1e-5",
        "--accountant",
        "pld",
    ]);
    assert!(
        tiny.contains("by rdp") && epsilon_of(&tiny).is_finite(),
        "{tiny}"
    );
}

#[test]
fn noise_meets_the_target_and_names_the_accountant() {
    let out = ok(&[
        "privacy",
        "noise",
        "--sample-rate",
        "0.01",
        "--epsilon",
        "1",
        "--steps",
        "1000",
        "--delta",
        "1e-6",
        "--accountant",
        "pld",
    ]);
    assert!(out.contains("by pld"), "{out}");
    assert!(epsilon_of(&out) <= 1.0, "{out}");
    let err = fails(&[
        "privacy",
        "epsilon",
        "--sample-rate",
        "0",
        "--noise-multiplier",
        "1",
        "--steps",
        "10",
        "--delta",
        "1e-5",
    ]);
    assert!(err.contains("sample rate"), "{err}");
}

/// `tutela privacy stats FILE` prints a consortium statistics file rounded for people, every
/// figure with its bound; a file that is not one is refused naming it.
#[test]
fn stats_prints_a_statistics_file_rounded_with_its_bounds() {
    use tutela_privacy::accountant::Accountant;
    use tutela_privacy::noise::SecureRng;
    use tutela_privacy::stats::{
        ColumnLayout, DataDictionary, SiteStatistics, StatsAggregation, StatsLayout, StatsPlan,
        StatsPrivacy, StatsValue,
    };
    let layout = StatsLayout::new(vec![
        ColumnLayout::Numeric {
            name: "age".into(),
            low: 0.0,
            high: 100.0,
            bins: 10,
        },
        ColumnLayout::Categorical {
            name: "sex".into(),
            categories: vec!["F".into(), "M".into()],
        },
    ])
    .unwrap();
    let privacy = StatsPrivacy {
        target_epsilon: 1.0,
        delta: 1e-6,
        accountant: Accountant::Rdp,
    };
    let plan = StatsPlan::new(&layout, &privacy, StatsAggregation::Plain).unwrap();
    let mut site = SiteStatistics::new(&layout, plan.scale()).unwrap();
    for i in 0..5000u32 {
        let sex = StatsValue::Category(Some(i as usize % 2));
        site.add_row(&[StatsValue::Number(f64::from(i % 80) + 10.0), sex])
            .unwrap();
    }
    let mut sums = site.into_sums();
    plan.noise_site_with(&mut sums, SecureRng::insecure_from_seed([1; 32]))
        .unwrap();
    let dict = DataDictionary::from_sum(&layout, &plan, &sums, 1, 0.999).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clinic.stats.toml");
    std::fs::write(&file, dict.to_file_text().unwrap()).unwrap();
    let out = ok(&["privacy", "stats", file.to_str().unwrap()]);
    assert!(
        out.contains("over 1 sites") && out.contains("epsilon 1 at delta"),
        "{out}"
    );
    let age = out
        .lines()
        .find(|l| l.starts_with("age"))
        .unwrap_or_else(|| panic!("{out}"));
    // Mean 49.5 (± a fraction of a year), printed with 3 significant digits.
    assert!(
        age.contains("mean 49.") && age.contains("quantiles 5%"),
        "{age}"
    );
    let sex = out
        .lines()
        .find(|l| l.starts_with("sex"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        sex.contains("F 2") && sex.contains("(5") && sex.contains("each count ±"),
        "{sex}"
    );

    let bad = dir.path().join("not.toml");
    std::fs::write(&bad, "rows = 3\n").unwrap();
    let e = fails(&["privacy", "stats", bad.to_str().unwrap()]);
    assert!(
        e.contains("not.toml") && e.contains("not a statistics file"),
        "{e}"
    );
}
