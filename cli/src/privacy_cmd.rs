//! `tutela privacy ...`: privacy accounting for DP-SGD on the command line, and consortium
//! statistics files printed for people. Argument parsing and printing only; the work is done by
//! `tutela_privacy::accountant` and `tutela_privacy::stats`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
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
    /// Suggest batch size, local epochs and noise multiplier for one site from its row count,
    /// the job's ε, δ and rounds and the model's size, with the signal-to-noise they buy.
    Plan(PlanArgs),
    /// Print a consortium statistics file (a data dictionary computed across sites under DP, the
    /// file a schema's `[standardize] statistics` names), rounded for people, each figure with
    /// its bound at the file's stated confidence.
    Stats {
        /// The statistics file (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Training rows at the site.
    #[arg(long)]
    rows: usize,
    /// The job spec (TOML): its rounds, privacy.target_epsilon, privacy.delta,
    /// privacy.max_grad_norm and model (whose size --features and --classes then give). Any
    /// option below overrides the job's value.
    #[arg(long)]
    job: Option<std::path::PathBuf>,
    /// The job's target ε for this site.
    #[arg(long)]
    epsilon: Option<f64>,
    /// The job's δ; usually below 1 / rows. Default: the job's, else 1e-5.
    #[arg(long)]
    delta: Option<f64>,
    /// The job's rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// The model's parameter count. With --job, computed from the job's model, --features and
    /// --classes instead.
    #[arg(long)]
    parameters: Option<usize>,
    /// With --job: the dataset's feature columns (after encoding; `tutela-node data check`
    /// prints them).
    #[arg(long)]
    features: Option<u64>,
    /// With --job: the label's classes.
    #[arg(long, default_value_t = 2)]
    classes: u64,
    /// Per-example clipping norm C. Default: the job's privacy.max_grad_norm, else 1.
    #[arg(long)]
    clip: Option<f64>,
    /// How many runner-up settings to list.
    #[arg(long, default_value_t = 3)]
    alternatives: usize,
}

/// The request `tutela privacy plan` answers, from the options and the job spec they override.
fn plan_request(a: &PlanArgs) -> Result<tutela_privacy::planning::PlanRequest> {
    use anyhow::Context;
    use tutela_protocol::model_registry::{DataDims, ModelDescription};
    let job = match &a.job {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--job {}", path.display()))?;
            Some(
                tutela_protocol::job::JobSpec::from_toml_str(&text)
                    .with_context(|| format!("--job {}", path.display()))?,
            )
        }
        None => None,
    };
    let privacy = job.as_ref().and_then(|j| j.privacy.as_ref());
    let epsilon = a
        .epsilon
        .or(privacy.and_then(|p| p.target_epsilon))
        .context("give --epsilon, or a --job with privacy.target_epsilon")?;
    let rounds = a
        .rounds
        .or(job.as_ref().map(|j| j.rounds as usize))
        .context("give --rounds, or a --job")?;
    let parameters = match (a.parameters, &job, a.features) {
        (Some(p), _, _) => p,
        (None, Some(j), Some(features)) => {
            let dims = DataDims {
                input_shape: vec![features],
                num_classes: a.classes,
            };
            let tensors = ModelDescription::for_job(&j.model)
                .and_then(|d| d.concrete(&dims))
                .with_context(|| format!("the job's model {:?}", j.model.name))?;
            tensors.iter().filter_map(|t| t.numel()).sum::<u64>() as usize
        }
        (None, Some(_), None) => bail!(
            "give --features (and --classes) so that the job's model size can be computed, or --parameters"
        ),
        (None, None, _) => {
            bail!("give --parameters (the model's parameter count), or --job with --features")
        }
    };
    let delta = a.delta.or(privacy.map(|p| p.delta)).unwrap_or(1e-5);
    // Under DP each round's metrics are a release too (`tutela_privacy::metrics`): the plan is
    // calibrated beside them, with the job's metrics_* settings (the defaults without a job).
    let metrics = tutela_privacy::metrics::MetricsRelease::for_job(
        (
            privacy.and_then(|p| p.metrics_noise_multiplier),
            privacy.and_then(|p| p.metrics_epsilon_share),
            privacy.and_then(|p| p.metrics_loss_max),
        ),
        Some(epsilon),
        rounds as u64,
        delta,
        Accountant::Rdp,
    )
    .and_then(|m| m.mechanism(rounds as u64))
    .context("the job's metrics release")?;
    Ok(tutela_privacy::planning::PlanRequest {
        rows: a.rows,
        target_epsilon: epsilon,
        delta,
        rounds,
        dimension: parameters,
        clip: a
            .clip
            .or(privacy.and_then(|p| p.max_grad_norm))
            .unwrap_or(1.0),
        accountant: Accountant::Rdp,
        metrics: Some(metrics),
    })
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

fn print_plan(a: &PlanArgs) -> Result<()> {
    use tutela_privacy::planning::{SWAMPED, suggest};
    use tutela_protocol::human::number;
    let request = plan_request(a)?;
    let advice = suggest(&request)?;
    let b = advice.best;
    println!(
        "[training]\nbatch_size = {}\nlocal_epochs = {}\n[privacy]\nmode = \"local\"\ntarget_epsilon = {}\ndelta = {:e}\nmax_grad_norm = {}\n# noise_multiplier = {} (calibrated by the node from target_epsilon; shown for reference)\n",
        b.batch_size,
        b.local_epochs,
        number(request.target_epsilon),
        request.delta,
        number(request.clip),
        number(b.plan.noise_multiplier),
    );
    println!(
        "With {} rows, a batch of {} (sampling rate {}) and {} local epoch(s), each round takes {} \
         steps, {} in all over {} rounds; σ = {} keeps the job at ε = {} (δ = {:e}, RDP).",
        a.rows,
        b.batch_size,
        number(b.plan.sample_rate),
        b.local_epochs,
        b.plan.steps_per_round,
        b.plan.total_steps,
        request.rounds,
        number(b.plan.noise_multiplier),
        number(b.plan.planned_epsilon),
        request.delta,
    );
    println!(
        "Per step, the noise on each coordinate of the averaged gradient is {} times the largest \
         possible signal (σ / batch); over all {} parameters the averaged gradient's \
         signal-to-noise is at best {} (batch / (σ·√parameters)).",
        number(b.noise_to_signal),
        request.dimension,
        number(b.norm_signal_to_noise),
    );
    if b.noise_to_signal > SWAMPED {
        println!(
            "WARNING: the noise swamps the signal (σ / batch > {SWAMPED}): expect a model no \
             better than predicting the majority class. More rows, a larger ε or fewer rounds help."
        );
    } else if b.norm_signal_to_noise < 1.0 {
        println!(
            "Expect slow, noisy learning: the noise's norm exceeds the signal's at every step. \
             A smaller model (fewer parameters), more rows, a larger ε or fewer rounds help."
        );
    }
    if a.alternatives > 0 && advice.candidates.len() > 1 {
        println!("\nalternatives (batch, epochs: σ, σ/batch):");
        for c in advice.candidates.iter().skip(1).take(a.alternatives) {
            println!(
                "  {}, {}: σ = {}, σ/batch = {}",
                c.batch_size,
                c.local_epochs,
                number(c.plan.noise_multiplier),
                number(c.noise_to_signal)
            );
        }
    }
    Ok(())
}

pub fn run(cmd: PrivacyCommand) -> Result<()> {
    match cmd {
        PrivacyCommand::Stats { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let dictionary = tutela_privacy::stats::DataDictionary::from_file_text(&text)
                .with_context(|| file.display().to_string())?;
            print!("{}", render_dictionary(&dictionary));
        }
        PrivacyCommand::Plan(a) => print_plan(&a)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> PlanArgs {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            plan: PlanArgs,
        }
        let mut argv = vec!["plan", "--rows", "100"];
        argv.extend_from_slice(extra);
        <Wrap as clap::Parser>::try_parse_from(argv).unwrap().plan
    }

    /// The shipped breast-cancer job (10 rounds, ε = 3, δ = 1e-5, clip 1, mlp [32, 16]) on 30
    /// features and 2 classes: 30·32+32 + 32·16+16 + 16·2+2 = 1554 parameters.
    #[test]
    fn a_plan_takes_its_numbers_from_the_job_and_the_options_override_them() {
        let job = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/jobs/breast_cancer_fedavg.toml"
        );
        let r = plan_request(&args(&["--job", job, "--features", "30"])).unwrap();
        assert_eq!(r.dimension, 1554);
        assert_eq!(
            (r.rounds, r.target_epsilon, r.delta, r.clip),
            (10, 3.0, 1e-5, 1.0)
        );
        let r = plan_request(&args(&[
            "--job",
            job,
            "--features",
            "30",
            "--epsilon",
            "1",
            "--rounds",
            "4",
        ]))
        .unwrap();
        assert_eq!((r.rounds, r.target_epsilon), (4, 1.0));
        let err = plan_request(&args(&["--job", job]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features"), "{err}");
        let err = plan_request(&args(&["--rounds", "3", "--parameters", "10"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--epsilon"), "{err}");
        let r = plan_request(&args(&[
            "--rounds",
            "3",
            "--parameters",
            "10",
            "--epsilon",
            "2",
        ]))
        .unwrap();
        assert_eq!((r.dimension, r.delta, r.clip), (10, 1e-5, 1.0));
    }
}

/// A data dictionary for people: 3 significant digits, each figure with its bound.
pub(crate) fn render_dictionary(d: &tutela_privacy::stats::DataDictionary) -> String {
    use std::fmt::Write as _;
    use tutela_privacy::stats::ColumnDictionary;
    let n = |v: f64| tutela_protocol::human::significant(v, 3);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "consortium statistics over {} sites: {} rows (± {}); epsilon {} at delta {} per site; \
         every figure within its ± bound at confidence {}",
        d.sites,
        n(d.rows),
        n(d.rows_bound),
        n(d.epsilon),
        d.delta,
        d.bound.confidence
    );
    for column in &d.columns {
        match column {
            ColumnDictionary::Numeric {
                name,
                present,
                present_bound,
                missing,
                missing_bound,
                mean,
                mean_bound,
                std,
                std_bound,
                quantiles,
                low,
                high,
                ..
            } => {
                let qs: Vec<String> = quantiles
                    .iter()
                    .map(|q| format!("{}% {}", n(100.0 * q.p), n(q.value)))
                    .collect();
                let rank = quantiles.iter().map(|q| q.rank_bound).fold(0.0, f64::max);
                let _ = writeln!(
                    out,
                    "{name} (range {} to {}): present {} ± {}, missing {} ± {}, mean {} ± {}, \
                     std {} ± {}, quantiles {} (rank ± {}%)",
                    n(*low),
                    n(*high),
                    n(*present),
                    n(*present_bound),
                    n(*missing),
                    n(*missing_bound),
                    n(*mean),
                    n(*mean_bound),
                    n(*std),
                    n(*std_bound),
                    qs.join(", "),
                    n(100.0 * rank)
                );
            }
            ColumnDictionary::Categorical {
                name,
                categories,
                counts,
                other,
                missing,
                count_bound,
            } => {
                let total: f64 = counts.iter().map(|c| c.max(0.0)).sum::<f64>()
                    + other.max(0.0)
                    + missing.max(0.0);
                let share = |c: f64| {
                    if total > 0.0 {
                        format!(" ({}%)", n(100.0 * c.max(0.0) / total))
                    } else {
                        String::new()
                    }
                };
                let cats: Vec<String> = categories
                    .iter()
                    .zip(counts)
                    .map(|(k, c)| format!("{k} {}{}", n(*c), share(*c)))
                    .collect();
                let _ = writeln!(
                    out,
                    "{name}: {}, (other) {}{}, missing {}{}; each count ± {}",
                    cats.join(", "),
                    n(*other),
                    share(*other),
                    n(*missing),
                    share(*missing),
                    n(*count_bound)
                );
            }
        }
    }
    out
}
