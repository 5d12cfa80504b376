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

    /// An existing table does not fit what the service writes.
    #[error("incompatible schema: {0}")]
    IncompatibleSchema(String),

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
