//! Jobs on the coordinator: their ids and the job and round state machines. The job spec itself
//! and its digest live in [`tutela_protocol::job`] (re-exported here), shared with the site nodes.

use std::fmt;
use std::str::FromStr;

pub use tutela_protocol::job::*;

/// A job's identifier: 32 lowercase hex digits (128 random bits), made by the store when the job
/// is created. Random rather than a database sequence so that one schema serves SQLite and
/// Postgres, and ids from two coordinators' databases never collide in the audit trail.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// A fresh random id from the OS's CSPRNG.
    pub fn generate() -> Result<JobId, ring::error::Unspecified> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut bytes)?;
        Ok(JobId(hex::encode(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a job id: expected 32 lowercase hex digits")]
pub struct BadJobId(pub String);

impl FromStr for JobId {
    type Err = BadJobId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(JobId(s.to_string()))
        } else {
            Err(BadJobId(s.to_string()))
        }
    }
}

/// Where a job stands.
///
/// ```text
/// Proposed ──► Running ──► Completed
///    │            ├──────► Failed
///    └────────────┴──────► Cancelled
/// ```
/// Completed, Failed and Cancelled are terminal. The states are values rather than types because
/// they are read back from the database at run time; [`JobState::transition`] is the one place
/// that decides what may follow what, and the store applies it before every change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Proposed,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Proposed,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The spelling stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Proposed => "proposed",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn can_transition_to(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Proposed, Running | Cancelled) | (Running, Completed | Failed | Cancelled)
        )
    }

    /// `to` if the state machine allows `self → to`, else the typed refusal.
    pub fn transition(self, to: JobState) -> Result<JobState, IllegalTransition> {
        if self.can_transition_to(to) {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown job state {0:?}: expected proposed, running, completed, failed or cancelled")]
pub struct UnknownJobState(pub String);

impl FromStr for JobState {
    type Err = UnknownJobState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownJobState(s.to_string()))
    }
}

/// A job state change the state machine does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error("a job cannot go from {from} to {to}{}", if from.is_terminal() { format!(" ({from} is final)") } else { String::new() })]
pub struct IllegalTransition {
    pub from: JobState,
    pub to: JobState,
}

/// Where one attempt at a round stands. Rounds are numbered from 1 (round 0 is the initial global
/// model) and each round's attempts from 1; a round that misses `min_sites` by its deadline is
/// `Failed` and retried as the next attempt, up to `max_round_retries` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoundState {
    /// Updates are being collected. Only in memory: a coordinator that restarts reopens the round.
    Open,
    Completed,
    Failed,
}

impl RoundState {
    pub fn as_str(self) -> &'static str {
        match self {
            RoundState::Open => "open",
            RoundState::Completed => "completed",
            RoundState::Failed => "failed",
        }
    }
}

impl fmt::Display for RoundState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RoundState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(RoundState::Open),
            "completed" => Ok(RoundState::Completed),
            "failed" => Ok(RoundState::Failed),
            other => Err(format!(
                "unknown round state {other:?}: expected open, completed or failed"
            )),
        }
    }
}
