//! Draining the change queue: one transaction per batch claims changes, locks their
//! buckets, recomputes them and deletes the claimed changes, so that a failure at any
//! step leaves the changes in the queue for a retry.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

use super::queue::{claim_changes, select_due_failures, settle_failures, BucketFailure};
use crate::db::{begin_bounded, Pool};
use crate::error::{bounded, error_chain, Error, Result};
use crate::kpi::{self, Bucket, BucketRange};

/// Sizes and time limits of batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// Oldest queue rows a batch claims, with every other queued change of their
    /// buckets (default 5,000). A drain doubles it while batches find it full.
    pub batch_size: i64,
    /// Limit on each statement of a batch (default 30 s), except a full pass: after a
    /// TRUNCATE, or for a batch whose buckets are a large share of the table. The server cancels a statement that runs longer, so it cannot keep
    /// holding bucket locks, and the client gives up [`CLIENT_GRACE`] later: a
    /// connection that goes silent mid-batch then fails the batch instead of stalling
    /// the service, and is discarded.
    pub statement_timeout: Duration,
    /// Server-side limit on waiting for a lock (default 10 s), such as the bucket
    /// locks that a running reconcile holds for its whole pass. The batch then fails
    /// with lock_not_available and is retried, and its connection is kept. The
    /// client allows this plus `statement_timeout` for such a wait.
    pub lock_wait_timeout: Duration,
    /// Limit on a batch's full pass, which holds every bucket lock (default 30 min).
    pub long_statement_timeout: Duration,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            batch_size: 5_000,
            statement_timeout: Duration::from_secs(30),
            lock_wait_timeout: Duration::from_secs(10),
            long_statement_timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// Time the client waits beyond the server's own limits before it takes a connection
/// for silent.
const CLIENT_GRACE: Duration = Duration::from_secs(5);

/// While batches keep finding their window of oldest rows full, each next window is
/// twice as large, up to this many times `batch_size`. A deep queue, after an outage
/// or a bulk update, then dedupes across more changes per batch, and a batch whose
/// dirty buckets are a large share of the table becomes one full pass.
const MAX_WINDOW_GROWTH: i64 = 16;

/// Buckets recomputed by key in one statement, so that a batch of a grown window is
/// several statements, each well within the statement timeout.
const RECOMPUTE_CHUNK: usize = 5_000;

/// A batch whose dirty buckets are at least this share of the stored buckets, or count
/// at least this share of the stored loads, runs one full pass over their days instead
/// of recomputing them by key. The bench's crossover, with buckets drawn uniformly,
/// measured recompute by key at 10 million loads costing as much as a full pass at
/// 36% to 43% of the buckets over four runs, so the lower end is taken.
const FULL_PASS_SHARE: f64 = 0.36;

/// Below this many dirty buckets a batch never considers the full pass, so the usual
/// small batch does not pay for counting the stored buckets.
const FULL_PASS_MIN_BUCKETS: usize = 1_000;

/// Figures of one committed batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchReport {
    /// Whether the batch's window of oldest queue rows was full, so more changes are
    /// probably waiting.
    pub window_full: bool,
    /// Whether the batch ran a full pass instead of recomputing its buckets by key:
    /// after a TRUNCATE, or because they were a large share of the table.
    pub full_pass: bool,
    /// Queue rows consumed.
    pub changes: u64,
    /// Buckets recomputed.
    pub buckets: u64,
    /// Rows of `"FreightKpiDaily"` inserted or changed.
    pub written: u64,
    /// Whether the batch recomputed every bucket, after a TRUNCATE.
    pub every_bucket: bool,
    /// Buckets that could not be written; they wait in `freight_kpi.failed_bucket`.
    pub failed: Vec<BucketFailure>,
    /// For each consumed change, the time from its enqueueing to this batch's commit,
    /// in milliseconds.
    pub latencies_ms: Vec<f64>,
}

/// Processes one batch: the oldest unclaimed changes and the failed buckets due for a
/// retry. Returns `None` when there was nothing to do.
///
/// # Cancel safety
///
/// Dropping the future mid-batch drops the transaction, which rolls back and leaves
/// the changes queued. Callers that want the batch to finish should not cancel it.
///
/// # Errors
///
/// [`Error`] when the batch could not be committed; nothing was consumed then.
#[tracing::instrument(name = "batch", skip_all, fields(batch.changes, batch.buckets))]
pub async fn process_batch(pool: &Pool, settings: &DrainSettings) -> Result<Option<BatchReport>> {
    process_window(pool, settings, settings.batch_size).await
}

/// Processes one batch whose window of oldest queue rows is `window` rows.
async fn process_window(
    pool: &Pool,
    settings: &DrainSettings,
    window: i64,
) -> Result<Option<BatchReport>> {
    let mut client = pool.get().await?;

    let outcome = run_batch(&mut client, settings, window).await;

    if outcome.as_ref().is_err_and(Error::is_connection_lost) {
        // A timed-out connection may be silent rather than closed, and the pool would
        // hand it out again. Taking it out of the pool closes it instead.
        drop(deadpool_postgres::Object::take(client));
    }
    outcome
}

async fn run_batch(
    client: &mut tokio_postgres::Client,
    settings: &DrainSettings,
    window: i64,
) -> Result<Option<BatchReport>> {
    // The server's limits end a slow statement or lock wait with an error. The client
    // waits a little longer, so only a silent connection reaches the client's limit.
    let short = settings.statement_timeout + CLIENT_GRACE;
    let long = settings.long_statement_timeout + CLIENT_GRACE;
    let lock_wait = settings.lock_wait_timeout.min(settings.statement_timeout) + CLIENT_GRACE;
    let mut transaction = bounded(
        short,
        "begin a batch",
        begin_bounded(
            client,
            Some(settings.lock_wait_timeout),
            Some(settings.statement_timeout),
        ),
    )
    .await?;

    let claimed = bounded(
        short,
        "claim changes from the queue",
        claim_changes(&transaction, window),
    )
    .await?;
    let retries = bounded(
        short,
        "read failed buckets due for a retry",
        select_due_failures(&transaction, settings.batch_size),
    )
    .await?;
    if claimed.change_count() == 0 && retries.is_empty() {
        return Ok(None);
    }
    let claimed_at = Instant::now();

    let buckets: BTreeSet<Bucket> = claimed.buckets.iter().chain(&retries).copied().collect();
    let span = tracing::Span::current();
    span.record("batch.changes", claimed.change_count());
    span.record("batch.buckets", buckets.len());

    let by_pass = if claimed.every_bucket {
        Some(recompute_every_bucket(&transaction, settings, long).await?)
    } else {
        let pass_range = bounded(
            short,
            "compare the dirty buckets with the stored ones",
            full_pass_range(&transaction, &buckets),
        )
        .await?;
        match pass_range {
            Some(range) => {
                recompute_range(&mut transaction, range, &buckets, settings, long).await?
            }
            None => None,
        }
    };
    let full_pass = by_pass.is_some();
    let (recomputed, written, failed) = match by_pass {
        Some(outcome) => outcome,
        None => recompute_isolated(&mut transaction, &buckets, short, lock_wait).await?,
    };

    let failed_keys: BTreeSet<Bucket> = failed.iter().map(|failure| failure.bucket).collect();
    let succeeded: BTreeSet<Bucket> = buckets.difference(&failed_keys).copied().collect();
    bounded(
        short,
        "settle failed buckets",
        settle_failures(&transaction, &succeeded, &failed),
    )
    .await?;

    bounded(short, "commit a batch", async {
        transaction
            .commit()
            .await
            .map_err(Error::database("commit a batch"))
    })
    .await?;

    let since_claim_ms = claimed_at.elapsed().as_secs_f64() * 1000.0;
    let latencies_ms = claimed
        .ages_ms
        .iter()
        .map(|age| age + since_claim_ms)
        .collect();
    for failure in &failed {
        tracing::error!(
            bucket.venture_id = failure.bucket.venture_id,
            bucket.day = %failure.bucket.day,
            error = %failure.reason,
            "bucket recompute failed; it will be retried"
        );
    }
    tracing::debug!(recomputed, written, "batch committed");

    Ok(Some(BatchReport {
        window_full: claimed.window_full,
        full_pass,
        changes: claimed.change_count() as u64,
        buckets: recomputed,
        written,
        every_bucket: claimed.every_bucket,
        failed,
        latencies_ms,
    }))
}

/// Processes batches until the queue has nothing unclaimed, or `stop` returns true
/// between two batches. Returns the reports of the committed batches.
///
/// # Errors
///
/// The first batch error; batches committed before it stay committed.
pub async fn drain_queue(
    pool: &Pool,
    settings: &DrainSettings,
    mut on_batch: impl FnMut(&BatchReport),
    stop: impl Fn() -> bool,
) -> Result<()> {
    let mut window = settings.batch_size;
    while !stop() {
        let report = match process_window(pool, settings, window).await {
            Ok(Some(report)) => report,
            Ok(None) => return Ok(()),
            Err(error) if is_lock_busy(&error) => {
                // A reconcile holds the bucket locks for its whole pass. The server
                // waited lock_wait_timeout already, so trying again at once is paced.
                tracing::info!(error = %error_chain(&error), "bucket locks busy, probably a reconcile; retrying the batch");
                continue;
            }
            Err(error) => return Err(error),
        };
        on_batch(&report);
        if !report.window_full && !report.every_bucket {
            // A short batch took everything unclaimed; one more query would only find
            // changes committed since, which the next notification announces.
            return Ok(());
        }
        if report.window_full {
            window = window
                .saturating_mul(2)
                .min(settings.batch_size.saturating_mul(MAX_WINDOW_GROWTH));
        }
    }
    Ok(())
}

/// After a TRUNCATE: one full pass over every bucket, under every bucket lock.
async fn recompute_every_bucket(
    transaction: &Transaction<'_>,
    settings: &DrainSettings,
    timeout: Duration,
) -> Result<(u64, u64, Vec<BucketFailure>)> {
    let summary = bounded(timeout, "recompute every bucket", async {
        set_statement_timeout(transaction, settings.long_statement_timeout).await?;
        kpi::lock_all_buckets(transaction).await?;
        let summary = kpi::full_pass(transaction, BucketRange::default(), false).await?;
        set_statement_timeout(transaction, settings.statement_timeout).await?;
        Ok(summary)
    })
    .await?;
    let failed = summary.overflowed.iter().map(BucketFailure::from).collect();
    Ok((summary.scanned, summary.repaired, failed))
}

/// Sets the server's limit on each later statement of `transaction`. SET LOCAL lasts
/// until the transaction ends, past a released savepoint too, so a batch that allows
/// a full pass its long limit sets the short one back after it.
async fn set_statement_timeout(transaction: &Transaction<'_>, limit: Duration) -> Result<()> {
    transaction
        .batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            limit.as_millis()
        ))
        .await
        .map_err(Error::database("set the statement timeout"))
}

/// Decides whether a batch's dirty buckets are better served by one full pass over
/// their days, and returns that range if so. A range pass reads all of `"Load"` (no
/// index leads with `"createdAt"`), while recompute by key reads only the dirty
/// buckets' loads, one heap fetch each. The measure is therefore the larger of two
/// shares: of the stored buckets, and of the loads they count, since a backlog of
/// busy buckets can hold most of the loads in a minority of the buckets. Days outside
/// the calendar (infinity) keep the batch on the by-key path.
async fn full_pass_range(
    transaction: &Transaction<'_>,
    buckets: &BTreeSet<Bucket>,
) -> Result<Option<BucketRange>> {
    if buckets.len() < FULL_PASS_MIN_BUCKETS {
        return Ok(None);
    }

    let mut days = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        match bucket.day.to_date() {
            Some(day) => days.push(day),
            None => return Ok(None),
        }
    }
    let (Some(&from), Some(&to)) = (days.iter().min(), days.iter().max()) else {
        return Ok(None);
    };

    let venture_ids: Vec<i32> = buckets.iter().map(|bucket| bucket.venture_id).collect();
    let row = transaction
        .query_one(STORED_SHARE, &[&venture_ids, &days])
        .await
        .map_err(Error::database(
            "compare the dirty buckets with the stored ones",
        ))?;
    let stored_buckets: i64 = row.get("stored_buckets");
    let stored_loads: i64 = row.get("stored_loads");
    let dirty_loads: i64 = row.get("dirty_loads");
    let bucket_share = buckets.len() as f64 / stored_buckets.max(1) as f64;
    let load_share = dirty_loads as f64 / stored_loads.max(1) as f64;
    if bucket_share.max(load_share) < FULL_PASS_SHARE {
        return Ok(None);
    }

    tracing::info!(
        buckets = buckets.len(),
        stored_buckets,
        dirty_loads,
        stored_loads,
        from = %from,
        to = %to,
        "dirty buckets are a large share of the table; running one full pass over their days"
    );
    Ok(Some(BucketRange {
        from: Some(from),
        to: Some(to),
        venture_id: None,
    }))
}

/// Counts the stored buckets and their loads, and the loads of the buckets given as
/// two parallel arrays ($1 venture ids, $2 days), from the stored `"loadsInbound"`.
/// A bucket without a stored row counts no loads, so the bucket share still applies
/// to a table that the service has not filled yet.
const STORED_SHARE: &str = r#"
    SELECT (SELECT count(*) FROM "FreightKpiDaily") AS stored_buckets,
           (SELECT coalesce(sum("loadsInbound"), 0)::bigint FROM "FreightKpiDaily") AS stored_loads,
           (SELECT coalesce(sum(f."loadsInbound"), 0)::bigint
            FROM unnest($1::integer[], $2::date[]) AS key(venture_id, day)
            JOIN "FreightKpiDaily" f ON f."ventureId" = key.venture_id AND f.date = key.day) AS dirty_loads
"#;

/// Runs one full pass over `range` under every bucket lock, for the batch's `buckets`.
/// Returns `None`, with the pass rolled back, when the server rejects a value, so that
/// the caller can isolate the offending buckets by key.
///
/// Only overflows of `buckets` are returned as failures. Another bucket of the range
/// that overflows was not claimed by this batch: it keeps its own retry schedule in
/// `freight_kpi.failed_bucket`, and a reconcile reports it.
async fn recompute_range(
    transaction: &mut Transaction<'_>,
    range: BucketRange,
    buckets: &BTreeSet<Bucket>,
    settings: &DrainSettings,
    timeout: Duration,
) -> Result<Option<(u64, u64, Vec<BucketFailure>)>> {
    let savepoint = transaction
        .savepoint("recompute_range")
        .await
        .map_err(Error::database("create a savepoint"))?;
    let outcome = bounded(timeout, "recompute a range of days", async {
        set_statement_timeout(&savepoint, settings.long_statement_timeout).await?;
        kpi::lock_all_buckets(&savepoint).await?;
        kpi::full_pass(&savepoint, range, false).await
    })
    .await;

    match outcome {
        Ok(summary) => {
            savepoint
                .commit()
                .await
                .map_err(Error::database("release a savepoint"))?;
            set_statement_timeout(transaction, settings.statement_timeout).await?;
            let failed = summary
                .overflowed
                .iter()
                .filter(|overflow| buckets.contains(&overflow.bucket()))
                .map(BucketFailure::from)
                .collect();
            Ok(Some((summary.scanned, summary.repaired, failed)))
        }
        Err(error) if is_data_exception(&error) => {
            tracing::warn!(error = %error_chain(&error), "full pass over the dirty days rejected; recomputing the buckets by key");
            savepoint
                .rollback()
                .await
                .map_err(Error::database("roll back a savepoint"))?;
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// Recomputes `buckets` by key, in statements of up to [`RECOMPUTE_CHUNK`] buckets. If
/// the server rejects a statement for a bad value, each bucket of it is retried alone
/// so that only the offending ones fail. The overflow check in the statement prevents
/// such data exceptions on the contract's columns, but a schema with narrower columns
/// can still raise them.
async fn recompute_isolated(
    transaction: &mut Transaction<'_>,
    buckets: &BTreeSet<Bucket>,
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<(u64, u64, Vec<BucketFailure>)> {
    let keys: Vec<Bucket> = buckets.iter().copied().collect();
    bounded(
        lock_timeout,
        "wait for bucket locks",
        kpi::lock_buckets(&*transaction, &keys),
    )
    .await?;

    let mut totals = (0, 0, Vec::new());
    for chunk in keys.chunks(RECOMPUTE_CHUNK) {
        let (recomputed, written, failed) = recompute_chunk(transaction, chunk, timeout).await?;
        totals.0 += recomputed;
        totals.1 += written;
        totals.2.extend(failed);
    }
    Ok(totals)
}

async fn recompute_chunk(
    transaction: &mut Transaction<'_>,
    keys: &[Bucket],
    timeout: Duration,
) -> Result<(u64, u64, Vec<BucketFailure>)> {
    let mut savepoint = transaction
        .savepoint("recompute_batch")
        .await
        .map_err(Error::database("create a savepoint"))?;
    match bounded(
        timeout,
        "recompute buckets",
        kpi::recompute_buckets(&savepoint, keys),
    )
    .await
    {
        Ok(outcome) => {
            savepoint
                .commit()
                .await
                .map_err(Error::database("release a savepoint"))?;
            let failed = outcome.overflowed.iter().map(BucketFailure::from).collect();
            return Ok((outcome.recomputed, outcome.written, failed));
        }
        Err(error) if is_data_exception(&error) => {
            tracing::warn!(error = %error_chain(&error), buckets = keys.len(), "batch recompute rejected; retrying its buckets one by one");
            savepoint
                .rollback()
                .await
                .map_err(Error::database("roll back a savepoint"))?;
        }
        Err(error) => return Err(error),
    }

    let mut recomputed = 0;
    let mut written = 0;
    let mut failed = Vec::new();
    for &bucket in keys {
        savepoint = transaction
            .savepoint("recompute_bucket")
            .await
            .map_err(Error::database("create a savepoint"))?;
        match bounded(
            timeout,
            "recompute a bucket",
            kpi::recompute_buckets(&savepoint, &[bucket]),
        )
        .await
        {
            Ok(outcome) => {
                savepoint
                    .commit()
                    .await
                    .map_err(Error::database("release a savepoint"))?;
                recomputed += outcome.recomputed;
                written += outcome.written;
                failed.extend(outcome.overflowed.iter().map(BucketFailure::from));
            }
            Err(error) if is_data_exception(&error) => {
                savepoint
                    .rollback()
                    .await
                    .map_err(Error::database("roll back a savepoint"))?;
                failed.push(BucketFailure {
                    bucket,
                    reason: error_chain(&error),
                });
            }
            Err(error) => return Err(error),
        }
    }
    Ok((recomputed, written, failed))
}

/// Tells whether the server gave up waiting for a lock (SQLSTATE 55P03).
fn is_lock_busy(error: &Error) -> bool {
    matches!(error, Error::Database { source, .. } if source.code() == Some(&SqlState::LOCK_NOT_AVAILABLE))
}

/// Tells whether the server rejected a value (SQLSTATE class 22, data exception).
fn is_data_exception(error: &Error) -> bool {
    let Error::Database { source, .. } = error else {
        return false;
    };
    source
        .code()
        .is_some_and(|code| code.code().starts_with("22") || *code == SqlState::CHECK_VIOLATION)
}
