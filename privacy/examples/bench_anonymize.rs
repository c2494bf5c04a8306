//! Benchmark: k = 5 anonymization of 1,000,000 synthetic rows, 10 columns, 4 quasi-identifiers.
//!
//! `cargo run --release -p tutela-privacy --example bench_anonymize [rows]`
//!
//! Reports generation time, pipeline time, rows/s and peak resident memory (VmHWM).

use std::time::Instant;

use tutela_privacy::anonymize::corpus::SplitMix64;
use tutela_privacy::anonymize::{Date, Pipeline, SiteSecret, Table, Value};

const SCHEMA: &str = r#"
[[column]]
name = "patient_id"
role = "direct_identifier"
type = "text"
[[column]]
name = "age"
role = "quasi_identifier"
type = "int"
[[column]]
name = "zip"
role = "quasi_identifier"
type = "text"
[[column]]
name = "sex"
role = "quasi_identifier"
type = "text"
[[column]]
name = "admitted"
role = "quasi_identifier"
type = "date"
[[column]]
name = "diagnosis"
role = "sensitive"
type = "text"
[[column]]
name = "bmi"
role = "feature"
type = "float"
[[column]]
name = "systolic"
role = "feature"
type = "int"
[[column]]
name = "smoker"
role = "feature"
type = "int"
[[column]]
name = "outcome"
role = "label"
type = "int"
"#;

const CONFIG: &str = r#"
[columns.patient_id]
action = "pseudonymize"
[k_anonymity]
k = 5
max_suppression = 0.01
[[k_anonymity.qi]]
column = "age"
levels = [{ action = "bin", width = 5 }, { action = "bin", width = 10 }, { action = "bin", width = 20 }, { action = "suppress" }]
[[k_anonymity.qi]]
column = "zip"
levels = [{ action = "prefix", keep = 4 }, { action = "prefix", keep = 3 }, { action = "prefix", keep = 2 }, { action = "suppress" }]
[[k_anonymity.qi]]
column = "sex"
levels = [{ action = "suppress" }]
[[k_anonymity.qi]]
column = "admitted"
levels = [{ action = "date_truncate", to = "month" }, { action = "date_truncate", to = "year" }, { action = "suppress" }]
"#;

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let pipeline = Pipeline::from_toml(SCHEMA, CONFIG)?;
    let diags = [
        "flu",
        "asthma",
        "diabetes",
        "copd",
        "hypertension",
        "migraine",
    ];
    let t0 = Instant::now();
    let mut rng = SplitMix64::new(42);
    let base = Date::from_ymd(2021, 1, 1).ok_or("date")?;
    let rows = (0..n)
        .map(|i| {
            vec![
                Value::Text(format!("P{i:08}")),
                Value::Int(18 + rng.below(72) as i64),
                Value::Text(format!("{:05}", 10_000 + rng.below(2_000) * 37)),
                Value::Text(if rng.below(2) == 0 { "F" } else { "M" }.into()),
                Value::Date(base.add_days(rng.below(3 * 365) as i32)),
                Value::Text(diags[rng.below(6) as usize].into()),
                Value::Float(18.0 + rng.below(200) as f64 / 10.0),
                Value::Int(100 + rng.below(80) as i64),
                Value::Int(rng.below(2) as i64),
                Value::Int(rng.below(2) as i64),
            ]
        })
        .collect();
    let table = Table {
        schema: pipeline.schema().clone(),
        rows,
    };
    let gen_s = t0.elapsed().as_secs_f64();
    let hwm_before = vm_hwm_kib().unwrap_or(0);
    let secret = SiteSecret::new(&[7u8; 32])?;
    let t1 = Instant::now();
    let (out, report) = pipeline.run(&table, &secret)?;
    let run_s = t1.elapsed().as_secs_f64();
    let k = report.k_anonymity.as_ref().ok_or("no k report")?;
    println!("rows {n}, columns 10, QIs 4, k = 5, max suppression 1 %");
    println!(
        "generate: {gen_s:.2} s; anonymize: {run_s:.2} s = {:.0} rows/s",
        n as f64 / run_s
    );
    println!(
        "levels {:?}; k achieved {}; suppressed {}; classes {}; NCP {:.4}; nodes evaluated {} of {}",
        k.levels
            .iter()
            .map(|l| (l.column.as_str(), l.level))
            .collect::<Vec<_>>(),
        k.k_achieved,
        k.suppressed_rows,
        k.equivalence_classes,
        k.loss_ncp,
        k.nodes_evaluated,
        k.lattice_size
    );
    println!(
        "rows out {}; VmHWM after generation {} MiB, at end {} MiB",
        out.rows.len(),
        hwm_before / 1024,
        vm_hwm_kib().unwrap_or(0) / 1024
    );
    Ok(())
}
