//! `tutela privacy ...`: privacy accounting for DP-SGD on the command line. Argument parsing and
//! printing only; the work is done by `tutela_privacy::accountant`.

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use tutela_privacy::accountant::pld::{PldOptions, Rounding};
use tutela_privacy::accountant::{self, Accountant, SampledGaussian};

#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// Print the ε spent by DP-SGD (Poisson-subsampled Gaussian, add/remove-one neighbours) for a
    /// given noise multiplier, the accountant whose bound it is, and the optimal RDP order when
    /// that is an RDP accountant.
    Epsilon(EpsilonArgs),
    /// Print the smallest noise multiplier σ that keeps DP-SGD within a target ε.
    Noise(NoiseArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccountantArg {
    /// Rényi DP with the Balle et al. 2020 conversion (Opacus's default).
    Rdp,
    /// Rényi DP with the classic Mironov 2017 conversion (older published tables).
    RdpClassic,
    /// Privacy loss distribution, the tight accountant: connect-the-dots discretisation and FFT
    /// composition, within 1% above Google's dp-accounting. Reports the smaller of its bound and
    /// RDP's, and says which ("by pld" or "by rdp").
    Pld,
    /// Privacy loss distribution with every loss rounded up: a strict upper bound that
    /// overestimates ε by up to steps × --pld-interval (or RDP's, when smaller).
    PldPessimistic,
}

#[derive(Debug, Args)]
pub struct Common {
    /// Poisson sampling rate q = expected batch size / dataset size, in (0, 1].
    #[arg(long)]
    sample_rate: f64,
    /// Number of training steps T (at least 1).
    #[arg(long)]
    steps: u64,
    /// Target δ, in (0, 1); usually below 1 / dataset size.
    #[arg(long)]
    delta: f64,
    /// Which accountant to use.
    #[arg(long, value_enum, default_value = "rdp")]
    accountant: AccountantArg,
    /// Grid interval of the PLD accountant's privacy loss (smaller: tighter and slower).
    #[arg(long, default_value_t = 1e-4)]
    pld_interval: f64,
}

#[derive(Debug, Args)]
pub struct EpsilonArgs {
    /// Noise multiplier σ: noise standard deviation / clipping norm, positive.
    #[arg(long)]
    noise_multiplier: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
pub struct NoiseArgs {
    /// Target ε, positive.
    #[arg(long)]
    epsilon: f64,
    #[command(flatten)]
    common: Common,
}

fn accountant_of(c: &Common) -> Result<Accountant> {
    let rounding = match c.accountant {
        AccountantArg::Rdp => return Ok(Accountant::Rdp),
        AccountantArg::RdpClassic => return Ok(Accountant::RdpClassic),
        AccountantArg::Pld => Rounding::ConnectTheDots,
        AccountantArg::PldPessimistic => Rounding::Pessimistic,
    };
    if !(c.pld_interval > 0.0 && c.pld_interval.is_finite()) {
        bail!("--pld-interval {} must be positive", c.pld_interval);
    }
    Ok(Accountant::Pld(PldOptions {
        discretization: c.pld_interval,
        rounding,
        ..PldOptions::default()
    }))
}

pub fn run(cmd: PrivacyCommand) -> Result<()> {
    match cmd {
        PrivacyCommand::Epsilon(a) => {
            let acc = accountant_of(&a.common)?;
            let g = SampledGaussian::new(a.common.sample_rate, a.noise_multiplier, a.common.steps)?;
            println!("{}", accountant::epsilon(&[g], a.common.delta, acc)?);
        }
        PrivacyCommand::Noise(a) => {
            let acc = accountant_of(&a.common)?;
            let tol = if matches!(acc, Accountant::Pld(_)) {
                1e-3
            } else {
                1e-6
            };
            let c = accountant::calibrate_noise(
                a.epsilon,
                a.common.sample_rate,
                a.common.steps,
                a.common.delta,
                acc,
                tol,
            )?;
            // Which bound the calibrated σ's ε is (PLD's or RDP's).
            let at = accountant::epsilon(
                &[SampledGaussian::new(
                    a.common.sample_rate,
                    c.noise_multiplier,
                    a.common.steps,
                )?],
                a.common.delta,
                acc,
            )?;
            println!(
                "noise_multiplier = {:.6} (epsilon = {:.6}, delta = {}, by {})",
                c.noise_multiplier, at.epsilon, a.common.delta, at.by
            );
        }
    }
    Ok(())
}
