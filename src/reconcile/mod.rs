//! The full pass: recompute a range of buckets from `"Load"` in one statement, repair
//! those that drifted and report what was found.

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::capture::BucketFailure;
use crate::db::{connect_dedicated, Pool};
use crate::error::{Error, Result};
use crate::jobs::{
    finish_run, run_job, start_run, Alert, AlertKind, Fence, JobContext, JobName, JobRun,
    RunStatus, Trigger, WorkOutcome,
};
use crate::kpi::{self, BucketRange, FullPassSummary};

/// The range and mode of a reconcile.
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

    let outcome = full_pass_fenced(pool, options, &Fence::Unlocked).await;

    let (status, stats, error) = match &outcome {
        Ok(summary) => {
            let (status, error) = status_of(summary);
            (status, stats_json(options, summary), error)
        }
        Err(error) => (
            RunStatus::Error,
            json!({ "dry_run": options.dry_run }),
            Some(crate::error::error_chain(error)),
        ),
    };
    finish_run(&**log_client, run_id, status, &stats, error.as_deref()).await?;
    let summary = outcome?;

    log_findings(&summary, status);
    Ok(ReconcileReport {
        run_id,
        status,
        summary,
    })
}

/// Runs one reconcile as job KPI_AGGREGATION under the job lock, as `freight-kpi
/// reconcile` and the scheduler do.
///
/// When another instance holds the lock the reconcile does not run and a SKIPPED row
/// is logged. Otherwise the repair transaction checks the lock's fence before it
/// writes, so a holder that lost its lock (or whose lease moved on) writes nothing.
/// Drift found is alerted, as are ERROR and PARTIAL runs (see [`run_job`]).
///
/// # Errors
///
/// [`Error`] when the lock or the run log cannot be written; a failed pass is an ERROR
/// run, not an error.
pub async fn reconcile_job(
    context: &JobContext,
    options: &ReconcileOptions,
    trigger: Trigger,
    shutdown: &CancellationToken,
) -> Result<JobRun<FullPassSummary>> {
    let pool = &context.pool;
    let run = run_job(
        context,
        JobName::KpiAggregation,
        trigger,
        shutdown,
        |fence| async move {
            let summary = full_pass_fenced(pool, options, &fence).await?;
            let (status, error) = status_of(&summary);
            Ok(WorkOutcome {
                status,
                stats: stats_json(options, &summary),
                error,
                output: summary,
            })
        },
    )
    .await?;

    if let JobRun::Finished {
        run_id,
        status,
        output: Some(summary),
        ..
    } = &run
    {
        log_findings(summary, *status);
        if summary.drifted > 0 {
            let mut alert = Alert::new(
                AlertKind::Drift,
                JobName::KpiAggregation,
                format!(
                    "reconcile run {run_id} found {} drifted buckets ({} repaired): the incremental path missed changes and must be investigated",
                    summary.drifted, summary.repaired
                ),
            );
            alert.run_id = Some(*run_id);
            if let Trigger::Scheduled { slot, .. } = trigger {
                alert.slot = Some(slot);
            }
            alert.details = stats_json(options, summary);
            context.alerts.send(alert);
        }
    }
    Ok(run)
}

fn status_of(summary: &FullPassSummary) -> (RunStatus, Option<String>) {
    if summary.overflowed.is_empty() {
        (RunStatus::Success, None)
    } else {
        (
            RunStatus::Partial,
            Some(format!(
                "{} buckets overflow their columns",
                summary.overflowed.len()
            )),
        )
    }
}

fn log_findings(summary: &FullPassSummary, status: RunStatus) {
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
}

/// Cancels the statement of a backend when dropped before [`CancelOnDrop::disarm`],
/// so a reconcile dropped mid-statement (its lock lost) frees its bucket locks at once
/// instead of when the statement ends.
struct CancelOnDrop {
    pool: Pool,
    backend_pid: i32,
    armed: bool,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.armed {
            return;
        }
        let (pool, pid) = (self.pool.clone(), self.backend_pid);
        runtime.spawn(async move {
            if let Ok(client) = pool.get().await {
                let _ = client
                    .execute("SELECT pg_cancel_backend($1)", &[&pid])
                    .await;
            }
        });
    }
}

/// Runs the full pass in one transaction on a connection of its own. Unless it is a
/// dry run, the pass takes every bucket lock and then checks `fence` before it writes:
/// a pass whose job lock was lost meanwhile writes nothing.
///
/// # Cancel safety
///
/// Dropping the future closes the connection, which rolls the transaction back, and
/// cancels a statement still running on the server.
///
/// # Errors
///
/// [`Error::Fenced`] or [`Error::LockLost`] from the fence, [`Error::Database`] from
/// the pass.
pub async fn full_pass_fenced(
    pool: &Pool,
    options: &ReconcileOptions,
    fence: &Fence,
) -> Result<FullPassSummary> {
    let target = pool.target().with_application_name("freight-kpi reconcile");
    let (mut client, _messages) = connect_dedicated(&target).await?;
    let transaction = crate::db::begin_bounded(&mut client, None, None).await?;
    let backend_pid: i32 = transaction
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(Error::database("read the reconcile's backend"))?
        .get(0);
    let cancel_on_drop = CancelOnDrop {
        pool: pool.clone(),
        backend_pid,
        armed: true,
    };

    if !options.dry_run {
        kpi::lock_all_buckets(&transaction).await?;
        fence.check(&transaction).await?;
    }
    let summary = kpi::full_pass(&transaction, options.range, options.dry_run).await?;

    transaction
        .commit()
        .await
        .map_err(Error::database("commit the reconcile"))?;
    cancel_on_drop.disarm();
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
