//! The demo's consortium policy: the shipped `deploy/policy/policy.csv`, with the demo's own
//! identities.
//!
//! The demo must show the policy a consortium would run, not a looser one of its own: every
//! rule (`p`), quorum rule (`p2`) and stage rule (`p3`) line of the shipped file is kept as it is (its consortium
//! name replaced by the demo's), and only the role grants (`g`) are the demo's: its operator, one
//! compliance officer per hospital, and — as the shipped file makes its first two sites'
//! officers — the first two officers also the consortium's compliance officers, so that its
//! consortium-level quorum rule can be met.

/// The shipped policy, compiled in.
const SHIPPED_POLICY: &str = include_str!("../../deploy/policy/policy.csv");
/// The consortium the shipped policy is written for.
const SHIPPED_CONSORTIUM: &str = "acme";

/// How many of the demo's site officers are also consortium officers (as in the shipped file).
const CONSORTIUM_OFFICERS: usize = 2;

/// The policy CSV for consortium `consortium`, with `operator`'s identity and `officers` as
/// `(site, identity)`.
pub fn policy_csv(consortium: &str, operator: &str, officers: &[(String, String)]) -> String {
    let shipped_prefix = format!("spiffe://{SHIPPED_CONSORTIUM}/");
    let demo_prefix = format!("spiffe://{consortium}/");
    let mut out = String::from(
        "# deploy/policy/policy.csv's rules and quorum, with the demo's identities (tutela demo).\n",
    );
    for line in SHIPPED_POLICY.lines() {
        let kind = line.split(',').next().unwrap_or("").trim();
        if matches!(kind, "p" | "p2" | "p3") {
            out.push_str(&line.replace(&shipped_prefix, &demo_prefix));
            out.push('\n');
        }
    }
    out.push_str(&format!("g, {operator}, operator, consortium\n"));
    for (i, (site, officer)) in officers.iter().enumerate() {
        out.push_str(&format!("g, {officer}, compliance_officer, site:{site}\n"));
        if i < CONSORTIUM_OFFICERS {
            out.push_str(&format!("g, {officer}, compliance_officer, consortium\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tutela_policy::authz::Authorizer;

    fn officers() -> Vec<(String, String)> {
        ["a", "b", "c"]
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    format!("spiffe://demo/site/{s}/user/officer"),
                )
            })
            .collect()
    }

    async fn authorizer() -> (tempfile::TempDir, std::sync::Arc<Authorizer>) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.conf");
        let policy = dir.path().join("policy.csv");
        std::fs::write(&model, include_str!("../../deploy/policy/model.conf")).unwrap();
        std::fs::write(
            &policy,
            policy_csv("demo", "spiffe://demo/operator/demo", &officers()),
        )
        .unwrap();
        let authz = Authorizer::load(&model, &policy).await.unwrap();
        (dir, authz)
    }

    #[tokio::test]
    async fn an_officer_can_approve_but_not_submit_or_cancel() {
        let (_dir, authz) = authorizer().await;
        for (site, officer) in officers() {
            let home = format!("site:{site}");
            for domain in [home.as_str(), "consortium"] {
                for action in ["submit", "cancel"] {
                    let d = authz.decide(&officer, domain, "jobs", action);
                    assert!(!d.allowed, "{officer} may {action} in {domain}: {}", d.rule);
                }
            }
            assert!(authz.decide(&officer, &home, "jobs", "approve").allowed);
            assert!(authz.decide(&officer, &home, "jobs", "read").allowed);
            assert!(authz.decide(&officer, &home, "audit", "read").allowed);
        }
        let op = "spiffe://demo/operator/demo";
        for action in ["submit", "cancel", "read"] {
            assert!(authz.decide(op, "consortium", "jobs", action).allowed);
        }
        // The nodes take part and record in the trail, in their own site's domain.
        let node = "spiffe://demo/site/a/node";
        assert!(
            authz
                .decide(node, "site:a", "federation", "participate")
                .allowed
        );
        assert!(authz.decide(node, "site:a", "audit", "write").allowed);
        assert!(
            authz
                .decide("spiffe://demo/coordinator", "consortium", "audit", "write")
                .allowed
        );
    }

    #[test]
    fn every_shipped_rule_is_kept_and_no_shipped_identity_is() {
        let csv = policy_csv("demo", "spiffe://demo/operator/demo", &officers());
        let rules = |text: &str| -> usize {
            text.lines()
                .filter(|l| matches!(l.split(',').next().map(str::trim), Some("p" | "p2" | "p3")))
                .count()
        };
        assert_eq!(rules(&csv), rules(SHIPPED_POLICY));
        assert!(!csv.contains("acme"), "{csv}");
        assert!(csv.contains("p2, consortium, compliance_officer, 2"));
    }
}
