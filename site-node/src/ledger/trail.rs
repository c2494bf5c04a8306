//! The ledgers against the audit trail: the `privacy.spent` payload of a charge, the check that a
//! ledger (and the identity map, [`crate::budget_identity`]) holds every spend the trail records
//! for this node, and an officer's rebuild from those spends.

use tutela_privacy::accountant::Accountant;
use tutela_privacy::ledger::{Group, Ledger, MechanismKind, RoundCharge, TrailSpend};

use super::{SiteLedgers, accountant};

/// A spend of the audit trail's (`privacy.spent`, by this node), as the ledger checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchoredSpend {
    pub seq: u64,
    pub timestamp_unix_ms: i64,
    pub payload: tutela_audit::payload::privacy::PrivacySpent,
}

impl AnchoredSpend {
    fn as_trail_spend(&self) -> TrailSpend<'_> {
        TrailSpend {
            job_id: &self.payload.job,
            round: self.payload.round,
            attempt: self.payload.attempt,
            group: tutela_privacy::ledger::Group {
                sample_rate: self.payload.sample_rate,
                noise_multiplier: self.payload.noise_multiplier,
                steps: self.payload.steps,
                kind: match self.payload.mechanism.as_deref() {
                    Some("distributed_dp_sgd") => MechanismKind::DistributedDpSgd,
                    // Absent: local DP-SGD; an unknown name is charged as DP-SGD, never dropped.
                    _ => MechanismKind::DpSgd,
                },
            },
            metrics: match (
                self.payload.metrics_noise_multiplier,
                self.payload.metrics_releases,
            ) {
                (Some(noise_multiplier), Some(steps)) => Some(Group {
                    sample_rate: 1.0,
                    noise_multiplier,
                    steps,
                    kind: MechanismKind::Metrics,
                }),
                _ => None,
            },
            rows: self.payload.rows as usize,
            seq: self.seq,
            timestamp_unix_ms: self.timestamp_unix_ms,
        }
    }
}

/// Why a node does not train on a dataset whose ledger is behind the trail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the privacy ledger of dataset {dataset:?} lacks {missing} spend(s) that the audit trail \
     records for this node, or holds them as smaller spends (first: job {first_job} round {first_round} attempt {first_attempt}, \
     seq {first_seq}): the ledger file is missing or older than the trail, so its ε would be \
     understated. This node does not train on {dataset:?} until a compliance officer of the site \
     restores the ledger from the trail (`tutela-node ledger restore --config node.toml \
     --officer-cert CERT --officer-key KEY`)"
)]
pub struct LedgerBehindTrail {
    pub dataset: String,
    pub missing: usize,
    pub first_job: String,
    pub first_round: u32,
    pub first_attempt: u32,
    pub first_seq: u64,
}

impl SiteLedgers {
    /// The charges of `dataset` not yet recorded in the audit trail, with their job.
    pub fn unanchored(&self, dataset: &str) -> Result<Vec<(String, RoundCharge)>, String> {
        let _g = self.guard();
        Ok(self.open(dataset).map_err(|e| e.to_string())?.unanchored())
    }

    /// The seqs of the trail's events that `dataset`'s charges are anchored at.
    pub fn anchored_seqs(&self, dataset: &str) -> Result<std::collections::BTreeSet<u64>, String> {
        let _g = self.guard();
        let ledger = self.open(dataset).map_err(|e| e.to_string())?;
        Ok(ledger
            .jobs()
            .iter()
            .flat_map(|j| j.charges.iter().filter_map(|c| c.anchored_seq))
            .collect())
    }

    /// Notes that a charge is the trail's event `seq`.
    pub fn mark_anchored(
        &self,
        dataset: &str,
        job_id: &str,
        round_attempt: (u32, u32),
        seq: u64,
    ) -> Result<(), String> {
        let _g = self.guard();
        let mut ledger = self.open(dataset).map_err(|e| e.to_string())?;
        ledger
            .mark_anchored(job_id, round_attempt, seq)
            .map_err(|e| e.to_string())
    }

    /// The `privacy.spent` payload of a charge of `dataset`, with the ε figures as the ledger
    /// holds them now (for a charge recorded at once, the figures after the spend).
    pub fn spend_payload(
        &self,
        site: &str,
        dataset: &str,
        job_id: &str,
        charge: &RoundCharge,
        job_delta: f64,
        job_accountant: Accountant,
    ) -> Result<tutela_audit::payload::privacy::PrivacySpent, String> {
        let _g = self.guard();
        let (key, source) = self.resolve(dataset).map_err(|e| e.to_string())?;
        let ledger =
            Ledger::open(self.path(&key), &key, self.kek.clone()).map_err(|e| e.to_string())?;
        Ok(tutela_audit::payload::privacy::PrivacySpent {
            site: site.to_string(),
            // The budget's key: a rename or a copy of the data spends under the same subject.
            dataset: key,
            source,
            job: job_id.to_string(),
            round: charge.round,
            attempt: charge.attempt,
            sample_rate: charge.group.sample_rate,
            noise_multiplier: charge.group.noise_multiplier,
            steps: charge.group.steps,
            rows: ledger.rows().unwrap_or(0) as u64,
            job_epsilon: ledger
                .spent_by_job(job_id, job_delta, job_accountant)
                .map_err(|e| e.to_string())?,
            dataset_epsilon: ledger
                .spent(self.budget.delta, accountant(self.budget.accountant))
                .map_err(|e| e.to_string())?,
            delta: job_delta,
            dataset_delta: self.budget.delta,
            metrics_noise_multiplier: charge.metrics.map(|m| m.noise_multiplier),
            metrics_releases: charge.metrics.map(|m| m.steps),
            mechanism: (!charge.group.kind.is_dp_sgd())
                .then(|| charge.group.kind.as_str().to_string()),
        })
    }

    /// Checks that the ledger of `dataset` holds every spend the trail records for this node;
    /// `spends` are the trail's `privacy.spent` events of the dataset.
    pub fn check_against_trail(
        &self,
        dataset: &str,
        spends: &[AnchoredSpend],
    ) -> Result<(), LedgerBehindTrail> {
        let _g = self.guard();
        // An unreadable ledger holds none of them (the gate names its own error).
        let ledger = self.open(dataset).ok();
        // Each event of the trail must be its own charge of the ledger: the one anchored at its
        // seq, else another of the same (job, round, attempt) and spend not claimed by another
        // event (an append whose answer was lost). A round attempt charged twice is two events;
        // a ledger holding one charge for both is behind by one. The same key with a smaller or different
        // spend is a ledger edited down.
        let mut sorted: Vec<&AnchoredSpend> = spends.iter().collect();
        sorted.sort_by_key(|s| s.seq);
        sorted.dedup_by_key(|s| s.seq);
        // (job, index of the charge in that job's list): claimed by an event already.
        let mut claimed: std::collections::BTreeSet<(&str, usize)> =
            std::collections::BTreeSet::new();
        let mut missing: Vec<&AnchoredSpend> = Vec::new();
        for s in sorted {
            let Some(job) = ledger.as_ref().and_then(|l| l.job(&s.payload.job)) else {
                missing.push(s);
                continue;
            };
            let group = s.as_trail_spend().group;
            let candidates = || {
                job.charges.iter().enumerate().filter(|(i, c)| {
                    c.round == s.payload.round
                        && c.attempt == s.payload.attempt
                        && c.group == group
                        && !claimed.contains(&(s.payload.job.as_str(), *i))
                })
            };
            let found = candidates()
                .find(|(_, c)| c.anchored_seq == Some(s.seq))
                .or_else(|| candidates().next())
                .map(|(i, _)| i);
            match found {
                Some(i) => {
                    claimed.insert((s.payload.job.as_str(), i));
                }
                None => missing.push(s),
            }
        }
        match missing.first() {
            None => Ok(()),
            Some(first) => Err(LedgerBehindTrail {
                dataset: dataset.to_string(),
                missing: missing.len(),
                first_job: first.payload.job.clone(),
                first_round: first.payload.round,
                first_attempt: first.payload.attempt,
                first_seq: first.seq,
            }),
        }
    }

    /// Checks that the trail holds no spend of `dataset`'s data under another budget key than the
    /// one the node resolves (the identity map deleted, then the data changed); `all_spends` are
    /// every `privacy.spent` of this node. Returns the key.
    pub fn check_identity_against_trail(
        &self,
        dataset: &str,
        all_spends: &[AnchoredSpend],
    ) -> Result<String, String> {
        let _g = self.guard();
        let key = self.key(dataset).map_err(|e| e.to_string())?;
        let Some(path) = self.source_of(dataset) else {
            return Ok(key);
        };
        let in_trail = crate::budget_identity::key_in_trail(
            dataset,
            path,
            all_spends
                .iter()
                .map(|s| (s.seq, s.payload.dataset.as_str(), s.payload.source.as_ref())),
        )
        .map_err(|e| e.to_string())?;
        match in_trail {
            Some((trail_key, first_seq)) if trail_key != key => {
                Err(crate::budget_identity::IdentityBehindTrail {
                    dataset: dataset.to_string(),
                    resolved: key,
                    trail_key,
                    first_seq,
                }
                .to_string())
            }
            _ => Ok(key),
        }
    }

    /// The key the trail holds `dataset`'s data under, if any of `all_spends` recorded it.
    pub fn trail_key(
        &self,
        dataset: &str,
        all_spends: &[AnchoredSpend],
    ) -> Result<Option<String>, String> {
        let Some(path) = self.source_of(dataset) else {
            return Ok(None);
        };
        crate::budget_identity::key_in_trail(
            dataset,
            path,
            all_spends
                .iter()
                .map(|s| (s.seq, s.payload.dataset.as_str(), s.payload.source.as_ref())),
        )
        .map(|found| found.map(|(k, _)| k))
        .map_err(|e| e.to_string())
    }

    /// ε of `dataset` at the site's δ if its ledger were rebuilt from `spends` (nothing written).
    pub fn epsilon_from_trail(
        &self,
        dataset: &str,
        spends: &[AnchoredSpend],
    ) -> Result<f64, String> {
        let key = self.key(dataset).map_err(|e| e.to_string())?;
        Ledger::from_trail(
            self.path(&key),
            &key,
            None,
            spends.iter().map(AnchoredSpend::as_trail_spend),
        )
        .and_then(|l| l.spent(self.budget.delta, accountant(self.budget.accountant)))
        .map_err(|e| e.to_string())
    }

    /// Rebuilds the ledger of `dataset` from the trail's spends (an officer's restore), replacing
    /// the file; returns the dataset's ε after it, at the site's δ.
    pub fn restore_from_trail(
        &self,
        dataset: &str,
        spends: &[AnchoredSpend],
    ) -> Result<f64, String> {
        let _g = self.guard();
        let key = self.key(dataset).map_err(|e| e.to_string())?;
        let ledger = Ledger::rebuild_from_trail(
            self.path(&key),
            &key,
            self.kek.clone(),
            spends.iter().map(AnchoredSpend::as_trail_spend),
        )
        .map_err(|e| e.to_string())?;
        ledger
            .spent(self.budget.delta, accountant(self.budget.accountant))
            .map_err(|e| e.to_string())
    }
}
