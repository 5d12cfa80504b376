//! Transactions that cannot hold their locks forever.

use std::time::Duration;

use tokio_postgres::{Client, Transaction};

use crate::error::{Error, Result};

/// Server-side limit on how long one of the service's transactions may sit idle
/// between statements. The service never pauses inside a transaction, so only a
/// session whose client vanished reaches it: a silent network, or a killed process
/// whose socket the server still trusts. The server then ends that session and frees
/// the bucket locks and queue rows it held.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Begins a transaction with [`IDLE_IN_TRANSACTION_TIMEOUT`] and `TimeZone` UTC set for
/// its duration. UTC makes the KPI statements' day bounds compare correctly with a
/// `"createdAt"` of type `timestamp` without time zone, which stores UTC wall time.
///
/// The settings are `SET LOCAL`, not connection options, so they also work behind
/// PgBouncer, which rejects unknown startup options.
///
/// # Errors
///
/// [`Error::Database`] when the transaction cannot start.
///
/// With `lock_timeout`, the server also gives up waiting for any lock after that
/// long, with SQLSTATE 55P03 (lock_not_available), and with `statement_timeout` it
/// cancels any statement that runs longer (57014). A client waiting for the response
/// can then tell a busy or slow server, which ends in an error, from a connection gone
/// silent, which never responds. A client that gives up on its own leaves the
/// statement running on the server, holding its locks, until the server's limit.
pub async fn begin_bounded(
    client: &mut Client,
    lock_timeout: Option<Duration>,
    statement_timeout: Option<Duration>,
) -> Result<Transaction<'_>> {
    let transaction = client
        .transaction()
        .await
        .map_err(Error::database("begin a transaction"))?;

    let mut settings = format!(
        "SET LOCAL idle_in_transaction_session_timeout = {}; SET LOCAL TimeZone = 'UTC'",
        IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
    );
    if let Some(lock_timeout) = lock_timeout {
        settings.push_str(&format!(
            "; SET LOCAL lock_timeout = {}",
            lock_timeout.as_millis()
        ));
    }
    if let Some(statement_timeout) = statement_timeout {
        settings.push_str(&format!(
            "; SET LOCAL statement_timeout = {}",
            statement_timeout.as_millis()
        ));
    }
    transaction
        .batch_execute(&settings)
        .await
        .map_err(Error::database("set up the transaction"))?;
    Ok(transaction)
}
