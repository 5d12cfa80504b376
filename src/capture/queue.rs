//! Statements on the change queue and the failed-bucket table.

use std::collections::BTreeSet;

use tokio_postgres::{GenericClient, Transaction};

use crate::error::{Error, Result};
use crate::kpi::{Bucket, BucketDay, BucketOverflow};

/// A bucket whose recompute failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BucketFailure {
    pub bucket: Bucket,
    pub reason: String,
}

impl From<&BucketOverflow> for BucketFailure {
    fn from(overflow: &BucketOverflow) -> Self {
        Self {
            bucket: overflow.bucket(),
            reason: overflow.describe(),
        }
    }
}

/// Claims the oldest $1 queue rows not locked by another instance, together with every
/// other unlocked row of the same buckets, deletes them and returns them grouped by
/// bucket, with the age in milliseconds of each change. The rows come back if the
/// transaction rolls back, so a failed batch loses nothing.
///
/// Taking the whole bucket matters when the queue is deep, because the same hot buckets
/// fill every window of oldest rows. Claiming by window alone recomputed them once per
/// window: 407,929 bucket recomputes for 39,100 distinct buckets in a catch-up of 1
/// million changes. The hash join reads the queue once per batch, which costs little
/// next to the recompute it saves, and a shallow queue is only a few rows to read.
/// SKIP LOCKED on the second set too keeps two instances from waiting on each
/// other's claimed rows. The delete finds its rows by `ctid`, which stays valid while
/// this transaction holds their row locks. Joining on `id` again took 40% longer on a
/// queue of a million rows. The rows of `oldest` are all in `same_bucket` but for the
/// TRUNCATE markers, which have no bucket. `window_rows` shows the caller whether the
/// window was full.
const CLAIM_CHANGES: &str = r#"
    WITH oldest AS (
        SELECT ctid, venture_id, day
        FROM freight_kpi.change_queue
        ORDER BY id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ),
    picked AS (
        SELECT DISTINCT venture_id, day FROM oldest WHERE venture_id IS NOT NULL
    ),
    same_bucket AS (
        SELECT q.ctid
        FROM freight_kpi.change_queue q
        JOIN picked p ON p.venture_id = q.venture_id AND p.day = q.day
        FOR UPDATE OF q SKIP LOCKED
    ),
    claimed AS (
        DELETE FROM freight_kpi.change_queue
        WHERE ctid = ANY (ARRAY(SELECT ctid FROM same_bucket
                                UNION ALL
                                SELECT ctid FROM oldest WHERE venture_id IS NULL))
        RETURNING venture_id, day, enqueued_at
    )
    SELECT venture_id, day,
           array_agg(1000 * extract(epoch FROM clock_timestamp() - enqueued_at)::float8) AS ages_ms,
           (SELECT count(*) FROM oldest) AS window_rows
    FROM claimed
    GROUP BY venture_id, day
"#;

/// Reads up to $1 failed buckets that are due for a retry. It takes no row lock: rows
/// of this table are locked only while settling, after the bucket locks, so two
/// instances cannot wait on each other here. Two instances may retry the same bucket,
/// which the bucket locks make harmless.
const SELECT_DUE_FAILURES: &str = r#"
    SELECT venture_id, day
    FROM freight_kpi.failed_bucket
    WHERE next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $1
"#;

const CLEAR_FAILURES: &str = r#"
    DELETE FROM freight_kpi.failed_bucket f
    USING unnest($1::integer[], $2::date[]) AS key(venture_id, day)
    WHERE f.venture_id = key.venture_id AND f.day = key.day
"#;

/// Records failed buckets. The retry delay doubles with each attempt, from 1 second up
/// to 1 hour, so a bucket that cannot be written costs little while it waits for a
/// fix or a reconcile.
const RECORD_FAILURES: &str = r#"
    INSERT INTO freight_kpi.failed_bucket AS f (venture_id, day, attempts, last_error, next_attempt_at)
    SELECT venture_id, day, 1, last_error, now() + interval '1 second'
    FROM unnest($1::integer[], $2::date[], $3::text[]) AS failure(venture_id, day, last_error)
    ON CONFLICT (venture_id, day) DO UPDATE SET
        attempts = f.attempts + 1,
        last_error = EXCLUDED.last_error,
        next_attempt_at = now() + least(interval '1 second' * power(2, f.attempts), interval '1 hour')
"#;

/// Changes claimed from the queue by one batch.
#[derive(Debug, Default)]
pub(crate) struct ClaimedChanges {
    /// Distinct buckets to recompute.
    pub buckets: Vec<Bucket>,
    /// A TRUNCATE was among the changes, so every bucket must be recomputed.
    pub every_bucket: bool,
    /// Age of each claimed change when it was claimed, in milliseconds.
    pub ages_ms: Vec<f64>,
    /// The window of oldest rows was full, so more changes are probably waiting.
    pub window_full: bool,
}

impl ClaimedChanges {
    pub fn change_count(&self) -> usize {
        self.ages_ms.len()
    }
}

pub(crate) async fn claim_changes(
    transaction: &Transaction<'_>,
    limit: i64,
) -> Result<ClaimedChanges> {
    let rows = transaction
        .query(CLAIM_CHANGES, &[&limit])
        .await
        .map_err(Error::database("claim changes from the queue"))?;

    let mut claimed = ClaimedChanges::default();
    for row in rows {
        let window_rows: i64 = row.get("window_rows");
        claimed.window_full = window_rows >= limit;
        let venture_id: Option<i32> = row.get("venture_id");
        let day: Option<BucketDay> = row.get("day");
        let ages_ms: Vec<f64> = row.get("ages_ms");
        claimed.ages_ms.extend(ages_ms);
        match (venture_id, day) {
            (Some(venture_id), Some(day)) => claimed.buckets.push(Bucket { venture_id, day }),
            _ => claimed.every_bucket = true,
        }
    }
    Ok(claimed)
}

pub(crate) async fn select_due_failures(
    transaction: &Transaction<'_>,
    limit: i64,
) -> Result<Vec<Bucket>> {
    let rows = transaction
        .query(SELECT_DUE_FAILURES, &[&limit])
        .await
        .map_err(Error::database("read failed buckets due for a retry"))?;

    Ok(rows
        .iter()
        .map(|row| Bucket {
            venture_id: row.get("venture_id"),
            day: row.get("day"),
        })
        .collect())
}

/// Forgets earlier failures of the buckets that were just written successfully and
/// records the new ones.
pub(crate) async fn settle_failures(
    transaction: &Transaction<'_>,
    succeeded: &BTreeSet<Bucket>,
    failed: &[BucketFailure],
) -> Result<()> {
    if !succeeded.is_empty() {
        let (venture_ids, days) = split_keys(succeeded.iter());
        transaction
            .execute(CLEAR_FAILURES, &[&venture_ids, &days])
            .await
            .map_err(Error::database("clear failed buckets"))?;
    }

    if !failed.is_empty() {
        let (venture_ids, days) = split_keys(failed.iter().map(|failure| &failure.bucket));
        let errors: Vec<&str> = failed
            .iter()
            .map(|failure| failure.reason.as_str())
            .collect();
        transaction
            .execute(RECORD_FAILURES, &[&venture_ids, &days, &errors])
            .await
            .map_err(Error::database("record failed buckets"))?;
    }
    Ok(())
}

fn split_keys<'a>(buckets: impl Iterator<Item = &'a Bucket>) -> (Vec<i32>, Vec<BucketDay>) {
    buckets
        .map(|bucket| (bucket.venture_id, bucket.day))
        .unzip()
}

/// The queue's state, for `status`, readiness and alerts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueueHealth {
    /// Changes waiting in the queue.
    pub depth: i64,
    /// Age of the oldest waiting change in seconds, the freshness lag; `None` when the
    /// queue is empty.
    pub oldest_age_seconds: Option<f64>,
    /// Buckets whose recompute failed and waits for a retry.
    pub failed_buckets: i64,
    /// Listeners whose heartbeat is recent.
    pub listeners: i64,
}

/// Reads the queue's depth and age, the failed buckets and the live listeners.
///
/// # Errors
///
/// [`Error::SchemaMissing`] when the service's tables are absent, [`Error::Database`]
/// for other failures.
pub async fn queue_health(client: &impl GenericClient) -> Result<QueueHealth> {
    let row = client
        .query_one(
            r#"
            SELECT (SELECT count(*) FROM freight_kpi.change_queue) AS depth,
                   (SELECT extract(epoch FROM clock_timestamp() - min(enqueued_at))::float8
                    FROM freight_kpi.change_queue) AS oldest_age_seconds,
                   (SELECT count(*) FROM freight_kpi.failed_bucket) AS failed_buckets,
                   (SELECT count(*) FROM freight_kpi.listener
                    WHERE heartbeat_at > now() - interval '2 minutes') AS listeners
            "#,
            &[],
        )
        .await
        .map_err(|error| match error.code() {
            Some(code) if *code == tokio_postgres::error::SqlState::UNDEFINED_TABLE => {
                Error::SchemaMissing("the table freight_kpi.change_queue does not exist".to_owned())
            }
            _ => Error::Database {
                operation: "read the queue health",
                source: error,
            },
        })?;

    Ok(QueueHealth {
        depth: row.get("depth"),
        oldest_age_seconds: row.get("oldest_age_seconds"),
        failed_buckets: row.get("failed_buckets"),
        listeners: row.get("listeners"),
    })
}
