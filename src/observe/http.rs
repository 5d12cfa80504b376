//! The HTTP endpoint of `freight-kpi run`: `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use super::telemetry::{DatabaseFigures, Telemetry};
use crate::capture::queue_health;
use crate::db::Pool;
use crate::error::error_chain;
use crate::error::{Error, Result};
use crate::listen::WarnLimiter;

/// Default address of the endpoint: loopback only, since the metrics name the
/// database and nothing here is authenticated.
pub const DEFAULT_HTTP_ADDRESS: &str = "127.0.0.1:9187";

/// Default age of the oldest pending change above which `/readyz` reports not ready.
pub const DEFAULT_READY_MAX_QUEUE_AGE: Duration = Duration::from_secs(30);

/// Time a scrape or readiness check waits for the database before it reports it
/// unreachable. Kept below the usual scrape timeout of Prometheus (10 s).
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Job runs of the last 24 hours by job and status, and the last successful
/// repairing reconcile. Runs logged by the incremental path under KPI_AGGREGATION
/// carry no `drifted` figure, so that key identifies a reconcile.
const SELECT_JOB_FIGURES: &str = r#"
    SELECT
        (SELECT coalesce(json_agg(json_build_array(job, status, runs)), '[]'::json)
         FROM (SELECT "jobName"::text AS job, status, count(*) AS runs
               FROM "JobRunLog"
               WHERE "startedAt" > now() - interval '24 hours'
               GROUP BY 1, 2) AS recent)::text AS job_runs,
        last.ended_at_seconds,
        last.drifted
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT extract(epoch FROM "endedAt")::float8 AS ended_at_seconds,
               ("statsJson"->>'drifted')::bigint AS drifted
        FROM "JobRunLog"
        WHERE "jobName" = 'KPI_AGGREGATION'
          AND status = 'SUCCESS'
          AND "statsJson" ? 'drifted'
          AND NOT coalesce(("statsJson"->>'dry_run')::boolean, false)
        ORDER BY "startedAt" DESC
        LIMIT 1
    ) AS last ON true
"#;

/// Address of the endpoint and threshold of its readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free port, which is logged and available
    /// from [`Telemetry::http_address`].
    pub address: SocketAddr,
    /// `/readyz` reports not ready while the oldest pending change is older.
    pub ready_max_queue_age: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            address: DEFAULT_HTTP_ADDRESS
                .parse()
                .expect("the default address is valid"),
            ready_max_queue_age: DEFAULT_READY_MAX_QUEUE_AGE,
        }
    }
}

/// The value of `--http`: an address such as `127.0.0.1:9187`, or `off` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpAddress(pub Option<SocketAddr>);

impl std::str::FromStr for HttpAddress {
    type Err = String;

    fn from_str(value: &str) -> std::result::Result<Self, Self::Err> {
        if value.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        value.parse().map(|address| Self(Some(address))).map_err(|_| {
            format!("invalid HTTP address {value:?}: expected IP:PORT such as 127.0.0.1:9187, or off")
        })
    }
}

/// Interval between two warnings about a scrape or check that could not read the
/// database. The listener logs the loss itself, so one reminder a minute is enough.
const DATABASE_WARNING_INTERVAL: Duration = Duration::from_secs(60);

struct Endpoint {
    pool: Pool,
    database_warnings: std::sync::Mutex<WarnLimiter>,
    telemetry: Arc<Telemetry>,
    ready_max_queue_age: Duration,
}

/// Binds the endpoint and serves it on a task until `cancel` fires.
///
/// # Errors
///
/// [`Error::HttpBind`] when the address cannot be bound (in use, or not local).
pub async fn serve_http(
    settings: &HttpSettings,
    pool: Pool,
    telemetry: Arc<Telemetry>,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(settings.address)
        .await
        .map_err(|source| Error::HttpBind {
            address: settings.address.to_string(),
            source,
        })?;
    let address = listener.local_addr().map_err(|source| Error::HttpBind {
        address: settings.address.to_string(),
        source,
    })?;
    telemetry.set_http_address(address);
    tracing::info!(http.address = %address, "http endpoint listening");

    let endpoint = Arc::new(Endpoint {
        pool,
        database_warnings: std::sync::Mutex::new(WarnLimiter::new(DATABASE_WARNING_INTERVAL)),
        telemetry,
        ready_max_queue_age: settings.ready_max_queue_age,
    });
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(endpoint);

    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        match served {
            Ok(()) => tracing::info!(http.address = %address, "http endpoint stopped"),
            Err(error) => {
                tracing::error!(http.address = %address, error = %error, "http endpoint failed")
            }
        }
    }))
}

async fn metrics(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let figures = endpoint.read_database_figures().await;
    endpoint
        .telemetry
        .record_database_figures(figures.as_ref().ok());
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        endpoint.telemetry.encode(),
    )
        .into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "up" })).into_response()
}

/// Reports ready when a database query succeeds, the listener has `LISTEN` in effect and the oldest
/// pending change is younger than the threshold. The body lists every failed check.
async fn readyz(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let mut reasons = Vec::new();

    let figures = endpoint.read_database_figures().await;
    endpoint
        .telemetry
        .record_database_figures(figures.as_ref().ok());
    match &figures {
        Ok(figures) => {
            let max_age = endpoint.ready_max_queue_age.as_secs_f64();
            if let Some(age) = figures
                .oldest_change_age_seconds
                .filter(|age| *age > max_age)
            {
                reasons.push(format!(
                    "the oldest pending change is {age:.1} s old, above the threshold of {max_age:.1} s"
                ));
            }
        }
        Err(error) => reasons.push(format!("database unreachable: {error}")),
    }
    if !endpoint.telemetry.listener_attached() {
        reasons.push("the listener is not connected; it is reconnecting".to_owned());
    }

    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": reasons.is_empty(),
        "reasons": reasons,
        "listener_connected": endpoint.telemetry.listener_attached(),
        "queue": figures.as_ref().ok().map(|figures| json!({
            "depth": figures.queue_depth,
            "oldest_change_age_seconds": figures.oldest_change_age_seconds,
            "failed_buckets": figures.failed_buckets,
        })),
    });
    (status, Json(body)).into_response()
}

impl Endpoint {
    /// Reads the database figures and logs a failure, at most once per
    /// [`DATABASE_WARNING_INTERVAL`].
    async fn read_database_figures(&self) -> std::result::Result<DatabaseFigures, String> {
        let figures = read_database_figures(&self.pool).await;
        if let Err(error) = &figures {
            let limiter = self
                .database_warnings
                .lock()
                .expect("limiter lock poisoned")
                .check();
            if let Some(suppressed) = limiter {
                tracing::warn!(error = %error, suppressed, "http endpoint could not read the database");
            }
        }
        figures
    }
}

/// Reads the queue's health and the job figures on a pooled connection, within
/// [`DATABASE_CHECK_TIMEOUT`]. Returns the error as one line.
async fn read_database_figures(pool: &Pool) -> std::result::Result<DatabaseFigures, String> {
    let deadline = tokio::time::Instant::now() + DATABASE_CHECK_TIMEOUT;
    let timed_out = || format!("no answer within {} s", DATABASE_CHECK_TIMEOUT.as_secs());

    let client = match tokio::time::timeout_at(deadline, pool.get()).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => return Err(error_chain(&error)),
        Err(_) => return Err(timed_out()),
    };
    match tokio::time::timeout_at(deadline, query_figures(&client)).await {
        Ok(figures) => figures.map_err(|error| error_chain(&error)),
        Err(_) => {
            // A connection that stopped responding (a cut network) would fail every
            // later check too, so it leaves the pool instead of going back.
            drop(deadpool_postgres::Object::take(client));
            Err(timed_out())
        }
    }
}

async fn query_figures(client: &deadpool_postgres::Object) -> Result<DatabaseFigures> {
    let health = queue_health(&***client).await?;
    let jobs = client
        .client()
        .query_one(SELECT_JOB_FIGURES, &[])
        .await
        .map_err(Error::database("read job figures"))?;

    let job_runs_json: String = jobs.get("job_runs");
    let job_runs: Vec<(String, String, i64)> =
        serde_json::from_str(&job_runs_json).unwrap_or_default();
    Ok(DatabaseFigures {
        queue_depth: health.depth,
        oldest_change_age_seconds: health.oldest_age_seconds,
        failed_buckets: health.failed_buckets,
        job_runs,
        last_reconcile_success_seconds: jobs.get("ended_at_seconds"),
        last_reconcile_drifted: jobs.get("drifted"),
    })
}
