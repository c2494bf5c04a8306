//! A model's lineage and a job's compliance report, computed from audit events alone.
//!
//! From a model digest: the `model.published` event (or the `job.completed` whose `model_digest`
//! it is) names the job; the job's events give its proposal (spec digest, code version, base
//! model), the officers' approvals, each round (participants, update digests, ε per site), refused
//! updates and the sites' dataset commitments. [`Lineage::to_prov_json`] writes the graph as W3C
//! PROV-JSON (<https://www.w3.org/submissions/prov-json/>). Every element cites the seq of the
//! event it came from, so each claim can be proven against a signed checkpoint.
//!
//! The model's registry versions and their stage histories (who moved each version, when, why,
//! under which policy) are in [`Lineage::registry`].
//!
//! Nothing is believed unchecked: every event is first checked against the trail's authority
//! rules and officers' signatures ([`crate::authority`]); one that fails (a node asserting a
//! job's completion, a replayed or forged approval, a row written straight into the database)
//! contributes nothing and is listed in [`JobRecord::flagged`] with its seq and the reason.

use std::collections::BTreeMap;

use serde::Serialize;

mod registry;
pub use registry::{RegistryEntry, StageRecord};
use serde_json::{Value, json};

use crate::authority::AuthorityCheck;
use crate::event::{Action, Event};
use crate::payload::{
    ActionPayload, JobApproved, JobCompleted, JobFailed, JobProposed, JobRejected, JobStarted,
    ModelInitialized, ModelPublished, PayloadError, RoundCompleted, StatisticsPublished,
    TextDatasetDeidentified, UpdateRefused, WatermarkRegistered,
};

/// An event a reader did not believe, and why.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FlaggedEvent {
    pub seq: u64,
    pub action: String,
    pub actor: String,
    pub reason: String,
}

/// One approval or rejection.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ApprovalRecord {
    pub seq: u64,
    pub timestamp: String,
    pub decision: String,
    pub site: Option<String>,
    pub officer: Option<String>,
    pub spec_digest: Option<String>,
    pub reason: Option<String>,
}

/// One completed round.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RoundRecord {
    pub seq: u64,
    pub timestamp: String,
    pub round: Option<u64>,
    pub participants: Vec<String>,
    /// Site -> update digest.
    pub update_digests: BTreeMap<String, String>,
    /// Site -> ε spent in this round (when the site reported it).
    pub epsilon: BTreeMap<String, f64>,
    pub metrics: Value,
}

/// One refused update.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RefusalRecord {
    pub seq: u64,
    pub timestamp: String,
    pub actor: String,
    pub round: Option<u64>,
    pub site: Option<String>,
    pub reason: Option<String>,
}

/// A job's first global model (`model.initialized`): which site's node supplied it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct InitialModelRecord {
    pub seq: u64,
    pub timestamp: String,
    pub model_digest: String,
    pub site: String,
    pub attempt: u32,
}

/// What a language-model job trains with and produces, as its signed spec names them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LanguageModelRecord {
    /// SHA-256 of the job's `tokenizer.json`.
    pub tokenizer_sha256: Option<String>,
    /// The base checkpoint's digest (`checkpoint_digest`).
    pub base_sha256: Option<String>,
    /// The `[lora]` section: rank, alpha, target modules, aggregation rule.
    pub lora: Option<Value>,
    /// The published adapters' digest (the job's model digest, for a LoRA job).
    pub adapter_digest: Option<String>,
}

/// A site's text dataset as it was protected before a language model trained on it
/// (`dataset.text_deidentified`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TextDeidentificationRecord {
    pub seq: u64,
    pub dataset: String,
    pub config_sha256: String,
    /// `document` or `patient`.
    pub split_unit: String,
    pub documents_in: u64,
    pub documents_out: u64,
    pub dataset_commitment: String,
}

/// A consortium-statistics job's result (`statistics.published`): the file's digest and what it
/// cost (the per-site ε is also the record's `epsilon_per_site`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StatisticsRecord {
    pub seq: u64,
    pub timestamp: String,
    #[serde(flatten)]
    pub published: StatisticsPublished,
}

/// A watermark registered for a job's published model (`watermark.registered`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WatermarkRecord {
    pub seq: u64,
    pub timestamp: String,
    #[serde(flatten)]
    pub registered: WatermarkRegistered,
}

/// Every watermark the trail registered, in trail order, believing only events that pass
/// `check`: the registry `tutela model verify-watermark` tries a model against.
pub fn watermark_registry(events: &[Event], check: &AuthorityCheck) -> Vec<WatermarkRecord> {
    let (events, _) = believed(events, check);
    events
        .into_iter()
        .filter(|e| e.action == Action::WatermarkRegistered)
        .filter_map(|e| {
            let registered = WatermarkRegistered::from_event(e).ok()?;
            // The subject is what the event is filed under: it must be the digest it claims.
            (registered.model_digest == e.subject).then(|| WatermarkRecord {
                seq: e.seq,
                timestamp: e.timestamp.to_string(),
                registered,
            })
        })
        .collect()
}

/// Everything the log says about one job (and the model it produced).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JobRecord {
    pub job: String,
    pub proposed_seq: Option<u64>,
    pub spec_digest: Option<String>,
    pub proposed_by: Option<String>,
    pub code_version: Option<String>,
    pub base_model: Option<String>,
    pub approvals: Vec<ApprovalRecord>,
    pub started_seq: Option<u64>,
    /// The first global model and the site that supplied it; the last one recorded (an
    /// initialization retried after a coordinator restart records another).
    pub initial_model: Option<InitialModelRecord>,
    pub rounds: Vec<RoundRecord>,
    pub refused_updates: Vec<RefusalRecord>,
    /// Every site that took part in a round.
    pub participants: Vec<String>,
    /// Site -> total ε over the recorded rounds (or the job.completed total when given).
    pub epsilon_per_site: BTreeMap<String, f64>,
    /// Site -> dataset commitment, where a site reported one.
    pub dataset_commitments: BTreeMap<String, String>,
    /// A language-model job's tokenizer, base and adapters; `None` for other jobs.
    pub language_model: Option<LanguageModelRecord>,
    /// Site -> the de-identification of its text dataset(s) for this job, in trail order.
    pub text_deidentified: BTreeMap<String, Vec<TextDeidentificationRecord>>,
    /// `completed`, `failed`, `cancelled`, or `running` when no end is recorded.
    pub outcome: String,
    pub outcome_seq: Option<u64>,
    pub outcome_reason: Option<String>,
    pub model_digest: Option<String>,
    pub published_seq: Option<u64>,
    /// A consortium-statistics job's result; `None` for training jobs (and before it is
    /// published).
    pub statistics: Option<StatisticsRecord>,
    /// The watermark registered for the published model, when the job asked for one.
    pub watermark: Option<WatermarkRecord>,
    /// Events about the job that break the trail's authority rules: not believed, not counted.
    pub flagged: Vec<FlaggedEvent>,
}

/// A model's lineage: the job record behind it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Lineage {
    pub model_digest: String,
    pub job: Option<JobRecord>,
    /// The registry versions the model was registered as, with their stage histories.
    pub registry: Vec<RegistryEntry>,
}

/// The events of `events` that pass `check` (in seq order), and those that do not.
fn believed<'a>(
    events: &'a [Event],
    check: &AuthorityCheck,
) -> (Vec<&'a Event>, Vec<FlaggedEvent>) {
    let violations = check.violations(events);
    let bad: std::collections::BTreeSet<u64> = violations.iter().map(|v| v.seq).collect();
    let flagged = violations
        .into_iter()
        .map(|v| FlaggedEvent {
            seq: v.seq,
            action: v.action.to_string(),
            actor: v.actor,
            reason: v.error.to_string(),
        })
        .collect();
    (
        events.iter().filter(|e| !bad.contains(&e.seq)).collect(),
        flagged,
    )
}

/// The job a model digest came from, from `events` (any superset of the relevant ones, in seq
/// order), believing only events that pass `check`.
pub fn job_of_model(
    events: &[Event],
    model_digest: &str,
    check: &AuthorityCheck,
) -> Option<String> {
    let (events, _) = believed(events, check);
    events.into_iter().find_map(|e| match e.action {
        Action::ModelPublished if e.subject == model_digest => {
            ModelPublished::from_event(e).ok().map(|p| p.job)
        }
        Action::JobCompleted => JobCompleted::from_event(e)
            .ok()
            .filter(|p| p.model_digest == model_digest)
            .map(|_| e.subject.clone()),
        _ => None,
    })
}

/// Builds the record of `job` from `events` (in seq order), believing only events that pass
/// `check`; the others are listed in [`JobRecord::flagged`].
pub fn job_record(events: &[Event], job: &str, check: &AuthorityCheck) -> JobRecord {
    let (events, flagged) = believed(events, check);
    let mut r = JobRecord {
        job: job.to_string(),
        proposed_seq: None,
        spec_digest: None,
        proposed_by: None,
        code_version: None,
        base_model: None,
        approvals: Vec::new(),
        started_seq: None,
        initial_model: None,
        rounds: Vec::new(),
        refused_updates: Vec::new(),
        participants: Vec::new(),
        epsilon_per_site: BTreeMap::new(),
        dataset_commitments: BTreeMap::new(),
        language_model: None,
        statistics: None,
        text_deidentified: BTreeMap::new(),
        outcome: "running".into(),
        outcome_seq: None,
        outcome_reason: None,
        model_digest: None,
        published_seq: None,
        watermark: None,
        flagged,
    };
    let mut completed_eps: Option<BTreeMap<String, f64>> = None;
    for e in events {
        let about_job =
            e.subject == job || e.payload.get("job").and_then(|j| j.as_str()) == Some(job);
        if !about_job {
            continue;
        }
        // Each payload is read as its action's typed struct; one that does not decode is not
        // believed either, and is flagged.
        if let Err(problem) = apply_event(&mut r, &mut completed_eps, e) {
            r.flagged.push(FlaggedEvent {
                seq: e.seq,
                action: e.action.to_string(),
                actor: e.actor.clone(),
                reason: problem.to_string(),
            });
        }
    }
    if let Some(eps) = completed_eps {
        r.epsilon_per_site = eps;
    }
    // A LoRA job publishes its adapters: the model digest is theirs.
    if let Some(lm) = &mut r.language_model
        && lm.lora.is_some()
    {
        lm.adapter_digest = r.model_digest.clone();
    }
    r
}

/// Adds what `e` (an event about `r`'s job that passed the authority check) says to `r`.
fn apply_event(
    r: &mut JobRecord,
    completed_eps: &mut Option<BTreeMap<String, f64>>,
    e: &Event,
) -> Result<(), PayloadError> {
    let ts = e.timestamp.to_string();
    match e.action {
        Action::JobProposed => {
            let p = JobProposed::from_event(e)?;
            r.proposed_seq = Some(e.seq);
            r.spec_digest = Some(p.spec_digest);
            r.proposed_by = p.operator.or_else(|| Some(e.actor.clone()));
            r.code_version = Some(p.code_version);
            r.base_model = Some(p.base_model);
            let language_model =
                p.tokenizer_sha256.is_some() || p.base_sha256.is_some() || p.lora.is_some();
            r.language_model = language_model.then_some(LanguageModelRecord {
                tokenizer_sha256: p.tokenizer_sha256,
                base_sha256: p.base_sha256,
                lora: p.lora,
                adapter_digest: None,
            });
        }
        Action::JobApproved => {
            let p = JobApproved::from_event(e)?;
            r.approvals.push(ApprovalRecord {
                seq: e.seq,
                timestamp: ts,
                decision: "approved".into(),
                site: p.site,
                officer: officer_of(&p.certificate),
                spec_digest: Some(p.spec_digest),
                reason: None,
            });
        }
        Action::JobRejected => {
            let p = JobRejected::from_event(e)?;
            r.approvals.push(ApprovalRecord {
                seq: e.seq,
                timestamp: ts,
                decision: "rejected".into(),
                site: p.site,
                officer: officer_of(&p.certificate),
                spec_digest: Some(p.spec_digest),
                reason: Some(p.reason),
            });
        }
        Action::JobStarted => {
            JobStarted::from_event(e)?;
            r.started_seq = Some(e.seq);
        }
        Action::ModelInitialized => {
            let p = ModelInitialized::from_event(e)?;
            r.initial_model = Some(InitialModelRecord {
                seq: e.seq,
                timestamp: e.timestamp.to_string(),
                model_digest: p.model_digest,
                site: p.site,
                attempt: p.attempt,
            });
        }
        Action::RoundCompleted => {
            let p = RoundCompleted::from_event(e)?;
            let epsilon: BTreeMap<String, f64> = p
                .metrics
                .iter()
                .filter_map(|(site, m)| m.epsilon.map(|x| (site.clone(), x)))
                .collect();
            for (site, m) in &p.metrics {
                if let Some(c) = m.dataset_commitment.as_ref().filter(|c| !c.is_empty()) {
                    r.dataset_commitments.insert(site.clone(), c.clone());
                }
            }
            for site in &p.participants {
                if !r.participants.contains(site) {
                    r.participants.push(site.clone());
                }
            }
            for (site, eps) in &epsilon {
                *r.epsilon_per_site.entry(site.clone()).or_insert(0.0) += eps;
            }
            let metrics = serde_json::to_value(&p.metrics).unwrap_or(Value::Null);
            r.rounds.push(RoundRecord {
                seq: e.seq,
                timestamp: ts,
                round: Some(u64::from(p.round)),
                participants: p.participants,
                update_digests: p.update_digests,
                epsilon,
                metrics,
            });
        }
        Action::UpdateRefused => {
            let p = UpdateRefused::from_event(e)?;
            r.refused_updates.push(RefusalRecord {
                seq: e.seq,
                timestamp: ts,
                actor: e.actor.clone(),
                round: Some(u64::from(p.round)),
                site: Some(p.site),
                reason: Some(p.reason),
            });
        }
        Action::JobCompleted => {
            let p = JobCompleted::from_event(e)?;
            r.outcome = "completed".into();
            r.outcome_seq = Some(e.seq);
            r.model_digest = Some(p.model_digest);
            if !p.epsilon.is_empty() {
                *completed_eps = Some(p.epsilon);
            }
        }
        Action::JobFailed => {
            let p = JobFailed::from_event(e)?;
            r.outcome = p.state;
            r.outcome_seq = Some(e.seq);
            r.outcome_reason = Some(p.reason);
        }
        Action::ModelPublished => {
            let p = ModelPublished::from_event(e)?;
            r.published_seq = Some(e.seq);
            r.model_digest = Some(e.subject.clone());
            r.code_version = Some(p.code_version);
            if let Some(base) = p.base_model {
                r.base_model = Some(base);
            }
        }
        // Not part of a job's record (registrations, decisions, certificates, the sites'
        // de-identification reports and privacy spends are read where they are shown).
        Action::TextDatasetDeidentified => {
            let p = TextDatasetDeidentified::from_event(e)?;
            r.text_deidentified
                .entry(p.site)
                .or_default()
                .push(TextDeidentificationRecord {
                    seq: e.seq,
                    dataset: p.dataset,
                    config_sha256: p.config_sha256,
                    split_unit: p.split_unit,
                    documents_in: p.documents_in,
                    documents_out: p.documents_out,
                    dataset_commitment: p.dataset_commitment,
                });
        }
        Action::WatermarkRegistered => {
            let p = WatermarkRegistered::from_event(e)?;
            if p.model_digest != e.subject {
                r.flagged.push(FlaggedEvent {
                    seq: e.seq,
                    action: e.action.to_string(),
                    actor: e.actor.clone(),
                    reason: format!(
                        "filed under {} but registers model {}",
                        e.subject, p.model_digest
                    ),
                });
                return Ok(());
            }
            r.watermark = Some(WatermarkRecord {
                seq: e.seq,
                timestamp: ts,
                registered: p,
            });
        }
        Action::StatisticsPublished => {
            let p = StatisticsPublished::from_event(e)?;
            // The sites in the sum took part, and their one release is the job's whole spend.
            for site in &p.sites {
                if !r.participants.contains(site) {
                    r.participants.push(site.clone());
                }
            }
            r.epsilon_per_site = p.epsilon_per_site.clone();
            r.statistics = Some(StatisticsRecord {
                seq: e.seq,
                timestamp: ts,
                published: p,
            });
        }
        Action::PrivacySpent | Action::LedgerRestored | Action::AuditQuarantined => {}
        // The registry's events are the lineage's own part (`lineage::registry`).
        Action::ModelRegistered | Action::ModelStageChanged => {}
        Action::NodeRegistered
        | Action::PolicyDecision
        | Action::PolicyLoaded
        | Action::CertificateIssued
        | Action::CertificateRevoked
        | Action::DatasetDeidentified => {}
    }
    Ok(())
}

/// The identity in an officer's certificate (PEM), whose signature the authority check verified;
/// never the payload's own `officer` claim.
fn officer_of(pem: &str) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    tutela_protocol::pki::identity_of_cert_der(&pem.contents)
        .ok()
        .map(|i| i.uri())
}

/// The lineage of `model_digest` from `events`, believing only events that pass `check`.
pub fn lineage(events: &[Event], model_digest: &str, check: &AuthorityCheck) -> Lineage {
    let (believed_events, _) = believed(events, check);
    Lineage {
        model_digest: model_digest.to_string(),
        job: job_of_model(events, model_digest, check).map(|job| job_record(events, &job, check)),
        registry: registry::registry_entries(&believed_events, model_digest),
    }
}

impl Lineage {
    /// W3C PROV-JSON: entities (models, spec, updates, datasets), activities (the job, its
    /// rounds), agents (sites, officers, the proposer) and the relations between them.
    pub fn to_prov_json(&self) -> Value {
        let mut entity = serde_json::Map::new();
        let mut activity = serde_json::Map::new();
        let mut agent = serde_json::Map::new();
        let mut rel: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
        let mut n = 0usize;
        let mut add =
            |kind: &'static str,
             v: Value,
             rel: &mut BTreeMap<&str, serde_json::Map<String, Value>>| {
                n += 1;
                rel.entry(kind).or_default().insert(format!("_:r{n}"), v);
            };
        let model = format!("tutela:model/{}", self.model_digest);
        entity.insert(
            model.clone(),
            json!({"prov:type": "tutela:Model", "tutela:digest": self.model_digest}),
        );
        if let Some(j) = &self.job {
            let job = format!("tutela:job/{}", j.job);
            activity.insert(
                job.clone(),
                json!({
                    "prov:type": "tutela:FederatedJob",
                    "tutela:outcome": j.outcome,
                    "tutela:code_version": j.code_version,
                    "tutela:epsilon_per_site": j.epsilon_per_site,
                    "tutela:audit_seq": j.outcome_seq,
                }),
            );
            add(
                "wasGeneratedBy",
                json!({"prov:entity": model, "prov:activity": job}),
                &mut rel,
            );
            if let Some(spec) = &j.spec_digest {
                let e = format!("tutela:spec/{spec}");
                entity.insert(e.clone(), json!({"prov:type": "tutela:JobSpec", "tutela:digest": spec, "tutela:audit_seq": j.proposed_seq}));
                add(
                    "used",
                    json!({"prov:activity": job, "prov:entity": e}),
                    &mut rel,
                );
            }
            if let Some(base) = &j.base_model {
                let e = format!("tutela:model/{base}");
                entity.insert(
                    e.clone(),
                    json!({"prov:type": "tutela:Model", "tutela:digest": base}),
                );
                add(
                    "wasDerivedFrom",
                    json!({"prov:generatedEntity": model, "prov:usedEntity": e}),
                    &mut rel,
                );
                add(
                    "used",
                    json!({"prov:activity": job, "prov:entity": e}),
                    &mut rel,
                );
            }
            if let Some(code) = &j.code_version {
                let e = format!("tutela:code/{code}");
                entity.insert(
                    e.clone(),
                    json!({"prov:type": "tutela:CodeVersion", "tutela:version": code}),
                );
                add(
                    "used",
                    json!({"prov:activity": job, "prov:entity": e}),
                    &mut rel,
                );
            }
            if let Some(p) = &j.proposed_by {
                let a = format!("tutela:agent/{p}");
                agent.insert(a.clone(), json!({"prov:type": "tutela:Operator"}));
                add(
                    "wasAssociatedWith",
                    json!({"prov:activity": job, "prov:agent": a, "prov:role": "proposer"}),
                    &mut rel,
                );
            }
            for ap in &j.approvals {
                let Some(officer) = &ap.officer else { continue };
                let a = format!("tutela:agent/{officer}");
                agent.insert(
                    a.clone(),
                    json!({"prov:type": "tutela:ComplianceOfficer", "tutela:site": ap.site}),
                );
                add(
                    "wasAssociatedWith",
                    json!({
                        "prov:activity": job, "prov:agent": a,
                        "prov:role": format!("officer:{}", ap.decision), "tutela:audit_seq": ap.seq,
                    }),
                    &mut rel,
                );
            }
            for site in &j.participants {
                let a = format!("tutela:site/{site}");
                agent.insert(a.clone(), json!({"prov:type": "tutela:Site", "tutela:epsilon": j.epsilon_per_site.get(site)}));
                add(
                    "wasAssociatedWith",
                    json!({"prov:activity": job, "prov:agent": a, "prov:role": "participant"}),
                    &mut rel,
                );
                if let Some(c) = j.dataset_commitments.get(site) {
                    let e = format!("tutela:dataset/{c}");
                    entity.insert(
                        e.clone(),
                        json!({"prov:type": "tutela:DatasetCommitment", "tutela:commitment": c}),
                    );
                    add(
                        "wasAttributedTo",
                        json!({"prov:entity": e, "prov:agent": a}),
                        &mut rel,
                    );
                }
            }
            // A watermarked model was derived from the unmarked aggregate by the mark.
            if let Some(w) = &j.watermark {
                let w_ = &w.registered;
                let source = format!("tutela:model/{}", w_.source_digest);
                entity.insert(
                    source.clone(),
                    json!({"prov:type": "tutela:Model", "tutela:digest": w_.source_digest}),
                );
                add(
                    "wasDerivedFrom",
                    json!({
                        "prov:generatedEntity": model, "prov:usedEntity": source,
                        "prov:type": "tutela:Watermark", "tutela:scheme": w_.scheme,
                        "tutela:key_commitment": w_.key_commitment, "tutela:audit_seq": w.seq,
                    }),
                    &mut rel,
                );
            }
            for round in &j.rounds {
                let id = format!("tutela:job/{}/round/{}", j.job, round.round.unwrap_or(0));
                activity.insert(
                    id.clone(),
                    json!({
                        "prov:type": "tutela:Round", "tutela:participants": round.participants,
                        "tutela:epsilon": round.epsilon, "tutela:audit_seq": round.seq,
                    }),
                );
                add(
                    "wasInformedBy",
                    json!({"prov:informed": job, "prov:informant": id}),
                    &mut rel,
                );
                for (site, digest) in &round.update_digests {
                    let e = format!("tutela:update/{digest}");
                    entity.insert(
                        e.clone(),
                        json!({"prov:type": "tutela:ModelUpdate", "tutela:site": site}),
                    );
                    add(
                        "used",
                        json!({"prov:activity": id, "prov:entity": e}),
                        &mut rel,
                    );
                    add(
                        "wasAttributedTo",
                        json!({"prov:entity": e, "prov:agent": format!("tutela:site/{site}")}),
                        &mut rel,
                    );
                }
            }
        }
        let mut doc = serde_json::Map::new();
        doc.insert(
            "prefix".into(),
            json!({"tutela": "https://tutela.invalid/ns#"}),
        );
        doc.insert("entity".into(), Value::Object(entity));
        doc.insert("activity".into(), Value::Object(activity));
        doc.insert("agent".into(), Value::Object(agent));
        for (k, v) in rel {
            doc.insert(k.into(), Value::Object(v));
        }
        Value::Object(doc)
    }
}

/// Output format of a job report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Json,
    Csv,
    Html,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A job's compliance report: approvals, rounds, participants, ε per site, lineage, refusals.
pub fn render_report(r: &JobRecord, format: ReportFormat) -> String {
    // Rows shared by CSV and HTML: section, seq, timestamp, who, detail.
    let mut rows: Vec<[String; 5]> = Vec::new();
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    rows.push([
        "proposal".into(),
        r.proposed_seq.map(|s| s.to_string()).unwrap_or_default(),
        String::new(),
        opt(&r.proposed_by),
        format!(
            "spec_digest={} code_version={} base_model={}",
            opt(&r.spec_digest),
            opt(&r.code_version),
            opt(&r.base_model)
        ),
    ]);
    for a in &r.approvals {
        rows.push([
            "approval".into(),
            a.seq.to_string(),
            a.timestamp.clone(),
            opt(&a.officer),
            format!(
                "{} site={} spec_digest={}{}",
                a.decision,
                opt(&a.site),
                opt(&a.spec_digest),
                a.reason
                    .as_ref()
                    .map(|x| format!(" reason={x}"))
                    .unwrap_or_default()
            ),
        ]);
    }
    if let Some(m) = &r.initial_model {
        rows.push([
            "initial_model".into(),
            m.seq.to_string(),
            m.timestamp.clone(),
            m.site.clone(),
            format!("model_digest={} attempt={}", m.model_digest, m.attempt),
        ]);
    }
    for rd in &r.rounds {
        let eps: Vec<String> = rd.epsilon.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let ups: Vec<String> = rd
            .update_digests
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        rows.push([
            "round".into(),
            rd.seq.to_string(),
            rd.timestamp.clone(),
            rd.participants.join(" "),
            format!(
                "round={} epsilon=[{}] updates=[{}]",
                rd.round.unwrap_or(0),
                eps.join(" "),
                ups.join(" ")
            ),
        ]);
    }
    for f in &r.refused_updates {
        rows.push([
            "refused".into(),
            f.seq.to_string(),
            f.timestamp.clone(),
            f.actor.clone(),
            format!(
                "round={} site={} reason={}",
                f.round.unwrap_or(0),
                opt(&f.site),
                opt(&f.reason)
            ),
        ]);
    }
    for (site, eps) in &r.epsilon_per_site {
        rows.push([
            "epsilon".into(),
            String::new(),
            String::new(),
            site.clone(),
            format!("total_epsilon={eps}"),
        ]);
    }
    if let Some(w) = &r.watermark {
        let w_ = &w.registered;
        rows.push([
            "watermark".into(),
            w.seq.to_string(),
            w.timestamp.clone(),
            String::new(),
            format!(
                "scheme={} model_digest={} source_digest={} key_commitment={} expected_z={:.1}",
                w_.scheme, w_.model_digest, w_.source_digest, w_.key_commitment, w_.expected_z
            ),
        ]);
    }
    for f in &r.flagged {
        rows.push([
            "flagged".into(),
            f.seq.to_string(),
            String::new(),
            f.actor.clone(),
            format!("NOT BELIEVED: {} ({})", f.action, f.reason),
        ]);
    }
    rows.push([
        "outcome".into(),
        r.outcome_seq.map(|s| s.to_string()).unwrap_or_default(),
        String::new(),
        String::new(),
        format!(
            "{} model_digest={}{}",
            r.outcome,
            opt(&r.model_digest),
            r.outcome_reason
                .as_ref()
                .map(|x| format!(" reason={x}"))
                .unwrap_or_default()
        ),
    ]);
    match format {
        ReportFormat::Json => serde_json::to_string_pretty(r).unwrap_or_default(),
        ReportFormat::Csv => {
            let mut out = String::from("section,seq,timestamp,who,detail\n");
            for row in rows {
                out.push_str(
                    &row.iter()
                        .map(|f| csv_field(f))
                        .collect::<Vec<_>>()
                        .join(","),
                );
                out.push('\n');
            }
            out
        }
        ReportFormat::Html => {
            let mut out = format!(
                "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Audit report: job {job}</title></head><body>\n<h1>Audit report: job {job}</h1>\n<p>Outcome: {outcome}. Participants: {parts}.</p>\n<table border=\"1\">\n<tr><th>section</th><th>seq</th><th>timestamp</th><th>who</th><th>detail</th></tr>\n",
                job = html(&r.job),
                outcome = html(&r.outcome),
                parts = html(&r.participants.join(", "))
            );
            for row in rows {
                out.push_str("<tr>");
                for f in row {
                    out.push_str(&format!("<td>{}</td>", html(&f)));
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</table>\n</body></html>\n");
            out
        }
    }
}
