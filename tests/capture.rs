//! Change capture: every kind of write to "Load" reaches "FreightKpiDaily" through the
//! triggers, the change queue and the running service, checked against the
//! independent aggregation. The last tests look at the triggers alone, without the
//! service: what they enqueue and when they notify.

mod common;

use std::io::Cursor;
use std::time::Duration;

use chrono::NaiveDate;
use futures::SinkExt;
use tokio_postgres::{AsyncMessage, Client};

use common::{
    connect_with_messages, count, day, describe_error, execute, queue_depth, start_service,
    test_settings, wait_for_empty_queue, wait_for_exact_kpis, TestDb,
};

/// Time the service gets to make the KPIs exact after the last write. It is longer
/// than the fallback poll on purpose, because these tests check convergence. The
/// notification tests at the end check the wake-ups themselves.
const CONVERGE: Duration = Duration::from_secs(15);

/// Loads spread over ventures 1-5 and ten UTC days, in every status, some delivered
/// and billed.
const SEED_LOADS: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
    SELECT 1 + i % 5,
           (enum_range(NULL::"LoadStatus"))[1 + i % 8],
           CASE WHEN i % 11 = 0 THEN NULL ELSE 100 + i END,
           CASE WHEN i % 13 = 0 THEN NULL ELSE 40 + i / 2 END,
           CASE WHEN i % 3 = 0 THEN NULL ELSE timestamptz '2024-07-01 08:00+00' END,
           timestamptz '2024-06-01 00:00+00' + (i % 10) * interval '1 day' + (i % 97) * interval '13 minutes'
    FROM generate_series(1, 400) AS i
"#;

#[tokio::test]
async fn single_row_insert_reaches_kpis() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;

    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           VALUES (7, 'DELIVERED', 1250.50, 900.25, now(), '2024-05-01 12:00+00')"#,
    )
    .await;

    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn status_lifecycle_updates_reach_kpis() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;

    let id: i64 = client
        .query_one(
            r#"INSERT INTO "Load" ("ventureId", "createdAt") VALUES (3, '2024-05-02 09:30+00') RETURNING id"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // A second load in the bucket keeps its totals from being all zero or all one load.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES (3, 'LOST', '2024-05-02 18:00+00')"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    for status in ["QUOTED", "COVERED", "IN_TRANSIT"] {
        client
            .execute(
                r#"UPDATE "Load" SET status = $2::text::"LoadStatus", "updatedAt" = now() WHERE id = $1"#,
                &[&id, &status],
            )
            .await
            .unwrap();
        wait_for_exact_kpis(&client, CONVERGE).await;
    }

    client
        .execute(
            r#"UPDATE "Load"
               SET status = 'DELIVERED', "billingDate" = now(), "billAmount" = 2400.00,
                   "costAmount" = 1800.40, "updatedAt" = now()
               WHERE id = $1"#,
            &[&id],
        )
        .await
        .unwrap();
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn single_row_delete_empties_bucket() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;

    let id: i64 = client
        .query_one(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
               VALUES (4, 'DELIVERED', 500, 300, now(), '2024-05-03 10:00+00') RETURNING id"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_for_exact_kpis(&client, CONVERGE).await;

    // The bucket loses its only load, so its row must drop to zero or disappear.
    client
        .execute(r#"DELETE FROM "Load" WHERE id = $1"#, &[&id])
        .await
        .unwrap();
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn multi_row_update_and_delete_converge() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(
        &client,
        r#"UPDATE "Load"
           SET status = 'DELIVERED', "billingDate" = now(), "billAmount" = coalesce("billAmount", 0) + 7
           WHERE id % 3 = 0"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(&client, r#"DELETE FROM "Load" WHERE id % 5 IN (0, 2)"#).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    // Every load of venture 2 goes, so each of its buckets loses its last load.
    execute(&client, r#"DELETE FROM "Load" WHERE "ventureId" = 2"#).await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn copy_of_many_rows_reaches_kpis() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;

    let statuses = [
        "OPEN",
        "QUOTED",
        "COVERED",
        "IN_TRANSIT",
        "DELIVERED",
        "LOST",
        "CANCELLED",
    ];
    let mut data = String::new();
    for i in 0..20_000u32 {
        let bill = if i % 17 == 0 {
            "\\N".to_owned()
        } else {
            format!("{}.{:02}", 100 + i % 900, i % 100)
        };
        let billing_date = if i % 4 == 0 {
            "\\N"
        } else {
            "2024-08-20 12:00:00+00"
        };
        data.push_str(&format!(
            "{}\t{}\t{}\t{}.50\t{}\t2024-08-{:02} {:02}:{:02}:00+00\n",
            1 + i % 9,
            statuses[(i % 7) as usize],
            bill,
            50 + i % 300,
            billing_date,
            1 + i % 28,
            i % 24,
            i % 60,
        ));
    }

    let sink = client
        .copy_in::<_, Cursor<Vec<u8>>>(
            r#"COPY "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
               FROM STDIN (FORMAT text)"#,
        )
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(Cursor::new(data.into_bytes())).await.unwrap();
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 20_000, "rows copied");

    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn upsert_of_new_and_existing_converges() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    // Ids 301-400 exist and are updated, moving to other ventures and days. Ids
    // 401-600 are new. One statement fires both the insert and the update trigger.
    execute(
        &client,
        r#"INSERT INTO "Load" (id, "ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           SELECT i, 6 + i % 3, 'DELIVERED', 300 + i, 100, now(),
                  timestamptz '2024-06-20 00:00+00' + (i % 4) * interval '1 day'
           FROM generate_series(301, 600) AS i
           ON CONFLICT (id) DO UPDATE
           SET "ventureId" = EXCLUDED."ventureId", status = EXCLUDED.status,
               "billAmount" = EXCLUDED."billAmount", "costAmount" = EXCLUDED."costAmount",
               "billingDate" = EXCLUDED."billingDate", "createdAt" = EXCLUDED."createdAt",
               "updatedAt" = now()"#,
    )
    .await;
    // Explicit ids do not advance the sequence, so it is moved past them for later
    // inserts.
    execute(
        &client,
        r#"SELECT setval(pg_get_serial_sequence('"Load"', 'id'), (SELECT max(id) FROM "Load"))"#,
    )
    .await;

    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn truncate_then_inserts_converge() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    // Every stored bucket loses its loads at once.
    execute(&client, r#"TRUNCATE "Load""#).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           SELECT 1 + i % 3, 'COVERED', timestamptz '2024-06-01 12:00+00' + (i % 2) * interval '1 day'
           FROM generate_series(1, 30) AS i"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    // A TRUNCATE and new inserts in one transaction.
    execute(
        &client,
        r#"BEGIN;
           TRUNCATE "Load";
           INSERT INTO "Load" ("ventureId", status, "billAmount", "billingDate", "createdAt")
           VALUES (2, 'DELIVERED', 10, now(), '2024-06-02 03:00+00'),
                  (9, 'QUOTED', NULL, NULL, '2024-06-05 03:00+00');
           COMMIT;"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn rolled_back_transaction_changes_nothing() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(
        &client,
        r#"BEGIN;
           INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES (42, 'COVERED', '2024-06-03 10:00+00');
           UPDATE "Load" SET status = 'LOST' WHERE "ventureId" = 1;
           DELETE FROM "Load" WHERE "ventureId" = 3;
           ROLLBACK;"#,
    )
    .await;
    // A committed write after the rollback wakes the service, so a wrongly applied
    // rollback would show up now rather than never.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", "createdAt") VALUES (1, '2024-06-03 11:00+00')"#,
    )
    .await;

    wait_for_exact_kpis(&client, CONVERGE).await;
    assert_eq!(
        count(
            &client,
            r#"SELECT count(*) FROM "Load" WHERE "ventureId" = 42"#
        )
        .await,
        0,
        "the rolled-back insert left a load"
    );
    service.stop().await;
}

#[tokio::test]
async fn savepoint_rollbacks_are_not_applied() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(
        &client,
        r#"BEGIN;
           INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES (21, 'QUOTED', '2024-06-04 10:00+00');
           SAVEPOINT first;
           INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES (22, 'QUOTED', '2024-06-04 10:00+00');
           UPDATE "Load" SET "ventureId" = 23 WHERE "ventureId" = 1;
           ROLLBACK TO SAVEPOINT first;
           SAVEPOINT second;
           UPDATE "Load" SET status = 'DELIVERED', "billingDate" = now() WHERE "ventureId" = 2;
           RELEASE SAVEPOINT second;
           SAVEPOINT third;
           DELETE FROM "Load" WHERE "ventureId" = 4;
           ROLLBACK TO SAVEPOINT third;
           RELEASE SAVEPOINT third;
           COMMIT;"#,
    )
    .await;

    wait_for_exact_kpis(&client, CONVERGE).await;
    assert_eq!(
        count(
            &client,
            r#"SELECT count(*) FROM "Load" WHERE "ventureId" IN (22, 23)"#
        )
        .await,
        0,
        "a write rolled back to a savepoint stayed"
    );
    service.stop().await;
}

#[tokio::test]
async fn loads_moving_between_ventures_converge() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    // Part of venture 1 goes to a new venture, part of venture 2 to an existing one.
    execute(
        &client,
        r#"UPDATE "Load" SET "ventureId" = 31 WHERE "ventureId" = 1 AND id % 2 = 0"#,
    )
    .await;
    execute(
        &client,
        r#"UPDATE "Load" SET "ventureId" = 3 WHERE "ventureId" = 2"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn loads_moving_between_days_converge() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(
        &client,
        r#"UPDATE "Load" SET "createdAt" = "createdAt" - interval '7 years' WHERE id % 4 = 0"#,
    )
    .await;
    execute(
        &client,
        r#"UPDATE "Load" SET "createdAt" = "createdAt" + interval '3 years 5 days' WHERE id % 4 = 1"#,
    )
    .await;
    // A move by one hour across UTC midnight changes the bucket, not just the time.
    execute(
        &client,
        r#"UPDATE "Load" SET "createdAt" = date_trunc('day', "createdAt" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '1 hour'
           WHERE id % 4 = 2"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn writer_time_zones_use_utc_day() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;

    // Each writer stores local times near its midnight, where its local day and the
    // UTC day differ, and then moves and deletes some of them in local terms. The
    // KPIs must be exact after each phase, since a later phase could repair what an
    // earlier one put in the wrong bucket.
    let writers = [
        (61, "Pacific/Kiritimati", "2024-03-10 00:00"),
        (62, "America/Adak", "2024-01-15 14:00"),
        (63, "Asia/Kathmandu", "2024-02-20 00:00"),
    ];
    let phases = [
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           SELECT $1, 'DELIVERED', 100 + i, 50, now(),
                  ($2::text::timestamp + i * interval '3 minutes')::timestamptz
           FROM generate_series(0, 100) AS i"#,
        r#"UPDATE "Load" SET "createdAt" = ($2::text::timestamp + interval '1 day')::timestamptz
           WHERE "ventureId" = $1 AND id % 5 = 0 AND $2::text IS NOT NULL"#,
        r#"DELETE FROM "Load" WHERE "ventureId" = $1 AND id % 7 = 0 AND $2::text IS NOT NULL"#,
    ];
    let client = db.client().await;
    for statement in phases {
        let mut tasks = Vec::new();
        for (venture_id, zone, first_local_time) in writers {
            let writer = db.client().await;
            execute(&writer, &format!("SET TimeZone = '{zone}'")).await;
            tasks.push(tokio::spawn(async move {
                writer
                    .execute(statement, &[&venture_id, &first_local_time])
                    .await
                    .unwrap_or_else(|error| {
                        panic!("{statement} in {zone}: {}", describe_error(&error))
                    });
            }));
        }
        for task in tasks {
            task.await.expect("a writer panicked");
        }
        wait_for_exact_kpis(&client, CONVERGE).await;
    }

    for (venture_id, zone, _) in writers {
        let local_day_differs: i64 = client
            .query_one(
                r#"SELECT count(*) FILTER (WHERE ("createdAt" AT TIME ZONE $2)::date <> ("createdAt" AT TIME ZONE 'UTC')::date)
                          - count(*)
                   FROM "Load" WHERE "ventureId" = $1"#,
                &[&venture_id, &zone],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            local_day_differs, 0,
            "some loads written in {zone} fall on the same local and UTC day, so the test proves nothing for them"
        );
    }
    service.stop().await;
}

#[tokio::test]
async fn service_session_time_zone_is_ignored() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // Every new session of this database, the service's included, runs at UTC+14.
    execute(
        &client,
        &format!(
            "ALTER DATABASE \"{}\" SET TimeZone = 'Pacific/Kiritimati'",
            db.name
        ),
    )
    .await;
    let service = start_service(&db, test_settings(&db)).await;

    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "billingDate", "createdAt")
           VALUES (5, 'DELIVERED', 10, now(), '2024-04-01 09:59:59.999+00'),
                  (5, 'DELIVERED', 20, now(), '2024-04-01 10:00:00+00'),
                  (5, 'COVERED', NULL, NULL, '2024-04-01 23:59:59.999+00'),
                  (5, 'QUOTED', NULL, NULL, '2024-04-02 00:00:00+00')"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(
        &client,
        r#"UPDATE "Load" SET "createdAt" = "createdAt" + interval '1 second' WHERE status = 'COVERED'"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

#[tokio::test]
async fn billing_date_and_null_amounts_converge() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;

    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           VALUES (8, 'DELIVERED', NULL, 75.25, NULL, '2024-09-01 10:00+00'),
                  (8, 'DELIVERED', 300.00, NULL, NULL, '2024-09-01 11:00+00'),
                  (8, 'DELIVERED', 120.10, 80.05, NULL, '2024-09-01 12:00+00'),
                  (8, 'IN_TRANSIT', 999.00, 1.00, now(), '2024-09-01 13:00+00')"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    // Billed: revenue and cost count, with a NULL amount counting zero.
    execute(
        &client,
        r#"UPDATE "Load" SET "billingDate" = now() WHERE "ventureId" = 8 AND status = 'DELIVERED'"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    // Only the load without revenue stays billed: revenue 0, so the margin is NULL.
    execute(
        &client,
        r#"UPDATE "Load" SET "billingDate" = NULL WHERE "ventureId" = 8 AND "billAmount" IS NOT NULL"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    execute(
        &client,
        r#"UPDATE "Load" SET "billingDate" = now(), "billAmount" = NULL, "costAmount" = NULL WHERE "ventureId" = 8"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    service.stop().await;
}

// Trigger-level tests: no service runs, so the queue keeps what the triggers wrote.

/// Returns the queued keys, sorted, with one entry per queue row.
async fn queued_buckets(client: &Client) -> Vec<(Option<i32>, Option<NaiveDate>)> {
    client
        .query(
            "SELECT venture_id, day FROM freight_kpi.change_queue ORDER BY venture_id, day",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn clear_queue(client: &Client) {
    execute(client, "DELETE FROM freight_kpi.change_queue").await;
}

#[tokio::test]
async fn unchanged_kpi_inputs_enqueue_nothing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    clear_queue(&client).await;

    let statements = [
        r#"UPDATE "Load" SET "updatedAt" = now() + interval '1 minute'"#,
        r#"UPDATE "Load" SET status = status, "billAmount" = "billAmount""#,
        r#"UPDATE "Load" SET "billingDate" = "billingDate" + interval '2 days' WHERE "billingDate" IS NOT NULL"#,
        // Within the same UTC day: the seed times lie between 00:00 and 21:00.
        r#"UPDATE "Load" SET "createdAt" = "createdAt" + interval '1 minute'"#,
    ];
    for statement in statements {
        execute(&client, statement).await;
        assert_eq!(
            queue_depth(&client).await,
            0,
            "{statement} enqueued changes"
        );
    }
}

#[tokio::test]
async fn statements_touching_no_rows_enqueue_nothing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    clear_queue(&client).await;

    let statements = [
        r#"INSERT INTO "Load" ("ventureId") SELECT 1 WHERE false"#,
        r#"UPDATE "Load" SET status = 'LOST' WHERE id < 0"#,
        r#"DELETE FROM "Load" WHERE id < 0"#,
        r#"INSERT INTO "Load" (id, "ventureId") SELECT id, "ventureId" FROM "Load" WHERE id <= 10
           ON CONFLICT (id) DO NOTHING"#,
    ];
    for statement in statements {
        execute(&client, statement).await;
        assert_eq!(
            queue_depth(&client).await,
            0,
            "{statement} enqueued changes"
        );
    }
}

#[tokio::test]
async fn status_update_enqueues_exactly_affected_buckets() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", "createdAt")
           VALUES (1, '2024-06-01 08:00+00'), (1, '2024-06-01 20:00+00'), (1, '2024-06-02 08:00+00'),
                  (2, '2024-06-01 08:00+00'), (3, '2024-06-03 23:59:59+00')"#,
    )
    .await;
    clear_queue(&client).await;

    execute(
        &client,
        r#"UPDATE "Load" SET status = 'QUOTED' WHERE "ventureId" = 1"#,
    )
    .await;
    assert_eq!(
        queued_buckets(&client).await,
        vec![
            (Some(1), Some(day("2024-06-01"))),
            (Some(1), Some(day("2024-06-02"))),
        ],
        "a status change of venture 1 enqueues its two buckets, once each"
    );
}

#[tokio::test]
async fn move_enqueues_old_and_new_bucket() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", "createdAt")
           VALUES (1, '2024-06-01 08:00+00'), (2, '2024-06-01 08:00+00'), (3, '2024-06-03 23:59:59+00')"#,
    )
    .await;

    clear_queue(&client).await;
    execute(
        &client,
        r#"UPDATE "Load" SET "ventureId" = 5 WHERE "ventureId" = 2"#,
    )
    .await;
    assert_eq!(
        queued_buckets(&client).await,
        vec![
            (Some(2), Some(day("2024-06-01"))),
            (Some(5), Some(day("2024-06-01"))),
        ],
        "a venture move enqueues the old and the new bucket"
    );

    clear_queue(&client).await;
    // One second later is the next UTC day.
    execute(
        &client,
        r#"UPDATE "Load" SET "createdAt" = "createdAt" + interval '1 second' WHERE "ventureId" = 3"#,
    )
    .await;
    assert_eq!(
        queued_buckets(&client).await,
        vec![
            (Some(3), Some(day("2024-06-03"))),
            (Some(3), Some(day("2024-06-04"))),
        ],
        "a move across UTC midnight enqueues both days"
    );
}

/// Registers an armed or disarmed listener row and returns a connection listening on
/// the default channel, with the receiver of its notifications.
async fn listen_on_default_channel(
    db: &TestDb,
    armed: bool,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>) {
    let (listener, messages) = connect_with_messages(&db.target).await;
    execute(&listener, "LISTEN freight_kpi").await;
    listener
        .execute(
            "INSERT INTO freight_kpi.listener (listener_id, channel, armed) VALUES ('t', 'freight_kpi', $1)",
            &[&armed],
        )
        .await
        .unwrap();
    (listener, messages)
}

/// Returns the payloads of the notifications received so far. A round trip on the
/// listening connection first makes the server send every notification committed
/// before it.
async fn received_payloads(
    listener: &Client,
    messages: &mut tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
) -> Vec<(String, String)> {
    execute(listener, "SELECT 1").await;
    let mut payloads = Vec::new();
    while let Ok(message) = messages.try_recv() {
        if let AsyncMessage::Notification(notification) = message {
            payloads.push((
                notification.channel().to_owned(),
                notification.payload().to_owned(),
            ));
        }
    }
    payloads
}

/// Waits up to 10 seconds for a first notification, then returns it with any that
/// follow it in the next round trip. Returns nothing if none arrived.
async fn wait_for_notifications(
    listener: &Client,
    messages: &mut tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut notifications = received_payloads(listener, messages).await;
    while notifications.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        notifications.extend(received_payloads(listener, messages).await);
    }
    notifications.extend(received_payloads(listener, messages).await);
    notifications
}

#[tokio::test]
async fn huge_insert_notifies_with_empty_payload() {
    let db = TestDb::migrated().await;
    let (listener, mut messages) = listen_on_default_channel(&db, true).await;
    let writer = db.client().await;

    // 100,000 loads over 2,000 buckets: their keys as text would be far above the
    // 8000-byte limit of a NOTIFY payload.
    execute(
        &writer,
        r#"INSERT INTO "Load" ("ventureId", "createdAt")
           SELECT 1 + i % 200, timestamptz '2024-01-01 12:00+00' + (i % 10) * interval '1 day'
           FROM generate_series(1, 100000) AS i"#,
    )
    .await;

    let notifications = wait_for_notifications(&listener, &mut messages).await;
    assert!(
        !notifications.is_empty(),
        "no notification for a 100,000-row insert"
    );
    for (channel, payload) in &notifications {
        assert_eq!(channel, "freight_kpi", "notification on another channel");
        assert!(
            payload.is_empty(),
            "payload of {} bytes, expected none",
            payload.len()
        );
    }
}

#[tokio::test]
async fn disarmed_listener_gets_no_notification() {
    let db = TestDb::migrated().await;
    let (listener, mut messages) = listen_on_default_channel(&db, false).await;
    let writer = db.client().await;

    execute(
        &writer,
        r#"INSERT INTO "Load" ("ventureId", "createdAt") VALUES (1, now()), (2, now())"#,
    )
    .await;
    execute(&writer, r#"UPDATE "Load" SET status = 'LOST'"#).await;
    execute(&writer, r#"DELETE FROM "Load""#).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        received_payloads(&listener, &mut messages).await,
        Vec::<(String, String)>::new(),
        "writers notified while no listener was armed"
    );

    // The same listener, armed, is woken by the next write: the silence above came
    // from the flag, not from a broken LISTEN.
    execute(
        &listener,
        "UPDATE freight_kpi.listener SET armed = true WHERE listener_id = 't'",
    )
    .await;
    execute(
        &writer,
        r#"INSERT INTO "Load" ("ventureId", "createdAt") VALUES (1, now())"#,
    )
    .await;
    assert_eq!(
        wait_for_notifications(&listener, &mut messages).await,
        vec![("freight_kpi".to_owned(), String::new())],
        "an armed listener got no wake-up, or more than one"
    );
}

// Guards against writers at REPEATABLE READ or SERIALIZABLE reading the armed flag as
// of their snapshot and leaving their change to the fallback poll.
#[tokio::test]
async fn arming_before_commit_wakes_listener() {
    for isolation in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        let db = TestDb::migrated().await;
        let (listener, mut messages) = listen_on_default_channel(&db, false).await;
        let writer = db.client().await;

        // The writer's statement runs while the listener is busy (disarmed), and its
        // commit comes after the listener armed itself and drained the queue.
        execute(
            &writer,
            &format!(
                r#"BEGIN ISOLATION LEVEL {isolation};
                   INSERT INTO "Load" ("ventureId", "createdAt") VALUES (1, now())"#
            ),
        )
        .await;
        execute(
            &listener,
            "UPDATE freight_kpi.listener SET armed = true WHERE listener_id = 't'",
        )
        .await;
        execute(&writer, "COMMIT").await;

        assert_eq!(
            wait_for_notifications(&listener, &mut messages).await,
            vec![("freight_kpi".to_owned(), String::new())],
            "a {isolation} writer that committed after the listener armed sent no wake-up"
        );
    }
}

// Regression: a load whose "createdAt" was infinite or outside chrono's years made the
// service panic on the queued day, in a loop, and made reconcile panic.
#[tokio::test]
async fn extreme_created_at_values_converge() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, test_settings(&db)).await;
    let client = db.client().await;

    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           VALUES (1, 'DELIVERED', 100, 40, now(), 'infinity'),
                  (1, 'QUOTED', NULL, NULL, NULL, '-infinity'),
                  (2, 'DELIVERED', 300, 100, now(), '270000-01-01 00:00+00'),
                  (3, 'LOST', NULL, NULL, NULL, '0044-03-15 12:00+00 BC'),
                  (4, 'OPEN', NULL, NULL, NULL, now())"#,
    )
    .await;
    wait_for_exact_kpis(&client, Duration::from_secs(5)).await;

    execute(
        &client,
        r#"UPDATE "Load" SET status = 'COVERED' WHERE "ventureId" IN (1, 2, 3)"#,
    )
    .await;
    wait_for_exact_kpis(&client, Duration::from_secs(5)).await;
    let infinite_rows = count(
        &client,
        r#"SELECT count(*) FROM "FreightKpiDaily" WHERE NOT isfinite(date)"#,
    )
    .await;
    assert_eq!(
        infinite_rows, 2,
        "the infinite days form buckets of their own"
    );

    let pool = db.target.pool(2).unwrap();
    let report = freight_kpi::reconcile::reconcile(
        &pool,
        &freight_kpi::reconcile::ReconcileOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .await
    .expect("reconcile reads extreme days without failing");
    assert_eq!(report.summary.drifted, 0);
    wait_for_empty_queue(&client, CONVERGE).await;
    service.stop().await;
}
