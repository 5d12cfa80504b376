//! The job lock as jobs see it: the choice between an advisory lock and a table lease,
//! the signal that fires when the lock is lost, and the fence that writes check.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;

use super::lease::{check_lease, lease_table_error, Lease};
use super::lock::{is_held_by, job_lock_key, AdvisoryLock};
use super::run_log::RunHolder;
use super::JobName;
use crate::db::{connect_dedicated, DatabaseTarget, Pool};
use crate::error::{Error, Result};

/// The mechanism that makes jobs exclusive across instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LockMode {
    /// Advisory locks, unless the connection goes through a transaction pooler, in
    /// which case table leases.
    #[default]
    Auto,
    /// Session advisory locks on a dedicated connection.
    Advisory,
    /// Leases in the table `freight_kpi.job_lease`.
    Table,
}

/// The mode in use once [`LockMode::Auto`] is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedLockMode {
    Advisory,
    Table,
}

impl ResolvedLockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedLockMode::Advisory => "advisory",
            ResolvedLockMode::Table => "table",
        }
    }
}

/// Settings of job locks, each with its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockSettings {
    /// Lock mode (default auto).
    pub mode: LockMode,
    /// Validity of a table lease from its last renewal (default 1 hour). A holder that
    /// died blocks the job at most this long.
    pub lease_timeout: Duration,
    /// A lost lock is noticed within this time, and a lease is renewed this often
    /// (default 10 s).
    pub heartbeat: Duration,
}

impl Default for LockSettings {
    fn default() -> Self {
        Self {
            mode: LockMode::Auto,
            lease_timeout: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(10),
        }
    }
}

/// Fires once when a held lock is lost, with the reason.
#[derive(Debug, Clone, Default)]
pub struct LostSignal {
    token: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

impl LostSignal {
    pub(crate) fn trigger(&self, reason: String) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Tells whether the lock was lost.
    pub fn is_lost(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the lock is lost and returns why.
    pub async fn wait(&self) -> String {
        self.token.cancelled().await;
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(|| "the lock was lost".to_owned())
    }
}

/// The check a write under a job lock runs in its own transaction before it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// No job lock: nothing to check.
    Unlocked,
    /// The advisory lock must still be held by the lock's backend.
    Advisory {
        job: JobName,
        key: i32,
        backend_pid: i32,
    },
    /// The lease must still be held by this holder with this fencing token.
    Lease {
        job: JobName,
        holder_id: String,
        generation: i64,
    },
}

impl Fence {
    /// Checks the fence inside `transaction`. For a lease, the lease row stays
    /// share-locked until the transaction ends, so no successor can take over before
    /// the writes that follow commit.
    ///
    /// # Errors
    ///
    /// [`Error::Fenced`] or [`Error::LockLost`] when the lock is no longer held,
    /// [`Error::Database`] when the check fails.
    pub async fn check(&self, transaction: &impl GenericClient) -> Result<()> {
        match self {
            Fence::Unlocked => Ok(()),
            Fence::Advisory {
                job,
                key,
                backend_pid,
            } => {
                if is_held_by(transaction, *key, *backend_pid).await? {
                    Ok(())
                } else {
                    Err(Error::LockLost {
                        job: job.as_str(),
                        reason: format!("backend {backend_pid} no longer holds the advisory lock"),
                    })
                }
            }
            Fence::Lease {
                job,
                holder_id,
                generation,
            } => check_lease(transaction, *job, holder_id, *generation).await,
        }
    }
}

/// A held job lock of either kind.
pub enum JobLock {
    Advisory { job: JobName, lock: AdvisoryLock },
    Lease { job: JobName, lease: Box<Lease> },
}

impl JobLock {
    /// Returns the mode of this lock.
    pub fn mode(&self) -> ResolvedLockMode {
        match self {
            JobLock::Advisory { .. } => ResolvedLockMode::Advisory,
            JobLock::Lease { .. } => ResolvedLockMode::Table,
        }
    }

    /// Returns the fence that writes under this lock check.
    pub fn fence(&self, holder_id: &str) -> Fence {
        match self {
            JobLock::Advisory { job, lock } => Fence::Advisory {
                job: *job,
                key: lock.key(),
                backend_pid: lock.backend_pid(),
            },
            JobLock::Lease { job, lease } => Fence::Lease {
                job: *job,
                holder_id: holder_id.to_owned(),
                generation: lease.generation(),
            },
        }
    }

    /// Returns the signal that fires when the lock is lost.
    pub fn lost(&self) -> LostSignal {
        match self {
            JobLock::Advisory { lock, .. } => lock.lost().clone(),
            JobLock::Lease { lease, .. } => lease.lost().clone(),
        }
    }

    /// Describes the holder for the run log.
    pub fn holder(
        &self,
        holder_id: &str,
        slot: Option<chrono::DateTime<chrono::Utc>>,
    ) -> RunHolder {
        let (fencing_token, backend_pid) = match self {
            JobLock::Advisory { lock, .. } => (None, Some(lock.backend_pid())),
            JobLock::Lease { lease, .. } => (Some(lease.generation()), None),
        };
        RunHolder {
            holder_id: holder_id.to_owned(),
            lock_mode: self.mode().as_str(),
            fencing_token,
            backend_pid,
            slot,
        }
    }

    /// Releases the lock.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the release statement fails; an advisory lock still
    /// ends with its connection, a lease at its expiry.
    pub async fn release(self) -> Result<()> {
        match self {
            JobLock::Advisory { lock, .. } => lock.release().await,
            JobLock::Lease { lease, .. } => lease.release().await,
        }
    }
}

/// The outcome of one attempt to take a job lock.
pub enum Acquired {
    Held(JobLock),
    /// Another instance has the job. The text names it where known.
    Busy(String),
}

/// Takes job locks for one process: the mode, decided once for auto, and the
/// process's holder id.
pub struct JobLocks {
    pool: Pool,
    settings: LockSettings,
    holder_id: String,
    resolved: OnceCell<ResolvedLockMode>,
}

impl std::fmt::Debug for JobLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobLocks")
            .field("database", &self.pool.target().describe())
            .field("settings", &self.settings)
            .field("holder_id", &self.holder_id)
            .field("resolved", &self.resolved.get())
            .finish()
    }
}

impl JobLocks {
    /// Creates the lock source of a process. `holder_id` must be unique per process.
    pub fn new(pool: Pool, settings: LockSettings, holder_id: String) -> Self {
        Self {
            pool,
            settings,
            holder_id,
            resolved: OnceCell::new(),
        }
    }

    /// Returns the process's holder id.
    pub fn holder_id(&self) -> &str {
        &self.holder_id
    }

    /// Returns the lock settings.
    pub fn settings(&self) -> &LockSettings {
        &self.settings
    }

    /// Returns the mode in use, probing the connection once in auto mode.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] or [`Error::Database`] when the probe fails.
    pub async fn mode(&self) -> Result<ResolvedLockMode> {
        let mode = self
            .resolved
            .get_or_try_init(|| async {
                let mode = match self.settings.mode {
                    LockMode::Advisory => ResolvedLockMode::Advisory,
                    LockMode::Table => ResolvedLockMode::Table,
                    LockMode::Auto => {
                        if behind_transaction_pooler(self.pool.target()).await? {
                            tracing::info!(lock.mode = "table", "session state does not survive between statements on this connection (a transaction pooler such as PgBouncer); job locks use table leases");
                            ResolvedLockMode::Table
                        } else {
                            tracing::info!(lock.mode = "advisory", "job locks use advisory locks");
                            ResolvedLockMode::Advisory
                        }
                    }
                };
                Ok::<_, Error>(mode)
            })
            .await?;
        Ok(*mode)
    }

    /// Tries once to take the lock of `job`, without waiting.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves no lock behind: an advisory lock's connection closes
    /// with the future, and a lease taken by the spawned acquisition is released.
    ///
    /// # Errors
    ///
    /// [`Error::SchemaMissing`] when `freight_kpi.job_lease` does not exist,
    /// [`Error::Connect`] or [`Error::Database`] otherwise.
    pub async fn try_acquire(&self, job: JobName) -> Result<Acquired> {
        match self.mode().await? {
            ResolvedLockMode::Advisory => {
                let target = self.pool.target();
                let Some(lock) =
                    AdvisoryLock::try_acquire(target, job_lock_key(job), self.settings.heartbeat)
                        .await?
                else {
                    return Ok(Acquired::Busy("another session's advisory lock".to_owned()));
                };
                if let Some(holder) = lease_holder(&self.pool, job).await? {
                    // An instance in table mode holds the job; the advisory lock closes
                    // with its connection when `lock` is dropped.
                    drop(lock);
                    return Ok(Acquired::Busy(holder));
                }
                Ok(Acquired::Held(JobLock::Advisory { job, lock }))
            }
            ResolvedLockMode::Table => {
                let lease = Lease::try_acquire(
                    &self.pool,
                    job,
                    &self.holder_id,
                    self.settings.lease_timeout,
                    self.settings.heartbeat,
                )
                .await?;
                match lease {
                    Ok(lease) => Ok(Acquired::Held(JobLock::Lease {
                        job,
                        lease: Box::new(lease),
                    })),
                    Err(held) => Ok(Acquired::Busy(match held.expires_at {
                        Some(expires_at) => {
                            format!("lease holder {} until {expires_at}", held.holder)
                        }
                        None => held.holder,
                    })),
                }
            }
        }
    }
}

/// Returns the holder of a valid lease of `job`, for an advisory locker that must not
/// run beside an instance in table mode. `NOWAIT` reports a lease acquisition in
/// progress as a holder too.
async fn lease_holder(pool: &Pool, job: JobName) -> Result<Option<String>> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO freight_kpi.job_lease (job_name) VALUES ($1) ON CONFLICT (job_name) DO NOTHING",
            &[&job.as_str()],
        )
        .await
        .map_err(lease_table_error("create a lease row"))?;
    let row = client
        .query_one(
            "SELECT holder_id, holder_id IS NOT NULL AND expires_at > now() AS held
             FROM freight_kpi.job_lease WHERE job_name = $1 FOR KEY SHARE NOWAIT",
            &[&job.as_str()],
        )
        .await;
    match row {
        Ok(row) if row.get::<_, bool>("held") => Ok(Some(format!(
            "lease holder {}",
            row.get::<_, Option<String>>("holder_id")
                .unwrap_or_default()
        ))),
        Ok(_) => Ok(None),
        Err(error) if error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
            Ok(Some("an instance that is acquiring the lease".to_owned()))
        }
        Err(error) => Err(Error::database("read the lease")(error)),
    }
}

/// Rounds of the pooler probe; each round can catch a pooler that the previous one
/// missed because other clients took the server connections in between.
const PROBE_ROUNDS: usize = 3;

/// Tells whether connections to `target` go through a transaction (or statement)
/// pooler, where a session advisory lock stays on a server connection that other
/// clients then use.
///
/// Two client connections ask for their backend's process id in turn. Without a
/// pooler, each client keeps its own backend for its whole life, so the ids differ
/// between the clients and stay the same within one. A transaction pooler hands the
/// same idle server connection to both (PgBouncer reuses the most recently freed
/// one), or moves one client between backends. Only process ids are compared, so the
/// probe leaves no lock behind on a pooled server connection.
///
/// NOTE: under heavy traffic through the same pooler every round can land on
/// distinct, stable backends by chance; set the lock mode to `table` explicitly there.
///
/// # Errors
///
/// [`Error::Connect`] or [`Error::Database`].
pub async fn behind_transaction_pooler(target: &DatabaseTarget) -> Result<bool> {
    let target = target.with_application_name("freight-kpi lock probe");
    let (first, _first_messages) = connect_dedicated(&target).await?;
    let (second, _second_messages) = connect_dedicated(&target).await?;

    for _ in 0..PROBE_ROUNDS {
        let first_before = backend_pid(&first).await?;
        let other = backend_pid(&second).await?;
        let first_after = backend_pid(&first).await?;
        if first_before == other || first_before != first_after {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads `pg_backend_pid()` with the simple query protocol, which a pooler passes on
/// as one unit.
async fn backend_pid(client: &Client) -> Result<i32> {
    let messages = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .map_err(Error::database("read the backend process id"))?;
    let pid = messages.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) => {
            row.get(0).and_then(|text| text.parse().ok())
        }
        _ => None,
    });
    pid.ok_or_else(|| Error::LockLost {
        job: "lock probe",
        reason: "pg_backend_pid() returned no number".to_owned(),
    })
}
