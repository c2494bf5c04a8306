//! `[secure_aggregation]` in the job spec: the settings every site and the coordinator must
//! share, inside the digest the officers sign (the grid a site rounds to is part of what they
//! approve: it bounds the rounding error and, with distributed DP, the sensitivity).
//!
//! Documented key by key in `deploy/jobs/breast_cancer_secagg.toml`.

use serde::{Deserialize, Serialize};

use super::encode::{CONTRIBUTION_LIMIT, DEFAULT_ROUNDING_BETA, EncodeParams};
use super::{
    MAX_SITES, RoundConfig, SecAggError, default_degree, derive_graph_seed, threshold_for,
};
use crate::job::SpecError;

/// `[secure_aggregation]`: present means the round is a SecAgg+ round (the coordinator sees only
/// the sum of the sites' masked, quantized updates).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationSpec {
    /// The integer grid: a site clips its update to `update_norm_bound` and rounds each value to
    /// a multiple of `2^-scale_bits`. `update_norm_bound · 2^scale_bits` must be at most `2^50`.
    pub scale_bits: u32,
    /// Neighbours per site in the communication graph (even, or every other site). Absent: the
    /// smallest even number at least `3 · log2(n)` for the round's `n` sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<u32>,
    /// The fraction of a site's neighbours whose shares recover its seeds: `t = ⌊f · k⌋ + 1`.
    /// Higher tolerates more colluding neighbours and fewer dropouts. In `[0.5, 1)`: at least
    /// half, so that `2t > k` (see [`RoundConfig::threshold`]).
    #[serde(default = "default_share_threshold")]
    pub share_threshold: f64,
    /// β of the sites' conditional randomized rounding (Kairouz et al. 2021), in (0, 1).
    #[serde(default = "default_rounding_beta")]
    pub rounding_beta: f64,
}

fn default_share_threshold() -> f64 {
    0.5
}

fn default_rounding_beta() -> f64 {
    DEFAULT_ROUNDING_BETA
}

impl SecureAggregationSpec {
    /// Checks the ranges, against the job's update norm bound; errors name the key.
    pub fn validate(&self, update_norm_bound: f64) -> Result<(), SpecError> {
        if self.scale_bits > 62
            || !(update_norm_bound * 2f64.powi(self.scale_bits.min(62) as i32)
                <= CONTRIBUTION_LIMIT)
        {
            return Err(SpecError::invalid(
                "secure_aggregation.scale_bits",
                format!(
                    "makes update_norm_bound × 2^scale_bits = {update_norm_bound} × 2^{} exceed \
                     2^50 grid steps (the sum of the sites' values must stay exact in 64 bits): \
                     lower it",
                    self.scale_bits
                ),
            ));
        }
        if let Some(k) = self.neighbours
            && !(2..MAX_SITES).contains(&k)
        {
            return Err(SpecError::invalid(
                "secure_aggregation.neighbours",
                format!(
                    "must be in 2..={} (a round has at most {MAX_SITES} sites), got {k}",
                    MAX_SITES - 1
                ),
            ));
        }
        // t = ⌊f·k⌋ + 1 > f·k ≥ k/2 for f ≥ 0.5: the 2t > k that RoundConfig::validate requires,
        // whatever the degree. Below 0.5 a server could unmask a site with one consistent list.
        if !(self.share_threshold >= 0.5 && self.share_threshold < 1.0) {
            return Err(SpecError::invalid(
                "secure_aggregation.share_threshold",
                format!(
                    "must be in [0.5, 1) (more than half of a site's neighbours must be needed to \
                     recover its masks), got {}",
                    self.share_threshold
                ),
            ));
        }
        if !(self.rounding_beta > 0.0 && self.rounding_beta < 1.0) {
            return Err(SpecError::invalid(
                "secure_aggregation.rounding_beta",
                format!("must be in (0, 1), got {}", self.rounding_beta),
            ));
        }
        Ok(())
    }

    /// The degree for `sites` participants: the spec's (rounded up to even, at most `n − 1`) or
    /// the default.
    pub fn degree(&self, sites: u32) -> u32 {
        match self.neighbours {
            None => default_degree(sites),
            // checked: k = u32::MAX in a spec that skipped validate must not wrap to 0.
            Some(k) if k.checked_add(1).is_none_or(|k1| k1 >= sites) => sites.saturating_sub(1),
            Some(k) => k + (k % 2),
        }
    }

    /// The configuration of attempt `attempt` of round `round` for `sites` participants: degree
    /// and threshold from the spec, the graph seed [`derive_graph_seed`]`(job digest, round,
    /// attempt)`. `min_sites` is the job's: the round fails below it or below `t`.
    pub fn round_config(
        &self,
        job_digest: [u8; 32],
        round: u32,
        attempt: u32,
        sites: u32,
        min_sites: u32,
        vector_len: u64,
    ) -> RoundConfig {
        let degree = self.degree(sites);
        let threshold = threshold_for(degree, self.share_threshold);
        RoundConfig {
            job_digest,
            round,
            sites,
            degree,
            threshold,
            min_survivors: min_sites.max(threshold).min(sites),
            graph_seed: derive_graph_seed(&job_digest, round, attempt),
            vector_len,
        }
    }

    /// A site's check of the configuration the coordinator sends for attempt `attempt`: valid,
    /// and exactly what [`Self::round_config`] gives from this spec, so the coordinator chose
    /// neither the degree, the threshold nor the graph. The error names the first field that
    /// differs.
    pub fn check_offered(
        &self,
        offered: &RoundConfig,
        attempt: u32,
        min_sites: u32,
    ) -> Result<(), SecAggError> {
        offered.validate()?;
        let expected = self.round_config(
            offered.job_digest,
            offered.round,
            attempt,
            offered.sites,
            min_sites,
            offered.vector_len,
        );
        let differs = [
            ("degree", offered.degree != expected.degree),
            ("threshold", offered.threshold != expected.threshold),
            (
                "min_survivors",
                offered.min_survivors != expected.min_survivors,
            ),
            ("graph_seed", offered.graph_seed != expected.graph_seed),
        ];
        match differs.iter().find(|(_, d)| *d) {
            None => Ok(()),
            Some((field, _)) => Err(SecAggError::Config(format!(
                "the coordinator's {field} for round {} attempt {attempt} is not the one the job \
                 spec gives (degree {}, threshold {}, min_survivors {}, graph seed from job \
                 digest, round and attempt)",
                offered.round, expected.degree, expected.threshold, expected.min_survivors
            ))),
        }
    }

    /// How a site encodes its update: clipped to the job's `update_norm_bound`, on this grid, with
    /// `noise_sigma_grid` (σ_site in grid steps, from the distributed accountant) or no noise.
    pub fn encode_params(
        &self,
        update_norm_bound: f64,
        noise_sigma_grid: Option<f64>,
    ) -> EncodeParams {
        EncodeParams {
            clip_norm: update_norm_bound,
            scale_bits: self.scale_bits,
            rounding_beta: self.rounding_beta,
            noise_sigma_grid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SecureAggregationSpec {
        toml::from_str("scale_bits = 20").unwrap()
    }

    #[test]
    fn defaults_and_derived_round_parameters() {
        let s = spec();
        assert_eq!(s.share_threshold, 0.5);
        assert!(s.validate(10.0).is_ok());
        let c = s.round_config([0; 32], 1, 0, 100, 3, 1000);
        assert_eq!((c.degree, c.threshold, c.min_survivors), (20, 11, 11));
        assert!(c.validate().is_ok());
        let c = s.round_config([0; 32], 1, 0, 10, 8, 1000);
        assert_eq!((c.degree, c.threshold, c.min_survivors), (9, 5, 8));
        assert!(c.validate().is_ok());
        let mut odd = s.clone();
        odd.neighbours = Some(7);
        assert_eq!(odd.degree(100), 8);
        assert_eq!(odd.degree(5), 4);
        // No overflow at the top of the range: every other site.
        let mut huge = s.clone();
        huge.neighbours = Some(u32::MAX);
        assert_eq!(huge.degree(100), 99);
        assert_eq!(
            huge.validate(1.0).unwrap_err().key(),
            Some("secure_aggregation.neighbours")
        );
        // More participants than a round may have: the derived config is refused.
        let c = s.round_config([0; 32], 1, 0, 200_000, 3, 10);
        assert!(
            matches!(c.validate(), Err(super::super::SecAggError::Config(m)) if m.contains("sites"))
        );
    }

    #[test]
    fn the_graph_seed_is_derived_and_a_site_refuses_any_other() {
        let s = spec();
        let c = s.round_config([3; 32], 7, 2, 40, 5, 100);
        assert_eq!(c.graph_seed, derive_graph_seed(&[3; 32], 7, 2));
        assert!(s.check_offered(&c, 2, 5).is_ok());
        // Each of job, round and attempt changes the seed.
        for other in [
            derive_graph_seed(&[4; 32], 7, 2),
            derive_graph_seed(&[3; 32], 8, 2),
            derive_graph_seed(&[3; 32], 7, 3),
        ] {
            assert_ne!(other, c.graph_seed);
        }
        // A ground seed, or the seed of another attempt: refused, naming the field.
        let mut ground = c.clone();
        ground.graph_seed[0] ^= 1;
        let err = s.check_offered(&ground, 2, 5).unwrap_err();
        assert!(err.to_string().contains("graph_seed"), "{err}");
        assert!(
            s.check_offered(&c, 3, 5)
                .unwrap_err()
                .to_string()
                .contains("graph_seed")
        );
        // A lower threshold than the spec's (still valid on its own): refused.
        let mut strict = s.clone();
        strict.share_threshold = 0.75;
        let mut low = strict.round_config([3; 32], 7, 2, 40, 5, 100);
        assert!(strict.check_offered(&low, 2, 5).is_ok());
        low.threshold = low.degree / 2 + 1;
        low.min_survivors = low.threshold;
        assert!(low.validate().is_ok());
        let err = strict.check_offered(&low, 2, 5).unwrap_err();
        assert!(err.to_string().contains("threshold"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let s = spec();
        let mut fine = s.clone();
        fine.scale_bits = 45;
        assert!(fine.validate(32.0).is_ok());
        let err = fine.validate(33.0).unwrap_err();
        assert_eq!(err.key(), Some("secure_aggregation.scale_bits"));
        let mut half = s.clone();
        half.share_threshold = 0.5;
        for sites in 2..200 {
            let k = half.degree(sites);
            let c = half.round_config([0; 32], 1, 0, sites, 2, 10);
            assert!(2 * c.threshold > k && c.validate().is_ok(), "{sites} sites");
        }
        let mut t = s.clone();
        t.share_threshold = 0.3;
        assert_eq!(
            t.validate(1.0).unwrap_err().key(),
            Some("secure_aggregation.share_threshold")
        );
        t.share_threshold = 1.0;
        assert_eq!(
            t.validate(1.0).unwrap_err().key(),
            Some("secure_aggregation.share_threshold")
        );
        assert!(toml::from_str::<SecureAggregationSpec>("scale_bits = 20\nneighbors = 4").is_err());
    }

    const EXAMPLE: &str = include_str!("../../../deploy/jobs/breast_cancer_secagg.toml");

    fn with(key: &str, value: toml::Value) -> Result<crate::job::JobSpec, SpecError> {
        let mut doc: toml::Table = toml::from_str(EXAMPLE).unwrap();
        let table = doc
            .get_mut("secure_aggregation")
            .and_then(toml::Value::as_table_mut)
            .unwrap();
        table.insert(key.into(), value);
        crate::job::JobSpec::from_toml_str(&toml::to_string(&doc).unwrap())
    }

    #[test]
    fn the_shipped_example_parses_and_every_documented_range_is_enforced() {
        use toml::Value::{Float, Integer};
        let job = crate::job::JobSpec::from_toml_str(EXAMPLE).unwrap();
        let sa = job.secure_aggregation.clone().unwrap();
        assert_eq!(sa.scale_bits, 20);
        assert_eq!(sa.rounding_beta, DEFAULT_ROUNDING_BETA);
        for (key, value) in [
            ("scale_bits", Integer(47)),
            ("neighbours", Integer(1)),
            ("neighbours", Integer(2048)),
            ("share_threshold", Float(0.0)),
            ("share_threshold", Float(0.49)),
            ("share_threshold", Float(1.0)),
            ("rounding_beta", Float(0.0)),
            ("rounding_beta", Float(1.0)),
        ] {
            let err = with(key, value.clone()).unwrap_err();
            assert_eq!(
                err.key(),
                Some(format!("secure_aggregation.{key}").as_str()),
                "{key} = {value}: {err}"
            );
        }
        // Inside the digest: the grid changes it, and so does turning secure aggregation off.
        let finer = with("scale_bits", Integer(21)).unwrap();
        assert_ne!(finer.digest(), job.digest());
        let mut off = job.clone();
        off.secure_aggregation = None;
        assert_ne!(off.digest(), job.digest());
        // A misspelt key is an error, not a silently ignored setting.
        assert!(with("neighbors", Integer(4)).is_err());
    }
}
