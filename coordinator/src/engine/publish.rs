//! Publication of a job's final model: watermarked first when the job's spec has a
//! `[watermark]` section (`tutela_protocol::watermark`), under the consortium's key that
//! `coordinator.toml`'s `[watermark] key_file` names.
//!
//! Embedding is arithmetic on the tensors the coordinator holds, streamed from the final global
//! model's file to a new content-addressed one (one tensor in memory at a time), on a blocking
//! thread. It is deterministic (key, job id, model): a coordinator that stopped after embedding
//! but before the job was marked completed embeds again at resume and gets the same digest, so
//! each audit event is recorded once. The published digest is kept in
//! `state_dir/published/<job id>` for `tutela job status`.

use std::path::PathBuf;
use std::sync::Arc;

use tutela_audit::payload;
use tutela_protocol::job::WatermarkSpec;
use tutela_protocol::stream::SafetensorsFileSink;
use tutela_protocol::watermark::{Strength, WatermarkKey, embed_stream};

use super::{Engine, EngineError};
use crate::job::{JobId, JobSpec};

/// The p-value at or below which a verifier reports a registered mark detected. With `M`
/// registry entries tried, each entry's p-value is multiplied by `M` first.
pub const DETECTION_THRESHOLD: f64 = 1e-6;

/// What a job publishes: its final model, watermarked or not.
pub(super) struct Publication {
    pub model_id: String,
    pub watermark: Option<payload::WatermarkRegistered>,
}

impl Engine {
    fn published_marker(&self, job: &JobId) -> PathBuf {
        self.state_dir.join("published").join(job.as_str())
    }

    fn withheld_marker(&self, model_id: &str) -> PathBuf {
        self.state_dir.join("withheld").join(model_id)
    }

    /// Withholds `model_id` from `ModelExchange.Download` for good (a marker file, so a restart
    /// keeps it withheld): a watermarked job's unmarked final aggregate, which leaves only marked.
    pub fn withhold_model(&self, model_id: &str) -> std::io::Result<()> {
        let marker = self.withheld_marker(model_id);
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&marker, b"")
    }

    /// Whether `model_id` is withheld ([`Self::withhold_model`]). An id that is not a digest is
    /// never a marker's name (the store refuses it on its own).
    pub fn is_withheld(&self, model_id: &str) -> bool {
        model_id.len() == 64
            && model_id.bytes().all(|b| b.is_ascii_hexdigit())
            && self.withheld_marker(model_id).exists()
    }

    /// The digest of the model `job` published, when it differs from its last round's global
    /// model (a watermarked one).
    pub fn published_model(&self, job: &JobId) -> Option<String> {
        let text = std::fs::read_to_string(self.published_marker(job)).ok()?;
        let id = text.trim();
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    }

    /// Refuses, at submission, a job asking for a watermark this coordinator cannot embed.
    pub(super) fn check_watermark_key(&self, spec: &JobSpec) -> Result<(), EngineError> {
        if spec.watermark.is_some() && self.watermark_key.get().is_none() {
            return Err(EngineError::NotConfigured(
                "watermark: the job asks for a watermark, but this coordinator has no key \
                 (coordinator.toml: [watermark] key_file); remove [watermark] from the job or \
                 configure the consortium's key"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The model `job` publishes from its final global model `final_id`.
    pub(super) async fn publication(
        &self,
        job: &JobId,
        spec: &JobSpec,
        final_id: &str,
    ) -> Result<Publication, EngineError> {
        let Some(w) = &spec.watermark else {
            return Ok(Publication {
                model_id: final_id.to_string(),
                watermark: None,
            });
        };
        let key = self.watermark_key.get().cloned().ok_or_else(|| {
            EngineError::Failed(
                "watermark: the job asks for a watermark, but this coordinator has no key \
                 (coordinator.toml: [watermark] key_file); its final model is kept unpublished \
                 at the last round"
                    .into(),
            )
        })?;
        // The unmarked aggregate is withheld before the mark is embedded, so that no copy of it
        // is served while (or after) the marked one is made; fail closed.
        self.withhold_model(final_id).map_err(|e| {
            EngineError::Failed(format!(
                "watermark: withholding the unmarked final model {final_id}: {e}"
            ))
        })?;
        let strength = w.strength(spec.lora.is_some());
        let registered = self.embed(job, final_id, key, w.clone(), strength).await?;
        let marker = self.published_marker(job);
        let write = || -> std::io::Result<()> {
            let dir = marker.parent().unwrap_or(&self.state_dir);
            std::fs::create_dir_all(dir)?;
            let tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::fs::write(tmp.path(), &registered.model_digest)?;
            tmp.persist(&marker).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(|e| {
            EngineError::Failed(format!("recording the published model's digest: {e}"))
        })?;
        Ok(Publication {
            model_id: registered.model_digest.clone(),
            watermark: Some(registered),
        })
    }

    /// Embeds the job's mark into `final_id`, writing the result into the model store.
    async fn embed(
        &self,
        job: &JobId,
        final_id: &str,
        key: Arc<WatermarkKey>,
        spec: WatermarkSpec,
        strength: Strength,
    ) -> Result<payload::WatermarkRegistered, EngineError> {
        let input = self.model_path(final_id);
        let dir = self.model_dir.clone();
        let mark_id = job.as_str().to_string();
        let mark = key.mark(&mark_id);
        let started = std::time::Instant::now();
        let (_, digest, report) = tokio::task::spawn_blocking(move || {
            embed_stream(
                &input,
                SafetensorsFileSink::content_addressed(dir),
                &mark,
                strength,
            )
        })
        .await
        .map_err(|e| EngineError::Failed(format!("watermark: the embedding task failed: {e}")))?
        .map_err(|e| EngineError::Failed(format!("watermark: {e}")))?;
        let model_digest = hex::encode(digest);
        tracing::info!(
            job = %job, source = %final_id, model = %model_digest, amplitude = report.amplitude,
            tensors = report.tensors, values = report.values, expected_z = report.expected_z,
            seconds = started.elapsed().as_secs_f64(), "final model watermarked"
        );
        Ok(payload::WatermarkRegistered {
            job: mark_id.clone(),
            model_digest,
            source_digest: final_id.to_string(),
            scheme: spec.scheme.as_str().to_string(),
            key_commitment: key.commitment(),
            mark_id,
            amplitude: report.amplitude,
            expected_z: report.expected_z,
            threshold: DETECTION_THRESHOLD,
        })
    }
}
