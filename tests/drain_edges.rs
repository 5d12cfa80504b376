//! Edge cases of the bucket-wide claim, the growing window and the full-pass branch of
//! a batch, and a differential check of the update capture of migration V5 against
//! V3's. Each test drives batches directly, as tests/drain.rs does, and ends by
//! comparing "FreightKpiDaily" with the independent aggregation.

mod common;

use std::time::Duration;

use freight_kpi::capture::DrainSettings;
use freight_kpi::reconcile::{reconcile, ReconcileOptions};

use common::{
    count, day, drain_all, execute, kpi_mismatches, kpi_mismatches_except, queue_depth, TestDb,
};

/// 1,500 buckets of 2 delivered loads each: 30 ventures × 50 days from 2024-06-01.
const SEED_1500_BUCKETS: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
    SELECT v, 'DELIVERED', 200 + v, 150, timestamptz '2024-09-01 00:00+00',
           timestamptz '2024-06-01 06:00+00' + d * interval '1 day' + n * interval '1 hour'
    FROM generate_series(1, 30) AS v, generate_series(0, 49) AS d, generate_series(0, 1) AS n
"#;

/// Records the `statement_timeout` in force whenever a batch settles its failed
/// buckets or writes "FreightKpiDaily".
const LOG_TIMEOUTS: &str = r#"
    CREATE TABLE public.timeout_log (
        id bigserial PRIMARY KEY,
        source text NOT NULL,
        setting text NOT NULL
    );
    CREATE FUNCTION public.log_timeout() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.timeout_log (source, setting)
        VALUES (TG_ARGV[0], current_setting('statement_timeout'));
        RETURN NULL;
    END $$;
    CREATE TRIGGER log_settle_timeout
        AFTER INSERT OR UPDATE OR DELETE ON freight_kpi.failed_bucket
        FOR EACH STATEMENT EXECUTE FUNCTION public.log_timeout('settle');
    CREATE TRIGGER log_write_timeout
        AFTER INSERT OR UPDATE ON "FreightKpiDaily"
        FOR EACH STATEMENT EXECUTE FUNCTION public.log_timeout('write');
"#;

async fn logged_timeouts(client: &tokio_postgres::Client, source: &str) -> Vec<String> {
    client
        .query(
            "SELECT setting FROM public.timeout_log WHERE source = $1 ORDER BY id",
            &[&source],
        )
        .await
        .expect("read the timeout log")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn full_pass_restores_statement_timeout() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_1500_BUCKETS).await;
    drain_all(&db, &DrainSettings::default()).await;
    execute(&client, LOG_TIMEOUTS).await;

    execute(&client, r#"UPDATE "Load" SET status = 'LOST'"#).await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(reports[0].full_pass, "the batch ran a full pass");
    // The upsert fires both the INSERT and the UPDATE statement trigger.
    let writes = logged_timeouts(&client, "write").await;
    assert!(!writes.is_empty(), "the full pass wrote rows");
    assert!(
        writes.iter().all(|setting| setting == "30min"),
        "statement_timeout of the full pass: {writes:?}"
    );
    let settle = logged_timeouts(&client, "settle").await;
    assert!(!settle.is_empty(), "the batch settled its failed buckets");
    assert!(
        settle.iter().all(|setting| setting == "30s"),
        "statement_timeout after the full pass: {settle:?}"
    );
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn truncate_pass_restores_statement_timeout() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_1500_BUCKETS).await;
    drain_all(&db, &DrainSettings::default()).await;
    execute(&client, LOG_TIMEOUTS).await;

    // The marker and one bucket in the same batch, so that the batch settles a bucket.
    execute(
        &client,
        r#"TRUNCATE "Load";
           INSERT INTO "Load" ("ventureId", status, "createdAt")
           VALUES (1, 'QUOTED', timestamptz '2024-06-03 10:00+00')"#,
    )
    .await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert!(
        reports[0].every_bucket,
        "the first batch recomputed every bucket"
    );
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
    let settle = logged_timeouts(&client, "settle").await;
    assert!(!settle.is_empty(), "the batch settled its failed buckets");
    assert!(
        settle.iter().all(|setting| setting == "30s"),
        "statement_timeout of the statements after the full pass of a TRUNCATE: {settle:?}"
    );
}

#[tokio::test]
async fn rejected_full_pass_uses_keys() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_1500_BUCKETS).await;
    drain_all(&db, &DrainSettings::default()).await;
    execute(&client, LOG_TIMEOUTS).await;
    // A narrower schema than the contract's: one bucket cannot hold 2 lost loads.
    execute(
        &client,
        r#"ALTER TABLE "FreightKpiDaily" ADD CONSTRAINT narrow_lost
           CHECK ("loadsLost" <> 2 OR "ventureId" <> 7 OR date <> '2024-06-10')"#,
    )
    .await;

    execute(&client, r#"UPDATE "Load" SET status = 'LOST'"#).await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(!reports[0].full_pass, "the rejected pass gave way to keys");
    assert_eq!(reports[0].failed.len(), 1, "failed buckets");
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM freight_kpi.failed_bucket WHERE venture_id = 7 AND day = '2024-06-10'"
        )
        .await,
        1,
        "the rejected bucket waits for a retry"
    );
    assert_eq!(
        kpi_mismatches_except(&client, &[(7, day("2024-06-10"))]).await,
        Vec::<String>::new()
    );
    let settle = logged_timeouts(&client, "settle").await;
    assert!(
        settle.iter().all(|setting| setting == "30s"),
        "statement_timeout after the rolled-back pass: {settle:?}"
    );
}

#[tokio::test]
async fn large_batch_infinite_day_uses_keys() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_1500_BUCKETS).await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           VALUES (3, 'QUOTED', 'infinity'), (4, 'LOST', '-infinity')"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());

    execute(&client, r#"UPDATE "Load" SET status = 'COVERED'"#).await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(
        !reports[0].full_pass,
        "a batch with an infinite day stays on keys"
    );
    assert_eq!(reports[0].buckets, 1_502, "buckets recomputed");
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn full_pass_settles_failed_buckets() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_1500_BUCKETS).await;
    // 101 delivered loads of almost 1e10 each overflow the revenue column of bucket
    // (31, 2024-06-05); bucket (32, 2024-06-06) is a stale failure that now fits.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           SELECT 31, 'DELIVERED', 9999999999.99, 1, timestamptz '2024-09-01 00:00+00',
                  timestamptz '2024-06-05 10:00+00'
           FROM generate_series(1, 101)"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           VALUES (32, 'QUOTED', timestamptz '2024-06-06 10:00+00');
           DELETE FROM freight_kpi.change_queue;
           INSERT INTO freight_kpi.failed_bucket (venture_id, day, attempts, last_error, next_attempt_at)
           VALUES (32, '2024-06-06', 3, 'earlier failure', now() - interval '1 second');
           UPDATE freight_kpi.failed_bucket SET next_attempt_at = now() + interval '1 hour'
           WHERE venture_id = 31"#,
    )
    .await;
    let attempts_before = count(
        &client,
        "SELECT attempts::bigint FROM freight_kpi.failed_bucket WHERE venture_id = 31",
    )
    .await;

    // Every seeded bucket changes; bucket 31 does not, and its retry is not due.
    execute(
        &client,
        r#"UPDATE "Load" SET status = 'LOST' WHERE "ventureId" <= 30"#,
    )
    .await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(reports[0].full_pass, "the batch ran a full pass");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM freight_kpi.failed_bucket WHERE venture_id = 32"
        )
        .await,
        0,
        "the due retry that now fits is cleared"
    );
    let retry: String = client
        .query_one(
            "SELECT format('attempts %s, next attempt in %s', attempts,
                           date_trunc('second', next_attempt_at - now()))
             FROM freight_kpi.failed_bucket WHERE venture_id = 31",
            &[],
        )
        .await
        .expect("read the failed bucket")
        .get(0);
    assert_eq!(
        count(
            &client,
            "SELECT attempts::bigint FROM freight_kpi.failed_bucket WHERE venture_id = 31"
        )
        .await,
        attempts_before,
        "a failed bucket neither dirty nor due is not counted as a new attempt ({retry})"
    );
    assert_eq!(
        kpi_mismatches_except(&client, &[(31, day("2024-06-05"))]).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn grown_window_recomputes_chunks_by_key() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // 20,000 buckets of one load; 6,000 dirty buckets are 30% of them and of the loads.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           SELECT v, 'QUOTED', timestamptz '2024-01-01 23:59:59.999999+00' + d * interval '1 day'
           FROM generate_series(1, 200) AS v, generate_series(0, 99) AS d"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;

    execute(
        &client,
        r#"UPDATE "Load" SET status = 'LOST' WHERE "ventureId" <= 60"#,
    )
    .await;
    let settings = DrainSettings {
        batch_size: 10_000,
        ..DrainSettings::default()
    };
    let reports = drain_all(&db, &settings).await;

    assert_eq!(reports.len(), 1, "batches");
    assert!(!reports[0].full_pass, "the batch recomputed by key");
    assert_eq!(reports[0].buckets, 6_000, "buckets recomputed");
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn truncate_marker_between_bucket_changes() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           VALUES (1, 'QUOTED', timestamptz '2024-06-03 10:00+00'),
                  (2, 'QUOTED', timestamptz '2024-06-04 10:00+00')"#,
    )
    .await;
    execute(&client, r#"TRUNCATE "Load""#).await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           VALUES (1, 'LOST', timestamptz '2024-06-03 11:00+00')"#,
    )
    .await;
    assert_eq!(queue_depth(&client).await, 4, "queued changes");

    // A window of one row names bucket (1, 2024-06-03): the batch takes its change
    // after the marker too, and leaves the marker for the next batch.
    let settings = DrainSettings {
        batch_size: 1,
        ..DrainSettings::default()
    };
    let reports = drain_all(&db, &settings).await;

    assert!(
        reports.iter().any(|report| report.every_bucket),
        "a batch took the marker: {reports:?}"
    );
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn full_pass_beside_reconcile_stays_exact() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_1500_BUCKETS).await;
    drain_all(&db, &DrainSettings::default()).await;

    for status in ["LOST", "COVERED", "DELIVERED", "QUOTED"] {
        execute(
            &client,
            &format!(r#"UPDATE "Load" SET status = '{status}'"#),
        )
        .await;
    }
    assert_eq!(queue_depth(&client).await, 6_000, "queued changes");

    let settings = DrainSettings {
        batch_size: 1_200,
        ..DrainSettings::default()
    };
    let pool = db.target.pool(2).expect("a pool for the test database");
    let options = ReconcileOptions::default();
    let first = tokio::time::timeout(Duration::from_secs(90), drain_all(&db, &settings));
    let second = tokio::time::timeout(Duration::from_secs(90), drain_all(&db, &settings));
    let reconciling = tokio::time::timeout(Duration::from_secs(90), reconcile(&pool, &options));
    let (first, second, reconciled) = tokio::join!(first, second, reconciling);
    let first = first.expect("first drain finishes");
    let second = second.expect("second drain finishes");
    reconciled
        .expect("the reconcile finishes")
        .expect("the reconcile runs");

    let claimed: u64 = first
        .iter()
        .chain(&second)
        .map(|report| report.changes)
        .sum();
    assert_eq!(claimed, 6_000, "changes claimed by both drains together");
    assert_eq!(queue_depth(&client).await, 0, "queue after both drains");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn full_pass_timestamp_created_at_midnight() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // UTC wall time in a column without a time zone, as sql/V3 describes Prisma storing it.
    execute(
        &client,
        r#"ALTER TABLE "Load" ALTER COLUMN "createdAt" TYPE timestamp
           USING "createdAt" AT TIME ZONE 'UTC'"#,
    )
    .await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           SELECT v, 'QUOTED', timestamp '2024-06-01 00:00' + d * interval '1 day' + s * interval '1 microsecond'
           FROM generate_series(1, 30) AS v, generate_series(0, 49) AS d, unnest(ARRAY[0, -1]) AS s"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());

    execute(
        &client,
        r#"SET TimeZone = 'Pacific/Kiritimati'; UPDATE "Load" SET status = 'LOST'; RESET TimeZone"#,
    )
    .await;
    let reports = drain_all(&db, &DrainSettings::default()).await;

    assert!(reports[0].full_pass, "the batch ran a full pass");
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

/// V3's update capture, installed beside V5's to write into a table of its own.
const V3_SHADOW: &str = r#"
    CREATE TABLE public.v3_queue (venture_id integer, day date);
    CREATE FUNCTION public.v3_capture_load_update() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        WITH new_inputs AS (
            SELECT "ventureId" AS venture_id, freight_kpi.utc_day("createdAt") AS day,
                   status, "billAmount", "costAmount", "billingDate" IS NOT NULL AS billed
            FROM updated_loads_new
        ),
        old_inputs AS (
            SELECT "ventureId" AS venture_id, freight_kpi.utc_day("createdAt") AS day,
                   status, "billAmount", "costAmount", "billingDate" IS NOT NULL AS billed
            FROM updated_loads_old
        ),
        changed AS (
            (SELECT * FROM new_inputs EXCEPT ALL SELECT * FROM old_inputs)
            UNION ALL
            (SELECT * FROM old_inputs EXCEPT ALL SELECT * FROM new_inputs)
        )
        INSERT INTO public.v3_queue (venture_id, day)
        SELECT DISTINCT venture_id, day FROM changed;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER v3_capture_update
        AFTER UPDATE ON "Load"
        REFERENCING OLD TABLE AS updated_loads_old NEW TABLE AS updated_loads_new
        FOR EACH STATEMENT EXECUTE FUNCTION public.v3_capture_load_update();
"#;

async fn enqueued(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    client
        .query(
            &format!(
                "SELECT format('(%s, %s)', venture_id, day) FROM {table} ORDER BY venture_id, day"
            ),
            &[],
        )
        .await
        .expect("read the queued buckets")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Runs `statement` and checks that V5 queued exactly the buckets V3 queued. Returns
/// how many buckets were queued.
async fn compare_capture(client: &tokio_postgres::Client, statement: &str) -> usize {
    execute(
        client,
        "DELETE FROM freight_kpi.change_queue; DELETE FROM public.v3_queue",
    )
    .await;
    execute(client, statement).await;
    let v5 = enqueued(client, "freight_kpi.change_queue").await;
    let v3 = enqueued(client, "public.v3_queue").await;
    assert_eq!(v5, v3, "buckets queued by V5 and V3 for: {statement}");
    v5.len()
}

#[tokio::test]
async fn update_capture_matches_v3() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, V3_SHADOW).await;
    execute(
        &client,
        r#"INSERT INTO "Load" (id, "ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           VALUES (1, 1, 'DELIVERED', 10.00, 4.00, '2024-07-01', '2024-06-03 10:00+00'),
                  (2, 1, 'DELIVERED', NULL, 4.00, '2024-07-01', '2024-06-03 11:00+00'),
                  (3, 1, 'QUOTED', 10.00, NULL, NULL, '2024-06-03 12:00+00'),
                  (4, 2, 'LOST', NULL, NULL, NULL, '2024-06-04 10:00+00'),
                  (5, 2, 'LOST', NULL, NULL, NULL, '2024-06-04 10:30+00'),
                  (6, 3, 'COVERED', 5.50, 2.25, '2024-07-02', 'infinity'),
                  (7, 3, 'OPEN', NULL, NULL, NULL, '-infinity');
           SELECT setval(pg_get_serial_sequence('"Load"', 'id'), 1000)"#,
    )
    .await;

    let cases: &[(&str, usize)] = &[
        // Only columns that are no KPI input.
        (
            r#"UPDATE "Load" SET "updatedAt" = now() + interval '1 day'"#,
            0,
        ),
        (
            r#"UPDATE "Load" SET "billingDate" = '2024-08-01' WHERE "billingDate" IS NOT NULL"#,
            0,
        ),
        // NULL amounts: to NULL, from NULL, NULL to NULL.
        (r#"UPDATE "Load" SET "billAmount" = NULL WHERE id = 1"#, 1),
        (r#"UPDATE "Load" SET "billAmount" = 12 WHERE id = 2"#, 1),
        (r#"UPDATE "Load" SET "costAmount" = NULL WHERE id = 4"#, 0),
        // Scale: 10.0 and 10.00 are the same amount.
        (r#"UPDATE "Load" SET "billAmount" = 10.0 WHERE id = 3"#, 0),
        (r#"UPDATE "Load" SET "billAmount" = 10.001 WHERE id = 3"#, 0),
        // billingDate set and cleared.
        (r#"UPDATE "Load" SET "billingDate" = NULL WHERE id = 6"#, 1),
        (r#"UPDATE "Load" SET "billingDate" = now() WHERE id = 6"#, 1),
        // Moves between ventures and days, to and from infinity.
        (r#"UPDATE "Load" SET "ventureId" = 9 WHERE id = 1"#, 2),
        (
            r#"UPDATE "Load" SET "createdAt" = '2024-06-05 10:00+00' WHERE id = 1"#,
            2,
        ),
        (
            r#"UPDATE "Load" SET "createdAt" = '2024-06-05 23:59+00' WHERE id = 1"#,
            0,
        ),
        (
            r#"UPDATE "Load" SET "createdAt" = 'infinity' WHERE id = 7"#,
            2,
        ),
        (
            r#"UPDATE "Load" SET "createdAt" = '-infinity', "ventureId" = 4 WHERE id = 7"#,
            2,
        ),
        // Two equal loads of one bucket: one changes, then changes back.
        (r#"UPDATE "Load" SET status = 'QUOTED' WHERE id = 5"#, 1),
        (r#"UPDATE "Load" SET status = 'LOST' WHERE id = 5"#, 1),
        // Swaps between rows: inside a bucket (no change) and across buckets.
        (
            r#"UPDATE "Load" l SET status = o.status, "billAmount" = o."billAmount",
                      "costAmount" = o."costAmount", "billingDate" = o."billingDate"
               FROM "Load" o WHERE (l.id, o.id) IN ((4, 5), (5, 4))"#,
            0,
        ),
        (
            r#"UPDATE "Load" l SET "ventureId" = o."ventureId", "createdAt" = o."createdAt"
               FROM "Load" o WHERE (l.id, o.id) IN ((4, 5), (5, 4))"#,
            0,
        ),
        (
            r#"UPDATE "Load" l SET status = o.status, "billAmount" = o."billAmount",
                      "costAmount" = o."costAmount", "billingDate" = o."billingDate"
               FROM "Load" o WHERE (l.id, o.id) IN ((1, 4), (4, 1))"#,
            2,
        ),
        // An identity change alone, and with an input change.
        (r#"UPDATE "Load" SET id = id + 100"#, 0),
        (
            r#"UPDATE "Load" SET id = id - 100, status = 'CANCELLED' WHERE id = 103"#,
            1,
        ),
        // No row matched.
        (r#"UPDATE "Load" SET status = 'LOST' WHERE id < 0"#, 0),
    ];
    for (statement, expected) in cases {
        let queued = compare_capture(&client, statement).await;
        assert_eq!(queued, *expected, "buckets queued for: {statement}");
    }

    // Random multi-row updates over a few buckets, with duplicates and NULLs.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
           SELECT 1 + i % 4, (enum_range(NULL::"LoadStatus"))[1 + i % 3],
                  CASE WHEN i % 5 = 0 THEN NULL ELSE (i % 3)::numeric END,
                  CASE WHEN i % 7 = 0 THEN NULL ELSE 1 END,
                  CASE WHEN i % 2 = 0 THEN NULL ELSE timestamptz '2024-07-01' END,
                  timestamptz '2024-06-01 00:00+00' + (i % 3) * interval '1 day'
           FROM generate_series(1, 200) AS i"#,
    )
    .await;
    execute(&client, "SELECT setseed(0.42)").await;
    for _ in 0..60 {
        compare_capture(
            &client,
            r#"UPDATE "Load" SET
                   status = CASE WHEN random() < 0.6 THEN status
                                 ELSE (enum_range(NULL::"LoadStatus"))[1 + floor(random() * 3)::integer] END,
                   "billAmount" = CASE WHEN random() < 0.7 THEN "billAmount"
                                       WHEN random() < 0.3 THEN NULL
                                       ELSE (floor(random() * 3))::numeric(12, 1) END,
                   "billingDate" = CASE WHEN random() < 0.8 THEN "billingDate"
                                        WHEN random() < 0.5 THEN NULL ELSE now() END,
                   "ventureId" = CASE WHEN random() < 0.9 THEN "ventureId" ELSE 1 + floor(random() * 4)::integer END,
                   "createdAt" = CASE WHEN random() < 0.9 THEN "createdAt"
                                      ELSE timestamptz '2024-06-01 00:00+00' + floor(random() * 3) * interval '1 day' END
               WHERE random() < 0.3"#,
        )
        .await;
    }

    // Unconstrained numeric, as an existing table may declare it: 10.0 and 10.00 differ
    // in scale and are equal.
    execute(
        &client,
        r#"ALTER TABLE "Load" ALTER COLUMN "billAmount" TYPE numeric, ALTER COLUMN "costAmount" TYPE numeric"#,
    )
    .await;
    execute(
        &client,
        r#"UPDATE "Load" SET "billAmount" = 10.0 WHERE id = 1"#,
    )
    .await;
    assert_eq!(
        compare_capture(
            &client,
            r#"UPDATE "Load" SET "billAmount" = 10.00 WHERE id = 1"#
        )
        .await,
        0,
        "buckets queued for a change of scale"
    );
    assert_eq!(
        compare_capture(
            &client,
            r#"UPDATE "Load" SET "billAmount" = CASE id WHEN 1 THEN 10.000 ELSE "billAmount" END,
                                 "costAmount" = "costAmount" * 1.0"#
        )
        .await,
        0,
        "buckets queued for changes of scale on many rows"
    );
}

#[tokio::test]
async fn one_row_window_claims_infinite_buckets() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "createdAt")
           VALUES (5, 'QUOTED', 1, 'infinity'), (5, 'QUOTED', 1, '-infinity')"#,
    )
    .await;
    drain_all(&db, &DrainSettings::default()).await;

    // Five changes to each of the two infinite buckets, interleaved.
    for _ in 0..5 {
        for created_at in ["infinity", "-infinity"] {
            execute(
                &client,
                &format!(
                    r#"UPDATE "Load" SET "billAmount" = "billAmount" + 1
                       WHERE "createdAt" = '{created_at}'"#
                ),
            )
            .await;
        }
    }
    assert_eq!(queue_depth(&client).await, 10, "queued changes");

    let settings = DrainSettings {
        batch_size: 1,
        ..DrainSettings::default()
    };
    let reports = drain_all(&db, &settings).await;

    let changes: Vec<u64> = reports.iter().map(|report| report.changes).collect();
    assert_eq!(changes, vec![5, 5], "changes claimed per batch");
    assert_eq!(queue_depth(&client).await, 0, "queue after the drain");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}
