//! Session advisory locks for jobs, each on a connection of its own.
//!
//! Keys use the two-key form with [`crate::ADVISORY_LOCK_NAMESPACE`] as the first key.
//! Second keys of that namespace: 0 is the migration lock, 1000 to 1127 are the
//! bucket stripes, and 2000 to 2003 are the job locks ([`job_lock_key`]). An
//! application lock taken with the one-key form, such as `pg_advisory_lock(1)`, lives
//! in another key space of the server and never conflicts with these.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tokio_postgres::{AsyncMessage, Client};

use super::job_lock::LostSignal;
use super::JobName;
use crate::db::{connect_dedicated, DatabaseTarget};
use crate::error::{Error, Result};

/// Second key of the first job lock; job locks follow in the order of [`JobName::ALL`].
pub const FIRST_JOB_LOCK_KEY: i32 = 2_000;

/// Application name of lock connections, so an operator can find them in
/// `pg_stat_activity`.
pub const LOCK_APPLICATION_NAME: &str = "freight-kpi lock";

/// Returns the second advisory-lock key of `job`.
pub fn job_lock_key(job: JobName) -> i32 {
    let index = JobName::ALL
        .iter()
        .position(|candidate| *candidate == job)
        .expect("JobName::ALL lists every variant");
    FIRST_JOB_LOCK_KEY + index as i32
}

/// A held session advisory lock, on a connection that nothing else uses.
///
/// The lock ends with the connection. [`AdvisoryLock::release`] unlocks and closes
/// it, and dropping the value (on error, panic or cancellation) closes it, so the
/// server releases the lock as soon as the connection ends.
pub struct AdvisoryLock {
    client: Arc<Client>,
    key: i32,
    backend_pid: i32,
    lost: LostSignal,
    watcher: JoinHandle<()>,
}

impl AdvisoryLock {
    /// Opens a connection and tries once to take lock `key`, without waiting. Returns
    /// `None`, after closing the connection, when another session has it.
    ///
    /// While held, a heartbeat checks the connection every half `heartbeat` and gives
    /// each check half `heartbeat` to answer, so a lost connection is noticed within one
    /// `heartbeat`, and at once when the connection closes.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the connection, and with it any lock it took.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] or [`Error::Database`].
    pub async fn try_acquire(
        target: &DatabaseTarget,
        key: i32,
        heartbeat: Duration,
    ) -> Result<Option<AdvisoryLock>> {
        let target = target.with_application_name(LOCK_APPLICATION_NAME);
        let (client, messages) = connect_dedicated(&target).await?;

        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2), pg_backend_pid()",
                &[&crate::ADVISORY_LOCK_NAMESPACE, &key],
            )
            .await
            .map_err(Error::database("take a job lock"))?;
        if !row.get::<_, bool>(0) {
            return Ok(None);
        }

        let client = Arc::new(client);
        let lost = LostSignal::default();
        let watcher = tokio::spawn(watch_connection(
            client.clone(),
            messages,
            heartbeat,
            lost.clone(),
        ));
        Ok(Some(AdvisoryLock {
            client,
            key,
            backend_pid: row.get(1),
            lost,
            watcher,
        }))
    }

    /// Returns the server process that holds the lock.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Returns the second key of the lock.
    pub fn key(&self) -> i32 {
        self.key
    }

    /// Returns the signal that fires when the lock's connection is lost.
    pub fn lost(&self) -> &LostSignal {
        &self.lost
    }

    /// Unlocks and closes the connection.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the unlock fails; the lock still ends with the
    /// connection, which is closed either way.
    pub async fn release(self) -> Result<()> {
        self.watcher.abort();
        self.client
            .query_one(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&crate::ADVISORY_LOCK_NAMESPACE, &self.key],
            )
            .await
            .map_err(Error::database("release a job lock"))?;
        Ok(())
    }
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        // The watcher keeps a handle on the client, so stopping it lets the connection close.
        self.watcher.abort();
    }
}

async fn watch_connection(
    client: Arc<Client>,
    mut messages: UnboundedReceiver<AsyncMessage>,
    heartbeat: Duration,
    lost: LostSignal,
) {
    let check_every = heartbeat / 2;
    loop {
        tokio::select! {
            message = messages.recv() => {
                if message.is_none() {
                    lost.trigger("the lock's connection closed".to_owned());
                    return;
                }
            }
            () = sleep(check_every) => {
                match timeout(check_every, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        lost.trigger(format!("the lock's connection failed: {error}"));
                        return;
                    }
                    Err(_) => {
                        lost.trigger(format!("the lock's connection did not answer within {check_every:?}"));
                        return;
                    }
                }
            }
        }
    }
}

/// Tells whether backend `backend_pid` still holds job lock `key`, from any session.
///
/// # Errors
///
/// [`Error::Database`] when the query fails.
pub async fn is_held_by(
    client: &impl tokio_postgres::GenericClient,
    key: i32,
    backend_pid: i32,
) -> Result<bool> {
    let row = client
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 {HELD_LOCKS} AND pid = $3)"),
            &[&crate::ADVISORY_LOCK_NAMESPACE, &key, &backend_pid],
        )
        .await
        .map_err(Error::database("check a job lock"))?;
    Ok(row.get(0))
}

/// The granted advisory locks of key ($1, $2) in the current database, as a FROM
/// clause. The two-key form stores the first key in classid, the second in objid and 2
/// in objsubid.
pub(crate) const HELD_LOCKS: &str = "FROM pg_locks
    WHERE locktype = 'advisory'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = $1::integer::oid AND objid = $2::integer::oid AND objsubid = 2
      AND granted";
