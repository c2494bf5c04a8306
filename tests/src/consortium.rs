//! A consortium of real processes for the end-to-end tests: a CA made with the library, a
//! `tutela-coordinator` process and `tutela-node` processes with their own data shares, talking
//! mutual TLS over loopback, and an operator client for the `Jobs` service.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::jobs_client::JobsClient;
use tutela_protocol::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::tls::TlsFiles;

use crate::{ChildGuard, bin, free_port, repo_root, wait_for_port};

/// How a test's `tutela-audit` authorizes its callers.
#[derive(Clone, Copy, Debug)]
pub enum AuditPolicy<'a> {
    /// The casbin `model.conf` and `policy.csv` in this directory, reloaded every second.
    Files(&'a Path),
    /// `insecure_no_policy = true`: any consortium certificate may append and read (for tests
    /// about what others record, not about the trail's authorization).
    Open,
}

pub struct Consortium {
    pub dir: PathBuf,
    pub ca: CaDir,
    pub port: u16,
    pub coordinator: Option<ChildGuard>,
    pub nodes: Vec<(String, ChildGuard)>,
    /// The coordinator's database URL; its SQLite default when `None`.
    pub database_url: Option<String>,
    /// Appended to coordinator.toml (e.g. a `[policy]` table). Without a `[policy]` table here,
    /// the coordinator is started with `insecure_no_policy = true` (jobs need no approval).
    pub coordinator_extra: String,
    /// Top-level keys put at the start of every node.toml started after it is set (e.g.
    /// `site_policy = "..."`), by site. A site without `site_policy` here is started with
    /// `insecure_no_approvals = true` (its node checks no approvals).
    pub node_top_level: std::collections::BTreeMap<String, String>,
    /// node.toml's `coordinator` value (TOML) for nodes started after it is set, e.g. a list of
    /// several coordinators' addresses; `"localhost:<port>"` when `None`.
    pub node_coordinators: Option<String>,
}

/// Whether the TOML text has the table `[name]`.
fn has_table(toml: &str, name: &str) -> bool {
    toml.lines().any(|l| l.trim() == format!("[{name}]"))
}

/// Whether the TOML text sets the top-level `key` (before its first table).
fn sets_top_level_key(toml: &str, key: &str) -> bool {
    toml.lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with('['))
        .any(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
}

/// A fresh, empty PostgreSQL database on the server of `TUTELA_TEST_POSTGRES_URL` (which the
/// README's test command sets), made with `psql`; `None` when the variable is unset.
pub fn fresh_postgres_database() -> Option<String> {
    let base = std::env::var("TUTELA_TEST_POSTGRES_URL").ok()?;
    let name = format!("e2e_{}_{}", std::process::id(), crate::free_port());
    crate::run_ok(Command::new("psql").arg(&base).args([
        "-q",
        "-c",
        &format!("CREATE DATABASE {name}"),
    ]));
    let (server, _) = base
        .rsplit_once('/')
        .expect("a database URL ends in /DBNAME");
    Some(format!("{server}/{name}"))
}

/// Splits the breast-cancer CSV into `n` shares (label-skewed, deterministic) plus a test share
/// of every fifth row. Returns (header, shares, test).
pub fn breast_cancer_shares(n: usize) -> (String, Vec<Vec<String>>, Vec<String>) {
    let text =
        std::fs::read_to_string(repo_root().join("data/breast_cancer_wisconsin.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    let label_col = header.split(',').position(|h| h == "diagnosis").unwrap();
    let mut shares = vec![Vec::new(); n];
    let mut test = Vec::new();
    let (mut k_m, mut k_b) = (0usize, 0usize);
    for (i, line) in lines.enumerate() {
        if i % 5 == 4 {
            test.push(line.to_string());
            continue;
        }
        // Malignant rows lean to the first site, benign to the last: non-IID shares.
        let malignant = line.split(',').nth(label_col) == Some("malignant");
        let site = if malignant {
            k_m += 1;
            if k_m % 2 == 0 { 0 } else { k_m % n }
        } else {
            k_b += 1;
            if k_b % 2 == 0 { n - 1 } else { k_b % n }
        };
        shares[site].push(line.to_string());
    }
    (header, shares, test)
}

/// `tutela-node evaluate` of the breast-cancer `model` (a safetensors file) built as `job_spec`
/// says, on `csv`: its JSON output (`accuracy`, `loss`, `n`).
pub fn evaluate_breast_cancer(model: &str, job_spec: &Path, csv: &Path) -> serde_json::Value {
    let out = crate::run_ok(
        Command::new(bin("tutela-node"))
            .args(["evaluate", "--model", model, "--job-spec"])
            .arg(job_spec)
            .arg("--csv")
            .arg(csv)
            .arg("--schema")
            .arg(repo_root().join("data/breast_cancer.schema.toml")),
    );
    serde_json::from_slice(&out.stdout).expect("evaluate prints JSON")
}

pub fn write_csv(path: &Path, header: &str, rows: &[String]) {
    let mut s = String::from(header);
    s.push('\n');
    for r in rows {
        s.push_str(r);
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

impl Consortium {
    pub fn new(dir: &Path) -> Self {
        let ca = CaDir::init(&dir.join("ca"), "e2e", KeyAlgorithm::EcdsaP256, 365, false).unwrap();
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca.crt"), ca.ca().cert_pem()).unwrap();
        let mut server = LeafOptions::new(Validity::days_from_now(30));
        server.dns_names = vec!["localhost".into()];
        let issued = ca.issue(&Principal::Coordinator, &server).unwrap();
        std::fs::write(certs.join("coordinator.crt"), &issued.cert_pem).unwrap();
        std::fs::write(certs.join("coordinator.key"), &issued.key_pem).unwrap();
        let op = ca
            .issue(
                &Principal::Operator { name: "op".into() },
                &LeafOptions::new(Validity::days_from_now(30)),
            )
            .unwrap();
        std::fs::write(certs.join("operator-op.crt"), &op.cert_pem).unwrap();
        std::fs::write(certs.join("operator-op.key"), &op.key_pem).unwrap();
        Consortium {
            dir: dir.to_path_buf(),
            ca,
            port: free_port(),
            coordinator: None,
            nodes: Vec::new(),
            database_url: None,
            coordinator_extra: String::new(),
            node_top_level: Default::default(),
            node_coordinators: None,
        }
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// Starts (or restarts) the coordinator on the consortium's port and data directory. Unless
    /// `coordinator_extra` configures a `[policy]`, it runs with `insecure_no_policy = true`, and
    /// unless it configures an `[audit]`, with `insecure_no_audit = true` (on loopback): a
    /// coordinator refuses to start with neither.
    pub fn start_coordinator(&mut self) {
        let toml = self.coordinator_toml(self.port, &self.dir.join("coordinator"), "");
        let path = self.dir.join("coordinator.toml");
        std::fs::write(&path, toml).unwrap();
        let child = self.spawn_coordinator(&path, &self.dir.join("coordinator.log"), self.port);
        self.coordinator = Some(child);
    }

    /// Starts one more coordinator, `name`, on `port` with its own data directory (DIR/`name`),
    /// config (DIR/`name`.toml) and log (DIR/`name`.log), on the consortium's database:
    /// `coordinator_extra` and then `extra` (e.g. its `[ha]` table) appended to its config.
    pub fn start_coordinator_instance(&self, name: &str, port: u16, extra: &str) -> ChildGuard {
        let toml = self.coordinator_toml(port, &self.dir.join(name), extra);
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        self.spawn_coordinator(&path, &self.dir.join(format!("{name}.log")), port)
    }

    fn spawn_coordinator(&self, config: &Path, log: &Path, port: u16) -> ChildGuard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = ChildGuard::spawn(
            Command::new(bin("tutela-coordinator"))
                .arg("--config")
                .arg(config)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log)),
        );
        wait_for_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(30),
        );
        child
    }

    /// A coordinator.toml on `port` and `data_dir` (see [`Self::start_coordinator`]).
    fn coordinator_toml(&self, port: u16, data_dir: &Path, extra: &str) -> String {
        let c = self.certs();
        let approvals = if has_table(&self.coordinator_extra, "policy") {
            ""
        } else {
            "insecure_no_policy = true\n"
        };
        // Nor without [audit]: a test that gives it none runs on loopback with the trail waived
        // by name.
        let approvals = if has_table(&self.coordinator_extra, "audit") {
            approvals.to_string()
        } else {
            format!("{approvals}insecure_no_audit = true\n")
        };
        let toml = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ntls_reload_secs = 3600\n{approvals}[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/coordinator.crt\"\nkey = \"{c}/coordinator.key\"\ncrl = \"{}\"\n",
            data_dir.display(),
            self.ca.crl_path().display(),
            c = c.display()
        );
        let toml = match &self.database_url {
            Some(url) => format!("database_url = \"{url}\"\n{toml}"),
            None => toml,
        };
        format!("{toml}{}{extra}", self.coordinator_extra)
    }

    /// Starts a node for `site` holding `rows`; `extra` is appended to its node.toml (e.g. a
    /// `[testing]` table).
    pub fn start_node(&mut self, site: &str, header: &str, rows: &[String], extra: &str) {
        let site_dir = self.dir.join("sites").join(site);
        std::fs::create_dir_all(&site_dir).unwrap();
        let csv = site_dir.join("data.csv");
        write_csv(&csv, header, rows);
        let dataset = format!(
            "[datasets.breast_cancer]\npath = \"{csv}\"\nschema = \"{schema}\"\n",
            csv = csv.display(),
            schema = repo_root().join("data/breast_cancer.schema.toml").display(),
        );
        self.spawn_node(site, &dataset, extra);
    }

    /// Like [`start_node`](Self::start_node), but the site's records also carry the demo's
    /// synthetic identities (names, national IDs, dates of birth, postcodes, notes), which the
    /// node anonymizes before training with the demo's pipeline and its own site secret. Returns
    /// the identities, for tests that look for them where they must not be.
    pub fn start_node_anonymized(
        &mut self,
        site: &str,
        header: &str,
        rows: &[String],
        extra: &str,
    ) -> Vec<tutela_privacy::anonymize::synthetic::SyntheticIdentity> {
        use tutela_privacy::anonymize::synthetic;
        let site_dir = self.dir.join("sites").join(site);
        std::fs::create_dir_all(&site_dir).unwrap();
        let people = synthetic::synthetic_identities(site.len() as u64 * 31, rows.len());
        let raw: Vec<String> = people
            .iter()
            .zip(rows)
            .map(|(p, r)| format!("{}{r}", p.csv_prefix()))
            .collect();
        let csv = site_dir.join("records.csv");
        write_csv(
            &csv,
            &format!("{}{header}", synthetic::identity_header_prefix()),
            &raw,
        );
        let features: Vec<&str> = header.split(',').filter(|c| *c != "diagnosis").collect();
        let columns = site_dir.join("records.columns.toml");
        std::fs::write(
            &columns,
            synthetic::declaration_toml(&features, "diagnosis"),
        )
        .unwrap();
        let anonymize = site_dir.join("records.anonymize.toml");
        std::fs::write(&anonymize, synthetic::DEMO_ANONYMIZE_TOML).unwrap();
        let secret = site_dir.join("site-secret");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&secret).unwrap();
        let dataset = format!(
            "site_secret_file = \"{secret}\"\n[datasets.breast_cancer]\npath = \"{csv}\"\nschema = \"{schema}\"\ncolumns = \"{columns}\"\nanonymize = \"{anonymize}\"\n",
            secret = secret.display(),
            csv = csv.display(),
            columns = columns.display(),
            anonymize = anonymize.display(),
            schema = repo_root().join("data/breast_cancer.schema.toml").display(),
        );
        self.spawn_node(site, &dataset, extra);
        people
    }

    /// Starts a node for `site` with `dataset` as it is (top-level keys first, then its
    /// `[datasets.*]` or `[text_datasets.*]` tables) and `extra` appended to its node.toml; the
    /// files it names are the caller's (a language model's text, tokenizer and base checkpoint).
    pub fn start_node_with(&mut self, site: &str, dataset: &str, extra: &str) {
        std::fs::create_dir_all(self.dir.join("sites").join(site)).unwrap();
        self.spawn_node(site, dataset, extra);
    }

    /// Certifies a node for `site` and starts it with `dataset` (top-level keys first, then its
    /// `[datasets.*]` table) and `extra` appended to its node.toml. Unless `node_top_level` gives
    /// the site a `site_policy`, the node runs with `insecure_no_approvals = true`; unless
    /// `extra` has an `[audit]` table, with `insecure_no_audit = true`.
    fn spawn_node(&mut self, site: &str, dataset: &str, extra: &str) {
        let site_dir = self.dir.join("sites").join(site);
        let issued = self
            .ca
            .issue(
                &Principal::Node { site: site.into() },
                &LeafOptions::new(Validity::days_from_now(30)),
            )
            .unwrap();
        std::fs::write(site_dir.join("node.crt"), &issued.cert_pem).unwrap();
        std::fs::write(site_dir.join("node.key"), &issued.key_pem).unwrap();
        let kek = site_dir.join("kek");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&kek).unwrap();
        // `dataset` may start with top-level keys, so it comes before every table.
        let toml = format!(
            "site = \"{site}\"\ncoordinator = {coordinator}\ntorch_threads = 1\nwork_dir = \"{w}\"\n{dataset}[tls]\nca = \"{c}/ca.crt\"\ncert = \"{s}/node.crt\"\nkey = \"{s}/node.key\"\ncrl = \"{crl}\"\n[reconnect]\ninitial_backoff_secs = 0.2\nmax_backoff_secs = 1.0\n[at_rest]\nkek_file = \"{kek}\"\n{extra}\n",
            coordinator = self
                .node_coordinators
                .clone()
                .unwrap_or_else(|| format!("\"localhost:{}\"", self.port)),
            w = site_dir.join("work").display(),
            c = self.certs().display(),
            s = site_dir.display(),
            crl = self.ca.crl_path().display(),
            kek = kek.display(),
        );
        // A node refuses to start without `site_policy` unless approvals are waived by name.
        let top = match self.node_top_level.get(site) {
            Some(top) if sets_top_level_key(top, "site_policy") => top.clone(),
            Some(top) => format!("insecure_no_approvals = true\n{top}"),
            None => "insecure_no_approvals = true".to_string(),
        };
        // Nor without [audit]: a test that gives the node none runs it (with its coordinator on
        // localhost) with the trail waived by name.
        let top = if has_table(extra, "audit") {
            top
        } else {
            format!("insecure_no_audit = true\n{top}")
        };
        let toml = format!("{top}\n{toml}");
        let path = site_dir.join("node.toml");
        std::fs::write(&path, toml).unwrap();
        let log = std::fs::File::create(site_dir.join("node.log")).unwrap();
        let child = ChildGuard::spawn(
            Command::new(bin("tutela-node"))
                .arg("run")
                .arg("--config")
                .arg(&path)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log)),
        );
        self.nodes.push((site.to_string(), child));
    }

    /// Certifies the audit service (`spiffe://<consortium>/audit`, name `localhost`) and starts
    /// `tutela-audit` on `port`: SQLite under DIR/audit (kept across restarts), a checkpoint
    /// signed every second there are unsigned events, its output appended to DIR/audit.log.
    /// Its checkpoint key is made at first start, with the public half in
    /// DIR/audit/checkpoint.key.pub.
    pub fn start_audit(&self, port: u16, policy: AuditPolicy) -> ChildGuard {
        self.start_audit_with(port, policy, "")
    }

    /// [`start_audit`](Self::start_audit) with `extra` appended to audit.toml (e.g. a
    /// `[metrics]` table).
    pub fn start_audit_with(&self, port: u16, policy: AuditPolicy, extra: &str) -> ChildGuard {
        let certs = self.certs();
        let mut opts = LeafOptions::new(Validity::days_from_now(30));
        opts.dns_names = vec!["localhost".into()];
        let issued = self.ca.issue(&Principal::Audit, &opts).unwrap();
        std::fs::write(certs.join("audit.crt"), &issued.cert_pem).unwrap();
        std::fs::write(certs.join("audit.key"), &issued.key_pem).unwrap();
        let audit_dir = self.dir.join("audit");
        std::fs::create_dir_all(&audit_dir).unwrap();
        let authorization = match policy {
            AuditPolicy::Files(dir) => format!(
                "[policy]\nmodel = \"{p}/model.conf\"\npolicy = \"{p}/policy.csv\"\nreload_secs = 1\n",
                p = dir.display()
            ),
            AuditPolicy::Open => String::new(),
        };
        let top = match policy {
            AuditPolicy::Open => "insecure_no_policy = true\n",
            AuditPolicy::Files(_) => "",
        };
        let config = audit_dir.join("audit.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ncheckpoint_interval_secs = 1\n{top}[tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/audit.crt\"\nkey = \"{c}/audit.key\"\ncrl = \"{crl}\"\n{authorization}{extra}",
                audit_dir.display(),
                c = certs.display(),
                crl = self.ca.crl_path().display(),
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("audit.log"))
            .unwrap();
        let child = ChildGuard::spawn(
            Command::new(bin("tutela-audit"))
                .arg("--config")
                .arg(&config)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log)),
        );
        wait_for_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(30),
        );
        child
    }

    /// Starts `site`'s node again with the node.toml, certificate, key-encryption key and work
    /// directory of its first start (after [`kill_node`](Self::kill_node)); its log is appended.
    pub fn restart_node(&mut self, site: &str) {
        let site_dir = self.dir.join("sites").join(site);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(site_dir.join("node.log"))
            .unwrap();
        let child = ChildGuard::spawn(
            Command::new(bin("tutela-node"))
                .arg("run")
                .arg("--config")
                .arg(site_dir.join("node.toml"))
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log)),
        );
        self.nodes.push((site.to_string(), child));
    }

    pub fn kill_node(&mut self, site: &str) {
        if let Some(pos) = self.nodes.iter().position(|(s, _)| s == site) {
            let (_, child) = self.nodes.remove(pos);
            child.signal("KILL");
            drop(child);
        }
    }

    pub async fn operator(&self) -> JobsClient<tonic::transport::Channel> {
        JobsClient::new(self.operator_channel().await)
    }

    /// A channel to the coordinator as the operator `op`, for any of its services.
    pub async fn operator_channel(&self) -> tonic::transport::Channel {
        let files = TlsFiles::in_dir(&self.certs(), "operator-op");
        let tls = ClientTls::load(
            &files,
            Some(Identity::new("e2e", Principal::Coordinator).unwrap()),
        )
        .unwrap();
        client::connect(&format!("localhost:{}", self.port), tls)
            .await
            .unwrap()
    }

    /// Polls the job until `until` holds, it is in a final state, or `timeout` passes; returns
    /// the last status. Reconnects if the coordinator goes away (a restart under test).
    pub async fn wait_for_job(
        &self,
        job: &str,
        timeout: Duration,
        until: impl Fn(&pb::JobStatus) -> bool,
    ) -> pb::JobStatus {
        let start = Instant::now();
        let mut client = None;
        let mut last = None;
        loop {
            if client.is_none() {
                client = Some(self.operator().await);
            }
            if let Some(c) = client.as_mut() {
                match c.get_job(pb::GetJobRequest { job_id: job.into() }).await {
                    Ok(s) => {
                        let s = s.into_inner();
                        if until(&s)
                            || ["completed", "failed", "cancelled"].contains(&s.state.as_str())
                        {
                            return s;
                        }
                        last = Some(s);
                    }
                    Err(_) => client = None,
                }
            }
            assert!(
                start.elapsed() < timeout,
                "job {job} did not get there within {timeout:?}; last status {last:?}; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `tutela job check`'s RPC for `spec`, asked again until `answered` sites have answered
    /// (nodes announce their data a moment after they start), or the test fails after 90 s.
    pub async fn check_until_answered(
        &self,
        op: &mut JobsClient<tonic::transport::Channel>,
        spec: &str,
        answered: usize,
    ) -> Vec<pb::SiteCheck> {
        let start = Instant::now();
        loop {
            let sites = op
                .check_job(pb::CheckJobRequest {
                    spec_toml: spec.to_string(),
                })
                .await
                .unwrap()
                .into_inner()
                .sites;
            if sites.iter().filter(|s| s.answered).count() == answered {
                return sites;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "not {answered} nodes answered: {sites:#?}; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

/// A breast-cancer job spec for the tests.
pub fn job_spec(rounds: u32, min_sites: u32, deadline_secs: u64, sites: &[&str]) -> String {
    format!(
        r#"name = "e2e-breast-cancer"
rounds = {rounds}
min_sites = {min_sites}
round_deadline_secs = {deadline_secs}
max_round_retries = 2
update_norm_bound = 50.0
sites = [{sites}]
seed = 3

[model]
name = "mlp"
hidden = [32, 16]

[data]
schema = "breast_cancer"

[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 3
batch_size = 32
"#,
        sites = sites
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
