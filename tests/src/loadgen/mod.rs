//! The load generator: many light site agents in one process against one real
//! `tutela-coordinator` and one real `tutela-audit`, to find where the coordinator breaks.
//!
//! [`run`] builds a consortium at test time (a CA with [`tutela_protocol::pki`]; a certificate per
//! site node and per site compliance officer; the casbin policy with one officer per site and
//! the quorum "one officer of every site", `p2, site:*, compliance_officer, 1`), starts the audit
//! service and the coordinator with that policy (no waiver: approvals and the trail are on), and
//! then:
//! 1. starts N agents ([`agent`]), each with its own certificate and its own mutual-TLS
//!    connection, and waits until every one has its `Connect` stream open;
//! 2. submits a job of an MLP whose size the caller chooses, listing every site, `min_sites` N
//!    and `fraction` 1.0, so that every round samples every site;
//! 3. has every site's officer sign the job's spec digest with their own key and submit the
//!    approval over their own connection, as `tutela job approve` does;
//! 4. watches the job round by round, reading the coordinator's CPU time, resident memory and
//!    sockets from `/proc` ([`probe`]) and the audit log's size from the audit service.
//!
//! The agents touch no data and train nothing (see [`agent`]): what is measured is the
//! coordinator's side of a round (task routing, N model downloads, N streamed uploads folded into
//! the running sum, the round's record and audit events).

pub mod agent;
pub mod probe;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tutela_audit::client::AuditClient;
use tutela_policy::Approval;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::job::SpecDigest;
use tutela_protocol::model_registry::{DataDims, HyperParams, ModelDescription};
use tutela_protocol::pb;
use tutela_protocol::pb::jobs_client::JobsClient;
use tutela_protocol::pki::{LeafOptions, Validity};
use tutela_protocol::tls::TlsFiles;

use crate::consortium::{AuditPolicy, Consortium};
use crate::{ChildGuard, free_port, repo_root};

use agent::AgentShared;

/// The dataset schema the agents announce and the job trains on: the breast-cancer table's
/// shape (30 features, 2 classes), so that a job's model is what a real site would build.
pub const SCHEMA: &str = "breast_cancer";
const FEATURES: u64 = 30;
const CLASSES: u64 = 2;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub sites: usize,
    pub rounds: u32,
    /// The MLP's hidden widths: `[1000, 1000]` is about 1.03 M parameters, `[16]` about 500.
    pub hidden: Vec<u64>,
    pub round_deadline_secs: u64,
    /// Simulated local training before each upload.
    pub train_time: Duration,
    /// The consortium's directory (CA, certificates, policy, the services' data and logs).
    pub work_dir: PathBuf,
    /// The coordinator's database; its SQLite default under `work_dir` when `None`.
    pub database_url: Option<String>,
    /// Officers approving at once.
    pub approve_concurrency: usize,
}

impl LoadConfig {
    pub fn new(sites: usize, work_dir: &Path) -> LoadConfig {
        LoadConfig {
            sites,
            rounds: 2,
            hidden: vec![16],
            round_deadline_secs: 120,
            train_time: Duration::ZERO,
            work_dir: work_dir.to_path_buf(),
            database_url: None,
            approve_concurrency: 8,
        }
    }

    /// Parameters of the job's model.
    pub fn parameters(&self) -> Result<u64, LoadError> {
        let hyper = HyperParams {
            hidden: self.hidden.clone(),
            dropout: 0.0,
            conv_channels: [16, 32],
        };
        let specs = ModelDescription::new("mlp", &hyper)
            .and_then(|d| d.concrete(&dims()))
            .map_err(|e| LoadError::Setup(format!("the model: {e}")))?;
        Ok(specs.iter().filter_map(|t| t.numel()).sum())
    }
}

fn dims() -> DataDims {
    DataDims {
        input_shape: vec![FEATURES],
        num_classes: CLASSES,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("setting up the consortium: {0}")]
    Setup(String),
    #[error("{what} did not happen within {secs}s: {detail}")]
    Timeout {
        what: String,
        secs: u64,
        detail: String,
    },
    #[error("the job ended {state}: {reason}")]
    JobFailed { state: String, reason: String },
    #[error("{0}")]
    Rpc(String),
}

/// One round as measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RoundReport {
    pub round: u32,
    /// The coordinator's own figure: dispatch to record.
    pub seconds: f64,
    /// From the previous round's record (or the job's approval, for round 1, which includes the
    /// initial model) to this one's, as the generator saw it.
    pub wall_seconds: f64,
    pub participants: usize,
    pub accepted: usize,
    pub refused: usize,
    /// The coordinator's CPU seconds over `wall_seconds`, and as a share of one core.
    pub coordinator_cpu_seconds: f64,
    pub coordinator_cpu_percent: f64,
    pub coordinator_rss_peak_bytes: u64,
    pub coordinator_sockets_peak: u64,
    pub audit_events: u64,
    pub audit_events_per_second: f64,
    /// The generator's own CPU seconds over `wall_seconds` (its agents, TLS and streams): if it
    /// nears the machine's cores, the generator, not the coordinator, sets the pace.
    pub generator_cpu_seconds: f64,
}

/// A whole run as measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadReport {
    pub sites: usize,
    pub parameters: u64,
    pub update_bytes: u64,
    pub job_id: String,
    pub state: String,
    /// From starting the agents until every `Connect` stream was open.
    pub connect_seconds: f64,
    /// From submitting the job until the last officer's approval was accepted.
    pub approve_seconds: f64,
    pub rounds: Vec<RoundReport>,
    /// The coordinator's resident memory before any agent connected, with every agent connected
    /// (idle), and its kernel high-water mark at the end.
    pub coordinator_rss_start_bytes: u64,
    pub coordinator_rss_connected_bytes: u64,
    pub coordinator_rss_hwm_bytes: u64,
    /// (connected − start) / sites: what an idle connected site costs the coordinator.
    pub coordinator_bytes_per_connected_site: f64,
    pub coordinator_sockets_connected: u64,
    pub coordinator_threads: u64,
    pub audit_events_total: u64,
    pub agent_connect_failures: u64,
    pub agent_failures: u64,
    pub agent_last_failure: Option<String>,
    pub open_files_limit: u64,
}

/// What a run reports while it goes (for a progress bar).
pub trait Observer: Send + Sync {
    /// A new phase with `total` steps.
    fn phase(&self, name: &str, total: u64);
    /// Steps done in the current phase.
    fn progress(&self, done: u64);
    /// A round was recorded.
    fn round(&self, report: &RoundReport);
}

/// An observer that reports nothing.
pub struct Silent;

impl Observer for Silent {
    fn phase(&self, _: &str, _: u64) {}
    fn progress(&self, _: u64) {}
    fn round(&self, _: &RoundReport) {}
}

/// The running consortium of a load run, kept for inspection after [`run`] returns (its
/// processes stop when it is dropped).
pub struct LoadRun {
    pub report: LoadReport,
    pub consortium: Consortium,
    pub audit: ChildGuard,
    pub audit_port: u16,
}

impl LoadRun {
    /// A client of the audit service as site 0's compliance officer (who may read the trail).
    pub async fn audit_reader(&self) -> Result<AuditClient, LoadError> {
        audit_reader(&self.consortium, self.audit_port).await
    }
}

fn site_name(i: usize) -> String {
    format!("s{i:04}")
}

const OFFICER: &str = "officer";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn setup<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> LoadError + '_ {
    move |e| LoadError::Setup(format!("{what}: {e}"))
}

/// The consortium's casbin policy for `sites` sites: the grants of deploy/policy/policy.csv that
/// a node, the coordinator, the operator and officers need, one officer per site, and the quorum
/// one officer of every site.
pub fn policy_csv(consortium: &str, sites: &[String]) -> String {
    let mut p = format!(
        "p, operator, consortium, jobs, *, allow\n\
         p, compliance_officer, *, jobs, read, allow\n\
         p, compliance_officer, *, jobs, approve, allow\n\
         p, compliance_officer, *, audit, read, allow\n\
         p, compliance_officer, *, audit, verify, allow\n\
         p, spiffe://{consortium}/site/*/node, site:*, federation, participate, allow\n\
         p, spiffe://{consortium}/coordinator, consortium, audit, write, allow\n\
         p, spiffe://{consortium}/coordinator, consortium, audit, read_own, allow\n\
         g, spiffe://{consortium}/operator/op, operator, consortium\n\
         p2, site:*, compliance_officer, 1\n"
    );
    for site in sites {
        p.push_str(&format!(
            "g, spiffe://{consortium}/site/{site}/user/{OFFICER}, compliance_officer, site:{site}\n"
        ));
    }
    p
}

/// The job: an MLP of `hidden` on the breast-cancer schema, every site, every round.
pub fn job_spec(config: &LoadConfig, sites: &[String]) -> String {
    let hidden = config
        .hidden
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let sites = sites
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"name = "loadgen"
rounds = {rounds}
min_sites = {n}
fraction = 1.0
round_deadline_secs = {deadline}
max_round_retries = 1
update_norm_bound = 50.0
sites = [{sites}]
seed = 7

[model]
name = "mlp"
hidden = [{hidden}]

[data]
schema = "{SCHEMA}"

[training]
optimizer = "sgd"
learning_rate = 0.01
local_epochs = 1
batch_size = 32
"#,
        rounds = config.rounds,
        n = config.sites,
        deadline = config.round_deadline_secs,
    )
}

async fn audit_reader(c: &Consortium, port: u16) -> Result<AuditClient, LoadError> {
    let tls = ClientTls::load(
        &TlsFiles::in_dir(&c.certs(), &format!("user-{}", site_name(0))),
        Some(Identity::new("e2e", Principal::Audit).map_err(setup("identity"))?),
    )
    .map_err(setup("officer TLS"))?;
    AuditClient::connect(&format!("localhost:{port}"), tls)
        .await
        .map_err(|e| LoadError::Rpc(format!("connecting to the audit service: {e}")))
}

async fn audit_size(reader: &mut AuditClient) -> u64 {
    reader.log_info().await.map(|i| i.size).unwrap_or(0)
}

/// Runs the load: see the module's documentation. The consortium's processes are left running
/// in the returned [`LoadRun`].
pub async fn run(config: &LoadConfig, observer: &dyn Observer) -> Result<LoadRun, LoadError> {
    let open_files_limit = probe::raise_open_files_limit().map_err(setup("RLIMIT_NOFILE"))?;
    let sites: Vec<String> = (0..config.sites).map(site_name).collect();
    let dir = &config.work_dir;
    std::fs::create_dir_all(dir).map_err(setup("the work directory"))?;
    let mut c = Consortium::new(dir);
    c.database_url = config.database_url.clone();

    // Certificates: a node and an officer per site, each its own key.
    observer.phase("certificates", sites.len() as u64);
    let certs = c.certs();
    for (i, site) in sites.iter().enumerate() {
        let opts = LeafOptions::new(Validity::days_from_now(2));
        for (principal, stem) in [
            (
                Principal::Node { site: site.clone() },
                format!("node-{site}"),
            ),
            (
                Principal::User {
                    site: site.clone(),
                    name: OFFICER.into(),
                },
                format!("user-{site}"),
            ),
        ] {
            // From the CA in memory: `CaDir::issue` rewrites its index on every certificate,
            // which made issuing two thousand of them take minutes.
            let issued =
                c.ca.ca()
                    .issue(&principal, &opts)
                    .map_err(setup("issuing"))?;
            std::fs::write(certs.join(format!("{stem}.crt")), &issued.cert_pem)
                .map_err(setup("writing a certificate"))?;
            std::fs::write(certs.join(format!("{stem}.key")), &issued.key_pem)
                .map_err(setup("writing a key"))?;
        }
        observer.progress(i as u64 + 1);
    }

    // Policy, audit service, coordinator.
    let pol = dir.join("policy");
    std::fs::create_dir_all(&pol).map_err(setup("the policy directory"))?;
    std::fs::copy(
        repo_root().join("deploy/policy/model.conf"),
        pol.join("model.conf"),
    )
    .map_err(setup("deploy/policy/model.conf"))?;
    std::fs::write(pol.join("policy.csv"), policy_csv("e2e", &sites))
        .map_err(setup("policy.csv"))?;
    let audit_port = free_port();
    let audit = c.start_audit(audit_port, AuditPolicy::Files(&pol));
    c.coordinator_extra = format!(
        "[policy]\nmodel = \"{}\"\npolicy = \"{}\"\nreload_secs = 5\n[audit]\nendpoint = \"localhost:{audit_port}\"\n",
        pol.join("model.conf").display(),
        pol.join("policy.csv").display()
    );
    c.start_coordinator();
    let coordinator_pid = c
        .coordinator
        .as_ref()
        .map(ChildGuard::pid)
        .ok_or_else(|| LoadError::Setup("the coordinator did not start".into()))?;
    // Let it settle (policy loaded, audit connected) before the baseline reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = probe::sample(coordinator_pid).unwrap_or_default();

    // Agents.
    let shared = Arc::new(AgentShared::new(
        format!("localhost:{}", c.port),
        SCHEMA.into(),
        dims(),
        100,
        config.train_time,
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let server = Identity::new("e2e", Principal::Coordinator).map_err(setup("identity"))?;
    observer.phase("connecting", sites.len() as u64);
    let connecting = Instant::now();
    for site in &sites {
        let tls = ClientTls::load(
            &TlsFiles::in_dir(&certs, &format!("node-{site}")),
            Some(server.clone()),
        )
        .map_err(setup("a node's TLS"))?;
        tokio::spawn(agent::run_agent(
            site.clone(),
            tls,
            shared.clone(),
            stop.clone(),
        ));
    }
    let connect_timeout = Duration::from_secs(60 + config.sites as u64 / 5);
    loop {
        let n = shared.counters.connected.load(Ordering::Relaxed);
        observer.progress(n as u64);
        if n >= sites.len() {
            break;
        }
        if connecting.elapsed() > connect_timeout {
            return Err(LoadError::Timeout {
                what: format!("{} agents connecting", sites.len()),
                secs: connect_timeout.as_secs(),
                detail: format!(
                    "{n} connected, {} connect failures, last: {:?}",
                    shared.counters.connect_failures.load(Ordering::Relaxed),
                    shared
                        .counters
                        .last_failure
                        .lock()
                        .ok()
                        .and_then(|l| l.clone())
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_seconds = connecting.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected = probe::sample(coordinator_pid).unwrap_or_default();

    // The job, and every site's approval.
    let mut op = c.operator().await;
    let spec = job_spec(config, &sites);
    let status = op
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .map_err(|s| LoadError::Rpc(format!("SubmitJob: {}", s.message())))?
        .into_inner();
    let job = status.job_id.clone();
    let digest: SpecDigest = status
        .spec_digest
        .parse()
        .map_err(|e| LoadError::Rpc(format!("the job's spec digest: {e:?}")))?;
    observer.phase("approving", sites.len() as u64);
    let approving = Instant::now();
    approve_all(
        &c,
        &job,
        &digest,
        &sites,
        config.approve_concurrency,
        observer,
    )
    .await?;
    let approve_seconds = approving.elapsed().as_secs_f64();

    // The rounds.
    let mut reader = audit_reader(&c, audit_port).await?;
    let sampler = probe::Sampler::start(coordinator_pid, Duration::from_millis(100));
    let mut reports = Vec::new();
    let mut mark = Instant::now();
    let mut cpu_mark = probe::sample(coordinator_pid)
        .unwrap_or_default()
        .cpu_seconds;
    let mut audit_mark = audit_size(&mut reader).await;
    let me = std::process::id();
    let mut own_cpu_mark = probe::sample(me).unwrap_or_default().cpu_seconds;
    let uploads_mark = |s: &AgentShared| s.counters.uploads_accepted.load(Ordering::Relaxed);
    let mut uploads_at_round_start = uploads_mark(&shared);
    observer.phase("round 1", sites.len() as u64);
    let job_timeout =
        Duration::from_secs((config.round_deadline_secs + 30) * (u64::from(config.rounds) + 1) * 2);
    // The job's status once a second: an operator's `tutela job status --watch` costs the
    // coordinator as much, and polling faster would measure the polling.
    let final_status = loop {
        for _ in 0..4 {
            observer.progress(uploads_mark(&shared).saturating_sub(uploads_at_round_start));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The operator's connection, idle through a long approval phase on starved cores, can
        // be closed under it (seen at 1,000 sites: "h2 protocol error"): connect again, as an
        // operator's `tutela job status` would, a few times before giving up.
        let mut tries = 0;
        let s = loop {
            match op
                .get_job(pb::GetJobRequest {
                    job_id: job.clone(),
                })
                .await
            {
                Ok(s) => break s.into_inner(),
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing_note(&format!("GetJob, attempt {tries}: {}", e.message()));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    op = c.operator().await;
                }
                Err(e) => return Err(LoadError::Rpc(format!("GetJob: {}", e.message()))),
            }
        };
        for r in s.rounds.iter().skip(reports.len()) {
            let wall = mark.elapsed().as_secs_f64();
            mark = Instant::now();
            let now = probe::sample(coordinator_pid).unwrap_or_default();
            let cpu = now.cpu_seconds - cpu_mark;
            cpu_mark = now.cpu_seconds;
            let audit_now = audit_size(&mut reader).await;
            let events = audit_now.saturating_sub(audit_mark);
            audit_mark = audit_now;
            let peaks = sampler.take();
            let own_cpu = probe::sample(me).unwrap_or_default().cpu_seconds;
            let generator_cpu_seconds = own_cpu - own_cpu_mark;
            own_cpu_mark = own_cpu;
            let report = RoundReport {
                round: r.round,
                seconds: r.seconds,
                wall_seconds: wall,
                participants: r.participants.len(),
                accepted: r.metrics.len(),
                refused: r.refused.len(),
                coordinator_cpu_seconds: cpu,
                coordinator_cpu_percent: 100.0 * cpu / wall.max(1e-9),
                coordinator_rss_peak_bytes: peaks.rss_bytes.max(now.rss_bytes),
                coordinator_sockets_peak: peaks.sockets.max(now.sockets),
                audit_events: events,
                audit_events_per_second: events as f64 / wall.max(1e-9),
                generator_cpu_seconds,
            };
            observer.round(&report);
            reports.push(report);
            uploads_at_round_start = uploads_mark(&shared);
            observer.phase(&format!("round {}", reports.len() + 1), sites.len() as u64);
        }
        if ["completed", "failed", "cancelled"].contains(&s.state.as_str()) {
            break s;
        }
        if approving.elapsed() > job_timeout {
            return Err(LoadError::Timeout {
                what: format!("job {job}"),
                secs: job_timeout.as_secs(),
                detail: format!("state {}, {} rounds done", s.state, s.rounds_completed),
            });
        }
    };
    let end = probe::sample(coordinator_pid).unwrap_or_default();
    let audit_events_total = audit_size(&mut reader).await;
    stop.cancel();

    let parameters = config.parameters()?;
    let report = LoadReport {
        sites: config.sites,
        parameters,
        update_bytes: parameters * 4,
        job_id: job,
        state: final_status.state.clone(),
        connect_seconds,
        approve_seconds,
        rounds: reports,
        coordinator_rss_start_bytes: start.rss_bytes,
        coordinator_rss_connected_bytes: connected.rss_bytes,
        coordinator_rss_hwm_bytes: end.rss_peak_bytes,
        coordinator_bytes_per_connected_site: (connected.rss_bytes as f64 - start.rss_bytes as f64)
            / config.sites.max(1) as f64,
        coordinator_sockets_connected: connected.sockets,
        coordinator_threads: connected.threads,
        audit_events_total,
        agent_connect_failures: shared.counters.connect_failures.load(Ordering::Relaxed),
        agent_failures: shared.counters.failures.load(Ordering::Relaxed),
        agent_last_failure: shared
            .counters
            .last_failure
            .lock()
            .ok()
            .and_then(|l| l.clone()),
        open_files_limit,
    };
    if final_status.state != "completed" {
        return Err(LoadError::JobFailed {
            state: final_status.state,
            reason: format!(
                "{} (agents: {:?}); logs in {}",
                final_status.reason,
                report.agent_last_failure,
                dir.display()
            ),
        });
    }
    Ok(LoadRun {
        report,
        consortium: c,
        audit,
        audit_port,
    })
}

/// A transient failure the run survived, on stderr (the report counts only what failed).
fn tracing_note(what: &str) {
    eprintln!("loadgen: retrying: {what}");
}

/// Every site's officer signs the job's digest with their own key and submits it over their own
/// connection, `concurrency` at a time.
async fn approve_all(
    c: &Consortium,
    job: &str,
    digest: &SpecDigest,
    sites: &[String],
    concurrency: usize,
    observer: &dyn Observer,
) -> Result<(), LoadError> {
    let certs = c.certs();
    let addr = format!("localhost:{}", c.port);
    let server = Identity::new("e2e", Principal::Coordinator).map_err(setup("identity"))?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sites = Arc::new(sites.to_vec());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (next, done, sites) = (next.clone(), done.clone(), sites.clone());
        let (certs, addr, server, job, digest) = (
            certs.clone(),
            addr.clone(),
            server.clone(),
            job.to_string(),
            *digest,
        );
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(site) = sites.get(i) else {
                    return Ok::<(), LoadError>(());
                };
                let stem = format!("user-{site}");
                let files = TlsFiles::in_dir(&certs, &stem);
                let read = |p: &Path| {
                    std::fs::read_to_string(p).map_err(setup("an officer's key or certificate"))
                };
                let (key, cert) = (read(&files.key)?, read(&files.cert)?);
                let t = now_ms();
                let approval = Approval::sign(&key, &cert, &job, &digest, t, t + 3_600_000)
                    .map_err(setup("signing an approval"))?
                    .to_pb();
                let tls = ClientTls::load(&files, Some(server.clone()))
                    .map_err(setup("an officer's TLS"))?;
                // An officer whose connection fails tries again, as `tutela job approve` run
                // again would; a refusal is final.
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let sent = match client::connect(&addr, tls.clone()).await {
                        Ok(channel) => JobsClient::new(channel)
                            .approve_job(pb::ApproveJobRequest {
                                approval: Some(approval.clone()),
                            })
                            .await
                            .map(|_| ())
                            .or_else(|s| match s.code() {
                                // A retry of an approval the coordinator took before the
                                // connection broke, which completed the quorum: done.
                                tonic::Code::FailedPrecondition if attempt > 1 => Ok(()),
                                code => Err((
                                    code == tonic::Code::Unavailable,
                                    format!("ApproveJob: {}", s.message()),
                                )),
                            }),
                        Err(e) => Err((true, e.to_string())),
                    };
                    match sent {
                        Ok(()) => break,
                        Err((true, why)) if attempt < 5 => {
                            tracing_note(&format!("officer of {site}, attempt {attempt}: {why}"));
                            tokio::time::sleep(Duration::from_secs(attempt)).await;
                        }
                        Err((_, why)) => {
                            return Err(LoadError::Rpc(format!("officer of {site}: {why}")));
                        }
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    loop {
        tokio::select! {
            r = workers.join_next() => match r {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(LoadError::Rpc(format!("an approval task: {e}"))),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        observer.progress(done.load(Ordering::Relaxed) as u64);
    }
    observer.progress(done.load(Ordering::Relaxed) as u64);
    Ok(())
}
