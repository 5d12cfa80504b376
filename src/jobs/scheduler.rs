//! The scheduler inside `freight-kpi run`: runs a job at each slot of its schedule,
//! once across all instances, catches up a slot that passed while every instance was
//! down, and prunes old run-log rows.
//!
//! Slot arithmetic uses the database's clock, read through [`DbClock`], never the
//! instance's: instances whose clocks differ agree on which slot is due. A slot is
//! claimed by inserting it into `freight_kpi.job_slot`, whose primary key lets exactly
//! one instance succeed; the others log a SKIPPED run.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
use serde_json::json;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::alert::{Alert, AlertKind};
use super::run_log::{log_skipped_run, prune_runs};
use super::runner::{JobContext, Trigger};
use super::schedule::Schedule;
use super::JobName;
use crate::db::Pool;
use crate::error::error_chain;
use crate::error::{Error, Result};

/// How often old run-log rows are pruned. Pruning deletes whole days of rows, so once
/// an hour keeps the table within an hour of the retention.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Extra wait after the computed time of a slot, so that the database's clock has
/// passed the slot when it is read again.
const WAKE_MARGIN: Duration = Duration::from_millis(10);

/// The clock that slots are computed with.
pub trait DbClock: Send + Sync + std::fmt::Debug {
    /// Returns the current time.
    fn now(&self) -> BoxFuture<'_, Result<DateTime<Utc>>>;
}

/// The database server's clock, `SELECT now()`.
#[derive(Clone)]
pub struct DatabaseClock {
    pool: Pool,
}

impl DatabaseClock {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

impl std::fmt::Debug for DatabaseClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseClock")
    }
}

impl DbClock for DatabaseClock {
    fn now(&self) -> BoxFuture<'_, Result<DateTime<Utc>>> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            let rows = client
                .query_typed("SELECT now()", &[])
                .await
                .map_err(Error::database("read the database clock"))?;
            let row = rows.first().ok_or_else(|| Error::Timeout {
                operation: "read the database clock",
                timeout: Duration::ZERO,
            })?;
            Ok(row.get(0))
        })
    }
}

/// Settings of the scheduler, each with its default.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// When the job runs (default 07:30 every day, UTC).
    pub schedule: Schedule,
    /// A slot that passed while every instance was down is caught up when it is at
    /// most this old (default 24 hours).
    pub catch_up_window: Duration,
    /// A slot that starts later than this after its time raises a missed-slot alert
    /// (default 5 minutes).
    pub missed_slot_grace: Duration,
    /// The clock is read at least this often (default 30 s).
    pub tick: Duration,
    /// Rows of the job older than this many days are pruned from `"JobRunLog"`
    /// (default 90).
    pub retention_days: i32,
    /// The clock; `None` means the database's (tests put a controlled one here).
    pub clock: Option<Arc<dyn DbClock>>,
}

impl SchedulerSettings {
    /// Returns the defaults with `schedule`.
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            catch_up_window: Duration::from_secs(24 * 3600),
            missed_slot_grace: Duration::from_secs(300),
            tick: Duration::from_secs(30),
            retention_days: 90,
            clock: None,
        }
    }
}

/// Runs `job` at the slots of `settings.schedule` until `cancel` fires.
///
/// `work` runs one job run and returns its `"JobRunLog"` id; it is expected to take
/// the job lock itself (see [`super::run_job`]). Errors of `work` and of the
/// scheduler's own statements are logged and retried at the next tick; they never end
/// the loop.
pub async fn run_scheduler<W, Fut>(
    context: JobContext,
    job: JobName,
    settings: SchedulerSettings,
    cancel: CancellationToken,
    work: W,
) where
    W: Fn(Trigger) -> Fut,
    Fut: Future<Output = Result<i64>>,
{
    let clock = settings
        .clock
        .clone()
        .unwrap_or_else(|| Arc::new(DatabaseClock::new(context.pool.clone())));
    let scheduler = Scheduler {
        context,
        job,
        settings,
        clock,
        cancel,
    };
    scheduler.run(work).await;
}

struct Scheduler {
    context: JobContext,
    job: JobName,
    settings: SchedulerSettings,
    clock: Arc<dyn DbClock>,
    cancel: CancellationToken,
}

/// The way a slot came due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Found unclaimed at start, when no other instance is expected to race for it.
    CatchUp,
    /// Came due while running; every instance races for it and the losers log SKIPPED.
    OnTime,
}

impl Scheduler {
    async fn run<W, Fut>(&self, work: W)
    where
        W: Fn(Trigger) -> Fut,
        Fut: Future<Output = Result<i64>>,
    {
        tracing::info!(job.name = %self.job, schedule = %self.settings.schedule, "scheduler started");

        let (registered_at, now) = loop {
            match self.start().await {
                Ok(started) => break started,
                Err(error) => {
                    tracing::warn!(job.name = %self.job, error = %error_chain(&error), "scheduler could not start; retrying");
                    if self.sleep(self.settings.tick).await {
                        return;
                    }
                }
            }
        };
        self.prune().await;
        let mut next_prune = Instant::now() + PRUNE_INTERVAL;

        let window_start = registered_at.max(
            now.checked_sub_signed(to_delta(self.settings.catch_up_window))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        );
        if let Some(slot) = self.settings.schedule.latest_in(window_start, now) {
            if let Err(error) = self.handle(slot, now, Due::CatchUp, &work).await {
                tracing::error!(job.name = %self.job, job.slot = %slot.to_rfc3339(), error = %error_chain(&error), "catching up a missed slot failed");
            }
        }
        let mut next = self.settings.schedule.next_after(now);
        if next.is_none() {
            tracing::warn!(job.name = %self.job, schedule = %self.settings.schedule, "the schedule has no further slot; the scheduler stops");
            return;
        }

        while !self.cancel.is_cancelled() {
            let now = match self.clock.now().await {
                Ok(now) => now,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "reading the database clock failed; retrying");
                    if self.sleep(self.settings.tick).await {
                        return;
                    }
                    continue;
                }
            };
            if Instant::now() >= next_prune {
                self.prune().await;
                next_prune = Instant::now() + PRUNE_INTERVAL;
            }

            if let Some(slot) = next.filter(|slot| *slot <= now) {
                // After a stall (a suspended process, a slow run) several slots may have
                // passed; only the latest runs.
                let latest = self
                    .settings
                    .schedule
                    .latest_in(slot - TimeDelta::nanoseconds(1), now)
                    .unwrap_or(slot);
                if latest > slot {
                    tracing::warn!(job.name = %self.job, first = %slot.to_rfc3339(), latest = %latest.to_rfc3339(), "several slots passed during a stall; only the latest runs");
                }
                if let Err(error) = self.handle(latest, now, Due::OnTime, &work).await {
                    tracing::error!(job.name = %self.job, job.slot = %latest.to_rfc3339(), error = %error_chain(&error), "running a scheduled slot failed");
                }
                next = self.settings.schedule.next_after(now.max(latest));
            }

            let wait = match next {
                Some(next) => (next - now)
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .saturating_add(WAKE_MARGIN)
                    .min(self.settings.tick),
                None => self.settings.tick,
            };
            if self.sleep(wait).await {
                break;
            }
        }
        tracing::info!(job.name = %self.job, "scheduler stopped");
    }

    /// Registers the schedule and returns its registration time and the clock's now.
    async fn start(&self) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
        let now = self.clock.now().await?;
        let client = self.context.pool.get().await?;
        let row = client
            .query_one(
                "INSERT INTO freight_kpi.job_schedule (job_name, cron, time_zone, registered_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (job_name) DO UPDATE SET
                     cron = EXCLUDED.cron,
                     time_zone = EXCLUDED.time_zone,
                     registered_at = CASE
                         WHEN (job_schedule.cron, job_schedule.time_zone)
                              IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.time_zone)
                         THEN EXCLUDED.registered_at
                         ELSE job_schedule.registered_at
                     END
                 RETURNING registered_at",
                &[
                    &self.job.as_str(),
                    &self.settings.schedule.expression(),
                    &self.settings.schedule.zone_name(),
                    &now,
                ],
            )
            .await
            .map_err(Error::database("register the schedule"))?;
        Ok((row.get(0), now))
    }

    /// Claims `slot` and runs it, or logs SKIPPED when another instance claimed it.
    async fn handle<W, Fut>(
        &self,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
        due: Due,
        work: &W,
    ) -> Result<()>
    where
        W: Fn(Trigger) -> Fut,
        Fut: Future<Output = Result<i64>>,
    {
        let client = self.context.pool.get().await?;
        if due == Due::CatchUp {
            let claimed = client
                .query_opt(
                    "SELECT 1 FROM freight_kpi.job_slot WHERE job_name = $1 AND scheduled_for = $2",
                    &[&self.job.as_str(), &slot],
                )
                .await
                .map_err(Error::database("look up a slot"))?;
            if claimed.is_some() {
                return Ok(());
            }
        }

        let holder_id = self.context.locks.holder_id();
        let inserted = client
            .query_opt(
                "INSERT INTO freight_kpi.job_slot (job_name, scheduled_for, claimed_by, claimed_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (job_name, scheduled_for) DO NOTHING
                 RETURNING 1",
                &[&self.job.as_str(), &slot, &holder_id, &now],
            )
            .await
            .map_err(Error::database("claim a slot"))?;
        let late_by = (now - slot).to_std().unwrap_or(Duration::ZERO);

        if inserted.is_none() {
            let claimed_by: Option<String> = client
                .query_opt(
                    "SELECT claimed_by FROM freight_kpi.job_slot WHERE job_name = $1 AND scheduled_for = $2",
                    &[&self.job.as_str(), &slot],
                )
                .await
                .map_err(Error::database("look up a slot"))?
                .map(|row| row.get(0));
            let mut stats = Trigger::Scheduled { slot, late_by }.to_json();
            stats["reason"] = json!("slot claimed by another instance");
            stats["claimed_by"] = json!(claimed_by);
            let run_id = log_skipped_run(
                &**client,
                self.job,
                &stats,
                "slot claimed by another instance",
            )
            .await?;
            tracing::info!(job.name = %self.job, job.slot = %slot.to_rfc3339(), job.run_id = run_id, "slot claimed by another instance; skipped");
            return Ok(());
        }
        drop(client);

        if late_by > self.settings.missed_slot_grace {
            tracing::warn!(job.name = %self.job, job.slot = %slot.to_rfc3339(), late_by_seconds = late_by.as_secs_f64(), "running a missed slot late");
            let mut alert = Alert::new(
                AlertKind::MissedSlot,
                self.job,
                format!(
                    "slot {} passed without a run; it runs {:.0} s late",
                    slot.to_rfc3339(),
                    late_by.as_secs_f64()
                ),
            );
            alert.slot = Some(slot);
            alert.details = json!({ "late_by_seconds": late_by.as_secs_f64() });
            self.context.alerts.send(alert);
        } else {
            tracing::info!(job.name = %self.job, job.slot = %slot.to_rfc3339(), late_by_seconds = late_by.as_secs_f64(), "running a scheduled slot");
        }

        let run_id = work(Trigger::Scheduled { slot, late_by }).await?;
        let client = self.context.pool.get().await?;
        client
            .execute(
                "UPDATE freight_kpi.job_slot SET run_id = $3 WHERE job_name = $1 AND scheduled_for = $2",
                &[&self.job.as_str(), &slot, &run_id],
            )
            .await
            .map_err(Error::database("link a slot to its run"))?;
        Ok(())
    }

    /// Prunes the job's old runs, and its claimed slots older than the retention by
    /// the scheduler's clock, the one the slots were computed with.
    async fn prune(&self) {
        let pruned = async {
            let client = self.context.pool.get().await?;
            let runs = prune_runs(&**client, &[self.job], self.settings.retention_days).await?;
            let now = self.clock.now().await?;
            let horizon = now
                .checked_sub_signed(TimeDelta::days(i64::from(self.settings.retention_days)))
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            client
                .execute(
                    "DELETE FROM freight_kpi.job_slot WHERE job_name = $1 AND scheduled_for < $2",
                    &[&self.job.as_str(), &horizon],
                )
                .await
                .map_err(Error::database("prune old slots"))?;
            Ok::<_, Error>(runs)
        }
        .await;
        match pruned {
            Ok(0) => {}
            Ok(count) => {
                tracing::info!(job.name = %self.job, pruned = count, retention_days = self.settings.retention_days, "pruned old job runs")
            }
            Err(error) => {
                tracing::warn!(job.name = %self.job, error = %error_chain(&error), "pruning old job runs failed; retrying in an hour")
            }
        }
    }

    /// Sleeps for `duration`; returns true when cancelled meanwhile.
    async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            () = self.cancel.cancelled() => true,
            () = sleep(duration) => false,
        }
    }
}

fn to_delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}
