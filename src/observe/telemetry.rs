//! The service's metrics, in a registry of its own, and the state that readiness
//! reads.
//!
//! Counters of the incremental path and the listener are recorded as events happen.
//! Figures that live in the database (queue depth and age, failed buckets, job runs
//! and the last reconcile) are read at scrape time, so they also cover the work of
//! other instances and of `freight-kpi reconcile` run from cron.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::capture::BatchReport;
use crate::jobs::{JobName, RunStatus};
use crate::listen::ListenerCounters;

/// Upper bounds of the commit-to-fresh histogram, in seconds: the freshness target is
/// a fraction of a second, and the top buckets show a service that fell behind.
const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Labels of a lock metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LockLabels {
    /// Name of the job or resource the lock protects.
    pub lock: String,
}

/// Labels of a job-run metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobRunLabels {
    /// The `"jobName"` of the run.
    pub job: String,
    /// The `status` of the run: RUNNING, SUCCESS, PARTIAL, ERROR, SKIPPED or ABANDONED.
    pub status: String,
}

/// Figures read from the database at scrape time.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DatabaseFigures {
    pub queue_depth: i64,
    pub oldest_change_age_seconds: Option<f64>,
    pub failed_buckets: i64,
    /// Runs in `"JobRunLog"` that started in the last 24 hours: job, status, count.
    pub job_runs: Vec<(String, String, i64)>,
    /// End of the last successful repairing reconcile, in seconds since the epoch.
    pub last_reconcile_success_seconds: Option<f64>,
    /// Buckets that reconcile found drifted.
    pub last_reconcile_drifted: Option<i64>,
}

/// Metrics and health state of one running service.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    changes: Counter,
    buckets: Counter,
    batches: Counter,
    recompute_failures: Counter,
    commit_to_fresh: Histogram,
    listener_reconnects: Counter,
    listener_connected: Gauge,
    lock_acquisitions: Family<LockLabels, Counter>,
    lock_losses: Family<LockLabels, Counter>,
    database_up: Gauge,
    queue_depth: Gauge,
    oldest_change_age: Gauge<f64, AtomicU64>,
    failed_buckets: Gauge,
    job_runs: Family<JobRunLabels, Gauge>,
    /// Every label set of `job_runs` exported so far: a series that leaves the
    /// 24-hour window drops to 0 rather than keeping its last value.
    job_run_series: Mutex<BTreeSet<(String, String)>>,
    last_reconcile_success: Gauge<f64, AtomicU64>,
    last_reconcile_drifted: Gauge,
    notifications: Arc<NotificationCollector>,
    listener_attached: AtomicBool,
    http_address: OnceLock<SocketAddr>,
}

impl Default for Telemetry {
    fn default() -> Self {
        let telemetry = Self {
            registry: Registry::default(),
            changes: Counter::default(),
            buckets: Counter::default(),
            batches: Counter::default(),
            recompute_failures: Counter::default(),
            commit_to_fresh: Histogram::new(LATENCY_BUCKETS_SECONDS),
            listener_reconnects: Counter::default(),
            listener_connected: Gauge::default(),
            lock_acquisitions: Family::default(),
            lock_losses: Family::default(),
            database_up: Gauge::default(),
            queue_depth: Gauge::default(),
            oldest_change_age: Gauge::default(),
            failed_buckets: Gauge::default(),
            job_runs: Family::default(),
            job_run_series: Mutex::new(BTreeSet::new()),
            last_reconcile_success: Gauge::default(),
            last_reconcile_drifted: Gauge::default(),
            notifications: Arc::new(NotificationCollector::default()),
            listener_attached: AtomicBool::new(false),
            http_address: OnceLock::new(),
        };
        telemetry.registered()
    }
}

impl Telemetry {
    fn registered(mut self) -> Self {
        // Series of the service's own jobs exist from the start, at 0, so that alert
        // rules and dashboards find them before the first run or loss.
        let statuses = [
            RunStatus::Running,
            RunStatus::Success,
            RunStatus::Partial,
            RunStatus::Error,
            RunStatus::Skipped,
            RunStatus::Abandoned,
        ];
        for job in JobName::ALL {
            let lock = LockLabels {
                lock: job.as_str().to_owned(),
            };
            drop(self.lock_acquisitions.get_or_create(&lock));
            drop(self.lock_losses.get_or_create(&lock));
            let mut series = self.job_run_series.lock().expect("series lock poisoned");
            for status in statuses {
                series.insert((job.as_str().to_owned(), status.as_str().to_owned()));
            }
        }
        self.record_job_runs(&[]);

        let registry = &mut self.registry;
        registry.register(
            "freight_kpi_changes_consumed",
            "Changes consumed from the change queue by committed batches",
            self.changes.clone(),
        );
        registry.register(
            "freight_kpi_buckets_recomputed",
            "Buckets recomputed by committed batches",
            self.buckets.clone(),
        );
        registry.register(
            "freight_kpi_batches",
            "Batches committed by the incremental path",
            self.batches.clone(),
        );
        registry.register(
            "freight_kpi_recompute_failures",
            "Bucket recomputes that failed and wait for a retry, such as totals that overflow their columns",
            self.recompute_failures.clone(),
        );
        registry.register(
            "freight_kpi_commit_to_fresh_seconds",
            "Time from a change entering the queue to the commit of the batch that recomputed its bucket",
            self.commit_to_fresh.clone(),
        );
        registry.register(
            "freight_kpi_listener_reconnects",
            "Times the listener connection was replaced after a loss",
            self.listener_reconnects.clone(),
        );
        registry.register(
            "freight_kpi_listener_connected",
            "1 while the listener connection holds LISTEN, 0 while it reconnects",
            self.listener_connected.clone(),
        );
        registry.register(
            "freight_kpi_lock_acquisitions",
            "Job locks and leases acquired by this process, by lock",
            self.lock_acquisitions.clone(),
        );
        registry.register(
            "freight_kpi_lock_losses",
            "Job locks and leases this process lost while holding them, by lock",
            self.lock_losses.clone(),
        );
        registry.register(
            "freight_kpi_database_up",
            "1 when the last scrape could read the database, 0 when it could not; the database figures then keep their last values",
            self.database_up.clone(),
        );
        registry.register(
            "freight_kpi_queue_depth",
            "Changes waiting in the change queue",
            self.queue_depth.clone(),
        );
        registry.register(
            "freight_kpi_queue_oldest_change_age_seconds",
            "Age of the oldest change waiting in the queue, 0 when the queue is empty",
            self.oldest_change_age.clone(),
        );
        registry.register(
            "freight_kpi_failed_buckets",
            "Buckets whose recompute failed and that wait for a retry",
            self.failed_buckets.clone(),
        );
        registry.register(
            "freight_kpi_job_runs_last_24h",
            "Job runs in JobRunLog that started in the last 24 hours, by job and status, from every instance and CLI run",
            self.job_runs.clone(),
        );
        registry.register(
            "freight_kpi_last_reconcile_success_timestamp_seconds",
            "End of the last successful repairing reconcile, in seconds since the Unix epoch; 0 before the first",
            self.last_reconcile_success.clone(),
        );
        registry.register(
            "freight_kpi_last_reconcile_drifted_buckets",
            "Buckets that the last successful repairing reconcile found drifted and repaired",
            self.last_reconcile_drifted.clone(),
        );
        registry.register_collector(Box::new(self.notifications.clone()));
        self
    }

    /// Records a committed batch.
    pub fn record_batch(&self, report: &BatchReport) {
        self.batches.inc();
        self.changes.inc_by(report.changes);
        self.buckets.inc_by(report.buckets);
        self.recompute_failures.inc_by(report.failed.len() as u64);
        for latency_ms in &report.latencies_ms {
            self.commit_to_fresh.observe(latency_ms / 1000.0);
        }
    }

    /// Records that the listener runs `LISTEN` on a new connection; `reconnect` is
    /// false for the first connection of the service.
    pub fn record_listener_connected(&self, reconnect: bool) {
        if reconnect {
            self.listener_reconnects.inc();
        }
        self.listener_connected.set(1);
        self.listener_attached.store(true, Ordering::Release);
    }

    /// Records that the listener connection ended, lost or closed at shutdown.
    pub fn record_listener_detached(&self) {
        self.listener_connected.set(0);
        self.listener_attached.store(false, Ordering::Release);
    }

    /// Tells whether the listener currently has a connection with `LISTEN` in effect.
    pub fn listener_attached(&self) -> bool {
        self.listener_attached.load(Ordering::Acquire)
    }

    /// Records that this process acquired the job lock or lease `lock`.
    pub fn record_lock_acquired(&self, lock: &str) {
        self.lock_acquisitions
            .get_or_create(&LockLabels {
                lock: lock.to_owned(),
            })
            .inc();
    }

    /// Records that this process lost the job lock or lease `lock` while holding it.
    pub fn record_lock_lost(&self, lock: &str) {
        self.lock_losses
            .get_or_create(&LockLabels {
                lock: lock.to_owned(),
            })
            .inc();
    }

    /// Makes the scrape report the notification counts of `counters`.
    pub fn attach_notifications(&self, counters: Arc<ListenerCounters>) {
        let _ = self.notifications.counters.set(counters);
    }

    /// Stores the figures of a successful database read, or marks the database down.
    pub fn record_database_figures(&self, figures: Option<&DatabaseFigures>) {
        let Some(figures) = figures else {
            self.database_up.set(0);
            return;
        };
        self.database_up.set(1);
        self.queue_depth.set(figures.queue_depth);
        self.oldest_change_age
            .set(figures.oldest_change_age_seconds.unwrap_or(0.0));
        self.failed_buckets.set(figures.failed_buckets);
        self.record_job_runs(&figures.job_runs);
        self.last_reconcile_success
            .set(figures.last_reconcile_success_seconds.unwrap_or(0.0));
        self.last_reconcile_drifted
            .set(figures.last_reconcile_drifted.unwrap_or(0));
    }

    fn record_job_runs(&self, runs: &[(String, String, i64)]) {
        let mut series = self.job_run_series.lock().expect("series lock poisoned");
        for (job, status, _) in runs {
            series.insert((job.clone(), status.clone()));
        }
        for (job, status) in series.iter() {
            let count = runs
                .iter()
                .find(|run| &run.0 == job && &run.1 == status)
                .map_or(0, |run| run.2);
            self.job_runs
                .get_or_create(&JobRunLabels {
                    job: job.clone(),
                    status: status.clone(),
                })
                .set(count);
        }
    }

    /// Encodes every metric in the Prometheus text format, version 0.0.4.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Stores the address the HTTP endpoint listens on, once it is bound.
    pub(crate) fn set_http_address(&self, address: SocketAddr) {
        let _ = self.http_address.set(address);
    }

    /// Returns the address the HTTP endpoint listens on, once it is bound; useful
    /// with `--http 127.0.0.1:0`, which picks a free port.
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http_address.get().copied()
    }
}

/// Reports the listener's notification counts, which the listener keeps as plain
/// atomics, as counters at scrape time.
#[derive(Debug, Default)]
struct NotificationCollector {
    counters: OnceLock<Arc<ListenerCounters>>,
}

impl Collector for NotificationCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (received, ignored) = self
            .counters
            .get()
            .map(|counters| {
                (
                    counters.received.load(Ordering::Relaxed),
                    counters.ignored.load(Ordering::Relaxed),
                )
            })
            .unwrap_or_default();
        for (name, help, value) in [
            (
                "freight_kpi_notifications_received",
                "Wake-up notifications received on the channel",
                received,
            ),
            (
                "freight_kpi_notifications_ignored",
                "Notifications ignored because they were not a wake-up (a payload, or another channel)",
                ignored,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
