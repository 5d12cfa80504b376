//! Job control inside `freight-kpi run`: the tasks that run beside the listener and
//! stop with it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::abandoned::mark_abandoned_at_start;
use super::alert::AlertDispatcher;
use super::monitor::watch_health;
use super::runner::{new_holder_id, JobContext, JobRun, JOB_SHUTDOWN_GRACE};
use super::scheduler::run_scheduler;
use super::settings::JobSettings;
use super::summary::write_summaries;
use super::JobName;
use crate::db::Pool;
use crate::error::error_chain;
use crate::error::Result;
use crate::reconcile::{reconcile_job, ReconcileOptions};
use crate::service::IncrementalStats;

/// Time the alerts still queued at shutdown get to be sent.
const ALERT_FLUSH_AT_STOP: Duration = Duration::from_secs(1);

/// The running tasks of job control.
pub struct JobControl {
    context: JobContext,
    tasks: Vec<JoinHandle<()>>,
    dispatcher: AlertDispatcher,
}

impl JobControl {
    /// Starts the alert dispatcher and, as spawned tasks that end when `cancel`
    /// fires: the marking of abandoned runs followed by the scheduler of the nightly
    /// reconcile (unless turned off), the incremental summary writer, and the health
    /// watcher.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidSetting`] for incomplete alert sinks.
    pub fn start(
        settings: &JobSettings,
        pool: Pool,
        stats: Arc<Mutex<IncrementalStats>>,
        telemetry: Arc<crate::observe::Telemetry>,
        cancel: CancellationToken,
    ) -> Result<JobControl> {
        let (alerts, dispatcher) = AlertDispatcher::start(&settings.alerts)?;
        let holder_id = new_holder_id();
        let context = JobContext::new(
            pool.clone(),
            settings.lock,
            holder_id.clone(),
            alerts.clone(),
        )
        .with_telemetry(telemetry);
        tracing::info!(holder.id = %holder_id, "job control started");

        let mut tasks = Vec::new();
        let scheduler = settings.scheduler.clone();
        let scheduler_context = context.clone();
        let scheduler_cancel = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let context = scheduler_context;
            match mark_abandoned_at_start(
                &context.pool,
                &context.locks,
                &[JobName::KpiAggregation],
                &context.alerts,
            )
            .await
            {
                Ok(marked) if !marked.is_empty() => {
                    tracing::warn!(runs = ?marked, "marked runs of dead holders ABANDONED")
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "checking for abandoned runs failed; the next run of the job checks again")
                }
            }

            let Some(scheduler) = scheduler else {
                tracing::info!("scheduler turned off");
                return;
            };
            let work_context = context.clone();
            let work_cancel = scheduler_cancel.clone();
            run_scheduler(
                context,
                JobName::KpiAggregation,
                scheduler,
                scheduler_cancel,
                move |trigger| {
                    let context = work_context.clone();
                    let cancel = work_cancel.clone();
                    async move {
                        let options = ReconcileOptions::default();
                        match reconcile_job(&context, &options, trigger, &cancel).await? {
                            JobRun::Skipped { run_id, .. } | JobRun::Finished { run_id, .. } => {
                                Ok(run_id)
                            }
                        }
                    }
                },
            )
            .await;
        }));

        tasks.push(tokio::spawn(write_summaries(
            pool.clone(),
            stats,
            settings.summary_interval,
            holder_id,
            alerts.clone(),
            cancel.clone(),
        )));
        tasks.push(tokio::spawn(watch_health(
            pool,
            settings.health,
            alerts,
            cancel,
        )));

        Ok(JobControl {
            context,
            tasks,
            dispatcher,
        })
    }

    /// Returns the context that job runs of this process use.
    pub fn context(&self) -> &JobContext {
        &self.context
    }

    /// Waits for the tasks, which stop on the cancellation given to
    /// [`JobControl::start`], then sends the alerts still queued. A job run gets
    /// [`JOB_SHUTDOWN_GRACE`] to finish; tasks still running after that are aborted.
    pub async fn stop(self) {
        let deadline =
            tokio::time::Instant::now() + JOB_SHUTDOWN_GRACE + Duration::from_millis(500);
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!("a job control task did not stop in time; aborted");
                task.abort();
            }
        }
        self.dispatcher.finish(ALERT_FLUSH_AT_STOP).await;
    }
}
