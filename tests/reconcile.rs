//! Reconcile: the full pass finds and repairs drift that the incremental path cannot
//! see, reports it, logs its run, stays within its range, leaves other jobs' columns
//! alone, runs safely beside the service and isolates buckets that cannot be written.

mod common;

use std::time::Duration;

use chrono::NaiveDate;
use tokio_postgres::Client;

use freight_kpi::capture::{process_batch, DrainSettings};
use freight_kpi::jobs::RunStatus;
use freight_kpi::kpi::BucketRange;
use freight_kpi::reconcile::{reconcile, ReconcileOptions, ReconcileReport};

use common::{
    binary, bucket_label, count, day, describe_error, execute, kpi_mismatches,
    kpi_mismatches_except, queue_depth, start_service, test_settings, wait_for_empty_queue,
    wait_for_exact_kpis, wait_until, TestDb,
};

/// Time the service gets to make the KPIs exact after the last write.
const CONVERGE: Duration = Duration::from_secs(20);

async fn reconcile_all(db: &TestDb) -> ReconcileReport {
    let pool = db.target.pool(2).expect("a pool for the test database");
    reconcile(&pool, &ReconcileOptions::default())
        .await
        .expect("reconcile runs")
}

/// Runs `freight-kpi reconcile` with `arguments` against `db` and returns its exit
/// code, standard output and standard error.
async fn run_binary(db: &TestDb, arguments: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(binary())
        .arg("reconcile")
        .args(arguments)
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "info")
        .output()
        .await
        .expect("start the freight-kpi binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Reads the number that follows `label` in the binary's summary line, such as
/// `drifted 3`.
fn summary_figure(stdout: &str, label: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|line| line.starts_with("reconcile "))
        .unwrap_or_else(|| panic!("no summary line in the output:\n{stdout}"));
    let after = line
        .split_once(&format!("{label} "))
        .unwrap_or_else(|| panic!("no {label:?} in the summary line {line:?}"))
        .1;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {label:?} in {line:?}"))
}

/// Returns every stored KPI row as text, to show that a run wrote nothing.
async fn kpi_table_dump(client: &Client) -> Vec<String> {
    client
        .query(
            r#"SELECT f::text FROM "FreightKpiDaily" f ORDER BY "ventureId", date"#,
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Runs `sql` with the triggers bypassed, as a restore or logical replication would.
async fn execute_bypassing_triggers(client: &Client, sql: &str) {
    execute(
        client,
        &format!("BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;"),
    )
    .await;
}

/// Loads over ventures 1-4 and six UTC days, some of them delivered and billed.
const SEED_LOADS: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
    SELECT 1 + i % 4,
           (enum_range(NULL::"LoadStatus"))[1 + i % 8],
           100 + i, 60 + i / 3,
           CASE WHEN i % 2 = 0 THEN timestamptz '2024-07-01 08:00+00' END,
           timestamptz '2024-06-01 00:00+00' + (i % 6) * interval '1 day' + (i % 90) * interval '15 minutes'
    FROM generate_series(1, 240) AS i
"#;

#[tokio::test]
async fn reconcile_repairs_writes_that_bypass_triggers() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, test_settings(&db)).await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    wait_for_empty_queue(&client, CONVERGE).await;
    service.stop().await;

    execute_bypassing_triggers(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES (9, 'COVERED', '2024-06-02 10:00+00');
           UPDATE "Load" SET status = 'DELIVERED', "billingDate" = now() WHERE id % 7 = 0;
           DELETE FROM "Load" WHERE id % 11 = 0"#,
    )
    .await;
    assert_eq!(
        queue_depth(&client).await,
        0,
        "writes under session_replication_role = replica reached the queue"
    );
    let drift_before = kpi_mismatches(&client).await.len() as u64;
    assert!(drift_before > 0, "the bypassing writes caused no drift");

    let report = reconcile_all(&db).await;

    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
    assert_eq!(report.status, RunStatus::Success, "run status");
    assert_eq!(report.summary.drifted, drift_before, "drifted buckets");
    assert_eq!(report.summary.repaired, drift_before, "repaired buckets");

    let run = client
        .query_one(
            r#"SELECT "jobName"::text, status, "endedAt" IS NOT NULL, "durationMs", "statsJson"
               FROM "JobRunLog" WHERE id = $1"#,
            &[&report.run_id],
        )
        .await
        .expect("the run is logged under its id");
    assert_eq!(run.get::<_, String>(0), "KPI_AGGREGATION", "jobName");
    assert_eq!(run.get::<_, String>(1), "SUCCESS", "logged status");
    assert!(run.get::<_, bool>(2), "endedAt is not set");
    assert!(
        run.get::<_, Option<i32>>(3).is_some_and(|ms| ms >= 0),
        "durationMs is not set"
    );
    let stats: serde_json::Value = run.get(4);
    let summary = &report.summary;
    for (key, value) in [
        ("scanned", summary.scanned),
        ("drifted", summary.drifted),
        ("repaired", summary.repaired),
        ("zeroed", summary.zeroed),
    ] {
        assert_eq!(
            stats[key].as_u64(),
            Some(value),
            "statsJson.{key} differs from the summary"
        );
    }
}

#[tokio::test]
async fn tampered_row_is_repaired() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, test_settings(&db)).await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    wait_for_empty_queue(&client, CONVERGE).await;
    service.stop().await;

    let tampered = client
        .execute(
            r#"UPDATE "FreightKpiDaily" SET "loadsInbound" = 999 WHERE "ventureId" = 1 AND date = '2024-06-03'"#,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(tampered, 1, "rows tampered with");
    assert_eq!(
        kpi_mismatches(&client).await.len(),
        1,
        "the tampered row is not seen as drift"
    );

    let report = reconcile_all(&db).await;

    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
    assert_eq!(report.summary.drifted, 1, "drifted buckets");
    assert_eq!(report.summary.repaired, 1, "repaired buckets");
    assert_eq!(report.summary.zeroed, 0, "zeroed buckets");
}

#[tokio::test]
async fn row_without_loads_is_zeroed() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    execute(
        &client,
        r#"INSERT INTO "FreightKpiDaily" ("ventureId", date, "loadsInbound", "loadsQuoted", "totalRevenue", "totalProfit", "avgMarginPct")
           VALUES (77, '2020-02-29', 5, 3, 1000, 1000, 100)"#,
    )
    .await;

    let report = reconcile_all(&db).await;

    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
    assert_eq!(report.summary.zeroed, 1, "zeroed buckets");
    // Every seeded bucket had no row yet, and the orphan row drifted too.
    let seeded_buckets = count(
        &client,
        r#"SELECT count(DISTINCT ("ventureId", timezone('UTC', "createdAt")::date)) FROM "Load""#,
    )
    .await as u64;
    assert_eq!(
        report.summary.drifted,
        seeded_buckets + 1,
        "drifted buckets"
    );
}

#[tokio::test]
async fn unowned_columns_survive_both_paths() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, test_settings(&db)).await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;

    const SET_UNOWNED: &str = r#"
        UPDATE "FreightKpiDaily"
        SET "activeShippers" = 11, "newShippers" = 12, "churnedShippers" = 13,
            "reactivatedShippers" = 14, "atRiskShippers" = 15, "activeCarriers" = 16,
            "newCarriers" = 17"#;
    const UNOWNED_CHANGED: &str = r#"
        SELECT count(*) FROM "FreightKpiDaily"
        WHERE ("activeShippers", "newShippers", "churnedShippers", "reactivatedShippers",
               "atRiskShippers", "activeCarriers", "newCarriers")
              IS DISTINCT FROM (11, 12, 13, 14, 15, 16, 17)"#;
    execute(&client, SET_UNOWNED).await;
    let rows = count(&client, r#"SELECT count(*) FROM "FreightKpiDaily""#).await;

    // The incremental path: changed buckets, and one that loses all its loads.
    execute(
        &client,
        r#"UPDATE "Load" SET status = 'DELIVERED', "billingDate" = now() WHERE id % 3 = 0;
           DELETE FROM "Load" WHERE "ventureId" = 4 AND "createdAt" < '2024-06-03 00:00+00'"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    wait_for_empty_queue(&client, CONVERGE).await;
    service.stop().await;
    assert_eq!(
        count(&client, UNOWNED_CHANGED).await,
        0,
        "the incremental path changed columns it does not own"
    );

    // The reconcile: drift from writes that bypassed the triggers, and a tampered row.
    execute_bypassing_triggers(
        &client,
        r#"UPDATE "Load" SET status = 'LOST' WHERE id % 5 = 0;
           DELETE FROM "Load" WHERE "ventureId" = 3 AND "createdAt" < '2024-06-03 00:00+00'"#,
    )
    .await;
    execute(
        &client,
        r#"UPDATE "FreightKpiDaily" SET "loadsCovered" = 999 WHERE "ventureId" = 1"#,
    )
    .await;
    let report = reconcile_all(&db).await;
    assert!(report.summary.repaired > 0, "reconcile repaired nothing");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
    assert_eq!(
        count(&client, UNOWNED_CHANGED).await,
        0,
        "reconcile changed columns it does not own"
    );
    assert_eq!(
        count(&client, r#"SELECT count(*) FROM "FreightKpiDaily""#).await,
        rows,
        "rows holding other jobs' columns were removed"
    );
}

#[tokio::test]
async fn dry_run_reports_without_writing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, test_settings(&db)).await;
    execute(&client, SEED_LOADS).await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    wait_for_empty_queue(&client, CONVERGE).await;
    service.stop().await;

    execute_bypassing_triggers(
        &client,
        r#"UPDATE "Load" SET status = 'LOST' WHERE id % 5 = 0;
           DELETE FROM "Load" WHERE "ventureId" = 2"#,
    )
    .await;
    execute(
        &client,
        r#"INSERT INTO "FreightKpiDaily" ("ventureId", date, "loadsInbound") VALUES (88, '2021-01-01', 4)"#,
    )
    .await;
    let drift = kpi_mismatches(&client).await.len() as u64;
    let before = kpi_table_dump(&client).await;

    let (code, stdout, stderr) = run_binary(&db, &["--dry-run"]).await;

    assert_eq!(code, Some(0), "exit code; stderr:\n{stderr}");
    assert_eq!(summary_figure(&stdout, "drifted"), drift, "drifted buckets");
    assert_eq!(summary_figure(&stdout, "repaired"), 0, "repaired buckets");
    assert_eq!(
        kpi_table_dump(&client).await,
        before,
        "the dry run wrote KPIs"
    );
    assert_eq!(
        kpi_mismatches(&client).await.len() as u64,
        drift,
        "the dry run changed the drift"
    );
}

#[tokio::test]
async fn range_flags_limit_the_pass() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // The server's sessions run at UTC+14, so a range computed in the session's time
    // zone would take in or leave out loads near the UTC midnights below.
    execute(
        &client,
        &format!(
            "ALTER DATABASE \"{}\" SET TimeZone = 'Pacific/Kiritimati'",
            db.name
        ),
    )
    .await;

    // Ventures 1 and 2, days 10-13 of June: loads at the first and last instant of
    // each UTC day. No service runs, so no bucket has a row and all drift.
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           SELECT v, 'QUOTED', d + edge
           FROM generate_series(1, 2) AS v,
                generate_series(timestamptz '2024-06-10 00:00+00', '2024-06-13 00:00+00', interval '1 day') AS d,
                unnest(ARRAY[interval '0', interval '1 day' - interval '1 microsecond']) AS edge"#,
    )
    .await;
    let mut in_range = Vec::new();
    for (venture_id, date) in [(2, "2024-06-11"), (2, "2024-06-12")] {
        in_range.push(bucket_label(&client, venture_id, day(date)).await);
    }
    let mut out_of_range = Vec::new();
    for (venture_id, date) in [
        (2, "2024-06-10"),
        (2, "2024-06-13"),
        (1, "2024-06-11"),
        (1, "2024-06-12"),
    ] {
        out_of_range.push(bucket_label(&client, venture_id, day(date)).await);
    }

    let (code, stdout, stderr) = run_binary(
        &db,
        &[
            "--from",
            "2024-06-11",
            "--to",
            "2024-06-12",
            "--venture",
            "2",
        ],
    )
    .await;

    assert_eq!(code, Some(0), "exit code; stderr:\n{stderr}");
    assert_eq!(summary_figure(&stdout, "scanned"), 2, "scanned buckets");
    assert_eq!(summary_figure(&stdout, "repaired"), 2, "repaired buckets");
    let mismatches = kpi_mismatches(&client).await;
    for label in &in_range {
        assert!(
            !mismatches
                .iter()
                .any(|line| line.starts_with(label.as_str())),
            "{label} is in range but still drifts"
        );
    }
    for label in &out_of_range {
        assert!(
            mismatches
                .iter()
                .any(|line| line.starts_with(label.as_str())),
            "{label} is out of range but was repaired"
        );
    }
    assert_eq!(
        mismatches.len(),
        6,
        "drifting buckets left: {mismatches:#?}"
    );
}

#[tokio::test]
async fn reconcile_beside_writers_and_service_converges() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    let service = start_service(&db, test_settings(&db)).await;

    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut writers = Vec::new();
    for writer in 0..2 {
        let client = db.client().await;
        let writing = writing.clone();
        writers.push(tokio::spawn(async move {
            let mut statements = 0u64;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                let statement = match (statements + writer) % 4 {
                    0 => {
                        r#"UPDATE "Load" SET status = (enum_range(NULL::"LoadStatus"))[1 + floor(random() * 8)::integer],
                                             "billingDate" = CASE WHEN random() < 0.5 THEN now() END
                           WHERE id IN (SELECT id FROM "Load" ORDER BY random() LIMIT 5)"#
                    }
                    1 => {
                        r#"UPDATE "Load" SET "ventureId" = 1 + floor(random() * 4)::integer,
                                             "createdAt" = "createdAt" + (floor(random() * 3)::integer - 1) * interval '1 day'
                           WHERE id IN (SELECT id FROM "Load" ORDER BY random() LIMIT 3)"#
                    }
                    2 => {
                        r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
                           SELECT 1 + floor(random() * 4)::integer, 'DELIVERED', 500, 200, now(),
                                  timestamptz '2024-06-01 12:00+00' + floor(random() * 6)::integer * interval '1 day'
                           FROM generate_series(1, 3)"#
                    }
                    _ => {
                        r#"DELETE FROM "Load" WHERE id IN (SELECT id FROM "Load" ORDER BY random() LIMIT 2)"#
                    }
                };
                client
                    .batch_execute(statement)
                    .await
                    .unwrap_or_else(|error| panic!("{statement}: {}", describe_error(&error)));
                statements += 1;
            }
            statements
        }));
    }

    let pool = db.target.pool(2).expect("a pool for the test database");
    let mut reconciles = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let report = reconcile(&pool, &ReconcileOptions::default())
            .await
            .expect("reconcile runs beside writers");
        assert_eq!(report.status, RunStatus::Success, "run status");
        reconciles += 1;
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut statements = 0;
    for writer in writers {
        statements += writer.await.expect("a writer panicked");
    }
    assert!(reconciles >= 2, "only {reconciles} reconciles ran");
    assert!(statements >= 20, "only {statements} writes ran");

    wait_for_exact_kpis(&client, CONVERGE).await;
    wait_for_empty_queue(&client, CONVERGE).await;
    service.stop().await;
}

/// Counts the sessions of this database that wait for a lock.
async fn sessions_waiting_for_lock(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .await
}

// Guards against a reconcile writing a result older than an incremental batch that
// committed while the reconcile ran.
#[tokio::test]
async fn reconcile_never_overwrites_newer_incremental_result() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let pool = db.target.pool(4).expect("a pool for the test database");
    execute(
        &client,
        r#"INSERT INTO "Load" ("ventureId", status, "createdAt")
           SELECT v, 'QUOTED', timestamptz '2024-06-07 10:00+00'
           FROM generate_series(1, 2) AS v, generate_series(1, 3)"#,
    )
    .await;
    while process_batch(&pool, &DrainSettings::default())
        .await
        .expect("drain the queue")
        .is_some()
    {}
    wait_for_exact_kpis(&client, CONVERGE).await;

    // Bucket (1, 2024-06-07) drifts by tampering, bucket (2, 2024-06-07) by a write
    // that bypasses the triggers, so the reconcile writes both, in that order.
    execute(
        &client,
        r#"UPDATE "FreightKpiDaily" SET "loadsInbound" = 999 WHERE "ventureId" = 1"#,
    )
    .await;
    execute_bypassing_triggers(
        &client,
        r#"UPDATE "Load" SET status = 'LOST' WHERE id = (SELECT min(id) FROM "Load" WHERE "ventureId" = 2)"#,
    )
    .await;

    // Holding the row of the first bucket stops the reconcile after it has read "Load"
    // and before it writes either bucket.
    let blocker = db.client().await;
    execute(
        &blocker,
        r#"BEGIN; SELECT 1 FROM "FreightKpiDaily" WHERE "ventureId" = 1 FOR UPDATE"#,
    )
    .await;
    let reconcile_pool = pool.clone();
    let reconciling =
        tokio::spawn(async move { reconcile(&reconcile_pool, &ReconcileOptions::default()).await });
    wait_until(
        "the reconcile to wait for the held row",
        CONVERGE,
        || async { sessions_waiting_for_lock(&client).await >= 1 },
    )
    .await;

    // A change after the reconcile's read, and its incremental batch.
    execute(
        &client,
        r#"UPDATE "Load" SET status = 'DELIVERED', "billingDate" = now(), "billAmount" = 70
           WHERE id = (SELECT max(id) FROM "Load" WHERE "ventureId" = 2)"#,
    )
    .await;
    let batch_pool = pool.clone();
    let batch =
        tokio::spawn(async move { process_batch(&batch_pool, &DrainSettings::default()).await });
    wait_until(
        "the batch to commit or to wait for the reconcile",
        CONVERGE,
        || async { batch.is_finished() || sessions_waiting_for_lock(&client).await >= 2 },
    )
    .await;

    execute(&blocker, "COMMIT").await;
    let report = reconciling
        .await
        .expect("the reconcile task does not panic")
        .expect("reconcile runs");
    assert_eq!(report.summary.repaired, 2, "repaired buckets");
    batch
        .await
        .expect("the batch task does not panic")
        .expect("the batch commits");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

/// Inserts, in one statement, 101 delivered loads billed 9999999999.99 (the largest
/// numeric(12,2)) in bucket (50, 2024-06-05), whose revenue then passes the 1e12 that
/// numeric(14,2) holds, and ordinary loads in (51, 2024-06-05) and (50, 2024-06-06).
const OVERFLOWING_INSERT: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
    SELECT 50, 'DELIVERED'::"LoadStatus", 9999999999.99, 1, now(), timestamptz '2024-06-05 10:00+00'
    FROM generate_series(1, 101)
    UNION ALL
    SELECT 51, 'DELIVERED', 250, 100, now(), timestamptz '2024-06-05 11:00+00'
    UNION ALL
    SELECT 50, 'COVERED', 300, 100, NULL, timestamptz '2024-06-06 11:00+00'
"#;

fn overflowing_bucket() -> (i32, NaiveDate) {
    (50, day("2024-06-05"))
}

#[tokio::test]
async fn overflowing_bucket_makes_reconcile_partial() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, OVERFLOWING_INSERT).await;
    execute(&client, SEED_LOADS).await;

    let report = reconcile_all(&db).await;

    assert_eq!(report.status, RunStatus::Partial, "run status");
    let failed: Vec<(i32, NaiveDate)> = report
        .summary
        .overflowed
        .iter()
        .map(|overflow| {
            (
                overflow.venture_id,
                overflow.day.to_date().expect("a finite day"),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![overflowing_bucket()],
        "buckets reported as failed"
    );
    assert_eq!(
        kpi_mismatches_except(&client, &[overflowing_bucket()]).await,
        Vec::<String>::new(),
        "the other buckets were not repaired"
    );
    let logged_status: String = client
        .query_one(
            r#"SELECT status FROM "JobRunLog" WHERE id = $1"#,
            &[&report.run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged_status, "PARTIAL", "logged status");
}

#[tokio::test]
async fn overflowing_bucket_is_isolated_and_retried() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut settings = test_settings(&db);
    // Failed buckets are retried only when the service drains, so a shorter fallback
    // poll brings the retry sooner. The first retry is due 1 second after the failure.
    settings.poll_interval = Duration::from_secs(2);
    let service = start_service(&db, settings).await;
    let (venture_id, failed_day) = overflowing_bucket();

    execute(&client, OVERFLOWING_INSERT).await;

    wait_until("the bucket to fail", CONVERGE, || async {
        count(&client, "SELECT count(*) FROM freight_kpi.failed_bucket").await > 0
    })
    .await;
    let failure = client
        .query_one(
            "SELECT venture_id, day, last_error FROM freight_kpi.failed_bucket",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(failure.get::<_, i32>(0), venture_id, "failed venture");
    assert_eq!(failure.get::<_, NaiveDate>(1), failed_day, "failed day");
    let last_error: String = failure.get(2);
    assert!(
        last_error.contains("overflow"),
        "last_error does not name the overflow: {last_error}"
    );
    wait_until("the other buckets to be exact", CONVERGE, || async {
        kpi_mismatches_except(&client, &[overflowing_bucket()])
            .await
            .is_empty()
    })
    .await;

    // One load fewer fits the column. The delete bypasses the triggers, so only the
    // retry of the failed bucket can bring the row up to date.
    execute_bypassing_triggers(
        &client,
        r#"DELETE FROM "Load" WHERE id = (SELECT min(id) FROM "Load" WHERE "ventureId" = 50 AND "billAmount" = 9999999999.99)"#,
    )
    .await;
    wait_for_exact_kpis(&client, CONVERGE).await;
    wait_until("the failure to be cleared", CONVERGE, || async {
        count(&client, "SELECT count(*) FROM freight_kpi.failed_bucket").await == 0
    })
    .await;
    service.stop().await;
}

#[tokio::test]
async fn binary_prints_summary_and_exits_zero() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    execute(
        &client,
        r#"INSERT INTO "FreightKpiDaily" ("ventureId", date, "loadsLost") VALUES (66, '2022-05-05', 2)"#,
    )
    .await;
    let drift = kpi_mismatches(&client).await.len() as u64;
    let buckets = count(
        &client,
        r#"SELECT count(*) FROM (
               SELECT "ventureId", timezone('UTC', "createdAt")::date FROM "Load"
               UNION
               SELECT "ventureId", date FROM "FreightKpiDaily") AS bucket"#,
    )
    .await as u64;

    let (code, stdout, stderr) = run_binary(&db, &[]).await;

    assert_eq!(code, Some(0), "exit code; stderr:\n{stderr}");
    assert_eq!(
        summary_figure(&stdout, "scanned"),
        buckets,
        "scanned buckets"
    );
    assert_eq!(summary_figure(&stdout, "drifted"), drift, "drifted buckets");
    assert_eq!(
        summary_figure(&stdout, "repaired"),
        drift,
        "repaired buckets"
    );
    assert_eq!(summary_figure(&stdout, "zeroed"), 1, "zeroed buckets");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn library_range_excludes_other_days() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    execute(&client, SEED_LOADS).await;
    let pool = db.target.pool(2).expect("a pool for the test database");
    let options = ReconcileOptions {
        range: BucketRange {
            from: Some(day("2024-06-03")),
            to: Some(day("2024-06-03")),
            venture_id: None,
        },
        dry_run: false,
    };

    let report = reconcile(&pool, &options).await.expect("reconcile runs");

    let buckets_in_range = count(
        &client,
        r#"SELECT count(DISTINCT "ventureId") FROM "Load"
           WHERE timezone('UTC', "createdAt")::date = '2024-06-03'"#,
    )
    .await as u64;
    assert_eq!(
        report.summary.repaired, buckets_in_range,
        "repaired buckets"
    );
    let outside = count(
        &client,
        r#"SELECT count(*) FROM "FreightKpiDaily" WHERE date <> '2024-06-03'"#,
    )
    .await;
    assert_eq!(outside, 0, "rows written outside the range");
}
