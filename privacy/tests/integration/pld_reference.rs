//! The PLD accountant against Google's `dp-accounting` (its PLD accountant, connect-the-dots at
//! h = 1e-4), computed in Python at test time (`tests/python/pld_reference.py`, the test venv's
//! `dp-accounting` pinned in `tests/python/requirements.txt`): ours must be an upper bound no
//! looser than theirs by more than 1%, for ε and for the calibrated σ, up to 10^6 steps.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tutela_privacy::accountant::pld::{self, PldOptions};
use tutela_privacy::accountant::{self, Accountant, SampledGaussian, calibrate_noise};

/// The venv's python (scripts/setup.sh installs tests/python/requirements.txt there), or
/// `$TUTELA_PYTHON`.
fn python() -> PathBuf {
    std::env::var_os("TUTELA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// Runs the reference script on `queries` and returns its answers, in order.
fn reference(queries: &Value) -> Vec<Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/pld_reference.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/setup.sh or set TUTELA_PYTHON",
                python().display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(queries.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pld_reference.py failed (is dp-accounting installed? scripts/setup.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// (q, σ, steps, δ): the three settings (TF-Privacy's MNIST; 10^5 and 10^6 steps at
/// q = 0.004, σ = 1, where the old accountant said ∞), a long run at large σ, and the corners:
/// one step, q = 1, small q with small σ and δ, large q with small σ.
const EPSILON_GRID: [(f64, f64, u64, f64); 10] = [
    (256.0 / 60000.0, 1.1, 14_062, 1e-5),
    (0.004, 1.0, 100_000, 1e-5),
    (0.004, 1.0, 1_000_000, 1e-5),
    (0.01, 3.0, 100_000, 1e-5),
    (0.05, 2.0, 20_000, 1e-6),
    (0.01, 1.0, 1_000, 1e-6),
    (0.1, 0.8, 100, 1e-5),
    (1.0, 5.0, 10, 1e-5),
    (0.02, 2.0, 1, 1e-5),
    (0.001, 0.6, 10_000, 1e-7),
];

/// (q, steps, δ, target ε) for the calibrated noise multiplier.
const NOISE_GRID: [(f64, u64, f64, f64); 3] = [
    (256.0 / 60000.0, 14_062, 1e-5, 2.0),
    (0.01, 1_000, 1e-6, 1.0),
    (0.004, 100_000, 1e-5, 8.0),
];

#[test]
fn pld_epsilon_is_within_one_percent_above_dp_accounting() {
    let queries: Vec<Value> = EPSILON_GRID
        .iter()
        .map(|&(q, sigma, steps, delta)| {
            json!({"kind": "epsilon", "q": q, "sigma": sigma, "steps": steps, "delta": delta})
        })
        .collect();
    let answers = reference(&json!(queries));
    for (&(q, sigma, steps, delta), theirs) in EPSILON_GRID.iter().zip(&answers) {
        let g = SampledGaussian::new(q, sigma, steps).unwrap();
        let started = std::time::Instant::now();
        let ours = pld::epsilon(&[g], delta, &PldOptions::default()).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let (their_pld, their_rdp) = (number(theirs, "pld"), number(theirs, "rdp"));
        eprintln!(
            "q={q} σ={sigma} T={steps} δ={delta}: ours {ours:.6} ({seconds:.2} s), dp-accounting PLD {their_pld:.6} ({:.2} s), RDP {their_rdp:.6}",
            number(theirs, "seconds")
        );
        assert!(
            ours >= their_pld,
            "q={q} σ={sigma} T={steps} δ={delta}: ours {ours} below dp-accounting's {their_pld}"
        );
        assert!(
            ours <= 1.01 * their_pld,
            "q={q} σ={sigma} T={steps} δ={delta}: ours {ours} more than 1% above dp-accounting's {their_pld}"
        );
        // What the combined accountant reports: never above RDP (ours, or theirs to within the
        // order grid's slack), never ∞.
        let combined = accountant::epsilon(&[g], delta, Accountant::pld()).unwrap();
        let rdp = accountant::epsilon(&[g], delta, Accountant::Rdp).unwrap();
        assert!(combined.epsilon.is_finite() && combined.epsilon <= rdp.epsilon);
        assert_eq!(combined.epsilon, ours.min(rdp.epsilon));
    }
}

#[test]
fn pld_noise_calibration_is_within_one_percent_above_dp_accounting() {
    let queries: Vec<Value> = NOISE_GRID
        .iter()
        .map(|&(q, steps, delta, epsilon)| {
            json!({"kind": "noise", "q": q, "steps": steps, "delta": delta, "epsilon": epsilon})
        })
        .collect();
    let answers = reference(&json!(queries));
    for (&(q, steps, delta, target), theirs) in NOISE_GRID.iter().zip(&answers) {
        let their_sigma = number(theirs, "sigma");
        let c = calibrate_noise(target, q, steps, delta, Accountant::pld(), 1e-5).unwrap();
        eprintln!(
            "q={q} T={steps} δ={delta} ε={target}: ours σ = {:.6} (ε {:.6}), dp-accounting σ = {their_sigma:.6}",
            c.noise_multiplier, c.epsilon
        );
        assert!(c.epsilon <= target);
        // Their σ is within 1e-6 of the σ where their ε meets the target; ours meets it by an
        // ε never below theirs, so it is at least theirs (less their tolerance).
        assert!(
            c.noise_multiplier >= their_sigma - 1e-6,
            "ours {} below dp-accounting's {their_sigma}",
            c.noise_multiplier
        );
        assert!(
            c.noise_multiplier <= 1.01 * their_sigma,
            "ours {} more than 1% above dp-accounting's {their_sigma}",
            c.noise_multiplier
        );
    }
}
