//! The pooled statistics a data dictionary's bounds are about, computed exactly (in `f64`) from
//! all the rows in one place, and the check that a dictionary is within its bounds of them. For
//! tests and for validating a federation against a pooled copy where one legally exists; a
//! federation itself never has the pooled rows.

use super::{ColumnDictionary, ColumnLayout, DataDictionary, StatsLayout, StatsValue};

/// Exact statistics of one column over the pooled rows (numeric values clipped to the range).
#[derive(Debug, Clone, PartialEq)]
pub enum PooledColumn {
    Numeric {
        present: u64,
        missing: u64,
        mean: f64,
        /// Population standard deviation.
        std: f64,
        /// The clipped present values, sorted (for the quantile checks).
        sorted: Vec<f64>,
    },
    Categorical {
        counts: Vec<u64>,
        other: u64,
        missing: u64,
    },
}

/// Exact pooled statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    pub rows: u64,
    pub columns: Vec<PooledColumn>,
}

impl Pooled {
    /// From every row of every site (values in the layout's column order; a row of the wrong
    /// width or kind is skipped, as [`super::SiteStatistics::add_row`] refuses it).
    pub fn of_rows<'a>(
        layout: &StatsLayout,
        rows: impl IntoIterator<Item = &'a [StatsValue]>,
    ) -> Self {
        let n = layout.columns.len();
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut missing = vec![0u64; n];
        let mut counts: Vec<Vec<u64>> = layout
            .columns
            .iter()
            .map(|c| match c {
                ColumnLayout::Categorical { categories, .. } => vec![0; categories.len() + 1],
                ColumnLayout::Numeric { .. } => Vec::new(),
            })
            .collect();
        let mut total = 0;
        for row in rows {
            if row.len() != n {
                continue;
            }
            total += 1;
            for (i, (column, value)) in layout.columns.iter().zip(row).enumerate() {
                match (column, value) {
                    (_, StatsValue::Missing) => missing[i] += 1,
                    (ColumnLayout::Numeric { low, high, .. }, StatsValue::Number(x)) => {
                        values[i].push(x.clamp(*low, *high));
                    }
                    (ColumnLayout::Categorical { categories, .. }, StatsValue::Category(c)) => {
                        let k = c
                            .filter(|&k| k < categories.len())
                            .unwrap_or(categories.len());
                        counts[i][k] += 1;
                    }
                    _ => {}
                }
            }
        }
        let columns = layout
            .columns
            .iter()
            .enumerate()
            .map(|(i, column)| match column {
                ColumnLayout::Numeric { .. } => {
                    let mut sorted = std::mem::take(&mut values[i]);
                    sorted.sort_by(f64::total_cmp);
                    let c = sorted.len() as f64;
                    let mean = sorted.iter().sum::<f64>() / c;
                    let var = sorted.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / c;
                    PooledColumn::Numeric {
                        present: sorted.len() as u64,
                        missing: missing[i],
                        mean,
                        std: var.sqrt(),
                        sorted,
                    }
                }
                ColumnLayout::Categorical { categories, .. } => {
                    let k = categories.len();
                    PooledColumn::Categorical {
                        other: counts[i][k],
                        counts: counts[i][..k].to_vec(),
                        missing: missing[i],
                    }
                }
            })
            .collect();
        Pooled {
            rows: total,
            columns,
        }
    }
}

fn within(what: String, federated: f64, pooled: f64, bound: f64, out: &mut Vec<String>) {
    // 1e-9 relative: the pooled side's own floating-point sums.
    if (federated - pooled).abs() > bound + 1e-9 * pooled.abs().max(1.0) {
        out.push(format!(
            "{what}: federated {federated}, pooled {pooled}, differ by {} > bound {bound}",
            (federated - pooled).abs()
        ));
    }
}

impl DataDictionary {
    /// Every figure of the dictionary that is farther from the pooled one than its bound allows
    /// (empty when all are within), each named.
    pub fn violations(&self, pooled: &Pooled) -> Vec<String> {
        let mut out = Vec::new();
        within(
            "rows".into(),
            self.rows,
            pooled.rows as f64,
            self.rows_bound,
            &mut out,
        );
        for (column, exact) in self.columns.iter().zip(&pooled.columns) {
            let name = column.name();
            match (column, exact) {
                (
                    ColumnDictionary::Numeric {
                        present,
                        present_bound,
                        missing,
                        missing_bound,
                        mean,
                        mean_bound,
                        std,
                        std_bound,
                        quantiles,
                        high,
                        ..
                    },
                    PooledColumn::Numeric {
                        present: p,
                        missing: m,
                        mean: pm,
                        std: ps,
                        sorted,
                    },
                ) => {
                    within(
                        format!("{name} present"),
                        *present,
                        *p as f64,
                        *present_bound,
                        &mut out,
                    );
                    within(
                        format!("{name} missing"),
                        *missing,
                        *m as f64,
                        *missing_bound,
                        &mut out,
                    );
                    if *p > 0 {
                        within(format!("{name} mean"), *mean, *pm, *mean_bound, &mut out);
                        within(format!("{name} std"), *std, *ps, *std_bound, &mut out);
                    }
                    let c = sorted.len() as f64;
                    for q in quantiles {
                        if c == 0.0 {
                            break;
                        }
                        let below_low = sorted.partition_point(|&x| x < q.bin_low) as f64 / c;
                        let below_high = if q.bin_high >= *high {
                            1.0
                        } else {
                            sorted.partition_point(|&x| x < q.bin_high) as f64 / c
                        };
                        if below_low > q.p + q.rank_bound + 1e-12
                            || below_high < q.p - q.rank_bound - 1e-12
                        {
                            out.push(format!(
                                "{name} quantile {}: value {} in [{}, {}); pooled fraction below \
                                 is {below_low}, up to its end {below_high}; rank bound {}",
                                q.p, q.value, q.bin_low, q.bin_high, q.rank_bound
                            ));
                        }
                    }
                }
                (
                    ColumnDictionary::Categorical {
                        categories,
                        counts,
                        other,
                        missing,
                        count_bound,
                        ..
                    },
                    PooledColumn::Categorical {
                        counts: pc,
                        other: po,
                        missing: pm,
                    },
                ) => {
                    for ((cat, f), p) in categories.iter().zip(counts).zip(pc) {
                        within(
                            format!("{name}={cat}"),
                            *f,
                            *p as f64,
                            *count_bound,
                            &mut out,
                        );
                    }
                    within(
                        format!("{name} other"),
                        *other,
                        *po as f64,
                        *count_bound,
                        &mut out,
                    );
                    within(
                        format!("{name} missing"),
                        *missing,
                        *pm as f64,
                        *count_bound,
                        &mut out,
                    );
                }
                _ => out.push(format!("{name}: the pooled column is of another kind")),
            }
        }
        out
    }
}
