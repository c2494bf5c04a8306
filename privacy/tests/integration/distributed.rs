//! The distributed discrete Gaussian's accountant (Kairouz, Liu & Steinke 2021) against values
//! of the paper's formulas worked by hand, our RDP of the Gaussian mechanism where the two must
//! agree, and the monotonicity the release check relies on.

use tutela_privacy::accountant::distributed::{
    self, DistributedGaussian, DistributedInputs, DistributedPlan, rounded_sensitivity,
    site_noise_share, tau,
};
use tutela_privacy::accountant::rdp::{Conversion, RdpCurve};
use tutela_privacy::accountant::{AccountantError, rdp::rdp_sampled_gaussian};

fn ok<T>(r: Result<T, AccountantError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn inputs() -> DistributedInputs {
    DistributedInputs {
        clip: 1.0,
        granularity: 1.0 / 1024.0,
        dimension: 10_000,
        beta: (-0.5f64).exp(),
        expected_sites: 10,
        min_survivors: 7,
        sample_rate: 1.0,
        rounds: 20,
        delta: 1e-5,
        target_epsilon: Some(3.0),
        total_noise: None,
    }
}

/// τ = 10·Σ_{j=1}^{k−1} exp(−2π²σ²·j/(j+1)), worked by hand: one summand has none; two at σ = 1
/// give 10·e^{−π²} = 5.1723e-4; three at σ = ½ give 10·(e^{−π²/4} + e^{−π²/3}).
#[test]
fn tau_matches_the_formula() {
    let pi2 = std::f64::consts::PI.powi(2);
    assert_eq!(tau(1.0, 1), 0.0);
    let two = tau(1.0, 2);
    assert!((two - 5.172_318e-4).abs() < 1e-9, "{two}");
    assert!((two - 10.0 * (-pi2).exp()).abs() < 1e-15);
    let three = tau(0.5, 3);
    let by_hand = 10.0 * ((-pi2 / 4.0).exp() + (-pi2 / 3.0).exp());
    assert!(
        (three - by_hand).abs() < 1e-15 * by_hand,
        "{three} {by_hand}"
    );
    // More summands or less noise: a larger τ.
    assert!(tau(1.0, 10) > two && tau(0.7, 2) > two);
}

/// KLS21 Theorem 1: Δ₂ = min(c + √d, √(c² + d/4 + √(2 ln(1/β))·(c + √d/2))), Δ₁ = Δ₂·min(√d, Δ₂).
#[test]
fn rounded_sensitivity_matches_the_formula() {
    // β = 0: the deterministic bound only.
    let s = ok(rounded_sensitivity(100.0, 10_000, 0.0));
    assert_eq!(s.l2, 200.0);
    assert_eq!(s.l1, 200.0 * 100.0);
    // β = e^{−1/2}: √(2·½) = 1, so Δ₂² = 100² + 2500 + 150 = 12650.
    let s = ok(rounded_sensitivity(100.0, 10_000, (-0.5f64).exp()));
    assert!((s.l2 - 12_650f64.sqrt()).abs() < 1e-9, "{}", s.l2);
    // A small vector in few coordinates: the deterministic bound is the smaller one.
    let s = ok(rounded_sensitivity(2.0, 4, 1e-9));
    assert_eq!(s.l2, 4.0);
    assert_eq!(s.l1, 4.0 * 2.0);
    // The finer the grid (larger c for the same clip), the smaller the inflation relative to c.
    let coarse = ok(rounded_sensitivity(64.0, 10_000, 0.01)).l2 / 64.0;
    let fine = ok(rounded_sensitivity(4096.0, 10_000, 0.01)).l2 / 4096.0;
    assert!(fine < coarse && fine < 1.01, "{fine} {coarse}");
    assert!(matches!(
        rounded_sensitivity(1.0, 10, 1.0),
        Err(AccountantError::Beta(_))
    ));
    assert!(matches!(
        rounded_sensitivity(1.0, 0, 0.5),
        Err(AccountantError::Dimension)
    ));
}

/// One surviving site, q = 1: no τ, and the round's RDP is the Gaussian mechanism's
/// α·Δ₂²/(2σ²); over T rounds the same ε as our RDP accountant for noise multiplier σ/Δ₂.
#[test]
fn one_site_is_the_gaussian_mechanism() {
    let m = ok(DistributedGaussian::new(1.0, 1.0 / 256.0, 100, 0.0, 2.0));
    let delta2 = m.sensitivity().l2; // grid units
    let sigma = 2.0 * 256.0;
    for alpha in [2.0, 7.0, 32.0] {
        let expected = alpha * delta2 * delta2 / (2.0 * sigma * sigma);
        assert!((m.round_rdp(1, alpha) - expected).abs() < 1e-12 * expected);
    }
    let ours = ok(m.epsilon(1.0, &[(1, 50)], 1e-5));
    let orders = distributed::orders();
    let gaussian = ok(RdpCurve::sampled_gaussian(1.0, sigma / delta2, 50, &orders));
    let (eps, order) = ok(gaussian.epsilon(1e-5, Conversion::Balle));
    assert!(
        (ours.epsilon - eps).abs() < 1e-9 * eps,
        "{} {eps}",
        ours.epsilon
    );
    assert_eq!(ours.order, Some(order));
}

/// With sampling, Zhu & Wang's general bound lies above the exact RDP of the sampled Gaussian
/// (Mironov et al. 2019) and below the unsampled mechanism's, at every order.
#[test]
fn sampled_rounds_are_bounded_between_the_exact_value_and_no_sampling() {
    let m = ok(DistributedGaussian::new(1.0, 1.0 / 256.0, 100, 0.0, 1.2));
    let noise_multiplier = 1.2 * 256.0 / m.sensitivity().l2;
    for q in [0.01, 0.1, 0.5] {
        for alpha in [2u32, 3, 8, 32] {
            let bound = m.sampled_round_rdp(1, q, alpha);
            let exact = ok(rdp_sampled_gaussian(q, noise_multiplier, f64::from(alpha)));
            let plain = m.round_rdp(1, f64::from(alpha));
            assert!(
                bound >= exact * (1.0 - 1e-9) && bound <= plain,
                "q={q} α={alpha}: {exact} ≤ {bound} ≤ {plain} fails"
            );
        }
    }
    // Sampling helps over many rounds.
    let sampled = ok(m.epsilon(0.05, &[(1, 1000)], 1e-5)).epsilon;
    let every = ok(m.epsilon(1.0, &[(1, 1000)], 1e-5)).epsilon;
    assert!(sampled < every, "{sampled} {every}");
}

#[test]
fn epsilon_is_monotone_in_noise_survivors_rounds_and_dimension() {
    let eps = |clip: f64, d: usize, noise: f64, k: usize, rounds: u64| {
        ok(
            ok(DistributedGaussian::new(clip, 1.0 / 1024.0, d, 0.01, noise)).epsilon(
                1.0,
                &[(k, rounds)],
                1e-5,
            ),
        )
        .epsilon
    };
    let base = eps(1.0, 1000, 0.5, 5, 10);
    assert!(eps(1.0, 1000, 0.6, 5, 10) < base, "more noise per site");
    assert!(eps(1.0, 1000, 0.5, 8, 10) < base, "more survivors");
    assert!(eps(1.0, 1000, 0.5, 4, 10) > base, "fewer survivors");
    assert!(eps(1.0, 1000, 0.5, 5, 20) > base, "more rounds");
    assert!(
        eps(1.0, 100_000, 0.5, 5, 10) > base,
        "more coordinates to round"
    );
    assert!(eps(2.0, 1000, 0.5, 5, 10) > base, "a larger clip");
}

/// m survivors of σ/√m each carry variance σ² exactly; the plan meets its target at m and the
/// release check refuses fewer.
#[test]
fn noise_shares_and_the_release_check() {
    let share = ok(site_noise_share(3.0, 9));
    assert_eq!(share, 1.0);
    let plan = ok(DistributedPlan::new(&inputs()));
    assert!(
        plan.planned_epsilon <= 3.0 && plan.planned_epsilon > 2.99,
        "{}",
        plan.planned_epsilon
    );
    let summed_variance = 7.0 * plan.site_noise().powi(2);
    assert!((summed_variance - plan.total_noise.powi(2)).abs() < 1e-12 * summed_variance);
    // At the minimum and above: released, at no more than the plan.
    let at_minimum = ok(plan.check_release(7));
    assert!((at_minimum - plan.planned_epsilon).abs() < 1e-12);
    assert!(ok(plan.check_release(10)) < at_minimum);
    // Below: refused, saying how many survived and how many are needed.
    match plan.check_release(6) {
        Err(AccountantError::TooFewSurvivors {
            survivors: 6,
            minimum: 7,
        }) => {}
        other => panic!("{other:?}"),
    }
    let message = plan.check_release(6).unwrap_err().to_string();
    assert!(message.contains('6') && message.contains('7'), "{message}");
    // The ledger's charge: rounds with more survivors spent less than planned.
    let spent = ok(plan.epsilon_spent(&[10; 20]));
    assert!(spent.epsilon < plan.planned_epsilon);
    let mixed = ok(plan.epsilon_spent(&[7, 10, 10, 8, 7]));
    let fewer_rounds = ok(plan.epsilon_spent(&[7, 10, 10, 8]));
    assert!(mixed.epsilon > fewer_rounds.epsilon);
    assert!(ok(plan.epsilon_spent(&[7; 20])).epsilon <= plan.planned_epsilon * (1.0 + 1e-12));
}

#[test]
fn plans_refuse_impossible_settings() {
    let bad = |f: &dyn Fn(&mut DistributedInputs)| {
        let mut i = inputs();
        f(&mut i);
        DistributedPlan::new(&i).unwrap_err()
    };
    assert!(matches!(
        bad(&|i| i.min_survivors = 11),
        AccountantError::Sites {
            expected: 10,
            minimum: 11
        }
    ));
    assert!(matches!(
        bad(&|i| i.min_survivors = 0),
        AccountantError::Sites { .. }
    ));
    assert!(matches!(
        bad(&|i| i.granularity = 0.0),
        AccountantError::Granularity(_)
    ));
    // A given total noise whose shares fall below half a grid step.
    assert!(matches!(
        bad(&|i| {
            i.target_epsilon = None;
            i.total_noise = Some(1e-4);
        }),
        AccountantError::SiteNoise(_)
    ));
}

/// The modulus: the fewest bits whose wrap-around bound is below the target, and one bit fewer
/// is not; Tutela's 64-bit ring holds a large job easily.
#[test]
fn modulus_keeps_wrap_around_improbable() {
    let m = ok(DistributedGaussian::new(
        1.0,
        1.0 / 65_536.0,
        1_000_000,
        0.01,
        0.05,
    ));
    let bits = ok(m.modulus_bits(100, 1e-9));
    assert!(m.wrap_probability(100, bits) <= 1e-9);
    assert!(m.wrap_probability(100, bits - 1) > 1e-9);
    assert!(bits <= 64, "{bits}");
    // The signal alone: 100 sites of norm ≤ Δ₂ need 2^{b−1} > 100·Δ₂.
    assert!(2f64.powi(bits as i32 - 1) > 100.0 * m.sensitivity().l2);
    assert!(ok(m.modulus_bits(1000, 1e-9)) >= bits);
    assert_eq!(m.wrap_probability(100, 8), 1.0);
}

/// The RDP curve composes across round groups exactly as our RDP curves do.
#[test]
fn round_groups_compose_additively() {
    let m = ok(DistributedGaussian::new(1.0, 1.0 / 1024.0, 1000, 0.01, 0.3));
    let a = ok(m.rdp_curve(0.5, &[(5, 3)]));
    let b = ok(m.rdp_curve(0.5, &[(8, 4)]));
    let both = ok(m.rdp_curve(0.5, &[(5, 3), (8, 4)]));
    let sum = ok(a.compose(&b));
    for (x, y) in sum.values().iter().zip(both.values()) {
        assert!((x - y).abs() <= 1e-12 * y);
    }
    assert_eq!(both.orders(), distributed::orders().as_slice());
}

/// Attacks on the record-level plan (2026-12-07, branch `attack-s8`): a coordinator (or a spec
/// it wrote) choosing parameters that would make sites charge less than they release. Every
/// impossible value is refused rather than planned; the release check refuses fewer survivors
/// than the minimum (a site told it is one of many when it is alone) and any count whose noise
/// would fall below what each site's ledger charged; and what is charged per round is never
/// below the noise any admitted survivor count carries.
#[test]
fn record_level_plans_refuse_a_coordinator_s_impossible_settings_and_releases_below_the_charge() {
    use tutela_privacy::accountant::Accountant;
    use tutela_privacy::accountant::distributed::{RecordLevelInputs, RecordLevelPlan};
    let inputs = || RecordLevelInputs {
        clip: 1.0,
        step_scale: 0.5 / 100.0,
        granularity: 2f64.powi(-16),
        dimension: 62,
        min_survivors: 4,
        sample_rate: 0.25,
        rounds: 20,
        delta: 1e-5,
        accountant: Accountant::Rdp,
        target_epsilon: Some(1.0),
        noise_multiplier: None,
        metrics: None,
    };
    let refused = |what: &str, f: &dyn Fn(&mut RecordLevelInputs)| {
        let mut i = inputs();
        f(&mut i);
        if let Ok(plan) = RecordLevelPlan::new(&i) {
            panic!("{what}: planned {plan:?}");
        }
    };
    for q in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        refused(&format!("sample rate {q}"), &|i| i.sample_rate = q);
    }
    for z in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        refused(&format!("noise multiplier {z}"), &|i| {
            i.target_epsilon = None;
            i.noise_multiplier = Some(z);
        });
    }
    for eps in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        refused(&format!("target ε {eps}"), &|i| {
            i.target_epsilon = Some(eps)
        });
    }
    for s in [0.0, -0.005, f64::NAN, f64::INFINITY] {
        refused(&format!("step scale {s}"), &|i| i.step_scale = s);
    }
    for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        refused(&format!("clip {c}"), &|i| i.clip = c);
    }
    for d in [0.0, 1.0, f64::NAN] {
        refused(&format!("delta {d}"), &|i| i.delta = d);
    }
    refused("no survivors needed", &|i| i.min_survivors = 0);
    refused("no rounds", &|i| i.rounds = 0);
    refused("neither a target nor a multiplier", &|i| {
        i.target_epsilon = None
    });
    // A noise share far below one grid step: refused, not rounded away.
    refused("a share of 1e-6 grid steps", &|i| {
        i.target_epsilon = None;
        i.noise_multiplier = Some(1e-9);
    });

    let plan = ok(RecordLevelPlan::new(&inputs()));
    let charged = plan.dp_sgd.effective_noise_multiplier;
    // The charge is one step at (q, z(m)) per round, whatever the coordinator says later.
    let m = ok(plan.round_mechanism());
    assert_eq!(m.steps(), 1);
    assert_eq!(m.noise_multiplier(), charged);
    for k in 0..4 {
        assert!(
            matches!(
                plan.check_release(k),
                Err(AccountantError::TooFewSurvivors { minimum: 4, .. })
            ),
            "{k} survivors"
        );
    }
    // Every admitted count carries at least the charged noise; past the point where the sum of
    // discrete Gaussians' correction outgrows the extra shares, counts are refused.
    for k in [4usize, 5, 8, 64, 2048] {
        match plan.check_release(k) {
            Ok(z) => assert!(z >= charged * (1.0 - 1e-12), "{k}: {z} < {charged}"),
            Err(AccountantError::OverBudget { .. }) => {}
            Err(e) => panic!("{k}: {e}"),
        }
    }
}
