//! Writing `"JobRunLog"`: a RUNNING row at start, its final status at the end, the
//! SKIPPED rows of runs that another instance did, and the pruning of old rows.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::error::{Error, Result};

/// Values of the `"JobName"` enum. This service runs only KPI_AGGREGATION; the others
/// belong to the application and appear here so that settings can name them (the
/// critical jobs of alerts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobName {
    IncentiveDailyCommit,
    ChurnRecalc,
    TaskGeneration,
    /// The KPI reconcile and the incremental path's summaries.
    KpiAggregation,
}

impl JobName {
    /// Every value, in the order of the enum.
    pub const ALL: [JobName; 4] = [
        JobName::IncentiveDailyCommit,
        JobName::ChurnRecalc,
        JobName::TaskGeneration,
        JobName::KpiAggregation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobName::IncentiveDailyCommit => "INCENTIVE_DAILY_COMMIT",
            JobName::ChurnRecalc => "CHURN_RECALC",
            JobName::TaskGeneration => "TASK_GENERATION",
            JobName::KpiAggregation => "KPI_AGGREGATION",
        }
    }
}

impl FromStr for JobName {
    type Err = String;

    fn from_str(value: &str) -> std::result::Result<Self, Self::Err> {
        JobName::ALL
            .into_iter()
            .find(|job| job.as_str().eq_ignore_ascii_case(value.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown job name {value:?}; expected one of {}",
                    JobName::ALL.map(JobName::as_str).join(", ")
                )
            })
    }
}

impl serde::Serialize for JobName {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for JobName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// Not run because another instance held the job's lock or had claimed its slot.
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

/// The lock holder of a run, recorded beside its `"JobRunLog"` row so that a later
/// instance can tell a run of this service that was left RUNNING.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunHolder {
    /// Random id of the process that runs the job.
    pub holder_id: String,
    /// `advisory` or `table`.
    pub lock_mode: &'static str,
    /// The lease's generation in table mode.
    pub fencing_token: Option<i64>,
    /// Backend of the lock's connection in advisory mode.
    pub backend_pid: Option<i32>,
    /// The scheduled slot the run is for, if any.
    pub slot: Option<DateTime<Utc>>,
}

/// Inserts a RUNNING row for `job` together with its holder, in one statement, and
/// returns the run's id.
///
/// # Errors
///
/// [`Error::Database`] when the insert fails.
pub async fn start_held_run(
    client: &impl GenericClient,
    job: JobName,
    holder: &RunHolder,
) -> Result<i64> {
    let row = client
        .query_one(
            r#"WITH run AS (
                   INSERT INTO "JobRunLog" ("jobName", status, "startedAt")
                   VALUES ($1::text::"JobName", 'RUNNING', clock_timestamp())
                   RETURNING id
               ), holder AS (
                   INSERT INTO freight_kpi.job_run_holder
                       (run_id, job_name, holder_id, lock_mode, fencing_token, backend_pid, slot)
                   SELECT id, $1::text, $2::text, $3::text, $4::bigint, $5::integer, $6::timestamptz
                   FROM run
               )
               SELECT id FROM run"#,
            &[
                &job.as_str(),
                &holder.holder_id,
                &holder.lock_mode,
                &holder.fencing_token,
                &holder.backend_pid,
                &holder.slot,
            ],
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

/// Inserts a finished SKIPPED row for `job` with `stats` saying why, and returns its id.
///
/// # Errors
///
/// [`Error::Database`] when the insert fails.
pub async fn log_skipped_run(
    client: &impl GenericClient,
    job: JobName,
    stats: &serde_json::Value,
    reason: &str,
) -> Result<i64> {
    let row = client
        .query_one(
            r#"INSERT INTO "JobRunLog" ("jobName", status, "startedAt", "endedAt", "durationMs", "statsJson", error)
               VALUES ($1::text::"JobName", 'SKIPPED', clock_timestamp(), clock_timestamp(), 0, $2, $3)
               RETURNING id"#,
            &[&job.as_str(), stats, &reason],
        )
        .await
        .map_err(Error::database("log a skipped job run"))?;
    Ok(row.get(0))
}

/// Inserts a finished row that covers a period, such as the incremental path's
/// summary, and returns its id. `"startedAt"` is `period_ms` before now.
///
/// # Errors
///
/// [`Error::Database`] when the insert fails.
pub async fn log_period(
    client: &impl GenericClient,
    job: JobName,
    status: RunStatus,
    period_ms: i64,
    stats: &serde_json::Value,
    error: Option<&str>,
) -> Result<i64> {
    let row = client
        .query_one(
            r#"INSERT INTO "JobRunLog" ("jobName", status, "startedAt", "endedAt", "durationMs", "statsJson", error)
               VALUES ($1::text::"JobName", $2, clock_timestamp() - $3::bigint * interval '1 millisecond',
                       clock_timestamp(), least($3::bigint, 2147483647)::integer, $4, $5)
               RETURNING id"#,
            &[&job.as_str(), &status.as_str(), &period_ms, stats, &error],
        )
        .await
        .map_err(Error::database("log a job summary"))?;
    Ok(row.get(0))
}

/// Deletes the finished rows of `jobs` that started more than `retention_days` ago,
/// with their holder rows, and returns how many runs were deleted. RUNNING rows are
/// kept whatever their age. Rows of other job names belong to the application and are
/// left alone.
///
/// # Errors
///
/// [`Error::Database`] when the delete fails.
pub async fn prune_runs(
    client: &impl GenericClient,
    jobs: &[JobName],
    retention_days: i32,
) -> Result<u64> {
    let names: Vec<&str> = jobs.iter().map(|job| job.as_str()).collect();
    let row = client
        .query_one(
            r#"WITH pruned AS (
                   DELETE FROM "JobRunLog"
                   WHERE "jobName"::text = ANY ($1::text[])
                     AND status <> 'RUNNING'
                     AND "startedAt" < now() - $2::integer * interval '1 day'
                   RETURNING id
               ), holders AS (
                   DELETE FROM freight_kpi.job_run_holder h
                   USING pruned p WHERE h.run_id = p.id
               )
               SELECT count(*) FROM pruned"#,
            &[&names, &retention_days],
        )
        .await
        .map_err(Error::database("prune old job runs"))?;
    Ok(row.get::<_, i64>(0) as u64)
}
