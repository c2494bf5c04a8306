//! Consortium statistics under differential privacy: the schema's data dictionary (per numeric
//! column count, mean, standard deviation, quantiles; per categorical column category
//! frequencies; missing values everywhere) computed across sites without pooling their rows.
//!
//! # The query
//!
//! A [`StatsLayout`] (derived from the consortium's schema, the same at every site) fixes one
//! vector of **sufficient statistics**. Each row adds to it a contribution whose coordinates all
//! lie in `[0, 1]`:
//!
//! | coordinates | a row adds |
//! |---|---|
//! | `rows` | 1 |
//! | numeric column: `missing`, `sum`, `sum_sq`, `bins[0..B]` | 1 to `missing` when the cell is missing; else `u`, `u²` and 1 to the bin of `u`, where `u = (clip(x) − low) / (high − low) ∈ [0, 1]` |
//! | categorical column: `categories[0..k]`, `(other)`, `(missing)` | 1 to one of them |
//!
//! `low`, `high` and `B` are **public** (declared in the schema, so inside its digest): a value
//! outside `[low, high]` is clipped to the nearer end (it counts in the end bin, and in the mean
//! and the standard deviation as that end), which is what bounds a row's influence. A row's
//! contribution has L2 norm at most `√(1 + 3·numeric + categorical)` and L1 norm at most
//! `1 + 3·numeric + categorical` ([`StatsLayout::sensitivity`], add/remove-one row), whatever
//! the row holds: a missing cell and a present one are exclusive, so the `missing` coordinate
//! costs no sensitivity.
//!
//! # On the noise grid
//!
//! The noise is the project's exact discrete Gaussian on a grid `γ·ℤ` ([`crate::noise`]), so the
//! query must lie on that grid. Each **row's** contribution is rounded to the grid on its own
//! (`u` and `u²` to the nearest multiple of γ, still in `[0, 1]` because 0 and 1 are on the
//! grid), so the sum is on the grid *and* a row's contribution still obeys the bound above:
//! rounding costs no sensitivity (unlike rounding a sum, `accountant::plan`). It costs accuracy,
//! at most γ/2 per row in a `sum`/`sum_sq` coordinate, which the error bound includes
//! ([`ErrorBound`]). Counts are exact. Sums travel as integers in grid units ([`SiteStatistics`]),
//! which is what secure aggregation adds (`protocol::secagg`, `Z_2^64`).
//!
//! # Noise and accounting
//!
//! One release of the whole vector is one query: the Gaussian mechanism of L2 sensitivity Δ,
//! accounted by the project's accountant as one composition ([`plan::StatsPlan`]):
//! * **without secure aggregation** each site releases its own noised vector (each site's
//!   release is (ε, δ)-DP for its rows on its own): noise σ = z·Δ per coordinate, z calibrated by
//!   [`crate::accountant::calibrate_noise`] for one unsampled step (`q = 1`, `T = 1`);
//! * **with secure aggregation** the coordinator sees only the sum of the survivors' vectors:
//!   each site adds the share σ/√m of the total noise σ (m = the fewest survivors a release
//!   needs) and the sum is accounted by the distributed discrete Gaussian
//!   ([`crate::accountant::distributed::DistributedGaussian::for_integer_query`]).
//!
//! The [`dictionary`] turns the noised sum into the data dictionary with an error bound for every
//! figure at a stated confidence.

pub mod dictionary;
pub mod plan;
pub mod reference;

use serde::{Deserialize, Serialize};

pub use dictionary::{ColumnDictionary, DataDictionary, ErrorBound, Quantile};
pub use plan::{StatsAggregation, StatsPlan, StatsPrivacy};

use crate::accountant::distributed::Sensitivity;

/// What is wrong with a statistics query, a row or a sum.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum StatsError {
    #[error("statistics column {column:?}: {reason}")]
    Layout { column: String, reason: String },
    #[error("the statistics layout has no columns")]
    NoColumns,
    #[error("a row has {found} values, the statistics layout has {expected} columns")]
    RowWidth { expected: usize, found: usize },
    #[error("statistics column {column:?}: {reason}")]
    Value { column: String, reason: String },
    #[error("a statistics vector has {found} coordinates, the layout has {expected}")]
    VectorLength { expected: usize, found: usize },
    #[error("statistics: a sum overflowed 64 bits (more rows than the grid allows)")]
    Overflow,
    #[error("statistics privacy: {0}")]
    Accountant(#[from] crate::accountant::AccountantError),
    #[error("statistics noise: {0}")]
    Noise(#[from] crate::noise::NoiseError),
    #[error("statistics privacy: {0}")]
    Privacy(String),
    #[error("not a statistics file: {0}")]
    File(String),
}

/// The most histogram bins a numeric column may have.
pub const MAX_BINS: u32 = 1000;

/// One column of the statistics query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ColumnLayout {
    /// A number (a numeric, ordinal or date column as encoded) with its public range and
    /// histogram bins of equal width over it.
    Numeric {
        name: String,
        low: f64,
        high: f64,
        bins: u32,
    },
    /// One of `categories`; anything else counts as `(other)`.
    Categorical {
        name: String,
        categories: Vec<String>,
    },
}

impl ColumnLayout {
    pub fn name(&self) -> &str {
        match self {
            ColumnLayout::Numeric { name, .. } | ColumnLayout::Categorical { name, .. } => name,
        }
    }

    /// Coordinates of the column in the vector.
    pub fn width(&self) -> usize {
        match self {
            ColumnLayout::Numeric { bins, .. } => 3 + *bins as usize,
            ColumnLayout::Categorical { categories, .. } => categories.len() + 2,
        }
    }

    fn validate(&self) -> Result<(), StatsError> {
        let bad = |reason: String| StatsError::Layout {
            column: self.name().to_string(),
            reason,
        };
        if self.name().is_empty() {
            return Err(bad("the column has no name".into()));
        }
        match self {
            ColumnLayout::Numeric {
                low, high, bins, ..
            } => {
                if !(low.is_finite() && high.is_finite() && low < high) {
                    return Err(bad(format!(
                        "the range [{low}, {high}] must be finite with low < high"
                    )));
                }
                if !(1..=MAX_BINS).contains(bins) {
                    return Err(bad(format!("bins must be in 1..={MAX_BINS}, got {bins}")));
                }
            }
            ColumnLayout::Categorical { categories, .. } => {
                if categories.is_empty() {
                    return Err(bad("no categories".into()));
                }
            }
        }
        Ok(())
    }
}

/// The statistics query: its columns in order. The vector is `rows`, then each column's
/// coordinates ([`ColumnLayout::width`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsLayout {
    pub columns: Vec<ColumnLayout>,
}

/// One cell as the statistics see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatsValue {
    Missing,
    /// A numeric column's value (clipped to the range by the query).
    Number(f64),
    /// A categorical column's category by index, `None` for a value not listed.
    Category(Option<usize>),
}

impl StatsLayout {
    pub fn new(columns: Vec<ColumnLayout>) -> Result<Self, StatsError> {
        let layout = StatsLayout { columns };
        layout.validate()?;
        Ok(layout)
    }

    pub fn validate(&self) -> Result<(), StatsError> {
        if self.columns.is_empty() {
            return Err(StatsError::NoColumns);
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.columns {
            c.validate()?;
            if !seen.insert(c.name()) {
                return Err(StatsError::Layout {
                    column: c.name().to_string(),
                    reason: "listed twice".into(),
                });
            }
        }
        Ok(())
    }

    /// Coordinates of the whole vector.
    pub fn len(&self) -> usize {
        1 + self.columns.iter().map(ColumnLayout::width).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Where each column's coordinates start.
    pub fn offsets(&self) -> Vec<usize> {
        let mut at = 1;
        self.columns
            .iter()
            .map(|c| {
                let start = at;
                at += c.width();
                start
            })
            .collect()
    }

    /// One row's L2 and L1 bounds, in real units (module documentation).
    pub fn sensitivity(&self) -> Sensitivity {
        let numeric = self
            .columns
            .iter()
            .filter(|c| matches!(c, ColumnLayout::Numeric { .. }))
            .count() as f64;
        let categorical = self.columns.len() as f64 - numeric;
        let l1 = 1.0 + 3.0 * numeric + categorical;
        Sensitivity { l2: l1.sqrt(), l1 }
    }
}

/// The bin of `u ∈ [0, 1]` among `bins` equal bins (1 goes in the last).
fn bin_of(u: f64, bins: u32) -> usize {
    ((u * f64::from(bins)).floor() as usize).min(bins as usize - 1)
}

/// One site's sufficient statistics, exact, in grid units (`scale` per unit): the input of the
/// noise ([`StatsPlan::noise_site`]) and of secure aggregation.
#[derive(Debug, Clone)]
pub struct SiteStatistics {
    layout: StatsLayout,
    offsets: Vec<usize>,
    scale: i64,
    sums: Vec<i64>,
    /// Values outside their column's range, per column (for the site's own log only: it is not
    /// part of the released query).
    clipped: Vec<u64>,
}

impl SiteStatistics {
    /// Empty statistics for `layout` on the grid of `scale` steps per unit (the plan's
    /// [`StatsPlan::scale`]).
    pub fn new(layout: &StatsLayout, scale: i64) -> Result<Self, StatsError> {
        layout.validate()?;
        if scale < 1 {
            return Err(StatsError::Privacy(format!(
                "the grid has {scale} steps per unit; at least 1 is needed (less noise, or a \
                 finer grid)"
            )));
        }
        Ok(SiteStatistics {
            offsets: layout.offsets(),
            sums: vec![0; layout.len()],
            clipped: vec![0; layout.columns.len()],
            layout: layout.clone(),
            scale,
        })
    }

    /// Adds one row (one value per column, in the layout's order).
    pub fn add_row(&mut self, row: &[StatsValue]) -> Result<(), StatsError> {
        if row.len() != self.layout.columns.len() {
            return Err(StatsError::RowWidth {
                expected: self.layout.columns.len(),
                found: row.len(),
            });
        }
        // Check the whole row before adding any of it, so a refused row leaves nothing.
        let mut adds: Vec<(usize, i64)> = Vec::with_capacity(1 + 3 * row.len());
        adds.push((0, self.scale));
        let scale = self.scale as f64;
        let on_grid = |v: f64| (v * scale).round() as i64;
        let mut clipped = Vec::new();
        for (i, (column, value)) in self.layout.columns.iter().zip(row).enumerate() {
            let at = self.offsets[i];
            let bad = |reason: &str| StatsError::Value {
                column: column.name().to_string(),
                reason: reason.to_string(),
            };
            match (column, *value) {
                (ColumnLayout::Numeric { .. }, StatsValue::Missing) => adds.push((at, self.scale)),
                (
                    ColumnLayout::Numeric {
                        low, high, bins, ..
                    },
                    StatsValue::Number(x),
                ) => {
                    if !x.is_finite() {
                        return Err(bad("a value is not a finite number"));
                    }
                    if x < *low || x > *high {
                        clipped.push(i);
                    }
                    let u = ((x.clamp(*low, *high) - low) / (high - low)).clamp(0.0, 1.0);
                    adds.push((at + 1, on_grid(u)));
                    adds.push((at + 2, on_grid(u * u)));
                    adds.push((at + 3 + bin_of(u, *bins), self.scale));
                }
                (ColumnLayout::Categorical { categories, .. }, StatsValue::Missing) => {
                    adds.push((at + categories.len() + 1, self.scale));
                }
                (ColumnLayout::Categorical { categories, .. }, StatsValue::Category(c)) => {
                    let bucket = match c {
                        Some(k) if k < categories.len() => k,
                        Some(_) => return Err(bad("a category index past the list")),
                        None => categories.len(),
                    };
                    adds.push((at + bucket, self.scale));
                }
                (ColumnLayout::Numeric { .. }, StatsValue::Category(_)) => {
                    return Err(bad("a category in a numeric column"));
                }
                (ColumnLayout::Categorical { .. }, StatsValue::Number(_)) => {
                    return Err(bad("a number in a categorical column"));
                }
            }
        }
        for (at, v) in adds {
            self.sums[at] = self.sums[at].checked_add(v).ok_or(StatsError::Overflow)?;
        }
        for i in clipped {
            self.clipped[i] += 1;
        }
        Ok(())
    }

    pub fn layout(&self) -> &StatsLayout {
        &self.layout
    }

    /// Grid steps per unit.
    pub fn scale(&self) -> i64 {
        self.scale
    }

    /// Rows added.
    pub fn rows(&self) -> u64 {
        (self.sums[0] / self.scale) as u64
    }

    /// Values clipped to their range, per column (local information: never released).
    pub fn clipped(&self) -> &[u64] {
        &self.clipped
    }

    /// The exact sums (grid units): what the noise is added to. Not for release as they are.
    pub fn exact_sums(&self) -> &[i64] {
        &self.sums
    }

    /// The sums, consumed (to be noised and released, or masked).
    pub fn into_sums(self) -> Vec<i64> {
        self.sums
    }
}

#[cfg(test)]
mod tests;
