//! Parsing `DATABASE_URL` and opening connections.
//!
//! Every connection gets an `application_name` that starts with `freight-kpi`, so an
//! operator can find the service in `pg_stat_activity`, and TCP keepalives, so a peer
//! that vanished without closing the connection is noticed by the kernel.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use crate::error::{Error, Result};

/// Time allowed for opening one connection, TCP and authentication included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle time before the kernel starts probing a silent TCP connection. With the
/// interval and retry count below, a dead peer is detected in about 20 seconds; the
/// listener's own ping notices it sooner.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 2;

/// The folder where Debian's and most distributions' servers put their Unix socket,
/// which libpq also tries first when a connection string names no host.
const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// A parsed connection string: where to connect and as whom, without exposing the
/// password in any `Debug` or `Display` output.
#[derive(Clone)]
pub struct DatabaseTarget {
    config: tokio_postgres::Config,
}

impl DatabaseTarget {
    /// Parses a postgres URL or a key=value connection string.
    ///
    /// Missing host and user default as libpq does: the local Unix socket folder and
    /// the operating system user.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidDatabaseUrl`] with a reason that never repeats the input,
    /// since the input may hold a password.
    pub fn parse(url: &str) -> Result<Self> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(Error::InvalidDatabaseUrl {
                reason: "the value is empty".to_owned(),
            });
        }

        let mut config = tokio_postgres::Config::from_str(trimmed).map_err(|error| {
            Error::InvalidDatabaseUrl {
                reason: describe_parse_error(trimmed, &error),
            }
        })?;

        if config.get_hosts().is_empty() {
            if std::path::Path::new(DEFAULT_SOCKET_DIR).exists() {
                config.host_path(DEFAULT_SOCKET_DIR);
            } else {
                config.host("localhost");
            }
        }
        if config.get_user().is_none() {
            let Some(user) = std::env::var("USER")
                .ok()
                .or_else(|| std::env::var("LOGNAME").ok())
            else {
                return Err(Error::InvalidDatabaseUrl {
                    reason: "it names no user and USER is not set; add user=NAME or postgres://NAME@...".to_owned(),
                });
            };
            config.user(&user);
        }

        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .application_name("freight-kpi");
        Ok(Self { config })
    }

    /// Returns a copy whose connections carry `application_name` `name`, which must
    /// start with `freight-kpi`.
    pub fn with_application_name(&self, name: &str) -> Self {
        debug_assert!(name.starts_with("freight-kpi"));
        let mut config = self.config.clone();
        config.application_name(name);
        Self { config }
    }

    /// Returns a copy that connects to another database on the same server.
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut config = self.config.clone();
        config.dbname(dbname);
        Self { config }
    }

    /// Returns the underlying driver configuration.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Returns the database name, or the user name when none is set, as the server does.
    pub fn dbname(&self) -> &str {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
    }

    /// Describes the target as `user@host:port/dbname`, safe to log.
    pub fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(name)) => name.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("?");
        format!("{user}@{host}:{port}/{}", self.dbname())
    }

    /// Creates the connection pool for batches, reconciles and job bookkeeping.
    ///
    /// No connection is opened until the first one is requested.
    pub fn pool(&self, max_size: usize) -> Result<Pool> {
        let manager = Manager::from_config(
            self.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let inner = deadpool_postgres::Pool::builder(manager)
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|error| Error::InvalidDatabaseUrl {
                reason: error.to_string(),
            })?;
        Ok(Pool {
            inner,
            target: self.clone(),
        })
    }
}

impl std::fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DatabaseTarget")
            .field(&self.describe())
            .finish()
    }
}

/// Time a caller waits for a free pooled connection before giving up.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared pool of ordinary connections.
///
/// Session state does not survive recycling here (deadpool runs neither `UNLISTEN`
/// nor `pg_advisory_unlock_all`), so `LISTEN` and session-level locks use
/// [`connect_dedicated`] instead.
#[derive(Clone)]
pub struct Pool {
    inner: deadpool_postgres::Pool,
    target: DatabaseTarget,
}

impl Pool {
    /// Takes a connection from the pool, opening one if needed.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] when a new connection fails, [`Error::PoolTimeout`] when none
    /// frees up in time.
    pub async fn get(&self) -> Result<deadpool_postgres::Object> {
        self.inner.get().await.map_err(|error| match error {
            deadpool_postgres::PoolError::Timeout(_) => Error::PoolTimeout {
                timeout: POOL_WAIT_TIMEOUT,
            },
            deadpool_postgres::PoolError::Backend(source) => Error::Connect {
                target: self.target.describe(),
                reason: describe_connect_error(&source),
            },
            other => Error::Connect {
                target: self.target.describe(),
                reason: other.to_string(),
            },
        })
    }

    /// Returns the target the pool connects to.
    pub fn target(&self) -> &DatabaseTarget {
        &self.target
    }

    /// Closes the pool: idle connections are dropped and later requests fail.
    pub fn close(&self) {
        self.inner.close();
    }
}

/// Opens a connection outside the pool and drives it on a spawned task.
///
/// Returns the client and a receiver of the connection's asynchronous messages
/// (notifications and notices); the receiver ends when the connection closes, which
/// is how the owner learns that it was lost.
///
/// # Errors
///
/// [`Error::Connect`] with the server's reason, without the password.
pub async fn connect_dedicated(
    target: &DatabaseTarget,
) -> Result<(
    Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
)> {
    let (client, mut connection) =
        target
            .config
            .connect(NoTls)
            .await
            .map_err(|error| Error::Connect {
                target: target.describe(),
                reason: describe_connect_error(&error),
            })?;

    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = futures::StreamExt::next(&mut messages).await {
            match message {
                Ok(message) => {
                    if sender.send(message).is_err() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::debug!(error = %error, "dedicated connection closed");
                    break;
                }
            }
        }
    });
    Ok((client, receiver))
}

/// Turns a driver error into a short reason: the server's message when it sent one,
/// the I/O cause otherwise.
pub(crate) fn describe_connect_error(error: &tokio_postgres::Error) -> String {
    if let Some(db_error) = error.as_db_error() {
        return db_error.message().to_owned();
    }
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        source = cause.source();
    }
    reason
}

/// Describes why a connection string did not parse, without repeating any part of it
/// that could be a password.
fn describe_parse_error(input: &str, error: &tokio_postgres::Error) -> String {
    let mut reason = error.to_string();
    if let Some(cause) = std::error::Error::source(error) {
        reason = format!("{reason}: {cause}");
    }
    for secret in password_candidates(input) {
        if secret.len() >= 3 {
            reason = reason.replace(&secret, "***");
        }
    }
    reason
}

/// Collects the substrings of a connection string that may be a password: the part
/// between `:` and `@` of a URL, and the value of a `password=` pair.
fn password_candidates(input: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(rest) = input.split_once("://").map(|(_, rest)| rest) {
        if let Some((userinfo, _)) = rest.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                found.push(password.to_owned());
            }
        }
    }
    for pair in input.split_whitespace() {
        if let Some(value) = pair.strip_prefix("password=") {
            found.push(value.trim_matches('\'').to_owned());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_url_and_key_value() {
        let url = DatabaseTarget::parse("postgres://app:secret@db.example:6543/kpi").unwrap();
        assert_eq!(url.describe(), "app@db.example:6543/kpi");

        let pairs = DatabaseTarget::parse("host=127.0.0.1 user=app dbname=kpi").unwrap();
        assert_eq!(pairs.describe(), "app@127.0.0.1:5432/kpi");
    }

    #[test]
    fn parse_error_hides_password() {
        let error = DatabaseTarget::parse("postgres://app:hunter22@host:notaport/db").unwrap_err();
        let message = error.to_string();
        assert!(!message.contains("hunter22"), "{message}");
        assert!(message.starts_with("invalid DATABASE_URL"), "{message}");
    }

    #[test]
    fn debug_output_hides_password() {
        let target = DatabaseTarget::parse("postgres://app:hunter22@host/db").unwrap();
        assert!(!format!("{target:?}").contains("hunter22"));
    }

    #[test]
    fn parse_rejects_empty_value() {
        let error = DatabaseTarget::parse("  ").unwrap_err();
        assert!(error.to_string().contains("empty"));
    }
}
