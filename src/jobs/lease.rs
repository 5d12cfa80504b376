//! Table leases: the job lock for connections whose session state cannot be trusted,
//! such as those through PgBouncer in transaction pooling mode.
//!
//! A lease is the row of its job in `freight_kpi.job_lease`. Acquiring it locks the row
//! with `SELECT … FOR UPDATE NOWAIT` and takes it when it is free or its expiry has
//! passed by the database's clock. Every acquisition increments the row's generation,
//! which is the fencing token. A heartbeat renews the expiry while the job runs. Writes under
//! the lease call [`check_lease`] in their own transaction: it fails once the lease has
//! expired or moved on, and its `FOR KEY SHARE` row lock keeps any successor from
//! taking over until that transaction ends.
//!
//! Statements outside a transaction use unnamed prepared statements
//! (`query_typed`), since a transaction pooler may send the two round trips of a named
//! one to different server connections.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use super::job_lock::LostSignal;
use super::lock::{job_lock_key, HELD_LOCKS};
use super::JobName;
use crate::db::Pool;
use crate::error::{Error, Result};

/// The reason a lease could not be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHeld {
    /// The current holder, or a description when it is not known.
    pub holder: String,
    /// When the current lease expires, if it is a lease.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A held lease. Dropping it without [`Lease::release`] leaves the release to a
/// spawned task, or, if the process dies, to the expiry.
pub struct Lease {
    pool: Pool,
    job: JobName,
    holder_id: String,
    generation: i64,
    lost: LostSignal,
    renewer: Option<JoinHandle<()>>,
    released: bool,
}

/// The grant of one acquisition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    generation: i64,
    previous_holder: Option<String>,
}

impl Lease {
    /// Tries once to take the lease of `job` for `holder_id`, valid for `lease_timeout`
    /// by the database's clock, and starts renewing it every `heartbeat`.
    ///
    /// # Cancel safety
    ///
    /// The acquisition runs in a spawned task. If this future is dropped, the task
    /// releases a lease it took, so a cancelled acquire leaves no lease behind.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] or a pool error.
    pub async fn try_acquire(
        pool: &Pool,
        job: JobName,
        holder_id: &str,
        lease_timeout: Duration,
        heartbeat: Duration,
    ) -> Result<std::result::Result<Lease, LeaseHeld>> {
        let (sender, receiver) = oneshot::channel();
        let task_pool = pool.clone();
        let task_holder = holder_id.to_owned();
        tokio::spawn(async move {
            if sender.is_closed() {
                return;
            }
            let outcome = acquire(&task_pool, job, &task_holder, lease_timeout).await;
            if let Err(Ok(Ok(grant))) = sender.send(outcome) {
                // The caller stopped waiting, so the lease goes back at once.
                if let Err(error) = release(&task_pool, job, &task_holder, grant.generation).await {
                    tracing::warn!(job.name = %job, error = %crate::error::error_chain(&error), "releasing the lease of a cancelled acquisition failed; it ends at its expiry");
                }
            }
        });
        let grant = match receiver.await {
            Ok(outcome) => outcome?,
            Err(_) => {
                return Err(Error::LockLost {
                    job: job.as_str(),
                    reason: "the task acquiring the lease panicked".to_owned(),
                })
            }
        };
        let grant = match grant {
            Ok(grant) => grant,
            Err(held) => return Ok(Err(held)),
        };

        if let Some(previous) = &grant.previous_holder {
            tracing::warn!(job.name = %job, previous_holder = %previous, generation = grant.generation, "took over an expired lease");
        }
        let lost = LostSignal::default();
        let renewer = tokio::spawn(renew_until_lost(
            pool.clone(),
            job,
            holder_id.to_owned(),
            grant.generation,
            lease_timeout,
            heartbeat,
            lost.clone(),
        ));
        Ok(Ok(Lease {
            pool: pool.clone(),
            job,
            holder_id: holder_id.to_owned(),
            generation: grant.generation,
            lost,
            renewer: Some(renewer),
            released: false,
        }))
    }

    /// Returns the fencing token of this acquisition.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// Returns the signal that fires when the lease is lost.
    pub fn lost(&self) -> &LostSignal {
        &self.lost
    }

    /// Stops renewing and frees the lease, unless it already moved on.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the update fails; the lease then ends at its expiry.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        release(&self.pool, self.job, &self.holder_id, self.generation).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, job, holder, generation) = (
            self.pool.clone(),
            self.job,
            self.holder_id.clone(),
            self.generation,
        );
        runtime.spawn(async move {
            if let Err(error) = release(&pool, job, &holder, generation).await {
                tracing::warn!(job.name = %job, error = %crate::error::error_chain(&error), "releasing a dropped lease failed; it ends at its expiry");
            }
        });
    }
}

async fn acquire(
    pool: &Pool,
    job: JobName,
    holder_id: &str,
    lease_timeout: Duration,
) -> Result<std::result::Result<Grant, LeaseHeld>> {
    let mut client = pool.get().await?;
    let transaction = client
        .transaction()
        .await
        .map_err(Error::database("begin a lease acquisition"))?;

    transaction
        .execute(
            "INSERT INTO freight_kpi.job_lease (job_name) VALUES ($1) ON CONFLICT (job_name) DO NOTHING",
            &[&job.as_str()],
        )
        .await
        .map_err(lease_table_error("create a lease row"))?;

    // NOWAIT: a row lock held elsewhere means a fenced write or another acquisition is
    // in progress, and both mean the lease is taken.
    let current = transaction
        .query_one(
            "SELECT holder_id, expires_at, holder_id IS NULL OR expires_at <= now() AS free
             FROM freight_kpi.job_lease WHERE job_name = $1 FOR UPDATE NOWAIT",
            &[&job.as_str()],
        )
        .await;
    let current = match current {
        Ok(row) => row,
        Err(error) if error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
            return Ok(Err(LeaseHeld {
                holder: "another instance that is acquiring or writing under the lease".to_owned(),
                expires_at: None,
            }));
        }
        Err(error) => return Err(Error::database("lock the lease row")(error)),
    };
    let holder: Option<String> = current.get("holder_id");
    if !current.get::<_, bool>("free") {
        return Ok(Err(LeaseHeld {
            holder: holder.unwrap_or_default(),
            expires_at: current.get("expires_at"),
        }));
    }

    // An instance in advisory mode holds the job through its advisory lock, which every
    // session can see in pg_locks, also through a pooler.
    let advisory_holder = transaction
        .query_opt(
            &format!("SELECT pid {HELD_LOCKS} LIMIT 1"),
            &[&crate::ADVISORY_LOCK_NAMESPACE, &job_lock_key(job)],
        )
        .await
        .map_err(Error::database("look for an advisory job lock"))?;
    if let Some(row) = advisory_holder {
        let pid: i32 = row.get(0);
        return Ok(Err(LeaseHeld {
            holder: format!("the advisory lock of backend {pid}"),
            expires_at: None,
        }));
    }

    let timeout_ms = duration_ms(lease_timeout);
    let granted = transaction
        .query_one(
            "UPDATE freight_kpi.job_lease
             SET holder_id = $2, generation = generation + 1, acquired_at = now(),
                 renewed_at = now(), expires_at = now() + $3::bigint * interval '1 millisecond'
             WHERE job_name = $1
             RETURNING generation",
            &[&job.as_str(), &holder_id, &timeout_ms],
        )
        .await
        .map_err(Error::database("take the lease"))?;
    transaction
        .commit()
        .await
        .map_err(Error::database("commit a lease acquisition"))?;

    Ok(Ok(Grant {
        generation: granted.get(0),
        previous_holder: holder,
    }))
}

async fn renew(
    pool: &Pool,
    job: JobName,
    holder_id: &str,
    generation: i64,
    lease_timeout: Duration,
) -> Result<bool> {
    let client = pool.get().await?;
    let rows = client
        .query_typed(
            "UPDATE freight_kpi.job_lease
             SET renewed_at = now(), expires_at = now() + $4 * interval '1 millisecond'
             WHERE job_name = $1 AND holder_id = $2 AND generation = $3
             RETURNING 1",
            &[
                (&job.as_str(), Type::TEXT),
                (&holder_id, Type::TEXT),
                (&generation, Type::INT8),
                (&duration_ms(lease_timeout), Type::INT8),
            ],
        )
        .await
        .map_err(Error::database("renew a lease"))?;
    Ok(!rows.is_empty())
}

async fn release(pool: &Pool, job: JobName, holder_id: &str, generation: i64) -> Result<()> {
    let client = pool.get().await?;
    client
        .query_typed(
            "UPDATE freight_kpi.job_lease SET holder_id = NULL, expires_at = NULL
             WHERE job_name = $1 AND holder_id = $2 AND generation = $3",
            &[
                (&job.as_str(), Type::TEXT),
                (&holder_id, Type::TEXT),
                (&generation, Type::INT8),
            ],
        )
        .await
        .map_err(Error::database("release a lease"))?;
    Ok(())
}

/// Renews the lease every `heartbeat` until it is lost: taken over by another holder,
/// or not renewed within its timeout because the database could not be reached.
async fn renew_until_lost(
    pool: Pool,
    job: JobName,
    holder_id: String,
    generation: i64,
    lease_timeout: Duration,
    heartbeat: Duration,
    lost: LostSignal,
) {
    let mut renewed_at = Instant::now();
    loop {
        sleep(heartbeat).await;
        match timeout(
            heartbeat,
            renew(&pool, job, &holder_id, generation, lease_timeout),
        )
        .await
        {
            Ok(Ok(true)) => renewed_at = Instant::now(),
            Ok(Ok(false)) => {
                lost.trigger(format!(
                    "the lease (fencing token {generation}) was taken over or released"
                ));
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(job.name = %job, error = %crate::error::error_chain(&error), "renewing the lease failed; retrying at the next heartbeat");
            }
            Err(_) => {
                tracing::warn!(job.name = %job, timeout_ms = heartbeat.as_millis() as u64, "renewing the lease timed out; retrying at the next heartbeat");
            }
        }
        if renewed_at.elapsed() >= lease_timeout {
            lost.trigger(format!(
                "the lease (fencing token {generation}) could not be renewed within its timeout of {lease_timeout:?}"
            ));
            return;
        }
    }
}

/// Checks, inside `transaction`, that `holder_id` still holds the lease of `job` with
/// fencing token `generation` and that it has not expired. The row stays share-locked
/// until the transaction ends, so no successor can take the lease over before the
/// transaction's writes commit or roll back.
///
/// # Errors
///
/// [`Error::Fenced`] when the lease expired or moved on; [`Error::Database`] otherwise.
pub async fn check_lease(
    transaction: &impl GenericClient,
    job: JobName,
    holder_id: &str,
    generation: i64,
) -> Result<()> {
    let row = transaction
        .query_opt(
            "SELECT holder_id, generation, expires_at > clock_timestamp() AS valid
             FROM freight_kpi.job_lease WHERE job_name = $1 FOR KEY SHARE",
            &[&job.as_str()],
        )
        .await
        .map_err(Error::database("check the fencing token"))?;

    let reason = match row {
        None => "the lease row does not exist".to_owned(),
        Some(row) => {
            let holder: Option<String> = row.get("holder_id");
            let current: i64 = row.get("generation");
            let valid: Option<bool> = row.get("valid");
            if current != generation {
                format!("the lease is at generation {current}")
            } else if holder.as_deref() != Some(holder_id) {
                "the lease was released".to_owned()
            } else if valid != Some(true) {
                "the lease expired".to_owned()
            } else {
                return Ok(());
            }
        }
    };
    Err(Error::Fenced {
        job: job.as_str(),
        token: generation,
        reason,
    })
}

/// Wraps an error of the first statement on `freight_kpi.job_lease` in a job run. A
/// missing table (SQLSTATE 42P01) means that `migrate` never ran or `uninstall` ran
/// since, so [`Error::SchemaMissing`] reports it with the fix.
pub(crate) fn lease_table_error(
    operation: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| {
        if source.code() == Some(&SqlState::UNDEFINED_TABLE) {
            Error::SchemaMissing("the table freight_kpi.job_lease does not exist".to_owned())
        } else {
            Error::Database { operation, source }
        }
    }
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
