//! Re-checking a `model.stage_changed` event's signatures, at append and by every reader.
//!
//! Each [`StageSignature`] must carry a certificate that names a person of the consortium (an
//! operator or a site user; services and nodes do not sign stage moves), chains to the consortium
//! CA (the [`ChainCheck`] the caller passes: the live CA at append, the CA as of the event's time
//! when the stored trail is re-checked), and whose key verifies the signature over
//! `tutela_protocol::release::stage_move_message` of the payload's name, kind, moves and reason
//! and the signature's own time, which must fall within the day before the event
//! ([`STAGE_SIGNATURE_VALID_MS`], the coordinator's own limit, plus its clock skew). No signer
//! may count twice. The signers' roles are re-checked against the policy the event names by
//! [`crate::authority::TrailState`] (the policy's text is in the trail: `policy.loaded`), which
//! also refuses a signature that already counted in an earlier move.

use rustls_pki_types::CertificateDer;
use tutela_policy::stage::STAGE_SIGNATURE_VALID_MS;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::release::stage_move_message;

use crate::Hash;
use crate::approval::{ChainCheck, pem_to_der, verify_signature};
use crate::event::Timestamp;
use crate::payload::{ModelStageChanged, StageSignature};

/// How far a signature's time may be ahead of the event's (the coordinator's clock skew).
pub const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// A signature that verified: its signer, and what makes it the same signature if it is seen
/// again (the signer and the signed message: an ECDSA signature has more than one encoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountedSignature {
    pub signer: Identity,
    pub key: Hash,
}

/// Verifies every signature of `payload`, recorded at `at`; the signers, in order.
pub fn verify_stage_signatures(
    payload: &ModelStageChanged,
    chain: Option<&ChainCheck>,
    at: Timestamp,
) -> Result<Vec<CountedSignature>, String> {
    if payload.signatures.is_empty() {
        return Err("it carries no signature".to_string());
    }
    let mut signed: Vec<CountedSignature> = Vec::new();
    for (i, s) in payload.signatures.iter().enumerate() {
        let counted =
            verify_one(payload, s, chain, at).map_err(|e| format!("signature {}: {e}", i + 1))?;
        if signed.iter().any(|c| c.signer == counted.signer) {
            return Err(format!("{} signed it twice", counted.signer));
        }
        signed.push(counted);
    }
    Ok(signed)
}

fn verify_one(
    payload: &ModelStageChanged,
    s: &StageSignature,
    chain: Option<&ChainCheck>,
    at: Timestamp,
) -> Result<CountedSignature, String> {
    let der = pem_to_der(&s.certificate).map_err(|e| e.to_string())?;
    let signer = tutela_protocol::pki::identity_of_cert_der(&der).map_err(|e| e.to_string())?;
    if !matches!(
        signer.principal,
        Principal::Operator { .. } | Principal::User { .. }
    ) {
        return Err(format!(
            "{signer} is not a person (an operator or a site user) and cannot sign a stage move"
        ));
    }
    if let Some(check) = chain {
        check(&[CertificateDer::from(der.clone())]).map_err(|e| {
            format!("{signer}'s certificate does not chain to the consortium CA: {e}")
        })?;
    }
    let signature = hex::decode(&s.signature).map_err(|e| format!("signature is not hex: {e}"))?;
    let message = stage_move_message(
        &payload.name,
        payload.kind,
        &payload.moves,
        &payload.reason,
        s.signed_at_ms,
    );
    verify_signature(&der, &message, &signature)
        .map_err(|_| format!("the signature of {signer} does not verify over this move"))?;
    let at_ms = at.unix_millis();
    if s.signed_at_ms > at_ms + CLOCK_SKEW_MS
        || s.signed_at_ms < at_ms - STAGE_SIGNATURE_VALID_MS - CLOCK_SKEW_MS
    {
        return Err(format!(
            "{signer} signed it at {} ms, not within the day before the event ({at_ms} ms): a stage move's signature counts for a day",
            s.signed_at_ms
        ));
    }
    let mut keyed = signer.uri().into_bytes();
    keyed.push(0);
    keyed.extend_from_slice(&message);
    Ok(CountedSignature {
        signer,
        key: crate::sha256(&keyed),
    })
}

#[cfg(test)]
mod tests {
    use tutela_policy::stage::SignedMove;
    use tutela_protocol::identity::Principal;
    use tutela_protocol::pki::{
        CertificateAuthority, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity,
    };
    use tutela_protocol::release::{MoveKind, Stage, VersionMove};

    use crate::authority::{AuthorityError, AuthorityRules, OfficerTrust, TrailState};
    use crate::event::{Action, Chain, Event, Timestamp};
    use crate::payload::{
        ActionPayload, ModelRegistered, ModelStageChanged, PolicyLoaded, RoundCompleted,
        StageSignature,
    };

    const DIGEST: &str = "abababababababababababababababababababababababababababababababab";

    fn person(ca: &CertificateAuthority, who: Principal) -> IssuedCertificate {
        ca.issue(&who, &LeafOptions::new(Validity::days_from_now(10)))
            .unwrap()
    }

    fn canary() -> Vec<VersionMove> {
        vec![VersionMove {
            version: 1,
            model_digest: DIGEST.into(),
            from: Stage::Candidate,
            to: Stage::Canary,
        }]
    }

    /// The policy the tests' coordinator decides under: the operator moves into canary and
    /// retired; production also needs an officer of every contributing site.
    const MODEL: &str = include_str!("../../deploy/policy/model.conf");
    const POLICY: &str = "g, spiffe://c/operator/op, operator, consortium\n\
        g, spiffe://c/site/a/user/alice, compliance_officer, site:a\n\
        p3, canary, consortium, operator, 1\n\
        p3, production, consortium, operator, 1\n\
        p3, production, site:*, compliance_officer, 1\n\
        p3, retired, consortium, operator, 1\n";

    fn policy_loaded(policy: &str) -> PolicyLoaded {
        PolicyLoaded {
            digest: tutela_policy::PolicyDigest::of(MODEL.as_bytes(), policy.as_bytes()).to_hex(),
            model: MODEL.into(),
            policy: policy.into(),
        }
    }

    fn signed_payload(by: &[&IssuedCertificate], moves: Vec<VersionMove>) -> ModelStageChanged {
        signed_move(
            by,
            MoveKind::Promote,
            moves,
            "canary first",
            Timestamp::now().unix_millis(),
        )
    }

    fn signed_move(
        by: &[&IssuedCertificate],
        kind: MoveKind,
        moves: Vec<VersionMove>,
        reason: &str,
        now: i64,
    ) -> ModelStageChanged {
        let signatures = by
            .iter()
            .map(|who| {
                let m = SignedMove::sign(
                    &who.key_pem,
                    &who.cert_pem,
                    "cancer",
                    kind,
                    moves.clone(),
                    reason,
                    now,
                )
                .unwrap();
                StageSignature {
                    signer: String::new(),
                    certificate: who.cert_pem.clone(),
                    signature: hex::encode(&m.signature),
                    signed_at_ms: now,
                }
            })
            .collect();
        ModelStageChanged {
            name: "cancer".into(),
            kind,
            moves,
            reason: reason.into(),
            move_no: 1,
            signatures,
            quorum: vec![],
            policy_digest: policy_loaded(POLICY).digest,
        }
    }

    struct Trail {
        chain: Chain,
        state: TrailState,
        rules: AuthorityRules,
        trust: OfficerTrust,
    }

    impl Trail {
        fn new(ca: &CertificateAuthority) -> Trail {
            Trail {
                chain: Chain::new(),
                state: TrailState::new(),
                rules: AuthorityRules::for_log("spiffe://c/audit", &[]).unwrap(),
                trust: OfficerTrust::ca_from_pem(&ca.cert_pem()).unwrap(),
            }
        }

        fn append(
            &mut self,
            actor: &str,
            action: Action,
            subject: &str,
            payload: serde_json::Value,
        ) -> Result<Event, AuthorityError> {
            let mut probe = self.chain.clone();
            let e = probe
                .append(Timestamp::now(), actor, action, subject, payload)
                .unwrap();
            self.state
                .check_and_apply(&self.rules, &self.trust, &e)
                .map_err(|v| *v.error)?;
            self.chain = probe;
            Ok(e)
        }

        fn register(&mut self) -> Result<Event, AuthorityError> {
            self.register_version(1, DIGEST, "j")
        }

        fn register_version(
            &mut self,
            version: u64,
            digest: &str,
            job: &str,
        ) -> Result<Event, AuthorityError> {
            let p = ModelRegistered {
                name: "cancer".into(),
                version,
                model_digest: digest.into(),
                job: job.into(),
                spec_digest: "cd".repeat(32),
            };
            self.append(
                COORDINATOR,
                Action::ModelRegistered,
                &p.subject(),
                p.to_value(),
            )
        }
    }

    impl Trail {
        fn load_policy(&mut self, policy: &str) -> Result<Event, AuthorityError> {
            let p = policy_loaded(policy);
            let subject = p.digest.clone();
            self.append(COORDINATOR, Action::PolicyLoaded, &subject, p.to_value())
        }

        fn round(&mut self, job: &str, sites: &[&str]) {
            let p = RoundCompleted {
                round: 1,
                attempt: 1,
                participants: sites.iter().map(|s| s.to_string()).collect(),
                update_digests: Default::default(),
                metrics: Default::default(),
                model_id: None,
                aggregation: None,
            };
            self.append(COORDINATOR, Action::RoundCompleted, job, p.to_value())
                .unwrap();
        }

        fn moved(&mut self, p: &ModelStageChanged) -> Result<Event, AuthorityError> {
            self.append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                p.to_value(),
            )
        }
    }

    fn mv(version: u64, digest: &str, from: Stage, to: Stage) -> VersionMove {
        VersionMove {
            version,
            model_digest: digest.into(),
            from,
            to,
        }
    }

    /// The known gap of the registry's first version: readers took the coordinator's word that
    /// the signers held the roles the policy asks for. Now every reader re-checks them against
    /// the policy text the trail records, over the sites the trail shows in the model's rounds,
    /// and refuses a signature older than a day or one that already counted.
    #[test]
    fn stage_moves_are_re_checked_against_the_recorded_policy_and_signatures_count_once() {
        let ca =
            CertificateAuthority::create("c", KeyAlgorithm::EcdsaP256, Validity::days_from_now(10))
                .unwrap();
        let op = person(&ca, Principal::Operator { name: "op".into() });
        let mallory = person(
            &ca,
            Principal::Operator {
                name: "mallory".into(),
            },
        );
        let alice = person(
            &ca,
            Principal::User {
                site: "a".into(),
                name: "alice".into(),
            },
        );
        let mut t = Trail::new(&ca);
        t.register().unwrap();
        t.round("j", &["a"]);
        let to_canary = signed_payload(&[&op], canary());

        // No policy.loaded names the event's policy: nothing to re-check the roles against.
        let e = t.moved(&to_canary).unwrap_err();
        assert!(e.to_string().contains("no policy.loaded"), "{e}");
        // A policy whose text is not what its digest says; one recorded by someone else.
        let mut lying = policy_loaded(POLICY);
        lying
            .policy
            .push_str("g, spiffe://c/operator/mallory, operator, consortium\n");
        let e = t
            .append(
                COORDINATOR,
                Action::PolicyLoaded,
                &lying.digest.clone(),
                lying.to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("not the"), "{e}");
        let e = t
            .append(
                "spiffe://c/operator/op",
                Action::PolicyLoaded,
                &policy_loaded(POLICY).digest,
                policy_loaded(POLICY).to_value(),
            )
            .unwrap_err();
        assert!(matches!(e, AuthorityError::NotAllowed { .. }), "{e}");
        t.load_policy(POLICY).unwrap();

        // An operator the policy does not name, a site officer where the operator is asked.
        let e = t.moved(&signed_payload(&[&mallory], canary())).unwrap_err();
        assert!(
            e.to_string().contains("mallory holds none of the roles"),
            "{e}"
        );
        let e = t.moved(&signed_payload(&[&alice], canary())).unwrap_err();
        assert!(
            e.to_string().contains("alice holds none of the roles"),
            "{e}"
        );
        // A signature older than a day (the coordinator would not have counted it).
        let old = Timestamp::now().unix_millis() - 2 * 24 * 3600 * 1000;
        let e = t
            .moved(&signed_move(
                &[&op],
                MoveKind::Promote,
                canary(),
                "canary first",
                old,
            ))
            .unwrap_err();
        assert!(e.to_string().contains("within the day"), "{e}");
        t.moved(&to_canary).unwrap();

        // Into production: the operator alone misses site a's officer (a contributed to j).
        let to_prod = vec![mv(1, DIGEST, Stage::Canary, Stage::Production)];
        let now = Timestamp::now().unix_millis();
        let e = t
            .moved(&signed_move(
                &[&op],
                MoveKind::Promote,
                to_prod.clone(),
                "go",
                now,
            ))
            .unwrap_err();
        assert!(e.to_string().contains("site:a"), "{e}");
        t.moved(&signed_move(
            &[&op, &alice],
            MoveKind::Promote,
            to_prod,
            "go",
            now,
        ))
        .unwrap();

        // v2 of job j2 (site a too) through canary into production, v1 retired.
        let d2 = "cd".repeat(32);
        t.register_version(2, &d2, "j2").unwrap();
        t.round("j2", &["a"]);
        t.moved(&signed_move(
            &[&op],
            MoveKind::Promote,
            vec![mv(2, &d2, Stage::Candidate, Stage::Canary)],
            "v2 canary",
            now,
        ))
        .unwrap();
        // Into production without retiring v1: two production versions.
        let e = t
            .moved(&signed_move(
                &[&op, &alice],
                MoveKind::Promote,
                vec![mv(2, &d2, Stage::Canary, Stage::Production)],
                "v2 live",
                now,
            ))
            .unwrap_err();
        assert!(e.to_string().contains("2 production versions"), "{e}");
        t.moved(&signed_move(
            &[&op, &alice],
            MoveKind::Promote,
            vec![
                mv(2, &d2, Stage::Canary, Stage::Production),
                mv(1, DIGEST, Stage::Production, Stage::Retired),
            ],
            "v2 live",
            now,
        ))
        .unwrap();
        // v3, retired straight from candidate, was never in production: no rollback restores it.
        let d3 = "ef".repeat(32);
        t.register_version(3, &d3, "j3").unwrap();
        t.round("j3", &["a"]);
        t.moved(&signed_move(
            &[&op],
            MoveKind::Promote,
            vec![mv(3, &d3, Stage::Candidate, Stage::Retired)],
            "not needed",
            now,
        ))
        .unwrap();
        let e = t
            .moved(&signed_move(
                &[&op, &alice],
                MoveKind::Rollback,
                vec![
                    mv(2, &d2, Stage::Production, Stage::Retired),
                    mv(3, &d3, Stage::Retired, Stage::Production),
                ],
                "drift",
                now,
            ))
            .unwrap_err();
        assert!(e.to_string().contains("left production last"), "{e}");
        // Roll back and forth: the third rollback is the first one's very moves and reason.
        let back = vec![
            mv(2, &d2, Stage::Production, Stage::Retired),
            mv(1, DIGEST, Stage::Retired, Stage::Production),
        ];
        let forth = vec![
            mv(1, DIGEST, Stage::Production, Stage::Retired),
            mv(2, &d2, Stage::Retired, Stage::Production),
        ];
        let first_rollback = signed_move(
            &[&op, &alice],
            MoveKind::Rollback,
            back.clone(),
            "drift",
            now,
        );
        t.moved(&first_rollback).unwrap();
        t.moved(&signed_move(
            &[&op, &alice],
            MoveKind::Rollback,
            forth,
            "drift",
            now,
        ))
        .unwrap();
        let e = t.moved(&first_rollback).unwrap_err();
        assert!(e.to_string().contains("already counted"), "{e}");
        // Signed again, it is a new decision.
        t.moved(&signed_move(
            &[&op, &alice],
            MoveKind::Rollback,
            back,
            "drift",
            now + 1,
        ))
        .unwrap();
    }

    const COORDINATOR: &str = "spiffe://c/coordinator";

    #[test]
    fn a_signed_move_of_a_registered_version_is_believed_and_a_forged_one_is_not() {
        let ca =
            CertificateAuthority::create("c", KeyAlgorithm::EcdsaP256, Validity::days_from_now(10))
                .unwrap();
        let op = person(&ca, Principal::Operator { name: "op".into() });
        let node = person(&ca, Principal::Node { site: "a".into() });
        let mut t = Trail::new(&ca);
        t.load_policy(POLICY).unwrap();

        // A move of a version the trail never registered.
        let good = signed_payload(&[&op], canary());
        let e = t
            .append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                good.to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("not a registered version"), "{e}");

        t.register().unwrap();
        // Registered twice: refused.
        assert!(
            t.register()
                .unwrap_err()
                .to_string()
                .contains("already registered")
        );
        // Only the coordinator relays a move.
        let e = t
            .append(
                "spiffe://c/operator/op",
                Action::ModelStageChanged,
                "cancer",
                good.to_value(),
            )
            .unwrap_err();
        assert!(matches!(e, AuthorityError::NotAllowed { .. }), "{e}");
        // A changed reason breaks the signature.
        let mut forged = good.clone();
        forged.reason = "nobody objected".into();
        let e = t
            .append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                forged.to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        // A node's signature does not count: nodes are not people.
        let by_node = signed_payload(&[&node], canary());
        let e = t
            .append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                by_node.to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("not a person"), "{e}");
        // A certificate of another CA.
        let other =
            CertificateAuthority::create("c", KeyAlgorithm::EcdsaP256, Validity::days_from_now(10))
                .unwrap();
        let fake_op = person(&other, Principal::Operator { name: "op".into() });
        let e = t
            .append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                signed_payload(&[&fake_op], canary()).to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("consortium CA"), "{e}");

        // The genuine one is believed, and moves the version.
        t.append(
            COORDINATOR,
            Action::ModelStageChanged,
            "cancer",
            good.to_value(),
        )
        .unwrap();
        let (_, history) = t.state.stage_history("cancer", 1).unwrap();
        assert_eq!(history.last().unwrap().1, Stage::Canary);
        // The same move again starts from where the trail no longer has the version.
        let e = t
            .append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                good.to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("is canary, not candidate"), "{e}");
        // Skipping canary is not a move at all.
        let skip = signed_payload(
            &[&op],
            vec![VersionMove {
                version: 1,
                model_digest: DIGEST.into(),
                from: Stage::Canary,
                to: Stage::Candidate,
            }],
        );
        let e = t
            .append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                skip.to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("not allowed"), "{e}");
        // A signer twice is one signer.
        let twice = signed_payload(
            &[&op, &op],
            vec![VersionMove {
                version: 1,
                model_digest: DIGEST.into(),
                from: Stage::Canary,
                to: Stage::Production,
            }],
        );
        let e = t
            .append(
                COORDINATOR,
                Action::ModelStageChanged,
                "cancer",
                twice.to_value(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
