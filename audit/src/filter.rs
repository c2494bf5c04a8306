//! Which events a query asks for: shared by the store (as SQL), the service and its client (on the
//! wire), without the server.

use crate::event::{Action, Event, Timestamp};

/// Which events a query returns; every set field must match. Results are in seq order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Events about this job: its subject is the job id, or its payload's `job` is.
    pub job: Option<String>,
    pub subject: Option<String>,
    pub actor: Option<String>,
    pub action: Option<Action>,
    /// Events at or after this instant.
    pub since: Option<Timestamp>,
    /// Events with seq >= this.
    pub from_seq: Option<u64>,
    /// Events with seq < this.
    pub to_seq: Option<u64>,
    /// At most this many events.
    pub limit: Option<u64>,
}

/// The job an event's payload names (its top-level string `job`), if any: what a job filter
/// matches besides the subject, and what the store's events-by-job index holds.
pub fn payload_job(payload: &serde_json::Value) -> Option<&str> {
    payload.get("job").and_then(|j| j.as_str())
}

impl EventFilter {
    /// True when `event` matches (the job test exactly, which SQL only narrows down).
    pub fn matches(&self, event: &Event) -> bool {
        let job_ok = self
            .job
            .as_deref()
            .is_none_or(|job| event.subject == job || payload_job(&event.payload) == Some(job));
        job_ok
            && self.subject.as_deref().is_none_or(|s| event.subject == s)
            && self.actor.as_deref().is_none_or(|a| event.actor == a)
            && self.action.is_none_or(|a| event.action == a)
            && self.since.is_none_or(|t| event.timestamp >= t)
            && self.from_seq.is_none_or(|s| event.seq >= s)
            && self.to_seq.is_none_or(|s| event.seq < s)
    }
}
