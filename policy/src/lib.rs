//! Who may do what in a Tutela consortium, and whether a job may run.
//!
//! - [`authz`]: casbin RBAC with domains over the SPIFFE identities of certificates. The model and
//!   policy are files, loaded at start and reloaded on change; every [`authz::Decision`] carries
//!   the SHA-256 digest of the policy that made it. The policy file also holds the approval
//!   quorum rules (`p2` lines).
//! - [`approval`]: a compliance officer's signed approval or signed rejection of a job's spec
//!   digest (each with its own domain-separated message, so neither can pass for the other), and
//!   their verification (certificate chain to the consortium CA with rustls's webpki verifier,
//!   revocation, validity, signature).
//! - [`quorum`]: which approvals a job still needs, from the policy's quorum rules.
//! - [`stage`]: signed stage moves of registered models and the policy's stage rules (`p3`
//!   lines): who must sign a move into canary, production or retired.
//! - [`site_policy`]: a site's own policy (`site-policy.toml`), the site's last word: which
//!   officers it trusts, which operators and models it accepts, its DP floor and budget, its
//!   training hours.
//! - [`enforce`]: a tower layer that checks every gRPC call against the [`authz::Authorizer`]
//!   before the handler runs, answers PERMISSION_DENIED with the rule, and hands every decision to
//!   a [`enforce::DecisionSink`] (the audit trail).

pub mod approval;
pub mod authz;
pub mod bench;
pub mod enforce;
pub mod quorum;
pub mod reload;
pub mod site_policy;
pub mod stage;

pub use approval::{
    Approval, ApprovalError, ApprovalVerifier, Rejection, SignedKind, VerifiedApproval,
    VerifiedRejection,
};
pub use authz::{Authorizer, AuthzError, Decision, PolicyDigest, reload_on_sighup};
pub use enforce::{DecisionSink, EnforceLayer};
pub use quorum::{QuorumRule, QuorumStatus};
pub use site_policy::{Breach, Breaches, SitePolicy};
