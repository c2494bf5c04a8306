//! Consortium statistics through secure aggregation (`tutela_privacy::stats` over
//! `secagg::simulate`): each site's clipped sufficient statistics, noised with its share of the
//! discrete Gaussian, are masked and summed by the real SecAgg+ state machines; the dictionary
//! of the sum equals the pooled statistics of the survivors' rows within its stated bound, also
//! when a site drops before sending its input.

use rand::{Rng, SeedableRng};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::noise::SecureRng;
use tutela_privacy::stats::reference::Pooled;
use tutela_privacy::stats::{
    ColumnDictionary, ColumnLayout, DataDictionary, SiteStatistics, StatsAggregation, StatsLayout,
    StatsPlan, StatsPrivacy, StatsValue,
};
use tutela_protocol::secagg::simulate::{Dropouts, run_round};
use tutela_protocol::secagg::{Phase, RoundConfig, SiteIndex, threshold_for};

fn layout() -> StatsLayout {
    StatsLayout::new(vec![
        ColumnLayout::Numeric {
            name: "age".into(),
            low: 0.0,
            high: 110.0,
            bins: 22,
        },
        ColumnLayout::Categorical {
            name: "ward".into(),
            categories: vec!["a".into(), "b".into(), "c".into()],
        },
        ColumnLayout::Numeric {
            name: "creatinine".into(),
            low: 0.0,
            high: 10.0,
            bins: 20,
        },
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Site `s`'s rows: its own age mix, a site without ward "c", missing and out-of-range lab
/// values.
fn rows(site: SiteIndex, n: usize) -> Vec<Vec<StatsValue>> {
    let mut r = rand::rngs::StdRng::seed_from_u64(77 + u64::from(site));
    (0..n)
        .map(|_| {
            let age = 30.0 + 8.0 * f64::from(site) + r.random_range(0.0..40.0);
            let wards = if site == 1 { 2 } else { 3 };
            let ward = if r.random_range(0..20) == 0 {
                StatsValue::Missing
            } else {
                StatsValue::Category(Some(r.random_range(0..wards)))
            };
            let lab = match r.random_range(0..100) {
                0..=14 => StatsValue::Missing,
                15 => StatsValue::Number(14.0),
                _ => StatsValue::Number(r.random_range(0.5..2.5)),
            };
            vec![StatsValue::Number(age), ward, lab]
        })
        .collect()
}

fn config(sites: u32, len: usize) -> RoundConfig {
    let degree = sites - 1;
    RoundConfig {
        job_digest: [0x17; 32],
        round: 1,
        sites,
        degree,
        threshold: threshold_for(degree, 0.5),
        min_survivors: threshold_for(degree, 0.5),
        graph_seed: [9; 32],
        vector_len: len as u64,
    }
}

/// Runs the statistics through a SecAgg+ round; returns the dictionary and the survivors.
fn secure_dictionary(
    sites: u32,
    min_survivors: usize,
    per_site: usize,
    dropouts: &Dropouts,
) -> (DataDictionary, Pooled) {
    let layout = layout();
    let privacy = StatsPrivacy {
        target_epsilon: 1.0,
        delta: 1e-6,
        accountant: Accountant::Rdp,
    };
    let plan = StatsPlan::new(
        &layout,
        &privacy,
        StatsAggregation::Secure { min_survivors },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let site_input = |s: SiteIndex| {
        let mut st = SiteStatistics::new(&layout, plan.scale()).unwrap_or_else(|e| panic!("{e}"));
        for row in rows(s, per_site) {
            st.add_row(&row).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut v = st.into_sums();
        plan.noise_site_with(&mut v, SecureRng::insecure_from_seed([s as u8 + 1; 32]))
            .unwrap_or_else(|e| panic!("{e}"));
        v
    };
    let (out, _) = run_round(
        &config(sites, layout.len()),
        site_input,
        dropouts,
        1,
        1,
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let survivor_rows: Vec<Vec<StatsValue>> = out
        .survivors
        .iter()
        .flat_map(|&s| rows(s, per_site))
        .collect();
    let pooled = Pooled::of_rows(&layout, survivor_rows.iter().map(Vec::as_slice));
    let dict = DataDictionary::from_sum(&layout, &plan, &out.sum, out.survivors.len(), 1.0 - 1e-6)
        .unwrap_or_else(|e| panic!("{e}"));
    (dict, pooled)
}

#[test]
fn statistics_summed_by_secure_aggregation_equal_the_pooled_within_the_bound() {
    let (dict, pooled) = secure_dictionary(3, 3, 15_000, &Dropouts::none());
    assert_eq!(dict.sites, 3);
    let bad = dict.violations(&pooled);
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(dict.epsilon <= 1.0 + 1e-9, "{}", dict.epsilon);
    let Some(ColumnDictionary::Numeric {
        mean_bound,
        quantiles,
        ..
    }) = dict.column("creatinine")
    else {
        panic!("no creatinine")
    };
    assert!(*mean_bound < 0.1, "{mean_bound}");
    assert!(
        quantiles.iter().all(|q| q.rank_bound < 0.05),
        "{quantiles:?}"
    );
    // Site 1 has no ward "c": its count is the other two sites' (within the bound, checked above).
    let Some(ColumnDictionary::Categorical { counts, .. }) = dict.column("ward") else {
        panic!("no ward")
    };
    assert!(counts[2] < counts[0], "{counts:?}");
}

#[test]
fn a_site_dropping_before_its_input_leaves_the_survivors_statistics_within_the_bound() {
    let (dict, pooled) = secure_dictionary(4, 3, 10_000, &Dropouts::at(Phase::MaskedInput, [2]));
    assert_eq!(dict.sites, 3);
    assert_eq!(pooled.rows, 30_000);
    let bad = dict.violations(&pooled);
    assert!(bad.is_empty(), "{bad:#?}");
}
