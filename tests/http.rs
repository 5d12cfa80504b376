//! The HTTP endpoint of `freight-kpi run`: every metric is exported and moves with
//! the work, and `/readyz` follows the database connection.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    admin_url, binary, connect, start_service, test_settings, wait_for_exact_kpis, wait_until,
    RunningService, TestDb,
};
use freight_kpi::config::RunSettings;
use freight_kpi::db::DatabaseTarget;
use freight_kpi::observe::HttpSettings;
use freight_kpi::reconcile::{reconcile, ReconcileOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Every metric the endpoint must export, as named in its `# TYPE` line.
const METRIC_NAMES: [&str; 18] = [
    "freight_kpi_changes_consumed_total",
    "freight_kpi_buckets_recomputed_total",
    "freight_kpi_batches_total",
    "freight_kpi_recompute_failures_total",
    "freight_kpi_queue_depth",
    "freight_kpi_queue_oldest_change_age_seconds",
    "freight_kpi_failed_buckets",
    "freight_kpi_commit_to_fresh_seconds",
    "freight_kpi_listener_reconnects_total",
    "freight_kpi_listener_connected",
    "freight_kpi_notifications_received_total",
    "freight_kpi_notifications_ignored_total",
    "freight_kpi_lock_acquisitions_total",
    "freight_kpi_lock_losses_total",
    "freight_kpi_job_runs_last_24h",
    "freight_kpi_last_reconcile_success_timestamp_seconds",
    "freight_kpi_last_reconcile_drifted_buckets",
    "freight_kpi_database_up",
];

/// Sends `GET path` and returns the status code and the body.
async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address)
        .await
        .unwrap_or_else(|error| panic!("connect to {address}: {error}"));
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed response: {response}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head}"));
    (status, body.to_owned())
}

/// Returns the value of the sample `series` (a name, with labels if any) in a
/// scrape, or `None` when the scrape lacks it.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
}

/// Sums every sample of the metric `name` over all its label sets.
fn sum_of(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn with_http(mut settings: RunSettings) -> RunSettings {
    settings.http = Some(HttpSettings {
        address: "127.0.0.1:0".parse().expect("valid address"),
        ..HttpSettings::default()
    });
    settings
}

fn http_address(service: &RunningService) -> SocketAddr {
    service
        .handles
        .telemetry
        .http_address()
        .expect("the endpoint reports its bound address")
}

async fn insert_loads(client: &tokio_postgres::Client, count: i32) {
    client
        .execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
               SELECT 1 + i % 5, 'DELIVERED', 200, 120, now(), now() - (i % 3) * interval '1 day'
               FROM generate_series(1, $1) AS i"#,
            &[&count],
        )
        .await
        .expect("insert loads");
}

#[tokio::test]
async fn metrics_export_every_named_metric() {
    let db = TestDb::migrated().await;
    let service = start_service(&db, with_http(test_settings(&db))).await;

    let (status, scrape) = http_get(http_address(&service), "/metrics").await;

    assert_eq!(status, 200);
    for name in METRIC_NAMES {
        assert!(
            scrape.contains(&format!("# TYPE {name} ")),
            "metric {name} is missing from the scrape:\n{scrape}"
        );
    }
    service.stop().await;
}

#[tokio::test]
async fn metrics_move_when_service_works() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, with_http(test_settings(&db))).await;
    let address = http_address(&service);
    let (_, before) = http_get(address, "/metrics").await;

    // Writes through the incremental path.
    insert_loads(&client, 60).await;
    wait_for_exact_kpis(&client, Duration::from_secs(10)).await;
    // A notification that is not a wake-up.
    client
        .batch_execute("NOTIFY freight_kpi, 'not a wake-up'")
        .await
        .expect("send a junk notification");
    // A write the triggers cannot see, so that the reconcile finds drift.
    client
        .batch_execute(
            r#"SET session_replication_role = replica;
               UPDATE "Load" SET status = 'LOST' WHERE id % 4 = 0;
               SET session_replication_role = origin;"#,
        )
        .await
        .expect("write around the triggers");
    let pool = db.target.pool(2).expect("create a pool");
    reconcile(&pool, &ReconcileOptions::default())
        .await
        .expect("reconcile the drift");
    // A lost listener connection.
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'freight-kpi listener'",
            &[],
        )
        .await
        .expect("terminate the listener's backend");
    wait_until(
        "the listener to reconnect",
        Duration::from_secs(15),
        || async {
            let (_, scrape) = http_get(address, "/metrics").await;
            sample(&scrape, "freight_kpi_listener_reconnects_total") >= Some(1.0)
                && sample(&scrape, "freight_kpi_listener_connected") == Some(1.0)
        },
    )
    .await;
    // A change left waiting: the queue gauges show it until a batch commits. Every
    // bucket lock is held meanwhile, so a batch that claims the change waits with its
    // delete uncommitted and the change stays counted.
    let mut holder = db.client().await;
    let holding = holder.transaction().await.expect("begin the lock holder");
    freight_kpi::kpi::lock_all_buckets(&holding)
        .await
        .expect("hold every bucket lock");
    client
        .batch_execute(
            r#"INSERT INTO freight_kpi.change_queue (venture_id, day, enqueued_at)
               VALUES (99, current_date, clock_timestamp() - interval '3 seconds')"#,
        )
        .await
        .expect("queue a change by hand");
    let (_, after) = http_get(address, "/metrics").await;
    drop(holding);

    for counter in [
        "freight_kpi_changes_consumed_total",
        "freight_kpi_buckets_recomputed_total",
        "freight_kpi_batches_total",
        "freight_kpi_commit_to_fresh_seconds_count",
        "freight_kpi_notifications_received_total",
        "freight_kpi_notifications_ignored_total",
        "freight_kpi_listener_reconnects_total",
        "freight_kpi_last_reconcile_success_timestamp_seconds",
        "freight_kpi_last_reconcile_drifted_buckets",
    ] {
        let old = sample(&before, counter).unwrap_or(0.0);
        let new = sample(&after, counter).unwrap_or(0.0);
        assert!(new > old, "{counter} did not move: {old} then {new}");
    }
    assert!(
        sum_of(&after, "freight_kpi_job_runs_last_24h")
            > sum_of(&before, "freight_kpi_job_runs_last_24h"),
        "freight_kpi_job_runs_last_24h did not count the reconcile:\n{after}"
    );
    assert!(
        sample(
            &after,
            r#"freight_kpi_job_runs_last_24h{job="KPI_AGGREGATION",status="SUCCESS"}"#
        ) >= Some(1.0),
        "the reconcile is not labelled by job and status:\n{after}"
    );
    assert!(sample(&after, "freight_kpi_queue_depth") >= Some(1.0));
    assert!(sample(&after, "freight_kpi_queue_oldest_change_age_seconds") >= Some(3.0));
    assert_eq!(sample(&after, "freight_kpi_database_up"), Some(1.0));
    service.stop().await;
}

#[tokio::test]
async fn recompute_failures_counted_in_metrics() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, with_http(test_settings(&db))).await;
    let address = http_address(&service);

    // Revenue of 2e12 overflows numeric(14,2) of "totalRevenue".
    client
        .batch_execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate")
               SELECT 7, 'DELIVERED', 9999999999.99, 0, now() FROM generate_series(1, 200)"#,
        )
        .await
        .expect("insert loads whose revenue overflows");

    wait_until(
        "a recompute failure in /metrics",
        Duration::from_secs(15),
        || async {
            let (_, scrape) = http_get(address, "/metrics").await;
            sample(&scrape, "freight_kpi_recompute_failures_total") >= Some(1.0)
                && sample(&scrape, "freight_kpi_failed_buckets") >= Some(1.0)
        },
    )
    .await;
    service.stop().await;
}

/// Cuts the service off its database, or lets it back: ALLOW_CONNECTIONS stops new
/// connections, and the service's open ones are terminated.
async fn set_database_reachable(db: &TestDb, reachable: bool) {
    let admin_target = DatabaseTarget::parse(&admin_url()).expect("valid admin URL");
    let client = connect(&admin_target).await;
    client
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS {reachable}",
            db.name
        ))
        .await
        .expect("change ALLOW_CONNECTIONS");
    if !reachable {
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name LIKE 'freight-kpi%'",
                &[&db.name],
            )
            .await
            .expect("terminate the service's backends");
    }
}

async fn readiness(address: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http_get(address, "/readyz").await;
    let body = serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("/readyz body is not JSON ({error}): {body}"));
    (status, body)
}

#[tokio::test]
async fn readyz_follows_database_connection() {
    let db = TestDb::migrated().await;
    let mut settings = with_http(test_settings(&db));
    settings.ping_interval = Duration::from_millis(300);
    settings.ping_timeout = Duration::from_millis(500);
    settings.reconnect_max = Duration::from_millis(500);
    let service = start_service(&db, settings).await;
    let address = http_address(&service);
    let (status, _) = http_get(address, "/healthz").await;
    assert_eq!(status, 200);
    wait_until(
        "/readyz to report ready",
        Duration::from_secs(15),
        || async { readiness(address).await.0 == 200 },
    )
    .await;

    set_database_reachable(&db, false).await;
    wait_until(
        "/readyz to report not ready",
        Duration::from_secs(20),
        || async { readiness(address).await.0 == 503 },
    )
    .await;
    let (_, body) = readiness(address).await;
    assert_eq!(body["ready"], serde_json::Value::Bool(false));
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("database unreachable"),
        "the reasons do not name the database: {reasons}"
    );
    let (status, _) = http_get(address, "/healthz").await;
    assert_eq!(
        status, 200,
        "/healthz must stay up while the database is away"
    );

    set_database_reachable(&db, true).await;
    wait_until(
        "/readyz to report ready again",
        Duration::from_secs(20),
        || async { readiness(address).await.0 == 200 },
    )
    .await;
    let (_, body) = readiness(address).await;
    assert_eq!(body["listener_connected"], serde_json::Value::Bool(true));
    service.stop().await;
}

#[tokio::test]
async fn readyz_reports_old_queue() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut settings = with_http(test_settings(&db));
    settings
        .http
        .as_mut()
        .expect("set above")
        .ready_max_queue_age = Duration::from_secs(2);
    // The fallback poll must not drain the change below before the check.
    settings.poll_interval = Duration::from_secs(3600);
    let service = start_service(&db, settings).await;
    let address = http_address(&service);

    client
        .batch_execute(
            "UPDATE freight_kpi.listener SET armed = false;
             INSERT INTO freight_kpi.change_queue (venture_id, day, enqueued_at)
             VALUES (1, current_date, clock_timestamp() - interval '1 minute')",
        )
        .await
        .expect("queue an old change without waking the listener");

    let (status, body) = readiness(address).await;
    assert_eq!(status, 503);
    assert!(
        body["reasons"]
            .to_string()
            .contains("oldest pending change"),
        "the reasons do not name the queue age: {body}"
    );
    service.stop().await;
}

#[tokio::test]
async fn run_command_logs_bound_http_address() {
    let db = TestDb::migrated().await;
    let mut child = tokio::process::Command::new(binary())
        .args(["--log-format", "json", "run", "--http", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start freight-kpi run");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();

    let address = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read the log") {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["fields"]["message"] == "http endpoint listening" {
                let address = event["fields"]["http.address"]
                    .as_str()
                    .expect("the event has the address");
                return address.parse::<SocketAddr>().expect("a socket address");
            }
        }
        panic!("the log ended without the http address");
    })
    .await
    .expect("the endpoint is logged within 20 s");

    assert_ne!(address.port(), 0);
    let (status, body) = http_get(address, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    child.start_kill().expect("stop the service");
    let _ = child.wait().await;
}
