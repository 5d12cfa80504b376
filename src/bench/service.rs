//! The service under test, run inside the bench process through
//! [`crate::service::run`] with the default settings of `freight-kpi run`.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::error::{database, BenchError};
use crate::config::RunSettings;
use crate::db::DatabaseTarget;
use crate::service::{run, IncrementalStats, ServiceHandles};

/// Time the service gets to register its listener or to stop.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(20);

/// A running service and the switch that stops it.
pub struct RunningService {
    stop: oneshot::Sender<()>,
    task: JoinHandle<crate::Result<()>>,
    pub handles: ServiceHandles,
}

impl RunningService {
    /// Starts the service and waits until its listener is armed, so that writers
    /// started afterwards wake it.
    ///
    /// # Errors
    ///
    /// [`BenchError::ServiceStopped`] when it exits early, [`BenchError::TimedOut`]
    /// when its listener does not arm in time.
    pub async fn start(target: &DatabaseTarget, observer: &Client) -> Result<Self, BenchError> {
        let handles = ServiceHandles::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let settings = RunSettings::new(target.clone());
        let task = tokio::spawn(run(settings, handles.clone(), async move {
            let _ = stopped.await;
        }));
        let service = Self {
            stop,
            task,
            handles,
        };

        let deadline = Instant::now() + SERVICE_TIMEOUT;
        loop {
            if service.task.is_finished() {
                return Err(service.stop().await.err().unwrap_or_else(|| {
                    BenchError::ServiceStopped("it exited right after starting".to_owned())
                }));
            }
            let armed: i64 = observer
                .query_one("SELECT count(*) FROM freight_kpi.listener WHERE armed", &[])
                .await
                .map_err(database("check that the listener armed"))?
                .get(0);
            if armed > 0 {
                return Ok(service);
            }
            if Instant::now() >= deadline {
                let _ = service.stop().await;
                return Err(BenchError::TimedOut {
                    what: "the in-process service's listener start",
                    seconds: SERVICE_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns a copy of the service's figures so far.
    pub fn stats(&self) -> IncrementalStats {
        self.handles
            .stats
            .lock()
            .expect("stats lock poisoned")
            .clone()
    }

    /// Stops the service and waits for it to exit.
    ///
    /// # Errors
    ///
    /// [`BenchError::ServiceStopped`] when it ended with an error, panicked or did not
    /// stop in time.
    pub async fn stop(self) -> Result<(), BenchError> {
        let _ = self.stop.send(());
        match tokio::time::timeout(SERVICE_TIMEOUT, self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(BenchError::ServiceStopped(crate::error::error_chain(
                &error,
            ))),
            Ok(Err(join_error)) => Err(BenchError::ServiceStopped(join_error.to_string())),
            Err(_) => Err(BenchError::TimedOut {
                what: "the in-process service's stop",
                seconds: SERVICE_TIMEOUT.as_secs(),
            }),
        }
    }
}

/// Vacuums the change queue and the KPI table before a measured run, and "Load" too
/// when `loads` is set.
///
/// Every change leaves a dead queue row, which the claim's index scan walks past
/// until a vacuum removes it: with 1.3 million dead rows a claim took 13 to 40 ms
/// instead of 1 ms on the development machine. Autovacuum removes them within about
/// a minute where it runs, so the bench does the same between runs, which also keeps
/// one phase's backlog from slowing the next. On a server with autovacuum off the
/// service depends on such a vacuum, as the report's settings show.
///
/// # Errors
///
/// [`BenchError::Service`] when a vacuum fails.
pub async fn vacuum_between_runs(client: &Client, loads: bool) -> Result<(), BenchError> {
    let tables = if loads {
        r#"freight_kpi.change_queue, "FreightKpiDaily", "Load""#
    } else {
        r#"freight_kpi.change_queue, "FreightKpiDaily""#
    };
    client
        .batch_execute(&format!("VACUUM {tables}"))
        .await
        .map_err(database("vacuum between runs"))
}

/// Drains whatever is queued with the service's batch code, outside any measurement.
///
/// # Errors
///
/// [`BenchError::Service`] when a batch fails.
pub async fn drain_leftovers(pool: &crate::db::Pool) -> Result<(), BenchError> {
    let settings = crate::capture::DrainSettings::default();
    crate::capture::drain_queue(pool, &settings, |_| {}, || false).await?;
    Ok(())
}

/// Number of changes waiting in the queue.
///
/// # Errors
///
/// [`BenchError::Service`] when the query fails.
pub async fn queue_depth(client: &Client) -> Result<i64, BenchError> {
    Ok(client
        .query_one("SELECT count(*) FROM freight_kpi.change_queue", &[])
        .await
        .map_err(database("count the change queue"))?
        .get(0))
}

/// Waits until the change queue is empty, polling every 50 ms.
///
/// # Errors
///
/// [`BenchError::TimedOut`] after `timeout`.
pub async fn wait_for_empty_queue(
    client: &Client,
    timeout: Duration,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    loop {
        let empty: bool = client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM freight_kpi.change_queue)",
                &[],
            )
            .await
            .map_err(database("check for an empty change queue"))?
            .get(0);
        if empty {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(BenchError::TimedOut {
                what: "draining the change queue",
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
