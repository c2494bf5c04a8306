//! `tutela privacy epsilon|noise`: the real binary; the answer names the accountant whose bound
//! it is.

use super::{fails, ok};

fn epsilon_of(line: &str) -> f64 {
    line.split("epsilon = ")
        .nth(1)
        .and_then(|rest| rest.split([' ', ',']).next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no epsilon in {line:?}"))
}

const MNIST: [&str; 8] = [
    "--sample-rate",
    "0.0042666667",
    "--noise-multiplier",
    "1.1",
    "--steps",
    "14062",
    "--delta",
    "1e-5",
];

#[test]
fn epsilon_names_the_accountant_that_gave_it() {
    let with = |accountant: &str| {
        let mut args = vec!["privacy", "epsilon"];
        args.extend(MNIST);
        args.extend(["--accountant", accountant]);
        ok(&args)
    };
    let pld = with("pld");
    assert!(pld.contains("by pld"), "{pld}");
    // dp-accounting gives 2.38169 here; ours is above it, within 1%.
    let eps = epsilon_of(&pld);
    assert!((2.3816..2.39).contains(&eps), "{pld}");
    let rdp = with("rdp");
    assert!(
        rdp.contains("by rdp") && rdp.contains("optimal order"),
        "{rdp}"
    );
    assert!(epsilon_of(&rdp) > eps);
    // The pessimistic PLD is looser than RDP over 14,062 steps: RDP's bound is reported.
    let loose = with("pld-pessimistic");
    assert!(loose.contains("by rdp"), "{loose}");
    assert_eq!(epsilon_of(&loose), epsilon_of(&rdp));
    // Where the PLD grid would be too large, RDP's finite bound, named.
    let tiny = ok(&[
        "privacy",
        "epsilon",
        "--sample-rate",
        "1",
        "--noise-multiplier",
        "0.01",
        "--steps",
        "3",
        "--delta",
        "1e-5",
        "--accountant",
        "pld",
    ]);
    assert!(
        tiny.contains("by rdp") && epsilon_of(&tiny).is_finite(),
        "{tiny}"
    );
}

#[test]
fn noise_meets_the_target_and_names_the_accountant() {
    let out = ok(&[
        "privacy",
        "noise",
        "--sample-rate",
        "0.01",
        "--epsilon",
        "1",
        "--steps",
        "1000",
        "--delta",
        "1e-6",
        "--accountant",
        "pld",
    ]);
    assert!(out.contains("by pld"), "{out}");
    assert!(epsilon_of(&out) <= 1.0, "{out}");
    let err = fails(&[
        "privacy",
        "epsilon",
        "--sample-rate",
        "0",
        "--noise-multiplier",
        "1",
        "--steps",
        "10",
        "--delta",
        "1e-5",
    ]);
    assert!(err.contains("sample rate"), "{err}");
}
