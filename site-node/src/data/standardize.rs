//! Per-feature standardisation with the consortium's or a site's own statistics.

use serde::{Deserialize, Serialize};

use super::{DataError, Table};

/// Per-feature standardisation `(x − mean) / std`.
///
/// Kept a separate, explicit step: a site may fit it on its own training rows, or the
/// coordinator may send consortium-wide statistics ([`Standardizer::new`]), and the same
/// statistics must then be applied to validation and test rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Below this a feature counts as constant; its std is taken as 1 so that it maps to 0
    /// rather than to infinity (MNIST's border pixels are always 0).
    pub const MIN_STD: f64 = 1e-8;

    /// Statistics supplied from outside; checked for matching lengths, finite means and
    /// positive finite standard deviations.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Self, DataError> {
        let bad = |reason: String| Err(DataError::Standardizer { reason });
        if mean.len() != std.len() {
            return bad(format!("{} means but {} stds", mean.len(), std.len()));
        }
        if let Some(i) = mean.iter().position(|m| !m.is_finite()) {
            return bad(format!("mean of feature {i} is {}", mean[i]));
        }
        if let Some(i) = std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!(
                "std of feature {i} is {}, it must be positive",
                std[i]
            ));
        }
        Ok(Standardizer { mean, std })
    }

    /// The population mean and standard deviation of each feature, computed in f64.
    pub fn fit(table: &Table) -> Result<Self, DataError> {
        table.check()?;
        if table.is_empty() {
            return Err(DataError::Standardizer {
                reason: "cannot fit on an empty table".into(),
            });
        }
        let n = table.n_rows as f64;
        let mut sum = vec![0f64; table.n_features];
        for row in table.features.chunks_exact(table.n_features) {
            for (s, &x) in sum.iter_mut().zip(row) {
                *s += f64::from(x);
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let mut squares = vec![0f64; table.n_features];
        for row in table.features.chunks_exact(table.n_features) {
            for ((s, &x), m) in squares.iter_mut().zip(row).zip(&mean) {
                *s += (f64::from(x) - m).powi(2);
            }
        }
        let std = squares
            .iter()
            .map(|s| {
                let std = (s / n).sqrt();
                if std < Self::MIN_STD { 1.0 } else { std as f32 }
            })
            .collect();
        Self::new(mean.iter().map(|&m| m as f32).collect(), std)
    }

    pub fn n_features(&self) -> usize {
        self.mean.len()
    }

    /// Standardises the table's features in place.
    pub fn apply(&self, table: &mut Table) -> Result<(), DataError> {
        table.check()?;
        if table.n_features != self.n_features() {
            return Err(DataError::Standardizer {
                reason: format!(
                    "fitted on {} features, the table has {}",
                    self.n_features(),
                    table.n_features
                ),
            });
        }
        if table.n_features == 0 {
            return Ok(());
        }
        for row in table.features.chunks_exact_mut(self.n_features()) {
            for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
                *x = (*x - m) / s;
            }
        }
        Ok(())
    }

    /// A standardised copy of the table.
    pub fn applied(&self, table: &Table) -> Result<Table, DataError> {
        let mut copy = table.clone();
        self.apply(&mut copy)?;
        Ok(copy)
    }
}
