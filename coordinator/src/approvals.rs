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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tutela_policy::quorum::{self, QuorumDomain, QuorumStatus};
use tutela_policy::{
    Approval, ApprovalVerifier, Authorizer, Rejection, VerifiedApproval, VerifiedRejection,
};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::tls::{ReloadingServerConfig, TlsMaterial};

use crate::store::{ApprovalRecord, JobRecord};

/// The policy and trust anchors the coordinator judges approvals with.
pub struct ApprovalGate {
    pub authorizer: Arc<Authorizer>,
    tls: Arc<ReloadingServerConfig>,
    verified: Mutex<VerifiedApprovals>,
}

/// How long a verified approval is taken as verified without checking its chain and signature
/// again (its expiry, withdrawal and digest are still judged on every count). A new CRL or CA
/// empties the cache at once; this bounds how late a signer's certificate expiring is noticed.
const VERIFIED_FOR_MS: i64 = 60_000;

/// Approvals whose signature and certificate chain verified, by the exact bytes verified.
///
/// Counting a job's quorum judges every stored approval, and the coordinator counts on every
/// approval, every start and every status: with a thousand sites, verifying a thousand chains
/// and signatures each time made approving a job quadratic (BENCHMARKS.md, "Hundreds of
/// sites"). A signature that verified under the trust anchors and CRLs in force verifies again.
#[derive(Default)]
struct VerifiedApprovals {
    /// The TLS material (CA, CRLs) the entries were verified under; another empties the cache.
    material: Option<Arc<TlsMaterial>>,
    /// Digest of (job, digest, approval) → the signer and when it was verified (unix ms).
    entries: HashMap<[u8; 32], (Identity, i64)>,
}

/// What verifying `approval` for `job` depends on besides the trust anchors and the time.
fn verified_key(approval: &Approval, job: &JobRecord) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(job.id.as_str().as_bytes());
    field(&job.spec_digest.0);
    field(approval.job_id.as_bytes());
    field(&approval.spec_digest.0);
    field(&approval.signed_at_ms.to_le_bytes());
    field(&approval.expires_at_ms.to_le_bytes());
    for der in &approval.signer_chain_der {
        field(der);
    }
    field(&approval.signature);
    let mut key = [0u8; 32];
    key.copy_from_slice(h.finish().as_ref());
    key
}

/// What the store's approvals of a job amount to.
#[derive(Clone, Debug)]
pub struct Standing {
    pub approvals: Vec<pb::ApprovalInfo>,
    pub quorum: QuorumStatus,
    /// The approvals that count, for the job's tasks.
    pub counting: Vec<pb::SignedApproval>,
}

/// A running job's counting approvals, by the site of their signer: what each site's tasks
/// carry.
///
/// A node accepts only an approval by one of its own site's compliance officers, who are users
/// of that site (`policy::site_policy` refuses any other identity in `compliance_officers`), so
/// an approval by another site's user is of no use to it. Every task used to carry every
/// approval: with N sites, N tasks of N approvals each (about 0.7 KiB apiece, the signer's
/// certificate included) per round, 700 MB queued and sent for a thousand sites, and each node
/// verifying up to N signatures before finding its own. Approvals whose signer is not a site
/// user (none under the consortium's policy, which names officers as site users) go to every
/// site, as before.
#[derive(Clone, Debug, Default)]
pub struct SiteApprovals {
    by_site: HashMap<String, Vec<pb::SignedApproval>>,
    everywhere: Vec<pb::SignedApproval>,
}

impl SiteApprovals {
    pub fn new(counting: &[pb::SignedApproval]) -> Self {
        let mut out = SiteApprovals::default();
        for a in counting {
            let site = a
                .signer_chain_der
                .first()
                .and_then(|der| tutela_protocol::pki::identity_of_cert_der(der).ok())
                .and_then(|id| match id.principal {
                    Principal::User { site, .. } => Some(site),
                    _ => None,
                });
            match site {
                Some(site) => out.by_site.entry(site).or_default().push(a.clone()),
                None => out.everywhere.push(a.clone()),
            }
        }
        out
    }

    /// The approvals a task for `site` carries: its own users' and those of no site.
    pub fn for_site(&self, site: &str) -> Vec<pb::SignedApproval> {
        let mut out = self.by_site.get(site).cloned().unwrap_or_default();
        out.extend(self.everywhere.iter().cloned());
        out
    }
}

impl ApprovalGate {
    pub fn new(authorizer: Arc<Authorizer>, tls: Arc<ReloadingServerConfig>) -> Self {
        ApprovalGate {
            authorizer,
            tls,
            verified: Mutex::new(VerifiedApprovals::default()),
        }
    }

    /// The signer of `approval` of `job` if it verifies at `now_ms` under `material` (with
    /// `verifier`, made from it): from the cache when the same bytes verified under the same
    /// material less than [`VERIFIED_FOR_MS`] ago and the approval has not expired.
    fn verify_cached(
        &self,
        material: &Arc<TlsMaterial>,
        verifier: &ApprovalVerifier,
        approval: &Approval,
        job: &JobRecord,
        now_ms: i64,
    ) -> Result<Identity, String> {
        let key = verified_key(approval, job);
        let lock = || self.verified.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut cache = lock();
            if !cache
                .material
                .as_ref()
                .is_some_and(|m| Arc::ptr_eq(m, material))
            {
                cache.material = Some(material.clone());
                cache.entries.clear();
            }
            if let Some((signer, at)) = cache.entries.get(&key)
                && now_ms >= *at
                && now_ms - at < VERIFIED_FOR_MS
                && now_ms < approval.expires_at_ms
            {
                return Ok(signer.clone());
            }
        }
        let v = verifier
            .verify(approval, job.id.as_str(), &job.spec_digest, now_ms)
            .map_err(|e| e.to_string())?;
        let mut cache = lock();
        if cache
            .material
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, material))
        {
            cache.entries.insert(key, (v.signer.clone(), now_ms));
        }
        Ok(v.signer)
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
        let material = self.tls.material();
        let verifier = ApprovalVerifier::from_tls(&material).map_err(|e| e.to_string());
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
                match verifier
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|v| self.verify_cached(&material, v, &r.approval, job, now_ms))
                {
                    Ok(signer) => {
                        signers.push(signer.uri());
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
            Ok(sites) => {
                // Through each signer's own domains: sites × signers role look-ups made
                // counting a thousand sites' approvals take seconds.
                let linked = self.authorizer.linked_domains();
                quorum::evaluate_linked(
                    &self.authorizer.quorum_rules(),
                    &sites,
                    &signers,
                    |s| linked.get(s).cloned().unwrap_or_default(),
                    |s, role, domain| self.authorizer.has_role(s, role, domain),
                )
            }
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

#[cfg(test)]
mod tests {
    use tutela_protocol::job::SpecDigest;
    use tutela_protocol::pki::{CertificateAuthority, KeyAlgorithm, LeafOptions, Validity};

    use super::*;

    fn approval_by(ca: &CertificateAuthority, who: &Principal) -> pb::SignedApproval {
        let issued = ca
            .issue(who, &LeafOptions::new(Validity::days_from_now(1)))
            .unwrap();
        Approval::sign(
            &issued.key_pem,
            &issued.cert_pem,
            "job",
            &SpecDigest([7; 32]),
            1,
            2,
        )
        .unwrap()
        .to_pb()
    }

    /// Each site's tasks carry its own users' approvals and none of another site's; an approval
    /// by no site's user goes to every site.
    #[test]
    fn a_site_gets_its_own_officers_approvals() {
        let ca =
            CertificateAuthority::create("c", KeyAlgorithm::EcdsaP256, Validity::days_from_now(1))
                .unwrap();
        let user = |site: &str, name: &str| Principal::User {
            site: site.into(),
            name: name.into(),
        };
        let a1 = approval_by(&ca, &user("a", "alice"));
        let a2 = approval_by(&ca, &user("a", "ann"));
        let b1 = approval_by(&ca, &user("b", "bob"));
        let op = approval_by(&ca, &Principal::Operator { name: "op".into() });
        let approvals = SiteApprovals::new(&[a1.clone(), b1.clone(), op.clone(), a2.clone()]);
        assert_eq!(approvals.for_site("a"), vec![a1, a2, op.clone()]);
        assert_eq!(approvals.for_site("b"), vec![b1, op.clone()]);
        assert_eq!(approvals.for_site("c"), vec![op]);
    }
}
