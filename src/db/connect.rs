//! Parsing `DATABASE_URL` and opening connections.
//!
//! Every connection gets an `application_name` that starts with `freight-kpi`, so an
//! operator can find the service in `pg_stat_activity`. It also gets TCP keepalives,
//! so the kernel notices a peer that vanished without closing the connection, and
//! TLS as the connection string's `sslmode` and `sslrootcert` require (see
//! [`super::tls`]).

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::tls::{split_tls_settings, SslMode, TlsConnector, TlsSettings};
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

/// A parsed connection string: where to connect, as whom and over what kind of TLS,
/// without exposing the password in any `Debug` or `Display` output.
#[derive(Clone)]
pub struct DatabaseTarget {
    config: tokio_postgres::Config,
    tls: TlsSettings,
    connector: TlsConnector,
}

impl DatabaseTarget {
    /// Parses a postgres URL or a key=value connection string.
    ///
    /// Missing host and user default as libpq does: the local Unix socket folder and
    /// the operating system user. `sslmode` takes libpq's values `disable`, `prefer`
    /// (the default), `require`, `verify-ca` and `verify-full`, and `sslrootcert` names
    /// a PEM file of trusted CA certificates or `system` for the system trust store.
    /// As in libpq, connections over a Unix socket never use TLS, whatever the value
    /// of `sslmode`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidDatabaseUrl`] with a reason that never repeats the input,
    /// since the input may contain a password. A `sslrootcert` file that cannot be read
    /// or contains no certificate is reported here, before any connection.
    pub fn parse(url: &str) -> Result<Self> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(Error::InvalidDatabaseUrl {
                reason: "the value is empty".to_owned(),
            });
        }

        let (without_tls, tls) =
            split_tls_settings(trimmed).map_err(|reason| Error::InvalidDatabaseUrl { reason })?;
        let mut config = tokio_postgres::Config::from_str(&without_tls).map_err(|error| {
            Error::InvalidDatabaseUrl {
                reason: describe_parse_error(trimmed, &error),
            }
        })?;

        if config.get_hosts().is_empty() && !config.get_hostaddrs().is_empty() {
            // Without a host name, tokio-postgres has no name for the TLS handshake and
            // fails it, so the addresses stand in for it, which is also the name that
            // verify-full then checks.
            for address in config.get_hostaddrs().to_vec() {
                config.host(address.to_string());
            }
        } else if config.get_hosts().is_empty() {
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
                    reason:
                        "it names no user and USER is not set; add user=NAME or postgres://NAME@..."
                            .to_owned(),
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

        // libpq never requests TLS over a Unix socket, because the server does not
        // offer it there. tokio-postgres would request it and fail when sslmode
        // requires TLS.
        // NOTE: a list that mixes Unix sockets and TCP hosts keeps the requested mode
        // for all of them.
        let all_unix = config
            .get_hosts()
            .iter()
            .all(|host| matches!(host, Host::Unix(_)));
        config.ssl_mode(if all_unix {
            tokio_postgres::config::SslMode::Disable
        } else {
            tls.driver_mode()
        });

        let connector = tls
            .connector()
            .map_err(|reason| Error::InvalidDatabaseUrl { reason })?;
        Ok(Self {
            config,
            tls,
            connector,
        })
    }

    /// Returns a copy whose connections carry `application_name` `name`, which must
    /// start with `freight-kpi`.
    pub fn with_application_name(&self, name: &str) -> Self {
        debug_assert!(name.starts_with("freight-kpi"));
        let mut target = self.clone();
        target.config.application_name(name);
        target
    }

    /// Returns a copy that connects to another database on the same server.
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut target = self.clone();
        target.config.dbname(dbname);
        target
    }

    /// Returns the underlying driver configuration. Its `ssl_mode` sets only whether
    /// TLS is requested. The certificate checks are in the connector that
    /// [`DatabaseTarget::pool`] and [`connect_dedicated`] use.
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
            self.connector.clone(),
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
                reason: describe_connect_error(&self.target, &source),
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

    /// Drops the idle connections, so the next requests open new ones. Connections in
    /// use are kept. Returns how many were dropped.
    ///
    /// Recycling only checks that a connection is not closed, so a connection that
    /// went silent without closing would otherwise be handed out again and hang the
    /// first statement sent on it.
    pub fn discard_idle(&self) -> usize {
        self.inner.retain(|_, _| false).removed.len()
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
    let (client, mut connection) = target
        .config
        .connect(target.connector.clone())
        .await
        .map_err(|error| Error::Connect {
            target: target.describe(),
            reason: describe_connect_error(target, &error),
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
/// the I/O or TLS cause otherwise, with a hint when the TLS settings are the likely
/// fix.
pub(crate) fn describe_connect_error(
    target: &DatabaseTarget,
    error: &tokio_postgres::Error,
) -> String {
    if let Some(db_error) = error.as_db_error() {
        let mut reason = db_error.message().to_owned();
        // pg_hba.conf rejections share this code, and with TLS off a server that
        // allows only `hostssl` lines is a common cause.
        if db_error.code() == &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            && target.tls.mode == SslMode::Disable
        {
            reason.push_str(
                "; if the server accepts only TLS connections, set sslmode=require or \
                 stronger instead of disable",
            );
        }
        return reason;
    }

    let mut reason = error.to_string();
    let mut certificate_error = None;
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        certificate_error = certificate_error.or_else(|| find_certificate_error(cause));
        source = cause.source();
    }

    if let Some(certificate_error) = certificate_error {
        let hint = match certificate_error {
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => {
                "the certificate does not name the host in DATABASE_URL; connect by a \
                 name the certificate lists, or use sslmode=verify-ca to skip the host \
                 name check"
            }
            _ => {
                "check that sslrootcert names the CA certificate that signed the \
                 server's certificate"
            }
        };
        reason = format!("server certificate verification failed ({reason}); {hint}");
    }
    reason
}

/// Finds the rustls certificate error behind a TLS failure. tokio-postgres wraps it
/// in an `io::Error`, whose `source` skips the wrapped error, so it is read with
/// `get_ref`.
fn find_certificate_error<'a>(
    cause: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::CertificateError> {
    let inner = cause.downcast_ref::<std::io::Error>()?.get_ref()?;
    match inner.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(certificate_error) => Some(certificate_error),
        _ => None,
    }
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
    fn parse_accepts_tls_settings_in_both_forms() {
        let url = DatabaseTarget::parse("postgres://app@db/kpi?sslmode=verify-full").unwrap();
        assert_eq!(url.tls.mode, SslMode::VerifyFull);
        assert_eq!(url.describe(), "app@db:5432/kpi");

        let pairs = DatabaseTarget::parse("host=db user=app sslmode=verify-ca").unwrap();
        assert_eq!(pairs.tls.mode, SslMode::VerifyCa);
        assert_eq!(
            pairs.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn parse_keeps_tls_settings_in_copies() {
        let target = DatabaseTarget::parse("host=db user=app sslmode=require").unwrap();
        let copy = target
            .with_dbname("other")
            .with_application_name("freight-kpi listener");
        assert_eq!(copy.tls, target.tls);
        assert_eq!(
            copy.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn parse_turns_tls_off_for_unix_socket() {
        let target = DatabaseTarget::parse("host=/tmp user=app sslmode=require").unwrap();
        assert_eq!(
            target.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn parse_names_host_after_hostaddr() {
        // Guards against a hostaddr-only target getting the Unix socket folder as its
        // host, which leaves the TLS handshake without a server name.
        let target = DatabaseTarget::parse("hostaddr=127.0.0.1 user=app").unwrap();
        assert_eq!(target.describe(), "app@127.0.0.1:5432/app");
    }

    #[test]
    fn parse_error_with_tls_settings_hides_password() {
        let error =
            DatabaseTarget::parse("postgres://app:hunter22@host:notaport/db?sslmode=verify-full")
                .unwrap_err();
        let message = error.to_string();
        assert!(!message.contains("hunter22"), "{message}");
        assert!(message.starts_with("invalid DATABASE_URL"), "{message}");
    }

    #[test]
    fn parse_rejects_invalid_sslmode_without_echo() {
        let error =
            DatabaseTarget::parse("postgres://app:hunter22@host/db?sslmode=hunter22").unwrap_err();
        let message = error.to_string();
        assert!(!message.contains("hunter22"), "{message}");
        assert!(message.contains("sslmode"), "{message}");
    }

    #[test]
    fn parse_reports_unreadable_root_certificate() {
        let error = DatabaseTarget::parse(
            "postgres://app:hunter22@host/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("/nonexistent/ca.pem"), "{message}");
        assert!(!message.contains("hunter22"), "{message}");
    }

    #[test]
    fn parse_rejects_empty_value() {
        let error = DatabaseTarget::parse("  ").unwrap_err();
        assert!(error.to_string().contains("empty"));
    }
}
