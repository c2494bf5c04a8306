//! The data dictionary from a noised sum of sites' statistics, every figure with the bound its
//! noise and rounding allow at a stated confidence.
//!
//! # The bound
//!
//! Each coordinate of the sum carries the noise of the sites in it: independent discrete
//! Gaussians, each σ²-subgaussian (Canonne, Kamath & Steinke 2020, Corollary 9), so their sum is
//! `s² = Σσ_i²`-subgaussian and `P(|N| > t) ≤ 2·exp(−t²/2s²)`; a sum of `j` coordinates' noise
//! is `j·s²`-subgaussian. The events bounded are the `d` coordinates and, per numeric column, the
//! `B` cumulative sums of its histogram (`E` events in all): with probability at least `1 − β`
//! every coordinate is within `t = s·z` of the exact sum and the cumulative count through bin `b`
//! within `s·z·√(b + 1)`, `z = √(2·ln(2E/β))` (a union bound). Add the rounding of each row to the grid (at most γ/2 per row in a `sum` or
//! `sum_sq` coordinate; counts are exact). Every derived figure's bound follows by interval
//! arithmetic from the coordinates' intervals, so **all** of them hold together at confidence
//! `1 − β`:
//! * counts (rows, present and missing values, category counts): `t` (present: `2t`, it is
//!   rows − missing);
//! * a mean `S/c`: the interval of `S/c` over `S ± b_S`, `c ± 2t`, within the range;
//! * a standard deviation: the interval of `√(Q/c − (S/c)²)`, likewise;
//! * a quantile, read from the histogram (the first bin whose noised cumulative count reaches
//!   `p` of the noised total, then linear within it): every cumulative count and the total are
//!   within `t_B = s·z·√B`, so the pooled fraction of values below the chosen bin is under
//!   `p + r` and the fraction up to its end at least `p − r`, with `r = (1 + p)·t_B / c_min`
//!   ([`Quantile::rank_bound`]).
//!
//! The pooled figures the bound is about are those of the **clipped** values (module
//! documentation of [`super`]): a value outside its column's range counts as the range's end.

use serde::{Deserialize, Serialize};

use super::{ColumnLayout, StatsError, StatsLayout, StatsPlan};

/// The quantiles a numeric column reports.
pub const QUANTILES: [f64; 5] = [0.05, 0.25, 0.5, 0.75, 0.95];

/// How far each coordinate of the sum may be from the exact one, at a confidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ErrorBound {
    /// 1 − β: the probability that every bound of the dictionary holds.
    pub confidence: f64,
    /// The noise's standard deviation in each coordinate of the sum.
    pub noise_sd: f64,
    /// t: every coordinate's noise is within it (at the confidence).
    pub coordinate: f64,
    /// z: the bound in standard deviations (`t = noise_sd · z`; a histogram's cumulative count
    /// through `j` bins is within `noise_sd · z · √j`).
    pub z: f64,
    /// At most this much rounding per row in a `sum` or `sum_sq` coordinate (γ/2).
    pub rounding_per_row: f64,
}

impl ErrorBound {
    /// The bound for a sum of `sites` sites' vectors under `plan` and `layout`.
    pub fn new(
        plan: &StatsPlan,
        layout: &StatsLayout,
        sites: usize,
        confidence: f64,
    ) -> Result<Self, StatsError> {
        if !(confidence > 0.0 && confidence < 1.0) {
            return Err(StatsError::Privacy(format!(
                "the confidence of a bound must be in (0, 1), got {confidence}"
            )));
        }
        let noise_sd = plan.sum_noise(sites);
        let beta = 1.0 - confidence;
        let cumulative: usize = layout
            .columns
            .iter()
            .map(|c| match c {
                ColumnLayout::Numeric { bins, .. } => *bins as usize,
                ColumnLayout::Categorical { .. } => 0,
            })
            .sum();
        let events = (plan.dimension + cumulative) as f64;
        let z = (2.0 * (2.0 * events / beta).ln()).sqrt();
        Ok(ErrorBound {
            confidence,
            noise_sd,
            coordinate: noise_sd * z,
            z,
            rounding_per_row: plan.granularity / 2.0,
        })
    }
}

/// A quantile read from the noised histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantile {
    pub p: f64,
    pub value: f64,
    /// The histogram bin the value is in, `[bin_low, bin_high)`.
    pub bin_low: f64,
    pub bin_high: f64,
    /// r: the pooled fraction of present values below `bin_low` is under `p + r`, the fraction
    /// below `bin_high` (up to `high` for the last bin) at least `p − r`.
    pub rank_bound: f64,
}

/// One column's entry. Counts are noised (not integers); each `*_bound` holds at the
/// dictionary's confidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ColumnDictionary {
    Numeric {
        name: String,
        low: f64,
        high: f64,
        present: f64,
        present_bound: f64,
        missing: f64,
        missing_bound: f64,
        mean: f64,
        mean_bound: f64,
        std: f64,
        std_bound: f64,
        quantiles: Vec<Quantile>,
        /// Noised counts of the equal-width bins over `[low, high]`.
        histogram: Vec<f64>,
    },
    Categorical {
        name: String,
        categories: Vec<String>,
        /// Noised count per category, in `categories` order.
        counts: Vec<f64>,
        /// Values that are none of the categories.
        other: f64,
        missing: f64,
        /// Each count's bound.
        count_bound: f64,
    },
}

impl ColumnDictionary {
    pub fn name(&self) -> &str {
        match self {
            ColumnDictionary::Numeric { name, .. } | ColumnDictionary::Categorical { name, .. } => {
                name
            }
        }
    }
}

/// The consortium's data dictionary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataDictionary {
    /// Rows in all the summed sites (noised) and its bound.
    pub rows: f64,
    pub rows_bound: f64,
    /// Sites whose statistics are in the sum.
    pub sites: usize,
    /// ε spent at each site by the release, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    pub bound: ErrorBound,
    pub columns: Vec<ColumnDictionary>,
}

/// `[lo, hi]` ∩ `[0, ∞)`, as a pair.
fn nonneg(v: f64, b: f64) -> (f64, f64) {
    ((v - b).max(0.0), (v + b).max(0.0))
}

impl DataDictionary {
    /// The dictionary of `sums` (grid units), the sum of `sites` sites' noised statistics under
    /// `plan` and `layout`, with bounds at `confidence`.
    pub fn from_sum(
        layout: &StatsLayout,
        plan: &StatsPlan,
        sums: &[i64],
        sites: usize,
        confidence: f64,
    ) -> Result<Self, StatsError> {
        layout.validate()?;
        if sums.len() != layout.len() {
            return Err(StatsError::VectorLength {
                expected: layout.len(),
                found: sums.len(),
            });
        }
        let bound = ErrorBound::new(plan, layout, sites, confidence)?;
        let scale = plan.scale() as f64;
        let at = |i: usize| sums[i] as f64 / scale;
        let t = bound.coordinate;
        let rows = at(0);
        // The most rows the sum can hold, for the rounding's share of the bound.
        let rows_max = (rows + t).max(0.0);
        let rounding = t + rows_max * bound.rounding_per_row;
        let mut columns = Vec::with_capacity(layout.columns.len());
        for (column, start) in layout.columns.iter().zip(layout.offsets()) {
            columns.push(match column {
                ColumnLayout::Numeric {
                    name,
                    low,
                    high,
                    bins,
                } => {
                    let width = high - low;
                    let missing = at(start);
                    let present = rows - missing;
                    let (c_lo, c_hi) = nonneg(present, 2.0 * t);
                    let (s, q) = (at(start + 1).max(0.0), at(start + 2).max(0.0));
                    let (s_lo, s_hi) = nonneg(s, rounding);
                    let (q_lo, q_hi) = nonneg(q, rounding);
                    let histogram: Vec<f64> =
                        (0..*bins as usize).map(|b| at(start + 3 + b)).collect();
                    let (mean_u, mean_bound_u, std_u, std_bound_u) = if present > 0.0 && c_lo > 0.0
                    {
                        let m = (s / present).clamp(0.0, 1.0);
                        let (m_lo, m_hi) = ((s_lo / c_hi).min(1.0), (s_hi / c_lo).min(1.0));
                        let v = (q / present - m * m).clamp(0.0, 0.25);
                        let v_lo = (q_lo / c_hi - m_hi * m_hi).clamp(0.0, 0.25);
                        let v_hi = (q_hi / c_lo - m_lo * m_lo).clamp(0.0, 0.25);
                        let sd = v.sqrt();
                        (
                            m,
                            (m - m_lo).max(m_hi - m),
                            sd,
                            (sd - v_lo.sqrt()).max(v_hi.sqrt() - sd),
                        )
                    } else {
                        // Too few values to say anything: the whole range.
                        let m = if present > 0.0 {
                            (s / present).clamp(0.0, 1.0)
                        } else {
                            0.5
                        };
                        (m, m.max(1.0 - m), 0.0, 0.5)
                    };
                    let t_cumulative = bound.noise_sd * bound.z * f64::from(*bins).sqrt();
                    let quantiles = quantiles(&histogram, *low, *high, t_cumulative, c_lo);
                    ColumnDictionary::Numeric {
                        name: name.clone(),
                        low: *low,
                        high: *high,
                        present,
                        present_bound: 2.0 * t,
                        missing,
                        missing_bound: t,
                        mean: low + width * mean_u,
                        mean_bound: width * mean_bound_u,
                        std: width * std_u,
                        std_bound: width * std_bound_u,
                        quantiles,
                        histogram,
                    }
                }
                ColumnLayout::Categorical { name, categories } => {
                    let k = categories.len();
                    ColumnDictionary::Categorical {
                        name: name.clone(),
                        categories: categories.clone(),
                        counts: (0..k).map(|i| at(start + i)).collect(),
                        other: at(start + k),
                        missing: at(start + k + 1),
                        count_bound: t,
                    }
                }
            });
        }
        Ok(DataDictionary {
            rows,
            rows_bound: t,
            sites,
            epsilon: plan.epsilon_with(sites)?,
            delta: plan.delta,
            bound,
            columns,
        })
    }

    /// The dictionary as a statistics file (TOML): what the coordinator writes and a schema's
    /// `[standardize] statistics` names, by this text's SHA-256.
    pub fn to_file_text(&self) -> Result<String, StatsError> {
        let body = toml::to_string(self).map_err(|e| StatsError::File(e.to_string()))?;
        Ok(format!(
            "# Consortium statistics (tutela): a data dictionary computed across sites under \
             differential privacy.\n# Every figure is noised; each *_bound holds at the stated \
             confidence (docs/schema.md).\n{body}"
        ))
    }

    /// A statistics file's dictionary.
    pub fn from_file_text(text: &str) -> Result<Self, StatsError> {
        toml::from_str(text).map_err(|e| StatsError::File(e.to_string()))
    }

    pub fn column(&self, name: &str) -> Option<&ColumnDictionary> {
        self.columns.iter().find(|c| c.name() == name)
    }
}

/// [`QUANTILES`] from a noised histogram over `[low, high]`; `t_cumulative` bounds the noise of
/// every cumulative count and of the total (module documentation).
fn quantiles(
    histogram: &[f64],
    low: f64,
    high: f64,
    t_cumulative: f64,
    c_lo: f64,
) -> Vec<Quantile> {
    let bins = histogram.len();
    let width = (high - low) / bins as f64;
    let total: f64 = histogram.iter().sum();
    QUANTILES
        .iter()
        .map(|&p| {
            let rank_bound = if c_lo > 0.0 {
                ((1.0 + p) * t_cumulative / c_lo).min(1.0)
            } else {
                1.0
            };
            // The first bin whose noised cumulative count reaches p of the noised total (the
            // bound's argument needs exactly this choice, not a monotone repair of the counts).
            let target = p * total;
            let mut below = 0.0;
            let mut bin = bins - 1;
            for (b, h) in histogram.iter().enumerate() {
                if below + h >= target {
                    bin = b;
                    break;
                }
                below += h;
            }
            let h = histogram[bin];
            let within = if h > 0.0 {
                ((target - below) / h).clamp(0.0, 1.0)
            } else {
                0.5
            };
            let bin_low = low + width * bin as f64;
            Quantile {
                p,
                value: bin_low + width * within,
                bin_low,
                bin_high: if bin + 1 == bins {
                    high
                } else {
                    bin_low + width
                },
                rank_bound,
            }
        })
        .collect()
}
