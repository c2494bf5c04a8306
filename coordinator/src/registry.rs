//! The model registry on the coordinator: names and versions of published models, their stages,
//! and the signed moves between stages (`tutela_protocol::release`).
//!
//! - **Publication** ([`register_published`]): a completed job's model becomes the next version
//!   of its registry name (the spec's `[publish] name`, or the job's `name`) as a candidate, in
//!   the store, then `model.registered` in the audit trail (looked for first, so a resumed job
//!   records it once).
//! - **Moves** ([`move_stage`]): a principal signs a promotion or a rollback; the coordinator
//!   verifies the signature (chain to the consortium CA, CRLs, freshness), that the signer is
//!   the caller, that the move is exactly what the registry's state makes of it now (typed
//!   stages: an invalid transition is refused with the reason), and that the signer holds a role
//!   one of the policy's stage rules (`p3`) asks for; a signer who does not is refused with
//!   PERMISSION_DENIED, which the enforcement layer records in the trail as a denial. The
//!   signature waits in the store until the rules' quorum is met (the policy's quorum machinery,
//!   `tutela_policy::quorum::evaluate`, over the sites that contributed to the moved versions);
//!   then the move is recorded in the audit trail (`model.stage_changed` with every signature;
//!   fail closed: no record, no move) and applied to the store in one transaction.
//! - **Consumers** ([`version_at`]): the latest version of a name at a stage, whose file the
//!   `Registry.FetchModel` RPC streams.
//!
//! Moves are applied one at a time (a lock), so the move number in the trail and the stages
//! checked against are those the store then holds.

use std::collections::BTreeMap;

use tutela_audit::payload::{
    ActionPayload, ModelRegistered, ModelStageChanged, PolicyLoaded, StageSignature,
};
use tutela_policy::stage::{SignedMove, evaluate_move, wanted_roles};
use tutela_protocol::identity::Identity;
use tutela_protocol::release::{
    MoveKind, PlanError, Stage, VersionMove, check_move, plan_promote, plan_rollback,
};

use crate::engine::Engine;
use crate::job::{JobId, JobSpec};
use crate::store::{PendingSignature, RegisteredVersion, StageMoveRecord, StoreError};

/// Why a registry request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("no model is registered under the name {0:?}")]
    UnknownName(String),
    #[error("{name} has no version at stage {stage}")]
    NoVersionAt { name: String, stage: Stage },
    /// The signature, the signer or the signer's roles: a principal the policy does not allow.
    #[error("stage move refused: {0}")]
    NotAllowed(String),
    /// The move itself: an invalid transition, or stages changed since it was signed.
    #[error("stage move refused: {0}")]
    Invalid(String),
    #[error(
        "this coordinator runs without a [policy]: stage moves need the policy's stage rules (p3)"
    )]
    NoPolicy,
    #[error("refused: the audit service did not record the stage move, so it was not applied: {0}")]
    Audit(String),
}

impl From<PlanError> for RegistryError {
    fn from(e: PlanError) -> Self {
        RegistryError::Invalid(e.to_string())
    }
}

/// What a signed move came to.
#[derive(Clone, Debug)]
pub struct MoveOutcome {
    pub applied: bool,
    /// `signer (role of domain)` for every signature that counts.
    pub gathered: Vec<String>,
    pub missing: Vec<String>,
}

/// A move waiting for signatures, as `GetModel` shows it.
#[derive(Clone, Debug)]
pub struct PendingMove {
    pub kind: MoveKind,
    pub moves: Vec<VersionMove>,
    pub reason: String,
    pub signers: Vec<String>,
    pub missing: Vec<String>,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Registers `job_id`'s published model (`model_id`) as the next version of the spec's
/// registry name and records `model.registered` (once: looked for first). A failure to register
/// does not unpublish the model; it is logged at ERROR and the job completes.
pub async fn register_published(engine: &Engine, job_id: &JobId, spec: &JobSpec, model_id: &str) {
    let name = spec.registry_name();
    let version = match engine.store.register_version(name, model_id, job_id).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(job = %job_id, model = %model_id, name, error = %e, "the published model could not be registered");
            return;
        }
    };
    let payload = ModelRegistered {
        name: version.name.clone(),
        version: version.version,
        model_digest: version.model_digest.clone(),
        job: job_id.to_string(),
        spec_digest: spec.digest().to_hex(),
    };
    engine
        .trail()
        .record_payload_once(&payload.subject(), &payload, true, |_| true)
        .await;
    tracing::info!(job = %job_id, name = %version.name, version = version.version, model = %model_id, "model registered as a candidate");
}

/// The identity of the move's content (what every signer signs besides the time): its kind,
/// moves and reason.
fn move_key(m: &SignedMove) -> String {
    let text = format!(
        "{}\n{}\n{}",
        m.kind,
        serde_json::to_string(&m.moves).unwrap_or_default(),
        m.reason
    );
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// The sites that contributed to `versions`' models (the rounds' accepted updates of the jobs
/// that published them): the `site:*` of a stage rule.
async fn contributing_sites(
    engine: &Engine,
    versions: &[&RegisteredVersion],
) -> Result<Vec<String>, RegistryError> {
    let mut sites = std::collections::BTreeSet::new();
    for v in versions {
        let Ok(job) = v.job_id.parse::<JobId>() else {
            continue;
        };
        for round in engine.store.rounds(&job).await? {
            sites.extend(round.record.accepted.into_iter().map(|u| u.site));
        }
    }
    Ok(sites.into_iter().collect())
}

/// The moves the registry's current state makes of what `signed` asks for.
fn plan(
    signed: &SignedMove,
    versions: &[RegisteredVersion],
) -> Result<Vec<VersionMove>, RegistryError> {
    let states: Vec<_> = versions.iter().map(RegisteredVersion::state).collect();
    match signed.kind {
        MoveKind::Promote => {
            let first = signed.moves.first().ok_or_else(|| {
                RegistryError::Invalid("the signed promotion moves no version".into())
            })?;
            Ok(plan_promote(
                &signed.name,
                &states,
                first.version,
                first.to,
            )?)
        }
        MoveKind::Rollback => Ok(plan_rollback(&signed.name, &states)?),
    }
}

/// A principal's signed move (see the module documentation); `caller` is the certificate's
/// identity of the RPC.
pub async fn move_stage(
    engine: &Engine,
    caller: &Identity,
    signed: SignedMove,
) -> Result<MoveOutcome, RegistryError> {
    let gate = engine.approvals.get().ok_or(RegistryError::NoPolicy)?;
    // One snapshot of the policy decides the whole move, and is what the trail records and its
    // readers re-check the signers against (a reload during the move is refused below).
    let policy = gate.authorizer.text();
    let now = now_ms();
    let verifier = gate.verifier().map_err(RegistryError::NotAllowed)?;
    let signer = verifier
        .verify_stage_move(&signed, now)
        .map_err(|e| RegistryError::NotAllowed(e.to_string()))?;
    if signer != *caller {
        return Err(RegistryError::NotAllowed(format!(
            "the move is signed by {signer}, but {caller} sent it: principals submit their own signatures"
        )));
    }
    let _one_at_a_time = engine.registry_lock.lock().await;
    let name = signed.name.clone();
    let versions = engine.store.versions(&name).await?;
    if versions.is_empty() {
        return Err(RegistryError::UnknownName(name));
    }
    let planned = plan(&signed, &versions)?;
    if planned != signed.moves {
        let show = |m: &[VersionMove]| {
            m.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(RegistryError::Invalid(format!(
            "the signed move ({}) is not what the registry makes of it now ({}): sign it again",
            show(&signed.moves),
            show(&planned)
        )));
    }
    check_move(signed.kind, &planned, |version, digest| {
        versions
            .iter()
            .find(|v| v.version == version && v.model_digest == digest)
            .map(|v| v.stage)
    })
    .map_err(RegistryError::Invalid)?;
    let moved: Vec<&RegisteredVersion> = versions
        .iter()
        .filter(|v| planned.iter().any(|m| m.version == v.version))
        .collect();
    let sites = contributing_sites(engine, &moved).await?;
    let rules = gate.authorizer.stage_rules();
    let wanted = wanted_roles(&rules, &planned, &sites);
    let signer_uri = signer.uri();
    if !wanted
        .iter()
        .any(|(role, domain)| gate.authorizer.has_role(&signer_uri, role, domain))
    {
        let asked: Vec<String> = wanted.iter().map(|(r, d)| format!("{r} of {d}")).collect();
        return Err(RegistryError::NotAllowed(format!(
            "{signer_uri} holds none of the roles whose signature this move needs ({}) [policy {}]",
            if asked.is_empty() {
                "the policy has no stage rule for it".to_string()
            } else {
                asked.join(", ")
            },
            gate.authorizer.digest()
        )));
    }
    let key = move_key(&signed);
    engine
        .store
        .record_pending_signature(&key, &signer_uri, &signed)
        .await?;
    // Every signature of this same move that still verifies (a day's validity, the CRL now).
    let mut counting: Vec<PendingSignature> = Vec::new();
    for p in engine.store.pending_signatures(&name).await? {
        if p.move_key != key {
            continue;
        }
        match verifier.verify_stage_move(&p.signed, now) {
            Ok(s) if s.uri() == p.signer => counting.push(p),
            Ok(_) => {}
            Err(e) => {
                tracing::info!(name = %name, signer = %p.signer, reason = %e, "a pending stage signature no longer counts")
            }
        }
    }
    // A pending signature counts only while its signer still holds a role the move needs (the
    // policy may have changed since it was given): readers refuse a move with any other.
    counting.retain(|p| {
        wanted
            .iter()
            .any(|(role, domain)| gate.authorizer.has_role(&p.signer, role, domain))
    });
    let signers: Vec<String> = counting.iter().map(|p| p.signer.clone()).collect();
    let status = evaluate_move(&rules, &planned, &sites, &signers, |s, role, domain| {
        gate.authorizer.has_role(s, role, domain)
    });
    if !status.is_met() {
        tracing::info!(name = %name, kind = %signed.kind, signer = %signer_uri, missing = ?status.missing(), "stage move signed; waiting for its quorum");
        return Ok(MoveOutcome {
            applied: false,
            gathered: status.gathered(),
            missing: status.missing(),
        });
    }
    if gate.authorizer.digest() != policy.digest {
        return Err(RegistryError::Invalid(format!(
            "the policy was reloaded while the move was checked ({} -> {}): sign it again",
            policy.digest,
            gate.authorizer.digest()
        )));
    }
    // The policy's text goes into the trail (once per digest) before the first move decided
    // under it, so that every reader re-checks the signers' roles against it (fail closed).
    let loaded = PolicyLoaded::of(&policy);
    engine
        .trail()
        .record_payload_unless_present(&loaded.digest, &loaded, |e| {
            PolicyLoaded::from_event(e).is_ok_and(|p| p == loaded)
        })
        .await
        .map_err(|e| RegistryError::Audit(e.to_string()))?;
    let move_no = engine.store.next_move_no(&name).await?;
    let payload = ModelStageChanged {
        name: name.clone(),
        kind: signed.kind,
        moves: planned.clone(),
        reason: signed.reason.clone(),
        move_no,
        signatures: counting
            .iter()
            .map(|p| StageSignature {
                signer: p.signer.clone(),
                certificate: p
                    .signed
                    .signer_chain_der
                    .first()
                    .map(|der| tutela_protocol::pki::pem_encode("CERTIFICATE", der))
                    .unwrap_or_default(),
                signature: hex::encode(&p.signed.signature),
                signed_at_ms: p.signed.signed_at_ms,
            })
            .collect(),
        quorum: status.gathered(),
        policy_digest: policy.digest.to_hex(),
    };
    // Fail closed: a move the audit trail did not take is not applied.
    engine
        .trail()
        .record_payload(&name, &payload)
        .await
        .map_err(|e| RegistryError::Audit(e.to_string()))?;
    let record = StageMoveRecord {
        name: name.clone(),
        move_no,
        kind: signed.kind,
        moves: planned,
        reason: signed.reason.clone(),
        signers,
        moved_at_ms: now,
    };
    if let Err(e) = engine.store.apply_stage_move(&record).await {
        // Only another writer of the same database (or the database failing) gets here: the
        // trail then holds a move the store does not; say so loudly.
        tracing::error!(name = %name, move_no, error = %e, "stage move recorded in the audit trail but NOT applied to the store");
        return Err(e.into());
    }
    tracing::info!(target: "tutela::audit", event = "model.stage_changed", name = %name, move_no, kind = %record.kind, moves = ?record.moves.iter().map(ToString::to_string).collect::<Vec<_>>(), "stage move applied");
    Ok(MoveOutcome {
        applied: true,
        gathered: status.gathered(),
        missing: Vec::new(),
    })
}

/// The moves of `name` waiting for signatures, with who signed and what is missing.
pub async fn pending_moves(engine: &Engine, name: &str) -> Result<Vec<PendingMove>, RegistryError> {
    let mut by_key: BTreeMap<String, Vec<PendingSignature>> = BTreeMap::new();
    for p in engine.store.pending_signatures(name).await? {
        by_key.entry(p.move_key.clone()).or_default().push(p);
    }
    let versions = engine.store.versions(name).await?;
    let mut out = Vec::new();
    for (_, sigs) in by_key {
        let Some(first) = sigs.first() else { continue };
        let signers: Vec<String> = sigs.iter().map(|p| p.signer.clone()).collect();
        let missing = match engine.approvals.get() {
            Some(gate) => {
                let moved: Vec<&RegisteredVersion> = versions
                    .iter()
                    .filter(|v| first.signed.moves.iter().any(|m| m.version == v.version))
                    .collect();
                let sites = contributing_sites(engine, &moved).await?;
                evaluate_move(
                    &gate.authorizer.stage_rules(),
                    &first.signed.moves,
                    &sites,
                    &signers,
                    |s, role, domain| gate.authorizer.has_role(s, role, domain),
                )
                .missing()
            }
            None => vec!["this coordinator runs without a [policy]".to_string()],
        };
        out.push(PendingMove {
            kind: first.signed.kind,
            moves: first.signed.moves.clone(),
            reason: first.signed.reason.clone(),
            signers,
            missing,
        });
    }
    Ok(out)
}

/// The version of `name` a consumer asking for `stage` gets: the production version, or the
/// latest version at another stage.
pub async fn version_at(
    engine: &Engine,
    name: &str,
    stage: Stage,
) -> Result<RegisteredVersion, RegistryError> {
    let versions = engine.store.versions(name).await?;
    if versions.is_empty() {
        return Err(RegistryError::UnknownName(name.to_string()));
    }
    versions
        .into_iter()
        .rev()
        .find(|v| v.stage == stage)
        .ok_or_else(|| RegistryError::NoVersionAt {
            name: name.to_string(),
            stage,
        })
}
