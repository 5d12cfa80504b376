//! `freight-kpi uninstall`: it drops the service's own objects, keeps the
//! application's, and a later `migrate` installs a working pipeline again.

mod common;

use std::time::Duration;

use common::{binary, queue_depth, start_service, test_settings, wait_for_exact_kpis, TestDb};
use tokio::process::Command;
use tokio_postgres::Client;

/// Runs the binary against `db` and returns its exit code and standard output.
async fn freight_kpi(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary())
        .args(args)
        .env("DATABASE_URL", db.url())
        .output()
        .await
        .expect("run the freight-kpi binary");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn count(client: &Client, query: &str) -> i64 {
    client
        .query_one(query, &[])
        .await
        .unwrap_or_else(|error| panic!("{query}: {error}"))
        .get(0)
}

const CAPTURE_TRIGGERS: &str = r#"SELECT count(*) FROM pg_trigger
    WHERE tgrelid = '"Load"'::regclass AND tgname LIKE 'freight\_kpi\_%'"#;
const SERVICE_SCHEMA: &str = "SELECT count(*) FROM pg_namespace WHERE nspname = 'freight_kpi'";
const APPLICATION_TYPES: &str = r#"SELECT count(*) FROM pg_type
    WHERE typname IN ('LoadStatus', 'JobName') AND typnamespace = 'public'::regnamespace"#;

async fn insert_loads(client: &Client) {
    client
        .batch_execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
               SELECT 1 + i % 4, 'DELIVERED', 100 + i, 60, now(), now() - (i % 3) * interval '1 day'
               FROM generate_series(1, 40) AS i"#,
        )
        .await
        .expect("insert loads");
}

#[tokio::test]
async fn uninstall_then_migrate_round_trips() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let (code, _, stderr) = freight_kpi(&db, &["migrate"]).await;
    assert_eq!(code, 0, "first migrate failed: {stderr}");

    // Fill both application tables, so that losing either one's rows shows.
    let service = start_service(&db, test_settings(&db)).await;
    insert_loads(&client).await;
    wait_for_exact_kpis(&client, Duration::from_secs(10)).await;
    service.stop().await;
    let loads_before = count(&client, r#"SELECT count(*) FROM "Load""#).await;
    let kpi_rows_before = count(&client, r#"SELECT count(*) FROM "FreightKpiDaily""#).await;
    let job_runs_before = count(&client, r#"SELECT count(*) FROM "JobRunLog""#).await;

    let (code, stdout, stderr) = freight_kpi(&db, &["uninstall"]).await;
    assert_eq!(code, 0, "uninstall failed: {stderr}");
    assert!(
        stdout.contains("dropped trigger freight_kpi_capture_insert on \"Load\""),
        "uninstall does not name the dropped trigger:\n{stdout}"
    );
    assert!(
        stdout.contains("table freight_kpi.change_queue"),
        "uninstall does not name the dropped queue table:\n{stdout}"
    );

    assert_eq!(count(&client, CAPTURE_TRIGGERS).await, 0);
    assert_eq!(count(&client, SERVICE_SCHEMA).await, 0);
    assert_eq!(count(&client, APPLICATION_TYPES).await, 2);
    assert_eq!(
        count(&client, r#"SELECT count(*) FROM "Load""#).await,
        loads_before
    );
    assert_eq!(
        count(&client, r#"SELECT count(*) FROM "FreightKpiDaily""#).await,
        kpi_rows_before
    );
    assert_eq!(
        count(&client, r#"SELECT count(*) FROM "JobRunLog""#).await,
        job_runs_before
    );
    // A write while uninstalled must not fail for lack of the trigger functions.
    client
        .batch_execute(r#"UPDATE "Load" SET status = 'LOST' WHERE id % 5 = 0"#)
        .await
        .expect("write to \"Load\" without the triggers");

    let (code, _, stderr) = freight_kpi(&db, &["migrate"]).await;
    assert_eq!(code, 0, "second migrate failed: {stderr}");
    assert_eq!(count(&client, CAPTURE_TRIGGERS).await, 4);

    client
        .batch_execute(r#"UPDATE "Load" SET status = 'CANCELLED' WHERE id % 7 = 0"#)
        .await
        .expect("write to \"Load\" after the second migrate");
    assert!(
        queue_depth(&client).await > 0,
        "a write after the second migrate was not captured in freight_kpi.change_queue"
    );

    // The update made while uninstalled is drift that only a reconcile repairs.
    let (code, _, stderr) = freight_kpi(&db, &["reconcile"]).await;
    assert_eq!(
        code, 0,
        "reconcile after the second migrate failed: {stderr}"
    );
    let service = start_service(&db, test_settings(&db)).await;
    insert_loads(&client).await;
    wait_for_exact_kpis(&client, Duration::from_secs(10)).await;
    service.stop().await;
}

#[tokio::test]
async fn uninstall_dry_run_drops_nothing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;

    let (code, stdout, stderr) = freight_kpi(&db, &["uninstall", "--dry-run"]).await;

    assert_eq!(code, 0, "dry run failed: {stderr}");
    assert!(
        stdout.contains("would drop trigger freight_kpi_capture_update"),
        "the dry run does not list the triggers:\n{stdout}"
    );
    assert_eq!(count(&client, CAPTURE_TRIGGERS).await, 4);
    assert_eq!(count(&client, SERVICE_SCHEMA).await, 1);
}

#[tokio::test]
async fn uninstall_refuses_while_service_listens() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, test_settings(&db)).await;

    let (code, _, stderr) = freight_kpi(&db, &["uninstall"]).await;

    assert_eq!(code, 1, "uninstall under a running service: {stderr}");
    assert!(
        stderr.contains("--force"),
        "the error does not name the way out: {stderr}"
    );
    assert_eq!(count(&client, CAPTURE_TRIGGERS).await, 4);
    service.stop().await;
}

#[tokio::test]
async fn uninstall_refuses_to_cascade_into_application_view() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE VIEW public.pending_kpi_changes AS SELECT count(*) AS n FROM freight_kpi.change_queue")
        .await
        .expect("create an application view over the queue");

    let (code, _, stderr) = freight_kpi(&db, &["uninstall"]).await;

    // Guards against DROP SCHEMA ... CASCADE silently dropping application objects.
    assert_eq!(code, 1, "uninstall with a dependent view: {stderr}");
    assert!(
        stderr.contains("pending_kpi_changes"),
        "the error does not name the dependent view: {stderr}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_views WHERE viewname = 'pending_kpi_changes'"
        )
        .await,
        1
    );
    assert_eq!(count(&client, CAPTURE_TRIGGERS).await, 4);
}

#[tokio::test]
async fn uninstall_on_bare_database_reports_nothing() {
    let db = TestDb::empty().await;

    let (code, stdout, stderr) = freight_kpi(&db, &["uninstall"]).await;

    assert_eq!(code, 0, "uninstall of nothing failed: {stderr}");
    assert!(stdout.contains("nothing to uninstall"), "{stdout}");
}
