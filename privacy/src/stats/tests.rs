use super::reference::Pooled;
use super::*;
use crate::accountant::{Accountant, SampledGaussian, epsilon};
use crate::noise::SecureRng;

fn layout() -> StatsLayout {
    StatsLayout::new(vec![
        ColumnLayout::Numeric {
            name: "age".into(),
            low: 0.0,
            high: 100.0,
            bins: 20,
        },
        ColumnLayout::Categorical {
            name: "sex".into(),
            categories: vec!["F".into(), "M".into(), "X".into()],
        },
        ColumnLayout::Numeric {
            name: "lab".into(),
            low: -5.0,
            high: 5.0,
            bins: 10,
        },
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn privacy(eps: f64) -> StatsPrivacy {
    StatsPrivacy {
        target_epsilon: eps,
        delta: 1e-6,
        accountant: Accountant::Rdp,
    }
}

/// A deterministic pseudo-random stream (splitmix64) for the synthetic rows.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Site `s`'s rows: ages skewed by site, a sixth of the lab values missing, a few lab values
/// outside the range, site 2 without category "X" and with some unseen values.
pub(crate) fn site_rows(site: u64, n: usize) -> Vec<Vec<StatsValue>> {
    let mut r = Mix(site * 7919 + 1);
    (0..n)
        .map(|_| {
            let age = 20.0 + 15.0 * site as f64 + 50.0 * r.unit() * r.unit();
            let sex = match (r.next() % 10, site) {
                (0, 2) => StatsValue::Category(None),
                (0..=4, _) => StatsValue::Category(Some(0)),
                (5..=8, _) => StatsValue::Category(Some(1)),
                (_, 2) => StatsValue::Missing,
                _ => StatsValue::Category(Some(2)),
            };
            let lab = match r.next() % 60 {
                0..=9 => StatsValue::Missing,
                10 => StatsValue::Number(7.5),
                _ => StatsValue::Number(2.0 * (r.unit() + r.unit() + r.unit() - 1.5)),
            };
            vec![StatsValue::Number(age), sex, lab]
        })
        .collect()
}

#[test]
fn a_rows_contribution_stays_within_the_stated_sensitivity() {
    let layout = layout();
    let s = layout.sensitivity();
    assert_eq!(s.l1, 1.0 + 3.0 * 2.0 + 1.0);
    let scale = 1 << 12;
    // Every kind of row, alone: its vector is the difference between neighbours.
    let rows = [
        vec![
            StatsValue::Number(100.0),
            StatsValue::Category(None),
            StatsValue::Number(5.0),
        ],
        vec![
            StatsValue::Number(1e9),
            StatsValue::Missing,
            StatsValue::Number(-1e9),
        ],
        vec![
            StatsValue::Missing,
            StatsValue::Category(Some(2)),
            StatsValue::Missing,
        ],
        vec![
            StatsValue::Number(37.3),
            StatsValue::Category(Some(0)),
            StatsValue::Number(0.1),
        ],
    ];
    for row in rows {
        let mut one = SiteStatistics::new(&layout, scale).unwrap_or_else(|e| panic!("{e}"));
        one.add_row(&row).unwrap_or_else(|e| panic!("{e}"));
        let v: Vec<f64> = one
            .exact_sums()
            .iter()
            .map(|&x| x as f64 / scale as f64)
            .collect();
        let l2 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let l1 = v.iter().map(|x| x.abs()).sum::<f64>();
        assert!(l2 <= s.l2 + 1e-12, "{row:?}: L2 {l2} > {}", s.l2);
        assert!(l1 <= s.l1 + 1e-12, "{row:?}: L1 {l1} > {}", s.l1);
        assert!(v.iter().all(|&x| (0.0..=1.0).contains(&x)), "{v:?}");
    }
}

#[test]
fn a_bad_row_is_refused_whole_and_leaves_nothing() {
    let layout = layout();
    let mut st = SiteStatistics::new(&layout, 1 << 10).unwrap_or_else(|e| panic!("{e}"));
    let before = st.exact_sums().to_vec();
    let bad = [
        StatsValue::Number(30.0),
        StatsValue::Number(1.0),
        StatsValue::Number(0.0),
    ];
    let e = st.add_row(&bad).unwrap_err();
    assert!(e.to_string().contains("\"sex\""), "{e}");
    assert_eq!(st.exact_sums(), &before[..]);
    let e = st.add_row(&bad[..2]).unwrap_err();
    assert_eq!(
        e,
        StatsError::RowWidth {
            expected: 3,
            found: 2
        }
    );
    let e = st
        .add_row(&[
            StatsValue::Number(f64::NAN),
            StatsValue::Missing,
            StatsValue::Missing,
        ])
        .unwrap_err();
    assert!(e.to_string().contains("\"age\""), "{e}");
}

#[test]
fn the_plain_plan_is_the_accountants_gaussian_mechanism_at_the_target() {
    let layout = layout();
    let plan = StatsPlan::new(&layout, &privacy(1.0), StatsAggregation::Plain)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        plan.epsilon <= 1.0 && plan.epsilon > 0.999,
        "{}",
        plan.epsilon
    );
    // The same ε from the accountant directly: one unsampled step at z = σ/Δ.
    let z = plan.site_noise / layout.sensitivity().l2;
    let g = epsilon(
        &[SampledGaussian::new(1.0, z, 1).unwrap_or_else(|e| panic!("{e}"))],
        1e-6,
        Accountant::Rdp,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!((g.epsilon - plan.epsilon).abs() < 1e-9);
    // The grid is as fine as the sampler allows.
    let ratio = plan.site_noise / plan.granularity;
    assert!(ratio > 32768.0 && ratio <= 65536.0, "{ratio}");
    // Half the ε, more noise.
    let half = StatsPlan::new(&layout, &privacy(0.5), StatsAggregation::Plain)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(half.site_noise > 1.5 * plan.site_noise);
}

#[test]
fn the_secure_plan_splits_the_noise_and_charges_less_with_more_survivors() {
    let layout = layout();
    let plain = StatsPlan::new(&layout, &privacy(1.0), StatsAggregation::Plain)
        .unwrap_or_else(|e| panic!("{e}"));
    let secure = StatsPlan::new(
        &layout,
        &privacy(1.0),
        StatsAggregation::Secure { min_survivors: 3 },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        secure.epsilon <= 1.0 && secure.epsilon > 0.99,
        "{}",
        secure.epsilon
    );
    // The total noise σ·√3 is about the plain σ (integer orders vs fractional: within 10%).
    let total = secure.site_noise * 3f64.sqrt();
    assert!(
        (total / plain.site_noise - 1.0).abs() < 0.1,
        "{total} {}",
        plain.site_noise
    );
    let more = secure.epsilon_with(5).unwrap_or_else(|e| panic!("{e}"));
    assert!(more < secure.epsilon, "{more}");
    let e = secure.epsilon_with(2).unwrap_err();
    assert!(e.to_string().contains("at least 3"), "{e}");
}

fn federate(plan: &StatsPlan, sites: &[Vec<Vec<StatsValue>>]) -> Vec<i64> {
    let layout = layout();
    let mut sum = vec![0i64; layout.len()];
    for (i, rows) in sites.iter().enumerate() {
        let mut st = SiteStatistics::new(&layout, plan.scale()).unwrap_or_else(|e| panic!("{e}"));
        for row in rows {
            st.add_row(row).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut v = st.into_sums();
        plan.noise_site_with(&mut v, SecureRng::insecure_from_seed([i as u8 + 40; 32]))
            .unwrap_or_else(|e| panic!("{e}"));
        for (a, x) in sum.iter_mut().zip(v) {
            *a += x;
        }
    }
    sum
}

#[test]
fn federated_statistics_equal_the_pooled_within_the_stated_bound() {
    let layout = layout();
    let sites: Vec<_> = (0..3).map(|s| site_rows(s, 20_000)).collect();
    let pooled = Pooled::of_rows(&layout, sites.iter().flatten().map(Vec::as_slice));
    let plan = StatsPlan::new(&layout, &privacy(1.0), StatsAggregation::Plain)
        .unwrap_or_else(|e| panic!("{e}"));
    let dict = DataDictionary::from_sum(&layout, &plan, &federate(&plan, &sites), 3, 1.0 - 1e-6)
        .unwrap_or_else(|e| panic!("{e}"));
    let bad = dict.violations(&pooled);
    assert!(bad.is_empty(), "{bad:#?}");
    // The bounds say something: a mean within 1% of the range, a standard deviation within 3%,
    // a quantile's rank within 5%.
    let Some(ColumnDictionary::Numeric {
        mean_bound,
        std_bound,
        quantiles,
        ..
    }) = dict.column("age")
    else {
        panic!("no age")
    };
    assert!(
        *mean_bound < 1.0 && *std_bound < 3.0,
        "{mean_bound} {std_bound}"
    );
    assert!(
        quantiles.iter().all(|q| q.rank_bound < 0.05),
        "{quantiles:?}"
    );
    // Its file reads back as the same dictionary.
    let text = dict.to_file_text().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        DataDictionary::from_file_text(&text).unwrap_or_else(|e| panic!("{e}")),
        dict
    );
    // And a dictionary off by more than its bound is caught.
    let mut shifted = dict.clone();
    if let Some(ColumnDictionary::Numeric {
        mean, mean_bound, ..
    }) = shifted.columns.get_mut(0)
    {
        *mean += 2.0 * *mean_bound + 0.01;
    }
    assert_eq!(shifted.violations(&pooled).len(), 1);
}

#[test]
fn the_noise_is_there_and_about_the_planned_size() {
    // The sums of 40 repeated releases of one site's rows scatter by σ around the exact ones.
    let layout = layout();
    let rows = site_rows(0, 500);
    let plan = StatsPlan::new(&layout, &privacy(1.0), StatsAggregation::Plain)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut st = SiteStatistics::new(&layout, plan.scale()).unwrap_or_else(|e| panic!("{e}"));
    for row in &rows {
        st.add_row(row).unwrap_or_else(|e| panic!("{e}"));
    }
    let exact = st.exact_sums().to_vec();
    let mut sq = 0.0;
    let mut n = 0.0;
    for k in 0..40u8 {
        let mut v = exact.clone();
        plan.noise_site_with(&mut v, SecureRng::insecure_from_seed([k; 32]))
            .unwrap_or_else(|e| panic!("{e}"));
        for (a, b) in v.iter().zip(&exact) {
            let d = (a - b) as f64 / plan.scale() as f64;
            sq += d * d;
            n += 1.0;
        }
    }
    let sd = (sq / n).sqrt();
    assert!(
        (sd / plan.site_noise - 1.0).abs() < 0.05,
        "{sd} vs {}",
        plan.site_noise
    );
}

#[test]
fn a_layout_names_its_bad_column() {
    let e = StatsLayout::new(vec![ColumnLayout::Numeric {
        name: "age".into(),
        low: 5.0,
        high: 5.0,
        bins: 10,
    }])
    .unwrap_err();
    assert!(
        e.to_string().contains("\"age\"") && e.to_string().contains("low < high"),
        "{e}"
    );
    let e = StatsLayout::new(vec![ColumnLayout::Numeric {
        name: "age".into(),
        low: 0.0,
        high: 5.0,
        bins: 0,
    }])
    .unwrap_err();
    assert!(e.to_string().contains("bins"), "{e}");
}
