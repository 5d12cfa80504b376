//! Writing `"JobRunLog"`: a RUNNING row at start, its final status at the end.

use tokio_postgres::GenericClient;

use crate::error::{Error, Result};

/// Values of the `"JobName"` enum that this service writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobName {
    /// The KPI reconcile and the incremental path's summaries.
    KpiAggregation,
}

impl JobName {
    pub fn as_str(self) -> &'static str {
        match self {
            JobName::KpiAggregation => "KPI_AGGREGATION",
        }
    }
}

/// The `status` column of `"JobRunLog"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Started and not finished, or its process died (see `Abandoned`).
    Running,
    /// Finished with every unit of work done.
    Success,
    /// Finished, but some units (buckets) failed.
    Partial,
    /// Failed as a whole.
    Error,
    /// Not run because another instance held the job's lock.
    Skipped,
    /// Left RUNNING by a process that died.
    Abandoned,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Success => "SUCCESS",
            RunStatus::Partial => "PARTIAL",
            RunStatus::Error => "ERROR",
            RunStatus::Skipped => "SKIPPED",
            RunStatus::Abandoned => "ABANDONED",
        }
    }
}

/// Inserts a RUNNING row for `job` and returns its id.
///
/// Use a connection outside the job's own transaction, so the row is visible while
/// the job runs and survives its rollback.
///
/// # Errors
///
/// [`Error::Database`] when the insert fails.
pub async fn start_run(client: &impl GenericClient, job: JobName) -> Result<i64> {
    let row = client
        .query_one(
            r#"INSERT INTO "JobRunLog" ("jobName", status, "startedAt")
               VALUES ($1::text::"JobName", 'RUNNING', clock_timestamp())
               RETURNING id"#,
            &[&job.as_str()],
        )
        .await
        .map_err(Error::database("start a job run"))?;
    Ok(row.get(0))
}

/// Ends run `run_id` with `status`, its figures and, for failures, the error.
///
/// # Errors
///
/// [`Error::Database`] when the update fails.
pub async fn finish_run(
    client: &impl GenericClient,
    run_id: i64,
    status: RunStatus,
    stats: &serde_json::Value,
    error: Option<&str>,
) -> Result<()> {
    client
        .execute(
            r#"UPDATE "JobRunLog"
               SET status = $2,
                   "endedAt" = clock_timestamp(),
                   "durationMs" = least(extract(epoch FROM clock_timestamp() - "startedAt") * 1000, 2147483647)::integer,
                   "statsJson" = $3,
                   error = $4
               WHERE id = $1"#,
            &[&run_id, &status.as_str(), stats, &error],
        )
        .await
        .map_err(Error::database("finish a job run"))?;
    Ok(())
}
