//! Who may move a registered model's stage: signed stage moves and the policy's stage quorum
//! rules.
//!
//! A [`SignedMove`] is a principal's signature (with the key of their certificate, like an
//! approval) over `tutela_protocol::release::stage_move_message`: the name, the kind (promote or
//! rollback), every version's move with its model digest, the reason and the time of signing.
//!
//! Who must sign is the policy's, in `p3` lines: `p3, <stage>, <domain>, <role>, <min>` means "a
//! move that puts a version into `<stage>` needs at least `min` distinct holders of `role` in
//! `domain`", where the domain is read as in an approval quorum rule (`site:*` = each site that
//! contributed to the model, `site:<name>`, `consortium`) and evaluated by the same
//! [`crate::quorum::evaluate`]. A move into a stage no `p3` line names is refused: the policy
//! must say who may do it.

use std::str::FromStr;

use tutela_protocol::identity::Identity;
use tutela_protocol::pb;
use tutela_protocol::release::{MoveKind, Stage, VersionMove, reason_problem, stage_move_message};

use crate::approval::{
    ApprovalError, ApprovalVerifier, CLOCK_SKEW_MS, SignedKind, check_own_signature,
    claimed_signer, sign_with_certificate_key,
};
use crate::quorum::{self, QuorumRule, QuorumStatus};

/// How long a signed move counts after it was signed: the other signers of a quorum have a day
/// to add theirs; after that it must be signed again.
pub const STAGE_SIGNATURE_VALID_MS: i64 = 24 * 60 * 60 * 1000;

/// One `p3` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRule {
    /// The stage a move puts a version into.
    pub stage: Stage,
    pub quorum: QuorumRule,
}

impl StageRule {
    /// From the fields of a `p3` line (without the `p3`).
    pub fn from_tokens(tokens: &[String]) -> Result<Self, String> {
        let [stage, rest @ ..] = tokens else {
            return Err("expected 4 fields, got none".to_string());
        };
        if rest.len() != 3 {
            return Err(format!("expected 4 fields, got {}", tokens.len()));
        }
        let stage = Stage::from_str(stage).map_err(|e| e.to_string())?;
        if stage == Stage::Candidate {
            return Err("no move goes into candidate (a published model starts there)".to_string());
        }
        Ok(StageRule {
            stage,
            quorum: QuorumRule::from_tokens(rest)?,
        })
    }
}

/// Where the signatures of a move stand against the policy's `rules`: the requirements of every
/// stage the move puts a version into, over the model's contributing `sites`. Blocked when a
/// stage moved into has no rule.
pub fn evaluate_move(
    rules: &[StageRule],
    moves: &[VersionMove],
    sites: &[String],
    signers: &[String],
    has_role: impl Fn(&str, &str, &str) -> bool,
) -> QuorumStatus {
    let mut stages: Vec<Stage> = moves.iter().map(|m| m.to).collect();
    stages.sort();
    stages.dedup();
    let mut wanted = Vec::new();
    let mut unruled = Vec::new();
    for stage in stages {
        let before = wanted.len();
        wanted.extend(
            rules
                .iter()
                .filter(|r| r.stage == stage)
                .map(|r| r.quorum.clone()),
        );
        if wanted.len() == before {
            unruled.push(stage.to_string());
        }
    }
    let mut status = quorum::evaluate(&wanted, sites, signers, has_role);
    if !unruled.is_empty() {
        status.blocked = Some(format!(
            "the policy has no stage rule (p3) for moves into {}: nobody may make them",
            unruled.join(", ")
        ));
    } else if let Some(b) = &status.blocked {
        // quorum::evaluate speaks of jobs; a model's sites are those that contributed to it.
        status.blocked = Some(b.replace(
            "the job names no sites",
            "the model has no contributing sites",
        ));
    }
    status
}

/// The (role, domain) pairs whose holders' signatures count for a move.
pub fn wanted_roles(
    rules: &[StageRule],
    moves: &[VersionMove],
    sites: &[String],
) -> Vec<(String, String)> {
    evaluate_move(rules, moves, sites, &[], |_, _, _| false)
        .requirements
        .into_iter()
        .map(|r| (r.role, r.domain))
        .collect()
}

/// What a reader of the audit trail needs of a policy to re-check a stage move without casbin:
/// its stage rules (`p3`) and its role grants (`g`), read from the policy's text as recorded in
/// the trail (`policy.loaded`). Roles are resolved as casbin's role manager resolves them for the
/// coordinator ([`crate::Authorizer::has_role`]): a `g` line links an identity (or a role) to a
/// role in one domain, transitively within that domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePolicy {
    rules: Vec<StageRule>,
    /// (member, role, domain), as the `g` lines say.
    grants: Vec<(String, String, String)>,
}

impl StagePolicy {
    /// Reads a policy file's text; the first bad line (as the coordinator would refuse it to
    /// load) is an error naming its number.
    pub fn parse(policy_text: &str) -> Result<StagePolicy, String> {
        crate::authz::check_policy_lines(policy_text)
            .map_err(|(line, problem)| format!("policy line {line}: {problem}"))?;
        let mut rules = Vec::new();
        let mut grants = Vec::new();
        for (i, raw) in policy_text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let tokens: Vec<String> = line.split(',').map(|t| t.trim().to_string()).collect();
            match tokens[0].as_str() {
                "p3" => rules.push(
                    StageRule::from_tokens(&tokens[1..])
                        .map_err(|p| format!("policy line {}: stage rule: {p}", i + 1))?,
                ),
                "g" => grants.push((tokens[1].clone(), tokens[2].clone(), tokens[3].clone())),
                _ => {}
            }
        }
        Ok(StagePolicy { rules, grants })
    }

    pub fn rules(&self) -> &[StageRule] {
        &self.rules
    }

    /// Whether `subject` holds `role` in `domain`: a `g` line links it, directly or through
    /// roles linked in the same domain.
    pub fn has_role(&self, subject: &str, role: &str, domain: &str) -> bool {
        let mut seen = vec![subject.to_string()];
        let mut frontier = vec![subject.to_string()];
        while let Some(who) = frontier.pop() {
            for (member, granted, dom) in &self.grants {
                if member == &who && dom == domain {
                    if granted == role {
                        return true;
                    }
                    if !seen.contains(granted) {
                        seen.push(granted.clone());
                        frontier.push(granted.clone());
                    }
                }
            }
        }
        false
    }

    /// Whether `signers` meet this policy's stage rules for `moves` of a model the `sites`
    /// contributed to, every signer holding a role the rules ask for; what is wrong if not.
    pub fn check_signers(
        &self,
        moves: &[VersionMove],
        sites: &[String],
        signers: &[String],
    ) -> Result<QuorumStatus, String> {
        let wanted = wanted_roles(&self.rules, moves, sites);
        for s in signers {
            if !wanted
                .iter()
                .any(|(role, domain)| self.has_role(s, role, domain))
            {
                let asked: Vec<String> =
                    wanted.iter().map(|(r, d)| format!("{r} of {d}")).collect();
                return Err(format!(
                    "{s} holds none of the roles whose signature this move needs ({})",
                    if asked.is_empty() {
                        "the policy has no stage rule for it".to_string()
                    } else {
                        asked.join(", ")
                    }
                ));
            }
        }
        let status = evaluate_move(&self.rules, moves, sites, signers, |s, r, d| {
            self.has_role(s, r, d)
        });
        if let Some(b) = &status.blocked {
            return Err(b.clone());
        }
        if !status.is_met() {
            return Err(format!(
                "the signatures do not meet the stage rules: missing {}",
                status.missing().join("; ")
            ));
        }
        Ok(status)
    }
}

/// A principal's signed move of a registered model's versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedMove {
    pub name: String,
    pub kind: MoveKind,
    pub moves: Vec<VersionMove>,
    pub reason: String,
    /// The signer's certificate chain, DER, leaf first.
    pub signer_chain_der: Vec<Vec<u8>>,
    pub signature: Vec<u8>,
    /// Unix milliseconds.
    pub signed_at_ms: i64,
}

impl SignedMove {
    /// Signs the move with a PKCS#8 private key (PEM, ECDSA P-256 or Ed25519), attaching
    /// `chain_pem`; [`SignedMove::check_own_signature`] checks the key is the certificate's.
    pub fn sign(
        key_pem: &str,
        chain_pem: &str,
        name: &str,
        kind: MoveKind,
        moves: Vec<VersionMove>,
        reason: &str,
        signed_at_ms: i64,
    ) -> Result<SignedMove, ApprovalError> {
        if let Some(problem) = reason_problem(reason) {
            return Err(ApprovalError::BadReason(problem));
        }
        let message = stage_move_message(name, kind, &moves, reason, signed_at_ms);
        let (chain, signature) =
            sign_with_certificate_key(key_pem, chain_pem, &message, SignedKind::StageMove)?;
        Ok(SignedMove {
            name: name.to_string(),
            kind,
            moves,
            reason: reason.to_string(),
            signer_chain_der: chain,
            signature,
            signed_at_ms,
        })
    }

    /// The signed bytes.
    pub fn message(&self) -> Vec<u8> {
        stage_move_message(
            &self.name,
            self.kind,
            &self.moves,
            &self.reason,
            self.signed_at_ms,
        )
    }

    /// The signer's identity as the leaf certificate names it (unverified).
    pub fn claimed_signer(&self) -> Result<Identity, ApprovalError> {
        claimed_signer(&self.signer_chain_der, SignedKind::StageMove)
    }

    /// The signer's own check that the key they used belongs to the certificate they attached.
    pub fn check_own_signature(&self) -> Result<(), ApprovalError> {
        check_own_signature(
            &self.signer_chain_der,
            &self.message(),
            &self.signature,
            SignedKind::StageMove,
        )
    }

    pub fn to_pb(&self) -> pb::SignedStageMove {
        pb::SignedStageMove {
            name: self.name.clone(),
            kind: self.kind.to_string(),
            moves: self.moves.iter().map(move_to_pb).collect(),
            reason: self.reason.clone(),
            signer_chain_der: self.signer_chain_der.clone(),
            signature: self.signature.clone(),
            signed_at_unix_ms: self.signed_at_ms,
        }
    }

    pub fn from_pb(m: &pb::SignedStageMove) -> Result<SignedMove, ApprovalError> {
        let malformed = |problem: String| ApprovalError::Malformed {
            kind: SignedKind::StageMove,
            problem,
        };
        Ok(SignedMove {
            name: m.name.clone(),
            kind: m.kind.parse().map_err(malformed)?,
            moves: m
                .moves
                .iter()
                .map(move_from_pb)
                .collect::<Result<_, _>>()
                .map_err(malformed)?,
            reason: m.reason.clone(),
            signer_chain_der: m.signer_chain_der.clone(),
            signature: m.signature.clone(),
            signed_at_ms: m.signed_at_unix_ms,
        })
    }
}

pub fn move_to_pb(m: &VersionMove) -> pb::VersionMove {
    pb::VersionMove {
        version: m.version,
        model_digest: m.model_digest.clone(),
        from: m.from.to_string(),
        to: m.to.to_string(),
    }
}

pub fn move_from_pb(m: &pb::VersionMove) -> Result<VersionMove, String> {
    Ok(VersionMove {
        version: m.version,
        model_digest: m.model_digest.clone(),
        from: m
            .from
            .parse()
            .map_err(|e: tutela_protocol::release::UnknownStage| e.to_string())?,
        to: m
            .to
            .parse()
            .map_err(|e: tutela_protocol::release::UnknownStage| e.to_string())?,
    })
}

impl ApprovalVerifier {
    /// Verifies a signed move at `now_ms`: its reason, that it was signed within
    /// [`STAGE_SIGNATURE_VALID_MS`] and not in the future, the signer's chain to the consortium
    /// CA and CRLs, and the signature over the stage move message. Returns the signer; whether
    /// the signer's roles count is [`evaluate_move`]'s question.
    pub fn verify_stage_move(
        &self,
        m: &SignedMove,
        now_ms: i64,
    ) -> Result<Identity, ApprovalError> {
        if let Some(problem) = reason_problem(&m.reason) {
            return Err(ApprovalError::BadReason(problem));
        }
        if m.signed_at_ms > now_ms + CLOCK_SKEW_MS {
            return Err(ApprovalError::FromTheFuture {
                kind: SignedKind::StageMove,
                signed_at_ms: m.signed_at_ms,
                now_ms,
            });
        }
        if m.signed_at_ms < now_ms.saturating_sub(STAGE_SIGNATURE_VALID_MS) {
            return Err(ApprovalError::Stale {
                signed_at_ms: m.signed_at_ms,
                now_ms,
                max_age_ms: STAGE_SIGNATURE_VALID_MS,
            });
        }
        self.verify_signed(
            SignedKind::StageMove,
            &m.signer_chain_der,
            &m.message(),
            &m.signature,
            now_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::tests::{ca, user, verifier};

    fn rule(t: &[&str]) -> StageRule {
        StageRule::from_tokens(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn to(stage: Stage) -> Vec<VersionMove> {
        vec![VersionMove {
            version: 1,
            model_digest: "ab".repeat(32),
            from: Stage::Canary,
            to: stage,
        }]
    }

    #[test]
    fn p3_lines_parse_and_bad_ones_are_refused() {
        let r = rule(&["production", "site:*", "compliance_officer", "1"]);
        assert_eq!(r.stage, Stage::Production);
        for bad in [
            vec!["candidate", "consortium", "operator", "1"],
            vec!["live", "consortium", "operator", "1"],
            vec!["production", "consortium", "operator"],
            vec!["production", "elsewhere", "operator", "1"],
        ] {
            let t: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(StageRule::from_tokens(&t).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_operator_plus_an_officer_of_every_contributing_site_move_into_production() {
        let rules = [
            rule(&["canary", "consortium", "operator", "1"]),
            rule(&["production", "consortium", "operator", "1"]),
            rule(&["production", "site:*", "compliance_officer", "1"]),
        ];
        let has_role = |s: &str, role: &str, dom: &str| match (role, dom) {
            ("operator", "consortium") => s.ends_with("/operator/op"),
            ("compliance_officer", "site:a") => s.contains("/site/a/user/"),
            ("compliance_officer", "site:b") => s.contains("/site/b/user/"),
            _ => false,
        };
        let sites = vec!["a".to_string(), "b".to_string()];
        let op = "spiffe://c/operator/op".to_string();
        let alice = "spiffe://c/site/a/user/alice".to_string();
        let bob = "spiffe://c/site/b/user/bob".to_string();
        assert!(
            evaluate_move(
                &rules,
                &to(Stage::Canary),
                &sites,
                std::slice::from_ref(&op),
                has_role
            )
            .is_met()
        );
        let s = evaluate_move(
            &rules,
            &to(Stage::Production),
            &sites,
            &[op.clone(), alice.clone()],
            has_role,
        );
        assert!(!s.is_met());
        assert!(
            s.missing().iter().any(|m| m.contains("site:b")),
            "{:?}",
            s.missing()
        );
        assert!(
            evaluate_move(
                &rules,
                &to(Stage::Production),
                &sites,
                &[op, alice, bob],
                has_role
            )
            .is_met()
        );
        // Nobody may retire: the policy names no rule for it.
        let s = evaluate_move(&rules, &to(Stage::Retired), &sites, &["x".into()], has_role);
        assert!(!s.is_met());
        assert!(s.blocked.unwrap().contains("retired"));
        assert_eq!(
            wanted_roles(&rules, &to(Stage::Production), &sites).len(),
            3
        );
    }

    #[test]
    fn a_signed_move_verifies_and_a_changed_one_does_not() {
        let ca = ca("c");
        let alice = user(
            &ca,
            "a",
            "alice",
            tutela_protocol::pki::KeyAlgorithm::EcdsaP256,
        );
        let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let m = SignedMove::sign(
            &alice.key_pem,
            &alice.cert_pem,
            "tabular",
            MoveKind::Promote,
            to(Stage::Production),
            "canary metrics held for a week",
            now,
        )
        .unwrap();
        m.check_own_signature().unwrap();
        let v = verifier(&ca);
        assert_eq!(
            v.verify_stage_move(&m, now).unwrap().uri(),
            "spiffe://c/site/a/user/alice"
        );
        let back = SignedMove::from_pb(&m.to_pb()).unwrap();
        assert_eq!(back, m);
        let mut forged = m.clone();
        forged.moves[0].to = Stage::Retired;
        assert!(matches!(
            v.verify_stage_move(&forged, now),
            Err(ApprovalError::BadSignature { .. })
        ));
        assert!(matches!(
            v.verify_stage_move(&m, now + STAGE_SIGNATURE_VALID_MS + 1),
            Err(ApprovalError::Stale { .. })
        ));
        assert!(
            SignedMove::sign(
                &alice.key_pem,
                &alice.cert_pem,
                "tabular",
                MoveKind::Promote,
                to(Stage::Production),
                "",
                now
            )
            .is_err()
        );
    }

    /// A reader of the trail re-checks stage moves from the policy's text: the shipped policy
    /// read that way gives the roles casbin gives the coordinator (same files, same answers).
    #[tokio::test]
    async fn a_policy_read_from_its_text_gives_the_coordinator_s_roles_and_stage_rules() {
        let model = include_str!("../../deploy/policy/model.conf");
        let policy_text = include_str!("../../deploy/policy/policy.csv");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.conf"), model).unwrap();
        // A role linked through a role, as casbin resolves it, besides the shipped lines.
        let policy_text = format!(
            "{policy_text}\ng, spiffe://acme/operator/eve, release_manager, consortium\n\
             g, release_manager, operator, consortium\n"
        );
        std::fs::write(dir.path().join("policy.csv"), &policy_text).unwrap();
        let authz = crate::Authorizer::load(
            &dir.path().join("model.conf"),
            &dir.path().join("policy.csv"),
        )
        .await
        .unwrap();
        let text = authz.text();
        assert_eq!(
            text.digest,
            crate::PolicyDigest::of(model.as_bytes(), policy_text.as_bytes())
        );
        let read = StagePolicy::parse(&text.policy).unwrap();
        assert_eq!(read.rules(), authz.stage_rules().as_slice());
        for who in [
            "spiffe://acme/operator/op",
            "spiffe://acme/operator/eve",
            "spiffe://acme/operator/mallory",
            "spiffe://acme/site/st-mary/user/alice",
            "spiffe://acme/site/st-mary/user/sam",
            "spiffe://acme/site/general/user/dana",
        ] {
            for role in ["operator", "compliance_officer", "site_admin", "auditor"] {
                for domain in ["consortium", "site:st-mary", "site:general"] {
                    assert_eq!(
                        read.has_role(who, role, domain),
                        authz.has_role(who, role, domain),
                        "{who} {role} {domain}"
                    );
                }
            }
        }
        let prod = to(Stage::Production);
        let sites = vec!["st-mary".to_string()];
        let op = "spiffe://acme/operator/op".to_string();
        let alice = "spiffe://acme/site/st-mary/user/alice".to_string();
        read.check_signers(&prod, &sites, &[op.clone(), alice.clone()])
            .unwrap();
        let e = read
            .check_signers(&prod, &sites, std::slice::from_ref(&op))
            .unwrap_err();
        assert!(e.contains("missing") && e.contains("site:st-mary"), "{e}");
        let e = read
            .check_signers(
                &prod,
                &sites,
                &[op, alice, "spiffe://acme/site/st-mary/user/sam".into()],
            )
            .unwrap_err();
        assert!(e.contains("sam holds none of the roles"), "{e}");
        let e = StagePolicy::parse("g, a, b\n").unwrap_err();
        assert!(e.contains("policy line 1"), "{e}");
    }
}
