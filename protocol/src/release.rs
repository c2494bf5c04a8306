//! Staged release of published models: the registry's names, versions and stages, the moves
//! between stages, and the message a principal signs to move a version.
//!
//! Every published model gets a registry name (the job spec's `[publish] name`, or the job's
//! `name`) and the next version of that name. A version starts as a [`Stage::Candidate`] and moves
//! by signed moves only:
//!
//! ```text
//! candidate ──► canary ──► production ──► retired
//!     │            │                        ▲  │ (rollback only: back to production)
//!     └────────────┴────────────────────────┘  ▼
//! ```
//!
//! A name has at most one production version: promoting another one to production retires the
//! current one in the same move. A rollback retires the current production version and restores
//! the one that was production before it (the version that left production last).
//!
//! It lives in `protocol` because three parties read it: the CLI plans and signs a move, the
//! coordinator plans it again from its own state and checks that the signers signed exactly that,
//! and the audit trail's readers re-check every recorded move against the stage history the trail
//! itself shows ([`check_move`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a version of a registered model stands. The transitions are [`Stage::can_move`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Published by a completed job, not served to anyone yet.
    Candidate,
    /// Served to a few consumers to watch it before production.
    Canary,
    /// The version consumers get when they ask for the name.
    Production,
    /// No longer served; only a rollback brings a retired version back (to production).
    Retired,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Candidate,
        Stage::Canary,
        Stage::Production,
        Stage::Retired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Candidate => "candidate",
            Stage::Canary => "canary",
            Stage::Production => "production",
            Stage::Retired => "retired",
        }
    }

    /// Whether a move of `kind` may take a version from `self` to `to`; the reason if not.
    pub fn can_move(self, to: Stage, kind: MoveKind) -> Result<(), IllegalMove> {
        use Stage::*;
        let ok = match kind {
            MoveKind::Promote => matches!(
                (self, to),
                (Candidate, Canary)
                    | (Canary, Production)
                    | (Candidate | Canary | Production, Retired)
            ),
            MoveKind::Rollback => {
                matches!((self, to), (Production, Retired) | (Retired, Production))
            }
        };
        if ok {
            return Ok(());
        }
        let why = match (self, to, kind) {
            (a, b, _) if a == b => format!("it is already {a}"),
            (Candidate, Production, MoveKind::Promote) => {
                "a candidate goes to canary before production".to_string()
            }
            (Retired, _, MoveKind::Promote) => {
                "a retired version comes back only by a rollback, to production".to_string()
            }
            (_, Candidate, _) => "no version goes back to candidate".to_string(),
            (Production, Canary, _) => {
                "production is left by retiring or by a rollback, not back to canary".to_string()
            }
            (_, _, MoveKind::Rollback) => {
                "a rollback moves only production to retired and retired to production".to_string()
            }
            _ => "not a move of the registry".to_string(),
        };
        Err(IllegalMove {
            from: self,
            to,
            why,
        })
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage name outside the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a stage: expected candidate, canary, production or retired")]
pub struct UnknownStage(pub String);

impl FromStr for Stage {
    type Err = UnknownStage;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStage(s.to_string()))
    }
}

/// A move the stage machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{from} -> {to} is not allowed: {why}")]
pub struct IllegalMove {
    pub from: Stage,
    pub to: Stage,
    pub why: String,
}

/// What a principal asked for: a promotion (any forward move, retiring included) or a rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveKind {
    Promote,
    Rollback,
}

impl MoveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Promote => "promote",
            MoveKind::Rollback => "rollback",
        }
    }
}

impl fmt::Display for MoveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MoveKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "promote" => Ok(MoveKind::Promote),
            "rollback" => Ok(MoveKind::Rollback),
            other => Err(format!("{other:?} is not promote or rollback")),
        }
    }
}

/// One version's move from one stage to another, with the model it is (the digest is signed, so
/// a signature cannot be carried over to another model registered under the same version).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionMove {
    pub version: u64,
    pub model_digest: String,
    pub from: Stage,
    pub to: Stage,
}

impl fmt::Display for VersionMove {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{} {} -> {}", self.version, self.from, self.to)
    }
}

/// A version as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionState {
    pub version: u64,
    pub model_digest: String,
    pub stage: Stage,
    /// When it last left production, as the name's move number (larger is later); `None` if it
    /// never did. A rollback restores the retired version that left production last.
    pub left_production: Option<u64>,
}

/// Why a move cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{name} has no version {version}")]
    NoSuchVersion { name: String, version: u64 },
    #[error("{name} v{version}: {source}")]
    Illegal {
        name: String,
        version: u64,
        source: IllegalMove,
    },
    #[error("{name} has no production version to roll back")]
    NoProduction { name: String },
    #[error(
        "{name} has no earlier production version to restore: v{current} is the first that was in production"
    )]
    NothingToRestore { name: String, current: u64 },
}

/// The moves of promoting `version` of `name` to `to`: the version's own move, and, into
/// production, the current production version's retirement (a name has one production version).
pub fn plan_promote(
    name: &str,
    versions: &[VersionState],
    version: u64,
    to: Stage,
) -> Result<Vec<VersionMove>, PlanError> {
    let v = versions
        .iter()
        .find(|v| v.version == version)
        .ok_or_else(|| PlanError::NoSuchVersion {
            name: name.to_string(),
            version,
        })?;
    v.stage
        .can_move(to, MoveKind::Promote)
        .map_err(|source| PlanError::Illegal {
            name: name.to_string(),
            version,
            source,
        })?;
    let mut moves = vec![VersionMove {
        version,
        model_digest: v.model_digest.clone(),
        from: v.stage,
        to,
    }];
    if to == Stage::Production {
        moves.extend(
            versions
                .iter()
                .filter(|o| o.stage == Stage::Production && o.version != version)
                .map(|o| VersionMove {
                    version: o.version,
                    model_digest: o.model_digest.clone(),
                    from: Stage::Production,
                    to: Stage::Retired,
                }),
        );
    }
    Ok(moves)
}

/// The moves of rolling `name` back: the production version retired, and the retired version
/// that left production last restored to production.
pub fn plan_rollback(name: &str, versions: &[VersionState]) -> Result<Vec<VersionMove>, PlanError> {
    let current = versions
        .iter()
        .find(|v| v.stage == Stage::Production)
        .ok_or_else(|| PlanError::NoProduction {
            name: name.to_string(),
        })?;
    let previous = versions
        .iter()
        .filter(|v| v.stage == Stage::Retired && v.left_production.is_some())
        .max_by_key(|v| v.left_production)
        .ok_or_else(|| PlanError::NothingToRestore {
            name: name.to_string(),
            current: current.version,
        })?;
    Ok(vec![
        VersionMove {
            version: current.version,
            model_digest: current.model_digest.clone(),
            from: Stage::Production,
            to: Stage::Retired,
        },
        VersionMove {
            version: previous.version,
            model_digest: previous.model_digest.clone(),
            from: Stage::Retired,
            to: Stage::Production,
        },
    ])
}

/// Checks that `moves` is a move of `kind` the stage machine allows, given each version's stage
/// before it (`stage_of(version, digest)`: `None` for a version not registered with that digest).
/// What the coordinator checks before recording a move and every reader of the trail checks again.
pub fn check_move(
    kind: MoveKind,
    moves: &[VersionMove],
    stage_of: impl Fn(u64, &str) -> Option<Stage>,
) -> Result<(), String> {
    if moves.is_empty() {
        return Err("the move moves no version".to_string());
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut into_production = 0;
    for m in moves {
        if !seen.insert(m.version) {
            return Err(format!("v{} is moved twice", m.version));
        }
        let Some(now) = stage_of(m.version, &m.model_digest) else {
            return Err(format!(
                "v{} with model {} is not a registered version",
                m.version, m.model_digest
            ));
        };
        if now != m.from {
            return Err(format!(
                "v{} is {now}, not {} as the move says",
                m.version, m.from
            ));
        }
        m.from
            .can_move(m.to, kind)
            .map_err(|e| format!("v{}: {e}", m.version))?;
        if m.to == Stage::Production {
            into_production += 1;
        }
    }
    if into_production > 1 {
        return Err("the move puts more than one version into production".to_string());
    }
    if kind == MoveKind::Rollback
        && !(moves.len() == 2
            && moves[0].from == Stage::Production
            && moves[1].to == Stage::Production)
    {
        return Err(
            "a rollback retires the production version and restores one retired version"
                .to_string(),
        );
    }
    Ok(())
}

/// The domain-separation tag of a stage move's signature: neither an approval's
/// ([`crate::job::APPROVAL_CONTEXT`]) nor a rejection's context, nor a prefix of either.
pub const STAGE_MOVE_CONTEXT: &str = "tutela/model-stage/v1";

/// What is wrong with a move's reason, if anything: it is signed and shown to people, so it must
/// say something, be bounded and hold no control character but newlines and tabs (a signed
/// rejection's rule, [`crate::job::rejection_reason_problem`]).
pub fn reason_problem(reason: &str) -> Option<String> {
    crate::job::rejection_reason_problem(reason).map(|p| p.replace("a rejection", "a stage move"))
}

/// The bytes a principal signs to move versions of `name`: the kind, every version's move with
/// its model digest, the reason and the time of signing, one field a line, the reason last and
/// length-prefixed so that no text in it can pass for another field.
pub fn stage_move_message(
    name: &str,
    kind: MoveKind,
    moves: &[VersionMove],
    reason: &str,
    signed_at_ms: i64,
) -> Vec<u8> {
    let mut s = format!("{STAGE_MOVE_CONTEXT}\nname={name}\nkind={kind}\n");
    for m in moves {
        s.push_str(&format!(
            "move=v{} {} {} -> {}\n",
            m.version, m.model_digest, m.from, m.to
        ));
    }
    s.push_str(&format!(
        "signed-at-ms={signed_at_ms}\nreason-bytes={}\nreason={reason}\n",
        reason.len()
    ));
    s.into_bytes()
}

/// A registry name: 1 to 64 letters, digits, `-`, `_` or `.`, starting with a letter or digit
/// (the job name's rule, since a job's name is its model's default registry name).
pub fn name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    (!ok).then(|| {
        format!(
            "must be 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit; got {name:?}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: u64, stage: Stage, left: Option<u64>) -> VersionState {
        VersionState {
            version,
            model_digest: format!("{version:064x}"),
            stage,
            left_production: left,
        }
    }

    #[test]
    fn every_pair_of_stages_is_judged_and_refusals_say_why() {
        use Stage::*;
        let allowed_promote = [
            (Candidate, Canary),
            (Canary, Production),
            (Candidate, Retired),
            (Canary, Retired),
            (Production, Retired),
        ];
        let allowed_rollback = [(Production, Retired), (Retired, Production)];
        for from in Stage::ALL {
            for to in Stage::ALL {
                let p = from.can_move(to, MoveKind::Promote);
                assert_eq!(
                    p.is_ok(),
                    allowed_promote.contains(&(from, to)),
                    "{from}->{to}"
                );
                let r = from.can_move(to, MoveKind::Rollback);
                assert_eq!(
                    r.is_ok(),
                    allowed_rollback.contains(&(from, to)),
                    "{from}->{to}"
                );
                if let Err(e) = p {
                    assert!(!e.why.is_empty() && e.to_string().contains("not allowed"));
                }
            }
        }
        let e = Candidate
            .can_move(Production, MoveKind::Promote)
            .unwrap_err();
        assert!(e.why.contains("canary"), "{e}");
        let e = Retired.can_move(Production, MoveKind::Promote).unwrap_err();
        assert!(e.why.contains("rollback"), "{e}");
    }

    #[test]
    fn promotion_to_production_retires_the_current_one_and_rollback_restores_the_last() {
        let versions = vec![
            v(1, Stage::Retired, Some(1)),
            v(2, Stage::Production, None),
            v(3, Stage::Canary, None),
        ];
        let moves = plan_promote("m", &versions, 3, Stage::Production).unwrap();
        assert_eq!(moves.len(), 2);
        assert_eq!((moves[0].version, moves[0].to), (3, Stage::Production));
        assert_eq!((moves[1].version, moves[1].to), (2, Stage::Retired));
        check_move(MoveKind::Promote, &moves, |ver, _| {
            versions.iter().find(|x| x.version == ver).map(|x| x.stage)
        })
        .unwrap();

        // After it: v2 left production at move 2, so a rollback restores v2, not v1.
        let after = vec![
            v(1, Stage::Retired, Some(1)),
            v(2, Stage::Retired, Some(2)),
            v(3, Stage::Production, None),
        ];
        let back = plan_rollback("m", &after).unwrap();
        assert_eq!((back[0].version, back[0].to), (3, Stage::Retired));
        assert_eq!((back[1].version, back[1].to), (2, Stage::Production));
        check_move(MoveKind::Rollback, &back, |ver, _| {
            after.iter().find(|x| x.version == ver).map(|x| x.stage)
        })
        .unwrap();

        assert!(matches!(
            plan_rollback("m", &[v(1, Stage::Production, None)]),
            Err(PlanError::NothingToRestore { .. })
        ));
        assert!(matches!(
            plan_rollback("m", &[v(1, Stage::Canary, None)]),
            Err(PlanError::NoProduction { .. })
        ));
        assert!(matches!(
            plan_promote("m", &versions, 9, Stage::Canary),
            Err(PlanError::NoSuchVersion { .. })
        ));
        let e = plan_promote("m", &versions, 1, Stage::Canary).unwrap_err();
        assert!(e.to_string().contains("m v1: retired -> canary"), "{e}");
    }

    #[test]
    fn a_move_that_does_not_match_the_history_is_refused() {
        let m = VersionMove {
            version: 1,
            model_digest: "aa".into(),
            from: Stage::Canary,
            to: Stage::Production,
        };
        let e = check_move(MoveKind::Promote, std::slice::from_ref(&m), |_, _| {
            Some(Stage::Candidate)
        })
        .unwrap_err();
        assert!(e.contains("is candidate, not canary"), "{e}");
        let e = check_move(MoveKind::Promote, std::slice::from_ref(&m), |_, _| None).unwrap_err();
        assert!(e.contains("not a registered version"), "{e}");
        let e = check_move(MoveKind::Promote, &[], |_, _| None).unwrap_err();
        assert!(e.contains("no version"), "{e}");
        // A rollback must be exactly the retirement and the restoration.
        let e = check_move(
            MoveKind::Rollback,
            &[VersionMove {
                from: Stage::Production,
                to: Stage::Retired,
                ..m.clone()
            }],
            |_, _| Some(Stage::Production),
        )
        .unwrap_err();
        assert!(e.contains("restores one retired version"), "{e}");
    }

    #[test]
    fn the_signed_message_binds_every_field() {
        let m = vec![VersionMove {
            version: 2,
            model_digest: "ab".repeat(32),
            from: Stage::Canary,
            to: Stage::Production,
        }];
        let base = stage_move_message("m", MoveKind::Promote, &m, "looks good", 5);
        assert!(base.starts_with(b"tutela/model-stage/v1\n"));
        let mut other = m.clone();
        other[0].version = 3;
        for changed in [
            stage_move_message("n", MoveKind::Promote, &m, "looks good", 5),
            stage_move_message("m", MoveKind::Rollback, &m, "looks good", 5),
            stage_move_message("m", MoveKind::Promote, &other, "looks good", 5),
            stage_move_message("m", MoveKind::Promote, &m, "looks bad", 5),
            stage_move_message("m", MoveKind::Promote, &m, "looks good", 6),
        ] {
            assert_ne!(changed, base);
        }
        assert!(reason_problem("").is_some());
        assert!(reason_problem("fine").is_none());
        assert!(name_problem("tabular-mlp").is_none());
        assert!(name_problem("-x").is_some() && name_problem("a/b").is_some());
    }
}
