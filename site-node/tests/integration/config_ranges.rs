//! Every range deploy/config/node.toml documents is enforced: the shipped file with one value
//! just outside its range is refused at start, with an error naming the key and the file.

use std::path::Path;

use tutela_site_node::config::NodeConfig;

/// Sets `path` (table names, then the key) of `table` to `value`.
fn set(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().unwrap();
    let mut t = table;
    for p in parents {
        t = t[*p].as_table_mut().unwrap();
    }
    t.insert(last.to_string(), value);
}

#[test]
fn every_documented_range_of_node_toml_is_enforced() {
    use toml::Value::{Float, Integer};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node.toml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    NodeConfig::from_toml_str(&shipped, &path).expect("the shipped node.toml is valid");
    let cases: Vec<(&[&str], toml::Value, &str)> = vec![
        (&["torch_threads"], Integer(5000), "torch_threads"),
        (
            &["datasets", "breast_cancer", "validation_fraction"],
            Float(0.0),
            "datasets.breast_cancer.validation_fraction",
        ),
        (
            &["datasets", "breast_cancer", "validation_fraction"],
            Float(1.0),
            "datasets.breast_cancer.validation_fraction",
        ),
        (
            &["reconnect", "initial_backoff_secs"],
            Float(0.0),
            "reconnect.initial_backoff_secs",
        ),
        (
            &["reconnect", "initial_backoff_secs"],
            Float(86_401.0),
            "reconnect.initial_backoff_secs",
        ),
        (
            &["reconnect", "max_backoff_secs"],
            Float(0.5),
            "reconnect.max_backoff_secs",
        ),
        (
            &["reconnect", "max_backoff_secs"],
            Float(86_401.0),
            "reconnect.max_backoff_secs",
        ),
        (
            &["recheck", "initial_secs"],
            Float(0.0),
            "recheck.initial_secs",
        ),
        (&["recheck", "max_secs"], Float(1.0), "recheck.max_secs"),
        (
            &["recheck", "max_secs"],
            Float(86_401.0),
            "recheck.max_secs",
        ),
        (&["privacy", "delta"], Float(1.0), "privacy.delta"),
        (
            &["base_cache", "max_entries"],
            Integer(0),
            "base_cache.max_entries",
        ),
        (
            &["base_cache", "max_bytes"],
            Integer(0),
            "base_cache.max_bytes",
        ),
    ];
    for (key_path, value, key) in cases {
        let mut table: toml::Table = toml::from_str(&shipped).unwrap();
        set(&mut table, key_path, value.clone());
        let text = toml::to_string(&table).unwrap();
        let err = NodeConfig::from_toml_str(&text, &path)
            .expect_err(&format!("{key} = {value} must be refused"))
            .to_string();
        assert!(
            err.contains(key) && err.contains(path.to_str().unwrap()),
            "{key} = {value}: {err}"
        );
    }
}

/// The ε caps have one home, site-policy.toml: node.toml's former cap keys are refused, each
/// error naming the key, the file, where it moved and the exact lines to write there.
#[test]
fn node_toml_epsilon_caps_are_refused_with_the_lines_for_the_site_policy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node.toml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    let config = NodeConfig::from_toml_str(&shipped, &path).unwrap();
    let policy = config.site_policy.clone().unwrap();
    for (key, value, lines) in [
        (
            "max_epsilon_per_job",
            toml::Value::Float(8.0),
            "[privacy]\nmax_epsilon_per_job = 8.0".to_string(),
        ),
        (
            "max_epsilon_total",
            toml::Value::Integer(20),
            // One line per dataset of the node, tables and text alike.
            format!(
                "[privacy.budget]\n{}",
                config
                    .datasets
                    .keys()
                    .chain(config.text_datasets.keys())
                    .map(|d| format!("{d} = 20.0"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ),
    ] {
        let mut table: toml::Table = toml::from_str(&shipped).unwrap();
        set(&mut table, &["privacy", key], value);
        let text = toml::to_string(&table).unwrap();
        let err = NodeConfig::from_toml_str(&text, &path).unwrap_err();
        let dotted = format!("privacy.{key}");
        assert_eq!(err.key(), Some(dotted.as_str()), "{err}");
        let message = err.to_string();
        for needle in [
            path.to_str().unwrap(),
            &format!(
                "`{dotted}` has moved to the site policy {}",
                policy.display()
            ),
            "remove it from node.toml and write there:",
            &lines,
        ] {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
    }
}

/// `coordinator` takes one `HOST:PORT` (as before) or a list of them, tried in order; an empty
/// list, or a bad entry in it, is refused naming the key and the entry.
#[test]
fn coordinator_takes_one_address_or_a_list_and_checks_each() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node.toml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    let with = |value: toml::Value| {
        let mut table: toml::Table = toml::from_str(&shipped).unwrap();
        set(&mut table, &["coordinator"], value);
        NodeConfig::from_toml_str(&toml::to_string(&table).unwrap(), &path)
    };
    let one = NodeConfig::from_toml_str(&shipped, &path).unwrap();
    assert_eq!(
        one.coordinator.iter().collect::<Vec<_>>(),
        ["coordinator.consortium.example:7443"]
    );
    let list = |v: &[&str]| {
        toml::Value::Array(
            v.iter()
                .map(|a| toml::Value::String(a.to_string()))
                .collect(),
        )
    };
    let two = with(list(&["c1.example:7443", "10.0.0.2:7443"])).unwrap();
    assert_eq!(
        two.coordinator.iter().collect::<Vec<_>>(),
        ["c1.example:7443", "10.0.0.2:7443"]
    );
    assert_eq!(two.coordinator.nth_cyclic(3), "10.0.0.2:7443");
    let e = with(list(&[])).unwrap_err().to_string();
    assert!(e.contains("coordinator") && e.contains("empty list"), "{e}");
    let e = with(list(&["c1.example:7443", "no-port"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("coordinator") && e.contains("no-port"), "{e}");
    let e = with(toml::Value::Integer(7443)).unwrap_err().to_string();
    assert!(e.contains("HOST:PORT"), "{e}");
}
