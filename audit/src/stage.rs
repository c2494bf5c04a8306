//! Re-checking a `model.stage_changed` event's signatures, at append and by every reader.
//!
//! Each [`StageSignature`] must carry a certificate that names a person of the consortium (an
//! operator or a site user; services and nodes do not sign stage moves), chains to the consortium
//! CA (the [`ChainCheck`] the caller passes: the live CA at append, the CA as of the event's time
//! when the stored trail is re-checked), and whose key verifies the signature over
//! `tutela_protocol::release::stage_move_message` of the payload's name, kind, moves and reason
//! and the signature's own time. No signer may count twice. Whether the signers held the roles
//! the policy's stage rules ask for is the coordinator's check when it met the quorum (the policy
//! is not in the trail; the payload names the policy digest and the requirements each met).

use rustls_pki_types::CertificateDer;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::release::stage_move_message;

use crate::approval::{ChainCheck, pem_to_der, verify_signature};
use crate::payload::{ModelStageChanged, StageSignature};

/// Verifies every signature of `payload`; the signers, in order.
pub fn verify_stage_signatures(
    payload: &ModelStageChanged,
    chain: Option<&ChainCheck>,
) -> Result<Vec<Identity>, String> {
    if payload.signatures.is_empty() {
        return Err("it carries no signature".to_string());
    }
    let mut signers: Vec<Identity> = Vec::new();
    for (i, s) in payload.signatures.iter().enumerate() {
        let signer =
            verify_one(payload, s, chain).map_err(|e| format!("signature {}: {e}", i + 1))?;
        if signers.contains(&signer) {
            return Err(format!("{signer} signed it twice"));
        }
        signers.push(signer);
    }
    Ok(signers)
}

fn verify_one(
    payload: &ModelStageChanged,
    s: &StageSignature,
    chain: Option<&ChainCheck>,
) -> Result<Identity, String> {
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
    Ok(signer)
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
    use crate::payload::{ActionPayload, ModelRegistered, ModelStageChanged, StageSignature};

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

    fn signed_payload(by: &[&IssuedCertificate], moves: Vec<VersionMove>) -> ModelStageChanged {
        let now = Timestamp::now().unix_millis();
        let signatures = by
            .iter()
            .map(|who| {
                let m = SignedMove::sign(
                    &who.key_pem,
                    &who.cert_pem,
                    "cancer",
                    MoveKind::Promote,
                    moves.clone(),
                    "canary first",
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
            kind: MoveKind::Promote,
            moves,
            reason: "canary first".into(),
            move_no: 1,
            signatures,
            quorum: vec![],
            policy_digest: "00".repeat(32),
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
            let p = ModelRegistered {
                name: "cancer".into(),
                version: 1,
                model_digest: DIGEST.into(),
                job: "j".into(),
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

    const COORDINATOR: &str = "spiffe://c/coordinator";

    #[test]
    fn a_signed_move_of_a_registered_version_is_believed_and_a_forged_one_is_not() {
        let ca =
            CertificateAuthority::create("c", KeyAlgorithm::EcdsaP256, Validity::days_from_now(10))
                .unwrap();
        let op = person(&ca, Principal::Operator { name: "op".into() });
        let node = person(&ca, Principal::Node { site: "a".into() });
        let mut t = Trail::new(&ca);

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
