//! Alerts: a `tracing` event for each, and optional HTTP sinks (a Slack-compatible
//! incoming webhook and the PagerDuty Events API v2).
//!
//! Sending never blocks the caller: alerts go to a bounded queue that one task drains,
//! and an alert that does not fit is dropped and counted. Each POST has a timeout and
//! a bounded number of attempts. Bodies carry the job, the run, the slot and the error
//! text, which the crate's errors keep free of passwords; the one credential in any
//! body is the PagerDuty routing key, which that API requires there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::JobName;
use crate::error::{Error, Result};

/// Alerts waiting for the sinks; more are dropped and counted.
const QUEUE_CAPACITY: usize = 256;

/// Delay before the second attempt of a POST; it doubles for each further attempt.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);

/// PagerDuty limits an event's summary to 1024 characters.
const PAGERDUTY_SUMMARY_MAX: usize = 1024;

/// The subject of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A run ended ERROR.
    RunError,
    /// A run ended PARTIAL: some units failed.
    RunPartial,
    /// A scheduled slot passed without a run; it is caught up late.
    MissedSlot,
    /// A run was left RUNNING by a holder that died.
    Abandoned,
    /// A reconcile found buckets that the incremental path had left wrong.
    Drift,
    /// The oldest pending change is older than the threshold.
    FreshnessLag,
    /// PostgreSQL's notification queue is fuller than the threshold.
    NotificationQueue,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::RunError => "run_error",
            AlertKind::RunPartial => "run_partial",
            AlertKind::MissedSlot => "missed_slot",
            AlertKind::Abandoned => "abandoned",
            AlertKind::Drift => "drift",
            AlertKind::FreshnessLag => "freshness_lag",
            AlertKind::NotificationQueue => "notification_queue",
        }
    }

    /// Kinds that mean work failed or was lost are logged at error level, the others
    /// at warn level.
    fn is_failure(self) -> bool {
        matches!(
            self,
            AlertKind::RunError | AlertKind::MissedSlot | AlertKind::Abandoned
        )
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub job: JobName,
    pub run_id: Option<i64>,
    /// The scheduled slot, for runs of the scheduler and missed slots.
    pub slot: Option<DateTime<Utc>>,
    /// Set by the sender from the configured critical jobs.
    pub critical: bool,
    /// One line for people.
    pub summary: String,
    pub error: Option<String>,
    /// Figures of the event, such as the run's statistics.
    pub details: serde_json::Value,
}

impl Alert {
    /// Creates an alert with no run, slot, error or details.
    pub fn new(kind: AlertKind, job: JobName, summary: impl Into<String>) -> Self {
        Self {
            kind,
            job,
            run_id: None,
            slot: None,
            critical: false,
            summary: summary.into(),
            error: None,
            details: serde_json::Value::Null,
        }
    }

    /// Returns the key that makes repeats of one event collapse in the sinks: the
    /// source, the job, the kind and the slot, else the run, else nothing more (for
    /// conditions such as freshness lag, one key per source).
    pub fn dedup_key(&self, source: &str) -> String {
        let occurrence = match (self.slot, self.run_id) {
            (Some(slot), _) => slot.to_rfc3339(),
            (None, Some(run_id)) => format!("run-{run_id}"),
            (None, None) => "current".to_owned(),
        };
        format!(
            "freight-kpi/{source}/{}/{}/{occurrence}",
            self.job,
            self.kind.as_str()
        )
    }
}

/// Destinations of alerts, each sink optional.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AlertSettings {
    /// Slack-compatible incoming webhook URL: a JSON POST with a `text` field.
    pub slack_url: Option<String>,
    /// PagerDuty Events API v2 URL, such as `https://events.pagerduty.com/v2/enqueue`.
    pub pagerduty_url: Option<String>,
    /// Routing (integration) key of the PagerDuty service; required with the URL.
    pub pagerduty_routing_key: Option<String>,
    /// Time allowed for one POST (default 5 s).
    pub timeout: Duration,
    /// Attempts per alert and sink, the first included (default 3).
    pub attempts: u32,
    /// Jobs whose alerts are critical (default INCENTIVE_DAILY_COMMIT, CHURN_RECALC and
    /// KPI_AGGREGATION): PagerDuty severity `critical` instead of `warning`.
    pub critical_jobs: Vec<JobName>,
    /// Names this deployment in alerts and dedup keys (default: the database name).
    pub source: String,
}

impl std::fmt::Debug for AlertSettings {
    // URLs of webhooks carry their secret in the path, so only their presence shows.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSettings")
            .field("slack_url", &self.slack_url.as_ref().map(|_| "<set>"))
            .field(
                "pagerduty_url",
                &self.pagerduty_url.as_ref().map(|_| "<set>"),
            )
            .field(
                "pagerduty_routing_key",
                &self.pagerduty_routing_key.as_ref().map(|_| "<set>"),
            )
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .field("critical_jobs", &self.critical_jobs)
            .field("source", &self.source)
            .finish()
    }
}

impl AlertSettings {
    /// Returns the defaults: no sinks, 5 s timeout, 3 attempts, the default critical
    /// jobs.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            slack_url: None,
            pagerduty_url: None,
            pagerduty_routing_key: None,
            timeout: Duration::from_secs(5),
            attempts: 3,
            critical_jobs: vec![
                JobName::IncentiveDailyCommit,
                JobName::ChurnRecalc,
                JobName::KpiAggregation,
            ],
            source: source.into(),
        }
    }

    /// Checks that the sinks are complete.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for a PagerDuty URL without a routing key, a URL that
    /// is not http(s), or zero attempts.
    pub fn validate(&self) -> Result<()> {
        for (key, url) in [
            ("--alert-slack-url", &self.slack_url),
            ("--alert-pagerduty-url", &self.pagerduty_url),
        ] {
            if let Some(url) = url {
                let parsed = reqwest::Url::parse(url).map_err(|_| Error::InvalidSetting {
                    key,
                    value: "<hidden>".to_owned(),
                    allowed: "an absolute http:// or https:// URL",
                })?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(Error::InvalidSetting {
                        key,
                        value: parsed.scheme().to_owned(),
                        allowed: "an absolute http:// or https:// URL",
                    });
                }
            }
        }
        if self.pagerduty_url.is_some() && self.pagerduty_routing_key.is_none() {
            return Err(Error::InvalidSetting {
                key: "--alert-pagerduty-routing-key",
                value: String::new(),
                allowed:
                    "the routing key of the PagerDuty service, required with --alert-pagerduty-url",
            });
        }
        if self.attempts == 0 {
            return Err(Error::InvalidSetting {
                key: "--alert-attempts",
                value: "0".to_owned(),
                allowed: "a whole number above 0",
            });
        }
        Ok(())
    }
}

/// Hands alerts to the sinks without waiting. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AlertSender {
    queue: Option<mpsc::Sender<Alert>>,
    critical_jobs: Arc<Vec<JobName>>,
    dropped: Arc<AtomicU64>,
}

impl AlertSender {
    /// Returns a sender that only logs.
    pub fn log_only() -> Self {
        Self {
            queue: None,
            critical_jobs: Arc::new(AlertSettings::new("").critical_jobs),
            dropped: Arc::default(),
        }
    }

    /// Logs `alert` and queues it for the sinks. Never waits: when the queue is full
    /// the alert is dropped, counted and logged.
    pub fn send(&self, mut alert: Alert) {
        alert.critical = self.critical_jobs.contains(&alert.job);
        let slot = alert.slot.map(|slot| slot.to_rfc3339());
        if alert.kind.is_failure() {
            tracing::error!(
                alert.kind = alert.kind.as_str(),
                alert.critical = alert.critical,
                job.name = %alert.job,
                job.run_id = alert.run_id,
                job.slot = slot,
                error = alert.error.as_deref(),
                summary = %alert.summary,
                "job alert"
            );
        } else {
            tracing::warn!(
                alert.kind = alert.kind.as_str(),
                alert.critical = alert.critical,
                job.name = %alert.job,
                job.run_id = alert.run_id,
                job.slot = slot,
                error = alert.error.as_deref(),
                summary = %alert.summary,
                "job alert"
            );
        }

        let Some(queue) = &self.queue else {
            return;
        };
        if queue.try_send(alert).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped,
                capacity = QUEUE_CAPACITY,
                "alert queue full or closed; alert dropped"
            );
        }
    }

    /// Returns how many alerts were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The task that posts queued alerts to the sinks.
pub struct AlertDispatcher {
    closing: CancellationToken,
    task: JoinHandle<()>,
}

impl AlertDispatcher {
    /// Starts the dispatcher for `settings` and returns the sender of its queue.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] from [`AlertSettings::validate`].
    pub fn start(settings: &AlertSettings) -> Result<(AlertSender, AlertDispatcher)> {
        settings.validate()?;
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("freight-kpi/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| {
                tracing::error!(error = %error, "building the HTTP client of the alert sinks failed");
                Error::InvalidSetting {
                    key: "--alert-slack-url",
                    value: "<hidden>".to_owned(),
                    allowed: "sinks that the HTTP client can serve; see the logged error of its TLS setup",
                }
            })?;

        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let closing = CancellationToken::new();
        let task = tokio::spawn(dispatch(receiver, http, settings.clone(), closing.clone()));
        let sender = AlertSender {
            queue: Some(queue),
            critical_jobs: Arc::new(settings.critical_jobs.clone()),
            dropped: Arc::default(),
        };
        Ok((sender, AlertDispatcher { closing, task }))
    }

    /// Posts the alerts still queued and stops, giving up after `within`.
    pub async fn finish(self, within: Duration) {
        self.closing.cancel();
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            tracing::warn!(
                within_ms = within.as_millis() as u64,
                "alerts still queued at exit were not sent in time"
            );
            task.abort();
        }
    }
}

async fn dispatch(
    mut receiver: mpsc::Receiver<Alert>,
    http: reqwest::Client,
    settings: AlertSettings,
    closing: CancellationToken,
) {
    loop {
        let alert = tokio::select! {
            alert = receiver.recv() => alert,
            () = closing.cancelled() => {
                receiver.close();
                while let Some(alert) = receiver.recv().await {
                    deliver(&http, &settings, &alert).await;
                }
                return;
            }
        };
        let Some(alert) = alert else {
            return;
        };
        deliver(&http, &settings, &alert).await;
    }
}

async fn deliver(http: &reqwest::Client, settings: &AlertSettings, alert: &Alert) {
    if let Some(url) = &settings.slack_url {
        post_with_retries(
            http,
            "slack",
            url,
            &slack_body(settings, alert),
            settings.attempts,
        )
        .await;
    }
    if let (Some(url), Some(routing_key)) =
        (&settings.pagerduty_url, &settings.pagerduty_routing_key)
    {
        let body = pagerduty_body(settings, alert, routing_key);
        post_with_retries(http, "pagerduty", url, &body, settings.attempts).await;
    }
}

/// Builds the headline text that both sinks show.
fn headline(settings: &AlertSettings, alert: &Alert) -> String {
    let mut text = format!(
        "[{}] freight-kpi ({}) {} {}: {}",
        if alert.critical {
            "critical"
        } else {
            "warning"
        },
        settings.source,
        alert.job,
        alert.kind.as_str(),
        alert.summary
    );
    if let Some(error) = &alert.error {
        text.push_str(" | error: ");
        text.push_str(error);
    }
    text
}

/// Builds the body of a Slack-compatible incoming webhook.
pub fn slack_body(settings: &AlertSettings, alert: &Alert) -> serde_json::Value {
    json!({
        "text": headline(settings, alert),
        "freight_kpi": {
            "kind": alert.kind,
            "job": alert.job.as_str(),
            "run_id": alert.run_id,
            "slot": alert.slot,
            "critical": alert.critical,
            "dedup_key": alert.dedup_key(&settings.source),
            "details": alert.details,
        }
    })
}

/// Builds a PagerDuty Events API v2 trigger event.
pub fn pagerduty_body(
    settings: &AlertSettings,
    alert: &Alert,
    routing_key: &str,
) -> serde_json::Value {
    let summary: String = headline(settings, alert)
        .chars()
        .take(PAGERDUTY_SUMMARY_MAX)
        .collect();
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": alert.dedup_key(&settings.source),
        "payload": {
            "summary": summary,
            "source": settings.source,
            "severity": if alert.critical { "critical" } else { "warning" },
            "component": "freight-kpi",
            "group": alert.job.as_str(),
            "class": alert.kind.as_str(),
            "custom_details": {
                "run_id": alert.run_id,
                "slot": alert.slot,
                "critical": alert.critical,
                "error": alert.error,
                "details": alert.details,
            }
        }
    })
}

/// POSTs `body`, retrying timeouts, connection errors, 429 and 5xx responses with a
/// doubling delay, `attempts` times in all. Failures are logged, never returned.
async fn post_with_retries(
    http: &reqwest::Client,
    sink: &'static str,
    url: &str,
    body: &serde_json::Value,
    attempts: u32,
) {
    let mut delay = FIRST_RETRY_DELAY;
    for attempt in 1..=attempts {
        let outcome = http.post(url).json(body).send().await;
        let retryable = match outcome {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                let status = response.status();
                tracing::warn!(
                    alert.sink = sink,
                    attempt,
                    status = status.as_u16(),
                    "alert sink rejected the alert"
                );
                status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            Err(error) => {
                // without_url: a webhook URL carries its secret.
                tracing::warn!(alert.sink = sink, attempt, error = %error.without_url(), "sending the alert failed");
                true
            }
        };
        if !retryable || attempt == attempts {
            tracing::error!(alert.sink = sink, attempts = attempt, "alert not delivered");
            return;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}
