//! `tutela job check`: asks every site a job would run at whether it would, before the job is
//! proposed and before any officer signs. Each site's node gets a CHECK task and answers with
//! everything its gate would refuse (dataset, schema digest, every site-policy clause, tokenizer
//! and base checkpoint, the privacy budget against the job's planned spend); nothing is stored,
//! proposed, spent or approved, and the trail records nothing (the job does not exist yet).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;
use tutela_protocol::job::SubmittedSpec;
use tutela_protocol::pb;

use super::{Engine, EngineError, new_task_id, now_ms};

/// How long a check waits for the sites' answers: a node answers from its gate, without reading
/// data, so a site silent this long is reported as not answering.
pub const CHECK_WAIT: Duration = Duration::from_secs(15);

/// The code of a site that could not be asked or did not answer.
pub const NOT_CONNECTED: &str = "site.not_connected";
pub const NO_DATASET: &str = "site.no_dataset";
pub const NO_ANSWER: &str = "site.no_answer";

/// The longest answer a node may send (all its refusals' texts together), like a decline's.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// Task id → (the site asked, where its answer goes).
type Waiting = HashMap<String, (String, oneshot::Sender<Vec<pb::CheckRefusal>>)>;

/// CHECK tasks sent and not yet answered.
#[derive(Default)]
pub struct PendingChecks {
    pending: Mutex<Waiting>,
}

/// Why a node's answer to a check is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CheckAnswerError {
    #[error("check task {0} is not open (unknown, answered, or past its wait)")]
    NotOpen(String),
    #[error("check task {0} belongs to another site")]
    OtherSite(String),
    #[error(
        "a check answer is at most {MAX_ANSWER_BYTES} bytes of codes and reasons; this one is {0}"
    )]
    TooLong(usize),
}

impl PendingChecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, task_id: &str, site: &str) -> oneshot::Receiver<Vec<pb::CheckRefusal>> {
        let (tx, rx) = oneshot::channel();
        self.lock()
            .insert(task_id.to_string(), (site.to_string(), tx));
        rx
    }

    fn forget(&self, task_id: &str) {
        self.lock().remove(task_id);
    }

    /// Whether `task_id` is a check still waiting for its answer.
    pub fn is_pending(&self, task_id: &str) -> bool {
        self.lock().contains_key(task_id)
    }

    /// A node's answer; `site` is the one in its certificate.
    pub fn answer(
        &self,
        task_id: &str,
        site: &str,
        refusals: Vec<pb::CheckRefusal>,
    ) -> Result<(), CheckAnswerError> {
        let size: usize = refusals.iter().map(|r| r.code.len() + r.reason.len()).sum();
        if size > MAX_ANSWER_BYTES {
            return Err(CheckAnswerError::TooLong(size));
        }
        let mut pending = self.lock();
        match pending.get(task_id) {
            None => return Err(CheckAnswerError::NotOpen(task_id.to_string())),
            Some((s, _)) if s != site => {
                return Err(CheckAnswerError::OtherSite(task_id.to_string()));
            }
            Some(_) => {}
        }
        if let Some((_, tx)) = pending.remove(task_id) {
            // The check may have stopped waiting meanwhile: the answer is then simply dropped.
            let _ = tx.send(refusals);
        }
        Ok(())
    }
}

fn refusal(code: &str, reason: impl Into<String>) -> pb::CheckRefusal {
    pb::CheckRefusal {
        code: code.to_string(),
        reason: reason.into(),
    }
}

impl Engine {
    /// Asks each site the job would run at (the spec's `sites`, or every connected site with
    /// its dataset when it names none) whether it would run it, waiting at most `wait` for the
    /// answers. Every site the spec names is listed, answered or not, sorted by name.
    pub async fn check_job(
        &self,
        spec_toml: &str,
        submitter: Option<&str>,
        wait: Duration,
    ) -> Result<Vec<pb::SiteCheck>, EngineError> {
        // Either kind: a check creates no job, so a consortium-statistics job may be checked
        // before this coordinator runs the kind (the sites' gates judge it as such).
        let spec = SubmittedSpec::from_toml_str(spec_toml)?;
        let schema = spec.data().schema.clone();
        let digest = spec.digest().to_hex();
        let eligible = self.nodes.eligible(&schema, spec.sites());
        let mut sites: Vec<String> = if spec.sites().is_empty() {
            eligible.clone()
        } else {
            spec.sites().to_vec()
        };
        sites.sort();
        sites.dedup();
        // One id for the whole check: it names no job (none exists), only this question.
        let check_id = format!("check-{}", new_task_id());
        let deadline_ms = now_ms() + wait.as_millis() as i64;
        let mut waiting = Vec::new();
        let mut out: HashMap<String, pb::SiteCheck> = HashMap::new();
        for site in &sites {
            let unanswered = |code: &str, reason: String| pb::SiteCheck {
                site: site.clone(),
                answered: false,
                refusals: vec![refusal(code, reason)],
            };
            if !self.nodes.is_connected(site) {
                out.insert(
                    site.clone(),
                    unanswered(NOT_CONNECTED, "the site's node is not connected".into()),
                );
                continue;
            }
            if !eligible.contains(site) {
                out.insert(
                    site.clone(),
                    unanswered(
                        NO_DATASET,
                        format!("the site's node offers no ready dataset of schema {schema:?}"),
                    ),
                );
                continue;
            }
            let task = pb::Task {
                task_id: new_task_id(),
                kind: pb::TaskKind::Check as i32,
                job_id: check_id.clone(),
                round: 1,
                attempt: 1,
                job_spec_toml: spec_toml.to_string(),
                job_digest: digest.clone(),
                global_model_id: String::new(),
                strategy_config_json: String::new(),
                deadline_unix_ms: deadline_ms,
                approvals: Vec::new(),
                submitted_by: submitter.unwrap_or_default().to_string(),
                // A check trains nothing, so it takes part in no secure aggregation.
                secagg_participants: Vec::new(),
            };
            let rx = self.checks.open(&task.task_id, site);
            if self.nodes.send(site, task.clone()) {
                waiting.push((site.clone(), task.task_id, rx));
            } else {
                self.checks.forget(&task.task_id);
                out.insert(
                    site.clone(),
                    unanswered(
                        NOT_CONNECTED,
                        "the site's node is not reading its tasks".into(),
                    ),
                );
            }
        }
        let until = tokio::time::Instant::now() + wait;
        for (site, task_id, rx) in waiting {
            let answer = tokio::time::timeout_at(until, rx).await;
            self.checks.forget(&task_id);
            let check = match answer {
                Ok(Ok(refusals)) => pb::SiteCheck {
                    site: site.clone(),
                    answered: true,
                    refusals,
                },
                _ => pb::SiteCheck {
                    site: site.clone(),
                    answered: false,
                    refusals: vec![refusal(
                        NO_ANSWER,
                        format!("no answer within {} s", wait.as_secs()),
                    )],
                },
            };
            out.insert(site, check);
        }
        let mut checks: Vec<pb::SiteCheck> = out.into_values().collect();
        checks.sort_by(|a, b| a.site.cmp(&b.site));
        Ok(checks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_taken_once_and_only_from_the_task_s_site() {
        let checks = PendingChecks::default();
        let mut rx = checks.open("t1", "a");
        assert_eq!(
            checks.answer("t1", "b", vec![]),
            Err(CheckAnswerError::OtherSite("t1".into()))
        );
        checks
            .answer("t1", "a", vec![refusal("policy.refused", "x")])
            .unwrap();
        assert_eq!(rx.try_recv().unwrap()[0].code, "policy.refused");
        assert_eq!(
            checks.answer("t1", "a", vec![]),
            Err(CheckAnswerError::NotOpen("t1".into()))
        );
        let _rx = checks.open("t2", "a");
        let long = vec![refusal("c", "x".repeat(MAX_ANSWER_BYTES + 1))];
        assert!(matches!(
            checks.answer("t2", "a", long),
            Err(CheckAnswerError::TooLong(_))
        ));
    }
}
