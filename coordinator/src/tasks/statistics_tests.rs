//! A statistics task's release at the task table: only from the task's own site, while it is
//! open, once, and only for a statistics task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tutela_privacy::stats::{ColumnLayout, StatsLayout};

use super::{Destination, Outcome, TaskGroup, TaskTable};
use crate::statistics::SiteRelease;

fn release(site: &str) -> SiteRelease {
    let layout = StatsLayout::new(vec![ColumnLayout::Categorical {
        name: "label".into(),
        categories: vec!["yes".into(), "no".into()],
    }])
    .unwrap();
    SiteRelease {
        site: site.into(),
        sums: vec![0; layout.len()],
        layout,
    }
}

#[test]
fn a_statistics_release_is_taken_from_its_own_site_once_while_the_task_is_open() {
    let tasks = TaskTable::default();
    let group = Arc::new(TaskGroup::default());
    let later = Instant::now() + Duration::from_secs(60);
    tasks.register(
        "t-a",
        "job",
        "a",
        "",
        later,
        Destination::Statistics,
        group.clone(),
    );

    // Another site's node cannot answer for site a.
    let e = tasks
        .release_statistics("t-a", "b", release("b"))
        .unwrap_err();
    assert!(
        e.to_string().contains("was given to site a, not to b"),
        "{e}"
    );
    // Its own site can, once.
    tasks.release_statistics("t-a", "a", release("a")).unwrap();
    let e = tasks
        .release_statistics("t-a", "a", release("a"))
        .unwrap_err();
    assert!(e.to_string().contains("already has a result"), "{e}");
    let closed = tasks.close(&["t-a".to_string()]);
    assert!(
        matches!(&closed[0].2, Some(Outcome::Released { release }) if release.site == "a"),
        "{:?}",
        closed[0].2
    );
    // Closed: nothing more is taken.
    let e = tasks
        .release_statistics("t-a", "a", release("a"))
        .unwrap_err();
    assert!(e.to_string().contains("is not open"), "{e}");

    // Past its deadline.
    let past = Instant::now() - Duration::from_millis(1);
    tasks.register(
        "t-late",
        "job",
        "a",
        "",
        past,
        Destination::Statistics,
        group.clone(),
    );
    let e = tasks
        .release_statistics("t-late", "a", release("a"))
        .unwrap_err();
    assert!(e.to_string().contains("past its deadline"), "{e}");

    // A training task's result is a model, never statistics; the task stays claimable.
    let model_dir = tempfile::tempdir().unwrap();
    let expected: Arc<tutela_protocol::initial_model::InitialModel> = {
        let spec: tutela_protocol::job::ModelSpec = toml::from_str("name = \"mlp\"").unwrap();
        Arc::new(tutela_protocol::initial_model::InitialModel::Layers(
            tutela_protocol::model_registry::ModelDescription::for_job(&spec).unwrap(),
        ))
    };
    tasks.register(
        "t-init",
        "job",
        "a",
        "",
        later,
        Destination::InitialModel {
            model_dir: model_dir.path().to_path_buf(),
            expected,
        },
        group,
    );
    let e = tasks
        .release_statistics("t-init", "a", release("a"))
        .unwrap_err();
    assert!(e.to_string().contains("is not a statistics task"), "{e}");
    assert!(tasks.is_open("t-init"));
}
