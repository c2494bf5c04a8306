//! The sections a regulator reads, each mapped to one rule: what it asks, what the trail says
//! (every statement with its source), and the events that evidence it. What the trail cannot
//! evidence is said, with where the fact is kept instead; nothing is filled in.
//!
//! The rules (paraphrased; the report names the article):
//! - EU AI Act (Regulation (EU) 2024/1689) Art. 12, record-keeping: automatic recording of events
//!   over the system's lifetime, enabling traceability;
//! - EU AI Act Art. 19, automatically generated logs: kept at least six months;
//! - GDPR Art. 30(1), records of processing: controller, purposes, categories of data subjects
//!   and personal data, recipients, transfers, time limits for erasure, security measures;
//! - HIPAA 45 CFR §164.312(b), audit controls: mechanisms that record and examine activity.

use std::collections::{BTreeMap, BTreeSet};

use crate::console::format::{epsilon, utc};
use crate::event::{Action, Event};
use crate::payload::privacy::PrivacySpent;
use crate::payload::{ActionPayload, JobProposed};

use super::build::count;
use super::{CitedEvent, ComplianceSection, MAX_CITED_PER_SECTION, ReportScope, Statement};

/// What the sections are written from.
pub struct SectionInput<'a> {
    pub scope: &'a ReportScope,
    pub tree_size: u64,
    pub log_id: &'a str,
    /// Every event in scope, believed or not.
    pub in_scope: &'a [&'a Event],
    /// The events in scope that pass the authority rules.
    pub believed: &'a [&'a Event],
    /// Job -> (seq, its believed proposal).
    pub proposals: &'a BTreeMap<String, (u64, JobProposed)>,
    /// Job -> target ε of its spec.
    pub targets: &'a BTreeMap<String, f64>,
}

/// The lifecycle of federated training: Art. 12's traceability.
const ART12_ACTIONS: &[Action] = &[
    Action::JobProposed,
    Action::JobApproved,
    Action::JobRejected,
    Action::JobStarted,
    Action::ModelInitialized,
    Action::RoundCompleted,
    Action::UpdateRefused,
    Action::JobCompleted,
    Action::JobFailed,
    Action::ModelPublished,
    Action::StatisticsPublished,
    Action::ModelRegistered,
    Action::ModelStageChanged,
    Action::WatermarkRegistered,
];

/// Removals of rows from the trail, and the ledger restores that lean on its keeping.
const ART19_ACTIONS: &[Action] = &[Action::AuditQuarantined, Action::LedgerRestored];

/// Purposes, data, recipients and safeguards of processing.
const GDPR30_ACTIONS: &[Action] = &[
    Action::JobProposed,
    Action::DatasetDeidentified,
    Action::TextDatasetDeidentified,
    Action::PrivacySpent,
    Action::ModelPublished,
    Action::NodeRegistered,
];

/// Who was let do what, and the identities behind it.
const HIPAA_ACTIONS: &[Action] = &[
    Action::JobApproved,
    Action::JobRejected,
    Action::PolicyDecision,
    Action::PolicyLoaded,
    Action::CertificateIssued,
    Action::CertificateRevoked,
    Action::UpdateRefused,
    Action::LedgerRestored,
    Action::AuditQuarantined,
];

/// `trail: <action> seq a, b, c` (at most five seqs, then how many more).
fn seqs_source(what: &str, events: &[&Event]) -> String {
    let mut s: Vec<String> = events.iter().take(5).map(|e| e.seq.to_string()).collect();
    if events.len() > 5 {
        s.push(format!("and {} more", events.len() - 5));
    }
    if s.is_empty() {
        format!("trail: no {what} event in scope")
    } else {
        format!("trail: {what} seq {}", s.join(", "))
    }
}

fn of<'a>(events: &[&'a Event], action: Action) -> Vec<&'a Event> {
    events
        .iter()
        .copied()
        .filter(|e| e.action == action)
        .collect()
}

fn of_kinds<'a>(believed: &[&'a Event], actions: &[Action]) -> Vec<&'a Event> {
    let kinds: BTreeSet<Action> = actions.iter().copied().collect();
    believed
        .iter()
        .copied()
        .filter(|e| kinds.contains(&e.action))
        .collect()
}

fn kinds_text(actions: &[Action]) -> String {
    format!(
        "events of kinds {}",
        actions
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn section(
    id: &str,
    title: &str,
    requirement: &str,
    statements: Vec<Statement>,
    cited: Vec<&Event>,
    evidence_kinds: String,
) -> ComplianceSection {
    ComplianceSection {
        id: id.into(),
        title: title.into(),
        requirement: requirement.into(),
        statements,
        evidence: cited
            .iter()
            .take(MAX_CITED_PER_SECTION)
            .map(|e| CitedEvent::of(e))
            .collect(),
        evidence_total: cited.len() as u64,
        evidence_kinds,
    }
}

fn st(text: impl Into<String>, source: impl Into<String>) -> Statement {
    Statement {
        text: text.into(),
        source: source.into(),
    }
}

/// The four sections, in the order the report prints them.
pub fn sections(input: &SectionInput<'_>) -> Vec<ComplianceSection> {
    vec![art12(input), art19(input), gdpr30(input), hipaa(input)]
}

fn art12(i: &SectionInput<'_>) -> ComplianceSection {
    let kinds: BTreeSet<Action> = i.believed.iter().map(|e| e.action).collect();
    let mut s = vec![
        st(
            format!(
                "Every step of federated training is recorded as it happens, by the principal whose certificate asserted it: {} events in scope, of {} kinds.",
                count(i.in_scope.len() as u64),
                kinds.len()
            ),
            "trail: the events in scope",
        ),
        st(
            format!(
                "Each event is chained to the one before it by SHA-256 and covered by the Merkle tree whose root the audit service signed at tree size {} (log {}); editing, removing or reordering any of them breaks the chain or the signed root.",
                count(i.tree_size),
                i.log_id
            ),
            "checkpoint carried by this report",
        ),
    ];
    if let ReportScope::Job { job } = i.scope {
        let steps: Vec<&Event> = i
            .believed
            .iter()
            .copied()
            .filter(|e| {
                matches!(
                    e.action,
                    Action::JobProposed
                        | Action::JobStarted
                        | Action::JobCompleted
                        | Action::JobFailed
                        | Action::ModelPublished
                )
            })
            .collect();
        let rounds = of(i.believed, Action::RoundCompleted);
        s.push(st(
            format!(
                "Job {job}: {}; {} round(s) recorded.",
                if steps.is_empty() {
                    "no lifecycle step recorded".to_string()
                } else {
                    steps
                        .iter()
                        .map(|e| format!("{} at {}", e.action, utc(e.timestamp)))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                rounds.len()
            ),
            seqs_source("lifecycle", &steps),
        ));
    }
    let unbelieved = i.in_scope.len() - i.believed.len();
    s.push(st(
        format!(
            "{} event(s) in scope break the trail's authority rules (who may assert what, officers' signatures): they are listed as not believed and counted nowhere.",
            count(unbelieved as u64)
        ),
        "trail, re-checked when this report was made",
    ));
    section(
        "eu-ai-act-art-12",
        "EU AI Act Art. 12: Record-keeping",
        "High-risk AI systems shall technically allow for the automatic recording of events (logs) over the lifetime of the system, so that its functioning can be traced (Art. 12(1) and (2)).",
        s,
        of_kinds(i.believed, ART12_ACTIONS),
        kinds_text(ART12_ACTIONS),
    )
}

fn art19(i: &SectionInput<'_>) -> ComplianceSection {
    let first = i.in_scope.first();
    let last = i.in_scope.last();
    let quarantines = of(i.believed, Action::AuditQuarantined);
    let mut s = vec![st(
        "The audit service refuses to prune events younger than its configured [retention] min_days, which cannot be set below 183 days (six months); the value in force when this report was made is stated under Trail integrity.",
        "audit service configuration ([retention] in audit.toml), not the trail",
    )];
    if let (Some(a), Some(b)) = (first, last) {
        s.push(st(
            format!(
                "The events in scope run from seq {} ({}) to seq {} ({}), all still held by the trail up to its checkpoint.",
                a.seq,
                utc(a.timestamp),
                b.seq,
                utc(b.timestamp)
            ),
            format!("trail: seq {} and {}", a.seq, b.seq),
        ));
    }
    s.push(st(
        if quarantines.is_empty() {
            "No event in scope records rows moved out of the trail (audit.quarantined).".to_string()
        } else {
            format!(
                "{} quarantine(s) in scope moved forged rows (never signed over) out of the trail, each by an operator's order countersigned by the officers' quorum.",
                quarantines.len()
            )
        },
        seqs_source("audit.quarantined", &quarantines),
    ));
    section(
        "eu-ai-act-art-19",
        "EU AI Act Art. 19: Automatically generated logs, kept at least six months",
        "Providers shall keep the logs automatically generated by their high-risk AI systems, to the extent they are under their control, for a period appropriate to the intended purpose, of at least six months (Art. 19(1)).",
        s,
        {
            // The span kept: the first and last events in scope, with the removals and restores.
            let mut cited = of_kinds(i.believed, ART19_ACTIONS);
            cited.extend(i.believed.first().copied());
            cited.extend(i.believed.last().copied());
            cited.sort_by_key(|e| e.seq);
            cited.dedup_by_key(|e| e.seq);
            cited
        },
        format!(
            "the first and last events in scope (the span the trail keeps), and {}",
            kinds_text(ART19_ACTIONS)
        ),
    )
}

fn gdpr30(i: &SectionInput<'_>) -> ComplianceSection {
    let proposals_in_scope: Vec<&Event> = of(i.believed, Action::JobProposed);
    let jobs: Vec<(String, &JobProposed, u64)> = match i.scope {
        ReportScope::Job { job } => i
            .proposals
            .get(job)
            .map(|(seq, p)| vec![(job.clone(), p, *seq)])
            .unwrap_or_default(),
        ReportScope::Period { .. } => proposals_in_scope
            .iter()
            .filter_map(|e| {
                i.proposals
                    .get(&e.subject)
                    .map(|(seq, p)| (e.subject.clone(), p, *seq))
            })
            .collect(),
    };
    let deid = of(i.believed, Action::DatasetDeidentified);
    let text_deid = of(i.believed, Action::TextDatasetDeidentified);
    let spends = of(i.believed, Action::PrivacySpent);
    let published = of(i.believed, Action::ModelPublished);
    let mut datasets: BTreeSet<String> = BTreeSet::new();
    for e in deid.iter().chain(text_deid.iter()).chain(spends.iter()) {
        datasets.insert(e.subject.clone());
    }
    let mut s = vec![st(
        format!(
            "(a) Controller: the processing is recorded by the consortium's audit log {}; the controllers' names and contact details are not in the trail.",
            i.log_id
        ),
        "checkpoint (log id); not in the trail: the consortium agreement names the controllers",
    )];
    s.push(st(
        if jobs.is_empty() {
            "(b) Purposes: no job proposal is in scope.".to_string()
        } else {
            format!(
                "(b) Purposes, as each job's signed spec names them: {}.",
                jobs.iter()
                    .map(|(j, p, _)| format!(
                        "job {j} \"{}\" (spec digest {})",
                        p.name,
                        short(&p.spec_digest)
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
        format!(
            "trail: job.proposed seq {}",
            jobs.iter()
                .map(|(_, _, s)| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    s.push(st(
        "(c) Categories of data subjects and of personal data: fixed by each job spec's [data] schema, which the officers approved by its digest; the trail holds the digest, not the schema. Read them in the job spec file the coordinator keeps (its SHA-256 is the spec digest above) and in each site's dataset configuration.",
        "not in the trail: the job spec's [data] section and the sites' configuration",
    ));
    s.push(st(
        if datasets.is_empty() {
            "Datasets read: none recorded in scope.".to_string()
        } else {
            format!(
                "Datasets read (site/dataset), each de-identified at its site before training: {}.",
                datasets.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        },
        seqs_source(
            "dataset.deidentified / dataset.text_deidentified / privacy.spent",
            &deid
                .iter()
                .chain(text_deid.iter())
                .chain(spends.iter())
                .copied()
                .collect::<Vec<_>>(),
        ),
    ));
    let sites: BTreeSet<String> = jobs
        .iter()
        .flat_map(|(_, p, _)| p.participants.iter().cloned())
        .collect();
    s.push(st(
        format!(
            "(d) Recipients: no personal data leaves a site; each participating site ({}) sends the coordinator a clipped, noised (and, when the spec asks, masked) model update. {}",
            if sites.is_empty() {
                "none listed".to_string()
            } else {
                sites.into_iter().collect::<Vec<_>>().join(", ")
            },
            if published.is_empty() {
                "No model was published in scope.".to_string()
            } else {
                format!(
                    "Published models (available to the consortium): {}.",
                    published
                        .iter()
                        .map(|e| short(&e.subject))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
        seqs_source("model.published", &published),
    ));
    s.push(st(
        "(e) Transfers to third countries: where each site and the coordinator run is not in the trail.",
        "not in the trail: the consortium's deployment records",
    ));
    s.push(st(
        "(f) Time limits for erasure: audit events are kept at least [retention] min_days (see EU AI Act Art. 19); the sites' own data is kept under each site's policy, which the trail does not hold.",
        "audit service configuration; not in the trail: each site's retention policy",
    ));
    let mut measures = vec![
        "mutual TLS with certificates of the consortium CA on every connection".to_string(),
        format!(
            "officers' signed approvals before any data is touched ({} approval(s) in scope)",
            of(i.believed, Action::JobApproved).len()
        ),
    ];
    let targets: Vec<String> = jobs
        .iter()
        .filter_map(|(j, _, _)| {
            i.targets
                .get(j)
                .map(|t| format!("job {j}: target ε {}", epsilon(*t)))
        })
        .collect();
    if !targets.is_empty() {
        measures.push(format!("differential privacy ({})", targets.join(", ")));
    }
    let max_spent: BTreeMap<String, f64> = spends.iter().fold(BTreeMap::new(), |mut m, e| {
        if let Ok(p) = PrivacySpent::from_event(e) {
            let v = m.entry(e.subject.clone()).or_insert(0.0_f64);
            *v = v.max(p.dataset_epsilon);
        }
        m
    });
    if !max_spent.is_empty() {
        measures.push(format!(
            "each site's privacy ledger anchored in the trail (highest ε per dataset in scope: {})",
            max_spent
                .iter()
                .map(|(d, v)| format!("{d} {}", epsilon(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !deid.is_empty() || !text_deid.is_empty() {
        measures.push(format!(
            "de-identification at the site before training ({} report(s))",
            deid.len() + text_deid.len()
        ));
    }
    s.push(st(
        format!("(g) Security measures: {}.", measures.join("; ")),
        seqs_source("job.proposed / job.approved / privacy.spent", &{
            let mut v: Vec<&Event> = proposals_in_scope.clone();
            v.extend(spends.iter().copied());
            v.sort_by_key(|e| e.seq);
            v
        }),
    ));
    section(
        "gdpr-art-30",
        "GDPR Art. 30: Records of processing activities",
        "Each controller shall maintain a record of processing activities: (a) the controller, (b) the purposes, (c) the categories of data subjects and of personal data, (d) the recipients, (e) transfers to third countries, (f) time limits for erasure, (g) technical and organisational security measures (Art. 30(1)).",
        s,
        of_kinds(i.believed, GDPR30_ACTIONS),
        kinds_text(GDPR30_ACTIONS),
    )
}

fn hipaa(i: &SectionInput<'_>) -> ComplianceSection {
    let n = |a: Action| of(i.believed, a).len() as u64;
    let s = vec![
        st(
            format!(
                "Record: each action is appended by the principal whose certificate asserted it and is refused unless that principal may assert it; {} event(s) in scope are believed, {} are not.",
                count(i.believed.len() as u64),
                count((i.in_scope.len() - i.believed.len()) as u64)
            ),
            "trail: the events in scope, re-checked against the authority rules",
        ),
        st(
            "Examine: the whole trail was verified when this report was made (see Trail integrity), and anyone holding the log's public key can verify it again, and this report, offline: `tutela audit verify`, `tutela audit verify-report`.",
            "checkpoint carried by this report",
        ),
        st(
            format!(
                "Access decisions recorded in scope: {} approval(s), {} rejection(s), {} policy decision(s), {} certificate(s) issued, {} revoked, {} update(s) refused.",
                n(Action::JobApproved),
                n(Action::JobRejected),
                n(Action::PolicyDecision),
                n(Action::CertificateIssued),
                n(Action::CertificateRevoked),
                n(Action::UpdateRefused)
            ),
            "trail: the events in scope",
        ),
    ];
    section(
        "hipaa-164-312-b",
        "HIPAA §164.312(b): Audit controls",
        "Implement hardware, software and/or procedural mechanisms that record and examine activity in information systems that contain or use electronic protected health information (45 CFR §164.312(b)).",
        s,
        of_kinds(i.believed, HIPAA_ACTIONS),
        kinds_text(HIPAA_ACTIONS),
    )
}

fn short(d: &str) -> String {
    crate::console::format::short(d)
}
