//! Attaching to a database whose application already created its tables.

mod common;

use std::time::Duration;

use common::{start_service, test_settings, wait_for_exact_kpis, TestDb};
use freight_kpi::db::{connect_dedicated, migrate};
use freight_kpi::Error;

/// The tables as a Prisma application creates them: text ids filled by the ORM, its
/// own index names, and a "JobName" enum without KPI_AGGREGATION.
const APPLICATION_SCHEMA: &str = r#"
    CREATE TYPE "LoadStatus" AS ENUM ('OPEN', 'WORKING', 'QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED', 'LOST', 'CANCELLED');
    CREATE TYPE "JobName" AS ENUM ('INCENTIVE_DAILY_COMMIT', 'CHURN_RECALC', 'TASK_GENERATION');
    CREATE TABLE "Load" (
        id bigserial PRIMARY KEY,
        "ventureId" integer NOT NULL,
        status "LoadStatus" NOT NULL DEFAULT 'OPEN',
        "billAmount" numeric(12, 2),
        "costAmount" numeric(12, 2),
        "billingDate" timestamptz,
        "createdAt" timestamptz NOT NULL DEFAULT now(),
        "updatedAt" timestamptz NOT NULL
    );
    CREATE INDEX "Load_ventureId_createdAt_status_idx" ON "Load" ("ventureId", "createdAt", status);
    CREATE TABLE "FreightKpiDaily" (
        id text PRIMARY KEY,
        "ventureId" integer NOT NULL,
        date date NOT NULL,
        "loadsInbound" integer NOT NULL DEFAULT 0,
        "loadsQuoted" integer NOT NULL DEFAULT 0,
        "loadsCovered" integer NOT NULL DEFAULT 0,
        "loadsLost" integer NOT NULL DEFAULT 0,
        "totalRevenue" numeric(14, 2) NOT NULL DEFAULT 0,
        "totalCost" numeric(14, 2) NOT NULL DEFAULT 0,
        "totalProfit" numeric(14, 2) NOT NULL DEFAULT 0,
        "avgMarginPct" numeric(7, 2),
        "activeShippers" integer,
        "newShippers" integer,
        "churnedShippers" integer,
        "reactivatedShippers" integer,
        "atRiskShippers" integer,
        "activeCarriers" integer,
        "newCarriers" integer,
        "updatedAt" timestamptz NOT NULL
    );
    CREATE UNIQUE INDEX "FreightKpiDaily_ventureId_date_key" ON "FreightKpiDaily" ("ventureId", date);
    CREATE TABLE "JobRunLog" (
        id bigserial PRIMARY KEY,
        "jobName" "JobName" NOT NULL,
        status text NOT NULL,
        "startedAt" timestamptz NOT NULL,
        "endedAt" timestamptz,
        "durationMs" integer,
        "statsJson" jsonb,
        error text
    );
    INSERT INTO "Load" ("ventureId", status, "updatedAt") VALUES (1, 'QUOTED', now());
    INSERT INTO "FreightKpiDaily" (id, "ventureId", date, "activeShippers", "updatedAt")
    VALUES ('ckexisting', 1, (now() AT TIME ZONE 'UTC')::date, 42, now());
"#;

async fn application_database() -> TestDb {
    let db = TestDb::empty().await;
    db.client()
        .await
        .batch_execute(APPLICATION_SCHEMA)
        .await
        .expect("create the application's schema");
    let (mut client, _messages) = connect_dedicated(&db.target).await.unwrap();
    migrate(&mut client)
        .await
        .expect("migrate attaches to the application's schema");
    db
}

#[tokio::test]
async fn migrate_keeps_application_objects() {
    let db = application_database().await;
    let client = db.client().await;

    let labels: Vec<String> = client
        .query(r#"SELECT unnest(enum_range(NULL::"JobName"))::text"#, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(labels.contains(&"KPI_AGGREGATION".to_owned()), "{labels:?}");

    // The application's index already serves the bucket scan, so none is added.
    let load_indexes: i64 = client
        .query_one(
            r#"SELECT count(*) FROM pg_indexes WHERE tablename = 'Load'"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(load_indexes, 2);

    let shippers: Option<i32> = client
        .query_one(
            r#"SELECT "activeShippers" FROM "FreightKpiDaily" WHERE id = 'ckexisting'"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shippers, Some(42));
}

#[tokio::test]
async fn run_rejects_kpi_id_without_default() {
    let db = application_database().await;

    let error = freight_kpi::service::run(
        test_settings(&db),
        Default::default(),
        std::future::pending(),
    )
    .await
    .expect_err("the service cannot insert buckets without an id default");

    let Error::IncompatibleSchema(message) = &error else {
        panic!("expected an incompatible schema error, got {error}");
    };
    assert!(message.contains(r#""id""#), "{message}");
    assert!(message.contains("SET DEFAULT"), "{message}");
}

#[tokio::test]
async fn attached_service_keeps_kpis_exact() {
    let db = application_database().await;
    let client = db.client().await;
    client
        .batch_execute(
            r#"ALTER TABLE "FreightKpiDaily" ALTER COLUMN id SET DEFAULT gen_random_uuid()::text"#,
        )
        .await
        .unwrap();
    let service = start_service(&db, test_settings(&db)).await;

    client
        .batch_execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "updatedAt", "createdAt")
               SELECT 1 + i % 2, 'DELIVERED', 500, 320, now(), now(), now() - (i % 3) * interval '1 day'
               FROM generate_series(1, 30) AS i;
               UPDATE "Load" SET status = 'COVERED' WHERE id = 1;"#,
        )
        .await
        .unwrap();

    wait_for_exact_kpis(&client, Duration::from_secs(5)).await;
    let shippers: Option<i32> = client
        .query_one(
            r#"SELECT "activeShippers" FROM "FreightKpiDaily" WHERE id = 'ckexisting'"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        shippers,
        Some(42),
        "the service must not touch columns it does not own"
    );
    service.stop().await;
}

// Regression: with a "createdAt" of type timestamp without time zone, as Prisma declares
// DateTime, the day depended on the writer's TimeZone and buckets went missing.
#[tokio::test]
async fn timestamp_created_at_uses_stored_utc_day() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    client
        .batch_execute(
            r#"CREATE TYPE "LoadStatus" AS ENUM ('OPEN', 'WORKING', 'QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED', 'LOST', 'CANCELLED');
               CREATE TABLE "Load" (
                   id bigserial PRIMARY KEY,
                   "ventureId" integer NOT NULL,
                   status "LoadStatus" NOT NULL DEFAULT 'OPEN',
                   "billAmount" numeric(12, 2),
                   "costAmount" numeric(12, 2),
                   "billingDate" timestamp(3),
                   "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
                   "updatedAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
               );"#,
        )
        .await
        .unwrap();
    let (mut migrating, _messages) = connect_dedicated(&db.target).await.unwrap();
    migrate(&mut migrating).await.unwrap();
    let service = start_service(&db, test_settings(&db)).await;

    // Stored values are UTC wall time, whatever zone the writing session is in.
    for (zone, created_at) in [
        ("Pacific/Kiritimati", "2026-01-01 23:30"),
        ("America/Adak", "2026-01-01 00:30"),
        ("Asia/Kathmandu", "2026-01-02 00:05"),
    ] {
        client
            .batch_execute(&format!(
                r#"BEGIN;
                   SET LOCAL TimeZone = '{zone}';
                   INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES (3, 'QUOTED', '{created_at}');
                   COMMIT;"#
            ))
            .await
            .unwrap();
    }

    let expected = r#"
        SELECT "ventureId", "createdAt"::date AS day, count(*)::integer AS inbound
        FROM "Load" GROUP BY 1, 2 ORDER BY 1, 2"#;
    let stored = r#"
        SELECT "ventureId", date, "loadsInbound" FROM "FreightKpiDaily"
        WHERE "loadsInbound" > 0 ORDER BY 1, 2"#;
    let rows = |result: Vec<tokio_postgres::Row>| -> Vec<(i32, chrono::NaiveDate, i32)> {
        result
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    };
    common::wait_until(
        "the buckets of the stored days",
        Duration::from_secs(5),
        || async {
            rows(client.query(stored, &[]).await.unwrap())
                == rows(client.query(expected, &[]).await.unwrap())
        },
    )
    .await;
    let buckets = rows(client.query(stored, &[]).await.unwrap());
    assert_eq!(buckets.len(), 2, "{buckets:?}");

    let pool = db.target.pool(2).unwrap();
    let report = freight_kpi::reconcile::reconcile(
        &pool,
        &freight_kpi::reconcile::ReconcileOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        report.summary.drifted, 0,
        "reconcile agrees with the incremental path"
    );
    service.stop().await;
}
