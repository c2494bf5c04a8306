//! Which budget a dataset spends ([`crate::budget_identity`]), as the ledgers resolve it: the
//! datasets' sources, the sketches of their records (read at start and, after a task's
//! approvals, when a source changed), and the lookups that read no record (before them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tutela_audit::payload::privacy::DatasetSource;
use tutela_privacy::ledger::Ledger;

use super::{BudgetError, SiteLedgers, accountant};
use crate::budget_identity::sketch::RecordSketch;
use crate::budget_identity::{BudgetIdentities, BudgetSource, DataSeen, IdentityError};

impl SiteLedgers {
    /// Keys the budgets of these datasets (name → plain table file) by their data.
    pub fn with_sources(self, sources: BTreeMap<String, PathBuf>) -> Self {
        self.with_budget_sources(
            sources
                .into_iter()
                .map(|(name, path)| (name, BudgetSource::table_file(path)))
                .collect(),
        )
    }

    /// Keys the budgets of these datasets (name → where its records are) by their data.
    pub fn with_budget_sources(mut self, sources: BTreeMap<String, BudgetSource>) -> Self {
        self.sources = sources;
        self
    }

    /// The sources of a node's datasets and text datasets: every one, files, queries and
    /// directories alike, is keyed by its data.
    pub fn sources_of(config: &crate::config::NodeConfig) -> BTreeMap<String, BudgetSource> {
        let tables = config
            .datasets
            .iter()
            .map(|(name, d)| (name.clone(), BudgetSource::Table { config: d.clone() }));
        let texts = config.text_datasets.iter().map(|(name, d)| {
            (
                name.clone(),
                BudgetSource::Text {
                    source: d.text_source(),
                },
            )
        });
        tables.chain(texts).collect()
    }

    /// Tells every dataset's budget now, reading its records once (the node reads every table
    /// at start for its data check anyway): a task's gate then reads no record of data that has
    /// not changed since, and in particular none for a task its checks refuse. A dataset whose
    /// budget cannot be told is logged here and refused at its tasks.
    pub fn learn_budgets(&self) {
        for dataset in self.sources.keys() {
            match self.key(dataset) {
                Ok(key) => tracing::info!(%dataset, budget = %key, "privacy budget"),
                Err(e) => tracing::warn!(%dataset, error = %e, "privacy budget not told"),
            }
        }
    }

    /// The budget key of `dataset` ([`crate::budget_identity`]), learning its name and data
    /// version in the identity map.
    pub fn key(&self, dataset: &str) -> Result<String, BudgetError> {
        self.resolve(dataset).map(|r| r.0)
    }

    /// The sketch of `dataset`'s records now: the last one while its source is unchanged;
    /// otherwise read again when `read` (after a task's approvals), else none (before them: a
    /// task the node's checks refuse never causes a record to be read).
    fn records_of(
        &self,
        dataset: &str,
        source: &BudgetSource,
        read: bool,
    ) -> Result<Option<Arc<RecordSketch>>, IdentityError> {
        let stamp = source.stamp().map_err(|e| IdentityError::Source {
            dataset: dataset.to_string(),
            kind: e.kind(),
        })?;
        let mut cache = self
            .sketches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, sketch)) = cache.get(dataset)
            && (seen.is_none() || *seen == stamp)
        {
            return Ok(Some(sketch.clone()));
        }
        if !read {
            return Ok(None);
        }
        let sketch = match source.sketch(dataset) {
            Ok(sketch) => Arc::new(sketch),
            // Records the pipeline cannot parse are not trained on either: the round's own read
            // declines them with their code and column (`data.invalid_value column=…`), which a
            // budget refusal here would hide. Until then the budget is told by its file alone.
            Err(IdentityError::Records { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        cache.insert(dataset.to_string(), (stamp, sketch.clone()));
        Ok(Some(sketch))
    }

    /// What the node sees of `dataset`'s data now: its file's fingerprint and its records'
    /// sketch (see [`Self::records_of`] for `read`); `None` for a dataset without a source.
    #[allow(clippy::type_complexity)]
    fn data_seen(
        &self,
        dataset: &str,
        read: bool,
    ) -> Result<Option<(Option<(PathBuf, DatasetSource)>, Option<Arc<RecordSketch>>)>, IdentityError>
    {
        let Some(source) = self.sources.get(dataset) else {
            return Ok(None);
        };
        let file = match source.file() {
            Some(path) => {
                let fp = crate::budget_identity::fingerprint(path).map_err(|e| {
                    IdentityError::Source {
                        dataset: dataset.to_string(),
                        kind: e.kind(),
                    }
                })?;
                Some((path.to_path_buf(), fp))
            }
            None => None,
        };
        Ok(Some((file, self.records_of(dataset, source, read)?)))
    }

    /// The key and the data's file fingerprint (none for a dataset keyed by name or without a
    /// file), learned into the identity map.
    pub(super) fn resolve(
        &self,
        dataset: &str,
    ) -> Result<(String, Option<DatasetSource>), BudgetError> {
        let Some((file, records)) = self.data_seen(dataset, true)? else {
            return Ok((dataset.to_string(), None));
        };
        let mut map = BudgetIdentities::open(&self.dir, self.kek.clone())?;
        let legacy = self.path(dataset).exists();
        let r = map.resolve(
            dataset,
            DataSeen {
                file: file.as_ref().map(|(p, fp)| (p.as_path(), fp)),
                records: records.as_deref(),
            },
            legacy,
        )?;
        Ok((r.key, r.source))
    }

    /// The budget key `dataset`'s data is known under, reading no record and learning nothing:
    /// before a task's approvals. Its file's first bytes are read (a file gone is an error),
    /// and the sketch of its records is the one taken at start or at an earlier task, while the
    /// source is unchanged; a source changed since is matched by its file alone until a task's
    /// approvals let the node read it ([`Self::key`]).
    pub fn known_key(&self, dataset: &str) -> Result<String, BudgetError> {
        let Some((file, records)) = self.data_seen(dataset, false)? else {
            return Ok(dataset.to_string());
        };
        let map = BudgetIdentities::open(&self.dir, self.kek.clone())?;
        Ok(map.lookup(
            dataset,
            DataSeen {
                file: file.as_ref().map(|(p, fp)| (p.as_path(), fp)),
                records: records.as_deref(),
            },
            self.path(dataset).exists(),
        )?)
    }

    /// ε spent on the budget `dataset`'s data is known under ([`Self::known_key`]), reading no
    /// record: what the site policy's budget clause weighs before a task's approvals. The
    /// ledger's own cap check ([`Self::check`]) runs after them, on the budget the records say.
    pub fn spent_known(&self, dataset: &str) -> Result<f64, BudgetError> {
        let _g = self.guard();
        let key = self.known_key(dataset)?;
        let budget = self.budget();
        Ok(Ledger::open(self.path(&key), &key, self.kek.clone())?
            .spent(budget.delta, accountant(budget.accountant))?)
    }

    /// The source file of `dataset`, when its data is one file.
    pub fn source_of(&self, dataset: &str) -> Option<&std::path::Path> {
        self.sources.get(dataset).and_then(BudgetSource::file)
    }

    /// Binds `dataset`'s data to the budget `key` the trail holds it under (an officer's restore
    /// after the identity map was lost).
    pub fn bind_to_trail_key(&self, dataset: &str, key: &str) -> Result<(), String> {
        let _g = self.guard();
        let Some((file, records)) = self.data_seen(dataset, true).map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        BudgetIdentities::open(&self.dir, self.kek.clone())
            .and_then(|mut m| {
                m.bind(
                    dataset,
                    key,
                    file.as_ref().map(|(_, fp)| fp),
                    records.as_deref(),
                )
            })
            .map_err(|e| e.to_string())
    }
}
