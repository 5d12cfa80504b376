//! `freight-kpi run`: the listener loop that keeps `"FreightKpiDaily"` fresh.
//!
//! Each cycle of the loop arms the wake-up flag, drains the queue, then waits for a
//! notification, the fallback poll or a ping. Arming before draining means that a
//! change committed after the drain looked at the queue finds the flag armed and
//! notifies. On every (re)connect the order is `LISTEN`, then drain, then wait, so no
//! change falls between the two.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::capture::{drain_queue, queue_health, BatchReport};
use crate::config::RunSettings;
use crate::db::Pool;
use crate::error::{error_chain, Result};
use crate::kpi::check_kpi_table;
use crate::listen::{validate_channel, ListenerCounters, ListenerSession, Settled};
use crate::observe::{serve_http, Telemetry};

/// Time an in-flight batch gets to commit after a shutdown request; past it the batch
/// is rolled back and its changes stay queued. Together with the connection close
/// this keeps a stop well under 10 seconds.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Figures of the incremental path since the service started.
#[derive(Debug, Clone)]
pub struct IncrementalStats {
    pub batches: u64,
    pub changes: u64,
    pub buckets: u64,
    pub written: u64,
    pub failed_buckets: u64,
    /// Time from a change's enqueueing to the commit of its batch, in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Default for IncrementalStats {
    fn default() -> Self {
        Self {
            batches: 0,
            changes: 0,
            buckets: 0,
            written: 0,
            failed_buckets: 0,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("the bounds are constant and valid"),
        }
    }
}

impl IncrementalStats {
    fn record(&mut self, report: &BatchReport) {
        self.batches += 1;
        self.changes += report.changes;
        self.buckets += report.buckets;
        self.written += report.written;
        self.failed_buckets += report.failed.len() as u64;
        for latency_ms in &report.latencies_ms {
            let micros = (latency_ms * 1000.0).max(1.0) as u64;
            self.latency_us.saturating_record(micros);
        }
    }

    /// Returns a latency quantile in milliseconds, or `None` before the first change.
    pub fn latency_ms(&self, quantile: f64) -> Option<f64> {
        (!self.latency_us.is_empty())
            .then(|| self.latency_us.value_at_quantile(quantile) as f64 / 1000.0)
    }
}

/// Shared handles to a running service, for tests and for programs that embed it.
#[derive(Debug, Clone, Default)]
pub struct ServiceHandles {
    pub stats: Arc<Mutex<IncrementalStats>>,
    pub notifications: Arc<ListenerCounters>,
    /// Prometheus metrics and the state `/readyz` reads.
    pub telemetry: Arc<Telemetry>,
}

/// Runs the listener and the incremental recompute until `shutdown` completes.
///
/// Fails at start when the database cannot be reached or the schema is missing, so a
/// misconfiguration is reported at once. After that, lost connections are retried
/// with capped exponential backoff for as long as the service runs.
///
/// # Errors
///
/// [`crate::Error`] at start-up only.
pub async fn run(
    settings: RunSettings,
    handles: ServiceHandles,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    validate_channel(&settings.channel)?;
    let pool = settings.target.pool(settings.pool_size)?;
    {
        let client = pool.get().await?;
        queue_health(&**client).await?;
        check_kpi_table(&**client).await?;
    }

    let cancel = CancellationToken::new();
    let cancel_on_shutdown = cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel_on_shutdown.cancel();
    });
    handles
        .telemetry
        .attach_notifications(handles.notifications.clone());
    let http = match &settings.http {
        Some(http) => Some(
            serve_http(
                http,
                pool.clone(),
                handles.telemetry.clone(),
                cancel.clone(),
            )
            .await?,
        ),
        None => None,
    };

    let jobs = crate::jobs::JobControl::start(
        &settings.jobs,
        pool.clone(),
        handles.stats.clone(),
        handles.telemetry.clone(),
        cancel.clone(),
    )?;

    let listener_id = format!("{:016x}", rand::random::<u64>());
    tracing::info!(
        listener.id = %listener_id,
        channel = %settings.channel,
        database = %settings.target.describe(),
        "service started"
    );
    let service = Service {
        settings,
        pool,
        handles,
        cancel,
        listener_id,
    };
    // Both wind down at once after the cancellation, so their shutdown grace periods
    // overlap and the process stops within 10 seconds.
    let cancelled = service.cancel.clone();
    let stop_jobs = async move {
        cancelled.cancelled().await;
        jobs.stop().await;
    };
    tokio::join!(service.listen_until_cancelled(), stop_jobs);
    if let Some(http) = http {
        // The endpoint stops on the same cancellation; waiting frees its port.
        let _ = http.await;
    }
    service.pool.close();

    let stats = service
        .handles
        .stats
        .lock()
        .expect("stats lock poisoned")
        .clone();
    tracing::info!(
        batches = stats.batches,
        changes = stats.changes,
        buckets = stats.buckets,
        latency_p50_ms = stats.latency_ms(0.5),
        latency_p99_ms = stats.latency_ms(0.99),
        "service stopped"
    );
    Ok(())
}

struct Service {
    settings: RunSettings,
    pool: Pool,
    handles: ServiceHandles,
    cancel: CancellationToken,
    listener_id: String,
}

/// The reason a listener session ended.
enum SessionEnd {
    Cancelled,
    Lost(crate::Error),
}

impl Service {
    async fn listen_until_cancelled(&self) {
        let mut backoff = Backoff::new(self.settings.reconnect_min, self.settings.reconnect_max);
        let mut connected_before = false;

        'connect: while !self.cancel.is_cancelled() {
            // A cancelled connect leaves at worst an unarmed listener row, which
            // expires with its heartbeat.
            let session = tokio::select! {
                () = self.cancel.cancelled() => break 'connect,
                session = ListenerSession::connect(
                    &self.settings.target,
                    &self.settings.channel,
                    &self.listener_id,
                    self.handles.notifications.clone(),
                    self.settings.ping_timeout,
                ) => session,
            };
            let mut session = match session {
                Ok(session) => session,
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %error_chain(&error), retry_in_ms = delay.as_millis() as u64, "listener connection failed");
                    self.sleep_unless_cancelled(delay).await;
                    continue 'connect;
                }
            };
            backoff.reset();
            if connected_before {
                tracing::info!(listener.id = %self.listener_id, "listener reconnected");
            } else {
                tracing::info!(listener.id = %self.listener_id, "listener connected");
            }
            self.handles
                .telemetry
                .record_listener_connected(connected_before);
            connected_before = true;

            let end = self.run_session(&mut session).await;
            self.handles.telemetry.record_listener_detached();
            match end {
                SessionEnd::Cancelled => {
                    // A connection that went silent would hold the stop for the whole
                    // statement timeout; past the grace the row expires with its
                    // heartbeat instead.
                    if tokio::time::timeout(SHUTDOWN_GRACE, session.deregister())
                        .await
                        .is_err()
                    {
                        tracing::warn!("removing the listener row timed out at shutdown; it expires with its heartbeat");
                    }
                    break 'connect;
                }
                SessionEnd::Lost(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %error_chain(&error), retry_in_ms = delay.as_millis() as u64, "listener connection lost");
                    // Whatever silenced the listener (a cut network, a restarted server)
                    // has likely hit the idle pooled connections too.
                    let discarded = self.pool.discard_idle();
                    if discarded > 0 {
                        tracing::info!(
                            discarded,
                            "dropped idle pooled connections after the listener loss"
                        );
                    }
                    self.sleep_unless_cancelled(delay).await;
                }
            }
        }
    }

    /// Runs arm, drain and wait cycles on one connection until it is lost or the
    /// service is cancelled. The debounce window, the wait for a wake-up and each
    /// listener statement end on the cancellation; only a batch in flight gets
    /// [`SHUTDOWN_GRACE`] to commit.
    async fn run_session(&self, session: &mut ListenerSession) -> SessionEnd {
        let mut drain_backoff =
            Backoff::new(self.settings.reconnect_min, self.settings.reconnect_max);

        loop {
            let armed = tokio::select! {
                () = self.cancel.cancelled() => return SessionEnd::Cancelled,
                armed = session.arm() => armed,
            };
            if let Err(error) = armed {
                return SessionEnd::Lost(error);
            }

            let drained = self.drain().await;
            if self.cancel.is_cancelled() {
                return SessionEnd::Cancelled;
            }
            if let Err(error) = drained {
                // Retry after the delay, re-arming first, rather than wait for a
                // notification that may not come: the changes are already queued.
                let delay = drain_backoff.next_delay();
                tracing::error!(error = %error_chain(&error), retry_in_ms = delay.as_millis() as u64, "draining the change queue failed; the changes stay queued");
                self.sleep_unless_cancelled(delay).await;
                continue;
            }
            drain_backoff.reset();

            match self.wait_for_wake(session).await {
                Wait::Wake => {}
                Wait::Poll => continue,
                Wait::Cancelled => return SessionEnd::Cancelled,
                Wait::Lost(error) => return SessionEnd::Lost(error),
            }

            // Awake: stop writers from notifying, then let the burst settle.
            let disarmed = tokio::select! {
                () = self.cancel.cancelled() => return SessionEnd::Cancelled,
                disarmed = session.disarm() => disarmed,
            };
            if let Err(error) = disarmed {
                return SessionEnd::Lost(error);
            }
            // The changes of the burst stay queued when the cancellation ends the
            // window, and the next start drains them.
            let settled = tokio::select! {
                () = self.cancel.cancelled() => return SessionEnd::Cancelled,
                settled = self.settings.debounce.settle(session.wakes()) => settled,
            };
            if settled == Settled::Closed {
                return SessionEnd::Lost(crate::Error::Connect {
                    target: self.settings.target.describe(),
                    reason: "the listener connection closed".to_owned(),
                });
            }
        }
    }

    async fn wait_for_wake(&self, session: &mut ListenerSession) -> Wait {
        let poll_at = Instant::now() + self.settings.poll_interval;
        let mut ping_at = Instant::now() + self.settings.ping_interval;

        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return Wait::Cancelled,
                wake = session.wakes().recv() => return match wake {
                    Some(()) => Wait::Wake,
                    None => Wait::Lost(crate::Error::Connect {
                        target: self.settings.target.describe(),
                        reason: "the listener connection closed".to_owned(),
                    }),
                },
                () = sleep_until(poll_at) => return Wait::Poll,
                () = sleep_until(ping_at) => {
                    let pinged = tokio::select! {
                        () = self.cancel.cancelled() => return Wait::Cancelled,
                        pinged = session.ping(self.settings.ping_timeout) => pinged,
                    };
                    if let Err(error) = pinged {
                        return Wait::Lost(error);
                    }
                    ping_at = Instant::now() + self.settings.ping_interval;
                }
            }
        }
    }

    /// Drains the queue; on shutdown the batch in flight gets [`SHUTDOWN_GRACE`] to
    /// commit before it is rolled back.
    /// Each statement of a batch has a time limit ([`crate::capture::DrainSettings`]),
    /// so a pooled connection that goes silent mid-batch fails the batch instead of
    /// stalling the service.
    async fn drain(&self) -> Result<()> {
        let record = |report: &BatchReport| {
            self.handles
                .stats
                .lock()
                .expect("stats lock poisoned")
                .record(report);
            self.handles.telemetry.record_batch(report);
        };
        let drain = drain_queue(&self.pool, &self.settings.drain, record, || {
            self.cancel.is_cancelled()
        });
        let deadline = async {
            self.cancel.cancelled().await;
            sleep(SHUTDOWN_GRACE).await;
        };

        tokio::select! {
            outcome = drain => outcome,
            () = deadline => {
                tracing::warn!("shutdown interrupted a batch; it was rolled back and its changes stay queued");
                Ok(())
            }
        }
    }

    async fn sleep_unless_cancelled(&self, delay: Duration) {
        tokio::select! {
            () = self.cancel.cancelled() => {}
            () = sleep(delay) => {}
        }
    }
}

enum Wait {
    Wake,
    Poll,
    Cancelled,
    Lost(crate::Error),
}

/// Capped exponential backoff: each delay doubles, up to the cap.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));

        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(), Duration::from_millis(200));
        assert_eq!(backoff.next_delay(), Duration::from_millis(350));
        assert_eq!(backoff.next_delay(), Duration::from_millis(350));
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }
}
