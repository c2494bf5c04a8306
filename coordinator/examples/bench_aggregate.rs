//! ```text
//! cargo run --release -p tutela-coordinator --example bench_aggregate -- [PARAMS] [UPDATES] [THREADS] [--json]
//! ```
//!
//! Runs the aggregation benchmark (the library function behind `tutela bench aggregate`):
//! 50 million parameters × 10 updates by default, the concurrent round on the machine's cores.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let params = numbers.first().copied().unwrap_or(50_000_000);
    let updates = numbers.get(1).copied().unwrap_or(10);
    let threads = numbers
        .get(2)
        .copied()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    match tutela_coordinator::aggregate::bench::bench_fedavg(params, updates, threads) {
        Ok(report) if json => match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("bench_aggregate: {e}");
                std::process::exit(1);
            }
        },
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("bench_aggregate: {e}");
            std::process::exit(1);
        }
    }
}
