//! `tutela-node ledger restore`: a site's compliance officer rebuilds the node's privacy ledgers
//! from the audit trail and re-pins its held checkpoint.
//!
//! A node whose ledger lacks spends the trail records, or that lost its held checkpoint, refuses
//! to train ([`crate::spend_anchor`], [`crate::site_audit`]). Nothing on the site's disk can undo
//! that: the restore runs with the certificate and key of a compliance officer of the node's site
//! (listed in its `site_policy` when the node has one), talks to the audit service as that
//! officer, and for each dataset of node.toml
//!
//! 1. reads the node's `privacy.spent` events (actor: the node's identity);
//! 2. appends `ledger.restored` as the officer (subject `<site>/<dataset>`: the spends counted,
//!    how many the ledger lacked, the ε rebuilt, the checkpoint pinned), so the restore is on the
//!    record before it takes effect;
//! 3. rewrites the ledger from those spends, each (job, round, attempt) once.
//!
//! The held checkpoint is then advanced (or, when it was deleted, pinned afresh) to the log's
//! latest signed checkpoint, verified with the key pinned in node.toml. Run it with the node
//! stopped.

use std::path::Path;
use std::sync::Arc;

use tutela_audit::CheckpointVerifier;
use tutela_audit::client::AuditEndpoint;
use tutela_audit::payload::privacy::LedgerRestored;
use tutela_privacy::at_rest::KeyEncryptionKey;
use tutela_protocol::identity::Principal;
use tutela_protocol::tls::{TlsFiles, TlsMaterial};

use crate::audit_checkpoint::HeldCheckpoint;
use crate::config::NodeConfig;
use crate::ledger::SiteLedgers;
use crate::site_audit::{all_own_spends, own_spends, read_public_key};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("node.toml has no [audit] table: there is no trail to restore the ledger from")]
    NoAudit,
    #[error("{0}")]
    Tls(#[from] tutela_protocol::tls::TlsError),
    #[error(
        "{identity} is not a compliance officer of site {site}: the restore needs the certificate \
         and key of one{listed}"
    )]
    NotAnOfficer {
        identity: String,
        site: String,
        listed: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("the audit service: {0}")]
    Audit(String),
    #[error(
        "the audit service signs its checkpoints with key {served}, not the key pinned in node.toml \
         ({pinned}): nothing is restored from it"
    )]
    KeyMismatch { served: String, pinned: String },
    #[error("dataset {dataset}: {why}")]
    Dataset { dataset: String, why: String },
}

/// What the restore did for one dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredDataset {
    pub dataset: String,
    pub spends: u64,
    pub missing_spends: u64,
    pub dataset_epsilon: f64,
    /// The seq of the `ledger.restored` event.
    pub seq: u64,
}

/// Restores every dataset's ledger of the node configured by `config`, as the officer whose
/// certificate and key are given; returns what was done, by dataset, and the tree size of the
/// checkpoint the node now holds.
pub async fn restore(
    config: &NodeConfig,
    officer_cert: &Path,
    officer_key: &Path,
) -> Result<(Vec<RestoredDataset>, u64), RestoreError> {
    let audit = config.audit.as_ref().ok_or(RestoreError::NoAudit)?;
    let node = TlsMaterial::load(&config.tls)?.identity.uri();
    let officer = TlsMaterial::load(&TlsFiles {
        ca: config.tls.ca.clone(),
        cert: officer_cert.to_path_buf(),
        key: officer_key.to_path_buf(),
        crl: config.tls.crl.clone(),
    })?;
    check_officer(config, &officer)?;
    let kek: Option<Arc<dyn KeyEncryptionKey>> = match config
        .key_encryption_key()
        .map_err(|e| RestoreError::Config(e.to_string()))?
    {
        Some(k) => Some(Arc::new(k)),
        None => None,
    };
    let pinned = read_public_key(&audit.checkpoint_public_key)
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    let mut client = AuditEndpoint {
        endpoint: audit.endpoint.clone(),
        server_identity: audit.server_identity.clone(),
    }
    .connect_lazy(&officer)
    .map_err(|e| RestoreError::Audit(e.to_string()))?;
    let audit_err = |e: &dyn std::fmt::Display| RestoreError::Audit(e.to_string());
    let info = client.log_info().await.map_err(|e| audit_err(&e))?;
    if info.public_key != pinned {
        return Err(RestoreError::KeyMismatch {
            served: hex::encode(&info.public_key),
            pinned: hex::encode(&pinned),
        });
    }
    // The checkpoint the node will hold: checked against the pinned key before anything is read.
    let latest = client.checkpoint(None).await.map_err(|e| audit_err(&e))?;
    CheckpointVerifier::new(&pinned, &info.log_id)
        .update(&latest, &[])
        .map_err(|e| audit_err(&e))?;
    let tree_size = latest.checkpoint.tree_size;

    let ledgers = SiteLedgers::new(
        config.work_dir.join("privacy-ledger"),
        kek.clone(),
        config.privacy.clone(),
    )
    .with_budget_sources(SiteLedgers::sources_of(config));
    let all_spends = all_own_spends(&mut client, &node)
        .await
        .map_err(|e| audit_err(&e))?;
    let mut done = Vec::new();
    let mut restored_keys = std::collections::BTreeSet::new();
    for dataset in config.datasets.keys().chain(config.text_datasets.keys()) {
        let dataset_err = |why: String| RestoreError::Dataset {
            dataset: dataset.clone(),
            why,
        };
        // The identity map first: the data goes back under the budget the trail holds it under
        // (the map may have been deleted with the ledger).
        if let Some(trail_key) = ledgers
            .trail_key(dataset, &all_spends)
            .map_err(dataset_err)?
        {
            ledgers
                .bind_to_trail_key(dataset, &trail_key)
                .map_err(dataset_err)?;
        }
        let key = ledgers
            .key(dataset)
            .map_err(|e| dataset_err(e.to_string()))?;
        // Two names of one budget: restored once.
        if !restored_keys.insert(key.clone()) {
            continue;
        }
        let spends = own_spends(&mut client, &node, &config.site, &key)
            .await
            .map_err(|e| audit_err(&e))?;
        let missing = match ledgers.check_against_trail(dataset, &spends) {
            Ok(()) => 0,
            Err(behind) => behind.missing as u64,
        };
        // What the ledger will say, computed before the event that announces it.
        let epsilon = ledgers
            .epsilon_from_trail(dataset, &spends)
            .map_err(dataset_err)?;
        let event = LedgerRestored {
            site: config.site.clone(),
            // The budget's key, as the spends' subject.
            dataset: key.clone(),
            node: node.clone(),
            spends: spends.len() as u64,
            last_spend_seq: spends.last().map(|s| s.seq),
            dataset_epsilon: epsilon,
            dataset_delta: config.privacy.delta,
            missing_spends: missing,
            checkpoint_tree_size: tree_size,
        };
        let receipt = client
            .append_payload(&format!("{}/{key}", config.site), &event)
            .await
            .map_err(|e| audit_err(&e))?;
        ledgers
            .restore_from_trail(dataset, &spends)
            .map_err(dataset_err)?;
        tracing::info!(
            %dataset, spends = spends.len(), missing, epsilon, seq = receipt.seq,
            "privacy ledger restored from the audit trail"
        );
        done.push(RestoredDataset {
            dataset: dataset.clone(),
            spends: spends.len() as u64,
            missing_spends: missing,
            dataset_epsilon: epsilon,
            seq: receipt.seq,
        });
    }

    // The held checkpoint: advanced along a consistency proof when the node still holds one (a
    // log that does not extend it is refused), pinned afresh when it was deleted.
    let mut held = HeldCheckpoint::open(&config.work_dir, &pinned, &info.log_id, kek)
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    let held_size = match held.latest() {
        Some(_) => held
            .refresh(&mut client)
            .await
            .map_err(|e| audit_err(&e))
            .map(|_| held.latest().map_or(0, |c| c.checkpoint.tree_size))?,
        None => {
            held.accept(&latest, &[]).map_err(|e| audit_err(&e))?;
            tree_size
        }
    };
    crate::site_audit::clear_pin_marker(&config.work_dir);
    Ok((done, held_size))
}

/// The officer must be a user of the node's site and, when the node has a site policy, one of
/// its compliance officers.
fn check_officer(config: &NodeConfig, officer: &TlsMaterial) -> Result<(), RestoreError> {
    let identity = officer.identity.uri();
    let of_site =
        matches!(&officer.identity.principal, Principal::User { site, .. } if *site == config.site);
    let listed = match &config.site_policy {
        Some(path) => {
            let policy = tutela_policy::site_policy::SitePolicy::load(path)
                .map_err(|e| RestoreError::Config(e.to_string()))?;
            Some(policy.is_officer(&identity))
        }
        None => None,
    };
    if of_site && listed != Some(false) {
        return Ok(());
    }
    Err(RestoreError::NotAnOfficer {
        identity,
        site: config.site.clone(),
        listed: if listed.is_some() {
            " listed in the site policy's compliance_officers".into()
        } else {
            String::new()
        },
    })
}
