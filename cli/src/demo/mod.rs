//! `tutela demo`: a whole consortium on this machine. It makes a throwaway CA and certificates,
//! gives each hospital a non-IID share of a public dataset (and keeps a held-out test split that no
//! site sees), starts a coordinator and one site node per hospital as separate processes talking
//! mutual TLS over loopback, runs a federated job round by round, and scores the final model on
//! the test split. With `--dataset notes` ([`notes`]), the hospitals fine-tune a small language
//! model on clinical notes instead.

mod consortium;
mod notes;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tutela_privacy::anonymize::synthetic;
use tutela_protocol::pb;

use self::consortium::{Consortium, sibling, spawn_logged, toml_path};
use crate::job_cmd;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Dataset {
    /// Breast Cancer Wisconsin (569 rows, 30 features), an MLP, three hospitals.
    BreastCancer,
    /// 5,000 MNIST digits, a small CNN, five hospitals.
    Mnist,
    /// Synthea clinical notes split by patient across three hospitals, which fine-tune LoRA
    /// adapters under DP (ε = 8 per site, the patient as privacy unit) on a small Llama-style
    /// base pretrained on tinyshakespeare (built once, then cached: see --cache-dir); prints
    /// held-out perplexity per round, against the base and a central fine-tune, and a greedy
    /// sample before and after.
    Notes,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Which public dataset and model to use.
    #[arg(long, value_enum, default_value_t = Dataset::BreastCancer)]
    dataset: Dataset,
    /// Working directory; replaced on every run.
    #[arg(long, default_value = ".tutela/demo")]
    dir: PathBuf,
    /// Directory of the bundled datasets and schemas.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Number of rounds (default: the job spec's).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seed of the data split.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// DP-SGD's target ε per site dataset (δ = 1e-5), or `inf` to train without DP. Default: the
    /// job spec's `privacy.target_epsilon` (DP is on in the demo).
    #[arg(long, value_parser = parse_epsilon)]
    epsilon: Option<f64>,
    /// `--dataset notes` only: where the pretrained base model and its tokenizer are cached,
    /// one subdirectory per digest of their configuration, corpus and steps. Default:
    /// `demo-cache/` in the target directory `tutela` was built in (`target/demo-cache/`).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// `--dataset notes` only: the privacy unit of each site's ε, `document` (each note is one
    /// example of the guarantee) or `patient` (all of a patient's notes are one: the stronger
    /// guarantee). Train, validation and held-out notes are split by patient either way. With 13
    /// patients, a site trains on two or three of them: by patient, DP noise swamps what so few
    /// units can teach, and the model barely moves from the base.
    #[arg(long, default_value = "document", value_parser = ["patient", "document"])]
    privacy_unit: String,
    /// `--dataset notes` only: skip the central baseline (a fine-tune on the pooled notes that
    /// takes longer than the federated rounds on 2 CPU cores); the base and the federated model
    /// are still scored. For sweeps (bench/lm_notes_federated_epsilon.sh).
    #[arg(long)]
    skip_central: bool,
    /// Tabular demos only: `local` trains with DP-SGD at every site; `distributed` runs that job
    /// and then record-level distributed DP over secure aggregation at the same ε per site and
    /// the same unit (a row): each round one DP-SGD step whose clipped per-row sums the sites
    /// mask with their shares of the noise, so the coordinator sees only the sum, one central
    /// step over every site's rows; both test accuracies are printed side by side.
    #[arg(long, value_enum, default_value_t = PrivacyDemo::Local)]
    privacy: PrivacyDemo,
    /// Tabular demos only: keep at most this many of each site's training rows (the rest of its
    /// share is dropped; the held-out test split is unchanged), to see what small sites get under
    /// DP (`docs/small-sites.md`). Default: every site keeps its whole share.
    #[arg(long)]
    site_rows: Option<usize>,
    /// Tabular demos only: the job's `training.batch_size` (default: the job spec's), e.g. the
    /// one `tutela privacy plan` suggests for the smallest site.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Tabular demos only: the job's `training.local_epochs` (default: the job spec's).
    #[arg(long)]
    local_epochs: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrivacyDemo {
    Local,
    Distributed,
}

/// The demo job's spec under record-level distributed DP at the local job's ε and clip:
/// `[privacy] mode = "distributed"` over `[secure_aggregation]`, every site a survivor of every
/// round (`min_sites` = the sites), 20 rounds of one plain SGD step (learning rate 2) on a
/// Poisson sample of q = 0.5 of each site's rows, normalised by the expected batch across all
/// sites (B ≈ q × the training rows, 80 % of `train_rows` after the sites' validation split;
/// a B off by some rows only rescales the learning rate).
fn distributed_spec(local: &toml::Table, sites: usize, train_rows: usize) -> Result<toml::Table> {
    const SAMPLE_RATE: f64 = 0.5;
    let mut spec = local.clone();
    let Some(toml::Value::Table(local_privacy)) = local.get("privacy") else {
        bail!("--privacy distributed needs DP (not --epsilon inf)");
    };
    let mut privacy = toml::Table::new();
    privacy.insert("mode".into(), "distributed".into());
    for key in ["target_epsilon", "delta", "max_grad_norm", "accountant"] {
        if let Some(v) = local_privacy.get(key) {
            privacy.insert(key.into(), v.clone());
        }
    }
    privacy.insert("sample_rate".into(), toml::Value::Float(SAMPLE_RATE));
    spec.insert("privacy".into(), toml::Value::Table(privacy));
    let expected_batch = ((train_rows as f64 * 0.8 * SAMPLE_RATE).round() as i64).max(1);
    let mut training = toml::Table::new();
    training.insert("optimizer".into(), "sgd".into());
    training.insert("learning_rate".into(), toml::Value::Float(2.0));
    training.insert("local_epochs".into(), toml::Value::Integer(1));
    training.insert("batch_size".into(), toml::Value::Integer(expected_batch));
    spec.insert("training".into(), toml::Value::Table(training));
    spec.insert("rounds".into(), toml::Value::Integer(20));
    // Each secure phase waits up to a quarter of the window for the slowest node: a short
    // window keeps 20 rounds to minutes on a laptop.
    spec.insert("round_deadline_secs".into(), toml::Value::Integer(40));
    spec.insert("min_sites".into(), toml::Value::Integer(sites as i64));
    spec.insert("update_norm_bound".into(), toml::Value::Float(2.0));
    let mut secure = toml::Table::new();
    secure.insert("scale_bits".into(), toml::Value::Integer(16));
    spec.insert("secure_aggregation".into(), toml::Value::Table(secure));
    if let Some(toml::Value::String(name)) = local.get("name") {
        spec.insert("name".into(), format!("{name}-distributed").into());
    }
    Ok(spec)
}

/// A positive ε, or `inf` (no DP).
fn parse_epsilon(text: &str) -> Result<f64, String> {
    match text {
        "inf" | "infinity" | "none" => Ok(f64::INFINITY),
        _ => match text.parse::<f64>() {
            Ok(e) if e > 0.0 => Ok(e),
            _ => Err(format!("{text:?} is not a positive ε or `inf`")),
        },
    }
}

struct Plan {
    csv: &'static str,
    schema: &'static str,
    schema_name: &'static str,
    label: &'static str,
    /// The job spec (the documented example of deploy/jobs/, compiled in so the demo runs from
    /// any directory).
    job: &'static str,
    sites: &'static [&'static str],
}

/// The tabular demos' data and job; `None` for the notes demo.
fn plan(d: Dataset) -> Option<Plan> {
    Some(match d {
        Dataset::Notes => return None,
        Dataset::BreastCancer => Plan {
            csv: "breast_cancer_wisconsin.csv",
            schema: "breast_cancer.schema.toml",
            schema_name: "breast_cancer",
            label: "diagnosis",
            job: include_str!("../../../deploy/jobs/breast_cancer_fedavg.toml"),
            sites: &["st-mary", "general", "riverside"],
        },
        Dataset::Mnist => Plan {
            csv: "mnist_5k.csv.gz",
            schema: "mnist.schema.toml",
            schema_name: "mnist",
            label: "label",
            job: include_str!("../../../deploy/jobs/mnist_cnn_fedavg.toml"),
            sites: &["st-mary", "general", "riverside", "northgate", "lakeside"],
        },
    })
}

/// Reads a CSV (plain or gzip) as header + rows of raw text, so the split is byte-faithful.
fn read_rows(path: &Path) -> Result<(String, Vec<String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .with_context(|| format!("{} is not valid gzip text", path.display()))?;
        s
    } else {
        String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?
    };
    let mut lines = text.lines();
    let header = lines.next().context("empty dataset")?.to_string();
    Ok((
        header,
        lines
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// Splits rows into a stratified held-out test set (20 %) and label-skewed site shares: each site
/// gets most of its rows from "its" classes, as hospitals with different patient mixes would.
fn split(
    header: &str,
    rows: Vec<String>,
    label: &str,
    sites: usize,
    seed: u64,
) -> Result<(Vec<Vec<String>>, Vec<String>)> {
    let col = header
        .split(',')
        .position(|h| h.trim() == label)
        .with_context(|| format!("no column {label:?} in the header"))?;
    let mut by_class: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in rows {
        let l = r
            .split(',')
            .nth(col)
            .context("short row")?
            .trim()
            .to_string();
        by_class.entry(l).or_default().push(r);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut shards = vec![Vec::new(); sites];
    let mut test = Vec::new();
    for (ci, (_, mut rs)) in by_class.into_iter().enumerate() {
        rs.shuffle(&mut rng);
        let n_test = rs.len() / 5;
        test.extend(rs.drain(..n_test));
        // Skew: the class's "home" site gets 60 %, the others share the rest evenly.
        let home = ci % sites;
        let n = rs.len();
        let home_n = n * 3 / 5;
        let mut it = rs.into_iter();
        shards[home].extend(it.by_ref().take(home_n));
        for (k, r) in it.enumerate() {
            let others: Vec<usize> = (0..sites).filter(|&s| s != home).collect();
            shards[others[k % others.len()]].push(r);
        }
    }
    for s in &mut shards {
        s.shuffle(&mut rng);
    }
    Ok((shards, test))
}

fn write_csv(path: &Path, header: &str, rows: &[String]) -> Result<()> {
    let mut text = String::with_capacity(rows.len() * 64);
    text.push_str(header);
    text.push('\n');
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Prints a few of a site's records before and after the anonymization its node will run, with
/// the same pipeline and secret, so the demo shows what leaves the raw file for training. Only
/// the identity columns and the label are shown (the features go through unchanged).
fn show_anonymization(
    site: &str,
    csv: &Path,
    columns: &Path,
    anonymize: &Path,
    secret: &Path,
    label: &str,
) -> Result<()> {
    use tutela_privacy::anonymize::{Pipeline, SiteSecret, Value, reader};
    let pipeline = Pipeline::from_toml(
        &std::fs::read_to_string(columns)?,
        &std::fs::read_to_string(anonymize)?,
    )?;
    let raw = reader::read_file(csv, None, pipeline.schema())?;
    let key = tutela_privacy::at_rest::read_secret_file(secret)?;
    let secret = SiteSecret::new(&key[..])?;
    let (out, report) = pipeline.run(&raw, &secret)?;
    let shown = |table: &tutela_privacy::anonymize::Table, row: &[Value]| -> String {
        table
            .schema
            .columns
            .iter()
            .zip(row)
            .filter(|(c, _)| {
                c.name == label
                    || synthetic::IDENTITY_COLUMNS
                        .iter()
                        .any(|(n, _, _)| *n == c.name)
            })
            .map(|(_, v)| v.canonical())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let rn = out.schema.index_of("record_number")?;
    println!(
        "site {site}: its records carry names, national IDs, dates of birth, postcodes and notes; \
         the node anonymizes them before training ({} of {} rows kept, k = {}):",
        report.rows_out,
        report.rows_in,
        report.k_anonymity.as_ref().map_or(0, |k| k.k_achieved)
    );
    for row in out.rows.iter().take(3) {
        let pseudonym = row[rn].canonical();
        let Some(original) = raw
            .rows
            .iter()
            .find(|r| secret.pseudonym(&r[0].canonical(), pseudonym.len()) == pseudonym)
        else {
            continue;
        };
        println!("  before: {}", shown(&raw, original));
        println!("  after:  {}", shown(&out, row));
    }
    Ok(())
}

pub async fn run(args: DemoArgs) -> Result<()> {
    match plan(args.dataset) {
        Some(p) => run_tabular(args, p).await,
        None => notes::run(args).await,
    }
}

async fn run_tabular(args: DemoArgs, p: Plan) -> Result<()> {
    let started = Instant::now();
    let dir = std::path::absolute(&args.dir)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let data_dir = std::path::absolute(&args.data_dir)?;

    // 1. A throwaway consortium: CA, coordinator, one node per hospital, an operator.
    let mut consortium = Consortium::certify(&dir, p.sites)?;

    // 2. Each hospital's own data, and a test split nobody trains on.
    let (header, rows) = read_rows(&data_dir.join(p.csv))?;
    let total = rows.len();
    let (mut shards, test) = split(&header, rows, p.label, p.sites.len(), args.seed)?;
    if let Some(cap) = args.site_rows {
        // The split shuffled each share, so its first rows are a random subset of it.
        for shard in &mut shards {
            shard.truncate(cap);
        }
    }
    let test_csv = dir.join("test.csv");
    write_csv(&test_csv, &header, &test)?;
    let union: Vec<String> = shards.iter().flatten().cloned().collect();
    let union_csv = dir.join("train-union.csv");
    write_csv(&union_csv, &header, &union)?;
    println!(
        "{} rows of {}: {} held out for the final test",
        total,
        p.csv,
        test.len()
    );

    // 3. The audit service and the coordinator.
    consortium.start()?;

    // 4. One node per hospital, each with only its own share.
    let node_bin = sibling("tutela-node")?;
    let features: Vec<&str> = header
        .split(',')
        .map(str::trim)
        .filter(|c| *c != p.label)
        .collect();
    let declaration = synthetic::declaration_toml(&features, p.label);
    for (i, (site, rows)) in p.sites.iter().zip(&shards).enumerate() {
        let site_dir = dir.join("sites").join(site);
        std::fs::create_dir_all(&site_dir)?;
        // The hospital's records as its systems hold them: the public data's rows, each with a
        // synthetic patient's identity (record number, name, national ID, date of birth,
        // postcode, a clinician's note full of PII). The node anonymizes them before training.
        let people = synthetic::synthetic_identities(args.seed.wrapping_add(i as u64), rows.len());
        let raw_rows: Vec<String> = people
            .iter()
            .zip(rows)
            .map(|(person, row)| format!("{}{row}", person.csv_prefix()))
            .collect();
        let raw_header = format!("{}{header}", synthetic::identity_header_prefix());
        let csv = site_dir.join(format!("{}.csv", p.schema_name));
        write_csv(&csv, &raw_header, &raw_rows)?;
        let columns = site_dir.join(format!("{}.columns.toml", p.schema_name));
        std::fs::write(&columns, &declaration)?;
        let anonymize = site_dir.join(format!("{}.anonymize.toml", p.schema_name));
        std::fs::write(&anonymize, synthetic::DEMO_ANONYMIZE_TOML)?;
        // The site's key-encryption key and site secret, outside the node's work directory.
        let kek = site_dir.join("kek");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&kek)
            .with_context(|| format!("cannot make {}", kek.display()))?;
        let secret = site_dir.join("site-secret");
        tutela_privacy::at_rest::LocalKek::generate_key_file(&secret)
            .with_context(|| format!("cannot make {}", secret.display()))?;
        if i == 0 {
            show_anonymization(site, &csv, &columns, &anonymize, &secret, p.label)?;
        }
        let toml = site_dir.join("node.toml");
        std::fs::write(
            &toml,
            format!(
                "{}[datasets.{name}]\npath = \"{csv}\"\nschema = \"{schema}\"\ncolumns = \"{columns}\"\nanonymize = \"{anonymize}\"\n",
                consortium.node_toml_head(site, &site_dir, &kek, &secret),
                name = p.schema_name,
                csv = toml_path(&csv),
                schema = toml_path(&data_dir.join(p.schema)),
                columns = toml_path(&columns),
                anonymize = toml_path(&anonymize),
            ),
        )?;
        let log = site_dir.join("node.log");
        let child = spawn_logged(
            Command::new(&node_bin)
                .arg("run")
                .arg("--config")
                .arg(&toml),
            &log,
        )?;
        consortium.procs.0.push((site.to_string(), child));
        let counts = class_counts(&header, rows, p.label)?;
        println!("site node {site:<10} {} rows  classes {counts}", rows.len());
    }

    // 5. The job, submitted by the operator.
    let mut spec: toml::Table =
        toml::from_str(p.job).context("the built-in demo job spec is not valid TOML")?;
    if let Some(r) = args.rounds {
        spec.insert("rounds".into(), toml::Value::Integer(r.into()));
    }
    for (key, value) in [
        ("batch_size", args.batch_size),
        ("local_epochs", args.local_epochs),
    ] {
        if let (Some(v), Some(toml::Value::Table(training))) = (value, spec.get_mut("training")) {
            training.insert(key.into(), toml::Value::Integer(v.into()));
        }
    }
    match args.epsilon {
        Some(e) if e.is_infinite() => {
            spec.remove("privacy");
        }
        Some(e) => {
            if let Some(toml::Value::Table(privacy)) = spec.get_mut("privacy") {
                privacy.insert("target_epsilon".into(), toml::Value::Float(e));
            }
        }
        None => {}
    }
    spec.insert(
        "sites".into(),
        toml::Value::Array(
            p.sites
                .iter()
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
    );
    let (last, accuracy, n) = train_and_evaluate(
        &consortium,
        &spec,
        &dir.join("job.toml"),
        &node_bin,
        &p,
        &data_dir,
        (&test_csv, &union_csv),
    )
    .await?;
    println!("final model: test accuracy {accuracy:.4} on {n} held-out rows");
    if args.privacy == PrivacyDemo::Distributed {
        let distributed = distributed_spec(&spec, p.sites.len(), union.len())?;
        println!(
            "the same data under record-level distributed DP at the same ε per row: each round \
             every site sums its sampled rows' clipped gradients, adds its share of the noise and \
             masks it; the coordinator sees only the sum, one central DP-SGD step"
        );
        let (_, dist_accuracy, _) = train_and_evaluate(
            &consortium,
            &distributed,
            &dir.join("job-distributed.toml"),
            &node_bin,
            &p,
            &data_dir,
            (&test_csv, &union_csv),
        )
        .await?;
        let epsilon = spec
            .get("privacy")
            .and_then(|p| p.get("target_epsilon"))
            .and_then(toml::Value::as_float)
            .unwrap_or(f64::NAN);
        println!(
            "test accuracy at ε = {epsilon} per site, each row protected: local DP-SGD \
             {accuracy:.4}, record-level distributed DP {dist_accuracy:.4} (the sites' noise \
             shares add up to one step's noise instead of each site paying it in full)"
        );
    }
    println!("model (safetensors): {}", last.model_path);
    print_throughput(&last);
    // 7. The audit trail, checked as a regulator would (`tutela audit verify`).
    let source = consortium.verify_trail().await?;
    let reports = crate::audit_cmd::events_of(&source, tutela_audit::Action::DatasetDeidentified)
        .await
        .context("reading the de-identification reports from the audit trail")?;
    for e in &reports {
        let r = &e.payload["report"];
        println!(
            "  seq {:>3}  {}: de-identification report by {} ({} rows in, {} cells changed, k = {})",
            e.seq,
            e.subject,
            e.actor,
            r["rows_in"],
            r["cells_changed"],
            r["k_anonymity"]["k_achieved"]
        );
    }
    println!(
        "demo finished in {:.1}s; logs and configs in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// Submits `spec`, prints each round as it completes, and scores the final model on the test
/// split: the job's last status, its test accuracy and the number of test rows.
async fn train_and_evaluate(
    consortium: &Consortium,
    spec: &toml::Table,
    spec_path: &Path,
    node_bin: &Path,
    p: &Plan,
    data_dir: &Path,
    (test_csv, union_csv): (&Path, &Path),
) -> Result<(pb::JobStatus, f64, serde_json::Value)> {
    let spec_text = toml::to_string(spec)?;
    let (mut jobs, status) = consortium.submit_and_approve(spec_text).await?;

    println!(
        "each round: the accuracy of the round's global model on every site's validation split, before local training"
    );
    let bar = consortium::rounds_bar(status.rounds_total, "waiting for the initial model");
    let mut printed = 0;
    let last = job_cmd::watch_job(&mut jobs, &status.job_id, |s| {
        let since = printed;
        for r in s.rounds.iter().filter(|r| r.round > since) {
            let per_site: Vec<String> = r
                .metrics
                .iter()
                .map(|m| format!("{} {:.3}", m.site, m.eval_accuracy))
                .collect();
            // The largest ε any site has spent on this job so far (DP-SGD at the sites).
            let epsilon = r
                .metrics
                .iter()
                .map(|m| m.dp_job_epsilon)
                .fold(0.0, f64::max);
            let line = format!(
                "round {:>2}  accuracy {:.4}  ({})  {:.2}s{}{}",
                r.round,
                r.eval_accuracy,
                per_site.join(", "),
                r.seconds,
                if epsilon > 0.0 {
                    format!("  ε {epsilon:.2}")
                } else {
                    String::new()
                },
                if r.refused.is_empty() {
                    String::new()
                } else {
                    format!(
                        "  refused: {}",
                        r.refused
                            .iter()
                            .map(|x| format!("{}: {}", x.site, x.reason))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                }
            );
            // Without a terminal the bar is hidden and would swallow its println.
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
            printed = r.round;
        }
        bar.set_position(u64::from(s.rounds_completed));
        bar.set_message(format!(
            "{} | sites connected: {}",
            s.state,
            s.connected_sites.len()
        ));
    })
    .await?;
    bar.finish_and_clear();
    if last.state != "completed" {
        bail!("the job ended {}: {}", last.state, last.reason);
    }

    // 6. The final model on data no site has seen.
    let job_spec = spec_path;
    std::fs::write(job_spec, toml::to_string(spec)?)?;
    let out = Command::new(node_bin)
        .args(["evaluate", "--model"])
        .arg(&last.model_path)
        .arg("--job-spec")
        .arg(job_spec)
        .arg("--csv")
        .arg(test_csv)
        .arg("--schema")
        .arg(data_dir.join(p.schema))
        .arg("--standardize-from")
        .arg(union_csv)
        .output()?;
    if !out.status.success() {
        bail!(
            "evaluating the final model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let eval: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("tutela-node evaluate printed no JSON")?;
    let accuracy = eval["accuracy"].as_f64().unwrap_or(f64::NAN);
    // Accuracy alone flatters a model that predicts the majority class for every row: show the
    // figures that would reveal it (docs/small-sites.md).
    println!(
        "final model: AUC {}  F1 {}  confusion (rows: true class, columns: predicted) {}",
        eval["auc"], eval["f1"], eval["confusion"]
    );
    Ok((last, accuracy, eval["n"].clone()))
}

fn class_counts(header: &str, rows: &[String], label: &str) -> Result<String> {
    let col = header
        .split(',')
        .position(|h| h.trim() == label)
        .context("no label column")?;
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in rows {
        *counts
            .entry(r.split(',').nth(col).unwrap_or("").trim())
            .or_default() += 1;
    }
    Ok(counts
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Rounds per minute, and each site's local training speed over the whole job.
fn print_throughput(s: &pb::JobStatus) {
    let seconds: f64 = s.rounds.iter().map(|r| r.seconds).sum();
    if seconds > 0.0 {
        println!(
            "{} rounds in {:.1}s of rounds: {:.1} rounds per minute",
            s.rounds.len(),
            seconds,
            s.rounds.len() as f64 * 60.0 / seconds
        );
    }
    let mut per_site: std::collections::BTreeMap<&str, (u64, f64)> = Default::default();
    for m in s.rounds.iter().flat_map(|r| &r.metrics) {
        let e = per_site.entry(m.site.as_str()).or_default();
        e.0 += m.train_samples;
        e.1 += m.train_seconds;
    }
    let rates: Vec<String> = per_site
        .iter()
        .filter(|(_, (_, t))| *t > 0.0)
        .map(|(site, (n, t))| format!("{site} {:.0}", *n as f64 / t))
        .collect();
    println!("local training, samples per second: {}", rates.join(", "));
}
