//! ε of DP-SGD by our PLD accountant, Google's dp-accounting PLD (run in Python through
//! `tests/python/pld_reference.py`), our RDP and dp-accounting's RDP, with the time of one call,
//! at the issue-18 settings; then the PLD grid sizes and the time of a 10^6-step calibration.
//!
//! `cargo run --release -p tutela-privacy --example bench_accountant [PYTHON]`
//! (PYTHON defaults to `.venv/bin/python`, which needs dp-accounting: scripts/setup.sh).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use tutela_privacy::accountant::pld::{self, Direction, PldOptions};
use tutela_privacy::accountant::{self, Accountant, SampledGaussian};

const SETTINGS: [(f64, f64, u64, f64); 4] = [
    (256.0 / 60000.0, 1.1, 14_062, 1e-5),
    (0.004, 1.0, 100_000, 1e-5),
    (0.004, 1.0, 1_000_000, 1e-5),
    (0.01, 3.0, 100_000, 1e-5),
];

/// dp-accounting's answers as (PLD ε, RDP ε, PLD seconds) per setting; `None` if Python fails.
fn reference(python: &str) -> Option<Vec<(f64, f64, f64)>> {
    let queries: Vec<String> = SETTINGS
        .iter()
        .map(|(q, s, t, d)| {
            format!(r#"{{"kind":"epsilon","q":{q},"sigma":{s},"steps":{t},"delta":{d}}}"#)
        })
        .collect();
    let mut child = Command::new(python)
        .arg("tests/python/pld_reference.py")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()?
        .write_all(format!("[{}]", queries.join(",")).as_bytes())
        .ok()?;
    let out = child.wait_with_output().ok()?;
    let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    answers
        .iter()
        .map(|a| {
            Some((
                a["pld"].as_f64()?,
                a["rdp"].as_f64()?,
                a["seconds"].as_f64()?,
            ))
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let python = std::env::args()
        .nth(1)
        .unwrap_or_else(|| ".venv/bin/python".into());
    let theirs = reference(&python);
    println!(
        "| q | σ | steps | δ | our PLD | dp-accounting PLD | ours / theirs | our RDP | dp-accounting RDP | our PLD call | dp-accounting PLD call | our RDP call |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, &(q, sigma, steps, delta)) in SETTINGS.iter().enumerate() {
        let g = SampledGaussian::new(q, sigma, steps)?;
        let started = Instant::now();
        let ours = pld::epsilon(&[g], delta, &PldOptions::default())?;
        let pld_time = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let rdp = accountant::epsilon(&[g], delta, Accountant::Rdp)?.epsilon;
        let rdp_time = started.elapsed().as_secs_f64();
        let (their_pld, their_rdp, their_time) = theirs
            .as_ref()
            .and_then(|t| t.get(i).copied())
            .unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        println!(
            "| {q:.6} | {sigma} | {steps} | {delta:e} | {ours:.4} | {their_pld:.4} | {:.6} | {rdp:.4} | {their_rdp:.4} | {pld_time:.3} s | {their_time:.3} s | {:.1} ms |",
            ours / their_pld,
            rdp_time * 1e3
        );
    }
    println!();
    for &(q, sigma, steps, _) in &SETTINGS {
        let g = SampledGaussian::new(q, sigma, steps)?;
        let one = pld::Pld::sampled_gaussian(q, sigma, Direction::Remove, &PldOptions::default())?;
        let all = pld::compose_all(&[g], Direction::Remove, &PldOptions::default())?;
        println!(
            "q={q:.6} σ={sigma} T={steps}: one step {} points, composed window {} points, mass at +∞ {:.1e}, round-off bound {:.1e}",
            one.len(),
            all.len(),
            all.infinity_mass(),
            all.roundoff_bound()
        );
    }
    let started = Instant::now();
    let c = accountant::calibrate_noise(8.0, 0.004, 100_000, 1e-5, Accountant::pld(), 1e-4)?;
    println!(
        "\nnoise for ε = 8 at q = 0.004, 10^5 steps, δ = 1e-5: σ = {:.5} (ε {:.5}) in {:.2} s",
        c.noise_multiplier,
        c.epsilon,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
