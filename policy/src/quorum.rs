//! Approval quorum rules: which roles in which domains must approve a job before it runs.
//!
//! A rule is a `p2` line of the policy file: `p2, <domain>, <role>, <min>`, meaning "at least
//! `min` distinct holders of `role` in `domain` must have approved". The domain is `site:*` for
//! *each participating site* (one requirement per site the job lists, in that site's domain),
//! `site:<name>` for one site, or `consortium`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use crate::authz::{CONSORTIUM_DOMAIN, site_domain};

/// Where a quorum rule applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuorumDomain {
    /// `site:*`: every site the job names, each on its own.
    EachParticipatingSite,
    /// `site:<name>`.
    Site(String),
    /// `consortium`.
    Consortium,
}

/// One `p2` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumRule {
    pub domain: QuorumDomain,
    pub role: String,
    pub min: u32,
}

impl QuorumRule {
    /// From the fields of a `p2` line (without the `p2`).
    pub fn from_tokens(tokens: &[String]) -> Result<Self, String> {
        let [dom, role, min] = tokens else {
            return Err(format!("expected 3 fields, got {}", tokens.len()));
        };
        let domain = match dom.as_str() {
            "site:*" => QuorumDomain::EachParticipatingSite,
            CONSORTIUM_DOMAIN => QuorumDomain::Consortium,
            d => match d.strip_prefix("site:") {
                Some(site) if !site.is_empty() && !site.contains('*') => {
                    QuorumDomain::Site(site.to_string())
                }
                _ => {
                    return Err(format!(
                        "domain {d:?}: expected site:*, site:<name> or consortium"
                    ));
                }
            },
        };
        let min: u32 = min
            .parse()
            .map_err(|_| format!("min {min:?} is not a whole number"))?;
        if min == 0 {
            return Err("min must be at least 1".into());
        }
        Ok(QuorumRule {
            domain,
            role: role.clone(),
            min,
        })
    }
}

/// One requirement of a job: `min` distinct `role` holders in `domain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub domain: String,
    pub role: String,
    pub min: u32,
    /// The signers that count towards it.
    pub signers: Vec<String>,
}

impl Requirement {
    pub fn is_met(&self) -> bool {
        self.signers.len() >= self.min as usize
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} in {} ({} so far)",
            self.min,
            self.role,
            self.domain,
            self.signers.len()
        )
    }
}

/// Where a job's approvals stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumStatus {
    pub requirements: Vec<Requirement>,
    /// Why the quorum cannot be met as the job stands (e.g. it names no sites), if so.
    pub blocked: Option<String>,
}

impl QuorumStatus {
    pub fn is_met(&self) -> bool {
        self.blocked.is_none() && self.requirements.iter().all(Requirement::is_met)
    }

    /// The requirements not met yet, in words.
    pub fn missing(&self) -> Vec<String> {
        let mut out: Vec<String> = self.blocked.iter().cloned().collect();
        out.extend(self.requirements.iter().filter(|r| !r.is_met()).map(|r| {
            format!(
                "{} more approval(s) of a {} of {} (has {} of {})",
                r.min as usize - r.signers.len(),
                r.role,
                r.domain,
                r.signers.len(),
                r.min
            )
        }));
        out
    }

    /// The approvals that count, as `signer (role in domain)`.
    pub fn gathered(&self) -> Vec<String> {
        self.requirements
            .iter()
            .flat_map(|r| {
                r.signers
                    .iter()
                    .map(move |s| format!("{s} ({} of {})", r.role, r.domain))
            })
            .collect()
    }
}

/// Evaluates `rules` for a job over `sites` given the identities whose approvals verified
/// (`signers`, already checked for signature, chain, digest and expiry). `has_role(signer, role,
/// domain)` answers from the policy. A signer counts once per requirement.
pub fn evaluate(
    rules: &[QuorumRule],
    sites: &[String],
    signers: &[String],
    has_role: impl Fn(&str, &str, &str) -> bool,
) -> QuorumStatus {
    let distinct: BTreeSet<&String> = signers.iter().collect();
    evaluate_with(rules, sites, |domain, rule| {
        distinct
            .iter()
            .filter(|s| has_role(s, &rule.role, domain))
            .map(|s| s.to_string())
            .collect()
    })
}

/// [`evaluate`] for jobs of many sites and many signers: the same answer, with `has_role` asked
/// only about the signers that can hold a role in a requirement's domain, instead of every
/// signer in every site's domain (sites × signers role look-ups per count, which a job of a
/// thousand sites does on every approval and every status).
///
/// `linked(signer)` is every domain in which the policy links the signer to some role itself
/// (its own `g` lines). With the consortium's model (`g = _, _, _`, no domain patterns) a
/// signer can hold a role in a domain only through such a line, or by being the role itself;
/// the others would be answered `false` by `has_role`, so leaving them out changes nothing.
pub fn evaluate_linked(
    rules: &[QuorumRule],
    sites: &[String],
    signers: &[String],
    linked: impl Fn(&str) -> Vec<String>,
    has_role: impl Fn(&str, &str, &str) -> bool,
) -> QuorumStatus {
    let distinct: BTreeSet<&String> = signers.iter().collect();
    let mut by_domain: HashMap<String, BTreeSet<&String>> = HashMap::new();
    for s in &distinct {
        for domain in linked(s) {
            by_domain.entry(domain).or_default().insert(s);
        }
    }
    evaluate_with(rules, sites, |domain, rule| {
        let mut candidates: BTreeSet<&String> = by_domain.get(domain).cloned().unwrap_or_default();
        if let Some(s) = distinct.get(&rule.role) {
            candidates.insert(s);
        }
        candidates
            .into_iter()
            .filter(|s| has_role(s, &rule.role, domain))
            .map(|s| s.to_string())
            .collect()
    })
}

/// The requirements of `rules` over `sites`, each with the signers `holders(domain, rule)` says
/// count towards it (sorted, each once).
fn evaluate_with(
    rules: &[QuorumRule],
    sites: &[String],
    mut holders: impl FnMut(&str, &QuorumRule) -> Vec<String>,
) -> QuorumStatus {
    let mut requirements = Vec::new();
    let mut blocked = None;
    let mut add = |domain: String, rule: &QuorumRule| {
        let signers = holders(&domain, rule);
        requirements.push(Requirement {
            domain,
            role: rule.role.clone(),
            min: rule.min,
            signers,
        });
    };
    for rule in rules {
        match &rule.domain {
            QuorumDomain::EachParticipatingSite => {
                if sites.is_empty() {
                    blocked = Some(
                        "the job names no sites, so no site's officers can approve it: list its \
                         participating sites in `sites`"
                            .to_string(),
                    );
                }
                for site in sites {
                    add(site_domain(site), rule);
                }
            }
            QuorumDomain::Site(site) => {
                if sites.contains(site) {
                    add(site_domain(site), rule)
                }
            }
            QuorumDomain::Consortium => add(CONSORTIUM_DOMAIN.to_string(), rule),
        }
    }
    QuorumStatus {
        requirements,
        blocked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(tokens: &[&str]) -> QuorumRule {
        QuorumRule::from_tokens(&tokens.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn officers(s: &str, role: &str, dom: &str) -> bool {
        role == "compliance_officer"
            && match dom {
                "site:a" => s.contains("/site/a/"),
                "site:b" => s.contains("/site/b/"),
                "consortium" => s.ends_with("/user/cons1") || s.ends_with("/user/cons2"),
                _ => false,
            }
    }

    #[test]
    fn every_site_and_the_consortium_must_approve() {
        let rules = [
            rule(&["site:*", "compliance_officer", "1"]),
            rule(&["consortium", "compliance_officer", "2"]),
        ];
        let sites = vec!["a".to_string(), "b".to_string()];
        let a = "spiffe://c/site/a/user/alice".to_string();
        let b = "spiffe://c/site/b/user/bob".to_string();
        let c1 = "spiffe://c/site/a/user/cons1".to_string();
        let c2 = "spiffe://c/site/b/user/cons2".to_string();

        let s = evaluate(&rules, &sites, std::slice::from_ref(&a), officers);
        assert!(!s.is_met());
        assert_eq!(s.missing().len(), 2, "{:?}", s.missing());
        assert!(s.missing()[0].contains("site:b"));

        // The same officer twice counts once.
        let s = evaluate(
            &rules,
            &sites,
            &[a.clone(), b.clone(), c1.clone(), c1.clone()],
            officers,
        );
        assert!(!s.is_met());
        assert!(s.missing()[0].contains("consortium"), "{:?}", s.missing());

        let s = evaluate(&rules, &sites, &[a, b, c1, c2], officers);
        assert!(s.is_met(), "{:?}", s.missing());
        assert_eq!(s.gathered().len(), 2 + 2 + 2);
    }

    #[test]
    fn a_job_without_sites_cannot_be_approved_per_site() {
        let rules = [rule(&["site:*", "compliance_officer", "1"])];
        let s = evaluate(&rules, &[], &["x".into()], officers);
        assert!(!s.is_met());
        assert!(s.blocked.is_some());
    }

    #[test]
    fn bad_rules_are_refused() {
        for t in [
            vec!["site:", "r", "1"],
            vec!["elsewhere", "r", "1"],
            vec!["consortium", "r", "0"],
            vec!["consortium", "r", "two"],
            vec!["consortium", "r"],
        ] {
            let t: Vec<String> = t.iter().map(|s| s.to_string()).collect();
            assert!(QuorumRule::from_tokens(&t).is_err(), "{t:?}");
        }
        assert_eq!(
            rule(&["site:x", "r", "2"]).domain,
            QuorumDomain::Site("x".into())
        );
    }
}
