//! Transaction-level advisory locks that order every write of a bucket's KPIs.
//!
//! Two recomputes of one bucket must not commit out of order, or an older result
//! would overwrite a newer one. Each writer of KPIs (an incremental batch, the full
//! pass) locks the buckets it writes before it reads `"Load"`, and holds the locks
//! until commit. Buckets share a fixed number of lock stripes so that a batch of
//! thousands of buckets, or a full pass over every bucket, takes a bounded number of
//! entries in the server's shared lock table.

use std::collections::BTreeSet;

use tokio_postgres::Transaction;

use super::Bucket;
use crate::error::{Error, Result};

/// Number of lock stripes. A full pass takes all of them, which stays well below the
/// server's default lock table (64 per connection slot).
pub const BUCKET_LOCK_STRIPES: i32 = 128;

/// Second advisory-lock key of stripe 0; stripes use consecutive keys after it, in
/// the [`crate::ADVISORY_LOCK_NAMESPACE`] namespace.
const FIRST_STRIPE_KEY: i32 = 1_000;

fn stripe_of(bucket: &Bucket) -> i32 {
    let day = i64::from(bucket.day.days_since_2000());
    let mixed = i64::from(bucket.venture_id)
        .wrapping_mul(1_000_003)
        .wrapping_add(day);
    mixed.rem_euclid(i64::from(BUCKET_LOCK_STRIPES)) as i32
}

/// Locks the stripes of `buckets` until the transaction ends, waiting for holders.
///
/// Stripes are locked in ascending order, as [`lock_all_buckets`] does, so lockers
/// cannot deadlock with each other.
///
/// # Cancel safety
///
/// The locks belong to the transaction: dropping the future or the transaction
/// releases them when the transaction ends.
///
/// # Errors
///
/// [`Error::Database`] when the statement fails.
pub async fn lock_buckets(transaction: &Transaction<'_>, buckets: &[Bucket]) -> Result<()> {
    let stripes: BTreeSet<i32> = buckets.iter().map(stripe_of).collect();
    let keys: Vec<i32> = stripes
        .into_iter()
        .map(|stripe| FIRST_STRIPE_KEY + stripe)
        .collect();
    lock_stripe_keys(transaction, &keys).await
}

/// Locks every stripe until the transaction ends, for a pass over all buckets.
///
/// # Errors
///
/// [`Error::Database`] when the statement fails.
pub async fn lock_all_buckets(transaction: &Transaction<'_>) -> Result<()> {
    let keys: Vec<i32> = (0..BUCKET_LOCK_STRIPES)
        .map(|stripe| FIRST_STRIPE_KEY + stripe)
        .collect();
    lock_stripe_keys(transaction, &keys).await
}

async fn lock_stripe_keys(transaction: &Transaction<'_>, keys: &[i32]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }

    // unnest returns the elements in array order, so the locks are taken ascending.
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1, key) FROM unnest($2::integer[]) AS key",
            &[&crate::ADVISORY_LOCK_NAMESPACE, &keys],
        )
        .await
        .map_err(Error::database("lock buckets"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kpi::BucketDay;
    use chrono::NaiveDate;

    #[test]
    fn stripes_stay_in_range() {
        for venture_id in [i32::MIN, -1, 0, 1, 7, i32::MAX] {
            for day in [
                NaiveDate::MIN,
                NaiveDate::from_ymd_opt(2026, 12, 4).unwrap(),
                NaiveDate::MAX,
            ] {
                let stripe = stripe_of(&Bucket {
                    venture_id,
                    day: BucketDay::from_date(day),
                });
                assert!(
                    (0..BUCKET_LOCK_STRIPES).contains(&stripe),
                    "{venture_id} {day} -> {stripe}"
                );
            }
        }
    }

    #[test]
    fn neighbouring_days_use_different_stripes() {
        let date = NaiveDate::from_ymd_opt(2026, 12, 4).unwrap();
        let first = stripe_of(&Bucket {
            venture_id: 3,
            day: BucketDay::from_date(date),
        });
        let next = stripe_of(&Bucket {
            venture_id: 3,
            day: BucketDay::from_date(date.succ_opt().unwrap()),
        });
        assert_ne!(first, next);
    }
}
