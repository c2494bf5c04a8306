//! A dataset's privacy budget is keyed by its data, not its name (hole (b) of the 2026-11
//! review): a rename in node.toml, a second name for the same file, a copy of the file under a
//! new name and rows appended all spend one budget; a ledger keyed by name is adopted; a deleted
//! identity map or ledger is caught against the trail's spends and an officer's restore
//! rebuilds both. In process, over the node's real ledgers (encrypted at rest) and identity map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tutela_privacy::accountant::Accountant;
use tutela_privacy::at_rest::{KeyEncryptionKey, LocalKek};
use tutela_site_node::dp::DpSpend;
use tutela_site_node::jobspec::JobView;
use tutela_site_node::ledger::{AnchoredSpend, FixedCaps, PrivacyBudgetConfig, SiteLedgers};

use super::dp::ledger::job;

mod evasion;
mod failure;

const ROWS: usize = 455;
const DIMENSION: usize = 266;

/// The site's total cap on each budget (the site policy's `[privacy.budget]`).
fn caps() -> Arc<FixedCaps> {
    Arc::new(FixedCaps {
        per_job: None,
        total: Some(1.2),
    })
}

fn kek() -> Arc<dyn KeyEncryptionKey> {
    Arc::new(LocalKek::from_bytes(&[7u8; 32]))
}

/// The node's ledgers over `dir` with these datasets (name → file), as a restarted node with
/// that node.toml would have them.
fn node(dir: &Path, datasets: &[(&str, &Path)]) -> SiteLedgers {
    let sources: BTreeMap<String, PathBuf> = datasets
        .iter()
        .map(|(n, p)| (n.to_string(), p.to_path_buf()))
        .collect();
    SiteLedgers::new(
        dir.join("privacy-ledger"),
        Some(kek()),
        PrivacyBudgetConfig::default(),
    )
    .with_sources(sources)
    .with_caps(caps())
}

fn csv(path: &Path, rows: usize) {
    let mut text = String::from("age,income,label\n");
    for i in 0..rows {
        text.push_str(&format!("{},{},{}\n", 30 + i % 40, 1000 + 7 * i, i % 2));
    }
    std::fs::write(path, text).unwrap();
}

/// Charges one round of a job (ε target 1.0 over 5 rounds) on `dataset`; returns its trail
/// spend as the node would append it.
fn charge(
    ledgers: &SiteLedgers,
    job_id: &str,
    round: u32,
    dataset: &str,
    seq: u64,
) -> AnchoredSpend {
    let view = JobView::from_toml_str(&job(1.0)).unwrap();
    let plan = ledgers
        .check_with_rows(job_id, round, dataset, &view, ROWS, DIMENSION)
        .unwrap()
        .unwrap();
    let spend = DpSpend {
        steps: plan.steps_per_round,
        sample_rate: plan.sample_rate,
        effective_noise_multiplier: plan.effective_noise_multiplier,
        kind: tutela_privacy::ledger::MechanismKind::DpSgd,
    };
    let s = ledgers
        .record(job_id, (round, 1), dataset, ROWS, &plan, &spend, 1)
        .unwrap();
    let payload = ledgers
        .spend_payload(
            "a",
            dataset,
            job_id,
            &s.charge.unwrap(),
            1e-5,
            Accountant::Rdp,
        )
        .unwrap();
    ledgers
        .mark_anchored(dataset, job_id, (round, 1), seq)
        .unwrap();
    AnchoredSpend {
        seq,
        timestamp_unix_ms: 1,
        payload,
    }
}

/// A job of ε = 1 on `dataset` (its whole planned spend is weighed): refused by the site's
/// total cap of 1.2 once ε ≈ 1 is spent.
fn big_job_refused(ledgers: &SiteLedgers, dataset: &str) -> String {
    let view = JobView::from_toml_str(&job(1.0)).unwrap();
    ledgers
        .check_with_rows("big", 1, dataset, &view, ROWS, DIMENSION)
        .unwrap_err()
}

/// ε ≈ 1 spent on the dataset named `name` (five rounds of a job of target 1).
fn spend_the_budget(ledgers: &SiteLedgers, name: &str) -> (f64, Vec<AnchoredSpend>) {
    let trail: Vec<_> = (1..=5)
        .map(|round| charge(ledgers, "j0", round, name, 10 + u64::from(round)))
        .collect();
    (ledgers.spent(name).unwrap(), trail)
}

#[test]
fn a_dataset_renamed_in_node_toml_keeps_its_spent_epsilon_and_a_job_over_the_cap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let before = node(dir.path(), &[("cohort", &data)]);
    let (spent, _) = spend_the_budget(&before, "cohort");
    assert!(spent > 0.8, "{spent}");

    // The operator renames [datasets.cohort] to [datasets.cohort_v2] and restarts the node.
    let after = node(dir.path(), &[("cohort_v2", &data)]);
    let again = after.spent("cohort_v2").unwrap();
    assert!((again - spent).abs() < 1e-12, "{again} vs {spent}");
    let why = big_job_refused(&after, "cohort_v2");
    assert!(why.contains("total cap ε ≤ 1.2"), "{why}");
}

#[test]
fn the_same_file_declared_twice_under_two_names_shares_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("first", &data), ("second", &data)]);
    let (spent, _) = spend_the_budget(&ledgers, "first");
    assert!((ledgers.spent("second").unwrap() - spent).abs() < 1e-12);
    assert_eq!(
        ledgers.key("first").unwrap(),
        ledgers.key("second").unwrap()
    );
    let why = big_job_refused(&ledgers, "second");
    assert!(why.contains("total cap"), "{why}");
}

#[test]
fn the_file_copied_elsewhere_under_a_new_name_and_with_rows_appended_shares_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("cohort", &data)]);
    let (spent, _) = spend_the_budget(&ledgers, "cohort");
    let key = ledgers.key("cohort").unwrap();

    // A copy in another directory, under another name.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let copy = elsewhere.join("export.csv");
    std::fs::copy(&data, &copy).unwrap();
    let copied = node(dir.path(), &[("export", &copy)]);
    assert_eq!(copied.key("export").unwrap(), key);
    assert!((copied.spent("export").unwrap() - spent).abs() < 1e-12);

    // Rows appended to the original (an honest append): the same budget, twice over.
    csv(&data, ROWS + 50);
    let appended = node(dir.path(), &[("cohort", &data)]);
    assert_eq!(appended.key("cohort").unwrap(), key);
    csv(&data, ROWS + 80);
    assert_eq!(appended.key("cohort").unwrap(), key);
    assert!(big_job_refused(&appended, "cohort").contains("total cap"));

    // Other data is another budget: nothing spent.
    let other = dir.path().join("other.csv");
    std::fs::write(&other, "age,income,label\n99,1,0\n").unwrap();
    let fresh = node(dir.path(), &[("other", &other)]);
    assert_ne!(fresh.key("other").unwrap(), key);
    assert_eq!(fresh.spent("other").unwrap(), 0.0);
    // ...on which the job refused above is admitted: the refusals are the spent budget's.
    let view = JobView::from_toml_str(&job(1.0)).unwrap();
    fresh
        .check_with_rows("big", 1, "other", &view, ROWS, DIMENSION)
        .unwrap();
}

#[test]
fn a_ledger_keyed_by_the_dataset_name_is_adopted_then_follows_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    // A node from before budget keys: its ledger is privacy-ledger/cohort.json.enc.
    let legacy = SiteLedgers::new(
        dir.path().join("privacy-ledger"),
        Some(kek()),
        PrivacyBudgetConfig::default(),
    )
    .with_caps(caps());
    let (spent, _) = spend_the_budget(&legacy, "cohort");
    assert!(dir.path().join("privacy-ledger/cohort.json.enc").exists());

    let upgraded = node(dir.path(), &[("cohort", &data)]);
    assert_eq!(upgraded.key("cohort").unwrap(), "cohort");
    assert!((upgraded.spent("cohort").unwrap() - spent).abs() < 1e-12);
    // The adoption is recorded in the identity map: a later rename keeps the ledger.
    let renamed = node(dir.path(), &[("cohort_v2", &data)]);
    assert_eq!(renamed.key("cohort_v2").unwrap(), "cohort");
    assert!((renamed.spent("cohort_v2").unwrap() - spent).abs() < 1e-12);
}

#[test]
fn a_deleted_identity_map_or_ledger_is_caught_by_the_trail_and_the_restore_rebuilds_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    // Small enough that an append changes the fingerprint of the whole file.
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("cohort", &data)]);
    let (spent, trail) = spend_the_budget(&ledgers, "cohort");
    let key = ledgers.key("cohort").unwrap();
    assert!(
        trail
            .iter()
            .all(|s| s.payload.dataset == key && s.payload.source.is_some())
    );
    let subject = |s: &AnchoredSpend| s.payload.dataset.clone();

    // The ledger deleted: behind the trail, as before budget keys.
    let ledger_file = dir.path().join(format!("privacy-ledger/{key}.json.enc"));
    std::fs::remove_file(&ledger_file).unwrap();
    let why = ledgers.check_against_trail("cohort", &trail).unwrap_err();
    assert_eq!(why.missing, 5);

    // The identity map deleted too, the dataset renamed and a few rows appended: a budget is
    // keyed by its records' smallest hashes, so the node finds the same key again, and the
    // deleted ledger is behind the trail under it.
    std::fs::remove_file(dir.path().join("privacy-ledger/identities.json.enc")).unwrap();
    csv(&data, ROWS + 20);
    let same = node(dir.path(), &[("renamed", &data)]);
    assert_eq!(same.key("renamed").unwrap(), key);
    let why = same.check_against_trail("renamed", &trail).unwrap_err();
    assert_eq!(why.missing, 5);
    std::fs::remove_file(dir.path().join("privacy-ledger/identities.json.enc")).unwrap();

    // Many rows appended (the records' key changes): the node resolves another key, and the
    // trail's spends of this data (its file extends their fingerprint) under the old one stop it.
    csv(&data, ROWS * 10);
    let reset = node(dir.path(), &[("renamed", &data)]);
    assert_ne!(reset.key("renamed").unwrap(), key);
    assert_eq!(
        reset.spent("renamed").unwrap(),
        0.0,
        "the reset the trail must catch"
    );
    let why = reset
        .check_identity_against_trail("renamed", &trail)
        .unwrap_err();
    assert!(
        why.contains(&format!("under the privacy budget {key:?}"))
            && why.contains("ledger restore")
            && !why.contains(data.to_str().unwrap()),
        "{why}"
    );

    // The officer's restore: the data back under the trail's key, its ledger rebuilt.
    let trail_key = reset.trail_key("renamed", &trail).unwrap();
    assert_eq!(trail_key.as_deref(), Some(key.as_str()));
    reset.bind_to_trail_key("renamed", &key).unwrap();
    assert_eq!(reset.key("renamed").unwrap(), key);
    let own: Vec<_> = trail
        .iter()
        .filter(|s| subject(s) == key)
        .cloned()
        .collect();
    let rebuilt = reset.restore_from_trail("renamed", &own).unwrap();
    assert!((rebuilt - spent).abs() < 1e-9, "{rebuilt} vs {spent}");
    reset.check_against_trail("renamed", &trail).unwrap();
    assert_eq!(
        reset
            .check_identity_against_trail("renamed", &trail)
            .unwrap(),
        key
    );
    assert!(big_job_refused(&reset, "renamed").contains("total cap"));
}
