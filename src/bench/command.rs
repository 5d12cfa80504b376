//! `freight-kpi bench` on the command line: run, write the outputs, print the
//! targets, and map failures to the exit codes of the other commands.

use std::process::ExitCode;

use super::error::BenchError;
use super::options::BenchArgs;
use super::report::{OUTPUT_CHART, OUTPUT_JSON, OUTPUT_MARKDOWN};
use super::runner::run_bench;
use crate::cli::{EXIT_FAILURE, EXIT_USAGE};
use crate::db::DatabaseTarget;
use crate::error::error_chain;

/// Runs the bench against `database_url` and writes its outputs to `--out`. Returns
/// 0 on success, 2 for a usage error (a bad option, a database with foreign loads)
/// and 1 for any other failure, printed on standard error as one line.
pub async fn execute(database_url: Option<&str>, args: &BenchArgs) -> ExitCode {
    match run_and_write(database_url, args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::from(if error.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

async fn run_and_write(database_url: Option<&str>, args: &BenchArgs) -> Result<(), BenchError> {
    let Some(url) = database_url else {
        return Err(crate::Error::InvalidDatabaseUrl {
            reason: "DATABASE_URL is not set and --database-url was not given; the bench needs a scratch database".to_owned(),
        }
        .into());
    };
    let target = DatabaseTarget::parse(url)?;
    args.validate()?;

    let report = run_bench(&target, args).await?;
    report.write(&args.out)?;

    for check in &report.targets {
        println!(
            "{:<60} {:>14} target {:<20} {}",
            check.name,
            check.measured.map_or("n/a".to_owned(), |value| format!(
                "{value:.2} {}",
                check.unit
            )),
            check.target,
            if check.met { "met" } else { "missed" }
        );
    }
    for name in [OUTPUT_JSON, OUTPUT_MARKDOWN, OUTPUT_CHART] {
        println!("wrote {}", args.out.join(name).display());
    }
    Ok(())
}
