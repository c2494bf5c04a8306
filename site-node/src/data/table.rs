//! The in-memory training table, stratified splits and non-IID site shards.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::DataError;

/// Rows of features and labels, in memory.
///
/// `features` is row-major: row `r` is `features[r * n_features..(r + 1) * n_features]`.
/// `labels[r]` indexes `class_names`.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub features: Vec<f32>,
    pub n_rows: usize,
    pub n_features: usize,
    pub labels: Vec<i64>,
    pub feature_names: Vec<String>,
    pub class_names: Vec<String>,
}

impl Table {
    /// Checks that the fields agree with each other: lengths, and every label a valid class.
    pub fn check(&self) -> Result<(), DataError> {
        let bad = |reason: String| Err(DataError::InconsistentTable { reason });
        if self.feature_names.len() != self.n_features {
            return bad(format!(
                "{} feature names for {} features",
                self.feature_names.len(),
                self.n_features
            ));
        }
        if self.n_rows.checked_mul(self.n_features) != Some(self.features.len()) {
            return bad(format!(
                "{} feature values for {} rows of {} features",
                self.features.len(),
                self.n_rows,
                self.n_features
            ));
        }
        if self.labels.len() != self.n_rows {
            return bad(format!(
                "{} labels for {} rows",
                self.labels.len(),
                self.n_rows
            ));
        }
        let n_classes = self.class_names.len() as i64;
        if let Some((row, label)) = self
            .labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l < 0 || l >= n_classes)
        {
            return bad(format!(
                "row {row} has label {label}, but there are {n_classes} classes"
            ));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.n_rows == 0
    }

    pub fn n_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Row `index`'s features, or `None` past the end.
    pub fn row(&self, index: usize) -> Option<&[f32]> {
        let start = index.checked_mul(self.n_features)?;
        self.features
            .get(start..start.checked_add(self.n_features)?)
    }

    /// How many rows each class has, indexed by class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &label in &self.labels {
            if let Some(count) = usize::try_from(label).ok().and_then(|l| counts.get_mut(l)) {
                *count += 1;
            }
        }
        counts
    }

    /// A new table with the given rows, in the given order.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Table, DataError> {
        let mut features = Vec::with_capacity(rows.len() * self.n_features);
        let mut labels = Vec::with_capacity(rows.len());
        for &r in rows {
            let (Some(row), Some(&label)) = (self.row(r), self.labels.get(r)) else {
                return Err(DataError::InconsistentTable {
                    reason: format!("row {r} selected from a table of {} rows", self.n_rows),
                });
            };
            features.extend_from_slice(row);
            labels.push(label);
        }
        Ok(Table {
            features,
            n_rows: rows.len(),
            n_features: self.n_features,
            labels,
            feature_names: self.feature_names.clone(),
            class_names: self.class_names.clone(),
        })
    }

    /// Row indices of each class, in table order, indexed by class.
    fn rows_by_class(&self) -> Vec<Vec<usize>> {
        let mut by_class = vec![Vec::new(); self.class_names.len()];
        for (row, &label) in self.labels.iter().enumerate() {
            if let Some(rows) = usize::try_from(label)
                .ok()
                .and_then(|l| by_class.get_mut(l))
            {
                rows.push(row);
            }
        }
        by_class
    }
}

/// A table cut in two.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Table,
    pub validation: Table,
}

/// Splits a table so that each class keeps its share in both parts.
///
/// Each class's rows are shuffled with one RNG seeded from `seed` (classes in index order), and
/// `round(validation_fraction × class rows)` of them go to the validation part. Both parts keep
/// the rows in their original order. The same table and seed always give the same split.
pub fn stratified_split(
    table: &Table,
    validation_fraction: f64,
    seed: u64,
) -> Result<Split, DataError> {
    table.check()?;
    if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
        return Err(DataError::Split {
            reason: format!(
                "validation fraction must lie strictly between 0 and 1, found {validation_fraction}"
            ),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut train_rows = Vec::new();
    let mut validation_rows = Vec::new();
    for mut rows in table.rows_by_class() {
        rows.shuffle(&mut rng);
        let n_validation = (rows.len() as f64 * validation_fraction).round() as usize;
        let (validation, train) = rows.split_at(n_validation.min(rows.len()));
        validation_rows.extend_from_slice(validation);
        train_rows.extend_from_slice(train);
    }
    train_rows.sort_unstable();
    validation_rows.sort_unstable();
    Ok(Split {
        train: table.select_rows(&train_rows)?,
        validation: table.select_rows(&validation_rows)?,
    })
}

/// How to cut a table into per-site shards for a federated demo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Number of sites.
    pub n_sites: usize,
    /// Share of every class held out as a common test set before sharding.
    pub test_fraction: f64,
    /// Concentration of the Dirichlet distribution each class's rows are spread with: small
    /// values (0.1–0.5) give strongly skewed sites, large values (100) nearly identical ones.
    pub dirichlet_alpha: f64,
    /// Rows of every class each site gets at least, before the Dirichlet share.
    pub min_per_class: usize,
    pub seed: u64,
}

/// Per-site training tables and the held-out test table.
#[derive(Debug, Clone, PartialEq)]
pub struct Shards {
    pub sites: Vec<Table>,
    pub test: Table,
}

/// Cuts a table into `n_sites` non-IID shards plus a stratified test split.
///
/// First `test_fraction` of every class is held out ([`stratified_split`]). Then, for each
/// class, every site receives `min_per_class` rows and the rest of the class is divided in
/// proportions drawn from Dirichlet(`alpha`, …, `alpha`), so sites see different class mixes
/// (label skew) while each still has every class. Deterministic in `seed`.
pub fn site_shards(table: &Table, config: &ShardConfig) -> Result<Shards, DataError> {
    let split_error = |reason: String| Err(DataError::Split { reason });
    if config.n_sites == 0 {
        return split_error("the number of sites must be at least 1".into());
    }
    if !(config.dirichlet_alpha.is_finite() && config.dirichlet_alpha > 0.0) {
        return split_error(format!(
            "dirichlet_alpha must be a positive number, found {}",
            config.dirichlet_alpha
        ));
    }
    let Split {
        train: pool,
        validation: test,
    } = stratified_split(table, config.test_fraction, config.seed)?;
    // A separate stream from the split's, so that changing alpha does not change the test set.
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5348_4152_4453_0001);
    let mut site_rows = vec![Vec::new(); config.n_sites];
    for (class, mut rows) in pool.rows_by_class().into_iter().enumerate() {
        let guaranteed = config.n_sites * config.min_per_class;
        if rows.len() < guaranteed {
            return split_error(format!(
                "class {:?} has {} training rows, fewer than {} sites × {} rows per class",
                pool.class_names[class],
                rows.len(),
                config.n_sites,
                config.min_per_class
            ));
        }
        rows.shuffle(&mut rng);
        let proportions = sample_dirichlet(config.dirichlet_alpha, config.n_sites, &mut rng);
        let extra = allocate(rows.len() - guaranteed, &proportions);
        let mut next = rows.into_iter();
        for (site, extra_rows) in site_rows.iter_mut().zip(extra) {
            site.extend(next.by_ref().take(config.min_per_class + extra_rows));
        }
    }
    let sites = site_rows
        .into_iter()
        .map(|mut rows| {
            rows.sort_unstable();
            pool.select_rows(&rows)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Shards { sites, test })
}

/// Splits `total` items by `proportions` (summing to 1) with the largest-remainder method, so
/// the counts add up to exactly `total`.
fn allocate(total: usize, proportions: &[f64]) -> Vec<usize> {
    let exact: Vec<f64> = proportions.iter().map(|p| p * total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let assigned: usize = counts.iter().sum();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in by_remainder.iter().take(total.saturating_sub(assigned)) {
        counts[i] += 1;
    }
    counts
}

/// A draw from the symmetric Dirichlet distribution: normalised Gamma(alpha) variates.
fn sample_dirichlet(alpha: f64, n: usize, rng: &mut StdRng) -> Vec<f64> {
    let draws: Vec<f64> = (0..n).map(|_| sample_gamma(alpha, rng)).collect();
    let sum: f64 = draws.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        draws.into_iter().map(|d| d / sum).collect()
    } else {
        // Tiny alphas can underflow every draw to 0; the distribution's limit puts all the mass
        // on one component.
        let mut one_hot = vec![0.0; n];
        one_hot[rng.random_range(0..n)] = 1.0;
        one_hot
    }
}

/// Gamma(shape, 1) by Marsaglia and Tsang's method, boosted for shape < 1.
fn sample_gamma(shape: f64, rng: &mut StdRng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random();
        return sample_gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = sample_standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u: f64 = rng.random();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// Box–Muller; `1 - random()` lies in (0, 1], so the logarithm is finite.
fn sample_standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
