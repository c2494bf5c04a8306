//! The site's own check of a task's approvals and of its site policy, before any data is read.
//!
//! A site does not take the coordinator's word for it: the node recomputes the job's digest from
//! the spec text in the task, checks that the task's digest is that one, and accepts the task only
//! if at least one approval carried by the task verifies — for this job id and this digest, with a
//! certificate that chains to the consortium CA the node trusts for TLS (and its CRLs), unexpired,
//! signature valid — and is signed by one of the compliance officers listed in the site's own
//! `site-policy.toml` (never a list from the coordinator). Then the job must satisfy every clause
//! of the site policy; a refusal names every clause it breaks, at once.

use std::path::{Path, PathBuf};

use std::sync::Arc;
use time::OffsetDateTime;

use tutela_policy::site_policy::{JobTerms, ReloadingSitePolicy, SitePolicyError};
use tutela_policy::{Approval, ApprovalVerifier, SitePolicy};
use tutela_protocol::job::SubmittedSpec;
use tutela_protocol::pb;
use tutela_protocol::tls::TlsMaterial;

/// Why the site policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SiteApprovalsError {
    #[error("`site_policy` {}: {source}", .path.display())]
    Policy {
        path: PathBuf,
        // Boxed: the parse error is large and rare, and the Ok path should not pay for it.
        #[source]
        source: Box<tutela_policy::site_policy::SitePolicyError>,
    },
    #[error(
        "`site_policy` {}: it is the policy of site {found:?}, but this node is site {site:?}",
        .path.display()
    )]
    OtherSite {
        path: PathBuf,
        found: String,
        site: String,
    },
    #[error("the consortium CA: {0}")]
    Verifier(String),
}

/// Why a task is refused by this check.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApprovalRefusal {
    #[error("the task's job spec: {0}")]
    Spec(String),
    #[error(
        "the task says the job's digest is {claimed}, but its spec digests to {computed}: refused"
    )]
    DigestMismatch { claimed: String, computed: String },
    #[error("not approved for site {site}: {why}")]
    NotApproved { site: String, why: String },
    #[error(transparent)]
    /// Every site-policy clause the job breaks, all in one refusal.
    Breach(#[from] tutela_policy::Breaches),
}

/// The site policy and the trust anchors approvals are checked against.
#[derive(Debug, Clone)]
pub struct SiteApprovals {
    site: String,
    /// Re-read in place on SIGHUP and on change (the node registers it, see [`Self::reloading`]).
    policy: Arc<ReloadingSitePolicy>,
    verifier: ApprovalVerifier,
}

impl SiteApprovals {
    /// Loads `path` for `site`, trusting the CA and CRLs of the node's TLS material.
    pub fn load(
        site: &str,
        path: &Path,
        material: &TlsMaterial,
    ) -> Result<Self, SiteApprovalsError> {
        let policy = ReloadingSitePolicy::load(site, path).map_err(|source| match source {
            SitePolicyError::OtherSite { path, found, site } => {
                SiteApprovalsError::OtherSite { path, found, site }
            }
            source => SiteApprovalsError::Policy {
                path: path.to_path_buf(),
                source: Box::new(source),
            },
        })?;
        let verifier = ApprovalVerifier::from_tls(material)
            .map_err(|e| SiteApprovalsError::Verifier(e.to_string()))?;
        Ok(SiteApprovals {
            site: site.to_string(),
            policy: Arc::new(policy),
            verifier,
        })
    }

    /// From parts (tests, and nodes embedding their policy).
    pub fn new(site: &str, policy: SitePolicy, verifier: ApprovalVerifier) -> Self {
        SiteApprovals {
            site: site.to_string(),
            policy: Arc::new(ReloadingSitePolicy::fixed(policy)),
            verifier,
        }
    }

    /// The site policy in force now.
    pub fn policy(&self) -> Arc<SitePolicy> {
        self.policy.current()
    }

    /// The policy as reloaded in place: the node polls it (`tutela_policy::reload::spawn_watcher`)
    /// and re-reads it on SIGHUP (`tutela_policy::reload::reload_all_on_sighup`).
    pub fn reloading(&self) -> &Arc<ReloadingSitePolicy> {
        &self.policy
    }

    /// Checks `task` at `now_ms` (unix ms); `spent_epsilon` is what the site's privacy ledger has
    /// recorded as spent on the job's dataset.
    pub fn check(
        &self,
        task: &pb::Task,
        now_ms: i64,
        spent_epsilon: f64,
    ) -> Result<(), ApprovalRefusal> {
        // Either kind of job: the approvals are over its digest, the policy over its terms.
        let spec = SubmittedSpec::from_toml_str(&task.job_spec_toml)
            .map_err(|e| ApprovalRefusal::Spec(e.to_string()))?;
        let digest = spec.digest();
        if task.job_digest != digest.to_hex() {
            return Err(ApprovalRefusal::DigestMismatch {
                claimed: task.job_digest.clone(),
                computed: digest.to_hex(),
            });
        }
        let not_approved = |why: String| ApprovalRefusal::NotApproved {
            site: self.site.clone(),
            why,
        };
        if task.approvals.is_empty() {
            return Err(not_approved("the task carries no approvals".into()));
        }
        // One policy for the whole check, even if a reload swaps it meanwhile.
        let policy = self.policy.current();
        let mut reasons = Vec::new();
        let mut approved_by = None;
        for (i, wire) in task.approvals.iter().enumerate() {
            let verified = Approval::from_pb(wire)
                .and_then(|a| self.verifier.verify(&a, &task.job_id, &digest, now_ms));
            match verified {
                Ok(v) if policy.is_officer(&v.signer.uri()) => {
                    approved_by = Some(v.signer.uri());
                    break;
                }
                Ok(v) => reasons.push(format!(
                    "approval {i} by {} (not a compliance officer of this site)",
                    v.signer
                )),
                Err(e) => reasons.push(format!("approval {i}: {e}")),
            }
        }
        let Some(officer) = approved_by else {
            return Err(not_approved(format!(
                "no valid approval by one of its compliance officers ({})",
                reasons.join("; ")
            )));
        };
        evaluate(&policy, &spec, task, now_ms, spent_epsilon)?;
        tracing::info!(job = %task.job_id, %officer, "task approved by this site's compliance officer and within the site policy");
        Ok(())
    }

    /// The site policy alone, as [`check`](Self::check) weighs it after the approvals: for a
    /// job check (`tutela job check`), which comes before any officer signs. Every clause the
    /// job breaks is in the one refusal.
    pub fn check_policy(
        &self,
        task: &pb::Task,
        now_ms: i64,
        spent_epsilon: f64,
    ) -> Result<(), ApprovalRefusal> {
        let spec = SubmittedSpec::from_toml_str(&task.job_spec_toml)
            .map_err(|e| ApprovalRefusal::Spec(e.to_string()))?;
        evaluate(&self.policy.current(), &spec, task, now_ms, spent_epsilon)
    }
}

/// `policy`'s clauses over `spec`, submitted by whom `task` says, at `now_ms`.
fn evaluate(
    policy: &SitePolicy,
    spec: &SubmittedSpec,
    task: &pb::Task,
    now_ms: i64,
    spent_epsilon: f64,
) -> Result<(), ApprovalRefusal> {
    let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let submitter = (!task.submitted_by.is_empty()).then_some(task.submitted_by.as_str());
    policy.evaluate_terms(&JobTerms::of_submitted(spec), submitter, now, spent_epsilon)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The node driven directly, the coordinator bypassed: tasks with real job specs and
    //! approvals signed with real certificates, forged in each way a coordinator could.

    use std::sync::Arc;

    use tutela_protocol::identity::Principal;
    use tutela_protocol::job::JobSpec;
    use tutela_protocol::pki::{
        CertificateAuthority, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity,
    };

    use super::*;

    const JOB: &str = "00112233445566778899aabbccddeeff";
    const OP: &str = "spiffe://acme/operator/op";

    fn spec(model: &str, epsilon: f64) -> String {
        format!(
            r#"name = "t"
rounds = 2
min_sites = 1
round_deadline_secs = 30
update_norm_bound = 10.0
sites = ["st-mary"]
[model]
name = "{model}"
[data]
schema = "breast_cancer"
[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 16
[privacy]
mode = "local"
target_epsilon = {epsilon:?}
max_grad_norm = 1.0
noise_multiplier = 1.0
"#
        )
    }

    fn now() -> i64 {
        (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
    }

    fn issue(ca: &CertificateAuthority, name: &str) -> IssuedCertificate {
        ca.issue(
            &Principal::User {
                site: "st-mary".into(),
                name: name.into(),
            },
            &LeafOptions::new(Validity::days_from_now(5)),
        )
        .unwrap()
    }

    struct Fixture {
        ca: CertificateAuthority,
        alice: IssuedCertificate,
        gate: SiteApprovals,
    }

    fn fixture() -> Fixture {
        let ca = CertificateAuthority::create(
            "acme",
            KeyAlgorithm::EcdsaP256,
            Validity::days_from_now(30),
        )
        .unwrap();
        let alice = issue(&ca, "alice");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = ApprovalVerifier::new(Arc::new(roots), vec![], "acme").unwrap();
        let policy = SitePolicy::from_toml_str(&format!(
            "site = \"st-mary\"\ncompliance_officers = [\"spiffe://acme/site/st-mary/user/alice\"]\n\
             allowed_operators = [\"{OP}\"]\nallowed_models = [\"mlp\"]\n\
             [privacy]\nmax_epsilon_per_job = 3.0\n[privacy.budget]\nbreast_cancer = 10.0\n"
        ))
        .unwrap();
        policy.validate().unwrap();
        Fixture {
            gate: SiteApprovals::new("st-mary", policy, verifier),
            ca,
            alice,
        }
    }

    fn task(spec_toml: &str, approvals: Vec<pb::SignedApproval>) -> pb::Task {
        pb::Task {
            task_id: "t1".into(),
            kind: pb::TaskKind::Train as i32,
            job_id: JOB.into(),
            job_spec_toml: spec_toml.into(),
            job_digest: SubmittedSpec::from_toml_str(spec_toml)
                .unwrap()
                .digest()
                .to_hex(),
            approvals,
            submitted_by: OP.into(),
            ..Default::default()
        }
    }

    fn signed(
        key_of: &IssuedCertificate,
        cert_of: &IssuedCertificate,
        spec_toml: &str,
    ) -> pb::SignedApproval {
        let digest = SubmittedSpec::from_toml_str(spec_toml).unwrap().digest();
        let t = now();
        Approval::sign(
            &key_of.key_pem,
            &cert_of.cert_pem,
            JOB,
            &digest,
            t,
            t + 60_000,
        )
        .unwrap()
        .to_pb()
    }

    fn not_approved(r: Result<(), ApprovalRefusal>, expect: &str) {
        match r {
            Err(ApprovalRefusal::NotApproved { why, .. }) => {
                assert!(why.contains(expect), "expected {expect:?} in {why:?}")
            }
            other => panic!("expected NotApproved ({expect}), got {other:?}"),
        }
    }

    #[test]
    fn the_officers_approval_admits_the_task() {
        let f = fixture();
        let s = spec("mlp", 2.0);
        f.gate
            .check(&task(&s, vec![signed(&f.alice, &f.alice, &s)]), now(), 0.0)
            .unwrap();
    }

    #[test]
    fn forged_tasks_are_refused_with_the_reason() {
        let f = fixture();
        let s = spec("mlp", 2.0);
        not_approved(f.gate.check(&task(&s, vec![]), now(), 0.0), "no approvals");

        // Wrong key.
        let mallory = issue(&f.ca, "mallory");
        not_approved(
            f.gate
                .check(&task(&s, vec![signed(&mallory, &f.alice, &s)]), now(), 0.0),
            "does not verify with the key",
        );
        // Another CA's certificate for the same officer.
        let other = CertificateAuthority::create(
            "acme",
            KeyAlgorithm::Ed25519,
            Validity::days_from_now(30),
        )
        .unwrap();
        let fake = issue(&other, "alice");
        not_approved(
            f.gate
                .check(&task(&s, vec![signed(&fake, &fake, &s)]), now(), 0.0),
            "consortium CA",
        );
        // A valid certificate of a user who is not one of this site's officers.
        not_approved(
            f.gate
                .check(&task(&s, vec![signed(&mallory, &mallory, &s)]), now(), 0.0),
            "not a compliance officer of this site",
        );
        // A signature over another job's digest.
        let other_spec = spec("mlp", 1.0);
        not_approved(
            f.gate.check(
                &task(&s, vec![signed(&f.alice, &f.alice, &other_spec)]),
                now(),
                0.0,
            ),
            "the spec changed after it was signed",
        );
        // The coordinator lying about the digest of the spec it sends.
        let mut t = task(&s, vec![signed(&f.alice, &f.alice, &s)]);
        t.job_digest = JobSpec::from_toml_str(&other_spec)
            .unwrap()
            .digest()
            .to_hex();
        assert!(matches!(
            f.gate.check(&t, now(), 0.0),
            Err(ApprovalRefusal::DigestMismatch { .. })
        ));
        // An expired approval.
        let t = task(&s, vec![signed(&f.alice, &f.alice, &s)]);
        not_approved(f.gate.check(&t, now() + 120_000, 0.0), "expired");
    }

    #[test]
    fn a_spec_changed_after_approval_voids_it() {
        let f = fixture();
        let approved = spec("mlp", 2.0);
        let changed = approved.replace("rounds = 2", "rounds = 3");
        not_approved(
            f.gate.check(
                &task(&changed, vec![signed(&f.alice, &f.alice, &approved)]),
                now(),
                0.0,
            ),
            "the spec changed after it was signed",
        );
    }

    #[test]
    fn site_policy_breaches_are_refused_with_their_clause() {
        let f = fixture();
        let clause = |spec_toml: &str, submitter: &str, spent: f64| {
            let mut t = task(spec_toml, vec![signed(&f.alice, &f.alice, spec_toml)]);
            t.submitted_by = submitter.into();
            match f.gate.check(&t, now(), spent) {
                Err(ApprovalRefusal::Breach(b)) => b.0[0].clause.clone(),
                other => panic!("expected a breach, got {other:?}"),
            }
        };
        assert_eq!(clause(&spec("cnn", 2.0), OP, 0.0), "allowed_models");
        assert_eq!(
            clause(&spec("mlp", 5.0), OP, 0.0),
            "privacy.max_epsilon_per_job"
        );
        assert_eq!(
            clause(&spec("mlp", 2.0), OP, 9.0),
            "privacy.budget.breast_cancer"
        );
        assert_eq!(
            clause(&spec("mlp", 2.0), "spiffe://acme/operator/eve", 0.0),
            "allowed_operators"
        );
        let t = task(
            &spec("cnn", 2.0),
            vec![signed(&f.alice, &f.alice, &spec("cnn", 2.0))],
        );
        let msg = f.gate.check(&t, now(), 0.0).unwrap_err().to_string();
        assert!(msg.contains("site policy `allowed_models`"), "{msg}");
        // A job breaking several clauses is declined once, listing them all.
        let both = spec("cnn", 5.0);
        let mut t = task(&both, vec![signed(&f.alice, &f.alice, &both)]);
        t.submitted_by = OP.into();
        match f.gate.check(&t, now(), 0.0) {
            Err(ApprovalRefusal::Breach(b)) => {
                assert_eq!(
                    b.clauses(),
                    ["allowed_models", "privacy.max_epsilon_per_job"]
                );
                let msg = b.to_string();
                assert!(msg.contains("ε = 5 exceeds"), "{msg}");
            }
            other => panic!("expected both breaches, got {other:?}"),
        }
    }

    /// A consortium-statistics job's task: the same approvals over its digest, the policy over
    /// its terms — held to the operators and ε clauses, not to `allowed_models` (it trains no
    /// model) —, and a signature over the training job of the same name does not admit it.
    #[test]
    fn a_statistics_job_is_approved_and_held_to_the_policy_like_a_training_job() {
        let f = fixture();
        let stats = |epsilon: f64| {
            format!(
                "kind = \"statistics\"\nname = \"t\"\nmin_sites = 1\ndeadline_secs = 30\n\
                 sites = [\"st-mary\"]\n[data]\nschema = \"breast_cancer\"\n\
                 schema_sha256 = \"{}\"\n[privacy]\ntarget_epsilon = {epsilon:?}\n",
                "ab".repeat(32)
            )
        };
        let s = stats(2.0);
        // allowed_models = ["mlp"] does not restrict a job that trains no model.
        f.gate
            .check(&task(&s, vec![signed(&f.alice, &f.alice, &s)]), now(), 0.0)
            .unwrap();
        f.gate.check_policy(&task(&s, vec![]), now(), 0.0).unwrap();
        not_approved(f.gate.check(&task(&s, vec![]), now(), 0.0), "no approvals");
        let training = spec("mlp", 2.0);
        not_approved(
            f.gate.check(
                &task(&s, vec![signed(&f.alice, &f.alice, &training)]),
                now(),
                0.0,
            ),
            "the spec changed after it was signed",
        );
        let clauses = |spec_toml: &str, submitter: &str, spent: f64| {
            let mut t = task(spec_toml, vec![signed(&f.alice, &f.alice, spec_toml)]);
            t.submitted_by = submitter.into();
            match f.gate.check(&t, now(), spent) {
                Err(ApprovalRefusal::Breach(b)) => b
                    .clauses()
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>(),
                other => panic!("expected a breach, got {other:?}"),
            }
        };
        assert_eq!(
            clauses(&stats(5.0), OP, 0.0),
            ["privacy.max_epsilon_per_job"]
        );
        assert_eq!(clauses(&s, OP, 9.0), ["privacy.budget.breast_cancer"]);
        assert_eq!(
            clauses(&s, "spiffe://acme/operator/eve", 0.0),
            ["allowed_operators"]
        );
    }
}
