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

impl EventFilter {
    /// True when `event` matches (the job test exactly, which SQL only narrows down).
    pub fn matches(&self, event: &Event) -> bool {
        let job_ok = self.job.as_deref().is_none_or(|job| {
            event.subject == job || event.payload.get("job").and_then(|j| j.as_str()) == Some(job)
        });
        job_ok
            && self.subject.as_deref().is_none_or(|s| event.subject == s)
            && self.actor.as_deref().is_none_or(|a| event.actor == a)
            && self.action.is_none_or(|a| event.action == a)
            && self.since.is_none_or(|t| event.timestamp >= t)
            && self.from_seq.is_none_or(|s| event.seq >= s)
            && self.to_seq.is_none_or(|s| event.seq < s)
    }
}

/// The SQL `LIKE` pattern (with `ESCAPE '\'`) that narrows a job filter to events whose payload
/// names the job: `%"job":<the id as JSON>%`, with the id's own `%`, `_` and `\` escaped. Unescaped,
/// a job id of `%` (a reader's request for `/jobs/%25`, or a query's filter) matched every event
/// that names any job, and the store loaded them all to find none.
pub fn job_payload_pattern(job: &str) -> String {
    let json = crate::canonical_json(&job.into());
    let mut escaped = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("%\"job\":{escaped}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_id_s_wildcards_are_escaped_in_the_payload_pattern() {
        assert_eq!(job_payload_pattern("job-7f3a"), r#"%"job":"job-7f3a"%"#);
        assert_eq!(job_payload_pattern("%"), r#"%"job":"\%"%"#);
        assert_eq!(job_payload_pattern("a_b"), r#"%"job":"a\_b"%"#);
        // A backslash is JSON-escaped first (`\\`), then each is escaped for LIKE.
        assert_eq!(job_payload_pattern("a\\b"), r#"%"job":"a\\\\b"%"#);
    }
}
