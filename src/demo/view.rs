//! The demo's terminal view: today's KPI rows of the first ventures, with how far
//! each lags behind the writes.

use std::fmt::Write;
use std::io::IsTerminal;
use std::time::Duration;

use rust_decimal::Decimal;
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// Today's KPI row and pending changes of ventures 1 to $1. The lag of a venture is
/// the age of its oldest change still in the queue; none waiting means fresh.
const SELECT_VIEW: &str = r#"
    WITH today AS (SELECT (now() AT TIME ZONE 'UTC')::date AS day),
    pending AS (
        SELECT venture_id, count(*) AS changes,
               extract(epoch FROM clock_timestamp() - min(enqueued_at))::float8 AS lag_seconds
        FROM freight_kpi.change_queue, today
        WHERE change_queue.day = today.day
        GROUP BY venture_id
    )
    SELECT v AS venture_id,
           coalesce(k."loadsInbound", 0) AS inbound,
           coalesce(k."loadsQuoted", 0) AS quoted,
           coalesce(k."loadsCovered", 0) AS covered,
           coalesce(k."loadsLost", 0) AS lost,
           coalesce(k."totalRevenue", 0) AS revenue,
           coalesce(k."totalProfit", 0) AS profit,
           k."avgMarginPct" AS margin,
           extract(epoch FROM clock_timestamp() - k."updatedAt")::float8 AS updated_seconds_ago,
           coalesce(p.changes, 0) AS pending,
           p.lag_seconds
    FROM generate_series(1, $1) AS v
    CROSS JOIN today
    LEFT JOIN "FreightKpiDaily" k ON k."ventureId" = v AND k.date = today.day
    LEFT JOIN pending p ON p.venture_id = v
    ORDER BY v
"#;

/// Figures of the whole run, shown above the table.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub elapsed: Duration,
    pub duration: Duration,
    pub changes_applied: u64,
    pub batches: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub queue_depth: i64,
}

/// Renders the view as text.
///
/// # Errors
///
/// [`Error::Database`] when the query fails.
pub async fn render(client: &Client, ventures: i32, header: &Header) -> Result<String> {
    let rows = client
        .query(SELECT_VIEW, &[&ventures])
        .await
        .map_err(Error::database("read the demo's KPI rows"))?;

    let mut text = String::new();
    let latency =
        |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"));
    let _ = writeln!(
        text,
        "freight-kpi demo: {:.0} s of {} s, Ctrl-C stops early",
        header.elapsed.as_secs_f64(),
        header.duration.as_secs()
    );
    let _ = writeln!(
        text,
        "live changes applied {}, batches {}, commit-to-fresh p50 {} p99 {}, queue {} pending",
        header.changes_applied,
        header.batches,
        latency(header.latency_p50_ms),
        latency(header.latency_p99_ms),
        header.queue_depth
    );
    let _ = writeln!(text, "today's rows of \"FreightKpiDaily\" (UTC day):");
    let _ = writeln!(
        text,
        "{:>7} {:>7} {:>6} {:>7} {:>4} {:>11} {:>10} {:>8} {:>9}  freshness",
        "venture",
        "inbound",
        "quoted",
        "covered",
        "lost",
        "revenue",
        "profit",
        "margin%",
        "updated"
    );
    for row in rows {
        let venture: i32 = row.get("venture_id");
        let margin: Option<Decimal> = row.get("margin");
        let updated: Option<f64> = row.get("updated_seconds_ago");
        let pending: i64 = row.get("pending");
        let lag: Option<f64> = row.get("lag_seconds");
        let freshness = match lag {
            Some(lag) if pending > 0 => {
                format!("lag {:.0} ms ({pending} pending)", lag * 1000.0)
            }
            _ => "fresh".to_owned(),
        };
        let _ = writeln!(
            text,
            "{:>7} {:>7} {:>6} {:>7} {:>4} {:>11} {:>10} {:>8} {:>9}  {}",
            venture,
            row.get::<_, i32>("inbound"),
            row.get::<_, i32>("quoted"),
            row.get::<_, i32>("covered"),
            row.get::<_, i32>("lost"),
            row.get::<_, Decimal>("revenue").to_string(),
            row.get::<_, Decimal>("profit").to_string(),
            margin.map_or_else(|| "-".to_owned(), |margin| margin.to_string()),
            updated.map_or_else(|| "-".to_owned(), |seconds| format!("{seconds:.1} s ago")),
            freshness
        );
    }
    Ok(text)
}

/// Shows `text`: on a terminal it replaces the previous frame, elsewhere (a pipe, a
/// log file) frames follow each other, separated by a blank line.
pub fn show(text: &str) {
    let mut stdout = std::io::stdout();
    if stdout.is_terminal() {
        // Move home and clear the screen, then draw.
        print!("\x1b[H\x1b[2J{text}");
    } else {
        println!("{text}");
    }
    let _ = std::io::Write::flush(&mut stdout);
}
