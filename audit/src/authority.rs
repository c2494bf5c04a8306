//! Who may assert what: the one table of the audit trail's authority, enforced when an event is
//! appended and checked again by every reader of the stored trail.
//!
//! Every [`Action`] has an [`Authority`] ([`Authority::of`], an exhaustive match: a new action
//! does not compile until it says who may assert it), in terms of the SPIFFE identity of the
//! event's actor (the caller's certificate, see `tutela_protocol::identity`):
//!
//! | action | who may assert it |
//! |---|---|
//! | `node.registered`, `job.proposed`, `job.started`, `model.initialized`, `round.completed`, `job.completed`, `job.failed`, `model.published`, `watermark.registered`, `statistics.published` | the coordinator |
//! | `update.refused` | the coordinator (any site), or a site's node naming its own site in `site` |
//! | `dataset.deidentified`, `dataset.text_deidentified`, `privacy.spent` | a site's node, for a subject `<its site>/<dataset>` and `site` its own |
//! | `ledger.restored` | a user of the site (the policy lets only its compliance officers write), for a subject `<its site>/<dataset>` and `site` its own |
//! | `policy.decision` | the coordinator, or the audit service itself |
//! | `certificate.issued`, `certificate.revoked` | a CA administrator (`ca_admins` in audit.toml) |
//! | `job.approved`, `job.rejected` | the officer's signature over the job's digest, relayed by the coordinator or appended by the signing officer |
//! | `model.registered` | the coordinator, once per name and version |
//! | `policy.loaded` | the coordinator, with the policy's text whose digest is the subject |
//! | `model.stage_changed` | the coordinator, relaying the signatures of the persons whose quorum the stage rules of the policy it names (a `policy.loaded` earlier in the trail) ask for, over the sites whose updates the trail shows in the moved versions' jobs; every signature must verify, be signed within a day before the event and never have counted before ([`crate::stage`]), and every move start where the trail left the version |
//!
//! An officer's decision is further checked against the trail itself ([`TrailState`]): the job
//! must have been proposed (`job.proposed`) with the digest signed, the officer must be a user
//! of a site the proposal lists and one of the `approvers` the proposal names for that site (the
//! holders of the policy's officer role, as the coordinator's policy said: any other user of the
//! site, or any user at all under a proposal that names none, is refused), and a decision already recorded (the same officer, job and
//! signed message) is a replay and is refused. Every actor must be of the log's consortium.
//!
//! The signature is checked against the consortium CA: at append with the service's live CA and
//! CRL ([`OfficerTrust::Live`]); when the stored trail is re-checked (the service opening its
//! log, `tutela audit verify|report|lineage`) against the CA at the time the event was recorded
//! ([`OfficerTrust::CaAt`]), so that a certificate revoked or expired since does not turn a
//! genuine past decision into a forgery.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use tutela_protocol::identity::{Identity, Principal};

use crate::Hash;
use crate::approval::{ApprovalError, ChainCheck, verify_officer_payload};
use crate::event::{Action, Event, Timestamp};
use crate::payload::privacy::{LedgerRestored, PrivacySpent};
use crate::payload::{
    ActionPayload, AuditQuarantined, DatasetDeidentified, JobProposed, ModelRegistered,
    ModelStageChanged, PayloadError, PolicyLoaded, RoundCompleted, TextDatasetDeidentified,
    UpdateRefused, check_shape,
};
use tutela_policy::stage::StagePolicy;
use tutela_protocol::release::{MoveKind, Stage, VersionMove, VersionState, plan_rollback};

/// Who may assert an action (see the module documentation's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authority {
    /// Only the coordinator.
    Coordinator,
    /// The coordinator, or the audit service itself (its own policy decisions).
    CoordinatorOrAuditService,
    /// The coordinator, or a site's node about its own site (payload `site`).
    CoordinatorOrOwnSiteNode,
    /// A site's node about its own site (subject `<site>/...`, payload `site`).
    OwnSiteNode,
    /// A user of the site (whom the policy lets write: its compliance officers) about their own
    /// site (subject `<site>/...`, payload `site`).
    OwnSiteUser,
    /// A CA administrator named in the service's configuration.
    CaAdministrator,
    /// An officer's signature over the job's digest, relayed by the coordinator or appended by
    /// the officer.
    SignedByOfficer,
    /// Relayed by the coordinator with the signatures of the persons who moved a registered
    /// model's stage, each verifying, over moves that start where the trail left each version.
    SignedStageMove,
    /// Recorded by the audit service itself, with the signatures of the consortium operator who
    /// ordered the quarantine and of the officers who countersigned it ([`crate::quarantine`]).
    SignedQuarantine,
}

impl Authority {
    /// The authority of `action`.
    pub fn of(action: Action) -> Authority {
        // Exhaustive on purpose, no `_` arm: a new action must declare who may assert it.
        match action {
            Action::NodeRegistered
            | Action::JobProposed
            | Action::JobStarted
            | Action::ModelInitialized
            | Action::RoundCompleted
            | Action::JobCompleted
            | Action::JobFailed
            | Action::ModelPublished
            | Action::WatermarkRegistered
            | Action::ModelRegistered
            | Action::PolicyLoaded
            | Action::StatisticsPublished => Authority::Coordinator,
            Action::ModelStageChanged => Authority::SignedStageMove,
            Action::AuditQuarantined => Authority::SignedQuarantine,
            Action::UpdateRefused => Authority::CoordinatorOrOwnSiteNode,
            Action::DatasetDeidentified
            | Action::TextDatasetDeidentified
            | Action::PrivacySpent => Authority::OwnSiteNode,
            Action::LedgerRestored => Authority::OwnSiteUser,
            Action::PolicyDecision => Authority::CoordinatorOrAuditService,
            Action::CertificateIssued | Action::CertificateRevoked => Authority::CaAdministrator,
            Action::JobApproved | Action::JobRejected => Authority::SignedByOfficer,
        }
    }

    /// The rule, as errors name it.
    pub fn rule(self) -> &'static str {
        match self {
            Authority::Coordinator => "only the coordinator asserts it",
            Authority::CoordinatorOrAuditService => {
                "only the coordinator or the audit service asserts it"
            }
            Authority::CoordinatorOrOwnSiteNode => {
                "only the coordinator, or a site's node about its own site, asserts it"
            }
            Authority::OwnSiteNode => "only a site's node, about its own site, asserts it",
            Authority::OwnSiteUser => {
                "only an officer of the site, about their own site, asserts it"
            }
            Authority::CaAdministrator => {
                "only a CA administrator (ca_admins in audit.toml) asserts it"
            }
            Authority::SignedByOfficer => {
                "valid only with the signature of an officer of a site the proposed job lists, relayed by the coordinator or appended by that officer, once"
            }
            Authority::SignedStageMove => {
                "only the coordinator asserts it, with a fresh, never reused, valid signature of every person who moved the stage, meeting the stage rules of a policy recorded in the trail, over moves that start where the trail left each version"
            }
            Authority::SignedQuarantine => {
                "only the audit service asserts it, with the valid signatures of a consortium operator and of officers over the quarantined rows"
            }
        }
    }
}

/// A configuration of the rules that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityConfigError {
    #[error("log id {0:?} is not spiffe://<consortium>/audit")]
    LogId(String),
    #[error("ca_admins: {0:?} is not a SPIFFE identity: {1}")]
    NotAnIdentity(String, String),
    #[error("ca_admins: {identity} is not of consortium {consortium:?}")]
    OtherConsortium {
        identity: String,
        consortium: String,
    },
    #[error(
        "ca_admins: {0} is a service or a node; a CA administrator is an operator or a site user"
    )]
    NotAPerson(String),
}

/// The parts of the rules that depend on the deployment: the consortium and its CA
/// administrators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorityRules {
    consortium: String,
    ca_admins: BTreeSet<String>,
}

impl AuthorityRules {
    /// The rules of the log `log_id` (`spiffe://<consortium>/audit`) with these CA administrators
    /// (SPIFFE URIs of operators or site users of the same consortium).
    pub fn for_log(log_id: &str, ca_admins: &[String]) -> Result<Self, AuthorityConfigError> {
        let log = Identity::from_str(log_id)
            .map_err(|_| AuthorityConfigError::LogId(log_id.to_string()))?;
        if log.principal != Principal::Audit {
            return Err(AuthorityConfigError::LogId(log_id.to_string()));
        }
        let mut admins = BTreeSet::new();
        for a in ca_admins {
            let id = Identity::from_str(a)
                .map_err(|e| AuthorityConfigError::NotAnIdentity(a.clone(), e.to_string()))?;
            if id.consortium != log.consortium {
                return Err(AuthorityConfigError::OtherConsortium {
                    identity: a.clone(),
                    consortium: log.consortium.clone(),
                });
            }
            if !matches!(
                id.principal,
                Principal::Operator { .. } | Principal::User { .. }
            ) {
                return Err(AuthorityConfigError::NotAPerson(a.clone()));
            }
            admins.insert(id.uri());
        }
        Ok(AuthorityRules {
            consortium: log.consortium,
            ca_admins: admins,
        })
    }

    pub fn consortium(&self) -> &str {
        &self.consortium
    }

    pub fn ca_admins(&self) -> impl Iterator<Item = &str> {
        self.ca_admins.iter().map(String::as_str)
    }
}

/// How an officer's certificate is trusted.
#[derive(Clone)]
pub enum OfficerTrust {
    /// At append: the service's live CA and CRL, now.
    Live(ChainCheck),
    /// Re-checking the stored trail: the certificate must chain to one of these CA certificates
    /// and be valid at the time the event was recorded (a revocation since is not retroactive).
    CaAt(Arc<Vec<TrustAnchor<'static>>>),
    /// No CA at hand (a reader given none): the signature is checked with the certificate it
    /// carries, but a certificate made outside the consortium CA is not detected.
    SignatureOnly,
}

impl OfficerTrust {
    /// Trust in the CA certificates of `pem` (one or more `CERTIFICATE` blocks).
    pub fn ca_from_pem(pem: &str) -> Result<OfficerTrust, String> {
        let mut anchors = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
            let block = block.map_err(|e| format!("not PEM: {e}"))?;
            if block.label != "CERTIFICATE" {
                continue;
            }
            let der = CertificateDer::from(block.contents);
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| format!("not a CA certificate: {e}"))?;
            anchors.push(anchor.to_owned());
        }
        if anchors.is_empty() {
            return Err("no CERTIFICATE in the CA file".to_string());
        }
        Ok(OfficerTrust::CaAt(Arc::new(anchors)))
    }

    /// The check of a certificate chain at `at`, or `None` for [`OfficerTrust::SignatureOnly`].
    pub fn chain_check(&self, at: Timestamp) -> Option<ChainCheck> {
        match self {
            OfficerTrust::Live(check) => Some(check.clone()),
            OfficerTrust::CaAt(anchors) => {
                let anchors = anchors.clone();
                Some(Arc::new(move |chain: &[CertificateDer<'static>]| {
                    chains_at(&anchors, chain, at)
                }))
            }
            OfficerTrust::SignatureOnly => None,
        }
    }
}

static SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
];

/// Whether `chain` (leaf first) chains to one of `anchors` for client authentication at `at`.
fn chains_at(
    anchors: &[TrustAnchor<'static>],
    chain: &[CertificateDer<'static>],
    at: Timestamp,
) -> Result<(), String> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "no certificate".to_string())?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
    let secs = u64::try_from(at.unix_millis().div_euclid(1000)).unwrap_or(0);
    leaf.verify_for_usage(
        SIGNATURE_ALGORITHMS,
        anchors,
        intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("{e} (at {at}, when the event was recorded)"))
}

/// Why an actor may not assert an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("actor {actor:?} is not a SPIFFE identity: {why}")]
    NotAnIdentity { actor: String, why: String },
    #[error("{actor} is not of consortium {consortium:?}")]
    OtherConsortium { actor: String, consortium: String },
    #[error("{actor} may not assert {action}: {}", .authority.rule())]
    NotAllowed {
        actor: String,
        action: Action,
        authority: Authority,
    },
    #[error(
        "{actor} may not assert {action} about {about:?}: {}", .authority.rule()
    )]
    NotItsSite {
        actor: String,
        action: Action,
        about: String,
        authority: Authority,
    },
    #[error("{action} payload: {problem}")]
    MalformedPayload { action: Action, problem: String },
    #[error("{action}: {source}")]
    Signature {
        action: Action,
        source: ApprovalError,
    },
    #[error(
        "{action} of job {job:?} by {officer}: {actor} may not assert it: {}", Authority::SignedByOfficer.rule()
    )]
    NotTheSigner {
        action: Action,
        job: String,
        officer: String,
        actor: String,
    },
    #[error(
        "{action} of job {job:?}: no job.proposed of that job with spec digest {spec_digest} is in the trail before it"
    )]
    NotProposed {
        action: Action,
        job: String,
        spec_digest: String,
    },
    #[error(
        "{action} of job {job:?} by {officer}: site {site:?} is not among the job's sites {sites:?}"
    )]
    SiteNotInJob {
        action: Action,
        job: String,
        officer: String,
        site: String,
        sites: Vec<String>,
    },
    #[error(
        "{action} of job {job:?} by {officer}: not one of the approvers the job's proposal names for site {site:?} ({approvers:?}): only the holders of the policy's officer role decide for a site"
    )]
    NotAnApprover {
        action: Action,
        job: String,
        officer: String,
        site: String,
        approvers: Vec<String>,
    },
    #[error(
        "{action} of job {job:?} by {officer} is a replay: the same signed decision is already recorded at seq {first_seq}"
    )]
    Replay {
        action: Action,
        job: String,
        officer: String,
        first_seq: u64,
    },
    #[error("{0}")]
    Registry(#[from] RegistryError),
}

/// A registry event that does not fit the trail's registry history (see [`crate::stage`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{action} of {subject:?}: {problem}")]
pub struct RegistryError {
    pub action: Action,
    pub subject: String,
    pub problem: String,
}

/// An event that breaks the rules, found in a stored trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unauthorized event at seq {seq} ({action} by {actor}): {error}")]
pub struct AuthorityViolation {
    pub seq: u64,
    pub action: Action,
    pub actor: String,
    pub error: Box<AuthorityError>,
}

/// One event to check: what an append asks for, or a stored event.
#[derive(Clone, Copy, Debug)]
pub struct Assertion<'a> {
    pub actor: &'a str,
    pub action: Action,
    pub subject: &'a str,
    pub payload: &'a serde_json::Value,
    /// When it was (or is being) recorded: the time an officer's certificate must be valid at,
    /// for [`OfficerTrust::CaAt`].
    pub at: Timestamp,
}

impl<'a> From<&'a Event> for Assertion<'a> {
    fn from(e: &'a Event) -> Self {
        Assertion {
            actor: &e.actor,
            action: e.action,
            subject: &e.subject,
            payload: &e.payload,
            at: e.timestamp,
        }
    }
}

/// What an accepted event adds to [`TrailState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    Proposal {
        job: String,
        spec_digest: String,
        sites: Vec<String>,
        approvers: BTreeMap<String, Vec<String>>,
    },
    Decision {
        key: DecisionKey,
    },
    /// A version registered (as a candidate) or versions moved.
    Stages {
        name: String,
        moves: Vec<VersionMove>,
        /// For a registration: the job whose model it is.
        job: Option<String>,
        /// For a move: the signatures that counted (each may count once).
        signatures: Vec<Hash>,
    },
    /// A policy's text recorded (`policy.loaded`).
    Policy {
        digest: String,
        policy: StagePolicy,
    },
    /// A round's accepted sites (`round.completed`, subject the job).
    Round {
        job: String,
        sites: Vec<String>,
    },
}

/// What makes two officers' decisions the same: the job, the officer, the action and the message
/// signed (not the signature's bytes: an ECDSA signature has more than one valid encoding).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    job: String,
    officer: String,
    action: Action,
    message: Hash,
}

#[derive(Clone, Debug)]
struct Proposal {
    seq: u64,
    spec_digest: String,
    sites: Vec<String>,
    /// Per site, who may decide for it (the proposal's `approvers`; empty when it named none).
    approvers: BTreeMap<String, Vec<String>>,
}

/// A registered version's model digest and its stages, as (seq, stage) oldest first.
type StageHistory = (String, Vec<(u64, Stage)>);

/// What the trail so far says that the rules depend on: each job's proposals and the officers'
/// decisions recorded. Built by replaying the trail ([`TrailState::check_and_apply`]).
#[derive(Clone, Debug, Default)]
pub struct TrailState {
    proposals: HashMap<String, Vec<Proposal>>,
    decisions: HashMap<DecisionKey, u64>,
    /// Each registered (name, version)'s model digest and stage history: (seq, stage), oldest
    /// first.
    stages: HashMap<(String, u64), StageHistory>,
    /// Each registered (name, version)'s job, with the seq of its registration.
    registered_jobs: HashMap<(String, u64), (u64, String)>,
    /// Each job's rounds as the trail shows them: (seq, accepted sites).
    rounds: HashMap<String, Vec<(u64, Vec<String>)>>,
    /// Each policy recorded (`policy.loaded`), by digest: the first seq and what stage moves
    /// are re-checked with.
    policies: HashMap<String, (u64, StagePolicy)>,
    /// Every stage-move signature that counted (the hash of its signer and signed message),
    /// with its seq: a signature counts once.
    stage_signatures: HashMap<Hash, u64>,
}

fn malformed(e: PayloadError) -> AuthorityError {
    match e {
        PayloadError::Malformed {
            action, problem, ..
        } => AuthorityError::MalformedPayload { action, problem },
        PayloadError::WrongAction {
            expected, found, ..
        } => AuthorityError::MalformedPayload {
            action: found,
            problem: format!("decoded as {expected}"),
        },
    }
}

impl TrailState {
    pub fn new() -> TrailState {
        TrailState::default()
    }

    /// Whether `a` may be appended after what this state has seen; what it would add.
    pub fn check(
        &self,
        rules: &AuthorityRules,
        trust: &OfficerTrust,
        a: &Assertion<'_>,
    ) -> Result<Effect, AuthorityError> {
        let actor = Identity::from_str(a.actor).map_err(|e| AuthorityError::NotAnIdentity {
            actor: a.actor.to_string(),
            why: e.to_string(),
        })?;
        if actor.consortium != rules.consortium {
            return Err(AuthorityError::OtherConsortium {
                actor: a.actor.to_string(),
                consortium: rules.consortium.clone(),
            });
        }
        let authority = Authority::of(a.action);
        // What is asserted must be the action's typed payload: readers decode nothing else.
        check_shape(a.action, a.payload).map_err(malformed)?;
        let not_allowed = || AuthorityError::NotAllowed {
            actor: a.actor.to_string(),
            action: a.action,
            authority,
        };
        let not_its_site = |about: &str| AuthorityError::NotItsSite {
            actor: a.actor.to_string(),
            action: a.action,
            about: about.to_string(),
            authority,
        };
        match (authority, &actor.principal) {
            (Authority::Coordinator, Principal::Coordinator) => {
                if a.action == Action::ModelRegistered {
                    return self.check_registration(a).map_err(AuthorityError::from);
                }
                if a.action == Action::PolicyLoaded {
                    return self.check_policy_loaded(a).map_err(AuthorityError::from);
                }
                if a.action == Action::RoundCompleted {
                    let p = RoundCompleted::from_value(0, a.payload).map_err(malformed)?;
                    return Ok(Effect::Round {
                        job: a.subject.to_string(),
                        sites: p.participants,
                    });
                }
                if a.action == Action::JobProposed {
                    let p = JobProposed::from_value(0, a.payload).map_err(malformed)?;
                    return Ok(Effect::Proposal {
                        job: a.subject.to_string(),
                        spec_digest: p.spec_digest,
                        sites: p.participants,
                        approvers: p.approvers.unwrap_or_default(),
                    });
                }
                Ok(Effect::None)
            }
            (Authority::CoordinatorOrAuditService, Principal::Coordinator | Principal::Audit) => {
                Ok(Effect::None)
            }
            (Authority::CoordinatorOrOwnSiteNode, Principal::Coordinator) => Ok(Effect::None),
            (Authority::CoordinatorOrOwnSiteNode, Principal::Node { site }) => {
                let p = UpdateRefused::from_value(0, a.payload).map_err(malformed)?;
                if &p.site != site {
                    return Err(not_its_site(&p.site));
                }
                Ok(Effect::None)
            }
            (Authority::OwnSiteNode, Principal::Node { site })
            | (Authority::OwnSiteUser, Principal::User { site, .. }) => {
                let subject_site = a.subject.split_once('/').map(|(s, _)| s);
                if subject_site != Some(site.as_str()) {
                    return Err(not_its_site(a.subject));
                }
                let payload_site = own_site_payload_site(a.action, a.payload).map_err(malformed)?;
                if &payload_site != site {
                    return Err(not_its_site(&payload_site));
                }
                Ok(Effect::None)
            }
            (Authority::CaAdministrator, _) => {
                if rules.ca_admins.contains(&actor.uri()) {
                    Ok(Effect::None)
                } else {
                    Err(not_allowed())
                }
            }
            (Authority::SignedByOfficer, _) => self.check_decision(trust, &actor, a),
            (Authority::SignedStageMove, Principal::Coordinator) => self
                .check_stage_move(trust, a)
                .map_err(AuthorityError::from),
            (Authority::SignedQuarantine, Principal::Audit) => {
                let p = AuditQuarantined::from_value(0, a.payload).map_err(malformed)?;
                let bad = |problem: String| AuthorityError::MalformedPayload {
                    action: a.action,
                    problem,
                };
                if a.subject != format!("seq/{}", p.terms.from_seq) {
                    return Err(bad(format!(
                        "its subject is not seq/{} (the first quarantined seq)",
                        p.terms.from_seq
                    )));
                }
                let check = trust.chain_check(a.at);
                crate::quarantine::verify_signatures(&p, check.as_ref()).map_err(bad)?;
                Ok(Effect::None)
            }
            _ => Err(not_allowed()),
        }
    }

    /// An officer's approval or rejection: the signature, who relays it, the proposal it
    /// answers, the officer's site, and that it is not already recorded.
    fn check_decision(
        &self,
        trust: &OfficerTrust,
        actor: &Identity,
        a: &Assertion<'_>,
    ) -> Result<Effect, AuthorityError> {
        let check = trust.chain_check(a.at);
        let verified = verify_officer_payload(a.action, a.subject, a.payload, check.as_ref())
            .map_err(|source| AuthorityError::Signature {
                action: a.action,
                source,
            })?;
        let officer = verified.officer.uri();
        if actor.principal != Principal::Coordinator && actor != &verified.officer {
            return Err(AuthorityError::NotTheSigner {
                action: a.action,
                job: a.subject.to_string(),
                officer,
                actor: a.actor.to_string(),
            });
        }
        let digest_hex = hex::encode(verified.spec_digest);
        let proposal = self
            .proposals
            .get(a.subject)
            .and_then(|ps| ps.iter().rev().find(|p| p.spec_digest == digest_hex))
            .ok_or_else(|| AuthorityError::NotProposed {
                action: a.action,
                job: a.subject.to_string(),
                spec_digest: digest_hex.clone(),
            })?;
        let site = verified.officer.principal.site().unwrap_or_default();
        if !proposal.sites.iter().any(|s| s == site) {
            return Err(AuthorityError::SiteNotInJob {
                action: a.action,
                job: a.subject.to_string(),
                officer,
                site: site.to_string(),
                sites: proposal.sites.clone(),
            });
        }
        let approvers = proposal.approvers.get(site).cloned().unwrap_or_default();
        if !approvers.contains(&officer) {
            return Err(AuthorityError::NotAnApprover {
                action: a.action,
                job: a.subject.to_string(),
                officer,
                site: site.to_string(),
                approvers,
            });
        }
        let key = DecisionKey {
            job: a.subject.to_string(),
            officer: officer.clone(),
            action: a.action,
            message: crate::sha256(&verified.message),
        };
        if let Some(&first_seq) = self.decisions.get(&key) {
            return Err(AuthorityError::Replay {
                action: a.action,
                job: a.subject.to_string(),
                officer,
                first_seq,
            });
        }
        Ok(Effect::Decision { key })
    }

    /// A `model.registered`: its subject is its name and version, registered once.
    fn check_registration(&self, a: &Assertion<'_>) -> Result<Effect, RegistryError> {
        let bad = |problem: String| RegistryError {
            action: a.action,
            subject: a.subject.to_string(),
            problem,
        };
        let p = ModelRegistered::from_value(0, a.payload).map_err(|e| bad(e.to_string()))?;
        if a.subject != p.subject() {
            return Err(bad(format!("its subject is not {}", p.subject())));
        }
        if let Some(problem) = tutela_protocol::release::name_problem(&p.name) {
            return Err(bad(format!("name {problem}")));
        }
        if let Some((digest, history)) = self.stages.get(&(p.name.clone(), p.version)) {
            return Err(bad(format!(
                "{} v{} is already registered (model {digest}, seq {})",
                p.name,
                p.version,
                history.first().map_or(0, |h| h.0)
            )));
        }
        Ok(Effect::Stages {
            name: p.name,
            moves: vec![VersionMove {
                version: p.version,
                model_digest: p.model_digest,
                // Registration: no stage before it; `apply` records the candidate.
                from: Stage::Candidate,
                to: Stage::Candidate,
            }],
            job: Some(p.job),
            signatures: Vec::new(),
        })
    }

    /// A `policy.loaded`: its subject and digest are the digest of the text it carries, and the
    /// text reads as a policy (stage rules and role grants).
    fn check_policy_loaded(&self, a: &Assertion<'_>) -> Result<Effect, RegistryError> {
        let bad = |problem: String| RegistryError {
            action: a.action,
            subject: a.subject.to_string(),
            problem,
        };
        let p = PolicyLoaded::from_value(0, a.payload).map_err(|e| bad(e.to_string()))?;
        let digest = p.recomputed_digest();
        if p.digest != digest || a.subject != digest {
            return Err(bad(format!(
                "the text it carries has digest {digest}, not the {} it claims (subject {})",
                p.digest, a.subject
            )));
        }
        let policy = StagePolicy::parse(&p.policy).map_err(bad)?;
        Ok(Effect::Policy { digest, policy })
    }

    /// The sites whose updates the trail shows in the rounds of the jobs that made `versions`
    /// of `name` (the `site:*` of a stage rule), as the coordinator counts them.
    fn contributing_sites(&self, name: &str, versions: &[u64]) -> Vec<String> {
        let mut sites = BTreeSet::new();
        for v in versions {
            if let Some((_, job)) = self.registered_jobs.get(&(name.to_string(), *v)) {
                for (_, accepted) in self.rounds.get(job).into_iter().flatten() {
                    sites.extend(accepted.iter().cloned());
                }
            }
        }
        sites.into_iter().collect()
    }

    /// A `model.stage_changed`: every signature verifies, and every move starts where the trail
    /// left its version and is one the stage machine allows.
    fn check_stage_move(
        &self,
        trust: &OfficerTrust,
        a: &Assertion<'_>,
    ) -> Result<Effect, RegistryError> {
        let bad = |problem: String| RegistryError {
            action: a.action,
            subject: a.subject.to_string(),
            problem,
        };
        let p = ModelStageChanged::from_value(0, a.payload).map_err(|e| bad(e.to_string()))?;
        if a.subject != p.name {
            return Err(bad(format!("its subject is not its name {:?}", p.name)));
        }
        let check = trust.chain_check(a.at);
        let signed =
            crate::stage::verify_stage_signatures(&p, check.as_ref(), a.at).map_err(bad)?;
        tutela_protocol::release::check_move(p.kind, &p.moves, |version, digest| {
            self.stages
                .get(&(p.name.clone(), version))
                .filter(|(d, _)| d == digest)
                .and_then(|(_, h)| h.last().map(|(_, s)| *s))
        })
        .map_err(bad)?;
        // What the trail's history makes of the move, as the coordinator plans it: a rollback
        // restores the retired version that left production last (never one that was never in
        // production), and a name keeps at most one production version.
        let states = self.version_states(&p.name);
        if p.kind == MoveKind::Rollback {
            let planned = plan_rollback(&p.name, &states).map_err(|e| bad(e.to_string()))?;
            if planned != p.moves {
                let show = |m: &[VersionMove]| {
                    m.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(bad(format!(
                    "a rollback restores the version that left production last: the trail makes it ({}), the event says ({})",
                    show(&planned),
                    show(&p.moves)
                )));
            }
        }
        let in_production = states
            .iter()
            .filter(|v| {
                let to = p
                    .moves
                    .iter()
                    .find(|m| m.version == v.version)
                    .map(|m| m.to);
                to.unwrap_or(v.stage) == Stage::Production
            })
            .count();
        if in_production > 1 {
            return Err(bad(format!(
                "it leaves {} with {in_production} production versions: a promotion into production retires the current one",
                p.name
            )));
        }
        // A signature counts once: the same signed move (a rollback back and forth restores
        // the very same moves, reason and all) is signed again, never replayed.
        for s in &signed {
            if let Some(first) = self.stage_signatures.get(&s.key) {
                return Err(bad(format!(
                    "the signature of {} already counted at seq {first}: a stage move's signature counts once",
                    s.signer
                )));
            }
        }
        // The signers' roles, against the policy the event names, as the trail records it.
        let (_, policy) = self.policies.get(&p.policy_digest).ok_or_else(|| {
            bad(format!(
                "it names policy {}, which no policy.loaded before it records: its signers' roles cannot be re-checked",
                p.policy_digest
            ))
        })?;
        let versions: Vec<u64> = p.moves.iter().map(|m| m.version).collect();
        let sites = self.contributing_sites(&p.name, &versions);
        let signers: Vec<String> = signed.iter().map(|s| s.signer.uri()).collect();
        policy
            .check_signers(&p.moves, &sites, &signers)
            .map_err(|e| bad(format!("under policy {}: {e}", p.policy_digest)))?;
        Ok(Effect::Stages {
            name: p.name,
            moves: p.moves,
            job: None,
            signatures: signed.into_iter().map(|s| s.key).collect(),
        })
    }

    /// Every version of `name` the trail registered, at its current stage, with when it last
    /// left production (the seq of that move: later is larger, as the coordinator's move number).
    fn version_states(&self, name: &str) -> Vec<VersionState> {
        let mut states: Vec<VersionState> = self
            .stages
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, version), (digest, history))| VersionState {
                version: *version,
                model_digest: digest.clone(),
                stage: history.last().map_or(Stage::Candidate, |(_, s)| *s),
                left_production: history
                    .windows(2)
                    .filter(|w| w[0].1 == Stage::Production && w[1].1 != Stage::Production)
                    .map(|w| w[1].0)
                    .max(),
            })
            .collect();
        states.sort_by_key(|v| v.version);
        states
    }

    /// The stage history the trail shows for `name`'s `version`: its model digest and
    /// (seq, stage) from its registration on.
    pub fn stage_history(&self, name: &str, version: u64) -> Option<(&str, &[(u64, Stage)])> {
        self.stages
            .get(&(name.to_string(), version))
            .map(|(d, h)| (d.as_str(), h.as_slice()))
    }

    /// Records what the event at `seq` added.
    pub fn apply(&mut self, seq: u64, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Stages {
                name,
                moves,
                job,
                signatures,
            } => {
                if let (Some(job), Some(first)) = (job, moves.first()) {
                    self.registered_jobs
                        .entry((name.clone(), first.version))
                        .or_insert((seq, job));
                }
                for key in signatures {
                    self.stage_signatures.entry(key).or_insert(seq);
                }
                for m in moves {
                    self.stages
                        .entry((name.clone(), m.version))
                        .or_insert_with(|| (m.model_digest.clone(), Vec::new()))
                        .1
                        .push((seq, m.to));
                }
            }
            Effect::Proposal {
                job,
                spec_digest,
                sites,
                approvers,
            } => self.proposals.entry(job).or_default().push(Proposal {
                seq,
                spec_digest,
                sites,
                approvers,
            }),
            Effect::Decision { key } => {
                self.decisions.entry(key).or_insert(seq);
            }
            Effect::Policy { digest, policy } => {
                self.policies.entry(digest).or_insert((seq, policy));
            }
            Effect::Round { job, sites } => self.rounds.entry(job).or_default().push((seq, sites)),
        }
    }

    /// Forgets what events from `seq` on added (their batch was not stored).
    pub fn rollback(&mut self, seq: u64) {
        self.proposals.retain(|_, ps| {
            ps.retain(|p| p.seq < seq);
            !ps.is_empty()
        });
        self.decisions.retain(|_, s| *s < seq);
        self.stages.retain(|_, (_, history)| {
            history.retain(|(s, _)| *s < seq);
            !history.is_empty()
        });
        self.registered_jobs.retain(|_, (s, _)| *s < seq);
        self.rounds.retain(|_, rounds| {
            rounds.retain(|(s, _)| *s < seq);
            !rounds.is_empty()
        });
        self.policies.retain(|_, (s, _)| *s < seq);
        self.stage_signatures.retain(|_, s| *s < seq);
    }

    /// [`TrailState::check`], then [`TrailState::apply`] if it holds.
    pub fn check_and_apply(
        &mut self,
        rules: &AuthorityRules,
        trust: &OfficerTrust,
        event: &Event,
    ) -> Result<(), AuthorityViolation> {
        let effect = self
            .check(rules, trust, &Assertion::from(event))
            .map_err(|error| AuthorityViolation {
                seq: event.seq,
                action: event.action,
                actor: event.actor.clone(),
                error: Box::new(error),
            })?;
        self.apply(event.seq, effect);
        Ok(())
    }
}

/// Checks every event of `events` (in seq order) against the rules; the first that breaks them.
/// On success, the state the trail built (for the appender to continue from).
pub fn verify_authority(
    events: &[Event],
    rules: &AuthorityRules,
    trust: &OfficerTrust,
) -> Result<TrailState, AuthorityViolation> {
    let mut state = TrailState::new();
    for e in events {
        state.check_and_apply(rules, trust, e)?;
    }
    Ok(state)
}

/// Every event of `events` (in seq order) that breaks the rules, for readers that show what the
/// trail says (reports, lineage) and must not believe what it should not. A flagged event adds
/// nothing to the state later events are checked against (a forged proposal does not make
/// approvals of it genuine).
pub fn authority_violations(
    events: &[Event],
    rules: &AuthorityRules,
    trust: &OfficerTrust,
) -> Vec<AuthorityViolation> {
    let mut state = TrailState::new();
    events
        .iter()
        .filter_map(|e| state.check_and_apply(rules, trust, e).err())
        .collect()
}

/// What a reader checks a trail with: the rules and how officers' certificates are trusted.
#[derive(Clone)]
pub struct AuthorityCheck {
    pub rules: AuthorityRules,
    pub trust: OfficerTrust,
}

impl AuthorityCheck {
    pub fn new(rules: AuthorityRules, trust: OfficerTrust) -> AuthorityCheck {
        AuthorityCheck { rules, trust }
    }

    /// [`verify_authority`]: the first event that breaks the rules.
    pub fn verify(&self, events: &[Event]) -> Result<TrailState, AuthorityViolation> {
        verify_authority(events, &self.rules, &self.trust)
    }

    /// [`authority_violations`]: every event that breaks the rules.
    pub fn violations(&self, events: &[Event]) -> Vec<AuthorityViolation> {
        authority_violations(events, &self.rules, &self.trust)
    }
}

/// The `site` an own-site event's payload names (the actions whose authority is
/// [`Authority::OwnSiteNode`] or [`Authority::OwnSiteUser`]).
fn own_site_payload_site(
    action: Action,
    payload: &serde_json::Value,
) -> Result<String, PayloadError> {
    match action {
        Action::DatasetDeidentified => Ok(DatasetDeidentified::from_value(0, payload)?.site),
        Action::TextDatasetDeidentified => {
            Ok(TextDatasetDeidentified::from_value(0, payload)?.site)
        }
        Action::PrivacySpent => Ok(PrivacySpent::from_value(0, payload)?.site),
        Action::LedgerRestored => Ok(LedgerRestored::from_value(0, payload)?.site),
        other => Err(PayloadError::Malformed {
            seq: 0,
            action: other,
            problem: "not an action a site asserts about itself".to_string(),
        }),
    }
}
