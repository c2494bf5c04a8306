//! The ledger under failure (2026-12-07, branch `attack-budget`), in process over the node's
//! real encrypted ledgers: a node killed after the spend and before the upload (its kept update
//! lost with it) does not train the charged round twice past the job's target; a ledger file
//! restored from an older backup (a valid file, every charge it holds genuine) is caught behind
//! the trail; a clock moved back changes no spend; a round attempt charged twice stays two spends
//! through a lost ledger and its restore.

use super::*;

#[test]
fn a_node_killed_between_the_spend_and_the_upload_never_trains_the_round_past_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("cohort", &data)]);
    // Five rounds of a job of target ε = 1: round 5's charge is written (and anchored), then the
    // node is SIGKILLed before the upload: its update, kept in memory only, is gone.
    let (spent, _) = spend_the_budget(&ledgers, "cohort");
    drop(ledgers);
    // The restarted node is asked for round 5 again (the coordinator never got it).
    let restarted = node(dir.path(), &[("cohort", &data)]);
    let view = JobView::from_toml_str(&job(1.0)).unwrap();
    let why = restarted
        .check_with_rows("j0", 5, "cohort", &view, ROWS, DIMENSION)
        .unwrap_err();
    assert!(
        why.contains("round 5 of job j0 was charged already") && why.contains("not trained twice"),
        "{why}"
    );
    // Nothing was charged by the refusal, and the spend survived the kill.
    assert!((restarted.spent("cohort").unwrap() - spent).abs() < 1e-12);

    // Killed after round 2's charge instead: the round may be trained again (the job's target
    // still holds with one more round), and the charge of the attempt that ran stays: ε is
    // counted for every step that ran, released or not.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("cohort", &data)]);
    charge(&ledgers, "j0", 1, "cohort", 1);
    charge(&ledgers, "j0", 2, "cohort", 2);
    let before = ledgers.spent("cohort").unwrap();
    drop(ledgers);
    let restarted = node(dir.path(), &[("cohort", &data)]);
    restarted
        .check_with_rows("j0", 2, "cohort", &view, ROWS, DIMENSION)
        .unwrap();
    let ledger = restarted.open("cohort").unwrap();
    assert_eq!(ledger.job("j0").unwrap().charges_of_round(2).count(), 1);
    assert!((restarted.spent("cohort").unwrap() - before).abs() < 1e-12);
}

#[test]
fn a_ledger_restored_from_an_older_backup_is_behind_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("cohort", &data)]);
    let key = ledgers.key("cohort").unwrap();
    let file = dir.path().join(format!("privacy-ledger/{key}.json.enc"));
    let mut trail = vec![
        charge(&ledgers, "j0", 1, "cohort", 1),
        charge(&ledgers, "j0", 2, "cohort", 2),
    ];
    let backup = dir.path().join("ledger.backup");
    std::fs::copy(&file, &backup).unwrap();
    trail.push(charge(&ledgers, "j0", 3, "cohort", 3));
    trail.push(charge(&ledgers, "j0", 4, "cohort", 4));
    let spent = ledgers.spent("cohort").unwrap();

    // The operator restores last night's backup: a valid, encrypted file, two rounds behind.
    std::fs::copy(&backup, &file).unwrap();
    let restored = node(dir.path(), &[("cohort", &data)]);
    assert!(restored.spent("cohort").unwrap() < spent);
    let behind = restored.check_against_trail("cohort", &trail).unwrap_err();
    assert_eq!(
        (behind.missing, behind.first_round, behind.first_seq),
        (2, 3, 3)
    );
    // The officer's restore from the trail brings the spend back.
    let rebuilt = restored.restore_from_trail("cohort", &trail).unwrap();
    assert!((rebuilt - spent).abs() < 1e-9, "{rebuilt} vs {spent}");
    restored.check_against_trail("cohort", &trail).unwrap();
}

/// Attack (2026-12-07, branch `attack-s8`): the coordinator sends a round attempt the node has
/// charged already (it resumed after a crash, or replays it on purpose); the node trains it
/// again within the job's target and charges it again — two charges of round 2 attempt 1, two
/// `privacy.spent` events. The ledger is then lost (or rolled back to before the second charge)
/// and the officer restores it from the trail. Before the fix the rebuild counted one charge per
/// (job, round, attempt), and an event anchored both charges, so the restored ledger handed a
/// round's ε back and a ledger holding one of the two charges was not behind.
#[test]
fn a_round_attempt_charged_twice_is_two_spends_after_the_ledger_is_lost_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("cohort", &data)]);
    let key = ledgers.key("cohort").unwrap();
    let file = dir.path().join(format!("privacy-ledger/{key}.json.enc"));
    // Another job's round 1 first: each job's charges are matched to that job's events (its
    // charge 0 must not stand in for j0's charge 0).
    let mut trail = vec![
        charge(&ledgers, "j1", 1, "cohort", 0),
        charge(&ledgers, "j0", 1, "cohort", 1),
        charge(&ledgers, "j0", 2, "cohort", 2),
    ];
    let backup = dir.path().join("ledger.backup");
    std::fs::copy(&file, &backup).unwrap();
    // Round 2, attempt 1 again: charged again, anchored at its own event.
    trail.push(charge(&ledgers, "j0", 2, "cohort", 3));
    let spent = ledgers.spent("cohort").unwrap();
    let ledger = ledgers.open("cohort").unwrap();
    let seqs: Vec<_> = ledger
        .job("j0")
        .unwrap()
        .charges
        .iter()
        .map(|c| c.anchored_seq)
        .collect();
    assert_eq!(
        seqs,
        vec![Some(1), Some(2), Some(3)],
        "one event anchors one charge"
    );
    assert_eq!(
        ledgers.anchored_seqs("cohort").unwrap(),
        [0, 1, 2, 3].into()
    );
    ledgers.check_against_trail("cohort", &trail).unwrap();

    // Rolled back to before the second charge: behind by that one event.
    std::fs::copy(&backup, &file).unwrap();
    let rolled_back = node(dir.path(), &[("cohort", &data)]);
    assert!(rolled_back.spent("cohort").unwrap() < spent);
    let behind = rolled_back
        .check_against_trail("cohort", &trail)
        .unwrap_err();
    assert_eq!(
        (behind.missing, behind.first_round, behind.first_seq),
        (1, 2, 3)
    );
    // Lost altogether, then restored by the officer: all four charges, the same ε.
    std::fs::remove_file(&file).unwrap();
    let lost = node(dir.path(), &[("cohort", &data)]);
    assert_eq!(
        lost.check_against_trail("cohort", &trail)
            .unwrap_err()
            .missing,
        4
    );
    let rebuilt = lost.restore_from_trail("cohort", &trail).unwrap();
    assert!(
        (rebuilt - spent).abs() < 1e-9,
        "{rebuilt} vs {spent}: a round's ε handed back"
    );
    lost.check_against_trail("cohort", &trail).unwrap();
    assert_eq!(
        lost.open("cohort")
            .unwrap()
            .job("j0")
            .unwrap()
            .charges
            .len(),
        3
    );
}

#[test]
fn a_clock_moved_back_changes_no_spend() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cohort.csv");
    csv(&data, ROWS);
    let ledgers = node(dir.path(), &[("cohort", &data)]);
    let view = JobView::from_toml_str(&job(1.0)).unwrap();
    let mut spent = Vec::new();
    // Rounds recorded at times going backwards, to before the epoch.
    for (round, now_ms) in [
        (1u32, 1_800_000_000_000i64),
        (2, 1_700_000_000_000),
        (3, -5),
    ] {
        let plan = ledgers
            .check_with_rows("j0", round, "cohort", &view, ROWS, DIMENSION)
            .unwrap()
            .unwrap();
        let spend = DpSpend {
            steps: plan.steps_per_round,
            sample_rate: plan.sample_rate,
            effective_noise_multiplier: plan.effective_noise_multiplier,
            kind: tutela_privacy::ledger::MechanismKind::DpSgd,
        };
        ledgers
            .record("j0", (round, 1), "cohort", ROWS, &plan, &spend, now_ms)
            .unwrap();
        spent.push(ledgers.spent("cohort").unwrap());
    }
    // Each round adds its ε, whatever the clock said; nothing is dropped as expired.
    assert!(spent[0] < spent[1] && spent[1] < spent[2], "{spent:?}");
    let ledger = ledgers.open("cohort").unwrap();
    assert_eq!(
        ledger.job("j0").unwrap().steps(),
        3 * ledger
            .job("j0")
            .unwrap()
            .charges_of_round(1)
            .next()
            .unwrap()
            .group
            .steps
    );
}

/// A declared dataset with a cell its declaration refuses (found by the e2e `data_stays_home`):
/// the budget is told by its file, not refused as unreadable, so the round's own read declines
/// it with the code and column (`data.invalid_value column=…`) instead of `data.unreadable`.
#[test]
fn records_the_pipeline_cannot_parse_leave_the_budget_to_the_file_and_the_decline_to_the_round() {
    use tutela_site_node::budget_identity::BudgetSource;
    use tutela_site_node::config::DatasetConfig;
    let dir = tempfile::tempdir().unwrap();
    let columns = dir.path().join("columns.toml");
    std::fs::write(
        &columns,
        "[[column]]\nname = \"age\"\nrole = \"feature\"\ntype = \"int\"\n\
         [[column]]\nname = \"label\"\nrole = \"label\"\ntype = \"int\"\n",
    )
    .unwrap();
    let data = dir.path().join("cohort.csv");
    let mut text = String::from("age,label\n");
    for i in 0..100 {
        text.push_str(&format!("{},{}\n", 20 + i, i % 2));
    }
    text.push_str("forty-two,1\n");
    std::fs::write(&data, text).unwrap();
    let ledgers = SiteLedgers::new(
        dir.path().join("privacy-ledger"),
        Some(kek()),
        PrivacyBudgetConfig::default(),
    )
    .with_budget_sources(
        [(
            "cohort".to_string(),
            BudgetSource::Table {
                config: DatasetConfig {
                    path: data.clone(),
                    columns: Some(columns),
                    ..DatasetConfig::default()
                },
            },
        )]
        .into(),
    );
    let key = ledgers.key("cohort").unwrap();
    assert!(key.starts_with("b-"), "{key}");
    assert_eq!(ledgers.spent("cohort").unwrap(), 0.0);
    // A file gone is still the budget's own refusal (data.unreadable at the gate).
    std::fs::remove_file(&data).unwrap();
    assert!(ledgers.key("cohort").unwrap_err().is_source_unreadable());
}
