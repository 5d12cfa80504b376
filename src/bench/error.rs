//! Errors of the bench command.

use std::path::PathBuf;

/// Failure of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An option is out of range.
    #[error("invalid value {value:?} for {key}: expected {allowed}")]
    InvalidOption {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },

    /// The database contains loads that the bench did not generate.
    #[error("database {database} contains loads that the bench did not generate ({reason}); point DATABASE_URL at a scratch database, or pass --force to run beside them")]
    ForeignData { database: String, reason: String },

    /// The service, a migration or a statement failed.
    #[error(transparent)]
    Service(#[from] crate::Error),

    /// The in-process service ended with an error or did not stop in time.
    #[error("the in-process service failed: {0}")]
    ServiceStopped(String),

    /// A phase did not reach its end condition in time.
    #[error("{what} did not finish within {seconds} s")]
    TimedOut { what: &'static str, seconds: u64 },

    /// An output file could not be written.
    #[error("cannot write {path}; check that --out names a writable folder")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BenchError {
    /// Tells whether the error is the user's to fix before running again, which the
    /// command reports with the usage exit code.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            BenchError::InvalidOption { .. }
                | BenchError::ForeignData { .. }
                | BenchError::Service(crate::Error::InvalidDatabaseUrl { .. })
                | BenchError::Service(crate::Error::InvalidSetting { .. })
        )
    }
}

/// Converts a driver error on a bench statement into the crate's database error.
pub(crate) fn database(
    operation: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> BenchError {
    move |source| BenchError::Service(crate::Error::Database { operation, source })
}
