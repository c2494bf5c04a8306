//! The job spec, its digest, the job state machine, and the crash-safe store.
//!
//! Store tests run the same body against SQLite (a file in a temporary directory) and, when
//! `TUTELA_TEST_POSTGRES_URL` is set (e.g. `postgres://postgres@127.0.0.1:55432/postgres`), against
//! PostgreSQL too, each in a fresh database created for the test and dropped after it.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use time::OffsetDateTime;
use tutela_coordinator::job::{
    JobId, JobSpec, JobState, Optimizer, RoundState, SpecDigest, SpecError, canonical_json,
};
use tutela_coordinator::store::{
    AcceptedUpdate, Backend, RefusedUpdate, ResumePoint, RoundRecord, Store, StoreError,
};

// ------------------------------------------------------------------------------------------------
// Fixtures

const SPEC: &str = r#"
name = "test-job"
rounds = 4
min_sites = 2
fraction = 1.0
round_deadline_secs = 60
max_round_retries = 2
update_norm_bound = 5.0
sites = ["site-a", "site-b", "site-c"]
seed = 11

[model]
name = "mlp"
hidden = [8, 4]
dropout = 0.1

[data]
schema = "breast_cancer"

[training]
optimizer = "sgd"
learning_rate = 0.05
local_epochs = 1
batch_size = 16
weight_decay = 0.0
momentum = 0.9
"#;

/// The same spec: other key order, inline tables, comments, other spacing and number spelling.
const SPEC_REORDERED: &str = r#"
# comments do not count
seed=11
sites = [ "site-a",
          "site-b", "site-c" ]   # trailing comment
training = { momentum = 0.90, weight_decay = 0.0, batch_size = 16, local_epochs = 1, learning_rate = 5e-2, optimizer = "sgd" }
update_norm_bound=5
max_round_retries = 2
round_deadline_secs = 60
fraction = 1
min_sites = 2
rounds = 4
name = "test-job"
[data]
schema = "breast_cancer"
[model]
dropout = 0.1
hidden = [ 8, 4 ]
name = "mlp"
"#;

pub(crate) fn spec() -> (String, JobSpec, SpecDigest) {
    let spec = JobSpec::from_toml_str(SPEC).expect("the test spec is valid");
    let digest = spec.digest();
    (SPEC.to_string(), spec, digest)
}

fn spec_table() -> toml::Table {
    toml::from_str(SPEC).expect("the test spec is TOML")
}

/// The test spec with `path` (dotted, tables only) set to `value`.
fn spec_with(path: &str, value: toml::Value) -> String {
    let mut table = spec_table();
    let mut cur = &mut table;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table on the path");
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    toml::to_string(&table).expect("serializable")
}

/// A `[privacy]` table for DP-SGD at the sites with the given target ε.
fn privacy_table(target_epsilon: f64) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("mode".into(), toml::Value::String("local".into()));
    t.insert("target_epsilon".into(), toml::Value::Float(target_epsilon));
    t.insert("max_grad_norm".into(), toml::Value::Float(1.0));
    toml::Value::Table(t)
}

fn spec_without(key: &str) -> String {
    let mut table = spec_table();
    table.remove(key);
    toml::to_string(&table).expect("serializable")
}

/// A distinct, valid 64-hex digest per tag.
fn hexd(tag: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, tag.as_bytes()))
}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).expect("in range")
}

/// A record for `round` in which site-a and site-b are accepted and site-c refused.
pub(crate) fn record(round: u32) -> RoundRecord {
    let mut metrics = BTreeMap::new();
    metrics.insert(
        "site-a".to_string(),
        serde_json::json!({"loss": 0.5, "accuracy": 0.75, "examples": 120}),
    );
    metrics.insert(
        "site-b".to_string(),
        serde_json::json!({"loss": 0.25, "accuracy": 0.875, "examples": 80}),
    );
    RoundRecord {
        participants: vec!["site-b".into(), "site-a".into(), "site-c".into()],
        // Deliberately not in site order: the store keeps the folding order.
        accepted: vec![
            AcceptedUpdate {
                site: "site-b".into(),
                digest: hexd(&format!("update {round} b")),
                weight: 80.0,
                norm: 1.25,
            },
            AcceptedUpdate {
                site: "site-a".into(),
                digest: hexd(&format!("update {round} a")),
                weight: 120.0,
                norm: 0.5 + f64::from(round) / 8.0,
            },
        ],
        refused: vec![RefusedUpdate {
            site: "site-c".into(),
            digest: Some(hexd(&format!("update {round} c"))),
            norm: Some(9.5),
            reason: "L2 norm 9.5 is over the job's bound 5".into(),
        }],
        site_metrics: metrics,
        global_model_digest: hexd(&format!("global {round}")),
        started_at: at(i64::from(round) * 100),
        completed_at: at(i64::from(round) * 100 + 42),
    }
}

// ------------------------------------------------------------------------------------------------
// Running one test body on every backend

pub(crate) struct TestDb {
    pub(crate) label: &'static str,
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: (admin URL, database to drop).
    pg: Option<(String, String)>,
}

const PG_ENV: &str = "TUTELA_TEST_POSTGRES_URL";

/// `url` with its database (the path) replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

async fn admin_exec(admin_url: &str, sql: String) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {PG_ENV}: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

/// Runs `body` on SQLite, then on PostgreSQL if `TUTELA_TEST_POSTGRES_URL` is set.
pub(crate) async fn for_each_backend(test: &str, body: impl AsyncFn(&TestDb)) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = Store::sqlite_url(&dir.path().join("coordinator.db")).expect("utf-8 path");
    let sqlite = TestDb {
        label: "sqlite",
        url,
        _dir: Some(dir),
        pg: None,
    };
    body(&sqlite).await;

    match std::env::var(PG_ENV) {
        Ok(admin) if !admin.is_empty() => {
            let name = format!(
                "tutela_test_{}_{}",
                test,
                &JobId::generate().expect("rng").to_string()[..8]
            );
            admin_exec(&admin, format!("CREATE DATABASE {name}")).await;
            let pg = TestDb {
                label: "postgres",
                url: with_database(&admin, &name),
                _dir: None,
                pg: Some((admin.clone(), name.clone())),
            };
            body(&pg).await;
            if let Some((admin, name)) = &pg.pg {
                admin_exec(
                    admin,
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                )
                .await;
            }
        }
        _ => eprintln!("{test}: the PostgreSQL variant was not run: {PG_ENV} is not set"),
    }
}

pub(crate) async fn open(db: &TestDb) -> Store {
    Store::open(&db.url)
        .await
        .unwrap_or_else(|e| panic!("[{}] open: {e}", db.label))
}

/// A second, raw connection pool on the same database, to inspect or sabotage rows directly.
async fn raw(db: &TestDb) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&db.url)
        .await
        .unwrap_or_else(|e| panic!("[{}] raw connect: {e}", db.label))
}

async fn count(pool: &sqlx::AnyPool, sql: &'static str, job: &JobId) -> i64 {
    sqlx::query_scalar(sql)
        .bind(job.as_str())
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A job of [`SPEC`] in state Running with its initial model recorded.
pub(crate) async fn running_job(store: &Store) -> JobId {
    let (text, spec, digest) = spec();
    let job = store
        .create_job(&text, &spec, &digest)
        .await
        .expect("create_job");
    store
        .set_global_model(&job, 0, &hexd("initial"))
        .await
        .expect("initial model");
    store
        .set_job_state(&job, JobState::Proposed, JobState::Running, None)
        .await
        .expect("start");
    job
}

// ------------------------------------------------------------------------------------------------
// The job spec

#[test]
fn example_job_specs_parse_and_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/jobs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/jobs") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        // Either kind: a consortium-statistics example (`kind = "statistics"`) sits beside the
        // training ones.
        match tutela_protocol::job::SubmittedSpec::from_toml_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        {
            tutela_protocol::job::SubmittedSpec::Training(spec) => {
                assert!(spec.rounds >= 1 && spec.min_sites as usize <= spec.sites.len());
            }
            tutela_protocol::job::SubmittedSpec::Statistics(spec) => {
                assert!(spec.min_sites as usize <= spec.sites.len());
            }
        }
        seen += 1;
    }
    assert!(
        seen >= 2,
        "expected the example job specs in {}",
        dir.display()
    );
    let bc = JobSpec::from_toml_str(include_str!(
        "../../../deploy/jobs/breast_cancer_fedavg.toml"
    ))
    .expect("breast cancer job");
    assert_eq!(bc.model.name, "mlp");
    assert_eq!(bc.sites.len(), 3);
    assert_eq!(bc.training.optimizer, Optimizer::Adam);
    assert_eq!(
        bc.model.params.get("hidden"),
        Some(&toml::Value::Array(vec![32.into(), 16.into()]))
    );
    let mnist = JobSpec::from_toml_str(include_str!("../../../deploy/jobs/mnist_cnn_fedavg.toml"))
        .expect("mnist job");
    assert_eq!(mnist.model.name, "cnn");
    assert_eq!(mnist.sites.len(), 5);
}

#[test]
fn spec_defaults_fill_in_optional_keys() {
    let mut table = spec_table();
    for k in ["fraction", "max_round_retries", "sites", "seed"] {
        table.remove(k);
    }
    let training = table["training"].as_table_mut().expect("table");
    training.remove("weight_decay");
    training.remove("momentum");
    let spec = JobSpec::from_toml_str(&toml::to_string(&table).expect("toml")).expect("valid");
    assert_eq!(spec.fraction, 1.0);
    assert_eq!(spec.max_round_retries, 0);
    assert!(spec.sites.is_empty());
    assert_eq!(spec.seed, 0);
    assert_eq!(spec.training.momentum, 0.0);
    assert_eq!(spec.training.weight_decay, 0.0);
    assert!(spec.strategy.is_none() && spec.privacy.is_none());
}

#[test]
fn every_validation_error_names_its_key() {
    use toml::Value as V;
    let arr = |v: Vec<V>| V::Array(v);
    let s = |x: &str| V::String(x.to_string());
    let mut adam_with_momentum = spec_table();
    adam_with_momentum["training"]["optimizer"] = s("adam");
    let cases: Vec<(String, &str)> = vec![
        (spec_with("name", s("")), "name"),
        (spec_with("name", s("no spaces please")), "name"),
        (spec_with("model.name", s("")), "model.name"),
        (
            spec_with("model.dropout", V::Float(f64::NAN)),
            "model.dropout",
        ),
        (
            spec_with(
                "model.hidden",
                arr(vec![V::Integer(8), V::Float(f64::INFINITY)]),
            ),
            "model.hidden[1]",
        ),
        (spec_with("data.schema", s("../etc")), "data.schema"),
        (
            spec_with("training.learning_rate", V::Float(0.0)),
            "training.learning_rate",
        ),
        (
            spec_with("training.learning_rate", V::Float(-1.0)),
            "training.learning_rate",
        ),
        (
            spec_with("training.learning_rate", V::Float(f64::NAN)),
            "training.learning_rate",
        ),
        (
            spec_with("training.local_epochs", V::Integer(0)),
            "training.local_epochs",
        ),
        (
            spec_with("training.batch_size", V::Integer(0)),
            "training.batch_size",
        ),
        (
            spec_with("training.weight_decay", V::Float(-0.1)),
            "training.weight_decay",
        ),
        (
            spec_with("training.momentum", V::Float(1.0)),
            "training.momentum",
        ),
        (
            toml::to_string(&adam_with_momentum).expect("toml"),
            "training.momentum",
        ),
        (spec_with("rounds", V::Integer(0)), "rounds"),
        (spec_with("min_sites", V::Integer(0)), "min_sites"),
        (spec_with("min_sites", V::Integer(4)), "min_sites"),
        (spec_with("fraction", V::Float(0.0)), "fraction"),
        (spec_with("fraction", V::Float(1.5)), "fraction"),
        (
            spec_with("round_deadline_secs", V::Integer(0)),
            "round_deadline_secs",
        ),
        (
            spec_with("update_norm_bound", V::Float(0.0)),
            "update_norm_bound",
        ),
        (
            spec_with("update_norm_bound", V::Float(f64::INFINITY)),
            "update_norm_bound",
        ),
        (
            spec_with("sites", arr(vec![s("site-a"), s("Site B")])),
            "sites[1]",
        ),
        (
            spec_with("sites", arr(vec![s("site-a"), s("site-a")])),
            "sites[1]",
        ),
        (spec_with("strategy.mu", V::Float(f64::NAN)), "strategy.mu"),
        (
            spec_with("privacy", privacy_table(f64::INFINITY)),
            "privacy.target_epsilon",
        ),
    ];
    for (text, key) in &cases {
        match JobSpec::from_toml_str(text) {
            Ok(_) => panic!("expected an error for `{key}`"),
            Err(e) => {
                assert_eq!(e.key(), Some(*key), "{e}");
                assert!(e.to_string().contains(&format!("`{key}`")), "{e}");
            }
        }
    }
}

#[test]
fn shape_errors_name_their_key() {
    let cases: Vec<(String, &[&str])> = vec![
        (format!("roundz = 3\n{SPEC}"), &["roundz"]),
        (SPEC.replace("learning_rate", "lr"), &["lr"]),
        (spec_without("rounds"), &["rounds"]),
        (spec_without("update_norm_bound"), &["update_norm_bound"]),
        (SPEC.replace("rounds = 4", "rounds = \"four\""), &["rounds"]),
        (
            SPEC.replace("\"sgd\"", "\"adamw\""),
            &["optimizer", "adamw"],
        ),
        (SPEC.replace("schema = ", "scheme = "), &["scheme"]),
    ];
    for (text, words) in &cases {
        let e = JobSpec::from_toml_str(text).expect_err("must not parse");
        assert!(matches!(e, SpecError::Toml(_)), "{e}");
        let msg = e.to_string();
        for w in *words {
            assert!(msg.contains(w), "{w:?} not named in: {msg}");
        }
    }
}

#[test]
fn digest_is_stable_across_key_order_whitespace_and_defaults() {
    let (_, spec, digest) = spec();
    let reordered = JobSpec::from_toml_str(SPEC_REORDERED).expect("valid");
    assert_eq!(reordered, spec);
    assert_eq!(reordered.digest(), digest);
    assert_eq!(reordered.canonical_json(), spec.canonical_json());
    // A default written out is the same setting as a default left out.
    let mut table = spec_table();
    table.remove("fraction");
    let implicit = JobSpec::from_toml_str(&toml::to_string(&table).expect("toml")).expect("valid");
    assert_eq!(implicit.digest(), digest);
    // The digest is SHA-256 of the canonical JSON, which has no whitespace and sorted keys.
    let canonical = spec.canonical_json();
    assert!(
        canonical.starts_with(r#"{"data":{"schema":"breast_cancer"},"fraction":1,"#),
        "{canonical}"
    );
    assert!(!canonical.contains(' '));
    let recomputed = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ));
    assert_eq!(digest.to_hex(), recomputed);
    assert_eq!(digest.to_hex().parse::<SpecDigest>(), Ok(digest));
}

#[test]
fn digest_changes_when_any_field_changes() {
    use toml::Value as V;
    let s = |x: &str| V::String(x.to_string());
    let mut strategy = toml::Table::new();
    strategy.insert("name".into(), s("fedprox"));
    let changed = vec![
        spec_with("name", s("test-job-2")),
        spec_with("rounds", V::Integer(5)),
        spec_with("min_sites", V::Integer(3)),
        spec_with("fraction", V::Float(0.5)),
        spec_with("round_deadline_secs", V::Integer(61)),
        spec_with("max_round_retries", V::Integer(3)),
        spec_with("update_norm_bound", V::Float(5.000000000000001)),
        spec_with(
            "sites",
            V::Array(vec![s("site-a"), s("site-c"), s("site-b")]),
        ),
        spec_with("sites", V::Array(vec![])),
        spec_with("seed", V::Integer(12)),
        spec_with("model.name", s("cnn")),
        spec_with("model.hidden", V::Array(vec![8.into(), 5.into()])),
        spec_with("model.dropout", V::Float(0.2)),
        // (An unknown hyper-parameter of a registry model is refused at submission now.)
        spec_with("model.conv_channels", V::Array(vec![8.into(), 16.into()])),
        spec_with("data.schema", s("mnist")),
        spec_with("training.optimizer", s("adam")).replace("momentum = 0.9", "momentum = 0.0"),
        spec_with("training.learning_rate", V::Float(0.051)),
        spec_with("training.local_epochs", V::Integer(2)),
        spec_with("training.batch_size", V::Integer(32)),
        spec_with("training.weight_decay", V::Float(1e-4)),
        spec_with("training.momentum", V::Float(0.8)),
        spec_with("strategy", V::Table(strategy)),
        spec_with("privacy", privacy_table(3.0)),
        spec_with("privacy", privacy_table(8.0)),
    ];
    let (_, _, base) = spec();
    let mut digests = HashSet::new();
    digests.insert(base);
    for text in &changed {
        let spec = JobSpec::from_toml_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(
            digests.insert(spec.digest()),
            "digest unchanged or repeated for:\n{text}"
        );
    }
    assert_eq!(digests.len(), changed.len() + 1);
}

#[test]
fn canonical_json_follows_rfc8785() {
    // RFC 8785 §3.2.2's example (numbers, string escapes, literals). The numbers are built from
    // Rust literals: serde_json's default parser may land 1 ulp off for 333333333.33333329
    // (it lacks `float_roundtrip`), which is about JSON parsing, not about canonicalisation. Job
    // specs never go through it: their floats come from TOML's exact parser.
    let strings: serde_json::Value = serde_json::from_str(
        r#"{"string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/", "literals": [null, true, false]}"#,
    )
    .expect("json");
    let mut value = strings;
    #[allow(clippy::excessive_precision)] // RFC 8785's own spelling of the number
    let numbers = serde_json::json!([333333333.33333329_f64, 1e30, 4.50, 2e-3, 1e-27]);
    value["numbers"] = numbers;
    assert_eq!(
        canonical_json(&value),
        r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
    );
    // RFC 8785 §3.2.3's sorting example: UTF-16 code unit order (the emoji's surrogates sort
    // before U+FB33, although its code point is larger).
    let input = r#"{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}"#;
    let value: serde_json::Value = serde_json::from_str(input).expect("json");
    assert_eq!(
        canonical_json(&value),
        "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\
         \"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\
         \"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
    );
    // Integers are written exactly, even past 2^53; -0 is 0; nesting has no whitespace.
    let value = serde_json::json!({"b": [u64::MAX, -0.0, 1.0, 0.1], "a": {"z": {}, "y": []}});
    assert_eq!(
        canonical_json(&value),
        r#"{"a":{"y":[],"z":{}},"b":[18446744073709551615,0,1,0.1]}"#
    );
}

#[test]
fn job_state_machine_allows_exactly_the_documented_transitions() {
    use JobState::*;
    let legal = [
        (Proposed, Running),
        (Proposed, Cancelled),
        (Running, Completed),
        (Running, Failed),
        (Running, Cancelled),
    ];
    for from in JobState::ALL {
        for to in JobState::ALL {
            let allowed = legal.contains(&(from, to));
            assert_eq!(from.can_transition_to(to), allowed, "{from} -> {to}");
            match from.transition(to) {
                Ok(next) => {
                    assert!(allowed, "{from} -> {to} allowed");
                    assert_eq!(next, to);
                }
                Err(e) => {
                    assert!(!allowed, "{from} -> {to} refused");
                    assert_eq!((e.from, e.to), (from, to));
                    assert!(
                        e.to_string().contains(&format!("from {from} to {to}")),
                        "{e}"
                    );
                }
            }
        }
        assert_eq!(from.as_str().parse::<JobState>(), Ok(from));
    }
    for terminal in [Completed, Failed, Cancelled] {
        assert!(terminal.is_terminal());
        assert!(
            JobState::ALL
                .iter()
                .all(|to| !terminal.can_transition_to(*to))
        );
    }
    assert!("paused".parse::<JobState>().is_err());
    assert_eq!("failed".parse::<RoundState>(), Ok(RoundState::Failed));
}

// ------------------------------------------------------------------------------------------------
// The store

#[tokio::test]
async fn creates_gets_and_lists_jobs() {
    for_each_backend("create", async |db: &TestDb| {
        let store = open(db).await;
        let (text, spec, digest) = spec();
        let a = store
            .create_job(&text, &spec, &digest)
            .await
            .expect("create a");
        let b = store
            .create_job(&text, &spec, &digest)
            .await
            .expect("create b");
        assert_ne!(a, b, "[{}] ids are unique", db.label);

        let got = store.get_job(&a).await.expect("get").expect("exists");
        assert_eq!(got.id, a);
        assert_eq!(got.name, "test-job");
        assert_eq!(got.spec_toml, text);
        assert_eq!(got.spec_digest, digest);
        assert_eq!(got.state, JobState::Proposed);
        assert_eq!((got.current_round, got.total_rounds), (0, 4));
        assert_eq!(got.spec().expect("spec"), spec);

        store
            .set_job_state(&b, JobState::Proposed, JobState::Running, None)
            .await
            .expect("start b");
        let all = store.list_jobs(None).await.expect("list");
        assert_eq!(
            all.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            [a.clone(), b.clone()]
        );
        let proposed = store
            .list_jobs(Some(JobState::Proposed))
            .await
            .expect("list");
        assert_eq!(
            proposed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            std::slice::from_ref(&a)
        );
        let running = store
            .list_jobs(Some(JobState::Running))
            .await
            .expect("list");
        assert_eq!(
            running.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            std::slice::from_ref(&b)
        );

        let unknown: JobId = "0123456789abcdef0123456789abcdef".parse().expect("id");
        assert!(store.get_job(&unknown).await.expect("get").is_none());
        assert!(matches!(
            store.last_completed_round(&unknown).await,
            Err(StoreError::JobNotFound(_))
        ));
    })
    .await;
}

#[tokio::test]
async fn create_job_refuses_a_mismatched_spec_or_digest() {
    for_each_backend("mismatch", async |db: &TestDb| {
        let store = open(db).await;
        let (text, spec, digest) = spec();
        let other =
            JobSpec::from_toml_str(&spec_with("rounds", toml::Value::Integer(9))).expect("valid");
        let e = store
            .create_job(&text, &spec, &other.digest())
            .await
            .expect_err("wrong digest");
        assert!(matches!(e, StoreError::SpecMismatch(_)), "{e}");
        let e = store
            .create_job(&text, &other, &digest)
            .await
            .expect_err("wrong spec");
        assert!(matches!(e, StoreError::SpecMismatch(_)), "{e}");
        let e = store
            .create_job("name = 1", &spec, &digest)
            .await
            .expect_err("bad text");
        assert!(matches!(e, StoreError::Spec(_)), "{e}");
        assert!(
            store.list_jobs(None).await.expect("list").is_empty(),
            "[{}] nothing stored",
            db.label
        );
    })
    .await;
}

#[tokio::test]
async fn set_job_state_is_a_compare_and_set() {
    for_each_backend("cas", async |db: &TestDb| {
        let store = open(db).await;
        let (text, spec, digest) = spec();
        let job = store
            .create_job(&text, &spec, &digest)
            .await
            .expect("create");

        // Illegal by the state machine: refused before touching the database.
        let e = store
            .set_job_state(&job, JobState::Proposed, JobState::Completed, None)
            .await
            .expect_err("illegal");
        assert!(matches!(e, StoreError::IllegalTransition { .. }), "{e}");
        // Legal, but the job is not in `from`: a stale view is refused.
        let e = store
            .set_job_state(&job, JobState::Running, JobState::Failed, Some("x"))
            .await
            .expect_err("stale");
        assert!(
            matches!(
                e,
                StoreError::StaleState {
                    expected: JobState::Running,
                    actual: JobState::Proposed,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            store.get_job(&job).await.expect("get").expect("job").state,
            JobState::Proposed
        );

        // Two racing transitions out of Proposed: exactly one wins.
        let (s1, s2) = (store.clone(), store.clone());
        let (j1, j2) = (job.clone(), job.clone());
        let (r1, r2) = tokio::join!(
            tokio::spawn(async move {
                s1.set_job_state(&j1, JobState::Proposed, JobState::Running, None)
                    .await
            }),
            tokio::spawn(async move {
                s2.set_job_state(
                    &j2,
                    JobState::Proposed,
                    JobState::Cancelled,
                    Some("withdrawn"),
                )
                .await
            }),
        );
        let (r1, r2) = (r1.expect("task"), r2.expect("task"));
        assert!(
            r1.is_ok() != r2.is_ok(),
            "[{}] exactly one wins: {r1:?} {r2:?}",
            db.label
        );
        let loser = if r1.is_ok() { r2 } else { r1 };
        assert!(
            matches!(loser, Err(StoreError::StaleState { .. })),
            "{loser:?}"
        );
        let state = store.get_job(&job).await.expect("get").expect("job");
        assert_eq!(
            state.state,
            if state.state_reason.is_some() {
                JobState::Cancelled
            } else {
                JobState::Running
            }
        );

        // Running -> Completed needs every round; Failed keeps its reason; terminal stays.
        let job = running_job(&store).await;
        let e = store
            .set_job_state(&job, JobState::Running, JobState::Completed, None)
            .await
            .expect_err("no rounds yet");
        assert!(
            matches!(
                e,
                StoreError::JobIncomplete {
                    current: 0,
                    total: 4,
                    ..
                }
            ),
            "{e}"
        );
        store
            .set_job_state(
                &job,
                JobState::Running,
                JobState::Failed,
                Some("round 1: 1 of 2 sites"),
            )
            .await
            .expect("fail");
        let got = store.get_job(&job).await.expect("get").expect("job");
        assert_eq!(got.state, JobState::Failed);
        assert_eq!(got.state_reason.as_deref(), Some("round 1: 1 of 2 sites"));
        let e = store
            .set_job_state(&job, JobState::Failed, JobState::Running, None)
            .await
            .expect_err("terminal");
        assert!(e.to_string().contains("final"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn complete_round_twice_fails_and_leaves_one_row() {
    for_each_backend("twice", async |db: &TestDb| {
        let store = open(db).await;
        let pool = raw(db).await;
        let job = running_job(&store).await;
        store
            .complete_round(&job, 1, 1, &record(1))
            .await
            .expect("round 1");

        let e = store
            .complete_round(&job, 1, 1, &record(1))
            .await
            .expect_err("again");
        assert!(
            matches!(e, StoreError::RoundAlreadyCompleted { round: 1, .. }),
            "{e}"
        );
        // Even with another attempt number or another model: still one round 1.
        let mut other = record(1);
        other.global_model_digest = hexd("another model");
        let e = store
            .complete_round(&job, 1, 2, &other)
            .await
            .expect_err("again");
        assert!(
            matches!(e, StoreError::RoundAlreadyCompleted { round: 1, .. }),
            "{e}"
        );

        assert_eq!(
            count(&pool, "SELECT COUNT(*) FROM rounds WHERE job_id = $1", &job).await,
            1
        );
        assert_eq!(
            count(
                &pool,
                "SELECT COUNT(*) FROM round_updates WHERE job_id = $1",
                &job
            )
            .await,
            3
        );
        assert_eq!(
            count(
                &pool,
                "SELECT COUNT(*) FROM round_attempts WHERE job_id = $1",
                &job
            )
            .await,
            1
        );
        assert_eq!(
            store.global_model(&job, 1).await.expect("model"),
            Some(hexd("global 1"))
        );

        // Two coordinators completing round 2 at once: one row, one winner.
        let (s1, s2, j1, j2) = (store.clone(), store.clone(), job.clone(), job.clone());
        let (r1, r2) = tokio::join!(
            tokio::spawn(async move { s1.complete_round(&j1, 2, 1, &record(2)).await }),
            tokio::spawn(async move { s2.complete_round(&j2, 2, 1, &record(2)).await }),
        );
        let (r1, r2) = (r1.expect("task"), r2.expect("task"));
        assert!(
            r1.is_ok() != r2.is_ok(),
            "[{}] exactly one wins: {r1:?} {r2:?}",
            db.label
        );
        let loser = if r1.is_ok() { r2 } else { r1 };
        assert!(
            matches!(
                loser,
                Err(StoreError::RoundAlreadyCompleted { round: 2, .. })
            ),
            "{loser:?}"
        );
        assert_eq!(
            count(&pool, "SELECT COUNT(*) FROM rounds WHERE job_id = $1", &job).await,
            2
        );
        assert_eq!(store.rounds(&job).await.expect("rounds").len(), 2);
        pool.close().await;
    })
    .await;
}

#[tokio::test]
async fn rounds_have_no_gap_and_no_duplicate() {
    for_each_backend("gaps", async |db: &TestDb| {
        let store = open(db).await;
        let job = running_job(&store).await;

        let e = store
            .complete_round(&job, 2, 1, &record(2))
            .await
            .expect_err("gap");
        assert!(
            matches!(
                e,
                StoreError::RoundOutOfOrder {
                    round: 2,
                    expected: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = store
            .complete_round(&job, 0, 1, &record(0))
            .await
            .expect_err("round 0");
        assert!(matches!(e, StoreError::InvalidRecord { .. }), "{e}");
        let e = store
            .complete_round(&job, 5, 1, &record(5))
            .await
            .expect_err("past the end");
        assert!(
            matches!(
                e,
                StoreError::RoundBeyondJob {
                    round: 5,
                    total: 4,
                    ..
                }
            ),
            "{e}"
        );

        let mut submitted = Vec::new();
        for r in 1..=4 {
            store
                .complete_round(&job, r, 1, &record(r))
                .await
                .expect("round");
            submitted.push(record(r));
            let e = store
                .complete_round(&job, r + 2, 1, &record(r + 2))
                .await
                .expect_err("gap");
            assert!(
                matches!(
                    e,
                    StoreError::RoundOutOfOrder { .. } | StoreError::RoundBeyondJob { .. }
                ),
                "{e}"
            );
        }
        let rounds = store.rounds(&job).await.expect("rounds");
        assert_eq!(
            rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(rounds.iter().all(|r| r.attempt == 1));
        // Read back exactly as recorded, updates in their folding order.
        assert_eq!(
            rounds.iter().map(|r| r.record.clone()).collect::<Vec<_>>(),
            submitted
        );
        assert_eq!(
            store.last_completed_round(&job).await.expect("last"),
            Some((4, hexd("global 4")))
        );
        assert_eq!(
            store.resume_point(&job).await.expect("resume"),
            ResumePoint {
                last_completed_round: 4,
                global_model_digest: Some(hexd("global 4")),
                next_round: None,
                next_attempt: 1
            }
        );
        store
            .set_job_state(&job, JobState::Running, JobState::Completed, None)
            .await
            .expect("complete the job");
        let e = store
            .complete_round(&job, 4, 1, &record(4))
            .await
            .expect_err("completed job");
        assert!(
            matches!(
                e,
                StoreError::JobNotRunning {
                    state: JobState::Completed,
                    ..
                }
            ),
            "{e}"
        );
    })
    .await;
}

#[tokio::test]
async fn round_records_are_checked_before_anything_is_written() {
    for_each_backend("records", async |db: &TestDb| {
        let store = open(db).await;
        let (text, spec, digest) = spec();
        let proposed = store
            .create_job(&text, &spec, &digest)
            .await
            .expect("create");
        store
            .set_global_model(&proposed, 0, &hexd("initial"))
            .await
            .expect("initial");
        let e = store
            .complete_round(&proposed, 1, 1, &record(1))
            .await
            .expect_err("not running");
        assert!(
            matches!(
                e,
                StoreError::JobNotRunning {
                    state: JobState::Proposed,
                    ..
                }
            ),
            "{e}"
        );

        let job = running_job(&store).await;
        type Spoil = Box<dyn Fn(&mut RoundRecord)>;
        let bad: Vec<(&str, Spoil)> = vec![
            (
                "model digest",
                Box::new(|r| r.global_model_digest = "ABC".into()),
            ),
            ("no accepted", Box::new(|r| r.accepted.clear())),
            (
                "update digest",
                Box::new(|r| r.accepted[0].digest.make_ascii_uppercase()),
            ),
            ("weight", Box::new(|r| r.accepted[0].weight = f64::NAN)),
            ("norm", Box::new(|r| r.accepted[1].norm = -1.0)),
            ("twice", Box::new(|r| r.refused[0].site = "site-a".into())),
            (
                "not a participant",
                Box::new(|r| r.accepted[0].site = "site-z".into()),
            ),
            ("no reason", Box::new(|r| r.refused[0].reason = " ".into())),
            (
                "times",
                Box::new(|r| r.completed_at = r.started_at - time::Duration::SECOND),
            ),
        ];
        for (what, spoil) in bad {
            let mut r = record(1);
            spoil(&mut r);
            let e = store.complete_round(&job, 1, 1, &r).await.expect_err(what);
            assert!(
                matches!(e, StoreError::InvalidRecord { round: 1, .. }),
                "{what}: {e}"
            );
        }
        assert!(store.rounds(&job).await.expect("rounds").is_empty());
        assert_eq!(
            store
                .get_job(&job)
                .await
                .expect("get")
                .expect("job")
                .current_round,
            0
        );
    })
    .await;
}

#[tokio::test]
async fn a_round_is_recorded_whole_or_not_at_all() {
    for_each_backend("atomic", async |db: &TestDb| {
        let store = open(db).await;
        let pool = raw(db).await;
        let job = running_job(&store).await;
        store
            .complete_round(&job, 1, 1, &record(1))
            .await
            .expect("round 1");

        // Sabotage: a row that makes the *last* statement of complete_round(2) fail, after the
        // job row, the model, the round and its updates were written in the transaction.
        sqlx::query(
            "INSERT INTO round_attempts (job_id, round, attempt, outcome, reason, recorded_at_ms)
             VALUES ($1, 2, 1, 'completed', NULL, 0)",
        )
        .bind(job.as_str())
        .execute(&pool)
        .await
        .expect("sabotage");
        let e = store
            .complete_round(&job, 2, 1, &record(2))
            .await
            .expect_err("sabotaged");
        assert!(matches!(e, StoreError::Db { .. }), "{e}");

        // Nothing of round 2 remains.
        assert_eq!(
            store
                .get_job(&job)
                .await
                .expect("get")
                .expect("job")
                .current_round,
            1
        );
        assert_eq!(store.global_model(&job, 2).await.expect("model"), None);
        assert_eq!(store.rounds(&job).await.expect("rounds").len(), 1);
        assert_eq!(
            count(&pool, "SELECT COUNT(*) FROM rounds WHERE job_id = $1", &job).await,
            1
        );
        assert_eq!(
            count(
                &pool,
                "SELECT COUNT(*) FROM round_updates WHERE job_id = $1 AND round = 2",
                &job
            )
            .await,
            0
        );
        assert_eq!(
            store.last_completed_round(&job).await.expect("last"),
            Some((1, hexd("global 1")))
        );

        // Remove the sabotage: the round completes normally.
        sqlx::query("DELETE FROM round_attempts WHERE job_id = $1 AND round = 2")
            .bind(job.as_str())
            .execute(&pool)
            .await
            .expect("repair");
        store
            .complete_round(&job, 2, 1, &record(2))
            .await
            .expect("round 2");
        pool.close().await;
    })
    .await;
}

#[tokio::test]
async fn failed_attempts_are_numbered_and_resumed() {
    for_each_backend("attempts", async |db: &TestDb| {
        let store = open(db).await;
        let job = running_job(&store).await;
        assert_eq!(
            store.resume_point(&job).await.expect("resume"),
            ResumePoint {
                last_completed_round: 0,
                global_model_digest: Some(hexd("initial")),
                next_round: Some(1),
                next_attempt: 1
            }
        );
        assert_eq!(store.last_completed_round(&job).await.expect("last"), None);

        store
            .record_failed_attempt(&job, 1, 1, "1 of 2 sites reported by the deadline")
            .await
            .expect("attempt 1 failed");
        let e = store
            .record_failed_attempt(&job, 1, 1, "again")
            .await
            .expect_err("dup");
        assert!(
            matches!(e, StoreError::AttemptOutOfOrder { expected: 2, .. }),
            "{e}"
        );
        let e = store
            .record_failed_attempt(&job, 1, 3, "skip")
            .await
            .expect_err("gap");
        assert!(
            matches!(e, StoreError::AttemptOutOfOrder { expected: 2, .. }),
            "{e}"
        );
        let e = store
            .record_failed_attempt(&job, 2, 1, "wrong round")
            .await
            .expect_err("round");
        assert!(
            matches!(e, StoreError::RoundOutOfOrder { expected: 1, .. }),
            "{e}"
        );
        let e = store
            .complete_round(&job, 1, 1, &record(1))
            .await
            .expect_err("stale attempt");
        assert!(
            matches!(
                e,
                StoreError::AttemptOutOfOrder {
                    attempt: 1,
                    expected: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            store.resume_point(&job).await.expect("resume").next_attempt,
            2
        );
        assert_eq!(
            store
                .failed_attempts(&job, 1)
                .await
                .expect("failed attempts"),
            1
        );

        store
            .complete_round(&job, 1, 2, &record(1))
            .await
            .expect("attempt 2 completes");
        let attempts = store.attempts(&job).await.expect("attempts");
        assert_eq!(
            attempts
                .iter()
                .map(|a| (a.round, a.attempt, a.state))
                .collect::<Vec<_>>(),
            [(1, 1, RoundState::Failed), (1, 2, RoundState::Completed)]
        );
        assert_eq!(
            attempts[0].reason.as_deref(),
            Some("1 of 2 sites reported by the deadline")
        );
        assert_eq!(store.rounds(&job).await.expect("rounds")[0].attempt, 2);
        let e = store
            .record_failed_attempt(&job, 1, 3, "late")
            .await
            .expect_err("completed round");
        assert!(
            matches!(e, StoreError::RoundAlreadyCompleted { round: 1, .. }),
            "{e}"
        );
        assert_eq!(
            store.resume_point(&job).await.expect("resume"),
            ResumePoint {
                last_completed_round: 1,
                global_model_digest: Some(hexd("global 1")),
                next_round: Some(2),
                next_attempt: 1
            }
        );
    })
    .await;
}

#[tokio::test]
async fn global_models_are_recorded_once() {
    for_each_backend("models", async |db: &TestDb| {
        let store = open(db).await;
        let (text, spec, digest) = spec();
        let job = store
            .create_job(&text, &spec, &digest)
            .await
            .expect("create");
        store
            .set_job_state(&job, JobState::Proposed, JobState::Running, None)
            .await
            .expect("start");
        // No initial model: round 1 cannot complete, and nothing is written.
        let e = store
            .complete_round(&job, 1, 1, &record(1))
            .await
            .expect_err("no initial model");
        assert!(matches!(e, StoreError::InitialModelMissing { .. }), "{e}");
        assert_eq!(
            store
                .get_job(&job)
                .await
                .expect("get")
                .expect("job")
                .current_round,
            0
        );

        let e = store
            .set_global_model(&job, 0, "not hex")
            .await
            .expect_err("bad digest");
        assert!(matches!(e, StoreError::InvalidInput { .. }), "{e}");
        store
            .set_global_model(&job, 0, &hexd("initial"))
            .await
            .expect("initial");
        store
            .set_global_model(&job, 0, &hexd("initial"))
            .await
            .expect("idempotent");
        let e = store
            .set_global_model(&job, 0, &hexd("other"))
            .await
            .expect_err("conflict");
        assert!(
            matches!(e, StoreError::GlobalModelConflict { round: 0, .. }),
            "{e}"
        );
        let e = store
            .set_global_model(&job, 1, &hexd("global 1"))
            .await
            .expect_err("open round");
        assert!(
            matches!(
                e,
                StoreError::GlobalModelForOpenRound {
                    round: 1,
                    current: 0,
                    ..
                }
            ),
            "{e}"
        );

        store
            .complete_round(&job, 1, 1, &record(1))
            .await
            .expect("round 1");
        store
            .set_global_model(&job, 1, &hexd("global 1"))
            .await
            .expect("same digest again");
        let e = store
            .set_global_model(&job, 1, &hexd("other"))
            .await
            .expect_err("conflict");
        assert!(
            matches!(e, StoreError::GlobalModelConflict { round: 1, .. }),
            "{e}"
        );
        assert_eq!(
            store.global_model(&job, 0).await.expect("m"),
            Some(hexd("initial"))
        );
        assert_eq!(
            store.global_model(&job, 1).await.expect("m"),
            Some(hexd("global 1"))
        );
    })
    .await;
}

#[tokio::test]
async fn nodes_keep_their_identity() {
    for_each_backend("nodes", async |db: &TestDb| {
        let store = open(db).await;
        let id_a = "spiffe://demo/site/site-a/node";
        store
            .register_node("site-a", id_a, at(10))
            .await
            .expect("register");
        store
            .register_node("site-b", "spiffe://demo/site/site-b/node", at(5))
            .await
            .expect("b");
        store
            .register_node("site-a", id_a, at(20))
            .await
            .expect("seen again");
        store
            .register_node("site-a", id_a, at(15))
            .await
            .expect("an older report");
        let nodes = store.nodes().await.expect("nodes");
        assert_eq!(
            nodes.iter().map(|n| n.site.as_str()).collect::<Vec<_>>(),
            ["site-a", "site-b"]
        );
        assert_eq!((nodes[0].first_seen, nodes[0].last_seen), (at(10), at(20)));
        assert_eq!(nodes[0].identity, id_a);

        let e = store
            .register_node("site-a", "spiffe://other/site/site-a/node", at(30))
            .await
            .expect_err("another identity");
        assert!(matches!(e, StoreError::NodeIdentityConflict { .. }), "{e}");
        for (site, identity) in [
            ("site-a", "spiffe://demo/site/site-b/node"),
            ("site-a", "spiffe://demo/site/site-a/user/alice"),
            ("site-a", "https://demo/site/site-a/node"),
            ("Site A", "spiffe://demo/site/Site A/node"),
        ] {
            let e = store
                .register_node(site, identity, at(30))
                .await
                .expect_err(identity);
            assert!(
                matches!(e, StoreError::InvalidInput { .. }),
                "{identity}: {e}"
            );
        }
        assert_eq!(store.nodes().await.expect("nodes")[0].last_seen, at(20));
    })
    .await;
}

#[tokio::test]
async fn state_rounds_and_resume_point_survive_reopening() {
    for_each_backend("reopen", async |db: &TestDb| {
        let (job, done, proposed) = {
            let store = open(db).await;
            let job = running_job(&store).await;
            store
                .complete_round(&job, 1, 1, &record(1))
                .await
                .expect("round 1");
            store
                .record_failed_attempt(&job, 2, 1, "deadline")
                .await
                .expect("failed");
            store
                .complete_round(&job, 2, 2, &record(2))
                .await
                .expect("round 2");
            store
                .record_failed_attempt(&job, 3, 1, "deadline")
                .await
                .expect("failed");
            let done = running_job(&store).await;
            for r in 1..=4 {
                store
                    .complete_round(&done, r, 1, &record(r))
                    .await
                    .expect("round");
            }
            store
                .set_job_state(&done, JobState::Running, JobState::Completed, None)
                .await
                .expect("complete");
            let (text, spec, digest) = spec();
            let proposed = store
                .create_job(&text, &spec, &digest)
                .await
                .expect("create");
            store
                .register_node("site-a", "spiffe://demo/site/site-a/node", at(1))
                .await
                .expect("node");
            // Dropped without close(), as a crashed process would leave it.
            drop(store);
            (job, done, proposed)
        };

        let store = open(db).await;
        let info = store.describe().await.expect("describe");
        assert_eq!(info.schema_version, 6);
        assert_eq!(
            store.get_job(&job).await.expect("get").expect("job").state,
            JobState::Running
        );
        assert_eq!(
            store.get_job(&done).await.expect("get").expect("job").state,
            JobState::Completed
        );
        assert_eq!(
            store
                .get_job(&proposed)
                .await
                .expect("get")
                .expect("job")
                .state,
            JobState::Proposed
        );
        let running = store
            .list_jobs(Some(JobState::Running))
            .await
            .expect("list");
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].id, job);

        let rounds = store.rounds(&job).await.expect("rounds");
        assert_eq!(
            rounds
                .iter()
                .map(|r| (r.round, r.attempt))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 2)]
        );
        assert_eq!(rounds[1].record, record(2));
        assert_eq!(
            store.last_completed_round(&job).await.expect("last"),
            Some((2, hexd("global 2")))
        );
        assert_eq!(
            store.resume_point(&job).await.expect("resume"),
            ResumePoint {
                last_completed_round: 2,
                global_model_digest: Some(hexd("global 2")),
                next_round: Some(3),
                next_attempt: 2
            }
        );
        assert_eq!(store.rounds(&done).await.expect("rounds").len(), 4);
        assert_eq!(store.nodes().await.expect("nodes").len(), 1);

        // The resumed coordinator continues where the job stood.
        store
            .complete_round(&job, 3, 2, &record(3))
            .await
            .expect("round 3 after restart");
        let e = store
            .complete_round(&job, 2, 2, &record(2))
            .await
            .expect_err("no recount");
        assert!(
            matches!(e, StoreError::RoundAlreadyCompleted { round: 2, .. }),
            "{e}"
        );
        store.close().await;

        // Opening a third time applies no migration twice.
        let store = open(db).await;
        let pool = raw(db).await;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM coordinator_schema_migrations")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(n, 6, "[{}] one row per migration", db.label);
        assert_eq!(store.rounds(&job).await.expect("rounds").len(), 3);
        pool.close().await;
        store.close().await;
    })
    .await;
}

#[tokio::test]
async fn migrations_refuse_an_edited_or_newer_schema() {
    for_each_backend("migrations", async |db: &TestDb| {
        open(db).await.close().await;
        let pool = raw(db).await;
        sqlx::query(
            "UPDATE coordinator_schema_migrations SET checksum = 'edited' WHERE version = 1",
        )
        .execute(&pool)
        .await
        .expect("tamper");
        let e = Store::open(&db.url).await.expect_err("edited migration");
        assert!(
            matches!(e, StoreError::MigrationChanged { version: 1, .. }),
            "{e}"
        );
        sqlx::query(
            "INSERT INTO coordinator_schema_migrations (version, name, checksum, applied_at_ms)
             VALUES (999, 'from the future', 'x', 0)",
        )
        .execute(&pool)
        .await
        .expect("future");
        let e = Store::open(&db.url).await.expect_err("newer schema");
        assert!(
            matches!(
                e,
                StoreError::SchemaTooNew {
                    found: 999,
                    known: 6,
                    ..
                }
            ),
            "{e}"
        );
        pool.close().await;
    })
    .await;
}

#[tokio::test]
async fn sqlite_store_runs_wal_with_synchronous_full() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A path with characters SQLite's URL parser would otherwise misread.
    let path = dir.path().join("jobs ?#%.db");
    let store = Store::open(&Store::sqlite_url(&path).expect("url"))
        .await
        .expect("open");
    assert!(path.exists(), "the file is created where asked");
    let info = store.describe().await.expect("describe");
    assert_eq!(info.backend, Backend::Sqlite);
    assert_eq!(info.sqlite_journal_mode.as_deref(), Some("wal"));
    assert_eq!(info.sqlite_synchronous, Some(2), "2 is FULL");
    assert_eq!(info.schema_version, 6);
    store.close().await;

    let e = Store::open("mysql://root:pw@localhost/x")
        .await
        .expect_err("unsupported");
    assert!(matches!(e, StoreError::UnsupportedUrl(_)), "{e}");
    assert!(!e.to_string().contains("pw"), "no password in: {e}");
}

/// A write waits for SQLite's lock held by another writer longer than sqlx's default 5 s busy
/// timeout, instead of failing with "database is locked" (seen with a thousand sites connecting
/// and approving at once: tutela-loadgen, BENCHMARKS.md "Hundreds of sites").
#[tokio::test]
async fn a_sqlite_write_waits_for_a_lock_held_past_five_seconds() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = Store::sqlite_url(&dir.path().join("jobs.db")).expect("url");
    let store = Store::open(&url).await.expect("open");
    let mut other = sqlx::sqlite::SqliteConnection::connect(&url)
        .await
        .expect("a second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("the write lock");
    let holder = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(7)).await;
        sqlx::query("COMMIT")
            .execute(&mut other)
            .await
            .expect("commit");
        other
    });
    let started = std::time::Instant::now();
    store
        .register_node("a", "spiffe://c/site/a/node", OffsetDateTime::now_utc())
        .await
        .expect("the write waits for the lock");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    holder.await.expect("holder").close().await.expect("close");
    store.close().await;
}
