//! Job control: the `"JobRunLog"` rows every job run writes, the job locks (advisory
//! locks or table leases with fencing tokens), the scheduler of the nightly reconcile,
//! the incremental path's summary rows, and the alerts.

mod abandoned;
mod alert;
mod control;
mod job_lock;
mod lease;
mod lock;
mod monitor;
mod run_log;
mod runner;
mod schedule;
mod scheduler;
mod settings;
mod summary;

pub use abandoned::{mark_abandoned_at_start, mark_abandoned_runs};
pub use alert::{
    pagerduty_body, slack_body, Alert, AlertDispatcher, AlertKind, AlertSender, AlertSettings,
};
pub use control::JobControl;
pub use job_lock::{
    behind_transaction_pooler, Acquired, Fence, JobLock, JobLocks, LockMode, LockSettings,
    LostSignal, ResolvedLockMode,
};
pub use lease::{check_lease, Lease, LeaseHeld};
pub use lock::{job_lock_key, AdvisoryLock, FIRST_JOB_LOCK_KEY, LOCK_APPLICATION_NAME};
pub use monitor::{read_health, watch_health, HealthReading, HealthThresholds};
pub use run_log::{
    finish_run, log_period, log_skipped_run, prune_runs, start_held_run, start_run, JobName,
    RunHolder, RunStatus,
};
pub use runner::{
    new_holder_id, run_job, JobContext, JobRun, Trigger, WorkOutcome, JOB_SHUTDOWN_GRACE,
};
pub use schedule::{Schedule, DEFAULT_RECONCILE_CRON, DEFAULT_TIME_ZONE};
pub use scheduler::{run_scheduler, DatabaseClock, DbClock, SchedulerSettings};
pub use settings::{JobArgs, JobSettings, ScheduleArgs, SCHEDULE_OFF};
pub use summary::write_summaries;
