//! From events to a report's content: figures rounded for people, tables, budget series and the
//! compliance sections. Pure and deterministic (the same events give the same content, byte for
//! byte), because `verify-report` rebuilds the content from the trail and compares.
//!
//! Nothing is believed unchecked: events that break the trail's authority rules are left out of
//! every figure and listed in a table of their own.

use std::collections::{BTreeMap, BTreeSet};

use crate::authority::AuthorityCheck;
use crate::console::format::{epsilon, utc};
use crate::event::{Action, Event};
use crate::lineage;
use crate::payload::privacy::PrivacySpent;
use crate::payload::{ActionPayload, JobProposed, UpdateRefused};

use super::compliance::{self, SectionInput};
use super::{BudgetSeries, Fact, MAX_CHART_POINTS, ReportContent, ReportError, ReportScope, Table};

/// δ for people: one significant digit in scientific notation.
pub fn delta(v: f64) -> String {
    if v.is_finite() && v > 0.0 {
        format!("{v:.1e}")
    } else {
        format!("{v}")
    }
}

/// A count with thousands separated by commas.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Each job's target ε, as its signed spec states it (`job.proposed`'s privacy).
fn targets(proposals: &BTreeMap<String, (u64, JobProposed)>) -> BTreeMap<String, f64> {
    proposals
        .iter()
        .filter_map(|(job, (_, p))| {
            serde_json::from_value::<tutela_protocol::job::PrivacySpec>(p.privacy.clone())
                .ok()
                .and_then(|s| s.target_epsilon)
                .map(|t| (job.clone(), t))
        })
        .collect()
}

/// At most [`MAX_CHART_POINTS`] of `points`, evenly chosen, the first and last kept.
fn thin(points: Vec<(i64, f64)>) -> Vec<(i64, f64)> {
    let n = points.len();
    if n <= MAX_CHART_POINTS {
        return points;
    }
    let keep: BTreeSet<usize> = (0..MAX_CHART_POINTS)
        .map(|i| i * (n - 1) / (MAX_CHART_POINTS - 1))
        .collect();
    points
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, p)| p)
        .collect()
}

/// The budgets spent by `spends` (believed `privacy.spent` events in scope), one series per
/// `<site>/<dataset>`, with each spending job's target as a cap. `per_job`: plot the job's ε
/// (a job report) instead of the dataset's (a period).
fn budgets(spends: &[&Event], targets: &BTreeMap<String, f64>, per_job: bool) -> Vec<BudgetSeries> {
    let mut by: BTreeMap<(String, String), Vec<(i64, f64, String)>> = BTreeMap::new();
    for e in spends {
        if let Ok(p) = PrivacySpent::from_event(e) {
            let v = if per_job {
                p.job_epsilon
            } else {
                p.dataset_epsilon
            };
            by.entry((p.site.clone(), p.dataset.clone()))
                .or_default()
                .push((e.timestamp.unix_millis(), v, p.job.clone()));
        }
    }
    by.into_iter()
        .map(|((site, dataset), spends)| {
            let jobs: BTreeSet<&str> = spends.iter().map(|s| s.2.as_str()).collect();
            let caps = jobs
                .iter()
                .filter_map(|j| targets.get(*j).map(|t| (format!("job {j} target"), *t)))
                .collect();
            let epsilon_now = spends.last().map_or_else(String::new, |s| epsilon(s.1));
            BudgetSeries {
                site,
                dataset,
                measure: if per_job {
                    "The job's ε on the dataset after each round's spend".into()
                } else {
                    "The dataset's ε over every job after each spend".into()
                },
                spends: spends.len() as u64,
                epsilon_now,
                points: thin(spends.into_iter().map(|s| (s.0, s.1)).collect()),
                caps,
            }
        })
        .collect()
}

/// The report's content of `scope` from `events` (as [`super::gather`] returns them, all below
/// `tree_size`), believing only events that pass `check`; `log_id` is the checkpoint's.
pub fn build_content(
    events: &[Event],
    scope: &ReportScope,
    tree_size: u64,
    check: &AuthorityCheck,
    log_id: &str,
) -> Result<ReportContent, ReportError> {
    let violations = check.violations(events);
    let flagged: BTreeSet<u64> = violations.iter().map(|v| v.seq).collect();
    let in_scope: Vec<&Event> = events
        .iter()
        .filter(|e| e.seq < tree_size && scope.contains(e))
        .collect();
    if in_scope.is_empty() {
        return Err(ReportError::Empty {
            scope: scope.to_string(),
            tree_size,
        });
    }
    let believed: Vec<&Event> = in_scope
        .iter()
        .copied()
        .filter(|e| !flagged.contains(&e.seq))
        .collect();
    // Every believed proposal (in scope or before a period's end): purposes and caps.
    let proposals: BTreeMap<String, (u64, JobProposed)> = events
        .iter()
        .filter(|e| e.action == Action::JobProposed && !flagged.contains(&e.seq))
        .filter_map(|e| {
            JobProposed::from_event(e)
                .ok()
                .map(|p| (e.subject.clone(), (e.seq, p)))
        })
        .collect();
    let targets = targets(&proposals);
    let spends: Vec<&Event> = believed
        .iter()
        .copied()
        .filter(|e| e.action == Action::PrivacySpent)
        .collect();

    let mut facts = vec![
        Fact {
            label: "Scope".into(),
            value: scope.to_string(),
        },
        Fact {
            label: "Trail read".into(),
            value: format!(
                "events 0 to {} (the signed checkpoint of size {})",
                tree_size.saturating_sub(1),
                count(tree_size)
            ),
        },
        Fact {
            label: "Events in scope".into(),
            value: count(in_scope.len() as u64),
        },
        Fact {
            label: "Events not believed (authority rules)".into(),
            value: count((in_scope.len() - believed.len()) as u64),
        },
    ];
    let mut tables = Vec::new();
    let title;
    match scope {
        ReportScope::Job { job } => {
            let record = lineage::job_record(events, job, check);
            let proposal = proposals.get(job).map(|(_, p)| p);
            title = format!(
                "Compliance report: job {job}{}",
                proposal.map_or_else(String::new, |p| format!(" ({})", p.name))
            );
            job_facts(&mut facts, &record, proposal, targets.get(job).copied());
            job_tables(&mut tables, &record);
        }
        ReportScope::Period { from, to } => {
            title = format!("Compliance report: {} to {}", utc(*from), utc(*to));
            period_tables(&mut tables, &believed);
        }
    }
    if !violations.is_empty() {
        tables.push(Table {
            title: "Not believed: events that break the trail's authority rules".into(),
            columns: vec!["seq".into(), "action".into(), "actor".into(), "why".into()],
            rows: violations
                .iter()
                .filter(|v| in_scope.iter().any(|e| e.seq == v.seq))
                .map(|v| {
                    vec![
                        v.seq.to_string(),
                        v.action.to_string(),
                        v.actor.clone(),
                        v.error.to_string(),
                    ]
                })
                .collect(),
            source: "trail, re-checked against the authority rules and officers' signatures".into(),
        });
    }
    let budgets = budgets(&spends, &targets, matches!(scope, ReportScope::Job { .. }));
    let sections = compliance::sections(&SectionInput {
        scope,
        tree_size,
        log_id,
        in_scope: &in_scope,
        believed: &believed,
        proposals: &proposals,
        targets: &targets,
    });
    Ok(ReportContent {
        scope: scope.clone(),
        tree_size,
        title,
        facts,
        budgets,
        tables,
        sections,
    })
}

fn job_facts(
    facts: &mut Vec<Fact>,
    r: &lineage::JobRecord,
    proposal: Option<&JobProposed>,
    target: Option<f64>,
) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "not recorded".into());
    let mut push = |label: &str, value: String| {
        facts.push(Fact {
            label: label.into(),
            value,
        })
    };
    push(
        "Job name (its purpose as stated)",
        proposal.map_or_else(|| "not recorded".into(), |p| p.name.clone()),
    );
    push("Spec digest (what officers signed)", opt(&r.spec_digest));
    push("Proposed by", opt(&r.proposed_by));
    push("Code version", opt(&r.code_version));
    push("Base model", opt(&r.base_model));
    push(
        "Outcome",
        match &r.outcome_reason {
            Some(why) => format!("{} ({why})", r.outcome),
            None => r.outcome.clone(),
        },
    );
    push(
        "Rounds completed",
        match proposal {
            Some(p) => format!("{} of {}", r.rounds.len(), p.rounds),
            None => r.rounds.len().to_string(),
        },
    );
    push("Participating sites", r.participants.join(", "));
    let approved = r
        .approvals
        .iter()
        .filter(|a| a.decision == "approved")
        .count();
    push("Approvals", count(approved as u64));
    push("Rejections", count((r.approvals.len() - approved) as u64));
    push("Refused updates", count(r.refused_updates.len() as u64));
    push(
        "Target ε per site (spec)",
        target.map_or_else(|| "none stated".into(), epsilon),
    );
    if let Some(p) = proposal
        && let Ok(spec) =
            serde_json::from_value::<tutela_protocol::job::PrivacySpec>(p.privacy.clone())
    {
        push("δ (spec)", delta(spec.delta));
    }
    push("Published model digest", opt(&r.model_digest));
}

fn job_tables(tables: &mut Vec<Table>, r: &lineage::JobRecord) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    tables.push(Table {
        title: "Approvals and rejections".into(),
        columns: ["seq", "time", "site", "officer", "decision"]
            .map(String::from)
            .to_vec(),
        rows: r
            .approvals
            .iter()
            .map(|a| {
                vec![
                    a.seq.to_string(),
                    utc_text(&a.timestamp),
                    opt(&a.site),
                    opt(&a.officer),
                    match &a.reason {
                        Some(why) => format!("{} ({why})", a.decision),
                        None => a.decision.clone(),
                    },
                ]
            })
            .collect(),
        source: "trail: job.approved and job.rejected, each officer's signature re-checked".into(),
    });
    tables.push(Table {
        title: "Rounds".into(),
        columns: ["seq", "time", "round", "participants", "ε spent per site"]
            .map(String::from)
            .to_vec(),
        rows: r
            .rounds
            .iter()
            .map(|rd| {
                vec![
                    rd.seq.to_string(),
                    utc_text(&rd.timestamp),
                    rd.round.map_or_else(String::new, |n| n.to_string()),
                    rd.participants.join(", "),
                    rd.epsilon
                        .iter()
                        .map(|(s, v)| format!("{s}: {}", epsilon(*v)))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            })
            .collect(),
        source: "trail: round.completed".into(),
    });
    tables.push(Table {
        title: "Refused updates".into(),
        columns: ["seq", "time", "site", "round", "reason"]
            .map(String::from)
            .to_vec(),
        rows: r
            .refused_updates
            .iter()
            .map(|f| {
                vec![
                    f.seq.to_string(),
                    utc_text(&f.timestamp),
                    opt(&f.site),
                    f.round.map_or_else(String::new, |n| n.to_string()),
                    opt(&f.reason),
                ]
            })
            .collect(),
        source: "trail: update.refused".into(),
    });
    tables.push(Table {
        title: "ε spent per site over the job".into(),
        columns: ["site", "ε", "dataset commitment"]
            .map(String::from)
            .to_vec(),
        rows: r
            .epsilon_per_site
            .iter()
            .map(|(site, v)| {
                vec![
                    site.clone(),
                    epsilon(*v),
                    r.dataset_commitments.get(site).cloned().unwrap_or_default(),
                ]
            })
            .collect(),
        source: "trail: job.completed's totals, else the sum over round.completed".into(),
    });
}

fn period_tables(tables: &mut Vec<Table>, believed: &[&Event]) {
    let mut by_action: BTreeMap<Action, (u64, u64, u64)> = BTreeMap::new();
    for e in believed {
        let entry = by_action.entry(e.action).or_insert((0, e.seq, e.seq));
        entry.0 += 1;
        entry.2 = e.seq;
    }
    tables.push(Table {
        title: "Events by action".into(),
        columns: ["action", "events", "first seq", "last seq"]
            .map(String::from)
            .to_vec(),
        rows: by_action
            .iter()
            .map(|(a, (n, first, last))| {
                vec![
                    a.to_string(),
                    count(*n),
                    first.to_string(),
                    last.to_string(),
                ]
            })
            .collect(),
        source: "trail: every believed event in the period".into(),
    });
    // Jobs touched: how many events each, and the last lifecycle step seen in the period.
    let mut jobs: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for e in believed {
        let job = match e.action {
            Action::JobProposed
            | Action::JobApproved
            | Action::JobRejected
            | Action::JobStarted
            | Action::ModelInitialized
            | Action::RoundCompleted
            | Action::UpdateRefused
            | Action::JobCompleted
            | Action::JobFailed
            | Action::StatisticsPublished => Some(e.subject.clone()),
            _ => e
                .payload
                .get("job")
                .and_then(|j| j.as_str())
                .map(str::to_string),
        };
        if let Some(job) = job {
            let entry = jobs.entry(job).or_insert((0, String::new()));
            entry.0 += 1;
            if matches!(
                e.action,
                Action::JobProposed
                    | Action::JobStarted
                    | Action::RoundCompleted
                    | Action::JobCompleted
                    | Action::JobFailed
            ) {
                entry.1 = format!("{} (seq {})", e.action, e.seq);
            }
        }
    }
    tables.push(Table {
        title: "Jobs with events in the period".into(),
        columns: ["job", "events", "last lifecycle step in the period"]
            .map(String::from)
            .to_vec(),
        rows: jobs
            .into_iter()
            .map(|(j, (n, last))| vec![j, count(n), last])
            .collect(),
        source: "trail: events naming the job (subject or payload)".into(),
    });
    let refused: Vec<Vec<String>> = believed
        .iter()
        .filter(|e| e.action == Action::UpdateRefused)
        .map(|e| {
            let p = UpdateRefused::from_event(e).ok();
            vec![
                e.seq.to_string(),
                utc(e.timestamp),
                e.subject.clone(),
                p.as_ref().map(|p| p.site.clone()).unwrap_or_default(),
                p.map(|p| p.reason).unwrap_or_default(),
            ]
        })
        .collect();
    tables.push(Table {
        title: "Refused updates".into(),
        columns: ["seq", "time", "job", "site", "reason"]
            .map(String::from)
            .to_vec(),
        rows: refused,
        source: "trail: update.refused".into(),
    });
}

/// A timestamp the lineage record wrote as RFC 3339, for people.
fn utc_text(t: &str) -> String {
    t.parse::<crate::event::Timestamp>()
        .map(utc)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_deltas_read_as_people_write_them() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(delta(1e-5), "1.0e-5");
        assert_eq!(delta(0.0), "0");
    }

    #[test]
    fn charts_are_thinned_keeping_both_ends() {
        let pts: Vec<(i64, f64)> = (0..10_000).map(|i| (i, i as f64)).collect();
        let t = thin(pts);
        assert_eq!(t.len(), MAX_CHART_POINTS);
        assert_eq!(t.first(), Some(&(0, 0.0)));
        assert_eq!(t.last(), Some(&(9_999, 9_999.0)));
        let few: Vec<(i64, f64)> = (0..5).map(|i| (i, 1.0)).collect();
        assert_eq!(thin(few.clone()), few);
    }
}
