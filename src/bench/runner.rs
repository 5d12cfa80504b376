//! The order of the phases and what each one leaves for the next.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use tokio_postgres::Client;

use super::dataset::{self, DatasetShape};
use super::error::{database, BenchError};
use super::freshness::{self, Freshness, FreshnessRun, POLL_INTERVAL, RAMP_MULTIPLES};
use super::machine::{describe, is_local};
use super::memory::{lifetime_peak_mib, RssSampler};
use super::options::BenchArgs;
use super::report::{BenchReport, FinalCheck, FullPass, Generation, Memory};
use super::service::drain_leftovers;
use super::workload::{connect_writers, locate_loads, Workload, Writer};
use super::{catch_up, crossover, full_pass, progress, writer_overhead};
use crate::db::{connect_dedicated, migrate, DatabaseTarget, Pool};
use crate::reconcile::{reconcile, ReconcileOptions};

/// Connections of the bench's own pool, used by reconcile and the crossover's drain.
const POOL_SIZE: usize = 4;

/// Runs every phase against `target` and returns the figures; the caller writes them.
///
/// The database is migrated first. It must be a scratch database: one whose loads
/// the bench generated, or none (see [`dataset::check_ownership`]).
///
/// # Errors
///
/// [`BenchError`] from the first phase that fails.
pub async fn run_bench(
    target: &DatabaseTarget,
    args: &BenchArgs,
) -> Result<BenchReport, BenchError> {
    args.validate()?;
    let started_at = Utc::now();
    let memory = RssSampler::start();
    let mut peaks = BTreeMap::new();
    let mut record_peak = |phase: &str, memory: &RssSampler| {
        if let Some(mib) = memory.peak_mib() {
            peaks.insert(phase.to_owned(), mib);
        }
    };

    let control_target = target.with_application_name("freight-kpi bench");
    let (mut control, _control_messages) = connect_dedicated(&control_target).await?;
    migrate(&mut control).await?;
    let ownership = dataset::check_ownership(&control, args.force).await?;
    let machine = describe(&control, is_local(target.config())).await?;
    dataset::set_triggers(&control, true).await?;
    dataset::clear(&control, ownership).await?;
    let pool = control_target.pool(POOL_SIZE)?;

    tracing::info!(
        loads = args.loads,
        ventures = args.ventures,
        days = args.days,
        "bench phase 1: generate"
    );
    memory.reset();
    let first_id = next_load_id(&control).await?;
    let shape = DatasetShape::plan(args.loads, args.ventures, args.days);
    let (generation, mut by_size) = generate(&control, &pool, &shape, ownership, args).await?;
    dataset::record(&control, args.loads, args.ventures, args.days).await?;
    record_peak("generate", &memory);

    tracing::info!(repeats = args.repeats, "bench phase 2: full pass");
    memory.reset();
    let bar = progress::spinner("full pass");
    let at_full_size =
        full_pass::measure(&control, &pool, ownership, args.loads, args.repeats, &bar).await?;
    bar.finish_and_clear();
    let full_pass_peak = memory.peak_mib();
    record_peak("full pass", &memory);
    by_size.push(at_full_size.clone());

    let workload = locate_loads(&control, &shape, first_id).await?;
    super::service::vacuum_between_runs(&control, true).await?;
    let writers = connect_writers(target, args.writers).await?;

    tracing::info!(writers = args.writers, "bench phase 3: writer overhead");
    memory.reset();
    let (writers, writer_overhead) =
        writer_overhead::measure(target, &control, writers, &workload, args.phase_length()).await?;
    record_peak("writer overhead", &memory);
    // The run without triggers changed loads that no queue row names; repair them.
    reconcile(&pool, &ReconcileOptions::default()).await?;

    super::service::vacuum_between_runs(&control, true).await?;
    tracing::info!(rate = args.rate, "bench phase 4: freshness");
    memory.reset();
    let (writers, freshness) =
        measure_freshness(target, &control, writers, &workload, args).await?;
    record_peak("freshness", &memory);
    // A rate that was not sustained leaves a backlog, which is not part of catch-up.
    drain_leftovers(&pool).await?;

    tracing::info!(queued = args.queued, "bench phase 5: catch-up");
    let bar = progress::counter("catch-up", args.queued);
    let catch_up =
        catch_up::measure(target, &control, &workload, args.queued, &memory, &bar).await?;
    bar.finish_and_clear();
    record_peak("catch-up", &memory);

    tracing::info!("bench phase 6: crossover");
    memory.reset();
    let bar = progress::spinner("crossover");
    let (writers, crossover) = crossover::measure(
        &control,
        &pool,
        writers,
        &workload,
        f64::from(args.rate),
        args.step_length(),
        &bar,
    )
    .await?;
    bar.finish_and_clear();
    record_peak("crossover", &memory);
    drop(writers);

    let final_check = final_check(&pool).await?;
    pool.close();

    let mut report = BenchReport {
        started_at,
        finished_at: Utc::now(),
        command: command_line(args),
        options: args.clone(),
        machine,
        generation,
        full_pass: FullPass {
            at_full_size,
            by_size,
            peak_rss_mib: full_pass_peak,
        },
        writer_overhead,
        freshness,
        catch_up,
        crossover,
        memory: Memory {
            peak_rss_mib_by_phase: peaks,
            lifetime_peak_mib: lifetime_peak_mib(),
        },
        final_check,
        targets: Vec::new(),
    };
    report.targets = report.check_targets();
    Ok(report)
}

/// Reserves the next id of "Load", so the generated loads start right after it.
async fn next_load_id(client: &Client) -> Result<i64, BenchError> {
    let reserved: i64 = client
        .query_one(
            r#"SELECT nextval(pg_get_serial_sequence('"Load"', 'id'))"#,
            &[],
        )
        .await
        .map_err(database("read the next load id"))?
        .get(0);
    Ok(reserved + 1)
}

/// Generates the dataset in growing chunks and measures the full pass at each
/// intermediate size, once each; the full size is measured by phase 2.
async fn generate(
    control: &Client,
    pool: &Pool,
    shape: &DatasetShape,
    ownership: dataset::Ownership,
    args: &BenchArgs,
) -> Result<(Generation, Vec<full_pass::FullPassPoint>), BenchError> {
    let bar = progress::counter("generate", args.loads);
    let steps = shape.size_steps();
    let mut loaded = 0;
    let mut copy_seconds = 0.0;
    let mut vacuum_seconds = 0.0;
    let mut by_size = Vec::new();

    for (index, days) in steps.iter().enumerate() {
        bar.set_message("");
        let timing = dataset::generate(control, shape, days.clone(), &bar).await?;
        loaded += timing.loads;
        copy_seconds += timing.copy_seconds;
        vacuum_seconds += timing.vacuum_seconds;
        if index + 1 < steps.len() {
            let point = full_pass::measure(control, pool, ownership, loaded, 1, &bar).await?;
            by_size.push(point);
        }
    }
    bar.finish_and_clear();

    let generation = Generation {
        loads: loaded,
        ventures: args.ventures,
        days: args.days,
        largest_venture_share: shape.largest_venture_share(),
        copy_seconds,
        vacuum_seconds,
        loads_per_second: loaded as f64 / copy_seconds,
        loads_per_second_with_vacuum: loaded as f64 / (copy_seconds + vacuum_seconds),
    };
    tracing::info!(
        loads = loaded,
        loads_per_second = generation.loads_per_second,
        "dataset generated"
    );
    Ok((generation, by_size))
}

/// Runs the freshness run at `--rate`, then the ramp until a rate is not sustained.
async fn measure_freshness(
    target: &DatabaseTarget,
    control: &Client,
    writers: Vec<Writer>,
    workload: &Workload,
    args: &BenchArgs,
) -> Result<(Vec<Writer>, Freshness), BenchError> {
    let rate = f64::from(args.rate);
    let bar = progress::timed("freshness", args.phase_length());
    bar.enable_steady_tick(Duration::from_millis(250));
    let (mut writers, at_rate) = freshness::measure_run(
        target,
        control,
        writers,
        workload,
        rate,
        args.phase_length(),
        0,
    )
    .await?;
    bar.finish_and_clear();

    let mut ramp: Vec<FreshnessRun> = Vec::new();
    let mut max_sustained_rate = if at_rate.sustained { rate } else { 0.0 };
    let mut ramp_ended_by = None;
    for (index, multiple) in RAMP_MULTIPLES.iter().enumerate() {
        let step_rate = rate * multiple;
        if *multiple > 1.0 && !at_rate.sustained {
            ramp_ended_by = at_rate.limited_by.clone();
            break;
        }
        let bar = progress::timed(&format!("{step_rate:.0}/s"), args.step_length());
        bar.enable_steady_tick(Duration::from_millis(250));
        let run_index = index as i32 + 1;
        let (back, run) = freshness::measure_run(
            target,
            control,
            writers,
            workload,
            step_rate,
            args.step_length(),
            run_index,
        )
        .await?;
        bar.finish_and_clear();
        writers = back;
        let sustained = run.sustained;
        let reason = run.limited_by.clone();
        ramp.push(run);
        if sustained {
            max_sustained_rate = max_sustained_rate.max(step_rate);
        } else if *multiple > 1.0 {
            ramp_ended_by = Some(format!(
                "{step_rate:.0} changes/s was not sustained: {}",
                reason.unwrap_or_default()
            ));
            break;
        }
    }

    Ok((
        writers,
        Freshness {
            poll_interval_ms: POLL_INTERVAL.as_secs_f64() * 1000.0,
            at_rate,
            ramp,
            max_sustained_rate,
            ramp_ended_by: ramp_ended_by
                .unwrap_or_else(|| "every rate of the ramp was sustained".to_owned()),
        },
    ))
}

/// Checks, with a dry-run reconcile, that the KPI table matches "Load" after all the
/// phases' writes.
async fn final_check(pool: &Pool) -> Result<FinalCheck, BenchError> {
    drain_leftovers(pool).await?;
    let report = reconcile(
        pool,
        &ReconcileOptions {
            dry_run: true,
            ..ReconcileOptions::default()
        },
    )
    .await?;
    Ok(FinalCheck {
        buckets: report.summary.scanned,
        drifted_buckets: report.summary.drifted,
    })
}

fn command_line(args: &BenchArgs) -> String {
    let mut line = format!(
        "freight-kpi bench --loads {} --ventures {} --days {} --rate {} --duration {} --writers {} --queued {} --repeats {} --out {}",
        args.loads,
        args.ventures,
        args.days,
        args.rate,
        args.duration,
        args.writers,
        args.queued,
        args.repeats,
        args.out.display()
    );
    if args.force {
        line.push_str(" --force");
    }
    line
}
