//! The incremental path's periodic summary row in `"JobRunLog"`: one row per period
//! (default one hour) with the figures of the batches in it, instead of a row per
//! batch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::alert::{Alert, AlertKind, AlertSender};
use super::run_log::{log_period, JobName, RunStatus};
use crate::db::Pool;
use crate::error::error_chain;
use crate::service::IncrementalStats;

/// Writes a summary row of the incremental path every `interval` until `cancel` fires.
///
/// Each row covers the batches since the previous row: its status is SUCCESS, or
/// PARTIAL (alerted) when buckets failed in the period. A period whose row cannot be
/// written is merged into the next one. The period in flight at shutdown is not
/// written.
pub async fn write_summaries(
    pool: Pool,
    stats: Arc<Mutex<IncrementalStats>>,
    interval: Duration,
    instance_id: String,
    alerts: AlertSender,
    cancel: CancellationToken,
) {
    let mut previous = snapshot(&stats);
    let mut period_start = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }

        let current = snapshot(&stats);
        let period_ms = i64::try_from(period_start.elapsed().as_millis()).unwrap_or(i64::MAX);
        let figures = period_figures(&previous, &current, &instance_id);
        let failed = current.failed_buckets - previous.failed_buckets;
        let (status, error) = if failed > 0 {
            (
                RunStatus::Partial,
                Some(format!(
                    "{failed} bucket recomputes failed; they are retried"
                )),
            )
        } else {
            (RunStatus::Success, None)
        };

        let written = async {
            let client = pool.get().await?;
            log_period(
                &**client,
                JobName::KpiAggregation,
                status,
                period_ms,
                &figures,
                error.as_deref(),
            )
            .await
        }
        .await;
        match written {
            Ok(run_id) => {
                tracing::debug!(job.run_id = run_id, "incremental summary written");
                if status == RunStatus::Partial {
                    let mut alert = Alert::new(
                        AlertKind::RunPartial,
                        JobName::KpiAggregation,
                        format!("incremental summary {run_id}: some bucket recomputes failed"),
                    );
                    alert.run_id = Some(run_id);
                    alert.error = error;
                    alert.details = figures;
                    alerts.send(alert);
                }
                previous = current;
                period_start = Instant::now();
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "writing the incremental summary failed; its figures go into the next one");
            }
        }
    }
}

fn snapshot(stats: &Mutex<IncrementalStats>) -> IncrementalStats {
    stats.lock().expect("stats lock poisoned").clone()
}

/// Computes the figures of the batches between two snapshots of the cumulative
/// statistics.
fn period_figures(
    previous: &IncrementalStats,
    current: &IncrementalStats,
    instance_id: &str,
) -> serde_json::Value {
    let mut latency = current.latency_us.clone();
    // Both come from one histogram, and counts only grow, so the subtraction fits.
    let _ = latency.subtract(&previous.latency_us);
    let quantile_ms = |quantile: f64| {
        (!latency.is_empty()).then(|| latency.value_at_quantile(quantile) as f64 / 1000.0)
    };
    json!({
        "kind": "incremental_summary",
        "instance_id": instance_id,
        "batches": current.batches - previous.batches,
        "changes_consumed": current.changes - previous.changes,
        "buckets_recomputed": current.buckets - previous.buckets,
        "rows_written": current.written - previous.written,
        "failed_buckets": current.failed_buckets - previous.failed_buckets,
        "freshness_ms": {
            "p50": quantile_ms(0.5),
            "p95": quantile_ms(0.95),
            "p99": quantile_ms(0.99),
            "max": (!latency.is_empty()).then(|| latency.max() as f64 / 1000.0),
        },
    })
}
