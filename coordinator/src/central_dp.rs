//! Central differential privacy at the coordinator: DP-FedAvg (McMahan, Ramage, Talwar & Zhang,
//! "Learning differentially private recurrent language models", ICLR 2018), with adaptive
//! clipping as an option (Andrew, Thakkar, McMahan & Ramaswamy, "Differentially private learning
//! with adaptive clipping", NeurIPS 2021). The guarantee is *site-level* (user-level): adding or
//! removing one site's whole contribution changes the released models by a bounded amount.
//!
//! Per round, with `m` participating sites and clipping norm `C`:
//! 1. each site's update `Δ_k` is scaled to `Δ_k · min(1, C / ‖Δ_k‖)` ([`clip_factor`]);
//! 2. the clipped updates are summed with weight 1 each (a sample-count weight would let one large
//!    site move the sum by more than C);
//! 3. noise `N(0, (z·C)²)` per coordinate is added to the sum ([`CentralDp::noise_sum`]), drawn
//!    from the exact discrete Gaussian on a grid with ChaCha20 keyed from the OS, after rounding
//!    the sum to that grid (see `tutela_privacy::noise`), in float64;
//! 4. the mean is the noised sum over `m` — post-processing of the released sum.
//!
//! # Clipping a streamed update
//!
//! The aggregator folds an update as its chunks arrive, and an update's norm is only known after
//! its last chunk. The clean way to clip is the aggregator's spool: it already holds exactly what
//! was folded (for exact undo); at commit, with the norm known, reading the spool back once more
//! and subtracting `(1 − c)·x` leaves `c·x` folded — a second pass over disk, never a second copy
//! in memory, and exact in the aggregator's fixed-point integers up to one rounding per value.
//! (Buffering each update until its norm is known would hold one model per upload in flight, which
//! the streaming design exists to avoid.) [`clip_factor`] is the factor to apply.
//!
//! # Accounting
//!
//! The coordinator samples a fixed number of sites per round, which is not Poisson sampling, so
//! no amplification is claimed: each round is the full Gaussian mechanism (`q = 1`) with noise
//! multiplier `z` (the effective one, after the grid's sensitivity correction and, with adaptive
//! clipping, after charging the noised count: `z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2)` inverts Andrew et
//! al.'s Theorem 1, i.e. the update noise and the count noise together are accounted as one
//! Gaussian mechanism of multiplier `z` when `z_Δ` is used for the updates). [`CentralDp::epsilon`]
//! composes the rounds run so far with the RDP accountant.

use std::num::NonZeroUsize;

use tutela_privacy::accountant::plan::{effective_noise_multiplier, grid_for};
use tutela_privacy::accountant::{self, Accountant, SampledGaussian};
use tutela_privacy::noise::{NoiseError, SecureGaussian, SecureRng};
use tutela_protocol::job::CentralDpSpec;

/// Why central DP cannot be set up or applied.
#[derive(Debug, thiserror::Error)]
pub enum CentralDpError {
    #[error("central DP: {0}")]
    Noise(#[from] NoiseError),
    #[error("central DP accounting: {0}")]
    Accountant(#[from] tutela_privacy::accountant::AccountantError),
    #[error(
        "central DP: count_noise_multiplier σ_b = {sigma_b} is too small for noise multiplier \
         z = {z}: adaptive clipping needs 2σ_b > z (Andrew et al. 2021, Theorem 1)"
    )]
    CountNoiseTooSmall { sigma_b: f64, z: f64 },
    #[error("central DP: {0}")]
    Spec(String),
}

/// `min(1, C / norm)`: the factor that scales an update of L2 norm `norm` to at most `C`.
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if norm > clip { clip / norm } else { 1.0 }
}

/// Central DP's clip as an update filter: each update is aggregated at `min(1, C / ‖Δ‖)` of
/// itself, the factor known once its norm is (the aggregation applies it: the streaming sum
/// re-folds the update from its spool, the buffered one scales it as it reads it back). It does
/// not look at the values, so the streaming sum keeps its fast path.
#[derive(Clone, Copy, Debug)]
pub struct ClipToNorm {
    pub clip: f64,
}

impl crate::aggregate::UpdateFilter for ClipToNorm {
    fn name(&self) -> &str {
        "central-dp-clip"
    }

    fn start(
        &self,
        _: &crate::aggregate::UpdateInfo<'_>,
    ) -> Result<Box<dyn crate::aggregate::FilterPass>, crate::aggregate::Refusal> {
        Ok(Box::new(*self))
    }

    fn reads_values(&self) -> bool {
        false
    }
}

impl crate::aggregate::FilterPass for ClipToNorm {
    fn values(
        &mut self,
        _: &crate::aggregate::ValuesAt<'_>,
        _: &mut [f32],
    ) -> Result<(), crate::aggregate::Refusal> {
        Ok(())
    }

    fn fold_factor(&mut self, l2_norm: f64) -> f64 {
        clip_factor(l2_norm, self.clip)
    }
}

/// The adaptive clipping state (Andrew et al. 2021, Algorithm 1, geometric update).
#[derive(Debug)]
struct Adaptive {
    target_quantile: f64,
    learning_rate: f64,
    count_noise: SecureGaussian,
}

/// A job's central DP: the clipping norm, the noise, the adaptive clipping state and the
/// site-level accountant.
#[derive(Debug)]
pub struct CentralDp {
    clip: f64,
    /// z, the multiplier the accountant is told (before the grid correction).
    noise_multiplier: f64,
    /// z_Δ, the multiplier of the update noise actually drawn.
    update_noise_multiplier: f64,
    adaptive: Option<Adaptive>,
    delta: f64,
    rounds: u64,
    /// The effective multipliers of the rounds run, for composition.
    spent: Vec<f64>,
    rng_for_tests: Option<[u8; 32]>,
    dimension: usize,
}

impl CentralDp {
    /// From the job's `[privacy.central]`, with `noise_multiplier` z (given, or calibrated by
    /// the caller with [`CentralDp::calibrate`]) and the model's parameter count `dimension`.
    pub fn new(
        spec: &CentralDpSpec,
        noise_multiplier: f64,
        delta: f64,
        dimension: usize,
    ) -> Result<Self, CentralDpError> {
        let (update_noise_multiplier, adaptive) = if spec.adaptive {
            let sb2 = (2.0 * spec.count_noise_multiplier).powi(-2);
            let inv = noise_multiplier.powi(-2) - sb2;
            if inv <= 0.0 {
                return Err(CentralDpError::CountNoiseTooSmall {
                    sigma_b: spec.count_noise_multiplier,
                    z: noise_multiplier,
                });
            }
            let count_noise = spec.count_noise_multiplier;
            (
                inv.powf(-0.5),
                Some(Adaptive {
                    target_quantile: spec.target_quantile,
                    learning_rate: spec.clip_learning_rate,
                    count_noise: SecureGaussian::new(count_noise, grid_for(count_noise))?,
                }),
            )
        } else {
            (noise_multiplier, None)
        };
        Ok(CentralDp {
            clip: spec.clip_norm,
            noise_multiplier,
            update_noise_multiplier,
            adaptive,
            delta,
            rounds: 0,
            spent: Vec::new(),
            rng_for_tests: None,
            dimension,
        })
    }

    /// The smallest z that keeps `rounds` rounds within `target_epsilon` at `delta`
    /// (site-level, no sampling amplification).
    pub fn calibrate(target_epsilon: f64, rounds: u64, delta: f64) -> Result<f64, CentralDpError> {
        Ok(
            accountant::calibrate_noise(target_epsilon, 1.0, rounds, delta, Accountant::Rdp, 1e-4)?
                .noise_multiplier,
        )
    }

    /// Seeds the noise (tests only: a known seed gives no privacy).
    #[doc(hidden)]
    pub fn insecure_seed_for_tests(&mut self, seed: [u8; 32]) {
        self.rng_for_tests = Some(seed);
    }

    /// The current clipping norm C.
    pub fn clip(&self) -> f64 {
        self.clip
    }

    /// Rounds the sum of clipped updates to the noise grid and adds `N_ℤ(0, (z_Δ·C)²)` per
    /// coordinate, in float64; the result is the round's released sum. Charges the round.
    pub fn noise_sum(&mut self, sum: &mut [f64]) -> Result<(), CentralDpError> {
        let sigma = self.update_noise_multiplier * self.clip;
        let g = grid_for(sigma);
        let mut noise = match self.rng_for_tests {
            Some(seed) => SecureGaussian::with_rng(sigma, g, SecureRng::insecure_from_seed(seed))?,
            None => SecureGaussian::new(sigma, g)?,
        };
        let mut draws = vec![0f32; sum.len()];
        noise.fill_parallel(
            &mut draws,
            std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        );
        for (s, n) in sum.iter_mut().zip(&draws) {
            // Exact: g is a power of two and both terms are multiples of it.
            *s = (*s / g).round() * g + f64::from(*n);
        }
        let eff = effective_noise_multiplier(self.noise_multiplier, self.clip, g, self.dimension);
        self.spent.push(eff);
        self.rounds += 1;
        Ok(())
    }

    /// Adaptive clipping's update after a round in which `unclipped` of `sites` updates had norm
    /// ≤ C: the fraction is noised (σ_b), then `C ← C · exp(−η (b̃ − γ))`.
    /// Returns the new C. Without adaptive clipping C stays.
    pub fn end_round(&mut self, unclipped: usize, sites: usize) -> f64 {
        if let Some(a) = &mut self.adaptive
            && sites > 0
        {
            let noised =
                unclipped as f64 + a.count_noise.sample_grid() as f64 * a.count_noise.granularity();
            let fraction = noised / sites as f64;
            self.clip *= (-a.learning_rate * (fraction - a.target_quantile)).exp();
        }
        self.clip
    }

    /// Site-level ε after the rounds run so far (0 before any).
    pub fn epsilon(&self) -> Result<f64, CentralDpError> {
        if self.spent.is_empty() {
            return Ok(0.0);
        }
        let groups = self
            .spent
            .iter()
            .map(|&z| SampledGaussian::new(1.0, z, 1))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(accountant::epsilon(&groups, self.delta, Accountant::Rdp)?.epsilon)
    }

    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// ε of the last round alone (0 before any).
    pub fn round_epsilon(&self) -> Result<f64, CentralDpError> {
        let Some(&z) = self.spent.last() else {
            return Ok(0.0);
        };
        let one = SampledGaussian::new(1.0, z, 1)?;
        Ok(accountant::epsilon(&[one], self.delta, Accountant::Rdp)?.epsilon)
    }

    /// Charges `rounds` rounds released before this value existed (a coordinator that resumes
    /// a job), each at the current C's effective multiplier.
    pub fn charge_completed_rounds(&mut self, rounds: u64) {
        let sigma = self.update_noise_multiplier * self.clip;
        let eff = effective_noise_multiplier(
            self.noise_multiplier,
            self.clip,
            grid_for(sigma),
            self.dimension,
        );
        for _ in 0..rounds {
            self.spent.push(eff);
        }
        self.rounds += rounds;
    }

    /// Steps 3–4 for a finished round of the aggregation (with unit weights and the
    /// [`ClipToNorm`] filter at `self.clip()`, so every accepted update was folded with weight 1
    /// and clipped to C): the mean becomes `(Σ clipped + noise) / m`, the
    /// round is charged, adaptive clipping updates C, and the round's figures are returned.
    pub fn release_round(
        &mut self,
        result: &mut crate::aggregate::RoundResult,
    ) -> Result<CentralDpRound, CentralDpError> {
        let sites = result.accepted.len();
        let m = result.total_weight;
        let clip = self.clip;
        // The released quantity is the sum; the mean is computed from it afterwards.
        let mut sum: Vec<f64> = result.mean_delta.iter().flatten().map(|v| v * m).collect();
        self.noise_sum(&mut sum)?;
        let mut values = sum.into_iter();
        for tensor in &mut result.mean_delta {
            for (v, s) in tensor.iter_mut().zip(values.by_ref()) {
                *v = s / m;
            }
        }
        let unclipped = result
            .accepted
            .iter()
            .filter(|a| a.clip_factor >= 1.0)
            .count();
        let next_clip = self.end_round(unclipped, sites);
        Ok(CentralDpRound {
            clip,
            next_clip,
            noise_multiplier: self.noise_multiplier,
            sites,
            unclipped,
            round_epsilon: self.round_epsilon()?,
            job_epsilon: self.epsilon()?,
            delta: self.delta,
            clip_factors: result
                .accepted
                .iter()
                .map(|a| (a.site.clone(), a.clip_factor))
                .collect(),
        })
    }
}

/// Central DP's noise is the release step of its rounds' aggregation: the sum of the clipped
/// updates is noised (and the accountant charged) before the strategy or anyone else sees it.
impl crate::aggregate::plan::ReleaseStep for CentralDp {
    fn name(&self) -> &str {
        "central-dp-noise"
    }

    fn release(
        &mut self,
        result: &mut crate::aggregate::RoundResult,
        report: &mut crate::aggregate::plan::RoundReport,
    ) -> Result<(), String> {
        let round = self.release_round(result).map_err(|e| e.to_string())?;
        report.central_dp = Some(round);
        Ok(())
    }
}

/// What one round of central DP did and spent: the coordinator stores it with the round.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CentralDpRound {
    /// C this round's updates were clipped to.
    pub clip: f64,
    /// C for the next round (differs from `clip` only with adaptive clipping).
    pub next_clip: f64,
    /// z: the update noise's standard deviation over C as the accountant counts it.
    pub noise_multiplier: f64,
    pub sites: usize,
    /// Updates whose norm was at most C.
    pub unclipped: usize,
    /// Site-level ε of this round alone, and of the job's rounds so far, at `delta`.
    pub round_epsilon: f64,
    pub job_epsilon: f64,
    pub delta: f64,
    /// Each accepted site's clip factor `min(1, C / ‖Δ‖)`.
    pub clip_factors: std::collections::BTreeMap<String, f64>,
}

/// The key of the round record's `site_metrics` map under which the coordinator stores the
/// round's [`CentralDpRound`] (not a site name: site names have no spaces or parentheses).
pub const ROUND_RECORD_KEY: &str = "(central DP)";

/// The job's central DP from its spec, or `None` when the job is not in `central` mode.
/// `dimension` is the model's parameter count (for the grid's sensitivity correction).
pub fn for_job(
    spec: &tutela_protocol::job::JobSpec,
    dimension: usize,
) -> Result<Option<CentralDp>, CentralDpError> {
    let Some(privacy) = spec.dp() else {
        return Ok(None);
    };
    if privacy.mode != tutela_protocol::job::PrivacyMode::Central {
        return Ok(None);
    }
    let Some(central) = &privacy.central else {
        return Err(CentralDpError::Spec(
            "privacy.mode = \"central\" needs a [privacy.central] table".into(),
        ));
    };
    let z = match (central.noise_multiplier, privacy.target_epsilon) {
        (Some(z), _) => z,
        (None, Some(eps)) => CentralDp::calibrate(eps, u64::from(spec.rounds), privacy.delta)?,
        (None, None) => {
            return Err(CentralDpError::Spec(
                "privacy.central.noise_multiplier or privacy.target_epsilon must be set".into(),
            ));
        }
    };
    CentralDp::new(central, z, privacy.delta, dimension).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(adaptive: bool) -> CentralDpSpec {
        CentralDpSpec {
            clip_norm: 2.0,
            noise_multiplier: None,
            adaptive,
            target_quantile: 0.5,
            clip_learning_rate: 0.2,
            count_noise_multiplier: 10.0,
        }
    }

    #[test]
    fn clipping_bounds_the_norm_and_leaves_small_updates_alone() {
        let u = [3.0f64, 4.0];
        let norm = 5.0;
        let c = clip_factor(norm, 1.0);
        let clipped: f64 = u.iter().map(|x| (x * c).powi(2)).sum::<f64>().sqrt();
        assert!((clipped - 1.0).abs() < 1e-12);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(0.0, 1.0), 1.0);
    }

    #[test]
    fn the_noise_has_variance_z_c_squared_and_rounds_are_charged() {
        let mut dp = CentralDp::new(&spec(false), 1.5, 1e-5, 100_000).unwrap();
        dp.insecure_seed_for_tests([4; 32]);
        let mut sum = vec![0.0f64; 200_000];
        dp.noise_sum(&mut sum).unwrap();
        let var = sum.iter().map(|x| x * x).sum::<f64>() / sum.len() as f64;
        let want = (1.5f64 * 2.0).powi(2);
        assert!(
            (var / want - 1.0).abs() < 5.0 * (2.0 / sum.len() as f64).sqrt(),
            "{var}"
        );
        let one = dp.epsilon().unwrap();
        dp.noise_sum(&mut sum).unwrap();
        let two = dp.epsilon().unwrap();
        assert!(two > one && two < 2.0 * one, "{one} {two}");
        assert_eq!(dp.rounds(), 2);
    }

    #[test]
    fn calibration_meets_the_target_over_the_rounds() {
        let z = CentralDp::calibrate(3.0, 10, 1e-5).unwrap();
        let mut dp = CentralDp::new(&spec(false), z * 1.01, 1e-5, 10).unwrap();
        let mut sum = vec![0.0; 10];
        for _ in 0..10 {
            dp.noise_sum(&mut sum).unwrap();
        }
        let eps = dp.epsilon().unwrap();
        assert!(eps <= 3.0, "{eps}");
    }

    #[test]
    fn adaptive_clipping_moves_c_towards_the_quantile() {
        let mut dp = CentralDp::new(&spec(true), 1.0, 1e-5, 10).unwrap();
        let c0 = dp.clip();
        // All 1000 updates unclipped: C is too large and shrinks.
        let c1 = dp.end_round(1000, 1000);
        assert!(c1 < c0, "{c0} -> {c1}");
        // None unclipped: C grows.
        let c2 = dp.end_round(0, 1000);
        assert!(c2 > c1);
        // The update noise is larger than z to pay for the count.
        assert!(dp.update_noise_multiplier > 1.0);
        assert!(CentralDp::new(&spec(true), 30.0, 1e-5, 10).is_err());
    }
}
