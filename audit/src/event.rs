//! Audit events, their vocabulary, and the hash chain that links them.
//!
//! An event's `hash` is SHA-256 over the RFC 8785 canonical JSON of every other field, with the
//! 32-byte `prev_hash` written as 64 lowercase hex digits and `timestamp` as RFC 3339 UTC with
//! milliseconds. Because the keys are ASCII, the canonical member order is fixed:
//!
//! ```text
//! {"action":…,"actor":…,"payload":…,"prev_hash":…,"seq":…,"subject":…,"timestamp":…}
//! ```
//!
//! [`Event::hash_input`] writes exactly that text without building a `serde_json::Value` tree for
//! the fixed fields (only the payload goes through the generic canonicaliser), which is what makes
//! verification fast; a test checks it against the generic [`crate::canonical_json`] of the event.

use crate::canonical::{write_canonical, write_string};
use crate::{Hash, hexser, sha256};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt::{self, Write as _};
use std::str::FromStr;
use time::OffsetDateTime;

/// The `prev_hash` of the first event (seq 0): 32 zero bytes.
pub const GENESIS_PREV_HASH: Hash = [0u8; 32];

/// What happened. Serialised as the dotted string shown on each variant; the vocabulary is closed
/// (an unknown string is refused when an event is read) so that every row means something a
/// regulator can look up here. New actions are added as new variants, never by renaming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// `node.registered`: a site node connected with a valid certificate for the first time (or
    /// re-registered). Subject: the node's identity. Payload: `site`, the certificate's SHA-256
    /// fingerprint, the node's software version.
    NodeRegistered,
    /// `job.proposed`: an operator submitted a job spec. Subject: the job id. Payload: the spec's
    /// SHA-256 digest (`spec_digest`, hex), the participating sites, the DP parameters.
    JobProposed,
    /// `job.approved`: a site's compliance officer approved a job. Subject: the job id. Payload:
    /// `spec_digest`, the officer's Ed25519 signature over it, the site.
    JobApproved,
    /// `job.rejected`: a compliance officer rejected a job. Subject: the job id. Payload:
    /// `spec_digest`, the officer's signature over the rejection message and `certificate`, the
    /// site, the stated `reason`, `signed_at_ms`.
    JobRejected,
    /// `job.started`: the coordinator started an approved job (quorum met). Subject: the job id.
    /// Payload: the approvals counted, the participating sites.
    JobStarted,
    /// `model.initialized`: the coordinator accepted a job's first global model (round 0) from a
    /// site's node, after checking that its tensors are the job's model and its values finite.
    /// Subject: the job id. Payload ([`crate::payload::ModelInitialized`]): the model's digest,
    /// the site whose node supplied it, the attempt.
    ModelInitialized,
    /// `round.completed`: the coordinator aggregated a round. Subject: the job id. Payload: the
    /// round number, participants, each update's digest, metrics, ε spent per site.
    RoundCompleted,
    /// `update.refused`: a site node refused to train, or the coordinator refused an update (policy,
    /// budget, norm bound, bad mask). Subject: the job id. Payload: who refused, the round, the reason.
    UpdateRefused,
    /// `job.completed`: a job finished all rounds. Subject: the job id. Payload: the final model's
    /// digest and the total ε per site.
    JobCompleted,
    /// `job.failed`: a job stopped without completing. Subject: the job id. Payload: the round it
    /// stopped in and the reason.
    JobFailed,
    /// `model.published`: a model was published. Subject: the model digest. Payload: its lineage
    /// (base model, job, rounds, dataset commitments, code version, DP accounting, approvals).
    ModelPublished,
    /// `watermark.registered`: a watermark was embedded and registered. Subject: the model digest.
    /// Payload: the watermark key's commitment and the verification threshold.
    WatermarkRegistered,
    /// `policy.decision`: a policy decision that matters to a regulator (allow or deny). Subject:
    /// the resource decided on. Payload: the request (who, what, action), the decision, the rule.
    PolicyDecision,
    /// `certificate.issued`: the consortium CA issued a certificate (`tutela pki issue|sign
    /// --audit`). Subject: the SPIFFE identity. Payload: `serial` (hex), `sha256_fingerprint` (hex
    /// of the DER), `not_before`, `not_after` (RFC 3339).
    CertificateIssued,
    /// `certificate.revoked`: a certificate was revoked (added to the CRL; `tutela pki revoke
    /// --audit`). Subject: the SPIFFE identity. Payload: `serial`, `reason`, `crl_number` (an
    /// integer: the CRL that carries it).
    CertificateRevoked,
    /// `dataset.deidentified`: a site node anonymized a dataset before training on it, appended by
    /// the node itself (the actor is its certificate identity). Subject: `<site>/<dataset>`.
    /// Payload: the job it was read for, the de-identification report (each transform, rows and
    /// cells changed, k and l achieved, suppressed rows, the configuration's digest: counts and
    /// column names, never a value), and the dataset commitment.
    DatasetDeidentified,
    /// `dataset.text_deidentified`: a site node read a text dataset through the text protection
    /// pipeline (content filter, PII redaction, near-duplicate removal, split by document or
    /// patient) before a language model trained on it, appended by the node itself. Subject:
    /// `<site>/<dataset>`. Payload ([`crate::payload::TextDatasetDeidentified`]): the job, the
    /// pipeline's report (counts and settings, never a term, name or text), the privacy unit and
    /// the dataset commitment over the protected documents.
    TextDatasetDeidentified,
    /// `privacy.spent`: a site node charged its privacy ledger for one round of DP-SGD, appended
    /// by the node itself before the round's update leaves the site, so that the site's budget
    /// is anchored outside its own disk. Subject: `<site>/<dataset>`. Payload
    /// ([`crate::payload::privacy::PrivacySpent`]): job, round, attempt, the (q, σ_eff, steps)
    /// group, the training rows, ε of the job and of the dataset after the spend; no data value.
    PrivacySpent,
    /// `ledger.restored`: a site's compliance officer rebuilt a node's privacy ledger from the
    /// trail's `privacy.spent` events and re-pinned its held checkpoint (`tutela-node ledger
    /// restore`), appended as the officer. Subject: `<site>/<dataset>`. Payload
    /// ([`crate::payload::privacy::LedgerRestored`]).
    LedgerRestored,
    /// `model.registered`: the coordinator gave a published model its registry name and version
    /// (as a candidate). Subject: `<name>/v<version>`. Payload
    /// ([`crate::payload::ModelRegistered`]): name, version, model digest, job, spec digest.
    ModelRegistered,
    /// `model.stage_changed`: versions of a registered name moved between stages (candidate,
    /// canary, production, retired), relayed by the coordinator with the signature of every
    /// principal whose signature made the policy's quorum. Subject: the name. Payload
    /// ([`crate::payload::ModelStageChanged`]): kind (promote or rollback), the moves with their
    /// model digests, the reason, the signatures; readers re-check each signature and that each
    /// move starts where the trail's history left the version.
    ModelStageChanged,
    /// `audit.quarantined`: rows written into the database past the service (forged: never
    /// signed over by a checkpoint) were moved out of the log into `audit_quarantine`, by an
    /// operator's order countersigned by the policy's quorum of officers (`tutela audit
    /// quarantine`), and recorded by the audit service itself when it next opened the log, at
    /// the seq of the first quarantined row. Subject: `seq/<first quarantined seq>`. Payload
    /// ([`crate::payload::AuditQuarantined`]): the signed terms (each row's seq, hash, actor,
    /// action, subject; the reason; the sites whose officers signed), the operator's and the
    /// officers' signatures, the quorum met and the policy's digest; readers re-check every
    /// signature.
    AuditQuarantined,
    /// `policy.loaded`: the text of the consortium policy (casbin model and policy files) under
    /// which the coordinator is about to record a decision that readers must re-check against
    /// it (a registered model's stage move), recorded once per policy digest before the first
    /// such event. Subject: the policy digest. Payload ([`crate::payload::PolicyLoaded`]): the
    /// digest and both files' text; readers recompute the digest and re-check each
    /// `model.stage_changed` naming it against its stage rules and role grants.
    PolicyLoaded,
    /// `statistics.published`: the coordinator summed the sites' noised sufficient statistics
    /// of a consortium-statistics job (`kind = "statistics"`) and finished the data dictionary.
    /// Subject: the job id. Payload ([`crate::payload::StatisticsPublished`]): the spec and
    /// schema digests, the SHA-256 of the statistics file, the sites in the sum and the ε each
    /// spent, whether the sum was masked, the bounds' confidence; no figure of the data.
    StatisticsPublished,
}

impl Action {
    /// Every action, in declaration order.
    pub const ALL: [Action; 24] = [
        Action::NodeRegistered,
        Action::JobProposed,
        Action::JobApproved,
        Action::JobRejected,
        Action::JobStarted,
        Action::RoundCompleted,
        Action::UpdateRefused,
        Action::JobCompleted,
        Action::JobFailed,
        Action::ModelPublished,
        Action::WatermarkRegistered,
        Action::PolicyDecision,
        Action::CertificateIssued,
        Action::CertificateRevoked,
        Action::DatasetDeidentified,
        Action::TextDatasetDeidentified,
        Action::PrivacySpent,
        Action::LedgerRestored,
        Action::ModelRegistered,
        Action::ModelStageChanged,
        Action::ModelInitialized,
        Action::AuditQuarantined,
        Action::PolicyLoaded,
        Action::StatisticsPublished,
    ];

    /// The dotted name, as stored and hashed.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::NodeRegistered => "node.registered",
            Action::JobProposed => "job.proposed",
            Action::JobApproved => "job.approved",
            Action::JobRejected => "job.rejected",
            Action::JobStarted => "job.started",
            Action::RoundCompleted => "round.completed",
            Action::UpdateRefused => "update.refused",
            Action::JobCompleted => "job.completed",
            Action::JobFailed => "job.failed",
            Action::ModelPublished => "model.published",
            Action::WatermarkRegistered => "watermark.registered",
            Action::PolicyDecision => "policy.decision",
            Action::CertificateIssued => "certificate.issued",
            Action::CertificateRevoked => "certificate.revoked",
            Action::DatasetDeidentified => "dataset.deidentified",
            Action::TextDatasetDeidentified => "dataset.text_deidentified",
            Action::PrivacySpent => "privacy.spent",
            Action::LedgerRestored => "ledger.restored",
            Action::ModelRegistered => "model.registered",
            Action::ModelStageChanged => "model.stage_changed",
            Action::ModelInitialized => "model.initialized",
            Action::AuditQuarantined => "audit.quarantined",
            Action::PolicyLoaded => "policy.loaded",
            Action::StatisticsPublished => "statistics.published",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An action name outside the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an audit action (see tutela_audit::Action for the vocabulary)")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.to_string()))
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A UTC instant with millisecond precision, years 0000..=9999, written in exactly one way:
/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339 §5.6). One spelling per instant matters because the text
/// is hashed: parsing is strict and refuses any other spelling of the same instant.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_ms: i64,
}

/// A timestamp that cannot be represented or is not in the one accepted spelling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("{0} ms since the Unix epoch is outside years 0000..=9999")]
    OutOfRange(i64),
    #[error(
        "{text:?} is not an RFC 3339 UTC timestamp of the form YYYY-MM-DDTHH:MM:SS.mmmZ: {why}"
    )]
    BadText { text: String, why: String },
}

// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z in ms since the epoch.
const MIN_UNIX_MS: i64 = -62_167_219_200_000;
const MAX_UNIX_MS: i64 = 253_402_300_799_999;

impl Timestamp {
    /// Now, truncated to milliseconds.
    pub fn now() -> Timestamp {
        // The clock is always within range; clamp rather than fail should it be absurd.
        let ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        Timestamp {
            unix_ms: ms.clamp(MIN_UNIX_MS, MAX_UNIX_MS),
        }
    }

    pub fn from_unix_millis(ms: i64) -> Result<Timestamp, TimestampError> {
        if (MIN_UNIX_MS..=MAX_UNIX_MS).contains(&ms) {
            Ok(Timestamp { unix_ms: ms })
        } else {
            Err(TimestampError::OutOfRange(ms))
        }
    }

    /// `dt` converted to UTC and truncated to milliseconds.
    pub fn from_datetime(dt: OffsetDateTime) -> Result<Timestamp, TimestampError> {
        let ms = dt.unix_timestamp_nanos().div_euclid(1_000_000);
        let ms = i64::try_from(ms).map_err(|_| TimestampError::OutOfRange(i64::MAX))?;
        Timestamp::from_unix_millis(ms)
    }

    pub fn unix_millis(self) -> i64 {
        self.unix_ms
    }

    /// Appends the canonical text to `out`.
    pub fn write_to(self, out: &mut String) {
        let secs = self.unix_ms.div_euclid(1000);
        let ms = self.unix_ms.rem_euclid(1000);
        match OffsetDateTime::from_unix_timestamp(secs) {
            Ok(dt) => {
                let _ = write!(
                    out,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                    dt.year(),
                    u8::from(dt.month()),
                    dt.day(),
                    dt.hour(),
                    dt.minute(),
                    dt.second(),
                    ms
                );
            }
            // Unreachable: the constructors keep unix_ms within the range `time` supports.
            Err(_) => out.push_str("invalid"),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(24);
        self.write_to(&mut s);
        f.write_str(&s)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| TimestampError::BadText {
            text: s.to_string(),
            why: why.to_string(),
        };
        let dt = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| bad(&e.to_string()))?;
        let ts = Timestamp::from_datetime(dt).map_err(|e| bad(&e.to_string()))?;
        // Strict: only the canonical spelling (UTC `Z`, exactly 3 fraction digits) is accepted,
        // so that the text that was hashed is the text that is read back.
        if ts.to_string() != s {
            return Err(bad(
                "not the canonical spelling (UTC with `Z`, exactly 3 fraction digits)",
            ));
        }
        Ok(ts)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One audit event: a row of the append-only log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log, dense from 0; also the event's leaf index in the Merkle tree.
    pub seq: u64,
    pub timestamp: Timestamp,
    /// Who did it: the SPIFFE URI from the caller's certificate (`spiffe://<consortium>/...`).
    pub actor: String,
    pub action: Action,
    /// What it was done to (a job id, a model digest, an identity; see each [`Action`]).
    pub subject: String,
    /// Action-specific details (see each [`Action`]).
    pub payload: serde_json::Value,
    /// The previous event's `hash`; [`GENESIS_PREV_HASH`] for seq 0.
    #[serde(with = "hexser")]
    pub prev_hash: Hash,
    /// SHA-256 of [`Event::hash_input`].
    #[serde(with = "hexser")]
    pub hash: Hash,
}

impl Event {
    /// The canonical JSON of every field except `hash`, the text that `hash` is SHA-256 of.
    pub fn hash_input(&self) -> String {
        let mut s = String::with_capacity(256);
        self.write_hash_input(&mut s);
        s
    }

    /// Appends [`Event::hash_input`] to `out` (cleared by the caller), for reuse in a hot loop.
    /// Keys in RFC 8785 order (all ASCII, so UTF-16 order is byte order).
    pub fn write_hash_input(&self, out: &mut String) {
        out.push_str("{\"action\":\"");
        out.push_str(self.action.as_str()); // plain ASCII, nothing to escape
        out.push_str("\",\"actor\":");
        write_string(&self.actor, out);
        out.push_str(",\"payload\":");
        write_canonical(&self.payload, out);
        out.push_str(",\"prev_hash\":\"");
        let mut hex_buf = [0u8; 64];
        // Encoding 32 bytes into 64 cannot fail; fall back to the allocating encoder anyway.
        match hex::encode_to_slice(self.prev_hash, &mut hex_buf) {
            Ok(()) => out.push_str(std::str::from_utf8(&hex_buf).unwrap_or_default()),
            Err(_) => out.push_str(&hex::encode(self.prev_hash)),
        }
        let _ = write!(out, "\",\"seq\":{},\"subject\":", self.seq);
        write_string(&self.subject, out);
        out.push_str(",\"timestamp\":\"");
        self.timestamp.write_to(out);
        out.push_str("\"}");
    }

    /// Recomputes the hash from the other fields.
    pub fn compute_hash(&self) -> Hash {
        let mut buf = String::with_capacity(256);
        self.compute_hash_with(&mut buf)
    }

    /// [`Event::compute_hash`] with a caller-provided scratch buffer.
    pub fn compute_hash_with(&self, buf: &mut String) -> Hash {
        buf.clear();
        self.write_hash_input(buf);
        sha256(buf.as_bytes())
    }
}

/// Why an event could not be appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("actor {0:?} is not a SPIFFE identity (expected spiffe://<consortium>/...)")]
    BadActor(String),
    #[error("timestamp {new} is earlier than the previous event's {previous} (seq {previous_seq})")]
    TimestampBeforePrevious {
        new: Timestamp,
        previous: Timestamp,
        previous_seq: u64,
    },
    #[error("event {seq} does not verify: its hash is not SHA-256 of its contents")]
    BadHead { seq: u64 },
    #[error("the log is full: seq would exceed u64::MAX")]
    SeqExhausted,
}

/// The head of a hash chain: what is needed to append the next event. The service keeps one per
/// log (restored from the last stored row with [`Chain::resume`]) and appends under a lock, since
/// the chain is a single sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    last_hash: Hash,
    last_timestamp: Option<Timestamp>,
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new()
    }
}

impl Chain {
    /// An empty log: the first event gets seq 0 and prev_hash [`GENESIS_PREV_HASH`].
    pub fn new() -> Chain {
        Chain {
            next_seq: 0,
            last_hash: GENESIS_PREV_HASH,
            last_timestamp: None,
        }
    }

    /// Continues after `last`, the newest stored event, after checking that its hash is right
    /// (the rest of the log is [`crate::verify_log`]'s business).
    pub fn resume(last: &Event) -> Result<Chain, ChainError> {
        if last.compute_hash() != last.hash {
            return Err(ChainError::BadHead { seq: last.seq });
        }
        let next_seq = last.seq.checked_add(1).ok_or(ChainError::SeqExhausted)?;
        Ok(Chain {
            next_seq,
            last_hash: last.hash,
            last_timestamp: Some(last.timestamp),
        })
    }

    /// The seq the next event will get (= the number of events so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The newest event's hash ([`GENESIS_PREV_HASH`] when empty).
    pub fn last_hash(&self) -> Hash {
        self.last_hash
    }

    /// Builds the next event and advances the head. Refuses an actor that is not a SPIFFE URI and
    /// a timestamp earlier than the previous event's (the log is in time order; a service whose
    /// clock steps back should append with `max(now, last)`).
    pub fn append(
        &mut self,
        timestamp: Timestamp,
        actor: impl Into<String>,
        action: Action,
        subject: impl Into<String>,
        payload: serde_json::Value,
    ) -> Result<Event, ChainError> {
        let actor = actor.into();
        if !actor.starts_with("spiffe://") || actor.len() == "spiffe://".len() {
            return Err(ChainError::BadActor(actor));
        }
        if let Some(previous) = self.last_timestamp
            && timestamp < previous
        {
            return Err(ChainError::TimestampBeforePrevious {
                new: timestamp,
                previous,
                previous_seq: self.next_seq.saturating_sub(1),
            });
        }
        let seq = self.next_seq;
        let next_seq = seq.checked_add(1).ok_or(ChainError::SeqExhausted)?;
        let mut event = Event {
            seq,
            timestamp,
            actor,
            action,
            subject: subject.into(),
            payload,
            prev_hash: self.last_hash,
            hash: [0u8; 32],
        };
        event.hash = event.compute_hash();
        self.next_seq = next_seq;
        self.last_hash = event.hash;
        self.last_timestamp = Some(timestamp);
        Ok(event)
    }
}
