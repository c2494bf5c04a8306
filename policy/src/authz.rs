//! Authorization decisions: casbin RBAC with domains over certificate identities.
//!
//! A request is `(subject, domain, object, action)`: the subject is the caller's SPIFFE URI, the
//! domain is `site:<site>` for a site's node or users and `consortium` for everyone else (see
//! [`home_domain`]), the object a service (`jobs`, `federation`, ...), the action what is done
//! to it (`read`, `submit`, `approve`, ...). Roles (operator, site_admin, compliance_officer,
//! auditor, node) are granted to identities per domain by the policy's `g` lines; `p` lines grant
//! or deny actions to roles or to identity patterns, where `*` stands for one path segment (so
//! `spiffe://acme/site/*/node` names every node and never a user called `node`).
//!
//! The model and policy are read as bytes, digested together (SHA-256 of both, length-prefixed)
//! and handed to casbin from those same bytes (`StringAdapter`), so the digest on a decision is
//! the digest of exactly what decided it. A reload that fails (a typo in the file) keeps the
//! policy in force and says why; a good one is swapped in atomically.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use casbin::function_map::OperatorFunction;
use casbin::rhai::Dynamic;
use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi, StringAdapter};
use tutela_protocol::identity::{Identity, Principal};

use crate::quorum::QuorumRule;

/// The domain of the consortium itself (operators, the coordinator, consortium officers).
pub const CONSORTIUM_DOMAIN: &str = "consortium";

/// The domain a site's roles are granted in: `site:<site>`.
pub fn site_domain(site: &str) -> String {
    format!("site:{site}")
}

/// The domain a principal acts in by default: its site's for nodes and site users, the
/// consortium's for everyone else.
pub fn home_domain(identity: &Identity) -> String {
    match &identity.principal {
        Principal::Node { site } | Principal::User { site, .. } => site_domain(site),
        _ => CONSORTIUM_DOMAIN.to_string(),
    }
}

/// SHA-256 over the model and policy files that made a decision.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyDigest(pub [u8; 32]);

impl PolicyDigest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest of a model and a policy file's bytes: what a decision names, and what a reader
    /// recomputes from a policy recorded in the audit trail (`policy.loaded`).
    pub fn of(model: &[u8], policy: &[u8]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [model, policy] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        PolicyDigest(out)
    }
}

impl fmt::Display for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyDigest({})", self.to_hex())
    }
}

/// One authorization decision, as it is logged and audited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub subject: String,
    pub domain: String,
    pub object: String,
    pub action: String,
    /// The policy line that allowed or denied, e.g. `p, operator, consortium, jobs, submit,
    /// allow`, or `default deny: no rule allows ...` when none matched.
    pub rule: String,
    pub policy_digest: PolicyDigest,
}

/// Reloads a server's TLS files and its policy on every SIGHUP, besides their periodic checks
/// (the `main` of the coordinator and of the audit service). A file that does not load is logged
/// at ERROR and what is in force stays. See [`crate::reload`].
pub fn reload_on_sighup(
    tls: Arc<tutela_protocol::tls::ReloadingServerConfig>,
    authorizer: Option<Arc<Authorizer>>,
) -> std::io::Result<()> {
    let mut items: Vec<Arc<dyn crate::reload::Reloadable>> = vec![tls];
    if let Some(a) = authorizer {
        items.push(a);
    }
    crate::reload::reload_all_on_sighup(items)
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} in {} by rule [{}] (policy {})",
            if self.allowed { "ALLOW" } else { "DENY" },
            self.subject,
            self.action,
            self.object,
            self.domain,
            self.rule,
            self.policy_digest
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("casbin model {}: {cause}", path.display())]
    Model { path: PathBuf, cause: String },
    #[error("policy {}: {cause}", path.display())]
    Policy { path: PathBuf, cause: String },
    #[error("policy {} line {line}: {problem}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("evaluating the policy: {0}")]
    Enforce(String),
}

/// A loaded model and policy.
struct Loaded {
    enforcer: Enforcer,
    digest: PolicyDigest,
    /// The model and policy files' text, as digested: what the coordinator records in the audit
    /// trail (`policy.loaded`) so that readers can re-check decisions made under it.
    text: PolicyText,
    quorum: Vec<QuorumRule>,
    stage_rules: Vec<crate::stage::StageRule>,
}

/// The casbin enforcer over the consortium's model and policy files, reloadable at run time.
pub struct Authorizer {
    model_path: PathBuf,
    policy_path: PathBuf,
    loaded: ArcSwap<Loaded>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("model", &self.model_path)
            .field("policy", &self.policy_path)
            .field("digest", &self.digest())
            .finish()
    }
}

/// `*` matches one path segment (anything but `/`); a pattern that is just `*` matches anything.
/// Hand-written because casbin's keyMatch treats `*` as "any suffix", which would let
/// `spiffe://c/site/*/node` match a user of a site.
pub fn segment_match(value: &str, pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    fn go(v: &[u8], p: &[u8]) -> bool {
        match p.split_first() {
            None => v.is_empty(),
            Some((b'*', rest)) => {
                let mut i = 0;
                loop {
                    if go(&v[i..], rest) {
                        return true;
                    }
                    if i == v.len() || v[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some((c, rest)) => v.first() == Some(c) && go(&v[1..], rest),
        }
    }
    go(value.as_bytes(), pattern.as_bytes())
}

fn segment_match_fn(a: Dynamic, b: Dynamic) -> Dynamic {
    let a = casbin::function_map::dynamic_to_str(&a);
    let b = casbin::function_map::dynamic_to_str(&b);
    segment_match(&a, &b).into()
}

impl Authorizer {
    /// Loads the model and policy files.
    pub async fn load(model_path: &Path, policy_path: &Path) -> Result<Arc<Self>, AuthzError> {
        let loaded = load(model_path, policy_path).await?;
        tracing::info!(model = %model_path.display(), policy = %policy_path.display(), digest = %loaded.digest, "authorization policy loaded");
        Ok(Arc::new(Authorizer {
            model_path: model_path.to_path_buf(),
            policy_path: policy_path.to_path_buf(),
            loaded: ArcSwap::from_pointee(loaded),
        }))
    }

    /// The digest of the policy in force.
    pub fn digest(&self) -> PolicyDigest {
        self.loaded.load().digest
    }

    pub fn policy_path(&self) -> &Path {
        &self.policy_path
    }

    /// The text of the model and policy in force, with their digest (one consistent snapshot).
    pub fn text(&self) -> PolicyText {
        self.loaded.load().text.clone()
    }

    /// Re-reads the files; swaps the new policy in if it differs. Returns whether it changed. On
    /// an error the policy in force stays.
    pub async fn reload(&self) -> Result<bool, AuthzError> {
        let next = load(&self.model_path, &self.policy_path).await?;
        if next.digest == self.digest() {
            return Ok(false);
        }
        let old = self.digest();
        let new = next.digest;
        self.loaded.store(Arc::new(next));
        tracing::info!(old = %old, new = %new, "authorization policy reloaded");
        Ok(true)
    }

    /// Polls the files every `interval` and reloads on change ([`crate::reload::spawn_watcher`]).
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        crate::reload::spawn_watcher(self, interval)
    }

    /// Decides whether `subject` may `action` on `object` in `domain`.
    pub fn decide(&self, subject: &str, domain: &str, object: &str, action: &str) -> Decision {
        let loaded = self.loaded.load();
        let mut decision = Decision {
            allowed: false,
            subject: subject.to_string(),
            domain: domain.to_string(),
            object: object.to_string(),
            action: action.to_string(),
            rule: String::new(),
            policy_digest: loaded.digest,
        };
        match loaded
            .enforcer
            .enforce_ex((subject, domain, object, action))
        {
            Ok((allowed, rules)) => {
                decision.allowed = allowed;
                // casbin's explanation names the first matching rule, which for a request that
                // an explicit deny overrules is the allow it overruled: name the deny instead.
                let deny = (!allowed)
                    .then(|| explicit_deny(&loaded.enforcer, subject, domain, object, action))
                    .flatten();
                decision.rule = match (deny, rules.first()) {
                    (Some(r), _) => format!("p, {}", r.join(", ")),
                    (None, Some(r)) if allowed => format!("p, {}", r.join(", ")),
                    (None, _) if allowed => "allowed (no rule reported)".to_string(),
                    (None, _) => format!(
                        "default deny: no rule allows {subject} to {action} {object} in {domain}"
                    ),
                };
            }
            Err(e) => {
                decision.rule = format!("deny: the policy could not be evaluated: {e}");
            }
        }
        decision
    }

    /// [`decide`](Self::decide) for a verified identity in its home domain.
    pub fn decide_for(&self, identity: &Identity, object: &str, action: &str) -> Decision {
        self.decide(&identity.uri(), &home_domain(identity), object, action)
    }

    /// Whether `subject` holds `role` in `domain` (directly or through role inheritance).
    pub fn has_role(&self, subject: &str, role: &str, domain: &str) -> bool {
        let loaded = self.loaded.load();
        let rm = loaded.enforcer.get_role_manager();
        let rm = rm.read();
        rm.has_link(subject, role, Some(domain))
    }

    /// The identities the policy's `g` lines link to `role` in `domain`, sorted (roles linked to
    /// roles are not expanded: an approver is named by identity). What the coordinator writes in
    /// a proposal as the approvers of a site, so that the audit trail and its readers check an
    /// officer's role without the policy.
    pub fn holders(&self, role: &str, domain: &str) -> Vec<String> {
        let loaded = self.loaded.load();
        let mut holders: Vec<String> = loaded
            .enforcer
            .get_named_grouping_policy("g")
            .into_iter()
            .filter(|g| g.len() >= 3 && g[1] == role && g[2] == domain)
            .map(|g| g[0].clone())
            .filter(|who| who.parse::<Identity>().is_ok())
            .collect();
        holders.sort();
        holders.dedup();
        holders
    }

    /// Subject → every domain in which one of its own `g` lines links it to a role: the only
    /// domains where [`has_role`](Self::has_role) can answer true for it (the model's `g` has
    /// no domain patterns), for counting a quorum over many signers
    /// ([`crate::quorum::evaluate_linked`]). Built from the policy in force, in one pass.
    pub fn linked_domains(&self) -> HashMap<String, Vec<String>> {
        let loaded = self.loaded.load();
        let mut linked: HashMap<String, Vec<String>> = HashMap::new();
        for g in loaded.enforcer.get_named_grouping_policy("g") {
            if let [subject, _role, domain, ..] = g.as_slice() {
                let domains = linked.entry(subject.clone()).or_default();
                if !domains.contains(domain) {
                    domains.push(domain.clone());
                }
            }
        }
        linked
    }

    /// The quorum rules (`p2` lines) of the policy in force.
    pub fn quorum_rules(&self) -> Vec<QuorumRule> {
        self.loaded.load().quorum.clone()
    }

    /// The stage rules (`p3` lines) of the policy in force: who must sign a registered model's
    /// stage moves ([`crate::stage`]).
    pub fn stage_rules(&self) -> Vec<crate::stage::StageRule> {
        self.loaded.load().stage_rules.clone()
    }
}

/// The first `deny` line that matches the request, by the shipped model's matcher
/// (`deploy/policy/model.conf`); used only to name the rule of a denial that casbin decided.
fn explicit_deny(
    enforcer: &Enforcer,
    subject: &str,
    domain: &str,
    object: &str,
    action: &str,
) -> Option<Vec<String>> {
    let rm = enforcer.get_role_manager();
    let rm = rm.read();
    enforcer.get_named_policy("p").into_iter().find(|r| {
        let [sub, dom, obj, act, eft] = r.as_slice() else {
            return false;
        };
        eft == "deny"
            && (rm.has_link(subject, sub, Some(domain)) || segment_match(subject, sub))
            && segment_match(domain, dom)
            && segment_match(object, obj)
            && segment_match(action, act)
    })
}

async fn read(path: &Path) -> Result<Vec<u8>, AuthzError> {
    tokio::fs::read(path).await.map_err(|cause| AuthzError::Io {
        path: path.to_path_buf(),
        cause,
    })
}

async fn load(model_path: &Path, policy_path: &Path) -> Result<Loaded, AuthzError> {
    let model_bytes = read(model_path).await?;
    let policy_bytes = read(policy_path).await?;
    let digest = PolicyDigest::of(&model_bytes, &policy_bytes);
    let utf8 = |path: &Path, b: Vec<u8>| {
        String::from_utf8(b).map_err(|_| AuthzError::Policy {
            path: path.to_path_buf(),
            cause: "not UTF-8".into(),
        })
    };
    let model_text = utf8(model_path, model_bytes)?;
    let policy_text = utf8(policy_path, policy_bytes)?;
    check_lines(policy_path, &policy_text)?;
    let text = PolicyText {
        digest,
        model: model_text.clone(),
        policy: policy_text.clone(),
    };
    let model = DefaultModel::from_str(&model_text)
        .await
        .map_err(|e| AuthzError::Model {
            path: model_path.to_path_buf(),
            cause: e.to_string(),
        })?;
    let mut enforcer = Enforcer::new(model, StringAdapter::new(policy_text.clone()))
        .await
        .map_err(|e| AuthzError::Policy {
            path: policy_path.to_path_buf(),
            cause: e.to_string(),
        })?;
    enforcer.add_function("segmentMatch", OperatorFunction::Arg2(segment_match_fn));
    let quorum = enforcer
        .get_named_policy("p2")
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            QuorumRule::from_tokens(rule).map_err(|problem| AuthzError::Policy {
                path: policy_path.to_path_buf(),
                cause: format!("quorum rule {} ({}): {problem}", i + 1, rule.join(", ")),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stage_rules = enforcer
        .get_named_policy("p3")
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            crate::stage::StageRule::from_tokens(rule).map_err(|problem| AuthzError::Policy {
                path: policy_path.to_path_buf(),
                cause: format!("stage rule {} ({}): {problem}", i + 1, rule.join(", ")),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Evaluate once so that a matcher referring to something the model lacks fails at load, not
    // at the first request.
    enforcer
        .enforce((
            "spiffe://check/coordinator",
            CONSORTIUM_DOMAIN,
            "check",
            "check",
        ))
        .map_err(|e| AuthzError::Model {
            path: model_path.to_path_buf(),
            cause: e.to_string(),
        })?;
    Ok(Loaded {
        enforcer,
        digest,
        text,
        quorum,
        stage_rules,
    })
}

/// casbin's string adapter skips lines it does not understand without a word; a policy is too
/// important for that, so every line must be a comment, blank, or a known section.
fn check_lines(path: &Path, text: &str) -> Result<(), AuthzError> {
    check_policy_lines(text).map_err(|(line, problem)| AuthzError::Line {
        path: path.to_path_buf(),
        line,
        problem,
    })
}

/// [`check_lines`] without a file: the first bad line's number (from 1) and what is wrong with
/// it. Also how a policy recorded in the audit trail is read back ([`crate::stage::StagePolicy`]).
pub fn check_policy_lines(text: &str) -> Result<(), (usize, String)> {
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |problem: String| (i + 1, problem);
        let tokens: Vec<&str> = line.split(',').map(str::trim).collect();
        let want = match tokens[0] {
            "p" => 5,
            "p2" => 3,
            "p3" => 4,
            "g" => 3,
            other => {
                return Err(bad(format!(
                    "unknown line type {other:?}: expected p, p2, p3 or g"
                )));
            }
        };
        if tokens.len() != want + 1 || tokens.iter().any(|t| t.is_empty()) {
            return Err(bad(format!(
                "a {} line has {want} non-empty fields, this one has {}",
                tokens[0],
                tokens.len() - 1
            )));
        }
        if line.contains('"') {
            return Err(bad("quotes are not allowed in policy lines".into()));
        }
        if tokens[0] == "p" && !matches!(tokens[5], "allow" | "deny") {
            return Err(bad(format!(
                "the effect must be allow or deny, got {:?}",
                tokens[5]
            )));
        }
    }
    Ok(())
}

/// The model and policy files' text as loaded, with their digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyText {
    pub digest: PolicyDigest,
    pub model: String,
    pub policy: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const MODEL: &str = include_str!("../../deploy/policy/model.conf");

    pub fn policy(consortium: &str) -> String {
        format!(
            "p, operator, consortium, jobs, submit, allow\n\
             p, operator, consortium, jobs, read, allow\n\
             p, compliance_officer, *, jobs, approve, allow\n\
             p, compliance_officer, *, jobs, read, allow\n\
             p, auditor, *, jobs, read, allow\n\
             p, auditor, *, jobs, approve, deny\n\
             p, spiffe://{consortium}/site/*/node, site:*, federation, *, allow\n\
             g, spiffe://{consortium}/operator/op, operator, consortium\n\
             g, spiffe://{consortium}/site/a/user/alice, compliance_officer, site:a\n\
             g, spiffe://{consortium}/site/a/user/eve, auditor, site:a\n\
             g, spiffe://{consortium}/site/a/user/eve, compliance_officer, site:a\n\
             p2, site:*, compliance_officer, 1\n"
        )
    }

    async fn authorizer(dir: &Path, policy_text: &str) -> Arc<Authorizer> {
        std::fs::write(dir.join("model.conf"), MODEL).unwrap();
        std::fs::write(dir.join("policy.csv"), policy_text).unwrap();
        Authorizer::load(&dir.join("model.conf"), &dir.join("policy.csv"))
            .await
            .unwrap()
    }

    /// The approvers a proposal names: the identities a `g` line links to the role in the
    /// domain, not another role's holders, nor another domain's.
    #[tokio::test]
    async fn holders_are_the_identities_linked_to_a_role_in_a_domain() {
        let dir = tempfile::tempdir().unwrap();
        let a = authorizer(dir.path(), &policy("acme")).await;
        assert_eq!(
            a.holders("compliance_officer", "site:a"),
            vec![
                "spiffe://acme/site/a/user/alice".to_string(),
                "spiffe://acme/site/a/user/eve".to_string()
            ]
        );
        assert!(a.holders("compliance_officer", "site:b").is_empty());
        assert_eq!(
            a.holders("auditor", "site:a"),
            vec!["spiffe://acme/site/a/user/eve".to_string()]
        );
        assert!(a.holders("operator", "site:a").is_empty());
    }

    /// Counting a quorum through the signers' own domains gives what asking every signer in
    /// every domain gives, roles held through another role included.
    #[tokio::test]
    async fn a_quorum_counted_through_linked_domains_is_the_quorum() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}g, spiffe://acme/site/b/user/bob, b_officer, site:b\n\
             g, b_officer, compliance_officer, site:b\n\
             g, spiffe://acme/site/c/user/carol, compliance_officer, site:a\n\
             g, spiffe://acme/site/c/user/carol, auditor, site:c\n\
             p2, consortium, compliance_officer, 1\n",
            policy("acme")
        );
        let a = authorizer(dir.path(), &text).await;
        let linked = a.linked_domains();
        assert_eq!(
            linked["spiffe://acme/site/c/user/carol"],
            vec!["site:a".to_string(), "site:c".to_string()]
        );
        let sites: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let everyone: Vec<String> = [
            "spiffe://acme/site/a/user/alice",
            "spiffe://acme/site/a/user/eve",
            "spiffe://acme/site/b/user/bob",
            "spiffe://acme/site/c/user/carol",
            "spiffe://acme/operator/op",
            "compliance_officer",
            "spiffe://acme/site/d/user/nobody",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let has_role = |s: &str, r: &str, d: &str| a.has_role(s, r, d);
        let rules = a.quorum_rules();
        // Every subset of the signers, so that each requirement is seen met and unmet.
        for mask in 0u32..(1 << everyone.len()) {
            let signers: Vec<String> = everyone
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, s)| s.clone())
                .collect();
            let plain = crate::quorum::evaluate(&rules, &sites, &signers, has_role);
            let fast = crate::quorum::evaluate_linked(
                &rules,
                &sites,
                &signers,
                |s| linked.get(s).cloned().unwrap_or_default(),
                has_role,
            );
            assert_eq!(plain, fast, "signers {signers:?}");
        }
        // Bob holds the officer role of site b through a role of his own.
        let bob = vec!["spiffe://acme/site/b/user/bob".to_string()];
        let s = crate::quorum::evaluate_linked(
            &rules,
            &sites,
            &bob,
            |s| linked.get(s).cloned().unwrap_or_default(),
            has_role,
        );
        assert!(s.gathered().iter().any(|g| g.contains("site:b")), "{s:?}");
    }

    #[test]
    fn segment_patterns_stop_at_slashes() {
        assert!(segment_match(
            "spiffe://c/site/a/node",
            "spiffe://c/site/*/node"
        ));
        assert!(!segment_match(
            "spiffe://c/site/a/user/node",
            "spiffe://c/site/*/node"
        ));
        assert!(segment_match("site:a", "site:*"));
        assert!(segment_match("anything/at/all", "*"));
        assert!(!segment_match("consortium", "site:*"));
        assert!(segment_match("jobs", "jobs"));
        assert!(!segment_match("jobsx", "jobs"));
    }

    #[tokio::test]
    async fn roles_in_domains_decide_and_name_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let a = authorizer(dir.path(), &policy("acme")).await;
        let d = a.decide("spiffe://acme/operator/op", "consortium", "jobs", "submit");
        assert!(d.allowed, "{d}");
        assert_eq!(d.rule, "p, operator, consortium, jobs, submit, allow");
        assert_eq!(d.policy_digest, a.digest());

        // Alice is an officer of site a, not of site b.
        assert!(
            a.decide(
                "spiffe://acme/site/a/user/alice",
                "site:a",
                "jobs",
                "approve"
            )
            .allowed
        );
        let d = a.decide(
            "spiffe://acme/site/a/user/alice",
            "site:b",
            "jobs",
            "approve",
        );
        assert!(!d.allowed);
        assert!(d.rule.starts_with("default deny"), "{}", d.rule);

        // Nodes by pattern, only in a site domain.
        assert!(
            a.decide(
                "spiffe://acme/site/x/node",
                "site:x",
                "federation",
                "participate"
            )
            .allowed
        );
        assert!(
            !a.decide(
                "spiffe://acme/site/x/user/node",
                "site:x",
                "federation",
                "participate"
            )
            .allowed
        );
        // An explicit deny wins over an allow, and is the rule reported.
        let d = a.decide("spiffe://acme/site/a/user/eve", "site:a", "jobs", "approve");
        assert!(!d.allowed);
        assert_eq!(d.rule, "p, auditor, *, jobs, approve, deny");

        assert!(a.has_role(
            "spiffe://acme/site/a/user/alice",
            "compliance_officer",
            "site:a"
        ));
        assert!(!a.has_role(
            "spiffe://acme/site/a/user/alice",
            "compliance_officer",
            "site:b"
        ));
        assert_eq!(a.quorum_rules().len(), 1);
    }

    #[tokio::test]
    async fn a_role_removed_from_the_file_takes_effect_at_reload() {
        let dir = tempfile::tempdir().unwrap();
        let text = policy("acme");
        let a = authorizer(dir.path(), &text).await;
        let before = a.digest();
        assert!(!a.reload().await.unwrap(), "nothing changed yet");
        let without_op: String = text
            .lines()
            .filter(|l| !l.starts_with("g, spiffe://acme/operator/op"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.path().join("policy.csv"), without_op).unwrap();
        assert!(a.reload().await.unwrap());
        assert_ne!(a.digest(), before);
        let d = a.decide("spiffe://acme/operator/op", "consortium", "jobs", "submit");
        assert!(!d.allowed);
        assert_eq!(d.policy_digest, a.digest());
    }

    /// The shipped deploy/policy/policy.csv, for the audit service: who appends, reads and
    /// verifies, that an auditor's append is denied by the explicit rule, and that the consortium
    /// operator appends (the CA's certificate events) but reads nothing back.
    #[tokio::test]
    async fn the_shipped_policy_lets_auditors_read_the_audit_log_and_never_write_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = authorizer(dir.path(), include_str!("../../deploy/policy/policy.csv")).await;
        let who = |uri: &str| uri.parse::<Identity>().unwrap();
        let dana = who("spiffe://acme/site/general/user/dana");
        let d = a.decide_for(&dana, "audit", "write");
        assert!(!d.allowed);
        assert_eq!(d.rule, "p, auditor, *, audit, write, deny");
        for action in ["read", "verify"] {
            assert!(a.decide_for(&dana, "audit", action).allowed, "{action}");
        }
        let alice = who("spiffe://acme/site/st-mary/user/alice");
        assert!(a.decide_for(&alice, "audit", "read").allowed);
        // An officer records the restore of their site's ledger (`ledger.restored`) as themselves.
        let d = a.decide_for(&alice, "audit", "write");
        assert!(d.allowed, "{d}");
        assert_eq!(d.rule, "p, compliance_officer, site:*, audit, write, allow");
        let node = who("spiffe://acme/site/general/node");
        assert!(a.decide_for(&node, "audit", "write").allowed);
        assert!(a.decide_for(&node, "audit", "verify").allowed);
        let d = a.decide_for(&node, "audit", "read");
        assert!(!d.allowed && d.rule.starts_with("default deny"), "{d}");
        // Nodes and the coordinator read back their own events only.
        assert!(a.decide_for(&node, "audit", "read_own").allowed);
        let coordinator = who("spiffe://acme/coordinator");
        assert!(a.decide_for(&coordinator, "audit", "write").allowed);
        assert!(!a.decide_for(&coordinator, "audit", "read").allowed);
        assert!(a.decide_for(&coordinator, "audit", "read_own").allowed);
        let op = who("spiffe://acme/operator/op");
        let d = a.decide_for(&op, "audit", "write");
        assert!(d.allowed, "{d}");
        assert_eq!(d.rule, "p, operator, consortium, audit, write, allow");
        for action in ["read", "verify"] {
            let d = a.decide_for(&op, "audit", action);
            assert!(
                !d.allowed && d.rule.starts_with("default deny"),
                "{action}: {d}"
            );
        }
        // The model registry: operators and officers sign stage moves, auditors only read, nodes
        // fetch; the stage rules (p3) say whose signatures a move into each stage needs.
        assert!(a.decide_for(&op, "registry", "stage").allowed);
        assert!(a.decide_for(&alice, "registry", "stage").allowed);
        assert!(a.decide_for(&dana, "registry", "read").allowed);
        assert!(!a.decide_for(&dana, "registry", "stage").allowed);
        assert!(a.decide_for(&node, "registry", "fetch").allowed);
        assert!(!a.decide_for(&node, "registry", "stage").allowed);
        let stages: Vec<_> = a.stage_rules().iter().map(|r| r.stage).collect();
        use tutela_protocol::release::Stage;
        assert_eq!(
            stages,
            [
                Stage::Canary,
                Stage::Production,
                Stage::Production,
                Stage::Retired
            ]
        );
        // Only an operator granted the role in the file appends, not any operator certificate.
        let stranger = who("spiffe://acme/operator/mallory");
        let d = a.decide_for(&stranger, "audit", "write");
        assert!(!d.allowed && d.rule.starts_with("default deny"), "{d}");
        // An operator who is also an auditor stays read-only: the explicit deny wins.
        let text = format!(
            "{}\ng, spiffe://acme/operator/audrey, operator, consortium\n\
             g, spiffe://acme/operator/audrey, auditor, consortium\n",
            include_str!("../../deploy/policy/policy.csv")
        );
        let both_dir = tempfile::tempdir().unwrap();
        let both = authorizer(both_dir.path(), &text).await;
        let audrey = who("spiffe://acme/operator/audrey");
        assert!(both.decide_for(&audrey, "jobs", "read").allowed);
        let d = both.decide_for(&audrey, "audit", "write");
        assert!(!d.allowed, "{d}");
        assert_eq!(d.rule, "p, auditor, *, audit, write, deny");
        assert!(both.decide_for(&op, "audit", "write").allowed);
    }

    #[tokio::test]
    async fn a_broken_policy_is_refused_and_the_old_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let a = authorizer(dir.path(), &policy("acme")).await;
        let before = a.digest();
        std::fs::write(
            dir.path().join("policy.csv"),
            "p, operator, consortium, jobs\n",
        )
        .unwrap();
        let err = a.reload().await.unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert_eq!(a.digest(), before);
        std::fs::write(dir.path().join("policy.csv"), "x, y, z\n").unwrap();
        assert!(a.reload().await.is_err());
        std::fs::write(
            dir.path().join("policy.csv"),
            "p, operator, consortium, jobs, submit, perhaps\n",
        )
        .unwrap();
        assert!(a.reload().await.is_err());
        assert!(
            a.decide("spiffe://acme/operator/op", "consortium", "jobs", "submit")
                .allowed
        );
    }
}
