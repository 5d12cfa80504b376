//! The full pass: recompute a range of buckets from `"Load"` in one statement, repair
//! those that drifted and report what was found.

use serde_json::json;

use crate::capture::BucketFailure;
use crate::db::Pool;
use crate::error::{Error, Result};
use crate::jobs::{finish_run, start_run, JobName, RunStatus};
use crate::kpi::{self, BucketRange, FullPassSummary};

/// What to reconcile.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileOptions {
    pub range: BucketRange,
    /// Compare and report, write nothing.
    pub dry_run: bool,
}

/// The outcome of a reconcile, as logged in `"JobRunLog"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub run_id: i64,
    pub status: RunStatus,
    pub summary: FullPassSummary,
}

/// Runs one reconcile and logs it in `"JobRunLog"` as KPI_AGGREGATION.
///
/// A repairing run first takes every bucket lock, then reads `"Load"`: an incremental
/// batch that committed earlier is seen by the read, and one that starts later waits,
/// so the repair never writes an older result over a newer one. The run ends as
/// PARTIAL when some buckets could not be written (their values overflow).
///
/// # Errors
///
/// [`Error`] when the pass fails; the run is then logged as ERROR with the reason.
#[tracing::instrument(name = "reconcile", skip_all, fields(job.name = "KPI_AGGREGATION", job.run_id))]
pub async fn reconcile(pool: &Pool, options: &ReconcileOptions) -> Result<ReconcileReport> {
    let log_client = pool.get().await?;
    kpi::check_kpi_table(&**log_client).await?;
    let run_id = start_run(&**log_client, JobName::KpiAggregation).await?;
    tracing::Span::current().record("job.run_id", run_id);
    tracing::info!(dry_run = options.dry_run, "reconcile started");

    let outcome = full_pass(pool, options).await;

    let (status, stats, error) = match &outcome {
        Ok(summary) if summary.overflowed.is_empty() => {
            (RunStatus::Success, stats_json(options, summary), None)
        }
        Ok(summary) => (
            RunStatus::Partial,
            stats_json(options, summary),
            Some(format!(
                "{} buckets overflow their columns",
                summary.overflowed.len()
            )),
        ),
        Err(error) => (
            RunStatus::Error,
            json!({ "dry_run": options.dry_run }),
            Some(crate::capture::error_chain(error)),
        ),
    };
    finish_run(&**log_client, run_id, status, &stats, error.as_deref()).await?;
    let summary = outcome?;

    for failure in summary.overflowed.iter().map(BucketFailure::from) {
        tracing::error!(
            bucket.venture_id = failure.bucket.venture_id,
            bucket.day = %failure.bucket.day,
            error = %failure.reason,
            "reconcile could not write a bucket"
        );
    }
    if summary.drifted > 0 {
        tracing::warn!(
            drifted = summary.drifted,
            repaired = summary.repaired,
            sample = %serde_json::to_string(&summary.drifted_sample).unwrap_or_default(),
            "reconcile found drift: the incremental path missed changes (for example writes with session_replication_role = replica)"
        );
    }
    tracing::info!(
        scanned = summary.scanned,
        drifted = summary.drifted,
        repaired = summary.repaired,
        zeroed = summary.zeroed,
        status = status.as_str(),
        "reconcile finished"
    );
    Ok(ReconcileReport {
        run_id,
        status,
        summary,
    })
}

async fn full_pass(pool: &Pool, options: &ReconcileOptions) -> Result<FullPassSummary> {
    let mut client = pool.get().await?;
    let transaction = client
        .transaction()
        .await
        .map_err(Error::database("begin the reconcile"))?;

    if !options.dry_run {
        kpi::lock_all_buckets(&transaction).await?;
    }
    let summary = kpi::full_pass(&transaction, options.range, options.dry_run).await?;

    transaction
        .commit()
        .await
        .map_err(Error::database("commit the reconcile"))?;
    Ok(summary)
}

fn stats_json(options: &ReconcileOptions, summary: &FullPassSummary) -> serde_json::Value {
    json!({
        "dry_run": options.dry_run,
        "from": options.range.from,
        "to": options.range.to,
        "venture_id": options.range.venture_id,
        "scanned": summary.scanned,
        "drifted": summary.drifted,
        "repaired": summary.repaired,
        "zeroed": summary.zeroed,
        "failed": summary.overflowed.len(),
        "drifted_sample": summary.drifted_sample,
    })
}
