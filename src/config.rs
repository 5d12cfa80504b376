//! Settings of `freight-kpi run`, each with its documented default.

use std::time::Duration;

use crate::capture::DrainSettings;
use crate::db::DatabaseTarget;
use crate::listen::Debounce;
use crate::observe::HttpSettings;

/// Default NOTIFY channel.
pub const DEFAULT_CHANNEL: &str = "freight_kpi";

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub target: DatabaseTarget,
    /// NOTIFY channel the listener listens on and writers notify (default `freight_kpi`).
    pub channel: String,
    /// Debounce of wake-ups (default 50 ms quiet, 500 ms at most).
    pub debounce: Debounce,
    /// Drain the queue this often even without a notification, to pick up changes
    /// whose notification was lost (default 5 s).
    pub poll_interval: Duration,
    /// Check the listener connection this often (default 5 s).
    pub ping_interval: Duration,
    /// Replace the listener connection when a check, or any other statement on it,
    /// takes longer (default 3 s).
    pub ping_timeout: Duration,
    /// First delay before reconnecting after a loss; it doubles on each failure
    /// (default 100 ms).
    pub reconnect_min: Duration,
    /// Cap of the reconnect delay (default 30 s).
    pub reconnect_max: Duration,
    /// Batch sizing of the drain (default 5,000 changes).
    pub drain: DrainSettings,
    /// Connections in the pool for batches and job bookkeeping (default 4).
    pub pool_size: usize,
    /// The `/metrics`, `/healthz` and `/readyz` endpoint. Off by default here, so that
    /// services embedded side by side (in tests, say) do not compete for a port; the
    /// `run` command turns it on at 127.0.0.1:9187 unless given `--http off`.
    pub http: Option<HttpSettings>,
    /// Job locks, alerts, the nightly reconcile's scheduler (07:30 UTC), the hourly
    /// summary of the incremental path and the health alerts; see
    /// [`crate::jobs::JobSettings`] for each default.
    pub jobs: crate::jobs::JobSettings,
}

impl RunSettings {
    /// Returns the defaults for `target`.
    pub fn new(target: DatabaseTarget) -> Self {
        let jobs = crate::jobs::JobSettings::new(target.dbname());
        Self {
            target,
            channel: DEFAULT_CHANNEL.to_owned(),
            debounce: Debounce::default(),
            poll_interval: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            drain: DrainSettings::default(),
            pool_size: 4,
            http: None,
            jobs,
        }
    }
}
