//! Helpers shared by the integration tests: a fresh database per test, cloned from a
//! migrated template, an independent KPI aggregation to compare against, and a
//! service running in the test's runtime.
//!
//! The server comes from `FREIGHT_KPI_TEST_ADMIN_URL`, else `DATABASE_URL`, else
//! `host=127.0.0.1 port=5432 user=postgres dbname=postgres` when something listens
//! there, else a private cluster started for this test process from the installed
//! server binaries (see `private_server`). The role needs CREATEDB.

#![allow(dead_code)]

pub mod cluster;
pub mod private_server;
pub mod proxy;

use std::future::Future;
use std::time::Duration;

use freight_kpi::config::RunSettings;
use freight_kpi::db::DatabaseTarget;
use freight_kpi::service::{run, ServiceHandles};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Application name of the tests' own connections. It must not start with
/// `freight-kpi`, since tests cut the service off by that prefix.
pub const TEST_APPLICATION_NAME: &str = "kpi-test";

/// Advisory lock key (two-key form) that serializes template creation across test
/// processes.
const TEMPLATE_LOCK: (i32, i32) = (0x464B_5054, 1);

/// Returns the connection string of the server's maintenance database.
pub fn admin_url() -> String {
    if private_server::private_cluster_forced() {
        return private_server::private_cluster_url();
    }
    if let Ok(url) =
        std::env::var("FREIGHT_KPI_TEST_ADMIN_URL").or_else(|_| std::env::var("DATABASE_URL"))
    {
        return url;
    }
    if private_server::shared_server_answers() {
        return "host=127.0.0.1 port=5432 user=postgres dbname=postgres".to_owned();
    }
    private_server::private_cluster_url()
}

/// Opens a plain connection (no service settings) and drives it in the background.
pub async fn connect(target: &DatabaseTarget) -> Client {
    let mut config = target.config().clone();
    config.application_name(TEST_APPLICATION_NAME);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", target.describe()));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Name of the migrated template: it changes whenever a migration file changes, so a
/// stale template is never used.
fn template_name() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .expect("the sql folder exists")
        .map(|entry| entry.expect("readable sql folder").path())
        .collect();
    files.sort();
    for file in files {
        for byte in std::fs::read(&file).expect("readable migration") {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("fk_template_{:012x}", hash & 0xffff_ffff_ffff)
}

async fn ensure_template(admin: &Client, admin_target: &DatabaseTarget) -> String {
    let name = template_name();
    admin
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&TEMPLATE_LOCK.0, &TEMPLATE_LOCK.1],
        )
        .await
        .expect("take the template lock");

    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("look up the template")
        .is_some();
    if !exists {
        let stale = admin
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'fk\\_template\\_%'",
                &[],
            )
            .await
            .expect("list old templates");
        for row in stale {
            let old: String = row.get(0);
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{old}\" WITH (FORCE)"))
                .await;
        }
        let building = format!("{name}_building");
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"
            ))
            .await
            .expect("drop a half-built template");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{building}\""))
            .await
            .expect("create the template database");
        {
            let target = admin_target.with_dbname(&building);
            let (mut client, _messages) = freight_kpi::db::connect_dedicated(&target)
                .await
                .expect("connect to the template");
            freight_kpi::db::migrate(&mut client)
                .await
                .expect("migrate the template");
        }
        // The migrating backend may take a moment to exit after the client is dropped.
        retry_while_in_use(
            admin,
            &format!("ALTER DATABASE \"{building}\" RENAME TO \"{name}\""),
        )
        .await;
    }

    admin
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&TEMPLATE_LOCK.0, &TEMPLATE_LOCK.1],
        )
        .await
        .expect("release the template lock");
    name
}

/// Runs a statement that fails while another session uses a database, retrying for
/// up to 10 seconds.
async fn retry_while_in_use(admin: &Client, statement: &str) {
    for attempt in 0.. {
        match admin.batch_execute(statement).await {
            Ok(()) => return,
            // The driver's Display of a server error is only "db error", so the
            // check uses the SQLSTATE of "being accessed by other users".
            Err(error)
                if attempt < 100
                    && error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("{statement}: {}", describe_error(&error)),
        }
    }
}

/// A database that exists for one test and is dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub target: DatabaseTarget,
    admin_target: DatabaseTarget,
}

impl TestDb {
    /// Creates a fresh database with the schema migrated.
    pub async fn migrated() -> TestDb {
        Self::create(true).await
    }

    /// Creates a fresh, empty database.
    pub async fn empty() -> TestDb {
        Self::create(false).await
    }

    async fn create(migrated: bool) -> TestDb {
        let admin_target = DatabaseTarget::parse(&admin_url()).expect("valid admin URL");
        let admin = connect(&admin_target).await;
        let name = format!("fk_test_{:016x}", rand::random::<u64>());

        if migrated {
            let template = ensure_template(&admin, &admin_target).await;
            retry_while_in_use(
                &admin,
                &format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""),
            )
            .await;
        } else {
            admin
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
                .expect("create the test database");
        }

        TestDb {
            target: admin_target.with_dbname(&name),
            name,
            admin_target,
        }
    }

    /// Returns the connection string of this database, in key=value form, for the
    /// binary's DATABASE_URL.
    pub fn url(&self) -> String {
        let config = self.target.config();
        let quote = |value: &str| format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut parts = Vec::new();
        match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => {
                parts.push(format!("host={}", quote(host)))
            }
            Some(tokio_postgres::config::Host::Unix(path)) => {
                parts.push(format!("host={}", quote(&path.display().to_string())))
            }
            None => {}
        }
        if let Some(port) = config.get_ports().first() {
            parts.push(format!("port={port}"));
        }
        if let Some(user) = config.get_user() {
            parts.push(format!("user={}", quote(user)));
        }
        if let Some(password) = config.get_password() {
            parts.push(format!(
                "password={}",
                quote(&String::from_utf8_lossy(password))
            ));
        }
        parts.push(format!("dbname={}", quote(&self.name)));
        parts.join(" ")
    }

    /// Opens a connection to this database.
    pub async fn client(&self) -> Client {
        connect(&self.target).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_target = self.admin_target.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on, so the
        // database is dropped from a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a runtime");
            runtime.block_on(async {
                let admin = connect(&admin_target).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("failed to drop test database {}: {error}", self.name);
        }
    }
}

/// The KPI aggregation written independently of the service's SQL: each bucket's
/// expected values, compared with the stored row. Returns one line per mismatching
/// bucket, empty when the table is exact.
const MISMATCHES: &str = r#"
    WITH expected AS (
        SELECT "ventureId" AS venture_id,
               timezone('UTC', "createdAt")::date AS day,
               count(*)::integer AS inbound,
               sum(CASE WHEN status::text IN ('QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED') THEN 1 ELSE 0 END)::integer AS quoted,
               sum(CASE WHEN status::text IN ('COVERED', 'IN_TRANSIT', 'DELIVERED') THEN 1 ELSE 0 END)::integer AS covered,
               sum(CASE WHEN status::text = 'LOST' THEN 1 ELSE 0 END)::integer AS lost,
               sum(CASE WHEN status::text = 'DELIVERED' AND "billingDate" IS NOT NULL
                        THEN coalesce("billAmount", 0) ELSE 0 END) AS revenue,
               sum(CASE WHEN status::text = 'DELIVERED' AND "billingDate" IS NOT NULL
                        THEN coalesce("costAmount", 0) ELSE 0 END) AS cost
        FROM "Load"
        GROUP BY 1, 2
    ),
    expected_rows AS (
        SELECT venture_id, day, inbound, quoted, covered, lost, revenue, cost,
               revenue - cost AS profit,
               CASE WHEN revenue = 0 THEN NULL ELSE round((revenue - cost) * 100 / revenue, 2) END AS margin
        FROM expected
    )
    SELECT format('bucket (%s, %s): expected %s, stored %s',
                  coalesce(e.venture_id, f."ventureId"), coalesce(e.day, f.date),
                  CASE WHEN e.venture_id IS NULL THEN 'no loads'
                       ELSE format('inbound %s quoted %s covered %s lost %s revenue %s cost %s profit %s margin %s',
                                   e.inbound, e.quoted, e.covered, e.lost, e.revenue, e.cost, e.profit, e.margin) END,
                  CASE WHEN f."ventureId" IS NULL THEN 'no row'
                       ELSE format('inbound %s quoted %s covered %s lost %s revenue %s cost %s profit %s margin %s',
                                   f."loadsInbound", f."loadsQuoted", f."loadsCovered", f."loadsLost",
                                   f."totalRevenue", f."totalCost", f."totalProfit", f."avgMarginPct") END)
    FROM expected_rows e
    FULL JOIN "FreightKpiDaily" f ON f."ventureId" = e.venture_id AND f.date = e.day
    WHERE CASE
        WHEN e.venture_id IS NULL THEN
            (f."loadsInbound", f."loadsQuoted", f."loadsCovered", f."loadsLost",
             f."totalRevenue", f."totalCost", f."totalProfit") <> (0, 0, 0, 0, 0, 0, 0)
            OR f."avgMarginPct" IS NOT NULL
        WHEN f."ventureId" IS NULL THEN true
        ELSE (f."loadsInbound", f."loadsQuoted", f."loadsCovered", f."loadsLost",
              f."totalRevenue", f."totalCost", f."totalProfit") <> (e.inbound, e.quoted, e.covered, e.lost,
                                                                   e.revenue, e.cost, e.profit)
             OR f."avgMarginPct" IS DISTINCT FROM e.margin
    END
    ORDER BY 1
"#;

/// Returns the buckets whose stored KPIs differ from an independent aggregation of
/// `"Load"`, one line each.
pub async fn kpi_mismatches(client: &Client) -> Vec<String> {
    client
        .query(MISMATCHES, &[])
        .await
        .expect("run the independent aggregation")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits until the stored KPIs equal the independent aggregation, or panics after
/// `timeout` with the first mismatching buckets.
pub async fn wait_for_exact_kpis(client: &Client, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mismatches = kpi_mismatches(client).await;
        if mismatches.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{} buckets still differ from the aggregation of \"Load\" after {timeout:?}; first ones:\n{}",
                mismatches.len(),
                mismatches.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `condition` every 50 ms until it returns true, or panics with `what` after
/// `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drains the queue with `settings` through the service's batch function, as the
/// listener does, and returns the report of every committed batch.
pub async fn drain_all(
    db: &TestDb,
    settings: &freight_kpi::capture::DrainSettings,
) -> Vec<freight_kpi::capture::BatchReport> {
    let pool = db.target.pool(2).expect("a pool for the test database");
    let mut reports = Vec::new();
    freight_kpi::capture::drain_queue(
        &pool,
        settings,
        |report| reports.push(report.clone()),
        || false,
    )
    .await
    .expect("drain the queue");
    reports
}

/// Number of changes waiting in the queue.
pub async fn queue_depth(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM freight_kpi.change_queue", &[])
        .await
        .expect("count the queue")
        .get(0)
}

/// Waits until the change queue is empty, or panics after `timeout`. The KPIs can be
/// exact while a few queue rows still wait: a batch's recompute reads changes
/// committed after its claim, and their rows go with the next wake-up. A row whose
/// wake-up was lost stays, so with the fallback poll off this still catches it.
pub async fn wait_for_empty_queue(client: &Client, timeout: Duration) {
    wait_until("an empty change queue", timeout, || async {
        queue_depth(client).await == 0
    })
    .await;
}

/// A service started inside the test's runtime.
pub struct RunningService {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<freight_kpi::Result<()>>,
    pub handles: ServiceHandles,
}

/// Settings that tests use unless they change them: the default debounce and a long
/// fallback poll, so a test that converges quickly shows that notifications work.
pub fn test_settings(db: &TestDb) -> RunSettings {
    RunSettings::new(db.target.clone())
}

/// Starts `freight-kpi run` in this runtime with `settings`, and waits until its
/// listener is registered and armed.
pub async fn start_service(db: &TestDb, settings: RunSettings) -> RunningService {
    let handles = ServiceHandles::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(settings, handles.clone(), async move {
        let _ = stopped.await;
    }));

    let client = db.client().await;
    wait_until("the listener to arm", Duration::from_secs(10), || async {
        client
            .query_one("SELECT count(*) FROM freight_kpi.listener WHERE armed", &[])
            .await
            .map(|row| row.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;

    RunningService {
        stop: Some(stop),
        task,
        handles,
    }
}

impl RunningService {
    /// Stops the service and waits for it to exit, at most 10 seconds.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let exited = tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the service stops within 10 seconds");
        exited
            .expect("the service task does not panic")
            .expect("the service exits without error");
    }
}

/// Path of the built `freight-kpi` binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_freight-kpi")
}

/// Opens a plain connection and forwards its notifications and notices, read with
/// `Connection::poll_message`, to the returned receiver. The receiver ends when the
/// connection closes.
pub async fn connect_with_messages(
    target: &DatabaseTarget,
) -> (
    Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
) {
    let mut config = target.config().clone();
    config.application_name(TEST_APPLICATION_NAME);
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", target.describe()));
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if sender.send(message).is_err() {
                break;
            }
        }
    });
    (client, receiver)
}

/// Returns the prefix that `kpi_mismatches` gives the line of bucket (`venture_id`,
/// `day`), formatted by the server as the aggregation formats it.
pub async fn bucket_label(client: &Client, venture_id: i32, day: chrono::NaiveDate) -> String {
    client
        .query_one(
            "SELECT format('bucket (%s, %s):', $1::integer, $2::date)",
            &[&venture_id, &day],
        )
        .await
        .expect("format a bucket label")
        .get(0)
}

/// Returns the lines of `kpi_mismatches` except those of the `excluded` buckets, for
/// tests where some buckets cannot be written (their totals overflow the columns).
pub async fn kpi_mismatches_except(
    client: &Client,
    excluded: &[(i32, chrono::NaiveDate)],
) -> Vec<String> {
    let mut labels = Vec::new();
    for (venture_id, day) in excluded {
        labels.push(bucket_label(client, *venture_id, *day).await);
    }
    kpi_mismatches(client)
        .await
        .into_iter()
        .filter(|line| !labels.iter().any(|label| line.starts_with(label.as_str())))
        .collect()
}

/// Describes a driver error with the server's message, which its `Display` leaves out
/// ("db error").
pub fn describe_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db_error) => format!("{}: {}", db_error.severity(), db_error.message()),
        None => error.to_string(),
    }
}

/// Parses an ISO date of a test.
pub fn day(text: &str) -> chrono::NaiveDate {
    text.parse().expect("test days are valid ISO dates")
}

/// Runs `sql`, panicking with the server's message on failure.
pub async fn execute(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|error| panic!("{sql}: {}", describe_error(&error)));
}

/// Runs a query returning one bigint, such as a count.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|error| panic!("{sql}: {}", describe_error(&error)))
        .get(0)
}
