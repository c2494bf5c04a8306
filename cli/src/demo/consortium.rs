//! The consortium every demo runs on: a throwaway CA and certificates, the hospitals' compliance
//! officers and the consortium policy, the audit service and the coordinator as child processes
//! over loopback mutual TLS, and the operator's submission with each officer's signed approval.
//! The tabular and the notes demo differ only in the hospitals' data and the job.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tutela_protocol::identity::Principal;
use tutela_protocol::pb;
use tutela_protocol::pb::jobs_client::JobsClient;
use tutela_protocol::pki::{CaDir, IssuedCertificate, KeyAlgorithm, LeafOptions, Validity};

use crate::job_cmd::Connection;
use crate::net_cmd::ClientTlsArgs;

/// Children killed when the demo ends, however it ends.
pub(super) struct Processes(pub Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A binary built next to `tutela` (the workspace's target directory).
pub(super) fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {}: build the workspace first (`cargo build --workspace --bins`)",
            path.display(),
            exe.display()
        );
    }
    Ok(path)
}

pub(super) fn toml_path(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status}; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{what} did not listen on port {port} within 30 s; see {}",
        log.display()
    )
}

pub(super) fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    cmd.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))
}

/// The demo's consortium "demo": its certificates and policy, then (after [`Self::start`]) its
/// audit service and coordinator.
pub(super) struct Consortium {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub crl: PathBuf,
    pub policy_dir: PathBuf,
    /// Each hospital and its compliance officer's certificate and key.
    pub officers: Vec<(String, IssuedCertificate)>,
    pub audit_dir: PathBuf,
    pub audit_port: u16,
    /// The coordinator's port.
    pub port: u16,
    pub procs: Processes,
}

impl Consortium {
    /// A throwaway CA in `dir/ca`; certificates for the coordinator, the audit service, one node
    /// and one compliance officer per site, and an operator; the consortium policy.
    pub fn certify(dir: &Path, sites: &[&str]) -> Result<Self> {
        let ca = CaDir::init(&dir.join("ca"), "demo", KeyAlgorithm::EcdsaP256, 365, false)?;
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        let write = |stem: &str, issued: &IssuedCertificate| -> Result<()> {
            std::fs::write(certs.join(format!("{stem}.crt")), &issued.cert_pem)?;
            tutela_protocol::pki::files::write_new(
                &certs.join(format!("{stem}.key")),
                issued.key_pem.as_bytes(),
                tutela_protocol::pki::files::FileMode::Private,
            )?;
            Ok(())
        };
        std::fs::write(certs.join("ca.crt"), ca.ca().cert_pem())?;
        let mut server_opts = LeafOptions::new(Validity::days_from_now(30));
        server_opts.dns_names = vec!["localhost".into()];
        server_opts.ip_addresses = vec!["127.0.0.1".parse()?];
        write(
            "coordinator",
            &ca.issue(&Principal::Coordinator, &server_opts)?,
        )?;
        write("audit", &ca.issue(&Principal::Audit, &server_opts)?)?;
        for site in sites {
            write(
                &format!("node-{site}"),
                &ca.issue(
                    &Principal::Node {
                        site: site.to_string(),
                    },
                    &LeafOptions::new(Validity::days_from_now(30)),
                )?,
            )?;
        }
        write(
            "operator-demo",
            &ca.issue(
                &Principal::Operator {
                    name: "demo".into(),
                },
                &LeafOptions::new(Validity::days_from_now(30)),
            )?,
        )?;
        // One compliance officer per hospital, and the consortium policy that makes them officers.
        let mut officers = Vec::new();
        for site in sites {
            let who = Principal::User {
                site: site.to_string(),
                name: "officer".into(),
            };
            let issued = ca.issue(&who, &LeafOptions::new(Validity::days_from_now(30)))?;
            write(&format!("officer-{site}"), &issued)?;
            officers.push((site.to_string(), issued));
        }
        let policy_dir = dir.join("policy");
        std::fs::create_dir_all(&policy_dir)?;
        std::fs::write(
            policy_dir.join("model.conf"),
            include_str!("../../../deploy/policy/model.conf"),
        )?;
        for (site, o) in &officers {
            std::fs::write(
                policy_dir.join(format!("site-policy-{site}.toml")),
                format!(
                    "site = \"{site}\"\ncompliance_officers = [\"{}\"]\nallowed_operators = [\"spiffe://demo/operator/demo\"]\n",
                    o.identity
                ),
            )?;
        }
        // The shipped consortium policy with the demo's identities: officers approve, only the
        // operator submits and cancels.
        let officer_ids: Vec<(String, String)> = officers
            .iter()
            .map(|(site, o)| (site.clone(), o.identity.to_string()))
            .collect();
        let policy_csv =
            crate::demo_policy::policy_csv("demo", "spiffe://demo/operator/demo", &officer_ids);
        std::fs::write(policy_dir.join("policy.csv"), policy_csv)?;
        println!(
            "consortium \"demo\": CA, coordinator, {} site nodes, their compliance officers and an operator certified in {}",
            sites.len(),
            certs.display()
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            certs,
            crl: ca.crl_path(),
            policy_dir,
            officers,
            audit_dir: dir.join("audit"),
            audit_port: 0,
            port: 0,
            procs: Processes(Vec::new()),
        })
    }

    /// Starts the audit service (SQLite; it makes its checkpoint key at first start), then the
    /// coordinator, which records every job, round and model there.
    pub fn start(&mut self) -> Result<()> {
        let audit_port = free_port()?;
        // Each service's Prometheus metrics on a loopback port of its own (docs/monitoring.md).
        let audit_metrics = free_port()?;
        let audit_dir = &self.audit_dir;
        std::fs::create_dir_all(audit_dir)?;
        let audit_toml = audit_dir.join("audit.toml");
        std::fs::write(
            &audit_toml,
            format!(
                "listen = \"127.0.0.1:{audit_port}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/audit.crt\"\nkey = \"{c}/audit.key\"\ncrl = \"{}\"\n[policy]\nmodel = \"{pd}/model.conf\"\npolicy = \"{pd}/policy.csv\"\n[metrics]\nlisten = \"127.0.0.1:{audit_metrics}\"\n",
                toml_path(audit_dir),
                toml_path(&self.crl),
                c = toml_path(&self.certs),
                pd = toml_path(&self.policy_dir),
            ),
        )?;
        let audit_log = audit_dir.join("audit.log");
        let mut audit = spawn_logged(
            Command::new(sibling("tutela-audit")?)
                .arg("--config")
                .arg(&audit_toml),
            &audit_log,
        )?;
        wait_for_port(audit_port, &mut audit, "the audit service", &audit_log)?;
        self.procs.0.push(("audit".into(), audit));
        self.audit_port = audit_port;
        println!(
            "audit service listening on 127.0.0.1:{audit_port} (SQLite, signed checkpoints); metrics: http://127.0.0.1:{audit_metrics}/metrics"
        );

        let port = free_port()?;
        let coordinator_metrics = free_port()?;
        let coord_dir = self.dir.join("coordinator");
        std::fs::create_dir_all(&coord_dir)?;
        let coord_toml = coord_dir.join("coordinator.toml");
        std::fs::write(
            &coord_toml,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/coordinator.crt\"\nkey = \"{c}/coordinator.key\"\ncrl = \"{}\"\n[policy]\nmodel = \"{pd}/model.conf\"\npolicy = \"{pd}/policy.csv\"\n[audit]\nendpoint = \"localhost:{audit_port}\"\n[metrics]\nlisten = \"127.0.0.1:{coordinator_metrics}\"\n",
                toml_path(&coord_dir),
                toml_path(&self.crl),
                c = toml_path(&self.certs),
                pd = toml_path(&self.policy_dir)
            ),
        )?;
        let log = coord_dir.join("coordinator.log");
        let mut coordinator = spawn_logged(
            Command::new(sibling("tutela-coordinator")?)
                .arg("--config")
                .arg(&coord_toml),
            &log,
        )?;
        wait_for_port(port, &mut coordinator, "the coordinator", &log)?;
        self.procs.0.push(("coordinator".into(), coordinator));
        self.port = port;
        println!(
            "coordinator listening on 127.0.0.1:{port} (mutual TLS 1.3); metrics: http://127.0.0.1:{coordinator_metrics}/metrics"
        );
        Ok(())
    }

    /// The part of a node.toml every demo site shares: identity, coordinator, work directory,
    /// keys, TLS, encryption at rest and the audit service. The caller appends its datasets.
    pub fn node_toml_head(&self, site: &str, site_dir: &Path, kek: &Path, secret: &Path) -> String {
        format!(
            "site = \"{site}\"\ncoordinator = \"localhost:{port}\"\ntorch_threads = 1\nwork_dir = \"{w}\"\nsite_secret_file = \"{secret}\"\nsite_policy = \"{sp}\"\n[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/node-{site}.crt\"\nkey = \"{c}/node-{site}.key\"\ncrl = \"{crl}\"\n[at_rest]\nkek_file = \"{kek}\"\n[audit]\nendpoint = \"localhost:{audit_port}\"\ncheckpoint_public_key = \"{audit_pub}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            port = self.port,
            // Its metrics port is in its log (`metrics listening`); 0 lets the system pick one.
            metrics = free_port().unwrap_or(0),
            audit_port = self.audit_port,
            kek = toml_path(kek),
            // The audit service made its checkpoint key at start; each site pins its public
            // half (a real site receives it out of band).
            audit_pub = toml_path(&self.audit_dir.join("checkpoint.key.pub")),
            secret = toml_path(secret),
            sp = toml_path(&self.policy_dir.join(format!("site-policy-{site}.toml"))),
            w = toml_path(&site_dir.join("work")),
            c = toml_path(&self.certs),
            crl = toml_path(&self.crl),
        )
    }

    pub fn operator(&self) -> Connection {
        Connection {
            coordinator: format!("localhost:{}", self.port),
            tls: ClientTlsArgs {
                tls_dir: self.certs.clone(),
                stem: "operator-demo".into(),
                crl: Some(self.crl.clone()),
            },
        }
    }

    /// The operator submits the job; each hospital's compliance officer signs its digest (the
    /// job starts with the last approval). Returns the operator's client and the job's status.
    pub async fn submit_and_approve(
        &self,
        spec_text: String,
    ) -> Result<(JobsClient<tonic::transport::Channel>, pb::JobStatus)> {
        let mut jobs = self.operator().jobs().await?;
        let status = jobs
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec_text,
            })
            .await
            .context("the coordinator refused the demo job")?
            .into_inner();
        println!(
            "job {} ({}) submitted: {} rounds, spec digest {}",
            status.job_id,
            status.name,
            status.rounds_total,
            &status.spec_digest[..16]
        );
        let digest: tutela_protocol::job::SpecDigest = status.spec_digest.parse()?;
        for (site, officer) in &self.officers {
            let now_ms =
                (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            let approval = tutela_policy::Approval::sign(
                &officer.key_pem,
                &officer.cert_pem,
                &status.job_id,
                &digest,
                now_ms,
                now_ms + 86_400_000,
            )?;
            let as_officer = Connection {
                coordinator: format!("localhost:{}", self.port),
                tls: ClientTlsArgs {
                    tls_dir: self.certs.clone(),
                    stem: format!("officer-{site}"),
                    crl: Some(self.crl.clone()),
                },
            };
            as_officer
                .jobs()
                .await?
                .approve_job(pb::ApproveJobRequest {
                    approval: Some(approval.to_pb()),
                })
                .await
                .with_context(|| {
                    format!("the coordinator refused {}'s approval", officer.identity)
                })?;
            println!("approved by {} (signed spec digest)", officer.identity);
        }
        Ok((jobs, status))
    }

    /// The audit trail checked as a regulator would (`tutela audit verify`), after the next
    /// signed checkpoint has covered the job's last events; prints and returns its source.
    pub async fn verify_trail(&self) -> Result<crate::audit_cmd::Source> {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let source = crate::audit_cmd::Source {
            audit: format!("localhost:{}", self.audit_port),
            tls_dir: Some(self.certs.clone()),
            // A compliance officer reads the trail: the policy lets officers read it, not
            // operators.
            stem: Some(format!("officer-{}", self.officers[0].0)),
            database_url: None,
            ca: None,
            ca_admins: Vec::new(),
        };
        // Checked against the checkpoint key as a site pins it, not the one the service reports.
        let pinned_key = self
            .audit_dir
            .join("checkpoint.key.pub")
            .display()
            .to_string();
        let (events, checkpoints) = crate::audit_cmd::verify_quiet(&source, Some(pinned_key))
            .await
            .context("the audit trail does not verify")?;
        println!(
            "audit trail: {events} events, chain and {checkpoints} checkpoint(s) verified ({})",
            self.audit_dir.display()
        );
        Ok(source)
    }
}

/// The rounds' progress bar both demos show while a job runs, "training" with `waiting` as its
/// message until the first round is in.
pub(super) fn rounds_bar(rounds_total: u32, waiting: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(u64::from(rounds_total));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} rounds  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix("training");
    bar.set_message(waiting.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
