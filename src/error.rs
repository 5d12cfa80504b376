//! The crate's error type.

use std::time::Duration;

/// Everything that can go wrong in the library, with the context a reader needs to act.
///
/// Messages are lowercase, carry no trailing period and never contain a password: the
/// connection string is reduced to host, port, user and database before it is shown.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection string could not be parsed.
    #[error("invalid DATABASE_URL: {reason}; expected a URL such as postgres://user@host:5432/dbname or key=value pairs such as 'host=localhost dbname=app'")]
    InvalidDatabaseUrl { reason: String },

    /// A connection to the server could not be opened.
    #[error("cannot connect to PostgreSQL at {target}: {reason}; check that the server is running and that DATABASE_URL names the right host, port, user and database")]
    Connect { target: String, reason: String },

    /// No pooled connection became available in time.
    #[error("no database connection available from the pool within {timeout:?}")]
    PoolTimeout { timeout: Duration },

    /// An operation on the database did not finish in time.
    #[error("{operation} timed out after {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },

    /// Applying the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migrate(String),

    /// A database statement failed.
    #[error("database error during {operation}")]
    Database {
        operation: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A configuration value is outside what the service accepts.
    #[error("invalid value {value:?} for {key}: {allowed}")]
    InvalidSetting {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },

    /// The command line, with the environment and the configuration file, does not
    /// parse as the arguments of a command; the text is the parser's message.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),

    /// An existing table does not fit what the service writes.
    #[error("incompatible schema: {0}")]
    IncompatibleSchema(String),

    /// A job did not run because another instance holds its lock or lease.
    #[error("job {job} was skipped: another instance holds its lock; it runs again at its next slot, or rerun it once that instance is done")]
    JobSkipped { job: &'static str },

    /// A job run ended ERROR; its row in "JobRunLog" has the details.
    #[error("job {job} run {run_id} failed: {reason}")]
    JobFailed {
        job: &'static str,
        run_id: i64,
        reason: String,
    },

    /// A job run ended PARTIAL: it finished, but some units (buckets) could not be
    /// written. Its row in "JobRunLog" and the log name each of them.
    #[error("job {job} run {run_id} finished PARTIAL: {reason}; the log and \"JobRunLog\" name each bucket that could not be written")]
    JobPartial {
        job: &'static str,
        run_id: i64,
        reason: String,
    },

    /// Writing a command's output to standard output failed.
    #[error("cannot write to standard output")]
    Stdout(#[source] std::io::Error),

    /// A job lost its lock or lease while it ran and stopped writing.
    #[error("lock lost for job {job}: {reason}")]
    LockLost { job: &'static str, reason: String },

    /// A write under a lease was rejected because the lease moved to another holder
    /// or expired since it was acquired.
    #[error("write of job {job} rejected: fencing token {token} is no longer current ({reason})")]
    Fenced {
        job: &'static str,
        token: i64,
        reason: String,
    },

    /// `uninstall` found a reason to drop nothing.
    #[error("uninstall stopped: {0}")]
    Uninstall(String),

    /// The throwaway PostgreSQL cluster of `demo` could not be started or removed.
    #[error("throwaway PostgreSQL cluster")]
    Cluster(#[from] crate::cluster::ClusterError),

    /// The demo's final reconcile found buckets that the incremental path left wrong.
    #[error("the demo's reconcile found {drifted} drifted buckets; the incremental path missed changes, which is a bug worth reporting")]
    DemoDrift { drifted: u64 },

    /// The HTTP endpoint could not listen on its address.
    #[error("cannot listen for HTTP on {address}; pick a free address with --http ADDRESS:PORT or turn it off with --http off")]
    HttpBind {
        address: String,
        #[source]
        source: std::io::Error,
    },

    /// The schema is missing or older than this binary expects.
    #[error("the database schema is not installed: {0}; run `freight-kpi migrate` first")]
    SchemaMissing(String),
}

impl Error {
    /// Wraps a database error with the name of the operation that failed.
    pub fn database(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
        move |source| Error::Database { operation, source }
    }

    /// Tells whether the error came from a lost or unusable connection, as opposed to a
    /// statement the server rejected.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Error::Database { source, .. } => source.is_closed() || source.code().is_none(),
            Error::Connect { .. } | Error::PoolTimeout { .. } | Error::Timeout { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats an error with its sources, as one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Awaits `future` for at most `timeout`, else fails with [`Error::Timeout`] naming
/// `operation`. The future is dropped on timeout, so a statement it sent may still
/// run on the server.
pub(crate) async fn bounded<T>(
    timeout: std::time::Duration,
    operation: &'static str,
    future: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| Error::Timeout { operation, timeout })?
}
