//! Freshness: the time from a writer's commit to its bucket showing the change,
//! measured from outside the service.
//!
//! Every [`super::workload::PROBE_EVERY`]th change of the writers goes to a probe
//! bucket that only one writer touches: it inserts a load (raising "loadsInbound" by
//! one) or marks its last probe load LOST (raising "loadsLost" by one). So the sum of
//! the two in "FreightKpiDaily" is the number of that bucket's changes the table
//! shows. The observer polls the probe buckets every [`POLL_INTERVAL`], so it can
//! tell which commits became visible at each poll. A latency is the instant the
//! first poll that showed the change was sent, minus the instant the writer's commit
//! returned; it can be late by up to one poll interval, never early.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{Duration as ChronoDuration, NaiveDate, Utc};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::dataset::FIRST_PROBE_VENTURE_ID;
use super::error::{database, BenchError};
use super::service::{queue_depth, RunningService};
use super::workload::{
    run_writers, Pace, ProbeCommit, ProbeTarget, Workload, Writer, PROBE_BUCKETS_PER_WRITER,
};
use crate::db::DatabaseTarget;

/// How often the observer reads the probe buckets.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How often the observer counts the change queue.
const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Time the observer waits after the writers stop for the last probes to show.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Venture ids reserved for each run's probe buckets, so that every run starts with
/// empty buckets.
const PROBE_VENTURES_PER_RUN: i32 = 10_000;

/// Multiples of `--rate` the ramp tries after the run at `--rate`, in this order; it
/// stops at the first rate that is not sustained.
pub const RAMP_MULTIPLES: &[f64] = &[0.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0];

/// A rate counts as sustained when the writers reached this share of it ...
const SUSTAINED_RATE_SHARE: f64 = 0.95;
/// ... and the queue grew by less than this share of the rate per second over the
/// second half of the run, or less than [`GROWTH_NOISE_FLOOR`] ...
const SUSTAINED_GROWTH_SHARE: f64 = 0.05;
/// Changes per second of queue growth that count as noise whatever the rate: the
/// depth rises and falls with each drain cycle, and short runs have few samples.
const GROWTH_NOISE_FLOOR: f64 = 100.0;
/// ... and the queue at the end held less than this many seconds of changes.
const SUSTAINED_BACKLOG_SECONDS: f64 = 1.0;

/// One run at a steady rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FreshnessRun {
    pub target_rate: f64,
    /// Changes committed per second by all writers.
    pub achieved_rate: f64,
    pub seconds: f64,
    pub changes: u64,
    pub probes_committed: u64,
    pub probes_observed: u64,
    /// Probes not seen within 30 s after the writers stopped.
    pub probes_missing: u64,
    /// Commit to visible, measured by the observer, in milliseconds.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// The service's own figure for the same run: from a change's enqueueing (inside
    /// the writer's transaction, before its commit) to the commit of the batch that
    /// recomputed it, without the observer's polling.
    pub service_p50_ms: Option<f64>,
    pub service_p99_ms: Option<f64>,
    pub queue_depth_max: i64,
    pub queue_depth_end: i64,
    /// Least-squares slope of the queue depth over the second half of the run.
    pub queue_growth_per_second: f64,
    pub sustained: bool,
    /// Reason the rate was not sustained, when it was not.
    pub limited_by: Option<String>,
}

/// The freshness phase: the run at `--rate` and the ramp.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Freshness {
    pub poll_interval_ms: f64,
    pub at_rate: FreshnessRun,
    pub ramp: Vec<FreshnessRun>,
    /// Highest rate of the ramp that was sustained.
    pub max_sustained_rate: f64,
    /// Reason the ramp ended: the first unsustained step's reason, or that every step
    /// was sustained.
    pub ramp_ended_by: String,
}

/// Runs the writers at `rate` for `length` against a freshly started service and
/// measures every probe change.
///
/// # Errors
///
/// [`BenchError`] when a connection, the service or a statement fails.
pub async fn measure_run(
    target: &DatabaseTarget,
    observer: &Client,
    writers: Vec<Writer>,
    workload: &Workload,
    rate: f64,
    length: Duration,
    run_index: i32,
) -> Result<(Vec<Writer>, FreshnessRun), BenchError> {
    let service = RunningService::start(target, observer).await?;
    super::service::wait_for_empty_queue(observer, Duration::from_secs(1_800)).await?;
    super::service::vacuum_between_runs(observer, false).await?;
    let service_before = service.stats().latency_us;

    let buckets = writers.len() * PROBE_BUCKETS_PER_WRITER;
    let first_venture = FIRST_PROBE_VENTURE_ID + run_index * PROBE_VENTURES_PER_RUN;
    let probe_day = Utc::now().date_naive() - ChronoDuration::days(1);
    let (commits, received) = mpsc::unbounded_channel();
    let probes = ProbeTarget {
        first_venture,
        created_at: probe_day
            .and_hms_opt(12, 0, 0)
            .expect("noon exists")
            .and_utc(),
        commits,
    };

    let mut watch = ProbeObserver::new(observer, first_venture, buckets, probe_day).await?;
    let (written, observed) = tokio::join!(
        run_writers(
            writers,
            workload,
            Pace::PerSecond(rate),
            length,
            Some(probes)
        ),
        watch.run(received),
    );
    let (writers, tally, elapsed) = written?;
    let outcome = observed?;

    let mut service_latency = service.stats().latency_us;
    let service_delta =
        service_latency.subtract(&service_before).is_ok() && !service_latency.is_empty();
    service.stop().await?;

    let achieved_rate = tally.changes as f64 / elapsed.as_secs_f64();
    let histogram = &outcome.latency_us;
    let quantile = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let probes_missing = tally.probes.saturating_sub(histogram.len());
    let growth = growth_per_second(&outcome.queue_samples);
    let depth_end = outcome.queue_samples.last().map_or(0, |(_, depth)| *depth);
    let limited_by = if achieved_rate < rate * SUSTAINED_RATE_SHARE {
        Some(format!(
            "writers reached only {achieved_rate:.0} of {rate:.0} changes/s"
        ))
    } else if growth > (rate * SUSTAINED_GROWTH_SHARE).max(GROWTH_NOISE_FLOOR) {
        Some(format!("the queue grew by {growth:.0} changes/s"))
    } else if depth_end as f64 > (rate * SUSTAINED_BACKLOG_SECONDS).max(100.0) {
        Some(format!("{depth_end} changes were still queued at the end"))
    } else if probes_missing > 0 {
        Some(format!("{probes_missing} probe changes never showed"))
    } else {
        None
    };

    let run = FreshnessRun {
        target_rate: rate,
        achieved_rate,
        seconds: elapsed.as_secs_f64(),
        changes: tally.changes,
        probes_committed: tally.probes,
        probes_observed: histogram.len(),
        probes_missing,
        p50_ms: quantile(0.50),
        p95_ms: quantile(0.95),
        p99_ms: quantile(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
        mean_ms: histogram.mean() / 1000.0,
        service_p50_ms: service_delta
            .then(|| service_latency.value_at_quantile(0.5) as f64 / 1000.0),
        service_p99_ms: service_delta
            .then(|| service_latency.value_at_quantile(0.99) as f64 / 1000.0),
        queue_depth_max: outcome
            .queue_samples
            .iter()
            .map(|(_, depth)| *depth)
            .max()
            .unwrap_or(0),
        queue_depth_end: depth_end,
        queue_growth_per_second: growth,
        sustained: limited_by.is_none(),
        limited_by,
    };
    tracing::info!(
        rate = run.target_rate,
        achieved = run.achieved_rate,
        p50_ms = run.p50_ms,
        p99_ms = run.p99_ms,
        sustained = run.sustained,
        "freshness run finished"
    );
    Ok((writers, run))
}

/// Returns the least-squares slope, in changes per second, of the queue depth over
/// the second half of the samples.
fn growth_per_second(samples: &[(f64, i64)]) -> f64 {
    let half = &samples[samples.len() / 2..];
    if half.len() < 2 {
        return 0.0;
    }
    let count = half.len() as f64;
    let mean_t = half.iter().map(|(t, _)| t).sum::<f64>() / count;
    let mean_d = half.iter().map(|(_, d)| *d as f64).sum::<f64>() / count;
    let covariance: f64 = half
        .iter()
        .map(|(t, d)| (t - mean_t) * (*d as f64 - mean_d))
        .sum();
    let variance: f64 = half.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

struct ObserverOutcome {
    latency_us: Histogram<u64>,
    /// (seconds since the start, depth) while the writers ran.
    queue_samples: Vec<(f64, i64)>,
}

/// Polls the probe buckets and matches what they show with the writers' commits.
struct ProbeObserver<'a> {
    client: &'a Client,
    statement: tokio_postgres::Statement,
    first_venture: i32,
    day: NaiveDate,
    pending: Vec<VecDeque<ProbeCommit>>,
    /// Per bucket, each version the observer saw and the instant of the poll that
    /// first showed it, for commits whose message arrives after the poll.
    seen: Vec<Vec<(u64, Instant)>>,
    latency_us: Histogram<u64>,
}

impl<'a> ProbeObserver<'a> {
    async fn new(
        client: &'a Client,
        first_venture: i32,
        buckets: usize,
        day: NaiveDate,
    ) -> Result<Self, BenchError> {
        let statement = client
            .prepare(
                r#"SELECT "ventureId", "loadsInbound" + "loadsLost"
                   FROM "FreightKpiDaily"
                   WHERE "ventureId" >= $1 AND "ventureId" < $2 AND date = $3"#,
            )
            .await
            .map_err(database("prepare the probe poll"))?;
        Ok(Self {
            client,
            statement,
            first_venture,
            day,
            pending: vec![VecDeque::new(); buckets],
            seen: vec![Vec::new(); buckets],
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("the bounds are constant and valid"),
        })
    }

    async fn run(
        &mut self,
        mut commits: mpsc::UnboundedReceiver<ProbeCommit>,
    ) -> Result<ObserverOutcome, BenchError> {
        let started = Instant::now();
        let mut next_queue_sample = started;
        let mut queue_samples = Vec::new();
        let mut writers_done_at: Option<Instant> = None;

        loop {
            loop {
                match commits.try_recv() {
                    Ok(commit) => self.accept(commit),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        writers_done_at.get_or_insert_with(Instant::now);
                        break;
                    }
                }
            }
            let waiting = self.pending.iter().any(|queue| !queue.is_empty());
            if let Some(done) = writers_done_at {
                if !waiting || done.elapsed() >= SETTLE_TIMEOUT {
                    break;
                }
            }

            let poll_sent = Instant::now();
            if waiting {
                self.poll(poll_sent).await?;
            }
            if writers_done_at.is_none() && poll_sent >= next_queue_sample {
                let depth = queue_depth(self.client).await?;
                queue_samples.push((poll_sent.duration_since(started).as_secs_f64(), depth));
                next_queue_sample += QUEUE_SAMPLE_INTERVAL;
            }
            tokio::time::sleep_until(poll_sent + POLL_INTERVAL).await;
        }
        Ok(ObserverOutcome {
            latency_us: self.latency_us.clone(),
            queue_samples,
        })
    }

    fn accept(&mut self, commit: ProbeCommit) {
        let shown_at = self.seen[commit.bucket]
            .iter()
            .find(|(version, _)| *version >= commit.version)
            .map(|(_, at)| *at);
        match shown_at {
            Some(at) => self.record(at, commit.committed_at),
            None => self.pending[commit.bucket].push_back(commit),
        }
    }

    async fn poll(&mut self, poll_sent: Instant) -> Result<(), BenchError> {
        let end_venture = self.first_venture + self.pending.len() as i32;
        let rows = self
            .client
            .query(
                &self.statement,
                &[&self.first_venture, &end_venture, &self.day],
            )
            .await
            .map_err(database("poll the probe buckets"))?;
        for row in rows {
            let venture: i32 = row.get(0);
            let version: i32 = row.get(1);
            let bucket = (venture - self.first_venture) as usize;
            let version = version.max(0) as u64;
            if self.seen[bucket]
                .last()
                .is_some_and(|(last, _)| *last >= version)
            {
                continue;
            }
            self.seen[bucket].push((version, poll_sent));
            while self.pending[bucket]
                .front()
                .is_some_and(|commit| commit.version <= version)
            {
                let commit = self.pending[bucket].pop_front().expect("front exists");
                self.record(poll_sent, commit.committed_at);
            }
        }
        Ok(())
    }

    fn record(&mut self, shown_at: Instant, committed_at: Instant) {
        let micros = shown_at.saturating_duration_since(committed_at).as_micros() as u64;
        self.latency_us.saturating_record(micros.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_of_steady_queue_is_zero() {
        let samples: Vec<(f64, i64)> = (0..20).map(|i| (i as f64 * 0.25, 40)).collect();
        assert_eq!(growth_per_second(&samples), 0.0);
    }

    #[test]
    fn growth_of_rising_queue_is_its_slope() {
        let samples: Vec<(f64, i64)> = (0..20).map(|i| (i as f64, 100 * i)).collect();
        assert!((growth_per_second(&samples) - 100.0).abs() < 1e-9);
    }
}
