//! The registry part of a model's lineage: the names and versions a model digest was registered
//! as, and each version's stage history with who moved it and why (`model.registered`,
//! `model.stage_changed`), from events the authority check believed (every stage move's
//! signatures re-verified, every move starting where the trail left the version).

use serde::Serialize;

use crate::event::{Action, Event};
use crate::payload::{ActionPayload, ModelRegistered, ModelStageChanged};

/// One move of a version's stage.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StageRecord {
    pub seq: u64,
    pub timestamp: String,
    /// `promote` or `rollback`.
    pub kind: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    /// The signers, as their certificates name them (the signatures verified).
    pub signers: Vec<String>,
    pub policy_digest: String,
}

/// A registry version a model digest was registered as, and its stage history.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RegistryEntry {
    pub name: String,
    pub version: u64,
    pub job: String,
    pub registered_seq: u64,
    /// The stage now, as the trail says (`candidate` until a move).
    pub stage: String,
    pub history: Vec<StageRecord>,
}

/// The registry entries of `model_digest` in `events` (believed ones, in seq order).
pub fn registry_entries(events: &[&Event], model_digest: &str) -> Vec<RegistryEntry> {
    let mut entries: Vec<RegistryEntry> = Vec::new();
    for e in events {
        match e.action {
            Action::ModelRegistered => {
                if let Ok(p) = ModelRegistered::from_event(e)
                    && p.model_digest == model_digest
                {
                    entries.push(RegistryEntry {
                        name: p.name,
                        version: p.version,
                        job: p.job,
                        registered_seq: e.seq,
                        stage: "candidate".into(),
                        history: Vec::new(),
                    });
                }
            }
            Action::ModelStageChanged => {
                let Ok(p) = ModelStageChanged::from_event(e) else {
                    continue;
                };
                for m in &p.moves {
                    let Some(entry) = entries
                        .iter_mut()
                        .find(|r| r.name == p.name && r.version == m.version)
                    else {
                        continue;
                    };
                    entry.stage = m.to.to_string();
                    entry.history.push(StageRecord {
                        seq: e.seq,
                        timestamp: e.timestamp.to_string(),
                        kind: p.kind.to_string(),
                        from: m.from.to_string(),
                        to: m.to.to_string(),
                        reason: p.reason.clone(),
                        signers: p
                            .signatures
                            .iter()
                            .filter_map(|s| super::officer_of(&s.certificate))
                            .collect(),
                        policy_digest: p.policy_digest.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    entries
}
