//! The site's privacy budget, anchored in the audit trail.
//!
//! Every charge of a dataset's ledger ([`crate::ledger`]) is also a `privacy.spent` event the
//! node appends as itself, before the round's update leaves the site ([`anchor_charge`]): a
//! node that cannot record its spend does not send the update. The ledger is the outbox: a
//! charge whose append failed stays marked unanchored and is appended before the node trains
//! again, unless the trail has it already (an append whose answer was lost), so each charge is
//! in the trail once.
//!
//! Before training on a dataset the node reads its own spends from the trail (the shipped policy
//! lets a node read its own events only, `audit, read_own`) and refuses when its ledger lacks
//! one of them ([`reconcile`]): a deleted or rolled-back ledger cannot reset the site's ε; a
//! compliance officer restores it from the trail ([`crate::ledger_restore`]).

use tutela_privacy::accountant::Accountant;
use tutela_privacy::ledger::RoundCharge;

use crate::ledger::SiteLedgers;
use crate::site_audit::SiteAudit;

/// Records `charge` (of `job` on `dataset` at `site`) in the trail and marks it anchored in the
/// ledger. `job_privacy` is the job's (δ, accountant), for the job's ε in the event.
pub async fn anchor_charge(
    audit: &SiteAudit,
    ledgers: &SiteLedgers,
    (site, dataset, job): (&str, &str, &str),
    charge: &RoundCharge,
    job_privacy: (f64, Accountant),
) -> Result<(), String> {
    let payload =
        ledgers.spend_payload(site, dataset, job, charge, job_privacy.0, job_privacy.1)?;
    let seq = audit
        .record_spend(&payload)
        .await
        .map_err(|e| e.to_string())?;
    ledgers.mark_anchored(dataset, job, (charge.round, charge.attempt), seq)
}

/// Checks the ledger of `dataset` against this node's spends in the trail (refusing when the
/// ledger lacks one), then appends the ledger's charges the trail lacks.
pub async fn reconcile(
    audit: &SiteAudit,
    ledgers: &SiteLedgers,
    site: &str,
    dataset: &str,
) -> Result<(), String> {
    // One read of every spend of this node: it also tells which budget the trail holds this
    // dataset's data under, so that a deleted identity map cannot open a fresh budget.
    let all = audit.all_own_spends().await.map_err(|e| e.to_string())?;
    let key = ledgers.check_identity_against_trail(dataset, &all)?;
    let subject = tutela_audit::payload::privacy::PrivacySpent::subject(site, &key);
    let spends: Vec<_> = all
        .into_iter()
        .filter(|s| {
            tutela_audit::payload::privacy::PrivacySpent::subject(
                &s.payload.site,
                &s.payload.dataset,
            ) == subject
        })
        .collect();
    ledgers
        .check_against_trail(dataset, &spends)
        .map_err(|e| e.to_string())?;
    let budget = ledgers.budget();
    let site_privacy = (budget.delta, crate::ledger::accountant(budget.accountant));
    // An event of the trail anchors one charge: those the ledger's anchored charges hold
    // already cannot also stand for an unanchored one (a round attempt charged twice is two
    // events, and the second charge is appended, not taken as the first's).
    let mut taken: std::collections::BTreeSet<u64> = ledgers.anchored_seqs(dataset)?;
    for (job, charge) in ledgers.unanchored(dataset)? {
        let in_trail = spends.iter().find(|s| {
            s.payload.job == job
                && s.payload.round == charge.round
                && s.payload.attempt == charge.attempt
                && !taken.contains(&s.seq)
        });
        match in_trail {
            Some(s) => {
                taken.insert(s.seq);
                ledgers.mark_anchored(dataset, &job, (charge.round, charge.attempt), s.seq)?
            }
            None => {
                tracing::warn!(
                    %dataset, %job, round = charge.round, attempt = charge.attempt,
                    "a privacy spend not yet in the audit trail: recording it now"
                );
                anchor_charge(audit, ledgers, (site, dataset, &job), &charge, site_privacy).await?
            }
        }
    }
    Ok(())
}
