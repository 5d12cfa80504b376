//! The KPI definitions as SQL, in one place, shared by the incremental recompute and
//! the full pass so the two can never disagree.
//!
//! Each macro expands to a string literal so the statements can be assembled with
//! `concat!` at compile time.

/// Aggregates over the loads of a bucket, aliased `l`. Written so that a LEFT JOIN
/// with no matching load (every column NULL) counts nothing and sums to zero.
macro_rules! load_aggregates {
    () => {
        r#"
        count(l.id) AS loads_inbound,
        count(l.id) FILTER (WHERE l.status IN ('QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED')) AS loads_quoted,
        count(l.id) FILTER (WHERE l.status IN ('COVERED', 'IN_TRANSIT', 'DELIVERED')) AS loads_covered,
        count(l.id) FILTER (WHERE l.status = 'LOST') AS loads_lost,
        coalesce(sum(l."billAmount") FILTER (WHERE l.status = 'DELIVERED' AND l."billingDate" IS NOT NULL), 0) AS total_revenue,
        coalesce(sum(l."costAmount") FILTER (WHERE l.status = 'DELIVERED' AND l."billingDate" IS NOT NULL), 0) AS total_cost
        "#
    };
}

/// Derived KPIs over a relation `totals` with the aggregates above, plus `fits`: false
/// when a value would overflow its column (numeric(14,2) for money, numeric(7,2) for
/// the margin). Checking here, instead of letting the write fail, keeps one bad
/// bucket from failing the statement for all the others.
macro_rules! derived_kpis {
    () => {
        r#"
        computed AS (
            SELECT venture_id, day,
                   loads_inbound::integer AS loads_inbound,
                   loads_quoted::integer AS loads_quoted,
                   loads_covered::integer AS loads_covered,
                   loads_lost::integer AS loads_lost,
                   round(total_revenue, 2) AS total_revenue,
                   round(total_cost, 2) AS total_cost,
                   round(total_revenue - total_cost, 2) AS total_profit,
                   CASE WHEN total_revenue = 0 THEN NULL
                        ELSE round((total_revenue - total_cost) * 100 / total_revenue, 2)
                   END AS avg_margin_pct
            FROM totals
        ),
        checked AS (
            SELECT computed.*,
                   abs(total_revenue) < 1e12 AND abs(total_cost) < 1e12 AND abs(total_profit) < 1e12
                   AND coalesce(abs(avg_margin_pct) < 1e5, true) AS fits
            FROM computed
        )
        "#
    };
}

/// The upsert of computed rows into `"FreightKpiDaily"`, writing only the columns this
/// service owns and only when a value changed, so unchanged buckets cost no write.
macro_rules! upsert_owned_columns {
    () => {
        r#"
        ON CONFLICT ("ventureId", date) DO UPDATE SET
            "loadsInbound" = EXCLUDED."loadsInbound",
            "loadsQuoted" = EXCLUDED."loadsQuoted",
            "loadsCovered" = EXCLUDED."loadsCovered",
            "loadsLost" = EXCLUDED."loadsLost",
            "totalRevenue" = EXCLUDED."totalRevenue",
            "totalCost" = EXCLUDED."totalCost",
            "totalProfit" = EXCLUDED."totalProfit",
            "avgMarginPct" = EXCLUDED."avgMarginPct",
            "updatedAt" = EXCLUDED."updatedAt"
        WHERE (f."loadsInbound", f."loadsQuoted", f."loadsCovered", f."loadsLost",
               f."totalRevenue", f."totalCost", f."totalProfit", f."avgMarginPct")
              IS DISTINCT FROM
              (EXCLUDED."loadsInbound", EXCLUDED."loadsQuoted", EXCLUDED."loadsCovered", EXCLUDED."loadsLost",
               EXCLUDED."totalRevenue", EXCLUDED."totalCost", EXCLUDED."totalProfit", EXCLUDED."avgMarginPct")
        "#
    };
}

/// The owned columns in insert order, matching the select lists of the callers.
macro_rules! owned_columns {
    () => {
        r#"("ventureId", date, "loadsInbound", "loadsQuoted", "loadsCovered", "loadsLost",
            "totalRevenue", "totalCost", "totalProfit", "avgMarginPct", "updatedAt")"#
    };
}

/// Parallel arrays describing the buckets of `checked` that do not fit their columns,
/// read by `read_overflows`. Arrays rather than JSON carry every `date` value,
/// `infinity` included, to the service unchanged.
macro_rules! overflow_report {
    () => {
        r#"
        (SELECT array_agg(venture_id ORDER BY venture_id, day) FROM checked WHERE NOT fits) AS overflow_venture_ids,
        (SELECT array_agg(day ORDER BY venture_id, day) FROM checked WHERE NOT fits) AS overflow_days,
        (SELECT array_agg(total_revenue::text ORDER BY venture_id, day) FROM checked WHERE NOT fits) AS overflow_revenues,
        (SELECT array_agg(total_cost::text ORDER BY venture_id, day) FROM checked WHERE NOT fits) AS overflow_costs,
        (SELECT array_agg(avg_margin_pct::text ORDER BY venture_id, day) FROM checked WHERE NOT fits) AS overflow_margins
        "#
    };
}

pub(crate) use {
    derived_kpis, load_aggregates, overflow_report, owned_columns, upsert_owned_columns,
};
