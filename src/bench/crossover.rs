//! Crossover: the database time the incremental path spends per minute at several
//! change rates, against the cost of one full pass. A second sweep times the
//! recompute of a growing share of all buckets by key, against the same full pass.
//!
//! The incremental cost is the wall time of the service's own batch code
//! ([`crate::capture::drain_queue`]) driven on the listener's cycle under steady
//! writes: drain everything, wait the default quiet window, drain again. Wall time of
//! a batch transaction is database time plus a round trip per statement.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::error::{database, BenchError};
use super::full_pass::median;
use super::service::{vacuum_between_runs, wait_for_empty_queue};
use super::workload::{run_writers, Pace, Workload, Writer};
use crate::capture::{drain_queue, DrainSettings};
use crate::db::Pool;
use crate::kpi::{lock_buckets, recompute_buckets, Bucket};
use crate::listen::Debounce;
use crate::reconcile::{reconcile, ReconcileOptions};

/// Multiples of `--rate` measured.
pub const RATE_MULTIPLES: &[f64] = &[0.25, 0.5, 1.0, 2.0, 4.0];

/// Shares of all buckets recomputed by key. The sweep stops after the first share
/// that costs more than [`SWEEP_STOP_RATIO`] full passes.
const DIRTY_SHARES: &[f64] = &[0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0];
const SWEEP_STOP_RATIO: f64 = 1.5;

/// Repetitions of the full pass measured here, for its median.
const FULL_PASS_REPEATS: usize = 3;

/// Incremental cost at one rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RatePoint {
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub seconds: f64,
    /// Seconds of batch transactions per minute of writes.
    pub db_seconds_per_minute: f64,
    /// The same, divided by one full pass.
    pub full_passes_per_minute: f64,
    /// Minutes between full passes that would cost the same database time: a full
    /// pass this often is cheaper than incremental at this rate only if it also
    /// keeps the KPIs fresh enough.
    pub equal_cost_full_pass_every_minutes: f64,
    pub batches: u64,
    pub buckets_recomputed: u64,
}

/// Recompute of a share of all buckets by key, in one batch statement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirtyPoint {
    pub share: f64,
    pub buckets: u64,
    pub seconds: f64,
    /// Seconds divided by one full pass.
    pub full_pass_ratio: f64,
}

/// The crossover phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Crossover {
    /// Median of a warm reconcile over the whole table as it is at this phase.
    pub full_pass_seconds: f64,
    pub rates: Vec<RatePoint>,
    /// Change rate at which the incremental path spends one full pass of database
    /// time per minute, from a straight-line fit of the points. It is `None` when the
    /// fit does not rise, or when even an idle incremental path costs more than one
    /// full pass per minute, as on a small table.
    pub crossover_rate: Option<f64>,
    /// Whether the crossover lies beyond the highest measured rate.
    pub crossover_extrapolated: bool,
    pub dirty_shares: Vec<DirtyPoint>,
    /// Share of all buckets at which recomputing them by key costs one full pass,
    /// interpolated; `None` when no measured share reached it.
    pub break_even_share: Option<f64>,
}

/// Measures the incremental cost at each rate and the dirty-share sweep.
///
/// # Errors
///
/// [`BenchError`] when a writer or a statement fails.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    control: &Client,
    pool: &Pool,
    mut writers: Vec<Writer>,
    workload: &Workload,
    rate: f64,
    step: Duration,
    bar: &indicatif::ProgressBar,
) -> Result<(Vec<Writer>, Crossover), BenchError> {
    wait_for_empty_queue(control, Duration::from_secs(1_800)).await?;
    vacuum_between_runs(control, true).await?;

    bar.set_message("full pass");
    let mut samples = Vec::new();
    for _ in 0..FULL_PASS_REPEATS {
        let started = Instant::now();
        reconcile(pool, &ReconcileOptions::default()).await?;
        samples.push(started.elapsed().as_secs_f64());
    }
    let full_pass_seconds = median(&samples);

    let mut rates = Vec::new();
    for multiple in RATE_MULTIPLES {
        let target_rate = (rate * multiple).max(1.0);
        bar.set_message(format!("incremental at {target_rate:.0} changes/s"));
        vacuum_between_runs(control, false).await?;
        let (back, point) = measure_rate(
            pool,
            writers,
            workload,
            target_rate,
            step,
            full_pass_seconds,
        )
        .await?;
        writers = back;
        rates.push(point);
    }
    let (crossover_rate, crossover_extrapolated) = crossover_rate(&rates, full_pass_seconds);

    bar.set_message("recompute by key");
    let dirty_shares = sweep_dirty_shares(control, pool, full_pass_seconds).await?;
    let break_even_share = break_even(&dirty_shares);
    Ok((
        writers,
        Crossover {
            full_pass_seconds,
            rates,
            crossover_rate,
            crossover_extrapolated,
            dirty_shares,
            break_even_share,
        },
    ))
}

async fn measure_rate(
    pool: &Pool,
    writers: Vec<Writer>,
    workload: &Workload,
    rate: f64,
    length: Duration,
    full_pass_seconds: f64,
) -> Result<(Vec<Writer>, RatePoint), BenchError> {
    let settings = DrainSettings::default();
    let quiet = Debounce::default().quiet;
    let writing = run_writers(writers, workload, Pace::PerSecond(rate), length, None);
    futures::pin_mut!(writing);

    let started = Instant::now();
    let mut busy = Duration::ZERO;
    let mut batches = 0;
    let mut buckets = 0;
    let outcome = loop {
        let drained = Instant::now();
        drain_queue(
            pool,
            &settings,
            |report| {
                batches += 1;
                buckets += report.buckets;
            },
            || false,
        )
        .await?;
        busy += drained.elapsed();

        tokio::select! {
            outcome = &mut writing => break outcome,
            () = tokio::time::sleep(quiet) => {}
        }
    };
    // The changes of the last cycle belong to this rate too.
    let drained = Instant::now();
    drain_queue(
        pool,
        &settings,
        |report| {
            batches += 1;
            buckets += report.buckets;
        },
        || false,
    )
    .await?;
    busy += drained.elapsed();
    let elapsed = started.elapsed().as_secs_f64();

    let (writers, tally, _) = outcome?;
    let db_seconds_per_minute = busy.as_secs_f64() / elapsed * 60.0;
    Ok((
        writers,
        RatePoint {
            target_rate: rate,
            achieved_rate: tally.changes as f64 / elapsed,
            seconds: elapsed,
            db_seconds_per_minute,
            full_passes_per_minute: db_seconds_per_minute / full_pass_seconds,
            equal_cost_full_pass_every_minutes: full_pass_seconds / db_seconds_per_minute,
            batches,
            buckets_recomputed: buckets,
        },
    ))
}

/// Fits `db_seconds_per_minute = a + b × rate` and solves it for one full pass.
fn crossover_rate(points: &[RatePoint], full_pass_seconds: f64) -> (Option<f64>, bool) {
    let count = points.len() as f64;
    if points.len() < 2 {
        return (None, false);
    }
    let mean_x = points.iter().map(|p| p.achieved_rate).sum::<f64>() / count;
    let mean_y = points.iter().map(|p| p.db_seconds_per_minute).sum::<f64>() / count;
    let covariance: f64 = points
        .iter()
        .map(|p| (p.achieved_rate - mean_x) * (p.db_seconds_per_minute - mean_y))
        .sum();
    let variance: f64 = points
        .iter()
        .map(|p| (p.achieved_rate - mean_x).powi(2))
        .sum();
    if variance == 0.0 || covariance <= 0.0 {
        return (None, false);
    }
    let slope = covariance / variance;
    let intercept = mean_y - slope * mean_x;
    if intercept >= full_pass_seconds {
        return (None, false);
    }
    let rate = (full_pass_seconds - intercept) / slope;
    let highest = points.iter().map(|p| p.achieved_rate).fold(0.0, f64::max);
    (Some(rate), rate > highest)
}

async fn sweep_dirty_shares(
    control: &Client,
    pool: &Pool,
    full_pass_seconds: f64,
) -> Result<Vec<DirtyPoint>, BenchError> {
    let rows = control
        .query(r#"SELECT "ventureId", date FROM "FreightKpiDaily""#, &[])
        .await
        .map_err(database("read the bucket keys"))?;
    let mut keys: Vec<Bucket> = rows
        .iter()
        .map(|row| Bucket {
            venture_id: row.get(0),
            day: row.get(1),
        })
        .collect();
    keys.shuffle(&mut StdRng::seed_from_u64(0x4449_5254));

    let mut points = Vec::new();
    for &share in DIRTY_SHARES {
        let count = ((keys.len() as f64 * share).ceil() as usize).clamp(1, keys.len().max(1));
        let Some(chosen) = keys.get(..count) else {
            break;
        };
        let mut client = pool.get().await?;
        let started = Instant::now();
        let transaction = client
            .transaction()
            .await
            .map_err(database("begin a recompute by key"))?;
        lock_buckets(&transaction, chosen).await?;
        recompute_buckets(&transaction, chosen).await?;
        transaction
            .commit()
            .await
            .map_err(database("commit a recompute by key"))?;
        let seconds = started.elapsed().as_secs_f64();
        let ratio = seconds / full_pass_seconds;
        points.push(DirtyPoint {
            share,
            buckets: count as u64,
            seconds,
            full_pass_ratio: ratio,
        });
        if ratio > SWEEP_STOP_RATIO {
            break;
        }
    }
    Ok(points)
}

/// Interpolates the share at which the by-key recompute costs one full pass.
fn break_even(points: &[DirtyPoint]) -> Option<f64> {
    points.windows(2).find_map(|pair| {
        let (low, high) = (&pair[0], &pair[1]);
        (low.full_pass_ratio <= 1.0 && high.full_pass_ratio >= 1.0).then(|| {
            let span = high.full_pass_ratio - low.full_pass_ratio;
            if span == 0.0 {
                low.share
            } else {
                low.share + (1.0 - low.full_pass_ratio) / span * (high.share - low.share)
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_point(rate: f64, seconds_per_minute: f64) -> RatePoint {
        RatePoint {
            target_rate: rate,
            achieved_rate: rate,
            seconds: 10.0,
            db_seconds_per_minute: seconds_per_minute,
            full_passes_per_minute: 0.0,
            equal_cost_full_pass_every_minutes: 0.0,
            batches: 0,
            buckets_recomputed: 0,
        }
    }

    #[test]
    fn crossover_solves_linear_fit() {
        let points = [rate_point(100.0, 1.0), rate_point(200.0, 2.0)];
        let (rate, extrapolated) = crossover_rate(&points, 5.0);
        assert!((rate.unwrap() - 500.0).abs() < 1e-9);
        assert!(extrapolated);
    }

    #[test]
    fn crossover_absent_above_idle_cost() {
        let points = [rate_point(100.0, 10.0), rate_point(200.0, 11.0)];
        assert_eq!(crossover_rate(&points, 5.0), (None, false));
    }

    #[test]
    fn break_even_interpolates_between_shares() {
        let point = |share, ratio| DirtyPoint {
            share,
            buckets: 0,
            seconds: 0.0,
            full_pass_ratio: ratio,
        };
        let found = break_even(&[point(0.2, 0.5), point(0.4, 1.5)]).unwrap();
        assert!((found - 0.3).abs() < 1e-9);
    }
}
