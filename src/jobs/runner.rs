//! Running one job: take its lock, log the run from RUNNING to its end, watch the lock
//! while the work runs, and alert on failures.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::abandoned::mark_abandoned_runs;
use super::alert::{Alert, AlertKind, AlertSender};
use super::job_lock::{Acquired, Fence, JobLock, JobLocks};
use super::run_log::{finish_run, log_skipped_run, start_held_run, JobName, RunStatus};
use crate::db::Pool;
use crate::error::error_chain;
use crate::error::{Error, Result};

/// Time a running job gets to finish after a shutdown request before it is dropped,
/// which rolls its transaction back. It keeps a stop of `run` under 10 seconds.
pub const JOB_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Returns a random holder id for this process: a new one at every start, so a
/// restarted process on the same host is a new holder. The process id is included to
/// help an operator find the process.
pub fn new_holder_id() -> String {
    format!(
        "{}-{:012x}",
        std::process::id(),
        rand::random::<u64>() >> 16
    )
}

/// The context of job runs: the pool, the lock source and the alert sender.
#[derive(Clone)]
pub struct JobContext {
    pub pool: Pool,
    pub locks: Arc<JobLocks>,
    pub alerts: AlertSender,
    /// Counts lock acquisitions and losses for `/metrics`, when set.
    pub telemetry: Option<Arc<crate::observe::Telemetry>>,
}

impl JobContext {
    /// Creates the context of a process: `holder_id` must be unique per process.
    pub fn new(
        pool: Pool,
        lock: super::LockSettings,
        holder_id: String,
        alerts: AlertSender,
    ) -> Self {
        let locks = Arc::new(JobLocks::new(pool.clone(), lock, holder_id));
        Self {
            pool,
            locks,
            alerts,
            telemetry: None,
        }
    }

    /// Returns the context with lock acquisitions and losses counted in `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Arc<crate::observe::Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("locks", &self.locks)
            .field("alerts", &self.alerts)
            .finish()
    }
}

/// The reason a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Started by a person, such as `freight-kpi reconcile`.
    Manual,
    /// Started by the scheduler for `slot`, `late_by` after it.
    Scheduled {
        slot: DateTime<Utc>,
        late_by: Duration,
    },
}

impl Trigger {
    fn slot(self) -> Option<DateTime<Utc>> {
        match self {
            Trigger::Manual => None,
            Trigger::Scheduled { slot, .. } => Some(slot),
        }
    }

    /// Returns the fields every `"statsJson"` of the run carries.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Trigger::Manual => json!({ "trigger": "manual" }),
            Trigger::Scheduled { slot, late_by } => json!({
                "trigger": "schedule",
                "slot": slot,
                "late_by_seconds": late_by.as_secs_f64(),
            }),
        }
    }
}

/// The result of a job's work when it did not fail as a whole.
#[derive(Debug, Clone)]
pub struct WorkOutcome<T> {
    /// SUCCESS, or PARTIAL when some units failed.
    pub status: RunStatus,
    /// The job's figures for `"statsJson"`.
    pub stats: serde_json::Value,
    /// The failure, for a PARTIAL run.
    pub error: Option<String>,
    pub output: T,
}

/// The end of a job run.
#[derive(Debug, Clone)]
pub enum JobRun<T> {
    /// Another instance held the lock; a SKIPPED row was logged.
    Skipped { run_id: i64, holder: String },
    /// The run was logged with `status`; `output` is set unless it failed as a whole.
    Finished {
        run_id: i64,
        status: RunStatus,
        error: Option<String>,
        output: Option<T>,
    },
}

/// Runs `work` under the lock of `job` and logs it in `"JobRunLog"`.
///
/// When the lock is held elsewhere, a SKIPPED row is written and `work` does not run.
/// Otherwise RUNNING rows of the job left by dead holders are marked ABANDONED, a
/// RUNNING row is written, and `work` gets the [`Fence`] its writes must check. If the
/// lock is lost before `work` ends, `work` is dropped (its transaction rolls back) and
/// the run ends ERROR "lock lost". A shutdown through `shutdown` gives `work`
/// [`JOB_SHUTDOWN_GRACE`] before the same happens. ERROR and PARTIAL runs are alerted.
/// The lock is released in every case, and dropping this future drops the lock too.
///
/// # Errors
///
/// [`Error`] when the lock or the run log cannot be written; a failure of `work` is
/// not an error here but an ERROR run.
#[tracing::instrument(name = "job_run", skip_all, fields(job.name = %job, job.run_id, job.slot))]
pub async fn run_job<T, F, Fut>(
    context: &JobContext,
    job: JobName,
    trigger: Trigger,
    shutdown: &CancellationToken,
    work: F,
) -> Result<JobRun<T>>
where
    F: FnOnce(Fence) -> Fut,
    Fut: Future<Output = Result<WorkOutcome<T>>>,
{
    if let Some(slot) = trigger.slot() {
        tracing::Span::current().record("job.slot", slot.to_rfc3339());
    }

    let lock = match context.locks.try_acquire(job).await? {
        Acquired::Held(lock) => lock,
        Acquired::Busy(holder) => {
            let mut stats = trigger.to_json();
            stats["reason"] = json!("lock held elsewhere");
            stats["holder"] = json!(holder);
            let client = context.pool.get().await?;
            let run_id = log_skipped_run(
                &**client,
                job,
                &stats,
                &format!("lock held elsewhere: {holder}"),
            )
            .await?;
            tracing::info!(job.run_id = run_id, holder = %holder, "job skipped: its lock is held elsewhere");
            return Ok(JobRun::Skipped { run_id, holder });
        }
    };
    tracing::info!(lock.mode = lock.mode().as_str(), "job lock taken");
    if let Some(telemetry) = &context.telemetry {
        telemetry.record_lock_acquired(job.as_str());
    }

    let outcome = run_locked(context, job, trigger, shutdown, &lock, work).await;

    if let Err(error) = lock.release().await {
        tracing::warn!(error = %error_chain(&error), "releasing the job lock failed; it ends with its connection or lease");
    } else {
        tracing::info!("job lock released");
    }
    outcome
}

async fn run_locked<T, F, Fut>(
    context: &JobContext,
    job: JobName,
    trigger: Trigger,
    shutdown: &CancellationToken,
    lock: &JobLock,
    work: F,
) -> Result<JobRun<T>>
where
    F: FnOnce(Fence) -> Fut,
    Fut: Future<Output = Result<WorkOutcome<T>>>,
{
    let holder_id = context.locks.holder_id();
    let run_id = {
        let client = context.pool.get().await?;
        mark_abandoned_runs(&**client, job, &context.alerts).await?;
        start_held_run(&**client, job, &lock.holder(holder_id, trigger.slot())).await?
    };
    tracing::Span::current().record("job.run_id", run_id);
    tracing::info!("job run started");

    let lost = lock.lost();
    let shutdown_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(JOB_SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        biased;
        outcome = work(lock.fence(holder_id)) => outcome.map_err(|error| error_chain(&error)),
        reason = lost.wait() => {
            if let Some(telemetry) = &context.telemetry {
                telemetry.record_lock_lost(job.as_str());
            }
            Err(error_chain(&Error::LockLost { job: job.as_str(), reason }))
        }
        () = shutdown_deadline => Err("interrupted by a shutdown before it finished".to_owned()),
    };

    let mut stats = trigger.to_json();
    stats["holder_id"] = json!(holder_id);
    stats["lock_mode"] = json!(lock.mode().as_str());
    let (status, error, output) = match result {
        Ok(outcome) => {
            if let serde_json::Value::Object(fields) = outcome.stats {
                for (key, value) in fields {
                    stats[key] = value;
                }
            }
            (outcome.status, outcome.error, Some(outcome.output))
        }
        Err(error) => (RunStatus::Error, Some(error), None),
    };

    {
        let client = context.pool.get().await?;
        finish_run(&**client, run_id, status, &stats, error.as_deref()).await?;
    }
    match status {
        RunStatus::Error => tracing::error!(error = error.as_deref(), "job run failed"),
        RunStatus::Partial => {
            tracing::warn!(error = error.as_deref(), "job run finished with failures")
        }
        _ => tracing::info!(status = status.as_str(), "job run finished"),
    }

    let kind = match status {
        RunStatus::Error => Some(AlertKind::RunError),
        RunStatus::Partial => Some(AlertKind::RunPartial),
        _ => None,
    };
    if let Some(kind) = kind {
        let mut alert = Alert::new(kind, job, format!("run {run_id} ended {}", status.as_str()));
        alert.run_id = Some(run_id);
        alert.slot = trigger.slot();
        alert.error = error.clone();
        alert.details = stats;
        context.alerts.send(alert);
    }

    Ok(JobRun::Finished {
        run_id,
        status,
        error,
        output,
    })
}
