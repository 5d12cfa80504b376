//! The command line: parsing, and running each command with its exit code.
//!
//! Exit codes: 0 success, 1 runtime failure (database unreachable, a statement
//! failed), 2 usage or configuration error (bad flag, invalid `DATABASE_URL`).

use std::process::ExitCode;
use std::time::Duration;

use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::capture::error_chain;
use crate::config::{RunSettings, DEFAULT_CHANNEL};
use crate::db::{connect_dedicated, migrate, DatabaseTarget};
use crate::error::Error;
use crate::kpi::BucketRange;
use crate::reconcile::{reconcile, ReconcileOptions};
use crate::service::{run, ServiceHandles};
use crate::status::read_status;

/// Exit code of a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage or configuration error.
pub const EXIT_USAGE: u8 = 2;

/// Keeps "FreightKpiDaily" exact and fresh as rows of "Load" change.
#[derive(Debug, Parser)]
#[command(name = "freight-kpi", version, about)]
pub struct Cli {
    /// PostgreSQL connection string: a postgres:// URL or key=value pairs.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Log format on standard error; the level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update the schema: tables, the change queue and the triggers on "Load".
    Migrate,
    /// Listen for changes and keep "FreightKpiDaily" fresh until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Recompute a range of buckets from "Load" in one pass and repair any drift.
    Reconcile(ReconcileArgs),
    /// Show the queue depth, the age of the oldest pending change and the last runs.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// NOTIFY channel between writers and the listener.
    #[arg(long, default_value = DEFAULT_CHANNEL)]
    pub channel: String,
    /// Drain once no notification has arrived for this many milliseconds.
    #[arg(long, default_value_t = 50)]
    pub debounce_quiet_ms: u64,
    /// Drain at the latest this many milliseconds after the first notification.
    #[arg(long, default_value_t = 500)]
    pub debounce_max_ms: u64,
    /// Drain this often, in milliseconds, even without a notification.
    #[arg(long, default_value_t = 5_000)]
    pub poll_interval_ms: u64,
    /// Check the listener connection this often, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub ping_interval_ms: u64,
    /// Replace the listener connection when a check takes longer, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub ping_timeout_ms: u64,
    /// Changes claimed from the queue per batch.
    #[arg(long, default_value_t = 5_000)]
    pub batch_size: i64,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// First UTC day to reconcile (YYYY-MM-DD), inclusive.
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last UTC day to reconcile (YYYY-MM-DD), inclusive.
    #[arg(long)]
    pub to: Option<NaiveDate>,
    /// Reconcile only this venture.
    #[arg(long)]
    pub venture: Option<i32>,
    /// Report drift without repairing it.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the parsed command and returns the process exit code. Errors are printed on
/// standard error as one line.
pub async fn execute(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            let code = match error {
                Error::InvalidDatabaseUrl { .. } | Error::InvalidSetting { .. } => EXIT_USAGE,
                _ => EXIT_FAILURE,
            };
            ExitCode::from(code)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), Error> {
    let Some(url) = cli.database_url.as_deref() else {
        return Err(Error::InvalidDatabaseUrl {
            reason: "DATABASE_URL is not set and --database-url was not given".to_owned(),
        });
    };
    let target = DatabaseTarget::parse(url)?;

    match cli.command {
        Command::Migrate => {
            let (mut client, _messages) = connect_dedicated(&target).await?;
            let report = migrate(&mut client).await?;
            if report.applied.is_empty() {
                println!("schema is up to date");
            }
            for name in report.applied {
                println!("applied {name}");
            }
            Ok(())
        }
        Command::Run(args) => {
            let settings = run_settings(target, &args)?;
            run(settings, ServiceHandles::default(), shutdown_signal()).await
        }
        Command::Reconcile(args) => {
            if let (Some(from), Some(to)) = (args.from, args.to) {
                if from > to {
                    return Err(Error::InvalidSetting {
                        key: "--from",
                        value: from.to_string(),
                        allowed: "a day no later than --to",
                    });
                }
            }
            let pool = target.pool(2)?;
            let options = ReconcileOptions {
                range: BucketRange {
                    from: args.from,
                    to: args.to,
                    venture_id: args.venture,
                },
                dry_run: args.dry_run,
            };
            let report = reconcile(&pool, &options).await?;
            let summary = &report.summary;
            println!(
                "reconcile {}: scanned {} buckets, drifted {}, repaired {}, zeroed {}, failed {}{}",
                report.status.as_str(),
                summary.scanned,
                summary.drifted,
                summary.repaired,
                summary.zeroed,
                summary.overflowed.len(),
                if args.dry_run {
                    " (dry run, nothing written)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::Status(args) => {
            let (client, _messages) = connect_dedicated(&target).await?;
            let status = read_status(&client).await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("the status report serializes")
                );
            } else {
                print!("{status}");
            }
            Ok(())
        }
    }
}

fn run_settings(target: DatabaseTarget, args: &RunArgs) -> Result<RunSettings, Error> {
    let positive = |key: &'static str, value: u64| {
        if value == 0 {
            Err(Error::InvalidSetting {
                key,
                value: value.to_string(),
                allowed: "a whole number of milliseconds above 0",
            })
        } else {
            Ok(Duration::from_millis(value))
        }
    };

    let mut settings = RunSettings::new(target);
    settings.channel = args.channel.clone();
    settings.debounce.quiet = positive("--debounce-quiet-ms", args.debounce_quiet_ms)?;
    settings.debounce.max_delay = positive("--debounce-max-ms", args.debounce_max_ms)?;
    settings.poll_interval = positive("--poll-interval-ms", args.poll_interval_ms)?;
    settings.ping_interval = positive("--ping-interval-ms", args.ping_interval_ms)?;
    settings.ping_timeout = positive("--ping-timeout-ms", args.ping_timeout_ms)?;
    if settings.debounce.max_delay < settings.debounce.quiet {
        return Err(Error::InvalidSetting {
            key: "--debounce-max-ms",
            value: args.debounce_max_ms.to_string(),
            allowed: "a value no smaller than --debounce-quiet-ms",
        });
    }
    if args.batch_size < 1 {
        return Err(Error::InvalidSetting {
            key: "--batch-size",
            value: args.batch_size.to_string(),
            allowed: "a whole number above 0",
        });
    }
    settings.drain.batch_size = args.batch_size;
    Ok(settings)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler only fails outside a Tokio runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM received, stopping"),
    }
}
