//! `tutela model ...`: Hugging Face checkpoints on the operator's machine, without libtorch
//! (the arithmetic is `tutela_protocol::checkpoint`'s), and watermark verification against the
//! audit trail's registry (`tutela_protocol::watermark`, `tutela_audit::lineage`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use tutela_audit::lineage::WatermarkRecord;
use tutela_protocol::checkpoint::{export_int8, merge_lora};
use tutela_protocol::job::JobSpec;
use tutela_protocol::peft_export::export_peft_adapter;
use tutela_protocol::stream::model_digest_of_file;
use tutela_protocol::watermark::{
    MarkKey, Reference, WatermarkKey, detect_aligned_marks, detect_file_marks_against,
    detect_merged_marks, human_p_value, job_base_weights, verdict,
};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Merge a LoRA adapter (PEFT layout) into its base model: writes a full Hugging Face
    /// checkpoint with W' = W + (alpha / r) B A for every adapted module, in the base's dtype.
    Merge {
        /// The base model's directory (config.json, model.safetensors).
        #[arg(long)]
        base: PathBuf,
        /// The adapter's directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model (created; existing files are overwritten).
        #[arg(long)]
        output: PathBuf,
    },
    /// Write a LoRA job's published model (its adapters' B, as the coordinator published them)
    /// as a PEFT adapter directory that PEFT and `tutela model merge` read: each module's A is
    /// the one every site derived from the job's seed, shaped by the base's module.
    ExportAdapter {
        /// The job spec (TOML): its `[lora]` and `seed`.
        #[arg(long)]
        job: PathBuf,
        /// The published model (safetensors of the adapters' B).
        #[arg(long)]
        model: PathBuf,
        /// The base checkpoint's directory (config.json, model.safetensors).
        #[arg(long)]
        base: PathBuf,
        /// The PEFT directory to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Export a model with its Linear weights quantized to INT8 (per output channel,
    /// symmetric; format tutela-int8-v1, see docs/architecture.md).
    ExportInt8 {
        /// The model's directory (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Where to write the quantized model.
        #[arg(long)]
        output: PathBuf,
    },
    /// Make a consortium watermark key (32 random bytes as 64 hex digits), for the
    /// `key_file` of coordinator.toml's `[watermark]`. The file is created readable by its owner only.
    WatermarkKey {
        /// The key file to create (an existing file is not overwritten).
        #[arg(long)]
        output: PathBuf,
    },
    /// Test a model file (safetensors, or an INT8 export) for the consortium's watermark: tries
    /// every watermark the audit trail registered under this key and prints the decision, the
    /// p-value, and the entry it matched with its job's lineage (sites, approvals). Matches by
    /// detection, not by file digest: a renamed, reordered or re-serialized copy still matches.
    /// Exits with status 1 when nothing is detected. A LoRA job's mark is in its adapters' B;
    /// a full checkpoint made by merging them into the base is tested with `--merged-base` and
    /// `--job`: the adapters are recovered from it against the job's base and seed (modules
    /// renamed in the file are found by content). A copy whose hidden units were permuted or
    /// whose weights were written transposed is tested with `--reference` and `--align`.
    VerifyWatermark {
        /// The model file to test (a directory means its model.safetensors).
        file: PathBuf,
        /// FILE is a merged checkpoint of a LoRA job: the base model's directory the job named
        /// (its digest must be the job's model.base_sha256).
        #[arg(long, requires = "job")]
        merged_base: Option<PathBuf>,
        /// The LoRA job's spec (TOML), with --merged-base: its [lora], seed and
        /// model.base_sha256.
        #[arg(long, requires = "merged_base")]
        job: Option<PathBuf>,
        /// Informed detection: the registry's model, subtracted tensor by tensor before the
        /// test. It must be the registered model: its digest must be a registry entry's source
        /// (the unmarked aggregate; for a LoRA job its adapters' B) or published digest (then
        /// the mark is taken out with the entry's mark key and amplitude before use), else it
        /// is refused naming both digests; only that entry is then tried. Needed for a small
        /// LoRA adapter, whose mark is too faint to test blind. With --mark-id the trail is not
        /// read, so the reference is taken as the unmarked model, unchecked.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Lay FILE onto the --reference model before testing: tensors paired by name or, when
        /// renamed, by content; matrices stored transposed turned back; hidden units (rows of
        /// one layer with the columns of the next, convolution channels) matched to the
        /// reference's by weight-vector similarity. Finds copies whose units were permuted or
        /// whose weights were written [in, out]. Holds both models in memory.
        #[arg(long, requires = "reference", conflicts_with = "merged_base")]
        align: bool,
        /// The consortium's watermark key file.
        #[arg(long)]
        key: PathBuf,
        /// Test one mark id (a job id) without reading the trail.
        #[arg(long)]
        mark_id: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: crate::audit_cmd::Source,
    },
    /// The coordinator's model registry: list, show, promote, rollback, fetch.
    #[command(flatten)]
    Registry(crate::registry_cmd::RegistryCommand),
}

pub async fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Registry(cmd) => return crate::registry_cmd::run(cmd).await,
        ModelCommand::Merge {
            base,
            adapter,
            output,
        } => {
            let report = merge_lora(&base, &adapter, &output).context("merging the adapter")?;
            println!(
                "merged {} adapted modules into {} tensors: {}",
                report.merged_modules,
                report.tensors,
                output.display()
            );
        }
        ModelCommand::ExportAdapter {
            job,
            model,
            base,
            output,
        } => {
            let text = std::fs::read_to_string(&job)
                .with_context(|| format!("reading the job spec {}", job.display()))?;
            let spec = JobSpec::from_toml_str(&text)
                .with_context(|| format!("the job spec {}", job.display()))?;
            let lora = spec
                .lora
                .as_ref()
                .with_context(|| format!("the job spec {} has no [lora]", job.display()))?;
            let report = export_peft_adapter(lora, spec.seed, &model, &base, &output)
                .context("exporting the adapter")?;
            println!(
                "wrote the PEFT adapter ({} modules, rank {}): {}",
                report.modules,
                lora.rank,
                output.display()
            );
        }
        ModelCommand::ExportInt8 { model, output } => {
            let report = export_int8(&model, &output).context("exporting INT8")?;
            println!(
                "quantized {} Linear weights, copied {} tensors: {} bytes -> {} bytes ({})",
                report.quantized,
                report.copied,
                report.bytes_in,
                report.bytes_out,
                output.display()
            );
        }
        ModelCommand::WatermarkKey { output } => {
            let key = WatermarkKey::generate()
                .map_err(|_| anyhow::anyhow!("the system's random generator failed"))?;
            write_private(&output, &key.to_hex())
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "wrote a watermark key to {} (commitment {})",
                output.display(),
                key.commitment()
            );
        }
        ModelCommand::VerifyWatermark {
            file,
            merged_base,
            job,
            reference,
            align,
            key,
            mark_id,
            json,
            source,
        } => {
            let merged = match (merged_base, job) {
                (Some(base), Some(job)) => Some(MergedOrigin { base, job }),
                _ => None,
            };
            let target = Target {
                file,
                merged,
                reference,
                align,
            };
            return verify_watermark(&target, &key, mark_id, json, &source).await;
        }
    }
    Ok(())
}

/// Creates `path` with `text`, readable and writable by its owner only; refuses to overwrite.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    writeln!(f, "{text}")?;
    f.sync_all()
}

/// One candidate mark tried: the registry entry (absent for `--mark-id`) and its detection.
struct Candidate {
    entry: Option<WatermarkRecord>,
    mark_id: String,
    threshold: f64,
}

/// Where a merged checkpoint came from: the LoRA job's base and spec (`--merged-base`, `--job`).
struct MergedOrigin {
    base: PathBuf,
    job: PathBuf,
}

/// What `verify-watermark` tests: the file, and how to read it.
struct Target {
    file: PathBuf,
    merged: Option<MergedOrigin>,
    reference: Option<PathBuf>,
    align: bool,
}

/// The `--reference` model as the registry knows it: the unmarked source, or the published
/// model with the mark to take out of it.
enum ReferenceKind {
    Source,
    Published { mark: MarkKey, amplitude: f64 },
}

/// Checks the `--reference` file against the registry entries under the key: its digest must
/// be an entry's source or published digest. Keeps only the entries it belongs to, and says
/// how to read it. Without entries (`--mark-id`), it is taken as the unmarked source.
fn check_reference(
    path: &std::path::Path,
    candidates: &mut Vec<Candidate>,
    key: &WatermarkKey,
) -> anyhow::Result<ReferenceKind> {
    let digest = hex::encode(
        model_digest_of_file(&weights_file(path))
            .with_context(|| format!("reading the reference model {}", path.display()))?,
    );
    if candidates.iter().all(|c| c.entry.is_none()) {
        eprintln!(
            "reference {} (digest {digest}) is taken as the unmarked model: with --mark-id the \
             trail's registry is not read, so it is not checked against it",
            path.display()
        );
        return Ok(ReferenceKind::Source);
    }
    let registered: Vec<String> = candidates
        .iter()
        .filter_map(|c| c.entry.as_ref())
        .map(|e| {
            format!(
                "job {}: published {}, source {}",
                e.registered.job, e.registered.model_digest, e.registered.source_digest
            )
        })
        .collect();
    candidates.retain(|c| {
        c.entry.as_ref().is_some_and(|e| {
            e.registered.source_digest == digest || e.registered.model_digest == digest
        })
    });
    let Some(entry) = candidates.first().and_then(|c| c.entry.as_ref()) else {
        anyhow::bail!(
            "the reference {} has digest {digest}, which is neither the published nor the source \
             digest of any registry entry under this key ({}): a --reference must be the \
             registered model",
            path.display(),
            registered.join("; ")
        );
    };
    Ok(if entry.registered.model_digest == digest {
        ReferenceKind::Published {
            mark: key.mark(&entry.registered.mark_id),
            amplitude: entry.registered.amplitude,
        }
    } else {
        ReferenceKind::Source
    })
}

/// `path`, or its `model.safetensors` when it is a directory.
fn weights_file(path: &std::path::Path) -> PathBuf {
    if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// Each mark's detection in the target's file: directly, or on the adapters recovered from a
/// merged checkpoint (`tutela_protocol::watermark::detect_merged_marks`); informed by the
/// reference when one is given.
fn detections(
    target: &Target,
    reference_kind: Option<ReferenceKind>,
    marks: &[MarkKey],
) -> anyhow::Result<Vec<tutela_protocol::watermark::Detection>> {
    let file = weights_file(&target.file);
    let mut reference = match (&target.reference, reference_kind) {
        (Some(path), kind) => {
            let weights = weights_file(path);
            let opened = match kind {
                Some(ReferenceKind::Published { mark, amplitude }) => {
                    Reference::open_published(&weights, mark, amplitude)
                }
                _ => Reference::open(&weights),
            };
            Some(opened.with_context(|| format!("the reference model {}", path.display()))?)
        }
        (None, _) => None,
    };
    if let (true, Some(reference)) = (target.align, reference.as_mut()) {
        let (detections, report) = detect_aligned_marks(&file, reference, marks)?;
        eprintln!(
            "aligned to the reference: {} tensor(s) paired by name, {} by content, {} transposed \
             back, {} with units moved{}",
            report.by_name,
            report.by_content,
            report.transposed,
            report.permuted,
            if report.unpaired_reference.is_empty() {
                String::new()
            } else {
                format!(
                    "; the reference's {} tensor(s) the file has no match for are left out: {}",
                    report.unpaired_reference.len(),
                    report.unpaired_reference.join(", ")
                )
            }
        );
        return Ok(detections);
    }
    let Some(origin) = &target.merged else {
        return Ok(detect_file_marks_against(&file, reference.as_mut(), marks)?);
    };
    let text = std::fs::read_to_string(&origin.job)
        .with_context(|| format!("reading the job spec {}", origin.job.display()))?;
    let spec = JobSpec::from_toml_str(&text)
        .with_context(|| format!("the job spec {}", origin.job.display()))?;
    let lora = spec.lora.as_ref().with_context(|| {
        format!(
            "the job spec {} has no [lora]: only a LoRA job's adapters are merged",
            origin.job.display()
        )
    })?;
    let base = job_base_weights(&origin.base, spec.model.base_sha256.as_deref())?;
    let (detections, recovery) =
        detect_merged_marks(&file, &base, lora, spec.seed, reference.as_mut(), marks)?;
    if recovery.adapters.is_empty() {
        anyhow::bail!(
            "{} has none of the {} adapted modules of the job's base: it is not a merge of this job's adapters",
            file.display(),
            recovery.missing.len()
        );
    }
    if !recovery.by_content.is_empty() {
        eprintln!(
            "matched by content, not by name: {}",
            recovery
                .by_content
                .iter()
                .map(|(base, found)| format!("{base} = {found}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!(
        "recovered the adapters of {} module(s) from the merged checkpoint against the job's base{}",
        recovery.adapters.len(),
        if recovery.missing.is_empty() {
            String::new()
        } else {
            format!(
                " ({} adapted module(s) absent from the file: {})",
                recovery.missing.len(),
                recovery.missing.join(", ")
            )
        }
    );
    Ok(detections)
}

async fn verify_watermark(
    target: &Target,
    key_file: &std::path::Path,
    mark_id: Option<String>,
    json: bool,
    source: &crate::audit_cmd::Source,
) -> anyhow::Result<()> {
    let key = WatermarkKey::read_file(key_file)?;
    let commitment = key.commitment();
    let mut candidates: Vec<Candidate> = match mark_id {
        Some(id) => vec![Candidate {
            entry: None,
            mark_id: id,
            threshold: tutela_coordinator::engine::DETECTION_THRESHOLD,
        }],
        None => {
            let registry = crate::audit_cmd::watermark_registry(source).await?;
            let total = registry.len();
            let mine: Vec<Candidate> = registry
                .into_iter()
                .filter(|e| e.registered.key_commitment == commitment)
                .map(|e| Candidate {
                    mark_id: e.registered.mark_id.clone(),
                    threshold: e.registered.threshold,
                    entry: Some(e),
                })
                .collect();
            if mine.is_empty() {
                anyhow::bail!(
                    "the audit trail registers {total} watermark(s), none under this key \
                     (commitment {commitment}): nothing to test against"
                );
            }
            mine
        }
    };
    let reference_kind = match &target.reference {
        Some(path) => Some(check_reference(path, &mut candidates, &key)?),
        None => None,
    };
    let marks: Vec<_> = candidates.iter().map(|c| key.mark(&c.mark_id)).collect();
    let detections = detections(target, reference_kind, &marks)?;
    let file = target.file.as_path();
    let tried = candidates.len();
    let thresholds: Vec<f64> = candidates.iter().map(|c| c.threshold).collect();
    let Some(v) = verdict(&detections, &thresholds) else {
        anyhow::bail!("no registry entry to test");
    };
    let (best, detection, log10_p, detected) =
        (&candidates[v.index], v.detection, v.log10_p, v.detected);
    let lineage = match (&best.entry, detected) {
        (Some(e), true) => Some(crate::audit_cmd::job_record(source, &e.registered.job).await?),
        _ => None,
    };
    if json {
        let out = serde_json::json!({
            "file": file.display().to_string(),
            "detected": detected,
            "p_value": human_p_value(log10_p),
            "log10_p": log10_p,
            "z": detection.z,
            "entries_tried": tried,
            "key_commitment": commitment,
            "mark_id": best.mark_id,
            "entry": best.entry,
            "lineage": lineage,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "watermark: {} — p {} (z = {:.1} over {} values in {} tensors; {} mark{} tried under key {})",
            if detected { "DETECTED" } else { "not detected" },
            human_p_value(log10_p),
            detection.z,
            detection.values,
            detection.tensors,
            tried,
            if tried == 1 { "" } else { "s" },
            &commitment[..16],
        );
        if detected {
            print_match(best, lineage.as_ref());
        }
    }
    if !detected {
        std::process::exit(1);
    }
    Ok(())
}

fn print_match(best: &Candidate, lineage: Option<&tutela_audit::lineage::JobRecord>) {
    let Some(entry) = &best.entry else {
        println!(
            "mark id {} (given with --mark-id; the trail was not read)",
            best.mark_id
        );
        return;
    };
    let w = &entry.registered;
    println!(
        "registry entry: seq {} at {}: job {}, scheme {}, published model {} (made from aggregate {})",
        entry.seq, entry.timestamp, w.job, w.scheme, w.model_digest, w.source_digest
    );
    let Some(r) = lineage else { return };
    println!(
        "job {}: {}{}, {} round(s), proposed by {} (spec {})",
        r.job,
        r.outcome,
        r.outcome_seq
            .map(|s| format!(" at seq {s}"))
            .unwrap_or_default(),
        r.rounds.len(),
        r.proposed_by.as_deref().unwrap_or("?"),
        r.spec_digest.as_deref().unwrap_or("?"),
    );
    println!(
        "sites: {}",
        if r.participants.is_empty() {
            "-".into()
        } else {
            r.participants.join(", ")
        }
    );
    for a in &r.approvals {
        println!(
            "  {} by {} (site {}) at seq {}",
            a.decision,
            a.officer.as_deref().unwrap_or("?"),
            a.site.as_deref().unwrap_or("?"),
            a.seq
        );
    }
    for f in &r.flagged {
        println!(
            "  NOT BELIEVED: seq {} {} by {}: {}",
            f.seq, f.action, f.actor, f.reason
        );
    }
}
