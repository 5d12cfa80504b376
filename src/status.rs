//! `freight-kpi status`: the queue, the listeners and the last job runs.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::capture::{queue_health, QueueHealth};
use crate::error::{Error, Result};

/// One `"JobRunLog"` row, as shown by `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecentRun {
    pub id: i64,
    pub job_name: String,
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: Option<i32>,
    pub error: Option<String>,
}

/// Everything `status` prints.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatusReport {
    pub queue: QueueHealth,
    pub recent_runs: Vec<RecentRun>,
}

/// Reads the queue's health and the ten most recent KPI_AGGREGATION runs.
///
/// # Errors
///
/// [`Error::SchemaMissing`] before `migrate`, [`Error::Database`] otherwise.
pub async fn read_status(client: &impl GenericClient) -> Result<StatusReport> {
    let queue = queue_health(client).await?;
    let rows = client
        .query(
            r#"SELECT id, "jobName"::text AS job_name, status, "startedAt", "durationMs", error
               FROM "JobRunLog"
               WHERE "jobName" = 'KPI_AGGREGATION'
               ORDER BY "startedAt" DESC
               LIMIT 10"#,
            &[],
        )
        .await
        .map_err(Error::database("read the last job runs"))?;

    let recent_runs = rows
        .iter()
        .map(|row| RecentRun {
            id: row.get("id"),
            job_name: row.get("job_name"),
            status: row.get("status"),
            started_at: row.get("startedAt"),
            duration_ms: row.get("durationMs"),
            error: row.get("error"),
        })
        .collect();
    Ok(StatusReport { queue, recent_runs })
}

impl std::fmt::Display for StatusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = &self.queue;
        writeln!(f, "queue depth:        {} changes", queue.depth)?;
        match queue.oldest_age_seconds {
            Some(age) => writeln!(f, "oldest change age:  {age:.3} s")?,
            None => writeln!(f, "oldest change age:  - (queue empty)")?,
        }
        writeln!(f, "failed buckets:     {}", queue.failed_buckets)?;
        writeln!(f, "live listeners:     {}", queue.listeners)?;
        writeln!(f, "last runs:")?;
        if self.recent_runs.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for run in &self.recent_runs {
            write!(
                f,
                "  #{} {} {} started {}",
                run.id,
                run.job_name,
                run.status,
                run.started_at.format("%Y-%m-%d %H:%M:%S UTC")
            )?;
            if let Some(duration) = run.duration_ms {
                write!(f, " took {duration} ms")?;
            }
            if let Some(error) = &run.error {
                write!(f, " error: {error}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
