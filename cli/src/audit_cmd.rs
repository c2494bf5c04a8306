//! `tutela audit ...`: the compliance officer's view of the audit log: list events, verify the
//! whole log, prove one event, a model's lineage, a job's report.
//!
//! Events are read from the audit service over mutual TLS (`--audit`), or straight from its
//! database (`--database-url`, e.g. a read-only replica) for offline verification.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use tutela_audit::authority::{AuthorityCheck, AuthorityRules, OfficerTrust};
use tutela_audit::client::AuditClient;
use tutela_audit::lineage::{self, ReportFormat};
use tutela_audit::merkle::{leaf_hash, verify_inclusion};
use tutela_audit::store::{AuditStore, EventFilter};
use tutela_audit::{Action, Event, SignedCheckpoint, verify_log};
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::tls::{TlsFiles, TlsMaterial};

#[derive(Debug, Args)]
pub struct Source {
    /// Audit service address, HOST:PORT.
    #[arg(long, env = "TUTELA_AUDIT", default_value = "localhost:7444")]
    pub audit: String,
    /// Directory holding ca.crt and <stem>.crt/.key (the output of `tutela pki issue`).
    #[arg(long, value_name = "DIR", env = "TUTELA_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// File stem of the certificate and key in --tls-dir (e.g. user-<name>).
    #[arg(long, env = "TUTELA_TLS_STEM")]
    pub stem: Option<String>,
    /// Read the log straight from its database instead of the service (sqlite://PATH or
    /// postgres://USER@HOST/DB); no TLS options needed then.
    #[arg(long, env = "TUTELA_AUDIT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The consortium CA certificate (PEM) that officers' certificates in approvals are checked
    /// against, as of each event's time. Default: ca.crt in --tls-dir. Without either, only the
    /// approvals' signatures are checked (said on stderr).
    #[arg(long, value_name = "FILE", env = "TUTELA_AUDIT_CA")]
    pub ca: Option<PathBuf>,
    /// A CA administrator (spiffe://<consortium>/operator/<name>), the only identities whose
    /// certificate.issued and certificate.revoked events are believed: the service's ca_admins
    /// (audit.toml). Repeatable, or comma-separated in TUTELA_CA_ADMINS.
    #[arg(
        long = "ca-admin",
        value_name = "IDENTITY",
        env = "TUTELA_CA_ADMINS",
        value_delimiter = ','
    )]
    pub ca_admins: Vec<String>,
}

pub(crate) enum Reader {
    Service(AuditClient),
    Db(AuditStore),
}

impl Source {
    /// How this reader checks who asserted what: the consortium is the log's (its checkpoints'
    /// log id, else this reader's certificate's), officers' certificates are checked against
    /// the CA, and certificate events are believed from `--ca-admin` only.
    pub(crate) async fn authority_check(&self, reader: &mut Reader) -> Result<AuthorityCheck> {
        let log_id = match reader.checkpoints().await?.first() {
            Some(cp) => cp.checkpoint.log_id.clone(),
            None => match reader {
                Reader::Service(c) => c.log_info().await?.log_id,
                Reader::Db(store) => {
                    // No signed checkpoint yet (nothing vouches for any row): the consortium
                    // is the first event's actor's, and every other actor must share it.
                    let first = store
                        .events(&EventFilter {
                            limit: Some(1),
                            ..EventFilter::default()
                        })
                        .await?;
                    let Some(first) = first.first() else {
                        return Ok(AuthorityCheck::new(
                            AuthorityRules::for_log("spiffe://empty/audit", &[])?,
                            OfficerTrust::SignatureOnly,
                        ));
                    };
                    let actor: Identity = first.actor.parse().map_err(|e| {
                        anyhow!(
                            "seq {}: actor {:?} is not an identity: {e}",
                            first.seq,
                            first.actor
                        )
                    })?;
                    eprintln!(
                        "note: the log has no signed checkpoint; its consortium is taken from its first event ({})",
                        actor.consortium
                    );
                    Identity::new(&actor.consortium, Principal::Audit)?.uri()
                }
            },
        };
        let rules = AuthorityRules::for_log(&log_id, &self.ca_admins)
            .map_err(|e| anyhow!("--ca-admin: {e}"))?;
        let ca = self
            .ca
            .clone()
            .or_else(|| self.tls_dir.as_ref().map(|d| d.join("ca.crt")));
        let trust = match ca {
            Some(path) => {
                let pem = std::fs::read_to_string(&path)
                    .with_context(|| format!("--ca {}", path.display()))?;
                OfficerTrust::ca_from_pem(&pem)
                    .map_err(|e| anyhow!("--ca {}: {e}", path.display()))?
            }
            None => {
                eprintln!(
                    "note: no --ca given: approvals' signatures are checked, but not that the officers' certificates come from the consortium CA"
                );
                OfficerTrust::SignatureOnly
            }
        };
        Ok(AuthorityCheck::new(rules, trust))
    }

    pub(crate) async fn open(&self) -> Result<Reader> {
        if let Some(url) = &self.database_url {
            return Ok(Reader::Db(AuditStore::open(url).await?));
        }
        let (Some(dir), Some(stem)) = (&self.tls_dir, &self.stem) else {
            bail!(
                "give --tls-dir and --stem to reach the audit service, or --database-url to read its database"
            );
        };
        let material = TlsMaterial::load(&TlsFiles::in_dir(dir, stem))?;
        let audit = Identity::new(&material.identity.consortium, Principal::Audit)?;
        let tls = ClientTls::from_material(&material, Some(audit))?;
        Ok(Reader::Service(
            AuditClient::connect(&self.audit, tls).await?,
        ))
    }
}

impl Reader {
    pub(crate) async fn events(&mut self, filter: &EventFilter) -> Result<Vec<Event>> {
        Ok(match self {
            Reader::Service(c) => c.query(filter).await?,
            Reader::Db(s) => s.events(filter).await?,
        })
    }

    pub(crate) async fn checkpoints(&mut self) -> Result<Vec<SignedCheckpoint>> {
        Ok(match self {
            Reader::Service(c) => c.checkpoints().await?,
            Reader::Db(s) => s.checkpoints().await?,
        })
    }

    /// The pinned key if given, else the service's (trust on first use, said on stderr).
    pub(crate) async fn public_key(&mut self, pinned: &Option<String>) -> Result<Vec<u8>> {
        if let Some(p) = pinned {
            return pinned_key(p);
        }
        match self {
            Reader::Service(c) => {
                let info = c.log_info().await?;
                eprintln!(
                    "note: checking against the key the service reports ({}); pin it with --public-key",
                    hex::encode(&info.public_key)
                );
                Ok(info.public_key)
            }
            Reader::Db(_) => bail!("--public-key is required with --database-url"),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// A report a regulator reads (sections mapped to the rules, charts, the checkpoint).
    Html,
    /// The same report as PDF.
    Pdf,
    /// The job's record as rows (section, seq, time, who, detail).
    Csv,
    /// The job's record as JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List events (a table, or JSON lines with --json), oldest first.
    Log {
        #[command(flatten)]
        source: Source,
        /// Only events about this job (its subject, or its payload's `job`).
        #[arg(long)]
        job: Option<String>,
        /// Only events by this identity (spiffe://...).
        #[arg(long)]
        actor: Option<String>,
        /// Only this action (e.g. round.completed; see tutela_audit::Action).
        #[arg(long)]
        action: Option<Action>,
        /// Only events at or after this RFC 3339 time (e.g. 2026-11-24T09:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Print one JSON object per event instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify every hash, every link and every checkpoint signature and root. On failure names
    /// the first bad sequence number and what is wrong, and exits non-zero.
    Verify {
        #[command(flatten)]
        source: Source,
        /// The log's Ed25519 checkpoint key (64 hex digits, or a file holding them, e.g. the
        /// service's checkpoint.key.pub). Default: the key the service reports.
        #[arg(long)]
        public_key: Option<String>,
        /// A checkpoint a site kept (JSON, as `tutela audit proof` or a node writes it); the log
        /// must still extend it. Repeatable.
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
    },
    /// Check, offline, an inclusion proof file (the console's "proof" download, or `proof --out`):
    /// the checkpoint's signature with the log's key, the event's hash, and the path from the
    /// event to the signed root. Exits non-zero saying what does not hold.
    VerifyProof {
        /// The proof file (JSON, `tutela-inclusion-proof/v1`).
        file: PathBuf,
        /// The log's Ed25519 checkpoint key (64 hex digits, or a file holding them, e.g. the
        /// service's checkpoint.key.pub), from a source you trust: never the copy in the file.
        #[arg(long)]
        public_key: String,
    },
    /// Prove that event SEQ is in the log: its inclusion proof against a signed checkpoint,
    /// checked here.
    Proof {
        #[command(flatten)]
        source: Source,
        /// The event's sequence number.
        #[arg(long)]
        seq: u64,
        /// The checkpoint's tree size (default: the latest).
        #[arg(long)]
        tree_size: Option<u64>,
        /// The log's key (hex or file); default: the service's.
        #[arg(long)]
        public_key: Option<String>,
        /// Also write the proof as a file `tutela audit verify-proof` checks offline.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// A model's lineage: job, base model, rounds, sites and their dataset commitments, code
    /// version, privacy accounting, approvals; the registry versions it is and their stage
    /// histories (who moved each, when and why).
    Lineage {
        #[command(flatten)]
        source: Source,
        /// The model's SHA-256 digest (64 hex digits).
        #[arg(long)]
        model: String,
        /// Print W3C PROV-JSON instead of the lineage record.
        #[arg(long)]
        prov_json: bool,
    },
    /// Quarantine forged rows (never signed over) under an operator's order countersigned by the
    /// policy's quorum of officers: docs/runbooks/audit-forged-row.md.
    #[command(subcommand)]
    Quarantine(crate::quarantine_cmd::QuarantineCommand),
    /// A compliance report of one job (--job) or one period (--from/--to). HTML and PDF: the
    /// report a regulator reads (figures rounded, each site's ε against its caps as a chart, the
    /// trail's verification, sections mapped to EU AI Act Art. 12 and 19, GDPR Art. 30 and HIPAA
    /// §164.312(b) citing their events), carrying the signed checkpoint it was made from and a
    /// digest of its content, for `verify-report`. JSON and CSV: the job's raw record.
    /// docs/reports.md.
    Report {
        #[command(flatten)]
        source: Source,
        /// The job id.
        #[arg(long)]
        job: Option<String>,
        /// The period's start (2026-06-01, 2026-06-01T09:00 or RFC 3339; UTC), inclusive.
        #[arg(long, value_name = "DATE")]
        from: Option<String>,
        /// The period's end, exclusive.
        #[arg(long, value_name = "DATE")]
        to: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        /// Write the report here (required for html and pdf).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The log's checkpoint key (hex or file) the trail is verified with; default: the
        /// service's. Required with --database-url.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Check a report (HTML or PDF) against the trail: its content digest; that the document is
    /// what its manifest renders to; the checkpoint's signature; that the trail's current head is
    /// consistent with the checkpoint; that every cited event is included in it with the content
    /// stated; and that the content is what the trail says. Exits non-zero naming what differs.
    VerifyReport {
        /// The report file.
        file: PathBuf,
        #[command(flatten)]
        source: Source,
        /// The log's checkpoint key (64 hex digits or a file), from a source you trust; default:
        /// the key the service reports. Required with --database-url.
        #[arg(long)]
        public_key: Option<String>,
    },
}

/// What `verify` says of each recorded quarantine: when, by whom, of what, why (its signatures
/// were re-checked with every other event's authority).
pub fn quarantine_lines(events: &[Event]) -> Vec<String> {
    use tutela_audit::ActionPayload as _;
    events
        .iter()
        .filter(|e| e.action == Action::AuditQuarantined)
        .map(|e| match tutela_audit::payload::AuditQuarantined::from_event(e) {
            Ok(q) => {
                let rows: Vec<String> = q
                    .terms
                    .rows
                    .iter()
                    .map(|r| format!("seq {} ({} by {})", r.seq, r.action, r.actor))
                    .collect();
                format!(
                    "QUARANTINE recorded at seq {} ({}): {} moved to audit_quarantine, reason {:?}, quorum: {}",
                    e.seq,
                    e.timestamp,
                    rows.join(", "),
                    q.terms.reason,
                    q.quorum.join(", ")
                )
            }
            Err(err) => format!("QUARANTINE at seq {}: {err}", e.seq),
        })
        .collect()
}

/// `tutela audit verify` in-process, quietly: (events, checkpoints) verified, or why not.
pub async fn verify_quiet(source: &Source, public_key: Option<String>) -> Result<(u64, u64)> {
    let mut reader = source.open().await?;
    let key = match (&public_key, &mut reader) {
        (None, Reader::Service(c)) => c.log_info().await?.public_key,
        _ => reader.public_key(&public_key).await?,
    };
    let events = reader.events(&EventFilter::default()).await?;
    let cps = reader.checkpoints().await?;
    let r = verify_log(&events, &cps, &key).map_err(|e| anyhow!("FAILED: {e}"))?;
    let check = source.authority_check(&mut reader).await?;
    check.verify(&events).map_err(|e| anyhow!("FAILED: {e}"))?;
    Ok((r.events as u64, r.checkpoints as u64))
}

/// The events of one action, oldest first (for the demo's summary).
pub async fn events_of(source: &Source, action: Action) -> Result<Vec<Event>> {
    let mut reader = source.open().await?;
    reader
        .events(&EventFilter {
            action: Some(action),
            ..EventFilter::default()
        })
        .await
}

/// The watermark registry: every `watermark.registered` event the trail holds that passes the
/// authority check, oldest first (for `tutela model verify-watermark`).
pub async fn watermark_registry(source: &Source) -> Result<Vec<lineage::WatermarkRecord>> {
    let mut reader = source.open().await?;
    let check = source.authority_check(&mut reader).await?;
    let events = reader
        .events(&EventFilter {
            action: Some(Action::WatermarkRegistered),
            ..EventFilter::default()
        })
        .await?;
    Ok(lineage::watermark_registry(&events, &check))
}

/// What the trail says about `job` (its approvals, rounds and sites), believing only events
/// that pass the authority check.
pub async fn job_record(source: &Source, job: &str) -> Result<lineage::JobRecord> {
    let mut reader = source.open().await?;
    let check = source.authority_check(&mut reader).await?;
    let mut events = reader
        .events(&EventFilter {
            job: Some(job.to_string()),
            ..EventFilter::default()
        })
        .await?;
    events.sort_by_key(|e| e.seq);
    events.dedup_by_key(|e| e.seq);
    Ok(lineage::job_record(&events, job, &check))
}

pub async fn run(cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Log {
            source,
            job,
            actor,
            action,
            since,
            json,
        } => {
            let filter = EventFilter {
                job,
                actor,
                action,
                since: since
                    .as_deref()
                    .map(tutela_audit::wire::parse_since)
                    .transpose()
                    .map_err(|e| anyhow!("--since: {e}"))?,
                ..Default::default()
            };
            let events = source.open().await?.events(&filter).await?;
            if json {
                for e in &events {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                println!(
                    "{:>8}  {:<24}  {:<20}  {:<44}  {:<24}  payload",
                    "seq", "timestamp", "action", "actor", "subject"
                );
                for e in &events {
                    let mut payload = tutela_audit::canonical_json(&e.payload);
                    if payload.len() > 100 {
                        payload.truncate(
                            payload
                                .char_indices()
                                .nth(97)
                                .map_or(payload.len(), |(i, _)| i),
                        );
                        payload.push_str("...");
                    }
                    println!(
                        "{:>8}  {:<24}  {:<20}  {:<44}  {:<24}  {payload}",
                        e.seq,
                        e.timestamp.to_string(),
                        e.action.as_str(),
                        e.actor,
                        e.subject
                    );
                }
            }
            Ok(())
        }
        AuditCommand::Verify {
            source,
            public_key,
            checkpoints,
        } => {
            let mut reader = source.open().await?;
            let key = reader.public_key(&public_key).await?;
            let events = reader
                .events(&EventFilter::default())
                .await
                .map_err(|e| anyhow!("FAILED: {e:#}"))?;
            let mut cps = reader
                .checkpoints()
                .await
                .map_err(|e| anyhow!("FAILED: {e:#}"))?;
            for path in &checkpoints {
                let text =
                    std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
                let cp: SignedCheckpoint = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a signed checkpoint", path.display()))?;
                cps.push(cp);
            }
            let check = source.authority_check(&mut reader).await?;
            match verify_log(&events, &cps, &key) {
                Ok(r) => {
                    // Every row hashes, links and is signed for: now whether its actor could
                    // assert it (a row the database took without the service is caught here).
                    if let Err(e) = check.verify(&events) {
                        bail!("FAILED: {e}");
                    }
                    println!(
                        "OK: {} events, {} checkpoint(s) verified, every actor's authority and officer's signature checked (latest covers {} events); {} event(s) after it are protected by the hash chain only",
                        r.events,
                        r.checkpoints,
                        r.latest_checkpoint.unwrap_or(0),
                        r.unanchored
                    );
                    println!("head {}  root {}", hex::encode(r.head), hex::encode(r.root));
                    if r.unanchored > 0 {
                        println!(
                            "WARNING: seq {} on ({} row(s)) is covered by no signed checkpoint: a service that signs with every commit never leaves such rows; if the service refuses to start over them, see docs/runbooks/audit-forged-row.md",
                            r.events - r.unanchored,
                            r.unanchored
                        );
                    }
                    for line in quarantine_lines(&events) {
                        println!("{line}");
                    }
                    Ok(())
                }
                Err(e) => bail!("FAILED: {e}"),
            }
        }
        AuditCommand::Quarantine(cmd) => crate::quarantine_cmd::run(cmd).await,
        AuditCommand::VerifyProof { file, public_key } => {
            let key = pinned_key(&public_key)?;
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let proof: tutela_audit::proof_file::ProofFile = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: not an inclusion proof file: {e}", file.display()))?;
            proof
                .verify(&key)
                .map_err(|e| anyhow!("FAILED: {}: {e}", file.display()))?;
            println!(
                "verified: event {} ({} by {}, subject {}) is in the log {} of {} events signed at {}",
                proof.event.seq,
                proof.event.action,
                proof.event.actor,
                proof.event.subject,
                proof.checkpoint.checkpoint.log_id,
                proof.checkpoint.checkpoint.tree_size,
                proof.checkpoint.checkpoint.timestamp
            );
            Ok(())
        }
        AuditCommand::Proof {
            source,
            seq,
            tree_size,
            public_key,
            out,
        } => {
            let mut reader = source.open().await?;
            let key = reader.public_key(&public_key).await?;
            let Reader::Service(client) = &mut reader else {
                bail!("proofs come from the audit service: use --audit, not --database-url");
            };
            let p = client.inclusion_proof(seq, tree_size).await?;
            p.checkpoint
                .verify(&key)
                .map_err(|e| anyhow!("FAILED: {e}"))?;
            if p.event.compute_hash() != p.event.hash {
                bail!("FAILED: event {seq}'s contents do not hash to its stored hash");
            }
            let n = p.checkpoint.checkpoint.tree_size;
            verify_inclusion(
                seq,
                n,
                &leaf_hash(&p.event.hash),
                &p.path,
                &p.checkpoint.checkpoint.root,
            )
            .map_err(|e| {
                anyhow!("FAILED: event {seq} is not in the signed tree of size {n}: {e}")
            })?;
            let printed = serde_json::json!({
                "event": p.event,
                "checkpoint": p.checkpoint,
                "path": p.path.iter().map(hex::encode).collect::<Vec<_>>(),
                "verified": true,
            });
            if let Some(out) = out {
                let file = tutela_audit::proof_file::ProofFile::new(p, &key);
                std::fs::write(&out, serde_json::to_string_pretty(&file)?)
                    .with_context(|| format!("{}", out.display()))?;
            }
            println!("{}", serde_json::to_string_pretty(&printed)?);
            Ok(())
        }
        AuditCommand::Lineage {
            source,
            model,
            prov_json,
        } => {
            let mut reader = source.open().await?;
            let check = source.authority_check(&mut reader).await?;
            let mut events = reader
                .events(&EventFilter {
                    subject: Some(model.clone()),
                    ..Default::default()
                })
                .await?;
            events.extend(
                reader
                    .events(&EventFilter {
                        action: Some(Action::JobCompleted),
                        ..Default::default()
                    })
                    .await?,
            );
            events.sort_by_key(|e| e.seq);
            events.dedup_by_key(|e| e.seq);
            let job = lineage::job_of_model(&events, &model, &check).ok_or_else(|| {
                anyhow!("no model.published or job.completed event names model {model}")
            })?;
            let mut job_events = reader
                .events(&EventFilter {
                    job: Some(job),
                    ..Default::default()
                })
                .await?;
            job_events.extend(
                events
                    .into_iter()
                    .filter(|e| e.action == Action::ModelPublished),
            );
            // The registry's history (every registration and stage move: a move is believed
            // only against the history of every version it moves), and what each move is
            // re-checked with: the policy texts it names and the rounds of every moved
            // version's job (the `site:*` of its stage rules).
            for action in [
                Action::ModelRegistered,
                Action::ModelStageChanged,
                Action::PolicyLoaded,
                Action::RoundCompleted,
            ] {
                job_events.extend(
                    reader
                        .events(&EventFilter {
                            action: Some(action),
                            ..Default::default()
                        })
                        .await?,
                );
            }
            job_events.sort_by_key(|e| e.seq);
            job_events.dedup_by_key(|e| e.seq);
            let l = lineage::lineage(&job_events, &model, &check);
            let out = if prov_json {
                l.to_prov_json()
            } else {
                serde_json::to_value(&l)?
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        AuditCommand::VerifyReport {
            file,
            source,
            public_key,
        } => crate::report_cmd::verify(&file, &source, &public_key).await,
        AuditCommand::Report {
            source,
            job,
            from,
            to,
            format,
            out,
            public_key,
        } => {
            let document = match format {
                Format::Html => Some(crate::report_cmd::DocumentFormat::Html),
                Format::Pdf => Some(crate::report_cmd::DocumentFormat::Pdf),
                Format::Csv | Format::Json => None,
            };
            if let Some(document) = document {
                let scope = crate::report_cmd::scope(job, from, to)?;
                let out =
                    out.ok_or_else(|| anyhow!("--format html|pdf writes a file: give --out FILE"))?;
                return crate::report_cmd::make(&source, scope, document, &out, &public_key).await;
            }
            let Some(job) = job else {
                bail!("--format json|csv prints a job's record: give --job ID");
            };
            let mut reader = source.open().await?;
            let check = source.authority_check(&mut reader).await?;
            let events = reader
                .events(&EventFilter {
                    job: Some(job.clone()),
                    ..Default::default()
                })
                .await?;
            if events.is_empty() {
                bail!("no audit events about job {job}");
            }
            let record = lineage::job_record(&events, &job, &check);
            let format = match format {
                Format::Csv => ReportFormat::Csv,
                _ => ReportFormat::Json,
            };
            print!("{}", lineage::render_report(&record, format));
            if format == ReportFormat::Json {
                println!();
            }
            Ok(())
        }
    }
}

/// A pinned checkpoint key: 64 hex digits, or a file holding them.
fn pinned_key(p: &str) -> Result<Vec<u8>> {
    let text = if std::path::Path::new(p).exists() {
        std::fs::read_to_string(p).with_context(|| p.to_string())?
    } else {
        p.to_string()
    };
    let key = hex::decode(text.trim()).map_err(|e| anyhow!("--public-key: not hex: {e}"))?;
    if key.len() != 32 {
        bail!("--public-key: {} bytes, an Ed25519 key has 32", key.len());
    }
    Ok(key)
}
