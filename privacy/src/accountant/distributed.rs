//! Accounting for distributed DP over secure aggregation: the distributed discrete Gaussian
//! (Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
//! Learning with Secure Aggregation", ICML; "KLS21" below).
//!
//! The mechanism. Each site scales its contribution x (L2 norm ≤ C after clipping) to the job's
//! grid, x/γ, rounds it to integers by conditional randomized rounding (each coordinate up or
//! down at random, unbiased; resampled until the rounded vector's norm is at most the bound
//! below), adds discrete Gaussian noise N_ℤ(0, σ_s²) to every coordinate, and masks the result
//! in ℤ_{2^b}. The coordinator learns only the sum over the k sites that survive the round, modulo
//! 2^b. All quantities below are in grid units (C/γ, σ_s/γ) unless a name says otherwise.
//!
//! * **Sensitivity after rounding** ([`rounded_sensitivity`], KLS21 Theorem 1 and Prop. 22):
//!   with c = C/γ and d coordinates, the rounded vector's norm is at most
//!   Δ₂ = min(c + √d, √(c² + d/4 + √(2·ln(1/β))·(c + √d/2))), the second with probability ≥ 1 − β
//!   per draw (conditional rounding redraws until it holds, so it always holds on what is sent;
//!   β = 0 keeps only the first, deterministic bound). Integer vectors also have
//!   Δ₁ ≤ Δ₂·min(√d, Δ₂).
//! * **The sum of discrete Gaussians** (KLS21 Theorem 1 / Prop. 14): the sum of k independent
//!   N_ℤ(0, σ_s²) is not a discrete Gaussian, but for σ_s ≥ ½ it is close to one of variance
//!   kσ_s²: with τ = 10·Σ_{j=1}^{k−1} exp(−2π²σ_s²·j/(j+1)) ([`tau`]) one round is RDP with
//!   ε(α) = min{ α/2·s₂² + τd, α/2·(s₂² + 2s₁τ + τ²d), α/2·(s₂ + τ√d)² },
//!   s₂ = Δ₂/(√k·σ_s), s₁ = Δ₁/(√k·σ_s) ([`DistributedGaussian::round_rdp`]). For k = 1, τ = 0
//!   and this is the discrete Gaussian's α·Δ₂²/(2σ_s²), the continuous Gaussian's value.
//! * **Sampling** (a contribution takes part in a round with probability q): the general bound
//!   for Poisson subsampling of Zhu & Wang 2019 ("Poisson Subsampled Rényi Differential Privacy",
//!   Theorem 5) at integer orders α ≥ 2:
//!   ε_q(α) ≤ 1/(α−1)·log[(1−q)^{α−1}(αq − q + 1) + C(α,2)q²(1−q)^{α−2}e^{ε(2)} +
//!   3·Σ_{l=3}^{α} C(α,l)q^l(1−q)^{α−l}e^{(l−1)ε(l)}], taken no larger than ε(α).
//!   T rounds add their RDP; the (ε, δ) conversion is our RDP one (Balle et al. 2020) on
//!   [`orders`].
//! * **Survivors.** The noise in the sum is that of the sites that survive, kσ_s². A job fixes
//!   the minimum number m of survivors a release needs, and each site adds the share
//!   σ_s = σ/√m ([`site_noise_share`]) so that m survivors carry the job's total noise σ; more
//!   survivors carry more. The coordinator releases a round only if its survivors reach m and the
//!   job's ε at that number of survivors is within the planned one
//!   ([`DistributedPlan::check_release`]); each site's ledger charges the ε of the rounds as
//!   they happened, with their survivors ([`DistributedPlan::epsilon_spent`]).
//! * **Wrap-around.** Reduction modulo 2^b is a function of the integer sum, so it costs no ε
//!   (post-processing); it only corrupts the model when a coordinate of the sum leaves
//!   [−2^{b−1}, 2^{b−1}). Each coordinate of the signal is at most nΔ₂ in size (n sites at most),
//!   and the noise, a sum of discrete Gaussians each σ_s²-subgaussian (Canonne, Kamath & Steinke
//!   2020, Cor. 9), has P(|N| ≥ t) ≤ 2·exp(−t²/(2nσ_s²)); over d coordinates,
//!   P(wrap) ≤ 2d·exp(−(2^{b−1} − 1 − nΔ₂)²/(2nσ_s²)) ([`DistributedGaussian::wrap_probability`]),
//!   and [`DistributedGaussian::modulus_bits`] is the smallest b that keeps it below a bound.

use super::rdp::{Conversion, RdpCurve};
use super::{
    Accountant, AccountantError, Guarantee, SampledGaussian, validate_delta, validate_sample_rate,
};

/// The RDP orders of the distributed accountant: integers (Zhu & Wang's bound holds there).
pub fn orders() -> Vec<f64> {
    (2..=64)
        .map(f64::from)
        .chain([80.0, 96.0, 128.0, 192.0, 256.0])
        .collect()
}

/// L2 and L1 sensitivity of one site's rounded contribution, in grid units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensitivity {
    pub l2: f64,
    pub l1: f64,
}

/// The sensitivity after conditional randomized rounding of a vector of L2 norm ≤ `clip_in_grid`
/// with `dimension` coordinates (module documentation; KLS21 Theorem 1).
pub fn rounded_sensitivity(
    clip_in_grid: f64,
    dimension: usize,
    beta: f64,
) -> Result<Sensitivity, AccountantError> {
    if !(clip_in_grid > 0.0 && clip_in_grid.is_finite()) {
        return Err(AccountantError::Clip(clip_in_grid));
    }
    if dimension == 0 {
        return Err(AccountantError::Dimension);
    }
    if !(0.0..1.0).contains(&beta) {
        return Err(AccountantError::Beta(beta));
    }
    let (c, d) = (clip_in_grid, dimension as f64);
    let deterministic = c + d.sqrt();
    let l2 = if beta == 0.0 {
        deterministic
    } else {
        let conditional =
            (c * c + 0.25 * d + (2.0 * (1.0 / beta).ln()).sqrt() * (c + 0.5 * d.sqrt())).sqrt();
        deterministic.min(conditional)
    };
    Ok(Sensitivity {
        l2,
        l1: l2 * d.sqrt().min(l2),
    })
}

/// KLS21's τ for the sum of `summands` discrete Gaussians of standard deviation `site_noise`
/// (grid units): 10·Σ_{j=1}^{k−1} exp(−2π²σ²·j/(j+1)); 0 for a single one.
pub fn tau(site_noise: f64, summands: usize) -> f64 {
    let s2 = site_noise * site_noise;
    let pi2 = std::f64::consts::PI * std::f64::consts::PI;
    10.0 * (1..summands)
        .map(|j| {
            let j = j as f64;
            (-2.0 * pi2 * s2 * j / (j + 1.0)).exp()
        })
        .sum::<f64>()
}

/// σ_s = σ/√m: each site's share of the job's total noise standard deviation `total_noise`, so
/// that `min_survivors` surviving sites carry all of it.
pub fn site_noise_share(total_noise: f64, min_survivors: usize) -> Result<f64, AccountantError> {
    if !(total_noise > 0.0 && total_noise.is_finite()) {
        return Err(AccountantError::NoiseMultiplier(total_noise));
    }
    if min_survivors == 0 {
        return Err(AccountantError::Sites {
            expected: 0,
            minimum: 0,
        });
    }
    Ok(total_noise / (min_survivors as f64).sqrt())
}

/// One job's distributed discrete Gaussian: what each site does to its contribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedGaussian {
    clip: f64,
    granularity: f64,
    dimension: usize,
    beta: f64,
    site_noise: f64,
    sensitivity: Sensitivity,
}

impl DistributedGaussian {
    /// `clip`: the L2 bound C on a site's contribution; `granularity`: the grid step γ (the
    /// job's scale is 1/γ); `dimension`: coordinates d; `beta`: conditional rounding's β in
    /// [0, 1); `site_noise`: each site's noise standard deviation σ_s (the same units as `clip`),
    /// at least γ/2.
    pub fn new(
        clip: f64,
        granularity: f64,
        dimension: usize,
        beta: f64,
        site_noise: f64,
    ) -> Result<Self, AccountantError> {
        if !(granularity > 0.0 && granularity.is_finite()) {
            return Err(AccountantError::Granularity(granularity));
        }
        if !(clip > 0.0 && clip.is_finite()) {
            return Err(AccountantError::Clip(clip));
        }
        if !(site_noise.is_finite() && site_noise / granularity >= 0.5) {
            return Err(AccountantError::SiteNoise(site_noise / granularity));
        }
        let sensitivity = rounded_sensitivity(clip / granularity, dimension, beta)?;
        Ok(Self {
            clip,
            granularity,
            dimension,
            beta,
            site_noise,
            sensitivity,
        })
    }

    /// The mechanism for a contribution that is already an integer vector on the grid, with a
    /// known exact sensitivity (in grid units): no randomized rounding, so no rounding term is
    /// added (what a consortium statistics query is: every row's contribution is rounded to the
    /// grid on its own, so the sum's sensitivity is the rows' bound, `privacy::stats`).
    /// `site_noise` is in the units the grid step `granularity` is in, at least γ/2.
    pub fn for_integer_query(
        sensitivity: Sensitivity,
        granularity: f64,
        dimension: usize,
        site_noise: f64,
    ) -> Result<Self, AccountantError> {
        if !(granularity > 0.0 && granularity.is_finite()) {
            return Err(AccountantError::Granularity(granularity));
        }
        if !(sensitivity.l2 > 0.0 && sensitivity.l2.is_finite() && sensitivity.l1.is_finite()) {
            return Err(AccountantError::Clip(sensitivity.l2 * granularity));
        }
        if dimension == 0 {
            return Err(AccountantError::Dimension);
        }
        if !(site_noise.is_finite() && site_noise / granularity >= 0.5) {
            return Err(AccountantError::SiteNoise(site_noise / granularity));
        }
        Ok(Self {
            clip: sensitivity.l2 * granularity,
            granularity,
            dimension,
            beta: 0.0,
            site_noise,
            sensitivity,
        })
    }

    pub fn clip(&self) -> f64 {
        self.clip
    }
    pub fn granularity(&self) -> f64 {
        self.granularity
    }
    pub fn dimension(&self) -> usize {
        self.dimension
    }
    pub fn beta(&self) -> f64 {
        self.beta
    }
    /// σ_s, in the units of the contribution.
    pub fn site_noise(&self) -> f64 {
        self.site_noise
    }
    /// The rounded contribution's sensitivity, in grid units.
    pub fn sensitivity(&self) -> Sensitivity {
        self.sensitivity
    }

    fn site_noise_in_grid(&self) -> f64 {
        self.site_noise / self.granularity
    }

    /// One round's RDP of order `alpha` (no sampling) when `survivors` sites' noise is in the sum
    /// (KLS21 Prop. 14; module documentation).
    pub fn round_rdp(&self, survivors: usize, alpha: f64) -> f64 {
        let sigma = self.site_noise_in_grid();
        let t = tau(sigma, survivors);
        let d = self.dimension as f64;
        let spread = (survivors as f64).sqrt() * sigma;
        let (s2, s1) = (self.sensitivity.l2 / spread, self.sensitivity.l1 / spread);
        let half = 0.5 * alpha;
        (half * s2 * s2 + t * d)
            .min(half * (s2 * s2 + 2.0 * s1 * t + t * t * d))
            .min(half * (s2 + d.sqrt() * t).powi(2))
    }

    /// One round's RDP at integer order `alpha` ≥ 2 when each contribution takes part with
    /// probability `q` (Zhu & Wang 2019, Theorem 5; never above the unsampled value).
    pub fn sampled_round_rdp(&self, survivors: usize, q: f64, alpha: u32) -> f64 {
        let plain = self.round_rdp(survivors, f64::from(alpha));
        if q >= 1.0 || alpha < 2 {
            return plain;
        }
        let a = f64::from(alpha);
        let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
        let mut terms = Vec::with_capacity(alpha as usize);
        terms.push((a - 1.0) * log_1mq + (a * q - q + 1.0).ln());
        let mut log_binom = a.ln(); // log C(α, 1)
        for l in 2..=alpha {
            let lf = f64::from(l);
            log_binom += (a - lf + 1.0).ln() - lf.ln();
            let base = log_binom + lf * log_q + (a - lf) * log_1mq;
            terms.push(if l == 2 {
                base + self.round_rdp(survivors, 2.0)
            } else {
                3f64.ln() + base + (lf - 1.0) * self.round_rdp(survivors, lf)
            });
        }
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
        ((max + sum.ln()) / (a - 1.0)).min(plain)
    }

    /// The RDP curve on [`orders`] of rounds at sampling rate `q`, given as
    /// (survivors, number of rounds) groups: each group's rounds add their RDP.
    pub fn rdp_curve(&self, q: f64, rounds: &[(usize, u64)]) -> Result<RdpCurve, AccountantError> {
        validate_sample_rate(q)?;
        if rounds.is_empty() {
            return Err(AccountantError::EmptyComposition);
        }
        let orders = orders();
        let values = orders
            .iter()
            .map(|&a| {
                rounds
                    .iter()
                    .map(|&(k, t)| t as f64 * self.sampled_round_rdp(k.max(1), q, a as u32))
                    .sum()
            })
            .collect();
        RdpCurve::from_parts(orders, values)
    }

    /// (ε, δ) of rounds at sampling rate `q`, each group (survivors, rounds) as it happened.
    pub fn epsilon(
        &self,
        q: f64,
        rounds: &[(usize, u64)],
        delta: f64,
    ) -> Result<Guarantee, AccountantError> {
        validate_delta(delta)?;
        if rounds.iter().any(|&(k, _)| k == 0) {
            return Err(AccountantError::TooFewSurvivors {
                survivors: 0,
                minimum: 1,
            });
        }
        let (epsilon, order) = self
            .rdp_curve(q, rounds)?
            .epsilon(delta, Conversion::Balle)?;
        Ok(Guarantee {
            epsilon,
            delta,
            order: Some(order),
            by: Accountant::Rdp,
        })
    }

    /// An upper bound on the probability that some coordinate of the sum of `sites` sites'
    /// contributions leaves [−2^{b−1}, 2^{b−1}) and wraps around (module documentation); 1 when
    /// the signal alone may not fit.
    pub fn wrap_probability(&self, sites: usize, bits: u32) -> f64 {
        let n = sites.max(1) as f64;
        let half_range = 2f64.powi(bits.min(1023) as i32 - 1) - 1.0;
        let room = half_range - n * self.sensitivity.l2;
        if room <= 0.0 {
            return 1.0;
        }
        let variance = n * self.site_noise_in_grid().powi(2);
        let log_p = (2.0 * self.dimension as f64).ln() - room * room / (2.0 * variance);
        log_p.exp().min(1.0)
    }

    /// The fewest bits b of the ring ℤ_{2^b} for which the sum of `sites` contributions wraps
    /// around with probability at most `max_probability`.
    pub fn modulus_bits(&self, sites: usize, max_probability: f64) -> Result<u32, AccountantError> {
        if !(max_probability > 0.0 && max_probability < 1.0) {
            return Err(AccountantError::Delta(max_probability));
        }
        (2..=1023)
            .find(|&b| self.wrap_probability(sites, b) <= max_probability)
            .ok_or(AccountantError::Modulus { bits: 1023 })
    }
}

/// What a distributed-DP plan is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedInputs {
    pub clip: f64,
    pub granularity: f64,
    pub dimension: usize,
    pub beta: f64,
    /// Sites expected in a round (n).
    pub expected_sites: usize,
    /// The fewest surviving sites whose sum may be released (m ≤ n).
    pub min_survivors: usize,
    /// The probability that a contribution takes part in a round (1 when every site sends every
    /// round).
    pub sample_rate: f64,
    pub rounds: u64,
    pub delta: f64,
    /// Calibrate the total noise to this ε (at `min_survivors` every round) when `total_noise` is
    /// `None`.
    pub target_epsilon: Option<f64>,
    /// The total noise standard deviation σ in the sum of `min_survivors` sites.
    pub total_noise: Option<f64>,
}

/// A job's distributed-DP plan: each site's noise share, and the ε the job spends if every round
/// releases with `min_survivors` survivors (more survivors: more noise in the sum).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedPlan {
    pub mechanism: DistributedGaussian,
    pub expected_sites: usize,
    pub min_survivors: usize,
    pub sample_rate: f64,
    pub rounds: u64,
    pub delta: f64,
    /// The total noise σ that `min_survivors` sites carry together.
    pub total_noise: f64,
    pub planned_epsilon: f64,
}

impl DistributedPlan {
    /// Plans a job; errors name what is out of range.
    pub fn new(inputs: &DistributedInputs) -> Result<Self, AccountantError> {
        validate_delta(inputs.delta)?;
        validate_sample_rate(inputs.sample_rate)?;
        super::validate_steps(inputs.rounds)?;
        if inputs.min_survivors == 0 || inputs.min_survivors > inputs.expected_sites {
            return Err(AccountantError::Sites {
                expected: inputs.expected_sites,
                minimum: inputs.min_survivors,
            });
        }
        let mechanism_for = |total: f64| {
            DistributedGaussian::new(
                inputs.clip,
                inputs.granularity,
                inputs.dimension,
                inputs.beta,
                site_noise_share(total, inputs.min_survivors)?,
            )
        };
        let epsilon_for = |total: f64| -> Result<f64, AccountantError> {
            Ok(mechanism_for(total)?
                .epsilon(
                    inputs.sample_rate,
                    &[(inputs.min_survivors, inputs.rounds)],
                    inputs.delta,
                )?
                .epsilon)
        };
        let total_noise = match (inputs.total_noise, inputs.target_epsilon) {
            (Some(total), _) => total,
            (None, Some(target)) => calibrate_total_noise(target, inputs, &epsilon_for)?,
            (None, None) => return Err(AccountantError::TargetEpsilon(f64::NAN)),
        };
        let mechanism = mechanism_for(total_noise)?;
        Ok(Self {
            mechanism,
            expected_sites: inputs.expected_sites,
            min_survivors: inputs.min_survivors,
            sample_rate: inputs.sample_rate,
            rounds: inputs.rounds,
            delta: inputs.delta,
            total_noise,
            planned_epsilon: epsilon_for(total_noise)?,
        })
    }

    /// Each site's noise standard deviation σ_s.
    pub fn site_noise(&self) -> f64 {
        self.mechanism.site_noise()
    }

    /// The coordinator's release check for a round whose sum holds `survivors` sites' noise:
    /// refused below the minimum, or if the job's ε with that many survivors in every round
    /// would exceed the planned ε; otherwise that ε.
    pub fn check_release(&self, survivors: usize) -> Result<f64, AccountantError> {
        if survivors < self.min_survivors {
            return Err(AccountantError::TooFewSurvivors {
                survivors,
                minimum: self.min_survivors,
            });
        }
        let epsilon = self
            .mechanism
            .epsilon(self.sample_rate, &[(survivors, self.rounds)], self.delta)?
            .epsilon;
        // The planned ε was computed at the minimum; a relative slack of 1e-9 absorbs rounding.
        if epsilon > self.planned_epsilon * (1.0 + 1e-9) {
            return Err(AccountantError::OverBudget {
                survivors,
                epsilon,
                planned: self.planned_epsilon,
            });
        }
        Ok(epsilon)
    }

    /// What the rounds released so far really spent, each with the survivors it had (for the
    /// sites' ledgers): the RDP of every round composed, converted at the plan's δ.
    pub fn epsilon_spent(
        &self,
        survivors_per_round: &[usize],
    ) -> Result<Guarantee, AccountantError> {
        let mut groups: Vec<(usize, u64)> = Vec::new();
        for &k in survivors_per_round {
            match groups.iter_mut().find(|(s, _)| *s == k) {
                Some((_, n)) => *n += 1,
                None => groups.push((k, 1)),
            }
        }
        self.mechanism
            .epsilon(self.sample_rate, &groups, self.delta)
    }
}

/// The smallest total noise σ (relative tolerance 1e-4) whose ε at the plan's minimum of
/// survivors meets `target`; ε falls as σ grows (both s₂ and τ fall).
fn calibrate_total_noise(
    target: f64,
    inputs: &DistributedInputs,
    epsilon_for: &dyn Fn(f64) -> Result<f64, AccountantError>,
) -> Result<f64, AccountantError> {
    if !(target > 0.0 && target.is_finite()) {
        return Err(AccountantError::TargetEpsilon(target));
    }
    // The smallest σ the bound allows: each share at least half a grid step.
    let floor = 0.5 * inputs.granularity * (inputs.min_survivors as f64).sqrt();
    let mut hi = floor.max(inputs.clip);
    while epsilon_for(hi)? > target {
        hi *= 2.0;
        if hi > 1e12 * inputs.clip {
            return Err(AccountantError::Unreachable {
                target,
                max_sigma: hi,
            });
        }
    }
    let mut lo = floor;
    if epsilon_for(lo)? <= target {
        return Ok(lo);
    }
    while hi - lo > 1e-4 * hi {
        let mid = 0.5 * (lo + hi);
        if epsilon_for(mid)? <= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// What a record-level distributed DP-SGD plan is computed from (the job's spec and the model's
/// size; the same at the coordinator and at every site).
///
/// **The mechanism.** Each round every site takes one DP-SGD step's worth of work: it includes
/// each of its privacy units (rows) with probability `sample_rate` (Poisson), clips each unit's
/// gradient to `clip` C, sums them, and multiplies the sum by `step_scale` s (the job's
/// learning rate over its expected batch across all sites, `lr / B`): its update is
/// `−s·Σ clip(∇ℓ_i)`. It rounds that onto the grid γ by unbiased randomized rounding, adds
/// N_ℤ(0, σ_s²) per coordinate and masks it. The survivors' sum is
/// `−s·(Σ_all sites Σ_i clip(∇ℓ_i)) + noise`: exactly one central DP-SGD step over the union of
/// the sites' data, with the survivors' noise shares summed.
///
/// **Sensitivity.** Adding or removing one unit at one site moves that site's scaled sum by at
/// most s·C; rounding each coordinate up or down moves two neighbouring rounded sums apart by
/// at most one more grid step per coordinate (coupling the coins), so in grid units
/// Δ = s·C/γ + √d ([`rounded_sensitivity`] with β = 0: plain randomized rounding, since
/// conditional rounding's bound is on one vector's norm, not on the difference made by one of
/// the units summed inside it). Clipping the site's whole update to a norm bound before
/// rounding (to keep the ring from wrapping) is a projection, 1-Lipschitz: it does not raise Δ.
///
/// **Noise.** With k survivors the sum carries k·σ_s² per coordinate: a discrete Gaussian sum
/// that KLS21 Prop. 14 bounds in RDP by a Gaussian of sensitivity Δ + τ·√(d·k)·σ_s (its third
/// form, α/2·(s₂ + τ√d)²); so one round is the Poisson-subsampled Gaussian mechanism with
/// noise multiplier z(k) = √k·σ_s / (Δ + τ_k·√(d·k)·σ_s) ([`RecordLevelPlan::noise_multiplier_at`]),
/// which is what every site's ledger composes with its DP-SGD steps (RDP or PLD). With σ_s of at
/// least one grid step τ is below 1e-3 and its term is negligible beside Δ (tens of grid
/// steps or more); it is computed, not assumed. Each site adds σ_s = z·Δ/√m (before the τ term)
/// so that m = `min_survivors` survivors carry the job's multiplier z: z(k) ≈ z·√(k/m).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordLevelInputs {
    /// C: the per-unit clipping norm.
    pub clip: f64,
    /// s: the factor each site multiplies its clipped sum by (learning rate over the expected
    /// batch across all sites); the update's units.
    pub step_scale: f64,
    /// γ: the grid step, in the update's units.
    pub granularity: f64,
    pub dimension: usize,
    /// m: the fewest survivors whose sum may be released.
    pub min_survivors: usize,
    /// q: each unit's inclusion probability in a round.
    pub sample_rate: f64,
    /// One step per round.
    pub rounds: u64,
    pub delta: f64,
    pub accountant: Accountant,
    /// Calibrate z to this ε at m survivors every round (beside `metrics`) when
    /// `noise_multiplier` is `None`.
    pub target_epsilon: Option<f64>,
    /// σ: the total noise on the clipped sum at m survivors is σ·C per coordinate.
    pub noise_multiplier: Option<f64>,
    /// The job's DP metric releases over all rounds, composed beside the steps.
    pub metrics: Option<SampledGaussian>,
}

/// A record-level distributed DP-SGD plan (see [`RecordLevelInputs`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordLevelPlan {
    /// What each site's ledger charges per round and the gate checks: q, one step per round,
    /// `rounds` steps, C, σ, the effective multiplier z(m) at the minimum of survivors (the
    /// charge made before the masked input leaves the site), the grid in the clipped sum's
    /// units (γ/s), the planned ε (steps and metrics) at δ.
    pub dp_sgd: super::plan::DpSgdPlan,
    pub min_survivors: usize,
    pub step_scale: f64,
    pub granularity: f64,
    pub dimension: usize,
    /// Δ in grid units (s·C/γ + √d).
    pub sensitivity_grid: f64,
    /// σ_s in grid steps.
    pub site_noise_grid: f64,
}

impl RecordLevelPlan {
    pub fn new(inputs: &RecordLevelInputs) -> Result<Self, AccountantError> {
        validate_delta(inputs.delta)?;
        validate_sample_rate(inputs.sample_rate)?;
        super::validate_steps(inputs.rounds)?;
        if inputs.min_survivors == 0 {
            return Err(AccountantError::Sites {
                expected: 0,
                minimum: 0,
            });
        }
        if !(inputs.step_scale > 0.0 && inputs.step_scale.is_finite()) {
            return Err(AccountantError::Numerical(
                "the step scale (learning rate over the expected batch) must be a finite number > 0",
            ));
        }
        if !(inputs.granularity > 0.0 && inputs.granularity.is_finite()) {
            return Err(AccountantError::Granularity(inputs.granularity));
        }
        let sensitivity_grid = rounded_sensitivity(
            inputs.clip * inputs.step_scale / inputs.granularity,
            inputs.dimension,
            0.0,
        )?
        .l2;
        let m = inputs.min_survivors as f64;
        let needed = match (inputs.noise_multiplier, inputs.target_epsilon) {
            (Some(sigma), _) => {
                super::validate_noise(sigma)?;
                None
            }
            (None, Some(target)) => Some(
                super::calibrate_noise_beside(
                    target,
                    inputs.sample_rate,
                    inputs.rounds,
                    inputs.metrics.as_slice(),
                    inputs.delta,
                    inputs.accountant,
                    1e-4,
                )?
                .noise_multiplier,
            ),
            (None, None) => return Err(AccountantError::TargetEpsilon(f64::NAN)),
        };
        let total_grid = match (inputs.noise_multiplier, needed) {
            // σ·C on the clipped sum is σ·C·s/γ grid steps on the update.
            (Some(sigma), _) => sigma * inputs.clip * inputs.step_scale / inputs.granularity,
            (None, Some(z)) => z * sensitivity_grid,
            (None, None) => return Err(AccountantError::TargetEpsilon(f64::NAN)),
        };
        let mut plan = RecordLevelPlan {
            dp_sgd: super::plan::DpSgdPlan {
                sample_rate: inputs.sample_rate,
                steps_per_round: 1,
                total_steps: inputs.rounds,
                clip: inputs.clip,
                noise_multiplier: 0.0,
                effective_noise_multiplier: 0.0,
                granularity: inputs.granularity / inputs.step_scale,
                planned_epsilon: 0.0,
                delta: inputs.delta,
                accountant: inputs.accountant,
                metrics: inputs.metrics,
            },
            min_survivors: inputs.min_survivors,
            step_scale: inputs.step_scale,
            granularity: inputs.granularity,
            dimension: inputs.dimension,
            sensitivity_grid,
            site_noise_grid: total_grid / m.sqrt(),
        };
        // The τ term lowers z(m) a hair below z·Δ/Δ: raise σ_s until it meets the calibration.
        if let Some(needed) = needed {
            for _ in 0..8 {
                let eff = plan.noise_multiplier_at(inputs.min_survivors);
                if eff >= needed {
                    break;
                }
                plan.site_noise_grid *= needed / eff * (1.0 + 1e-12);
            }
            if plan.noise_multiplier_at(inputs.min_survivors) < needed {
                return Err(AccountantError::Numerical(
                    "the sum of discrete Gaussians' correction did not settle",
                ));
            }
        }
        if plan.site_noise_grid < 0.5 {
            return Err(AccountantError::SiteNoise(plan.site_noise_grid));
        }
        let z = plan.noise_multiplier_at(inputs.min_survivors);
        plan.dp_sgd.effective_noise_multiplier = z;
        plan.dp_sgd.noise_multiplier = plan.site_noise_grid * m.sqrt() * inputs.granularity
            / (inputs.step_scale * inputs.clip);
        let mut all = vec![SampledGaussian::new(inputs.sample_rate, z, inputs.rounds)?];
        all.extend(inputs.metrics);
        plan.dp_sgd.planned_epsilon =
            super::epsilon(&all, inputs.delta, inputs.accountant)?.epsilon;
        Ok(plan)
    }

    /// σ_s in the update's units.
    pub fn site_noise(&self) -> f64 {
        self.site_noise_grid * self.granularity
    }

    /// z(k): the noise multiplier of one round whose sum holds `survivors` sites' noise shares
    /// (module documentation of [`RecordLevelInputs`]).
    pub fn noise_multiplier_at(&self, survivors: usize) -> f64 {
        let k = survivors.max(1) as f64;
        let spread = k.sqrt() * self.site_noise_grid;
        let t = tau(self.site_noise_grid, survivors.max(1));
        spread / (self.sensitivity_grid + t * (self.dimension as f64).sqrt() * spread)
    }

    /// The release check, the coordinator's and every site's: refused below the minimum of
    /// survivors, or when `survivors` would carry less noise than the plan charged each round
    /// (z(k) < z(m); computed, since τ grows with k). Otherwise z(k).
    pub fn check_release(&self, survivors: usize) -> Result<f64, AccountantError> {
        if survivors < self.min_survivors {
            return Err(AccountantError::TooFewSurvivors {
                survivors,
                minimum: self.min_survivors,
            });
        }
        let z = self.noise_multiplier_at(survivors);
        let charged = self.dp_sgd.effective_noise_multiplier;
        if z < charged * (1.0 - 1e-12) {
            let eps = |z: f64| {
                super::epsilon(
                    &[SampledGaussian::new(
                        self.dp_sgd.sample_rate,
                        z,
                        self.dp_sgd.total_steps,
                    )?],
                    self.dp_sgd.delta,
                    self.dp_sgd.accountant,
                )
                .map(|g| g.epsilon)
            };
            return Err(AccountantError::OverBudget {
                survivors,
                epsilon: eps(z)?,
                planned: eps(charged)?,
            });
        }
        Ok(z)
    }

    /// One round's charge: the Poisson-subsampled Gaussian at z(m), one step.
    pub fn round_mechanism(&self) -> Result<SampledGaussian, AccountantError> {
        self.dp_sgd.mechanism(1)
    }
}

#[cfg(test)]
mod record_level_tests {
    use super::*;

    fn inputs() -> RecordLevelInputs {
        RecordLevelInputs {
            clip: 1.0,
            step_scale: 0.5 / 100.0,
            granularity: 2f64.powi(-16),
            dimension: 62,
            min_survivors: 4,
            sample_rate: 0.25,
            rounds: 20,
            delta: 1e-5,
            accountant: Accountant::Rdp,
            target_epsilon: Some(1.0),
            noise_multiplier: None,
            metrics: None,
        }
    }

    #[test]
    fn m_survivors_carry_the_calibrated_multiplier_and_the_plan_meets_the_target() {
        let plan = RecordLevelPlan::new(&inputs()).unwrap();
        let needed = crate::accountant::calibrate_noise_beside(
            1.0,
            0.25,
            20,
            &[],
            1e-5,
            Accountant::Rdp,
            1e-4,
        )
        .unwrap()
        .noise_multiplier;
        let z = plan.noise_multiplier_at(4);
        assert!(z >= needed && z < needed * (1.0 + 1e-6), "{z} vs {needed}");
        assert!(plan.dp_sgd.planned_epsilon <= 1.0, "{plan:?}");
        assert!(plan.dp_sgd.planned_epsilon > 0.99, "{plan:?}");
        // Δ in grid units: s·C/γ + √d.
        let c = 0.005 * 65536.0;
        assert!((plan.sensitivity_grid - (c + 62f64.sqrt())).abs() < 1e-9);
        // σ_s = z·Δ/√m, and four shares of variance σ_s² add up to (z·Δ)².
        assert!((plan.site_noise_grid * 2.0 / plan.sensitivity_grid - z).abs() < 1e-6 * z);
        // The nominal σ on the clipped sum is the effective one plus the grid's share.
        assert!(plan.dp_sgd.noise_multiplier > z);
        assert_eq!(plan.round_mechanism().unwrap().steps(), 1);
        assert_eq!(plan.dp_sgd.total_steps, 20);
    }

    #[test]
    fn more_survivors_carry_more_noise_and_fewer_are_refused() {
        let plan = RecordLevelPlan::new(&inputs()).unwrap();
        assert!(matches!(
            plan.check_release(3),
            Err(AccountantError::TooFewSurvivors {
                survivors: 3,
                minimum: 4
            })
        ));
        let at4 = plan.check_release(4).unwrap();
        let at9 = plan.check_release(9).unwrap();
        // z(k) = z·√(k/m) while τ is negligible.
        assert!((at9 / at4 - 1.5).abs() < 1e-9, "{at4} {at9}");
    }

    #[test]
    fn an_explicit_multiplier_is_the_noise_on_the_clipped_sum() {
        let mut i = inputs();
        i.target_epsilon = None;
        i.noise_multiplier = Some(2.0);
        let plan = RecordLevelPlan::new(&i).unwrap();
        // σ·C·s/γ grid steps in all, split over m = 4.
        let total = 2.0 * 0.005 * 65536.0;
        assert!((plan.site_noise_grid - total / 2.0).abs() < 1e-9);
        assert!((plan.dp_sgd.noise_multiplier - 2.0).abs() < 1e-12);
        // The grid's √d costs a little: z_eff = σ·c/(c + √d).
        let c = 0.005 * 65536.0;
        let expected = 2.0 * c / (c + 62f64.sqrt());
        assert!((plan.dp_sgd.effective_noise_multiplier - expected).abs() < 1e-9);
    }
}
