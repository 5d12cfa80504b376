//! The demo's data: a few thousand loads spread over two weeks, then a live stream
//! of the changes a brokerage makes all day.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Inserts $1 loads of ventures 1 to $2, created over the last 14 days. About a third
/// are delivered, most of those billed; costs run at 70 to 92 percent of the bill.
const INSERT_HISTORY: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
    SELECT venture_id, status, bill,
           round(bill * (0.70 + random() * 0.22)::numeric, 2),
           CASE WHEN status = 'DELIVERED' AND random() < 0.85 THEN created + interval '2 days' END,
           created
    FROM (SELECT 1 + floor(random() * $2::integer)::integer AS venture_id,
                 (ARRAY['OPEN', 'WORKING', 'QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED',
                        'DELIVERED', 'DELIVERED', 'LOST', 'CANCELLED'])[1 + floor(random() * 10)::integer]::"LoadStatus" AS status,
                 round((800 + random() * 2500)::numeric, 2) AS bill,
                 now() - random() * interval '14 days' AS created
          FROM generate_series(1, $1::integer)) AS generated
"#;

/// Inserts $2 new loads of venture $1, created now.
const INSERT_NEW: &str = r#"
    INSERT INTO "Load" ("ventureId", "billAmount", "costAmount")
    SELECT $1::integer, bill, round(bill * (0.70 + random() * 0.22)::numeric, 2)
    FROM (SELECT round((800 + random() * 2500)::numeric, 2) AS bill
          FROM generate_series(1, $2::integer)) AS generated
"#;

/// Moves one of today's open loads of venture $1 a step along the status flow; a
/// load that reaches DELIVERED is billed.
const ADVANCE_STATUS: &str = r#"
    UPDATE "Load"
    SET status = (CASE status WHEN 'OPEN' THEN 'WORKING' WHEN 'WORKING' THEN 'QUOTED'
                              WHEN 'QUOTED' THEN 'COVERED' WHEN 'COVERED' THEN 'IN_TRANSIT'
                              ELSE 'DELIVERED' END)::"LoadStatus",
        "billingDate" = CASE WHEN status = 'IN_TRANSIT' THEN now() ELSE "billingDate" END,
        "updatedAt" = now()
    WHERE id = (SELECT id FROM "Load"
                WHERE "ventureId" = $1
                  AND status IN ('OPEN', 'WORKING', 'QUOTED', 'COVERED', 'IN_TRANSIT')
                  AND "createdAt" >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                ORDER BY random() LIMIT 1)
"#;

/// Marks one of today's quoted or open loads of venture $1 as lost.
const LOSE_LOAD: &str = r#"
    UPDATE "Load" SET status = 'LOST', "updatedAt" = now()
    WHERE id = (SELECT id FROM "Load"
                WHERE "ventureId" = $1 AND status IN ('OPEN', 'WORKING', 'QUOTED')
                  AND "createdAt" >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                ORDER BY random() LIMIT 1)
"#;

/// Corrects the bill of one delivered load of venture $1 from the last week.
const REBILL_LOAD: &str = r#"
    UPDATE "Load" SET "billAmount" = round("billAmount" * (0.9 + random() * 0.2)::numeric, 2),
                      "updatedAt" = now()
    WHERE id = (SELECT id FROM "Load"
                WHERE "ventureId" = $1 AND status = 'DELIVERED'
                  AND "createdAt" >= now() - interval '7 days'
                ORDER BY random() LIMIT 1)
"#;

/// Moves one load of venture $1 created today to venture $2, as a correction would.
const MOVE_LOAD: &str = r#"
    UPDATE "Load" SET "ventureId" = $2, "updatedAt" = now()
    WHERE id = (SELECT id FROM "Load"
                WHERE "ventureId" = $1
                  AND "createdAt" >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                ORDER BY random() LIMIT 1)
"#;

/// Deletes one cancelled load of venture $1.
const DELETE_CANCELLED: &str = r#"
    DELETE FROM "Load"
    WHERE id = (SELECT id FROM "Load" WHERE "ventureId" = $1 AND status = 'CANCELLED'
                ORDER BY random() LIMIT 1)
"#;

/// Inserts `loads` loads spread over `ventures` ventures and the last 14 days.
///
/// # Errors
///
/// [`Error::Database`] when the insert fails.
pub async fn insert_history(client: &Client, loads: i32, ventures: i32) -> Result<u64> {
    client
        .execute(INSERT_HISTORY, &[&loads, &ventures])
        .await
        .map_err(Error::database("insert the demo's loads"))
}

/// Writes about `per_second` changes a second to loads of ventures 1 to `ventures`
/// until `stop` fires, counting the statements in `applied`.
///
/// # Errors
///
/// [`Error::Database`] when a statement fails.
pub async fn stream_changes(
    client: &Client,
    ventures: i32,
    per_second: u32,
    applied: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<()> {
    let pause = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
    let mut ticks = tokio::time::interval(pause);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = ticks.tick() => {}
        }

        // Drawn before any await: the generator is not Send.
        let (venture, other_venture, roll, count) = {
            let mut rng = rand::rng();
            (
                rng.random_range(1..=ventures),
                rng.random_range(1..=ventures),
                rng.random_range(0..100),
                rng.random_range(2..12_i32),
            )
        };
        let written = match roll {
            0..=39 => client.execute(ADVANCE_STATUS, &[&venture]).await,
            40..=59 => client.execute(INSERT_NEW, &[&venture, &1_i32]).await,
            60..=67 => client.execute(INSERT_NEW, &[&venture, &count]).await,
            68..=77 => client.execute(LOSE_LOAD, &[&venture]).await,
            78..=89 => client.execute(REBILL_LOAD, &[&venture]).await,
            90..=95 => client.execute(MOVE_LOAD, &[&venture, &other_venture]).await,
            _ => client.execute(DELETE_CANCELLED, &[&venture]).await,
        };
        written.map_err(Error::database("apply a live change"))?;
        applied.fetch_add(1, Ordering::Relaxed);
    }
}
