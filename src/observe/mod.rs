//! Watching a running service: Prometheus metrics, and the HTTP endpoint that serves
//! them with liveness and readiness checks.

mod http;
mod telemetry;

pub use http::{
    serve_http, HttpAddress, HttpSettings, DEFAULT_HTTP_ADDRESS, DEFAULT_READY_MAX_QUEUE_AGE,
};
pub use telemetry::{DatabaseFigures, JobRunLabels, LockLabels, Telemetry};
