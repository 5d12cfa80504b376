//! Health alerts: the freshness lag (age of the oldest pending change) and the fill of
//! PostgreSQL's notification queue, each alerted once when it crosses its threshold and
//! again only after it fell back below.

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::alert::{Alert, AlertKind, AlertSender};
use super::JobName;
use crate::capture::queue_health;
use crate::db::Pool;
use crate::error::error_chain;
use crate::error::{Error, Result};

/// Thresholds of the health alerts, each with its default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthThresholds {
    /// How often the health is read (default 10 s).
    pub interval: Duration,
    /// Alert when the oldest pending change is older (default 60 s).
    pub freshness_lag: Duration,
    /// Alert when `pg_notification_queue_usage()` exceeds this fraction (default 0.10).
    pub notification_queue: f64,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            freshness_lag: Duration::from_secs(60),
            notification_queue: 0.10,
        }
    }
}

/// One reading of the watched figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthReading {
    /// Age of the oldest pending change in seconds; `None` when the queue is empty.
    pub freshness_lag_seconds: Option<f64>,
    /// Fraction of the notification queue in use, from 0 to 1.
    pub notification_queue_usage: f64,
}

/// Reads the freshness lag and the notification queue usage.
///
/// # Errors
///
/// [`Error::Database`] when a query fails.
pub async fn read_health(pool: &Pool) -> Result<HealthReading> {
    let client = pool.get().await?;
    let queue = queue_health(&**client).await?;
    let usage: f64 = client
        .query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .map_err(Error::database("read the notification queue usage"))?
        .get(0);
    Ok(HealthReading {
        freshness_lag_seconds: queue.oldest_age_seconds,
        notification_queue_usage: usage,
    })
}

/// Reads the health every `thresholds.interval` and alerts on each crossing, until
/// `cancel` fires.
pub async fn watch_health(
    pool: Pool,
    thresholds: HealthThresholds,
    alerts: AlertSender,
    cancel: CancellationToken,
) {
    let mut lagging = false;
    let mut queue_full = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(thresholds.interval) => {}
        }
        let reading = match read_health(&pool).await {
            Ok(reading) => reading,
            Err(error) => {
                tracing::debug!(error = %error_chain(&error), "reading the health failed; retrying at the next check");
                continue;
            }
        };

        let lag = reading.freshness_lag_seconds.unwrap_or(0.0);
        let lag_over = lag > thresholds.freshness_lag.as_secs_f64();
        if lag_over && !lagging {
            let mut alert = Alert::new(
                AlertKind::FreshnessLag,
                JobName::KpiAggregation,
                format!(
                    "the oldest pending change is {lag:.1} s old, over the threshold of {:.1} s",
                    thresholds.freshness_lag.as_secs_f64()
                ),
            );
            alert.details = json!({
                "freshness_lag_seconds": lag,
                "threshold_seconds": thresholds.freshness_lag.as_secs_f64(),
            });
            alerts.send(alert);
        } else if !lag_over && lagging {
            tracing::info!(
                freshness_lag_seconds = lag,
                "freshness lag back under its threshold"
            );
        }
        lagging = lag_over;

        let usage = reading.notification_queue_usage;
        let usage_over = usage > thresholds.notification_queue;
        if usage_over && !queue_full {
            let mut alert = Alert::new(
                AlertKind::NotificationQueue,
                JobName::KpiAggregation,
                format!(
                    "PostgreSQL's notification queue is {:.4} % full, over the threshold of {:.4} %; a session that listens but does not read (often one idle in a transaction) holds it",
                    usage * 100.0,
                    thresholds.notification_queue * 100.0
                ),
            );
            alert.details = json!({
                "usage_fraction": usage,
                "threshold_fraction": thresholds.notification_queue,
            });
            alerts.send(alert);
        } else if !usage_over && queue_full {
            tracing::info!(
                usage_fraction = usage,
                "notification queue usage back under its threshold"
            );
        }
        queue_full = usage_over;
    }
}
