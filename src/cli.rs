//! The command line: parsing, and running each command with its exit code.
//!
//! Exit codes:
//!
//! - 0: success.
//! - 1: runtime failure (database unreachable, a statement failed).
//! - 2: usage or configuration error (bad flag, invalid `DATABASE_URL`).
//! - 3: `reconcile` skipped because another instance has the job's lock.
//! - 4: `reconcile` finished PARTIAL: it wrote the other buckets, but some could not
//!   be written because a value overflows its column.
//!
//! A reader that closes standard output early (`| head`) ends a command with 0.

use std::process::ExitCode;
use std::time::Duration;

use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{RunSettings, DEFAULT_CHANNEL};
use crate::db::{connect_dedicated, migrate, uninstall, DatabaseTarget, UninstallOptions};
use crate::error::error_chain;
use crate::error::Error;
use crate::kpi::BucketRange;
use crate::reconcile::{reconcile_job, ReconcileOptions};
use crate::service::{run, ServiceHandles};
use crate::status::read_status;

/// Exit code of a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a `reconcile` skipped because another instance holds the job's lock;
/// the skipped run is logged in "JobRunLog" as SKIPPED.
pub const EXIT_LOCK_HELD: u8 = 3;
/// Exit code of a `reconcile` that finished PARTIAL: some buckets could not be written.
pub const EXIT_PARTIAL: u8 = 4;

/// Upper bound of `--debounce-quiet-ms` and `--debounce-max-ms`. Changes wait at most
/// the debounce before their batch, so a longer window only makes the KPIs stale.
const MAX_DEBOUNCE_MS: u64 = 60_000;
const MAX_DEBOUNCE_ALLOWED: &str = "a whole number of milliseconds from 1 to 60000 (1 minute)";

/// Upper bound of `--poll-interval-ms` and `--ping-interval-ms`: a silent listener
/// connection or a lost notification is found within this time at the latest.
const MAX_INTERVAL_MS: u64 = 3_600_000;
const MAX_INTERVAL_ALLOWED: &str = "a whole number of milliseconds from 1 to 3600000 (1 hour)";

/// Upper bound of `--ping-timeout-ms`, which limits every statement on the listener
/// connection: a longer one would leave a silent connection in place for minutes.
const MAX_PING_TIMEOUT_MS: u64 = 60_000;
const MAX_PING_TIMEOUT_ALLOWED: &str = "a whole number of milliseconds from 1 to 60000 (1 minute)";

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

    /// TOML file of settings, below flags and environment variables in precedence.
    #[arg(long, global = true, env = crate::config_file::CONFIG_ENV)]
    pub config: Option<std::path::PathBuf>,

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
    /// Measure freshness, writer overhead and full-pass cost on a scratch database.
    Bench(crate::bench::BenchArgs),
    /// Drop what migrate installed of the service's own objects (the triggers on "Load"
    /// and the schema freight_kpi); the application's tables, types and rows stay.
    Uninstall(UninstallArgs),
    /// Try the service end to end: a throwaway PostgreSQL cluster (unless DATABASE_URL is
    /// set), generated loads, live changes and a refreshed view of the KPI rows.
    Demo(crate::demo::DemoArgs),
    /// Print the configuration `run` would use, from flags, environment and the
    /// --config file, with secrets redacted.
    Config,
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
    /// Replace the listener connection when a check, or any other statement on it,
    /// takes longer, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub ping_timeout_ms: u64,
    /// Oldest queue rows a batch claims, together with every other queued change of
    /// their buckets. While batches find it full it doubles, up to 16 times this value.
    #[arg(long, default_value_t = 5_000)]
    pub batch_size: i64,
    /// Address of the /metrics, /healthz and /readyz endpoint (IP:PORT, port 0 picks a
    /// free one), or off.
    #[arg(long, default_value = crate::observe::DEFAULT_HTTP_ADDRESS)]
    pub http: crate::observe::HttpAddress,
    /// /readyz reports not ready while the oldest pending change is older than this
    /// many milliseconds.
    #[arg(long, default_value_t = crate::observe::DEFAULT_READY_MAX_QUEUE_AGE.as_millis() as u64)]
    pub ready_max_queue_age_ms: u64,
    #[command(flatten)]
    pub jobs: crate::jobs::JobArgs,
    #[command(flatten)]
    pub schedule: crate::jobs::ScheduleArgs,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Print what would be dropped and drop nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Uninstall even while a `freight-kpi run` is listening; it then fails on every
    /// batch until it is stopped.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// First UTC day to reconcile (YYYY-MM-DD), inclusive.
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last UTC day to reconcile (YYYY-MM-DD), inclusive.
    #[arg(long)]
    pub to: Option<NaiveDate>,
    /// Reconcile only this venture. Negative ids are accepted as `--venture -1`.
    #[arg(long, allow_negative_numbers = true)]
    pub venture: Option<i32>,
    /// Report drift without repairing it.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub jobs: crate::jobs::JobArgs,
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
    // The bench has errors of its own and maps them to the same exit codes.
    if let Command::Bench(args) = &cli.command {
        return crate::bench::execute(cli.database_url.as_deref(), args).await;
    }
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report_error(&error),
    }
}

/// Prints `error` on standard error as one line and returns its exit code.
///
/// A broken pipe on standard output means that the reader stopped reading (`status |
/// head -1`), which is its choice, so it ends the command with 0 and no message.
pub fn report_error(error: &Error) -> ExitCode {
    if let Error::Stdout(source) = error {
        if source.kind() == std::io::ErrorKind::BrokenPipe {
            return ExitCode::SUCCESS;
        }
    }
    eprintln!("error: {}", error_chain(error));
    let code = match error {
        Error::InvalidDatabaseUrl { .. }
        | Error::InvalidSetting { .. }
        | Error::InvalidArguments(_) => EXIT_USAGE,
        Error::JobSkipped { .. } => EXIT_LOCK_HELD,
        Error::JobPartial { .. } => EXIT_PARTIAL,
        _ => EXIT_FAILURE,
    };
    ExitCode::from(code)
}

/// Writes `text` to standard output through its lock. Unlike `print!`, which panics
/// when the reader has closed the pipe, a failed write becomes an error.
///
/// # Errors
///
/// [`Error::Stdout`] when the write or the flush fails.
pub fn write_stdout(text: &str) -> Result<(), Error> {
    use std::io::Write;

    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(Error::Stdout)
}

async fn dispatch(cli: Cli) -> Result<(), Error> {
    if let Command::Demo(args) = &cli.command {
        return crate::demo::run_demo(args, cli.database_url.as_deref()).await;
    }
    let Some(url) = cli.database_url.as_deref() else {
        return Err(Error::InvalidDatabaseUrl {
            reason: "DATABASE_URL is not set and --database-url was not given".to_owned(),
        });
    };
    let target = DatabaseTarget::parse(url)?;

    match cli.command {
        Command::Demo(_) => unreachable!("the demo is dispatched before DATABASE_URL is required"),
        Command::Config => unreachable!("the binary prints the configuration before dispatch"),
        Command::Uninstall(args) => {
            let (mut client, _messages) = connect_dedicated(&target).await?;
            let options = UninstallOptions {
                dry_run: args.dry_run,
                force: args.force,
            };
            write_stdout(&uninstall(&mut client, options).await?.to_string())
        }
        Command::Migrate => {
            let (mut client, _messages) = connect_dedicated(&target).await?;
            let report = migrate(&mut client).await?;
            let mut output = String::new();
            if report.applied.is_empty() {
                output.push_str("schema is up to date\n");
            }
            for name in report.applied {
                output.push_str(&format!("applied {name}\n"));
            }
            write_stdout(&output)
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
            let options = ReconcileOptions {
                range: BucketRange {
                    from: args.from,
                    to: args.to,
                    venture_id: args.venture,
                },
                dry_run: args.dry_run,
            };
            let (run_id, status, summary) = reconcile_under_lock(&target, &args, &options).await?;
            let summary = &summary;
            write_stdout(&format!(
                "reconcile {}: scanned {} buckets, drifted {}, repaired {}, zeroed {}, failed {}{}\n",
                status.as_str(),
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
            ))?;
            if status == crate::jobs::RunStatus::Partial {
                return Err(Error::JobPartial {
                    job: "KPI_AGGREGATION",
                    run_id,
                    reason: format!(
                        "{} buckets could not be written because a value overflows its column",
                        summary.overflowed.len()
                    ),
                });
            }
            Ok(())
        }
        Command::Bench(_) => unreachable!("execute runs the bench before dispatching"),
        Command::Status(args) => {
            let (client, _messages) = connect_dedicated(&target).await?;
            let status = read_status(&client).await?;
            let output = if args.json {
                let json =
                    serde_json::to_string_pretty(&status).expect("the status report serializes");
                format!("{json}\n")
            } else {
                status.to_string()
            };
            write_stdout(&output)
        }
    }
}

/// Checks the flags of `run` and returns its settings. `freight-kpi config` runs the
/// same checks, so it rejects what `run` would reject.
///
/// # Errors
///
/// [`Error::InvalidSetting`] naming the flag, the value and what is allowed.
pub fn run_settings(target: DatabaseTarget, args: &RunArgs) -> Result<RunSettings, Error> {
    let milliseconds = |key: &'static str, value: u64, max: u64, allowed: &'static str| {
        if value == 0 || value > max {
            Err(Error::InvalidSetting {
                key,
                value: value.to_string(),
                allowed,
            })
        } else {
            Ok(Duration::from_millis(value))
        }
    };

    let mut settings = RunSettings::new(target);
    settings.channel = args.channel.clone();
    settings.debounce.quiet = milliseconds(
        "--debounce-quiet-ms",
        args.debounce_quiet_ms,
        MAX_DEBOUNCE_MS,
        MAX_DEBOUNCE_ALLOWED,
    )?;
    settings.debounce.max_delay = milliseconds(
        "--debounce-max-ms",
        args.debounce_max_ms,
        MAX_DEBOUNCE_MS,
        MAX_DEBOUNCE_ALLOWED,
    )?;
    settings.poll_interval = milliseconds(
        "--poll-interval-ms",
        args.poll_interval_ms,
        MAX_INTERVAL_MS,
        MAX_INTERVAL_ALLOWED,
    )?;
    settings.ping_interval = milliseconds(
        "--ping-interval-ms",
        args.ping_interval_ms,
        MAX_INTERVAL_MS,
        MAX_INTERVAL_ALLOWED,
    )?;
    settings.ping_timeout = milliseconds(
        "--ping-timeout-ms",
        args.ping_timeout_ms,
        MAX_PING_TIMEOUT_MS,
        MAX_PING_TIMEOUT_ALLOWED,
    )?;
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
    settings.jobs.lock = args.jobs.lock_settings()?;
    settings.jobs.alerts = args.jobs.alert_settings(settings.target.dbname())?;
    args.schedule.apply(&mut settings.jobs)?;
    settings.http = args.http.0.map(|address| crate::observe::HttpSettings {
        address,
        ready_max_queue_age: Duration::from_millis(args.ready_max_queue_age_ms),
    });
    Ok(settings)
}

/// Runs `freight-kpi reconcile` as job KPI_AGGREGATION under the job lock, with its
/// alerts, and returns the run's id, status and figures.
///
/// # Errors
///
/// [`Error::JobSkipped`] when another instance holds the lock, [`Error::JobFailed`]
/// when the run ended ERROR, and the lock's or run log's errors.
async fn reconcile_under_lock(
    target: &DatabaseTarget,
    args: &ReconcileArgs,
    options: &ReconcileOptions,
) -> Result<(i64, crate::jobs::RunStatus, crate::kpi::FullPassSummary), Error> {
    use crate::jobs::{new_holder_id, AlertDispatcher, JobContext, JobRun, Trigger};

    let lock = args.jobs.lock_settings()?;
    let alert_settings = args.jobs.alert_settings(target.dbname())?;
    let (alerts, dispatcher) = AlertDispatcher::start(&alert_settings)?;
    let context = JobContext::new(target.pool(3)?, lock, new_holder_id(), alerts);

    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    let run = reconcile_job(&context, options, Trigger::Manual, &shutdown).await;

    // Alerts of this run get their full retry budget before the process exits.
    let budget = alert_settings.timeout * alert_settings.attempts + Duration::from_secs(2);
    dispatcher.finish(budget).await;
    match run? {
        JobRun::Skipped { run_id, holder } => {
            write_stdout(&format!(
                "reconcile SKIPPED: the job lock is held elsewhere ({holder}); logged as run {run_id}\n"
            ))?;
            Err(Error::JobSkipped {
                job: "KPI_AGGREGATION",
            })
        }
        JobRun::Finished {
            run_id,
            status,
            output: Some(summary),
            ..
        } => Ok((run_id, status, summary)),
        JobRun::Finished { run_id, error, .. } => Err(Error::JobFailed {
            job: "KPI_AGGREGATION",
            run_id,
            reason: error.unwrap_or_else(|| "no reason recorded".to_owned()),
        }),
    }
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    #[test]
    fn reconcile_accepts_negative_venture() {
        let cli = Cli::try_parse_from(["freight-kpi", "reconcile", "--venture", "-1"])
            .expect("a negative venture id parses");

        let Command::Reconcile(args) = cli.command else {
            panic!("parsed {:?} instead of reconcile", cli.command);
        };
        assert_eq!(args.venture, Some(-1));
    }
}
