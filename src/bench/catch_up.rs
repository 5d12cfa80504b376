//! Catch-up: with the service stopped, a backlog of changes is queued; the figure is
//! the time from starting the service to an empty queue.
//!
//! The backlog is written straight into the change queue with `COPY`, one row per
//! change as the triggers write for a single-row write, with buckets drawn from the
//! writers' mix. Queueing a million changes through a million writer transactions
//! would take minutes of the run and measure the writers, not the drain.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures::SinkExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::error::{database, BenchError};
use super::memory::RssSampler;
use super::service::{queue_depth, vacuum_between_runs, RunningService};
use super::workload::Workload;
use crate::db::DatabaseTarget;

/// Time the drain may take before the phase gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3_600);

/// The catch-up phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CatchUp {
    /// Changes queued while the service was stopped.
    pub queued: u64,
    /// Distinct buckets among them.
    pub distinct_buckets: u64,
    /// Loads those buckets held when the backlog was queued, and loads in all buckets,
    /// both by the stored `"loadsInbound"`. An exact drain reads every load of the
    /// queued buckets, so this share, more than the count of changes, sets its cost.
    pub loads_in_buckets: u64,
    pub loads_in_table: u64,
    /// Seconds to queue them with `COPY`.
    pub queue_seconds: f64,
    /// Seconds from starting the service to an empty queue, connection included.
    pub drain_seconds: f64,
    pub changes_per_second: f64,
    /// Batches the service committed, and buckets it recomputed over all of them.
    pub batches: u64,
    pub buckets_recomputed: u64,
    /// Peak resident memory of the bench process while the service drained.
    pub peak_rss_mib: Option<f64>,
}

/// Queues `count` changes, starts the service and times the drain.
///
/// # Errors
///
/// [`BenchError`] when a statement or the service fails, or the drain times out.
pub async fn measure(
    target: &DatabaseTarget,
    control: &Client,
    workload: &Workload,
    count: u64,
    memory: &RssSampler,
    bar: &indicatif::ProgressBar,
) -> Result<CatchUp, BenchError> {
    vacuum_between_runs(control, true).await?;
    let started = Instant::now();
    let distinct_buckets = queue_backlog(control, workload, count, bar).await?;
    let queue_seconds = started.elapsed().as_secs_f64();
    let queued = queue_depth(control).await? as u64;
    let (loads_in_buckets, loads_in_table) = loads_of_queued_buckets(control).await?;

    bar.set_message("draining");
    memory.reset();
    let started = Instant::now();
    let service = RunningService::start(target, control).await?;
    loop {
        let stats = service.stats();
        bar.set_position(stats.changes);
        if stats.changes >= queued && queue_depth(control).await? == 0 {
            break;
        }
        if started.elapsed() >= DRAIN_TIMEOUT {
            let _ = service.stop().await;
            return Err(BenchError::TimedOut {
                what: "the catch-up drain",
                seconds: DRAIN_TIMEOUT.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_seconds = started.elapsed().as_secs_f64();
    let peak_rss_mib = memory.peak_mib();
    let stats = service.stats();
    service.stop().await?;

    Ok(CatchUp {
        queued,
        distinct_buckets,
        loads_in_buckets,
        loads_in_table,
        queue_seconds,
        drain_seconds,
        changes_per_second: queued as f64 / drain_seconds,
        batches: stats.batches,
        buckets_recomputed: stats.buckets,
        peak_rss_mib,
    })
}

/// Returns the loads of the queued buckets and of all buckets, from the stored KPIs.
async fn loads_of_queued_buckets(control: &Client) -> Result<(u64, u64), BenchError> {
    let row = control
        .query_one(
            r#"
            SELECT (SELECT coalesce(sum(f."loadsInbound"), 0)::bigint
                    FROM (SELECT DISTINCT venture_id, day FROM freight_kpi.change_queue) AS queued
                    JOIN "FreightKpiDaily" f
                      ON f."ventureId" = queued.venture_id AND f.date = queued.day) AS in_buckets,
                   (SELECT coalesce(sum("loadsInbound"), 0)::bigint FROM "FreightKpiDaily") AS in_table
            "#,
            &[],
        )
        .await
        .map_err(database("count the loads of the queued buckets"))?;
    let in_buckets: i64 = row.get("in_buckets");
    let in_table: i64 = row.get("in_table");
    Ok((in_buckets as u64, in_table as u64))
}

/// Writes `count` queue rows and returns how many distinct buckets they name.
async fn queue_backlog(
    client: &Client,
    workload: &Workload,
    count: u64,
    bar: &indicatif::ProgressBar,
) -> Result<u64, BenchError> {
    let sink = client
        .copy_in::<_, Bytes>("COPY freight_kpi.change_queue (venture_id, day) FROM STDIN")
        .await
        .map_err(database("start COPY into the change queue"))?;
    futures::pin_mut!(sink);

    let today = Utc::now().date_naive();
    let mut rng = StdRng::seed_from_u64(0x4241_434B);
    let mut buckets = HashSet::new();
    let mut buffer = Vec::with_capacity(1 << 20);
    for written in 1..=count {
        let (venture, day) = workload.pick_change_bucket(&mut rng, today);
        buckets.insert((venture, day));
        buffer.extend_from_slice(format!("{venture}\t{day}\n").as_bytes());
        if buffer.len() >= 1 << 20 || written == count {
            sink.send(Bytes::from(std::mem::take(&mut buffer)))
                .await
                .map_err(database("send COPY data"))?;
            bar.set_position(written);
        }
    }
    sink.as_mut()
        .finish()
        .await
        .map_err(database("finish COPY into the change queue"))?;
    bar.set_position(0);
    Ok(buckets.len() as u64)
}
