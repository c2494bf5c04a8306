//! `tutela audit report` (HTML and PDF) and `tutela audit verify-report`: the thin edge over
//! `tutela_audit::report`, reading the trail through the audit service or its database.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tutela_audit::report::check::{check_against_trail, check_document};
use tutela_audit::report::trail::StoreTrail;
use tutela_audit::report::{
    ReportContext, ReportManifest, ReportScope, VerificationSummary, build_content, gather,
};
use tutela_audit::store::EventFilter;
use tutela_audit::{Event, SignedCheckpoint, Timestamp, verify_log};

use crate::audit_cmd::{Reader, Source};

/// The document a report is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentFormat {
    Html,
    Pdf,
}

/// A time as a person types it (`2026-06-01`, `2026-06-01T09:00`, RFC 3339), read as UTC.
pub fn parse_date(flag: &str, text: &str) -> Result<Timestamp> {
    tutela_audit::console::parse_time(text).map_err(|e| anyhow!("{flag}: {e}"))
}

/// The scope of `--job` or `--from`/`--to`.
pub fn scope(job: Option<String>, from: Option<String>, to: Option<String>) -> Result<ReportScope> {
    match (job, from, to) {
        (Some(job), None, None) => Ok(ReportScope::job(&job)?),
        (None, Some(from), Some(to)) => Ok(ReportScope::period(
            parse_date("--from", &from)?,
            parse_date("--to", &to)?,
        )?),
        (None, Some(_), None) | (None, None, Some(_)) => {
            bail!("a period needs both --from and --to")
        }
        (None, None, None) => bail!("give --job ID, or --from DATE --to DATE"),
        (Some(_), _, _) => bail!("give either --job or --from/--to, not both"),
    }
}

/// The whole trail verified now, as a report states it (never fails: a broken trail is what the
/// report then says).
fn verification(
    events: &[Event],
    checkpoints: &[SignedCheckpoint],
    key: &[u8],
    check: &tutela_audit::authority::AuthorityCheck,
) -> VerificationSummary {
    let verified_at = Timestamp::now();
    match verify_log(events, checkpoints, key) {
        Ok(r) => match check.verify(events) {
            Ok(_) => VerificationSummary {
                intact: Some(true),
                verified_at,
                events: r.events,
                checkpoints: r.checkpoints as u64,
                detail: format!(
                    "{} events and {} checkpoint(s) verified (hashes, links, signatures, roots), every actor's authority and officer's signature checked; {} event(s) after the newest checkpoint",
                    r.events, r.checkpoints, r.unanchored
                ),
            },
            Err(e) => VerificationSummary {
                intact: Some(false),
                verified_at,
                events: r.events,
                checkpoints: r.checkpoints as u64,
                detail: format!("authority check failed: {e}"),
            },
        },
        Err(e) => VerificationSummary {
            intact: Some(false),
            verified_at,
            events: events.len() as u64,
            checkpoints: checkpoints.len() as u64,
            detail: e.to_string(),
        },
    }
}

/// Makes the report of `scope` from the trail's newest signed checkpoint and writes it to `out`.
pub async fn make(
    source: &Source,
    scope: ReportScope,
    format: DocumentFormat,
    out: &Path,
    public_key: &Option<String>,
) -> Result<()> {
    let mut reader = source.open().await?;
    let key = reader.public_key(public_key).await?;
    let check = source.authority_check(&mut reader).await?;
    let all = reader.events(&EventFilter::default()).await?;
    let cps = reader.checkpoints().await?;
    let head = cps
        .iter()
        .max_by_key(|c| c.checkpoint.tree_size)
        .cloned()
        .ok_or(tutela_audit::report::ReportError::NoCheckpoint)?;
    let verified = verification(&all, &cps, &key, &check);
    if verified.intact != Some(true) {
        eprintln!(
            "WARNING: the trail does not verify ({}); the report says so",
            verified.detail
        );
    }
    let events = gather(&scope, head.checkpoint.tree_size, async |f: EventFilter| {
        Ok::<_, anyhow::Error>(all.iter().filter(|e| f.matches(e)).cloned().collect())
    })
    .await?;
    let content = build_content(
        &events,
        &scope,
        head.checkpoint.tree_size,
        &check,
        &head.checkpoint.log_id,
    )?;
    let generated_by = match &reader {
        Reader::Service(_) => format!(
            "tutela audit report (via the audit service at {})",
            source.audit
        ),
        Reader::Db(_) => "tutela audit report (from the audit database)".to_string(),
    };
    let manifest = ReportManifest::new(
        head,
        ReportContext {
            generated_at: Timestamp::now(),
            generated_by,
            verification: verified,
            retention_min_days: None,
        },
        content,
    )?;
    let bytes = match format {
        DocumentFormat::Html => tutela_audit::report::html::render(&manifest)?.into_bytes(),
        DocumentFormat::Pdf => tutela_audit::report::pdf::render(&manifest)?,
    };
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} bytes): {}, {} events in scope, checkpoint of size {}, content digest {}",
        out.display(),
        bytes.len(),
        manifest.content.scope,
        manifest
            .content
            .facts
            .iter()
            .find(|f| f.label == "Events in scope")
            .map_or("?", |f| f.value.as_str()),
        manifest.checkpoint.checkpoint.tree_size,
        manifest.content_digest
    );
    Ok(())
}

/// `verify-report FILE`: the document, then the trail.
pub async fn verify(file: &PathBuf, source: &Source, public_key: &Option<String>) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    let (kind, m) =
        check_document(&bytes).map_err(|e| anyhow!("FAILED: {}: {e}", file.display()))?;
    println!(
        "ok: {kind} document matches its manifest (content digest {})",
        m.content_digest
    );
    let mut reader = source.open().await?;
    let key = reader.public_key(public_key).await?;
    let check = source.authority_check(&mut reader).await?;
    let result = match &mut reader {
        Reader::Service(client) => check_against_trail(&m, &key, client, &check).await,
        Reader::Db(store) => {
            let mut trail = StoreTrail::new(store.clone());
            check_against_trail(&m, &key, &mut trail, &check).await
        }
    };
    let t = result.map_err(|e| anyhow!("FAILED: {}: {e}", file.display()))?;
    let cp = &m.checkpoint.checkpoint;
    println!(
        "ok: checkpoint of size {} signed by {} at {} verifies with the log's key",
        cp.tree_size, cp.log_id, cp.timestamp
    );
    println!(
        "ok: the trail's head (size {}) is consistent with it",
        t.head_size
    );
    println!(
        "ok: {} cited event(s) included in it with the content the report states",
        t.cited
    );
    println!("ok: the report's content is what the trail up to its checkpoint says");
    println!("verified: {} ({})", file.display(), m.content.scope);
    Ok(())
}
