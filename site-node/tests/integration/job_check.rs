//! A CHECK task (`tutela job check`) at the node's gate, without a coordinator: every refusal
//! at once (schema digest, each site-policy clause, the privacy budget), decided with the
//! dataset's file deleted (so no data is read), with no approval at all, and nothing charged.

use std::collections::BTreeMap;
use std::sync::Arc;

use tutela_policy::{ApprovalVerifier, SitePolicy};
use tutela_protocol::job::JobSpec;
use tutela_protocol::pb;
use tutela_protocol::pki::{CertificateAuthority, KeyAlgorithm, Validity};
use tutela_site_node::agent::TaskGate;
use tutela_site_node::approvals::SiteApprovals;
use tutela_site_node::config::DatasetConfig;
use tutela_site_node::dataset::SiteDataset;
use tutela_site_node::ledger::{FixedCaps, PrivacyBudgetConfig, SiteLedgers};

const OP: &str = "spiffe://acme/operator/op";

fn job(model: &str, target: f64, schema_sha256: Option<&str>) -> String {
    let pin = schema_sha256
        .map(|d| format!("schema_sha256 = \"{d}\"\n"))
        .unwrap_or_default();
    format!(
        r#"name = "check-test"
rounds = 3
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 10.0
seed = 1
[model]
name = "{model}"
hidden = [8]
[data]
schema = "breast_cancer"
{pin}[training]
optimizer = "sgd"
learning_rate = 0.1
local_epochs = 1
batch_size = 32
[privacy]
mode = "local"
target_epsilon = {target}
delta = 1e-5
max_grad_norm = 1.0
"#
    )
}

fn task(spec: &str, submitted_by: &str) -> pb::Task {
    pb::Task {
        task_id: "c1".into(),
        kind: pb::TaskKind::Check as i32,
        job_id: "check-1".into(),
        job_digest: JobSpec::from_toml_str(spec).unwrap().digest().to_hex(),
        job_spec_toml: spec.into(),
        submitted_by: submitted_by.into(),
        ..Default::default()
    }
}

/// A dataset whose file is deleted after `prepare`: a check that read a record would fail.
fn dataset_without_its_file(dir: &std::path::Path) -> (Arc<SiteDataset>, String) {
    let data = crate::common::data_dir();
    let csv = dir.join("bc.csv");
    std::fs::copy(data.join("breast_cancer_wisconsin.csv"), &csv).unwrap();
    let config = DatasetConfig {
        path: csv.clone(),
        schema: data.join("breast_cancer.schema.toml"),
        validation_fraction: 0.2,
        split_seed: 1,
        ..Default::default()
    };
    let ds = SiteDataset::prepare("breast_cancer", &config, None).unwrap();
    std::fs::remove_file(&csv).unwrap();
    let digest = ds.schema_sha256().to_string();
    (Arc::new(ds), digest)
}

#[test]
fn a_check_lists_every_refusal_at_once_without_approvals_data_or_spending() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, digest) = dataset_without_its_file(dir.path());
    let ca =
        CertificateAuthority::create("acme", KeyAlgorithm::EcdsaP256, Validity::days_from_now(3))
            .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    // The site policy's total for the dataset (its `[privacy.budget]`), as the node reads it.
    let ledgers = Arc::new(
        SiteLedgers::new(
            dir.path().join("ledger"),
            None,
            PrivacyBudgetConfig::default(),
        )
        .with_caps(Arc::new(FixedCaps {
            per_job: None,
            total: Some(4.0),
        })),
    );
    let roots = Arc::new(roots);
    let gate = |allowed_model: &str| {
        let verifier = ApprovalVerifier::new(roots.clone(), vec![], "acme").unwrap();
        let policy = SitePolicy::from_toml_str(&format!(
            "site = \"st-mary\"\ncompliance_officers = [\"spiffe://acme/site/st-mary/user/alice\"]\n\
             allowed_operators = [\"{OP}\"]\nallowed_models = [\"{allowed_model}\"]\n\
             [privacy]\nmax_epsilon_per_job = 3.0\n"
        ))
        .unwrap();
        TaskGate::new(BTreeMap::from([(
            "breast_cancer".to_string(),
            dataset.clone(),
        )]))
        .with_approvals(SiteApprovals::new("st-mary", policy, verifier))
        .with_ledgers(ledgers.clone())
    };

    // Another schema file, another operator, another model, ε over the policy's cap and over
    // the ledger's total: five refusals, in one answer.
    let bad = job("mlp", 6.0, Some(&"0".repeat(64)));
    let refusals = gate("cnn").check_job(&task(&bad, "spiffe://acme/operator/mallory"));
    let codes: Vec<&str> = refusals.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(
        codes,
        [
            "data.schema_mismatch",
            "policy.refused",
            "policy.refused",
            "policy.refused",
            "privacy.budget",
        ],
        "{refusals:#?}"
    );
    for (refusal, clause) in refusals[1..4].iter().zip([
        "allowed_operators",
        "allowed_models",
        "privacy.max_epsilon_per_job",
    ]) {
        assert!(
            refusal
                .reason
                .starts_with(&format!("site policy `{clause}`")),
            "{refusal:?}"
        );
    }
    assert!(
        refusals[3].reason.contains("ε = 6 exceeds this site's 3"),
        "{refusals:#?}"
    );
    // Numbers, never a local path.
    for r in &refusals {
        assert!(!r.reason.contains(&*dir.path().to_string_lossy()), "{r:?}");
        assert!(!r.reason.contains("Some("), "{r:?}");
    }

    // The job as the site would run it: nothing to refuse, and no approval was needed.
    let good = job("mlp", 2.0, Some(&digest));
    assert_eq!(gate("mlp").check_job(&task(&good, OP)), []);
    // A check spends nothing: the ledger holds no charge.
    assert_eq!(ledgers.spent("breast_cancer").unwrap(), 0.0);

    // A job on a schema the site does not have: named, with what the site has.
    let other = good.replace("schema = \"breast_cancer\"", "schema = \"heart\"");
    let refusals = gate("mlp").check_job(&task(&other, OP));
    assert_eq!(refusals[0].code, "task.unknown_schema", "{refusals:#?}");
    assert!(
        refusals[0].reason.contains("breast_cancer"),
        "{refusals:#?}"
    );

    // Attack: a coordinator sends a task (any kind) whose job no officer signed, naming a base
    // the site lacks, to make the node download and cache it (evicting the site's cached
    // bases). The node fetches a base only for a task its gate approves (`TaskGate::approve`); a job the
    // site would run but nobody signed is not one. Without approvals (`insecure_no_approvals`)
    // the gate approves every fetch, as it admits every task.
    let mut unsigned = task(&good, OP);
    unsigned.kind = pb::TaskKind::Train as i32;
    // A TRAIN task names the global model it trains (checked before any fetch too).
    unsigned.global_model_id = "ab".repeat(32);
    assert!(!gate("mlp").approve(&unsigned).is_ok());
    unsigned.job_digest = "0".repeat(64);
    assert!(!gate("mlp").approve(&unsigned).is_ok());
    let insecure = TaskGate::new(BTreeMap::from([(
        "breast_cancer".to_string(),
        dataset.clone(),
    )]));
    assert!(insecure.approve(&unsigned).is_ok());
    // Signed by the site's officer: fetched.
    let mut options = tutela_protocol::pki::LeafOptions::new(Validity::days_from_now(3));
    options.algorithm = KeyAlgorithm::EcdsaP256;
    let alice = ca
        .issue(
            &tutela_protocol::identity::Principal::User {
                site: "st-mary".into(),
                name: "alice".into(),
            },
            &options,
        )
        .unwrap();
    let digest = JobSpec::from_toml_str(&good).unwrap().digest();
    let mut signed = unsigned.clone();
    signed.job_id = "0123456789abcdef0123456789abcdef".into();
    signed.job_digest = digest.to_hex();
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    signed.approvals = vec![
        tutela_policy::Approval::sign(
            &alice.key_pem,
            &alice.cert_pem,
            &signed.job_id,
            &digest,
            at - 1_000,
            at + 600_000,
        )
        .unwrap()
        .to_pb(),
    ];
    assert!(gate("mlp").approve(&signed).is_ok());
    // The same signature on a spec the coordinator changed afterwards: not fetched.
    let mut tampered = signed.clone();
    tampered.job_spec_toml = good.replace("rounds = ", "rounds = 1");
    tampered.job_digest = JobSpec::from_toml_str(&tampered.job_spec_toml)
        .unwrap()
        .digest()
        .to_hex();
    assert!(!gate("mlp").approve(&tampered).is_ok());
}

/// A consortium-statistics job's CHECK (`kind = "statistics"`): its table and schema digest,
/// each site-policy clause (not `allowed_models`: it trains no model), and its one release
/// against the ledger's caps, from the schema's layout alone (the dataset's file is deleted:
/// no record is read); nothing is charged.
#[test]
fn a_statistics_job_check_lists_its_refusals_without_reading_data_or_spending() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, digest) = dataset_without_its_file(dir.path());
    let mut roots = rustls::RootCertStore::empty();
    let ca =
        CertificateAuthority::create("acme", KeyAlgorithm::EcdsaP256, Validity::days_from_now(3))
            .unwrap();
    roots.add(ca.cert_der().clone()).unwrap();
    let ledgers = Arc::new(
        SiteLedgers::new(
            dir.path().join("ledger"),
            None,
            PrivacyBudgetConfig::default(),
        )
        .with_caps(Arc::new(FixedCaps {
            per_job: None,
            total: Some(4.0),
        })),
    );
    let verifier = ApprovalVerifier::new(Arc::new(roots), vec![], "acme").unwrap();
    let policy = SitePolicy::from_toml_str(&format!(
        "site = \"st-mary\"\ncompliance_officers = [\"spiffe://acme/site/st-mary/user/alice\"]\n\
         allowed_operators = [\"{OP}\"]\nallowed_models = [\"cnn\"]\n\
         [privacy]\nmax_epsilon_per_job = 3.0\n"
    ))
    .unwrap();
    let gate = TaskGate::new(BTreeMap::from([(
        "breast_cancer".to_string(),
        dataset.clone(),
    )]))
    .with_approvals(SiteApprovals::new("st-mary", policy, verifier))
    .with_ledgers(ledgers.clone());
    let stats = |target: f64, schema_sha256: &str| {
        format!(
            "kind = \"statistics\"\nname = \"dictionary\"\nmin_sites = 1\ndeadline_secs = 60\n\
             [data]\nschema = \"breast_cancer\"\nschema_sha256 = \"{schema_sha256}\"\n\
             [privacy]\ntarget_epsilon = {target:?}\ndelta = 1e-6\n"
        )
    };
    let task = |spec: &str, submitted_by: &str| pb::Task {
        task_id: "c2".into(),
        kind: pb::TaskKind::Check as i32,
        job_id: "check-2".into(),
        job_digest: tutela_protocol::job::StatisticsJobSpec::from_toml_str(spec)
            .unwrap()
            .digest()
            .to_hex(),
        job_spec_toml: spec.into(),
        submitted_by: submitted_by.into(),
        ..Default::default()
    };

    // Within everything: nothing to refuse, though allowed_models names only "cnn".
    assert_eq!(gate.check_job(&task(&stats(2.0, &digest), OP)), []);

    // Another schema file, another operator, ε over the policy's cap and the ledger's total.
    let refusals = gate.check_job(&task(
        &stats(6.0, &"0".repeat(64)),
        "spiffe://acme/operator/mallory",
    ));
    let codes: Vec<&str> = refusals.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(
        codes,
        [
            "data.schema_mismatch",
            "policy.refused",
            "policy.refused",
            "privacy.budget",
        ],
        "{refusals:#?}"
    );
    assert!(
        refusals[1]
            .reason
            .starts_with("site policy `allowed_operators`")
            && refusals[2]
                .reason
                .starts_with("site policy `privacy.max_epsilon_per_job`"),
        "{refusals:#?}"
    );
    assert!(refusals[3].reason.contains("total"), "{refusals:#?}");
    for r in &refusals {
        assert!(!r.reason.contains(&*dir.path().to_string_lossy()), "{r:?}");
    }
    // A check spends nothing.
    assert_eq!(ledgers.spent("breast_cancer").unwrap(), 0.0);

    // A schema the site does not have.
    let other = stats(2.0, &digest).replace("schema = \"breast_cancer\"", "schema = \"heart\"");
    let refusals = gate.check_job(&task(&other, OP));
    assert_eq!(refusals[0].code, "task.unknown_schema", "{refusals:#?}");
}
