//! The node's config, its agent against an in-process fake coordinator over real mutual TLS
//! (certificates made at test time), and the `tutela-node` CLI.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tutela_protocol::identity::Principal;
use tutela_protocol::pb;
use tutela_protocol::pki::{CertificateAuthority, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::server::MAX_MESSAGE_BYTES;
use tutela_protocol::stream::{self, MemorySink, MemorySource, StreamDigest};
use tutela_protocol::tensor::Manifest;
use tutela_protocol::tls::{ReloadingServerConfig, TlsFiles};
use tutela_site_node::agent::{Agent, AgentError, Backoff, meta};
use tutela_site_node::config::{ConfigError, Corruption, NodeConfig};
use tutela_site_node::models::{Model, ModelSpec};
use tutela_site_node::weights::{NamedTensors, export_weights, f32_values, save_safetensors};

/// What leaves of a round's metrics under central DP: nothing exact.
mod metrics_modes;
/// A dataset whose source is down at start: re-checked, announced when it comes up, withdrawn
/// when it fails a task.
mod readiness;

pub(crate) const CONSORTIUM: &str = "acme";
pub(crate) const SITE: &str = "hospital-a";
/// How long a test waits for the node to do something before it fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn data_dir() -> PathBuf {
    repo().join("data")
}

pub(crate) fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------------------------
// Certificates

pub(crate) struct Pki {
    pub(crate) coordinator: TlsFiles,
    pub(crate) node: TlsFiles,
}

fn write_set(dir: &Path, stem: &str, ca: &CertificateAuthority, cert: &str, key: &str) -> TlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    let now = OffsetDateTime::now_utc();
    let crl = ca
        .crl_pem(
            &[],
            1,
            now - time::Duration::minutes(1),
            now + time::Duration::days(7),
        )
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), cert).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), key).unwrap();
    std::fs::write(dir.join("crl.pem"), crl).unwrap();
    TlsFiles::in_dir(dir, stem)
}

/// A consortium CA, a coordinator certificate for 127.0.0.1 and a node certificate for `site`.
fn pki(dir: &Path, site: &str) -> Pki {
    pki_with_ca(dir, site).0
}

/// [`pki`], and the CA, to issue more certificates (compliance officers') from.
pub(crate) fn pki_with_ca(dir: &Path, site: &str) -> (Pki, CertificateAuthority) {
    let ca = CertificateAuthority::create(
        CONSORTIUM,
        KeyAlgorithm::EcdsaP256,
        Validity::days_from_now(30),
    )
    .unwrap();
    let mut server_opts = LeafOptions::new(Validity::days_from_now(30));
    server_opts.dns_names = vec!["localhost".into()];
    server_opts.ip_addresses = vec!["127.0.0.1".parse().unwrap()];
    let coordinator = ca.issue(&Principal::Coordinator, &server_opts).unwrap();
    let node = ca
        .issue(
            &Principal::Node { site: site.into() },
            &LeafOptions::new(Validity::days_from_now(30)),
        )
        .unwrap();
    let pki = Pki {
        coordinator: write_set(
            &dir.join("coordinator"),
            "coordinator",
            &ca,
            &coordinator.cert_pem,
            &coordinator.key_pem,
        ),
        node: write_set(
            &dir.join("node"),
            "node",
            &ca,
            &node.cert_pem,
            &node.key_pem,
        ),
    };
    (pki, ca)
}

// ---------------------------------------------------------------------------------------------
// The node's config

/// The top-level key of a test node that checks no approvals (the agent tests that are not about
/// approvals); a node config must have it or a `site_policy`.
const NO_APPROVALS: &str = "insecure_no_approvals = true";

/// A node config; `top_level` holds top-level keys (`site_policy`, or [`NO_APPROVALS`]), `extra`
/// is appended after every table.
pub(crate) fn node_config_text(
    site: &str,
    coordinator: &str,
    tls: &TlsFiles,
    top_level: &str,
    extra: &str,
) -> String {
    let data = data_dir();
    let dataset = format!(
        "csv = \"{}\"\nschema = \"{}\"\nsplit_seed = 3\n",
        data.join("breast_cancer_wisconsin.csv").display(),
        data.join("breast_cancer.schema.toml").display(),
    );
    node_config_with_dataset(site, coordinator, tls, top_level, extra, &dataset)
}

/// [`node_config_text`] with `dataset` as the body of `[datasets.breast_cancer]`.
fn node_config_with_dataset(
    site: &str,
    coordinator: &str,
    tls: &TlsFiles,
    top_level: &str,
    extra: &str,
    dataset: &str,
) -> String {
    // `tutela-node run` refuses to start without [audit] unless the trail is waived by name (the
    // coordinator on loopback): a test that configures no trail waives it.
    let waiver = if top_level.contains("insecure_no_audit") || extra.contains("[audit]") {
        ""
    } else {
        "insecure_no_audit = true"
    };
    format!(
        r#"
site = "{site}"
coordinator = "{coordinator}"
work_dir = "work"
device = "cpu"
{waiver}
{top_level}

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
crl = "{crl}"

[datasets.breast_cancer]
{dataset}

[reconnect]
initial_backoff_secs = 0.05
max_backoff_secs = 0.2
{extra}
"#,
        ca = tls.ca.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
        crl = tls.crl.as_ref().unwrap().display(),
    )
}

fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
    NodeConfig::from_toml_str(text, "/etc/tutela/node.toml")
}

const MINIMAL: &str = r#"
site = "hospital-a"
coordinator = "coord.example:7443"
work_dir = "work"
site_policy = "site-policy.toml"
[tls]
ca = "ca.crt"
cert = "node.crt"
key = "node.key"
[datasets.breast_cancer]
csv = "bc.csv"
schema = "bc.schema.toml"
"#;

#[test]
fn config_defaults_and_relative_paths() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.site, "hospital-a");
    assert_eq!(c.tls.ca, PathBuf::from("/etc/tutela/ca.crt"));
    assert_eq!(c.work_dir, PathBuf::from("/etc/tutela/work"));
    assert_eq!(
        c.site_policy,
        Some(PathBuf::from("/etc/tutela/site-policy.toml"))
    );
    assert!(!c.insecure_no_approvals);
    let d = &c.datasets["breast_cancer"];
    assert_eq!(d.path, PathBuf::from("/etc/tutela/bc.csv"));
    assert_eq!((d.validation_fraction, d.split_seed), (0.2, 0));
    assert_eq!(c.reconnect.initial(), Duration::from_secs(1));
    assert_eq!(c.reconnect.max(), Duration::from_secs(60));
    assert!(c.testing.is_none());
    assert!(c.tokenizers.is_empty());
    let c = parse(&format!("tokenizers = [\"tok/tokenizer.json\"]\n{MINIMAL}")).unwrap();
    assert_eq!(
        c.tokenizers,
        vec![PathBuf::from("/etc/tutela/tok/tokenizer.json")]
    );
}

#[test]
fn config_errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        // (config text, what the error must name)
        (&format!("sit = \"x\"\n{MINIMAL}"), "sit"),
        (
            &MINIMAL.replace("coordinator = \"coord.example:7443\"\n", ""),
            "coordinator",
        ),
        (
            &MINIMAL.replace("coord.example:7443", "coord.example"),
            "`coordinator`",
        ),
        (
            &MINIMAL.replace("coord.example:7443", "coord example:7443"),
            "`coordinator`",
        ),
        (
            &MINIMAL.replace("site = \"hospital-a\"", "site = \"a/b\""),
            "`site`",
        ),
        (&format!("device = \"gpu\"\n{MINIMAL}"), "device"),
        (
            &MINIMAL.replace("csv = \"bc.csv\"", "csvv = \"bc.csv\""),
            "csvv",
        ),
        (
            &format!("{MINIMAL}validation_fraction = 1.5\n"),
            "`datasets.breast_cancer.validation_fraction`",
        ),
        (
            &format!("{MINIMAL}[reconnect]\ninitial_backoff_secs = 2.0\nmax_backoff_secs = 1.0\n"),
            "`reconnect.max_backoff_secs`",
        ),
        (
            &format!("{MINIMAL}[reconnect]\ninitial_backoff_secs = 0\n"),
            "`reconnect.initial_backoff_secs`",
        ),
        (
            &format!("{MINIMAL}[testing]\ncorrupt_update = \"zero\"\n"),
            "corrupt_update",
        ),
        (&format!("{MINIMAL}[testing]\nstall = true\n"), "stall"),
        (
            &format!("tokenizers = [\"t.json\", \"t.json\"]\n{MINIMAL}"),
            "`tokenizers[1]`",
        ),
        (
            &format!("tokenizers = [\"\"]\n{MINIMAL}"),
            "`tokenizers[0]`",
        ),
        (
            MINIMAL.split("[datasets.breast_cancer]").next().unwrap(),
            "`datasets`",
        ),
    ];
    for (text, key) in cases {
        let err = parse(text).expect_err(key).to_string();
        assert!(
            err.contains(key),
            "error for {key:?} does not name it: {err}"
        );
        assert!(err.contains("/etc/tutela/node.toml"), "no file in: {err}");
    }
    let err = parse(&format!("{MINIMAL}validation_fraction = 0\n")).unwrap_err();
    assert_eq!(
        err.key(),
        Some("datasets.breast_cancer.validation_fraction")
    );
}

#[test]
fn the_documented_example_config_parses_with_every_key() {
    let path = repo().join("deploy/config/node.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let c = NodeConfig::from_toml_str(&text, &path).unwrap();
    assert_eq!(c.site, "hospital-a");
    assert!(c.tls.crl.is_some());
    assert_eq!(c.reconnect.max_backoff_secs, 60.0);
    assert_eq!(
        c.tokenizers,
        vec![PathBuf::from(
            "/srv/tutela/tokenizers/notes-4k/tokenizer.json"
        )]
    );
    let audit = c.audit.as_ref().expect("the example documents [audit]");
    assert_eq!(audit.endpoint, "audit.consortium.example:7444");
    assert!(
        audit
            .checkpoint_public_key
            .ends_with("audit-checkpoint.pub")
    );
    assert!(
        c.testing.is_none(),
        "[testing] must stay commented out in the example"
    );
    // The commented-out [testing] table is valid when uncommented.
    let testing = text
        .lines()
        .skip_while(|l| *l != "# [testing]")
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .collect::<Vec<_>>()
        .join("\n");
    let c = NodeConfig::from_toml_str(&format!("{text}\n{testing}\n"), &path).unwrap();
    let t = c.testing.unwrap();
    assert_eq!(t.corrupt_update, Some(Corruption::Nan));
    assert!(t.stall_after_fetch);
    // The example requires approvals (it names a site policy) and documents the opt-out,
    // commented out; uncommented next to `site_policy`, it is the documented conflict.
    assert!(c.site_policy.is_some() && !c.insecure_no_approvals);
    assert!(
        text.lines().any(|l| l == "# insecure_no_approvals = true"),
        "deploy/config/node.toml must document insecure_no_approvals"
    );
    let err = NodeConfig::from_toml_str(&format!("insecure_no_approvals = true\n{text}"), &path)
        .unwrap_err();
    assert_eq!(err.key(), Some("insecure_no_approvals"), "{err}");
}

#[test]
fn config_requires_a_site_policy_unless_approvals_are_waived_by_name() {
    let without = MINIMAL.replace("site_policy = \"site-policy.toml\"\n", "");
    let err = parse(&without).unwrap_err();
    assert_eq!(err.key(), Some("site_policy"));
    let msg = err.to_string();
    for needle in [
        "/etc/tutela/node.toml",
        "`site_policy` is required",
        "compliance officers",
        "deploy/policy/site-policy.toml",
        "insecure_no_approvals = true",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    // `false` is the same as leaving it out.
    let err = parse(&format!("insecure_no_approvals = false\n{without}")).unwrap_err();
    assert_eq!(err.key(), Some("site_policy"), "{err}");

    let c = parse(&format!("insecure_no_approvals = true\n{without}")).unwrap();
    assert!(c.insecure_no_approvals && c.site_policy.is_none());

    let err = parse(&format!("insecure_no_approvals = true\n{MINIMAL}")).unwrap_err();
    assert_eq!(err.key(), Some("insecure_no_approvals"));
    let msg = err.to_string();
    assert!(
        msg.contains("set together with `site_policy`")
            && msg.contains("remove `insecure_no_approvals`"),
        "{msg}"
    );
}

#[test]
fn a_certificate_of_another_site_is_refused() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), SITE);
    let text = node_config_text("hospital-b", "127.0.0.1:1", &pki.node, NO_APPROVALS, "");
    let config = NodeConfig::from_toml_str(&text, dir.path().join("node.toml")).unwrap();
    let err = Agent::new(config)
        .err()
        .expect("the site mismatch must be refused");
    assert!(matches!(err, AgentError::SiteMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("hospital-b") && msg.contains("hospital-a"),
        "{msg}"
    );

    // A certificate that is not a node's (the coordinator's) is refused too.
    let text = node_config_text(SITE, "127.0.0.1:1", &pki.coordinator, NO_APPROVALS, "");
    let config = NodeConfig::from_toml_str(&text, dir.path().join("node.toml")).unwrap();
    let err = Agent::new(config)
        .err()
        .expect("a coordinator certificate is no node's");
    assert!(matches!(err, AgentError::NotANode { .. }), "{err}");
}

#[test]
fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
    let ms = Duration::from_millis;
    let mut b = Backoff::new(ms(100), ms(1000));
    let mut nominal = 100u64;
    for _ in 0..8 {
        let d = b.next_delay();
        assert!(
            d >= ms(nominal / 2) && d <= ms(nominal),
            "{d:?} for {nominal} ms"
        );
        nominal = (nominal * 2).min(1000);
    }
    b.reset();
    let d = b.next_delay();
    assert!(d >= ms(50) && d <= ms(100), "{d:?} after reset");
}

// ---------------------------------------------------------------------------------------------
// A fake coordinator

#[derive(Debug)]
pub(crate) enum Event {
    Connected {
        generation: u32,
        request: pb::ConnectRequest,
    },
    Fetched {
        task_id: String,
    },
    Update {
        manifest: Manifest,
        tensors: NamedTensors,
    },
    Declined {
        task_id: String,
        reason: String,
    },
    /// The node asked for a job's base model (`Federation.FetchBaseModel`).
    BaseFetched {
        sha256: String,
    },
}

pub(crate) type TaskSender = mpsc::Sender<Result<pb::Task, Status>>;
/// A global model as the fake serves it: its manifest and each tensor's bytes.
pub(crate) type ServedModel = (Manifest, Vec<Bytes>);

/// What survives a restart of the fake coordinator: the test's view.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) events: mpsc::UnboundedSender<Event>,
    /// The task stream of the connected node.
    pub(crate) node: Arc<Mutex<Option<TaskSender>>>,
    /// Global models by task id: (manifest, tensor bytes).
    pub(crate) models: Arc<Mutex<HashMap<String, ServedModel>>>,
}

struct FakeFederation {
    shared: Shared,
    generation: u32,
    closed: Arc<AtomicBool>,
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::federation_server::Federation for FakeFederation {
    type ConnectStream = BoxStream<pb::Task>;

    async fn connect(
        &self,
        request: Request<pb::ConnectRequest>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Status::unavailable("shutting down"));
        }
        let (tx, rx) = mpsc::channel(16);
        *self.shared.node.lock().unwrap() = Some(tx);
        let _ = self.shared.events.send(Event::Connected {
            generation: self.generation,
            request: request.into_inner(),
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type FetchModelStream = BoxStream<pb::TensorFrame>;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let task_id = request.into_inner().task_id;
        let (manifest, data) = self
            .shared
            .models
            .lock()
            .unwrap()
            .get(&task_id)
            .cloned()
            .ok_or_else(|| Status::failed_precondition("no such task"))?;
        let _ = self.shared.events.send(Event::Fetched { task_id });
        let source = MemorySource::from_parts(manifest, data).map_err(Status::from)?;
        let frames = futures::StreamExt::map(stream::send(source), |r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(frames)))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::TensorFrame>>,
    ) -> Result<Response<pb::UpdateReceipt>, Status> {
        let received = stream::receive(request.into_inner(), MemorySink::default())
            .await
            .map_err(Status::from)?;
        let digest = received.digest_hex();
        let task_id = received
            .manifest
            .metadata
            .get(meta::TASK)
            .cloned()
            .unwrap_or_default();
        let _ = self.shared.events.send(Event::Update {
            manifest: received.manifest,
            tensors: received.output,
        });
        Ok(Response::new(pb::UpdateReceipt {
            task_id,
            update_digest: digest,
        }))
    }

    async fn decline_task(
        &self,
        request: Request<pb::DeclineTaskRequest>,
    ) -> Result<Response<pb::DeclineTaskReply>, Status> {
        let r = request.into_inner();
        let _ = self.shared.events.send(Event::Declined {
            task_id: r.task_id,
            reason: r.reason,
        });
        Ok(Response::new(pb::DeclineTaskReply {}))
    }

    type FetchBaseModelStream = BoxStream<pb::BaseModelChunk>;

    // The e2e test (tests/tests/e2e/language_model.rs) fetches bases from the real coordinator;
    // this fake holds none, but records every request (`base_fetch`: when a node fetches).
    async fn fetch_base_model(
        &self,
        request: Request<pb::FetchBaseModelRequest>,
    ) -> Result<Response<Self::FetchBaseModelStream>, Status> {
        let _ = self.shared.events.send(Event::BaseFetched {
            sha256: request.into_inner().sha256,
        });
        Err(Status::not_found(
            "this fake coordinator holds no base models",
        ))
    }

    async fn sec_agg(
        &self,
        _request: Request<pb::SecAggRequest>,
    ) -> Result<Response<pb::SecAggReply>, Status> {
        Err(Status::unimplemented(
            "the fake coordinator runs no secure aggregation",
        ))
    }

    async fn answer_check(
        &self,
        request: Request<pb::CheckAnswer>,
    ) -> Result<Response<pb::CheckAnswerReply>, Status> {
        // This fake sends no CHECK task (see `job_check`): an answer is simply taken.
        let _ = request;
        Ok(Response::new(pb::CheckAnswerReply {}))
    }

    async fn submit_statistics(
        &self,
        _request: Request<pb::StatisticsRelease>,
    ) -> Result<Response<pb::StatisticsReceipt>, Status> {
        Err(Status::unimplemented(
            "the fake coordinator sends no STATISTICS task (tests/tests/e2e/statistics.rs runs one)",
        ))
    }
}

pub(crate) struct Coordinator {
    pub(crate) addr: SocketAddr,
    closed: Arc<AtomicBool>,
    shared: Shared,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

static GENERATION: AtomicU32 = AtomicU32::new(1);

impl Coordinator {
    /// Serves a fake coordinator on `addr` (port 0 for any), retrying the bind briefly so that a
    /// restart can take over the port its predecessor just released.
    pub(crate) async fn start(
        addr: SocketAddr,
        tls: &TlsFiles,
        shared: Shared,
    ) -> (Coordinator, u32) {
        init_crypto();
        let started = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if started.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let generation = GENERATION.fetch_add(1, Ordering::SeqCst);
        let closed = Arc::new(AtomicBool::new(false));
        let service = pb::federation_server::FederationServer::new(FakeFederation {
            shared: shared.clone(),
            generation,
            closed: closed.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let router = tutela_protocol::server::builder().add_service(service);
        let config = ReloadingServerConfig::load(tls.clone()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tutela_protocol::server::serve(router, listener, config, async {
                let _ = stopped.await;
            })
            .await;
        });
        (
            Coordinator {
                addr,
                closed,
                shared,
                stop: Some(stop),
                task,
            },
            generation,
        )
    }

    /// Goes away: refuses new task streams, ends the node's current one, and stops serving.
    pub(crate) async fn stop(mut self) {
        self.closed.store(true, Ordering::SeqCst);
        self.shared.node.lock().unwrap().take();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        self.task.abort();
    }
}

/// A coordinator, a node connected to it, and the stream of what the node did.
struct Harness {
    _dir: tempfile::TempDir,
    pki: Pki,
    coordinator: Option<Coordinator>,
    events: mpsc::UnboundedReceiver<Event>,
    stop_node: Option<oneshot::Sender<()>>,
    node: tokio::task::JoinHandle<()>,
    /// The running agent's metrics handle (`Agent::metrics`).
    metrics: Arc<tutela_site_node::node_metrics::NodeMetrics>,
}

impl Harness {
    async fn start(extra_config: &str) -> Harness {
        Self::start_full("", extra_config, None).await
    }

    /// With `dataset` (the body of `[datasets.breast_cancer]`, made from the test's directory)
    /// instead of the repository's breast-cancer file.
    async fn start_with_dataset(
        extra_config: &str,
        dataset: Option<&dyn Fn(&Path) -> String>,
    ) -> Harness {
        Self::start_full("", extra_config, dataset).await
    }

    /// [`start`](Self::start) with further top-level keys of node.toml.
    async fn start_with(top_level: &str, extra_config: &str) -> Harness {
        Self::start_full(top_level, extra_config, None).await
    }

    async fn start_full(
        top_level: &str,
        extra_config: &str,
        dataset: Option<&dyn Fn(&Path) -> String>,
    ) -> Harness {
        let mut h = Self::launch(top_level, extra_config, dataset).await;
        let request = h.connected().await.1;
        assert_eq!(request.datasets, vec!["breast_cancer".to_string()]);
        assert_eq!(request.device, "cpu");
        assert!(!request.node_version.is_empty());
        h
    }

    /// The node started and serving; its first `Connect` is the caller's to read.
    async fn launch(
        top_level: &str,
        extra_config: &str,
        dataset: Option<&dyn Fn(&Path) -> String>,
    ) -> Harness {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path(), SITE);
        let (events_tx, events) = mpsc::unbounded_channel();
        let shared = Shared {
            events: events_tx,
            node: Default::default(),
            models: Default::default(),
        };
        let (coordinator, _) =
            Coordinator::start("127.0.0.1:0".parse().unwrap(), &pki.coordinator, shared).await;
        let addr = coordinator.addr.to_string();
        let top = format!("{NO_APPROVALS}\n{top_level}");
        let text = match dataset {
            None => node_config_text(SITE, &addr, &pki.node, &top, extra_config),
            Some(d) => {
                node_config_with_dataset(SITE, &addr, &pki.node, &top, extra_config, &d(dir.path()))
            }
        };
        let config = NodeConfig::from_toml_str(&text, dir.path().join("node.toml")).unwrap();
        let agent = Agent::new(config).unwrap();
        let metrics = agent.metrics().clone();
        let (stop_node, stopped) = oneshot::channel::<()>();
        let node = tokio::spawn(async move {
            agent
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Harness {
            _dir: dir,
            pki,
            coordinator: Some(coordinator),
            events,
            stop_node: Some(stop_node),
            node,
            metrics,
        }
    }

    /// The sum of the node's `name` series, once it reaches `at_least` (the node counts after
    /// the coordinator's answer, which may come a moment after the fake coordinator saw the
    /// request); the last sum after 2 s otherwise.
    async fn metric_sum(&self, name: &str, at_least: f64) -> f64 {
        let mut sum = 0.0;
        for _ in 0..100 {
            let text = tutela_protocol::metrics::render(&self.metrics.registry()).unwrap();
            sum = text
                .lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum();
            if sum >= at_least {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sum
    }

    async fn next_event(&mut self) -> Event {
        tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("the node did nothing in time")
            .expect("events channel closed")
    }

    /// Waits for the next connection; returns the generation of the coordinator it reached.
    async fn connected(&mut self) -> (u32, pb::ConnectRequest) {
        loop {
            if let Event::Connected {
                generation,
                request,
            } = self.next_event().await
            {
                return (generation, request);
            }
        }
    }

    fn coordinator(&self) -> &Coordinator {
        self.coordinator.as_ref().unwrap()
    }

    async fn send(&self, task: pb::Task) {
        send_task(&self.coordinator().shared, task).await;
    }

    /// Registers `tensors` as the global model of `task_id`; returns its model id.
    fn offer_model(&self, task_id: &str, tensors: &NamedTensors) -> String {
        offer_model(&self.coordinator().shared, task_id, tensors)
    }

    async fn update(&mut self) -> (Manifest, NamedTensors) {
        match self.next_event().await {
            Event::Update { manifest, tensors } => (manifest, tensors),
            other => panic!("expected an update, got {other:?}"),
        }
    }

    async fn shutdown(mut self) {
        if let Some(s) = self.stop_node.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.node).await;
        if let Some(c) = self.coordinator.take() {
            c.stop().await;
        }
    }
}

/// Sends `task` down the task stream of the node connected to the fake coordinator.
async fn send_task(shared: &Shared, task: pb::Task) {
    let tx = shared
        .node
        .lock()
        .unwrap()
        .clone()
        .expect("no node connected");
    tx.send(Ok(task)).await.unwrap();
}

/// Registers `tensors` as the global model of `task_id` at the fake coordinator; returns its
/// model id.
fn offer_model(shared: &Shared, task_id: &str, tensors: &NamedTensors) -> String {
    let manifest = tutela_site_node::weights::manifest(tensors, BTreeMap::new()).unwrap();
    let mut digest = StreamDigest::new(&manifest);
    for (_, b) in tensors {
        digest.update(b);
    }
    let id = hex_string(&digest.finish());
    let data = tensors
        .iter()
        .map(|(_, b)| Bytes::from(b.clone()))
        .collect();
    shared
        .models
        .lock()
        .unwrap()
        .insert(task_id.to_string(), (manifest, data));
    id
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const SEED: u64 = 7;

pub(crate) fn job_spec(schema: &str, model: &str) -> String {
    format!(
        r#"
name = "test-job"
rounds = 2
min_sites = 1
round_deadline_secs = 60
update_norm_bound = 10.0
seed = {SEED}
a_key_the_node_does_not_know = "ignored"

[model]
name = "{model}"
hidden = [8]

[data]
schema = "{schema}"

[training]
optimizer = "sgd"
learning_rate = 0.05
momentum = 0.5
local_epochs = 1
batch_size = 32
"#
    )
}

pub(crate) fn task(
    id: &str,
    kind: pb::TaskKind,
    spec: &str,
    model_id: &str,
    strategy: &str,
) -> pb::Task {
    pb::Task {
        task_id: id.into(),
        kind: kind as i32,
        job_id: "job-1".into(),
        round: u32::from(kind == pb::TaskKind::Train),
        attempt: 1,
        job_spec_toml: spec.into(),
        job_digest: "00".repeat(32),
        global_model_id: model_id.into(),
        strategy_config_json: strategy.into(),
        deadline_unix_ms: now_ms() + 60_000,
        ..Default::default()
    }
}

/// The MLP the test job describes, built independently of the node.
fn expected_initial_model() -> NamedTensors {
    let spec = ModelSpec::new(vec![30], 2).with_hidden(vec![8]);
    let model = Model::new("mlp", spec, tch::Device::Cpu, SEED).unwrap();
    export_weights(model.var_store()).unwrap()
}

fn all_values(tensors: &NamedTensors) -> Vec<f32> {
    tensors
        .iter()
        .flat_map(|(spec, bytes)| f32_values(spec, bytes).unwrap())
        .collect()
}

fn shapes(tensors: &NamedTensors) -> Vec<(String, Vec<u64>)> {
    tensors
        .iter()
        .map(|(s, _)| (s.name.clone(), s.shape.clone()))
        .collect()
}

/// INITIALIZE then TRAIN; returns the initial weights and the TRAIN update.
async fn initialize_and_train(
    h: &mut Harness,
    strategy: &str,
) -> (NamedTensors, Manifest, NamedTensors) {
    let spec = job_spec("breast_cancer", "mlp");
    h.send(task("init-1", pb::TaskKind::Initialize, &spec, "", "{}"))
        .await;
    let (manifest, initial) = h.update().await;
    assert_eq!(
        manifest.metadata.get(meta::TASK).map(String::as_str),
        Some("init-1")
    );
    let model_id = h.offer_model("train-1", &initial);
    h.send(task(
        "train-1",
        pb::TaskKind::Train,
        &spec,
        &model_id,
        strategy,
    ))
    .await;
    match h.next_event().await {
        Event::Fetched { task_id } => assert_eq!(task_id, "train-1"),
        other => panic!("expected a FetchModel, got {other:?}"),
    }
    let (manifest, update) = h.update().await;
    (initial, manifest, update)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_initializes_and_trains_over_mutual_tls() {
    let mut h = Harness::start("").await;
    let (initial, manifest, update) =
        initialize_and_train(&mut h, r#"{"proximal_mu": 0.01, "server_lr": 1.0}"#).await;

    // The initial model is the job's model (registry name, hyper-parameters, the schema's 30
    // features and 2 classes) drawn from the job's seed: bit-identical to one built here.
    assert_eq!(initial, expected_initial_model());

    let m = &manifest.metadata;
    assert_eq!(m.get(meta::TASK).map(String::as_str), Some("train-1"));
    let number = |key: &str| -> f64 {
        m.get(key)
            .unwrap_or_else(|| panic!("{key} missing from {m:?}"))
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number: {m:?}"))
    };
    // 569 rows: 212 malignant and 357 benign, a fifth of each held out for validation.
    assert_eq!(number(meta::SAMPLES), 456.0);
    assert_eq!(number(meta::EVAL_SAMPLES), 113.0);
    let accuracy = number(meta::EVAL_ACCURACY);
    assert!((0.0..=1.0).contains(&accuracy), "{accuracy}");
    for key in [meta::EVAL_LOSS, meta::TRAIN_LOSS] {
        let v = number(key);
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert!(number(meta::TRAIN_SECONDS) >= 0.0);

    // The update is a delta against the global model: same tensors, finite, not all zero, and
    // small (one epoch of SGD), so it is not the weights themselves.
    assert_eq!(shapes(&update), shapes(&initial));
    let delta = all_values(&update);
    assert!(delta.iter().all(|x| x.is_finite()));
    assert!(delta.iter().any(|&x| x != 0.0), "the delta is all zeros");
    let norm = delta.iter().map(|x| x * x).sum::<f32>().sqrt();
    let weights_norm = all_values(&initial)
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!(
        norm < weights_norm,
        "delta norm {norm} vs weights {weights_norm}"
    );
    // Local weights would point almost the same way as the global ones (cosine near 1); a delta
    // does not (about 0.1 here).
    let dot: f32 = delta
        .iter()
        .zip(all_values(&initial))
        .map(|(a, b)| a * b)
        .sum();
    let cosine = dot / norm / weights_norm;
    assert!(
        cosine.abs() < 0.5,
        "the update looks like weights, not a delta: cosine {cosine}"
    );
    h.shutdown().await;
}

/// A DP-SGD round reports the noise it trained under: σ (on the noise grid) and the expected
/// batch B = sample rate × rows, which the coordinator shows and `job status` weighs (σ / B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_round_reports_its_noise_multiplier_and_expected_batch() {
    let mut h = Harness::start("").await;
    let spec = job_spec("breast_cancer", "mlp").replace("batch_size = 32", "batch_size = 4")
        + "[privacy]\nmode = \"local\"\nnoise_multiplier = 8.0\ndelta = 1e-5\nmax_grad_norm = 1.0\n";
    h.send(task("init-dp", pb::TaskKind::Initialize, &spec, "", "{}"))
        .await;
    let (_, initial) = h.update().await;
    let model_id = h.offer_model("train-dp", &initial);
    h.send(task(
        "train-dp",
        pb::TaskKind::Train,
        &spec,
        &model_id,
        "{}",
    ))
    .await;
    let (manifest, _) = loop {
        match h.next_event().await {
            Event::Fetched { .. } => continue,
            Event::Update { manifest, tensors } => break (manifest, tensors),
            other => panic!("expected the DP round's update, got {other:?}"),
        }
    };
    let m = &manifest.metadata;
    let number = |key: &str| -> f64 {
        m.get(key)
            .unwrap_or_else(|| panic!("{key} missing from {m:?}"))
            .parse()
            .unwrap()
    };
    // Under DP no metric leaves exact (the metric oracle, `tutela_privacy::metrics`): the
    // training loss and the one-class flag are not sent, and the validation loss leaves only as
    // a noised release with its σ (when the round's ledger charged it), never exactly.
    assert!(!m.contains_key(meta::TRAIN_LOSS), "{m:?}");
    assert!(!m.contains_key(meta::SINGLE_CLASS_PREDICTED), "{m:?}");
    assert_eq!(
        m.contains_key(meta::EVAL_LOSS),
        m.contains_key(meta::EVAL_LOSS_STDDEV),
        "{m:?}"
    );
    if m.contains_key(meta::EVAL_LOSS) {
        assert!(number(meta::EVAL_LOSS_STDDEV) > 0.0, "{m:?}");
        assert!(number(meta::EVAL_ACCURACY_STDDEV) > 0.0, "{m:?}");
    }
    // σ = 8 on the noise grid (within its correction), B = 4 of the 456 training rows.
    let sigma = number(meta::DP_NOISE_MULTIPLIER);
    assert!((sigma - 8.0).abs() < 0.05, "{sigma}");
    let batch = number(meta::DP_EXPECTED_BATCH);
    assert!((batch - 4.0).abs() < 1e-9, "{batch}");
    assert!(
        tutela_privacy::planning::noise_to_signal(sigma, batch) > tutela_privacy::planning::SWAMPED
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_the_node_cannot_do_are_declined_with_the_reason() {
    let mut h = Harness::start("").await;
    // Past its deadline: skipped without a word (the coordinator closed it already), so the
    // first answer is the next task's.
    let mut late = task(
        "late",
        pb::TaskKind::Initialize,
        &job_spec("mnist", "mlp"),
        "",
        "{}",
    );
    late.deadline_unix_ms = now_ms() - 1000;
    h.send(late).await;

    let cases = [
        (
            task(
                "no-data",
                pb::TaskKind::Initialize,
                &job_spec("mnist", "mlp"),
                "",
                "{}",
            ),
            vec!["mnist", "breast_cancer"],
        ),
        (
            task(
                "no-model",
                pb::TaskKind::Initialize,
                &job_spec("breast_cancer", "transformer"),
                "",
                "{}",
            ),
            vec!["unknown model", "transformer"],
        ),
        (
            task(
                "bad-spec",
                pb::TaskKind::Initialize,
                "this is not toml",
                "",
                "{}",
            ),
            vec!["job spec"],
        ),
        (
            task(
                "bad-strategy",
                pb::TaskKind::Train,
                &job_spec("breast_cancer", "mlp"),
                "abc",
                r#"{"proximal_mu": -1}"#,
            ),
            vec!["proximal_mu"],
        ),
        (
            task(
                "bad-hyper",
                pb::TaskKind::Initialize,
                &job_spec("breast_cancer", "mlp").replace("hidden = [8]", "hiden = [8]"),
                "",
                "{}",
            ),
            vec!["hiden"],
        ),
    ];
    for (t, _) in &cases {
        h.send(t.clone()).await;
    }
    for (t, needles) in &cases {
        match h.next_event().await {
            Event::Declined { task_id, reason } => {
                assert_eq!(
                    task_id, t.task_id,
                    "declined in order; the late task is skipped"
                );
                for n in needles {
                    assert!(
                        reason.contains(n),
                        "{task_id}: {reason:?} does not mention {n:?}"
                    );
                }
            }
            other => panic!("expected {} to be declined, got {other:?}", t.task_id),
        }
    }
    // Each decline is counted once, by its refusal code; the late task was not declined.
    assert_eq!(
        h.metric_sum("tutela_node_tasks_declined_total", cases.len() as f64)
            .await,
        cases.len() as f64
    );
    // The node is still serving.
    h.send(task(
        "init-ok",
        pb::TaskKind::Initialize,
        &job_spec("breast_cancer", "mlp"),
        "",
        "{}",
    ))
    .await;
    let (manifest, _) = h.update().await;
    assert_eq!(manifest.metadata[meta::TASK], "init-ok");
    // A task the coordinator sends again (after a reconnect, say) is not done twice.
    for id in ["init-ok", "init-ok-2"] {
        h.send(task(
            id,
            pb::TaskKind::Initialize,
            &job_spec("breast_cancer", "mlp"),
            "",
            "{}",
        ))
        .await;
    }
    let (manifest, _) = h.update().await;
    assert_eq!(manifest.metadata[meta::TASK], "init-ok-2");
    assert_eq!(
        h.metric_sum("tutela_node_updates_uploaded_total", 2.0)
            .await,
        2.0
    );
    assert!(h.metric_sum("tutela_node_uploaded_bytes_total", 1.0).await > 0.0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reconnects_after_the_coordinator_restarts() {
    let mut h = Harness::start("").await;
    let first = h.coordinator.take().unwrap();
    let (addr, shared) = (first.addr, first.shared.clone());
    first.stop().await;
    // Nobody listens for a moment: the node keeps trying with backoff.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (second, generation) = Coordinator::start(addr, &h.pki.coordinator, shared).await;
    h.coordinator = Some(second);
    let started = Instant::now();
    loop {
        let (g, _) = h.connected().await;
        if g == generation {
            break;
        }
    }
    eprintln!("reconnected {:?} after the restart", started.elapsed());
    // It takes up work on the new connection.
    h.send(task(
        "after-restart",
        pb::TaskKind::Initialize,
        &job_spec("breast_cancer", "mlp"),
        "",
        "{}",
    ))
    .await;
    let (manifest, initial) = h.update().await;
    assert_eq!(manifest.metadata[meta::TASK], "after-restart");
    assert_eq!(initial, expected_initial_model());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_corrupt_update_scale_breaks_the_norm_bound() {
    let mut h = Harness::start("[testing]\ncorrupt_update = \"scale\"\n").await;
    let (initial, _, update) = initialize_and_train(&mut h, "{}").await;
    // The initial weights are honest; the TRAIN update is blown up.
    assert_eq!(initial, expected_initial_model());
    let norm = all_values(&update)
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!(norm > 1e3, "norm {norm}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_stall_after_fetch_never_answers() {
    let mut h = Harness::start("[testing]\nstall_after_fetch = true\n").await;
    let spec = job_spec("breast_cancer", "mlp");
    let model_id = h.offer_model("stalled", &expected_initial_model());
    h.send(task("stalled", pb::TaskKind::Train, &spec, &model_id, "{}"))
        .await;
    match h.next_event().await {
        Event::Fetched { task_id } => assert_eq!(task_id, "stalled"),
        other => panic!("expected a FetchModel, got {other:?}"),
    }
    // Then nothing for that task; the next task is served (the answer is the next event).
    h.send(task("init-2", pb::TaskKind::Initialize, &spec, "", "{}"))
        .await;
    let (manifest, _) = h.update().await;
    assert_eq!(manifest.metadata[meta::TASK], "init-2");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_is_not_the_one_named_is_declined() {
    let mut h = Harness::start("").await;
    let spec = job_spec("breast_cancer", "mlp");
    h.offer_model("wrong-model", &expected_initial_model());
    h.send(task(
        "wrong-model",
        pb::TaskKind::Train,
        &spec,
        &"ab".repeat(32),
        "{}",
    ))
    .await;
    loop {
        match h.next_event().await {
            Event::Fetched { .. } => continue,
            Event::Declined { task_id, reason } => {
                assert_eq!(task_id, "wrong-model");
                assert!(reason.contains(&"ab".repeat(32)), "{reason}");
                break;
            }
            other => panic!("expected a decline, got {other:?}"),
        }
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_tokenizer_differs_from_the_sites_is_declined_with_both_digests() {
    use tutela_site_node::lm::tokenizer::SpecialTokens;
    use tutela_site_node::lm::tokenizer::train::{TrainOptions, train, write_dir};
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text = std::fs::read_to_string(data_dir().join("tinyshakespeare.txt")).unwrap();
    std::fs::write(&corpus, &text[..40_000]).unwrap();
    let tokenizer = |vocab_size| {
        let options = TrainOptions {
            vocab_size,
            ..TrainOptions::default()
        };
        train(std::slice::from_ref(&corpus), &options, &|_| {}).unwrap()
    };
    let (held, other) = (tokenizer(300), tokenizer(301));
    let secret = dir.path().join("secret-site-dir");
    let file = write_dir(&held, &SpecialTokens::default(), &secret)
        .unwrap()
        .tokenizer_json;

    let mut h = Harness::start_with(
        &format!("tokenizers = [{:?}]", file.display().to_string()),
        "",
    )
    .await;
    let naming = |sha256: &str| {
        job_spec("breast_cancer", "mlp").replace(
            "hidden = [8]",
            &format!("hidden = [8]\ntokenizer_sha256 = \"{sha256}\""),
        )
    };
    h.send(task(
        "other-tokenizer",
        pb::TaskKind::Initialize,
        &naming(&other.sha256()),
        "",
        "{}",
    ))
    .await;
    match h.next_event().await {
        Event::Declined { task_id, reason } => {
            assert_eq!(task_id, "other-tokenizer");
            assert!(
                reason.contains(&other.sha256()) && reason.contains(&held.sha256()),
                "{reason}"
            );
            assert!(!reason.contains("secret-site-dir"), "{reason}");
        }
        other => panic!("expected a decline, got {other:?}"),
    }
    // The tokenizer the site holds: the task is done.
    h.send(task(
        "held-tokenizer",
        pb::TaskKind::Initialize,
        &naming(&held.sha256()),
        "",
        "{}",
    ))
    .await;
    let (manifest, _) = h.update().await;
    assert_eq!(manifest.metadata[meta::TASK], "held-tokenizer");
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The CLI

/// Runs the `tutela-node` binary with `command`, the common scoring arguments and `extra`.
fn tutela_node(command: &str, base: &[OsString], extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tutela-node"))
        .arg(command)
        .args(base)
        .args(extra)
        .output()
        .unwrap()
}

/// The repository's breast-cancer schema without its `[standardize]` table (when it has one), and
/// the same with identity reference statistics (mean 0, std 1), written to `dir`.
fn schema_variants(dir: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(data_dir().join("breast_cancer.schema.toml")).unwrap();
    let bare = text.split("[standardize]").next().unwrap().to_string();
    let identity = format!(
        "{bare}\n[standardize]\nmean = [{}]\nstd = [{}]\n",
        vec!["0.0"; 30].join(", "),
        vec!["1.0"; 30].join(", ")
    );
    let (bare_path, identity_path) = (
        dir.join("bare.schema.toml"),
        dir.join("identity.schema.toml"),
    );
    std::fs::write(&bare_path, bare).unwrap();
    std::fs::write(&identity_path, identity).unwrap();
    (bare_path, identity_path)
}

#[test]
fn datasets_use_the_schema_statistics_or_else_their_training_split() {
    use tutela_site_node::config::DatasetConfig;
    use tutela_site_node::data::{DatasetSchema, load_csv};
    use tutela_site_node::local::{LocalDataset, StatisticsSource};
    let dir = tempfile::tempdir().unwrap();
    let (bare, identity) = schema_variants(dir.path());
    let csv = data_dir().join("breast_cancer_wisconsin.csv");
    let config = |schema: &Path| DatasetConfig {
        path: csv.clone(),
        schema: schema.to_path_buf(),
        validation_fraction: 0.2,
        split_seed: 3,
        ..Default::default()
    };
    let raw = load_csv(&csv, &DatasetSchema::load(&bare).unwrap()).unwrap();

    let d = LocalDataset::load("breast_cancer", &config(&identity)).unwrap();
    assert_eq!(d.statistics, StatisticsSource::Schema);
    assert_eq!((d.train.n_rows, d.validation.n_rows), (456, 113));
    // Identity statistics: every value stays as in the file.
    let total = |t: &tutela_site_node::data::Table| -> f64 {
        t.features.iter().map(|&x| f64::from(x)).sum()
    };
    let (split, file) = (total(&d.train) + total(&d.validation), total(&raw));
    assert!(
        (split - file).abs() < 1e-6 * file.abs(),
        "{split} vs {file}"
    );

    let d = LocalDataset::load("breast_cancer", &config(&bare)).unwrap();
    assert_eq!(d.statistics, StatisticsSource::LocalTraining);
    // Fitted on the training split: its features have mean 0 there.
    let n = d.train.n_features;
    let mean0: f64 = d
        .train
        .features
        .chunks(n)
        .map(|r| f64::from(r[0]))
        .sum::<f64>()
        / d.train.n_rows as f64;
    assert!(mean0.abs() < 1e-4, "{mean0}");
}

#[test]
fn cli_evaluate_predict_and_centralized_print_json() {
    let dir = tempfile::tempdir().unwrap();
    let (bare, identity) = schema_variants(dir.path());
    let model_path = dir.path().join("model.safetensors");
    save_safetensors(&model_path, &expected_initial_model(), BTreeMap::new()).unwrap();
    let spec_path = dir.path().join("job.toml");
    std::fs::write(&spec_path, job_spec("breast_cancer", "mlp")).unwrap();
    let csv = data_dir().join("breast_cancer_wisconsin.csv");
    let args = |schema: &Path| -> Vec<OsString> {
        vec![
            "--model".into(),
            model_path.clone().into(),
            "--job-spec".into(),
            spec_path.clone().into(),
            "--csv".into(),
            csv.clone().into(),
            "--schema".into(),
            schema.into(),
        ]
    };
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // Without reference statistics, tabular data needs a choice, and the error says which.
    let out = tutela_node("evaluate", &args(&bare), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--standardize-from") && stderr.contains("bare.schema.toml"),
        "{stderr}"
    );
    let csv_arg = csv.to_str().unwrap();
    let pooled = json(tutela_node(
        "evaluate",
        &args(&bare),
        &["--standardize-from", csv_arg],
    ));
    assert_eq!(pooled["n"], 569);
    // Loss, accuracy and n, then what an officer needs on unbalanced labels.
    let keys: Vec<&str> = pooled
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "accuracy",
            "auc",
            "confusion",
            "expected_calibration_error",
            "f1",
            "loss",
            "n",
            "reliability"
        ],
        "{pooled}"
    );
    for key in ["auc", "f1", "expected_calibration_error"] {
        let v = pooled[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}: {pooled}");
    }
    let confusion: u64 = pooled["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(confusion, 569, "{pooled}");
    let accuracy = pooled["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{pooled}");
    assert!(pooled["loss"].as_f64().unwrap() > 0.0, "{pooled}");
    // Pooling the scored file alone is fitting on it.
    let own = json(tutela_node(
        "evaluate",
        &args(&bare),
        &["--standardize-self"],
    ));
    assert_eq!(own, pooled);

    // With reference statistics, those are used and a choice is ignored.
    let reference = json(tutela_node("evaluate", &args(&identity), &[]));
    let ignored = json(tutela_node(
        "evaluate",
        &args(&identity),
        &["--standardize-self"],
    ));
    assert_eq!(reference, ignored);
    assert_ne!(
        reference["loss"], own["loss"],
        "identity scaling is not the fitted one"
    );

    let out = tutela_node(
        "predict",
        &args(&bare),
        &["--standardize-self", "--rows", "3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["row"], i);
        let p: Vec<f64> = line["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(p.len(), 2);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{p:?}");
        let predicted = line["predicted"].as_u64().unwrap() as usize;
        assert!(p[predicted] >= p[1 - predicted]);
        assert_eq!(line["class"], ["malignant", "benign"][predicted]);
    }

    // The centralised baseline learns (2 rounds x 1 epoch of the test job).
    let central = json(
        Command::new(env!("CARGO_BIN_EXE_tutela-node"))
            .arg("centralized")
            .arg("--job-spec")
            .arg(&spec_path)
            .arg("--csv")
            .arg(&csv)
            .arg("--test-csv")
            .arg(&csv)
            .arg("--schema")
            .arg(&bare)
            .output()
            .unwrap(),
    );
    assert_eq!(central["n"], 569);
    assert!(central["accuracy"].as_f64().unwrap() > 0.9, "{central}");

    // A model file that does not fit the job's model is refused, naming the file.
    std::fs::write(
        &spec_path,
        job_spec("breast_cancer", "mlp").replace("hidden = [8]", "hidden = [4]"),
    )
    .unwrap();
    let out = tutela_node("evaluate", &args(&identity), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Approvals, with the real `tutela-node run` process: the node refuses to start without a site
// policy, and when the coordinator is bypassed (here, the fake coordinator hands it forged tasks)
// it refuses every task its own compliance officers did not approve, before it reads any data.

/// A `tutela-node run --config CONFIG` process, its stdout and stderr in `log`; killed when
/// dropped, so a failing test leaves no node running.
struct NodeProcess {
    child: std::process::Child,
    log: PathBuf,
}

impl NodeProcess {
    fn start(config: &Path, log: &Path) -> NodeProcess {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tutela-node"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        NodeProcess {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit on its own; fails the test if it is still running after
    /// [`PATIENCE`].
    fn exit_status(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "tutela-node is still running; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `needle`; fails the test after [`PATIENCE`].
    async fn wait_for_log(&self, needle: &str) {
        let started = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                started.elapsed() < PATIENCE,
                "{needle:?} never appeared in the node's log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running node re-reads its site policy: on SIGHUP (logged), and by polling the file, where
/// a broken edit is logged and the policy in force stays.
#[tokio::test]
async fn the_running_node_reloads_its_site_policy_on_sighup_and_keeps_it_on_a_broken_edit() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), SITE);
    let policy = dir.path().join("site-policy.toml");
    let officers = |names: &str| format!("site = \"{SITE}\"\ncompliance_officers = [{names}]\n");
    std::fs::write(
        &policy,
        officers(&format!("\"spiffe://{CONSORTIUM}/site/{SITE}/user/alice\"")),
    )
    .unwrap();
    let config = dir.path().join("node.toml");
    // Port 1: the node keeps retrying the coordinator, and runs meanwhile.
    let top_level = format!("site_policy = \"{}\"", policy.display());
    std::fs::write(
        &config,
        node_config_text(SITE, "127.0.0.1:1", &pki.node, &top_level, ""),
    )
    .unwrap();
    let node = NodeProcess::start(&config, &dir.path().join("node.log"));
    // The agent installs its SIGHUP handler and the watcher before it says it is starting.
    node.wait_for_log("site node starting").await;

    std::fs::write(
        &policy,
        officers(&format!(
            "\"spiffe://{CONSORTIUM}/site/{SITE}/user/alice\", \"spiffe://{CONSORTIUM}/site/{SITE}/user/bob\""
        )),
    )
    .unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    node.wait_for_log("SIGHUP: reloaded").await;

    std::fs::write(
        &policy,
        "site = \"another-site\"\ncompliance_officers = [\"x\"]\n",
    )
    .unwrap();
    node.wait_for_log("reload failed; what is in force stays")
        .await;
}

#[test]
fn the_node_refuses_to_start_without_a_site_policy_and_with_both_settings() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    // Real certificates and data: the approval setting is the only thing wrong with the config.
    let pki = pki(dir.path(), SITE);
    let policy = dir.path().join("site-policy.toml");
    std::fs::write(
        &policy,
        format!(
            "site = \"{SITE}\"\ncompliance_officers = [\"spiffe://{CONSORTIUM}/site/{SITE}/user/alice\"]\n"
        ),
    )
    .unwrap();
    let config = dir.path().join("node.toml");
    let cases = [
        (
            String::new(),
            vec![
                "`site_policy` is required",
                "deploy/policy/site-policy.toml",
                "insecure_no_approvals = true",
            ],
        ),
        (
            format!("site_policy = \"{}\"\n{NO_APPROVALS}", policy.display()),
            vec![
                "`insecure_no_approvals` is set together with `site_policy`",
                "remove `insecure_no_approvals`",
            ],
        ),
    ];
    for (top_level, needles) in cases {
        // Port 1: a node that started anyway would keep retrying it, and the wait below fails.
        let text = node_config_text(SITE, "127.0.0.1:1", &pki.node, &top_level, "");
        std::fs::write(&config, text).unwrap();
        let mut node = NodeProcess::start(&config, &dir.path().join("node.log"));
        let status = node.exit_status();
        let log = node.log();
        assert!(!status.success(), "{log}");
        assert!(log.contains(config.to_str().unwrap()), "no file in: {log}");
        for needle in needles {
            assert!(log.contains(needle), "{needle:?} missing from: {log}");
        }
        assert!(!log.contains("site node starting"), "{log}");
    }
}

/// A TLS file that is not where node.toml says stops `tutela-node run` with the file, the key,
/// the value as written and where it resolved, not the bare `No such file or directory` of the
/// path alone.
#[test]
fn a_missing_tls_file_is_named_by_node_toml_its_key_and_the_resolved_path() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), SITE);
    let config = dir.path().join("node.toml");
    let text = node_config_text(SITE, "127.0.0.1:1", &pki.node, NO_APPROVALS, "").replace(
        &format!("ca = \"{}\"", pki.node.ca.display()),
        "ca = \"../certs/ca.crt\"",
    );
    assert!(text.contains("ca = \"../certs/ca.crt\""), "{text}");
    std::fs::write(&config, text).unwrap();
    let mut node = NodeProcess::start(&config, &dir.path().join("node.log"));
    let status = node.exit_status();
    let log = node.log();
    assert!(!status.success(), "{log}");
    let expect = format!(
        "{}: tls.ca = \"../certs/ca.crt\": no such file (resolved to {})",
        config.display(),
        dir.path().join("../certs/ca.crt").display()
    );
    assert!(log.contains(&expect), "{expect:?} missing from: {log}");
}

/// Hole (a) of the 2026-11 review: `tutela-node run` started and trained with no `[audit]`,
/// anchoring nothing. Now the real process refuses to start without it, naming the table and
/// the file; the waiver is by name, refused next to `[audit]` and for a coordinator that is not
/// on this machine; the shipped example configures `[audit]` and documents the waiver.
#[test]
fn a_node_refuses_to_start_without_a_trail_unless_waived_for_a_local_setup() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), SITE);
    let config = dir.path().join("node.toml");
    // No [audit], no waiver (an explicit `false` is the same as leaving it out).
    let text = node_config_text(
        SITE,
        "127.0.0.1:1",
        &pki.node,
        &format!("{NO_APPROVALS}\ninsecure_no_audit = false"),
        "",
    );
    std::fs::write(&config, &text).unwrap();
    let mut node = NodeProcess::start(&config, &dir.path().join("node.log"));
    let status = node.exit_status();
    let log = node.log();
    assert!(!status.success(), "{log}");
    for needle in [
        config.to_str().unwrap(),
        "`audit` is required",
        "refuses to start",
        "deploy/config/node.toml",
        "insecure_no_audit = true",
    ] {
        assert!(log.contains(needle), "{needle:?} missing from: {log}");
    }

    let check = |text: &str| {
        NodeConfig::from_toml_str(text, &config)
            .unwrap()
            .check_trail(&config)
    };
    let waived = node_config_text(SITE, "127.0.0.1:1", &pki.node, NO_APPROVALS, "");
    check(&waived).unwrap();
    let elsewhere = waived.replace("127.0.0.1:1", "coordinator.example:7443");
    let e = check(&elsewhere).unwrap_err();
    assert_eq!(e.key(), Some("insecure_no_audit"), "{e}");
    assert!(e.to_string().contains("not a loopback address"), "{e}");
    let both = node_config_text(
        SITE,
        "127.0.0.1:1",
        &pki.node,
        &format!("{NO_APPROVALS}\ninsecure_no_audit = true"),
        "[audit]\nendpoint = \"localhost:7444\"\ncheckpoint_public_key = \"00\"\n",
    );
    let e = check(&both).unwrap_err();
    assert!(e.to_string().contains("remove `insecure_no_audit`"), "{e}");

    let shipped = repo().join("deploy/config/node.toml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.lines().any(|l| l == "# insecure_no_audit = true"));
    let c = NodeConfig::from_toml_str(&text, &shipped).unwrap();
    c.check_trail(&shipped).unwrap();
}

/// The next thing the node process did other than (re)connecting; fails the test, showing the
/// node's log, if it does nothing within [`PATIENCE`].
async fn next_answer(events: &mut mpsc::UnboundedReceiver<Event>, node: &NodeProcess) -> Event {
    loop {
        let event = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .unwrap_or_else(|_| panic!("the node did nothing in time; its log:\n{}", node.log()))
            .expect("events channel closed");
        // A reconnect re-announces the node; it is not an answer to a task.
        if !matches!(event, Event::Connected { .. }) {
            return event;
        }
    }
}

/// A job spec the protocol's strict parser reads (the agent tests' spec has a key only the node's
/// lenient view ignores), so that it has a digest officers can sign.
pub(crate) fn approvable_job_spec() -> String {
    job_spec("breast_cancer", "mlp").replace(
        "a_key_the_node_does_not_know = \"ignored\"",
        &format!("sites = [\"{SITE}\"]"),
    )
}

pub(crate) fn spec_digest(spec: &str) -> tutela_protocol::job::SpecDigest {
    tutela_protocol::job::JobSpec::from_toml_str(spec)
        .unwrap()
        .digest()
}

/// A user certificate of `site` from `ca`.
pub(crate) fn issue_user(
    ca: &CertificateAuthority,
    site: &str,
    name: &str,
) -> tutela_protocol::pki::IssuedCertificate {
    ca.issue(
        &Principal::User {
            site: site.into(),
            name: name.into(),
        },
        &LeafOptions::new(Validity::days_from_now(30)),
    )
    .unwrap()
}

/// An approval of `job` at `digest`, signed with `key_of`'s key and carrying `cert_of`'s
/// certificate, valid for an hour.
pub(crate) fn approval(
    key_of: &tutela_protocol::pki::IssuedCertificate,
    cert_of: &tutela_protocol::pki::IssuedCertificate,
    job: &str,
    digest: &tutela_protocol::job::SpecDigest,
) -> pb::SignedApproval {
    let t = now_ms();
    tutela_policy::Approval::sign(
        &key_of.key_pem,
        &cert_of.cert_pem,
        job,
        digest,
        t,
        t + 3_600_000,
    )
    .unwrap()
    .to_pb()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_process_refuses_forged_tasks_before_reading_data_and_runs_an_approved_one() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pki, ca) = pki_with_ca(d, SITE);
    let alice = issue_user(&ca, SITE, "alice");
    let mallory = issue_user(&ca, SITE, "mallory");
    // Another CA of the same consortium name: its "alice" is no officer of this consortium.
    let other_ca = CertificateAuthority::create(
        CONSORTIUM,
        KeyAlgorithm::EcdsaP256,
        Validity::days_from_now(30),
    )
    .unwrap();
    let fake_alice = issue_user(&other_ca, SITE, "alice");
    let policy = d.join("site-policy.toml");
    std::fs::write(
        &policy,
        format!(
            "site = \"{SITE}\"\ncompliance_officers = [\"spiffe://{CONSORTIUM}/site/{SITE}/user/alice\"]\n"
        ),
    )
    .unwrap();

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shared = Shared {
        events: events_tx,
        node: Default::default(),
        models: Default::default(),
    };
    let (coordinator, _) = Coordinator::start(
        "127.0.0.1:0".parse().unwrap(),
        &pki.coordinator,
        shared.clone(),
    )
    .await;
    // The site's data file is empty from the node's start until the approved task: a node that
    // read data for a forged task would decline it with a data error rather than the refusal each
    // case expects (and would have fetched the task's model first). It is whole at start, when
    // the node checks it (a dataset that fails the check is not offered), and emptied once the
    // node has connected offering it.
    let data_file = d.join("site-data").join("breast_cancer.csv");
    std::fs::create_dir_all(data_file.parent().unwrap()).unwrap();
    let repo_csv = data_dir().join("breast_cancer_wisconsin.csv");
    std::fs::copy(&repo_csv, &data_file).unwrap();
    let text = node_config_text(
        SITE,
        &coordinator.addr.to_string(),
        &pki.node,
        &format!("site_policy = \"{}\"\ntorch_threads = 1", policy.display()),
        "",
    );
    let text = text.replace(repo_csv.to_str().unwrap(), data_file.to_str().unwrap());
    assert!(text.contains(data_file.to_str().unwrap()));
    let config = d.join("node.toml");
    std::fs::write(&config, text).unwrap();
    let node = NodeProcess::start(&config, &d.join("node.log"));

    match tokio::time::timeout(PATIENCE, events.recv()).await {
        Ok(Some(Event::Connected { request, .. })) => {
            assert_eq!(request.datasets, vec!["breast_cancer".to_string()]);
            std::fs::write(&data_file, "").unwrap();
        }
        other => panic!(
            "expected the node to connect, got {other:?}; log:\n{}",
            node.log()
        ),
    }

    let spec = approvable_job_spec();
    let digest = spec_digest(&spec);
    let other_spec = spec.replace("learning_rate = 0.05", "learning_rate = 0.5");
    let other_digest = spec_digest(&other_spec);
    let edited = spec.replace("rounds = 2", "rounds = 3");
    let job = "job-1";
    let train = |id: &str, spec: &str, job_digest: String, approvals: Vec<pb::SignedApproval>| {
        let model_id = offer_model(&shared, id, &expected_initial_model());
        let mut t = task(id, pb::TaskKind::Train, spec, &model_id, "{}");
        t.job_id = job.into();
        t.job_digest = job_digest;
        t.approvals = approvals;
        t.submitted_by = format!("spiffe://{CONSORTIUM}/operator/op");
        t
    };
    let not_approved = format!("not approved for site {SITE}");
    let claimed_digest = format!("the task says the job's digest is {}", digest.to_hex());
    // An approval over the wrong digest is named by both digests (whatever the wording).
    let signs_other_digest = format!(
        "signs spec digest {}, but the job's spec digests to {}",
        other_digest.to_hex(),
        digest.to_hex()
    );
    let signs_unedited_digest = format!(
        "signs spec digest {}, but the job's spec digests to {}",
        digest.to_hex(),
        spec_digest(&edited).to_hex()
    );
    let computed_digest = format!(
        "but its spec digests to {}: refused",
        spec_digest(&edited).to_hex()
    );
    let forged = [
        (
            train("no-approval", &spec, digest.to_hex(), vec![]),
            vec![not_approved.as_str(), "the task carries no approvals"],
        ),
        (
            // Mallory's key under Alice's certificate.
            train(
                "wrong-key",
                &spec,
                digest.to_hex(),
                vec![approval(&mallory, &alice, job, &digest)],
            ),
            vec![
                not_approved.as_str(),
                "does not verify with the key of their certificate",
            ],
        ),
        (
            train(
                "other-ca",
                &spec,
                digest.to_hex(),
                vec![approval(&fake_alice, &fake_alice, job, &digest)],
            ),
            vec![
                not_approved.as_str(),
                "does not verify against the consortium CA",
            ],
        ),
        (
            // A valid certificate of this consortium, but not a compliance officer of the site.
            train(
                "not-an-officer",
                &spec,
                digest.to_hex(),
                vec![approval(&mallory, &mallory, job, &digest)],
            ),
            vec![
                not_approved.as_str(),
                "user/mallory (not a compliance officer of this site)",
            ],
        ),
        (
            // The officer's signature, but over another job's spec.
            train(
                "other-jobs-digest",
                &spec,
                digest.to_hex(),
                vec![approval(&alice, &alice, job, &other_digest)],
            ),
            vec![
                not_approved.as_str(),
                signs_other_digest.as_str(),
                "another job's",
            ],
        ),
        (
            // The officer's approval of another job altogether.
            train(
                "other-jobs-approval",
                &spec,
                digest.to_hex(),
                vec![approval(&alice, &alice, "job-2", &other_digest)],
            ),
            vec![not_approved.as_str(), "is for job job-2, not job job-1"],
        ),
        (
            // The spec edited after approval, with the edited spec's own digest.
            train(
                "edited-spec",
                &edited,
                spec_digest(&edited).to_hex(),
                vec![approval(&alice, &alice, job, &digest)],
            ),
            vec![not_approved.as_str(), signs_unedited_digest.as_str()],
        ),
        (
            // The spec edited after approval, and the coordinator claiming the approved digest.
            train(
                "edited-spec-old-digest",
                &edited,
                digest.to_hex(),
                vec![approval(&alice, &alice, job, &digest)],
            ),
            vec![claimed_digest.as_str(), computed_digest.as_str()],
        ),
    ];
    for (t, needles) in forged {
        send_task(&shared, t.clone()).await;
        // The refusal is the node's next act: no FetchModel, no update before it.
        match next_answer(&mut events, &node).await {
            Event::Declined { task_id, reason } => {
                assert_eq!(task_id, t.task_id);
                for needle in needles {
                    assert!(
                        reason.contains(needle),
                        "{task_id}: {needle:?} missing from the refusal {reason:?}"
                    );
                }
            }
            other => panic!(
                "{}: expected a refusal, got {other:?}; log:\n{}",
                t.task_id,
                node.log()
            ),
        }
    }
    // Nothing of the data was read, and no model was fetched.
    let log = node.log();
    assert!(!log.contains("dataset loaded"), "{log}");
    assert!(!log.contains("data.empty"), "{log}");
    let models = std::fs::read_dir(d.join("work/models")).unwrap().count();
    assert_eq!(models, 0, "the node stored a model for a refused task");

    // The officer's approval of exactly this spec: the node fetches, reads its data and trains.
    std::fs::copy(&repo_csv, &data_file).unwrap();
    send_task(
        &shared,
        train(
            "approved",
            &spec,
            digest.to_hex(),
            vec![approval(&alice, &alice, job, &digest)],
        ),
    )
    .await;
    match next_answer(&mut events, &node).await {
        Event::Fetched { task_id } => assert_eq!(task_id, "approved"),
        other => panic!("expected a FetchModel, got {other:?}; log:\n{}", node.log()),
    }
    match next_answer(&mut events, &node).await {
        Event::Update { manifest, tensors } => {
            assert_eq!(manifest.metadata[meta::TASK], "approved");
            // 569 rows, a fifth of each class held out for validation: read from the file.
            let samples: f64 = manifest.metadata[meta::SAMPLES].parse().unwrap();
            assert_eq!(samples, 456.0);
            assert_eq!(shapes(&tensors), shapes(&expected_initial_model()));
        }
        other => panic!("expected an update, got {other:?}; log:\n{}", node.log()),
    }
    node.wait_for_log("dataset loaded").await;
    let log = node.log();
    assert!(
        log.contains("task approved by this site's compliance officer"),
        "{log}"
    );
    assert!(!log.contains("insecure_no_approvals"), "{log}");
    drop(node);
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_waives_approvals_says_so_at_start_and_for_every_task() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), SITE);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shared = Shared {
        events: events_tx,
        node: Default::default(),
        models: Default::default(),
    };
    let (coordinator, _) = Coordinator::start(
        "127.0.0.1:0".parse().unwrap(),
        &pki.coordinator,
        shared.clone(),
    )
    .await;
    let config = dir.path().join("node.toml");
    let top_level = format!("{NO_APPROVALS}\ntorch_threads = 1");
    let text = node_config_text(
        SITE,
        &coordinator.addr.to_string(),
        &pki.node,
        &top_level,
        "",
    );
    std::fs::write(&config, text).unwrap();
    let node = NodeProcess::start(&config, &dir.path().join("node.log"));
    node.wait_for_log("insecure_no_approvals = true: NO APPROVALS")
        .await;
    node.wait_for_log("connected; waiting for tasks").await;
    for id in ["unapproved-1", "unapproved-2"] {
        send_task(
            &shared,
            task(
                id,
                pb::TaskKind::Initialize,
                &job_spec("breast_cancer", "mlp"),
                "",
                "{}",
            ),
        )
        .await;
        match next_answer(&mut events, &node).await {
            Event::Update { manifest, .. } => assert_eq!(manifest.metadata[meta::TASK], id),
            other => panic!("expected {id}'s update, got {other:?}"),
        }
    }
    let warning = "insecure_no_approvals = true: running this task WITHOUT any approval check";
    let log = node.log();
    assert_eq!(log.matches(warning).count(), 2, "{log}");
    drop(node);
    coordinator.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Nothing of the data leaves the site: what the fake coordinator receives as a decline reason is
// what a real one would store and record in the trail.

/// A task that fails on the site's data is declined with a code and a column; the cell's value,
/// the file's path and the line stay in the node's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_carry_a_code_and_a_column_never_a_value_or_a_path() {
    const PLANTED: &str = "planted.csv";
    let text = std::fs::read_to_string(data_dir().join("breast_cancer_wisconsin.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(header[0], "mean_radius");
    // Line 3 of the file: its first cell becomes text.
    let mut cells: Vec<String> = lines[2].split(',').map(String::from).collect();
    cells[0] = "forty-two".into();
    lines[2] = cells.join(",");
    let planted = lines.join("\n") + "\n";
    // The node checks its data at start and would not offer a bad file: the file is good at
    // start and the bad value is planted afterwards (as when the data changes under a running
    // node), so the task finds it.
    let plant = |dir: &Path| -> String {
        std::fs::write(dir.join(PLANTED), &text).unwrap();
        format!(
            "csv = \"{}\"\nschema = \"{}\"\nsplit_seed = 3\n",
            dir.join(PLANTED).display(),
            data_dir().join("breast_cancer.schema.toml").display()
        )
    };
    let mut h = Harness::start_with_dataset("", Some(&plant)).await;
    let dir = h._dir.path().to_path_buf();
    std::fs::write(dir.join(PLANTED), &planted).unwrap();
    let spec = job_spec("breast_cancer", "mlp");
    // INITIALIZE reads no data: it succeeds.
    h.send(task("init-1", pb::TaskKind::Initialize, &spec, "", "{}"))
        .await;
    let (_, initial) = h.update().await;
    let cases = [
        ("train-1", "data.invalid_value column=mean_radius"),
        // The file gone between start and the task.
        ("train-2", "data.unreadable"),
    ];
    for (id, expected) in cases {
        if id == "train-2" {
            std::fs::remove_file(dir.join(PLANTED)).unwrap();
        }
        let model_id = h.offer_model(id, &initial);
        h.send(task(id, pb::TaskKind::Train, &spec, &model_id, "{}"))
            .await;
        // A file that cannot be read withdraws the dataset from the coordinator (see
        // `agent::readiness`), by a new `Connect` that names no dataset.
        let mut withdrawn = false;
        loop {
            match h.next_event().await {
                Event::Fetched { .. } => continue,
                Event::Connected { request, .. } if id == "train-2" => {
                    assert_eq!(request.datasets, Vec::<String>::new());
                    withdrawn = true;
                }
                Event::Declined { task_id, reason } => {
                    assert_eq!(task_id, id);
                    assert_eq!(reason, expected);
                    for secret in ["forty-two", PLANTED, dir.to_str().unwrap(), "line"] {
                        assert!(!reason.contains(secret), "{secret:?} leaks in {reason:?}");
                    }
                    break;
                }
                other => panic!("{id}: expected a decline, got {other:?}"),
            }
        }
        if id == "train-2" && !withdrawn {
            assert_eq!(h.connected().await.1.datasets, Vec::<String>::new());
        }
    }
    h.shutdown().await;
}

/// A declared dataset whose file is missing stops `tutela-node run` at start, naming the
/// dataset (and, in the node's own output, the path); before, it was found at the first task.
#[test]
fn a_missing_dataset_file_stops_the_node_at_start() {
    use tutela_privacy::anonymize::synthetic::{DEMO_ANONYMIZE_TOML, declaration_toml};
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), SITE);
    let text = std::fs::read_to_string(data_dir().join("breast_cancer_wisconsin.csv")).unwrap();
    let header = text.lines().next().unwrap();
    let features: Vec<&str> = header.split(',').filter(|c| *c != "diagnosis").collect();
    let columns = dir.path().join("patients.columns.toml");
    std::fs::write(&columns, declaration_toml(&features, "diagnosis")).unwrap();
    let anonymize = dir.path().join("patients.anonymize.toml");
    std::fs::write(&anonymize, DEMO_ANONYMIZE_TOML).unwrap();
    let secret = dir.path().join("site.secret");
    std::fs::write(&secret, "2a".repeat(32)).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let missing = dir.path().join("not-there").join("patients.csv");
    let dataset = format!(
        "path = \"{}\"\nschema = \"{}\"\ncolumns = \"{}\"\nanonymize = \"{}\"\n",
        missing.display(),
        data_dir().join("breast_cancer.schema.toml").display(),
        columns.display(),
        anonymize.display()
    );
    let top_level = format!(
        "{NO_APPROVALS}\nsite_secret_file = \"{}\"",
        secret.display()
    );
    let text = node_config_with_dataset(SITE, "127.0.0.1:1", &pki.node, &top_level, "", &dataset);
    let config = dir.path().join("node.toml");
    std::fs::write(&config, text).unwrap();
    let mut node = NodeProcess::start(&config, &dir.path().join("node.log"));
    let status = node.exit_status();
    let log = node.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("datasets.breast_cancer"), "{log}");
    assert!(log.contains(missing.to_str().unwrap()), "{log}");
    assert!(!log.contains("site node starting"), "{log}");
}
