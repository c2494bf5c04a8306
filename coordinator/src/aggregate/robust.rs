//! Robust aggregation rules: what one malicious site cannot move far.
//!
//! - **Coordinate-wise median** (Yin et al. 2018): each parameter of the new delta is the median
//!   of the sites' values for it (the mean of the two middle ones for an even count).
//! - **Coordinate-wise trimmed mean** (Yin et al. 2018): each parameter's values are sorted,
//!   ⌊β·n⌋ are dropped at each end, and the rest averaged.
//! - **Multi-Krum** (Blanchard et al. 2017; El Mhamdi et al. 2018): each update is scored by the
//!   sum of its squared L2 distances to its n − f − 2 nearest other updates; the m best-scored
//!   are averaged. Tolerates f Byzantine sites when n ≥ 2f + 3.
//!
//! The rules weigh every site equally: a sample count is a site's own claim, and a robust rule
//! that let one site claim a large weight would not be robust.
//!
//! The functions here work on a *block* of coordinates across all n updates (`block[i]` is site
//! i's values for the same coordinates), so that [`super::buffered`] can stream them from the
//! spools a block at a time. Values are finite (every update passed `FiniteValues`); ties are
//! broken by site order, so the result and the report do not depend on arrival order.

use std::collections::BTreeMap;

use tutela_protocol::job::{AggregationRuleName, AggregationSpec};

use super::AggregateError;

/// A robust rule with its parameters (from the job's `[aggregation]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RobustRule {
    Median,
    /// Drops ⌊β·n⌋ values at each end of every coordinate.
    TrimmedMean {
        beta: f64,
    },
    /// Averages the `m` (default n − f) updates with the best Krum scores.
    MultiKrum {
        f: usize,
        m: Option<usize>,
    },
}

impl RobustRule {
    /// The job's robust rule; `None` for FedAvg (absent table or `rule = "fedavg"`). The spec was
    /// validated at submission; a parameter missing here is reported, not assumed.
    pub fn from_spec(spec: Option<&AggregationSpec>) -> Result<Option<RobustRule>, String> {
        let Some(spec) = spec else {
            return Ok(None);
        };
        Ok(match spec.rule {
            AggregationRuleName::Fedavg => None,
            AggregationRuleName::Median => Some(RobustRule::Median),
            AggregationRuleName::TrimmedMean => Some(RobustRule::TrimmedMean {
                beta: spec
                    .beta
                    .ok_or("aggregation.beta is required with rule = \"trimmed_mean\"")?,
            }),
            AggregationRuleName::MultiKrum => Some(RobustRule::MultiKrum {
                f: spec
                    .f
                    .ok_or("aggregation.f is required with rule = \"multi_krum\"")?
                    as usize,
                m: spec.m.map(|m| m as usize),
            }),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            RobustRule::Median => "median",
            RobustRule::TrimmedMean { .. } => "trimmed_mean",
            RobustRule::MultiKrum { .. } => "multi_krum",
        }
    }

    /// The rule with its parameters, as the round's report shows it.
    pub fn describe(&self) -> String {
        match self {
            RobustRule::Median => "median".to_string(),
            RobustRule::TrimmedMean { beta } => format!("trimmed_mean(beta={beta})"),
            RobustRule::MultiKrum { f, m: Some(m) } => format!("multi_krum(f={f}, m={m})"),
            RobustRule::MultiKrum { f, m: None } => format!("multi_krum(f={f}, m=n-f)"),
        }
    }

    /// The fewest updates with which the rule tolerates the Byzantine sites it is meant to: one
    /// for the median (three values, so that one extreme is never the middle one) and for the
    /// trimmed mean (⌊β·n⌋ ≥ 1: a trimmed mean that trims nothing is the plain mean, which one
    /// site moves at will), f for Multi-Krum (n ≥ 2f + 3, and m + f). `None` when no count
    /// suffices (β = 0 trims nothing at any n).
    pub fn min_count(&self) -> Option<usize> {
        match *self {
            RobustRule::Median => Some(3),
            RobustRule::TrimmedMean { beta } => {
                (3..=MAX_ROUND_SITES).find(|&n| trim_count(beta, n) >= 1)
            }
            RobustRule::MultiKrum { f, m } => Some((2 * f + 3).max(m.map_or(0, |m| m + f))),
        }
    }

    /// Refuses a round of `n` updates the rule cannot combine robustly: with fewer than
    /// [`min_count`](Self::min_count) the result is not robust (a median of two is their mean),
    /// so the round fails, saying so, rather than aggregate as if it were.
    pub fn check_count(&self, n: usize) -> Result<(), AggregateError> {
        let Some(need) = self.min_count() else {
            return Err(AggregateError::NeverRobust {
                rule: self.describe(),
            });
        };
        if n < need {
            return Err(AggregateError::TooFewForRule {
                rule: self.describe(),
                need,
                have: n,
            });
        }
        Ok(())
    }
}

/// What a robust rule did in a round, per site (by name).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RobustReport {
    /// The rule and its parameters, e.g. `trimmed_mean(beta=0.2)`.
    pub rule: String,
    /// Sites whose update was left out entirely (Multi-Krum's unselected), sorted.
    #[serde(default)]
    pub excluded: Vec<String>,
    /// Per site, the fraction of the model's coordinates at which its value was discarded: trimmed
    /// (trimmed mean), the minimum or maximum of the coordinate (median: the values it moves
    /// furthest from), or 1 for an update Multi-Krum left out.
    #[serde(default)]
    pub trimmed: BTreeMap<String, f64>,
    /// Multi-Krum: each site's score (sum of squared distances to its n − f − 2 nearest).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scores: BTreeMap<String, f64>,
}

impl RobustReport {
    /// The site with the largest trimmed fraction (the first by name on a tie), if any was
    /// trimmed at all.
    pub fn most_trimmed(&self) -> Option<(&str, f64)> {
        self.trimmed.iter().filter(|(_, f)| **f > 0.0).fold(
            None,
            |best: Option<(&str, f64)>, (s, f)| match best {
                Some((_, b)) if b >= *f => best,
                _ => Some((s.as_str(), *f)),
            },
        )
    }
}

/// Sorts one coordinate's (value, site) pairs: by value, ties by site.
fn sort_column(column: &mut [(f32, u32)]) {
    column.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
}

/// Fills `column` with coordinate `j` of every update.
fn gather(block: &[&[f32]], j: usize, column: &mut Vec<(f32, u32)>) {
    column.clear();
    column.extend(block.iter().enumerate().map(|(i, v)| (v[j], i as u32)));
}

/// The coordinate-wise median of `block` into `out`; `tally[i]` counts the coordinates at which
/// site i held the minimum or the maximum (with at least three sites: with two, the median is
/// their mean and neither is discarded).
pub fn median_into(block: &[&[f32]], out: &mut [f64], tally: &mut [u64]) {
    let n = block.len();
    let mut column = Vec::with_capacity(n);
    for (j, o) in out.iter_mut().enumerate() {
        gather(block, j, &mut column);
        sort_column(&mut column);
        *o = if n % 2 == 1 {
            f64::from(column[n / 2].0)
        } else {
            (f64::from(column[n / 2 - 1].0) + f64::from(column[n / 2].0)) / 2.0
        };
        if n >= 3 {
            tally[column[0].1 as usize] += 1;
            tally[column[n - 1].1 as usize] += 1;
        }
    }
}

/// The most sites a round is searched for when a rule's smallest robust count is computed.
const MAX_ROUND_SITES: usize = 1 << 20;

/// How many values trimmed mean drops at each end of a coordinate of `n`.
pub fn trim_count(beta: f64, n: usize) -> usize {
    // β < 0.5, so 2k < n: at least one value is kept.
    ((beta * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
}

/// The coordinate-wise β-trimmed mean of `block` into `out`, dropping `k` values at each end;
/// `tally[i]` counts the coordinates at which site i's value was dropped.
pub fn trimmed_mean_into(block: &[&[f32]], k: usize, out: &mut [f64], tally: &mut [u64]) {
    let n = block.len();
    let mut column = Vec::with_capacity(n);
    let kept = (n - 2 * k) as f64;
    for (j, o) in out.iter_mut().enumerate() {
        gather(block, j, &mut column);
        sort_column(&mut column);
        *o = column[k..n - k]
            .iter()
            .map(|(v, _)| f64::from(*v))
            .sum::<f64>()
            / kept;
        for (_, site) in column[..k].iter().chain(&column[n - k..]) {
            tally[*site as usize] += 1;
        }
    }
}

/// Adds the block's contribution to the pairwise squared distances `d2` (n × n, row-major,
/// symmetric).
pub fn add_squared_distances(block: &[&[f32]], d2: &mut [f64]) {
    let n = block.len();
    for i in 0..n {
        for k in i + 1..n {
            let d: f64 = block[i]
                .iter()
                .zip(block[k])
                .map(|(a, b)| {
                    let x = f64::from(*a) - f64::from(*b);
                    x * x
                })
                .sum();
            d2[i * n + k] += d;
            d2[k * n + i] += d;
        }
    }
}

/// Multi-Krum's selection from the pairwise squared distances: the indices of the `m` updates
/// (default n − f) with the lowest scores, in site order, and every update's score.
pub fn krum_select(
    d2: &[f64],
    n: usize,
    f: usize,
    m: Option<usize>,
) -> Result<(Vec<usize>, Vec<f64>), AggregateError> {
    let rule = RobustRule::MultiKrum { f, m };
    rule.check_count(n)?;
    let neighbours = n - f - 2;
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|&k| k != i).map(|k| d2[i * n + k]).collect();
            row.sort_unstable_by(f64::total_cmp);
            row[..neighbours].iter().sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut selected = order[..m.unwrap_or(n - f)].to_vec();
    selected.sort_unstable();
    Ok((selected, scores))
}

/// The plain mean of the selected updates' values into `out`.
pub fn mean_of_into(block: &[&[f32]], selected: &[usize], out: &mut [f64]) {
    let count = selected.len() as f64;
    for (j, o) in out.iter_mut().enumerate() {
        *o = selected
            .iter()
            .map(|&i| f64::from(block[i][j]))
            .sum::<f64>()
            / count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(rows: &[Vec<f32>]) -> Vec<&[f32]> {
        rows.iter().map(|r| r.as_slice()).collect()
    }

    /// The median by definition: sort a copy, take the middle (or the mean of the two middles).
    fn direct_median(values: &[f32]) -> f64 {
        let mut v: Vec<f64> = values.iter().map(|x| f64::from(*x)).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    fn direct_trimmed(values: &[f32], beta: f64) -> f64 {
        let mut v: Vec<f64> = values.iter().map(|x| f64::from(*x)).collect();
        v.sort_by(f64::total_cmp);
        let k = (beta * v.len() as f64).floor() as usize;
        let kept = &v[k..v.len() - k];
        kept.iter().sum::<f64>() / kept.len() as f64
    }

    /// A deterministic spread of values with repeats (ties) in it.
    fn sample(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                (0..d)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Eleven levels: many ties among a handful of sites.
                        ((x % 11) as f32 - 5.0) * 0.25
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn median_matches_the_definition_for_odd_and_even_counts_with_ties() {
        for n in 1..=8 {
            let rows = sample(n, 257, n as u64);
            let mut out = vec![0.0; 257];
            let mut tally = vec![0; n];
            median_into(&refs(&rows), &mut out, &mut tally);
            for j in 0..257 {
                let column: Vec<f32> = rows.iter().map(|r| r[j]).collect();
                assert_eq!(out[j], direct_median(&column), "n={n} j={j}");
            }
            // Two extremes a coordinate from three sites on.
            let expected = if n >= 3 { 2 * 257 } else { 0 };
            assert_eq!(tally.iter().sum::<u64>(), expected, "n={n}");
        }
        // Even count: the mean of the two middle values, not either.
        let rows = vec![vec![1.0f32], vec![4.0], vec![2.0], vec![100.0]];
        let mut out = [0.0];
        median_into(&refs(&rows), &mut out, &mut [0; 4]);
        assert_eq!(out[0], 3.0);
    }

    #[test]
    fn trimmed_mean_matches_the_definition_and_tallies_what_it_drops() {
        for (n, beta) in [(5, 0.2), (5, 0.0), (6, 0.2), (7, 0.3), (10, 0.1), (4, 0.49)] {
            let rows = sample(n, 129, 31 + n as u64);
            let k = trim_count(beta, n);
            let mut out = vec![0.0; 129];
            let mut tally = vec![0; n];
            trimmed_mean_into(&refs(&rows), k, &mut out, &mut tally);
            for j in 0..129 {
                let column: Vec<f32> = rows.iter().map(|r| r[j]).collect();
                let want = direct_trimmed(&column, beta);
                assert!(
                    (out[j] - want).abs() <= 1e-12,
                    "n={n} β={beta} j={j}: {} vs {want}",
                    out[j]
                );
            }
            assert_eq!(tally.iter().sum::<u64>(), (2 * k * 129) as u64);
        }
        // β = 0 is the plain mean; ties at the trimmed edge drop the later site.
        let rows = vec![vec![5.0f32], vec![5.0], vec![1.0], vec![3.0], vec![5.0]];
        let mut out = [0.0];
        let mut tally = [0; 5];
        trimmed_mean_into(&refs(&rows), 1, &mut out, &mut tally);
        assert_eq!(out[0], (3.0 + 5.0 + 5.0) / 3.0);
        assert_eq!(tally, [0, 0, 1, 0, 1]);
    }

    #[test]
    fn a_sign_flipped_or_scaled_site_does_not_move_median_or_trimmed_mean_far() {
        let honest = [0.9f32, 1.0, 1.1, 1.05];
        for attack in [-1.0f32, -100.0, 100.0, 1e30] {
            let mut rows: Vec<Vec<f32>> = honest.iter().map(|v| vec![*v]).collect();
            rows.push(vec![attack]);
            let mut out = [0.0];
            let mut tally = [0; 5];
            median_into(&refs(&rows), &mut out, &mut tally);
            assert!((0.9..=1.1).contains(&out[0]), "{attack}: {}", out[0]);
            assert_eq!(tally[4], 1, "the attacker is an extreme");
            trimmed_mean_into(&refs(&rows), 1, &mut out, &mut tally);
            assert!((0.9..=1.1).contains(&out[0]), "{attack}: {}", out[0]);
        }
    }

    #[test]
    fn multi_krum_scores_match_the_definition_and_leave_out_the_outlier() {
        // Five sites in 3-D, the last far away; f = 1: each score sums the 5 − 1 − 2 = 2 nearest.
        let rows = vec![
            vec![0.0f32, 0.0, 0.0],
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 2.0],
            vec![-50.0, -50.0, -50.0],
        ];
        let n = rows.len();
        let mut d2 = vec![0.0; n * n];
        // Two blocks, as the spools deliver them: the distances add up.
        let first: Vec<Vec<f32>> = rows.iter().map(|r| r[..2].to_vec()).collect();
        let second: Vec<Vec<f32>> = rows.iter().map(|r| r[2..].to_vec()).collect();
        add_squared_distances(&refs(&first), &mut d2);
        add_squared_distances(&refs(&second), &mut d2);
        let dist = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
        };
        for i in 0..n {
            for k in 0..n {
                if i != k {
                    assert_eq!(d2[i * n + k], dist(&rows[i], &rows[k]));
                }
            }
        }
        let (selected, scores) = krum_select(&d2, n, 1, None).unwrap();
        for i in 0..n {
            let mut row: Vec<f64> = (0..n)
                .filter(|&k| k != i)
                .map(|k| dist(&rows[i], &rows[k]))
                .collect();
            row.sort_by(f64::total_cmp);
            assert_eq!(scores[i], row[0] + row[1], "site {i}");
        }
        assert_eq!(selected, vec![0, 1, 2, 3], "m = n − f leaves out the worst");
        let (best, _) = krum_select(&d2, n, 1, Some(1)).unwrap();
        assert_eq!(best, vec![0], "Krum: the single best-scored update");
        let mut out = vec![0.0; 3];
        mean_of_into(&refs(&rows), &selected, &mut out);
        assert_eq!(out, vec![0.25, 0.25, 0.5]);
    }

    #[test]
    fn multi_krum_breaks_ties_by_site_and_refuses_too_few_updates() {
        let rows = vec![vec![0.0f32]; 5];
        let mut d2 = vec![0.0; 25];
        add_squared_distances(&refs(&rows), &mut d2);
        let (selected, _) = krum_select(&d2, 5, 1, Some(2)).unwrap();
        assert_eq!(selected, vec![0, 1]);
        match krum_select(&d2[..16], 4, 1, None) {
            Err(AggregateError::TooFewForRule {
                need: 5, have: 4, ..
            }) => {}
            other => panic!("expected too few, got {other:?}"),
        }
        assert!(
            RobustRule::MultiKrum { f: 1, m: Some(4) }
                .check_count(4)
                .is_err()
        );
        // Fewer than three: a median of one or two is their mean, which one site moves at will.
        assert!(RobustRule::Median.check_count(2).is_err());
        assert!(RobustRule::Median.check_count(3).is_ok());
        // ⌊0.2·4⌋ = 0 trims nothing (the plain mean); ⌊0.2·5⌋ = 1 trims one at each end.
        let trimmed = RobustRule::TrimmedMean { beta: 0.2 };
        assert_eq!(trimmed.min_count(), Some(5));
        assert!(trimmed.check_count(4).is_err());
        assert!(trimmed.check_count(5).is_ok());
        assert_eq!(RobustRule::TrimmedMean { beta: 0.0 }.min_count(), None);
        assert!(
            RobustRule::TrimmedMean { beta: 0.0 }
                .check_count(100)
                .is_err()
        );
    }

    #[test]
    fn the_most_trimmed_site_is_reported() {
        let r = RobustReport {
            rule: "median".into(),
            excluded: vec![],
            trimmed: [
                ("a".to_string(), 0.1),
                ("b".to_string(), 0.9),
                ("c".to_string(), 0.9),
            ]
            .into(),
            scores: BTreeMap::new(),
        };
        assert_eq!(r.most_trimmed(), Some(("b", 0.9)));
        assert_eq!(RobustReport::default().most_trimmed(), None);
    }
}
