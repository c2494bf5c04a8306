//! `[watermark]`: the job's final model is watermarked before it is published
//! (`crate::watermark`). Which scheme and how strongly are settings of the job, inside the
//! digest the officers sign; the key is the consortium's, held by the coordinator (a file its
//! configuration names), never in a job spec.

use serde::{Deserialize, Serialize};

use super::SpecError;
use crate::watermark::Strength;

/// The `[watermark]` table of a job spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSpec {
    #[serde(default)]
    pub scheme: WatermarkScheme,
    /// The detection z-score the published model should reach (its p-value bound is
    /// `exp(−z²/2)`), in [7, 100]: the embedder sets the amplitude to `target_z / √N` for `N`
    /// marked values, up to `max_amplitude`.
    #[serde(default = "default_target_z")]
    pub target_z: f64,
    /// The largest amplitude, relative to each tensor's standard deviation, in (0, 0.5].
    /// Unset: the default of the model the job publishes, 0.25, or 0.05 for a LoRA job's
    /// adapters (`crate::watermark::default_strength`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_amplitude: Option<f64>,
}

/// The schemes a job may ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatermarkScheme {
    /// Keyed spread spectrum over every floating tensor, white-box detection
    /// (`crate::watermark`).
    #[default]
    SpreadSpectrumV1,
}

impl WatermarkScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            WatermarkScheme::SpreadSpectrumV1 => crate::watermark::SCHEME,
        }
    }
}

fn default_target_z() -> f64 {
    crate::watermark::DEFAULT_STRENGTH.target_z
}

impl WatermarkSpec {
    pub(super) fn validate(&self) -> Result<(), SpecError> {
        if !(self.target_z.is_finite() && (7.0..=100.0).contains(&self.target_z)) {
            return Err(SpecError::invalid(
                "watermark.target_z",
                format!(
                    "must be in [7, 100] (z = 6.44 is p = 1e-9 before any attack), got {}",
                    self.target_z
                ),
            ));
        }
        if let Some(max_amplitude) = self.max_amplitude
            && !(max_amplitude.is_finite() && max_amplitude > 0.0 && max_amplitude <= 0.5)
        {
            return Err(SpecError::invalid(
                "watermark.max_amplitude",
                format!(
                    "must be in (0, 0.5] (a fraction of each tensor's standard deviation), got {}",
                    max_amplitude
                ),
            ));
        }
        Ok(())
    }

    /// The strength to embed with; `adapters` says whether the job publishes LoRA adapters
    /// (it has `[lora]`), whose default cap is lower.
    pub fn strength(&self, adapters: bool) -> Strength {
        Strength {
            target_z: self.target_z,
            max_amplitude: self
                .max_amplitude
                .unwrap_or(crate::watermark::default_strength(adapters).max_amplitude),
        }
    }
}
