//! Approvals and rejections on the coordinator: which approvals count, whether a job's quorum is
//! met, who may reject a job, and the conversions between the wire's `SignedApproval` and the
//! policy crate's `Approval`.
//!
//! The coordinator checks every approval when it is submitted (signature, chain to the consortium
//! CA, the job's current digest, the signer being the caller and holding a role a quorum rule of
//! this job asks for) and again whenever it counts the quorum (an approval can expire, be
//! withdrawn, or lose its signer's certificate to revocation). Site nodes check their own site's
//! approvals again themselves: this is the coordinator's gate, not theirs.
//!
//! A rejection is checked once, when it is submitted, since it ends the job
//! ([`ApprovalGate::check_rejection`]): the same signature, chain, digest and caller checks over the
//! rejection's own message, and the signer must be a compliance officer of a site that takes part
//! in the job, holding in that site's domain a role whose approval the job's quorum rules ask for.

use std::sync::Arc;

use tutela_policy::quorum::{self, QuorumDomain, QuorumStatus};
use tutela_policy::{
    Approval, ApprovalVerifier, Authorizer, Rejection, VerifiedApproval, VerifiedRejection,
};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::tls::ReloadingServerConfig;

use crate::store::{ApprovalRecord, JobRecord};

/// The policy and trust anchors the coordinator judges approvals with.
pub struct ApprovalGate {
    pub authorizer: Arc<Authorizer>,
    tls: Arc<ReloadingServerConfig>,
}

/// What the store's approvals of a job amount to.
#[derive(Clone, Debug)]
pub struct Standing {
    pub approvals: Vec<pb::ApprovalInfo>,
    pub quorum: QuorumStatus,
    /// The approvals that count, for the job's tasks.
    pub counting: Vec<pb::SignedApproval>,
}

impl ApprovalGate {
    pub fn new(authorizer: Arc<Authorizer>, tls: Arc<ReloadingServerConfig>) -> Self {
        ApprovalGate { authorizer, tls }
    }

    /// The verifier over the TLS material in force (so a new CRL applies to approvals too).
    pub fn verifier(&self) -> Result<ApprovalVerifier, String> {
        ApprovalVerifier::from_tls(&self.tls.material()).map_err(|e| e.to_string())
    }

    /// The (role, domain) pairs whose holders' approvals count for `job`.
    /// A stored spec that does not parse wants nothing anyone holds: no approval is accepted
    /// for it (and [`ApprovalGate::standing`] blocks its quorum).
    fn wanted(&self, job: &JobRecord) -> Vec<(String, String)> {
        let Ok(sites) = job.sites() else {
            return Vec::new();
        };
        quorum::evaluate(&self.authorizer.quorum_rules(), &sites, &[], |_, _, _| {
            false
        })
        .requirements
        .into_iter()
        .map(|r| (r.role, r.domain))
        .collect()
    }

    /// Per site a job's spec lists (`sites`, of a spec of either kind), the identities that may
    /// decide for it: the users of that site who hold, in its domain, a role one of the quorum
    /// rules (`site:*` or `site:<that site>`) asks to approve. Written into the job's
    /// `job.proposed`, so that the audit trail and its readers refuse a decision by any other
    /// user of the site without the policy at hand.
    pub fn approvers(&self, sites: &[String]) -> std::collections::BTreeMap<String, Vec<String>> {
        let rules = self.authorizer.quorum_rules();
        sites
            .iter()
            .map(|site| {
                let domain = tutela_policy::authz::site_domain(site);
                let mut who: Vec<String> = rules
                    .iter()
                    .filter(|r| match &r.domain {
                        QuorumDomain::EachParticipatingSite => true,
                        QuorumDomain::Site(s) => s == site,
                        QuorumDomain::Consortium => false,
                    })
                    .flat_map(|r| self.authorizer.holders(&r.role, &domain))
                    .filter(|id| {
                        id.parse::<Identity>().is_ok_and(|i| {
                            matches!(&i.principal, Principal::User { site: s, .. } if s == site)
                        })
                    })
                    .collect();
                who.sort();
                who.dedup();
                (site.clone(), who)
            })
            .collect()
    }

    /// Checks a new approval of `job` by `caller`; the error says why it is refused.
    pub fn check_new(
        &self,
        approval: &Approval,
        job: &JobRecord,
        caller: &Identity,
        now_ms: i64,
    ) -> Result<VerifiedApproval, String> {
        let verified = self
            .verifier()?
            .verify(approval, job.id.as_str(), &job.spec_digest, now_ms)
            .map_err(|e| e.to_string())?;
        if verified.signer != *caller {
            return Err(format!(
                "the approval is signed by {}, but {caller} sent it: officers submit their own approvals",
                verified.signer
            ));
        }
        let signer = verified.signer.uri();
        let wanted = self.wanted(job);
        if !wanted
            .iter()
            .any(|(role, domain)| self.authorizer.has_role(&signer, role, domain))
        {
            let asked: Vec<String> = wanted.iter().map(|(r, d)| format!("{r} of {d}")).collect();
            return Err(format!(
                "{signer} holds none of the roles whose approval this job needs ({}) [policy {}]",
                if asked.is_empty() {
                    "the policy has no quorum rule".to_string()
                } else {
                    asked.join(", ")
                },
                self.authorizer.digest()
            ));
        }
        Ok(verified)
    }

    /// Checks a rejection of `job` by `caller` at `now_ms`; the error says why it is refused.
    pub fn check_rejection(
        &self,
        rejection: &Rejection,
        job: &JobRecord,
        caller: &Identity,
        now_ms: i64,
    ) -> Result<VerifiedRejection, String> {
        let verified = self
            .verifier()?
            .verify_rejection(rejection, job.id.as_str(), &job.spec_digest, now_ms)
            .map_err(|e| e.to_string())?;
        if verified.signer != *caller {
            return Err(format!(
                "the rejection is signed by {}, but {caller} sent it: officers submit their own rejections",
                verified.signer
            ));
        }
        self.may_reject(job, &verified.signer)?;
        Ok(verified)
    }

    /// Whether `signer` may reject `job`: a user of a site the job names (of any site when the
    /// job names none, since any registered site may then take part) who holds, in that site's
    /// domain, a role that one of the job's quorum rules (`site:*` or `site:<that site>`) asks
    /// to approve. The consortium's own officers approve for the consortium, not for a site, so
    /// a `consortium` quorum rule does not make its role holders able to reject.
    fn may_reject(&self, job: &JobRecord, signer: &Identity) -> Result<(), String> {
        let Principal::User { site, .. } = &signer.principal else {
            return Err(format!(
                "{signer} is not a site user: only a compliance officer of a participating site may reject a job"
            ));
        };
        let sites = job
            .sites()
            .map_err(|e| format!("job {}'s stored spec does not parse: {e}", job.id))?;
        if !sites.is_empty() && !sites.contains(site) {
            return Err(format!(
                "{signer} is an officer of site {site}, which does not take part in job {} (its sites: {})",
                job.id,
                sites.join(", ")
            ));
        }
        let domain = tutela_policy::authz::site_domain(site);
        let mut roles: Vec<String> = self
            .authorizer
            .quorum_rules()
            .into_iter()
            .filter(|r| match &r.domain {
                QuorumDomain::EachParticipatingSite => true,
                QuorumDomain::Site(s) => s == site,
                QuorumDomain::Consortium => false,
            })
            .map(|r| r.role)
            .collect();
        roles.sort();
        roles.dedup();
        if roles
            .iter()
            .any(|role| self.authorizer.has_role(&signer.uri(), role, &domain))
        {
            return Ok(());
        }
        Err(format!(
            "{signer} holds none of the roles whose approval this job needs in {domain} ({}), so may not reject it [policy {}]",
            if roles.is_empty() {
                format!("the policy has no quorum rule for {domain}")
            } else {
                roles.join(", ")
            },
            self.authorizer.digest()
        ))
    }

    /// Judges every stored approval of `job` at `now_ms` and counts the quorum.
    pub fn standing(&self, job: &JobRecord, records: &[ApprovalRecord], now_ms: i64) -> Standing {
        let verifier = self.verifier();
        let mut approvals = Vec::new();
        let mut signers = Vec::new();
        let mut counting = Vec::new();
        for r in records {
            let standing = if r.withdrawn_at_ms.is_some() {
                "withdrawn".to_string()
            } else if r.approval.spec_digest != job.spec_digest {
                "superseded: it approves an earlier version of the spec".to_string()
            } else if now_ms >= r.approval.expires_at_ms {
                "expired".to_string()
            } else {
                match verifier.as_ref().map_err(Clone::clone).and_then(|v| {
                    v.verify(&r.approval, job.id.as_str(), &job.spec_digest, now_ms)
                        .map_err(|e| e.to_string())
                }) {
                    Ok(v) => {
                        signers.push(v.signer.uri());
                        counting.push(to_pb(&r.approval));
                        "counts".to_string()
                    }
                    Err(why) => format!("invalid: {why}"),
                }
            };
            approvals.push(pb::ApprovalInfo {
                signer: r.signer.clone(),
                spec_digest: r.approval.spec_digest.to_hex(),
                signed_at_unix_ms: r.approval.signed_at_ms,
                expires_at_unix_ms: r.approval.expires_at_ms,
                standing,
            });
        }
        // Read from the spec of either kind: a statistics job's sites need their officers'
        // approvals exactly as a training job's do. A stored spec that does not parse blocks
        // the quorum (fail closed), rather than counting as a job that names no site.
        let quorum = match job.sites() {
            Ok(sites) => quorum::evaluate(
                &self.authorizer.quorum_rules(),
                &sites,
                &signers,
                |s, role, domain| self.authorizer.has_role(s, role, domain),
            ),
            Err(e) => QuorumStatus {
                requirements: Vec::new(),
                blocked: Some(format!(
                    "the job's stored spec does not parse ({e}), so its quorum cannot be judged"
                )),
            },
        };
        Standing {
            approvals,
            quorum,
            counting,
        }
    }
}

pub fn to_pb(a: &Approval) -> pb::SignedApproval {
    a.to_pb()
}

pub fn from_pb(a: &pb::SignedApproval) -> Result<Approval, String> {
    Approval::from_pb(a).map_err(|e| e.to_string())
}

/// Sends the enforcement layer's decisions to the audit trail (`policy.decision` events): every
/// denial, and every allowed action that changes something (submit, cancel, approve, write).
/// Allowed reads and nodes' participation calls, which are every few milliseconds of a running
/// job, go to the tracing log only. Appends are spawned so that an RPC never waits on the audit
/// service; a failed append is logged at ERROR by the trail with the event, for replay.
pub struct AuditDecisionSink {
    pub trail: Arc<crate::audit_trail::AuditTrail>,
}

impl tutela_policy::DecisionSink for AuditDecisionSink {
    fn record(&self, d: &tutela_policy::Decision, caller: &Identity, method: &str) {
        tutela_policy::enforce::TracingSink.record(d, caller, method);
        if d.allowed && matches!(d.action.as_str(), "read" | "participate") {
            return;
        }
        let payload = tutela_audit::payload::PolicyDecision::of(d, caller, method);
        let trail = self.trail.clone();
        let subject = format!("{}/{}", d.object, d.action);
        tokio::spawn(async move {
            trail.note_payload(&subject, &payload).await;
        });
    }
}
