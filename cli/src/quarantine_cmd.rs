//! `tutela audit quarantine ...`: moving forged rows out of the audit log into its quarantine
//! table under a signed order (the procedure: `docs/runbooks/audit-forged-row.md`; the logic:
//! `tutela_audit::quarantine`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tutela_audit::authority::OfficerTrust;
use tutela_audit::payload::{AuditQuarantined, QuarantineSignature};
use tutela_audit::quarantine::{self, apply as ops};
use tutela_audit::store::AuditStore;
use tutela_policy::Authorizer;
use tutela_protocol::identity::Principal;

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Draw up an order quarantining the log's unanchored tail (every row no signed checkpoint
    /// covers, or from --from-seq on), to be signed by an operator and the officers.
    Plan {
        /// The audit database (sqlite://PATH or postgres://USER@HOST/DB).
        #[arg(long, env = "TUTELA_AUDIT_DATABASE_URL")]
        database_url: String,
        /// The first seq to quarantine (default: the first unanchored one; never a signed one).
        #[arg(long)]
        from_seq: Option<u64>,
        /// Why (what the checks showed: see the runbook).
        #[arg(long)]
        reason: String,
        /// A site whose officers' quorum (the policy's p2 rules) must countersign. Repeatable.
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
        /// The log's id, when no checkpoint names it yet.
        #[arg(long)]
        log_id: Option<String>,
        /// Where to write the order (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an order with your certificate's key: an operator's signature orders it, a site
    /// user's countersigns it.
    Sign {
        #[arg(long)]
        order: PathBuf,
        /// Your certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Your private key (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
    },
    /// Apply a signed order, as the audit tables' owner, with the audit service stopped: the
    /// rows move to audit_quarantine; the service records `audit.quarantined` when it starts.
    Apply {
        #[arg(long, env = "TUTELA_AUDIT_DATABASE_URL")]
        database_url: String,
        #[arg(long)]
        order: PathBuf,
        /// The consortium CA certificate (PEM) every signer's certificate must chain to.
        #[arg(long)]
        ca: PathBuf,
        /// The consortium's casbin model and policy (who may order, which quorum).
        #[arg(long)]
        policy_model: PathBuf,
        #[arg(long)]
        policy: PathBuf,
        /// The audit service's audit.toml: its `checkpoint_every` must be 1 (a log that signs
        /// every commit is the one whose unanchored rows are known to be forged).
        #[arg(long)]
        audit_config: PathBuf,
    },
    /// Show the quarantined rows as they were stored (for forensics), with their orders.
    Show {
        #[arg(long, env = "TUTELA_AUDIT_DATABASE_URL")]
        database_url: String,
    },
}

/// `checkpoint_every` of the audit service's audit.toml (its default, 1, when it is absent).
fn checkpoint_every_of(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?;
    match table.get("checkpoint_every") {
        None => Ok(1),
        Some(toml::Value::Integer(n)) if *n >= 1 => Ok(*n as u64),
        Some(other) => bail!(
            "{}: checkpoint_every = {other} is not a positive integer",
            path.display()
        ),
    }
}

fn read_order(path: &Path) -> Result<AuditQuarantined> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a quarantine order", path.display()))
}

fn write_order(path: &Path, order: &AuditQuarantined) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(order)?)
        .with_context(|| path.display().to_string())
}

pub async fn run(cmd: QuarantineCommand) -> Result<()> {
    match cmd {
        QuarantineCommand::Plan {
            database_url,
            from_seq,
            reason,
            sites,
            log_id,
            out,
        } => {
            let store = AuditStore::open(&database_url).await?;
            let terms = ops::plan(&store, log_id.as_deref(), from_seq, &reason, &sites).await?;
            for r in &terms.rows {
                println!(
                    "seq {}: {} by {} about {} (hash {})",
                    r.seq, r.action, r.actor, r.subject, r.hash
                );
            }
            write_order(
                &out,
                &AuditQuarantined {
                    terms,
                    operator: None,
                    approvals: Vec::new(),
                    quorum: Vec::new(),
                    policy_digest: String::new(),
                },
            )?;
            println!(
                "order written to {}: sign it (tutela audit quarantine sign)",
                out.display()
            );
            Ok(())
        }
        QuarantineCommand::Sign { order, cert, key } => {
            let mut o = read_order(&order)?;
            let cert_pem =
                std::fs::read_to_string(&cert).with_context(|| cert.display().to_string())?;
            let key_pem =
                std::fs::read_to_string(&key).with_context(|| key.display().to_string())?;
            let message = quarantine::terms_message(&o.terms);
            let (chain, signature) =
                tutela_policy::approval::sign_quarantine_terms(&key_pem, &cert_pem, &message)?;
            let leaf = chain.first().context("no certificate")?;
            let identity = tutela_protocol::pki::identity_of_cert_der(leaf)?;
            let signed = QuarantineSignature {
                // The leaf first: readers take the identity from the first PEM block.
                certificate: cert_pem.clone(),
                signature: hex::encode(signature),
            };
            match identity.principal {
                Principal::Operator { .. } => o.operator = Some(signed),
                Principal::User { .. } => o.approvals.push(signed),
                _ => bail!(
                    "{identity} is neither an operator nor a site user: it cannot sign a quarantine order"
                ),
            }
            write_order(&order, &o)?;
            println!("signed as {identity}");
            Ok(())
        }
        QuarantineCommand::Apply {
            database_url,
            order,
            ca,
            policy_model,
            policy,
            audit_config,
        } => {
            let checkpoint_every = checkpoint_every_of(&audit_config)?;
            let o = read_order(&order)?;
            let ca_pem = std::fs::read_to_string(&ca).with_context(|| ca.display().to_string())?;
            let trust = OfficerTrust::ca_from_pem(&ca_pem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
            let authorizer = Authorizer::load(&policy_model, &policy).await?;
            let store = AuditStore::open(&database_url).await?;
            let recorded = ops::apply(&store, &o, &authorizer, &trust, checkpoint_every).await?;
            println!(
                "quarantined {} row(s) from seq {} ({}); start the audit service: it records audit.quarantined",
                recorded.terms.rows.len(),
                recorded.terms.from_seq,
                recorded.quorum.join(", ")
            );
            Ok(())
        }
        QuarantineCommand::Show { database_url } => {
            let store = AuditStore::open(&database_url).await?;
            for r in ops::quarantined_rows(&store).await? {
                println!(
                    "seq {} at {} ms: {} by {} about {} payload {} prev_hash {} hash {} (quarantined at {} ms)",
                    r.seq,
                    r.timestamp_ms,
                    r.action,
                    r.actor,
                    r.subject,
                    r.payload,
                    r.prev_hash,
                    r.hash,
                    r.quarantined_at_ms
                );
            }
            for o in ops::orders(&store).await? {
                println!("order: {}", serde_json::to_string(&o)?);
            }
            Ok(())
        }
    }
}
