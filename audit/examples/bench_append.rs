//! Same as `tutela bench audit-append`, without building the CLI:
//! `cargo run --release -p tutela-audit --example bench_append -- DATABASE_URL [WRITERS PER_WRITER IN_FLIGHT,.. CHECKPOINT_EVERY]`

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args.first().ok_or_else(|| {
        anyhow::anyhow!(
            "usage: bench_append DATABASE_URL [WRITERS PER_WRITER IN_FLIGHT,.. CHECKPOINT_EVERY]"
        )
    })?;
    let writers = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(8);
    let per_writer = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5000);
    let in_flight: Vec<usize> = match args.get(3) {
        Some(s) => s.split(',').map(|x| x.parse()).collect::<Result<_, _>>()?,
        None => vec![1, 16],
    };
    let checkpoint_every = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let (rates, settings) =
        tutela_audit::bench::append(url, writers, per_writer, &in_flight, checkpoint_every).await?;
    for (k, v) in settings {
        println!("{k} = {v}");
    }
    for r in rates {
        println!(
            "{:<70} {:>9} rows in {:>7.3} s: {:>9.0} rows/s",
            r.what, r.rows, r.seconds, r.per_second
        );
    }
    Ok(())
}
