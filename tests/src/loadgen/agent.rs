//! One light site agent: the real node protocol over its own mutual-TLS connection, with
//! everything that would touch data replaced by a fixed answer.
//!
//! What it does is what `tutela-node`'s agent does on the wire (site-node/src/agent/): `Connect`
//! with the job's dataset schema, then for each task on the stream
//! - CHECK: `AnswerCheck` with no refusal;
//! - INITIALIZE: the job's model as the registry describes it (`ModelDescription`), drawn from
//!   the job's seed, uploaded through `SubmitUpdate` with the task's metadata;
//! - TRAIN: the global model downloaded in full through `FetchModel` (its stream digest checked
//!   against the model id the task names), then an update of the model's shape uploaded with
//!   the sample count and metrics a node sends.
//!
//! The update's values are the same pseudo-random delta at every site ([`SharedUpdate`], built
//! once per model shape and shared by reference: a thousand sites must not hold a thousand
//! copies), scaled to an L2 norm well inside the job's `update_norm_bound`. Each upload is still
//! its own stream with its own manifest (the task id is in it), so its digest is its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::federation::meta;
use tutela_protocol::job::JobSpec;
use tutela_protocol::model_registry::{DataDims, ModelDescription};
use tutela_protocol::pb;
use tutela_protocol::pb::federation_client::FederationClient;
use tutela_protocol::stream::{self, MemorySource, SinkError, TensorSink};
use tutela_protocol::tensor::{Manifest, TensorSpec};

/// What every agent shares: where the coordinator is, the data it pretends to hold, and the
/// counters the driver reports.
pub struct AgentShared {
    pub coordinator: String,
    /// The dataset schema announced with `Connect` (the job's `data.schema`).
    pub schema: String,
    /// The input shape and classes of that schema, which fill the model's data dimensions.
    pub dims: DataDims,
    /// Training rows each update says it was trained on.
    pub samples: u64,
    /// Simulated local training time before each upload.
    pub train_time: Duration,
    pub counters: Counters,
    update: Mutex<Option<Arc<SharedUpdate>>>,
}

/// Counters the agents update and the driver reads.
#[derive(Default)]
pub struct Counters {
    /// Agents whose `Connect` stream is open now.
    pub connected: AtomicUsize,
    /// `Connect` calls or channel handshakes that failed (each is retried).
    pub connect_failures: AtomicU64,
    pub tasks: AtomicU64,
    pub uploads_accepted: AtomicU64,
    /// Uploads or downloads the coordinator refused or that broke, with the last reason.
    pub failures: AtomicU64,
    pub last_failure: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn fail(&self, site: &str, what: &str, why: impl std::fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(format!("site {site}: {what}: {why}"));
        }
    }
}

impl AgentShared {
    pub fn new(
        coordinator: String,
        schema: String,
        dims: DataDims,
        samples: u64,
        train_time: Duration,
    ) -> Self {
        AgentShared {
            coordinator,
            schema,
            dims,
            samples,
            train_time,
            counters: Counters::default(),
            update: Mutex::new(None),
        }
    }

    /// The update for a model of `tensors`, built the first time it is asked for (every round of
    /// a job has the same shape) and then shared.
    async fn update_for(&self, tensors: &[TensorSpec], norm: f64) -> Arc<SharedUpdate> {
        let mut slot = self.update.lock().await;
        if let Some(u) = slot.as_ref().filter(|u| u.tensors == tensors) {
            return u.clone();
        }
        let u = Arc::new(SharedUpdate::random(tensors, norm, 0x5eed));
        *slot = Some(u.clone());
        u
    }
}

/// An update's tensors and their little-endian F32 bytes, shared by every agent.
pub struct SharedUpdate {
    tensors: Vec<TensorSpec>,
    data: Vec<Bytes>,
}

impl SharedUpdate {
    /// Uniform values in [-1, 1) scaled to L2 norm `norm` over the whole update.
    pub fn random(tensors: &[TensorSpec], norm: f64, seed: u64) -> SharedUpdate {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<Vec<f32>> = tensors
            .iter()
            .map(|t| {
                (0..t.numel().unwrap_or(0))
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect()
            })
            .collect();
        let sum_sq: f64 = values
            .iter()
            .flatten()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        let scale = if sum_sq > 0.0 {
            (norm / sum_sq.sqrt()) as f32
        } else {
            0.0
        };
        let data = values
            .iter()
            .map(|vs| {
                let mut b = Vec::with_capacity(vs.len() * 4);
                for v in vs {
                    b.extend_from_slice(&(v * scale).to_le_bytes());
                }
                Bytes::from(b)
            })
            .collect();
        SharedUpdate {
            tensors: tensors.to_vec(),
            data,
        }
    }

    fn source(&self, metadata: BTreeMap<String, String>) -> Result<MemorySource, String> {
        let manifest = Manifest::new(self.tensors.clone(), metadata).map_err(|e| e.to_string())?;
        MemorySource::from_parts(manifest, self.data.clone()).map_err(|e| e.to_string())
    }
}

/// Runs one site's agent until `stop` is set: connects (again, after a broken stream, with a
/// short backoff), takes tasks and answers each on its own task so that the task stream keeps
/// being read.
pub async fn run_agent(
    site: String,
    tls: ClientTls,
    shared: Arc<AgentShared>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        let channel = match client::connect(&shared.coordinator, tls.clone()).await {
            Ok(c) => c,
            Err(e) => {
                shared
                    .counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                shared.counters.fail(&site, "connect", e);
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut client = FederationClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let tasks = client
            .connect(pb::ConnectRequest {
                datasets: vec![shared.schema.clone()],
                node_version: concat!("loadgen-", env!("CARGO_PKG_VERSION")).to_string(),
                device: "cpu".into(),
            })
            .await;
        let mut tasks = match tasks {
            Ok(t) => t.into_inner(),
            Err(status) => {
                shared
                    .counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                shared.counters.fail(&site, "Connect", status.message());
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        shared.counters.connected.fetch_add(1, Ordering::Relaxed);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                next = tasks.message() => next,
            };
            match next {
                Ok(Some(task)) => {
                    shared.counters.tasks.fetch_add(1, Ordering::Relaxed);
                    let (site, client, shared) = (site.clone(), client.clone(), shared.clone());
                    tokio::spawn(async move { answer(&site, client, &shared, task).await });
                }
                Ok(None) => break,
                Err(status) => {
                    shared.counters.fail(&site, "task stream", status.message());
                    break;
                }
            }
        }
        shared.counters.connected.fetch_sub(1, Ordering::Relaxed);
        sleep_or_stop(&stop, backoff).await;
    }
}

async fn sleep_or_stop(stop: &tokio_util::sync::CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Answers one task as a node that would run it.
async fn answer(
    site: &str,
    mut client: FederationClient<Channel>,
    shared: &AgentShared,
    task: pb::Task,
) {
    let kind = pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified);
    let spec = match JobSpec::from_toml_str(&task.job_spec_toml) {
        Ok(s) => s,
        Err(e) => return shared.counters.fail(site, "the task's job spec", e),
    };
    match kind {
        pb::TaskKind::Check => {
            if let Err(s) = client
                .answer_check(pb::CheckAnswer {
                    task_id: task.task_id.clone(),
                    refusals: Vec::new(),
                })
                .await
            {
                shared.counters.fail(site, "AnswerCheck", s.message());
            }
        }
        pb::TaskKind::Initialize => {
            let tensors = match ModelDescription::for_job(&spec.model)
                .and_then(|d| d.concrete(&shared.dims))
            {
                Ok(t) => t,
                Err(e) => return shared.counters.fail(site, "the job's model", e),
            };
            // Weights of a plausible initial scale (about 0.05 per coordinate), from the seed.
            let numel: u64 = tensors.iter().filter_map(TensorSpec::numel).sum();
            let norm = 0.05 * (numel as f64).sqrt();
            let init = SharedUpdate::random(&tensors, norm, spec.seed);
            let metadata = BTreeMap::from([(meta::TASK.to_string(), task.task_id.clone())]);
            upload(site, &mut client, shared, &init, metadata).await;
        }
        pb::TaskKind::Train => {
            let started = Instant::now();
            let manifest = match fetch(&mut client, &task).await {
                Ok(m) => m,
                Err(e) => return shared.counters.fail(site, "FetchModel", e),
            };
            tokio::time::sleep(shared.train_time).await;
            // A quarter of the bound: far from refusal, however the job set it.
            let update = shared
                .update_for(manifest.tensors(), spec.update_norm_bound / 4.0)
                .await;
            let metadata = BTreeMap::from([
                (meta::TASK.to_string(), task.task_id.clone()),
                (meta::SAMPLES.to_string(), shared.samples.to_string()),
                (meta::TRAIN_LOSS.to_string(), "0.5".to_string()),
                (
                    meta::TRAIN_SECONDS.to_string(),
                    format!("{:.3}", started.elapsed().as_secs_f64()),
                ),
                (meta::EVAL_LOSS.to_string(), "0.6".to_string()),
                (meta::EVAL_ACCURACY.to_string(), "0.7".to_string()),
                (meta::EVAL_SAMPLES.to_string(), "20".to_string()),
            ]);
            upload(site, &mut client, shared, &update, metadata).await;
        }
        // The generator's agents run training jobs only (a statistics job's spec is not a
        // training spec, so such a task already failed above).
        pb::TaskKind::Statistics | pb::TaskKind::Unspecified => {
            shared
                .counters
                .fail(site, "task", "a task kind the load generator does not run")
        }
    }
}

/// Downloads the task's global model through `FetchModel` and checks its stream digest is the
/// model the task names; returns its manifest.
async fn fetch(
    client: &mut FederationClient<Channel>,
    task: &pb::Task,
) -> Result<Manifest, String> {
    let frames = client
        .fetch_model(pb::FetchModelRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let received = stream::receive(frames, DiscardSink)
        .await
        .map_err(|e| e.to_string())?;
    let digest = received.digest_hex();
    if digest != task.global_model_id {
        return Err(format!(
            "received model {digest}, the task names {}",
            task.global_model_id
        ));
    }
    Ok(received.manifest)
}

/// Checks a stream (the decoder verifies every byte against the digest) and keeps none of it:
/// a thousand agents holding the global model each would measure the generator, not the
/// coordinator.
struct DiscardSink;

impl TensorSink for DiscardSink {
    type Output = ();
    fn begin(&mut self, _manifest: &Manifest) -> Result<(), SinkError> {
        Ok(())
    }
    fn write(&mut self, _index: usize, _offset: u64, _data: &[u8]) -> Result<(), SinkError> {
        Ok(())
    }
    fn commit(self, _digest: &[u8; 32]) -> Result<(), SinkError> {
        Ok(())
    }
}

async fn upload(
    site: &str,
    client: &mut FederationClient<Channel>,
    shared: &AgentShared,
    update: &SharedUpdate,
    metadata: BTreeMap<String, String>,
) {
    let source = match update.source(metadata) {
        Ok(s) => s,
        Err(e) => return shared.counters.fail(site, "the update", e),
    };
    let (frames, _source_error) = stream::send_for_upload(source);
    match client.submit_update(frames).await {
        Ok(_) => {
            shared
                .counters
                .uploads_accepted
                .fetch_add(1, Ordering::Relaxed);
        }
        Err(s) => shared.counters.fail(site, "SubmitUpdate", s.message()),
    }
}
