//! One connection of the listener, from `LISTEN` to its loss.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

use super::WarnLimiter;
use crate::db::{connect_dedicated, DatabaseTarget};
use crate::error::{Error, Result};

/// How often a warning about unexpected notifications may be logged.
const JUNK_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// A listener row whose heartbeat is older than this belongs to a dead or stalled
/// process and is removed, so writers stop notifying its channel on its behalf.
const STALE_LISTENER_AFTER_SECONDS: f64 = 120.0;

/// Counts of notifications, shared with metrics and tests.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    /// Wake-up notifications received on the service's channel.
    pub received: AtomicU64,
    /// Notifications ignored because their payload was not the empty wake-up.
    pub ignored: AtomicU64,
}

/// Checks a NOTIFY channel name as PostgreSQL would accept it.
///
/// # Errors
///
/// [`Error::InvalidSetting`] when the name is empty, longer than 63 bytes or contains
/// a NUL character.
pub fn validate_channel(channel: &str) -> Result<()> {
    if channel.is_empty() || channel.len() > 63 || channel.contains('\0') {
        return Err(Error::InvalidSetting {
            key: "--channel",
            value: channel.to_owned(),
            allowed: "a name of 1 to 63 bytes without NUL characters",
        });
    }
    Ok(())
}

/// A live listener connection: it has run `LISTEN` and registered this listener in
/// `freight_kpi.listener`.
pub struct ListenerSession {
    client: Client,
    wakes: mpsc::Receiver<()>,
    listener_id: String,
    statement_timeout: Duration,
}

impl ListenerSession {
    /// Connects with `application_name` `freight-kpi listener`, runs `LISTEN` and
    /// registers the listener, disarmed. Stale rows of dead listeners are removed.
    ///
    /// Every statement of the session, here and later, fails after
    /// `statement_timeout`, so a connection that went silent is reported as lost
    /// instead of hanging the listener.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`], [`Error::Database`] or [`Error::Timeout`]; nothing is left
    /// behind but, at worst, a listener row that expires with its heartbeat.
    pub async fn connect(
        target: &DatabaseTarget,
        channel: &str,
        listener_id: &str,
        counters: Arc<ListenerCounters>,
        statement_timeout: Duration,
    ) -> Result<Self> {
        let target = target.with_application_name("freight-kpi listener");
        let (client, messages) = connect_dedicated(&target).await?;

        let (sender, wakes) = mpsc::channel(1);
        tokio::spawn(forward_notifications(
            messages,
            sender,
            channel.to_owned(),
            counters,
        ));

        let listen = format!("LISTEN {}", quote_identifier(channel));
        bounded(
            statement_timeout,
            "listen on the channel",
            client.batch_execute(&listen),
        )
        .await?;
        bounded(
            statement_timeout,
            "register the listener",
            client.execute(
                r#"INSERT INTO freight_kpi.listener (listener_id, channel, armed, heartbeat_at)
                   VALUES ($1, $2, false, now())
                   ON CONFLICT (listener_id) DO UPDATE
                   SET channel = EXCLUDED.channel, armed = false, heartbeat_at = now()"#,
                &[&listener_id, &channel],
            ),
        )
        .await?;
        let removed = bounded(
            statement_timeout,
            "remove stale listeners",
            client.execute(
                "DELETE FROM freight_kpi.listener WHERE heartbeat_at < now() - make_interval(secs => $1)",
                &[&STALE_LISTENER_AFTER_SECONDS],
            ),
        )
        .await?;
        if removed > 0 {
            tracing::info!(removed, "removed listeners with a stale heartbeat");
        }

        Ok(Self {
            client,
            wakes,
            listener_id: listener_id.to_owned(),
            statement_timeout,
        })
    }

    /// Asks writers to notify: from this commit on, the next writer of `"Load"` sends
    /// a wake-up. The row is written again if another instance removed it as stale.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the connection fails, [`Error::Timeout`] when it is
    /// silent.
    pub async fn arm(&self) -> Result<()> {
        self.set_armed(true).await
    }

    /// Asks writers to stop notifying while this listener is already awake.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the connection fails, [`Error::Timeout`] when it is
    /// silent.
    pub async fn disarm(&self) -> Result<()> {
        self.set_armed(false).await
    }

    async fn set_armed(&self, armed: bool) -> Result<()> {
        let updated = bounded(
            self.statement_timeout,
            "arm the listener",
            self.client.execute(
                "UPDATE freight_kpi.listener SET armed = $2, heartbeat_at = now() WHERE listener_id = $1",
                &[&self.listener_id, &armed],
            ),
        )
        .await?;
        if updated == 0 {
            return Err(Error::SchemaMissing(format!(
                "the row of listener {} vanished from freight_kpi.listener",
                self.listener_id
            )));
        }
        Ok(())
    }

    /// Checks that the server responds on the connection within `timeout`, and
    /// records a heartbeat.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the server does not respond in time or the statement
    /// fails; the session should then be replaced.
    pub async fn ping(&self, timeout: Duration) -> Result<()> {
        let listener_id = self.listener_id.as_str();
        let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&listener_id];
        let heartbeat = self.client.execute(
            "UPDATE freight_kpi.listener SET heartbeat_at = now() WHERE listener_id = $1",
            &parameters,
        );
        match tokio::time::timeout(timeout, heartbeat).await {
            Ok(Ok(1)) => Ok(()),
            Ok(Ok(_)) => Err(Error::SchemaMissing(format!(
                "the row of listener {} vanished from freight_kpi.listener",
                self.listener_id
            ))),
            Ok(Err(error)) => Err(Error::database("ping the listener connection")(error)),
            Err(_) => Err(Error::Timeout {
                operation: "ping of the listener connection",
                timeout,
            }),
        }
    }

    /// Returns the wake-ups received on the channel. The receiver ends when the
    /// connection is lost.
    pub fn wakes(&mut self) -> &mut mpsc::Receiver<()> {
        &mut self.wakes
    }

    /// Removes the listener's row so writers stop notifying it, before a clean exit.
    pub async fn deregister(&self) {
        let removed = bounded(
            self.statement_timeout,
            "remove the listener row",
            self.client.execute(
                "DELETE FROM freight_kpi.listener WHERE listener_id = $1",
                &[&self.listener_id],
            ),
        )
        .await;
        if let Err(error) = removed {
            tracing::warn!(error = %crate::error::error_chain(&error), "failed to remove the listener row; it expires with its heartbeat");
        }
    }
}

/// Runs one statement of the listener connection, or fails with [`Error::Timeout`]
/// when the server sends no response within `timeout`.
async fn bounded<T>(
    timeout: Duration,
    operation: &'static str,
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    crate::error::bounded(timeout, operation, async {
        statement.await.map_err(Error::database(operation))
    })
    .await
}

/// Forwards each wake-up notification on `channel` and ignores, with a rate-limited
/// warning, anything else: writers send an empty payload, so any text at all is not
/// from them.
async fn forward_notifications(
    mut messages: mpsc::UnboundedReceiver<AsyncMessage>,
    sender: mpsc::Sender<()>,
    channel: String,
    counters: Arc<ListenerCounters>,
) {
    let mut limiter = WarnLimiter::new(JUNK_WARNING_INTERVAL);
    while let Some(message) = messages.recv().await {
        let AsyncMessage::Notification(notification) = message else {
            continue;
        };
        if notification.channel() == channel && notification.payload().is_empty() {
            counters.received.fetch_add(1, Ordering::Relaxed);
            // A full channel already contains a pending wake-up, which is all that matters.
            let _ = sender.try_send(());
            continue;
        }

        counters.ignored.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = limiter.check() {
            tracing::warn!(
                channel = notification.channel(),
                payload_bytes = notification.payload().len(),
                sender_pid = notification.process_id(),
                suppressed,
                "ignored a notification that is not a wake-up; writers send an empty payload"
            );
        }
    }
}

/// Quotes a name as an SQL identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifier_quotes_are_doubled() {
        assert_eq!(quote_identifier("freight_kpi"), "\"freight_kpi\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn channel_names_are_checked() {
        assert!(validate_channel("freight_kpi").is_ok());
        assert!(validate_channel("").is_err());
        assert!(validate_channel(&"x".repeat(64)).is_err());
    }
}
