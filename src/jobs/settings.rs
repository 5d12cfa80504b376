//! Settings of job control, and the command-line flags that set them.

use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use super::alert::AlertSettings;
use super::job_lock::{LockMode, LockSettings};
use super::monitor::HealthThresholds;
use super::schedule::{Schedule, DEFAULT_RECONCILE_CRON, DEFAULT_TIME_ZONE};
use super::scheduler::SchedulerSettings;
use super::JobName;
use crate::error::{Error, Result};

/// Value of `--reconcile-schedule` that turns the scheduler off.
pub const SCHEDULE_OFF: &str = "off";

/// Job control inside `freight-kpi run`.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub lock: LockSettings,
    pub alerts: AlertSettings,
    /// The nightly reconcile's scheduler; `None` turns it off.
    pub scheduler: Option<SchedulerSettings>,
    /// Period of the incremental path's summary row (default 1 hour).
    pub summary_interval: Duration,
    pub health: HealthThresholds,
}

impl JobSettings {
    /// Returns the defaults, with `source` naming the deployment in alerts.
    pub fn new(source: &str) -> Self {
        let schedule = Schedule::parse(DEFAULT_RECONCILE_CRON, DEFAULT_TIME_ZONE)
            .expect("the default schedule is valid");
        Self {
            lock: LockSettings::default(),
            alerts: AlertSettings::new(source),
            scheduler: Some(SchedulerSettings::new(schedule)),
            summary_interval: Duration::from_secs(3600),
            health: HealthThresholds::default(),
        }
    }
}

/// Flags of the job lock and the alerts, for `run` and `reconcile`.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Lock mode that makes jobs exclusive across instances: advisory (session
    /// advisory locks), table (leases in freight_kpi.job_lease) or auto (advisory
    /// unless the connection goes through a transaction pooler such as PgBouncer).
    #[arg(long, value_enum, env = "FREIGHT_KPI_LOCK_MODE", default_value_t = LockMode::Auto)]
    pub lock_mode: LockMode,
    /// Validity of a table lease from its last renewal, in milliseconds; a holder that
    /// died blocks its job at most this long.
    #[arg(
        long,
        env = "FREIGHT_KPI_LEASE_TIMEOUT_MS",
        default_value_t = 3_600_000
    )]
    pub lease_timeout_ms: u64,
    /// A lost job lock is noticed within this many milliseconds, and leases are
    /// renewed this often.
    #[arg(long, env = "FREIGHT_KPI_LOCK_HEARTBEAT_MS", default_value_t = 10_000)]
    pub lock_heartbeat_ms: u64,
    /// Slack-compatible incoming webhook URL for alerts.
    #[arg(long, env = "FREIGHT_KPI_ALERT_SLACK_URL", hide_env_values = true)]
    pub alert_slack_url: Option<String>,
    /// PagerDuty Events API v2 URL for alerts, such as
    /// https://events.pagerduty.com/v2/enqueue.
    #[arg(long, env = "FREIGHT_KPI_ALERT_PAGERDUTY_URL", hide_env_values = true)]
    pub alert_pagerduty_url: Option<String>,
    /// Routing key of the PagerDuty service; required with --alert-pagerduty-url.
    #[arg(
        long,
        env = "FREIGHT_KPI_ALERT_PAGERDUTY_ROUTING_KEY",
        hide_env_values = true
    )]
    pub alert_pagerduty_routing_key: Option<String>,
    /// Time allowed for one alert POST, in milliseconds.
    #[arg(long, env = "FREIGHT_KPI_ALERT_TIMEOUT_MS", default_value_t = 5_000)]
    pub alert_timeout_ms: u64,
    /// Attempts per alert and sink, the first included.
    #[arg(long, env = "FREIGHT_KPI_ALERT_ATTEMPTS", default_value_t = 3)]
    pub alert_attempts: u32,
    /// Comma-separated "JobName" values whose alerts are critical (PagerDuty severity
    /// critical instead of warning); an empty value marks none.
    #[arg(
        long,
        env = "FREIGHT_KPI_CRITICAL_JOBS",
        value_delimiter = ',',
        default_value = "INCENTIVE_DAILY_COMMIT,CHURN_RECALC,KPI_AGGREGATION"
    )]
    pub critical_jobs: Vec<String>,
}

impl JobArgs {
    /// Returns the lock settings.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for a zero heartbeat or a lease timeout not above it.
    pub fn lock_settings(&self) -> Result<LockSettings> {
        let heartbeat = positive_ms("--lock-heartbeat-ms", self.lock_heartbeat_ms)?;
        let lease_timeout = positive_ms("--lease-timeout-ms", self.lease_timeout_ms)?;
        if lease_timeout <= heartbeat {
            return Err(Error::InvalidSetting {
                key: "--lease-timeout-ms",
                value: self.lease_timeout_ms.to_string(),
                allowed: "a value above --lock-heartbeat-ms, so that renewals keep the lease",
            });
        }
        Ok(LockSettings {
            mode: self.lock_mode,
            lease_timeout,
            heartbeat,
        })
    }

    /// Returns the alert settings, with `source` naming the deployment.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for an unknown job name, a bad URL or a PagerDuty URL
    /// without a routing key.
    pub fn alert_settings(&self, source: &str) -> Result<AlertSettings> {
        let mut settings = AlertSettings::new(source);
        settings.slack_url = non_empty(&self.alert_slack_url);
        settings.pagerduty_url = non_empty(&self.alert_pagerduty_url);
        settings.pagerduty_routing_key = non_empty(&self.alert_pagerduty_routing_key);
        settings.timeout = positive_ms("--alert-timeout-ms", self.alert_timeout_ms)?;
        settings.attempts = self.alert_attempts;
        settings.critical_jobs = self
            .critical_jobs
            .iter()
            .filter(|name| !name.trim().is_empty())
            .map(|name| {
                name.parse::<JobName>().map_err(|_| Error::InvalidSetting {
                    key: "--critical-jobs",
                    value: name.clone(),
                    allowed: "comma-separated JobName values: INCENTIVE_DAILY_COMMIT, CHURN_RECALC, TASK_GENERATION, KPI_AGGREGATION",
                })
            })
            .collect::<Result<_>>()?;
        settings.validate()?;
        Ok(settings)
    }
}

/// Flags of the scheduler, the summary and the health alerts, for `run`.
#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// Cron expression of the nightly reconcile (5 fields, or 6 with seconds first),
    /// in --schedule-time-zone; "off" turns the scheduler off.
    #[arg(long, env = "FREIGHT_KPI_RECONCILE_SCHEDULE", default_value = DEFAULT_RECONCILE_CRON)]
    pub reconcile_schedule: String,
    /// IANA time zone of the schedule, such as UTC or Europe/Berlin.
    #[arg(long, env = "FREIGHT_KPI_SCHEDULE_TIME_ZONE", default_value = DEFAULT_TIME_ZONE)]
    pub schedule_time_zone: String,
    /// A slot missed while every instance was down is run late if it is at most this
    /// many hours old.
    #[arg(long, env = "FREIGHT_KPI_CATCH_UP_HOURS", default_value_t = 24)]
    pub catch_up_hours: u64,
    /// A slot that starts more than this many seconds late raises a missed-slot alert.
    #[arg(
        long,
        env = "FREIGHT_KPI_MISSED_SLOT_GRACE_SECS",
        default_value_t = 300
    )]
    pub missed_slot_grace_secs: u64,
    /// Rows of this service in "JobRunLog" older than this many days are pruned.
    #[arg(long, env = "FREIGHT_KPI_RUN_LOG_RETENTION_DAYS", default_value_t = 90)]
    pub run_log_retention_days: u32,
    /// Period of the incremental path's summary row in "JobRunLog", in milliseconds.
    #[arg(
        long,
        env = "FREIGHT_KPI_SUMMARY_INTERVAL_MS",
        default_value_t = 3_600_000
    )]
    pub summary_interval_ms: u64,
    /// How often the freshness lag and the notification queue are checked, in
    /// milliseconds.
    #[arg(long, env = "FREIGHT_KPI_HEALTH_INTERVAL_MS", default_value_t = 10_000)]
    pub health_interval_ms: u64,
    /// Alert when the oldest pending change is older than this many milliseconds.
    #[arg(long, env = "FREIGHT_KPI_FRESHNESS_ALERT_MS", default_value_t = 60_000)]
    pub freshness_alert_ms: u64,
    /// Alert when PostgreSQL's notification queue is fuller than this percentage.
    #[arg(
        long,
        env = "FREIGHT_KPI_NOTIFY_QUEUE_ALERT_PCT",
        default_value_t = 10.0
    )]
    pub notify_queue_alert_pct: f64,
}

impl ScheduleArgs {
    /// Applies the flags to `settings`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for an invalid cron expression, time zone or number.
    pub fn apply(&self, settings: &mut JobSettings) -> Result<()> {
        // The zone is checked on its own, also with the scheduler off, so that its
        // error names its own flag rather than the cron expression's.
        if chrono_tz::Tz::from_str(self.schedule_time_zone.trim()).is_err() {
            return Err(Error::InvalidSetting {
                key: "--schedule-time-zone",
                value: self.schedule_time_zone.clone(),
                allowed: "an IANA time zone name such as Europe/Berlin or UTC",
            });
        }
        settings.scheduler = if self
            .reconcile_schedule
            .trim()
            .eq_ignore_ascii_case(SCHEDULE_OFF)
        {
            None
        } else {
            let schedule = Schedule::parse(&self.reconcile_schedule, &self.schedule_time_zone)
                .map_err(|_| Error::InvalidSetting {
                    key: "--reconcile-schedule",
                    value: self.reconcile_schedule.clone(),
                    allowed: "a cron expression of 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, such as \"30 7 * * *\", or \"off\"",
                })?;
            let mut scheduler = SchedulerSettings::new(schedule);
            scheduler.catch_up_window =
                Duration::from_secs(self.catch_up_hours.saturating_mul(3600));
            scheduler.missed_slot_grace = Duration::from_secs(self.missed_slot_grace_secs);
            scheduler.retention_days = i32::try_from(self.run_log_retention_days)
                .ok()
                .filter(|days| *days > 0)
                .ok_or_else(|| Error::InvalidSetting {
                    key: "--run-log-retention-days",
                    value: self.run_log_retention_days.to_string(),
                    allowed: "a whole number of days above 0",
                })?;
            Some(scheduler)
        };
        settings.summary_interval = positive_ms("--summary-interval-ms", self.summary_interval_ms)?;
        settings.health.interval = positive_ms("--health-interval-ms", self.health_interval_ms)?;
        settings.health.freshness_lag =
            positive_ms("--freshness-alert-ms", self.freshness_alert_ms)?;
        if !(self.notify_queue_alert_pct > 0.0 && self.notify_queue_alert_pct <= 100.0) {
            return Err(Error::InvalidSetting {
                key: "--notify-queue-alert-pct",
                value: self.notify_queue_alert_pct.to_string(),
                allowed: "a percentage above 0 and at most 100",
            });
        }
        settings.health.notification_queue = self.notify_queue_alert_pct / 100.0;
        Ok(())
    }
}

fn positive_ms(key: &'static str, value: u64) -> Result<Duration> {
    if value == 0 {
        return Err(Error::InvalidSetting {
            key,
            value: value.to_string(),
            allowed: "a whole number of milliseconds above 0",
        });
    }
    Ok(Duration::from_millis(value))
}

fn non_empty(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
}
