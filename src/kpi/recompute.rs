//! Exact recompute of a set of buckets from `"Load"`, in one statement.

use chrono::NaiveDate;
use tokio_postgres::Transaction;

use super::definitions::{
    derived_kpis, load_aggregates, overflow_report, owned_columns, upsert_owned_columns,
};
use super::Bucket;
use crate::error::{Error, Result};

/// Recomputes the buckets given as two parallel arrays ($1 venture ids, $2 days).
///
/// The join turns each bucket into one range scan of `"Load"` on ("ventureId",
/// "createdAt"). A bucket without loads gets zeros if it has a row and no row
/// otherwise.
const RECOMPUTE_BUCKETS: &str = concat!(
    r#"
    WITH keys AS (
        SELECT DISTINCT venture_id, day
        FROM unnest($1::integer[], $2::date[]) AS key(venture_id, day)
    ),
    totals AS (
        SELECT k.venture_id, k.day,"#,
    load_aggregates!(),
    r#"
        FROM keys k
        LEFT JOIN "Load" l
               ON l."ventureId" = k.venture_id
              AND l."createdAt" >= k.day::timestamp AT TIME ZONE 'UTC'
              AND l."createdAt" < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
        GROUP BY k.venture_id, k.day
    ),"#,
    derived_kpis!(),
    r#",
    written AS (
        INSERT INTO "FreightKpiDaily" AS f "#,
    owned_columns!(),
    r#"
        SELECT c.venture_id, c.day, c.loads_inbound, c.loads_quoted, c.loads_covered, c.loads_lost,
               c.total_revenue, c.total_cost, c.total_profit, c.avg_margin_pct, now()
        FROM checked c
        WHERE c.fits
          AND (c.loads_inbound > 0
               OR EXISTS (SELECT 1 FROM "FreightKpiDaily" e
                          WHERE e."ventureId" = c.venture_id AND e.date = c.day))
        ORDER BY c.venture_id, c.day
        "#,
    upsert_owned_columns!(),
    r#"
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM checked) AS recomputed,
           (SELECT count(*) FROM written) AS written,
           "#,
    overflow_report!(),
    " AS overflowed"
);

/// Figures of one recompute.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecomputeOutcome {
    /// Buckets computed from `"Load"`.
    pub recomputed: u64,
    /// Rows inserted or changed in `"FreightKpiDaily"`; a bucket already correct is
    /// not written.
    pub written: u64,
    /// Buckets left as they were because a value does not fit its column.
    pub overflowed: Vec<BucketOverflow>,
}

/// A bucket whose KPIs do not fit `"FreightKpiDaily"`, with the values that did not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct BucketOverflow {
    pub venture_id: i32,
    pub day: NaiveDate,
    pub total_revenue: String,
    pub total_cost: String,
    pub avg_margin_pct: Option<String>,
}

impl BucketOverflow {
    /// Returns the bucket.
    pub fn bucket(&self) -> Bucket {
        Bucket {
            venture_id: self.venture_id,
            day: self.day,
        }
    }

    /// Describes the failure for logs and the failed-bucket table.
    pub fn describe(&self) -> String {
        format!(
            "KPI values overflow their columns: totalRevenue {}, totalCost {}, avgMarginPct {} \
             (money columns hold less than 1e12, the margin less than 1e5 in absolute value)",
            self.total_revenue,
            self.total_cost,
            self.avg_margin_pct.as_deref().unwrap_or("null"),
        )
    }
}

/// Recomputes `buckets` exactly from `"Load"` and upserts the owned columns.
///
/// The caller must hold the buckets' locks ([`super::lock_buckets`]) taken in an
/// earlier statement of `transaction`: at READ COMMITTED each statement reads a new
/// snapshot, so this one then sees every change committed by a recompute that held
/// the same locks before, and never writes an older result over a newer one.
///
/// # Errors
///
/// [`Error::Database`] when the statement fails; a bucket whose values overflow is
/// reported in [`RecomputeOutcome::overflowed`] instead of failing the rest.
pub async fn recompute_buckets(
    transaction: &Transaction<'_>,
    buckets: &[Bucket],
) -> Result<RecomputeOutcome> {
    if buckets.is_empty() {
        return Ok(RecomputeOutcome::default());
    }

    let venture_ids: Vec<i32> = buckets.iter().map(|bucket| bucket.venture_id).collect();
    let days: Vec<NaiveDate> = buckets.iter().map(|bucket| bucket.day).collect();
    let row = transaction
        .query_one(RECOMPUTE_BUCKETS, &[&venture_ids, &days])
        .await
        .map_err(Error::database("recompute buckets"))?;

    let recomputed: i64 = row.get("recomputed");
    let written: i64 = row.get("written");
    let overflowed: serde_json::Value = row.get("overflowed");
    let overflowed = serde_json::from_value(overflowed)
        .expect("the overflow report is built by the statement above with these fields");
    Ok(RecomputeOutcome {
        recomputed: recomputed as u64,
        written: written as u64,
        overflowed,
    })
}
