//! Batches of the incremental path, driven directly without the listener: how a deep
//! queue is claimed by bucket and when a batch turns into a full pass over its days.
//! Every test ends by comparing "FreightKpiDaily" with the independent aggregation.

mod common;

use std::time::Duration;

use freight_kpi::capture::{process_batch, DrainSettings};

use common::{count, drain_all, execute, kpi_mismatches, queue_depth, TestDb};

/// Ten loads in each of 3 ventures × 40 days: 120 buckets, statuses and amounts varied.
const SEED_LOADS: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
    SELECT 1 + i % 3,
           (enum_range(NULL::"LoadStatus"))[1 + i % 8],
           100 + i % 50,
           60 + i % 30,
           CASE WHEN i % 4 = 0 THEN NULL ELSE timestamptz '2024-08-01 08:00+00' END,
           timestamptz '2024-06-01 00:00+00' + (i / 3 % 40) * interval '1 day' + (i % 7) * interval '1 hour'
    FROM generate_series(0, 1199) AS i
"#;

/// Seeds the loads, drains their changes, then updates each load with `assignment`
/// in a statement of its own, in id order, so that each one queues its own change.
async fn seed_then_update_each_load(db: &TestDb, assignment: &str) -> tokio_postgres::Client {
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    drain_all(db, &DrainSettings::default()).await;

    execute(
        &client,
        &format!(
            r#"DO $$
               DECLARE load_id bigint;
               BEGIN
                   FOR load_id IN SELECT id FROM "Load" ORDER BY id LOOP
                       UPDATE "Load" SET {assignment} WHERE id = load_id;
                   END LOOP;
               END $$"#
        ),
    )
    .await;
    client
}

fn small_batches() -> DrainSettings {
    DrainSettings {
        batch_size: 10,
        ..DrainSettings::default()
    }
}

#[tokio::test]
async fn deep_queue_recomputes_each_bucket_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    drain_all(&db, &DrainSettings::default()).await;

    // 50 single-row updates to each of 4 buckets, interleaved, as a busy writer mix
    // queues them: 200 queue rows for 4 buckets.
    for _ in 0..50 {
        for venture_id in 1..=2 {
            for day in ["2024-06-03", "2024-06-04"] {
                execute(
                    &client,
                    &format!(
                        r#"UPDATE "Load" SET "billAmount" = "billAmount" + 1
                           WHERE id = (SELECT min(id) FROM "Load" WHERE "ventureId" = {venture_id}
                                       AND "createdAt" >= timestamptz '{day} 00:00+00'
                                       AND "createdAt" < timestamptz '{day} 00:00+00' + interval '1 day')"#
                    ),
                )
                .await;
            }
        }
    }
    assert_eq!(queue_depth(&client).await, 200, "queued changes");

    // A window of 10 rows names all 4 buckets, so the batch takes every change of them.
    let pool = db.target.pool(2).expect("a pool for the test database");
    let report = process_batch(&pool, &small_batches())
        .await
        .expect("process a batch")
        .expect("the batch found changes");

    assert_eq!(report.changes, 200, "changes claimed by the first batch");
    assert_eq!(report.buckets, 4, "buckets recomputed by the first batch");
    assert!(report.window_full, "the window of 10 oldest rows was full");
    assert_eq!(queue_depth(&client).await, 0, "queue after one batch");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn deep_queue_drains_in_few_batches() {
    let db = TestDb::migrated().await;

    // One update per load: 1,200 queue rows over 120 buckets, ordered so that every
    // window of oldest rows contains distinct buckets.
    let client = seed_then_update_each_load(&db, r#""costAmount" = "costAmount" + 1"#).await;
    let queued = queue_depth(&client).await;
    assert_eq!(queued, 1_200, "queued changes");

    let reports = drain_all(&db, &small_batches()).await;

    let claimed: u64 = reports.iter().map(|report| report.changes).sum();
    let recomputed: u64 = reports.iter().map(|report| report.buckets).sum();
    assert_eq!(claimed, 1_200, "changes claimed over all batches");
    // Windows of 10, 20, 40 and 80 rows name 10, 20, 40 and the last 50 buckets, and
    // each batch claims whole buckets, so no bucket is recomputed twice.
    assert_eq!(recomputed, 120, "bucket recomputes over all batches");
    assert!(
        reports.len() <= 6,
        "batches: {} (windows double while full)",
        reports.len()
    );
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn batch_of_most_buckets_runs_one_full_pass() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // 1,500 buckets of 2 loads each: 30 ventures × 50 days.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           SELECT v, 'DELIVERED', 200 + v, 150, timestamptz '2024-09-01 00:00+00',
                  timestamptz '2024-06-01 06:00+00' + d * interval '1 day' + n * interval '1 hour'
           FROM generate_series(1, 30) AS v, generate_series(0, 49) AS d, generate_series(0, 1) AS n"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;
    // A row that drifted by a write that bypassed the triggers, inside the range of
    // days: the full pass repairs it together with the dirty buckets.
    execute(
        &client,
        r#"UPDATE "FreightKpiDaily" SET "loadsLost" = 7 WHERE "ventureId" = 30 AND date = '2024-06-20'"#,
    )
    .await;

    // A table-wide update: one statement, one queue row per bucket.
    execute(
        &client,
        r#"UPDATE "Load" SET status = 'LOST', "billingDate" = NULL"#,
    )
    .await;
    assert_eq!(queue_depth(&client).await, 1_500, "queued buckets");
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(reports[0].full_pass, "the batch ran a full pass");
    assert_eq!(reports[0].changes, 1_500, "changes claimed");
    assert_eq!(
        count(
            &client,
            r#"SELECT count(*) FROM "FreightKpiDaily" WHERE "loadsLost" = 2"#
        )
        .await,
        1_500,
        "buckets showing both loads lost"
    );
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn batch_of_few_buckets_stays_on_keys() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           SELECT v, 'QUOTED', timestamptz '2024-06-01 06:00+00' + d * interval '1 day'
           FROM generate_series(1, 30) AS v, generate_series(0, 99) AS d"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;

    // 1,000 of 3,000 buckets: at the minimum for a full pass, below its share.
    execute(
        &client,
        r#"UPDATE "Load" SET status = 'COVERED' WHERE "ventureId" <= 10"#,
    )
    .await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(!reports[0].full_pass, "the batch recomputed by key");
    assert_eq!(reports[0].buckets, 1_000, "buckets recomputed");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn two_drains_at_once_share_a_deep_queue() {
    let db = TestDb::migrated().await;
    let client = seed_then_update_each_load(&db, "status = 'DELIVERED'").await;

    // Loads already delivered change no KPI input and queue nothing.
    let queued = queue_depth(&client).await;
    assert_eq!(queued, 1_050, "queued changes");

    // Both claim whole buckets with SKIP LOCKED. Together they consume each change
    // once, and neither may stall on the other's claimed rows past the timeout.
    let settings = small_batches();
    let first = tokio::time::timeout(Duration::from_secs(60), drain_all(&db, &settings));
    let second = tokio::time::timeout(Duration::from_secs(60), drain_all(&db, &settings));
    let (first, second) = tokio::join!(first, second);
    let claimed: u64 = first
        .expect("first drain finishes")
        .iter()
        .chain(&second.expect("second drain finishes"))
        .map(|report| report.changes)
        .sum();

    assert_eq!(claimed, 1_050, "changes claimed by both drains together");
    assert_eq!(queue_depth(&client).await, 0, "queue after both drains");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn batch_of_most_loads_runs_one_full_pass() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // 3,000 buckets: ventures 1-10 hold 20 loads per day, ventures 11-30 one.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           SELECT v, 'QUOTED', timestamptz '2024-06-01 06:00+00' + d * interval '1 day'
           FROM generate_series(1, 30) AS v, generate_series(0, 99) AS d,
                generate_series(1, 20) AS n
           WHERE v <= 10 OR n = 1"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;
    // A drifted row of a bucket that no write touches: only a full pass repairs it.
    execute(
        &client,
        r#"UPDATE "FreightKpiDaily" SET "loadsLost" = 7 WHERE "ventureId" = 30 AND date = '2024-06-20'"#,
    )
    .await;

    // 1,000 of 3,000 buckets, below the bucket share, but 20,000 of 22,000 loads.
    execute(
        &client,
        r#"UPDATE "Load" SET status = 'COVERED' WHERE "ventureId" <= 10"#,
    )
    .await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(reports[0].full_pass, "the batch ran a full pass");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}
