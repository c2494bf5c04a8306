//! A PostgreSQL source that is not there when the node starts: the dataset is not announced,
//! the node re-checks it on its `[recheck]` backoff, announces it once the database, role and
//! table exist, and a job then runs on it; a source that fails the first task reading it
//! withdraws the dataset until it is readable again. Nothing of the source (URL, database, role,
//! query, path) is in any message that leaves the site.

use super::*;
use crate::site_data::{execute, with_database, with_user};

const SCHEMA: &str = r#"
name = "cells"

[label]
column = "diagnosis"
classes = ["malignant", "benign"]

[[features.columns]]
name = "radius"
type = "numeric"

[[features.columns]]
name = "texture"
type = "numeric"
"#;

const QUERY: &str = "SELECT radius, texture, diagnosis FROM cells ORDER BY id";

/// What must never be in a message that leaves the site.
fn assert_nothing_of_the_source(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "{s:?} left the site in {text:?}");
    }
}

/// The next `Connect`, skipping other events (a decline is returned in `declines`).
async fn next_announcement(h: &mut Harness, declines: &mut Vec<(String, String)>) -> Vec<String> {
    loop {
        match h.next_event().await {
            Event::Connected { request, .. } => return request.datasets,
            Event::Declined { task_id, reason } => declines.push((task_id, reason)),
            other => panic!("expected an announcement, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_at_start_is_announced_when_it_comes_up_and_withdrawn_when_it_fails() {
    let Ok(admin_url) = std::env::var("TUTELA_TEST_POSTGRES_URL") else {
        eprintln!("TUTELA_TEST_POSTGRES_URL is not set: the PostgreSQL source is not tested");
        return;
    };
    let unique = format!(
        "{}_{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    );
    let (database, role) = (format!("readiness_{unique}"), format!("reader_{unique}"));
    let url = with_user(&with_database(&admin_url, &database), &role);
    let dataset_url = url.clone();
    let dataset = move |dir: &Path| {
        std::fs::write(dir.join("cells.schema.toml"), SCHEMA).unwrap();
        std::fs::write(dir.join("reader.password"), "reader-secret\n").unwrap();
        format!(
            "schema = \"{}\"\nsplit_seed = 3\n\n[datasets.breast_cancer.postgres]\nurl = \"{dataset_url}\"\n\
             query = \"{QUERY}\"\npassword_file = \"{}\"\ntimeout_secs = 5\n",
            dir.join("cells.schema.toml").display(),
            dir.join("reader.password").display(),
        )
    };
    // Re-checked every 0.2–0.5 s in this test (the default starts at 5 s and caps at 300 s).
    let recheck = "[recheck]\ninitial_secs = 0.2\nmax_secs = 0.5\n";
    let mut h = Harness::launch("", recheck, Some(&dataset)).await;
    let dir = h._dir.path().to_path_buf();
    let secrets = [
        database.as_str(),
        role.as_str(),
        "cells",
        "reader-secret",
        dir.to_str().unwrap(),
    ];
    let mut declines = Vec::new();

    // The database does not exist: the node starts, connects, and offers nothing.
    assert_eq!(
        next_announcement(&mut h, &mut declines).await,
        Vec::<String>::new()
    );
    // A task for it (the coordinator would not send one) is declined as not ready, by name only.
    let spec = job_spec("breast_cancer", "mlp");
    h.send(task("early", pb::TaskKind::Initialize, &spec, "", "{}"))
        .await;
    let reason = match h.next_event().await {
        Event::Declined { task_id, reason } if task_id == "early" => reason,
        other => panic!("expected the early task's decline, got {other:?}"),
    };
    assert!(reason.starts_with("data.unreadable"), "{reason}");
    assert!(reason.contains("not ready"), "{reason}");
    assert_nothing_of_the_source(&reason, &secrets);

    // The source comes up: database, role, table. The node announces the dataset by itself.
    execute(
        &admin_url,
        &[
            format!("CREATE DATABASE {database}"),
            format!("CREATE ROLE {role} LOGIN PASSWORD 'reader-secret'"),
        ],
    )
    .await;
    let mut table = vec![
        "CREATE TABLE cells (id serial PRIMARY KEY, radius float8, texture float8, diagnosis text)"
            .to_string(),
    ];
    for i in 0..120 {
        let malignant = i % 3 == 0;
        let radius = if malignant { 17.0 } else { 12.0 } + f64::from(i % 7) * 0.3;
        let texture = 15.0 + f64::from(i % 11);
        let class = if malignant { "malignant" } else { "benign" };
        table.push(format!(
            "INSERT INTO cells (radius, texture, diagnosis) VALUES ({radius}, {texture}, '{class}')"
        ));
    }
    table.push(format!("GRANT SELECT ON cells TO {role}"));
    execute(&with_database(&admin_url, &database), &table).await;
    assert_eq!(
        next_announcement(&mut h, &mut declines).await,
        vec!["breast_cancer".to_string()]
    );

    // Before any task has read it, the role may no longer log in: the first TRAIN task fails to
    // read it, is declined with a code, and the dataset is withdrawn.
    execute(&admin_url, &[format!("ALTER ROLE {role} NOLOGIN")]).await;
    h.send(task("init-1", pb::TaskKind::Initialize, &spec, "", "{}"))
        .await;
    let (_, initial) = h.update().await;
    let model_id = h.offer_model("train-down", &initial);
    h.send(task(
        "train-down",
        pb::TaskKind::Train,
        &spec,
        &model_id,
        "{}",
    ))
    .await;
    let withdrawn = loop {
        match h.next_event().await {
            Event::Fetched { .. } => continue,
            Event::Connected { request, .. } => break request.datasets,
            Event::Declined { task_id, reason } => declines.push((task_id, reason)),
            other => panic!("expected the dataset's withdrawal, got {other:?}"),
        }
    };
    assert_eq!(withdrawn, Vec::<String>::new());
    // The role may log in again: re-checked, announced, and a job runs on it.
    execute(&admin_url, &[format!("ALTER ROLE {role} LOGIN")]).await;
    assert_eq!(
        next_announcement(&mut h, &mut declines).await,
        vec!["breast_cancer".to_string()]
    );
    let (_, down) = declines
        .iter()
        .find(|(t, _)| t == "train-down")
        .expect("the task that could not read its source is declined");
    assert!(down.starts_with("data.unreadable"), "{down}");
    assert_nothing_of_the_source(down, &secrets);

    let model_id = h.offer_model("train-1", &initial);
    h.send(task("train-1", pb::TaskKind::Train, &spec, &model_id, "{}"))
        .await;
    let (manifest, update) = loop {
        match h.next_event().await {
            Event::Fetched { .. } => continue,
            Event::Update { manifest, tensors } => break (manifest, tensors),
            other => panic!("expected the round's update, got {other:?}"),
        }
    };
    assert_eq!(
        manifest.metadata.get(meta::TASK).map(String::as_str),
        Some("train-1")
    );
    // 120 rows, a fifth of each class held out: 96 train.
    assert_eq!(
        manifest.metadata.get(meta::SAMPLES).map(String::as_str),
        Some("96")
    );
    assert!(all_values(&update).iter().any(|&x| x != 0.0));
    for value in manifest.metadata.values() {
        assert_nothing_of_the_source(value, &secrets);
    }
    h.shutdown().await;
    execute(
        &admin_url,
        &[
            format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
            format!("DROP ROLE IF EXISTS {role}"),
        ],
    )
    .await;
}

#[test]
fn recheck_defaults_to_5_up_to_300_seconds_and_its_errors_name_the_key() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.recheck.initial(), Duration::from_secs(5));
    assert_eq!(c.recheck.max(), Duration::from_secs(300));
    let c = parse(&format!(
        "{MINIMAL}[recheck]\ninitial_secs = 0.5\nmax_secs = 30\n"
    ))
    .unwrap();
    assert_eq!(c.recheck.initial(), Duration::from_millis(500));
    assert_eq!(c.recheck.max(), Duration::from_secs(30));
    for (table, key) in [
        ("initial_secs = 0", "recheck.initial_secs"),
        ("initial_secs = 10\nmax_secs = 5", "recheck.max_secs"),
        ("max_secs = 1e9", "recheck.max_secs"),
    ] {
        let err = parse(&format!("{MINIMAL}[recheck]\n{table}\n")).unwrap_err();
        assert_eq!(err.key(), Some(key), "{table}: {err}");
        assert!(err.to_string().contains("/etc/tutela/node.toml"), "{err}");
    }
    // The documented example states the defaults.
    let example = std::fs::read_to_string(repo().join("deploy/config/node.toml")).unwrap();
    let c = NodeConfig::from_toml_str(&example, repo().join("deploy/config/node.toml")).unwrap();
    assert_eq!(c.recheck, Default::default());
}
