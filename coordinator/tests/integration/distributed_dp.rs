//! Distributed DP's release check in the coordinator's masked round: the plan of a job with
//! `[privacy] mode = "distributed"` (`tutela_protocol::job::distributed::plan`, the one the
//! coordinator and every site compute) refuses a round whose survivors are fewer than its
//! minimum before any survivor list is sent, so nothing is unmasked; with enough survivors the
//! round completes.

use std::collections::BTreeMap;
use std::sync::Arc;

use tutela_coordinator::aggregate::RoundAggregation;
use tutela_coordinator::aggregate::masked::{
    MaskedAggregation, MaskedOutput, PhasedRound, Relay, Signing,
};
use tutela_protocol::job::JobSpec;
use tutela_protocol::secagg::{ClientAdvertising, ClientMessage, Phase, SecureAggregationSpec};

use super::secagg::{input, model, upload};

const SITES: u32 = 6;

fn job() -> JobSpec {
    JobSpec::from_toml_str(
        r#"
name = "distributed"
rounds = 5
min_sites = 5
round_deadline_secs = 60
update_norm_bound = 1.0
sites = ["site-00", "site-01", "site-02", "site-03", "site-04", "site-05"]

[model]
name = "mlp"

[data]
schema = "breast_cancer"

[training]
optimizer = "sgd"
learning_rate = 1.0
local_epochs = 1
batch_size = 100

[privacy]
mode = "distributed"
target_epsilon = 3.0
max_grad_norm = 1.0
sample_rate = 0.5

[secure_aggregation]
scale_bits = 16
"#,
    )
    .unwrap()
}

/// A round where the sites in `silent` upload nothing; returns whether unmask requests went out
/// and the round's outcome.
fn round(silent: &[u32]) -> (bool, Result<(), String>) {
    let (asked, result) = round_with(silent, MaskedOutput::Mean);
    (asked, result.map(|_| ()))
}

/// [`round`] with the unmasked sum released as `output` says; the finished round's deltas.
fn round_with(silent: &[u32], output: MaskedOutput) -> (bool, Result<Vec<Vec<f64>>, String>) {
    let spec = job();
    let plan = Arc::new(
        tutela_protocol::job::distributed::plan(&spec, 7)
            .unwrap()
            .unwrap(),
    );
    let secure: &SecureAggregationSpec = spec.secure_aggregation.as_ref().unwrap();
    // min_sites of the round's protocol is 3 here, below the plan's 5: the plan's check decides.
    let config = secure.round_config([5; 32], 1, 1, SITES, 3, 7);
    let names: Vec<String> = (0..SITES).map(|i| format!("site-{i:02}")).collect();
    let check = plan.clone();
    let round = MaskedAggregation::with_output(
        &model(),
        names.clone(),
        config.clone(),
        secure.scale_bits,
        (
            Signing::Unsigned,
            Some(Arc::new(move |survivors| {
                check
                    .check_release(survivors)
                    .map(|_| ())
                    .map_err(|e| format!("distributed DP refuses the release: {e}"))
            })),
        ),
        output,
    )
    .unwrap();
    let phases: &dyn PhasedRound = round.masked().unwrap();
    let mut states = BTreeMap::new();
    for i in 0..SITES {
        let (s, msg) = ClientAdvertising::new(config.clone(), i)
            .unwrap()
            .advertise_keys()
            .unwrap();
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
        states.insert(i, s);
    }
    phases.close_phase().unwrap();
    let mut sharing = BTreeMap::new();
    for (i, s) in states {
        let Some(Relay::Keys(k)) = phases.relay_for(&names[i as usize]) else {
            panic!()
        };
        let (s, msg) = s.share_keys(k).unwrap();
        phases
            .receive(&names[i as usize], ClientMessage::from(msg))
            .unwrap();
        sharing.insert(i, s);
    }
    phases.close_phase().unwrap();
    let mut unmasking = BTreeMap::new();
    for (i, s) in sharing {
        let Some(Relay::Shares(sh)) = phases.relay_for(&names[i as usize]) else {
            panic!()
        };
        if silent.contains(&i) {
            continue;
        }
        let (s, msg) = s.masked_input(sh, &input(i)).unwrap();
        upload(&round, &names[i as usize], &msg.masked).unwrap();
        unmasking.insert(i, s);
    }
    let closed = phases.close_phase();
    let mut asked = false;
    for (i, s) in unmasking {
        if let Some(Relay::Unmask(request)) = phases.relay_for(&names[i as usize]) {
            asked = true;
            let msg = s.unmask(request).unwrap();
            phases
                .receive(&names[i as usize], ClientMessage::from(msg))
                .unwrap();
        }
    }
    if closed.is_ok() {
        phases.close_phase().unwrap();
    }
    assert_eq!(phases.phase(), None);
    (
        asked,
        round
            .finish()
            .map(|f| f.result.mean_delta)
            .map_err(|e| e.to_string()),
    )
}

/// Record-level distributed DP: each site's input is its share of one central step (already
/// divided by the job's expected batch), so the round's delta is the survivors' sum; plain
/// secure aggregation divides it by the survivors.
#[test]
fn under_record_level_distributed_dp_the_round_releases_the_sum_not_the_mean() {
    let (_, mean) = round_with(&[2], MaskedOutput::Mean);
    let (_, sum) = round_with(&[2], MaskedOutput::Sum);
    let (mean, sum) = (mean.unwrap(), sum.unwrap());
    let survivors = (SITES - 1) as f64;
    let mut compared = 0;
    for (m, s) in mean.iter().flatten().zip(sum.iter().flatten()) {
        assert!((m * survivors - s).abs() < 1e-9, "mean {m}, sum {s}");
        compared += 1;
    }
    assert!(compared > 0);
    // The sum of the five survivors' inputs (grid steps of 2^-16), exactly.
    let expected: Vec<f64> =
        (0..SITES)
            .filter(|&i| i != 2)
            .map(input)
            .fold(vec![0.0; 7], |mut acc, x| {
                for (a, v) in acc.iter_mut().zip(&x) {
                    *a += *v as f64 / 65536.0;
                }
                acc
            });
    for (e, s) in expected.iter().zip(sum.iter().flatten()) {
        assert!((e - s).abs() < 1e-9, "expected {e}, released {s}");
    }
}

#[test]
fn too_few_survivors_for_the_plan_fail_the_round_before_anything_is_unmasked() {
    let (asked, result) = round(&[1, 4]);
    assert!(!asked, "a survivor list went out");
    let reason = result.unwrap_err();
    assert!(
        reason.contains(&Phase::MaskedInput.to_string())
            && reason.contains("distributed DP refuses the release")
            && reason.contains("4")
            && reason.contains("5"),
        "{reason}"
    );
    let (asked, result) = round(&[2]);
    assert!(asked);
    result.unwrap();
}
