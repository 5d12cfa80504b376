//! The full pass: `reconcile` on a cold KPI table (no rows) and on a warm one (every
//! row already correct), each against the bare aggregation a nightly job would run,
//! `INSERT … SELECT … GROUP BY` into a scratch table with the same key.

use std::time::Instant;

use tokio_postgres::Client;

use super::dataset::{Ownership, END_VENTURE_ID, FIRST_VENTURE_ID};
use super::error::{database, BenchError};
use crate::db::Pool;
use crate::reconcile::{reconcile, ReconcileOptions};

/// The bare aggregation: the KPI definitions over every load, written to a scratch
/// table with a unique ("ventureId", date) key as "FreightKpiDaily" has, with no
/// comparison and no upsert.
const BARE_AGGREGATION: &str = r#"
    INSERT INTO freight_kpi.bench_scratch_kpi
    SELECT venture_id, day, inbound, quoted, covered, lost, revenue, cost, revenue - cost,
           CASE WHEN revenue = 0 THEN NULL ELSE round((revenue - cost) * 100 / revenue, 2) END,
           now()
    FROM (
        SELECT "ventureId" AS venture_id, ("createdAt" AT TIME ZONE 'UTC')::date AS day,
               count(*) AS inbound,
               count(*) FILTER (WHERE status IN ('QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED')) AS quoted,
               count(*) FILTER (WHERE status IN ('COVERED', 'IN_TRANSIT', 'DELIVERED')) AS covered,
               count(*) FILTER (WHERE status = 'LOST') AS lost,
               coalesce(sum("billAmount") FILTER (WHERE status = 'DELIVERED' AND "billingDate" IS NOT NULL), 0) AS revenue,
               coalesce(sum("costAmount") FILTER (WHERE status = 'DELIVERED' AND "billingDate" IS NOT NULL), 0) AS cost
        FROM "Load"
        GROUP BY 1, 2
    ) AS totals
"#;

/// Times of one table size, in seconds (medians where repeated).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FullPassPoint {
    pub loads: u64,
    /// Buckets the reconcile scanned.
    pub buckets: u64,
    pub bare_seconds: f64,
    pub reconcile_cold_seconds: f64,
    pub reconcile_warm_seconds: f64,
    /// Reconcile time divided by the bare aggregation's.
    pub cold_ratio: f64,
    pub warm_ratio: f64,
    /// Every sample, in run order, for a reader who wants the spread.
    pub bare_samples: Vec<f64>,
    pub cold_samples: Vec<f64>,
    pub warm_samples: Vec<f64>,
    /// Buckets the cold reconcile wrote and the warm one found drifted; a correct
    /// warm table has none.
    pub cold_repaired: u64,
    pub warm_drifted: u64,
}

/// Measures the bare aggregation, a cold reconcile and a warm reconcile, `repeats`
/// times each, interleaved so that a slow moment of a noisy machine spreads over all
/// three.
///
/// # Errors
///
/// [`BenchError::Service`] when a statement or a reconcile fails.
pub async fn measure(
    client: &Client,
    pool: &Pool,
    ownership: Ownership,
    loads: u64,
    repeats: u32,
    bar: &indicatif::ProgressBar,
) -> Result<FullPassPoint, BenchError> {
    let mut bare = Vec::new();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut buckets = 0;
    let mut cold_repaired = 0;
    let mut warm_drifted = 0;

    for round in 1..=repeats {
        bar.set_message(format!("round {round} of {repeats}: bare aggregation"));
        client
            .batch_execute("TRUNCATE freight_kpi.bench_scratch_kpi")
            .await
            .map_err(database("empty the scratch table"))?;
        let started = Instant::now();
        client
            .execute(BARE_AGGREGATION, &[])
            .await
            .map_err(database("run the bare aggregation"))?;
        bare.push(started.elapsed().as_secs_f64());

        bar.set_message(format!("round {round} of {repeats}: cold reconcile"));
        empty_kpi_table(client, ownership).await?;
        let started = Instant::now();
        let report = reconcile(pool, &ReconcileOptions::default()).await?;
        cold.push(started.elapsed().as_secs_f64());
        buckets = report.summary.scanned;
        cold_repaired = report.summary.repaired;

        bar.set_message(format!("round {round} of {repeats}: warm reconcile"));
        let started = Instant::now();
        let report = reconcile(pool, &ReconcileOptions::default()).await?;
        warm.push(started.elapsed().as_secs_f64());
        warm_drifted = report.summary.drifted;
    }

    let bare_seconds = median(&bare);
    let reconcile_cold_seconds = median(&cold);
    let reconcile_warm_seconds = median(&warm);
    Ok(FullPassPoint {
        loads,
        buckets,
        bare_seconds,
        reconcile_cold_seconds,
        reconcile_warm_seconds,
        cold_ratio: reconcile_cold_seconds / bare_seconds,
        warm_ratio: reconcile_warm_seconds / bare_seconds,
        bare_samples: bare,
        cold_samples: cold,
        warm_samples: warm,
        cold_repaired,
        warm_drifted,
    })
}

/// Removes the bench's KPI rows and their dead tuples, so the next reconcile starts
/// cold.
async fn empty_kpi_table(client: &Client, ownership: Ownership) -> Result<(), BenchError> {
    let statement = if ownership.foreign_kpis {
        format!(
            r#"DELETE FROM "FreightKpiDaily" WHERE "ventureId" >= {FIRST_VENTURE_ID} AND "ventureId" < {END_VENTURE_ID}"#
        )
    } else {
        r#"TRUNCATE "FreightKpiDaily""#.to_owned()
    };
    client
        .batch_execute(&statement)
        .await
        .map_err(database("empty the KPI table"))?;
    client
        .batch_execute(r#"VACUUM "FreightKpiDaily""#)
        .await
        .map_err(database("vacuum the KPI table"))
}

/// Returns the median of `samples`, the mean of the middle two for an even count.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        count if count % 2 == 1 => sorted[count / 2],
        count => (sorted[count / 2 - 1] + sorted[count / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
