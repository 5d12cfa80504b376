//! Exact recompute of a set of buckets from `"Load"`, in one statement.

use tokio_postgres::{Row, Transaction};

use super::definitions::{
    derived_kpis, load_aggregates, overflow_report, owned_columns, upsert_owned_columns,
};
use super::{Bucket, BucketDay};
use crate::error::{Error, Result};

/// Recomputes the buckets given as two parallel arrays ($1 venture ids, $2 days).
///
/// The LATERAL subquery turns each bucket into one range scan of `"Load"` on
/// ("ventureId", "createdAt"). A plain join let the planner, which cannot estimate
/// the per-bucket day range, pick a hash join over a sequential scan of the whole
/// table once a batch held more than about a hundred buckets. The aggregate without
/// GROUP BY returns one row per bucket, zeros when it has no loads: such a bucket
/// gets zeros if it has a row and no row otherwise.
///
/// Both day bounds are inclusive so that both stay index bounds, infinite days
/// included, and the `utc_day` equality drops a load created exactly at the next
/// midnight. With an `OR` in the upper bound the scan ran on to the venture's last
/// load: 171 ms instead of 1.4 ms for a 60-day-old bucket of the largest venture of
/// a 10 million-load table, which stalled every batch past its timeout.
const RECOMPUTE_BUCKETS: &str = concat!(
    r#"
    WITH keys AS (
        SELECT DISTINCT venture_id, day
        FROM unnest($1::integer[], $2::date[]) AS key(venture_id, day)
    ),
    totals AS (
        SELECT k.venture_id, k.day, bucket_totals.*
        FROM keys k
        CROSS JOIN LATERAL (
            SELECT"#,
    load_aggregates!(),
    r#"
            FROM "Load" l
            WHERE l."ventureId" = k.venture_id
              AND l."createdAt" >= k.day::timestamp AT TIME ZONE 'UTC'
              AND l."createdAt" <= (k.day + 1)::timestamp AT TIME ZONE 'UTC'
              AND freight_kpi.utc_day(l."createdAt") = k.day
        ) AS bucket_totals
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
    overflow_report!()
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BucketOverflow {
    pub venture_id: i32,
    pub day: BucketDay,
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
    let days: Vec<BucketDay> = buckets.iter().map(|bucket| bucket.day).collect();
    let row = transaction
        .query_one(RECOMPUTE_BUCKETS, &[&venture_ids, &days])
        .await
        .map_err(Error::database("recompute buckets"))?;

    let recomputed: i64 = row.get("recomputed");
    let written: i64 = row.get("written");
    Ok(RecomputeOutcome {
        recomputed: recomputed as u64,
        written: written as u64,
        overflowed: read_overflows(&row),
    })
}

/// Reads the arrays of the overflow report into one value per bucket.
pub(crate) fn read_overflows(row: &Row) -> Vec<BucketOverflow> {
    let venture_ids: Option<Vec<i32>> = row.get("overflow_venture_ids");
    let days: Option<Vec<BucketDay>> = row.get("overflow_days");
    let revenues: Option<Vec<String>> = row.get("overflow_revenues");
    let costs: Option<Vec<String>> = row.get("overflow_costs");
    let margins: Option<Vec<Option<String>>> = row.get("overflow_margins");

    let (Some(venture_ids), Some(days), Some(revenues), Some(costs), Some(margins)) =
        (venture_ids, days, revenues, costs, margins)
    else {
        return Vec::new();
    };
    venture_ids
        .into_iter()
        .zip(days)
        .zip(revenues.into_iter().zip(costs).zip(margins))
        .map(
            |((venture_id, day), ((total_revenue, total_cost), avg_margin_pct))| BucketOverflow {
                venture_id,
                day,
                total_revenue,
                total_cost,
                avg_margin_pct,
            },
        )
        .collect()
}
