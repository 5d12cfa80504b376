//! `cargo bench`: runs `freight-kpi bench` with its documented defaults (10 million
//! loads, 2,000 changes/s from 8 writers, 30 s phases) against the scratch database
//! in DATABASE_URL, and writes the outputs to `target/bench-results`.
//!
//! The run takes about a quarter of an hour on 2 cores. `cargo test --benches` builds
//! this file without running it: Cargo passes `--bench` only under `cargo bench`.

use std::process::ExitCode;

use freight_kpi::bench::{execute, BenchArgs};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    if !std::env::args().any(|argument| argument == "--bench") {
        println!("skipped: the freight-kpi bench runs only under `cargo bench`");
        return ExitCode::SUCCESS;
    }

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let args = BenchArgs {
        out: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results"),
        ..BenchArgs::default()
    };
    let database_url = std::env::var("DATABASE_URL").ok();
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime starts");
    runtime.block_on(execute(database_url.as_deref(), &args))
}
