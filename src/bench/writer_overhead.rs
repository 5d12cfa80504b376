//! Writer overhead: throughput of the writers at full speed with the capture triggers
//! disabled, enabled, and enabled with the service running and draining.

use std::time::Duration;

use tokio_postgres::Client;

use super::dataset::set_triggers;
use super::error::BenchError;
use super::progress;
use super::service::{vacuum_between_runs, wait_for_empty_queue, RunningService};
use super::workload::{run_writers, Pace, Workload, Writer};
use crate::db::DatabaseTarget;

/// Rounds over the three configurations. The second round runs them in reverse
/// order, so a machine that slows down or speeds up over the phase biases none.
const ROUNDS: usize = 2;

/// Time the service gets to drain the backlog of the triggers-only run before its
/// own measurement starts.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(1_800);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Configuration {
    /// `ALTER TABLE "Load" DISABLE TRIGGER USER`, no service.
    WithoutTriggers,
    /// Triggers enabled, no service: the queue grows.
    WithTriggers,
    /// Triggers enabled and the service draining the queue.
    WithService,
}

impl Configuration {
    fn label(self) -> &'static str {
        match self {
            Configuration::WithoutTriggers => "without triggers",
            Configuration::WithTriggers => "with triggers",
            Configuration::WithService => "with service",
        }
    }
}

/// One measured run of one configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OverheadRun {
    pub configuration: Configuration,
    pub changes: u64,
    pub seconds: f64,
    pub changes_per_second: f64,
}

/// The writer-overhead phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WriterOverhead {
    pub writers: usize,
    /// Transactions per second, each one single-row update or insert, summed over
    /// the rounds.
    pub without_triggers_tps: f64,
    pub with_triggers_tps: f64,
    pub with_service_tps: f64,
    /// Throughput as a share of the run without triggers.
    pub with_triggers_ratio: f64,
    pub with_service_ratio: f64,
    pub runs: Vec<OverheadRun>,
}

/// Runs the three configurations for `length` each, split over [`ROUNDS`] rounds.
///
/// # Errors
///
/// [`BenchError`] when a writer, the service or a statement fails; the triggers are
/// enabled again before the error is returned.
pub async fn measure(
    target: &DatabaseTarget,
    control: &Client,
    mut writers: Vec<Writer>,
    workload: &Workload,
    length: Duration,
) -> Result<(Vec<Writer>, WriterOverhead), BenchError> {
    let count = writers.len();
    let share = length / ROUNDS as u32;
    let mut order = vec![
        Configuration::WithoutTriggers,
        Configuration::WithTriggers,
        Configuration::WithService,
    ];
    let mut runs = Vec::new();

    for round in 0..ROUNDS {
        for &configuration in &order {
            let bar = progress::timed(configuration.label(), share);
            bar.enable_steady_tick(Duration::from_millis(250));
            let (back, run) =
                measure_one(target, control, writers, workload, configuration, share).await?;
            bar.finish_and_clear();
            tracing::info!(
                round,
                configuration = configuration.label(),
                tps = run.changes_per_second,
                "writer overhead run finished"
            );
            writers = back;
            runs.push(run);
        }
        order.reverse();
    }

    let throughput = |configuration: Configuration| {
        let (changes, seconds) = runs
            .iter()
            .filter(|run| run.configuration == configuration)
            .fold((0, 0.0), |(changes, seconds), run| {
                (changes + run.changes, seconds + run.seconds)
            });
        changes as f64 / seconds
    };
    let without_triggers_tps = throughput(Configuration::WithoutTriggers);
    let with_triggers_tps = throughput(Configuration::WithTriggers);
    let with_service_tps = throughput(Configuration::WithService);
    Ok((
        writers,
        WriterOverhead {
            writers: count,
            without_triggers_tps,
            with_triggers_tps,
            with_service_tps,
            with_triggers_ratio: with_triggers_tps / without_triggers_tps,
            with_service_ratio: with_service_tps / without_triggers_tps,
            runs,
        },
    ))
}

async fn measure_one(
    target: &DatabaseTarget,
    control: &Client,
    writers: Vec<Writer>,
    workload: &Workload,
    configuration: Configuration,
    length: Duration,
) -> Result<(Vec<Writer>, OverheadRun), BenchError> {
    vacuum_between_runs(control, false).await?;
    let service = match configuration {
        Configuration::WithoutTriggers => {
            set_triggers(control, false).await?;
            None
        }
        Configuration::WithTriggers => None,
        Configuration::WithService => {
            let service = RunningService::start(target, control).await?;
            wait_for_empty_queue(control, BACKLOG_TIMEOUT).await?;
            vacuum_between_runs(control, false).await?;
            Some(service)
        }
    };

    let outcome = run_writers(writers, workload, Pace::FullSpeed, length, None).await;

    if configuration == Configuration::WithoutTriggers {
        set_triggers(control, true).await?;
    }
    if let Some(service) = service {
        service.stop().await?;
    }
    let (writers, tally, elapsed) = outcome?;
    let seconds = elapsed.as_secs_f64();
    Ok((
        writers,
        OverheadRun {
            configuration,
            changes: tally.changes,
            seconds,
            changes_per_second: tally.changes as f64 / seconds,
        },
    ))
}
