//! Marking runs ABANDONED: RUNNING rows of this service whose holder died.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::alert::{Alert, AlertKind, AlertSender};
use super::job_lock::{Acquired, JobLocks};
use super::JobName;
use crate::db::Pool;
use crate::error::{Error, Result};

/// Marks every RUNNING row of `job` that this service started as ABANDONED, with the
/// reason in `error`. The caller must hold the job's lock: that proves no live holder
/// is left, since every run holds the lock from before its row is written until after
/// its row is finished. Rows of the application's own jobs have no holder entry and
/// are left alone.
///
/// # Errors
///
/// [`Error::Database`] when the update fails.
pub async fn mark_abandoned_runs(
    client: &impl GenericClient,
    job: JobName,
    alerts: &AlertSender,
) -> Result<Vec<i64>> {
    let rows = client
        .query(
            r#"UPDATE "JobRunLog" r
               SET status = 'ABANDONED',
                   "endedAt" = clock_timestamp(),
                   "durationMs" = least(extract(epoch FROM clock_timestamp() - r."startedAt") * 1000, 2147483647)::integer,
                   error = CASE h.lock_mode
                       WHEN 'advisory' THEN format(
                           'holder %s died: the connection holding its advisory lock (backend %s) ended before the run finished',
                           h.holder_id, h.backend_pid)
                       ELSE format(
                           'holder %s died: its lease (fencing token %s) expired or was taken over before the run finished',
                           h.holder_id, h.fencing_token)
                   END
               FROM freight_kpi.job_run_holder h
               WHERE h.run_id = r.id AND h.job_name = $1 AND r.status = 'RUNNING'
               RETURNING r.id, r.error, h.slot"#,
            &[&job.as_str()],
        )
        .await
        .map_err(Error::database("mark abandoned job runs"))?;

    let mut marked = Vec::with_capacity(rows.len());
    for row in rows {
        let run_id: i64 = row.get("id");
        let reason: Option<String> = row.get("error");
        let slot: Option<DateTime<Utc>> = row.get("slot");
        let mut alert = Alert::new(
            AlertKind::Abandoned,
            job,
            format!("run {run_id} was left RUNNING by a holder that died"),
        );
        alert.run_id = Some(run_id);
        alert.slot = slot;
        alert.error = reason;
        alerts.send(alert);
        marked.push(run_id);
    }
    Ok(marked)
}

/// At an instance's start: for each of `jobs` with RUNNING rows of this service, takes
/// the job's lock if it is free and marks those rows ABANDONED. A job whose lock is
/// held elsewhere is running and is left alone; its rows are checked again by its
/// next run.
///
/// # Errors
///
/// [`Error`] from the lock or the update.
pub async fn mark_abandoned_at_start(
    pool: &Pool,
    locks: &JobLocks,
    jobs: &[JobName],
    alerts: &AlertSender,
) -> Result<Vec<i64>> {
    let mut marked = Vec::new();
    for &job in jobs {
        let running = {
            let client = pool.get().await?;
            client
                .query_one(
                    r#"SELECT count(*) FROM freight_kpi.job_run_holder h
                       JOIN "JobRunLog" r ON r.id = h.run_id
                       WHERE h.job_name = $1 AND r.status = 'RUNNING'"#,
                    &[&job.as_str()],
                )
                .await
                .map_err(Error::database("look for running job runs"))?
                .get::<_, i64>(0)
        };
        if running == 0 {
            continue;
        }

        let lock = match locks.try_acquire(job).await? {
            Acquired::Held(lock) => lock,
            Acquired::Busy(holder) => {
                tracing::info!(job.name = %job, holder = %holder, "job is running elsewhere; its RUNNING rows are left as they are");
                continue;
            }
        };
        let outcome = {
            let client = pool.get().await;
            match client {
                Ok(client) => mark_abandoned_runs(&**client, job, alerts).await,
                Err(error) => Err(error),
            }
        };
        if let Err(error) = lock.release().await {
            tracing::warn!(job.name = %job, error = %crate::error::error_chain(&error), "releasing the job lock failed");
        }
        marked.extend(outcome?);
    }
    Ok(marked)
}
