//! One set-based pass over a range of `"Load"`, compared with `"FreightKpiDaily"`.

use chrono::NaiveDate;
use tokio_postgres::Transaction;

use super::definitions::{
    derived_kpis, load_aggregates, overflow_report, owned_columns, upsert_owned_columns,
};
use super::BucketOverflow;
use crate::error::{Error, Result};

/// Aggregates every bucket in range ($1 first day, $2 last day, both inclusive, $3 one
/// venture; NULL means unbounded) and compares it with the stored row. Unless $4
/// (dry run) is true, it upserts the drifted buckets. The work happens in the server;
/// the caller receives one row of counts and a bounded sample of drifted buckets.
const FULL_PASS: &str = concat!(
    r#"
    WITH totals AS (
        SELECT l."ventureId" AS venture_id, freight_kpi.utc_day(l."createdAt") AS day,"#,
    load_aggregates!(),
    r#"
        FROM "Load" l
        WHERE ($1::date IS NULL OR l."createdAt" >= $1::date::timestamp AT TIME ZONE 'UTC')
          AND ($2::date IS NULL OR l."createdAt" < ($2::date + 1)::timestamp AT TIME ZONE 'UTC')
          AND ($3::integer IS NULL OR l."ventureId" = $3::integer)
        GROUP BY 1, 2
    ),"#,
    derived_kpis!(),
    r#",
    stored AS (
        SELECT f."ventureId" AS venture_id, f.date AS day,
               f."loadsInbound", f."loadsQuoted", f."loadsCovered", f."loadsLost",
               f."totalRevenue", f."totalCost", f."totalProfit", f."avgMarginPct"
        FROM "FreightKpiDaily" f
        WHERE ($1::date IS NULL OR f.date >= $1::date)
          AND ($2::date IS NULL OR f.date <= $2::date)
          AND ($3::integer IS NULL OR f."ventureId" = $3::integer)
    ),
    compared AS (
        SELECT coalesce(c.venture_id, s.venture_id) AS venture_id,
               coalesce(c.day, s.day) AS day,
               c.venture_id IS NULL AS no_loads,
               coalesce(c.fits, true) AS fits,
               coalesce(c.loads_inbound, 0) AS loads_inbound,
               coalesce(c.loads_quoted, 0) AS loads_quoted,
               coalesce(c.loads_covered, 0) AS loads_covered,
               coalesce(c.loads_lost, 0) AS loads_lost,
               coalesce(c.total_revenue, 0) AS total_revenue,
               coalesce(c.total_cost, 0) AS total_cost,
               coalesce(c.total_profit, 0) AS total_profit,
               c.avg_margin_pct,
               s.venture_id IS NULL
                 OR (s."loadsInbound", s."loadsQuoted", s."loadsCovered", s."loadsLost",
                     s."totalRevenue", s."totalCost", s."totalProfit", s."avgMarginPct")
                    IS DISTINCT FROM
                    (coalesce(c.loads_inbound, 0), coalesce(c.loads_quoted, 0),
                     coalesce(c.loads_covered, 0), coalesce(c.loads_lost, 0),
                     coalesce(c.total_revenue, 0), coalesce(c.total_cost, 0),
                     coalesce(c.total_profit, 0), c.avg_margin_pct)
                 AS drifted
        FROM checked c
        FULL JOIN stored s ON s.venture_id = c.venture_id AND s.day = c.day
    ),
    repaired AS (
        INSERT INTO "FreightKpiDaily" AS f "#,
    owned_columns!(),
    r#"
        SELECT venture_id, day, loads_inbound, loads_quoted, loads_covered, loads_lost,
               total_revenue, total_cost, total_profit, avg_margin_pct, now()
        FROM compared
        WHERE drifted AND fits AND NOT $4::boolean
        ORDER BY venture_id, day
        "#,
    upsert_owned_columns!(),
    r#"
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM compared) AS scanned,
           (SELECT count(*) FROM compared WHERE drifted AND fits) AS drifted,
           (SELECT count(*) FROM repaired) AS repaired,
           (SELECT count(*) FROM compared WHERE drifted AND fits AND no_loads) AS zeroed,
           (SELECT array_agg(venture_id ORDER BY venture_id, day)
            FROM (SELECT venture_id, day FROM compared
                  WHERE drifted AND fits ORDER BY venture_id, day LIMIT 20) AS sample) AS sample_venture_ids,
           (SELECT array_agg(day ORDER BY venture_id, day)
            FROM (SELECT venture_id, day FROM compared
                  WHERE drifted AND fits ORDER BY venture_id, day LIMIT 20) AS sample) AS sample_days,
           "#,
    overflow_report!()
);

/// The part of the KPI table a full pass covers. `None` leaves that side open.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BucketRange {
    /// First UTC day, inclusive.
    pub from: Option<NaiveDate>,
    /// Last UTC day, inclusive.
    pub to: Option<NaiveDate>,
    /// A single venture.
    pub venture_id: Option<i32>,
}

/// Figures of a full pass, also written to `"JobRunLog"."statsJson"`.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FullPassSummary {
    /// Buckets that have loads or a stored row in range.
    pub scanned: u64,
    /// Buckets whose stored row was missing or differed from `"Load"`.
    pub drifted: u64,
    /// Drifted buckets written (zero on a dry run).
    pub repaired: u64,
    /// Drifted buckets without any load, whose owned columns were set to zero.
    pub zeroed: u64,
    /// Up to 20 drifted buckets, for the report.
    pub drifted_sample: Vec<super::Bucket>,
    /// Buckets left as they were because a value does not fit its column.
    pub overflowed: Vec<BucketOverflow>,
}

/// Aggregates `range` of `"Load"` in one statement and, unless `dry_run`, repairs every
/// drifted bucket.
///
/// When not a dry run, the caller must hold every bucket lock
/// ([`super::lock_all_buckets`]) taken in an earlier statement of `transaction`, so
/// that no incremental result committed meanwhile is overwritten by this older read.
/// Memory use in this process does not depend on the table's size.
///
/// # Errors
///
/// [`Error::Database`] when the statement fails.
pub async fn full_pass(
    transaction: &Transaction<'_>,
    range: BucketRange,
    dry_run: bool,
) -> Result<FullPassSummary> {
    let row = transaction
        .query_one(
            FULL_PASS,
            &[&range.from, &range.to, &range.venture_id, &dry_run],
        )
        .await
        .map_err(Error::database("run the full pass"))?;

    let count = |column: &str| row.get::<_, i64>(column) as u64;
    let sample_venture_ids: Option<Vec<i32>> = row.get("sample_venture_ids");
    let sample_days: Option<Vec<super::BucketDay>> = row.get("sample_days");
    let drifted_sample = sample_venture_ids
        .unwrap_or_default()
        .into_iter()
        .zip(sample_days.unwrap_or_default())
        .map(|(venture_id, day)| super::Bucket { venture_id, day })
        .collect();
    Ok(FullPassSummary {
        scanned: count("scanned"),
        drifted: count("drifted"),
        repaired: count("repaired"),
        zeroed: count("zeroed"),
        drifted_sample,
        overflowed: super::recompute::read_overflows(&row),
    })
}
